// Device-independent part of the LSQ fake-quant ops: argument checks, memory layout, drivers.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Tensor.h>

#include <cstdint>
#include <optional>

namespace bwrf_ext {

// Everything a kernel needs besides the data pointers. A dense tensor (contiguous, channels_last
// or any other permutation) is read in memory order as [outer, channels, inner]: the channel of
// the element at memory offset o is (o / inner) % channels. Per-tensor is channels == 1.
struct LsqParams {
  int64_t numel;
  int64_t outer;
  int64_t channels;
  int64_t inner;
  float qmin;
  float qmax;
  float grad_factor;
  bool clip_before_round;
};

// The smallest step size the kernels use: s <= 0 (or NaN) is replaced by it, so a finite input
// still gives a finite output (see the Python docstring of lsq_fake_quant).
constexpr float kMinScale = 1.17549435e-38f;  // FLT_MIN, the smallest normal float

// Kernels: x, grad_y, y and grad_x are dense with identical strides; scale is contiguous fp32
// with `channels` entries; grad_scale (fp32, `channels` entries) receives the reduced gradient
// already multiplied by grad_factor.
using LsqForwardKernel = void (*)(const at::Tensor& x, const at::Tensor& scale, at::Tensor& y,
                                  const LsqParams& p);
using LsqBackwardKernel = void (*)(const at::Tensor& grad_y, const at::Tensor& x,
                                   const at::Tensor& scale, at::Tensor& grad_x,
                                   at::Tensor& grad_scale, const LsqParams& p);

// The dtypes the drivers let through: kernels are built for these three only.
#define LSQ_DISPATCH(TYPE, NAME, ...)                                   \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)          \
                             AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// Checks the arguments, lays out the inputs densely and calls the device kernel.
at::Tensor lsq_fake_quant_forward(const at::Tensor& x, const at::Tensor& scale, int64_t qmin,
                                  int64_t qmax, double grad_factor, std::optional<int64_t> axis,
                                  bool clip_before_round, LsqForwardKernel kernel);

std::tuple<at::Tensor, at::Tensor> lsq_fake_quant_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& scale, int64_t qmin,
    int64_t qmax, double grad_factor, std::optional<int64_t> axis, bool clip_before_round,
    LsqBackwardKernel kernel);

}  // namespace bwrf_ext
