// Host-side checks and layout preparation shared by every multi-tensor op and
// both of its C++ backends (CPU, CUDA), so they reject the same inputs with
// the same messages, before anything is written. Messages name the op and
// the offending index: "adam_step_: grads[3] has shape ...".
#pragma once

#include <array>
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

// What check_tensor_lists saw of each tensor, for prepare_work, so that a
// step reads each tensor's metadata once (note [one pass]): params' numel,
// and whether every entry i of the lists checked is dense in params[i]'s
// layout (needs no work copy).
struct TensorScan {
  std::vector<int64_t> numel;
  std::vector<uint8_t> in_layout;        // per tensor
  std::vector<const at::Tensor*> lists;  // the lists checked, by their data()
};

// params: floating point (fp32/fp64/fp16/bf16), one device of `device_type`,
// one dtype. Each of `like` (when not empty) has params' length, and each
// entry params[i]'s device, dtype and shape; sparse entries are rejected.
// The lists of `state` (an optimizer's moments) are checked as `like`'s but
// for their dtype: one per call, params' own, or float32 or bfloat16 for
// 16-bit and float32 params (note [state dtype]). `steps` (when it has
// params' length; its length is the caller's to check) holds step counters:
// float32 tensors of one element on params[i]'s device.
TensorScan check_tensor_lists(const char* op, c10::DeviceType device_type, const NamedList& params,
                              std::initializer_list<NamedList> like, std::initializer_list<NamedList> state = {},
                              at::TensorList steps = {});

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
// Empty lists stay empty. With `scan` (check_tensor_lists' of these lists),
// a tensor it saw in layout is not looked at again but in the lists it did
// not check.
MultiTensorWork prepare_work(std::initializer_list<at::TensorList> lists, std::initializer_list<bool> mutated,
                             c10::IntArrayRef group_sizes, const TensorScan* scan = nullptr);

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

// note [one pass]: a launch's loop over tensors reads data_ptr() of entry i
// of several lists, dependent loads (the TensorImpl, then its StorageImpl)
// that each miss the cache when the metadata of thousands of tensors does
// not fit in it. Called with each i of that loop, this asks for the
// TensorImpls of entry i + 2a and the StorageImpls of entry i + a (read
// from TensorImpls asked for a iterations earlier), so the loop finds both
// in cache. A prefetch never faults: this throws nothing.
class DataPrefetch {
 public:
  explicit DataPrefetch(std::initializer_list<at::TensorList> lists) {
    for (const at::TensorList l : lists) {
      if (!l.empty() && count_ < kMaxLists) {
        lists_[count_++] = l;
      }
    }
  }

  void operator()(size_t i) const {
    for (size_t k = 0; k < count_; ++k) {
      const at::TensorList l = lists_[k];
      if (i + 2 * kAhead < l.size()) {
        const char* impl = reinterpret_cast<const char*>(l[i + 2 * kAhead].unsafeGetTensorImpl());
        __builtin_prefetch(impl);
        __builtin_prefetch(impl + 64);
        __builtin_prefetch(impl + 128);
      }
      if (i + kAhead < l.size()) {
        __builtin_prefetch(l[i + kAhead].unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl());
      }
    }
  }

 private:
  static constexpr size_t kAhead = 4;
  static constexpr size_t kMaxLists = 8;
  std::array<at::TensorList, kMaxLists> lists_;
  size_t count_ = 0;
};

// Reserves room for n entries in each vector (a launch's per-tensor arrays).
template <typename... V>
void reserve_each(int64_t n, V&... v) {
  (v.reserve(static_cast<size_t>(n)), ...);
}

// The inverse of GradScaler's scale as GradScaler computes it (1 / scale in
// double, rounded to float), read from a CPU tensor; 1 without one.
double cpu_inv_scale(const std::optional<at::Tensor>& grad_scale);

}  // namespace pyoptim
