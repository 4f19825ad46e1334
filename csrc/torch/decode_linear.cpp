// SPDX-License-Identifier: Apache-2.0
// PyTorch adapter of decode_linear: checks, tensors -> DecodeLinearParams, CPU twin or CUDA
// kernel.
#include <ATen/ATen.h>

#include <cmath>

#include "torch/checks.h"
#include "torch/ops.h"

#if defined(DUSTIN_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace dustin::torch_ops {
namespace {

/// An optional tensor of `dims` dims with x's dtype and device.
void check_companion(const ArgCheck& check, const char* name, const std::optional<at::Tensor>& t,
                     int64_t dims, const char* shape, const at::Tensor& x) {
  if (!t.has_value()) return;
  check.dims(name, *t, dims, shape);
  check.same_dtype(name, *t, "x", x);
  check.same_device(name, *t, "x", x);
}

/// Metadata checks that hold for symbolic shapes too (ranks, dtypes, devices).
void check_meta(const ArgCheck& check, const at::Tensor& x, const at::Tensor& weight,
                const std::optional<at::Tensor>& bias,
                const std::optional<at::Tensor>& norm_weight,
                const std::optional<at::Tensor>& residual,
                const std::optional<at::Tensor>& rope_cos,
                const std::optional<at::Tensor>& rope_sin) {
  check.dims("x", x, 2, "[M, K]");
  check_float_dtype(check, "x", x);
  check.dims("weight", weight, 2, "[N, K]");
  check.same_dtype("weight", weight, "x", x);
  check.same_device("weight", weight, "x", x);
  check_companion(check, "bias", bias, 1, "[N]", x);
  check_companion(check, "norm_weight", norm_weight, 1, "[K]", x);
  check_companion(check, "residual", residual, 2, "[M, N] (N / 2 when gated)", x);
  check_companion(check, "rope_cos", rope_cos, 2, "[M, D]", x);
  check_companion(check, "rope_sin", rope_sin, 2, "[M, D]", x);
  check.value(rope_cos.has_value() == rope_sin.has_value(),
              "rope_cos and rope_sin must be given together");
  check.value(!rope_cos.has_value() || !residual.has_value(),
              "rope_cos (the rotary embedding of a q/k/v projection) cannot be combined with "
              "residual");
}

/// Every check (no tensor values read) and the params they describe; y is filled in later.
DecodeLinearParams check_args(const ArgCheck& check, const at::Tensor& x,
                              const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              bool gated, const std::optional<at::Tensor>& norm_weight,
                              double norm_eps, const std::optional<at::Tensor>& residual,
                              const std::optional<at::Tensor>& rope_cos,
                              const std::optional<at::Tensor>& rope_sin, int64_t rope_columns) {
  check_meta(check, x, weight, bias, norm_weight, residual, rope_cos, rope_sin);
  const int64_t rows = x.size(0);
  const int64_t in_features = x.size(1);
  const int64_t out_features = weight.size(0);
  check.value(rows <= kDecodeLinearMaxRows, "x must have at most ", kDecodeLinearMaxRows,
              " rows M (the rows of one decode step; use a GEMM for more), got ", rows);
  check.value(in_features >= 1, "x must have K >= 1 columns, got ", in_features);
  check.fits_int32("x.size(1) (K)", in_features);
  check.fits_int32("weight.size(0) (N)", out_features);
  check.value(out_features >= 1, "weight must have N >= 1 rows, got ", out_features);
  check.size("weight", weight, 1, in_features, "K of x");
  check.value(!gated || out_features % 2 == 0,
              "weight must have an even number of rows N when gated (the gate rows, then as many "
              "up rows), got ", out_features);
  check.inner_stride("x", x);
  check.inner_stride("weight", weight);
  if (bias.has_value()) {
    check.same_shape("bias", *bias, {out_features});
    check.contiguous("bias", *bias);
  }
  if (norm_weight.has_value()) {
    check.same_shape("norm_weight", *norm_weight, {in_features});
    check.contiguous("norm_weight", *norm_weight);
    check.value(std::isfinite(norm_eps) && norm_eps >= 0, "norm_eps must be finite and >= 0, got ",
                norm_eps);
  }
  const int64_t columns = gated ? out_features / 2 : out_features;
  if (residual.has_value()) {
    check.same_shape("residual", *residual, {rows, columns});
    check.inner_stride("residual", *residual);
  }
  int64_t head_dim = 0;
  if (rope_cos.has_value()) {
    check.value(!gated, "rope_cos (the rotary embedding of a q/k/v projection) cannot be "
                "combined with gated");
    head_dim = rope_cos->size(1);
    check.value(head_dim >= 8 && head_dim % 8 == 0, "rope_cos.size(1) (the head dim D) must be a "
                "positive multiple of 8, got ", head_dim);
    check.size("rope_cos", *rope_cos, 0, rows, "M of x");
    check.same_shape("rope_sin", *rope_sin, rope_cos->sizes());
    check.inner_stride("rope_cos", *rope_cos);
    check.inner_stride("rope_sin", *rope_sin);
    check.value(rows <= 1 || rope_sin->stride(0) == rope_cos->stride(0),
                "rope_sin must have the row stride of rope_cos (", rope_cos->stride(0), "), got ",
                rope_sin->stride(0));
    check.value(out_features % head_dim == 0, "weight must have a multiple of the head dim ",
                head_dim, " rows N with rope_cos, got ", out_features);
    check.value(rope_columns >= 1 && rope_columns <= out_features && rope_columns % head_dim == 0,
                "rope_columns must be a positive multiple of the head dim ", head_dim,
                " and at most N = ", out_features, ", got ", rope_columns);
  }
  if (x.is_cuda()) {
    check.not_implemented(x.scalar_type() != at::kFloat,
                          "x must be bfloat16 or float16 on CUDA, got ", x.scalar_type());
    check.value(in_features % kDecodeLinearAlign == 0, "K (x.size(1)) must be a multiple of ",
                kDecodeLinearAlign, " on CUDA (16-byte vectors), got ", in_features);
    check_vector_aligned(check, "x", x);
    check_vector_aligned(check, "weight", weight);
    if (norm_weight.has_value()) {
      check_vector_aligned(check, "norm_weight", *norm_weight);
      check.not_implemented(in_features <= kDecodeLinearMaxNormedK,
                            "K (x.size(1)) must be at most ", kDecodeLinearMaxNormedK,
                            " with norm_weight on CUDA (each CTA normalises x in shared memory), "
                            "got ", in_features, "; apply the norm apart");
    }
  }
  DecodeLinearParams p;
  p.x = x.data_ptr();
  p.w = weight.data_ptr();
  p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  p.norm_weight = norm_weight.has_value() ? norm_weight->data_ptr() : nullptr;
  p.residual = residual.has_value() ? residual->data_ptr() : nullptr;
  p.rope_cos = rope_cos.has_value() ? rope_cos->data_ptr() : nullptr;
  p.rope_sin = rope_sin.has_value() ? rope_sin->data_ptr() : nullptr;
  p.rope_stride = rope_cos.has_value() && rows > 1 ? rope_cos->stride(0) : 0;
  p.rope_columns = rope_cos.has_value() ? static_cast<int32_t>(rope_columns) : 0;
  p.head_dim = static_cast<int32_t>(head_dim);
  p.norm_eps = static_cast<float>(norm_eps);
  // A dim of size 1 may carry any stride; its rows are never stepped over.
  p.x_stride = rows > 1 ? x.stride(0) : 0;
  p.residual_stride = residual.has_value() && rows > 1 ? residual->stride(0) : 0;
  p.w_stride = out_features > 1 ? weight.stride(0) : 0;
  p.rows = static_cast<int32_t>(rows);
  p.in_features = static_cast<int32_t>(in_features);
  p.out_features = static_cast<int32_t>(out_features);
  p.gated = gated;
  p.dtype = to_dtype(x.scalar_type());
  return p;
}

}  // namespace

