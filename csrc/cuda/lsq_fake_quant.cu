// CUDA kernels of the LSQ fake-quant ops: elementwise forward, fused deterministic backward.
#include "../lsq_fake_quant.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace bwrf_ext {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
// Backward stage-1 blocks aimed for: about one resident wave on an H100 (132 SMs x 8 blocks).
// A constant rather than the SM count, so the partial sums, and the bits of grad_scale, are
// the same on every GPU.
constexpr int64_t kTargetBlocks = 1024;
// Loop trips per thread before more blocks are added: keeps the block reductions (and the
// partials they write) a small share of the work.
constexpr int64_t kMinIters = 4;
// Channel slices shorter than this are summed as matrix columns: a warp walking along the slices
// would straddle several of them (channels_last, last-dim axis, tiny conv kernels).
constexpr int64_t kMinSegment = 32;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t pow2_at_least(int64_t v) { int64_t p = 1; while (p < v) p *= 2; return p; }
int64_t pow2_at_most(int64_t v) { int64_t p = 1; while (p * 2 <= v) p *= 2; return p; }
bool is_aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// int32 indexing is cheaper; every loop index stays below numel + one grid stride (< 2^25), so
// that margin keeps i += stride from overflowing.
bool fits_int32(int64_t numel) {
  return numel <= std::numeric_limits<int32_t>::max() - (int64_t{1} << 26);
}

// Runtime choices turned into template arguments.
template <typename F>
void with_index_type(bool use_int32, F&& f) {
  if (use_int32) f(int32_t{}); else f(int64_t{});
}
template <int kVec, typename F>
void with_vec(bool vectorised, F&& f) {
  if (vectorised) f(std::integral_constant<int, kVec>{}); else f(std::integral_constant<int, 1>{});
}

// V elements moved by one 16-byte (or narrower when V == 1) load/store.
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec { T v[V]; };

struct Step { float s, inv; };  // a channel's step size and its reciprocal

// s <= 0 and NaN both fail the comparison and become kMinScale. __frcp_rn is the correctly
// rounded 1/s whatever -prec-div says, so inv matches the CPU's 1.0f / s bit for bit.
__device__ __forceinline__ Step make_step(float raw) {
  const float s = raw > kMinScale ? raw : kMinScale;
  return {s, __frcp_rn(s)};
}

// x / s computed as x * (1/s) like the CPU; __fmul_rn is never contracted, so q - v below cannot
// become an FMA with a different rounding even without --fmad=false.
__device__ __forceinline__ float scaled(float x, Step st) { return __fmul_rn(x, st.inv); }

__device__ __forceinline__ float fake_quant(float x, Step st, float qmin, float qmax) {
  const float q = rintf(scaled(x, st));  // round half to even, as torch.round
  const float qc = q < qmin ? qmin : (q > qmax ? qmax : q);  // not fminf/fmaxf: NaN propagates
  return __fmul_rn(qc, st.s);
}

// One element of the backward: returns grad_x and adds grad_y * dy/ds to acc (fp32).
template <typename scalar_t>
__device__ __forceinline__ scalar_t backward_elem(scalar_t gy, scalar_t x, Step st, float qmin,
                                                  float qmax, bool clip_before_round,
                                                  float& acc) {
  const float v = scaled(static_cast<float>(x), st);
  const float q = rintf(v);
  const float t = clip_before_round ? v : q;
  const bool below = t < qmin;
  const bool above = t > qmax;
  const float slope = below ? qmin : (above ? qmax : q - v);
  acc += static_cast<float>(gy) * slope;
  return (below || above) ? static_cast<scalar_t>(0.0f) : gy;  // gy itself: bitwise pass-through
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

// Fixed-shape tree over a 1-D block (blockDim.x a multiple of 32), so the same inputs give the
// same bits on every run. The result is valid in thread 0.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_sums[kThreads / kWarp];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  v = warp_sum(v);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) v = warp_sum(lane < static_cast<int>(blockDim.x / kWarp) ? warp_sums[lane] : 0.f);
  return v;
}

