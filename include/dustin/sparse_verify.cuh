// SPDX-License-Identifier: Apache-2.0
// The fused gather-and-attend verification kernel: selected (page, head) KV tiles streamed once
// through a cp.async pipeline into tensor-core attention for all G x q query rows of a KV head.
#pragma once

#include <cooperative_groups.h>

#include <cstdint>
#include <cutlass/fast_math.h>

#include "dustin/attention/tile_primitives.cuh"
#include "dustin/attention/verify_merge.cuh"
#include "dustin/sparse_verify_params.h"

namespace dustin::detail {

/// Position stored for a tile slot that holds no attended token: larger than every query.
constexpr int32_t kMaskedPos = 0x7fffffff;

/// Tile shapes of one instantiation. A CTA owns the kRows = 16 * kMTiles query rows (G heads x
/// q tokens, token-major) of one KV head; its warps split those rows into 16-row MMA tiles and
/// each KV tile's tokens into kWarpsN slices, so each KV byte is read from HBM once for all rows
/// (design.md s. 4). With 4 row tiles (64 rows, one warpgroup's wgmma M) a CTA may have two
/// warpgroups, each attending half of every tile's tokens: the launcher picks them when the
/// grid leaves at most one CTA per SM (small budgets), where a lone warpgroup left its loads
/// and serial softmax exposed; with more CTAs than SMs, two CTAs of one warpgroup per SM
/// overlap each other better than one CTA of two in lockstep.
template <int kHeadDim_, int kMTiles_, int kWarpgroups_ = 1>
struct VerifyTileConfig {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kMTiles = kMTiles_;
  static constexpr int kWarpgroups = kWarpgroups_;
  static constexpr int kThreads = 128 * kWarpgroups;
  static constexpr int kWarps = kThreads / 32;
  static constexpr int kRows = 16 * kMTiles;
  static constexpr int kWarpsM = kMTiles;
  static constexpr int kWarpsN = kWarps / kWarpsM;
  /// With 3 row tiles the fourth warp only helps load (fewer shared-memory re-reads of each
  /// KV tile than padding the rows to 4 tiles).
  static constexpr int kComputeWarps = kWarpsM * kWarpsN;
  /// KV tokens per pipeline stage: 64 x 256 B = 16 KB of K (and of V) at D = 128, large enough
  /// that a few stages in flight per SM cover HBM latency at full bandwidth.
  static constexpr int kTileN = 64;
  static constexpr int kWarpN = kTileN / kWarpsN;  // tokens of a tile one warp attends
  /// Two warpgroups at D = 128 need more registers than two CTAs per SM allow, so one CTA
  /// holds as many tiles in flight as two CTAs of one warpgroup did.
  static constexpr int kStages = kHeadDim == 64 ? 4 : kWarpgroups == 2 ? 6 : 3;
  static constexpr int kChunks = kHeadDim * 2 / 16;  // 16-byte chunks per row
  static constexpr int kLoadRowStep = kThreads / kChunks;
  static constexpr int kLoadRowsPerThread = kTileN / kLoadRowStep;
  static constexpr int kKvTileElems = kTileN * kHeadDim;
  static constexpr int kStageElems = 2 * kKvTileElems;  // K tile then V tile
  static constexpr int kStagesBytes = kStages * kStageElems * 2;
  /// Q [kRows, D] lives in the last stage until its fragments are in registers: the prologue
  /// fills the other stages, and the main loop first writes that one after a barrier.
  static constexpr int kQOffsetBytes = (kStages - 1) * kStageElems * 2;
  static constexpr int kPosOffsetBytes = kStagesBytes;
  /// Attended blocks whose logical id and physical page are looked up together, ahead of the
  /// tiles that read them: one pair of dependent global loads per chunk instead of per tile.
  static constexpr int kChunkBlocks = kThreads;
  static constexpr int kChunkOffsetBytes = kPosOffsetBytes + kStages * kTileN * 4;
  /// Per stage: whether its tile is clean (every slot a valid listed token, so visible to every
  /// query row), which lets the softmax skip the mask.
  static constexpr int kCleanOffsetBytes = kChunkOffsetBytes + 2 * kChunkBlocks * 4;
  /// wgmma reads K and V through 128-byte-swizzle descriptors, whose atoms are 1024-byte
  /// aligned; the launch adds this much so the kernel can align its base.
  static constexpr int kSmemAlign = 1024;
  static constexpr int kSmemBytes = kCleanOffsetBytes + kStages * 4 + kSmemAlign;
  /// 64 rows are one warpgroup's wgmma M: on sm_90a the tensor cores then read each KV tile
  /// from shared memory once for all rows (mma.sync re-reads it per 16-row warp).
  static constexpr bool kWarpgroupMma = kMTiles == 4;
  /// The epilogue reuses the stage buffers for per-warp partial outputs [kWarpsN, kRows, D]
  /// plus their row max and sum, each row's output row (int64) and, for a cluster merge, the
  /// split's lse per row. A warp stores the eight rows of its accumulator fragment at once:
  /// padding each row by 8 floats puts those rows on different banks (unpadded, all eight rows
  /// hit the same 8 banks: 8-way conflicts).
  static constexpr int kScratchStride = kHeadDim + 8;
  static constexpr int kEpilogueBytes =
      (kWarpsN * kRows * (kScratchStride + 2)) * 4 + kRows * 8 + kRows * 4;

