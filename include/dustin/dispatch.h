// SPDX-License-Identifier: Apache-2.0
// The supported sets of runtime values, in one place, and the macros that turn them into
// template arguments inside each op's .cu. dustin._C exports the sets (dustin.ops.SUPPORTED).
#pragma once

#include <cstdint>

namespace dustin {

/// Head dims with a CUDA kernel instantiated.
inline constexpr int32_t kSupportedHeadDims[] = {64, 128};
/// Largest GQA group (Hq / Hkv) and query window the CUDA verify kernel handles.
inline constexpr int32_t kMaxGroupSize = 16;
inline constexpr int32_t kMaxQueryLen = 16;
/// Most query rows (n queries x Hs retrieval heads) one block_scores call takes on CUDA; one
/// CTA holds them all in shared memory, bounded by sm_80's capacity.
inline constexpr int32_t kMaxScoreRows = 128;
/// Page sizes the caches may use (any value in this range).
inline constexpr int32_t kMinPageSize = 1;
inline constexpr int32_t kMaxPageSize = 128;

}  // namespace dustin

/// Turns a runtime head dim into `constexpr int kHeadDim` inside the lambda-like body, or
/// returns Status::kUnsupported.
#define DUSTIN_DISPATCH_HEAD_DIM(head_dim, ...)           \
  [&]() -> ::dustin::Status {                             \
    switch (head_dim) {                                   \
      case 64: {                                          \
        constexpr int kHeadDim = 64;                      \
        return __VA_ARGS__();                             \
      }                                                   \
      case 128: {                                         \
        constexpr int kHeadDim = 128;                     \
        return __VA_ARGS__();                             \
      }                                                   \
      default:                                            \
        return ::dustin::Status::kUnsupported;            \
    }                                                     \
  }()

/// Turns a runtime bool into `constexpr bool kName`.
#define DUSTIN_DISPATCH_BOOL(cond, kName, ...) \
  [&]() -> ::dustin::Status {                  \
    if (cond) {                                \
      constexpr bool kName = true;             \
      return __VA_ARGS__();                    \
    } else {                                   \
      constexpr bool kName = false;            \
      return __VA_ARGS__();                    \
    }                                          \
  }()

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>

/// Turns a runtime 16-bit DType into `using DTypeKV = half | __nv_bfloat16`.
#define DUSTIN_DISPATCH_DTYPE16(dtype, ...)          \
  [&]() -> ::dustin::Status {                        \
    switch (dtype) {                                 \
      case ::dustin::DType::kFloat16: {              \
        using DTypeKV = half;                        \
        return __VA_ARGS__();                        \
      }                                              \
      case ::dustin::DType::kBFloat16: {             \
        using DTypeKV = __nv_bfloat16;               \
        return __VA_ARGS__();                        \
      }                                              \
      default:                                       \
        return ::dustin::Status::kUnsupported;       \
    }                                                \
  }()
#endif
