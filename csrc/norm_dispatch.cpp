// The norm ops' kernels at the dispatch keys above the backends: autograd
// (for the C++ backends, cpu and cuda) and CUDA autocast.
//
// Autograd: layer_norm_fwd, rms_norm_fwd and batch_norm_fwd, each a
// torch::autograd::Function whose backward calls the matching *_bwd op.
//
// note [C++ autograd]: these were Python formulas (torch.library's
// register_autograd), which cost about 8 us per forward and as much again per
// backward in the interpreter: more than the kernels themselves on a small
// input, and on a GPU the difference between keeping the device busy and
// not. Registered at the Autograd key, they run in the dispatcher as aten's
// own formulas do, and torch.compile still traces them: AOTAutograd sees the
// forward op, then the backward op, each through its fake kernel. The Python
// backends (triton, reference) keep their autograd.Function in
// pyoptim/functional.py; both call the backward ops with the same masks.
//
// note [autocast]: under CUDA autocast torch runs layer_norm and rms_norm in
// float32 (its fp32 cast policy: inputs cast, a float32 output), and a
// swapped-in module must give what torch's gives, so ours do the same (for
// rms_norm only where this torch registers that policy: it joined the list
// later than layer_norm). CPU autocast leaves both alone, and no autocast
// touches batch_norm: there ours run in the input's dtype, as torch's do.
// The Python backends apply the same policy in pyoptim/functional.py
// (_python_norm).
#include <array>
#include <tuple>
#include <vector>

#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

namespace pyoptim {
namespace {

using at::Tensor;
using std::optional;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using Tensor3 = std::tuple<Tensor, Tensor, Tensor>;
using Tensor2 = std::tuple<Tensor, Tensor>;
using Tensor5 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

// The ops' typed handles, looked up once (the schemas are in ops.cpp).
template <typename Sig>
c10::TypedOperatorHandle<Sig> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

bool given(const optional<Tensor>& t) { return t.has_value() && t->defined(); }

// An op's output where its mask asked for it; undefined (no gradient) elsewhere,
// where the op returned an empty placeholder.
Tensor wanted(bool want, Tensor t) { return want ? std::move(t) : Tensor(); }

// note [no graph, no Function]: with grad mode off, or no input that requires
// grad, there is no graph to record: the op below autograd is called as it
// is, without a Function node. That is cheaper (an inference call), and it is
// what lets the Python autograd.Function of note [torch.func]
// (pyoptim/functional.py) call these ops inside torch.func transforms, which
// refuse C++ Functions.
bool records_graph(const Tensor& input, const optional<Tensor>& weight, const optional<Tensor>& bias) {
  return torch::autograd::GradMode::is_enabled() &&
         (input.requires_grad() || (given(weight) && weight->requires_grad()) ||
          (given(bias) && bias->requires_grad()));
}

// note [statistics outputs]: the saved statistics (and BatchNorm's new running
// statistics) carry no gradient. They are returned detached rather than marked
// non-differentiable, because compiled autograd refuses a C++ Function that
// marked any output (CppNode::compiled_args asserts that none was). Grads are
// not materialized, so an unused output costs no zero-filled tensor and an
// unused `out` skips the backward.

// Which of (input, weight, bias) need a gradient. Function::apply gives an
// edge to each tensor argument that is given, in argument order (an absent
// optional gets none), so the edge index of weight and bias depends on which
// are present.
std::array<bool, 3> grads_needed(const AutogradContext* ctx, bool has_weight, bool has_bias) {
  size_t edge = 0;
  std::array<bool, 3> need{};
  need[0] = ctx->needs_input_grad(edge++);
  if (has_weight) need[1] = ctx->needs_input_grad(edge++);
  if (has_bias) need[2] = ctx->needs_input_grad(edge++);
  return need;
}

// -- LayerNorm / RMSNorm --------------------------------------------------------

using LayerNormFwd = Tensor3(const Tensor&, c10::IntArrayRef, const optional<Tensor>&, const optional<Tensor>&,
                             double);
using LayerNormBwd = Tensor3(const Tensor&, const Tensor&, c10::IntArrayRef, const Tensor&, const Tensor&,
                             const optional<Tensor>&, const optional<Tensor>&, std::array<bool, 3>);
using RmsNormFwd = Tensor2(const Tensor&, c10::IntArrayRef, const optional<Tensor>&, optional<double>);
using RmsNormBwd = Tensor2(const Tensor&, const Tensor&, c10::IntArrayRef, const Tensor&, const optional<Tensor>&,
                           std::array<bool, 2>);

const c10::TypedOperatorHandle<LayerNormFwd>& layer_norm_fwd_op() {
  static const auto op = typed_op<LayerNormFwd>("pyoptim::layer_norm_fwd");
  return op;
}

const c10::TypedOperatorHandle<RmsNormFwd>& rms_norm_fwd_op() {
  static const auto op = typed_op<RmsNormFwd>("pyoptim::rms_norm_fwd");
  return op;
}

// The forward ops below autograd: a Function's forward, or the whole call when
// no graph is recorded (note [no graph, no Function]).
Tensor3 layer_norm_fwd_below(const Tensor& input, c10::IntArrayRef normalized_shape, const optional<Tensor>& weight,
                             const optional<Tensor>& bias, double eps) {
  at::AutoDispatchBelowADInplaceOrView below;
  return layer_norm_fwd_op().call(input, normalized_shape, weight, bias, eps);
}

Tensor2 rms_norm_fwd_below(const Tensor& input, c10::IntArrayRef normalized_shape, const optional<Tensor>& weight,
                           optional<double> eps) {
  at::AutoDispatchBelowADInplaceOrView below;
  return rms_norm_fwd_op().call(input, normalized_shape, weight, eps);
}

optional<Tensor> maybe(const Tensor& t) { return t.defined() ? optional<Tensor>(t) : std::nullopt; }

struct LayerNormFunction : public torch::autograd::Function<LayerNormFunction> {
  static constexpr bool is_traceable = true;  // its backward is ops only (compiled autograd)

