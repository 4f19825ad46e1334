// SPDX-License-Identifier: Apache-2.0
// CPU twin of block_scores: exact two-pass softmax of retrieval-head queries, summed per block.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu_common.h"
#include "dustin/dustin.h"

namespace dustin::cpu {
namespace {

using detail::kv_row;
using detail::load_row;

/// Tokens whose keys are converted to float and scored together.
constexpr int32_t kTileTokens = 64;

bool valid_params(const BlockScoresParams& p) {
  const PagedKV& kv = p.kv;
  if (p.batch_size < 0 || p.num_queries < 1 || p.num_heads < 0 || p.num_blocks < 0 ||
      p.block_size < 1 || p.scores_stride_b < 0 || !std::isfinite(p.sm_scale)) {
    return false;
  }
  if (p.batch_size == 0 || p.num_heads == 0) return true;
  if (p.q == nullptr || p.head_map == nullptr || p.scores == nullptr ||
      !detail::valid_paged_kv(kv, /*needs_v=*/false, p.batch_size, p.num_queries)) {
    return false;
  }
  for (int32_t h = 0; h < p.num_heads; ++h) {
    if (p.head_map[h] < 0 || p.head_map[h] >= kv.num_kv_heads) return false;
  }
  for (int32_t b = 0; b < p.batch_size; ++b) {
    if (num_blocks_for(kv.kv_lens[b], p.block_size) > p.num_blocks) return false;
  }
  return true;
}

/// Scaled logits of every query row of sequence b against positions [0, kv_len):
/// logits[(h * n + i) * kv_len + pos]. Each key tile is converted once for all heads reading it.
void compute_logits(const BlockScoresParams& p, int32_t b, const std::vector<float>& queries,
                    std::vector<float>& logits) {
  const PagedKV& kv = p.kv;
  const int32_t kv_len = kv.kv_lens[b];
  const int32_t head_dim = kv.head_dim;
  const int32_t n = p.num_queries;
  const int32_t tiles = num_blocks_for(kv_len, kTileTokens);
  const int32_t* table = kv.block_table + b * kv.block_table_stride;
#pragma omp parallel
  {
    std::vector<float> kt(static_cast<size_t>(head_dim) * kTileTokens);  // [D, tile]
    std::vector<float> key(static_cast<size_t>(head_dim));
#pragma omp for collapse(2) schedule(dynamic, 4)
    for (int32_t kv_head = 0; kv_head < kv.num_kv_heads; ++kv_head) {
      for (int32_t tile = 0; tile < tiles; ++tile) {
        if (std::find(p.head_map, p.head_map + p.num_heads, kv_head) == p.head_map + p.num_heads) {
          continue;
        }
        const int32_t start = tile * kTileTokens;
        const int32_t count = std::min(kTileTokens, kv_len - start);
        for (int32_t c = 0; c < count; ++c) {
          const int32_t pos = start + c;
          load_row(kv_row(kv.k, kv, table[pos / kv.page_size], kv_head, pos % kv.page_size),
                   kv.dtype, head_dim, key.data());
          for (int32_t d = 0; d < head_dim; ++d)
            kt[static_cast<size_t>(d) * kTileTokens + c] = key[d];
        }
        for (int32_t h = 0; h < p.num_heads; ++h) {
          if (p.head_map[h] != kv_head) continue;
          for (int32_t i = 0; i < n; ++i) {
            const float* qrow = queries.data() + (static_cast<size_t>(h) * n + i) * head_dim;
            float* out = logits.data() + (static_cast<size_t>(h) * n + i) * kv_len + start;
            std::fill(out, out + count, 0.f);
            for (int32_t d = 0; d < head_dim; ++d) {
              const float qd = qrow[d];
              const float* krow = kt.data() + static_cast<size_t>(d) * kTileTokens;
              for (int32_t c = 0; c < count; ++c) out[c] += qd * krow[c];
            }
          }
        }
      }
    }
  }
}

}  // namespace

Status block_scores(const BlockScoresParams& p) {
  if (!valid_params(p)) return Status::kInvalidArgument;
  const PagedKV& kv = p.kv;
  const int32_t head_dim = kv.head_dim;
  const int32_t n = p.num_queries;
  const int32_t rows = p.num_heads * n;
  const size_t elem = detail::dtype_size(kv.dtype);

  std::vector<float> queries(static_cast<size_t>(rows) * head_dim);  // [Hs, n, D], scaled
  std::vector<float> logits;
  // One sequence at a time keeps the logits buffer at Hs * n * kv_len floats.
  for (int32_t b = 0; b < p.batch_size && rows > 0; ++b) {
    const int32_t kv_len = kv.kv_lens[b];
    for (int32_t h = 0; h < p.num_heads; ++h) {
      for (int32_t i = 0; i < n; ++i) {
        float* qrow = queries.data() + (static_cast<size_t>(h) * n + i) * head_dim;
        const int64_t offset = b * p.q_stride_b + i * p.q_stride_t + h * p.q_stride_h;
        load_row(static_cast<const char*>(p.q) + offset * static_cast<int64_t>(elem), kv.dtype,
                 head_dim, qrow);
        for (int32_t d = 0; d < head_dim; ++d) qrow[d] *= p.sm_scale;
      }
    }
    logits.resize(static_cast<size_t>(rows) * kv_len);
    compute_logits(p, b, queries, logits);

    // Two-pass softmax per row over its causal span [0, pos]: max, then exp and sum, then
    // normalise in place into probabilities.
#pragma omp parallel for schedule(static)
    for (int32_t r = 0; r < rows; ++r) {
      const int32_t visible = kv_len - n + r % n + 1;
      float* row = logits.data() + static_cast<size_t>(r) * kv_len;
      float row_max = -std::numeric_limits<float>::infinity();
      for (int32_t t = 0; t < visible; ++t) row_max = std::max(row_max, row[t]);
      float sum = 0.f;
      for (int32_t t = 0; t < visible; ++t) {
        row[t] = std::exp(row[t] - row_max);
        sum += row[t];
      }
      for (int32_t t = 0; t < visible; ++t) row[t] /= sum;
    }

    // Each score element is summed by one thread, heads then queries then positions in order.
    float* scores = p.scores + b * p.scores_stride_b;
    const int32_t nblk = num_blocks_for(kv_len, p.block_size);
#pragma omp parallel for schedule(static)
    for (int32_t blk = 0; blk < nblk; ++blk) {
      const int32_t start = blk * p.block_size;
      float total = 0.f;
      for (int32_t r = 0; r < rows; ++r) {
        const int32_t visible = kv_len - n + r % n + 1;
        const int32_t end = std::min(start + p.block_size, visible);
        const float* row = logits.data() + static_cast<size_t>(r) * kv_len;
        for (int32_t t = start; t < end; ++t) total += row[t];
      }
      scores[blk] += total;
    }
  }
  return Status::kOk;
}

}  // namespace dustin::cpu
