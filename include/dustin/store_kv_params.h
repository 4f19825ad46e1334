// SPDX-License-Identifier: Apache-2.0
// StoreKVParams: the contract of store_kv, shared by the CUDA kernel and its CPU twin.
#pragma once

#include <cstdint>

#include "dustin/types.h"

namespace dustin {

/// Element type of the `pages` and `slots` index tensors.
enum class IndexType : int32_t { kInt32 = 0, kInt64 = 1 };

/// Writes a window's keys and values into one layer's paged KV cache:
///   k_cache[pages[i], head, slots[i], :] = k[i, head, :]   (HND; NHD swaps slot and head)
/// and the same for v, for every token i < N and KV head. The cache strides encode the layout,
/// so the kernel and the twin never branch on it. Entries whose page is outside [0, num_pages)
/// or whose slot is outside [0, P) are skipped by the kernel (the CPU twin rejects them); which
/// of two entries naming the same (page, slot) lands is unspecified.
struct StoreKVParams {
  const void* k = nullptr;  ///< [N, Hkv, D], dtype, dim stride 1
  const void* v = nullptr;  ///< [N, Hkv, D], dtype, dim stride 1
  int64_t k_stride_n = 0;   ///< elements between tokens of k
  int64_t k_stride_h = 0;   ///< elements between heads of k
  int64_t v_stride_n = 0;
  int64_t v_stride_h = 0;
  void* k_cache = nullptr;      ///< [num_pages, Hkv, P, D] (HND) or [num_pages, P, Hkv, D]
  void* v_cache = nullptr;      ///< same shape and strides as k_cache
  int64_t page_stride = 0;      ///< elements between pages (both caches)
  int64_t head_stride = 0;      ///< elements between KV heads of a page
  int64_t token_stride = 0;     ///< elements between slots of a page
  const void* pages = nullptr;  ///< [N] physical page of each token, index_type
  const void* slots = nullptr;  ///< [N] slot in its page of each token, index_type
  int64_t pages_stride = 0;     ///< elements
  int64_t slots_stride = 0;     ///< elements
  IndexType index_type = IndexType::kInt64;
  int32_t num_tokens = 0;          ///< N
  int32_t num_kv_heads = 0;        ///< Hkv
  int32_t head_dim = 0;            ///< D
  int32_t num_pages = 0;           ///< pages in the pool
  int32_t page_size = 0;           ///< P
  DType dtype = DType::kBFloat16;  ///< element type of k, v and both caches
};

/// True when token i's (page, slot) is a place in the cache; the others are skipped.
DUSTIN_HOST_DEVICE bool store_kv_in_range(int64_t page, int64_t slot, int32_t num_pages,
                                          int32_t page_size) {
  return page >= 0 && page < num_pages && slot >= 0 && slot < page_size;
}

/// The metadata rules both implementations check (no tensor values read).
inline bool store_kv_valid_shape(const StoreKVParams& p) {
  const bool known_dtype =
      p.dtype == DType::kFloat32 || p.dtype == DType::kFloat16 || p.dtype == DType::kBFloat16;
  const bool known_index = p.index_type == IndexType::kInt32 || p.index_type == IndexType::kInt64;
  if (!known_dtype || !known_index || p.num_tokens < 0 || p.num_kv_heads < 1 || p.head_dim < 1 ||
      p.num_pages < 0 || p.page_size < 1) {
    return false;
  }
  return p.num_tokens == 0 || (p.k != nullptr && p.v != nullptr && p.k_cache != nullptr &&
                               p.v_cache != nullptr && p.pages != nullptr && p.slots != nullptr);
}

}  // namespace dustin
