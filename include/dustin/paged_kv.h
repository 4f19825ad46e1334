// SPDX-License-Identifier: Apache-2.0
// PagedKV: the view of one layer's paged KV cache that every op reads through.
#pragma once

#include <cstdint>

#include "dustin/types.h"

namespace dustin {

/// One layer's paged KV cache plus the block tables of the batch.
/// Logical page i of sequence b lives in physical page block_table[b * block_table_stride + i];
/// token t of that page, KV head h, starts at
///   page * page_stride + h * head_stride + t * token_stride   (elements; dim stride is 1).
/// The strides encode the layout, so NHD and HND differ only in their values; `layout` lets
/// kernels pick the path specialised for contiguous (page, head) tiles.
struct PagedKV {
  const void* k = nullptr;              ///< [num_pages, P, Hkv, D] or [num_pages, Hkv, P, D]
  const void* v = nullptr;              ///< same shape and strides as k (unused by block_scores)
  const int32_t* block_table = nullptr; ///< [B, max_pages] physical page ids
  const int32_t* kv_lens = nullptr;     ///< [B] tokens in the cache, the new window included
  int64_t page_stride = 0;              ///< elements between pages
  int64_t head_stride = 0;              ///< elements between KV heads
  int64_t token_stride = 0;             ///< elements between tokens of a page
  int64_t block_table_stride = 0;       ///< elements between rows of block_table
  int32_t num_pages = 0;                ///< physical pages in the pool
  int32_t page_size = 0;                ///< P, tokens per page (1..128)
  int32_t num_kv_heads = 0;             ///< Hkv
  int32_t head_dim = 0;                 ///< D
  int32_t max_pages = 0;                ///< columns of block_table
  KvLayout layout = KvLayout::kHND;
  DType dtype = DType::kBFloat16;       ///< element type of k and v
};

/// Number of blocks of `block_size` tokens that hold `len` tokens.
DUSTIN_HOST_DEVICE int32_t num_blocks_for(int32_t len, int32_t block_size) {
  return (len + block_size - 1) / block_size;
}

}  // namespace dustin
