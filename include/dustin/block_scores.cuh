// SPDX-License-Identifier: Apache-2.0
// block_scores kernels: a split-K pass of tensor-core logits into softmax partials (per 8 or 16
// keys, reduced inside the MMA fragments, when the block size allows; else per block by a
// segmented scan), then a pass that normalises them exactly and sums them into the blocks.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include <cutlass/fast_math.h>

#include "dustin/attention/tile_primitives.cuh"
#include "dustin/block_scores_params.h"
#include "dustin/dispatch.h"

namespace dustin::detail {

// ---- plan: split lengths and workspace layout, shared by the host and both kernels ----------

/// Query rows (heads x queries) one CTA can hold (dispatch.h: bounded by shared memory).
inline constexpr int32_t kMaxScoreRows = ::dustin::kMaxScoreRows;
/// Keys per pipeline stage of the partial pass; 16 per warp in the MMA.
inline constexpr int32_t kScoreTileKeys = 64;
/// CTAs per launch the plan aims for (B x Hs x splits): about four waves of the four resident
/// CTAs per SM of an H200 at D = 128. Swept on the H200 (B = 16, 32k, 4 or 8 retrieval heads):
/// 2048 beat 4096 by 7% with four heads on distinct KV heads and by 13% with one shared KV
/// head, tied with eight; 1024 lost 40-70% with shared heads, 8192 lost 14-30%.
inline constexpr int64_t kScoreCtasTarget = 2048;
/// Shortest split worth a CTA: 4 tiles of 64 keys amortise loading the queries.
inline constexpr int32_t kMinScoreSplit = 256;

/// Keys per softmax partial on the fragment path: a warp's 16 keys of a tile (or each half of
/// them), reduced within the MMA fragment's lane quads; the sum pass adds block_size / that many
/// per block. 0 when block_size is not a multiple of 8: the scan path, one partial per block.
__host__ __device__ constexpr int32_t fragment_partial_len(int32_t block_size) {
  return block_size % 16 == 0 ? 16 : (block_size % 8 == 0 ? 8 : 0);
}

/// How block_scores cuts the context into splits, and where its workspace keeps:
///   block partials [B, Hs * n, num_partials] float2 (sum of exp2(logit - ref), ref), each
///     over partial_len consecutive keys, and
///   split partials [B, Hs * n, num_splits] float2 (max, sum of exp2(logit - max)).
struct BlockScoresPlan {
  int32_t split_len = 0;     ///< tokens per split: whole tiles (fragment path) or blocks (scan)
  int32_t num_splits = 0;    ///< splits covering the longest possible context
  int32_t rows = 0;          ///< Hs * n
  int32_t partial_len = 0;   ///< keys per block partial: 8 or 16, or block_size (scan path)
  int32_t num_partials = 0;  ///< block partials per row
  size_t block_partials_offset = 0;
  size_t split_partials_offset = 0;
  size_t workspace_bytes = 0;
};

/// Longest context the kernels will read: the block table's capacity and the score row's.
__host__ __device__ inline int64_t block_scores_max_len(const BlockScoresParams& p) {
  const int64_t by_table = static_cast<int64_t>(p.kv.max_pages) * p.kv.page_size;
  const int64_t by_scores = static_cast<int64_t>(p.num_blocks) * p.block_size;
  return by_table < by_scores ? by_table : by_scores;
}

inline BlockScoresPlan plan_block_scores(const BlockScoresParams& p) {
  BlockScoresPlan plan;
  const int64_t max_len = block_scores_max_len(p);
  if (p.batch_size <= 0 || p.num_heads <= 0 || p.num_queries <= 0 || max_len <= 0) return plan;
  const int64_t heads_total = static_cast<int64_t>(p.batch_size) * p.num_heads;
  const int64_t want_splits = (kScoreCtasTarget + heads_total - 1) / heads_total;
  int64_t split = (max_len + want_splits - 1) / want_splits;
  split = split < kMinScoreSplit ? kMinScoreSplit : split;
  // Fragment path: whole tiles per split, so no partial straddles two CTAs; scan path: whole
  // blocks, so each (row, block) partial has one writer.
  const int32_t fragment = fragment_partial_len(p.block_size);
  const int64_t align = fragment > 0 ? kScoreTileKeys : p.block_size;
  split = (split + align - 1) / align * align;
  plan.split_len = static_cast<int32_t>(split);
  plan.num_splits = static_cast<int32_t>((max_len + split - 1) / split);
  plan.rows = p.num_heads * p.num_queries;
  plan.partial_len = fragment > 0 ? fragment : p.block_size;
  plan.num_partials =
      fragment > 0 ? static_cast<int32_t>(plan.num_splits * split / fragment) : p.num_blocks;
  const size_t per_row = sizeof(float) * 2;
  const size_t rows_total = static_cast<size_t>(p.batch_size) * plan.rows;
  plan.block_partials_offset = 0;
  plan.split_partials_offset = rows_total * static_cast<size_t>(plan.num_partials) * per_row;
  plan.workspace_bytes =
      plan.split_partials_offset + rows_total * static_cast<size_t>(plan.num_splits) * per_row;
  return plan;
}

/// Context length of sequence b as the kernels read it: clamped so that bad lengths never
/// read past the block table or write past a score row.
__device__ __forceinline__ int32_t clamped_kv_len(const BlockScoresParams& p, int32_t b,
                                                  int64_t max_len) {
  const int64_t len = p.kv.kv_lens[b];
  return static_cast<int32_t>(len < 0 ? 0 : (len > max_len ? max_len : len));
}

/// Max over the warp in one redux.sync (sm_80+) on order-preserving integer keys of the
/// floats, instead of five dependent shuffles on the per-row critical path. NaN-free inputs.
__device__ __forceinline__ float warp_max(float v) {
  const uint32_t bits = __float_as_uint(v);
  const uint32_t key = bits ^ ((bits >> 31) ? 0xffffffffu : 0x80000000u);
  const uint32_t top = __reduce_max_sync(0xffffffffu, key);
  return __uint_as_float(top ^ ((top >> 31) ? 0x80000000u : 0xffffffffu));
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(0xffffffffu, v, d);
  return v;
}

// ---- pass 1: logits and softmax partials ------------------------------------------------------

template <int kHeadDim>
struct ScoreTile {
  static constexpr int kKeys = kScoreTileKeys;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  // 2 tiles in flight while one is scored. Four stages measured 35% slower on the H200 (4b628b7),
  // likely because at D = 128 they fit 3 CTAs per SM instead of 4.
  static constexpr int kStages = 3;
  /// Key tiles are unpadded, their 16-byte chunks swizzled (`swizzle<kKeys>`) so ldmatrix reads
  /// stay conflict-free: 3 KB less per CTA than 16-byte row padding.
  static constexpr int kTileElems = kKeys * kHeadDim;
  static constexpr int kPitch = kHeadDim + 8;  // queries: 16-bit elements, +16 B per row
  static constexpr int kLogitPitch = kKeys + 4;  // floats
  static constexpr int kChunks = kHeadDim / 8;   // 16-byte chunks per key row
  static_assert(kHeadDim % 16 == 0, "head dim must be a multiple of the MMA k of 16");
  static_assert(kKeys == kWarps * 16, "each warp scores 16 keys of a tile");

