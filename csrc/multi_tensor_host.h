// Host-side checks and layout preparation shared by every multi-tensor op and
// both of its C++ backends (CPU, CUDA), so they reject the same inputs with
// the same messages, before anything is written. Messages name the op and
// the offending index: "adam_step_: grads[3] has shape ...".
#pragma once

#include <initializer_list>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

namespace pyoptim {

struct NamedList {
  const char* name;
  at::TensorList tensors;
};

// params: floating point (fp32/fp64/fp16/bf16), one device of `device_type`,
// one dtype. Each of `like` (when not empty) has params' length, and each
// entry params[i]'s device, dtype and shape; sparse entries are rejected.
// The lists of `state` (an optimizer's moments) are checked as `like`'s but
// for their dtype: one per call, params' own, or float32 or bfloat16 for
// 16-bit and float32 params (note [state dtype]).
void check_tensor_lists(const char* op, c10::DeviceType device_type, const NamedList& params,
                        std::initializer_list<NamedList> like, std::initializer_list<NamedList> state = {});

// The dtype of a call's state lists (the first entry of the first non-empty one; params' dtype without any).
at::ScalarType state_dtype_of(at::TensorList params, std::initializer_list<at::TensorList> state);

// The precision policy's arguments (csrc/include/pyoptim/precision.h): at most one of master_params (float32,
// 16-bit params), param_remainders (int16, bfloat16 params) and stochastic_seed (bfloat16 params); a list has
// one entry per param of its device and shape. Returns the policy.
int32_t check_precision(const char* op, at::TensorList params, const std::optional<at::TensorList>& master_params,
                        const std::optional<at::TensorList>& param_remainders,
                        const std::optional<int64_t>& stochastic_seed);

// One value per group in every list of `hyper`, group_sizes adding up to n.
void check_group_lists(const char* op, c10::IntArrayRef group_sizes,
                       std::initializer_list<std::pair<const char*, c10::ArrayRef<double>>> hyper, int64_t n);

// An optional tensor of `numel` elements, of `dtype`, on `device`.
void check_aux_tensor(const char* op, const char* name, const std::optional<at::Tensor>& t, const at::Device& device,
                      int64_t numel, at::ScalarType dtype);

// One list of work tensors: entry i is the caller's tensor i where that is
// already in the shared layout (no copy, no reference count taken: the
// common case costs nothing per tensor), else a copy owned here.
class WorkList {
 public:
  WorkList() = default;
  explicit WorkList(at::TensorList caller) : caller_(caller) {}

  const at::Tensor& operator[](size_t i) const {
    return copy_at_.empty() || copy_at_[i] < 0 ? caller_[i] : copies_[copy_at_[i]];
  }
  size_t size() const { return caller_.size(); }
  bool empty() const { return caller_.empty(); }

  // Entry i becomes `copy` (a work copy of the caller's tensor i).
  void own(size_t i, at::Tensor copy);

 private:
  at::TensorList caller_;  // the op's argument: alive for the op's call
  std::vector<at::Tensor> copies_;
  std::vector<int32_t> copy_at_;  // per entry, its index in copies_ or -1; empty while there are none
};

// What kernels run on: for every tensor i, lists[k][i] for all k are dense
// and share one layout (params[i]'s when it is dense, else contiguous), so
// each can be walked as a flat array in the same order. Where a caller's
// tensor has other strides or is not dense, the work tensor is a copy, and
// finish() copies the mutated ones back. A MultiTensorWork must not outlive
// the op's arguments it was made from.
struct MultiTensorWork {
  std::vector<WorkList> lists;  // [list][tensor]
  std::vector<int64_t> numel;
  std::vector<int64_t> group_of;  // per tensor, from group_sizes
  std::vector<std::pair<at::Tensor, at::Tensor>> writeback;  // (caller's, work)

  void finish();
};

// lists[0] gives the layout; `mutated[k]` says whether list k is written.
// Empty lists stay empty.
MultiTensorWork prepare_work(std::initializer_list<at::TensorList> lists, std::initializer_list<bool> mutated,
                             c10::IntArrayRef group_sizes);

// a == b, for shapes and strides compared per tensor: an inline loop
// (ArrayRef's == is a memcmp call, which costs more on one or two dims).
inline bool same_dims(c10::IntArrayRef a, c10::IntArrayRef b) {
  if (a.size() != b.size()) {
    return false;
  }
  for (size_t d = 0; d < a.size(); ++d) {
    if (a[d] != b[d]) {
      return false;
    }
  }
  return true;
}

// Reserves room for n entries in each vector (a launch's per-tensor arrays).
template <typename... V>
void reserve_each(int64_t n, V&... v) {
  (v.reserve(static_cast<size_t>(n)), ...);
}

// The inverse of GradScaler's scale as GradScaler computes it (1 / scale in
// double, rounded to float), read from a CPU tensor; 1 without one.
double cpu_inv_scale(const std::optional<at::Tensor>& grad_scale);

}  // namespace pyoptim
