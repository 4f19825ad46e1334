// SPDX-License-Identifier: Apache-2.0
// Split-KV merge of sparse_verify: combines the per-split partial outputs and lse of each row.
#pragma once

#include <cstdint>

#include "dustin/attention/tile_primitives.cuh"
#include "dustin/sparse_verify_params.h"

namespace dustin::detail {

/// Split count from which the merge gives each output row a whole CTA (4 warps share the
/// splits); below it each warp merges one row on its own.
constexpr int kMergeSplitsPerCta = 16;

/// Merges the split partials of each output row (flash-decoding): lse in log2 units, partial
/// outputs normalised. Rows per CTA: 1 when num_splits >= kMergeSplitsPerCta, else 4.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(128)
    sparse_verify_merge_kernel(const __grid_constant__ SparseVerifyParams p, int num_splits) {
  constexpr int kWarps = 4;
  constexpr int kPerLane = kHeadDim / 32;
  __shared__ float warp_sum[kWarps];
  __shared__ __align__(16) float warp_out[kWarps][kHeadDim];
  const int64_t rows = static_cast<int64_t>(p.batch_size) * p.q_len * p.num_qo_heads;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  // Launched as a programmatic dependent of the attention grid: its partials are read below.
  wait_for_preceding_grid();
  const bool cta_per_row = num_splits >= kMergeSplitsPerCta;
  const int64_t row = cta_per_row ? blockIdx.x : blockIdx.x * int64_t{kWarps} + warp;
  if (row >= rows) return;  // whole warps only, and never with cta_per_row (grid = rows)
  const int split_begin = cta_per_row ? warp : 0;
  const int split_step = cta_per_row ? kWarps : 1;
  const float* ws_out = static_cast<const float*>(p.workspace);
  const float* ws_lse = ws_out + num_splits * rows * kHeadDim;

  float lse_max = kNegInf;
  for (int s = lane; s < num_splits; s += 32) lse_max = fmaxf(lse_max, ws_lse[s * rows + row]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    lse_max = fmaxf(lse_max, __shfl_xor_sync(0xffffffffu, lse_max, o));
  }
  float acc[kPerLane] = {};
  float weight_sum = 0.f;
  if (lse_max != kNegInf) {
#pragma unroll 4
    for (int s = split_begin; s < num_splits; s += split_step) {
      const float lse_s = ws_lse[s * rows + row];
      const float w = lse_s == kNegInf ? 0.f : exp2f(lse_s - lse_max);
      weight_sum += w;
      const float* src = ws_out + (s * rows + row) * kHeadDim + lane * kPerLane;
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) acc[e] += w * src[e];
    }
  }
  if (cta_per_row) {
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) warp_out[warp][lane * kPerLane + e] = acc[e];
    if (lane == 0) warp_sum[warp] = weight_sum;
    __syncthreads();
    if (warp != 0) return;
    weight_sum = warp_sum[0] + warp_sum[1] + warp_sum[2] + warp_sum[3];
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) {
      const int d = lane * kPerLane + e;
      acc[e] = warp_out[0][d] + warp_out[1][d] + warp_out[2][d] + warp_out[3][d];
    }
  }
  const float inv = weight_sum > 0.f ? 1.f / weight_sum : 0.f;
  T* dst = static_cast<T*>(p.out) + row * kHeadDim + lane * kPerLane;
  if constexpr (kPerLane == 4) {
    uint2 packed;
    packed.x = pack2<T>(acc[0] * inv, acc[1] * inv);
    packed.y = pack2<T>(acc[2] * inv, acc[3] * inv);
    *reinterpret_cast<uint2*>(dst) = packed;
  } else {
    *reinterpret_cast<uint32_t*>(dst) = pack2<T>(acc[0] * inv, acc[1] * inv);
  }
  if (lane == 0) p.lse[row] = weight_sum > 0.f ? (lse_max + __log2f(weight_sum)) * kLn2 : kNegInf;
}

}  // namespace dustin::detail
