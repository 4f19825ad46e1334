// SPDX-License-Identifier: Apache-2.0
// PyTorch adapter of sparse_verify: checks, tensors -> SparseVerifyParams, CPU twin or CUDA kernel.
#include <ATen/ATen.h>

#include "torch/checks.h"
#include "torch/ops.h"

#if defined(DUSTIN_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace dustin::torch_ops {
namespace {

/// Metadata checks of every input (no tensor values read) and the params they describe;
/// out, lse and workspace are left for the caller.
SparseVerifyParams check_inputs(const ArgCheck& check, const at::Tensor& q,
                                const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& block_table, const at::Tensor& kv_lens,
                                const at::Tensor& block_ids, const at::Tensor& block_counts,
                                double sm_scale, const std::string& kv_layout) {
  check.dims("q", q, 4, "[B, q, Hq, D]");
  check_float_dtype(check, "q", q);
  check.inner_stride("q", q);
  const int64_t batch = q.size(0);
  const int64_t q_len = q.size(1);
  const int64_t num_qo_heads = q.size(2);
  const int64_t head_dim = q.size(3);
  check.value(q_len >= 1, "q must hold at least one query token (size(1)), got ", q_len);
  check.value(num_qo_heads >= 1, "q must have at least one head (size(2)), got ", num_qo_heads);
  check.value(head_dim >= 1, "q must have a head dim D >= 1 (size(3)), got ", head_dim);
  check.fits_int32("q.size(0) (B)", batch);

  const PagedKV kv =
      check_paged_kv(check, "q", q, k_cache, v_cache, block_table, kv_lens, kv_layout);
  check.value(num_qo_heads % kv.num_kv_heads == 0,
              "q heads Hq (size(2)) must be a multiple of Hkv = ", kv.num_kv_heads,
              " (k_cache), got ", num_qo_heads);

  check.dtype("block_ids", block_ids, at::kInt);
  check.value(block_ids.dim() == 2 || block_ids.dim() == 3,
              "block_ids must have 2 dims [B, K] or 3 dims [B, Hkv, K], got shape ",
              block_ids.sizes());
  check.size("block_ids", block_ids, 0, batch, "B");
  const bool per_head_form = block_ids.dim() == 3;
  const int64_t num_lists = per_head_form ? block_ids.size(1) : 1;
  check.value(num_lists == 1 || num_lists == kv.num_kv_heads,
              "block_ids.size(1) must be 1 or Hkv = ", kv.num_kv_heads, ", got ", num_lists);
  check.same_device("block_ids", block_ids, "q", q);
  check.inner_stride("block_ids", block_ids);
  check.fits_int32("block_ids.size(-1) (K)", block_ids.size(-1));

  check.dtype("block_counts", block_counts, at::kInt);
  if (per_head_form) {
    check.same_shape("block_counts", block_counts, {batch, num_lists});
  } else {
    check.same_shape("block_counts", block_counts, {batch});
  }
  check.same_device("block_counts", block_counts, "q", q);
  check.inner_stride("block_counts", block_counts);
  check.finite("sm_scale", sm_scale);

  if (q.is_cuda()) {
    check_cuda_dtype_and_head_dim(check, "q", q, head_dim);
    const int64_t group = num_qo_heads / kv.num_kv_heads;
    check.not_implemented(group <= kMaxGroupSize, "GQA group G = Hq / Hkv must be at most ",
                          kMaxGroupSize, " on CUDA, got ", group);
    check.not_implemented(q_len <= kMaxQueryLen, "q must hold at most ", kMaxQueryLen,
                          " query tokens (size(1)) on CUDA, got ", q_len);
  }

  SparseVerifyParams p;
  p.q = q.data_ptr();
  p.q_stride_b = q.stride(0);
  p.q_stride_t = q.stride(1);
  p.q_stride_h = q.stride(2);
  p.kv = kv;
  p.block_ids = block_ids.data_ptr<int32_t>();
  p.block_counts = block_counts.data_ptr<int32_t>();
  p.block_ids_stride_b = block_ids.stride(0);
  p.block_ids_stride_s = per_head_form ? block_ids.stride(1) : 0;
  p.block_counts_stride_b = per_head_form ? block_counts.stride(0) : 1;
  p.batch_size = static_cast<int32_t>(batch);
  p.q_len = static_cast<int32_t>(q_len);
  p.num_qo_heads = static_cast<int32_t>(num_qo_heads);
  p.num_lists = static_cast<int32_t>(num_lists);
  p.max_blocks = static_cast<int32_t>(block_ids.size(-1));
  p.sm_scale = static_cast<float>(sm_scale);
  if (q.is_cuda()) {
    check_vector_aligned(check, "k_cache", k_cache);
    check_vector_aligned(check, "v_cache", v_cache);
  }
  return p;
}

/// Value checks (CPU tensors): lengths, pages, counts and listed ids.
void check_values(const ArgCheck& check, const SparseVerifyParams& p, const at::Tensor& block_table,
                  const at::Tensor& kv_lens, const at::Tensor& block_ids,
                  const at::Tensor& block_counts) {
  check_paged_kv_values(check, p.kv, block_table, kv_lens, "q", p.q_len);
  const bool per_head_form = block_ids.dim() == 3;
  // The per-list views must outlive their accessors, which point into their sizes and strides.
  const at::Tensor ids_3d = per_head_form ? block_ids : block_ids.unsqueeze(1);
  const at::Tensor counts_2d = per_head_form ? block_counts : block_counts.unsqueeze(1);
  const auto ids = ids_3d.accessor<int32_t, 3>();
  const auto counts = counts_2d.accessor<int32_t, 2>();
  const auto lens = kv_lens.accessor<int32_t, 1>();
  for (int64_t b = 0; b < p.batch_size; ++b) {
    const int32_t nblk = num_blocks_for(lens[b], p.kv.page_size);
    for (int64_t s = 0; s < p.num_lists; ++s) {
      // "b" or "b, s": the list's index as the user wrote it. Formatted only on failure, so a
      // valid call does no string work per list.
      const auto where = [&] {
        return per_head_form ? std::to_string(b) + ", " + std::to_string(s) : std::to_string(b);
      };
      const int32_t count = counts[b][s];
      if (count < 0 || count > p.max_blocks) {
        check.index(false, "block_counts[", where(), "] must be in [0, K] = [0, ", p.max_blocks,
                    "], got ", count);
      }
      for (int32_t j = 0; j < count; ++j) {
        const int32_t id = ids[b][s][j];
        if (id < 0 || id >= nblk) {
          check.index(false, "block_ids[", where(), ", ", j,
                      "] must be a block in [0, ceil(kv_lens[", b, "] / P)) = [0, ", nblk,
                      "), got ", id);
        }
        if (j > 0 && id <= ids[b][s][j - 1]) {
          check.value(false, "block_ids[", where(),
                      ", :block_counts] must be strictly ascending, got ", id, " after ",
                      ids[b][s][j - 1], " at position ", j);
        }
      }
    }
  }
}

void check_outputs(const ArgCheck& check, const at::Tensor& q, const at::Tensor& out,
                   const at::Tensor& lse) {
  check.same_dtype("out", out, "q", q);
  check.same_shape("out", out, q.sizes());
  check.same_device("out", out, "q", q);
  check.contiguous("out", out);
  check.dtype("lse", lse, at::kFloat);
  check.same_shape("lse", lse, {q.size(0), q.size(1), q.size(2)});
  check.same_device("lse", lse, "q", q);
  check.contiguous("lse", lse);
  check.value(!out.is_cuda() || reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 == 0,
              "out must start 16-byte aligned on CUDA (the kernel stores 16-byte vectors), got "
              "an offset of ", reinterpret_cast<uintptr_t>(out.data_ptr()) % 16, " bytes");
}

/// Runs the checked params on the device of q.
void launch(const ArgCheck& check, SparseVerifyParams p, const at::Tensor& q,
            const at::Tensor& block_table, const at::Tensor& kv_lens, const at::Tensor& block_ids,
            const at::Tensor& block_counts, const std::optional<at::Tensor>& workspace) {
  if (q.is_cpu()) {
    check_values(check, p, block_table, kv_lens, block_ids, block_counts);
    check_workspace(check, workspace, q.device(), 0);
    check.status(cpu::sparse_verify(p));
    return;
  }
#if defined(DUSTIN_WITH_CUDA)
  const c10::cuda::CUDAGuard device_guard(q.device());
  // A workspace smaller than the plan's is allowed: the kernel then splits only as far as it
  // holds partials for (fewer, longer splits; an empty one means no split).
  check_workspace(check, workspace, q.device(), 0);
  const size_t bytes = workspace.has_value() ? 0 : dustin::sparse_verify_workspace_bytes(p);
  at::Tensor ws = workspace.has_value() ? *workspace : at::Tensor();
  if (!ws.defined() && bytes > 0) {
    ws = at::empty({static_cast<int64_t>(bytes)}, q.options().dtype(at::kByte));
  }
  p.workspace = ws.defined() ? ws.data_ptr() : nullptr;
  p.workspace_bytes = ws.defined() ? static_cast<size_t>(ws.numel()) : 0;
  if (p.batch_size == 0) return;
  check.status(dustin::sparse_verify(p, c10::cuda::getCurrentCUDAStream()));
#else
  (void)p, (void)workspace;
  check.no_cuda_build(q.device());
#endif
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sparse_verify(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& block_table, const at::Tensor& kv_lens, const at::Tensor& block_ids,
    const at::Tensor& block_counts, double sm_scale, const std::string& kv_layout) {
  const ArgCheck check("sparse_verify");
  SparseVerifyParams p = check_inputs(check, q, k_cache, v_cache, block_table, kv_lens, block_ids,
                                      block_counts, sm_scale, kv_layout);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  launch(check, p, q, block_table, kv_lens, block_ids, block_counts, std::nullopt);
  return {out, lse};
}

void sparse_verify_out(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const at::Tensor& block_table, const at::Tensor& kv_lens,
                       const at::Tensor& block_ids, const at::Tensor& block_counts, double sm_scale,
                       const std::string& kv_layout, at::Tensor& out, at::Tensor& lse,
                       const std::optional<at::Tensor>& workspace) {
  const ArgCheck check("sparse_verify_out");
  SparseVerifyParams p = check_inputs(check, q, k_cache, v_cache, block_table, kv_lens, block_ids,
                                      block_counts, sm_scale, kv_layout);
  check_outputs(check, q, out, lse);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  launch(check, p, q, block_table, kv_lens, block_ids, block_counts, workspace);
}

void validate_sparse_verify(const at::Tensor& q, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& block_table,
                            const at::Tensor& kv_lens, const at::Tensor& block_ids,
                            const at::Tensor& block_counts, double sm_scale,
                            const std::string& kv_layout) {
  const ArgCheck check("sparse_verify");
  const SparseVerifyParams p = check_inputs(check, q, k_cache, v_cache, block_table, kv_lens,
                                            block_ids, block_counts, sm_scale, kv_layout);
  check_values(check, p, block_table.cpu(), kv_lens.cpu(), block_ids.cpu(), block_counts.cpu());
}

int64_t sparse_verify_workspace_bytes(const at::Tensor& q, const at::Tensor& k_cache,
                                      const at::Tensor& block_table, const at::Tensor& block_ids,
                                      const std::string& kv_layout) {
  const ArgCheck check("sparse_verify_workspace_bytes");
  const KvLayout layout = parse_kv_layout(check, kv_layout);
  check.dims("q", q, 4, "[B, q, Hq, D]");
  check.dims("k_cache", k_cache, 4,
             layout == KvLayout::kNHD ? "[num_pages, P, Hkv, D]" : "[num_pages, Hkv, P, D]");
  check.dims("block_table", block_table, 2, "[B, max_pages]");
  check.value(block_ids.dim() == 2 || block_ids.dim() == 3,
              "block_ids must have 2 dims [B, K] or 3 dims [B, Hkv, K], got shape ",
              block_ids.sizes());
  // The CPU twin needs no workspace.
  if (!q.is_cuda()) return 0;
#if defined(DUSTIN_WITH_CUDA)
  const c10::cuda::CUDAGuard device_guard(q.device());
  const bool nhd = layout == KvLayout::kNHD;
  SparseVerifyParams p;
  p.kv.layout = layout;
  p.kv.dtype = to_dtype(q.scalar_type());
  p.kv.num_pages = static_cast<int32_t>(k_cache.size(0));
  p.kv.page_size = static_cast<int32_t>(k_cache.size(nhd ? 1 : 2));
  p.kv.num_kv_heads = static_cast<int32_t>(k_cache.size(nhd ? 2 : 1));
  p.kv.head_dim = static_cast<int32_t>(k_cache.size(3));
  p.kv.max_pages = static_cast<int32_t>(block_table.size(1));
  p.batch_size = static_cast<int32_t>(q.size(0));
  p.q_len = static_cast<int32_t>(q.size(1));
  p.num_qo_heads = static_cast<int32_t>(q.size(2));
  p.num_lists = block_ids.dim() == 3 ? static_cast<int32_t>(block_ids.size(1)) : 1;
  p.max_blocks = static_cast<int32_t>(block_ids.size(-1));
  return static_cast<int64_t>(dustin::sparse_verify_workspace_bytes(p));
#else
  return 0;
#endif
}

/// Meta checks: what holds for symbolic shapes too (ranks, dtypes, one device for all).
static void check_meta_inputs(const ArgCheck& check, const at::Tensor& q, const at::Tensor& k_cache,
                              const at::Tensor& v_cache, const at::Tensor& block_table,
                              const at::Tensor& kv_lens, const at::Tensor& block_ids,
                              const at::Tensor& block_counts) {
  check.dims("q", q, 4, "[B, q, Hq, D]");
  check_float_dtype(check, "q", q);
  check.same_dtype("k_cache", k_cache, "q", q);
  check.same_dtype("v_cache", v_cache, "k_cache", k_cache);
  check.dtype("block_table", block_table, at::kInt);
  check.dtype("kv_lens", kv_lens, at::kInt);
  check.dtype("block_ids", block_ids, at::kInt);
  check.dtype("block_counts", block_counts, at::kInt);
  check_same_devices(check, "q", q,
                     {{"k_cache", &k_cache},
                      {"v_cache", &v_cache},
                      {"block_table", &block_table},
                      {"kv_lens", &kv_lens},
                      {"block_ids", &block_ids},
                      {"block_counts", &block_counts}});
}

std::tuple<at::Tensor, at::Tensor> sparse_verify_meta(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& block_table, const at::Tensor& kv_lens, const at::Tensor& block_ids,
    const at::Tensor& block_counts, double, const std::string&) {
  const ArgCheck check("sparse_verify");
  check_meta_inputs(check, q, k_cache, v_cache, block_table, kv_lens, block_ids, block_counts);
  at::Tensor out = at::empty_symint(q.sym_sizes(), q.options());
  at::Tensor lse = at::empty_symint({q.sym_size(0), q.sym_size(1), q.sym_size(2)},
                                    q.options().dtype(at::kFloat));
  return {out, lse};
}

void sparse_verify_out_meta(const at::Tensor& q, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& block_table,
                            const at::Tensor& kv_lens, const at::Tensor& block_ids,
                            const at::Tensor& block_counts, double, const std::string&,
                            at::Tensor& out, at::Tensor& lse,
                            const std::optional<at::Tensor>& workspace) {
  const ArgCheck check("sparse_verify_out");
  check_meta_inputs(check, q, k_cache, v_cache, block_table, kv_lens, block_ids, block_counts);
  check.same_dtype("out", out, "q", q);
  check.dtype("lse", lse, at::kFloat);
  const at::Tensor ws = workspace.value_or(at::Tensor());
  check_same_devices(check, "q", q, {{"out", &out}, {"lse", &lse}, {"workspace", &ws}});
}

}  // namespace dustin::torch_ops
