// SPDX-License-Identifier: Apache-2.0
// decode_linear kernel: y = x w^T for at most 16 rows of x, where the weight read is the whole
// cost. A library GEMM's tiles are made for many rows: at 16 (cuBLAS, measured on the H200 in a
// decode step) its kernels read a 0.5B draft's 1.6-17 MB weights at 0.4-2.5 TB/s, and for long
// K it splits K and adds a reduce launch (down projection: 5.5 + 1.7 us for 8.7 MB). Here a CTA
// owns 8 columns of y at a time over all of K, its warps split K and stream the weight in
// 16-byte loads straight into mma.sync fragments (no shared-memory staging), and the CTA sums
// its warps in shared memory: one launch, weights read once. The layer's glue rides along
// (params: norm_weight, residual), so neither an RMSNorm nor a residual add costs a launch of
// its own: each CTA normalises x into shared memory first, and the add is in the epilogue.
#pragma once

#include <cstdint>

#include "dustin/attention/tile_primitives.cuh"
#include "dustin/decode_linear_params.h"
#include "dustin/dependent_launch.cuh"

namespace dustin::detail {

/// Warps per CTA; each takes every kLinearWarps-th step of K.
inline constexpr int kLinearWarps = 8;
inline constexpr int kLinearThreads = 32 * kLinearWarps;
/// Columns of y per CTA: one m16n8k16 n-tile, lane / 4 picking the weight row.
inline constexpr int kLinearColumns = 8;
/// K per warp step: four lanes per weight row, 16 bytes (8 elements) each.
inline constexpr int kLinearStepK = 32;
/// Steps whose loads a warp has in flight at once (and as many again prefetched).
inline constexpr int kLinearUnroll = 4;
/// CTAs an SM holds at once: the register bound ptxas keeps to (128 per thread).
inline constexpr int kLinearCtasPerSm = 2;
/// Bytes between rows of the normalised x in shared memory: K (at most
/// kDecodeLinearMaxNormedK) padded to 64 modulo 128 bytes, so that the 8 lanes of a quarter
/// warp (rows g and g + 1, 64 bytes of each) read distinct banks.
inline constexpr int kNormedRowBytes = kDecodeLinearMaxNormedK * 2 + 64;
/// The dynamic shared memory of the normed instances: every row of x, normalised.
inline constexpr int kNormedXBytes = kDecodeLinearMaxRows * kNormedRowBytes;
// Two gated, normed CTAs share an SM's 228 KB of shared memory: their x and their partial sums
// (two tiles by parity, gate and up: the kernel's `partial`).
inline constexpr int kGatedPartialBytes =
    2 * kLinearWarps * 2 * kDecodeLinearMaxRows * kLinearColumns * static_cast<int>(sizeof(float));
static_assert(kLinearCtasPerSm * (kNormedXBytes + kGatedPartialBytes) <= 228 * 1024,
              "kDecodeLinearMaxNormedK leaves no room for two CTAs per SM");

/// 16 bytes no other CTA reads (a weight slice), kept out of L1.
__device__ __forceinline__ uint4 load_streaming(const void* ptr) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(ptr));
  return v;
}

/// Row stride in elements of the normalised x for K = in_features (see kNormedRowBytes).
__device__ __forceinline__ int32_t normed_row_stride(int32_t in_features) {
  const int32_t bytes = in_features * 2;
  return (bytes + ((64 - bytes % 128) + 128) % 128) / 2;
}

/// x * g elementwise for 8 16-bit values, each product rounded to the type (exact products:
/// one rounding, as a separate 16-bit multiply would do).
template <typename T>
__device__ __forceinline__ uint4 mul8(uint4 x, uint4 g) {
  using T2 = std::conditional_t<std::is_same_v<T, __nv_bfloat16>, __nv_bfloat162, __half2>;
  uint32_t* xv = reinterpret_cast<uint32_t*>(&x);
  const uint32_t* gv = reinterpret_cast<const uint32_t*>(&g);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const T2 product =
        __hmul2(*reinterpret_cast<const T2*>(&xv[i]), *reinterpret_cast<const T2*>(&gv[i]));
    xv[i] = *reinterpret_cast<const uint32_t*>(&product);
  }
  return x;
}

