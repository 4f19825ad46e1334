// SPDX-License-Identifier: Apache-2.0
// BlockScoresParams: the contract of block_scores, shared by the CUDA kernel and its CPU twin.
#pragma once

#include <cstddef>
#include <cstdint>

#include "dustin/paged_kv.h"

namespace dustin {

/// Importance of context blocks from a few retrieval heads.
///
/// Query i of the n queries of sequence b sits at position kv_lens[b] - n + i. For each
/// retrieval head h (reading KV head head_map[h]) its softmax over positions 0..pos is
/// computed exactly and added, summed over queries and heads, into
///   scores[b, position / block_size]
/// (block_size is the selection block of the target, independent of the cache's page size).
/// Each score element is written by one thread in a fixed order, so results are deterministic.
struct BlockScoresParams {
  const void* q = nullptr;            ///< [B, n, Hs, D], dtype = kv.dtype, dim stride 1
  int64_t q_stride_b = 0;             ///< elements
  int64_t q_stride_t = 0;
  int64_t q_stride_h = 0;
  PagedKV kv;                         ///< kv.v is not read
  const int32_t* head_map = nullptr;  ///< [Hs] KV head read by each retrieval head
  float* scores = nullptr;            ///< [B, NB] float32, accumulated into
  int64_t scores_stride_b = 0;        ///< elements
  int32_t batch_size = 0;             ///< B
  int32_t num_queries = 0;            ///< n
  int32_t num_heads = 0;              ///< Hs
  int32_t num_blocks = 0;             ///< NB >= ceil(max kv_len / block_size)
  int32_t block_size = 0;             ///< tokens per score block
  float sm_scale = 0.f;
  void* workspace = nullptr;          ///< softmax statistics; see block_scores_workspace_bytes
  size_t workspace_bytes = 0;
};

}  // namespace dustin
