// SPDX-License-Identifier: Apache-2.0
// CPU twin of store_kv: each (token, head) row of k and v copied into its (page, slot) of the
// cache.
#include <cstring>

#include "cpu_common.h"
#include "dustin/dustin.h"

namespace dustin::cpu {
namespace {

/// Below this many bytes a thread team costs more than the copy.
constexpr int64_t kParallelBytes = int64_t{1} << 20;

int64_t index_at(const StoreKVParams& p, const void* base, int64_t stride, int64_t i) {
  return p.index_type == IndexType::kInt64 ? static_cast<const int64_t*>(base)[i * stride]
                                           : static_cast<const int32_t*>(base)[i * stride];
}

/// Every token's (page, slot) is a place in the cache (the kernel skips the others; the twin,
/// as the reference, rejects them).
bool valid_values(const StoreKVParams& p) {
  for (int64_t i = 0; i < p.num_tokens; ++i) {
    if (!store_kv_in_range(index_at(p, p.pages, p.pages_stride, i),
                           index_at(p, p.slots, p.slots_stride, i), p.num_pages, p.page_size)) {
      return false;
    }
  }
  return true;
}

}  // namespace

Status store_kv(const StoreKVParams& p) {
  if (!store_kv_valid_shape(p)) return Status::kInvalidArgument;
  if (p.num_tokens == 0) return Status::kOk;
  if (!valid_values(p)) return Status::kInvalidArgument;
  const int64_t eb = static_cast<int64_t>(detail::dtype_size(p.dtype));
  const size_t row_bytes = static_cast<size_t>(p.head_dim) * static_cast<size_t>(eb);
  const int64_t rows = static_cast<int64_t>(p.num_tokens) * p.num_kv_heads;
  const char* k = static_cast<const char*>(p.k);
  const char* v = static_cast<const char*>(p.v);
  char* k_cache = static_cast<char*>(p.k_cache);
  char* v_cache = static_cast<char*>(p.v_cache);
#pragma omp parallel for schedule(static) if (2 * rows * static_cast<int64_t>(row_bytes) >= \
                                                  kParallelBytes)
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t token = row / p.num_kv_heads;
    const int64_t head = row % p.num_kv_heads;
    const int64_t page = index_at(p, p.pages, p.pages_stride, token);
    const int64_t slot = index_at(p, p.slots, p.slots_stride, token);
    const int64_t dst = (page * p.page_stride + head * p.head_stride + slot * p.token_stride) * eb;
    std::memcpy(k_cache + dst, k + (token * p.k_stride_n + head * p.k_stride_h) * eb, row_bytes);
    std::memcpy(v_cache + dst, v + (token * p.v_stride_n + head * p.v_stride_h) * eb, row_bytes);
  }
  return Status::kOk;
}

}  // namespace dustin::cpu
