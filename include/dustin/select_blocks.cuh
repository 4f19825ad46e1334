// SPDX-License-Identifier: Apache-2.0
// select_blocks kernel: one CTA per list, radix select over order-preserving keys of the scores.
#pragma once

#include <cub/block/block_scan.cuh>

#include <cstdint>

#include "dustin/select_blocks_params.h"

namespace dustin::detail {

/// Threads per list: 16 warps keep the 8 radix passes short for NB of a few thousand.
inline constexpr int kSelectThreads = 512;
/// Largest NB whose keys are staged in shared memory (64 KB); longer lists re-read global memory.
inline constexpr int kSelectSmemKeyBlocks = 16384;
/// Radix digit width and histogram size of each pass over the 32-bit keys.
inline constexpr int kRadixBits = 8;
inline constexpr int kRadixBins = 1 << kRadixBits;
/// Key of a block that is not a candidate (forced, already picked, or past the sequence).
inline constexpr uint32_t kNotCandidate = 0;
/// Key of a NaN score: below every number, above non-candidates.
inline constexpr uint32_t kNanKey = 1;

/// Unsigned key whose order is the ranking order of docs/ops.md: larger score, larger key;
/// -0 and +0 tie (as `==` does on the CPU); every NaN gets kNanKey. Negative numbers map to
/// ~bits >= 0x007fffff, so kNotCandidate and kNanKey stay below every number.
__device__ __forceinline__ uint32_t score_rank_key(float score) {
  if (score != score) return kNanKey;
  const uint32_t bits = __float_as_uint(score == 0.f ? 0.f : score);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

/// Bits of ids [begin, end) inside the 32-id word starting at `word_first`.
__device__ __forceinline__ uint32_t id_range_bits(int32_t word_first, int32_t begin, int32_t end) {
  const int32_t lo = max(begin - word_first, 0);
  const int32_t hi = min(end - word_first, 32);
  if (lo >= hi) return 0u;
  const uint32_t below_hi = hi == 32 ? ~0u : ((1u << hi) - 1u);
  return below_hi & ~((1u << lo) - 1u);
}

/// Threshold found by the radix passes: candidates whose masked key exceeds `prefix` are in;
/// of those equal to it, all are in when `exact`, else the `need` lowest ids.
struct RadixThreshold {
  uint32_t prefix;
  uint32_t mask;
  int32_t need;
  int32_t exact;
};

struct SelectShared {
  uint32_t histogram[2][kRadixBins];  // double-buffered so one pass clears the next one's
  RadixThreshold threshold;
  typename cub::BlockScan<int32_t, kSelectThreads>::TempStorage scan;
};

/// Candidate key of block `id` for the current pick: from the staged keys, or computed from
/// global memory with the chosen-bit test the staging would have applied.
template <bool kKeysInSmem>
__device__ __forceinline__ uint32_t candidate_key(int32_t id, const float* scores,
                                                  const uint32_t* keys, const uint32_t* chosen) {
  if constexpr (kKeysInSmem) {
    return keys[id];
  } else {
    if ((chosen[id >> 5] >> (id & 31)) & 1u) return kNotCandidate;
    return score_rank_key(scores[id]);
  }
}

/// Marks in `chosen` the best `k` not-yet-chosen blocks of [0, nblk) by `scores` (score
/// descending, ties to the lower id, NaN last). k must not exceed the number of candidates.
/// Ends with a barrier; the whole CTA calls it with the same arguments.
template <bool kKeysInSmem>
__device__ __forceinline__ void pick_top_blocks(const float* __restrict__ scores, int32_t nblk, int32_t k,
                                uint32_t* keys, uint32_t* chosen, SelectShared& sh) {
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  if (k <= 0) return;
  if constexpr (kKeysInSmem) {
    for (int32_t id = tid; id < nblk; id += kSelectThreads) {
      const bool taken = (chosen[id >> 5] >> (id & 31)) & 1u;
      keys[id] = taken ? kNotCandidate : score_rank_key(scores[id]);
    }
  }
  for (int i = tid; i < kRadixBins; i += kSelectThreads) sh.histogram[0][i] = 0;
  __syncthreads();

  RadixThreshold t{0u, 0u, k, 0};
  int pass = 0;
  for (int shift = 32 - kRadixBits; shift >= 0; shift -= kRadixBits, ++pass) {
    uint32_t* hist = sh.histogram[pass & 1];
    // Every lane of a warp runs the same trip count so the warp can aggregate equal bins:
    // scores cluster in a few exponent bins, where plain shared atomics would serialise.
    for (int32_t base = 0; base < nblk; base += kSelectThreads) {
      const int32_t id = base + tid;
      bool counted = false;
      uint32_t bin = kRadixBins;
      if (id < nblk) {
        const uint32_t key = candidate_key<kKeysInSmem>(id, scores, keys, chosen);
        counted = key != kNotCandidate && (key & t.mask) == t.prefix;
        if (counted) bin = (key >> shift) & (kRadixBins - 1);
      }
      const uint32_t peers = __match_any_sync(0xffffffffu, bin);
      if (counted && lane == __ffs(peers) - 1) atomicAdd(&hist[bin], __popc(peers));
    }
    __syncthreads();
    if (tid < 32) {
      // Lane l owns bins [8l, 8l + 8); find the bin holding the need-th largest key.
      constexpr int kPerLane = kRadixBins / 32;
      uint32_t counts[kPerLane];
      uint32_t lane_total = 0;
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) {
        counts[j] = hist[lane * kPerLane + j];
        lane_total += counts[j];
      }
      uint32_t at_or_above = lane_total;  // keys in this lane's bins and every higher lane's
#pragma unroll
      for (int d = 1; d < 32; d <<= 1) {
        const uint32_t higher = __shfl_down_sync(0xffffffffu, at_or_above, d);
        if (lane + d < 32) at_or_above += higher;
      }
      uint32_t above = at_or_above - lane_total;
      const uint32_t need = static_cast<uint32_t>(t.need);
      if (above < need && need <= at_or_above) {
        bool found = false;
#pragma unroll
        for (int j = kPerLane - 1; j >= 0; --j) {
          if (!found && above + counts[j] >= need) {
            found = true;
            const uint32_t digit = static_cast<uint32_t>(lane * kPerLane + j);
            sh.threshold.prefix = t.prefix | (digit << shift);
            sh.threshold.mask = t.mask | (static_cast<uint32_t>(kRadixBins - 1) << shift);
            sh.threshold.need = static_cast<int32_t>(need - above);
            sh.threshold.exact = counts[j] == need - above;
          }
          above += counts[j];
        }
      }
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) sh.histogram[(pass + 1) & 1][lane * kPerLane + j] = 0;
    }
    __syncthreads();
    t = sh.threshold;
    if (t.exact) break;
  }

