// SPDX-License-Identifier: Apache-2.0
// The public C++ API of libdustin: one function per op over raw pointers, no PyTorch types.
//
// CUDA functions enqueue on `stream` and never synchronise or allocate, so they can be captured
// in a CUDA graph. CPU functions (namespace dustin::cpu) compute the same contract on host
// memory; they are the reference every kernel is tested against. All return a Status and never
// throw; docs/ops.md gives the full contracts.
#pragma once

#include <cstddef>

#include "dustin/block_scores_params.h"
#include "dustin/decode_linear_params.h"
#include "dustin/select_blocks_params.h"
#include "dustin/sparse_verify_params.h"
#include "dustin/status.h"
#include "dustin/store_kv_params.h"
#include "dustin/types.h"

/// Marks the functions libdustin exports; everything else in it is hidden.
#if defined(__GNUC__)
#define DUSTIN_API __attribute__((visibility("default")))
#else
#define DUSTIN_API
#endif

namespace dustin {

/// True when this build of libdustin contains the CUDA kernels.
DUSTIN_API bool built_with_cuda();

/// Fused gather-and-attend verification on the GPU (out, lse written; see SparseVerifyParams).
DUSTIN_API Status sparse_verify(const SparseVerifyParams& params, cudaStream_t stream);
/// Workspace bytes that let sparse_verify split long block lists across thread blocks on the
/// current device; 0 when no split would be used. Reads device attributes, never device memory.
DUSTIN_API size_t sparse_verify_workspace_bytes(const SparseVerifyParams& params);

/// Block importance from retrieval heads on the GPU, accumulated into params.scores.
DUSTIN_API Status block_scores(const BlockScoresParams& params, cudaStream_t stream);
/// Workspace bytes block_scores needs for its softmax statistics (it fails without them).
DUSTIN_API size_t block_scores_workspace_bytes(const BlockScoresParams& params);

/// Budgeted block selection on the GPU, one launch.
DUSTIN_API Status select_blocks(const SelectBlocksParams& params, cudaStream_t stream);

/// Writes a window's keys and values into one layer's paged cache on the GPU, one launch.
/// Entries with a page or slot out of range are skipped.
DUSTIN_API Status store_kv(const StoreKVParams& params, cudaStream_t stream);

/// The linear layer of a decode step (at most 16 rows) on the GPU, one launch; kUnsupported
/// unless decode_linear_vectorizable(params) and the dtype is 16-bit.
DUSTIN_API Status decode_linear(const DecodeLinearParams& params, cudaStream_t stream);

namespace cpu {
/// CPU twins: same params, host pointers, same results (up to float rounding for attention;
/// bit-identical for select_blocks and store_kv). Workspace fields are ignored.
DUSTIN_API Status sparse_verify(const SparseVerifyParams& params);
DUSTIN_API Status block_scores(const BlockScoresParams& params);
DUSTIN_API Status select_blocks(const SelectBlocksParams& params);
/// Bit-identical to the kernel (a copy); returns kInvalidArgument, writing nothing, when a
/// page or slot is out of range.
DUSTIN_API Status store_kv(const StoreKVParams& params);
DUSTIN_API Status decode_linear(const DecodeLinearParams& params);
}  // namespace cpu

}  // namespace dustin
