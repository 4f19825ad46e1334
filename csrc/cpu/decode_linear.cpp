// SPDX-License-Identifier: Apache-2.0
// CPU twin of decode_linear: float32 dot products of each x row with each weight row, the
// RMSNorm row scale, bias, the gated epilogue, one rounding to the dtype, then the rotation or
// the residual add (rounded again at the store, as the kernel does).
#include <algorithm>
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
  // The products, rounded to the dtype: [M, columns].
  std::vector<float> values(static_cast<size_t>(p.rows) * columns);
#pragma omp parallel if (static_cast<int64_t>(p.out_features) * k >= kParallelElements)
  {
    std::vector<float> w_row(k);
    std::vector<float> u_row(p.gated ? k : 0);
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
        values[static_cast<size_t>(m) * columns + n] = detail::round_to(value, p.dtype);
      }
    }
  }
  // Rotation or residual add, row by row, then the store.
  std::vector<float> out(columns);
  std::vector<float> cos(p.rope_cos != nullptr ? p.head_dim : 0);
  std::vector<float> sin(cos.size());
  std::vector<float> residual(p.residual != nullptr ? columns : 0);
  const int32_t half_dim = p.head_dim / 2;
  for (int32_t m = 0; m < p.rows; ++m) {
    const float* v = values.data() + static_cast<size_t>(m) * columns;
    std::copy(v, v + columns, out.begin());
    if (p.rope_cos != nullptr) {
      detail::load_row(static_cast<const char*>(p.rope_cos) + m * p.rope_stride * eb, p.dtype,
                       p.head_dim, cos.data());
      detail::load_row(static_cast<const char*>(p.rope_sin) + m * p.rope_stride * eb, p.dtype,
                       p.head_dim, sin.data());
      for (int32_t n = 0; n < p.rope_columns; ++n) {
        const int32_t d = n % p.head_dim;
        const float rotated = d < half_dim ? -v[n + half_dim] : v[n - half_dim];
        out[n] = v[n] * cos[d] + rotated * sin[d];
      }
    }
    if (p.residual != nullptr) {
      detail::load_row(static_cast<const char*>(p.residual) + m * p.residual_stride * eb, p.dtype,
                       columns, residual.data());
      for (int32_t n = 0; n < columns; ++n) out[n] += residual[n];
    }
    detail::store_row(out.data(), p.dtype, columns, static_cast<char*>(p.y) + m * p.y_stride * eb);
  }
  return Status::kOk;
}

}  // namespace dustin::cpu
