// SPDX-License-Identifier: Apache-2.0
// PyTorch adapter of block_scores: checks, tensors -> BlockScoresParams, CPU twin or CUDA kernel.
#include <ATen/ATen.h>

#include "torch/checks.h"
#include "torch/ops.h"

#if defined(DUSTIN_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace dustin::torch_ops {
namespace {

/// Metadata checks of every argument (no tensor values read) and the params they describe.
BlockScoresParams check_args(const ArgCheck& check, const at::Tensor& q_srh,
                             const at::Tensor& k_cache, const at::Tensor& block_table,
                             const at::Tensor& kv_lens, const at::Tensor& head_map, double sm_scale,
                             int64_t block_size, const std::string& kv_layout,
                             const at::Tensor& scores) {
  check.dims("q_srh", q_srh, 4, "[B, n, Hs, D]");
  check_float_dtype(check, "q_srh", q_srh);
  check.inner_stride("q_srh", q_srh);
  const int64_t batch = q_srh.size(0);
  const int64_t num_queries = q_srh.size(1);
  const int64_t num_heads = q_srh.size(2);
  const int64_t head_dim = q_srh.size(3);
  check.value(num_queries >= 1, "q_srh must hold at least one query (size(1)), got ", num_queries);
  check.value(head_dim >= 1, "q_srh must have a head dim D >= 1 (size(3)), got ", head_dim);
  check.fits_int32("q_srh.size(0) (B)", batch);
  check.fits_int32("q_srh.size(2) (Hs)", num_heads);

  const PagedKV kv =
      check_paged_kv(check, "q_srh", q_srh, k_cache, std::nullopt, block_table, kv_lens, kv_layout);

  check.dtype("head_map", head_map, at::kInt);
  check.same_shape("head_map", head_map, {num_heads});
  check.same_device("head_map", head_map, "q_srh", q_srh);
  check.contiguous("head_map", head_map);
  check.finite("sm_scale", sm_scale);
  check.value(block_size >= 1 && block_size <= std::numeric_limits<int32_t>::max(),
              "block_size must be in [1, 2^31), got ", block_size);

  check.dtype("scores", scores, at::kFloat);
  check.dims("scores", scores, 2, "[B, NB]");
  check.size("scores", scores, 0, batch, "B");
  check.same_device("scores", scores, "q_srh", q_srh);
  check.inner_stride("scores", scores);
  check.fits_int32("scores.size(1) (NB)", scores.size(1));

  check_cuda_dtype_and_head_dim(check, "q_srh", q_srh, head_dim);

  BlockScoresParams p;
  p.q = q_srh.data_ptr();
  p.q_stride_b = q_srh.stride(0);
  p.q_stride_t = q_srh.stride(1);
  p.q_stride_h = q_srh.stride(2);
  p.kv = kv;
  p.head_map = head_map.data_ptr<int32_t>();
  p.scores = scores.data_ptr<float>();
  p.scores_stride_b = scores.stride(0);
  p.batch_size = static_cast<int32_t>(batch);
  p.num_queries = static_cast<int32_t>(num_queries);
  p.num_heads = static_cast<int32_t>(num_heads);
  p.num_blocks = static_cast<int32_t>(scores.size(1));
  p.block_size = static_cast<int32_t>(block_size);
  p.sm_scale = static_cast<float>(sm_scale);
  return p;
}

/// Value checks (CPU tensors): lengths, pages, head_map entries and the room in scores.
void check_values(const ArgCheck& check, const BlockScoresParams& p, const at::Tensor& block_table,
                  const at::Tensor& kv_lens, const at::Tensor& head_map) {
  check_paged_kv_values(check, p.kv, block_table, kv_lens, "n", p.num_queries);
  const auto heads = head_map.accessor<int32_t, 1>();
  for (int64_t h = 0; h < heads.size(0); ++h) {
    check.index(heads[h] >= 0 && heads[h] < p.kv.num_kv_heads, "head_map[", h,
                "] must be a KV head in [0, Hkv) = [0, ", p.kv.num_kv_heads, "), got ", heads[h]);
  }
  const auto lens = kv_lens.accessor<int32_t, 1>();
  for (int64_t b = 0; b < lens.size(0); ++b) {
    const int32_t needed = num_blocks_for(lens[b], p.block_size);
    check.index(needed <= p.num_blocks, "scores.size(1) (NB) must be at least ceil(kv_lens[", b,
                "] / block_size) = ceil(", lens[b], " / ", p.block_size, ") = ", needed, ", got ",
                p.num_blocks);
  }
}

}  // namespace

