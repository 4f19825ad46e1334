// SPDX-License-Identifier: Apache-2.0
// CPU twin of select_blocks: forced sink/recent blocks, then draft picks, then target fill.
#include <algorithm>
#include <cmath>
#include <vector>

#include "dustin/dustin.h"

namespace dustin::cpu {
namespace {

bool valid_params(const SelectBlocksParams& p) {
  if (p.batch_size < 0 || p.num_lists < 1 || p.num_blocks < 0 || p.capacity < 0 || p.q_len < 1 ||
      p.block_size < 1 || p.budget_blocks < 0 || p.n_sink < 0 || p.n_recent < 0 ||
      !(p.draft_share >= 0.0 && p.draft_share <= 1.0)) {
    return false;
  }
  if (p.batch_size == 0) return true;
  if (p.draft_scores == nullptr || p.kv_lens == nullptr || p.block_ids == nullptr ||
      p.block_counts == nullptr) {
    return false;
  }
  for (int32_t b = 0; b < p.batch_size; ++b) {
    const int32_t kv_len = p.kv_lens[b];
    if (kv_len < p.q_len) return false;
    const int32_t nblk = num_blocks_for(kv_len, p.block_size);
    if (nblk > p.num_blocks) return false;
    const int32_t forced = num_forced(nblk, sink_end(nblk, p.n_sink, p.block_size),
                                      recent_begin(kv_len, p.q_len, p.n_recent, p.block_size));
    const int32_t count = std::min(nblk, std::max(p.budget_blocks, forced));
    if (count > p.capacity) return false;
  }
  return true;
}

/// Ranking of docs/ops.md: score descending, ties toward the lower id, NaN below every number.
/// A strict total order, so the selection does not depend on the sort algorithm.
struct RanksBefore {
  const float* score;
  bool operator()(int32_t a, int32_t b) const {
    const float sa = score[a];
    const float sb = score[b];
    const bool nan_a = std::isnan(sa);
    const bool nan_b = std::isnan(sb);
    if (nan_a != nan_b) return nan_b;
    if (!nan_a && sa != sb) return sa > sb;
    return a < b;
  }
};

/// Moves the best `k` of candidates[first, end) by `score` to [first, first + k).
void take_top(std::vector<int32_t>& candidates, size_t first, int32_t k, const float* score) {
  auto begin = candidates.begin() + static_cast<std::ptrdiff_t>(first);
  if (k <= 0 || begin == candidates.end()) return;
  auto kth = begin + std::min<std::ptrdiff_t>(k, candidates.end() - begin);
  std::nth_element(begin, kth - 1, candidates.end(), RanksBefore{score});
}

/// Fills one list: ids ascending in out[0, count), -1 in out[count, capacity).
void select_list(const SelectBlocksParams& p, int32_t kv_len, const float* draft,
                 const float* target, std::vector<int32_t>& candidates, int32_t* out,
                 int32_t* count_out) {
  const int32_t nblk = num_blocks_for(kv_len, p.block_size);
  const int32_t sink = sink_end(nblk, p.n_sink, p.block_size);
  const int32_t recent = std::max(recent_begin(kv_len, p.q_len, p.n_recent, p.block_size), sink);
  const int32_t forced = num_forced(nblk, sink, recent);
  const int32_t count = std::min(nblk, std::max(p.budget_blocks, forced));
  const int32_t rest = count - forced;
  const int32_t by_draft = draft_quota(rest, p.draft_share);

  // Free blocks [sink, recent): the best by_draft by draft score first, then the best of the
  // others by target score (draft score without a target) until rest are chosen.
  candidates.clear();
  for (int32_t blk = sink; blk < recent; ++blk) candidates.push_back(blk);
  take_top(candidates, 0, by_draft, draft);
  take_top(candidates, static_cast<size_t>(by_draft), rest - by_draft,
           target != nullptr ? target : draft);

  int32_t n = 0;
  for (int32_t blk = 0; blk < sink; ++blk) out[n++] = blk;
  for (int32_t j = 0; j < rest; ++j) out[n++] = candidates[j];
  for (int32_t blk = recent; blk < nblk; ++blk) out[n++] = blk;
  std::sort(out, out + n);
  std::fill(out + n, out + p.capacity, -1);
  *count_out = n;
}

}  // namespace

Status select_blocks(const SelectBlocksParams& p) {
  if (!valid_params(p)) return Status::kInvalidArgument;
  const int32_t lists = p.batch_size * p.num_lists;
#pragma omp parallel
  {
    std::vector<int32_t> candidates;
#pragma omp for schedule(dynamic, 1)
    for (int32_t list = 0; list < lists; ++list) {
      const int32_t b = list / p.num_lists;
      const int32_t h = list % p.num_lists;
      const float* draft = p.draft_scores + b * p.draft_stride_b + h * p.draft_stride_h;
      const float* target = p.target_scores == nullptr
                                ? nullptr
                                : p.target_scores + b * p.target_stride_b + h * p.target_stride_h;
      select_list(p, p.kv_lens[b], draft, target, candidates,
                  p.block_ids + static_cast<int64_t>(list) * p.capacity, p.block_counts + list);
    }
  }
  return Status::kOk;
}

}  // namespace dustin::cpu