  // Everything strictly above the threshold, and all of the threshold bin when it fits.
  for (int32_t id = tid; id < nblk; id += kSelectThreads) {
    const uint32_t key = candidate_key<kKeysInSmem>(id, scores, keys, chosen);
    if (key == kNotCandidate) continue;
    const uint32_t masked = key & t.mask;
    if (masked > t.prefix || (t.exact && masked == t.prefix)) {
      atomicOr(&chosen[id >> 5], 1u << (id & 31));
    }
  }
  if (!t.exact) {
    __syncthreads();  // the marks above are settled before the tie scan reads chosen bits
    // Exact ties on the full key: the lowest ids win, found by an ordered scan over
    // contiguous per-thread id ranges. The marking loop above set no bit of a tied key,
    // so the tied keys read the same here.
    const int32_t per_thread = (nblk + kSelectThreads - 1) / kSelectThreads;
    const int32_t first = min(tid * per_thread, nblk);
    const int32_t last = min(first + per_thread, nblk);
    int32_t tied = 0;
    for (int32_t id = first; id < last; ++id) {
      tied += candidate_key<kKeysInSmem>(id, scores, keys, chosen) == t.prefix;
    }
    int32_t before = 0;
    cub::BlockScan<int32_t, kSelectThreads>(sh.scan).ExclusiveSum(tied, before);
    for (int32_t id = first; id < last && before < t.need; ++id) {
      if (candidate_key<kKeysInSmem>(id, scores, keys, chosen) == t.prefix) {
        atomicOr(&chosen[id >> 5], 1u << (id & 31));
        ++before;
      }
    }
  }
  __syncthreads();
}

