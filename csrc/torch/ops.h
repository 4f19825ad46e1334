// SPDX-License-Identifier: Apache-2.0
// The PyTorch adapters: tensors -> params structs -> libdustin (CPU twin or CUDA kernel).
// Each adapter checks every argument (csrc/torch/checks.h) before any launch.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

namespace dustin::torch_ops {

std::tuple<at::Tensor, at::Tensor> sparse_verify(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& block_table, const at::Tensor& kv_lens, const at::Tensor& block_ids,
    const at::Tensor& block_counts, double sm_scale, const std::string& kv_layout);

void sparse_verify_out(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const at::Tensor& block_table, const at::Tensor& kv_lens,
                       const at::Tensor& block_ids, const at::Tensor& block_counts,
                       double sm_scale, const std::string& kv_layout, at::Tensor& out,
                       at::Tensor& lse, const std::optional<at::Tensor>& workspace);

int64_t sparse_verify_workspace_bytes(const at::Tensor& q, const at::Tensor& k_cache,
                                      const at::Tensor& block_table, const at::Tensor& block_ids,
                                      const std::string& kv_layout);

void block_scores(const at::Tensor& q_srh, const at::Tensor& k_cache,
                  const at::Tensor& block_table, const at::Tensor& kv_lens,
                  const at::Tensor& head_map, double sm_scale, int64_t block_size,
                  const std::string& kv_layout, at::Tensor& scores,
                  const std::optional<at::Tensor>& workspace);

std::tuple<at::Tensor, at::Tensor> select_blocks(
    const at::Tensor& draft_scores, const std::optional<at::Tensor>& target_scores,
    const at::Tensor& kv_lens, int64_t q_len, int64_t block_size, int64_t budget_blocks,
    int64_t n_sink, int64_t n_recent, double draft_share);

void select_blocks_out(const at::Tensor& draft_scores,
                       const std::optional<at::Tensor>& target_scores, const at::Tensor& kv_lens,
                       int64_t q_len, int64_t block_size, int64_t budget_blocks, int64_t n_sink,
                       int64_t n_recent, double draft_share, at::Tensor& block_ids,
                       at::Tensor& block_counts);

void store_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
              const at::Tensor& pages, const at::Tensor& slots, const std::string& kv_layout);

/// y = x weight^T (+ bias), or silu(gate) * up of it when gated, for at most 16 rows of x;
/// optionally of RMSNorm(x; norm_weight), plus a residual, or with RoPE on leading columns.
at::Tensor decode_linear(const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, bool gated,
                         const std::optional<at::Tensor>& norm_weight, double norm_eps,
                         const std::optional<at::Tensor>& residual,
                         const std::optional<at::Tensor>& rope_cos,
                         const std::optional<at::Tensor>& rope_sin, int64_t rope_columns);

// Checks of every argument including tensor values (copied to the host), without running the
// op: dustin.ops runs them for CUDA tensors when validate=True.
void validate_sparse_verify(const at::Tensor& q, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& block_table,
                            const at::Tensor& kv_lens, const at::Tensor& block_ids,
                            const at::Tensor& block_counts, double sm_scale,
                            const std::string& kv_layout);

void validate_block_scores(const at::Tensor& q_srh, const at::Tensor& k_cache,
                           const at::Tensor& block_table, const at::Tensor& kv_lens,
                           const at::Tensor& head_map, double sm_scale, int64_t block_size,
                           const std::string& kv_layout, const at::Tensor& scores);

void validate_select_blocks(const at::Tensor& draft_scores,
                            const std::optional<at::Tensor>& target_scores,
                            const at::Tensor& kv_lens, int64_t q_len, int64_t block_size,
                            int64_t budget_blocks, int64_t n_sink, int64_t n_recent,
                            double draft_share);

void validate_store_kv(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                       const at::Tensor& v_cache, const at::Tensor& pages, const at::Tensor& slots,
                       const std::string& kv_layout);

// Meta (fake) implementations for torch.compile: output shapes, and the checks that hold for
// symbolic shapes (ranks, dtypes, scalar ranges, one device for every tensor).
std::tuple<at::Tensor, at::Tensor> sparse_verify_meta(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& block_table, const at::Tensor& kv_lens, const at::Tensor& block_ids,
    const at::Tensor& block_counts, double sm_scale, const std::string& kv_layout);

void sparse_verify_out_meta(const at::Tensor& q, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& block_table,
                            const at::Tensor& kv_lens, const at::Tensor& block_ids,
                            const at::Tensor& block_counts, double sm_scale,
                            const std::string& kv_layout, at::Tensor& out, at::Tensor& lse,
                            const std::optional<at::Tensor>& workspace);

void block_scores_meta(const at::Tensor& q_srh, const at::Tensor& k_cache,
                       const at::Tensor& block_table, const at::Tensor& kv_lens,
                       const at::Tensor& head_map, double sm_scale, int64_t block_size,
                       const std::string& kv_layout, at::Tensor& scores,
                       const std::optional<at::Tensor>& workspace);

std::tuple<at::Tensor, at::Tensor> select_blocks_meta(
    const at::Tensor& draft_scores, const std::optional<at::Tensor>& target_scores,
    const at::Tensor& kv_lens, int64_t q_len, int64_t block_size, int64_t budget_blocks,
    int64_t n_sink, int64_t n_recent, double draft_share);

void select_blocks_out_meta(const at::Tensor& draft_scores,
                            const std::optional<at::Tensor>& target_scores,
                            const at::Tensor& kv_lens, int64_t q_len, int64_t block_size,
                            int64_t budget_blocks, int64_t n_sink, int64_t n_recent,
                            double draft_share, at::Tensor& block_ids, at::Tensor& block_counts);

void store_kv_meta(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                   at::Tensor& v_cache, const at::Tensor& pages, const at::Tensor& slots,
                   const std::string& kv_layout);

at::Tensor decode_linear_meta(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, bool gated,
                              const std::optional<at::Tensor>& norm_weight, double norm_eps,
                              const std::optional<at::Tensor>& residual,
                              const std::optional<at::Tensor>& rope_cos,
                              const std::optional<at::Tensor>& rope_sin, int64_t rope_columns);

}  // namespace dustin::torch_ops
