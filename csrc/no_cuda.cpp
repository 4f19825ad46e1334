// SPDX-License-Identifier: Apache-2.0
// The CUDA entry points of a libdustin built without CUDA: each reports kUnsupported.
#include "dustin/dustin.h"

namespace dustin {

Status sparse_verify(const SparseVerifyParams&, cudaStream_t) { return Status::kUnsupported; }
size_t sparse_verify_workspace_bytes(const SparseVerifyParams&) { return 0; }
Status block_scores(const BlockScoresParams&, cudaStream_t) { return Status::kUnsupported; }
size_t block_scores_workspace_bytes(const BlockScoresParams&) { return 0; }
Status select_blocks(const SelectBlocksParams&, cudaStream_t) { return Status::kUnsupported; }
Status store_kv(const StoreKVParams&, cudaStream_t) { return Status::kUnsupported; }
Status decode_linear(const DecodeLinearParams&, cudaStream_t) { return Status::kUnsupported; }

}  // namespace dustin
