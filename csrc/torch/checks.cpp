// SPDX-License-Identifier: Apache-2.0
// The out-of-line argument checks of checks.h: paged cache description, cache values, workspace.
#include "torch/checks.h"

#if defined(DUSTIN_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace dustin::torch_ops {

std::string ArgCheck::cuda_error_string() {
#if defined(DUSTIN_WITH_CUDA)
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return std::string(": ") + cudaGetErrorString(err);
#endif
  return "";
}

PagedKV check_kv_pages(const ArgCheck& check, const at::Tensor& k_cache,
                       const std::optional<at::Tensor>& v_cache, const std::string& kv_layout,
                       const char* device_ref_name, const at::Tensor& device_ref) {
  const KvLayout layout = parse_kv_layout(check, kv_layout);
  const bool nhd = layout == KvLayout::kNHD;
  check.dims("k_cache", k_cache, 4,
             nhd ? "[num_pages, P, Hkv, D] (NHD)" : "[num_pages, Hkv, P, D] (HND)");
  check.inner_stride("k_cache", k_cache);
  const int64_t page_dim = nhd ? 1 : 2;
  const int64_t head_dim_index = nhd ? 2 : 1;
  const int64_t page_size = k_cache.size(page_dim);
  const int64_t num_kv_heads = k_cache.size(head_dim_index);
  check.value(page_size >= kMinPageSize && page_size <= kMaxPageSize, "k_cache page size P (size(",
              page_dim, ") for ", kv_layout, ") must be in [", kMinPageSize, ", ", kMaxPageSize,
              "], got ", page_size);
  check.value(num_kv_heads >= 1, "k_cache must have at least one KV head (size(", head_dim_index,
              ") for ", kv_layout, "), got ", num_kv_heads);
  check.fits_int32("k_cache.size(0) (num_pages)", k_cache.size(0));
  check.fits_int32("k_cache.size(3) (D)", k_cache.size(3));
  if (v_cache.has_value()) {
    const at::Tensor& v = *v_cache;
    check.same_shape("v_cache", v, k_cache.sizes());
    check.same_dtype("v_cache", v, "k_cache", k_cache);
    check.same_device("v_cache", v, device_ref_name, device_ref);
    check.value(v.strides() == k_cache.strides(), "v_cache must have the strides of k_cache ",
                k_cache.strides(), ", got ", v.strides());
  }

  PagedKV kv;
  kv.k = k_cache.data_ptr();
  kv.v = v_cache.has_value() ? v_cache->data_ptr() : nullptr;
  kv.page_stride = k_cache.stride(0);
  kv.head_stride = k_cache.stride(head_dim_index);
  kv.token_stride = k_cache.stride(page_dim);
  kv.num_pages = static_cast<int32_t>(k_cache.size(0));
  kv.page_size = static_cast<int32_t>(page_size);
  kv.num_kv_heads = static_cast<int32_t>(num_kv_heads);
  kv.head_dim = static_cast<int32_t>(k_cache.size(3));
  kv.layout = layout;
  kv.dtype = to_dtype(k_cache.scalar_type());
  return kv;
}

PagedKV check_paged_kv(const ArgCheck& check, const char* ref_name, const at::Tensor& ref,
                       const at::Tensor& k_cache, const std::optional<at::Tensor>& v_cache,
                       const at::Tensor& block_table, const at::Tensor& kv_lens,
                       const std::string& kv_layout) {
  const int64_t batch = ref.size(0);
  const int64_t head_dim = ref.size(3);
  check.same_dtype("k_cache", k_cache, ref_name, ref);
  check.same_device("k_cache", k_cache, ref_name, ref);
  PagedKV kv = check_kv_pages(check, k_cache, v_cache, kv_layout, ref_name, ref);
  check.value(k_cache.size(3) == head_dim, "k_cache head dim (size(3)) must equal D = ", head_dim,
              " of ", ref_name, ", got ", k_cache.size(3));

  check.dtype("block_table", block_table, at::kInt);
  check.dims("block_table", block_table, 2, "[B, max_pages]");
  check.size("block_table", block_table, 0, batch, "B");
  check.same_device("block_table", block_table, ref_name, ref);
  check.inner_stride("block_table", block_table);
  check.fits_int32("block_table.size(1) (max_pages)", block_table.size(1));

  check.dtype("kv_lens", kv_lens, at::kInt);
  check.dims("kv_lens", kv_lens, 1, "[B]");
  check.size("kv_lens", kv_lens, 0, batch, "B");
  check.same_device("kv_lens", kv_lens, ref_name, ref);
  check.contiguous("kv_lens", kv_lens);

  kv.block_table = block_table.data_ptr<int32_t>();
  kv.kv_lens = kv_lens.data_ptr<int32_t>();
  kv.block_table_stride = block_table.stride(0);
  kv.max_pages = static_cast<int32_t>(block_table.size(1));
  return kv;
}

void check_paged_kv_values(const ArgCheck& check, const PagedKV& kv, const at::Tensor& block_table,
                           const at::Tensor& kv_lens, const char* min_name, int64_t min_len) {
  const auto lens = kv_lens.accessor<int32_t, 1>();
  const auto table = block_table.accessor<int32_t, 2>();
  const int64_t max_len = static_cast<int64_t>(kv.max_pages) * kv.page_size;
  for (int64_t b = 0; b < lens.size(0); ++b) {
    const int32_t len = lens[b];
    check.index(len >= min_len && len <= max_len, "kv_lens[", b, "] must be in [", min_name,
                ", max_pages * P] = [", min_len, ", ", max_len, "], got ", len);
    for (int64_t i = 0, n = num_blocks_for(len, kv.page_size); i < n; ++i) {
      check.index(table[b][i] >= 0 && table[b][i] < kv.num_pages, "block_table[", b, ", ", i,
                  "] must be a page in [0, num_pages) = [0, ", kv.num_pages, ") (page ", i,
                  " holds tokens of kv_lens[", b, "] = ", len, "), got ", table[b][i]);
    }
  }
}

void check_workspace(const ArgCheck& check, const std::optional<at::Tensor>& workspace,
                     const at::Device& device, size_t bytes) {
  if (!workspace.has_value()) return;
  const at::Tensor& w = *workspace;
  check.dtype("workspace", w, at::kByte);
  check.dims("workspace", w, 1, "[bytes]");
  check.contiguous("workspace", w);
  check.value(w.device() == device, "workspace must be on ", device, ", got ", w.device());
  check.value(static_cast<size_t>(w.numel()) >= bytes, "workspace must hold at least ", bytes,
              " bytes, got ", w.numel());
}

}  // namespace dustin::torch_ops
