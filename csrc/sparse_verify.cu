// SPDX-License-Identifier: Apache-2.0
// Launcher of the sparse_verify kernel: validation, tile and split-KV planning, dispatch.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "dustin/dispatch.h"
#include "dustin/dustin.h"
#include "dustin/sparse_verify.cuh"
#include "cuda_launch.h"

namespace dustin {
namespace {

/// Most partial results one output row is split into; bounds the workspace and the merge.
constexpr int kMaxSplits = 128;
/// Time model of the split planner, from the split-count sweep of bench_sparse_verify.py on the
/// H200 (B = 16, 32k, q = 5, P = 16; the sweep rows in bench/results show its fit):
/// an SM holding two or more CTAs reads KV at about 27.5 KB/us (a 64-token D = 128 tile per
/// 1.19 us, 78% of its share of the HBM ceiling); one CTA alone, whose warpgroup leaves loads
/// and its serial softmax exposed, at two thirds of that (1.77 us per tile).
constexpr double kSmBytesPerUs = 27.5e3;
constexpr double kSingleCtaThroughput = 0.67;
/// A lone CTA of two warpgroups (64-row CTAs on Hopper): a tile per 1.25-1.3 us in the same
/// benchmark's budget rows (128 to 2048 tokens, 72B B = 16), 0.9 of two CTAs' rate.
constexpr double kTwoWarpgroupThroughput = 0.9;
/// From a CTA's start to its first KV tile: two dependent loads (the list count, length and
/// first ids together, then the pages) before the first KV bytes.
constexpr double kCtaStartUs = 3.0;
/// The merge launch's tail beyond reading the partials back.
constexpr double kMergeUs = 2.0;
constexpr int kMergeThreads = 128;
constexpr int kMaxClusterSplits = detail::kMaxClusterSplits;
/// Splits of at most this many tiles each merge in a cluster. There the merge launch's tail is
/// a large part of the call; with longer splits it is not, and a cluster's CTAs, placed
/// together on one GPC, can leave SMs elsewhere idle (a 32k dense split sweep on the H200 ran
/// 0.75-0.84x as fast merged in clusters).
constexpr int kClusterMaxTiles = 16;

/// How the CTAs of one kernel instantiation fit on a device.
struct KernelFit {
  int ctas_per_sm = 1;
  /// clusters[s]: clusters of s CTAs resident at once, s = 2..kMaxClusterSplits (0: no
  /// cluster launch, e.g. before Hopper or where detail::cluster_merges is false).
  int clusters[kMaxClusterSplits + 1] = {};

