// SPDX-License-Identifier: Apache-2.0
// PyTorch adapter of select_blocks: checks, tensors -> SelectBlocksParams, CPU twin or CUDA kernel.
#include <ATen/ATen.h>

#include "torch/checks.h"
#include "torch/ops.h"

#if defined(DUSTIN_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace dustin::torch_ops {
namespace {

constexpr int64_t kInt32Limit = int64_t{1} << 31;

/// Scalar arguments: ranges that keep every int32 sum of the selection rules from overflowing.
void check_scalars(const ArgCheck& check, int64_t q_len, int64_t block_size, int64_t budget_blocks,
                   int64_t n_sink, int64_t n_recent, double draft_share) {
  check.value(q_len >= 1 && q_len < kInt32Limit, "q_len must be in [1, 2^31), got ", q_len);
  check.value(block_size >= 1 && block_size < kInt32Limit, "block_size must be in [1, 2^31), got ",
              block_size);
  check.fits_int32("budget_blocks", budget_blocks);
  check.fits_int32("n_sink", n_sink);
  check.fits_int32("n_recent", n_recent);
  check.value(n_sink + block_size < kInt32Limit, "n_sink + block_size must be below 2^31, got ",
              n_sink + block_size);
  check.value(n_recent + q_len + block_size < kInt32Limit,
              "n_recent + q_len + block_size must be below 2^31, got ",
              n_recent + q_len + block_size);
  check.value(draft_share >= 0.0 && draft_share <= 1.0, "draft_share must be in [0, 1], got ",
              draft_share);
}

/// List capacity K before it is clamped to NB: the budget or every forced block.
int64_t capacity_before_clamp(int64_t budget_blocks, int64_t n_sink, int64_t n_recent,
                              int64_t q_len, int64_t block_size) {
  return select_capacity(std::numeric_limits<int32_t>::max(), static_cast<int32_t>(budget_blocks),
                         static_cast<int32_t>(n_sink), static_cast<int32_t>(n_recent),
                         static_cast<int32_t>(q_len), static_cast<int32_t>(block_size));
}

/// Metadata checks of the inputs (no tensor values read) and the params they describe;
/// block_ids, block_counts and capacity are left for the caller.
SelectBlocksParams check_inputs(const ArgCheck& check, const at::Tensor& draft_scores,
                                const std::optional<at::Tensor>& target_scores,
                                const at::Tensor& kv_lens, int64_t q_len, int64_t block_size,
                                int64_t budget_blocks, int64_t n_sink, int64_t n_recent,
                                double draft_share) {
  check.dtype("draft_scores", draft_scores, at::kFloat);
  check.value(draft_scores.dim() == 2 || draft_scores.dim() == 3,
              "draft_scores must have 2 dims [B, NB] or 3 dims [B, H, NB], got shape ",
              draft_scores.sizes());
  check.inner_stride("draft_scores", draft_scores);
  const bool per_head_form = draft_scores.dim() == 3;
  const int64_t batch = draft_scores.size(0);
  const int64_t num_lists = per_head_form ? draft_scores.size(1) : 1;
  const int64_t num_blocks = draft_scores.size(-1);
  check.fits_int32("draft_scores.size(0) (B)", batch);
  check.value(num_lists >= 1, "draft_scores must have at least one list (size(1)), got ",
              num_lists);
  check.fits_int32("draft_scores.size(1) (H)", num_lists);
  check.value(num_blocks >= 1, "draft_scores must have at least one block (size(-1)), got ",
              num_blocks);
  check.fits_int32("draft_scores.size(-1) (NB)", num_blocks);
  if (target_scores.has_value()) {
    const at::Tensor& target = *target_scores;
    check.dtype("target_scores", target, at::kFloat);
    check.same_shape("target_scores", target, draft_scores.sizes());
    check.same_device("target_scores", target, "draft_scores", draft_scores);
    check.inner_stride("target_scores", target);
  }
  check.dtype("kv_lens", kv_lens, at::kInt);
  check.same_shape("kv_lens", kv_lens, {batch});
  check.same_device("kv_lens", kv_lens, "draft_scores", draft_scores);
  check.contiguous("kv_lens", kv_lens);
  check_scalars(check, q_len, block_size, budget_blocks, n_sink, n_recent, draft_share);

  SelectBlocksParams p;
  p.draft_scores = draft_scores.data_ptr<float>();
  p.draft_stride_b = draft_scores.stride(0);
  p.draft_stride_h = per_head_form ? draft_scores.stride(1) : 0;
  if (target_scores.has_value()) {
    p.target_scores = target_scores->data_ptr<float>();
    p.target_stride_b = target_scores->stride(0);
    p.target_stride_h = per_head_form ? target_scores->stride(1) : 0;
  }
  p.kv_lens = kv_lens.data_ptr<int32_t>();
  p.batch_size = static_cast<int32_t>(batch);
  p.num_lists = static_cast<int32_t>(num_lists);
  p.num_blocks = static_cast<int32_t>(num_blocks);
  p.capacity = select_capacity(p.num_blocks, static_cast<int32_t>(budget_blocks),
                               static_cast<int32_t>(n_sink), static_cast<int32_t>(n_recent),
                               static_cast<int32_t>(q_len), static_cast<int32_t>(block_size));
  p.q_len = static_cast<int32_t>(q_len);
  p.block_size = static_cast<int32_t>(block_size);
  p.budget_blocks = static_cast<int32_t>(budget_blocks);
  p.n_sink = static_cast<int32_t>(n_sink);
  p.n_recent = static_cast<int32_t>(n_recent);
  p.draft_share = draft_share;
  return p;
}

/// Value checks (CPU kv_lens): each sequence has its window and fits in the NB score blocks.
void check_values(const ArgCheck& check, const SelectBlocksParams& p, const at::Tensor& kv_lens) {
  const auto lens = kv_lens.accessor<int32_t, 1>();
  const int64_t max_len = static_cast<int64_t>(p.num_blocks) * p.block_size;
  for (int64_t b = 0; b < lens.size(0); ++b) {
    check.index(lens[b] >= p.q_len && lens[b] <= max_len, "kv_lens[", b,
                "] must be in [q_len, NB * block_size] = [", p.q_len, ", ", max_len, "], got ",
                lens[b]);
  }
}

/// Output shapes: [B, K] and [B] for per-sequence scores, [B, H, K] and [B, H] per KV head.
std::vector<int64_t> ids_shape(const at::Tensor& draft_scores, int64_t capacity) {
  std::vector<int64_t> shape(draft_scores.sizes().begin(), draft_scores.sizes().end());
  shape.back() = capacity;
  return shape;
}

void launch(const ArgCheck& check, SelectBlocksParams p, const at::Tensor& draft_scores,
            const at::Tensor& kv_lens) {
  if (draft_scores.is_cpu()) {
    check_values(check, p, kv_lens);
    check.status(cpu::select_blocks(p));
    return;
  }
#if defined(DUSTIN_WITH_CUDA)
  const c10::cuda::CUDAGuard device_guard(draft_scores.device());
  if (p.batch_size == 0) return;
  check.status(dustin::select_blocks(p, c10::cuda::getCurrentCUDAStream()));
#else
  (void)p;
  check.no_cuda_build(draft_scores.device());
#endif
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> select_blocks(const at::Tensor& draft_scores,
                                                 const std::optional<at::Tensor>& target_scores,
                                                 const at::Tensor& kv_lens, int64_t q_len,
                                                 int64_t block_size, int64_t budget_blocks,
                                                 int64_t n_sink, int64_t n_recent,
                                                 double draft_share) {
  const ArgCheck check("select_blocks");
  SelectBlocksParams p = check_inputs(check, draft_scores, target_scores, kv_lens, q_len,
                                      block_size, budget_blocks, n_sink, n_recent, draft_share);
  const auto int_options = draft_scores.options().dtype(at::kInt);
  at::Tensor block_ids = at::empty(ids_shape(draft_scores, p.capacity), int_options);
  const auto counts_shape = draft_scores.sizes().slice(0, draft_scores.dim() - 1);
  at::Tensor block_counts = at::empty(counts_shape, int_options);
  p.block_ids = block_ids.data_ptr<int32_t>();
  p.block_counts = block_counts.data_ptr<int32_t>();
  launch(check, p, draft_scores, kv_lens);
  return {block_ids, block_counts};
}

void select_blocks_out(const at::Tensor& draft_scores,
                       const std::optional<at::Tensor>& target_scores, const at::Tensor& kv_lens,
                       int64_t q_len, int64_t block_size, int64_t budget_blocks, int64_t n_sink,
                       int64_t n_recent, double draft_share, at::Tensor& block_ids,
                       at::Tensor& block_counts) {
  const ArgCheck check("select_blocks_out");
  SelectBlocksParams p = check_inputs(check, draft_scores, target_scores, kv_lens, q_len,
                                      block_size, budget_blocks, n_sink, n_recent, draft_share);
  check.dtype("block_ids", block_ids, at::kInt);
  check.same_shape("block_ids", block_ids, ids_shape(draft_scores, p.capacity));
  check.same_device("block_ids", block_ids, "draft_scores", draft_scores);
  check.contiguous("block_ids", block_ids);
  check.dtype("block_counts", block_counts, at::kInt);
  check.same_shape("block_counts", block_counts,
                   draft_scores.sizes().slice(0, draft_scores.dim() - 1));
  check.same_device("block_counts", block_counts, "draft_scores", draft_scores);
  check.contiguous("block_counts", block_counts);
  p.block_ids = block_ids.data_ptr<int32_t>();
  p.block_counts = block_counts.data_ptr<int32_t>();
  launch(check, p, draft_scores, kv_lens);
}

void validate_select_blocks(const at::Tensor& draft_scores,
                            const std::optional<at::Tensor>& target_scores,
                            const at::Tensor& kv_lens, int64_t q_len, int64_t block_size,
                            int64_t budget_blocks, int64_t n_sink, int64_t n_recent,
                            double draft_share) {
  const ArgCheck check("select_blocks");
  const SelectBlocksParams p =
      check_inputs(check, draft_scores, target_scores, kv_lens, q_len, block_size, budget_blocks,
                   n_sink, n_recent, draft_share);
  check_values(check, p, kv_lens.cpu());
}

/// Meta checks: what holds for symbolic shapes too (ranks, dtypes, scalars, one device).
static void check_meta_inputs(const ArgCheck& check, const at::Tensor& draft_scores,
                              const std::optional<at::Tensor>& target_scores,
                              const at::Tensor& kv_lens, int64_t q_len, int64_t block_size,
                              int64_t budget_blocks, int64_t n_sink, int64_t n_recent,
                              double draft_share) {
  check.dtype("draft_scores", draft_scores, at::kFloat);
  check.value(draft_scores.dim() == 2 || draft_scores.dim() == 3,
              "draft_scores must have 2 dims [B, NB] or 3 dims [B, H, NB], got ",
              draft_scores.dim(), " dims");
  const at::Tensor target = target_scores.value_or(at::Tensor());
  if (target.defined()) check.dtype("target_scores", target, at::kFloat);
  check.dtype("kv_lens", kv_lens, at::kInt);
  check_same_devices(check, "draft_scores", draft_scores,
                     {{"target_scores", &target}, {"kv_lens", &kv_lens}});
  check_scalars(check, q_len, block_size, budget_blocks, n_sink, n_recent, draft_share);
}

std::tuple<at::Tensor, at::Tensor> select_blocks_meta(
    const at::Tensor& draft_scores, const std::optional<at::Tensor>& target_scores,
    const at::Tensor& kv_lens, int64_t q_len, int64_t block_size, int64_t budget_blocks,
    int64_t n_sink, int64_t n_recent, double draft_share) {
  const ArgCheck check("select_blocks");
  check_meta_inputs(check, draft_scores, target_scores, kv_lens, q_len, block_size, budget_blocks,
                    n_sink, n_recent, draft_share);
  const c10::SymInt capacity = draft_scores.sym_size(-1).min(
      c10::SymInt(capacity_before_clamp(budget_blocks, n_sink, n_recent, q_len, block_size)));
  std::vector<c10::SymInt> shape(draft_scores.sym_sizes().begin(), draft_scores.sym_sizes().end());
  const auto int_options = draft_scores.options().dtype(at::kInt);
  std::vector<c10::SymInt> counts_shape(shape.begin(), shape.end() - 1);
  shape.back() = capacity;
  return {at::empty_symint(shape, int_options), at::empty_symint(counts_shape, int_options)};
}

void select_blocks_out_meta(const at::Tensor& draft_scores,
                            const std::optional<at::Tensor>& target_scores,
                            const at::Tensor& kv_lens, int64_t q_len, int64_t block_size,
                            int64_t budget_blocks, int64_t n_sink, int64_t n_recent,
                            double draft_share, at::Tensor& block_ids, at::Tensor& block_counts) {
  const ArgCheck check("select_blocks_out");
  check_meta_inputs(check, draft_scores, target_scores, kv_lens, q_len, block_size, budget_blocks,
                    n_sink, n_recent, draft_share);
  check.dtype("block_ids", block_ids, at::kInt);
  check.dtype("block_counts", block_counts, at::kInt);
  check_same_devices(check, "draft_scores", draft_scores,
                     {{"block_ids", &block_ids}, {"block_counts", &block_counts}});
}

}  // namespace dustin::torch_ops