  /// Floats per padded row each path keeps in shared memory besides keys and queries: the scan
  /// path's logits, running max, open-block carry and per-lane sums; the fragment path's
  /// running max and sum per warp.
  static constexpr int kScanFloatsPerRow = kLogitPitch + 2 + 32;
  static constexpr int kFragmentFloatsPerRow = 2 * kWarps;

  /// Query rows of `rows_pad` (a multiple of 16) each path stages in shared memory: the
  /// fragment path reads its first row tile straight into registers (at D = 128 with up to 32
  /// rows that fits 4 CTAs per SM, where staging every row fit 3).
  __host__ __device__ static constexpr int staged_q_rows(int rows_pad, bool scan) {
    return scan ? rows_pad : rows_pad - 16;
  }

  /// Dynamic shared memory for up to `rows_pad` query rows (a multiple of 16).
  static size_t smem_bytes(int rows_pad, bool scan) {
    const size_t rows = static_cast<size_t>(rows_pad);
    const size_t q_rows = static_cast<size_t>(staged_q_rows(rows_pad, scan));
    return sizeof(uint16_t) * (static_cast<size_t>(kStages) * kTileElems + q_rows * kPitch) +
           sizeof(float) * rows * (scan ? kScanFloatsPerRow : kFragmentFloatsPerRow) +
           sizeof(int32_t) * 2 * rows;
  }
};

/// What one partial-pass CTA scores: grid (num_splits, Hs, B). The CTA of head `leader` works
/// only when it is the first head reading its KV head; it then scores every head of that KV
/// head, so each key is read once. Its rows are (head, query) pairs r = g * n + i for the g-th
/// head of the group and query i. score_cta() is the first thing both partial kernels do.
struct ScoreCta {
  int32_t kv_head = -1;  ///< -1: nothing to do
  int32_t rows = 0;
  int32_t kv_len = 0;
  int32_t split_begin = 0;
  int32_t split_end = 0;
};

__device__ __forceinline__ ScoreCta score_cta(const BlockScoresParams& p,
                                              const BlockScoresPlan& plan) {
  // The sum pass (a programmatic dependent on Hopper) may be scheduled once every CTA is here.
  allow_dependent_launch();
  ScoreCta cta;
  const int leader = blockIdx.y;
  const int32_t kv_head = p.head_map[leader];
  if (kv_head < 0 || kv_head >= p.kv.num_kv_heads) return cta;
  int group = 0;
  for (int h = 0; h < p.num_heads; ++h) {
    if (p.head_map[h] == kv_head) {
      if (h < leader) return cta;
      ++group;
    }
  }
  cta.kv_len = clamped_kv_len(p, blockIdx.z, block_scores_max_len(p));
  cta.split_begin = blockIdx.x * plan.split_len;
  if (cta.split_begin >= cta.kv_len) return cta;
  cta.split_end = min(cta.split_begin + plan.split_len, cta.kv_len);
  cta.rows = group * p.num_queries;
  cta.kv_head = kv_head;
  return cta;
}

/// Fills, for rows_pad rows, the output row of each local row (-1 for padding) and the position
/// of its query, and stages the zero-padded queries of rows [first_q_row, rows_pad) in s_q.
/// Ends with a barrier.
template <typename T, int kHeadDim>
__device__ __forceinline__ void load_score_rows(const BlockScoresParams& p, const ScoreCta& cta,
                                                int rows_pad, int first_q_row, bool q_vec16,
                                                T* s_q, int32_t* s_row_out, int32_t* s_row_pos) {
  using Tile = ScoreTile<kHeadDim>;
  constexpr int kPitch = Tile::kPitch;
  const int tid = threadIdx.x;
  const int b = blockIdx.z;
  const int n = p.num_queries;
  for (int r = tid; r < rows_pad; r += Tile::kThreads) {
    int out_row = -1;
    if (r < cta.rows) {
      const int g = r / n;
      int seen = 0;
      for (int h = 0; h < p.num_heads; ++h) {
        if (p.head_map[h] == cta.kv_head && seen++ == g) {
          out_row = h * n + r % n;
          break;
        }
      }
    }
    s_row_out[r] = out_row;
    s_row_pos[r] = cta.kv_len - n + r % n;
  }
  __syncthreads();
  // 16-byte loads when q's rows allow them (q_vec16).
  const T* q = static_cast<const T*>(p.q);
  constexpr int kElemsPer16B = 8;
  const int step = q_vec16 ? kElemsPer16B : 1;
  for (int e = first_q_row * kHeadDim + tid * step; e < rows_pad * kHeadDim;
       e += Tile::kThreads * step) {
    const int r = e / kHeadDim;
    const int d = e % kHeadDim;
    T* dst = s_q + (r - first_q_row) * kPitch + d;
    const T* src = r < cta.rows ? q + b * p.q_stride_b + (r % n) * p.q_stride_t +
                                      (s_row_out[r] / n) * p.q_stride_h + d
                                : nullptr;
    if (q_vec16) {
      *reinterpret_cast<uint4*>(dst) = src ? *reinterpret_cast<const uint4*>(src) : uint4{0, 0, 0, 0};
    } else {
      *dst = src ? *src : T(0.f);
    }
  }
  __syncthreads();
}

/// Streams the split's keys through a kStages-deep cp.async pipeline: start() issues the first
/// kStages - 1 tiles (it needs only the CTA's split, so the copies fly while the CTA sets up its
/// query rows), run(score_tile) calls score_tile(tile_begin, k_tile) for each 64-key tile.
/// kWarpPrivate: warp w copies keys [16 w, 16 w + 16) of every tile, the only ones it reads
/// (the fragment path), so each warp waits for its own copies alone and no CTA barrier paces
/// the warps; else the CTA copies each tile together and meets at a barrier per tile. Each
/// thread copies one 16-byte chunk of a few keys per tile; the page numbers of the next tile to
/// copy are loaded one iteration ahead, so the block-table reads never sit between the wait and
/// the copies. Keys past the split and keys on a page outside the pool read as zeros (the
/// former must be masked). The copies are branch-free: a wide multiply-add per key for the
/// source (byte strides fit in 32 bits, which the launcher checks) and shared-memory offsets
/// computed once.
template <typename T, int kHeadDim, bool kWarpPrivate>
class KeyTileStream {
  using Tile = ScoreTile<kHeadDim>;
  static constexpr int kKeys = Tile::kKeys;
  static constexpr int kCopyThreads = kWarpPrivate ? 32 : Tile::kThreads;
  static constexpr int kCopyKeys = kWarpPrivate ? kKeys / Tile::kWarps : kKeys;
  static constexpr int kKeysPerThread = kCopyKeys * Tile::kChunks / kCopyThreads;
  static constexpr int kKeyStride = kCopyThreads / Tile::kChunks;  // rows between a thread's keys
  static constexpr uint32_t kTileBytes = Tile::kTileElems * sizeof(T);
  static_assert(kCopyThreads % Tile::kChunks == 0, "a thread copies the same chunk of each key");

