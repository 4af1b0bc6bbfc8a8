// The step plan: a steady-state optimizer step with no per-tensor Python.
//
// note [step plan]: FusedOptimizer.step() (pyoptim/optim/_base.py) gathers
// params, grads and state into op calls in Python, which costs about a
// microsecond per tensor. Once a step has run with no new state, it records
// that step's calls here: the op handles, every argument but the grads and
// the per-group hyperparameters, and what each call depends on (the groups'
// param lists, each param's dtype and device, its state dict and the state
// tensors in it). Each later step hands over only what may change (the
// hyperparameters, GradScaler's tensors, the clip's max norm); run() checks
// the dependencies, reads every grad in C++ (p.grad's field, so grads
// made anew by every backward are fine), and calls the ops through the
// dispatcher with the cached lists. Any dependency that moved (a grad set to
// None or of another shape, a param's dtype or device changed, a param
// replaced in its group, a state tensor replaced) makes run() return False
// before anything is written, and the caller takes the ordinary path, which
// raises torch's errors and records a new plan. The checks that the ops
// make themselves (shapes of state against params, hyperparameter values)
// are not repeated here: the ops still make them (one place per check).
//
// Flat storage (note [flat storage] in pyoptim/optim/_base.py) adds members
// whose grads must be views of one flat grad buffer, which the calls then
// pass as one tensor: run() checks that each such param's data is still at
// its slot, re-links a grad that a set_to_none zero_grad replaced (one copy
// into the slot) and, after the calls, copies the shared step counter of each
// flat unit into the per-param step tensors.
//
// This is an eager-mode fast path bound with pybind11, not an op: under
// torch.compile, for tensor subclasses (DTensor) and for the Python backends
// the optimizer takes the ordinary path, which calls the registered ops.
#include "step_plan.h"
#include "multi_tensor_host.h"
#include "step_ops.h"

#include <cstring>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <c10/util/irange.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/csrc/jit/frontend/tracer.h>
#include <torch/csrc/jit/python/pybind_utils.h>
#include <torch/extension.h>

namespace py = pybind11;

namespace pyoptim {
namespace {

// A dict's keys and values in iteration order. Comparing these pointers
// finds a replaced entry without hashing: a Tensor key's __hash__ is Python
// code, ~0.1 us a lookup.
std::vector<PyObject*> items(PyObject* dict) {
  std::vector<PyObject*> out;
  out.reserve(2 * PyDict_GET_SIZE(dict));
  Py_ssize_t pos = 0;
  PyObject *key, *value;
  while (PyDict_Next(dict, &pos, &key, &value)) {
    out.push_back(key);
    out.push_back(value);
  }
  return out;
}

bool same_items(PyObject* dict, const std::vector<PyObject*>& expected) {
  if (static_cast<size_t>(2 * PyDict_GET_SIZE(dict)) != expected.size()) {
    return false;
  }
  Py_ssize_t pos = 0;
  PyObject *key, *value;
  size_t j = 0;
  while (PyDict_Next(dict, &pos, &key, &value)) {
    if (key != expected[j] || value != expected[j + 1]) {
      return false;
    }
    j += 2;
  }
  return true;
}

// A dict's version: CPython 3.11 to 3.13 give a dict a new ma_version_tag at
// every change (PEP 509), so an equal tag means unchanged items, in one load.
// 0 where that is not so (3.14 dropped the tag): the items are compared.
uint64_t dict_version(PyObject* dict) {
#if PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030E0000
  _Pragma("GCC diagnostic push") _Pragma("GCC diagnostic ignored \"-Wdeprecated-declarations\"")
  return reinterpret_cast<PyDictObject*>(dict)->ma_version_tag;
  _Pragma("GCC diagnostic pop")
#else
  (void)dict;
  return 0;
#endif
}

// A dict whose items a plan depends on.
struct WatchedDict {
  PyObject* dict = nullptr;
  uint64_t version = 0;
  std::vector<PyObject*> items;

  explicit WatchedDict(PyObject* d) : dict(d), version(dict_version(d)), items(pyoptim::items(d)) {}

