// SPDX-License-Identifier: Apache-2.0
// dustin::select_blocks: checks the params, picks the staged (shared-memory) or global-row path, launches.
#include <cuda_runtime.h>

#include "dustin/dustin.h"
#include "dustin/select_blocks.cuh"
#include "cuda_launch.h"

namespace dustin {
namespace {

bool valid_params(const SelectBlocksParams& p) {
  // Same rules as the CPU twin's, less the ones that read kv_lens (device memory): the kernel
  // clamps lengths to NB * block_size and never writes past `capacity` slots.
  if (p.batch_size < 0 || p.num_lists < 1 || p.num_blocks < 0 || p.capacity < 0 ||
      p.q_len < 1 || p.block_size < 1 || p.budget_blocks < 0 || p.n_sink < 0 ||
      p.n_recent < 0 || !(p.draft_share >= 0.0 && p.draft_share <= 1.0)) {
    return false;
  }
  return p.batch_size == 0 || (p.draft_scores != nullptr && p.kv_lens != nullptr &&
                               p.block_ids != nullptr && p.block_counts != nullptr);
}

template <bool kStaged>
Status launch(const SelectBlocksParams& p, cudaStream_t stream) {
  const unsigned lists = static_cast<unsigned>(p.batch_size) * static_cast<unsigned>(p.num_lists);
  const size_t smem = detail::select_blocks_smem_bytes(p.num_blocks, kStaged);
  int device = 0;
  int smem_optin = 0;
  int sms = 0;
  bool has_pdl = false;
  if (cudaGetDevice(&device) != cudaSuccess ||
      detail::device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(device, &smem_optin) !=
          cudaSuccess ||
      detail::device_attribute<cudaDevAttrMultiProcessorCount>(device, &sms) != cudaSuccess ||
      detail::device_has_pdl(device, &has_pdl) != cudaSuccess) {
    return Status::kCudaError;
  }
  const size_t static_smem = sizeof(detail::SelectShared);
  if (smem + static_smem > static_cast<size_t>(smem_optin)) return Status::kUnsupported;
  // More lists than SMs: the variant whose registers let two CTAs share an SM (measured on the
  // H200: the single-CTA variant is 2-5% faster where every list has its own SM, and 1.3-1.5x
  // slower at 512 lists).
  auto kernel = lists > static_cast<unsigned>(sms) ? detail::select_blocks_kernel<kStaged, 2>
                                                   : detail::select_blocks_kernel<kStaged, 1>;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(smem)) != cudaSuccess) {
    return Status::kCudaError;
  }
  // A programmatic dependent launch where the GPU has it: the CTAs start while the grid before
  // (block_scores, typically) drains, and wait for it before reading the scores.
  return detail::launch_kernel(kernel, dim3(lists), dim3(detail::kSelectThreads), smem, stream,
                               has_pdl, p) == cudaSuccess
             ? Status::kOk
             : Status::kCudaError;
}

}  // namespace

Status select_blocks(const SelectBlocksParams& params, cudaStream_t stream) {
  if (!valid_params(params)) return Status::kInvalidArgument;
  if (params.batch_size == 0) return Status::kOk;
  if (static_cast<int64_t>(params.batch_size) * params.num_lists > INT32_MAX) {
    return Status::kUnsupported;
  }
  // Rows staged in shared memory where they fit (GPUs with less shared memory per CTA than
  // the H100/H200 fall back to the global-row path for the longest staged rows).
  if (params.num_blocks <= detail::kSelectSmemBlocks) {
    const Status staged = launch<true>(params, stream);
    if (staged != Status::kUnsupported) return staged;
  }
  return launch<false>(params, stream);
}

}  // namespace dustin
