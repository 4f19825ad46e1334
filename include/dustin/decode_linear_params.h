// SPDX-License-Identifier: Apache-2.0
// DecodeLinearParams: the contract of decode_linear, shared by the CUDA kernel and its CPU twin.
#pragma once

#include <cmath>
#include <cstdint>

#include "dustin/types.h"

namespace dustin {

/// Most rows of x one decode_linear call takes: one tensor-core tile of rows (a decode step of
/// up to 16 sequences, one token each).
inline constexpr int32_t kDecodeLinearMaxRows = 16;
/// Most K the CUDA kernel takes with norm_weight: each CTA normalises all of x into shared
/// memory first (64 KB at this K, two CTAs per SM).
inline constexpr int32_t kDecodeLinearMaxNormedK = 2048;
/// K, the row strides and the pointers are multiples of this many elements (16 bytes of a
/// 16-bit type): the kernel reads weights and activations in 16-byte vectors.
inline constexpr int32_t kDecodeLinearAlign = 8;

/// The linear layer of a decode step, for a handful of rows, where reading the weight is the
/// whole cost:
///   gated = false:  y[m, n] = sum_k x[m, k] * w[n, k] + bias[n]              (n < N)
///   gated = true:   y[m, n] = silu(g[m, n]) * u[m, n], with g the above at row n of w and u
///                   at row n + N/2 (w stacks the gate and up weights, as a fused gate/up
///                   projection does); N is even and y has N/2 columns.
/// Products accumulate in float32 and round to the dtype once, at the store.
///
/// Two fusions take the glue of a decoder layer into the same launch:
///   norm_weight g:  RMSNorm of x first. The products read x[m, k] * g[k] (rounded to the
///                   dtype, the tensor cores' operand) and the float32 sums are scaled by
///                   r[m] = 1 / sqrt(mean_k x[m, k]^2 + norm_eps) before bias and activation:
///                   RMSNorm(x; g) w^T with the row scale applied to the sums rather than to x.
///   residual:       y[m, n] = rnd(rnd(value) + residual[m, n]), the add of a residual stream
///                   rounded as a separate 16-bit add would be.
///   rope_cos/sin:   rotary embedding of the first rope_columns columns (q and k of a fused
///                   q/k/v projection), heads of head_dim D, rotate-half convention: with
///                   v = rnd(value) and d = n mod D, y[m, n] = rnd(v[n] cos[m, d] - v[n + D/2]
///                   sin[m, d]) for d < D/2 and rnd(v[n] cos[m, d] + v[n - D/2] sin[m, d])
///                   otherwise. Not with gated or residual.
struct DecodeLinearParams {
  const void* x = nullptr;     ///< [M, K], dtype, dim stride 1
  const void* w = nullptr;     ///< [N, K], dtype, dim stride 1
  const void* bias = nullptr;  ///< [N], dtype, contiguous; nullptr for none
  const void* norm_weight = nullptr;  ///< [K], dtype, contiguous; nullptr for no RMSNorm
  const void* residual = nullptr;  ///< like y; nullptr for none; may be y, may not overlap it
  const void* rope_cos = nullptr;  ///< [M, head_dim], dtype, dim stride 1; nullptr for no RoPE
  const void* rope_sin = nullptr;  ///< [M, head_dim], dtype, dim stride 1
  void* y = nullptr;               ///< [M, N] (N/2 when gated), dtype, dim stride 1
  int64_t x_stride = 0;            ///< elements between rows of x (>= 0)
  int64_t w_stride = 0;            ///< elements between rows of w (>= 0)
  int64_t residual_stride = 0;     ///< elements between rows of residual (>= 0)
  int64_t rope_stride = 0;         ///< elements between rows of rope_cos and of rope_sin (>= 0)
  int64_t y_stride = 0;            ///< elements between rows of y
  int32_t rows = 0;            ///< M, 0..kDecodeLinearMaxRows
  int32_t in_features = 0;     ///< K
  int32_t out_features = 0;    ///< N (the rows of w)
  float norm_eps = 0.f;        ///< finite, >= 0; read only with norm_weight
  int32_t rope_columns = 0;    ///< leading columns rotated: a multiple of head_dim, <= N
  int32_t head_dim = 0;        ///< D of the rotated heads: a multiple of 8 dividing N
  bool gated = false;
  DType dtype = DType::kBFloat16;  ///< element type of x, w, bias and y
};

/// Columns of y: N, or N/2 when gated.
DUSTIN_HOST_DEVICE int32_t decode_linear_out_columns(const DecodeLinearParams& p) {
  return p.gated ? p.out_features / 2 : p.out_features;
}

/// The metadata rules both implementations check (no tensor values read).
inline bool decode_linear_valid_shape(const DecodeLinearParams& p) {
  const bool known_dtype =
      p.dtype == DType::kFloat32 || p.dtype == DType::kFloat16 || p.dtype == DType::kBFloat16;
  if (!known_dtype || p.rows < 0 || p.rows > kDecodeLinearMaxRows || p.in_features < 1 ||
      p.out_features < 1 || (p.gated && p.out_features % 2 != 0)) {
    return false;
  }
  // x and w are only read, so their rows may overlap (an expanded x); y's may not.
  if (p.x_stride < 0 || p.w_stride < 0 || p.residual_stride < 0 ||
      p.y_stride < decode_linear_out_columns(p)) {
    return false;
  }
  if (p.norm_weight != nullptr && !(std::isfinite(p.norm_eps) && p.norm_eps >= 0.f)) {
    return false;
  }
  if (p.rope_cos != nullptr || p.rope_sin != nullptr) {
    const bool heads = p.head_dim >= 8 && p.head_dim % 8 == 0 && p.out_features % p.head_dim == 0;
    if (p.rope_cos == nullptr || p.rope_sin == nullptr || p.gated || p.residual != nullptr ||
        !heads || p.rope_columns < 1 || p.rope_columns > p.out_features ||
        p.rope_columns % p.head_dim != 0 || p.rope_stride < 0) {
      return false;
    }
  }
  return p.rows == 0 || (p.x != nullptr && p.w != nullptr && p.y != nullptr);
}

/// The CUDA kernel's further rules: K, the row strides of x and w, and the base addresses of x,
/// w and norm_weight are multiples of 16 bytes, and K <= kDecodeLinearMaxNormedK with
/// norm_weight (kUnsupported otherwise; the CPU twin takes any).
inline bool decode_linear_vectorizable(const DecodeLinearParams& p) {
  const auto aligned = [](const void* ptr) {
    return reinterpret_cast<uintptr_t>(ptr) % (kDecodeLinearAlign * 2) == 0;
  };
  return p.in_features % kDecodeLinearAlign == 0 && p.x_stride % kDecodeLinearAlign == 0 &&
         p.w_stride % kDecodeLinearAlign == 0 && aligned(p.x) && aligned(p.w) &&
         (p.norm_weight == nullptr ||
          (aligned(p.norm_weight) && p.in_features <= kDecodeLinearMaxNormedK));
}

}  // namespace dustin
