// SPDX-License-Identifier: Apache-2.0
// select_blocks kernel: one CTA per list, radix select over order-preserving keys of the scores.
#pragma once

#include <cub/block/block_scan.cuh>

#include <cstdint>

#include "dustin/dependent_launch.cuh"
#include "dustin/select_blocks_params.h"

namespace dustin::detail {

/// Threads per list: 16 warps keep each radix pass short for NB of a few thousand.
inline constexpr int kSelectThreads = 512;
/// Largest NB whose draft and target rows are staged in shared memory (2 x 64 KB); longer
/// lists are read from global memory (L2) on every pass.
inline constexpr int kSelectSmemBlocks = 16384;
/// Radix digits of up to 11 bits, taken from the highest bit where the candidates' keys differ
/// down (bits above it are common to all): scores of one row usually share their sign and most
/// of their exponent, so fixed digits from bit 31 would spend a whole pass on those. A pick
/// stops once the boundary bin holds exactly the blocks still needed or few enough for one
/// warp to sort (kWarpFinishMax), which for a few thousand scores is usually the first pass.
inline constexpr int kRadixDigitBits = 11;
inline constexpr int kRadixBins = 1 << kRadixDigitBits;
inline constexpr int kSelectWarps = kSelectThreads / 32;
inline constexpr int kBinsPerThread = kRadixBins / kSelectThreads;
/// Scores each thread reads before it updates the histogram: independent loads in flight
/// (from L2 on the global-row path).
inline constexpr int kSelectUnroll = 8;
/// Key of a block that is not a candidate (forced, already picked, or past the sequence).
inline constexpr uint32_t kNotCandidate = 0;
/// Key of a NaN score: below every number, above non-candidates.
inline constexpr uint32_t kNanKey = 1;
static_assert(kRadixBins % kSelectThreads == 0, "each thread owns whole bins");

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
/// of the `in_bin` equal to it, all are in when `exact`, else the `need` best.
struct RadixThreshold {
  uint32_t prefix;
  uint32_t mask;
  int32_t need;
  int32_t exact;
  int32_t in_bin;
};

/// OR and AND of the rank keys of a set of candidates: the bits above the highest bit where
/// they differ are common to all of them (and to any subset).
struct KeyBits {
  uint32_t any = 0u;
  uint32_t all = ~0u;
  __device__ __forceinline__ void add(uint32_t key) {
    any |= key;
    all &= key;
  }
  /// Low bits the radix digits must cover (0: every candidate has the same key).
  __device__ __forceinline__ int open_bits() const {
    const uint32_t differ = any ^ all;
    return differ == 0u ? 0 : 32 - __clz(differ);
  }
};

/// The next radix digit when the low `open_bits` bits of the candidates' keys are undecided
/// (the bits above are shared by all of them): the highest kRadixDigitBits of those bits, or
/// all of them when fewer remain. A pick's first digit is RadixDigit(bits.open_bits()).
struct RadixDigit {
  int shift;
  uint32_t digit_mask;
  __device__ __forceinline__ explicit RadixDigit(int open_bits)
      : shift(open_bits > kRadixDigitBits ? open_bits - kRadixDigitBits : 0),
        digit_mask(open_bits == 0 ? 0u : (1u << (open_bits - shift)) - 1u) {}
  __device__ __forceinline__ uint32_t bin(uint32_t key) const {
    return (key >> shift) & digit_mask;
  }
};

/// A boundary bin this small is finished by one warp ranking its candidates (key, then id)
/// instead of by more radix passes: each pass costs a few block-wide barriers.
inline constexpr int kWarpFinishMax = 32;

/// Warp-scan block scans: one barrier each (the default raking scan takes two and a serial
/// warp pass).
using SelectScan = cub::BlockScan<int32_t, kSelectThreads, cub::BLOCK_SCAN_WARP_SCANS>;

struct SelectShared {
  uint32_t first_histogram[2][kRadixBins];  // both picks' first digit, counted in one sweep
  uint32_t histogram[2][kRadixBins];        // later passes, alternating; each clears the next
  KeyBits key_bits[kSelectWarps][2];        // per warp: draft and fill candidates' key bits
  uint32_t boundary_key[kWarpFinishMax];    // the boundary bin's candidates, in any order
  int32_t boundary_id[kWarpFinishMax];
  int32_t boundary_count;
  RadixThreshold threshold;
  typename SelectScan::TempStorage scan;
};

/// Rank key of block `id` as a candidate of the pick in progress, or kNotCandidate.
__device__ __forceinline__ uint32_t candidate_key(int32_t id, const float* scores,
                                                  const uint32_t* chosen) {
  if ((chosen[id >> 5] >> (id & 31)) & 1u) return kNotCandidate;
  return score_rank_key(scores[id]);
}

/// Adds the counted lanes' keys to their bins. Warp-collective (all lanes, same trip counts):
/// the bin of the first counted lane takes one atomic for all lanes that share it, since
/// scores cluster in a few bins where plain shared atomics would serialise (ballots are cheap,
/// __match_any_sync is not); the other lanes add one each.
__device__ __forceinline__ void count_in_bin(uint32_t* hist, bool counted, uint32_t bin) {
  const uint32_t counted_lanes = __ballot_sync(0xffffffffu, counted);
  if (counted_lanes == 0u) return;
  const int lane = threadIdx.x & 31;
  const int leader = __ffs(counted_lanes) - 1;
  const uint32_t leader_bin = __shfl_sync(0xffffffffu, bin, leader);
  const uint32_t sharing = __ballot_sync(0xffffffffu, counted && bin == leader_bin);
  if (lane == leader) {
    atomicAdd(&hist[leader_bin], __popc(sharing));
  } else if (counted && bin != leader_bin) {
    atomicAdd(&hist[bin], 1u);
  }
}

/// The first radix pass of both picks in one sweep over the blocks not yet chosen (sinks and
/// recent blocks are): the draft keys' first digits into sh.first_histogram[0], the fill keys'
/// into [1]. The fill pick's candidates are these less the draft pick's, which that pick
/// takes out of [1] as it marks them (LaterPick). The histograms must be zero on entry; the
/// caller's next barrier publishes them.
__device__ __forceinline__ void count_first_digits(const float* __restrict__ draft,
                                                   const float* __restrict__ fill, int32_t nblk,
                                                   RadixDigit draft_digit, RadixDigit fill_digit,
                                                   const uint32_t* chosen, SelectShared& sh) {
  const int tid = threadIdx.x;
  for (int32_t base = 0; base < nblk; base += kSelectThreads * kSelectUnroll) {
    // Rounds with no id left for any thread are skipped (uniform across the CTA).
    const int rounds = min(kSelectUnroll, (nblk - base + kSelectThreads - 1) / kSelectThreads);
    uint32_t draft_key[kSelectUnroll];
    uint32_t fill_key[kSelectUnroll];
#pragma unroll
    for (int u = 0; u < kSelectUnroll; ++u) {
      const int32_t id = base + u * kSelectThreads + tid;
      const bool candidate = id < nblk && !((chosen[id >> 5] >> (id & 31)) & 1u);
      draft_key[u] = candidate ? score_rank_key(draft[id]) : kNotCandidate;
      fill_key[u] = candidate ? score_rank_key(fill[id]) : kNotCandidate;
    }
#pragma unroll
    for (int u = 0; u < kSelectUnroll; ++u) {
      if (u >= rounds) break;
      const bool counted = draft_key[u] != kNotCandidate;
      count_in_bin(sh.first_histogram[0], counted, draft_digit.bin(draft_key[u]));
      count_in_bin(sh.first_histogram[1], counted, fill_digit.bin(fill_key[u]));
    }
  }
}

/// The fill pick, still to come, as seen by the draft pick: every block the draft pick marks
/// leaves the fill pick's candidates, so its first-digit count is taken back.
struct LaterPick {
  const float* scores;
  uint32_t* first_histogram;
  RadixDigit digit;
  __device__ __forceinline__ void remove(int32_t id) const {
    atomicSub(&first_histogram[digit.bin(score_rank_key(scores[id]))], 1u);
  }
};

/// Marks in `chosen` the best `k` not-yet-chosen blocks of [0, nblk) by `scores` (score
/// descending, ties to the lower id, NaN last); `scores` is a shared-memory copy or the global
/// row; `bits` covers at least the candidates (not-yet-chosen blocks) and `first_histogram`
/// holds their first digits (count_first_digits, RadixDigit(bits.open_bits())). `later`, if
/// not null, is told of every block marked. k must not exceed the number of candidates. Ends
/// with a barrier; the whole CTA calls it with the same arguments.
__device__ __forceinline__ void pick_top_blocks(const float* __restrict__ scores, int32_t nblk,
                                                int32_t k, KeyBits bits,
                                                const uint32_t* first_histogram,
                                                const LaterPick* later, uint32_t* chosen,
                                                SelectShared& sh) {
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  if (k <= 0) return;
  if (tid == 0) sh.boundary_count = 0;  // read after this pick's first barrier
  const auto mark = [&](int32_t id) {
    atomicOr(&chosen[id >> 5], 1u << (id & 31));
    if (later != nullptr) later->remove(id);
  };

  // The first digit starts below the bits every candidate shares. With no differing bit all
  // candidates tie: the tie scan below picks the lowest ids.
  int open_bits = bits.open_bits();
  const uint32_t common = open_bits == 32 ? 0u : ~((1u << open_bits) - 1u);
  RadixThreshold t{bits.all & common, common, k, 0, 0};
  int pass = 0;
  bool settled = false;  // the last pass broke out: exact, or a boundary bin for one warp
#pragma unroll 1
  for (; open_bits > 0; ++pass) {
    const RadixDigit radix(open_bits);
    open_bits = radix.shift;
    // Pass 0's histogram was counted with the other pick's (count_first_digits).
    const uint32_t* hist = first_histogram;
    if (pass > 0) {
      uint32_t* counted_hist = sh.histogram[pass & 1];
      hist = counted_hist;
      for (int32_t base = 0; base < nblk; base += kSelectThreads * kSelectUnroll) {
        const int rounds = min(kSelectUnroll, (nblk - base + kSelectThreads - 1) / kSelectThreads);
        uint32_t key[kSelectUnroll];
#pragma unroll
        for (int u = 0; u < kSelectUnroll; ++u) {
          const int32_t id = base + u * kSelectThreads + tid;
          key[u] = id < nblk ? candidate_key(id, scores, chosen) : kNotCandidate;
        }
#pragma unroll
        for (int u = 0; u < kSelectUnroll; ++u) {
          if (u >= rounds) break;
          const bool counted = key[u] != kNotCandidate && (key[u] & t.mask) == t.prefix;
          count_in_bin(counted_hist, counted, radix.bin(key[u]));
        }
      }
      __syncthreads();
    }
    // Thread i owns the kBinsPerThread bins below kRadixBins - kBinsPerThread * i: a scan over
    // threads counts the keys in higher bins, and the owner of the need-th writes. The bins of
    // digits narrower than kRadixDigitBits are the low ones; the rest count zero.
    uint32_t counts[kBinsPerThread];
    int32_t mine = 0;
#pragma unroll
    for (int j = 0; j < kBinsPerThread; ++j) {
      counts[j] = hist[kRadixBins - 1 - (tid * kBinsPerThread + j)];
      mine += static_cast<int32_t>(counts[j]);
      sh.histogram[(pass + 1) & 1][tid * kBinsPerThread + j] = 0;  // the next pass's buffer
    }
    int32_t above = 0;
    SelectScan(sh.scan).ExclusiveSum(mine, above);
    if (above < t.need && t.need <= above + mine) {
      bool found = false;
#pragma unroll
      for (int j = 0; j < kBinsPerThread; ++j) {
        const int32_t c = static_cast<int32_t>(counts[j]);
        if (!found && above + c >= t.need) {
          found = true;
          const uint32_t digit = static_cast<uint32_t>(kRadixBins - 1 - (tid * kBinsPerThread + j));
          sh.threshold.prefix = t.prefix | (digit << radix.shift);
          sh.threshold.mask = t.mask | (radix.digit_mask << radix.shift);
          sh.threshold.need = t.need - above;
          sh.threshold.exact = c == t.need - above;
          sh.threshold.in_bin = c;
        }
        above += c;
      }
    }
    __syncthreads();
    t = sh.threshold;
    if (t.exact || t.in_bin <= kWarpFinishMax) {
      settled = true;
      break;
    }
  }

  // Everything strictly above the threshold, and all of the threshold bin when it fits; a
  // small boundary bin is gathered for one warp to finish.
  const bool warp_finish = settled && !t.exact;
  for (int32_t id = tid; id < nblk; id += kSelectThreads) {
    const uint32_t key = candidate_key(id, scores, chosen);
    if (key == kNotCandidate) continue;
    const uint32_t masked = key & t.mask;
    if (masked > t.prefix || (t.exact && masked == t.prefix)) {
      mark(id);
    } else if (warp_finish && masked == t.prefix) {
      const int32_t slot = atomicAdd(&sh.boundary_count, 1);
      sh.boundary_key[slot] = key;
      sh.boundary_id[slot] = id;
    }
  }
  if (warp_finish) {
    __syncthreads();  // the boundary bin is gathered
    if (tid < 32) {
      // Each lane ranks its candidate against the whole bin (broadcast reads, independent of
      // each other): better = larger key, then lower id; ids are unique.
      const bool have = lane < t.in_bin;
      const uint32_t key = have ? sh.boundary_key[lane] : kNotCandidate;
      const int32_t id = have ? sh.boundary_id[lane] : INT32_MAX;
      int32_t better = 0;
#pragma unroll 8
      for (int j = 0; j < t.in_bin; ++j) {
        const uint32_t other_key = sh.boundary_key[j];
        const int32_t other_id = sh.boundary_id[j];
        better += other_key > key || (other_key == key && other_id < id);
      }
      if (have && better < t.need) mark(id);
    }
  } else if (!t.exact) {
    __syncthreads();  // the marks above are settled before the tie scan reads chosen bits
    // Exact ties on the full key: the lowest ids win, found by an ordered scan over
    // contiguous per-thread id ranges. The marks above set no bit of a tied block.
    const int32_t per_thread = (nblk + kSelectThreads - 1) / kSelectThreads;
    const int32_t first = min(tid * per_thread, nblk);
    const int32_t last = min(first + per_thread, nblk);
    int32_t tied = 0;
    for (int32_t id = first; id < last; ++id) tied += candidate_key(id, scores, chosen) == t.prefix;
    int32_t before = 0;
    SelectScan(sh.scan).ExclusiveSum(tied, before);
    for (int32_t id = first; id < last && before < t.need; ++id) {
      if (candidate_key(id, scores, chosen) == t.prefix) {
        mark(id);
        ++before;
      }
    }
  }
  __syncthreads();
}

/// Asynchronous 4-byte global->shared copy (sm_80+): the score rows stream in while the
/// CTA reads kv_lens and marks the forced blocks.
__device__ __forceinline__ void cp_async_4(float* dst, const float* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(
                   static_cast<uint32_t>(__cvta_generic_to_shared(dst))),
               "l"(src));
}

