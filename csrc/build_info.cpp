// SPDX-License-Identifier: Apache-2.0
// What this build of libdustin contains.
#include "dustin/dustin.h"

namespace dustin {

bool built_with_cuda() {
#if defined(DUSTIN_WITH_CUDA)
  return true;
#else
  return false;
#endif
}

}  // namespace dustin