  /// Cluster CTAs of a launch of `ctas` CTAs on `sms` SMs, with `splits` splits of at most
  /// `split_tiles` tiles: the splits themselves where a cluster of them fits and pays (they
  /// then merge on chip), else 1 (the merge launch, when split). A cluster's CTAs share one
  /// GPC, so fewer of them may be resident than CTAs alone: clusters are used only when they
  /// all run in as few waves as the CTAs would (on the H100, 32 clusters of four one-per-SM
  /// CTAs, 128 CTAs on 132 SMs, took a second wave: 0.58-0.79x).
  int cluster_ctas(int splits, int64_t split_tiles, int64_t ctas, int sms) const {
    const bool fits = splits >= 2 && splits <= kMaxClusterSplits && clusters[splits] > 0;
    if (!fits || split_tiles > kClusterMaxTiles) return 1;
    const int64_t slots = static_cast<int64_t>(sms) * ctas_per_sm;
    const int64_t waves = (ctas + slots - 1) / slots;
    const int64_t cluster_waves = (ctas / splits + clusters[splits] - 1) / clusters[splits];
    return cluster_waves <= waves ? splits : 1;
  }
};

/// How one call is cut into CTAs.
struct LaunchPlan {
  int row_chunks = 1;      // CTAs sharing one (b, h) when G * q exceeds 64 rows
  int num_splits = 1;      // CTAs sharing one (b, h, row chunk)'s block list
  int warpgroups = 1;      // 2: one CTA of two warpgroups per SM (64-row CTAs, Hopper)
  size_t split_bytes = 0;  // workspace per split
  int64_t max_tiles = 0;   // KV tiles of the longest possible list
  int sms = 0;
  KernelFit fit;           // of the kernel the plan launches
};

/// 16-row MMA tiles per CTA for G * q query rows. On Hopper every window of more than 16 rows
/// takes the 64-row warpgroup (wgmma) path, which reads each KV tile from shared memory once;
/// elsewhere rows are padded only to the next 16.
int m_tiles_for(int rows, bool hopper) {
  if (rows <= 16) return 1;
  return hopper || rows > 48 ? 4 : (rows + 15) / 16;
}

/// Most attended blocks any list can produce: K listed plus the window's blocks.
int64_t max_attended_slots(const SparseVerifyParams& p) {
  const int64_t page_size = p.kv.page_size;
  const int64_t window_blocks = (p.q_len - 1 + page_size - 1) / page_size + 1;
  return (static_cast<int64_t>(p.max_blocks) + window_blocks) * page_size;
}

/// Checks the contract; `need_data` also checks the pointers (workspace sizing needs none).
Status validate(const SparseVerifyParams& p, bool need_data) {
  const PagedKV& kv = p.kv;
  if (p.batch_size < 0 || p.q_len < 1 || p.num_qo_heads < 1 || kv.num_kv_heads < 1 ||
      p.num_qo_heads % kv.num_kv_heads != 0 || p.max_blocks < 0 || kv.page_size < 1 ||
      kv.max_pages < 0 || kv.num_pages < 0 || !std::isfinite(p.sm_scale) ||
      (p.num_lists != 1 && p.num_lists != kv.num_kv_heads)) {
    return Status::kInvalidArgument;
  }
  const int group = p.num_qo_heads / kv.num_kv_heads;
  if (kv.dtype == DType::kFloat32 || (kv.head_dim != 64 && kv.head_dim != 128) ||
      group > kMaxGroupSize || p.q_len > kMaxQueryLen || kv.page_size > kMaxPageSize) {
    return Status::kUnsupported;
  }
  // Tile slot indices are 32-bit in the kernel.
  if (max_attended_slots(p) + 64 >= (int64_t{1} << 31)) return Status::kUnsupported;
  if (p.batch_size == 0 || !need_data) return Status::kOk;
  if (p.q == nullptr || p.out == nullptr || p.lse == nullptr || kv.k == nullptr ||
      kv.v == nullptr || kv.block_table == nullptr || kv.kv_lens == nullptr ||
      p.block_counts == nullptr || (p.max_blocks > 0 && p.block_ids == nullptr)) {
    return Status::kInvalidArgument;
  }
  // KV tiles move in 16-byte cp.async chunks and out in 8-byte stores.
  const auto misaligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16; };
  if (misaligned(kv.k) || misaligned(kv.v) || misaligned(p.out) ||
      ((kv.page_stride | kv.head_stride | kv.token_stride) % 8) != 0) {
    return Status::kUnsupported;
  }
  return Status::kOk;
}

/// Raises the kernel's shared-memory limit and works out how its CTAs (and, on Hopper, its
/// clusters) fit on the device, once per device (host-side queries only: nothing
/// synchronises, so graph capture is safe).
template <typename T, int kHeadDim, int kMTiles, int kWarpgroups>
cudaError_t prepare_kernel(int device, bool hopper, KernelFit* fit) {
  return detail::once_per_device(device, fit, [hopper](KernelFit* found) {
    using Cfg = detail::VerifyTileConfig<kHeadDim, kMTiles, kWarpgroups>;
    const auto kernel = detail::sparse_verify_kernel<T, kHeadDim, kMTiles, kWarpgroups>;
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           Cfg::kSmemBytes);
    if (err != cudaSuccess) return err;
    *found = KernelFit{};
    int n = 0;
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, Cfg::kThreads,
                                                        Cfg::kSmemBytes);
    if (err != cudaSuccess) return err;
    found->ctas_per_sm = std::max(n, 1);
    // Left at 0 (no cluster launch) for the CTAs whose kernel merges through the workspace.
    for (int s = 2; hopper && detail::cluster_merges(kMTiles) && s <= kMaxClusterSplits; ++s) {
      err = detail::max_active_clusters(kernel, Cfg::kThreads, Cfg::kSmemBytes, s,
                                        &found->clusters[s]);
      if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
  });
}

/// Estimated microseconds of a plan with `splits` CTAs per list: the busiest SM runs its CTAs
/// in waves of `ctas_per_sm` (a lone CTA at `lone_throughput` of the rate), each wave paying a
/// CTA start; a split plan adds the fp32 partials written and read back (spread over all SMs)
/// and the merge's tail. (Short splits merge in a cluster instead, a little faster still: the
/// model keeps the launch merge's cost, whose fit it was tuned with.)
double plan_us(int64_t base_ctas, int64_t max_tiles, int splits, int sms, int ctas_per_sm,
               double tile_bytes, double split_partial_bytes, double lone_throughput) {
  const int64_t sm_ctas = (base_ctas * splits + sms - 1) / sms;
  const double cta_read_us = static_cast<double>((max_tiles + splits - 1) / splits) * tile_bytes /
                             kSmBytesPerUs;
  const auto wave_us = [&](int64_t ctas) {
    return kCtaStartUs + ctas * cta_read_us / (ctas > 1 ? 1.0 : lone_throughput);
  };
  double us = static_cast<double>(sm_ctas / ctas_per_sm) * wave_us(ctas_per_sm);
  if (sm_ctas % ctas_per_sm != 0) us += wave_us(sm_ctas % ctas_per_sm);
  if (splits > 1) us += kMergeUs + 2.0 * splits * split_partial_bytes / sms / kSmBytesPerUs;
  return us;
}

