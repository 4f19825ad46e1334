// SPDX-License-Identifier: Apache-2.0
// Argument checks shared by the adapters; every message reads "dustin.<op>: <arg> <rule>, got
// <actual>".
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdio>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>

#include "dustin/dispatch.h"
#include "dustin/dustin.h"

namespace dustin::torch_ops {

namespace detail {

// Messages are assembled here without iostreams: on the GPU machine's toolchain (g++ 13.3,
// torch 2.11) formatting a number through an ostream inside any torch extension crashes,
// torch's own load_inline ones too (docs/gpu-notes.md). A single std::string handed to
// TORCH_CHECK is passed through as is.
inline void append(std::string& out, const char* v) { out += v; }
inline void append(std::string& out, const std::string& v) { out += v; }
inline void append(std::string& out, bool v) { out += v ? "true" : "false"; }
inline void append(std::string& out, double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  out += buf;
}
inline void append(std::string& out, float v) { append(out, static_cast<double>(v)); }
template <typename T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool>, int> = 0>
void append(std::string& out, T v) {
  out += std::to_string(v);
}
inline void append(std::string& out, at::ScalarType v) { out += c10::toString(v); }
inline void append(std::string& out, const at::Device& v) { out += v.str(); }
inline void append(std::string& out, at::IntArrayRef v) {
  out += '[';
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(v[i]);
  }
  out += ']';
}

template <typename... Args>
std::string message(const char* op, const Args&... args) {
  std::string out = "dustin.";
  out += op;
  out += ": ";
  (append(out, args), ...);
  return out;
}

}  // namespace detail

/// Builds the message prefix "dustin.<op>: " once per op; each check raises the Python error
/// type of docs/ops.md (TypeError, IndexError, NotImplementedError, ValueError). Messages are
/// formatted only when a check fails.
class ArgCheck {
 public:
  explicit ArgCheck(const char* op) : op_(op) {}

  const char* op() const { return op_; }

  template <typename... Args>
  void value(bool cond, const Args&... msg) const {
    TORCH_CHECK_VALUE(cond, detail::message(op_, msg...));
  }
  template <typename... Args>
  void index(bool cond, const Args&... msg) const {
    TORCH_CHECK_INDEX(cond, detail::message(op_, msg...));
  }
  template <typename... Args>
  void type(bool cond, const Args&... msg) const {
    TORCH_CHECK_TYPE(cond, detail::message(op_, msg...));
  }
  template <typename... Args>
  void not_implemented(bool cond, const Args&... msg) const {
    TORCH_CHECK_NOT_IMPLEMENTED(cond, detail::message(op_, msg...));
  }

  void dtype(const char* name, const at::Tensor& t, at::ScalarType expected) const {
    type(t.scalar_type() == expected, name, " must be ", dtype_name(expected), ", got ",
         t.scalar_type());
  }

  /// dtype of `t` equals the dtype of `ref` (named ref_name).
  void same_dtype(const char* name, const at::Tensor& t, const char* ref_name,
                  const at::Tensor& ref) const {
    type(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of ", ref_name, " (",
         ref.scalar_type(), "), got ", t.scalar_type());
  }

  void dims(const char* name, const at::Tensor& t, int64_t ndim, const char* shape) const {
    value(t.dim() == ndim, name, " must have ", ndim, " dims ", shape, ", got shape ", t.sizes());
  }

  void size(const char* name, const at::Tensor& t, int64_t dim, int64_t expected,
            const char* what) const {
    value(t.size(dim) == expected, name, ".size(", dim, ") must equal ", what, " = ", expected,
          ", got ", t.size(dim), " (shape ", t.sizes(), ")");
  }

  void same_shape(const char* name, const at::Tensor& t, at::IntArrayRef expected) const {
    value(t.sizes() == expected, name, " must have shape ", expected, ", got ", t.sizes());
  }

  /// The innermost dim is contiguous (other strides are free).
  void inner_stride(const char* name, const at::Tensor& t) const {
    value(t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, name,
          " must have innermost stride 1, got strides ", t.strides());
  }

  void contiguous(const char* name, const at::Tensor& t) const {
    value(t.is_contiguous(), name, " must be contiguous, got strides ", t.strides(), " for shape ",
          t.sizes());
  }

  void same_device(const char* name, const at::Tensor& t, const char* ref_name,
                   const at::Tensor& ref) const {
    value(t.device() == ref.device(), name, " must be on the device of ", ref_name, " (",
          ref.device(), "), got ", t.device());
  }

  void fits_int32(const char* name, int64_t v) const {
    value(v >= 0 && v <= std::numeric_limits<int32_t>::max(), name, " must be in [0, 2^31), got ",
          v);
  }

  void finite(const char* name, double v) const {
    value(std::isfinite(v), name, " must be finite, got ", v);
  }

  /// The error of every CUDA call in a build without CUDA kernels.
  [[noreturn]] void no_cuda_build(const at::Device& device) const {
    not_implemented(false, "dustin was built without CUDA, so it cannot run on ", device,
                    "; rebuild with nvcc available (DUSTIN_CUDA=ON)");
    __builtin_unreachable();
  }

  /// Turns a non-Ok Status of libdustin into the matching Python error.
  void status(Status s) const {
    if (s == Status::kOk) return;
    const std::string why = std::string("libdustin returned \"") + status_string(s) + "\"";
    not_implemented(s != Status::kUnsupported, why,
                    " (no kernel for this configuration; see dustin.ops.SUPPORTED)");
    value(s != Status::kInvalidArgument && s != Status::kWorkspaceTooSmall, why,
          " for arguments that passed the adapter's checks");
    TORCH_CHECK(false, detail::message(op_, why, cuda_error_string()));
  }

  static const char* dtype_name(at::ScalarType t) {
    switch (t) {
      case at::kFloat:
        return "float32";
      case at::kHalf:
        return "float16";
      case at::kBFloat16:
        return "bfloat16";
      case at::kInt:
        return "int32";
      case at::kByte:
        return "uint8";
      default:
        return c10::toString(t);
    }
  }

 private:
  static std::string cuda_error_string();

  const char* op_;
};

/// Every named tensor is on the device of `ref` (named ref_name); undefined tensors are skipped.
inline void check_same_devices(
    const ArgCheck& check, const char* ref_name, const at::Tensor& ref,
    std::initializer_list<std::pair<const char*, const at::Tensor*>> tensors) {
  for (const auto& [name, t] : tensors) {
    if (t->defined()) check.same_device(name, *t, ref_name, ref);
  }
}

/// DType of a supported float tensor (q, caches, outputs).
inline DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      return DType::kFloat32;
  }
}

