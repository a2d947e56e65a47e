// All op schemas of the bwrf_ext library, defined once; kernels register per device in cpu/ and cuda/.
#include <torch/library.h>

TORCH_LIBRARY(bwrf_ext, m) {
  // LSQ fake quantization: y = clamp(round(x / s), qmin, qmax) * s with one s per tensor
  // (axis=None) or per slice along `axis`. grad_factor only matters to the backward; it is an
  // input here so that autograd can hand it on.
  m.def(
      "lsq_fake_quant(Tensor x, Tensor scale, int qmin, int qmax, float grad_factor, "
      "int? axis=None, bool clip_before_round=False) -> Tensor");
  // Fused backward: (grad_x, grad_scale) in one pass over x and grad_y.
  m.def(
      "lsq_fake_quant_backward(Tensor grad_y, Tensor x, Tensor scale, int qmin, int qmax, "
      "float grad_factor, int? axis=None, bool clip_before_round=False) -> (Tensor, Tensor)");
  // Bit-packed ReLU-style mask: bit i (byte i / 8, bit i % 8) is !(x[i] <= lower || x[i] >= upper)
  // (lower < x < upper, NaN gives 1 as in autograd's ReLU backward), x read in logical
  // (row-major) order; upper=None means +inf. uint8 output of ceil(numel / 8) bytes.
  m.def("pack_mask(Tensor x, float lower=0., float? upper=None) -> Tensor");
  // The mask's backward in one pass: grad where the bit is set, else 0, as a contiguous tensor.
  m.def("unpack_mask_mul(Tensor packed, Tensor grad) -> Tensor");
}