/// One CTA per (sequence, list). Shared memory: chosen bits [ceil(NB / 32)], then with
/// kStaged the draft row [NB] and the fill row [NB] (target, or draft again without one).
/// kCtasPerSm: 1 lets the compiler use up to 128 registers (fastest when every list has an
/// SM); 2 caps them at 64 so two CTAs share an SM when there are more lists than SMs.
template <bool kStaged, int kCtasPerSm>
__global__ void __launch_bounds__(kSelectThreads, kCtasPerSm)
    select_blocks_kernel(const __grid_constant__ SelectBlocksParams p) {
  extern __shared__ __align__(16) uint32_t smem[];
  __shared__ SelectShared sh;
  const int32_t words_alloc = (p.num_blocks + 31) / 32;
  uint32_t* chosen = smem;
  const int tid = threadIdx.x;
  const int32_t list = blockIdx.x;
  const int32_t b = list / p.num_lists;
  const int32_t h = list % p.num_lists;

  // Launched as a programmatic dependent on Hopper (csrc/select_blocks.cu): the scores and
  // lengths come from the grid before, and the next grid may be scheduled now.
  wait_for_preceding_grid();
  allow_dependent_launch();

  const float* draft = p.draft_scores + b * p.draft_stride_b + h * p.draft_stride_h;
  const float* fill = p.target_scores == nullptr
                          ? draft
                          : p.target_scores + b * p.target_stride_b + h * p.target_stride_h;
  if constexpr (kStaged) {
    float* s_draft = reinterpret_cast<float*>(smem + words_alloc);
    float* s_fill = s_draft + p.num_blocks;
    for (int32_t id = tid; id < p.num_blocks; id += kSelectThreads) {
      cp_async_4(s_draft + id, draft + id);
      if (p.target_scores != nullptr) cp_async_4(s_fill + id, fill + id);
    }
    asm volatile("cp.async.commit_group;\n");
    draft = s_draft;
    fill = p.target_scores == nullptr ? s_draft : s_fill;
  }

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
  if (rest > 0) {
    for (int i = tid; i < kRadixBins; i += kSelectThreads) {
      sh.first_histogram[0][i] = 0;
      sh.first_histogram[1][i] = 0;
    }
  }
  if constexpr (kStaged) asm volatile("cp.async.wait_all;\n" ::: "memory");
  // Key bits of both picks' candidates, from the rows this thread staged itself (so before the
  // barrier): the blocks not forced. The fill pick's candidates are a subset (the draft pick
  // takes some), which the bits still cover.
  KeyBits bits[2];
  for (int32_t id = tid; id < nblk; id += kSelectThreads) {
    if (id < sink || id >= recent) continue;
    bits[0].add(score_rank_key(draft[id]));
    bits[1].add(score_rank_key(fill[id]));
  }
  const int lane = tid & 31;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    bits[i].any = __reduce_or_sync(0xffffffffu, bits[i].any);
    bits[i].all = __reduce_and_sync(0xffffffffu, bits[i].all);
    if (lane == 0) sh.key_bits[tid >> 5][i] = bits[i];
  }
  __syncthreads();
