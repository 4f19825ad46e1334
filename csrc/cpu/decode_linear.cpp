// SPDX-License-Identifier: Apache-2.0
// CPU twin of decode_linear: float32 dot products of each x row with each weight row, the
// RMSNorm row scale, bias, the gated epilogue, one rounding to the dtype at the store, then the
// residual add (rounded again, as the kernel does).
#include <cmath>
#include <vector>

#include "cpu_common.h"
#include "dustin/dustin.h"

namespace dustin::cpu {
namespace {

/// Below this many weight elements a thread team costs more than the products.
constexpr int64_t kParallelElements = int64_t{1} << 18;

float dot(const float* a, const float* b, int32_t k) {
  float sum = 0.f;
  for (int32_t i = 0; i < k; ++i) sum += a[i] * b[i];
  return sum;
}

}  // namespace

Status decode_linear(const DecodeLinearParams& p) {
  if (!decode_linear_valid_shape(p)) return Status::kInvalidArgument;
  if (p.rows == 0) return Status::kOk;
  const size_t eb = detail::dtype_size(p.dtype);
  const int32_t k = p.in_features;
  const int32_t columns = decode_linear_out_columns(p);
  const int64_t half = p.out_features / 2;
  std::vector<float> x(static_cast<size_t>(p.rows) * k);
  std::vector<float> row_scale(p.rows, 1.f);
  std::vector<float> norm_weight(p.norm_weight != nullptr ? k : 0);
  if (p.norm_weight != nullptr) detail::load_row(p.norm_weight, p.dtype, k, norm_weight.data());
  for (int32_t m = 0; m < p.rows; ++m) {
    float* xm = x.data() + static_cast<size_t>(m) * k;
    detail::load_row(static_cast<const char*>(p.x) + m * p.x_stride * eb, p.dtype, k, xm);
    if (p.norm_weight == nullptr) continue;
    // The scale from x itself; the products read x * g rounded to the dtype.
    float squares = 0.f;
    for (int32_t i = 0; i < k; ++i) squares += xm[i] * xm[i];
    row_scale[m] = 1.f / std::sqrt(squares / static_cast<float>(k) + p.norm_eps);
    for (int32_t i = 0; i < k; ++i) xm[i] = detail::round_to(xm[i] * norm_weight[i], p.dtype);
  }
  std::vector<float> bias(p.bias != nullptr ? p.out_features : 0);
  if (p.bias != nullptr) detail::load_row(p.bias, p.dtype, p.out_features, bias.data());
  const char* w = static_cast<const char*>(p.w);
  char* y = static_cast<char*>(p.y);
#pragma omp parallel if (static_cast<int64_t>(p.out_features) * k >= kParallelElements)
  {
    std::vector<float> w_row(k);
    std::vector<float> u_row(p.gated ? k : 0);
    std::vector<float> out(p.rows);
#pragma omp for schedule(static)
    for (int32_t n = 0; n < columns; ++n) {
      detail::load_row(w + n * p.w_stride * eb, p.dtype, k, w_row.data());
      if (p.gated) detail::load_row(w + (n + half) * p.w_stride * eb, p.dtype, k, u_row.data());
      for (int32_t m = 0; m < p.rows; ++m) {
        const float* xm = x.data() + static_cast<size_t>(m) * k;
        float value = dot(xm, w_row.data(), k) * row_scale[m] + (bias.empty() ? 0.f : bias[n]);
        if (p.gated) {
          const float up =
              dot(xm, u_row.data(), k) * row_scale[m] + (bias.empty() ? 0.f : bias[n + half]);
          value = value / (1.f + std::exp(-value)) * up;
        }
        if (p.residual != nullptr) {
          float residual = 0.f;
          detail::load_row(static_cast<const char*>(p.residual) + (m * p.residual_stride + n) * eb,
                           p.dtype, 1, &residual);
          value = detail::round_to(value, p.dtype) + residual;
        }
        out[m] = value;
      }
      for (int32_t m = 0; m < p.rows; ++m) {
        detail::store_row(&out[m], p.dtype, 1, y + (m * p.y_stride + n) * eb);
      }
    }
  }
  return Status::kOk;
}

}  // namespace dustin::cpu