  static_assert(kMTiles >= 1 && kMTiles <= 4, "row tiles per CTA: 1 to 4");
  static_assert(kWarpgroups == 1 || (kWarpgroups == 2 && kMTiles == 4),
                "two warpgroups only for 64-row CTAs");
  static_assert(kHeadDim == 64 || kHeadDim == 128, "head dim 64 or 128");
  static_assert(kWarpN % 16 == 0, "each warp attends whole k16 steps of the tile");
  static_assert(kTileN % kLoadRowStep == 0, "loads cover the tile exactly");
  static_assert(kChunkBlocks >= kTileN + 1 && kChunkBlocks % kThreads == 0,
                "a chunk covers any tile's blocks (P = 1 included)");
  static_assert(kEpilogueBytes <= kStagesBytes, "epilogue scratch fits in the stage buffers");
  static_assert(kRows * kHeadDim * 2 <= kStageElems * 2, "Q fits in one stage");
};

/// The divisors of a launch, built by the launcher: building a FastDivmod takes a 64-bit
/// division and a runtime int division some twenty instructions, and in the kernel both sat on
/// the serial path from a CTA's start to its first KV load (and in its epilogue).
struct VerifyDivisors {
  cutlass::FastDivmod row_chunks;  // CTAs per (b, h, split): G * q rows in kRows chunks
  cutlass::FastDivmod splits;      // CTAs sharing one list
  cutlass::FastDivmod kv_heads;    // Hkv
  cutlass::FastDivmod group;       // G = Hq / Hkv: query row -> (token, head)
  cutlass::FastDivmod page_size;   // P: slot -> (attended block, offset)
};

/// Where one (sequence, KV head) CTA reads from and what it attends; see SparseVerifyParams.
struct SequenceView {
  const int32_t* ids;    // this head's list
  const int32_t* table;  // this sequence's block-table row
  int32_t count;         // listed ids (clamped to [0, K])
  int32_t kv_len;        // clamped to the block table
  int32_t first_window;  // first block holding a query of the window
  int32_t num_blocks;    // blocks holding the sequence
  int64_t num_slots;     // tile slots: (count + window blocks) * P
};

/// Four output elements [d, d + 4) of output row `out_row`, converted to T.
template <typename T, int kHeadDim>
__device__ __forceinline__ void store_out_vec(const SparseVerifyParams& p, int64_t out_row, int d,
                                              float4 v) {
  uint2 packed;
  packed.x = pack2<T>(v.x, v.y);
  packed.y = pack2<T>(v.z, v.w);
  *reinterpret_cast<uint2*>(static_cast<T*>(p.out) + out_row * kHeadDim + d) = packed;
}

__device__ __forceinline__ int list_of(const SparseVerifyParams& p, int h) {
  return p.num_lists == 1 ? 0 : h;
}

__device__ __forceinline__ const int32_t* list_ids(const SparseVerifyParams& p, int b, int h) {
  return p.block_ids + b * p.block_ids_stride_b + list_of(p, h) * p.block_ids_stride_s;
}

__device__ __forceinline__ SequenceView sequence_view(const SparseVerifyParams& p,
                                                     const cutlass::FastDivmod& page_size,
                                                     int b, int h) {
  const PagedKV& kv = p.kv;
  SequenceView s;
  const int list = list_of(p, h);
  s.ids = list_ids(p, b, h);
  s.table = kv.block_table + b * kv.block_table_stride;
  s.count = min(max(__ldg(p.block_counts + b * p.block_counts_stride_b + list), 0), p.max_blocks);
  // Never trust lengths past the block table: reads stay inside it whatever kv_lens holds.
  s.kv_len = min(max(__ldg(kv.kv_lens + b), 0),
                 static_cast<int32_t>(min(static_cast<int64_t>(kv.max_pages) * kv.page_size,
                                          static_cast<int64_t>(0x7fffffff))));
  s.first_window = page_size.div(max(s.kv_len - p.q_len, 0));
  // num_blocks_for by the launcher's divisor (no runtime division; no len + P - 1 to overflow).
  int full_blocks, tail;
  page_size(full_blocks, tail, s.kv_len);
  s.num_blocks = full_blocks + (tail != 0);
  s.num_slots =
      static_cast<int64_t>(s.count + max(s.num_blocks - s.first_window, 0)) * kv.page_size;
  return s;
}

/// Most splits merged on chip: the portable thread-block-cluster size.
constexpr int kMaxClusterSplits = 8;

/// Whether CTAs of `m_tiles` 16-row tiles merge their splits in a cluster: 16-row CTAs only.
/// On the H100 (bench_sparse_verify, 2026-12-08) clusters made the 16-row CTAs (q = 2) of
/// short splits 1.02-1.14x as fast, but the 64-row ones (q = 5 and 8) 0.89-1.04x: with four
/// times the rows per CTA the merge through distributed shared memory outweighs the launch
/// it saves.
constexpr bool cluster_merges(int m_tiles) { return m_tiles == 1; }

/// CTAs in this CTA's thread-block cluster (1 when launched without one, and before sm_90).
__device__ __forceinline__ int cluster_ctas() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return static_cast<int>(cooperative_groups::this_cluster().num_blocks());
#else
  return 1;
#endif
}

