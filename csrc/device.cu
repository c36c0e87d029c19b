// Runtime queries that do not belong to any op.
#include "kiln/api.h"
#include "kiln/common.cuh"

namespace kiln {

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    // No driver or no GPU is an answer here, not an error; clear it so that it is
    // not reported later as the failure of an unrelated launch.
    (void)cudaGetLastError();
    return 0;
  }
  return count;
}

}  // namespace kiln
