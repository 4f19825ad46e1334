// SPDX-License-Identifier: Apache-2.0
// Tile primitives of the attention kernels: swizzled shared-memory layout, cp.async, ldmatrix,
// mma.sync and (sm_90a) wgmma with shared-memory descriptors.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cute/arch/mma_sm90_desc.hpp>
#include <cute/arch/mma_sm90_gmma.hpp>
#include <type_traits>
#include <utility>

#include "dustin/dependent_launch.cuh"

namespace dustin::detail {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -__builtin_huge_valf();

/// 2^x as the hardware computes it (one MUFU.EX2, about 2 ulp), results below 2^-126 flushed to
/// zero. exp2f wraps the same instruction in a fix-up for such results (four instructions per
/// call); in the per-tile softmax they are terms far below the running sums they join.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

/// Element offset of 16-byte chunk `chunk` of row `row` in a [kTileRows, D] shared-memory tile,
/// stored as D / 64 column blocks of [kTileRows, 64] with 128-byte rows whose chunks are XORed
/// with row % 8: the canonical 128-byte-swizzled layout of wgmma operands (1024-byte aligned
/// atoms), which also keeps the 8 rows an ldmatrix reads on distinct banks.
template <int kTileRows>
__device__ __forceinline__ int swizzle(int row, int chunk) {
  return (chunk >> 3) * (kTileRows * 64) + row * 64 + (((chunk & 7) ^ (row & 7)) << 3);
}

__device__ __forceinline__ uint32_t smem_addr(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

/// 16-byte global -> shared copy; zero-fills when `valid` is false (no global read happens).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

/// D += A * B on one m16n8k16 tile, fp32 accumulation.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

/// Two floats as one register of two 16-bit values (low half = x).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float x, float y) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    __nv_bfloat162 v = __floats2bfloat162_rn(x, y);
    return *reinterpret_cast<uint32_t*>(&v);
  } else {
    __half2 v = __floats2half2_rn(x, y);
    return *reinterpret_cast<uint32_t*>(&v);
  }
}

template <typename T>
__device__ __forceinline__ T from_float(float x) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(x);
  } else {
    return __float2half_rn(x);
  }
}

#if defined(CUTE_ARCH_MMA_SM90A_ENABLED)
/// wgmma m64nNk16 with A (16-bit) from registers and B from shared memory, fp32 accumulators;
/// B is K-major (kMnMajorB false: K tile, d contiguous) or MN-major (V tile, d contiguous).
template <typename T, int kN, bool kMnMajorB>
struct WarpgroupMma {
  static_assert(kN == 32 || kN == 64 || kN == 128, "wgmma N: 32, 64 or 128");
  static constexpr auto kMajorA = cute::SM90::GMMA::Major::K;
  static constexpr auto kMajorB =
      kMnMajorB ? cute::SM90::GMMA::Major::MN : cute::SM90::GMMA::Major::K;
  template <typename N32, typename N64, typename N128>
  using ByN = std::conditional_t<kN == 32, N32, std::conditional_t<kN == 64, N64, N128>>;
  using Bf16Atom = ByN<cute::SM90::GMMA::MMA_64x32x16_F32BF16BF16_RS<kMajorA, kMajorB>,
                       cute::SM90::GMMA::MMA_64x64x16_F32BF16BF16_RS<kMajorA, kMajorB>,
                       cute::SM90::GMMA::MMA_64x128x16_F32BF16BF16_RS<kMajorA, kMajorB>>;
  using F16Atom = ByN<cute::SM90::GMMA::MMA_64x32x16_F32F16F16_RS<kMajorA, kMajorB>,
                      cute::SM90::GMMA::MMA_64x64x16_F32F16F16_RS<kMajorA, kMajorB>,
                      cute::SM90::GMMA::MMA_64x128x16_F32F16F16_RS<kMajorA, kMajorB>>;
  using Atom = std::conditional_t<std::is_same_v<T, __nv_bfloat16>, Bf16Atom, F16Atom>;

  /// d[kN / 8][4] += A[64 x 16] * B[16 x kN]; d's layout is the mma.sync C layout per warp.
  template <size_t... I>
  __device__ __forceinline__ static void run(float* d, const uint32_t (&a)[4], uint64_t desc,
                                             std::index_sequence<I...>) {
    Atom::fma(a[0], a[1], a[2], a[3], desc, d[I]...);
  }
  __device__ __forceinline__ static void run(float (&d)[kN / 8][4], const uint32_t (&a)[4],
                                             uint64_t desc) {
    run(&d[0][0], a, desc, std::make_index_sequence<kN / 2>{});
  }
};

/// Descriptor of a 128-byte-swizzled shared-memory operand (start, leading and stride byte
/// offsets as cute::make_gmma_desc computes them for the canonical layouts).
__device__ __forceinline__ uint64_t swizzle128_desc(uint32_t addr, uint32_t leading_bytes,
                                                    uint32_t stride_bytes) {
  cute::GmmaDescriptor desc;
  desc.bitfield.start_address_ = static_cast<uint16_t>(addr >> 4);
  desc.bitfield.leading_byte_offset_ = static_cast<uint16_t>(leading_bytes >> 4);
  desc.bitfield.stride_byte_offset_ = static_cast<uint16_t>(stride_bytes >> 4);
  desc.bitfield.base_offset_ = 0;
  desc.bitfield.layout_type_ = static_cast<uint8_t>(cute::SM90::GMMA::LayoutType::B128);
  return desc.desc_;
}

template <int kRows, int kCols>
__device__ __forceinline__ void fence_accumulators(float (&d)[kRows][kCols]) {
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
#pragma unroll
    for (int j = 0; j < kCols; ++j) cute::warpgroup_fence_operand(d[i][j]);
  }
}
#endif

}  // namespace dustin::detail