  static variable_list forward(AutogradContext* ctx, const Tensor& input, c10::IntArrayRef normalized_shape,
                               const optional<Tensor>& weight, const optional<Tensor>& bias, double eps) {
    auto [out, mean, rstd] = layer_norm_fwd_below(input, normalized_shape, weight, bias, eps);
    ctx->save_for_backward({input, weight.value_or(Tensor()), bias.value_or(Tensor()), mean, rstd});
    ctx->saved_data["normalized_shape"] = normalized_shape;
    ctx->set_materialize_grads(false);  // note [statistics outputs]
    return {out, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = typed_op<LayerNormBwd>("pyoptim::layer_norm_bwd");
    if (!grads[0].defined()) return variable_list(5);
    const auto saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &weight = saved[1], &bias = saved[2];
    auto need = grads_needed(ctx, weight.defined(), bias.defined());
    const auto shape = ctx->saved_data["normalized_shape"].toIntVector();
    auto [dx, dw, db] = op.call(grads[0], input, shape, saved[3], saved[4], maybe(weight), maybe(bias), need);
    return {wanted(need[0], dx), Tensor(), wanted(need[1], dw), wanted(need[2], db), Tensor()};
  }
};

struct RmsNormFunction : public torch::autograd::Function<RmsNormFunction> {
  static constexpr bool is_traceable = true;

  static variable_list forward(AutogradContext* ctx, const Tensor& input, c10::IntArrayRef normalized_shape,
                               const optional<Tensor>& weight, optional<double> eps) {
    auto [out, rstd] = rms_norm_fwd_below(input, normalized_shape, weight, eps);
    ctx->save_for_backward({input, weight.value_or(Tensor()), rstd});
    ctx->saved_data["normalized_shape"] = normalized_shape;
    ctx->set_materialize_grads(false);
    return {out, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = typed_op<RmsNormBwd>("pyoptim::rms_norm_bwd");
    if (!grads[0].defined()) return variable_list(4);
    const auto saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &weight = saved[1];
    auto need = grads_needed(ctx, weight.defined(), false);
    const auto shape = ctx->saved_data["normalized_shape"].toIntVector();
    auto [dx, dw] = op.call(grads[0], input, shape, saved[2], maybe(weight), {need[0], need[1]});
    return {wanted(need[0], dx), Tensor(), wanted(need[1], dw), Tensor()};
  }
};

Tensor3 layer_norm_fwd_autograd(const Tensor& input, c10::IntArrayRef normalized_shape,
                                const optional<Tensor>& weight, const optional<Tensor>& bias, double eps) {
  if (!records_graph(input, weight, bias)) {  // note [no graph, no Function]
    return layer_norm_fwd_below(input, normalized_shape, weight, bias, eps);
  }
  auto r = LayerNormFunction::apply(input, normalized_shape, weight, bias, eps);
  return {r[0], r[1].detach(), r[2].detach()};  // note [statistics outputs]
}

Tensor2 rms_norm_fwd_autograd(const Tensor& input, c10::IntArrayRef normalized_shape, const optional<Tensor>& weight,
                              optional<double> eps) {
  if (!records_graph(input, weight, std::nullopt)) {
    return rms_norm_fwd_below(input, normalized_shape, weight, eps);
  }
  auto r = RmsNormFunction::apply(input, normalized_shape, weight, eps);
  return {r[0], r[1].detach()};
}

// -- BatchNorm --------------------------------------------------------------------

using BatchNormFwd = Tensor5(const Tensor&, const optional<Tensor>&, const optional<Tensor>&,
                             const optional<Tensor>&, const optional<Tensor>&, bool, double, double);
using BatchNormBwd = Tensor3(const Tensor&, const Tensor&, const optional<Tensor>&, const Tensor&, const Tensor&,
                             bool, std::array<bool, 3>);

Tensor5 batch_norm_fwd_below(const Tensor& input, const optional<Tensor>& weight, const optional<Tensor>& bias,
                             const optional<Tensor>& running_mean, const optional<Tensor>& running_var, bool training,
                             double momentum, double eps) {
  static const auto op = typed_op<BatchNormFwd>("pyoptim::batch_norm_fwd");
  at::AutoDispatchBelowADInplaceOrView below;
  return op.call(input, weight, bias, running_mean, running_var, training, momentum, eps);
}

struct BatchNormFunction : public torch::autograd::Function<BatchNormFunction> {
  static constexpr bool is_traceable = true;