/// q-like tensors: bfloat16 | float16, and float32 on CPU only (TypeError otherwise).
inline void check_float_dtype(const ArgCheck& check, const char* name, const at::Tensor& t) {
  const at::ScalarType s = t.scalar_type();
  check.type(s == at::kBFloat16 || s == at::kHalf || s == at::kFloat, name,
             " must be bfloat16, float16 or float32, got ", s);
}

/// The checks only the CUDA kernels need: 16-bit dtype and an instantiated head dim.
inline void check_cuda_dtype_and_head_dim(const ArgCheck& check, const char* name,
                                          const at::Tensor& t, int64_t head_dim) {
  if (!t.is_cuda()) return;
  check.not_implemented(t.scalar_type() != at::kFloat, name,
                        " must be bfloat16 or float16 on CUDA, got ", t.scalar_type());
  bool supported = false;
  for (int32_t d : kSupportedHeadDims) supported = supported || d == head_dim;
  check.not_implemented(supported, "head dim D must be in {", kSupportedHeadDims[0], ", ",
                        kSupportedHeadDims[1], "} on CUDA, got ", head_dim);
}

/// The CUDA kernels copy 16-byte vectors: a tensor they read or write that way must start
/// 16-byte aligned with every stride but the innermost a multiple of 8 elements (16 bytes of
/// a 16-bit type). Views into a larger pool usually are; odd slices are not.
inline void check_vector_aligned(const ArgCheck& check, const char* name, const at::Tensor& t) {
  check.value(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name,
              " must start 16-byte aligned on CUDA (the kernels load 16-byte vectors), got an "
              "offset of ", reinterpret_cast<uintptr_t>(t.data_ptr()) % 16, " bytes");
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    check.value(t.size(d) == 1 || t.stride(d) % 8 == 0, name,
                " strides must be multiples of 8 elements on CUDA (16-byte vectors), got stride ",
                t.stride(d), " in dim ", d);
  }
}

/// Parses kv_layout ("NHD" or "HND").
inline KvLayout parse_kv_layout(const ArgCheck& check, const std::string& kv_layout) {
  check.value(kv_layout == "NHD" || kv_layout == "HND",
              "kv_layout must be \"NHD\" or \"HND\", got \"", kv_layout, "\"");
  return kv_layout == "NHD" ? KvLayout::kNHD : KvLayout::kHND;
}

/// Checks k_cache (and v_cache when given) as one layer's pages in kv_layout: 4-D, innermost
/// stride 1, P in [kMinPageSize, kMaxPageSize], at least one KV head, num_pages and D within
/// int32; v_cache with k_cache's shape, dtype and strides, on the device of `device_ref` (named
/// device_ref_name). Describes the pages (every PagedKV field but the block table's and
/// kv_lens'); k_cache's own dtype and device are the caller's to check, before this. Reads no
/// tensor values.
PagedKV check_kv_pages(const ArgCheck& check, const at::Tensor& k_cache,
                       const std::optional<at::Tensor>& v_cache, const std::string& kv_layout,
                       const char* device_ref_name, const at::Tensor& device_ref);

/// Checks k_cache (and v_cache when given), block_table and kv_lens against the query tensor
/// `ref` (named ref_name: dtype, device, B = ref.size(0), D = ref.size(3)) and describes them.
/// Reads no tensor values.
PagedKV check_paged_kv(const ArgCheck& check, const char* ref_name, const at::Tensor& ref,
                       const at::Tensor& k_cache, const std::optional<at::Tensor>& v_cache,
                       const at::Tensor& block_table, const at::Tensor& kv_lens,
                       const std::string& kv_layout);

/// Value checks of the cache arguments (CPU tensors): min_len <= kv_lens[b] <= max_pages * P
/// (min_len named min_name) and block_table[b, i] in [0, num_pages) for every used page.
void check_paged_kv_values(const ArgCheck& check, const PagedKV& kv, const at::Tensor& block_table,
                           const at::Tensor& kv_lens, const char* min_name, int64_t min_len);

/// Checks an optional workspace: uint8, 1-D, contiguous, on `device`, at least `bytes` long.
void check_workspace(const ArgCheck& check, const std::optional<at::Tensor>& workspace,
                     const at::Device& device, size_t bytes);

}  // namespace dustin::torch_ops