/// Barrier of every thread of the cluster; makes each CTA's shared-memory writes before it
/// visible to the others' reads after it (release / acquire).
__device__ __forceinline__ void cluster_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cooperative_groups::this_cluster().sync();
#endif
}

/// The address of `ptr`'s shared-memory word in cluster CTA `rank` (distributed shared memory).
template <typename U>
__device__ __forceinline__ const U* cluster_peer(const U* ptr, int rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return cooperative_groups::this_cluster().map_shared_rank(const_cast<U*>(ptr), rank);
#else
  return ptr;
#endif
}

/// Attention of the query rows [row_chunk * kRows, +kRows) of KV head h of sequence b over the
/// tiles [split's share] of its attended slots. Grid: one CTA per (b, h, row chunk, split), the
/// split fastest. With one split the CTA writes out and lse. Launched with the splits of a list
/// as one thread-block cluster (Hopper, 16-row CTAs, at most kMaxClusterSplits), the CTAs
/// merge their partials through distributed shared memory, each storing a share of the rows;
/// otherwise they write fp32 partials (normalised output and log2-domain lse) for
/// sparse_verify_merge_kernel.
template <typename T, int kHeadDim, int kMTiles, int kWarpgroups>
__global__ void __launch_bounds__(VerifyTileConfig<kHeadDim, kMTiles, kWarpgroups>::kThreads)
    sparse_verify_kernel(const __grid_constant__ SparseVerifyParams p,
                         const __grid_constant__ VerifyDivisors div) {
  using Cfg = VerifyTileConfig<kHeadDim, kMTiles, kWarpgroups>;
  constexpr int kRows = Cfg::kRows;
  constexpr int kTileN = Cfg::kTileN;
  constexpr int kWarpN = Cfg::kWarpN;
  constexpr int kChunks = Cfg::kChunks;
  constexpr int kStages = Cfg::kStages;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char* smem =
      smem_raw + ((Cfg::kSmemAlign - smem_addr(smem_raw) % Cfg::kSmemAlign) % Cfg::kSmemAlign);
  T* stage_base = reinterpret_cast<T*>(smem);                   // [kStages][K|V][kTileN, D]
  T* q_smem = reinterpret_cast<T*>(smem + Cfg::kQOffsetBytes);  // [kRows, D]
  int32_t* pos_smem = reinterpret_cast<int32_t*>(smem + Cfg::kPosOffsetBytes);  // [kStages][kTileN]
  // [kChunkBlocks] logical block id (-1: skipped) and physical page of attended blocks.
  int32_t* chunk_block = reinterpret_cast<int32_t*>(smem + Cfg::kChunkOffsetBytes);
  int32_t* chunk_page = chunk_block + Cfg::kChunkBlocks;
  int32_t* stage_clean = reinterpret_cast<int32_t*>(smem + Cfg::kCleanOffsetBytes);  // [kStages]

  const PagedKV& kv = p.kv;
  const int num_splits = div.splits.divisor;
  int cta = blockIdx.x;
  int row_chunk, split, h, b;
  div.splits(cta, split, cta);  // a cluster's CTAs are consecutive: its splits
  div.row_chunks(cta, row_chunk, cta);
  div.kv_heads(b, h, cta);

  const int rows_total = div.group.divisor * p.q_len;
  const int row0 = row_chunk * kRows;
  // Launched as a programmatic dependent (Hopper): everything below reads what the preceding
  // kernel may have written (ids, lengths, Q, KV) or writes what it may read (out, workspace).
  wait_for_preceding_grid();
  // The first chunk of listed ids (below) depends only on the list's address, not on its count:
  // loaded alongside the count and length, it takes one dependent round trip off the start
  // (count -> ids -> pages -> KV becomes ids and count -> pages -> KV). Only the first split
  // starts at attended block 0 whatever the count.
  constexpr int kChunkPerThread = Cfg::kChunkBlocks / Cfg::kThreads;
  int first_chunk_ids[kChunkPerThread];
  {
    const int32_t* ids = list_ids(p, b, h);
#pragma unroll
    for (int j = 0; j < kChunkPerThread; ++j) {
      const int vblock = threadIdx.x + j * Cfg::kThreads;
      first_chunk_ids[j] = split == 0 && vblock < p.max_blocks ? __ldg(ids + vblock) : -1;
    }
  }
  const SequenceView seq = sequence_view(p, div.page_size, b, h);
  const int page_size = kv.page_size;

  const int num_tiles = static_cast<int>((seq.num_slots + kTileN - 1) / kTileN);
  const int tiles_per_split = div.splits.div(num_tiles + num_splits - 1);
  const int tile_begin = min(split * tiles_per_split, num_tiles);
  const int tile_end = min(tile_begin + tiles_per_split, num_tiles);

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int warp_m = warp % Cfg::kWarpsM;
  const int warp_n = warp / Cfg::kWarpsM;
  const bool computes = warp < Cfg::kComputeWarps;

  // ---- Q rows -> shared memory (zero for padding rows) ------------------------------------
  {
    const T* q = static_cast<const T*>(p.q);
    const bool vec_ok = ((reinterpret_cast<uintptr_t>(q) & 15) |
                         ((p.q_stride_b | p.q_stride_t | p.q_stride_h) & 7)) == 0;
    for (int i = tid; i < kRows * kChunks; i += Cfg::kThreads) {
      const int r = i / kChunks;
      const int c = i % kChunks;
      const int gr = row0 + r;
      const bool valid = gr < rows_total;
      int t = 0, head_in_group = 0;
      if (valid) div.group(t, head_in_group, gr);
      const int hq = h * div.group.divisor + head_in_group;
      const T* src = q + b * p.q_stride_b + t * p.q_stride_t + hq * p.q_stride_h + c * 8;
      T* dst = q_smem + swizzle<kRows>(r, c);
      if (vec_ok) {
        cp_async_16(smem_addr(dst), valid ? src : q, valid);
      } else {
        for (int e = 0; e < 8; ++e) dst[e] = valid ? src[e] : from_float<T>(0.f);
      }
    }
    cp_async_commit();
  }

  // Attended block `vblock` of this list: listed ids first (ids at or past the window, or
  // outside the sequence, are skipped, never read), then every block of the window.
  int chunk_first = -Cfg::kChunkBlocks;  // first attended block held in chunk_*
  bool chunk_listed_valid = false;       // every listed block of the chunk will be read
  auto fill_chunk = [&](int first) {
    __syncthreads();  // the previous chunk has no readers left
    int block[kChunkPerThread];
    bool valid[kChunkPerThread];
#pragma unroll
    for (int j = 0; j < kChunkPerThread; ++j) {
      const int vblock = first + tid + j * Cfg::kThreads;
      if (vblock < seq.count) {
        block[j] = first == 0 && split == 0 ? first_chunk_ids[j] : __ldg(seq.ids + vblock);
        valid[j] = block[j] >= 0 && block[j] < seq.first_window;
      } else {
        block[j] = seq.first_window + (vblock - seq.count);
        valid[j] = block[j] < seq.num_blocks;
      }
    }
    int page[kChunkPerThread];
#pragma unroll
    for (int j = 0; j < kChunkPerThread; ++j) page[j] = valid[j] ? __ldg(seq.table + block[j]) : -1;
    bool listed_ok = true;
#pragma unroll
    for (int j = 0; j < kChunkPerThread; ++j) {
      const bool ok = valid[j] && page[j] >= 0 && page[j] < kv.num_pages;
      if (first + tid + j * Cfg::kThreads < seq.count) listed_ok &= ok;
      chunk_block[tid + j * Cfg::kThreads] = ok ? block[j] : -1;
      chunk_page[tid + j * Cfg::kThreads] = page[j];
    }
    chunk_first = first;
    chunk_listed_valid = __syncthreads_and(listed_ok) != 0;
  };

  // ---- gather of one KV tile into a stage (called by all threads alike) ------------------
  const T* k_base = static_cast<const T*>(kv.k);
  const T* v_base = static_cast<const T*>(kv.v);
  const int load_chunk = tid % kChunks;
  const int load_row0 = tid / kChunks;
  const int64_t head_offset = h * kv.head_stride + load_chunk * 8;
  // Slot indices fit in int32 (the launcher checks): multiply-shift division by the page size.
  const cutlass::FastDivmod& page_divmod = div.page_size;
  const int listed_slots = seq.count * page_size;
  auto load_tile = [&](int tile, int stage) {
    const int first_vblock = page_divmod.div(tile * kTileN);
    const int last_vblock = page_divmod.div(tile * kTileN + kTileN - 1);
    if (first_vblock < chunk_first || last_vblock >= chunk_first + Cfg::kChunkBlocks) {
      fill_chunk(first_vblock);
    }
    // Listed blocks lie before the window, so their tokens precede every query.
    const bool clean = chunk_listed_valid && tile * kTileN + kTileN <= listed_slots;
    if (tid == 0) stage_clean[stage] = clean;
    T* k_stage = stage_base + stage * Cfg::kStageElems;
    T* v_stage = k_stage + Cfg::kKvTileElems;
#pragma unroll
    for (int i = 0; i < Cfg::kLoadRowsPerThread; ++i) {
      const int r = load_row0 + i * Cfg::kLoadRowStep;
      int vblock, offset;
      page_divmod(vblock, offset, tile * kTileN + r);
      const int block = chunk_block[vblock - chunk_first];
      const int page = chunk_page[vblock - chunk_first];
      const int pos = block * page_size + offset;
      const bool valid = block >= 0 && pos < seq.kv_len;
      const int64_t src =
          static_cast<int64_t>(page) * kv.page_stride + offset * kv.token_stride + head_offset;
      const int dst = swizzle<kTileN>(r, load_chunk);
      cp_async_16(smem_addr(k_stage + dst), valid ? k_base + src : k_base, valid);
      cp_async_16(smem_addr(v_stage + dst), valid ? v_base + src : v_base, valid);
      if (load_chunk == 0 && !clean) pos_smem[stage * kTileN + r] = valid ? pos : kMaskedPos;
    }
  };

  // The merge (when split) may now be scheduled: it waits for this grid's completion itself.
  allow_dependent_launch();

  // Prologue: kStages - 1 tiles in flight (empty groups keep the wait counts uniform).
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (tile_begin + s < tile_end) load_tile(tile_begin + s, s);
    cp_async_commit();
  }

  // ---- Q fragments, kept in registers for the whole loop ----------------------------------
  cp_async_wait<kStages - 1>();  // the Q group (committed first) has landed
  __syncthreads();
  uint32_t q_frag[kHeadDim / 16][4];
