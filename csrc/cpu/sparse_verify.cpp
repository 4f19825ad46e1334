// SPDX-License-Identifier: Apache-2.0
// CPU twin of sparse_verify: window attention over listed KV blocks, online softmax in float.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu_common.h"
#include "dustin/dustin.h"

namespace dustin::cpu {
namespace {

using detail::kv_row;
using detail::load_row;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
/// Tokens whose K and V are converted to float and processed together; a 64-token tile of K,
/// of V and of the scores of 16 x 16 query rows stays in L2.
constexpr int32_t kTileTokens = 64;
/// Register block of the matrix products: 4 query rows x 16 floats (16 accumulator vectors
/// with SSE, 8 with AVX2, 4 with AVX-512). Rows and D are padded to these multiples.
constexpr int32_t kRowBlock = 4;
constexpr int32_t kColBlock = 16;
/// Tasks the (sequence, KV head) pairs are split into when there are few of them. Fixed, not
/// taken from the thread count, so results do not depend on how many threads run.
constexpr int32_t kTargetTasks = 64;
/// Fewest tokens a split covers, so per-split setup and merging stay negligible.
constexpr int32_t kMinSplitTokens = 512;

int32_t round_up(int32_t x, int32_t multiple) { return (x + multiple - 1) / multiple * multiple; }

/// One unit of parallel work: the attended blocks [begin, end) of the list of (b, h).
struct Task {
  int32_t b;
  int32_t h;
  int32_t begin;
  int32_t end;
};

/// Online-softmax state of the padded query rows of one task: row r = i * G + g.
struct RowState {
  float* o;  // [rows_pad, d_pad] unnormalised output
  float* m;  // [rows_pad] running max of the scaled scores
  float* l;  // [rows_pad] running sum of exp(score - m)
};

/// Scratch of one thread. Padding rows and columns are zero from allocation on and never
/// written, so they contribute nothing.
struct Scratch {
  int32_t rows_pad;
  int32_t d_pad;
  std::vector<float> q;          // [rows_pad, d_pad] query rows pre-scaled by sm_scale
  std::vector<float> kt;         // [d_pad, kTileTokens] K tile, transposed
  std::vector<float> v;          // [kTileTokens, d_pad] V tile
  std::vector<float> s;          // [rows_pad, kTileTokens] scores, then probabilities
  std::vector<float> alpha;      // [rows_pad] rescale of each row's output for this tile
  std::vector<float> row;        // [D] one converted K row
  std::vector<int32_t> pos;      // [kTileTokens] absolute position of each tile token
  std::vector<int32_t> row_pos;  // [rows_pad] absolute position of each query row

