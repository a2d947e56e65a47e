// CPU kernels of the LSQ fake-quant ops: compiler-vectorised per ISA, parallel over fixed tasks.
#include "../lsq_fake_quant.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace bwrf_ext {
namespace {

// Elements per parallel task. Fixed, so the reduction order (and its bits) never depends on the
// number of threads: every task writes its own partial sum, and partials are added in task order.
constexpr int64_t kTaskElements = 16384;
// Channel slices shorter than this are processed a whole [channels, inner] row at a time with a
// per-element scale, since a call per slice would cost more than the math (e.g. channels_last).
constexpr int64_t kMinSliceRun = 64;

// The hot loops are compiled for AVX-512, AVX2 and the x86-64 baseline; the loader picks the best
// the machine has (GCC function multi-versioning), so one wheel is fast and runs everywhere.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define BWRF_ISA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define BWRF_ISA_CLONES
#endif

inline float safe_scale(float s) { return s > kMinScale ? s : kMinScale; }  // NaN -> kMinScale

// NaN-preserving clamp (fminf/fmaxf would turn a NaN into a bound).
inline float clamp_code(float q, float qmin, float qmax) {
  return q < qmin ? qmin : (q > qmax ? qmax : q);
}

// One element of the backward: stores grad_x and returns grad_y * dy/ds (see
// reference.lsq_fake_quant_backward). Branch-free (bitwise `|`, the clip test a template
// argument): GCC leaves a loop with a run-time flag or `||` scalar, 6x slower.
template <bool kClipBeforeRound>
inline float backward_element(float gy, float x, float inv_s, float qmin, float qmax, float* gx) {
  const float v = x * inv_s;
  const float q = std::nearbyint(v);
  const float t = kClipBeforeRound ? v : q;
  const bool below = t < qmin;
  const bool above = t > qmax;
  *gx = (below | above) ? 0.f : gy;
  return gy * (below ? qmin : (above ? qmax : q - v));
}

BWRF_ISA_CLONES void forward_uniform(const float* __restrict x, float* __restrict y, int64_t n,
                                     float s, float inv_s, float qmin, float qmax) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = clamp_code(std::nearbyint(x[i] * inv_s), qmin, qmax) * s;
}

BWRF_ISA_CLONES void forward_varying(const float* __restrict x, float* __restrict y, int64_t n,
                                     const float* __restrict s, const float* __restrict inv_s,
                                     float qmin, float qmax) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    y[i] = clamp_code(std::nearbyint(x[i] * inv_s[i]), qmin, qmax) * s[i];
  }
}

// Returns the sum of grad_y * dy/ds over the run, accumulated in fp32.
template <bool kClipBeforeRound>
BWRF_ISA_CLONES float backward_uniform(const float* __restrict gy, const float* __restrict x,
                                       float* __restrict gx, int64_t n, float inv_s, float qmin,
                                       float qmax) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) {
    acc += backward_element<kClipBeforeRound>(gy[i], x[i], inv_s, qmin, qmax, &gx[i]);
  }
  return acc;
}

// Adds grad_y * dy/ds into acc element by element (channel sums come later, in a fixed order).
template <bool kClipBeforeRound>
BWRF_ISA_CLONES void backward_varying(const float* __restrict gy, const float* __restrict x,
                                      float* __restrict gx, int64_t n,
                                      const float* __restrict inv_s, float* __restrict acc,
                                      float qmin, float qmax) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    acc[i] += backward_element<kClipBeforeRound>(gy[i], x[i], inv_s[i], qmin, qmax, &gx[i]);
  }
}

// Half <-> float with F16C where the CPU has it: c10::Half's portable bit manipulation does not
// vectorise and made fp16 24x slower than fp32. Both round to nearest even, so bits agree.
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2,f16c"))) void half_to_float_f16c(const c10::Half* src, float* dst,
                                                              int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

__attribute__((target("avx2,f16c"))) void float_to_half_f16c(const float* src, c10::Half* dst,
                                                              int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
  for (; i < n; ++i) dst[i] = static_cast<c10::Half>(src[i]);
}

bool has_f16c() {
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return supported;
}
#else
bool has_f16c() { return false; }
void half_to_float_f16c(const c10::Half*, float*, int64_t) {}
void float_to_half_f16c(const float*, c10::Half*, int64_t) {}
#endif

// bfloat16 is the top half of a float: widening is a shift, narrowing rounds to nearest even as
// c10::BFloat16 does (NaN -> 0x7FC0); written on integers so that it vectorises.
BWRF_ISA_CLONES void bfloat16_to_float(const uint16_t* __restrict src, float* __restrict dst,
                                       int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = std::bit_cast<float>(uint32_t{src[i]} << 16);
}

