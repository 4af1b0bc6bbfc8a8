// 16-byte vector access, shared by the CUDA kernels.
#pragma once

namespace pyoptim {

// N elements of T loaded or stored as one aligned access.
template <typename T, int N>
struct alignas(sizeof(T) * N) AlignedVec {
  T val[N];
};

// Elements of T per 16-byte vector.
template <typename T>
constexpr int vec_size() {
  return 16 / static_cast<int>(sizeof(T));
}

}  // namespace pyoptim
