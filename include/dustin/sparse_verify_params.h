// SPDX-License-Identifier: Apache-2.0
// SparseVerifyParams: the contract of sparse_verify, shared by the CUDA kernel and its CPU twin.
#pragma once

#include <cstddef>
#include <cstdint>

#include "dustin/paged_kv.h"

namespace dustin {

/// Attention of a verification window over a selected set of KV blocks (block = page).
///
/// Query token i of sequence b sits at absolute position kv_lens[b] - q_len + i and attends,
/// causally, to every token of
///   { listed blocks with id <  first_window_block }  U  { first_window_block .. last block },
/// where first_window_block = (kv_lens[b] - q_len) / P. Listed ids at or past the window are
/// therefore harmless, and an empty list gives attention over the window's blocks alone.
/// List s of sequence b is block_ids[b, s, 0 : block_counts[b, s]], ascending and unique;
/// with num_lists == 1 it serves every KV head, with num_lists == Hkv KV head h reads list h.
struct SparseVerifyParams {
  const void* q = nullptr;             ///< [B, q, Hq, D], dtype = kv.dtype, dim stride 1
  int64_t q_stride_b = 0;              ///< elements
  int64_t q_stride_t = 0;
  int64_t q_stride_h = 0;
  void* out = nullptr;                 ///< [B, q, Hq, D] contiguous, dtype = kv.dtype
  float* lse = nullptr;                ///< [B, q, Hq] contiguous, natural-log sum of exp(scores)
  PagedKV kv;
  const int32_t* block_ids = nullptr;  ///< [B, num_lists, K] logical block ids
  const int32_t* block_counts = nullptr;  ///< [B, num_lists] valid ids per list (0..K)
  int64_t block_ids_stride_b = 0;      ///< elements
  int64_t block_ids_stride_s = 0;
  int64_t block_counts_stride_b = 0;
  int32_t batch_size = 0;              ///< B
  int32_t q_len = 0;                   ///< q, query tokens per sequence (1..16 on CUDA)
  int32_t num_qo_heads = 0;            ///< Hq, a multiple of Hkv
  int32_t num_lists = 0;               ///< 1 (shared) or Hkv (one list per KV head)
  int32_t max_blocks = 0;              ///< K, capacity of each list
  float sm_scale = 0.f;                ///< softmax scale applied to q.k
  void* workspace = nullptr;           ///< split-KV partials; may be null (then no split)
  size_t workspace_bytes = 0;
};

/// First logical block that holds a token of the query window of a sequence of `kv_len`.
DUSTIN_HOST_DEVICE int32_t first_window_block(int32_t kv_len, int32_t q_len, int32_t page_size) {
  return (kv_len - q_len) / page_size;
}

}  // namespace dustin
