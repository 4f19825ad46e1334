// SPDX-License-Identifier: Apache-2.0
// PyTorch adapter of store_kv: checks, tensors -> StoreKVParams, CPU twin or CUDA kernel.
#include <ATen/ATen.h>

#include "torch/checks.h"
#include "torch/ops.h"

#if defined(DUSTIN_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace dustin::torch_ops {
namespace {

/// pages and slots: int64 or int32.
void check_index_dtype(const ArgCheck& check, const char* name, const at::Tensor& t) {
  check.type(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, name,
             " must be int64 or int32, got ", t.scalar_type());
}

/// Metadata checks of every argument (no tensor values read) and the params they describe.
StoreKVParams check_args(const ArgCheck& check, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& k_cache, const at::Tensor& v_cache,
                         const at::Tensor& pages, const at::Tensor& slots,
                         const std::string& kv_layout) {
  check_float_dtype(check, "k_cache", k_cache);
  const PagedKV cache = check_kv_pages(check, k_cache, v_cache, kv_layout, "k_cache", k_cache);
  const int32_t num_kv_heads = cache.num_kv_heads;
  const int32_t head_dim = cache.head_dim;
  check.value(head_dim >= 1, "k_cache must have a head dim D >= 1 (size(3)), got ", head_dim);

  check.dims("k", k, 3, "[N, Hkv, D]");
  check.same_dtype("k", k, "k_cache", k_cache);
  check.same_device("k", k, "k_cache", k_cache);
  check.inner_stride("k", k);
  check.size("k", k, 1, num_kv_heads, "Hkv of k_cache");
  check.size("k", k, 2, head_dim, "D of k_cache");
  const int64_t num_tokens = k.size(0);
  check.fits_int32("k.size(0) (N)", num_tokens);
  check.same_shape("v", v, k.sizes());
  check.same_dtype("v", v, "k_cache", k_cache);
  check.same_device("v", v, "k_cache", k_cache);
  check.inner_stride("v", v);

  check_index_dtype(check, "pages", pages);
  check.same_shape("pages", pages, {num_tokens});
  check.same_device("pages", pages, "k_cache", k_cache);
  check.type(slots.scalar_type() == pages.scalar_type(), "slots must have the dtype of pages (",
             pages.scalar_type(), "), got ", slots.scalar_type());
  check.same_shape("slots", slots, {num_tokens});
  check.same_device("slots", slots, "k_cache", k_cache);

  StoreKVParams p;
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.k_stride_n = k.stride(0);
  p.k_stride_h = k.stride(1);
  p.v_stride_n = v.stride(0);
  p.v_stride_h = v.stride(1);
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.page_stride = cache.page_stride;
  p.head_stride = cache.head_stride;
  p.token_stride = cache.token_stride;
  p.pages = pages.data_ptr();
  p.slots = slots.data_ptr();
  p.pages_stride = pages.stride(0);
  p.slots_stride = slots.stride(0);
  p.index_type = pages.scalar_type() == at::kLong ? IndexType::kInt64 : IndexType::kInt32;
  p.num_tokens = static_cast<int32_t>(num_tokens);
  p.num_kv_heads = num_kv_heads;
  p.head_dim = head_dim;
  p.num_pages = cache.num_pages;
  p.page_size = cache.page_size;
  p.dtype = cache.dtype;
  return p;
}

template <typename Index>
void check_index_values(const ArgCheck& check, const StoreKVParams& p, const at::Tensor& pages,
                        const at::Tensor& slots) {
  const auto page = pages.accessor<Index, 1>();
  const auto slot = slots.accessor<Index, 1>();
  for (int64_t i = 0; i < page.size(0); ++i) {
    check.index(page[i] >= 0 && page[i] < p.num_pages, "pages[", i,
                "] must be a page in [0, num_pages) = [0, ", p.num_pages, "), got ",
                static_cast<int64_t>(page[i]));
    check.index(slot[i] >= 0 && slot[i] < p.page_size, "slots[", i,
                "] must be a slot in [0, P) = [0, ", p.page_size, "), got ",
                static_cast<int64_t>(slot[i]));
  }
}

/// Value checks (CPU pages and slots): every token lands in the pool.
void check_values(const ArgCheck& check, const StoreKVParams& p, const at::Tensor& pages,
                  const at::Tensor& slots) {
  if (p.index_type == IndexType::kInt64) {
    check_index_values<int64_t>(check, p, pages, slots);
  } else {
    check_index_values<int32_t>(check, p, pages, slots);
  }
}

}  // namespace

void store_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
              const at::Tensor& pages, const at::Tensor& slots, const std::string& kv_layout) {
  const ArgCheck check("store_kv");
  const StoreKVParams p = check_args(check, k, v, k_cache, v_cache, pages, slots, kv_layout);
  if (k_cache.is_cpu()) {
    check_values(check, p, pages, slots);
    check.status(cpu::store_kv(p));
    return;
  }
#if defined(DUSTIN_WITH_CUDA)
  const c10::cuda::CUDAGuard device_guard(k_cache.device());
  if (p.num_tokens == 0) return;
  check.status(dustin::store_kv(p, c10::cuda::getCurrentCUDAStream()));
#else
  (void)p;
  check.no_cuda_build(k_cache.device());
#endif
}

void validate_store_kv(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                       const at::Tensor& v_cache, const at::Tensor& pages, const at::Tensor& slots,
                       const std::string& kv_layout) {
  const ArgCheck check("store_kv");
  const StoreKVParams p = check_args(check, k, v, k_cache, v_cache, pages, slots, kv_layout);
  check_values(check, p, pages.cpu(), slots.cpu());
}

void store_kv_meta(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                   at::Tensor& v_cache, const at::Tensor& pages, const at::Tensor& slots,
                   const std::string& kv_layout) {
  const ArgCheck check("store_kv");
  parse_kv_layout(check, kv_layout);
  check.dims("k_cache", k_cache, 4,
             kv_layout == "NHD" ? "[num_pages, P, Hkv, D] (NHD)" : "[num_pages, Hkv, P, D] (HND)");
  check_float_dtype(check, "k_cache", k_cache);
  check.dims("v_cache", v_cache, 4, "like k_cache");
  check.same_dtype("v_cache", v_cache, "k_cache", k_cache);
  check.dims("k", k, 3, "[N, Hkv, D]");
  check.same_dtype("k", k, "k_cache", k_cache);
  check.dims("v", v, 3, "[N, Hkv, D]");
  check.same_dtype("v", v, "k_cache", k_cache);
  check_index_dtype(check, "pages", pages);
  check.dims("pages", pages, 1, "[N]");
  check.type(slots.scalar_type() == pages.scalar_type(), "slots must have the dtype of pages (",
             pages.scalar_type(), "), got ", slots.scalar_type());
  check.dims("slots", slots, 1, "[N]");
  check_same_devices(
      check, "k_cache", k_cache,
      {{"v_cache", &v_cache}, {"k", &k}, {"v", &v}, {"pages", &pages}, {"slots", &slots}});
}

}  // namespace dustin::torch_ops
