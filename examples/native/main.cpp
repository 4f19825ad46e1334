// SPDX-License-Identifier: Apache-2.0
// How a native server drives libdustin: select blocks from scores, then verify a window over
// them, on the CPU twins (the GPU entry points take the same params with device pointers).
// Exits non-zero when a result disagrees with the plain loops written here.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "dustin/dustin.h"

namespace {

constexpr int kBatch = 2, kQueryLen = 3, kQoHeads = 4, kKvHeads = 2, kHeadDim = 64;
constexpr int kPageSize = 16, kMaxPages = 8;
constexpr float kTolerance = 1e-4f;

// HND cache: [num_pages, Hkv, P, D] in float32; page i of sequence b is physical page b*kMaxPages + i.
struct Problem {
  std::vector<float> q, k, v;
  std::vector<int32_t> block_table, kv_lens{100, 37};
  std::vector<float> draft_scores, target_scores;

  explicit Problem(std::mt19937& rng) {
    std::normal_distribution<float> normal;
    q.resize(size_t(kBatch) * kQueryLen * kQoHeads * kHeadDim);
    k.resize(size_t(kBatch) * kMaxPages * kKvHeads * kPageSize * kHeadDim);
    v.resize(k.size());
    for (auto* t : {&q, &k, &v})
      for (float& x : *t) x = normal(rng);
    for (int i = 0; i < kBatch * kMaxPages; ++i) block_table.push_back(i);
    draft_scores.resize(size_t(kBatch) * kMaxPages);
    target_scores.resize(draft_scores.size());
    for (auto* t : {&draft_scores, &target_scores})
      for (float& x : *t) x = normal(rng);
  }