struct SplitChoice {
  int splits = 1;
  double us = 0.0;
};

/// The split count with the smallest estimated time (ties: fewer splits). Splitting pays when it
/// brings idle SMs or CTA slots to work on lists long enough to repay the merge.
SplitChoice choose_splits(int64_t base_ctas, int64_t max_tiles, int sms, int ctas_per_sm,
                          double tile_bytes, double split_partial_bytes) {
  const int limit = static_cast<int>(std::min<int64_t>(max_tiles, kMaxSplits));
  SplitChoice best;
  for (int s = 1; s <= limit; ++s) {
    const double us = plan_us(base_ctas, max_tiles, s, sms, ctas_per_sm, tile_bytes,
                              split_partial_bytes, kSingleCtaThroughput);
    if (s == 1 || us < best.us) best = {s, us};
  }
  return best;
}

template <typename T, int kHeadDim, int kMTiles>
cudaError_t make_plan(const SparseVerifyParams& p, bool hopper, LaunchPlan* plan) {
  using Cfg = detail::VerifyTileConfig<kHeadDim, kMTiles>;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  int sms = 0;
  err = detail::device_attribute<cudaDevAttrMultiProcessorCount>(device, &sms);
  if (err != cudaSuccess) return err;
  if ((err = prepare_kernel<T, kHeadDim, kMTiles, 1>(device, hopper, &plan->fit)) != cudaSuccess) {
    return err;
  }
  const int rows = p.num_qo_heads / p.kv.num_kv_heads * p.q_len;
  plan->row_chunks = (rows + Cfg::kRows - 1) / Cfg::kRows;
  const int64_t base_ctas =
      static_cast<int64_t>(p.batch_size) * p.kv.num_kv_heads * plan->row_chunks;
  const int64_t max_tiles = (max_attended_slots(p) + Cfg::kTileN - 1) / Cfg::kTileN;
  plan->split_bytes =
      static_cast<size_t>(p.batch_size) * p.q_len * p.num_qo_heads * (kHeadDim + 1) * sizeof(float);
  const double tile_bytes = Cfg::kStageElems * 2.0;
  const double split_partial_bytes = static_cast<double>(plan->split_bytes);
  const SplitChoice one = choose_splits(base_ctas, max_tiles, sms, plan->fit.ctas_per_sm,
                                        tile_bytes, split_partial_bytes);
  plan->num_splits = one.splits;
  plan->max_tiles = max_tiles;
  plan->sms = sms;
  if constexpr (kMTiles == 4) {
    // The alternative: one CTA of two warpgroups on each SM, lists split as far as that fills
    // the SMs.
    if (hopper && base_ctas <= sms) {
      const int splits = static_cast<int>(
          std::min<int64_t>({max_tiles, sms / base_ctas, int64_t{kMaxSplits}}));
      const double us = plan_us(base_ctas, max_tiles, std::max(splits, 1), sms, 1, tile_bytes,
                                split_partial_bytes, kTwoWarpgroupThroughput);
      if (us < one.us) {
        if ((err = prepare_kernel<T, kHeadDim, 4, 2>(device, hopper, &plan->fit)) != cudaSuccess) {
          return err;
        }
        plan->num_splits = std::max(splits, 1);
        plan->warpgroups = 2;
      }
    }
  }
  return cudaSuccess;
}

/// On Hopper the attention grid is a programmatic dependent of the stream's previous kernel
/// (select_blocks, store_kv, a previous layer's merge): its CTAs start as that kernel drains and
/// wait on the grid dependency before their first read.
template <typename T, int kHeadDim, int kMTiles, int kWarpgroups>
cudaError_t launch_attention(const SparseVerifyParams& p, cudaStream_t stream, bool hopper,
                             int splits, int row_chunks, int cluster_ctas) {
  using Cfg = detail::VerifyTileConfig<kHeadDim, kMTiles, kWarpgroups>;
  const int64_t ctas = static_cast<int64_t>(p.batch_size) * p.kv.num_kv_heads * splits * row_chunks;
  detail::VerifyDivisors div;
  div.row_chunks = cutlass::FastDivmod(row_chunks);
  div.splits = cutlass::FastDivmod(splits);
  div.kv_heads = cutlass::FastDivmod(p.kv.num_kv_heads);
  div.group = cutlass::FastDivmod(p.num_qo_heads / p.kv.num_kv_heads);
  div.page_size = cutlass::FastDivmod(p.kv.page_size);
  return detail::launch_kernel_clustered(
      detail::sparse_verify_kernel<T, kHeadDim, kMTiles, kWarpgroups>,
      dim3(static_cast<unsigned>(ctas)), dim3(Cfg::kThreads), Cfg::kSmemBytes, stream, hopper,
      cluster_ctas, p, div);
}

