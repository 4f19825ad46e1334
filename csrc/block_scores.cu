// SPDX-License-Identifier: Apache-2.0
// dustin::block_scores: checks the params, plans the splits and workspace, launches both passes.
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "dustin/block_scores.cuh"
#include "dustin/dispatch.h"
#include "dustin/dustin.h"
#include "cuda_launch.h"

namespace dustin {
namespace {

/// Metadata rules (no device memory is read: kv_lens, block_table and head_map are clamped or
/// skipped by the kernels instead).
bool valid_params(const BlockScoresParams& p) {
  const PagedKV& kv = p.kv;
  if (p.batch_size < 0 || p.num_queries < 1 || p.num_heads < 0 || p.num_blocks < 0 ||
      p.block_size < 1 || p.scores_stride_b < 0 || !(p.sm_scale == p.sm_scale)) {
    return false;
  }
  if (p.batch_size == 0 || p.num_heads == 0) return true;
  return p.q != nullptr && p.head_map != nullptr && p.scores != nullptr && kv.k != nullptr &&
         kv.block_table != nullptr && kv.kv_lens != nullptr && kv.page_size >= 1 &&
         kv.num_kv_heads >= 1 && kv.max_pages >= 0 && kv.num_pages >= 0 &&
         kv.block_table_stride >= 0;
}

/// The key tiles are copied 16 bytes at a time, so every key row must start 16-byte aligned;
/// the copies address a page's rows with 32-bit byte offsets (a page of 2 GiB is not one).
bool keys_supported(const PagedKV& kv) {
  constexpr int64_t kElemsPer16B = 8;
  constexpr int64_t kElemBytes = 2;
  const bool aligned = reinterpret_cast<uintptr_t>(kv.k) % 16 == 0 &&
                       kv.page_stride % kElemsPer16B == 0 &&
                       kv.head_stride % kElemsPer16B == 0 && kv.token_stride % kElemsPer16B == 0;
  return aligned && kv.page_stride >= 0 && kv.page_stride * kElemBytes <= INT32_MAX &&
         kv.token_stride >= 0 && kv.token_stride * kElemBytes * kv.page_size <= INT32_MAX;
}

/// The partial pass's kernel for fragment_partial_len(block_size): the fragment path with
/// partials of 16 or 8 keys, else (0) the scan path.
template <typename T, int kHeadDim>
auto partial_kernel(int32_t fragment) {
  switch (fragment) {
    case 16: return detail::block_scores_fragment_kernel<T, kHeadDim, 16>;
    case 8: return detail::block_scores_fragment_kernel<T, kHeadDim, 8>;
    default: return detail::block_scores_scan_kernel<T, kHeadDim>;
  }
}

template <typename T, int kHeadDim>
Status launch(const BlockScoresParams& p, const detail::BlockScoresPlan& plan,
              cudaStream_t stream) {
  using Tile = detail::ScoreTile<kHeadDim>;
  const int rows_pad = (plan.rows + 15) / 16 * 16;
  const int32_t fragment = detail::fragment_partial_len(p.block_size);
  const size_t smem = Tile::smem_bytes(rows_pad, /*scan=*/fragment == 0);
  const auto partial = partial_kernel<T, kHeadDim>(fragment);
  if (cudaFuncSetAttribute(partial, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(smem)) != cudaSuccess) {
    return Status::kCudaError;
  }
  const dim3 partial_grid(static_cast<unsigned>(plan.num_splits),
                          static_cast<unsigned>(p.num_heads),
                          static_cast<unsigned>(p.batch_size));
  constexpr int64_t kElemsPer16B = 8;
  const bool q_vec16 = reinterpret_cast<uintptr_t>(p.q) % 16 == 0 &&
                       p.q_stride_b % kElemsPer16B == 0 && p.q_stride_t % kElemsPer16B == 0 &&
                       p.q_stride_h % kElemsPer16B == 0;
  partial<<<partial_grid, Tile::kThreads, smem, stream>>>(p, plan, rows_pad, q_vec16);
  if (cudaGetLastError() != cudaSuccess) return Status::kCudaError;

  const int32_t max_blocks =
      static_cast<int32_t>(num_blocks_for(static_cast<int32_t>(detail::block_scores_max_len(p)),
                                          p.block_size));
  const dim3 sum_grid(static_cast<unsigned>((max_blocks + detail::kScoreSumThreads - 1) /
                                            detail::kScoreSumThreads),
                      static_cast<unsigned>(p.batch_size));
  // On Hopper a programmatic dependent launch: its CTAs start while the partial pass drains.
  int device = 0;
  bool has_pdl = false;
  if (cudaGetDevice(&device) != cudaSuccess ||
      detail::device_has_pdl(device, &has_pdl) != cudaSuccess) {
    return Status::kCudaError;
  }
  return detail::launch_kernel(detail::block_scores_sum_kernel, sum_grid,
                               dim3(detail::kScoreSumThreads), sizeof(float) * 3 * plan.rows,
                               stream, has_pdl, p, plan) == cudaSuccess
             ? Status::kOk
             : Status::kCudaError;
}

}  // namespace

size_t block_scores_workspace_bytes(const BlockScoresParams& params) {
  return detail::plan_block_scores(params).workspace_bytes;
}

Status block_scores(const BlockScoresParams& params, cudaStream_t stream) {
  if (!valid_params(params)) return Status::kInvalidArgument;
  const detail::BlockScoresPlan plan = detail::plan_block_scores(params);
  if (plan.num_splits == 0) return Status::kOk;  // no sequence, head or context to score
  if (params.workspace == nullptr || params.workspace_bytes < plan.workspace_bytes) {
    return Status::kWorkspaceTooSmall;
  }
  if (reinterpret_cast<uintptr_t>(params.workspace) % alignof(float2) != 0) {
    return Status::kInvalidArgument;
  }
  if (plan.rows > detail::kMaxScoreRows || !keys_supported(params.kv)) return Status::kUnsupported;
  return DUSTIN_DISPATCH_DTYPE16(params.kv.dtype, [&] {
    return DUSTIN_DISPATCH_HEAD_DIM(params.kv.head_dim, [&] {
      return launch<DTypeKV, kHeadDim>(params, plan, stream);
    });
  });
}

}  // namespace dustin
