// SPDX-License-Identifier: Apache-2.0
// Device side of programmatic dependent launch (PDL, sm_90+); csrc/cuda_launch.h launches.
#pragma once

namespace dustin::detail {

/// Programmatic dependent launch (sm_90+): lets the next kernel of the stream, launched with
/// programmatic stream serialization, start its CTAs while this grid still runs, so its launch
/// latency hides behind this grid's tail. No-op before sm_90 or without such a dependent.
__device__ __forceinline__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
/// The dependent side: blocks until the preceding grid has finished and its writes are visible.
/// Must come before the first read of anything that grid wrote and the first write of
/// anything it read.
__device__ __forceinline__ void wait_for_preceding_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

}  // namespace dustin::detail
