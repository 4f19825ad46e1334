// SPDX-License-Identifier: Apache-2.0
// dustin::decode_linear: checks the params and the 16-byte alignment the kernel reads with,
// picks the dtype, the gated epilogue and the RMSNorm prologue, launches one wave of persistent
// CTAs.
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_launch.h"
#include "dustin/decode_linear.cuh"
#include "dustin/dispatch.h"
#include "dustin/dustin.h"

namespace dustin {
namespace {

/// Dynamic shared memory of an instance: the normalised x, for the normed ones.
template <bool kNormed>
constexpr int kDynamicSmem = kNormed ? detail::kNormedXBytes : 0;

/// CTAs of decode_linear_kernel<T, kGated, kNormed> resident per SM of `device`, once its
/// dynamic shared memory is allowed there (host-side, once per device and instance).
template <typename T, bool kGated, bool kNormed>
cudaError_t resident_ctas(int device, int* ctas) {
  return detail::once_per_device(device, ctas, [](int* out) {
    const auto kernel = detail::decode_linear_kernel<T, kGated, kNormed>;
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           kDynamicSmem<kNormed>);
    if (err != cudaSuccess) return err;
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(out, kernel, detail::kLinearThreads,
                                                        kDynamicSmem<kNormed>);
    *out = *out > 0 ? *out : 1;
    return err;
  });
}

template <typename T, bool kGated, bool kNormed>
Status launch(const DecodeLinearParams& p, cudaStream_t stream) {
  const auto kernel = detail::decode_linear_kernel<T, kGated, kNormed>;
  int device = 0;
  int sms = 0;
  int per_sm = 0;
  bool has_pdl = false;
  if (cudaGetDevice(&device) != cudaSuccess ||
      detail::device_attribute<cudaDevAttrMultiProcessorCount>(device, &sms) != cudaSuccess ||
      resident_ctas<T, kGated, kNormed>(device, &per_sm) != cudaSuccess ||
      detail::device_has_pdl(device, &has_pdl) != cudaSuccess) {
    return Status::kCudaError;
  }
  // One wave of persistent CTAs, or one per tile where there are fewer tiles.
  const int64_t tiles =
      (decode_linear_out_columns(p) + detail::kLinearColumns - 1) / detail::kLinearColumns;
  const int64_t resident = static_cast<int64_t>(sms) * per_sm;
  const int64_t ctas = tiles < resident ? tiles : resident;
  // A programmatic dependent launch where the GPU has it: the first weights stream in while
  // the kernel that writes x (a norm, an attention) drains.
  return detail::launch_kernel(kernel, dim3(static_cast<unsigned>(ctas)),
                               dim3(detail::kLinearThreads), kDynamicSmem<kNormed>, stream,
                               has_pdl, p) == cudaSuccess
             ? Status::kOk
             : Status::kCudaError;
}

}  // namespace

Status decode_linear(const DecodeLinearParams& params, cudaStream_t stream) {
  if (!decode_linear_valid_shape(params)) return Status::kInvalidArgument;
  if (params.rows == 0) return Status::kOk;
  if (!decode_linear_vectorizable(params)) return Status::kUnsupported;
  return DUSTIN_DISPATCH_DTYPE16(params.dtype, [&] {
    return DUSTIN_DISPATCH_BOOL(params.gated, kGated, [&] {
      return DUSTIN_DISPATCH_BOOL(params.norm_weight != nullptr, kNormed, [&] {
        return launch<DTypeKV, kGated, kNormed>(params, stream);
      });
    });
  });
}

}  // namespace dustin