/// One CTA per (sequence, list). Shared memory: chosen bits [ceil(NB / 32)] then, with
/// kKeysInSmem, the keys [NB] of the pick in progress.
template <bool kKeysInSmem>
__global__ void __launch_bounds__(kSelectThreads, 1)
    select_blocks_kernel(const __grid_constant__ SelectBlocksParams p) {
  extern __shared__ uint32_t smem[];
  __shared__ SelectShared sh;
  const int32_t words_alloc = (p.num_blocks + 31) / 32;
  uint32_t* chosen = smem;
  uint32_t* keys = smem + words_alloc;
  const int tid = threadIdx.x;
  const int32_t list = blockIdx.x;
  const int32_t b = list / p.num_lists;
  const int32_t h = list % p.num_lists;

  // Lengths are clamped so a bad kv_lens entry never reads past a score row.
  const int64_t max_len = static_cast<int64_t>(p.num_blocks) * p.block_size;
  const int32_t kv_len = static_cast<int32_t>(
      min(max(static_cast<int64_t>(p.kv_lens[b]), int64_t{0}), max_len));
  const int32_t nblk = num_blocks_for(kv_len, p.block_size);
  const int32_t sink = sink_end(nblk, p.n_sink, p.block_size);
  const int32_t recent = max(recent_begin(kv_len, p.q_len, p.n_recent, p.block_size), sink);
  const int32_t forced = num_forced(nblk, sink, recent);
  const int32_t count = min(nblk, max(p.budget_blocks, forced));
  const int32_t rest = count - forced;
  const int32_t by_draft = draft_quota(rest, p.draft_share);

  const int32_t words = (nblk + 31) / 32;
  for (int32_t w = tid; w < words; w += kSelectThreads) {
    chosen[w] = id_range_bits(w * 32, 0, sink) | id_range_bits(w * 32, recent, nblk);
  }
  __syncthreads();

  const float* draft = p.draft_scores + b * p.draft_stride_b + h * p.draft_stride_h;
  const float* fill = p.target_scores == nullptr
                          ? draft
                          : p.target_scores + b * p.target_stride_b + h * p.target_stride_h;
  pick_top_blocks<kKeysInSmem>(draft, nblk, by_draft, keys, chosen, sh);
  pick_top_blocks<kKeysInSmem>(fill, nblk, rest - by_draft, keys, chosen, sh);

  // Ascending output: each thread compacts a contiguous run of words after a scan of counts.
  int32_t* out = p.block_ids + static_cast<int64_t>(list) * p.capacity;
  const int32_t per_thread = (words + kSelectThreads - 1) / kSelectThreads;
  const int32_t first = min(tid * per_thread, words);
  const int32_t last = min(first + per_thread, words);
  int32_t mine = 0;
  for (int32_t w = first; w < last; ++w) mine += __popc(chosen[w]);
  int32_t slot = 0;
  int32_t total = 0;
  cub::BlockScan<int32_t, kSelectThreads>(sh.scan).ExclusiveSum(mine, slot, total);
  for (int32_t w = first; w < last; ++w) {
    for (uint32_t bits = chosen[w]; bits != 0u; bits &= bits - 1u) {
      if (slot < p.capacity) out[slot] = w * 32 + __ffs(bits) - 1;
      ++slot;
    }
  }
  const int32_t written = min(total, p.capacity);
  for (int32_t s = written + tid; s < p.capacity; s += kSelectThreads) out[s] = -1;
  if (tid == 0) p.block_counts[list] = written;
}

/// Dynamic shared memory of select_blocks_kernel<kKeysInSmem> for `num_blocks` columns.
inline size_t select_blocks_smem_bytes(int32_t num_blocks, bool keys_in_smem) {
  const size_t words = (static_cast<size_t>(num_blocks) + 31) / 32;
  return sizeof(uint32_t) * (words + (keys_in_smem ? static_cast<size_t>(num_blocks) : 0));
}

}  // namespace dustin::detail