#pragma unroll
  for (int ks = 0; ks < kHeadDim / 16; ++ks) {
    const int r = warp_m * 16 + (lane & 15);
    ldmatrix_x4(q_frag[ks], smem_addr(q_smem + swizzle<kRows>(r, ks * 2 + (lane >> 4))));
  }

  // Absolute positions of this thread's two rows (lane / 4 and lane / 4 + 8 of its row tile);
  // padding rows see nothing.
  int row_pos[2];
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int gr = row0 + warp_m * 16 + (lane >> 2) + hr * 8;
    row_pos[hr] = gr < rows_total ? seq.kv_len - p.q_len + div.group.div(gr) : -1;
  }

  const float scale_log2 = p.sm_scale * kLog2e;
  float o[kHeadDim / 8][4];
#pragma unroll
  for (int i = 0; i < kHeadDim / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float row_max[2] = {kNegInf, kNegInf};
  float row_sum[2] = {0.f, 0.f};

  // ---- main loop: one KV tile per iteration -----------------------------------------------
  for (int tile = tile_begin; tile < tile_end; ++tile) {
    const int it = tile - tile_begin;
    const int stage = it % kStages;
    cp_async_wait<kStages - 2>();
#if defined(CUTE_ARCH_MMA_SM90A_ENABLED)
    if constexpr (Cfg::kWarpgroupMma) {
      // cp.async wrote through the generic proxy; wgmma reads through the async proxy.
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    }
#endif
    __syncthreads();  // tile `tile` visible to all; the stage refilled below is free
    {
      const int next = tile + kStages - 1;
      if (next < tile_end) load_tile(next, (it + kStages - 1) % kStages);
      cp_async_commit();
    }

    if (!computes) continue;
    const T* k_stage = stage_base + stage * Cfg::kStageElems;
    const T* v_stage = k_stage + Cfg::kKvTileElems;
    const int32_t* pos_tile = pos_smem + stage * kTileN;
    const int n0 = warp_n * kWarpN;

    // One tile's attention. A clean tile (every slot a valid listed token, which precedes every
    // query) needs no mask. The choice is made once per tile, around both MMAs: ptxas 13.0
    // recycled the Q fragment registers of the D = 64 wgmma kernel when a branch sat between
    // the two warpgroup MMAs of an iteration (wrong results on the H200, seen in its SASS).
    const auto attend_tile = [&](auto masked) {
      // S = Q K^T over this warp's kWarpN tokens.
      float s[kWarpN / 8][4];
#pragma unroll
      for (int nt = 0; nt < kWarpN / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#if defined(CUTE_ARCH_MMA_SM90A_ENABLED)
      if constexpr (Cfg::kWarpgroupMma) {
        // B = this warpgroup's kWarpN tokens of the K tile [64 tokens, D], K-major: rows of
        // 128 bytes, k-step ks is 32 bytes into column block ks / 4.
        fence_accumulators(s);
        cute::warpgroup_arrive();
#pragma unroll
        for (int ks = 0; ks < kHeadDim / 16; ++ks) {
          const uint32_t addr =
              smem_addr(k_stage) + (ks >> 2) * (kTileN * 128) + n0 * 128 + (ks & 3) * 32;
          WarpgroupMma<T, kWarpN, false>::run(s, q_frag[ks], swizzle128_desc(addr, 16, 1024));
        }
        cute::warpgroup_commit_batch();
        cute::warpgroup_wait<0>();
        fence_accumulators(s);
      } else
#endif
      {
#pragma unroll
        for (int kc = 0; kc < kHeadDim / 32; ++kc) {
#pragma unroll
          for (int nt = 0; nt < kWarpN / 8; ++nt) {
            uint32_t kb[4];
            const int r = n0 + nt * 8 + (lane & 7);
            ldmatrix_x4(kb, smem_addr(k_stage + swizzle<kTileN>(r, kc * 4 + (lane >> 3))));
            mma_16816<T>(s[nt], q_frag[2 * kc], kb[0], kb[1]);
            mma_16816<T>(s[nt], q_frag[2 * kc + 1], kb[2], kb[3]);
          }
        }
      }

      // Causal and slot masks (clean tiles need none), then the online softmax in the log2 domain.
      float tile_max[2] = {kNegInf, kNegInf};
#pragma unroll
      for (int nt = 0; nt < kWarpN / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = n0 + nt * 8 + (lane & 3) * 2 + (e & 1);
          if constexpr (decltype(masked)::value) {
            const bool visible = pos_tile[col] <= row_pos[e >> 1];
            s[nt][e] = visible ? s[nt][e] * scale_log2 : kNegInf;
          } else {
            s[nt][e] *= scale_log2;
          }
          tile_max[e >> 1] = fmaxf(tile_max[e >> 1], s[nt][e]);
        }
      }
      float alpha[2];
      float base[2];
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        tile_max[hr] = fmaxf(tile_max[hr], __shfl_xor_sync(0xffffffffu, tile_max[hr], 1));
        tile_max[hr] = fmaxf(tile_max[hr], __shfl_xor_sync(0xffffffffu, tile_max[hr], 2));
        const float m_new = fmaxf(row_max[hr], tile_max[hr]);
        base[hr] = m_new == kNegInf ? 0.f : m_new;  // a row with nothing visible yet stays at 0
        alpha[hr] = fast_exp2(row_max[hr] - base[hr]);
        row_max[hr] = m_new;
        row_sum[hr] *= alpha[hr];
      }
#pragma unroll
      for (int dt = 0; dt < kHeadDim / 8; ++dt) {
        o[dt][0] *= alpha[0];
        o[dt][1] *= alpha[0];
        o[dt][2] *= alpha[1];
        o[dt][3] *= alpha[1];
      }
#pragma unroll
      for (int nt = 0; nt < kWarpN / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[nt][e] = fast_exp2(s[nt][e] - base[e >> 1]);
          row_sum[e >> 1] += s[nt][e];
        }
      }

      // O += P V: the score accumulators are already laid out as the A operand.
      uint32_t pa[kWarpN / 16][4];
#pragma unroll
      for (int kt = 0; kt < kWarpN / 16; ++kt) {
        pa[kt][0] = pack2<T>(s[2 * kt][0], s[2 * kt][1]);
        pa[kt][1] = pack2<T>(s[2 * kt][2], s[2 * kt][3]);
        pa[kt][2] = pack2<T>(s[2 * kt + 1][0], s[2 * kt + 1][1]);
        pa[kt][3] = pack2<T>(s[2 * kt + 1][2], s[2 * kt + 1][3]);
      }
#if defined(CUTE_ARCH_MMA_SM90A_ENABLED)
      if constexpr (Cfg::kWarpgroupMma) {
        // B = V tile [64 tokens, D], MN-major: k-step kt starts 16 token rows into this
        // warpgroup's tokens; column blocks of 64 d are kTileN * 128 bytes apart, 8-row groups
        // 1024 bytes.
        fence_accumulators(o);
        cute::warpgroup_arrive();
#pragma unroll
        for (int kt = 0; kt < kWarpN / 16; ++kt) {
          const uint32_t addr = smem_addr(v_stage) + (n0 + kt * 16) * 128;
          WarpgroupMma<T, kHeadDim, true>::run(o, pa[kt], swizzle128_desc(addr, kTileN * 128, 1024));
        }
        cute::warpgroup_commit_batch();
        cute::warpgroup_wait<0>();
        fence_accumulators(o);
      } else
#endif
      {
#pragma unroll
        for (int kt = 0; kt < kWarpN / 16; ++kt) {
          const int r = n0 + kt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
#pragma unroll
          for (int dp = 0; dp < kHeadDim / 16; ++dp) {
            uint32_t vb[4];
            ldmatrix_x4_trans(vb, smem_addr(v_stage + swizzle<kTileN>(r, dp * 2 + (lane >> 4))));
            mma_16816<T>(o[2 * dp], pa[kt], vb[0], vb[1]);
            mma_16816<T>(o[2 * dp + 1], pa[kt], vb[2], vb[3]);
          }
        }
      }
    };
    if (stage_clean[stage]) {
      attend_tile(std::false_type{});
    } else {
      attend_tile(std::true_type{});
    }
  }

  // ---- epilogue: combine the warps that split the tokens, normalise, store ----------------
  cp_async_wait<0>();
  __syncthreads();  // stage buffers are free for the scratch below
  constexpr int kStride = Cfg::kScratchStride;
  float* o_scratch = reinterpret_cast<float*>(smem);              // [kWarpsN, kRows, kStride]
  float* m_scratch = o_scratch + Cfg::kWarpsN * kRows * kStride;  // [kWarpsN, kRows]
  float* l_scratch = m_scratch + Cfg::kWarpsN * kRows;            // [kWarpsN, kRows]
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    row_sum[hr] += __shfl_xor_sync(0xffffffffu, row_sum[hr], 1);
    row_sum[hr] += __shfl_xor_sync(0xffffffffu, row_sum[hr], 2);
    const int r = warp_m * 16 + (lane >> 2) + hr * 8;
    if (computes && (lane & 3) == 0) {
      m_scratch[warp_n * kRows + r] = row_max[hr];
      l_scratch[warp_n * kRows + r] = row_sum[hr];
    }
  }
  __syncthreads();
  // Each warp scales its partial output by its share of the row's softmax: exp2(own max - row
  // max) / row sum. The row's statistics, its output row and its lse are worked out here once
  // per row (by the warp_n = 0 warp), not once per stored vector: the epilogue is serial
  // scalar code of one warp per scheduler, on the critical path of every small-budget call.
  const bool cluster_merge =
      cluster_merges(kMTiles) && num_splits > 1 && cluster_ctas() == num_splits;
  const bool write_partial = num_splits > 1 && !cluster_merge;
  const int64_t rows_per_split = static_cast<int64_t>(p.batch_size) * p.q_len * p.num_qo_heads;
  float* ws_out = static_cast<float*>(p.workspace);                 // [splits, B*q*Hq, D]
  float* ws_lse = ws_out + num_splits * rows_per_split * kHeadDim;  // [splits, B*q*Hq]
  int64_t* row_out = reinterpret_cast<int64_t*>(l_scratch + Cfg::kWarpsN * kRows);  // [kRows]
  float* split_lse = reinterpret_cast<float*>(row_out + kRows);  // [kRows], cluster merge only
