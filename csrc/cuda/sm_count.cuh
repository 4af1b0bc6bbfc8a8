// The current device's SM count, shared by the CUDA launchers' plans.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

namespace pyoptim::cuda {

// Looked up once per device (not through ATen/cuda/CUDAContext.h, which pulls
// in cuSPARSE's headers). Inline: one table for the whole library.
inline int sm_count() {
  static int counts[64] = {};
  const int device = c10::cuda::current_device();
  TORCH_INTERNAL_ASSERT(device >= 0 && device < 64);
  if (counts[device] == 0) {
    int n = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    counts[device] = n;
  }
  return counts[device];
}

}  // namespace pyoptim::cuda
