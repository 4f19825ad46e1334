// SPDX-License-Identifier: Apache-2.0
// Helpers shared by the CPU twins: 16-bit float conversion, typed element access, KV validation.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "dustin/paged_kv.h"
#include "dustin/types.h"

/// Body of a hot loop that is compiled several times, once per instruction set (see CpuIsa).
#define DUSTIN_CPU_INLINE inline __attribute__((always_inline))

#if defined(__x86_64__) && defined(__GNUC__)
#define DUSTIN_CPU_MULTIVERSION 1
#define DUSTIN_TARGET_AVX512 __attribute__((target("avx512f,fma")))
#define DUSTIN_TARGET_AVX2 __attribute__((target("avx2,fma")))
#endif

namespace dustin::cpu::detail {

// __builtin_bit_cast (GCC >= 11, Clang >= 9) rather than memcpy: the vectoriser handles it.
DUSTIN_CPU_INLINE uint32_t float_bits(float f) { return __builtin_bit_cast(uint32_t, f); }

DUSTIN_CPU_INLINE float bits_float(uint32_t u) { return __builtin_bit_cast(float, u); }

/// bfloat16 is the top half of a float32.
DUSTIN_CPU_INLINE float bf16_to_float(uint16_t h) {
  return bits_float(static_cast<uint32_t>(h) << 16);
}

/// IEEE half to float without branches, so tile conversion loops vectorise: the exponent and
/// mantissa shifted into float position and multiplied by 2^112 rebias normals and turn half
/// subnormals into exact floats; for Inf/NaN (half exponent 31, which lands on 2^16) the float
/// exponent is then forced to all ones, keeping the mantissa.
DUSTIN_CPU_INLINE float fp16_to_float(uint16_t h) {
  const uint32_t bits = h;
  const uint32_t sign = (bits & 0x8000u) << 16;
  const uint32_t exp_mant = (bits & 0x7fffu) << 13;
  const uint32_t magnitude = float_bits(bits_float(exp_mant) * 0x1p112f);
  const uint32_t inf_nan = exp_mant >= (0x7c00u << 13) ? 0x7f800000u : 0u;
  return bits_float(magnitude | inf_nan | sign);
}

/// float to bfloat16, round to nearest even; NaN stays a (quiet) NaN.
inline uint16_t float_to_bf16(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  const uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>((u + rounding) >> 16);
}

/// float to IEEE half, round to nearest even (F. Giesen's float_to_half_fast3_rtne).
inline uint16_t float_to_fp16(float f) {
  constexpr uint32_t kF32Inf = 255u << 23;
  constexpr uint32_t kF16Overflow = (127u + 16u) << 23;  // 65536.f: rounds to Inf
  constexpr uint32_t kF16MinNormal = 113u << 23;         // 2^-14
  const float denorm_magic = 0.5f;  // aligns the 10 subnormal mantissa bits at the bottom
  uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  uint32_t out;
  if (u >= kF16Overflow) {
    out = u > kF32Inf ? 0x7e00u : 0x7c00u;
  } else if (u < kF16MinNormal) {
    out = float_bits(bits_float(u) + denorm_magic) - float_bits(denorm_magic);
  } else {
    const uint32_t mant_odd = (u >> 13) & 1u;
    u += (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu + mant_odd;
    out = u >> 13;
  }
  return static_cast<uint16_t>(out | sign);
}

/// Instruction sets the hot loops are compiled for. Picked at run time from CPU features (not
/// the CPU model, which virtual machines often hide).
enum class CpuIsa { kBaseline, kAvx2Fma, kAvx512Fma };

inline CpuIsa detect_cpu_isa() {
#if defined(DUSTIN_CPU_MULTIVERSION)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("fma")) {
    if (__builtin_cpu_supports("avx512f")) return CpuIsa::kAvx512Fma;
    if (__builtin_cpu_supports("avx2")) return CpuIsa::kAvx2Fma;
  }
#endif
  return CpuIsa::kBaseline;
}

/// exp(x) in float to about 2 ulp (Cephes expf): x = k ln2 + r, exp(r) by a polynomial, 2^k
/// through the exponent bits. Branch-free and libm-free, so loops over it vectorise. Results
/// below 2^-126 (x < -87.3, including -inf) are 0; x above 88 is taken as 88 (softmax only
/// passes x <= 0); NaN stays NaN.
DUSTIN_CPU_INLINE float exp_approx(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kRoundMagic = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  constexpr float kMaxInput = 88.f;
  constexpr float kMinInput = -87.3365447504f;  // ln(2^-126)
  x = x > kMaxInput ? kMaxInput : x;
  x = x < kMinInput ? kMinInput - 1.f : x;  // rounds to k = -127, i.e. 0
  const float k = (x * kLog2e + kRoundMagic) - kRoundMagic;
  const float r = (x - k * kLn2Hi) - k * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  // 2^k through the exponent bits; k = -127 gives +0, and NaN (k NaN) maps there too while p
  // keeps the NaN.
  const float k_clamped = k > -127.f ? k : -127.f;
  const uint32_t biased = static_cast<uint32_t>(static_cast<int32_t>(k_clamped) + 127);
  return p * bits_float(biased << 23);
}

/// Converts n elements of dtype `t` starting at `src` to float.
DUSTIN_CPU_INLINE void load_row(const void* src, DType t, int32_t n, float* dst) {
  switch (t) {
    case DType::kFloat32:
      std::memcpy(dst, src, sizeof(float) * static_cast<size_t>(n));
      return;
    case DType::kBFloat16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (int32_t i = 0; i < n; ++i) dst[i] = bf16_to_float(s[i]);
      return;
    }
    case DType::kFloat16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (int32_t i = 0; i < n; ++i) dst[i] = fp16_to_float(s[i]);
      return;
    }
  }
}