  dustin::PagedKV kv(const float* k_ptr, const float* v_ptr, const int32_t* table,
                     const int32_t* lens) const {
    dustin::PagedKV p;
    p.k = k_ptr;
    p.v = v_ptr;
    p.block_table = table;
    p.kv_lens = lens;
    p.head_stride = int64_t(kPageSize) * kHeadDim;
    p.token_stride = kHeadDim;
    p.page_stride = kKvHeads * p.head_stride;
    p.block_table_stride = kMaxPages;
    p.num_pages = kBatch * kMaxPages;
    p.page_size = kPageSize;
    p.num_kv_heads = kKvHeads;
    p.head_dim = kHeadDim;
    p.max_pages = kMaxPages;
    p.layout = dustin::KvLayout::kHND;
    p.dtype = dustin::DType::kFloat32;
    return p;
  }
};

// Plain loops: attention of query t, head h of sequence b over the given logical blocks.
void reference_attention(const Problem& pb, int b, const std::vector<int32_t>& blocks,
                         std::vector<float>& out) {
  const int group = kQoHeads / kKvHeads;
  const float scale = 1.f / std::sqrt(float(kHeadDim));
  const int kv_len = pb.kv_lens[b];
  for (int t = 0; t < kQueryLen; ++t) {
    const int pos = kv_len - kQueryLen + t;
    for (int h = 0; h < kQoHeads; ++h) {
      const float* qv = &pb.q[((size_t(b) * kQueryLen + t) * kQoHeads + h) * kHeadDim];
      std::vector<double> acc(kHeadDim, 0.0);
      double mx = -INFINITY, denom = 0.0;
      std::vector<std::pair<double, const float*>> logits;
      for (int blk : blocks)
        for (int i = 0; i < kPageSize; ++i) {
          const int p = blk * kPageSize + i;
          if (p > pos) continue;
          const size_t off =
              ((size_t(b * kMaxPages + blk) * kKvHeads + h / group) * kPageSize + i) * kHeadDim;
          double s = 0;
          for (int d = 0; d < kHeadDim; ++d) s += double(qv[d]) * pb.k[off + d];
          logits.push_back({s * scale, &pb.v[off]});
          mx = std::max(mx, s * scale);
        }
      for (auto& [s, vv] : logits) {
        const double w = std::exp(s - mx);
        denom += w;
        for (int d = 0; d < kHeadDim; ++d) acc[d] += w * vv[d];
      }
      float* o = &out[((size_t(b) * kQueryLen + t) * kQoHeads + h) * kHeadDim];
      for (int d = 0; d < kHeadDim; ++d) o[d] = float(acc[d] / denom);
    }
  }
}

bool check(const char* what, dustin::Status s) {
  if (s != dustin::Status::kOk) std::printf("%s failed: %s\n", what, dustin::status_string(s));
  return s == dustin::Status::kOk;
}

float max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  float m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(a[i] - b[i]));
  return m;
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  Problem pb(rng);

  // 1. Select a 3-block budget per sequence: sinks, recent + window, then draft and target.
  const int nb = kMaxPages;
  const int capacity = dustin::select_capacity(nb, 3, 4, 16, kQueryLen, kPageSize);
  std::vector<int32_t> block_ids(size_t(kBatch) * capacity), block_counts(kBatch);
  dustin::SelectBlocksParams sel;
  sel.draft_scores = pb.draft_scores.data();
  sel.target_scores = pb.target_scores.data();
  sel.draft_stride_b = sel.target_stride_b = nb;
  sel.draft_stride_h = sel.target_stride_h = nb;
  sel.kv_lens = pb.kv_lens.data();
  sel.block_ids = block_ids.data();
  sel.block_counts = block_counts.data();
  sel.batch_size = kBatch;
  sel.num_lists = 1;
  sel.num_blocks = nb;
  sel.capacity = capacity;
  sel.q_len = kQueryLen;
  sel.block_size = kPageSize;
  sel.budget_blocks = 3;
  sel.n_sink = 4;
  sel.n_recent = 16;
  sel.draft_share = 0.5;
  if (!check("select_blocks", dustin::cpu::select_blocks(sel))) return 1;

  // 2. Verify the window over the selection.
  std::vector<float> out(pb.q.size()), lse(size_t(kBatch) * kQueryLen * kQoHeads);
  dustin::SparseVerifyParams vp;
  vp.q = pb.q.data();
  vp.q_stride_h = kHeadDim;
  vp.q_stride_t = int64_t(kQoHeads) * kHeadDim;
  vp.q_stride_b = kQueryLen * vp.q_stride_t;
  vp.out = out.data();
  vp.lse = lse.data();
  vp.kv = pb.kv(pb.k.data(), pb.v.data(), pb.block_table.data(), pb.kv_lens.data());
  vp.block_ids = block_ids.data();
  vp.block_counts = block_counts.data();
  vp.block_ids_stride_b = capacity;
  vp.block_ids_stride_s = capacity;
  vp.block_counts_stride_b = 1;
  vp.batch_size = kBatch;
  vp.q_len = kQueryLen;
  vp.num_qo_heads = kQoHeads;
  vp.num_lists = 1;
  vp.max_blocks = capacity;
  vp.sm_scale = 1.f / std::sqrt(float(kHeadDim));
  if (!check("sparse_verify (CPU)", dustin::cpu::sparse_verify(vp))) return 1;

  // 3. The same with plain loops over the union of the list and the window's blocks.
  std::vector<float> expected(out.size());
  for (int b = 0; b < kBatch; ++b) {
    const int first_window = dustin::first_window_block(pb.kv_lens[b], kQueryLen, kPageSize);
    const int nblk = dustin::num_blocks_for(pb.kv_lens[b], kPageSize);
    std::vector<int32_t> blocks;
    std::printf("sequence %d (%d tokens): blocks", b, pb.kv_lens[b]);
    for (int i = 0; i < block_counts[b]; ++i) {
      const int id = block_ids[size_t(b) * capacity + i];
      std::printf(" %d", id);
      if (id < first_window) blocks.push_back(id);
    }
    std::printf("\n");
    for (int id = first_window; id < nblk; ++id) blocks.push_back(id);
    reference_attention(pb, b, blocks, expected);
  }
  const float cpu_err = max_abs_diff(out, expected);
  std::printf("CPU sparse_verify: max |out - loops| = %.2e\n", cpu_err);
  if (!(cpu_err < kTolerance)) return 1;

  std::printf("ok\n");
  return 0;
}