  bool unchanged() {
    const uint64_t v = dict_version(dict);
    if (v != 0 && v == version) {
      return true;
    }
    if (!same_items(dict, items)) {
      return false;
    }
    version = v;  // changed and changed back (or no tag): the same items
    return true;
  }
};

// One param the plan depends on.
struct Member {
  at::Tensor param;
  at::ScalarType dtype;
  at::Device device;
  WatchedDict state;                // state[param] and its items (held in StepPlan::keep_)
  at::Tensor grad_slot;             // flat storage: the view p.grad must be (undefined: not flat)
  const c10::StorageImpl* storage = nullptr;  // flat storage: where p's data must stay (the buffer's storage ...
  int64_t offset = 0;                         // ... at this offset): read from p's TensorImpl alone
  const at::Tensor* grad_field = nullptr;     // where p.grad lived when recorded: only ever prefetched
};

// One argument of a recorded call, in the forms the op's kernel takes it
// unboxed (note [unboxed replay]): a list argument's tensors, doubles or ints
// are kept as vectors, which the call passes as ArrayRefs.
struct Arg {
  c10::IValue value;                 // the boxed argument
  std::vector<at::Tensor> tensors;   // Tensor[] and Tensor[]?: the list (the grads: this step's, only during run())
  std::vector<double> doubles;       // float[]
  std::vector<int64_t> ints;         // int[]
  std::optional<at::Tensor> tensor;  // Tensor?

  void set(c10::IValue v) {
    value = std::move(v);
    if (value.isTensorList()) {
      tensors = value.toTensorVector();
    } else if (value.isDoubleList()) {
      doubles = value.toDoubleVector();
    } else if (value.isIntList()) {
      ints = value.toIntVector();
    } else if (value.isTensor()) {
      tensor = value.toTensor();
    } else if (value.isNone()) {
      tensor.reset();
    }
  }
};

// An unboxed call of a recorded op's backend kernel (see Replay below).
using Invoker = void (*)(const c10::OperatorHandle& op, c10::DispatchKeySet keys, const std::vector<Arg>& args);

struct Call {
  c10::OperatorHandle op;
  std::vector<Arg> args;                // every argument, as last recorded
  Invoker invoke = nullptr;             // the unboxed call, for the ops of step_ops.h
  int64_t grads_index;                  // position of the grads list in `args`
  std::vector<int64_t> grad_members;    // per grads entry: the member whose grad it is, or -1 (fixed: flat)
  std::vector<at::Tensor> fixed_grads;  // per grads entry with -1: the flat grad buffer
  std::vector<std::pair<py::object, int64_t>> kwarg_index;  // per-step keyword name -> position
  int64_t grad_norm_index = -1;
  int64_t max_grad_norm_index = -1;
  at::Device device = at::kCPU;         // the call's tensors' device