 public:
  __device__ __forceinline__ KeyTileStream(const BlockScoresParams& p, const ScoreCta& cta,
                                           T* s_keys)
      : p_(p),
        split_begin_(cta.split_begin),
        split_end_(cta.split_end),
        num_tiles_((cta.split_end - cta.split_begin + kKeys - 1) / kKeys),
        first_key_((kWarpPrivate ? static_cast<int>(threadIdx.x / 32) * kCopyKeys : 0) +
                   static_cast<int>(threadIdx.x % kCopyThreads) / Tile::kChunks),
        k_base_(reinterpret_cast<const char*>(static_cast<const T*>(p.kv.k) +
                                              cta.kv_head * p.kv.head_stride) +
                (threadIdx.x % Tile::kChunks) * 16),
        page_bytes_(static_cast<uint32_t>(p.kv.page_stride * sizeof(T))),
        token_bytes_(static_cast<int32_t>(p.kv.token_stride * sizeof(T))),
        table_(p.kv.block_table + blockIdx.z * p.kv.block_table_stride),
        // Positions fit in int32 (clamped_kv_len): multiply-shift division by the page size.
        page_divmod_(p.kv.page_size),
        one_page_(kWarpPrivate && p.kv.page_size % kCopyKeys == 0),
        s_keys_(s_keys) {
#pragma unroll
    for (int j = 0; j < kKeysPerThread; ++j) {
      dst_[j] = smem_addr(s_keys + swizzle<kKeys>(first_key_ + j * kKeyStride,
                                                  threadIdx.x % Tile::kChunks));
    }
  }

  __device__ __forceinline__ void start() {
#pragma unroll
    for (int s = 0; s < Tile::kStages - 1; ++s) {
      fetch_pages(s);
      if (s < num_tiles_) issue_tile(s);
      cp_async_commit();
    }
    fetch_pages(Tile::kStages - 1);
  }

  template <typename ScoreTileFn>
  __device__ __forceinline__ void run(ScoreTileFn&& score_tile) {
    for (int tile = 0; tile < num_tiles_; ++tile) {
      cp_async_wait<Tile::kStages - 2>();
      if constexpr (kWarpPrivate) {
        __syncwarp();
      } else {
        __syncthreads();
      }
      {
        const int next = tile + Tile::kStages - 1;
        if (next < num_tiles_) issue_tile(next % Tile::kStages);
        cp_async_commit();
        fetch_pages(next + 1);
      }
      score_tile(split_begin_ + tile * kKeys, s_keys_ + (tile % Tile::kStages) * Tile::kTileElems);
    }
  }