  Scratch(int32_t rows, int32_t head_dim)
      : rows_pad(round_up(rows, kRowBlock)),
        d_pad(round_up(head_dim, kColBlock)),
        q(static_cast<size_t>(rows_pad) * d_pad),
        kt(static_cast<size_t>(d_pad) * kTileTokens),
        v(static_cast<size_t>(kTileTokens) * d_pad),
        s(static_cast<size_t>(rows_pad) * kTileTokens),
        alpha(static_cast<size_t>(rows_pad)),
        row(static_cast<size_t>(head_dim)),
        pos(kTileTokens),
        row_pos(static_cast<size_t>(rows_pad)) {}
};

bool valid_params(const SparseVerifyParams& p) {
  const PagedKV& kv = p.kv;
  if (p.batch_size < 0 || p.q_len < 1 || p.num_qo_heads < 1 || kv.num_kv_heads < 1 ||
      p.num_qo_heads % kv.num_kv_heads != 0 || p.max_blocks < 0 ||
      (p.num_lists != 1 && p.num_lists != kv.num_kv_heads) || !std::isfinite(p.sm_scale)) {
    return false;
  }
  if (p.batch_size == 0) return true;
  if (p.q == nullptr || p.out == nullptr || p.lse == nullptr || p.block_ids == nullptr ||
      p.block_counts == nullptr ||
      !detail::valid_paged_kv(kv, /*needs_v=*/true, p.batch_size, p.q_len)) {
    return false;
  }
  for (int32_t b = 0; b < p.batch_size; ++b) {
    const int32_t nblk = num_blocks_for(kv.kv_lens[b], kv.page_size);
    for (int32_t s = 0; s < p.num_lists; ++s) {
      const int32_t count = p.block_counts[b * p.block_counts_stride_b + s];
      if (count < 0 || count > p.max_blocks) return false;
      const int32_t* ids = p.block_ids + b * p.block_ids_stride_b + s * p.block_ids_stride_s;
      for (int32_t j = 0; j < count; ++j) {
        if (ids[j] < 0 || ids[j] >= nblk || (j > 0 && ids[j] <= ids[j - 1])) return false;
      }
    }
  }
  return true;
}

/// The blocks list s of sequence b attends, ascending: listed ids before the window, then every
/// block of the window.
std::vector<int32_t> attended_blocks(const SparseVerifyParams& p, int32_t b, int32_t s) {
  const int32_t kv_len = p.kv.kv_lens[b];
  const int32_t first_window = first_window_block(kv_len, p.q_len, p.kv.page_size);
  const int32_t nblk = num_blocks_for(kv_len, p.kv.page_size);
  const int32_t count = p.block_counts[b * p.block_counts_stride_b + s];
  const int32_t* ids = p.block_ids + b * p.block_ids_stride_b + s * p.block_ids_stride_s;
  std::vector<int32_t> blocks;
  blocks.reserve(static_cast<size_t>(count) + static_cast<size_t>(nblk - first_window));
  for (int32_t j = 0; j < count && ids[j] < first_window; ++j) blocks.push_back(ids[j]);
  for (int32_t blk = first_window; blk < nblk; ++blk) blocks.push_back(blk);
  return blocks;
}

/// kColBlock floats as one GCC/Clang vector: each operation on it compiles to 4 SSE, 2 AVX or
/// 1 AVX-512 instruction, whichever instruction set run_task was compiled for. Float alignment
/// and may_alias let it load from and store to any float array.
typedef float FloatBlock
    __attribute__((vector_size(kColBlock * sizeof(float)), aligned(alignof(float)), may_alias));

DUSTIN_CPU_INLINE const FloatBlock& block_at(const float* p) {
  return *reinterpret_cast<const FloatBlock*>(p);
}
DUSTIN_CPU_INLINE FloatBlock& block_at(float* p) { return *reinterpret_cast<FloatBlock*>(p); }

/// s[r, c] = q[r, :] . kt[:, c] for kRowBlock rows and kColBlock tokens, in registers.
DUSTIN_CPU_INLINE void scores_block(const float* q, const float* kt, float* s, int32_t d_pad) {
  FloatBlock acc[kRowBlock] = {};
  for (int32_t d = 0; d < d_pad; ++d) {
    const FloatBlock k = block_at(kt + static_cast<size_t>(d) * kTileTokens);
    for (int32_t r = 0; r < kRowBlock; ++r) acc[r] += q[static_cast<size_t>(r) * d_pad + d] * k;
  }
  for (int32_t r = 0; r < kRowBlock; ++r)
    block_at(s + static_cast<size_t>(r) * kTileTokens) = acc[r];
}

/// o[r, cols] = alpha[r] * o[r, cols] + sum_t p[r, t] v[t, cols] for kRowBlock rows and
/// kColBlock output columns, in registers.
DUSTIN_CPU_INLINE void output_block(const float* p, const float* v, const float* alpha, float* o,
                                    int32_t n, int32_t d_pad) {
  FloatBlock acc[kRowBlock];
  for (int32_t r = 0; r < kRowBlock; ++r) {
    acc[r] = alpha[r] * block_at(o + static_cast<size_t>(r) * d_pad);
  }
  for (int32_t t = 0; t < n; ++t) {
    const FloatBlock vt = block_at(v + static_cast<size_t>(t) * d_pad);
    for (int32_t r = 0; r < kRowBlock; ++r)
      acc[r] += p[static_cast<size_t>(r) * kTileTokens + t] * vt;
  }
  for (int32_t r = 0; r < kRowBlock; ++r) block_at(o + static_cast<size_t>(r) * d_pad) = acc[r];
}

/// Folds the n tokens of the current tile into every row's online-softmax state.
DUSTIN_CPU_INLINE void attend_tile_body(Scratch& sc, int32_t n, RowState st) {
  const int32_t rows_pad = sc.rows_pad;
  const int32_t d_pad = sc.d_pad;
  const int32_t cols = round_up(n, kColBlock);
  for (int32_t r = 0; r < rows_pad; r += kRowBlock) {
    for (int32_t c = 0; c < cols; c += kColBlock) {
      scores_block(sc.q.data() + static_cast<size_t>(r) * d_pad, sc.kt.data() + c,
                   sc.s.data() + static_cast<size_t>(r) * kTileTokens + c, d_pad);
    }
  }
  // Causal mask (only window tokens can lie past a query's position), then the online softmax.
  const bool needs_mask = sc.pos[n - 1] > sc.row_pos[0];
  for (int32_t r = 0; r < rows_pad; ++r) {
    float* srow = sc.s.data() + static_cast<size_t>(r) * kTileTokens;
    if (needs_mask) {
      for (int32_t c = 0; c < n; ++c) srow[c] = sc.pos[c] > sc.row_pos[r] ? kNegInf : srow[c];
    }
    float tile_max = kNegInf;
    for (int32_t c = 0; c < n; ++c) tile_max = std::max(tile_max, srow[c]);
    const float m_new = std::max(st.m[r], tile_max);
    if (m_new == kNegInf) {  // nothing visible to this row yet
      sc.alpha[r] = 1.f;
      std::fill(srow, srow + n, 0.f);
      continue;
    }
    float sum = 0.f;
    for (int32_t c = 0; c < n; ++c) {
      srow[c] = detail::exp_approx(srow[c] - m_new);
      sum += srow[c];
    }
    sc.alpha[r] = detail::exp_approx(st.m[r] - m_new);
    st.m[r] = m_new;
    st.l[r] = st.l[r] * sc.alpha[r] + sum;
  }
  for (int32_t r = 0; r < rows_pad; r += kRowBlock) {
    for (int32_t c = 0; c < d_pad; c += kColBlock) {
      output_block(sc.s.data() + static_cast<size_t>(r) * kTileTokens, sc.v.data() + c,
                   sc.alpha.data() + r, st.o + static_cast<size_t>(r) * d_pad + c, n, d_pad);
    }
  }
}

/// Runs one task: its blocks, tile by tile, into st (initialised here).
DUSTIN_CPU_INLINE void run_task_body(const SparseVerifyParams& p, const Task& task,
                                     const std::vector<int32_t>& blocks, Scratch& sc, RowState st) {
  const PagedKV& kv = p.kv;
  const int32_t group = p.num_qo_heads / kv.num_kv_heads;
  const int32_t head_dim = kv.head_dim;
  const int32_t d_pad = sc.d_pad;
  const int32_t kv_len = kv.kv_lens[task.b];
  const size_t elem = detail::dtype_size(kv.dtype);

  // Padding rows repeat the last query position and keep q = 0: finite, and ignored.
  for (int32_t r = 0; r < sc.rows_pad; ++r) sc.row_pos[r] = kv_len - 1;
  for (int32_t i = 0; i < p.q_len; ++i) {
    for (int32_t g = 0; g < group; ++g) {
      const int32_t r = i * group + g;
      sc.row_pos[r] = kv_len - p.q_len + i;
      const int64_t offset =
          task.b * p.q_stride_b + i * p.q_stride_t + (task.h * group + g) * p.q_stride_h;
      float* qrow = sc.q.data() + static_cast<size_t>(r) * d_pad;
      load_row(static_cast<const char*>(p.q) + offset * static_cast<int64_t>(elem), kv.dtype,
               head_dim, qrow);
      for (int32_t d = 0; d < head_dim; ++d) qrow[d] *= p.sm_scale;
    }
  }
  std::fill(st.o, st.o + static_cast<size_t>(sc.rows_pad) * d_pad, 0.f);
  std::fill(st.m, st.m + sc.rows_pad, kNegInf);
  std::fill(st.l, st.l + sc.rows_pad, 0.f);

  const int32_t* table = kv.block_table + task.b * kv.block_table_stride;
  int32_t n = 0;
  for (int32_t j = task.begin; j < task.end; ++j) {
    const int32_t blk = blocks[j];
    const int32_t page = table[blk];
    const int32_t tokens = std::min(kv.page_size, kv_len - blk * kv.page_size);
    for (int32_t t = 0; t < tokens; ++t) {
      load_row(kv_row(kv.k, kv, page, task.h, t), kv.dtype, head_dim, sc.row.data());
      for (int32_t d = 0; d < head_dim; ++d) {
        sc.kt[static_cast<size_t>(d) * kTileTokens + n] = sc.row[d];
      }
      load_row(kv_row(kv.v, kv, page, task.h, t), kv.dtype, head_dim,
               sc.v.data() + static_cast<size_t>(n) * d_pad);
      sc.pos[n] = blk * kv.page_size + t;
      if (++n == kTileTokens) {
        attend_tile_body(sc, n, st);
        n = 0;
      }
    }
  }
  if (n > 0) attend_tile_body(sc, n, st);
}

using RunTask = void (*)(const SparseVerifyParams&, const Task&, const std::vector<int32_t>&,
                         Scratch&, RowState);

void run_task_baseline(const SparseVerifyParams& p, const Task& task,
                       const std::vector<int32_t>& blocks, Scratch& sc, RowState st) {
  run_task_body(p, task, blocks, sc, st);
}
#if defined(DUSTIN_CPU_MULTIVERSION)
DUSTIN_TARGET_AVX2 void run_task_avx2(const SparseVerifyParams& p, const Task& task,
                                      const std::vector<int32_t>& blocks, Scratch& sc,
                                      RowState st) {
  run_task_body(p, task, blocks, sc, st);
}
DUSTIN_TARGET_AVX512 void run_task_avx512(const SparseVerifyParams& p, const Task& task,
                                          const std::vector<int32_t>& blocks, Scratch& sc,
                                          RowState st) {
  run_task_body(p, task, blocks, sc, st);
}
#endif

/// run_task compiled for the widest vectors this CPU has.
RunTask pick_run_task() {
  switch (detail::detect_cpu_isa()) {
#if defined(DUSTIN_CPU_MULTIVERSION)
    case detail::CpuIsa::kAvx512Fma:
      return run_task_avx512;
    case detail::CpuIsa::kAvx2Fma:
      return run_task_avx2;
#endif
    default:
      return run_task_baseline;
  }
}

}  // namespace

Status sparse_verify(const SparseVerifyParams& p) {
  if (!valid_params(p)) return Status::kInvalidArgument;
  if (p.batch_size == 0) return Status::kOk;
  static const RunTask run_task = pick_run_task();
  const PagedKV& kv = p.kv;
  const int32_t num_heads = kv.num_kv_heads;
  const int32_t group = p.num_qo_heads / num_heads;
  const int32_t rows = group * p.q_len;
  const int32_t head_dim = kv.head_dim;
  const int32_t rows_pad = round_up(rows, kRowBlock);
  const int32_t d_pad = round_up(head_dim, kColBlock);

  // Attended blocks per (b, list), then tasks: each (b, h) split into ~equal runs of blocks.
  std::vector<std::vector<int32_t>> blocks(static_cast<size_t>(p.batch_size) * p.num_lists);
  for (int32_t b = 0; b < p.batch_size; ++b) {
    for (int32_t s = 0; s < p.num_lists; ++s)
      blocks[b * p.num_lists + s] = attended_blocks(p, b, s);
  }
  const int32_t pairs = p.batch_size * num_heads;
  const int32_t wanted_splits = std::max(1, (kTargetTasks + pairs - 1) / pairs);
  const int32_t min_split_blocks = std::max(1, kMinSplitTokens / kv.page_size);
  std::vector<Task> tasks;
  std::vector<int32_t> first_task(static_cast<size_t>(pairs) + 1);
  for (int32_t b = 0; b < p.batch_size; ++b) {
    for (int32_t h = 0; h < num_heads; ++h) {
      first_task[b * num_heads + h] = static_cast<int32_t>(tasks.size());
      const int32_t list = p.num_lists == 1 ? 0 : h;
      const int32_t nb = static_cast<int32_t>(blocks[b * p.num_lists + list].size());
      const int32_t splits = std::max(1, std::min(wanted_splits, nb / min_split_blocks));
      for (int32_t k = 0; k < splits; ++k) {
        tasks.push_back({b, h, static_cast<int32_t>(static_cast<int64_t>(nb) * k / splits),
                         static_cast<int32_t>(static_cast<int64_t>(nb) * (k + 1) / splits)});
      }
    }
  }
  first_task[pairs] = static_cast<int32_t>(tasks.size());

  const size_t o_floats = static_cast<size_t>(rows_pad) * d_pad;
  const size_t state_floats = o_floats + 2 * static_cast<size_t>(rows_pad);
  std::vector<float> partials(tasks.size() * state_floats);
  auto state_of = [&](size_t task) {
    float* base = partials.data() + task * state_floats;
    return RowState{base, base + o_floats, base + o_floats + rows_pad};
  };

#pragma omp parallel
  {
    Scratch sc(rows, head_dim);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < static_cast<int64_t>(tasks.size()); ++t) {
      const Task& task = tasks[t];
      const int32_t list = p.num_lists == 1 ? 0 : task.h;
      run_task(p, task, blocks[task.b * p.num_lists + list], sc, state_of(t));
    }

    // Merge the splits of each (b, h) in split order and write out and lse.
    std::vector<float> acc(static_cast<size_t>(head_dim));
#pragma omp for schedule(static)
    for (int32_t pair = 0; pair < pairs; ++pair) {
      const int32_t b = pair / num_heads;
      const int32_t h = pair % num_heads;
      for (int32_t r = 0; r < rows; ++r) {
        float m_max = kNegInf;
        for (int32_t t = first_task[pair]; t < first_task[pair + 1]; ++t) {
          m_max = std::max(m_max, state_of(t).m[r]);
        }
        float l_sum = 0.f;
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int32_t t = first_task[pair]; t < first_task[pair + 1]; ++t) {
          const RowState st = state_of(t);
          if (st.m[r] == kNegInf) continue;
          const float w = std::exp(st.m[r] - m_max);
          l_sum += st.l[r] * w;
          const float* orow = st.o + static_cast<size_t>(r) * d_pad;
          for (int32_t d = 0; d < head_dim; ++d) acc[d] += orow[d] * w;
        }
        const float inv_l = 1.f / l_sum;
        for (int32_t d = 0; d < head_dim; ++d) acc[d] *= inv_l;
        const int32_t i = r / group;
        const int32_t hq = h * group + r % group;
        const int64_t out_row = (static_cast<int64_t>(b) * p.q_len + i) * p.num_qo_heads + hq;
        const int64_t out_bytes = static_cast<int64_t>(detail::dtype_size(kv.dtype)) * head_dim;
        detail::store_row(acc.data(), kv.dtype, head_dim,
                          static_cast<char*>(p.out) + out_row * out_bytes);
        p.lse[out_row] = m_max + std::log(l_sum);
      }
    }
  }
  return Status::kOk;
}

}  // namespace dustin::cpu