  // The boxed arguments (for the dispatcher's boxed call and the profiler).
  std::vector<c10::IValue> stack() const {
    std::vector<c10::IValue> out;
    out.reserve(args.size());
    for (const auto i : c10::irange(args.size())) {
      out.push_back(static_cast<int64_t>(i) == grads_index ? c10::IValue(args[i].tensors) : args[i].value);
    }
    return out;
  }
};

// note [unboxed replay]: a boxed call of an op converts each Tensor[]
// argument into a new std::vector<Tensor>, a reference count taken and
// dropped on every tensor of every list, which costs more than the rest of
// a tiny tensor's step. For the ops of step_ops.h, run() calls the backend
// kernel unboxed instead, with ArrayRefs over the plan's own lists. Each
// parameter type of those signatures reads its Arg form here.
template <typename T>
struct FromArg;
template <>
struct FromArg<at::TensorList> {
  static at::TensorList get(const Arg& a) { return a.tensors; }
};
template <>
struct FromArg<std::optional<at::TensorList>> {
  static std::optional<at::TensorList> get(const Arg& a) {
    return a.value.isNone() ? std::nullopt : std::optional<at::TensorList>(a.tensors);
  }
};
template <>
struct FromArg<at::ArrayRef<double>> {
  static at::ArrayRef<double> get(const Arg& a) { return a.doubles; }
};
template <>
struct FromArg<at::IntArrayRef> {
  static at::IntArrayRef get(const Arg& a) { return a.ints; }
};
template <>
struct FromArg<const std::optional<at::Tensor>&> {
  static const std::optional<at::Tensor>& get(const Arg& a) { return a.tensor; }
};
template <>
struct FromArg<bool> {
  static bool get(const Arg& a) { return a.value.toBool(); }
};
template <>
struct FromArg<double> {
  static double get(const Arg& a) { return a.value.toDouble(); }
};
template <>
struct FromArg<std::optional<int64_t>> {
  static std::optional<int64_t> get(const Arg& a) {
    return a.value.isNone() ? std::nullopt : std::optional<int64_t>(a.value.toInt());
  }
};

template <typename Sig>
struct Replay;
template <typename... Params>
struct Replay<void(Params...)> {
  static constexpr size_t kArity = sizeof...(Params);
  static void call(const c10::OperatorHandle& op, c10::DispatchKeySet keys, const std::vector<Arg>& args) {
    call_with(op.typed<void(Params...)>(), keys, args, std::index_sequence_for<Params...>{});
  }
  template <size_t... I>
  static void call_with(const c10::TypedOperatorHandle<void(Params...)>& typed, c10::DispatchKeySet keys,
                        const std::vector<Arg>& args, std::index_sequence<I...>) {
    typed.redispatch(keys, FromArg<Params>::get(args[I])...);
  }
};

// The unboxed call of `op` (a schema's name) and the number of arguments its
// signature takes, or none for an op step_ops.h does not list.
std::optional<std::pair<Invoker, size_t>> invoker_of(const c10::OperatorHandle& op) {
  const std::string& name = op.schema().name();
  auto entry = [&](auto* sig) {
    using Sig = std::remove_pointer_t<decltype(sig)>;
    op.typed<Sig>();  // throws where the registered kernels have another signature
    return std::make_pair(&Replay<Sig>::call, Replay<Sig>::kArity);
  };
  if (name == "pyoptim::adam_step_") {
    return entry(static_cast<step_ops::Adam*>(nullptr));
  }
  if (name == "pyoptim::sgd_step_") {
    return entry(static_cast<step_ops::Sgd*>(nullptr));
  }
  if (name == "pyoptim::lion_step_") {
    return entry(static_cast<step_ops::Lion*>(nullptr));
  }
  if (name == "pyoptim::lamb_step_") {
    return entry(static_cast<step_ops::Lamb*>(nullptr));
  }
  if (name == "pyoptim::adagrad_step_") {
    return entry(static_cast<step_ops::Adagrad*>(nullptr));
  }
  if (name == "pyoptim::rmsprop_step_") {
    return entry(static_cast<step_ops::Rmsprop*>(nullptr));
  }
  return std::nullopt;
}

int64_t argument_index(const c10::FunctionSchema& schema, const std::string& name) {
  const auto index = schema.argumentIndexWithName(name);
  TORCH_CHECK(index.has_value(), "StepPlan: ", schema.name(), " has no argument ", name);
  return static_cast<int64_t>(*index);
}

class StepPlan {
 public:
  // `state`: the optimizer's state, as complete for this plan's step.
  explicit StepPlan(py::object state) : state_(std::move(state)), state_items_(state_.ptr()) {
    hold(state_items_.items);
  }

  // The params of every group, in order (group["params"] objects as listed).
  void set_groups(const py::list& param_lists) {
    groups_.clear();
    for (const py::handle lst : param_lists) {
      std::vector<PyObject*> items;
      for (const py::handle p : lst.cast<py::list>()) {
        items.push_back(p.ptr());
        keep_.push_back(py::reinterpret_borrow<py::object>(p));
      }
      groups_.push_back(std::move(items));
    }
  }

