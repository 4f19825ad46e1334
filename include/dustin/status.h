// SPDX-License-Identifier: Apache-2.0
// Status codes returned by every function of the C++ API (it never throws).
#pragma once

namespace dustin {

enum class Status : int {
  kOk = 0,
  kInvalidArgument = 1,  ///< a params field breaks the op's contract (see docs/ops.md)
  kUnsupported = 2,      ///< valid, but no kernel is built for it (dtype, D, G, q, P, no CUDA)
  kWorkspaceTooSmall = 3,
  kCudaError = 4,        ///< a CUDA call or launch failed; see cudaGetLastError()
};

inline const char* status_string(Status s) {
  switch (s) {
    case Status::kOk: return "ok";
    case Status::kInvalidArgument: return "invalid argument";
    case Status::kUnsupported: return "unsupported configuration";
    case Status::kWorkspaceTooSmall: return "workspace too small";
    case Status::kCudaError: return "CUDA error";
  }
  return "unknown status";
}

}  // namespace dustin
