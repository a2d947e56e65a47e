// Argument checks, dense layout and the device-independent drivers of the LSQ fake-quant ops.
#include "lsq_fake_quant.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>
#include <string>

namespace bwrf_ext {
namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// Shapes and dtypes written as Python writes them, so the C++ and Python errors read the same.
std::string py_shape(at::IntArrayRef sizes) {
  std::string out = "(";
  for (size_t i = 0; i < sizes.size(); ++i) {
    out += (i ? ", " : "") + std::to_string(sizes[i]);
  }
  return out + (sizes.size() == 1 ? ",)" : ")");
}

std::string py_dtype(at::ScalarType t) {
  return "torch." + std::string(c10::getDtypeNames(t).first);
}

// Validates everything but the data and returns the layout parameters for a dense x.
LsqParams check_args(const char* op, const at::Tensor& x, const at::Tensor& scale, int64_t qmin,
                     int64_t qmax, double grad_factor, std::optional<int64_t> axis,
                     bool clip_before_round) {
  TORCH_CHECK_TYPE(is_supported_float(x.scalar_type()), op,
                   ": x must be float32, float16 or bfloat16, got ", py_dtype(x.scalar_type()));
  TORCH_CHECK_TYPE(is_supported_float(scale.scalar_type()), op,
                   ": scale must be float32, float16 or bfloat16, got ",
                   py_dtype(scale.scalar_type()));
  TORCH_CHECK_VALUE(scale.device() == x.device(), op, ": scale must be on x's device ",
                    x.device(), ", got ", scale.device());
  constexpr int64_t int32_min = std::numeric_limits<int32_t>::min();
  constexpr int64_t int32_max = std::numeric_limits<int32_t>::max();
  TORCH_CHECK_VALUE(qmin >= int32_min && qmax <= int32_max, op,
                    ": qmin and qmax must fit in int32, got qmin=", qmin, ", qmax=", qmax);
  TORCH_CHECK_VALUE(qmin < qmax, op, ": qmin must be < qmax, got qmin=", qmin, ", qmax=", qmax);
  TORCH_CHECK_VALUE(std::isfinite(grad_factor) && grad_factor >= 0, op,
                    ": grad_factor must be a finite number >= 0, got ", grad_factor);

  LsqParams p{};
  p.numel = x.numel();
  p.qmin = static_cast<float>(qmin);
  p.qmax = static_cast<float>(qmax);
  p.grad_factor = static_cast<float>(grad_factor);
  p.clip_before_round = clip_before_round;
  if (!axis.has_value()) {
    TORCH_CHECK_VALUE(scale.numel() == 1 && scale.dim() <= 1, op,
                      ": per-tensor scale (axis=None) must have shape () or (1,), got ",
                      py_shape(scale.sizes()));
    p.outer = 1;
    p.channels = 1;
    p.inner = p.numel;
    return p;
  }
  const int64_t ndim = x.dim();
  TORCH_CHECK_INDEX(*axis >= -ndim && *axis < ndim && ndim > 0, op, ": axis must be in [",
                    -ndim, ", ", ndim - 1, "] for x of shape ", py_shape(x.sizes()), ", got ", *axis);
  const int64_t dim = *axis < 0 ? *axis + ndim : *axis;
  const int64_t channels = x.size(dim);
  TORCH_CHECK_VALUE(scale.dim() == 1 && scale.size(0) == channels, op,
                    ": per-channel scale must have shape (", channels, ",) = (x.shape[", dim,
                    "],), got ", py_shape(scale.sizes()));
  p.channels = channels;
  if (p.numel == 0) {
    p.outer = 0;
    p.inner = 0;
  } else if (channels == 1) {
    p.outer = 1;
    p.inner = p.numel;
  } else {
    // In a dense tensor the elements of one channel slice are `stride` apart in memory blocks.
    p.inner = x.stride(dim);
    p.outer = p.numel / (channels * p.inner);
  }
  return p;
}

// x itself when its memory is dense (any dim order), else a dense copy laid out as empty_like(x)
// would be: the fake implementations return empty_like(x), so real and fake strides agree.
at::Tensor dense(const at::Tensor& x) {
  if (x.is_non_overlapping_and_dense()) return x;
  return at::empty_like(x).copy_(x);
}

// t with exactly like's strides (copying only when they differ), so both read in one memory order.
at::Tensor with_layout_of(const at::Tensor& t, const at::Tensor& like) {
  if (t.strides() == like.strides() && t.is_non_overlapping_and_dense()) return t;
  return at::empty_like(like).copy_(t);
}

}  // namespace

at::Tensor lsq_fake_quant_forward(const at::Tensor& x, const at::Tensor& scale, int64_t qmin,
                                  int64_t qmax, double grad_factor, std::optional<int64_t> axis,
                                  bool clip_before_round, LsqForwardKernel kernel) {
  const at::Tensor xd = dense(x);
  const LsqParams p =
      check_args("lsq_fake_quant", xd, scale, qmin, qmax, grad_factor, axis, clip_before_round);
  at::Tensor y = at::empty_like(xd);
  if (p.numel == 0) return y;
  kernel(xd, scale.to(at::kFloat).contiguous(), y, p);
  return y;
}

std::tuple<at::Tensor, at::Tensor> lsq_fake_quant_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& scale, int64_t qmin,
    int64_t qmax, double grad_factor, std::optional<int64_t> axis, bool clip_before_round,
    LsqBackwardKernel kernel) {
  const at::Tensor xd = dense(x);
  const LsqParams p = check_args("lsq_fake_quant_backward", xd, scale, qmin, qmax, grad_factor,
                                 axis, clip_before_round);
  TORCH_CHECK_VALUE(grad_y.sizes() == x.sizes(),
                    "lsq_fake_quant_backward: grad_y must have x's shape ", py_shape(x.sizes()),
                    ", got ", py_shape(grad_y.sizes()));
  TORCH_CHECK_TYPE(grad_y.scalar_type() == x.scalar_type(),
                   "lsq_fake_quant_backward: grad_y must have x's dtype ", py_dtype(x.scalar_type()),
                   ", got ", py_dtype(grad_y.scalar_type()));
  TORCH_CHECK_VALUE(grad_y.device() == x.device(),
                    "lsq_fake_quant_backward: grad_y must be on x's device ", x.device(),
                    ", got ", grad_y.device());
  const at::Tensor gyd = with_layout_of(grad_y, xd);
  at::Tensor grad_x = at::empty_like(xd);
  at::Tensor grad_scale = at::zeros({p.channels}, scale.options().dtype(at::kFloat));
  if (p.numel > 0) kernel(gyd, xd, scale.to(at::kFloat).contiguous(), grad_x, grad_scale, p);
  return {grad_x, grad_scale.view(scale.sizes()).to(scale.scalar_type())};
}

}  // namespace bwrf_ext
