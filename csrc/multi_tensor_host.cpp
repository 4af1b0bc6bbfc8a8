#include "multi_tensor_host.h"
#include "message.h"

#include <algorithm>

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/irange.h>

namespace pyoptim {

namespace {

bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Whether t shares memory with p, which the op writes while it reads t (a
// grad set to its param's data, a state that is the param). One pointer
// compare unless they share a storage; tensors ATen cannot judge (neither
// dense) pass, as at::assert_no_overlap lets them.
bool shares_memory(const at::Tensor& t, const at::Tensor& p) {
  if (t.unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl() !=
      p.unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl()) {
    return false;
  }
  const at::MemOverlapStatus status = at::get_overlap_status(t, p);
  return status == at::MemOverlapStatus::Full || status == at::MemOverlapStatus::Partial;
}

// How far ahead check_tensor_lists asks for metadata: far enough to cover a
// miss's latency, near enough that the lines are still in L1 when used.
constexpr int64_t kScanAhead = 4;

// Asks for the cache lines of t's TensorImpl that the checks read (a
// prefetch never faults).
void prefetch_metadata(const at::Tensor& t) {
  const char* impl = reinterpret_cast<const char*>(t.unsafeGetTensorImpl());
  __builtin_prefetch(impl);
  __builtin_prefetch(impl + 64);
  __builtin_prefetch(impl + 128);
}

}  // namespace

at::ScalarType state_dtype_of(at::TensorList params, std::initializer_list<at::TensorList> state) {
  for (const at::TensorList l : state) {
    if (!l.empty() && l[0].defined()) {
      return l[0].scalar_type();
    }
  }
  return params.empty() ? at::kFloat : params[0].scalar_type();
}

// note [state dtype]: one state dtype per call (the kernels are templates over
// the param's and the state's storage types), params' own, or float32 or
// bfloat16 beside 16-bit and float32 params (float64 params keep float64 state).
//
// note [one pass]: over thousands of small tensors a step is bound by cache
// misses on their metadata (each TensorImpl is three cache lines, rarely
// near the next), so the checks of tensor i, in every list, run together in
// one loop that also records what prepare_work needs, and the loop asks for
// the metadata of tensor i + kScanAhead while it checks tensor i.
TensorScan check_tensor_lists(const char* op, c10::DeviceType device_type, const NamedList& params,
                              std::initializer_list<NamedList> like, std::initializer_list<NamedList> state,
                              at::TensorList steps) {
  const int64_t n = static_cast<int64_t>(params.tensors.size());
  for (const NamedList& l : state) {
    PYOPTIM_CHECK(l.tensors.empty() || static_cast<int64_t>(l.tensors.size()) == n, op, ": ", l.name, " has ",
                l.tensors.size(), " entries but ", params.name, " has ", n);
  }
  for (const NamedList& l : like) {
    PYOPTIM_CHECK(l.tensors.empty() || static_cast<int64_t>(l.tensors.size()) == n, op, ": ", l.name, " has ",
                l.tensors.size(), " entries but ", params.name, " has ", n);
  }
  TensorScan scan;
  if (n == 0) {
    return scan;
  }
  scan.lists.push_back(params.tensors.data());
  for (const NamedList& l : like) {
    if (!l.tensors.empty()) {
      scan.lists.push_back(l.tensors.data());
    }
  }
  // The state's dtype: its first entry's (note [state dtype]).
  const at::ScalarType p_dtype = params.tensors[0].scalar_type();
  const at::Tensor* s_first = nullptr;
  for (const NamedList& l : state) {
    if (!l.tensors.empty()) {
      scan.lists.push_back(l.tensors.data());
      if (s_first == nullptr) {
        s_first = &l.tensors[0];
        PYOPTIM_CHECK(s_first->defined(), op, ": ", l.name, "[0] is undefined");
      }
    }
  }
  const at::ScalarType s_dtype = s_first != nullptr ? s_first->scalar_type() : p_dtype;
  const bool with_steps = static_cast<int64_t>(steps.size()) == n;
  scan.numel.resize(n);
  scan.in_layout.resize(n);
  const at::Tensor& p0 = params.tensors[0];
  for (const auto i : c10::irange(n)) {
    if (i + kScanAhead < n) {
      const int64_t j = i + kScanAhead;
      prefetch_metadata(params.tensors[j]);
      for (const NamedList& l : like) {
        if (!l.tensors.empty()) {
          prefetch_metadata(l.tensors[j]);
        }
      }
      for (const NamedList& l : state) {
        if (!l.tensors.empty()) {
          prefetch_metadata(l.tensors[j]);
        }
      }
      if (with_steps) {
        prefetch_metadata(steps[j]);
      }
    }
    const at::Tensor& p = params.tensors[i];
    PYOPTIM_CHECK(p.defined(), op, ": ", params.name, "[", i, "] is undefined");
    PYOPTIM_CHECK(p.layout() == at::kStrided, op, ": ", params.name, "[", i, "] is not a strided tensor (layout ",
                p.layout(), ")");
    PYOPTIM_CHECK(p.device().type() == device_type, op, ": ", params.name, "[", i, "] is on ", p.device(),
                ", expected a ", device_type, " tensor");
    PYOPTIM_CHECK(p.device() == p0.device(), op, ": ", params.name, "[", i, "] is on ", p.device(), " but ",
                params.name, "[0] is on ", p0.device(), "; one call takes one device");
    PYOPTIM_CHECK(is_supported_dtype(p.scalar_type()), op, ": ", params.name, "[", i, "] has dtype ",
                p.scalar_type(), "; supported are float32, float64, float16 and bfloat16");
    PYOPTIM_CHECK(p.scalar_type() == p0.scalar_type(), op, ": ", params.name, "[", i, "] has dtype ",
                p.scalar_type(), " but ", params.name, "[0] has ", p0.scalar_type(), "; one call takes one dtype");
    const c10::IntArrayRef p_strides = p.strides();
    bool in_layout = p.is_non_overlapping_and_dense();
    auto check_entry = [&](const NamedList& l, bool is_state) {
      if (l.tensors.empty()) {
        return;
      }
      const at::Tensor& t = l.tensors[i];
      PYOPTIM_CHECK(t.defined(), op, ": ", l.name, "[", i, "] is undefined");
      PYOPTIM_CHECK(t.layout() == at::kStrided, op, ": ", l.name, "[", i, "] is sparse (layout ", t.layout(),
                  "); sparse gradients are not supported");
      PYOPTIM_CHECK(t.device() == p.device(), op, ": ", l.name, "[", i, "] is on ", t.device(), " but ",
                  params.name, "[", i, "] is on ", p.device());
      PYOPTIM_CHECK(is_state || t.scalar_type() == p.scalar_type(), op, ": ", l.name, "[", i, "] has dtype ",
                  t.scalar_type(), " but ", params.name, "[", i, "] has dtype ", p.scalar_type());
      PYOPTIM_CHECK(!is_state || (t.scalar_type() == s_dtype &&
                                  (s_dtype == p_dtype ||
                                   (p_dtype != at::kDouble && (s_dtype == at::kFloat || s_dtype == at::kBFloat16)))),
                    op, ": ", l.name, "[", i, "] has dtype ", t.scalar_type(), "; the state of ", params.name,
                    " of dtype ", p_dtype, " is one dtype per call: ", p_dtype,
                    ", or Float or BFloat16 beside 16-bit and Float params (got ", s_dtype, " first)");
      PYOPTIM_CHECK(same_dims(t.sizes(), p.sizes()), op, ": ", l.name, "[", i, "] has shape ", t.sizes(), " but ",
                  params.name, "[", i, "] has shape ", p.sizes());
      PYOPTIM_CHECK(!shares_memory(t, p), op, ": ", l.name, "[", i, "] shares memory with ", params.name, "[", i,
                    "], which the step writes while reading it (a grad set to its param's data?)");
      in_layout = in_layout && same_dims(t.strides(), p_strides) && t.is_non_overlapping_and_dense();
    };
    for (const NamedList& l : like) {
      check_entry(l, false);
    }
    for (const NamedList& l : state) {
      check_entry(l, true);
    }
    if (with_steps) {
      const at::Tensor& s = steps[i];
      PYOPTIM_CHECK(s.defined() && s.numel() == 1 && s.scalar_type() == at::kFloat, op, ": state_steps[", i,
                    "] must be a float32 tensor of one element");
      PYOPTIM_CHECK(s.device() == p.device(), op, ": state_steps[", i, "] is on ", s.device(), " but params[", i,
                    "] is on ", p.device());
    }
    scan.numel[i] = p.numel();
    scan.in_layout[i] = in_layout;
  }
  return scan;
}

int32_t check_precision(const char* op, at::TensorList params, const std::optional<at::TensorList>& master_params,
                        const std::optional<at::TensorList>& param_remainders,
                        const std::optional<int64_t>& stochastic_seed) {
  const int given = master_params.has_value() + param_remainders.has_value() + stochastic_seed.has_value();
  PYOPTIM_CHECK(given <= 1, op, ": at most one of master_params, param_remainders and stochastic_seed");
  if (given == 0) {
    return 0;  // MasterWeights::kNone
  }
  const char* name = master_params ? "master_params" : param_remainders ? "param_remainders" : "stochastic_seed";
  const int32_t policy = master_params ? 1 : param_remainders ? 2 : 3;
  if (params.empty()) {
    return policy;
  }
  const at::ScalarType dtype = params[0].scalar_type();
  PYOPTIM_CHECK(dtype == at::kBFloat16 || (master_params && dtype == at::kHalf), op, ": ", name,
                " needs params of dtype ", master_params ? "Half or BFloat16" : "BFloat16", ", got ", dtype);
  if (stochastic_seed) {
    return policy;
  }
  const at::TensorList lst = master_params ? *master_params : *param_remainders;
  const at::ScalarType want = master_params ? at::kFloat : at::kShort;
  PYOPTIM_CHECK(lst.size() == params.size(), op, ": ", name, " has ", lst.size(), " entries but params has ",
                params.size());
  for (const auto i : c10::irange(lst.size())) {
    const at::Tensor& t = lst[i];
    const at::Tensor& p = params[i];
    PYOPTIM_CHECK(t.defined() && t.layout() == at::kStrided && t.scalar_type() == want, op, ": ", name, "[", i,
                  "] must be a strided ", want, " tensor");
    PYOPTIM_CHECK(t.device() == p.device(), op, ": ", name, "[", i, "] is on ", t.device(), " but params[", i,
                  "] is on ", p.device());
    PYOPTIM_CHECK(same_dims(t.sizes(), p.sizes()), op, ": ", name, "[", i, "] has shape ", t.sizes(),
                  " but params[", i, "] has shape ", p.sizes());
    PYOPTIM_CHECK(!shares_memory(t, p), op, ": ", name, "[", i, "] shares memory with params[", i, "]");
  }
  return policy;
}

void check_group_lists(const char* op, c10::IntArrayRef group_sizes,
                       std::initializer_list<std::pair<const char*, c10::ArrayRef<double>>> hyper, int64_t n) {
  const int64_t groups = static_cast<int64_t>(group_sizes.size());
  for (const auto& [name, values] : hyper) {
    PYOPTIM_CHECK(static_cast<int64_t>(values.size()) == groups, op, ": ", name, " has ", values.size(),
                " values for ", groups, " groups; one value per group");
  }
  int64_t total = 0;
  for (const auto k : c10::irange(groups)) {
    PYOPTIM_CHECK(group_sizes[k] >= 0, op, ": group_sizes[", k, "] is negative");
    total += group_sizes[k];
  }
  PYOPTIM_CHECK(total == n, op, ": group_sizes add up to ", total, " but there are ", n, " params");
}

void check_aux_tensor(const char* op, const char* name, const std::optional<at::Tensor>& t, const at::Device& device,
                      int64_t numel, at::ScalarType dtype) {
  if (!t.has_value()) {
    return;
  }
  PYOPTIM_CHECK(t->device() == device, op, ": ", name, " is on ", t->device(), " but params are on ", device);
  PYOPTIM_CHECK(t->scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t->scalar_type());
  PYOPTIM_CHECK(t->numel() == numel, op, ": ", name, " must have ", numel, " element(s), got ", t->numel());
}

void MultiTensorWork::finish() {
  for (auto& [caller, work] : writeback) {
    caller.copy_(work);
  }
  writeback.clear();
}

void WorkList::own(size_t i, at::Tensor copy) {
  if (copy_at_.empty()) {
    copy_at_.assign(caller_.size(), -1);
  }
  copy_at_[i] = static_cast<int32_t>(copies_.size());
  copies_.push_back(std::move(copy));
}

MultiTensorWork prepare_work(std::initializer_list<at::TensorList> lists, std::initializer_list<bool> mutated,
                             c10::IntArrayRef group_sizes, const TensorScan* scan) {
  TORCH_INTERNAL_ASSERT(lists.size() == mutated.size() && lists.size() > 0);
  MultiTensorWork w;
  const at::TensorList params = *lists.begin();
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_INTERNAL_ASSERT(scan == nullptr || n == 0 || static_cast<int64_t>(scan->numel.size()) == n);
  w.lists.reserve(lists.size());
  std::vector<uint8_t> scanned;  // per list: seen by `scan`
  bool all_scanned = true;       // every non-empty list
  for (const at::TensorList l : lists) {
    w.lists.emplace_back(l);
    scanned.push_back(scan != nullptr && !l.empty() &&
                      std::find(scan->lists.begin(), scan->lists.end(), l.data()) != scan->lists.end());
    all_scanned = all_scanned && (l.empty() || scanned.back());
  }
  w.group_of.reserve(n);
  for (const auto k : c10::irange(group_sizes.size())) {
    w.group_of.insert(w.group_of.end(), group_sizes[k], static_cast<int64_t>(k));
  }
  if (scan != nullptr && n > 0) {
    w.numel = scan->numel;
  } else {
    w.numel.reserve(n);
  }
  for (const auto i : c10::irange(n)) {
    const bool known = scan != nullptr && scan->in_layout[i];
    if (known && all_scanned) {
      continue;  // dense in one layout, every list: nothing to copy
    }
    const at::Tensor& p = params[i];
    if (scan == nullptr) {
      w.numel.push_back(p.numel());
    }
    // The layout every work tensor of this param shares: the param's own when
    // it is dense (no copy in the common case), else contiguous.
    const bool dense = known || p.is_non_overlapping_and_dense();
    const at::Tensor layout_of = dense ? at::Tensor() : at::empty_like(p, at::MemoryFormat::Contiguous);
    const at::Tensor& layout = dense ? p : layout_of;
    auto mut = mutated.begin();
    size_t k = 0;
    for (auto l = lists.begin(); l != lists.end(); ++l, ++mut, ++k) {
      if (l->empty() || (known && scanned[k])) {
        continue;
      }
      const at::Tensor& caller = (*l)[i];
      if (&caller != &layout && !(same_dims(caller.strides(), layout.strides()) && caller.is_non_overlapping_and_dense())) {
        at::Tensor work = at::empty_like(layout, layout.options().dtype(caller.scalar_type())).copy_(caller);
        if (*mut) {
          w.writeback.emplace_back(caller, work);
        }
        w.lists[k].own(i, std::move(work));
      }
    }
  }
  return w;
}

double cpu_inv_scale(const std::optional<at::Tensor>& grad_scale) {
  if (!grad_scale.has_value()) {
    return 1.0;
  }
  return static_cast<double>(static_cast<float>(1.0 / static_cast<double>(grad_scale->item<float>())));
}

}  // namespace pyoptim