// Grid-stride elementwise pass in memory order, V elements (16 bytes) per step. Per-tensor
// (channels == 1, a uniform branch) skips the channel arithmetic.
template <typename scalar_t, typename index_t, int V>
__global__ void __launch_bounds__(kThreads)
    lsq_forward_kernel(const scalar_t* __restrict__ x, const float* __restrict__ scale,
                       scalar_t* __restrict__ y, index_t numel, index_t channels, index_t inner,
                       float qmin, float qmax) {
  using VecT = Vec<scalar_t, V>;
  const bool per_tensor = channels == 1;
  const index_t stride = static_cast<index_t>(gridDim.x) * kThreads;
  const index_t first = static_cast<index_t>(blockIdx.x) * kThreads + threadIdx.x;
  const index_t num_vecs = numel / V;
  Step st = make_step(scale[0]);
  index_t cached = 0;  // the channel st belongs to: slices usually span many vectors
  for (index_t i = first; i < num_vecs; i += stride) {
    const VecT in = reinterpret_cast<const VecT*>(x)[i];
    VecT out;
    index_t c = 0, r = 0;
    if (!per_tensor) {
      const index_t slice = i * V / inner;
      r = i * V - slice * inner;
      c = slice % channels;
    }
#pragma unroll
    for (int e = 0; e < V; ++e) {
      if (!per_tensor) {
        if (c != cached) { st = make_step(scale[c]); cached = c; }
        if (++r == inner) { r = 0; c = c + 1 == channels ? 0 : c + 1; }  // for element e + 1
      }
      out.v[e] = static_cast<scalar_t>(fake_quant(static_cast<float>(in.v[e]), st, qmin, qmax));
    }
    reinterpret_cast<VecT*>(y)[i] = out;
  }
  // The < V elements after the last whole vector.
  for (index_t i = num_vecs * V + first; i < numel; i += stride) {
    if (!per_tensor) st = make_step(scale[(i / inner) % channels]);
    y[i] = static_cast<scalar_t>(fake_quant(static_cast<float>(x[i]), st, qmin, qmax));
  }
}