 private:
  __device__ __forceinline__ void fetch_pages(int tile) {
    const int32_t first_pos = split_begin_ + tile * kKeys + first_key_;
    src_valid_ = 0;
    if (one_page_) {
      // A warp's kCopyKeys keys start at a multiple of kCopyKeys (tiles start at multiples of
      // 64 on the fragment path) and a page holds whole such runs: one page for all of this
      // thread's keys, so one division and one table load per tile instead of one per key.
      const int32_t run_key = first_key_ % kCopyKeys;  // this thread's first key in the run
      int page_index, token;
      page_divmod_(page_index, token, first_pos - run_key);
      const int32_t page = __ldg(table_ + min(page_index, p_.kv.max_pages - 1));
      const bool page_ok = page >= 0 && page < p_.kv.num_pages;
      const char* first_src =
          k_base_ + (static_cast<uint64_t>(page_ok ? static_cast<uint32_t>(page) : 0u) *
                         page_bytes_ +
                     static_cast<uint32_t>((token + run_key) * token_bytes_));
      const int32_t keys_left = split_end_ - first_pos;
#pragma unroll
      for (int j = 0; j < kKeysPerThread; ++j) {
        src_[j] = first_src + j * kKeyStride * token_bytes_;
        src_valid_ |= static_cast<uint32_t>(page_ok && j * kKeyStride < keys_left) << j;
      }
      return;
    }
    // The table is read unconditionally (clamped index, L1 hits) so the loads need no branches.
    const int32_t last_page_index = p_.kv.max_pages - 1;
#pragma unroll
    for (int j = 0; j < kKeysPerThread; ++j) {
      const int32_t pos = first_pos + j * kKeyStride;
      int page_index, token;
      page_divmod_(page_index, token, pos);
      const int32_t page = __ldg(table_ + min(page_index, last_page_index));
      const bool valid = pos < split_end_ && page >= 0 && page < p_.kv.num_pages;
      const uint32_t page_u = valid ? static_cast<uint32_t>(page) : 0u;
      src_[j] = k_base_ + (static_cast<uint64_t>(page_u) * page_bytes_ +
                           static_cast<uint32_t>(token * token_bytes_));
      src_valid_ |= static_cast<uint32_t>(valid) << j;
    }
  }
  __device__ __forceinline__ void issue_tile(int stage) {
#pragma unroll
    for (int j = 0; j < kKeysPerThread; ++j) {
      cp_async_16(dst_[j] + stage * kTileBytes, src_[j], (src_valid_ >> j) & 1u);
    }
  }

  const BlockScoresParams& p_;
  const int32_t split_begin_;
  const int32_t split_end_;
  const int num_tiles_;
  const int first_key_;
  const char* const k_base_;
  const uint32_t page_bytes_;
  const int32_t token_bytes_;
  const int32_t* const table_;
  const cutlass::FastDivmod page_divmod_;
  const bool one_page_;  // each warp's keys of a tile lie on one page (fetch_pages)
  T* const s_keys_;
  uint32_t dst_[kKeysPerThread];  // shared-memory address of each key's chunk in stage 0
  const char* src_[kKeysPerThread];
  uint32_t src_valid_ = 0;  // bit j: key j of the tile is read, else zero-filled
};

/// A fragments (m16n8k16) of query rows [16 mt, 16 mt + 16) for every k16 step of D.
template <typename T, int kHeadDim>
__device__ __forceinline__ void load_q_fragments(uint32_t (&q)[kHeadDim / 16][4], const T* s_q,
                                                 int mt) {
  constexpr int kPitch = ScoreTile<kHeadDim>::kPitch;
  const int lane = threadIdx.x & 31;
  const T* row = s_q + (mt * 16 + (lane & 15)) * kPitch + (lane >> 4) * 8;
#pragma unroll
  for (int ks = 0; ks < kHeadDim / 16; ++ks) ldmatrix_x4(q[ks], smem_addr(row + ks * 16));
}

/// The same fragments for row tile 0, read straight from q (zeros for rows past cta.rows), so
/// the fragment path stages only later row tiles in shared memory.
template <typename T, int kHeadDim>
__device__ __forceinline__ void load_first_q_fragments(uint32_t (&q)[kHeadDim / 16][4],
                                                       const BlockScoresParams& p,
                                                       const ScoreCta& cta,
                                                       const int32_t* s_row_out) {
  const int lane = threadIdx.x & 31;
  const int n = p.num_queries;
  const uint16_t* rows[2];  // this lane's two rows, at its column pair; nullptr: padding
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = (lane >> 2) + half * 8;
    rows[half] = r < cta.rows
                     ? reinterpret_cast<const uint16_t*>(static_cast<const T*>(p.q) +
                                                         blockIdx.z * p.q_stride_b +
                                                         (r % n) * p.q_stride_t +
                                                         (s_row_out[r] / n) * p.q_stride_h) +
                           (lane & 3) * 2
                     : nullptr;
  }
  // Two 16-bit loads per register: q's strides need not keep pairs 4-byte aligned.
  const auto pair = [](const uint16_t* row, int col) -> uint32_t {
    return row == nullptr ? 0u
                          : static_cast<uint32_t>(row[col]) |
                                (static_cast<uint32_t>(row[col + 1]) << 16);
  };
#pragma unroll
  for (int ks = 0; ks < kHeadDim / 16; ++ks) {
    q[ks][0] = pair(rows[0], ks * 16);
    q[ks][1] = pair(rows[1], ks * 16);
    q[ks][2] = pair(rows[0], ks * 16 + 8);
    q[ks][3] = pair(rows[1], ks * 16 + 8);
  }
}

/// Raw logits of the 16 query rows of `q` against this warp's 16 keys of the tile, in the
/// m16n8k16 accumulator layout: acc[nt][e] is row lane / 4 + 8 (e / 2) of the row tile, key
/// 16 warp + 8 nt + 2 (lane % 4) + e % 2.
template <typename T, int kHeadDim>
__device__ __forceinline__ void tile_logits(float (&acc)[2][4],
                                            const uint32_t (&q)[kHeadDim / 16][4],
                                            const T* k_tile) {
  const int lane = threadIdx.x & 31;
  const int j = lane >> 3;
  const int key = (threadIdx.x >> 5) * 16 + (j >> 1) * 8 + (lane & 7);
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;
  }
#pragma unroll
  for (int ks = 0; ks < kHeadDim / 16; ++ks) {
    uint32_t bk[4];
    ldmatrix_x4(bk, smem_addr(k_tile + swizzle<kScoreTileKeys>(key, ks * 2 + (j & 1))));
    mma_16816<T>(acc[0], q[ks], bk[0], bk[1]);
    mma_16816<T>(acc[1], q[ks], bk[2], bk[3]);
  }
}

