// SPDX-License-Identifier: Apache-2.0
// dustin::decode_linear: checks the params and the 16-byte alignment the kernel reads with,
// picks the dtype and the gated epilogue, launches one wave of persistent CTAs.
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_launch.h"
#include "dustin/decode_linear.cuh"
#include "dustin/dispatch.h"
#include "dustin/dustin.h"

namespace dustin {
namespace {

/// CTAs of decode_linear_kernel<T, kGated> resident per SM (host-side query, once per instance:
/// the four instances share one function type, so the cache is keyed by the template
/// arguments, not by the kernel pointer's type).
template <typename T, bool kGated>
cudaError_t resident_ctas(int* ctas) {
  static int cached = 0;
  static cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &cached, detail::decode_linear_kernel<T, kGated>, detail::kLinearThreads, 0);
  *ctas = cached;
  return err;
}

template <typename T, bool kGated>
Status launch(const DecodeLinearParams& p, cudaStream_t stream) {
  const auto kernel = detail::decode_linear_kernel<T, kGated>;
  int device = 0;
  int sms = 0;
  int per_sm = 0;
  bool has_pdl = false;
  if (cudaGetDevice(&device) != cudaSuccess ||
      detail::device_attribute<cudaDevAttrMultiProcessorCount>(device, &sms) != cudaSuccess ||
      resident_ctas<T, kGated>(&per_sm) != cudaSuccess ||
      detail::device_has_pdl(device, &has_pdl) != cudaSuccess) {
    return Status::kCudaError;
  }
  // One wave of persistent CTAs, or one per tile where there are fewer tiles.
  const int64_t tiles =
      (decode_linear_out_columns(p) + detail::kLinearColumns - 1) / detail::kLinearColumns;
  const int64_t resident = static_cast<int64_t>(sms) * (per_sm > 0 ? per_sm : 1);
  const int64_t ctas = tiles < resident ? tiles : resident;
  // A programmatic dependent launch where the GPU has it: the first weights stream in while
  // the kernel that writes x (a norm, an attention) drains.
  return detail::launch_kernel(kernel, dim3(static_cast<unsigned>(ctas)),
                               dim3(detail::kLinearThreads), 0, stream, has_pdl, p) == cudaSuccess
             ? Status::kOk
             : Status::kCudaError;
}

}  // namespace

Status decode_linear(const DecodeLinearParams& params, cudaStream_t stream) {
  if (!decode_linear_valid_shape(params)) return Status::kInvalidArgument;
  if (params.rows == 0) return Status::kOk;
  if (!decode_linear_vectorizable(params)) return Status::kUnsupported;
  return DUSTIN_DISPATCH_DTYPE16(params.dtype, [&] {
    return DUSTIN_DISPATCH_BOOL(params.gated, kGated,
                                [&] { return launch<DTypeKV, kGated>(params, stream); });
  });
}

}  // namespace dustin