// Backward stage 1 when channel slices are long, or per-tensor (outer == 1, one slice of
// inner_v = numel / V vectors plus a tail): block b = (channel c, chunk k) walks chunk k of
// channel c's vectors, memory [outer, channels, inner_v], and writes partial[b = c * chunks + k].
template <typename scalar_t, typename index_t, int V>
__global__ void __launch_bounds__(kThreads) lsq_backward_segment_kernel(
    const scalar_t* __restrict__ grad_y, const scalar_t* __restrict__ x,
    const float* __restrict__ scale, scalar_t* __restrict__ grad_x, float* __restrict__ partial,
    index_t numel, index_t channels, index_t inner_v, index_t slice_vecs, index_t chunks,
    float qmin, float qmax, bool clip_before_round) {
  using VecT = Vec<scalar_t, V>;
  const index_t threads = blockDim.x;
  const index_t c = static_cast<index_t>(blockIdx.x) / chunks;
  const index_t k = static_cast<index_t>(blockIdx.x) - c * chunks;
  const Step st = make_step(scale[c]);
  const index_t stride = chunks * threads;
  index_t j = k * threads + threadIdx.x;  // vector index within the channel
  // (o, r) = (outer index, position in the slice) of vector j, stepped without a division.
  index_t o = j / inner_v;
  index_t r = j - o * inner_v;
  const index_t step_o = stride / inner_v;
  const index_t step_r = stride - step_o * inner_v;
  float acc = 0.f;
  for (; j < slice_vecs; j += stride) {
    const index_t off = (o * channels + c) * inner_v + r;
    const VecT g = reinterpret_cast<const VecT*>(grad_y)[off];
    const VecT xv = reinterpret_cast<const VecT*>(x)[off];
    VecT out;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      out.v[e] = backward_elem(g.v[e], xv.v[e], st, qmin, qmax, clip_before_round, acc);
    }
    reinterpret_cast<VecT*>(grad_x)[off] = out;
    o += step_o;
    r += step_r;
    if (r >= inner_v) { r -= inner_v; ++o; }
  }
  // Per-tensor: the < V elements after the last whole vector go to block 0, a fixed owner.
  // (Per-channel slices are whole vectors: the host vectorises only when V divides inner.)
  const index_t i = slice_vecs * V + threadIdx.x;
  if (channels == 1 && k == 0 && i < numel) {
    grad_x[i] = backward_elem(grad_y[i], x[i], st, qmin, qmax, clip_before_round, acc);
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// Backward stage 1 when slices are short: memory is a [rows, cols] matrix (cols = channels *
// inner) whose column col belongs to channel col / inner. threadIdx.x runs along a row (V
// columns each, coalesced), threadIdx.y over rows; block (x, y) sums chunk y of the rows of its
// columns and writes partial[(c * gridDim.y + y) * inner + col % inner].
template <typename scalar_t, typename index_t, int V>
__global__ void __launch_bounds__(kThreads) lsq_backward_column_kernel(
    const scalar_t* __restrict__ grad_y, const scalar_t* __restrict__ x,
    const float* __restrict__ scale, scalar_t* __restrict__ grad_x, float* __restrict__ partial,
    index_t rows, index_t cols, index_t inner, float qmin, float qmax, bool clip_before_round) {
  using VecT = Vec<scalar_t, V>;
  __shared__ float sums[V][kThreads];
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const index_t col0 = (static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  const bool active = col0 < cols;  // cols % V == 0, so the whole vector is in range
  Step st[V];
  float acc[V];
#pragma unroll
  for (int e = 0; e < V; ++e) {
    st[e] = active ? make_step(scale[(col0 + e) / inner]) : Step{1.f, 1.f};
    acc[e] = 0.f;
  }
  if (active) {
    const index_t row_step = static_cast<index_t>(gridDim.y * blockDim.y);
    for (index_t row = static_cast<index_t>(blockIdx.y * blockDim.y + threadIdx.y); row < rows;
         row += row_step) {
      const index_t off = row * cols + col0;
      const VecT g = *reinterpret_cast<const VecT*>(grad_y + off);
      const VecT xv = *reinterpret_cast<const VecT*>(x + off);
      VecT out;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        out.v[e] = backward_elem(g.v[e], xv.v[e], st[e], qmin, qmax, clip_before_round, acc[e]);
      }
      *reinterpret_cast<VecT*>(grad_x + off) = out;
    }
  }
  // Fixed-shape tree over threadIdx.y (blockDim.y is a power of two): deterministic.
#pragma unroll
  for (int e = 0; e < V; ++e) sums[e][tid] = acc[e];
  __syncthreads();
  for (int half = blockDim.y / 2; half > 0; half /= 2) {
    if (static_cast<int>(threadIdx.y) < half) {
#pragma unroll
      for (int e = 0; e < V; ++e) sums[e][tid] += sums[e][tid + half * blockDim.x];
    }
    __syncthreads();
  }
  if (threadIdx.y == 0 && active) {
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const index_t c = (col0 + e) / inner;
      const index_t r = col0 + e - c * inner;
      const index_t chunk = blockIdx.y;
      partial[(c * static_cast<index_t>(gridDim.y) + chunk) * inner + r] = sums[e][threadIdx.x];
    }
  }
}