/// Writes n floats as dtype `t` at `dst`.
DUSTIN_CPU_INLINE void store_row(const float* src, DType t, int32_t n, void* dst) {
  switch (t) {
    case DType::kFloat32:
      std::memcpy(dst, src, sizeof(float) * static_cast<size_t>(n));
      return;
    case DType::kBFloat16: {
      uint16_t* d = static_cast<uint16_t*>(dst);
      for (int32_t i = 0; i < n; ++i) d[i] = float_to_bf16(src[i]);
      return;
    }
    case DType::kFloat16: {
      uint16_t* d = static_cast<uint16_t*>(dst);
      for (int32_t i = 0; i < n; ++i) d[i] = float_to_fp16(src[i]);
      return;
    }
  }
}

/// x as storing it in dtype `t` keeps it.
DUSTIN_CPU_INLINE float round_to(float x, DType t) {
  switch (t) {
    case DType::kBFloat16:
      return bf16_to_float(float_to_bf16(x));
    case DType::kFloat16:
      return fp16_to_float(float_to_fp16(x));
    case DType::kFloat32:
      break;
  }
  return x;
}

DUSTIN_CPU_INLINE size_t dtype_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

inline bool valid_dtype(DType t) {
  return t == DType::kFloat32 || t == DType::kFloat16 || t == DType::kBFloat16;
}

/// Address of element 0 of token `token` of physical page `page`, KV head `head`.
DUSTIN_CPU_INLINE const void* kv_row(const void* base, const PagedKV& kv, int32_t page,
                                     int32_t head, int32_t token) {
  const int64_t offset = page * kv.page_stride + head * kv.head_stride + token * kv.token_stride;
  return static_cast<const char*>(base) + offset * static_cast<int64_t>(dtype_size(kv.dtype));
}

/// Checks the cache description and, for each of the batch_size sequences, that
/// min_len <= kv_lens[b] <= max_pages * P and that every page it uses is in the pool.
inline bool valid_paged_kv(const PagedKV& kv, bool needs_v, int32_t batch_size, int32_t min_len) {
  if (kv.k == nullptr || (needs_v && kv.v == nullptr) || kv.block_table == nullptr ||
      kv.kv_lens == nullptr || !valid_dtype(kv.dtype) || kv.page_size < 1 || kv.num_kv_heads < 1 ||
      kv.head_dim < 1 || kv.max_pages < 0 || kv.num_pages < 0 || kv.block_table_stride < 0) {
    return false;
  }
  for (int32_t b = 0; b < batch_size; ++b) {
    const int32_t len = kv.kv_lens[b];
    if (len < min_len ||
        static_cast<int64_t>(len) > static_cast<int64_t>(kv.max_pages) * kv.page_size) {
      return false;
    }
    const int32_t* row = kv.block_table + b * kv.block_table_stride;
    for (int32_t i = 0, n = num_blocks_for(len, kv.page_size); i < n; ++i) {
      if (row[i] < 0 || row[i] >= kv.num_pages) return false;
    }
  }
  return true;
}

}  // namespace dustin::cpu::detail