/// The sum of squares of 8 16-bit values, in float32.
template <typename T>
__device__ __forceinline__ float sum_squares8(uint4 x) {
  const T* v = reinterpret_cast<const T*>(&x);
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float f = static_cast<float>(v[i]);
    sum = fmaf(f, f, sum);
  }
  return sum;
}

/// The weight vectors of one batch of steps: the gate (or only) rows, and the up rows when
/// gated.
template <bool kGated>
struct LinearWeights {
  uint4 w[kLinearUnroll];
  uint4 u[kGated ? kLinearUnroll : 1];
};

/// A persistent grid: CTA c owns the 8-column tiles c, c + gridDim.x, ... of y, and each warp
/// walks its batches of K steps through them as one sequence, so the next batch's weights (of
/// this tile or the next) are in flight while the current one is multiplied and a tile's sums
/// are stored. The k permutation: lane (g, t) = (lane / 4, lane % 4) loads elements
/// [8t, 8t + 8) of each 32-wide step of its weight row g and of x rows g and g + 8, and feeds
/// them to two m16n8k16 products as if they were k = {2t, 2t + 1, 2t + 8, 2t + 9} of each: the
/// same relabelling of k on both operands, so the sum is the same and every load is 16 bytes
/// wide. Rows of x past M and columns past N are clamped to the last one (their results are not
/// stored), so no lane branches in the loop.
///
/// kNormed: once x is readable, warp w writes rows w and w + 8 of x * g to shared memory
/// (dynamic, kNormedXBytes) and sums their squares; the loop then reads x from there. Applying
/// g inside the loop instead needs registers the gated loop does not have (ptxas spilled at the
/// 128 that two CTAs per SM allow). The row scale r multiplies the float32 sums.
template <typename T, bool kGated, bool kNormed>
__global__ void __launch_bounds__(kLinearThreads, kLinearCtasPerSm)
    decode_linear_kernel(const __grid_constant__ DecodeLinearParams p) {
  constexpr int kParts = kGated ? 2 : 1;  // gate (or only) and up sums
  // Two tiles' partial sums by parity: a tile's writes never meet the previous tile's reads,
  // so one barrier per tile suffices.
  __shared__ float2 partial[2][kLinearWarps][kParts][kDecodeLinearMaxRows][kLinearColumns / 2];
  // r of each row of x (kNormed).
  __shared__ float row_scales[kNormed ? kDecodeLinearMaxRows : 1];
  extern __shared__ uint4 normed_x[];  // kNormed: [M][normed_row_stride] of T
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int32_t columns = decode_linear_out_columns(p);
  const int32_t tiles = (columns + kLinearColumns - 1) / kLinearColumns;
  const int32_t steps = (p.in_features + kLinearStepK - 1) / kLinearStepK;
  constexpr int32_t kStride = kLinearWarps * kLinearUnroll;  // steps between a warp's batches
  // The same for every warp, so all of them reach a tile's end together.
  const int32_t batches_per_tile = (steps + kStride - 1) / kStride;
  const int64_t up_offset = kGated ? static_cast<int64_t>(p.out_features / 2) * p.w_stride : 0;

  const T* x = kNormed ? reinterpret_cast<const T*>(normed_x) : static_cast<const T*>(p.x);
  const int64_t x_stride = kNormed ? normed_row_stride(p.in_features) : p.x_stride;
  const T* x_lo = x + min(g, p.rows - 1) * x_stride + 8 * t;
  const T* x_hi = x + min(g + 8, p.rows - 1) * x_stride + 8 * t;
  const auto load_x = [](const T* ptr) {
    return kNormed ? *reinterpret_cast<const uint4*>(ptr)
                   : __ldg(reinterpret_cast<const uint4*>(ptr));
  };
  // This lane's vector of step s lies inside K (K is a multiple of 8, so it lies wholly
  // inside or outside).
  const auto in_k = [&](int32_t s) { return s * kLinearStepK + 8 * t < p.in_features; };
  // The column of y that column j of a tile computes. With RoPE a tile takes 4 columns from
  // each half of one head, d and d + D/2 at j and j + 4, so that the rotation pairs meet in one
  // warp's epilogue (N is a multiple of D there; the permutation is within heads).
  const bool rotating = p.rope_cos != nullptr;
  const int32_t tiles_per_head = rotating ? p.head_dim / kLinearColumns : 1;
  const auto tile_column = [&](int32_t tile, int j) {
    if (!rotating) return tile * kLinearColumns + j;
    return (tile / tiles_per_head) * p.head_dim + (j / 4) * (p.head_dim / 2) +
           (tile % tiles_per_head) * 4 + j % 4;
  };
  const auto load_weights = [&](LinearWeights<kGated>& b, int32_t tile, int32_t batch) {
    const int32_t n = min(tile_column(tile, g), columns - 1);
    const T* w_row = static_cast<const T*>(p.w) + n * p.w_stride + 8 * t;
#pragma unroll
    for (int j = 0; j < kLinearUnroll; ++j) {
      const int32_t s = warp + batch * kStride + j * kLinearWarps;
      const bool valid = in_k(s);
      b.w[j] = valid ? load_streaming(w_row + s * kLinearStepK) : make_uint4(0, 0, 0, 0);
      if constexpr (kGated) {
        b.u[j] = valid ? load_streaming(w_row + up_offset + s * kLinearStepK)
                       : make_uint4(0, 0, 0, 0);
      }
    }
  };

  float acc[kParts][4] = {};
  int parity = 0;
  int32_t tile = static_cast<int32_t>(blockIdx.x);
  int32_t batch = 0;
  LinearWeights<kGated> current;
  // The weights are no grid's output: the first batch is read while the preceding kernel,
  // which writes x, may still run.
  if (tile < tiles) load_weights(current, tile, batch);
  wait_for_preceding_grid();
  if constexpr (kNormed) {
    const T* norm_weight = static_cast<const T*>(p.norm_weight);
    T* staged = reinterpret_cast<T*>(normed_x);
    for (int row = warp; row < p.rows; row += kLinearWarps) {
      const T* x_row = static_cast<const T*>(p.x) + row * p.x_stride;
      float squares = 0.f;
#pragma unroll 4
      for (int32_t k = 8 * lane; k < p.in_features; k += 8 * 32) {
        const uint4 v = __ldg(reinterpret_cast<const uint4*>(x_row + k));
        squares += sum_squares8<T>(v);
        *reinterpret_cast<uint4*>(staged + row * x_stride + k) =
            mul8<T>(v, __ldg(reinterpret_cast<const uint4*>(norm_weight + k)));
      }
#pragma unroll
      for (int mask = 16; mask > 0; mask >>= 1) {
        squares += __shfl_xor_sync(0xffffffffu, squares, mask);
      }
      if (lane == 0) {
        row_scales[row] = rsqrtf(squares / static_cast<float>(p.in_features) + p.norm_eps);
      }
    }
    __syncthreads();
  }
  // The epilogue thread's row (the same in every tile) and its RMSNorm scale.
  const int row = static_cast<int>(threadIdx.x) / kLinearColumns;
  const float row_scale = kNormed && row < p.rows ? row_scales[row] : 1.f;
  while (tile < tiles) {
    uint4 lo[kLinearUnroll];
    uint4 hi[kLinearUnroll];
#pragma unroll
    for (int j = 0; j < kLinearUnroll; ++j) {
      const int32_t s = warp + batch * kStride + j * kLinearWarps;
      const bool valid = in_k(s);
      lo[j] = valid ? load_x(x_lo + s * kLinearStepK) : make_uint4(0, 0, 0, 0);
      hi[j] = valid ? load_x(x_hi + s * kLinearStepK) : make_uint4(0, 0, 0, 0);
    }
    const bool tile_done = batch + 1 == batches_per_tile;
    const int32_t next_tile = tile_done ? tile + static_cast<int32_t>(gridDim.x) : tile;
    const int32_t next_batch = tile_done ? 0 : batch + 1;
    LinearWeights<kGated> next;
    if (next_tile < tiles) load_weights(next, next_tile, next_batch);
#pragma unroll
    for (int j = 0; j < kLinearUnroll; ++j) {
      const uint32_t a0[4] = {lo[j].x, hi[j].x, lo[j].y, hi[j].y};
      const uint32_t a1[4] = {lo[j].z, hi[j].z, lo[j].w, hi[j].w};
      mma_16816<T>(acc[0], a0, current.w[j].x, current.w[j].y);
      mma_16816<T>(acc[0], a1, current.w[j].z, current.w[j].w);
      if constexpr (kGated) {
        mma_16816<T>(acc[1], a0, current.u[j].x, current.u[j].y);
        mma_16816<T>(acc[1], a1, current.u[j].z, current.u[j].w);
      }
    }
    current = next;
    if (tile_done) {
      // Accumulator (g, 2t..2t+1) and (g + 8, 2t..2t+1) of each warp, then one thread per
      // element sums the warps in a fixed order (deterministic).
#pragma unroll
      for (int part = 0; part < kParts; ++part) {
        partial[parity][warp][part][g][t] = make_float2(acc[part][0], acc[part][1]);
        partial[parity][warp][part][g + 8][t] = make_float2(acc[part][2], acc[part][3]);
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[part][i] = 0.f;
      }
      __syncthreads();
      const int c = static_cast<int>(threadIdx.x) % kLinearColumns;
      const int32_t column = tile_column(tile, c);
      const bool stored = row < p.rows && column < columns;
      float value = 0.f;
      if (stored) {
        float sums[kParts];
#pragma unroll
        for (int part = 0; part < kParts; ++part) {
          const float* cell = reinterpret_cast<const float*>(&partial[parity][0][part][row][0]) + c;
          sums[part] = 0.f;
#pragma unroll
          for (int w = 0; w < kLinearWarps; ++w) {
            sums[part] += cell[w * kParts * kDecodeLinearMaxRows * kLinearColumns];
          }
        }
        const T* bias = static_cast<const T*>(p.bias);
        value = sums[0] * row_scale + (bias != nullptr ? static_cast<float>(bias[column]) : 0.f);
        if constexpr (kGated) {
          const float up = sums[1] * row_scale +
                           (bias != nullptr ? static_cast<float>(bias[column + p.out_features / 2])
                                            : 0.f);
          value = value / (1.f + __expf(-value)) * up;
        }
      }
      T out = from_float<T>(value);
      if (rotating) {  // uniform: every lane takes part in the exchange
        // Threads c and c ^ 4 of a row hold columns d and d + D/2 of one head (tile_column).
        const float mine = static_cast<float>(out);
        const float other = __shfl_xor_sync(0xffffffffu, mine, 4);
        if (stored && column < p.rope_columns) {
          const int64_t at = row * p.rope_stride + column % p.head_dim;
          const float cosine = static_cast<float>(static_cast<const T*>(p.rope_cos)[at]);
          const float sine = static_cast<float>(static_cast<const T*>(p.rope_sin)[at]);
          out = from_float<T>(c < 4 ? mine * cosine - other * sine : mine * cosine + other * sine);
        }
      }
      if (stored) {
        if (p.residual != nullptr) {
          const T residual = static_cast<const T*>(p.residual)[row * p.residual_stride + column];
          out = from_float<T>(static_cast<float>(out) + static_cast<float>(residual));
        }
        static_cast<T*>(p.y)[row * p.y_stride + column] = out;
      }
      parity ^= 1;
    }
    tile = next_tile;
    batch = next_batch;
  }
  // The dependents' CTAs may take this grid's slots from here on.
  allow_dependent_launch();
}

}  // namespace dustin::detail
