// SPDX-License-Identifier: Apache-2.0
// Host-side launch helpers of the CUDA ops: cached device attributes and programmatic
// dependent launches.
#pragma once

#include <cuda_runtime.h>

#include <mutex>
#include <utility>

namespace dustin::detail {

inline constexpr int kMaxCachedDevices = 64;

/// `compute(value)` once per device, its result kept for later calls on that device
/// (devices past kMaxCachedDevices compute every time). One cache per Compute type: a lambda
/// written inside a function template has a type of its own in every instance, so each
/// kernel instance that caches a fit this way gets its own entries.
template <typename Value, typename Compute>
cudaError_t once_per_device(int device, Value* value, Compute compute) {
  static std::mutex mutex;
  static Value cached[kMaxCachedDevices] = {};
  static bool ready[kMaxCachedDevices] = {};
  const bool cacheable = device >= 0 && device < kMaxCachedDevices;
  std::lock_guard<std::mutex> lock(mutex);
  if (cacheable && ready[device]) {
    *value = cached[device];
    return cudaSuccess;
  }
  const cudaError_t err = compute(value);
  if (err == cudaSuccess && cacheable) {
    cached[device] = *value;
    ready[device] = true;
  }
  return err;
}

/// A device attribute of `device`, looked up once (host-side query only: nothing
/// synchronises, so it is safe during graph capture).
template <cudaDeviceAttr kAttr>
cudaError_t device_attribute(int device, int* value) {
  return once_per_device(device, value, [device](int* out) {
    return cudaDeviceGetAttribute(out, kAttr, device);
  });
}

/// Whether `device` has programmatic dependent launch (sm_90 and later).
inline cudaError_t device_has_pdl(int device, bool* has_pdl) {
  int cc_major = 0;
  const cudaError_t err = device_attribute<cudaDevAttrComputeCapabilityMajor>(device, &cc_major);
  *has_pdl = err == cudaSuccess && cc_major >= 9;
  return err;
}

/// launch_kernel in thread-block clusters: with `cluster_ctas` > 1 (sm_90+; grid.x a multiple
/// of it), every `cluster_ctas` consecutive CTAs form one cluster, co-scheduled on one GPC and
/// sharing their shared memory.
template <typename... Params, typename... Args>
cudaError_t launch_kernel_clustered(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                                    cudaStream_t stream, bool programmatic, int cluster_ctas,
                                    Args&&... args) {
  cudaLaunchAttribute attrs[2];
  unsigned num_attrs = 0;
  if (programmatic) {
    attrs[num_attrs].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attrs[num_attrs++].val.programmaticStreamSerializationAllowed = 1;
  }
  if (cluster_ctas > 1) {
    attrs[num_attrs].id = cudaLaunchAttributeClusterDimension;
    attrs[num_attrs++].val.clusterDim = {static_cast<unsigned>(cluster_ctas), 1, 1};
  }
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = attrs;
  config.numAttrs = num_attrs;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

/// Launches `kernel`; with `programmatic` (only where device_has_pdl), as a
/// programmatic dependent of the stream's previous kernel: its CTAs may start once that kernel
/// allows it (allow_dependent_launch) and must call wait_for_preceding_grid() before reading
/// anything that kernel wrote or writing anything it reads.
template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                          cudaStream_t stream, bool programmatic, Args&&... args) {
  return launch_kernel_clustered(kernel, grid, block, smem, stream, programmatic, 1,
                                 std::forward<Args>(args)...);
}

/// How many clusters of `cluster_ctas` CTAs of `kernel` (with `smem` bytes each) fit on the
/// device at once: the GPCs' SM counts, not only the CTA slots, bound it (host-side query).
template <typename... Params>
cudaError_t max_active_clusters(void (*kernel)(Params...), int threads, size_t smem,
                                int cluster_ctas, int* clusters) {
  cudaLaunchAttribute cluster;
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim = {static_cast<unsigned>(cluster_ctas), 1, 1};
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(cluster_ctas));
  config.blockDim = dim3(static_cast<unsigned>(threads));
  config.dynamicSmemBytes = smem;
  config.attrs = &cluster;
  config.numAttrs = 1;
  return cudaOccupancyMaxActiveClusters(clusters, kernel, &config);
}

}  // namespace dustin::detail