  // A param the plan reads: its state dict (state[param]) and every value in
  // it must stay the same objects; grad_slot (flat storage) is the view its
  // grad must be. Returns the member's index.
  int64_t add_member(const py::object& param, const py::object& state_dict,
                     const std::optional<at::Tensor>& grad_slot) {
    TORCH_CHECK(PyDict_Check(state_dict.ptr()), "StepPlan: a param's state must be a dict");
    Member m{THPVariable_Unpack(param.ptr()), at::kFloat, at::kCPU, WatchedDict(state_dict.ptr()), {}, nullptr, 0};
    m.dtype = m.param.scalar_type();
    m.device = m.param.device();
    keep_.push_back(param);
    keep_.push_back(state_dict);
    hold(m.state.items);
    if (const torch::autograd::AutogradMeta* meta = torch::autograd::impl::get_autograd_meta(m.param)) {
      m.grad_field = &meta->grad_;
    }
    if (grad_slot.has_value()) {
      m.grad_slot = *grad_slot;
      m.storage = m.param.storage().unsafeGetStorageImpl();
      m.offset = m.param.storage_offset();
    }
    members_.push_back(std::move(m));
    return static_cast<int64_t>(members_.size()) - 1;
  }

  // One op call: `op` (e.g. "pyoptim::adam_step_") with `args` and `kwargs`
  // as the ordinary path made it; grads_arg names its grads list, whose entry
  // j is member grad_members[j]'s grad (or, where -1, the fixed tensor in
  // args). `per_step` names the keywords each run() passes anew.
  void add_call(const std::string& op, const py::tuple& args, const py::dict& kwargs, const std::string& grads_arg,
                const std::vector<int64_t>& grad_members, const py::list& per_step) {
    Call c{c10::Dispatcher::singleton().findSchemaOrThrow(op.c_str(), ""), {}, nullptr, 0, grad_members, {}, {}};
    const c10::FunctionSchema& schema = c.op.schema();
    std::vector<c10::IValue> stack = torch::jit::createStackForSchema(schema, args, kwargs, std::nullopt);
    if (const auto invoker = invoker_of(c.op)) {
      TORCH_CHECK(invoker->second == stack.size(), "StepPlan: ", schema.name(), " takes ", stack.size(),
                  " arguments but its C++ signature ", invoker->second);
      c.invoke = invoker->first;
    }
    c.grads_index = argument_index(schema, grads_arg);
    const std::vector<at::Tensor> grads = stack[c.grads_index].toTensorVector();
    TORCH_CHECK(!grads.empty() && grads.size() == grad_members.size(), "StepPlan: ", grads.size(), " grads for ",
                grad_members.size(), " members");
    c.device = grads[0].device();
    for (const auto j : c10::irange(grads.size())) {
      c.fixed_grads.push_back(grad_members[j] < 0 ? grads[j] : at::Tensor());
    }
    // Not the recorded step's grads: holding them would keep a set_to_none
    // zero_grad from freeing them.
    stack[c.grads_index] = c10::IValue(c10::List<at::Tensor>());
    c.args.resize(stack.size());
    for (const auto i : c10::irange(stack.size())) {
      c.args[i].set(std::move(stack[i]));
    }
    for (const py::handle k : per_step) {
      const std::string key = k.cast<std::string>();
      c.kwarg_index.emplace_back(py::reinterpret_borrow<py::object>(k), argument_index(schema, key));
    }
    if (schema.argumentIndexWithName("grad_norm").has_value()) {
      c.grad_norm_index = argument_index(schema, "grad_norm");
      c.max_grad_norm_index = argument_index(schema, "max_grad_norm");
    }
    calls_.push_back(std::move(c));
  }

  // After the calls, step_all[1:] takes step_all[0]'s value (a flat unit's
  // per-param step counters, advanced as one by the op).
  void add_step_sync(const at::Tensor& step_all) { step_syncs_.push_back(step_all); }