  static variable_list forward(AutogradContext* ctx, const Tensor& input, const optional<Tensor>& weight,
                               const optional<Tensor>& bias, const optional<Tensor>& running_mean,
                               const optional<Tensor>& running_var, bool training, double momentum, double eps) {
    auto [out, save_mean, save_invstd, new_mean, new_var] =
        batch_norm_fwd_below(input, weight, bias, running_mean, running_var, training, momentum, eps);
    ctx->save_for_backward({input, weight.value_or(Tensor()), save_mean, save_invstd});
    ctx->saved_data["training"] = training;
    ctx->saved_data["has_bias"] = given(bias);
    ctx->set_materialize_grads(false);
    return {out, save_mean, save_invstd, new_mean, new_var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = typed_op<BatchNormBwd>("pyoptim::batch_norm_bwd");
    if (!grads[0].defined()) return variable_list(8);
    const auto saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &weight = saved[1];
    auto need = grads_needed(ctx, weight.defined(), ctx->saved_data["has_bias"].toBool());
    auto [dx, dw, db] =
        op.call(grads[0], input, maybe(weight), saved[2], saved[3], ctx->saved_data["training"].toBool(), need);
    return {wanted(need[0], dx), wanted(need[1], dw), wanted(need[2], db), Tensor(), Tensor(), Tensor(), Tensor(),
            Tensor()};
  }
};

Tensor5 batch_norm_fwd_autograd(const Tensor& input, const optional<Tensor>& weight, const optional<Tensor>& bias,
                                const optional<Tensor>& running_mean, const optional<Tensor>& running_var,
                                bool training, double momentum, double eps) {
  if (!records_graph(input, weight, bias)) {
    return batch_norm_fwd_below(input, weight, bias, running_mean, running_var, training, momentum, eps);
  }
  auto r = BatchNormFunction::apply(input, weight, bias, running_mean, running_var, training, momentum, eps);
  return {r[0], r[1].detach(), r[2].detach(), r[3].detach(), r[4].detach()};
}

// -- CUDA autocast (note [autocast]) ---------------------------------------------------

Tensor3 layer_norm_fwd_autocast(const Tensor& input, c10::IntArrayRef normalized_shape,
                                const optional<Tensor>& weight, const optional<Tensor>& bias, double eps) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCUDA);
  using at::autocast::cached_cast;
  return layer_norm_fwd_op().call(cached_cast(at::kFloat, input), normalized_shape, cached_cast(at::kFloat, weight),
                 cached_cast(at::kFloat, bias), eps);
}

Tensor2 rms_norm_fwd_autocast(const Tensor& input, c10::IntArrayRef normalized_shape, const optional<Tensor>& weight,
                              optional<double> eps) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCUDA);
  using at::autocast::cached_cast;
  return rms_norm_fwd_op().call(cached_cast(at::kFloat, input), normalized_shape, cached_cast(at::kFloat, weight), eps);
}

// Whether this torch gives aten op `name` a CUDA autocast kernel.
bool torch_autocasts(const char* name) {
  const auto op = c10::Dispatcher::singleton().findOp({name, ""});
  return op.has_value() && op->hasKernelForDispatchKey(c10::DispatchKey::AutocastCUDA);
}

}  // namespace
}  // namespace pyoptim

TORCH_LIBRARY_IMPL(pyoptim, Autograd, m) {
  m.impl("layer_norm_fwd", &pyoptim::layer_norm_fwd_autograd);
  m.impl("rms_norm_fwd", &pyoptim::rms_norm_fwd_autograd);
  m.impl("batch_norm_fwd", &pyoptim::batch_norm_fwd_autograd);
  // The backward ops and SyncBatchNorm's pieces have no derivative of their
  // own: a double backward through them raises torch's "the derivative for
  // '<op>' is not implemented" instead of running them as constants (zero
  // second derivatives, with only a warning).
  for (const char* op : {"layer_norm_bwd", "rms_norm_bwd", "batch_norm_bwd", "batch_norm_stats", "batch_norm_elemt",
                         "batch_norm_backward_reduce", "batch_norm_backward_elemt"}) {
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
  }
}

TORCH_LIBRARY_IMPL(pyoptim, AutocastCUDA, m) {
  m.impl("layer_norm_fwd", &pyoptim::layer_norm_fwd_autocast);
  if (pyoptim::torch_autocasts("aten::rms_norm")) {
    m.impl("rms_norm_fwd", &pyoptim::rms_norm_fwd_autocast);
  }
}
