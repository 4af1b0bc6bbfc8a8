// The plan of a multi-tensor launch, shared by the CPU and CUDA paths.
//
// Tensors are cut into chunks of `chunk_size` elements. Consecutive tensors
// are gathered into launch groups of at most `max_tensors` tensors; within a
// group, work item (CUDA block, CPU task) `c` serves chunk
// `c - chunk_prefix[slot]` of tensor `slot`, where `slot` is the last index
// with chunk_prefix[slot] <= c. Empty tensors own no chunk but keep their slot
// (their step still advances). The CPU path plans with one group holding every
// tensor, so its tests run the same mapping the GPU runs.
#pragma once

#include <cstdint>
#include <vector>

#include <pyoptim/macros.h>

namespace pyoptim {

struct LaunchGroup {
  int64_t first_tensor = 0;
  int64_t num_tensors = 0;
  // num_tensors + 1 entries; chunk_prefix[num_tensors] = chunks in the group.
  std::vector<int64_t> chunk_prefix;
  int64_t num_chunks() const { return chunk_prefix.back(); }
};

inline namespace PYOPTIM_ISA {  // note [ISA namespaces]

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// max_chunks bounds a group's chunk count (a CUDA grid's x dimension).
// `param_group`, when not empty, gives each tensor's (non-decreasing)
// optimizer param group; a launch group then spans at most
// `max_param_groups` of them (their hyperparameters travel with the launch).
inline std::vector<LaunchGroup> plan_launch_groups(
    const std::vector<int64_t>& numels, int64_t chunk_size, int64_t max_tensors,
    int64_t max_chunks, const std::vector<int64_t>& param_group = {},
    int64_t max_param_groups = INT64_MAX) {
  std::vector<LaunchGroup> groups;
  LaunchGroup cur;
  cur.chunk_prefix.push_back(0);
  for (int64_t i = 0; i < static_cast<int64_t>(numels.size()); ++i) {
    const int64_t chunks = ceil_div(numels[i], chunk_size);
    const bool too_many_param_groups = !param_group.empty() && cur.num_tensors > 0 &&
        param_group[i] - param_group[cur.first_tensor] >= max_param_groups;
    if (cur.num_tensors == max_tensors || cur.num_chunks() + chunks > max_chunks || too_many_param_groups) {
      if (cur.num_tensors > 0) {
        groups.push_back(std::move(cur));
      }
      cur = LaunchGroup();
      cur.first_tensor = i;
      cur.chunk_prefix.push_back(0);
    }
    cur.num_tensors += 1;
    cur.chunk_prefix.push_back(cur.num_chunks() + chunks);
  }
  if (cur.num_tensors > 0) {
    groups.push_back(std::move(cur));
  }
  return groups;
}

// The slot that owns work item `c`: the last slot with prefix[slot] <= c, by
// binary search over prefix[0, n]. Runs on the host and on the device.
template <typename I>
PYOPTIM_HOST_DEVICE PYOPTIM_INLINE int find_slot(const I* prefix, int n, int64_t c) {
  int lo = 0;
  int hi = n;  // invariant: prefix[lo] <= c < prefix[hi]
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (static_cast<int64_t>(prefix[mid]) <= c) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

}  // namespace PYOPTIM_ISA
}  // namespace pyoptim