  // One step, or False (nothing written) when the plan no longer applies.
  // kwargs[c]: call c's per-step keywords. With max_grad_norm, one norm pass
  // over all grads clips them inside the calls; returns (True, total norm).
  py::tuple run(const py::list& param_lists, const py::object& state, const py::list& kwargs,
                const std::optional<double>& max_grad_norm) {
    const py::tuple miss = py::make_tuple(false, py::none());
    // Every state entry the same object: none added, replaced or removed
    // (load_state_dict replaces the whole dict).
    if (state.ptr() != state_.ptr() || !state_items_.unchanged() || !same_groups(param_lists)) {
      return miss;
    }
    grads_.assign(members_.size(), nullptr);  // non-flat members' grads (p.grad's field)
    relink_.clear();                           // flat members whose grad is to be copied into its slot
    for (const auto i : c10::irange(members_.size())) {
      if (i + kPrefetchAhead < members_.size()) {
        prefetch(members_[i + kPrefetchAhead]);
      }
      if (i + kPrefetchAhead / 2 < members_.size()) {
        prefetch_grad(members_[i + kPrefetchAhead / 2]);
      }
      Member& m = members_[i];
      const at::Tensor& p = m.param;
      const at::Tensor& g = grad_of(p);
      if (m.grad_slot.defined()) {
        // Flat storage: the data still at its slot says the layout holds
        // (the update writes the slot, nothing else); a grad that is its slot
        // needs no other check.
        const c10::TensorImpl* impl = p.unsafeGetTensorImpl();
        if (impl->unsafe_storage().unsafeGetStorageImpl() != m.storage || impl->storage_offset() != m.offset ||
            impl->dtype() != m.dtype) {
          return miss;  // p.data was replaced
        }
        if (!g.is_same(m.grad_slot)) {
          if (!usable_grad(g, m) || !same_dims(p.strides(), m.grad_slot.strides())) {
            return miss;
          }
          relink_.push_back(static_cast<int64_t>(i));
        }
      } else {
        if (p.scalar_type() != m.dtype || p.device() != m.device || !usable_grad(g, m)) {
          return miss;  // the ordinary path skips the param, or raises torch's error
        }
        grads_[i] = &g;
      }
      if (!m.state.unchanged()) {
        return miss;
      }
    }
    // The per-step arguments. The grads are held only for this step: a
    // set_to_none zero_grad after it frees them.
    const ReleaseGrads release{calls_};
    for (const auto c : c10::irange(calls_.size())) {
      Call& call = calls_[c];
      const py::dict kw = kwargs[c].cast<py::dict>();
      const auto& schema_args = call.op.schema().arguments();
      for (const auto& [key, index] : call.kwarg_index) {
        call.args[index].set(torch::jit::toIValue(kw[key], schema_args[index].type()));
      }
      std::vector<at::Tensor>& these = call.args[call.grads_index].tensors;
      these.clear();
      for (const auto j : c10::irange(call.grad_members.size())) {
        const int64_t mi = call.grad_members[j];
        these.push_back(mi < 0 ? call.fixed_grads[j] : *grads_[mi]);
      }
    }

    // Everything checked: from here on the step writes.
    at::NoGradGuard no_grad;
    relink_grads(relink_);
    const bool direct = !c10::impl::dispatch_mode_enabled() && !torch::jit::tracer::isTracing();
    py::object total = py::none();
    if (max_grad_norm.has_value()) {
      total = py::cast(clip(*max_grad_norm, direct));
    }
    for (const Call& call : calls_) {
      call_op(call, direct);
    }
    for (const at::Tensor& s : step_syncs_) {
      if (s.numel() > 1) {
        s.narrow(0, 1, s.numel() - 1).copy_(s.narrow(0, 0, 1).expand({s.numel() - 1}));
      }
    }
    return py::make_tuple(true, total);
  }

 private:
  // Empties every call's grads list when run() returns or throws.
  struct ReleaseGrads {
    std::vector<Call>& calls;
    ~ReleaseGrads() {
      for (Call& c : calls) {
        c.args[c.grads_index].tensors.clear();
      }
    }
  };

  // What the checks of a member read lies in four objects that are rarely
  // in cache together (the param's TensorImpl, its autograd metadata, its
  // state dict): the loop asks for them a few members ahead, so that a step
  // over thousands of params is not one cache miss after another. A
  // prefetch never faults, so a stale address (a grad_field whose metadata
  // was replaced) costs nothing but the miss.
  static constexpr size_t kPrefetchAhead = 8;

  static void prefetch(const Member& m) {
    const char* impl = reinterpret_cast<const char*>(m.param.unsafeGetTensorImpl());
    __builtin_prefetch(impl);
    __builtin_prefetch(impl + 64);
    __builtin_prefetch(impl + 128);
    __builtin_prefetch(m.grad_field);
    __builtin_prefetch(m.state.dict);
  }