at::Tensor decode_linear(const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, bool gated,
                         const std::optional<at::Tensor>& norm_weight, double norm_eps,
                         const std::optional<at::Tensor>& residual,
                         const std::optional<at::Tensor>& rope_cos,
                         const std::optional<at::Tensor>& rope_sin, int64_t rope_columns) {
  const ArgCheck check("decode_linear");
  DecodeLinearParams p = check_args(check, x, weight, bias, gated, norm_weight, norm_eps, residual,
                                    rope_cos, rope_sin, rope_columns);
  at::Tensor y = at::empty({p.rows, decode_linear_out_columns(p)}, x.options());
  p.y = y.data_ptr();
  p.y_stride = decode_linear_out_columns(p);
  if (x.is_cpu()) {
    check.status(cpu::decode_linear(p));
    return y;
  }
#if defined(DUSTIN_WITH_CUDA)
  const c10::cuda::CUDAGuard device_guard(x.device());
  check.status(dustin::decode_linear(p, c10::cuda::getCurrentCUDAStream()));
#else
  check.no_cuda_build(x.device());
#endif
  return y;
}

at::Tensor decode_linear_meta(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, bool gated,
                              const std::optional<at::Tensor>& norm_weight, double /*norm_eps*/,
                              const std::optional<at::Tensor>& residual,
                              const std::optional<at::Tensor>& rope_cos,
                              const std::optional<at::Tensor>& rope_sin,
                              int64_t /*rope_columns*/) {
  const ArgCheck check("decode_linear");
  check_meta(check, x, weight, bias, norm_weight, residual, rope_cos, rope_sin);
  const c10::SymInt columns = gated ? weight.sym_size(0) / 2 : weight.sym_size(0);
  return at::empty_symint({x.sym_size(0), columns}, x.options());
}

}  // namespace dustin::torch_ops
