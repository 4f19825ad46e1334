// SPDX-License-Identifier: Apache-2.0
// dustin::store_kv: checks the params, picks the widest aligned vector and the index type,
// launches.
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>

#include "dustin/dustin.h"
#include "dustin/store_kv.cuh"

namespace dustin {
namespace {

int32_t element_bytes(DType t) { return t == DType::kFloat32 ? 4 : 2; }

/// Widest copy (1..16 bytes) every row start and every row length is a multiple of: the lowest
/// set bit over the base addresses, the byte strides that move a row (of dims longer than 1)
/// and the row's bytes. Pool views and fused-projection slices give 16 at D a multiple of 8.
int32_t vector_bytes(const StoreKVParams& p) {
  const int64_t eb = element_bytes(p.dtype);
  uint64_t bits = static_cast<uint64_t>(p.head_dim) * eb;
  for (const void* ptr :
       {p.k, p.v, static_cast<const void*>(p.k_cache), static_cast<const void*>(p.v_cache)}) {
    bits |= static_cast<uint64_t>(reinterpret_cast<uintptr_t>(ptr));
  }
  const auto add_stride = [&](int64_t stride, int32_t extent) {
    if (extent > 1) bits |= static_cast<uint64_t>(stride * eb);
  };
  add_stride(p.k_stride_n, p.num_tokens);
  add_stride(p.v_stride_n, p.num_tokens);
  add_stride(p.k_stride_h, p.num_kv_heads);
  add_stride(p.v_stride_h, p.num_kv_heads);
  add_stride(p.page_stride, p.num_pages);
  add_stride(p.head_stride, p.num_kv_heads);
  add_stride(p.token_stride, p.page_size);
  const uint64_t lowest = bits & (~bits + 1);
  return lowest >= detail::kStoreMaxVecBytes ? detail::kStoreMaxVecBytes
                                             : static_cast<int32_t>(lowest);
}

template <int kVecBytes, typename Index>
Status launch(const StoreKVParams& p, cudaStream_t stream) {
  const int32_t eb = element_bytes(p.dtype);
  const int32_t vecs_per_row = p.head_dim * eb / kVecBytes;
  int row_threads = 1;
  while (row_threads < vecs_per_row && row_threads < detail::kStoreMaxRowThreads) row_threads *= 2;
  const int rows_per_cta = detail::kStoreThreads / row_threads;
  const int64_t rows = static_cast<int64_t>(p.num_tokens) * p.num_kv_heads;
  const int64_t ctas = (rows + rows_per_cta - 1) / rows_per_cta;
  const dim3 grid(
      static_cast<unsigned>(ctas < detail::kStoreMaxCtas ? ctas : detail::kStoreMaxCtas),
      2);  // y: k, then v
  const dim3 block(static_cast<unsigned>(row_threads), static_cast<unsigned>(rows_per_cta));
  detail::store_kv_kernel<kVecBytes, Index><<<grid, block, 0, stream>>>(p, eb, vecs_per_row);
  return cudaGetLastError() == cudaSuccess ? Status::kOk : Status::kCudaError;
}

template <typename Index>
Status dispatch_vector(const StoreKVParams& p, cudaStream_t stream) {
  switch (vector_bytes(p)) {
    case 16:
      return launch<16, Index>(p, stream);
    case 8:
      return launch<8, Index>(p, stream);
    case 4:
      return launch<4, Index>(p, stream);
    case 2:
      return launch<2, Index>(p, stream);
    default:
      return launch<1, Index>(p, stream);
  }
}

}  // namespace

Status store_kv(const StoreKVParams& params, cudaStream_t stream) {
  if (!store_kv_valid_shape(params)) return Status::kInvalidArgument;
  if (params.num_tokens == 0) return Status::kOk;
  return params.index_type == IndexType::kInt64 ? dispatch_vector<int64_t>(params, stream)
                                                : dispatch_vector<int32_t>(params, stream);
}

}  // namespace dustin