  // The TensorImpl of m's grad, read through the param's TensorImpl and
  // autograd metadata that prefetch() asked for kPrefetchAhead / 2 members
  // earlier.
  static void prefetch_grad(const Member& m) {
    const char* impl = reinterpret_cast<const char*>(grad_of(m.param).unsafeGetTensorImpl());
    __builtin_prefetch(impl);
    __builtin_prefetch(impl + 64);
    __builtin_prefetch(impl + 128);
  }

  // p.grad, read from its autograd metadata: at::Tensor::grad() asks the
  // variable hooks whether p is a leaf (for a warning about non-leaves),
  // which costs more than every other per-param check here together.
  static const at::Tensor& grad_of(const at::Tensor& p) {
    static const at::Tensor undefined;
    const torch::autograd::AutogradMeta* meta = torch::autograd::impl::get_autograd_meta(p);
    return meta != nullptr ? meta->grad_ : undefined;
  }

  // A grad the op can take for member m's param as the ordinary path would pass it.
  static bool usable_grad(const at::Tensor& g, const Member& m) {
    return g.defined() && g.layout() == at::kStrided && g.scalar_type() == m.dtype && g.device() == m.device &&
           same_dims(g.sizes(), m.param.sizes());
  }

  // Copies each listed flat member's grad into its slot and makes the slot
  // its grad again: on CPU a memcpy where the layouts agree (at::copy_ costs
  // a microsecond a tensor), else one multi-tensor copy.
  void relink_grads(const std::vector<int64_t>& relink) {
    std::vector<at::Tensor> slots, grads;
    for (const int64_t i : relink) {
      Member& m = members_[i];
      const at::Tensor g = grad_of(m.param);  // a copy: the slot replaces it below
      if (g.is_cpu() && same_dims(g.strides(), m.grad_slot.strides()) && g.is_non_overlapping_and_dense()) {
        std::memcpy(m.grad_slot.data_ptr(), g.const_data_ptr(), g.nbytes());
      } else {
        slots.push_back(m.grad_slot);
        grads.push_back(g);
      }
      m.param.mutable_grad() = m.grad_slot;
    }
    if (!slots.empty()) {
      at::_foreach_copy_(slots, grads);
    }
  }

  // The backend kernel of a call on CPU or CUDA tensors, straight from the
  // dispatcher's table (`direct`: no dispatch mode or tracer is active):
  // past the keys above the backend, whose kernels for our ops do nothing
  // under no_grad but look at every tensor (the autograd fallback asks each
  // whether it requires grad). The profiler still sees the op.
  static void call_op(const Call& call, bool direct) {
    const std::optional<c10::DispatchKeySet> keys = backend_keys(call.device, direct);
    if (!keys.has_value()) {
      std::vector<c10::IValue> stack = call.stack();
      call.op.callBoxed(&stack);
      return;
    }
    std::vector<c10::IValue> inputs;  // outlives the guard, which may keep a view of it
    at::RecordFunction guard(at::RecordScope::FUNCTION);
    if (guard.isActive()) {
      if (guard.needsInputs()) {
        inputs = call.stack();
        guard.before(call.op.schema().name().c_str(), c10::ArrayRef<const c10::IValue>(inputs.data(), inputs.size()));
      } else {
        guard.before(call.op.schema().name().c_str());
      }
    }
    if (call.invoke != nullptr) {
      call.invoke(call.op, *keys, call.args);
    } else {
      std::vector<c10::IValue> stack = call.stack();
      call.op.redispatchBoxed(*keys, &stack);
    }
  }

  // The backend key a call on `device` redispatches to, or none where it
  // goes through the dispatcher (not `direct`, or not a CPU/CUDA device).
  static std::optional<c10::DispatchKeySet> backend_keys(const at::Device& device, bool direct) {
    if (!direct || (!device.is_cpu() && !device.is_cuda())) {
      return std::nullopt;
    }
    return c10::DispatchKeySet(device.is_cuda() ? c10::DispatchKey::CUDA : c10::DispatchKey::CPU);
  }

