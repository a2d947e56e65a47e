// CUDA kernels of the bit-packed mask ops: a warp ballot packs 32 elements, one thread per element.
#include "../mask_pack.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>

namespace bwrf_ext {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
// Grid cap: grid-stride loops cover the rest; a few resident waves on any current GPU.
constexpr int64_t kMaxBlocks = 4096;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Each warp takes 32 consecutive elements per trip (coalesced loads); the ballot's 4 bytes are
// written by lanes 0..3, each only if its byte lies inside the output (the last warp may be
// partial). The loop bound is uniform per warp, so the full-mask ballot is safe.
template <typename T>
__global__ void pack_kernel(const T* __restrict__ x, uint8_t* __restrict__ out, int64_t numel,
                            int64_t nbytes, at::opmath_type<T> lo, at::opmath_type<T> hi) {
  using opmath_t = at::opmath_type<T>;
  const int lane = threadIdx.x % kWarp;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp;
  for (int64_t base = warp * kWarp; base < numel; base += warps * kWarp) {
    const int64_t i = base + lane;
    bool bit = false;
    if (i < numel) {
      const opmath_t e = static_cast<opmath_t>(x[i]);
      bit = !((e <= lo) | (e >= hi));
    }
    const unsigned ballot = __ballot_sync(0xffffffffu, bit);
    const int64_t byte = base / 8 + lane;
    if (lane < 4 && byte < nbytes) out[byte] = static_cast<uint8_t>(ballot >> (8 * lane));
  }
}

template <typename T>
__global__ void unpack_mul_kernel(const uint8_t* __restrict__ packed, const T* __restrict__ grad,
                                  T* __restrict__ out, int64_t numel) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += stride) {
    // A select, not a multiply: grad inf/NaN under a cleared bit gives 0, as autograd's ReLU.
    out[i] = (packed[i >> 3] >> (i & 7)) & 1 ? grad[i] : T(0);
  }
}

int grid_for(int64_t numel) {
  return static_cast<int>(std::clamp<int64_t>(ceil_div(numel, kThreads), 1, kMaxBlocks));
}

at::Tensor pack_mask_cuda(const at::Tensor& x, double lower, std::optional<double> upper) {
  const at::Tensor input = pack_mask_input(x);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor out = at::empty({packed_bytes(input.numel())}, x.options().dtype(at::kByte));
  const int64_t numel = input.numel();
  if (numel == 0) return out;
  const double hi = pack_mask_upper(upper);
  const auto stream = at::cuda::getCurrentCUDAStream();
  MASK_DISPATCH(input.scalar_type(), "pack_mask", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    pack_kernel<scalar_t><<<grid_for(numel), kThreads, 0, stream>>>(
        input.const_data_ptr<scalar_t>(), out.data_ptr<uint8_t>(), numel, out.numel(),
        static_cast<opmath_t>(lower), static_cast<opmath_t>(hi));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor unpack_mask_mul_cuda(const at::Tensor& packed, const at::Tensor& grad) {
  const at::Tensor g = unpack_mask_grad(packed, grad);
  const at::Tensor bits = packed.contiguous();
  const c10::cuda::CUDAGuard guard(g.device());
  at::Tensor out = at::empty_like(g, at::MemoryFormat::Contiguous);
  const int64_t numel = g.numel();
  if (numel == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  MASK_DISPATCH(g.scalar_type(), "unpack_mask_mul", [&] {
    unpack_mul_kernel<scalar_t><<<grid_for(numel), kThreads, 0, stream>>>(
        bits.const_data_ptr<uint8_t>(), g.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
        numel);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bwrf_ext, CUDA, m) {
  m.impl("pack_mask", &pack_mask_cuda);
  m.impl("unpack_mask_mul", &unpack_mask_mul_cuda);
}

}  // namespace bwrf_ext
