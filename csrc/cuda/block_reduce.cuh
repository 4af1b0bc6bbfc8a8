// A block-wide reduction in double, shared by the kernels that reduce a
// chunk to one partial (multi_tensor_norm, LAMB's norms): deterministic, no
// atomics.
#pragma once

namespace pyoptim::cuda {

// Reduces `v` over the block with `op`; the result is valid in thread 0.
template <typename Op>
__device__ __forceinline__ double block_reduce(double v, const Op& op) {
  __shared__ double warp_part[32];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int o = 16; o > 0; o /= 2) {
    v = op(v, __shfl_down_sync(0xffffffffu, v, o));
  }
  if (lane == 0) {
    warp_part[warp] = v;
  }
  __syncthreads();
  const int warps = (blockDim.x + 31) / 32;
  v = threadIdx.x < warps ? warp_part[threadIdx.x] : 0.0;
  if (warp == 0) {
#pragma unroll
    for (int o = 16; o > 0; o /= 2) {
      v = op(v, __shfl_down_sync(0xffffffffu, v, o));
    }
  }
  return v;
}

}  // namespace pyoptim::cuda