template <typename T, int kHeadDim, int kMTiles>
Status plan_and_launch(const SparseVerifyParams& p, cudaStream_t stream, bool hopper,
                       size_t* workspace_bytes) {
  LaunchPlan plan;
  if (make_plan<T, kHeadDim, kMTiles>(p, hopper, &plan) != cudaSuccess) return Status::kCudaError;
  if (workspace_bytes != nullptr) {
    *workspace_bytes = plan.num_splits > 1 ? plan.num_splits * plan.split_bytes : 0;
    return Status::kOk;
  }
  // Split only as far as the caller's workspace allows (the contract is the same whether the
  // splits then merge through it or, in a cluster, on chip).
  const size_t affordable = p.workspace == nullptr ? 0 : p.workspace_bytes / plan.split_bytes;
  int splits = static_cast<int>(std::min<size_t>(plan.num_splits, affordable));
  if (splits < 2) splits = 1;
  const int64_t ctas =
      static_cast<int64_t>(p.batch_size) * p.kv.num_kv_heads * splits * plan.row_chunks;
  const int cluster =
      plan.fit.cluster_ctas(splits, (plan.max_tiles + splits - 1) / splits, ctas, plan.sms);

  cudaError_t err;
  if constexpr (kMTiles == 4) {
    err = plan.warpgroups == 2
              ? launch_attention<T, kHeadDim, 4, 2>(p, stream, hopper, splits, plan.row_chunks,
                                                    cluster)
              : launch_attention<T, kHeadDim, 4, 1>(p, stream, hopper, splits, plan.row_chunks,
                                                    cluster);
  } else {
    err = launch_attention<T, kHeadDim, kMTiles, 1>(p, stream, hopper, splits, plan.row_chunks,
                                                    cluster);
  }
  if (err != cudaSuccess) return Status::kCudaError;
  if (splits > 1 && cluster == 1) {
    const int64_t rows = static_cast<int64_t>(p.batch_size) * p.q_len * p.num_qo_heads;
    const int64_t rows_per_cta = splits >= detail::kMergeSplitsPerCta ? 1 : kMergeThreads / 32;
    // On Hopper the merge is a programmatic dependent launch: its CTAs start while the
    // attention grid drains and wait on the grid dependency before reading the partials.
    if (detail::launch_kernel(detail::sparse_verify_merge_kernel<T, kHeadDim>,
                              dim3(static_cast<unsigned>((rows + rows_per_cta - 1) / rows_per_cta)),
                              dim3(kMergeThreads), 0, stream, hopper, p, splits) != cudaSuccess) {
      return Status::kCudaError;
    }
  }
  return Status::kOk;
}

/// Validates, then plans (workspace_bytes != null: reports the workspace and launches
/// nothing) or plans and launches.
Status dispatch(const SparseVerifyParams& p, cudaStream_t stream, size_t* workspace_bytes) {
  const Status status = validate(p, /*need_data=*/workspace_bytes == nullptr);
  if (status != Status::kOk || p.batch_size == 0) return status;
  int device = 0;
  int cc_major = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      detail::device_attribute<cudaDevAttrComputeCapabilityMajor>(device, &cc_major) != cudaSuccess) {
    return Status::kCudaError;
  }
  const int rows = p.num_qo_heads / p.kv.num_kv_heads * p.q_len;
  const bool hopper = cc_major == 9;
  const int m_tiles = m_tiles_for(rows, hopper);
  return DUSTIN_DISPATCH_DTYPE16(p.kv.dtype, [&] {
    return DUSTIN_DISPATCH_HEAD_DIM(p.kv.head_dim, [&] {
      switch (m_tiles) {
        case 1:
          return plan_and_launch<DTypeKV, kHeadDim, 1>(p, stream, hopper, workspace_bytes);
        case 2:
          return plan_and_launch<DTypeKV, kHeadDim, 2>(p, stream, hopper, workspace_bytes);
        case 3:
          return plan_and_launch<DTypeKV, kHeadDim, 3>(p, stream, hopper, workspace_bytes);
        default:
          return plan_and_launch<DTypeKV, kHeadDim, 4>(p, stream, hopper, workspace_bytes);
      }
    });
  });
}

}  // namespace

Status sparse_verify(const SparseVerifyParams& params, cudaStream_t stream) {
  return dispatch(params, stream, nullptr);
}

size_t sparse_verify_workspace_bytes(const SparseVerifyParams& params) {
  size_t bytes = 0;
  if (dispatch(params, nullptr, &bytes) != Status::kOk) return 0;
  return bytes;
}

}  // namespace dustin