void block_scores(const at::Tensor& q_srh, const at::Tensor& k_cache, const at::Tensor& block_table,
                  const at::Tensor& kv_lens, const at::Tensor& head_map, double sm_scale,
                  int64_t block_size, const std::string& kv_layout, at::Tensor& scores,
                  const std::optional<at::Tensor>& workspace) {
  const ArgCheck check("block_scores");
  BlockScoresParams p = check_args(check, q_srh, k_cache, block_table, kv_lens, head_map, sm_scale,
                                   block_size, kv_layout, scores);
  if (q_srh.is_cpu()) {
    check_values(check, p, block_table, kv_lens, head_map);
    check_workspace(check, workspace, q_srh.device(), 0);
    check.status(cpu::block_scores(p));
    return;
  }
#if defined(DUSTIN_WITH_CUDA)
  const c10::cuda::CUDAGuard device_guard(q_srh.device());
  check.not_implemented(static_cast<int64_t>(p.num_queries) * p.num_heads <= kMaxScoreRows,
                        "q_srh must have n * Hs <= ", kMaxScoreRows,
                        " query rows on CUDA (one thread block holds them all), got ",
                        p.num_queries, " * ", p.num_heads);
  check_vector_aligned(check, "k_cache", k_cache);
  const size_t bytes = dustin::block_scores_workspace_bytes(p);
  check_workspace(check, workspace, q_srh.device(), bytes);
  at::Tensor ws = workspace.has_value() ? *workspace : at::Tensor();
  if (!ws.defined() && bytes > 0) {
    ws = at::empty({static_cast<int64_t>(bytes)}, q_srh.options().dtype(at::kByte));
  }
  p.workspace = ws.defined() ? ws.data_ptr() : nullptr;
  p.workspace_bytes = ws.defined() ? static_cast<size_t>(ws.numel()) : 0;
  if (p.batch_size == 0 || p.num_heads == 0) return;
  check.status(dustin::block_scores(p, c10::cuda::getCurrentCUDAStream()));
#else
  (void)p;
  check.no_cuda_build(q_srh.device());
#endif
}

void validate_block_scores(const at::Tensor& q_srh, const at::Tensor& k_cache,
                           const at::Tensor& block_table, const at::Tensor& kv_lens,
                           const at::Tensor& head_map, double sm_scale, int64_t block_size,
                           const std::string& kv_layout, const at::Tensor& scores) {
  const ArgCheck check("block_scores");
  const BlockScoresParams p = check_args(check, q_srh, k_cache, block_table, kv_lens, head_map,
                                         sm_scale, block_size, kv_layout, scores);
  check_values(check, p, block_table.cpu(), kv_lens.cpu(), head_map.cpu());
}

void block_scores_meta(const at::Tensor& q_srh, const at::Tensor& k_cache,
                       const at::Tensor& block_table, const at::Tensor& kv_lens,
                       const at::Tensor& head_map, double, int64_t, const std::string&,
                       at::Tensor& scores, const std::optional<at::Tensor>& workspace) {
  const ArgCheck check("block_scores");
  check.dims("q_srh", q_srh, 4, "[B, n, Hs, D]");
  check_float_dtype(check, "q_srh", q_srh);
  check.same_dtype("k_cache", k_cache, "q_srh", q_srh);
  check.dtype("block_table", block_table, at::kInt);
  check.dtype("kv_lens", kv_lens, at::kInt);
  check.dtype("head_map", head_map, at::kInt);
  check.dtype("scores", scores, at::kFloat);
  const at::Tensor ws = workspace.value_or(at::Tensor());
  check_same_devices(check, "q_srh", q_srh,
                     {{"k_cache", &k_cache},
                      {"block_table", &block_table},
                      {"kv_lens", &kv_lens},
                      {"head_map", &head_map},
                      {"scores", &scores},
                      {"workspace", &ws}});
}

}  // namespace dustin::torch_ops
