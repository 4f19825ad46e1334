// SPDX-License-Identifier: Apache-2.0
// Element types, KV layouts and the host/device qualifier shared by every public header.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DUSTIN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DUSTIN_HOST_DEVICE inline
#endif

// Forward declaration so that native users need not include the CUDA runtime; the CUDA
// runtime's own typedef names the same type, which C++ accepts.
struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;

namespace dustin {

/// Element type of a tensor argument.
enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

/// Layout of one paged KV cache tensor.
/// kNHD: [num_pages, P, Hkv, D]; kHND: [num_pages, Hkv, P, D] (one (page, head) tile is
/// contiguous, which is what makes block gathers wide).
enum class KvLayout : int32_t { kNHD = 0, kHND = 1 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
  }
  return "unknown";
}

inline const char* kv_layout_name(KvLayout l) { return l == KvLayout::kHND ? "HND" : "NHD"; }

}  // namespace dustin