BWRF_ISA_CLONES void float_to_bfloat16(const float* __restrict src, uint16_t* __restrict dst,
                                       int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = std::bit_cast<uint32_t>(src[i]);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    dst[i] = src[i] != src[i] ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);
  }
}

template <typename T>
void to_float(const T* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    bfloat16_to_float(reinterpret_cast<const uint16_t*>(src), dst, n);
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    if (has_f16c()) return half_to_float_f16c(src, dst, n);
    std::copy(src, src + n, dst);
  } else {
    std::copy(src, src + n, dst);
  }
}

template <typename T>
void from_float(const float* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    float_to_bfloat16(src, reinterpret_cast<uint16_t*>(dst), n);
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    if (has_f16c()) return float_to_half_f16c(src, dst, n);
    std::copy(src, src + n, dst);
  } else {
    std::copy(src, src + n, dst);
  }
}

// A task's elements as fp32: the data itself for float, a converted copy for half/bfloat16.
template <typename T>
class Fp32Run {
 public:
  Fp32Run(T* data, int64_t n, bool load) : data_(data), n_(n) {
    if constexpr (!std::is_same_v<T, float>) {
      buffer_.reset(new float[n]);  // uninitialised: a zero fill would cost as much as the math
      if (load) to_float(data, buffer_.get(), n);
    }
  }
  float* get() {
    if constexpr (std::is_same_v<T, float>) return data_;
    return buffer_.get();
  }
  void store() {  // writes the fp32 results back, rounding to T
    if constexpr (!std::is_same_v<T, float>) from_float(buffer_.get(), data_, n_);
  }

 private:
  T* data_;
  int64_t n_;
  std::unique_ptr<float[]> buffer_;
};

// How the [outer, channels, inner] memory is cut into tasks of at most kTaskElements.
struct TaskPlan {
  bool uniform;       // every task lies inside one channel slice (one scale)
  int64_t run;        // uniform: slice length (inner, or numel per-tensor); else row = channels*inner
  int64_t per_run;    // uniform: tasks per slice; else rows per task
  int64_t num_tasks;
  int64_t grain;      // tasks per at::parallel_for grain, ~kTaskElements elements

  explicit TaskPlan(const LsqParams& p) {
    uniform = p.channels == 1 || p.inner >= kMinSliceRun;
    if (uniform) {
      run = p.channels == 1 ? p.numel : p.inner;
      per_run = (run + kTaskElements - 1) / kTaskElements;
      num_tasks = (p.numel / run) * per_run;
      grain = std::max<int64_t>(1, kTaskElements / std::min(run, kTaskElements));
    } else {
      run = p.channels * p.inner;
      per_run = std::max<int64_t>(1, kTaskElements / run);
      num_tasks = (p.outer + per_run - 1) / per_run;
      grain = 1;
    }
  }
  // Memory range [begin, end) of task t.
  std::pair<int64_t, int64_t> range(int64_t t, int64_t numel) const {
    if (uniform) {
      const int64_t slice = t / per_run;
      const int64_t begin = slice * run + (t % per_run) * kTaskElements;
      return {begin, std::min(begin + kTaskElements, (slice + 1) * run)};
    }
    const int64_t begin = t * per_run * run;
    return {begin, std::min(begin + per_run * run, numel)};
  }
};

// Scale and 1/scale for every position of a [channels, inner] row (the non-uniform plan).
void expand_scales(const float* scale, const LsqParams& p, std::vector<float>* s,
                   std::vector<float>* inv_s) {
  s->resize(p.channels * p.inner);
  inv_s->resize(p.channels * p.inner);
  for (int64_t c = 0; c < p.channels; ++c) {
    const float sc = safe_scale(scale[c]);
    std::fill_n(s->begin() + c * p.inner, p.inner, sc);
    std::fill_n(inv_s->begin() + c * p.inner, p.inner, 1.0f / sc);
  }
}

template <typename T>
void forward_typed(const at::Tensor& x, const at::Tensor& scale, at::Tensor& y,
                   const LsqParams& p) {
  T* x_data = x.data_ptr<T>();
  T* y_data = y.data_ptr<T>();
  const float* scale_data = scale.data_ptr<float>();
  const TaskPlan plan(p);
  std::vector<float> s_row, inv_row;
  if (!plan.uniform) expand_scales(scale_data, p, &s_row, &inv_row);

  at::parallel_for(0, plan.num_tasks, plan.grain, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) {
      const auto [begin, end] = plan.range(t, p.numel);
      Fp32Run<T> in(x_data + begin, end - begin, /*load=*/true);
      Fp32Run<T> out(y_data + begin, end - begin, /*load=*/false);
      if (plan.uniform) {
        const float s = safe_scale(scale_data[(begin / p.inner) % p.channels]);
        forward_uniform(in.get(), out.get(), end - begin, s, 1.0f / s, p.qmin, p.qmax);
      } else {
        for (int64_t row = 0; row < end - begin; row += plan.run) {
          forward_varying(in.get() + row, out.get() + row, plan.run, s_row.data(),
                          inv_row.data(), p.qmin, p.qmax);
        }
      }
      out.store();
    }
  });
}