// Backward stage 2: kGroup threads per channel add its `chunks` partials (contiguous) in a fixed
// order, then scale once by grad_factor.
template <int kGroup>
__global__ void __launch_bounds__(kThreads)
    lsq_reduce_partials_kernel(const float* __restrict__ partial, int64_t chunks,
                               int64_t channels, float grad_factor,
                               float* __restrict__ grad_scale) {
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / kGroup;
  const int lane = threadIdx.x % kGroup;
  float acc = 0.f;
  if (c < channels) {
#pragma unroll 4
    for (int64_t i = lane; i < chunks; i += kGroup) acc += partial[c * chunks + i];
  }
  // Every thread gets here: the whole group takes part in the tree.
  if constexpr (kGroup == kWarp) acc = warp_sum(acc); else acc = block_sum(acc);
  if (c < channels && lane == 0) grad_scale[c] = acc * grad_factor;
}

void lsq_forward_cuda_kernel(const at::Tensor& x, const at::Tensor& scale, at::Tensor& y,
                             const LsqParams& p) {
  LSQ_DISPATCH(x.scalar_type(), "lsq_fake_quant", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    scalar_t* y_data = y.mutable_data_ptr<scalar_t>();
    // Grid-stride: one resident wave is enough for a streaming kernel.
    const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
    const int64_t max_blocks =
        int64_t{props->multiProcessorCount} * (props->maxThreadsPerMultiProcessor / kThreads);
    with_index_type(fits_int32(p.numel), [&](auto index_tag) {
      using index_t = decltype(index_tag);
      with_vec<kVec>(is_aligned16(x_data) && is_aligned16(y_data), [&](auto vec_tag) {
        constexpr int V = decltype(vec_tag)::value;
        const int64_t blocks =
            std::min(ceil_div(std::max<int64_t>(p.numel / V, 1), kThreads), max_blocks);
        lsq_forward_kernel<scalar_t, index_t, V>
            <<<static_cast<unsigned>(blocks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
                x_data, scale.const_data_ptr<float>(), y_data, p.numel, p.channels, p.inner,
                p.qmin, p.qmax);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

// Every launch shape here depends on the layout only, never on timing or the device, so the
// partials and their fixed-order sum are the same bits on every run.
void lsq_backward_cuda_kernel(const at::Tensor& grad_y, const at::Tensor& x,
                              const at::Tensor& scale, at::Tensor& grad_x,
                              at::Tensor& grad_scale, const LsqParams& p) {
  // Bounds every grid dimension below: segment blocks <= channels + kTargetBlocks, column tiles
  // <= channels + 1.
  TORCH_CHECK(p.channels <= std::numeric_limits<int32_t>::max() - 2 * kTargetBlocks,
              "lsq_fake_quant_backward: too many channels for one CUDA grid: ", p.channels);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor partial;
  int64_t chunks = 0;  // partials per channel, contiguous in `partial`
  LSQ_DISPATCH(x.scalar_type(), "lsq_fake_quant_backward", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const scalar_t* gy_data = grad_y.const_data_ptr<scalar_t>();
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    scalar_t* gx_data = grad_x.mutable_data_ptr<scalar_t>();
    const float* scale_data = scale.const_data_ptr<float>();
    const bool aligned = is_aligned16(gy_data) && is_aligned16(x_data) && is_aligned16(gx_data);
    with_index_type(fits_int32(p.numel), [&](auto index_tag) {
      using index_t = decltype(index_tag);
      if (p.channels == 1 || p.inner >= kMinSegment) {
        // inner >= kVec keeps inner_v > 0 (a divisor in the kernel) for a tiny per-tensor x.
        const bool whole_vecs = p.channels == 1 ? p.inner >= kVec : p.inner % kVec == 0;
        with_vec<kVec>(aligned && whole_vecs, [&](auto vec_tag) {
          constexpr int V = decltype(vec_tag)::value;
          const int64_t slice_vecs = p.outer * (p.inner / V);
          // Short slices get smaller blocks (64 threads still fill an SM) to idle fewer lanes.
          const int64_t threads =
              std::max<int64_t>(64, pow2_at_least(std::min<int64_t>(slice_vecs, kThreads)));
          chunks = std::max<int64_t>(1, std::min(ceil_div(slice_vecs, threads * kMinIters),
                                                 ceil_div(kTargetBlocks, p.channels)));
          partial = at::empty({p.channels * chunks}, x.options().dtype(at::kFloat));
          lsq_backward_segment_kernel<scalar_t, index_t, V>
              <<<static_cast<unsigned>(p.channels * chunks), static_cast<unsigned>(threads), 0,
                 stream>>>(gy_data, x_data, scale_data, gx_data,
                           partial.mutable_data_ptr<float>(), p.numel, p.channels, p.inner / V,
                           slice_vecs, chunks, p.qmin, p.qmax, p.clip_before_round);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
        return;
      }
      const int64_t cols = p.channels * p.inner;
      with_vec<kVec>(aligned && cols % kVec == 0, [&](auto vec_tag) {
        constexpr int V = decltype(vec_tag)::value;
        const int64_t col_vecs = cols / V;
        // A warp covers min(32, row width) vectors of a row; the rest of the block stacks rows
        // (fewer partials) unless there are too few rows to keep those threads busy.
        const int64_t min_tx = pow2_at_least(std::min<int64_t>(col_vecs, kWarp));
        const int64_t ty =
            pow2_at_most(std::clamp<int64_t>(p.outer / kMinIters, 1, kThreads / min_tx));
        const int64_t tx = kThreads / ty;
        const int64_t col_tiles = ceil_div(col_vecs, tx);
        const int64_t row_chunks = std::clamp<int64_t>(
            std::min(ceil_div(p.outer, ty * kMinIters), ceil_div(kTargetBlocks, col_tiles)), 1,
            65535);  // the gridDim.y limit
        chunks = row_chunks * p.inner;
        partial = at::empty({row_chunks * cols}, x.options().dtype(at::kFloat));
        const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(row_chunks));
        const dim3 block(static_cast<unsigned>(tx), static_cast<unsigned>(ty));
        lsq_backward_column_kernel<scalar_t, index_t, V><<<grid, block, 0, stream>>>(
            gy_data, x_data, scale_data, gx_data, partial.mutable_data_ptr<float>(), p.outer,
            cols, p.inner, p.qmin, p.qmax, p.clip_before_round);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  // A whole block per channel only when there are many partials (per-tensor), else a warp.
  const float* partial_data = partial.const_data_ptr<float>();
  float* grad_scale_data = grad_scale.mutable_data_ptr<float>();
  if (chunks >= kThreads) {
    lsq_reduce_partials_kernel<kThreads><<<static_cast<unsigned>(p.channels), kThreads, 0,
                                           stream>>>(partial_data, chunks, p.channels,
                                                     p.grad_factor, grad_scale_data);
  } else {
    lsq_reduce_partials_kernel<kWarp>
        <<<static_cast<unsigned>(ceil_div(p.channels, kThreads / kWarp)), kThreads, 0, stream>>>(
            partial_data, chunks, p.channels, p.grad_factor, grad_scale_data);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor lsq_fake_quant_cuda(const at::Tensor& x, const at::Tensor& scale, int64_t qmin,
                               int64_t qmax, double grad_factor, std::optional<int64_t> axis,
                               bool clip_before_round) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  return lsq_fake_quant_forward(x, scale, qmin, qmax, grad_factor, axis, clip_before_round,
                                &lsq_forward_cuda_kernel);
}

std::tuple<at::Tensor, at::Tensor> lsq_fake_quant_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& scale, int64_t qmin,
    int64_t qmax, double grad_factor, std::optional<int64_t> axis, bool clip_before_round) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  return lsq_fake_quant_backward(grad_y, x, scale, qmin, qmax, grad_factor, axis,
                                 clip_before_round, &lsq_backward_cuda_kernel);
}

}  // namespace

TORCH_LIBRARY_IMPL(bwrf_ext, CUDA, m) {
  m.impl("lsq_fake_quant", &lsq_fake_quant_cuda);
  m.impl("lsq_fake_quant_backward", &lsq_fake_quant_backward_cuda);
}

}  // namespace bwrf_ext