/// Fragment path (block_size a multiple of kPartialLen = 8 or 16). Per tile each warp turns
/// its MMA fragments straight into partials over kPartialLen keys: max and sum of
/// exp2(logit - max) reduced over the lane quad that holds a row, no shared-memory round trip.
/// The owner lane of each (warp, row) keeps the row's running max and sum in shared memory;
/// the CTA combines them into the split partial at the end.
template <typename T, int kHeadDim, int kPartialLen>
__global__ void __launch_bounds__(ScoreTile<kHeadDim>::kThreads)
    block_scores_fragment_kernel(const __grid_constant__ BlockScoresParams p,
                                 const BlockScoresPlan plan, int rows_pad, bool q_vec16) {
  static_assert(kPartialLen == 8 || kPartialLen == 16, "a partial is one or two n8 MMA tiles");
  using Tile = ScoreTile<kHeadDim>;
  constexpr int kPartsPerWarp = 16 / kPartialLen;
  constexpr int kTilesPerPart = kPartialLen / 8;
  const ScoreCta cta = score_cta(p, plan);
  if (cta.kv_head < 0) return;
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int b = blockIdx.z;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* s_keys = reinterpret_cast<T*>(smem_raw);         // [kStages][kKeys x D swizzled]
  T* s_q = s_keys + Tile::kStages * Tile::kTileElems;  // [rows_pad - 16][kPitch]: rows 16..
  const int q_rows = Tile::staged_q_rows(rows_pad, /*scan=*/false);
  float* s_run_max = reinterpret_cast<float*>(s_q + q_rows * Tile::kPitch);  // [kWarps][rows_pad]
  float* s_run_sum = s_run_max + Tile::kWarps * rows_pad;                   // [kWarps][rows_pad]
  int32_t* s_row_out = reinterpret_cast<int32_t*>(s_run_sum + Tile::kWarps * rows_pad);
  int32_t* s_row_pos = s_row_out + rows_pad;
  KeyTileStream<T, kHeadDim, /*kWarpPrivate=*/true> keys(p, cta, s_keys);
  keys.start();
  for (int e = tid; e < Tile::kWarps * rows_pad; e += Tile::kThreads) {
    s_run_max[e] = -INFINITY;
    s_run_sum[e] = 0.f;
  }
  load_score_rows<T, kHeadDim>(p, cta, rows_pad, 16, q_vec16, s_q, s_row_out, s_row_pos);

  const float scale_log2 = p.sm_scale * kLog2e;
  const int m_tiles = (cta.rows + 15) / 16;
  // Keys from here on may be hidden from some row (past the split, or after a row's query).
  const int32_t first_hidden = min(cta.split_end, cta.kv_len - p.num_queries + 1);
  float2* block_partials = reinterpret_cast<float2*>(static_cast<char*>(p.workspace) +
                                                     plan.block_partials_offset);
  const int64_t row_base = static_cast<int64_t>(b) * plan.rows;

  // One row tile (one head, or a few sharing a KV head, with n <= 16 queries) is the usual
  // case: its query fragments and its rows' running max and sum then stay in registers for
  // the whole split. Every lane of a quad holds its two rows' statistics.
  uint32_t q0[kHeadDim / 16][4];
  load_first_q_fragments<T, kHeadDim>(q0, p, cta, s_row_out);
  float run_max0[2] = {-INFINITY, -INFINITY};
  float run_sum0[2] = {0.f, 0.f};

  // Where the block partials of row tile mt's two rows of this lane go (the quad's first lane
  // writes them; nullptr elsewhere and for padding rows); row tile 0's are found once.
  const auto rows_partials = [&](int mt, float2* (&row_partials)[2]) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = mt * 16 + (lane >> 2) + half * 8;
      row_partials[half] = (lane & 3) == 0 && r < cta.rows
                               ? block_partials + (row_base + s_row_out[r]) * plan.num_partials
                               : nullptr;
    }
  };
  float2* first_row_partials[2];
  rows_partials(0, first_row_partials);

  // Softmax partials of one row tile's logits over this warp's keys [warp_begin, +16): per
  // partial the max and the sum of exp2(logit - max) over its lane quad, written by the quad's
  // first lane, and folded into the rows' running statistics. Masking only where some key may
  // be hidden, chosen once per tile.
  const auto score_rows = [&](auto masked, int mt, const float (&acc)[2][4], int32_t warp_begin,
                              float (&run_max)[2], float (&run_sum)[2]) {
    float2* row_partials[2] = {first_row_partials[0], first_row_partials[1]};
    if (mt > 0) rows_partials(mt, row_partials);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = mt * 16 + (lane >> 2) + half * 8;
      float v[2][2];  // [n8 tile][column]
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          v[nt][c] = acc[nt][half * 2 + c] * scale_log2;
          if constexpr (decltype(masked)::value) {
            const int32_t pos = warp_begin + nt * 8 + (lane & 3) * 2 + c;
            if (pos >= cta.split_end || pos > s_row_pos[r]) v[nt][c] = -INFINITY;
          }
        }
      }