  // Pointers compared later must not be freed and reused meanwhile.
  void hold(const std::vector<PyObject*>& objects) {
    for (PyObject* o : objects) {
      keep_.push_back(py::reinterpret_borrow<py::object>(o));
    }
  }

  bool same_groups(const py::list& param_lists) const {
    if (static_cast<size_t>(py::len(param_lists)) != groups_.size()) {
      return false;
    }
    for (const auto k : c10::irange(groups_.size())) {
      PyObject* lst = PyList_GET_ITEM(param_lists.ptr(), k);
      if (!PyList_Check(lst) || static_cast<size_t>(PyList_GET_SIZE(lst)) != groups_[k].size()) {
        return false;
      }
      for (const auto j : c10::irange(groups_[k].size())) {
        if (PyList_GET_ITEM(lst, j) != groups_[k][j]) {
          return false;
        }
      }
    }
    return true;
  }

  // The fused clip's norm pass: each call's grads in one multi_tensor_norm,
  // the totals combined on the first call's device; each call then scales
  // its grads by the clip factor in its kernel (as _fuse_clip does).
  at::Tensor clip(double max_grad_norm, bool direct) {
    static const auto norm = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("pyoptim::multi_tensor_norm", "")
                                 .typed<std::tuple<at::Tensor, at::Tensor>(at::TensorList, double)>();
    std::vector<at::Tensor> totals;
    for (const Call& call : calls_) {
      const std::vector<at::Tensor>& grads = call.args[call.grads_index].tensors;
      if (const std::optional<c10::DispatchKeySet> keys = backend_keys(call.device, direct)) {
        RECORD_FUNCTION("pyoptim::multi_tensor_norm", std::vector<c10::IValue>());
        totals.push_back(std::get<0>(norm.redispatch(*keys, grads, 2.0)));  // as call_op
      } else {
        totals.push_back(std::get<0>(norm.call(grads, 2.0)));
      }
    }
    at::Tensor total = totals[0];
    if (totals.size() > 1) {
      std::vector<at::Tensor> on0;
      for (const at::Tensor& t : totals) {
        on0.push_back(t.to(totals[0].device(), /*non_blocking=*/true));
      }
      total = at::linalg_vector_norm(at::stack(on0), 2.0);
    }
    for (Call& call : calls_) {
      TORCH_INTERNAL_ASSERT(call.grad_norm_index >= 0);
      call.args[call.grad_norm_index].set(total.device() == call.device ? total : total.to(call.device));
      call.args[call.max_grad_norm_index].set(max_grad_norm);
    }
    return total;
  }

  py::object state_;
  WatchedDict state_items_;  // state's params and their state dicts, as recorded
  std::vector<std::vector<PyObject*>> groups_;
  std::vector<Member> members_;
  std::vector<Call> calls_;
  std::vector<at::Tensor> step_syncs_;
  std::vector<const at::Tensor*> grads_;  // run()'s scratch, kept so that a step does no large allocation
  std::vector<int64_t> relink_;
  std::vector<py::object> keep_;       // references that keep every borrowed pointer above alive
};

}  // namespace

void bind_step_plan(PyObject* module) {
  py::module_ m = py::reinterpret_borrow<py::module_>(module);
  py::class_<StepPlan>(m, "StepPlan", "A recorded optimizer step (note [step plan] in csrc/step_plan.cpp).")
      .def(py::init<py::object>(), py::arg("state"))
      .def("set_groups", &StepPlan::set_groups)
      .def("add_member",
&StepPlan::add_member, py::arg("param"), py::arg("state_dict"), py::arg("grad_slot") = py::none())
      .def("add_call", &StepPlan::add_call, py::arg("op"), py::arg("args"), py::arg("kwargs"),
           py::arg("grads_arg"), py::arg("grad_members"), py::arg("per_step"))
      .def("add_step_sync", &StepPlan::add_step_sync)
      .def("run", &StepPlan::run, py::arg("param_lists"), py::arg("state"), py::arg("kwargs"),
           py::arg("max_grad_norm") = py::none());
}

}  // namespace pyoptim
