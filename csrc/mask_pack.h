// Device-independent part of the bit-packed mask ops: argument checks and output allocation.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <limits>
#include <optional>

namespace bwrf_ext {

// Bytes that hold one bit per element.
inline int64_t packed_bytes(int64_t numel) { return (numel + 7) / 8; }

// The dtypes the mask kernels are built for (double too: a partner may run in fp64).
#define MASK_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// Checks pack_mask's x and returns it in logical order (a no-op for a contiguous x).
inline at::Tensor pack_mask_input(const at::Tensor& x) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()),
              "pack_mask: x must be float32, float64, float16 or bfloat16, got ",
              x.scalar_type());
  return x.contiguous();
}

// No upper bound is NaN, not +inf: `x >= NaN` is false for every x, so +inf stays inside (as in
// ReLU's backward), while an upper bound of +inf would exclude it.
inline double pack_mask_upper(std::optional<double> upper) {
  return upper.value_or(std::numeric_limits<double>::quiet_NaN());
}

// Checks unpack_mask_mul's arguments and returns grad in logical order.
inline at::Tensor unpack_mask_grad(const at::Tensor& packed, const at::Tensor& grad) {
  TORCH_CHECK(packed.scalar_type() == at::kByte, "unpack_mask_mul: packed must be uint8, got ",
              packed.scalar_type());
  TORCH_CHECK(at::isFloatingType(grad.scalar_type()),
              "unpack_mask_mul: grad must be float32, float64, float16 or bfloat16, got ",
              grad.scalar_type());
  TORCH_CHECK(packed.device() == grad.device(), "unpack_mask_mul: packed must be on grad's device ",
              grad.device(), ", got ", packed.device());
  TORCH_CHECK(packed.dim() == 1 && packed.numel() == packed_bytes(grad.numel()),
              "unpack_mask_mul: packed must have shape (", packed_bytes(grad.numel()),
              ",) = (ceil(grad.numel() / 8),), got ", packed.sizes());
  return grad.contiguous();
}

}  // namespace bwrf_ext