#pragma unroll
      for (int part = 0; part < kPartsPerWarp; ++part) {
        float part_max = -INFINITY;
#pragma unroll
        for (int t = 0; t < kTilesPerPart; ++t) {
          part_max = fmaxf(part_max, fmaxf(v[part + t][0], v[part + t][1]));
        }
        part_max = fmaxf(part_max, __shfl_xor_sync(0xffffffffu, part_max, 1));
        part_max = fmaxf(part_max, __shfl_xor_sync(0xffffffffu, part_max, 2));
        const float ref = part_max == -INFINITY ? 0.f : part_max;  // all hidden: sum 0
        float sum = 0.f;
#pragma unroll
        for (int t = 0; t < kTilesPerPart; ++t) {
          sum += fast_exp2(v[part + t][0] - ref) + fast_exp2(v[part + t][1] - ref);
        }
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        if (row_partials[half] != nullptr) {
          row_partials[half][(warp_begin + part * kPartialLen) / kPartialLen] =
              make_float2(sum, ref);
        }
        const float new_max = fmaxf(run_max[half], part_max);
        if (new_max != -INFINITY) {  // sum == 0 keeps 2^(ref - new_max) from overflowing
          run_sum[half] = run_sum[half] * fast_exp2(run_max[half] - new_max) +
                          (sum > 0.f ? sum * fast_exp2(ref - new_max) : 0.f);
        }
        run_max[half] = new_max;
      }
    }
  };
  const auto score_tile = [&](auto masked, int32_t tile_begin, const T* k_tile) {
    const int32_t warp_begin = tile_begin + warp * 16;
    float acc[2][4];
    tile_logits<T, kHeadDim>(acc, q0, k_tile);
    score_rows(masked, 0, acc, warp_begin, run_max0, run_sum0);
    for (int mt = 1; mt < m_tiles; ++mt) {
      uint32_t q[kHeadDim / 16][4];
      load_q_fragments<T, kHeadDim>(q, s_q, mt - 1);  // s_q starts at row tile 1
      tile_logits<T, kHeadDim>(acc, q, k_tile);
      const int r0 = warp * rows_pad + mt * 16 + (lane >> 2);
      float run_max[2] = {s_run_max[r0], s_run_max[r0 + 8]};
      float run_sum[2] = {s_run_sum[r0], s_run_sum[r0 + 8]};
      score_rows(masked, mt, acc, warp_begin, run_max, run_sum);
      __syncwarp();  // the quad's lanes have read before the first one writes
      if ((lane & 3) == 0) {
        s_run_max[r0] = run_max[0];
        s_run_max[r0 + 8] = run_max[1];
        s_run_sum[r0] = run_sum[0];
        s_run_sum[r0 + 8] = run_sum[1];
      }
    }
  };

  keys.run([&](int32_t tile_begin, const T* k_tile) {
    if (tile_begin + Tile::kKeys > first_hidden) {
      score_tile(std::true_type{}, tile_begin, k_tile);
    } else {
      score_tile(std::false_type{}, tile_begin, k_tile);
    }
  });
  if ((lane & 3) == 0) {
    const int r0 = warp * rows_pad + (lane >> 2);
    s_run_max[r0] = run_max0[0];
    s_run_max[r0 + 8] = run_max0[1];
    s_run_sum[r0] = run_sum0[0];
    s_run_sum[r0 + 8] = run_sum0[1];
  }

  // Split partials: the warps' running statistics combined in a fixed order.
  __syncthreads();
  float2* split_partials = reinterpret_cast<float2*>(static_cast<char*>(p.workspace) +
                                                     plan.split_partials_offset);
  for (int r = tid; r < cta.rows; r += Tile::kThreads) {
    float row_max = -INFINITY;
#pragma unroll
    for (int w = 0; w < Tile::kWarps; ++w) row_max = fmaxf(row_max, s_run_max[w * rows_pad + r]);
    float row_sum = 0.f;
    if (row_max != -INFINITY) {
#pragma unroll
      for (int w = 0; w < Tile::kWarps; ++w) {
        row_sum += s_run_sum[w * rows_pad + r] * exp2f(s_run_max[w * rows_pad + r] - row_max);
      }
    }
    split_partials[(row_base + s_row_out[r]) * plan.num_splits + blockIdx.x] =
        make_float2(row_max, row_sum);
  }
}

