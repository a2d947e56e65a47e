// Autograd of lsq_fake_quant in C++, registered for every device: the backward is the fused
// lsq_fake_quant_backward op. In C++ rather than torch.library.register_autograd because a Python
// autograd kernel runs Python on every call, with or without grad (~70 us per call measured on a
// 2-core Xeon, 9x ATen's learnable fake-quant), which a 16K weight tensor's kernel cannot hide.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace bwrf_ext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_forward(const at::Tensor& x, const at::Tensor& scale, int64_t qmin, int64_t qmax,
                        double grad_factor, std::optional<int64_t> axis, bool clip_before_round) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bwrf_ext::lsq_fake_quant", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t,
                                               int64_t, double, std::optional<int64_t>, bool)>();
  return op.call(x, scale, qmin, qmax, grad_factor, axis, clip_before_round);
}

std::tuple<at::Tensor, at::Tensor> call_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                 const at::Tensor& scale, int64_t qmin,
                                                 int64_t qmax, double grad_factor,
                                                 std::optional<int64_t> axis,
                                                 bool clip_before_round) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("bwrf_ext::lsq_fake_quant_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&, int64_t, int64_t, double,
                                                    std::optional<int64_t>, bool)>();
  return op.call(grad_y, x, scale, qmin, qmax, grad_factor, axis, clip_before_round);
}

class LsqFakeQuantFunction : public torch::autograd::Function<LsqFakeQuantFunction> {
 public:
  static constexpr bool is_traceable = true;  // compiled autograd may trace the backward

  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& scale,
                            int64_t qmin, int64_t qmax, double grad_factor,
                            std::optional<int64_t> axis, bool clip_before_round) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({x, scale});
    ctx->saved_data["qmin"] = qmin;
    ctx->saved_data["qmax"] = qmax;
    ctx->saved_data["grad_factor"] = grad_factor;
    ctx->saved_data["axis"] = axis;
    ctx->saved_data["clip_before_round"] = clip_before_round;
    return call_forward(x, scale, qmin, qmax, grad_factor, axis, clip_before_round);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const auto& data = ctx->saved_data;
    const c10::IValue& axis = data.at("axis");
    auto [grad_x, grad_scale] = call_backward(
        grad_outputs[0], saved[0], saved[1], data.at("qmin").toInt(), data.at("qmax").toInt(),
        data.at("grad_factor").toDouble(),
        axis.isNone() ? std::nullopt : std::optional<int64_t>(axis.toInt()),
        data.at("clip_before_round").toBool());
    // One gradient per forward input: none for the five non-tensor arguments.
    return {grad_x, grad_scale, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

at::Tensor lsq_fake_quant_autograd(const at::Tensor& x, const at::Tensor& scale, int64_t qmin,
                                   int64_t qmax, double grad_factor, std::optional<int64_t> axis,
                                   bool clip_before_round) {
  return LsqFakeQuantFunction::apply(x, scale, qmin, qmax, grad_factor, axis, clip_before_round);
}

}  // namespace

TORCH_LIBRARY_IMPL(bwrf_ext, Autograd, m) {
  m.impl("lsq_fake_quant", &lsq_fake_quant_autograd);
}

}  // namespace bwrf_ext
