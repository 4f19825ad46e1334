// SPDX-License-Identifier: Apache-2.0
// Host-side launch helpers of the CUDA ops: cached device attributes and programmatic
// dependent launches.
#pragma once

#include <cuda_runtime.h>

#include <mutex>
#include <utility>

namespace dustin::detail {

inline constexpr int kMaxCachedDevices = 64;

/// A device attribute of `device`, looked up once (host-side query only: nothing
/// synchronises, so it is safe during graph capture).
template <cudaDeviceAttr kAttr>
cudaError_t device_attribute(int device, int* value) {
  static std::mutex mutex;
  static int cached[kMaxCachedDevices] = {};
  std::lock_guard<std::mutex> lock(mutex);
  if (device >= 0 && device < kMaxCachedDevices && cached[device] > 0) {
    *value = cached[device];
    return cudaSuccess;
  }
  const cudaError_t err = cudaDeviceGetAttribute(value, kAttr, device);
  if (err == cudaSuccess && device >= 0 && device < kMaxCachedDevices) cached[device] = *value;
  return err;
}

/// Whether `device` has programmatic dependent launch (sm_90 and later).
inline cudaError_t device_has_pdl(int device, bool* has_pdl) {
  int cc_major = 0;
  const cudaError_t err = device_attribute<cudaDevAttrComputeCapabilityMajor>(device, &cc_major);
  *has_pdl = err == cudaSuccess && cc_major >= 9;
  return err;
}

/// Launches `kernel`; with `programmatic` (only where device_has_pdl), as a
/// programmatic dependent of the stream's previous kernel: its CTAs may start once that kernel
/// allows it (allow_dependent_launch) and must call wait_for_preceding_grid() before reading
/// anything that kernel wrote or writing anything it reads.
template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                          cudaStream_t stream, bool programmatic, Args&&... args) {
  cudaLaunchAttribute dependent;
  dependent.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  dependent.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &dependent;
  config.numAttrs = programmatic ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

}  // namespace dustin::detail