/// Scan path (any block size): per tile the logits go to shared memory; then per row (one
/// warp each, two rows interleaved for latency) a running max, per-lane running sums, and block
/// partials by a segmented scan over each 32-key window, a block still open at a window's end
/// carrying into the next. Splits are block-aligned, so each (row, block) partial is written
/// by exactly one thread.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(ScoreTile<kHeadDim>::kThreads)
    block_scores_scan_kernel(const __grid_constant__ BlockScoresParams p,
                             const BlockScoresPlan plan, int rows_pad, bool q_vec16) {
  using Tile = ScoreTile<kHeadDim>;
  constexpr int kLogitPitch = Tile::kLogitPitch;
  const ScoreCta cta = score_cta(p, plan);
  if (cta.kv_head < 0) return;
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int b = blockIdx.z;
  const int rows = cta.rows;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* s_keys = reinterpret_cast<T*>(smem_raw);         // [kStages][kKeys x D swizzled]
  T* s_q = s_keys + Tile::kStages * Tile::kTileElems;  // [rows_pad][kPitch]
  float* s_logit = reinterpret_cast<float*>(s_q + rows_pad * Tile::kPitch);  // [rows_pad][kLogitPitch]
  float* s_max = s_logit + rows_pad * kLogitPitch;  // [rows_pad] running max
  float* s_carry = s_max + rows_pad;                // [rows_pad] partial of the block still open
  float* s_lane_sum = s_carry + rows_pad;  // [rows_pad][32] per-lane sums of exp2(logit - max)
  int32_t* s_row_out = reinterpret_cast<int32_t*>(s_lane_sum + rows_pad * 32);
  int32_t* s_row_pos = s_row_out + rows_pad;
  for (int r = tid; r < rows_pad; r += Tile::kThreads) {
    s_max[r] = -INFINITY;
    s_carry[r] = 0.f;
  }
  KeyTileStream<T, kHeadDim, /*kWarpPrivate=*/false> keys(p, cta, s_keys);
  keys.start();
  for (int e = tid; e < rows_pad * 32; e += Tile::kThreads) s_lane_sum[e] = 0.f;
  load_score_rows<T, kHeadDim>(p, cta, rows_pad, 0, q_vec16, s_q, s_row_out, s_row_pos);

  const float scale_log2 = p.sm_scale * kLog2e;
  const int m_tiles = (rows + 15) / 16;
  float2* block_partials = reinterpret_cast<float2*>(static_cast<char*>(p.workspace) +
                                                     plan.block_partials_offset);

  keys.run([&](int32_t tile_begin, const T* k_tile) {
    // Logits of this warp's 16 keys for every row, log2-scaled and causally masked.
    for (int mt = 0; mt < m_tiles; ++mt) {
      uint32_t q_frag[kHeadDim / 16][4];
      load_q_fragments<T, kHeadDim>(q_frag, s_q, mt);
      float acc[2][4];
      tile_logits<T, kHeadDim>(acc, q_frag, k_tile);
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = mt * 16 + (lane >> 2) + (e >> 1) * 8;
          const int key = warp * 16 + nt * 8 + (lane & 3) * 2 + (e & 1);
          const int32_t pos = tile_begin + key;
          const bool visible = r < rows && pos < cta.split_end && pos <= s_row_pos[r];
          s_logit[r * kLogitPitch + key] = visible ? acc[nt][e] * scale_log2 : -INFINITY;
        }
      }
    }
    __syncthreads();

    // Where each lane's key of the two 32-key windows falls: the same for every row.
    int32_t lane_block[2];
    int lane_first[2];  // first lane of the lane's block inside the window
    bool lane_in[2];
    bool lane_closes[2];
    bool lane_opened_before[2];  // its block began in an earlier window
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int32_t window = tile_begin + half * 32;
      const int32_t pos = window + lane;
      lane_block[half] = pos / p.block_size;
      const int32_t block_first = lane_block[half] * p.block_size;
      lane_first[half] = block_first > window ? block_first - window : 0;
      lane_opened_before[half] = block_first < window;
      lane_in[half] = pos < cta.split_end;
      lane_closes[half] = lane_in[half] && (pos + 1 == block_first + p.block_size ||
                                            pos + 1 == cta.split_end);
    }

    for (int r0 = warp; r0 < rows; r0 += 2 * Tile::kWarps) {
      const bool two = r0 + Tile::kWarps < rows;
      const int row[2] = {r0, two ? r0 + Tile::kWarps : r0};
      float logit[2][2];
      float new_max[2];
      float ref[2];
      float lane_sum[2];
      float carry[2];
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        logit[j][0] = s_logit[row[j] * kLogitPitch + lane];
        logit[j][1] = s_logit[row[j] * kLogitPitch + lane + 32];
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const float old_max = s_max[row[j]];
        new_max[j] = fmaxf(old_max, warp_max(fmaxf(logit[j][0], logit[j][1])));
        ref[j] = new_max[j] == -INFINITY ? 0.f : new_max[j];  // no valid key yet: all zero
        const float rescale = old_max == -INFINITY ? 0.f : exp2f(old_max - ref[j]);
        lane_sum[j] = s_lane_sum[row[j] * 32 + lane] * rescale;
        carry[j] = s_carry[row[j]] * rescale;
      }
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        float v[2];
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          v[j] = lane_in[half] ? exp2f(logit[j][half] - ref[j]) : 0.f;
          lane_sum[j] += v[j];
        }
#pragma unroll
        for (int d = 1; d < 32; d <<= 1) {
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const float up = __shfl_up_sync(0xffffffffu, v[j], d);
            if (lane - d >= lane_first[half]) v[j] += up;
          }
        }
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          if (lane_opened_before[half]) v[j] += carry[j];
          if (lane_closes[half] && (j == 0 || two)) {
            const int64_t out_row = static_cast<int64_t>(b) * plan.rows + s_row_out[row[j]];
            block_partials[out_row * plan.num_partials + lane_block[half]] =
                make_float2(v[j], ref[j]);
          }
          carry[j] = __shfl_sync(0xffffffffu, lane_in[half] && !lane_closes[half] ? v[j] : 0.f, 31);
        }
      }
      __syncwarp();  // every lane has read s_max and s_carry before lane 0 overwrites them
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        if (j == 0 || two) {
          s_lane_sum[row[j] * 32 + lane] = lane_sum[j];
          if (lane == 0) {
            s_max[row[j]] = new_max[j];
            s_carry[row[j]] = carry[j];
          }
        }
      }
    }
  });

  // Split partials: the row's max and its sum, reduced over lanes in a fixed tree.
  float2* split_partials = reinterpret_cast<float2*>(static_cast<char*>(p.workspace) +
                                                     plan.split_partials_offset);
  __syncthreads();
  for (int r = warp; r < rows; r += Tile::kWarps) {
    const float sum = warp_sum(s_lane_sum[r * 32 + lane]);
    if (lane == 0) {
      const int64_t row = static_cast<int64_t>(b) * plan.rows + s_row_out[r];
      split_partials[row * plan.num_splits + blockIdx.x] = make_float2(s_max[r], sum);
    }
  }
}

// ---- pass 2: exact normalisation and the sum over rows ---------------------------------------

inline constexpr int kScoreSumThreads = 256;
/// (row, partial) terms of one block a thread loads at once; the first batch is in flight while
/// the CTA merges the rows' split partials.
inline constexpr int kScoreSumBatch = 32;
/// Rows each warp merges at once (their split partials loaded together).
inline constexpr int kScoreSumRowsPerWarp = 4;

