// SPDX-License-Identifier: Apache-2.0
// SelectBlocksParams and the selection rules shared by the CUDA kernel and its CPU twin.
#pragma once

#include <cstdint>

#include "dustin/paged_kv.h"

namespace dustin {

/// Budgeted block selection (design.md section 1, step 3), one list per (sequence, list).
///
/// For a sequence of kv_len tokens (the q_len window included) with nblk = ceil(kv_len / bs):
///  1. forced: blocks holding the first n_sink tokens, and blocks holding the last
///     n_recent + q_len tokens (the recent context and the window);
///  2. count = min(nblk, max(budget_blocks, forced)); rest = count - forced;
///  3. the top draft_quota(rest, draft_share) non-forced blocks by draft score;
///  4. the top remaining non-forced, non-picked blocks by target score (by draft score when
///     target_scores is null) until count is reached.
/// Ranking is by score descending, ties toward the lower id; NaN ranks below every number.
/// Output ids are ascending; slots past count are -1.
struct SelectBlocksParams {
  const float* draft_scores = nullptr;   ///< [B, H, NB]
  const float* target_scores = nullptr;  ///< [B, H, NB] or null
  int64_t draft_stride_b = 0;            ///< elements
  int64_t draft_stride_h = 0;
  int64_t target_stride_b = 0;
  int64_t target_stride_h = 0;
  const int32_t* kv_lens = nullptr;      ///< [B]
  int32_t* block_ids = nullptr;          ///< [B, H, K] contiguous
  int32_t* block_counts = nullptr;       ///< [B, H] contiguous
  int32_t batch_size = 0;                ///< B
  int32_t num_lists = 0;                 ///< H: 1 per sequence, or Hkv per KV head
  int32_t num_blocks = 0;                ///< NB, columns of the score tensors
  int32_t capacity = 0;                  ///< K = select_capacity(...)
  int32_t q_len = 0;
  int32_t block_size = 0;
  int32_t budget_blocks = 0;
  int32_t n_sink = 0;                    ///< tokens
  int32_t n_recent = 0;                  ///< tokens, before the window
  double draft_share = 0.0;              ///< in [0, 1]
};

/// Blocks covered by the forced sink prefix: [0, sink_end).
DUSTIN_HOST_DEVICE int32_t sink_end(int32_t nblk, int32_t n_sink, int32_t block_size) {
  const int32_t s = num_blocks_for(n_sink, block_size);
  return s < nblk ? s : nblk;
}

/// First block of the forced recent suffix [recent_begin, nblk).
DUSTIN_HOST_DEVICE int32_t recent_begin(int32_t kv_len, int32_t q_len, int32_t n_recent,
                                        int32_t block_size) {
  const int32_t first = kv_len - q_len - n_recent;
  return (first > 0 ? first : 0) / block_size;
}

/// Number of forced blocks of one list.
DUSTIN_HOST_DEVICE int32_t num_forced(int32_t nblk, int32_t sink_end_, int32_t recent_begin_) {
  const int32_t tail_from = recent_begin_ > sink_end_ ? recent_begin_ : sink_end_;
  return sink_end_ + (nblk > tail_from ? nblk - tail_from : 0);
}

/// Blocks picked by draft score out of `rest` free slots. Double math on host and device
/// keeps CPU and CUDA selections bit-identical.
DUSTIN_HOST_DEVICE int32_t draft_quota(int32_t rest, double draft_share) {
  return static_cast<int32_t>(static_cast<double>(rest) * draft_share);
}

/// Capacity K of each output list: enough for the budget and for the most blocks the forced
/// spans can touch (a span of L tokens touches at most ceil((L - 1) / bs) + 1 blocks).
DUSTIN_HOST_DEVICE int32_t select_capacity(int32_t num_blocks, int32_t budget_blocks,
                                           int32_t n_sink, int32_t n_recent, int32_t q_len,
                                           int32_t block_size) {
  const int32_t forced_max = num_blocks_for(n_sink, block_size) +
                             num_blocks_for(n_recent + q_len - 1, block_size) + 1;
  const int32_t k = budget_blocks > forced_max ? budget_blocks : forced_max;
  return k < num_blocks ? k : num_blocks;
}

}  // namespace dustin
