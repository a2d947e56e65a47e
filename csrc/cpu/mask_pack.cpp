// CPU kernels of the bit-packed mask ops: one byte (8 elements) per step, parallel over bytes.
#include "../mask_pack.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>

namespace bwrf_ext {
namespace {

// Bytes per parallel task: 8x as many elements, enough to amortise the task.
constexpr int64_t kGrainBytes = 4096;

// The ISA clones of lsq_fake_quant.cpp: AVX-512, AVX2 and baseline, picked at load time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define BWRF_ISA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define BWRF_ISA_CLONES
#endif

// Full bytes of the mask. Each byte is a sum of distinct powers of two over its 8 lanes (a SIMD
// reduction): the data-dependent shifts-and-ors of a plain loop neither vectorise nor predict.
template <typename T, typename opmath_t>
BWRF_ISA_CLONES void pack_bytes(const T* __restrict x, uint8_t* __restrict out, int64_t nbytes,
                                opmath_t lo, opmath_t hi) {
  for (int64_t b = 0; b < nbytes; ++b) {
    const T* v = x + b * 8;
    uint32_t byte = 0;
#pragma omp simd reduction(+ : byte)
    for (int k = 0; k < 8; ++k) {
      const opmath_t e = static_cast<opmath_t>(v[k]);
      byte += ((e <= lo) | (e >= hi)) ? 0u : (1u << k);
    }
    out[b] = static_cast<uint8_t>(byte);
  }
}

template <typename T>
void pack_typed(const T* x, uint8_t* out, int64_t numel, double lower, double upper) {
  // Bounds in the op math type (fp32 for half/bfloat16): the comparison the reference makes.
  using opmath_t = at::opmath_type<T>;
  const opmath_t lo = static_cast<opmath_t>(lower);
  const opmath_t hi = static_cast<opmath_t>(upper);
  const int64_t full = numel / 8;
  at::parallel_for(0, full, kGrainBytes, [&](int64_t first, int64_t last) {
    pack_bytes<T, opmath_t>(x + first * 8, out + first, last - first, lo, hi);
  });
  if (numel % 8) {  // the last, partial byte; its unused high bits are 0
    uint8_t byte = 0;
    for (int64_t i = full * 8; i < numel; ++i) {
      const opmath_t e = static_cast<opmath_t>(x[i]);
      byte |= static_cast<uint8_t>(!((e <= lo) | (e >= hi))) << (i - full * 8);
    }
    out[full] = byte;
  }
}

// For each mask byte, the 8 lane masks it stands for (all ones where the bit is set).
template <typename U>
struct LaneMasks {
  U lanes[256][8];
  LaneMasks() {
    for (int byte = 0; byte < 256; ++byte) {
      for (int k = 0; k < 8; ++k) lanes[byte][k] = (byte >> k) & 1 ? static_cast<U>(~U(0)) : U(0);
    }
  }
};

// The select works on the bits: an unsigned integer as wide as the element type, ANDed with the
// byte's lane masks from a table. A per-bit branch mispredicts on real masks (~24x slower).
template <typename U>
BWRF_ISA_CLONES void select_bytes(const uint8_t* __restrict packed, const U* __restrict grad,
                                  U* __restrict out, int64_t nbytes) {
  static const LaneMasks<U> masks;
  for (int64_t b = 0; b < nbytes; ++b) {
    const U* lane = masks.lanes[packed[b]];
#pragma omp simd
    for (int k = 0; k < 8; ++k) out[b * 8 + k] = grad[b * 8 + k] & lane[k];
  }
}

template <typename T>
void unpack_mul_typed(const uint8_t* packed, const T* grad_t, T* out_t, int64_t numel) {
  // +0.0 is all zero bits in every floating type, so the select on bits is the select on values.
  using U = std::conditional_t<sizeof(T) == 8, uint64_t,
                               std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>>;
  const U* grad = reinterpret_cast<const U*>(grad_t);
  U* out = reinterpret_cast<U*>(out_t);
  const int64_t full = numel / 8;
  at::parallel_for(0, full, kGrainBytes, [&](int64_t first, int64_t last) {
    select_bytes<U>(packed + first, grad + first * 8, out + first * 8, last - first);
  });
  for (int64_t i = full * 8; i < numel; ++i) {  // the last, partial byte
    out[i] = (packed[full] >> (i - full * 8)) & 1 ? grad[i] : U(0);
  }
}

at::Tensor pack_mask_cpu(const at::Tensor& x, double lower, std::optional<double> upper) {
  const at::Tensor input = pack_mask_input(x);
  at::Tensor out = at::empty({packed_bytes(input.numel())}, x.options().dtype(at::kByte));
  if (input.numel() == 0) return out;
  const double hi = pack_mask_upper(upper);
  MASK_DISPATCH(input.scalar_type(), "pack_mask", [&] {
    pack_typed<scalar_t>(input.const_data_ptr<scalar_t>(), out.data_ptr<uint8_t>(),
                         input.numel(), lower, hi);
  });
  return out;
}

at::Tensor unpack_mask_mul_cpu(const at::Tensor& packed, const at::Tensor& grad) {
  const at::Tensor g = unpack_mask_grad(packed, grad);
  const at::Tensor bits = packed.contiguous();
  at::Tensor out = at::empty_like(g, at::MemoryFormat::Contiguous);
  if (g.numel() == 0) return out;
  MASK_DISPATCH(g.scalar_type(), "unpack_mask_mul", [&] {
    unpack_mul_typed<scalar_t>(bits.const_data_ptr<uint8_t>(), g.const_data_ptr<scalar_t>(),
                               out.data_ptr<scalar_t>(), g.numel());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bwrf_ext, CPU, m) {
  m.impl("pack_mask", &pack_mask_cpu);
  m.impl("unpack_mask_mul", &unpack_mask_mul_cpu);
}

}  // namespace bwrf_ext