/// Grid (ceil(NB / 256), B). Each CTA merges the split partials of every row into (max,
/// 1 / sum), then each thread adds, for one block, its probability mass over the rows in the
/// fixed order (head, query) into scores: one writer per element, no atomics. Every load of a
/// phase is issued before the first one is used, so the pass costs about two memory latencies
/// after the partial pass ends (it is a programmatic dependent of it on Hopper).
__global__ void __launch_bounds__(kScoreSumThreads)
    block_scores_sum_kernel(const __grid_constant__ BlockScoresParams p,
                            const BlockScoresPlan plan) {
  extern __shared__ float s_stats[];  // [rows] max, [rows] 1 / sum, [rows] 1: head was scored
  float* s_row_max = s_stats;
  float* s_row_inv = s_stats + plan.rows;
  float* s_row_scored = s_stats + 2 * plan.rows;
  constexpr int kWarps = kScoreSumThreads / 32;
  const int b = blockIdx.y;
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  // Lengths and the scores accumulated into are inputs of both passes, written before the
  // partial pass began, so they are read before the wait; the partials come from the partial
  // pass (the grid before this one).
  const int32_t kv_len = clamped_kv_len(p, b, block_scores_max_len(p));
  const int32_t nblk = num_blocks_for(kv_len, p.block_size);
  const int32_t first_block = blockIdx.x * kScoreSumThreads;
  const int32_t block = first_block + tid;  // this thread's block
  float* const score = p.scores + b * p.scores_stride_b + block;
  const float prior = block < nblk ? *score : 0.f;
  wait_for_preceding_grid();
  allow_dependent_launch();
  if (first_block >= nblk) return;
  const int32_t splits = (kv_len + plan.split_len - 1) / plan.split_len;

  // This thread's block terms (row, partial) in a fixed order, row-major: the block's partials
  // are one on the scan path, block_size / partial_len on the fragment path, where those past
  // the last tile of the sequence were never written; rows of heads that were not scored (bad
  // head_map entries) were never written either, and are skipped when added.
  const float2* block_partials = reinterpret_cast<const float2*>(
      static_cast<const char*>(p.workspace) + plan.block_partials_offset);
  const int32_t parts_per_block = p.block_size / plan.partial_len;
  const int32_t first_part = block * parts_per_block;
  const int32_t end_part =
      min(first_part + parts_per_block, (kv_len + plan.partial_len - 1) / plan.partial_len);
  const cutlass::FastDivmod part_divmod(parts_per_block);
  const int32_t terms = block < nblk ? plan.rows * parts_per_block : 0;
  const float2* batch_parts =
      block_partials + static_cast<int64_t>(b) * plan.rows * plan.num_partials;
  float2 part[kScoreSumBatch];
  const auto load_terms = [&](int32_t t0) {
#pragma unroll
    for (int k = 0; k < kScoreSumBatch; ++k) {
      int r, offset;
      part_divmod(r, offset, t0 + k);
      const int32_t j = first_part + offset;
      part[k] = t0 + k < terms && j < end_part
                    ? batch_parts[static_cast<int64_t>(r) * plan.num_partials + j]
                    : make_float2(0.f, 0.f);
    }
  };
  load_terms(0);

  // Per row: the max over its split partials and 1 / the sum below it, each lane folding its
  // splits in one pass (online rescaling), then a butterfly over the lanes (every lane ends
  // with the same values: each combine is symmetric). A warp's rows load together.
  const float2* split_partials = reinterpret_cast<const float2*>(
      static_cast<const char*>(p.workspace) + plan.split_partials_offset);
  for (int r0 = warp; r0 < plan.rows; r0 += kWarps * kScoreSumRowsPerWarp) {
    float m[kScoreSumRowsPerWarp];
    float sum[kScoreSumRowsPerWarp];
#pragma unroll
    for (int i = 0; i < kScoreSumRowsPerWarp; ++i) {
      m[i] = -INFINITY;
      sum[i] = 0.f;
    }
    for (int s = lane; s < splits; s += 32) {
      float2 split[kScoreSumRowsPerWarp];  // (max, sum of exp2(logit - max)) of one split
#pragma unroll
      for (int i = 0; i < kScoreSumRowsPerWarp; ++i) {
        const int r = r0 + i * kWarps;
        split[i] = r < plan.rows
                       ? split_partials[(static_cast<int64_t>(b) * plan.rows + r) * plan.num_splits + s]
                       : make_float2(0.f, 0.f);
      }
#pragma unroll
      for (int i = 0; i < kScoreSumRowsPerWarp; ++i) {
        if (split[i].y > 0.f) {
          const float new_m = fmaxf(m[i], split[i].x);
          sum[i] = sum[i] * exp2f(m[i] - new_m) + split[i].y * exp2f(split[i].x - new_m);
          m[i] = new_m;
        }
      }
    }
#pragma unroll
    for (int d = 16; d > 0; d >>= 1) {
#pragma unroll
      for (int i = 0; i < kScoreSumRowsPerWarp; ++i) {
        const float other_m = __shfl_xor_sync(0xffffffffu, m[i], d);
        const float other_sum = __shfl_xor_sync(0xffffffffu, sum[i], d);
        const float new_m = fmaxf(m[i], other_m);
        sum[i] = new_m == -INFINITY
                     ? 0.f
                     : sum[i] * exp2f(m[i] - new_m) + other_sum * exp2f(other_m - new_m);
        m[i] = new_m;
      }
    }
#pragma unroll
    for (int i = 0; i < kScoreSumRowsPerWarp; ++i) {
      const int r = r0 + i * kWarps;
      if (lane == 0 && r < plan.rows) {
        const int32_t kv_head = p.head_map[r / p.num_queries];
        s_row_max[r] = m[i];
        s_row_inv[r] = sum[i] > 0.f ? 1.f / sum[i] : 0.f;
        s_row_scored[r] = kv_head >= 0 && kv_head < p.kv.num_kv_heads ? 1.f : 0.f;
      }
    }
  }
  __syncthreads();
  if (block >= nblk) return;

  float total = 0.f;
  for (int32_t t0 = 0; t0 < terms; t0 += kScoreSumBatch) {
    if (t0 > 0) load_terms(t0);
#pragma unroll
    for (int k = 0; k < kScoreSumBatch; ++k) {
      const int r = min(part_divmod.div(t0 + k), plan.rows - 1);
      if (part[k].x > 0.f && s_row_scored[r] != 0.f) {
        total += part[k].x * exp2f(part[k].y - s_row_max[r]) * s_row_inv[r];
      }
    }
  }
  *score = prior + total;
}

}  // namespace dustin::detail
