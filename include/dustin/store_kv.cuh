// SPDX-License-Identifier: Apache-2.0
// store_kv kernel: one launch copies every (token, head) row of k and v into its cache slot, in
// the widest vectors that the pointers and strides allow (16 bytes for the usual layouts).
#pragma once

#include <cstdint>
#include <type_traits>

#include "dustin/store_kv_params.h"

namespace dustin::detail {

/// Threads per CTA; a CTA copies kStoreThreads / (threads per row) rows of k or v at once.
inline constexpr int kStoreThreads = 256;
/// Most threads that share one row: a D = 128 16-bit row is 16 vectors of 16 bytes, so one
/// warp holds two such rows; longer rows loop.
inline constexpr int kStoreMaxRowThreads = 32;
/// Widest copy per thread: one 128-bit load and one 128-bit store.
inline constexpr int kStoreMaxVecBytes = 16;
/// Cap on CTAs per tensor; rows beyond it are reached by striding over the grid.
inline constexpr unsigned kStoreMaxCtas = 1u << 16;

/// The unsigned type of `kBytes` bytes (1, 2, 4, 8 or 16) a thread moves per copy.
template <int kBytes>
using StoreVec = std::conditional_t<
    kBytes == 16, uint4,
    std::conditional_t<kBytes == 8, uint2,
                       std::conditional_t<kBytes == 4, uint32_t,
                                          std::conditional_t<kBytes == 2, uint16_t, uint8_t>>>>;

template <typename Index>
__device__ __forceinline__ int64_t load_store_index(const void* base, int64_t i, int64_t stride) {
  return static_cast<int64_t>(static_cast<const Index*>(base)[i * stride]);
}

/// blockIdx.y picks the tensor (0: k into k_cache, 1: v into v_cache), threadIdx.y a row
/// (token, KV head) and threadIdx.x its vectors. Rows whose (page, slot) is out of range are
/// skipped. Plain stores, not streaming ones: the attention that follows reads the window
/// back, so it may as well stay in L2.
template <int kVecBytes, typename Index>
__global__ void __launch_bounds__(kStoreThreads)
    store_kv_kernel(const __grid_constant__ StoreKVParams p, int32_t elem_bytes,
                    int32_t vecs_per_row) {
  using Vec = StoreVec<kVecBytes>;
  const bool is_v = blockIdx.y != 0;
  const char* src = static_cast<const char*>(is_v ? p.v : p.k);
  char* dst = static_cast<char*>(is_v ? p.v_cache : p.k_cache);
  const int64_t src_stride_n = (is_v ? p.v_stride_n : p.k_stride_n) * elem_bytes;  // bytes
  const int64_t src_stride_h = (is_v ? p.v_stride_h : p.k_stride_h) * elem_bytes;
  const int64_t rows = static_cast<int64_t>(p.num_tokens) * p.num_kv_heads;
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; row < rows;
       row += row_step) {
    const int64_t token = row / p.num_kv_heads;
    const int64_t head = row - token * p.num_kv_heads;
    const int64_t page = load_store_index<Index>(p.pages, token, p.pages_stride);
    const int64_t slot = load_store_index<Index>(p.slots, token, p.slots_stride);
    if (!store_kv_in_range(page, slot, p.num_pages, p.page_size)) continue;
    const int64_t dst_offset = page * p.page_stride + head * p.head_stride + slot * p.token_stride;
    const Vec* from =
        reinterpret_cast<const Vec*>(src + token * src_stride_n + head * src_stride_h);
    Vec* to = reinterpret_cast<Vec*>(dst + dst_offset * elem_bytes);
    for (int32_t i = threadIdx.x; i < vecs_per_row; i += blockDim.x) to[i] = from[i];
  }
}

}  // namespace dustin::detail
