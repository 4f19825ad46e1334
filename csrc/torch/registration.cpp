// SPDX-License-Identifier: Apache-2.0
// The only TORCH_LIBRARY(dustin): schemas, CPU/CUDA/Meta registrations, and the pybind11 module.
#include <torch/extension.h>
#include <torch/library.h>

#include "dustin/dispatch.h"
#include "dustin/dustin.h"
#include "torch/ops.h"

namespace ops = dustin::torch_ops;

TORCH_LIBRARY(dustin, m) {
  m.def(
      "sparse_verify(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, "
      "Tensor kv_lens, Tensor block_ids, Tensor block_counts, float sm_scale, "
      "str kv_layout=\"HND\") -> (Tensor out, Tensor lse)");
  m.def(
      "sparse_verify_out(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, "
      "Tensor kv_lens, Tensor block_ids, Tensor block_counts, float sm_scale, str kv_layout, "
      "Tensor(a!) out, Tensor(b!) lse, Tensor(c!)? workspace=None) -> ()");
  m.def(
      "block_scores(Tensor q_srh, Tensor k_cache, Tensor block_table, Tensor kv_lens, "
      "Tensor head_map, float sm_scale, int block_size, str kv_layout, Tensor(a!) scores, "
      "Tensor(b!)? workspace=None) -> ()");
  m.def(
      "select_blocks(Tensor draft_scores, Tensor? target_scores, Tensor kv_lens, int q_len, "
      "int block_size, int budget_blocks, int n_sink, int n_recent, float draft_share) "
      "-> (Tensor block_ids, Tensor block_counts)");
  m.def(
      "select_blocks_out(Tensor draft_scores, Tensor? target_scores, Tensor kv_lens, "
      "int q_len, int block_size, int budget_blocks, int n_sink, int n_recent, "
      "float draft_share, Tensor(a!) block_ids, Tensor(b!) block_counts) -> ()");
  m.def(
      "store_kv(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor pages, "
      "Tensor slots, str kv_layout=\"HND\") -> ()");
  m.def(
      "decode_linear(Tensor x, Tensor weight, Tensor? bias=None, bool gated=False, "
      "Tensor? norm_weight=None, float norm_eps=1e-6, Tensor? residual=None, "
      "Tensor? rope_cos=None, Tensor? rope_sin=None, int rope_columns=0) -> Tensor");
}

// One adapter per op serves both devices: it checks arguments, fills the params struct and
// calls the CPU twin or the CUDA kernel by the tensors' device.
TORCH_LIBRARY_IMPL(dustin, CPU, m) {
  m.impl("sparse_verify", &ops::sparse_verify);
  m.impl("sparse_verify_out", &ops::sparse_verify_out);
  m.impl("block_scores", &ops::block_scores);
  m.impl("select_blocks", &ops::select_blocks);
  m.impl("select_blocks_out", &ops::select_blocks_out);
  m.impl("store_kv", &ops::store_kv);
  m.impl("decode_linear", &ops::decode_linear);
}

TORCH_LIBRARY_IMPL(dustin, CUDA, m) {
  m.impl("sparse_verify", &ops::sparse_verify);
  m.impl("sparse_verify_out", &ops::sparse_verify_out);
  m.impl("block_scores", &ops::block_scores);
  m.impl("select_blocks", &ops::select_blocks);
  m.impl("select_blocks_out", &ops::select_blocks_out);
  m.impl("store_kv", &ops::store_kv);
  m.impl("decode_linear", &ops::decode_linear);
}

TORCH_LIBRARY_IMPL(dustin, Meta, m) {
  m.impl("sparse_verify", &ops::sparse_verify_meta);
  m.impl("sparse_verify_out", &ops::sparse_verify_out_meta);
  m.impl("block_scores", &ops::block_scores_meta);
  m.impl("select_blocks", &ops::select_blocks_meta);
  m.impl("select_blocks_out", &ops::select_blocks_out_meta);
  m.impl("store_kv", &ops::store_kv_meta);
  m.impl("decode_linear", &ops::decode_linear_meta);
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "dustin native extension: registers torch.ops.dustin.* and exports build facts";
  m.def("built_with_cuda", &dustin::built_with_cuda,
        "True when libdustin was built with its CUDA kernels");
  m.def("sparse_verify_workspace_bytes", &ops::sparse_verify_workspace_bytes,
        "Workspace bytes sparse_verify_out needs to split block lists on the current device");
  m.def("select_capacity", &dustin::select_capacity, pybind11::arg("num_blocks"),
        pybind11::arg("budget_blocks"), pybind11::arg("n_sink"), pybind11::arg("n_recent"),
        pybind11::arg("q_len"), pybind11::arg("block_size"),
        "Capacity K of each select_blocks list (docs/ops.md)");
  m.def("validate_sparse_verify", &ops::validate_sparse_verify,
        "Checks sparse_verify's arguments, values included (copied to the host)");
  m.def("validate_block_scores", &ops::validate_block_scores,
        "Checks block_scores' arguments, values included (copied to the host)");
  m.def("validate_select_blocks", &ops::validate_select_blocks,
        "Checks select_blocks' arguments, values included (copied to the host)");
  m.def("validate_store_kv", &ops::validate_store_kv,
        "Checks store_kv's arguments, values included (copied to the host)");
  pybind11::dict supported;
  supported["head_dims"] = pybind11::make_tuple(dustin::kSupportedHeadDims[0],
                                                dustin::kSupportedHeadDims[1]);
  supported["max_group_size"] = dustin::kMaxGroupSize;
  supported["max_query_len"] = dustin::kMaxQueryLen;
  supported["max_score_rows"] = dustin::kMaxScoreRows;
  supported["decode_linear_max_rows"] = dustin::kDecodeLinearMaxRows;
  supported["decode_linear_max_normed_k"] = dustin::kDecodeLinearMaxNormedK;
  supported["page_sizes"] = pybind11::make_tuple(dustin::kMinPageSize, dustin::kMaxPageSize);
  supported["cuda_dtypes"] = pybind11::make_tuple("float16", "bfloat16");
  supported["cpu_dtypes"] = pybind11::make_tuple("float32", "float16", "bfloat16");
  m.attr("SUPPORTED") = supported;
}