#pragma unroll
  for (int w = 0; w < kSelectWarps; ++w) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      bits[i].any |= sh.key_bits[w][i].any;
      bits[i].all &= sh.key_bits[w][i].all;
    }
  }

  // One sweep counts both picks' first digits; the draft pick then takes its marks out of the
  // fill pick's count, so the fill pick starts at its first scan.
  if (rest > 0) {  // the same for the whole CTA
    const RadixDigit fill_digit(bits[1].open_bits());
    count_first_digits(draft, fill, nblk, RadixDigit(bits[0].open_bits()), fill_digit, chosen,
                       sh);
    __syncthreads();
    const LaterPick fill_pick{fill, sh.first_histogram[1], fill_digit};
    pick_top_blocks(draft, nblk, by_draft, bits[0], sh.first_histogram[0], &fill_pick, chosen,
                    sh);
    pick_top_blocks(fill, nblk, rest - by_draft, bits[1], sh.first_histogram[1], nullptr,
                    chosen, sh);
  }

  // Ascending output: each thread compacts a contiguous run of words after a scan of counts.
  int32_t* out = p.block_ids + static_cast<int64_t>(list) * p.capacity;
  const int32_t per_thread = (words + kSelectThreads - 1) / kSelectThreads;
  const int32_t first = min(tid * per_thread, words);
  const int32_t last = min(first + per_thread, words);
  int32_t mine = 0;
  for (int32_t w = first; w < last; ++w) mine += __popc(chosen[w]);
  int32_t slot = 0;
  int32_t total = 0;
  SelectScan(sh.scan).ExclusiveSum(mine, slot, total);
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

/// Dynamic shared memory of select_blocks_kernel<kStaged, *> for `num_blocks` columns.
inline size_t select_blocks_smem_bytes(int32_t num_blocks, bool staged) {
  const size_t words = (static_cast<size_t>(num_blocks) + 31) / 32;
  return sizeof(uint32_t) * (words + (staged ? 2 * static_cast<size_t>(num_blocks) : 0));
}

}  // namespace dustin::detail