template <typename T, bool kClipBeforeRound>
void backward_typed(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& scale,
                    at::Tensor& grad_x, at::Tensor& grad_scale, const LsqParams& p) {
  T* gy_data = grad_y.data_ptr<T>();
  T* x_data = x.data_ptr<T>();
  T* gx_data = grad_x.data_ptr<T>();
  const float* scale_data = scale.data_ptr<float>();
  float* grad_scale_data = grad_scale.data_ptr<float>();
  const TaskPlan plan(p);
  std::vector<float> s_row, inv_row;
  if (!plan.uniform) expand_scales(scale_data, p, &s_row, &inv_row);
  // Uniform plan: one partial per task. Otherwise one partial per task and row position.
  const int64_t partial_width = plan.uniform ? 1 : plan.run;
  std::vector<float> partials(plan.num_tasks * partial_width, 0.f);

  at::parallel_for(0, plan.num_tasks, plan.grain, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) {
      const auto [begin, end] = plan.range(t, p.numel);
      const int64_t n = end - begin;
      Fp32Run<T> gy(gy_data + begin, n, /*load=*/true);
      Fp32Run<T> xv(x_data + begin, n, /*load=*/true);
      Fp32Run<T> gx(gx_data + begin, n, /*load=*/false);
      if (plan.uniform) {
        const float inv_s = 1.0f / safe_scale(scale_data[(begin / p.inner) % p.channels]);
        partials[t] = backward_uniform<kClipBeforeRound>(gy.get(), xv.get(), gx.get(), n, inv_s,
                                                         p.qmin, p.qmax);
      } else {
        float* acc = partials.data() + t * plan.run;
        for (int64_t row = 0; row < n; row += plan.run) {
          backward_varying<kClipBeforeRound>(gy.get() + row, xv.get() + row, gx.get() + row,
                                             plan.run, inv_row.data(), acc, p.qmin, p.qmax);
        }
      }
      gx.store();
    }
  });

  // Second stage: each channel adds its partials in a fixed order.
  at::parallel_for(0, p.channels, 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      float sum = 0.f;
      if (plan.uniform) {
        for (int64_t o = 0; o < p.outer; ++o) {
          const float* part = partials.data() + (o * p.channels + c) * plan.per_run;
          for (int64_t k = 0; k < plan.per_run; ++k) sum += part[k];
        }
      } else {
        for (int64_t t = 0; t < plan.num_tasks; ++t) {
          const float* part = partials.data() + t * plan.run + c * p.inner;
          for (int64_t i = 0; i < p.inner; ++i) sum += part[i];
        }
      }
      grad_scale_data[c] = sum * p.grad_factor;
    }
  });
}

void forward_kernel(const at::Tensor& x, const at::Tensor& scale, at::Tensor& y,
                    const LsqParams& p) {
  LSQ_DISPATCH(x.scalar_type(), "lsq_fake_quant",
               [&] { forward_typed<scalar_t>(x, scale, y, p); });
}

void backward_kernel(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& scale,
                     at::Tensor& grad_x, at::Tensor& grad_scale, const LsqParams& p) {
  LSQ_DISPATCH(
      x.scalar_type(), "lsq_fake_quant_backward",
      [&] {
        if (p.clip_before_round) {
          backward_typed<scalar_t, true>(grad_y, x, scale, grad_x, grad_scale, p);
        } else {
          backward_typed<scalar_t, false>(grad_y, x, scale, grad_x, grad_scale, p);
        }
      });
}

at::Tensor lsq_fake_quant_cpu(const at::Tensor& x, const at::Tensor& scale, int64_t qmin,
                              int64_t qmax, double grad_factor, std::optional<int64_t> axis,
                              bool clip_before_round) {
  return lsq_fake_quant_forward(x, scale, qmin, qmax, grad_factor, axis, clip_before_round,
                                &forward_kernel);
}

std::tuple<at::Tensor, at::Tensor> lsq_fake_quant_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& scale, int64_t qmin,
    int64_t qmax, double grad_factor, std::optional<int64_t> axis, bool clip_before_round) {
  return lsq_fake_quant_backward(grad_y, x, scale, qmin, qmax, grad_factor, axis,
                                 clip_before_round, &backward_kernel);
}

}  // namespace

TORCH_LIBRARY_IMPL(bwrf_ext, CPU, m) {
  m.impl("lsq_fake_quant", &lsq_fake_quant_cpu);
  m.impl("lsq_fake_quant_backward", &lsq_fake_quant_backward_cpu);
}

}  // namespace bwrf_ext