#pragma unroll
  for (int hr = 0; hr < 2 && computes; ++hr) {
    const int r = warp_m * 16 + (lane >> 2) + hr * 8;
    float m_all = kNegInf;
#pragma unroll
    for (int w = 0; w < Cfg::kWarpsN; ++w) m_all = fmaxf(m_all, m_scratch[w * kRows + r]);
    float l_all = 0.f;
#pragma unroll
    for (int w = 0; w < Cfg::kWarpsN; ++w) {
      const float m_w = m_scratch[w * kRows + r];
      if (m_w != kNegInf) l_all += l_scratch[w * kRows + r] * exp2f(m_w - m_all);
    }
    const float inv_l = l_all > 0.f ? 1.f / l_all : 0.f;
    const float scale = row_max[hr] == kNegInf ? 0.f : exp2f(row_max[hr] - m_all) * inv_l;
    float* dst = o_scratch + (warp_n * kRows + r) * kStride + (lane & 3) * 2;
#pragma unroll
    for (int dt = 0; dt < kHeadDim / 8; ++dt) {
      *reinterpret_cast<float2*>(dst + dt * 8) =
          make_float2(o[dt][2 * hr] * scale, o[dt][2 * hr + 1] * scale);
    }
    if (warp_n == 0 && (lane & 3) == 0) {
      const int gr = row0 + r;
      int64_t out_row = -1;  // padding rows are not stored
      if (gr < rows_total) {
        int t, head_in_group;
        div.group(t, head_in_group, gr);
        out_row = (static_cast<int64_t>(b) * p.q_len + t) * p.num_qo_heads +
                  h * div.group.divisor + head_in_group;
        const float lse_log2 = l_all > 0.f ? m_all + __log2f(l_all) : kNegInf;
        if (write_partial) {
          out_row += split * rows_per_split;
          ws_lse[out_row] = lse_log2;
        } else if (cluster_merge) {
          split_lse[r] = lse_log2;
        } else {
          p.lse[out_row] = lse_log2 * kLn2;
        }
      }
      row_out[r] = out_row;
    }
  }
  __syncthreads();

  // The rows' parts summed over the warps and stored, 4 floats per thread and step.
  constexpr int kVec = 4;
  for (int i = tid; i < kRows * (kHeadDim / kVec); i += Cfg::kThreads) {
    const int r = i / (kHeadDim / kVec);
    const int d = (i % (kHeadDim / kVec)) * kVec;
    const int64_t out_row = row_out[r];
    if (out_row < 0) continue;
    float4 acc = *reinterpret_cast<const float4*>(o_scratch + r * kStride + d);
#pragma unroll
    for (int w = 1; w < Cfg::kWarpsN; ++w) {
      const float4 v = *reinterpret_cast<const float4*>(o_scratch + (w * kRows + r) * kStride + d);
      acc.x += v.x;
      acc.y += v.y;
      acc.z += v.z;
      acc.w += v.w;
    }
    if (write_partial) {
      *reinterpret_cast<float4*>(ws_out + out_row * kHeadDim + d) = acc;
    } else if (cluster_merge) {
      // Only this thread reads (r, d) of the warps' parts: the sum overwrites the first one.
      *reinterpret_cast<float4*>(o_scratch + r * kStride + d) = acc;
    } else {
      store_out_vec<T, kHeadDim>(p, out_row, d, acc);
    }
  }
  if (!cluster_merge) return;

  // ---- cluster merge: split s merges rows s, s + splits, ... over every split's partials ---
  cluster_sync();  // every split's rows and lse are in its shared memory
  const int own_rows = div.splits.div(kRows - split + num_splits - 1);
  for (int i = tid; i < own_rows * (kHeadDim / kVec); i += Cfg::kThreads) {
    const int r = split + (i / (kHeadDim / kVec)) * num_splits;
    const int d = (i % (kHeadDim / kVec)) * kVec;
    const int64_t out_row = row_out[r];
    if (out_row < 0) continue;
    // Every peer's lse, then every peer's part, loaded before any is used: remote shared
    // memory is a round trip of hundreds of cycles, and these overlap only when issued together.
    float lse[kMaxClusterSplits];
    float lse_max = kNegInf;
#pragma unroll
    for (int s = 0; s < kMaxClusterSplits; ++s) {
      lse[s] = s < num_splits ? *cluster_peer(split_lse + r, s) : kNegInf;
      lse_max = fmaxf(lse_max, lse[s]);
    }
    float4 part[kMaxClusterSplits];
#pragma unroll
    for (int s = 0; s < kMaxClusterSplits; ++s) {
      part[s] = lse[s] != kNegInf
                    ? *reinterpret_cast<const float4*>(cluster_peer(o_scratch + r * kStride + d, s))
                    : make_float4(0.f, 0.f, 0.f, 0.f);
    }
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    float weight_sum = 0.f;
#pragma unroll
    for (int s = 0; s < kMaxClusterSplits; ++s) {
      const float w = lse[s] == kNegInf ? 0.f : exp2f(lse[s] - lse_max);
      weight_sum += w;
      acc.x += w * part[s].x;
      acc.y += w * part[s].y;
      acc.z += w * part[s].z;
      acc.w += w * part[s].w;
    }
    const float inv = weight_sum > 0.f ? 1.f / weight_sum : 0.f;
    store_out_vec<T, kHeadDim>(p, out_row, d,
                               make_float4(acc.x * inv, acc.y * inv, acc.z * inv, acc.w * inv));
    if (d == 0) {
      p.lse[out_row] = weight_sum > 0.f ? (lse_max + __log2f(weight_sum)) * kLn2 : kNegInf;
    }
  }
  cluster_sync();  // the other splits read this CTA's shared memory until here
}

}  // namespace dustin::detail
