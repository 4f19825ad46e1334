// SPDX-License-Identifier: Apache-2.0
// DecodeLinearParams: the contract of decode_linear, shared by the CUDA kernel and its CPU twin.
#pragma once

#include <cstdint>

#include "dustin/types.h"

namespace dustin {

/// Most rows of x one decode_linear call takes: one tensor-core tile of rows (a decode step of
/// up to 16 sequences, one token each).
inline constexpr int32_t kDecodeLinearMaxRows = 16;
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
struct DecodeLinearParams {
  const void* x = nullptr;     ///< [M, K], dtype, dim stride 1
  const void* w = nullptr;     ///< [N, K], dtype, dim stride 1
  const void* bias = nullptr;  ///< [N], dtype, contiguous; nullptr for none
  void* y = nullptr;           ///< [M, N] (N/2 when gated), dtype, dim stride 1
  int64_t x_stride = 0;        ///< elements between rows of x (>= 0)
  int64_t w_stride = 0;        ///< elements between rows of w (>= 0)
  int64_t y_stride = 0;        ///< elements between rows of y
  int32_t rows = 0;            ///< M, 0..kDecodeLinearMaxRows
  int32_t in_features = 0;     ///< K
  int32_t out_features = 0;    ///< N (the rows of w)
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
  if (p.x_stride < 0 || p.w_stride < 0 || p.y_stride < decode_linear_out_columns(p)) {
    return false;
  }
  return p.rows == 0 || (p.x != nullptr && p.w != nullptr && p.y != nullptr);
}

/// The CUDA kernel's further rule: K, the row strides of x and w, and their base addresses are
/// multiples of 16 bytes (kUnsupported otherwise; the CPU twin takes any).
inline bool decode_linear_vectorizable(const DecodeLinearParams& p) {
  const auto aligned = [](const void* ptr) {
    return reinterpret_cast<uintptr_t>(ptr) % (kDecodeLinearAlign * 2) == 0;
  };
  return p.in_features % kDecodeLinearAlign == 0 && p.x_stride % kDecodeLinearAlign == 0 &&
         p.w_stride % kDecodeLinearAlign == 0 && aligned(p.x) && aligned(p.w);
}

}  // namespace dustin
