"""torch.compile over pyoptim: every norm on every backend with fullgraph=True (forward and backward), a compiled
training step (model, optimizer.step(), scheduler.step()) that stops compiling after its first steps and equals
eager, fullgraph=True over optimizer.step() itself; and, where a GPU is present, a whole training step captured in
a CUDA graph. Graphs and graph breaks are counted with torch._dynamo.utils.counters."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import pyoptim
from pyoptim import _backends
from tests.conftest import HAS_CUDA, TOL, impls, impl_id, requires_cuda

pytestmark = pytest.mark.skipif(not _backends.EXTENSION_LOADED, reason="the extension is not built")

# Every backend of the norms, the Triton one under the interpreter where there is no GPU.
NORM_IMPLS = [pytest.param(i, id=impl_id(i)) for i in impls("layer_norm_fwd")]
BN_IMPLS = [pytest.param(i, id=impl_id(i)) for i in impls("batch_norm_fwd")]


def _reset() -> None:
    torch._dynamo.reset()
    counters.clear()


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _assert_one_graph() -> None:
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert _graphs() == 1


def _assert_same_training(eager, compiled, make_input, fn, steps=2) -> None:
    """`steps` calls of fn(model, x) and its backward on `eager` and on `compiled` (a deep copy under
    torch.compile(fullgraph=True)): outputs, input and parameter grads, and buffers equal."""
    run = torch.compile(lambda x: fn(compiled, x), fullgraph=True, backend="aot_eager")
    for step in range(steps):
        x = make_input(step)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = fn(eager, xa), run(xb)
        torch.testing.assert_close(yb, ya, **TOL[torch.float32])
        ya.sum().backward()
        yb.sum().backward()
        torch.testing.assert_close(xb.grad, xa.grad, **TOL[torch.float32])
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
            torch.testing.assert_close(q.grad, p.grad, **TOL[torch.float32], msg=lambda m: f"{step} {name}: {m}")
            p.grad = q.grad = None
        for (name, s), t in zip(eager.named_buffers(), compiled.buffers()):
            torch.testing.assert_close(t, s, **TOL[torch.float32], msg=lambda m: f"{step} {name}: {m}")


# -- (1) the norms, every backend ------------------------------------------------------


@pytest.mark.parametrize("impl", NORM_IMPLS)
def test_layer_norm_and_rms_norm_fullgraph(impl):
    """LayerNorm then RMSNorm (and a bias-free LayerNorm) in a model: one graph, no break, eager's numbers."""
    device, backend = torch.device(impl[0]), impl[1]
    _reset()
    torch.manual_seed(0)
    eager = torch.nn.Sequential(torch.nn.Linear(16, 32), pyoptim.nn.LayerNorm(32, backend=backend), torch.nn.GELU(),
                                pyoptim.nn.RMSNorm(32, backend=backend),
                                pyoptim.nn.LayerNorm(32, bias=False, backend=backend)).to(device)
    with torch.no_grad():
        for m in eager:
            if getattr(m, "weight", None) is not None and not isinstance(m, torch.nn.Linear):
                m.weight.uniform_(0.5, 1.5)
    _assert_same_training(eager, copy.deepcopy(eager), lambda _: torch.randn(4, 5, 16, device=device),
                          lambda m, x: m(x).square())
    _assert_one_graph()


@pytest.mark.parametrize("impl", BN_IMPLS)
def test_batch_norm_and_instance_norm_fullgraph(impl):
    """BatchNorm2d (training, then eval), BatchNorm1d, InstanceNorm2d with running statistics and SyncBatchNorm
    outside a process group (a BatchNorm): one graph per mode, no break, eager's outputs, grads and buffers."""
    device, backend = torch.device(impl[0]), impl[1]
    _reset()
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.bn = pyoptim.nn.BatchNorm2d(4, backend=backend)
            self.inorm = pyoptim.nn.InstanceNorm2d(4, affine=True, track_running_stats=True, backend=backend)
            self.sync = pyoptim.nn.SyncBatchNorm(4, backend=backend)
            # (momentum=None, a cumulative average, reads num_batches_tracked on the host: torch's breaks the graph too)
            self.bn1 = pyoptim.nn.BatchNorm1d(4, momentum=0.3, backend=backend)

        def forward(self, x):
            y = self.sync(self.inorm(torch.relu(self.bn(self.conv(x)))))
            return self.bn1(y.flatten(2))

    eager = Net().to(device)
    compiled = copy.deepcopy(eager)
    make = lambda step: torch.randn(3, 3, 6, 6, device=device)  # noqa: E731
    _assert_same_training(eager, compiled, make, lambda m, x: m(x).square(), steps=2)
    _assert_one_graph()
    eager.eval()
    compiled.eval()
    _assert_same_training(eager, compiled, make, lambda m, x: m(x).square(), steps=1)
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_triton_ops_are_dispatcher_ops():
    """note [triton ops]: the Triton launchers of the norms as ops with the C++ ops' schemas (traced into where
    Triton compiles, opaque under the interpreter), each passing opcheck."""
    if "triton" not in _backends.available("layer_norm_fwd", "cuda" if HAS_CUDA else "cpu"):
        pytest.skip("no Triton here")
    device = "cuda" if HAS_CUDA else "cpu"
    pyoptim.nn.LayerNorm(4, backend="triton")  # importing the kernels registers the ops
    pyoptim.functional._prepare("layer_norm_fwd", "triton")
    pyoptim.functional._prepare("rms_norm_fwd", "triton")
    pyoptim.functional._prepare("batch_norm_fwd", "triton")
    x = torch.randn(3, 8, device=device, requires_grad=True)
    w = torch.randn(8, device=device, requires_grad=True)
    b = torch.randn(8, device=device, requires_grad=True)
    for op, args in [
        (torch.ops.pyoptim.layer_norm_fwd_triton, (x, [8], w, b, 1e-5)),
        (torch.ops.pyoptim.rms_norm_fwd_triton, (x, [8], w, None)),
        (torch.ops.pyoptim.batch_norm_fwd_triton,
         (torch.randn(4, 3, 5, device=device, requires_grad=True), torch.randn(3, device=device), None,
          torch.zeros(3, device=device), torch.ones(3, device=device), True, 0.1, 1e-5)),
    ]:
        torch.library.opcheck(op, args)


@pytest.mark.skipif(not _backends.EXTENSION_LOADED, reason="the Triton optimizer ops take the C++ ops' schemas")
def test_triton_optimizer_ops_are_dispatcher_ops():
    """note [triton step ops]: the Triton launchers of the optimizer ops as ops with the C++ ops' schemas, each
    passing opcheck, and giving what the launcher gives."""
    if "triton" not in _backends.available("sgd_step_", "cuda" if HAS_CUDA else "cpu"):
        pytest.skip("no Triton here")
    from pyoptim.kernels import _ops

    device = "cuda" if HAS_CUDA else "cpu"
    for op in _backends.LIST_OPS:
        pyoptim.functional._prepare(op, "triton")
        name = _ops.dispatched_name(op)
        ours, cpp = getattr(torch.ops.pyoptim, name).default._schema, getattr(torch.ops.pyoptim, op).default._schema
        assert str(ours).partition("(")[2] == str(cpp).partition("(")[2], op
    ps = [torch.randn(6, device=device), torch.randn(3, 2, device=device)]
    gs = [torch.randn_like(p) for p in ps]
    kw = dict(lr=[0.1], momentum=[0.9], dampening=[0.0], weight_decay=[0.01], group_sizes=[2], nesterov=False,
              maximize=False, is_first_step=True)
    torch.library.opcheck(torch.ops.pyoptim.sgd_step_triton_, ([p.clone() for p in ps], gs,
                                                               [torch.empty_like(p) for p in ps]), kw)
    torch.library.opcheck(torch.ops.pyoptim.multi_tensor_norm_triton, (gs, 2.0))
    via_op, direct = [p.clone() for p in ps], [p.clone() for p in ps]
    torch.ops.pyoptim.sgd_step_triton_(via_op, gs, [torch.empty_like(p) for p in ps], **kw)
    _backends.get("sgd_step_", "triton")(direct, gs, [torch.empty_like(p) for p in ps], **kw)
    assert all(torch.equal(a, b) for a, b in zip(via_op, direct))


def test_triton_ops_fallback_is_chosen_and_shown():
    """note [triton ops]: triton_op only where torch.library has triton_op and wrap_triton and Triton compiles;
    otherwise (an older torch, the interpreter) the opaque custom_op, and backend_info() says which."""
    if _backends.triton_version() is None:
        pytest.skip("no Triton here")
    from pyoptim.kernels import _ops

    class OldLibrary:  # torch.library before triton_op (torch < 2.6): custom_op only
        custom_op = torch.library.custom_op

    assert not _ops.traces_into_kernels(OldLibrary, interpreting=False)
    assert not _ops.traces_into_kernels(torch.library, interpreting=True)
    assert _ops.traces_into_kernels(torch.library, interpreting=False) == hasattr(torch.library, "triton_op")
    mode = pyoptim.backend_info()["triton_norm_ops"]
    assert mode == _ops.MODE and mode.startswith("triton_op" if _ops.TRACES_INTO_KERNELS else "custom_op")
    if _backends.triton_interpret():
        assert "TRITON_INTERPRET=1" in mode


# -- (2) a compiled training step --------------------------------------------------------


class ConvNet(torch.nn.Module):
    """A small ConvNet with BatchNorm, LayerNorm and RMSNorm (pyoptim's, on `backend`, or torch's)."""

    def __init__(self, nn, **backend):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4, **backend)
        self.fc1 = torch.nn.Linear(4 * 6 * 6, 16)
        self.ln = nn.LayerNorm(16, **backend)
        self.rms = nn.RMSNorm(16, **backend)
        self.fc2 = torch.nn.Linear(16, 2)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x))).flatten(1)
        return self.fc2(self.rms(F.gelu(self.ln(self.fc1(x)))))


def _training(make_opt, lr, compiled: bool, steps: int, backend=None):
    """(model, optimizer, new graphs per step, graph breaks) after `steps` calls of a train_step (zero_grad,
    forward, backward, optimizer.step(), scheduler.step()) under CosineAnnealingLR, compiled or eager; the norms
    and the optimizer on `backend` (the default when None)."""
    _reset()
    torch.manual_seed(0)
    model = ConvNet(pyoptim.nn, **({} if backend is None else dict(backend=backend)))
    opt = make_opt(model.parameters(), lr.clone() if isinstance(lr, torch.Tensor) else lr)
    if backend is not None:
        for group in opt.param_groups:
            group["backend"] = backend
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 3, 8, 8, generator=g), torch.randn(8, 2, generator=g)) for _ in range(4)]

    def train_step(x, y):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        sched.step()
        return loss

    step = torch.compile(train_step, backend="aot_eager") if compiled else train_step
    new_graphs = []
    for i in range(steps):
        before = _graphs()
        step(*data[i % len(data)])
        new_graphs.append(_graphs() - before)
    return model, opt, new_graphs, sum(counters["graph_break"].values())


def _assert_same_run(model, opt, eager, eager_opt) -> None:
    """Params and every state tensor of a compiled (or captured) run equal the eager run's."""
    for (pname, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, **TOL[torch.float32], msg=lambda m: f"{pname}: {m}")
        assert eager_opt.state[q].keys() == opt.state[p].keys(), pname
        for key, value in eager_opt.state[q].items():
            torch.testing.assert_close(opt.state[p][key], value, **TOL[torch.float32],
                                       msg=lambda m: f"{pname} {key}: {m}")


_OPTIMIZERS = {
    "AdamW": lambda ps, lr: pyoptim.optim.AdamW(ps, lr=lr, weight_decay=0.1),
    "AdamW_max_grad_norm": lambda ps, lr: pyoptim.optim.AdamW(ps, lr=lr, max_grad_norm=0.5),
    "SGD_momentum": lambda ps, lr: pyoptim.optim.SGD(ps, lr=lr, momentum=0.9),
    "Adagrad": lambda ps, lr: pyoptim.optim.Adagrad(ps, lr=lr, lr_decay=0.01),
    "RMSprop": lambda ps, lr: pyoptim.optim.RMSprop(ps, lr=lr, momentum=0.5),
    "Lion": lambda ps, lr: pyoptim.optim.Lion(ps, lr=lr * 0.1, weight_decay=0.1),
}
_LRS = [pytest.param(0.01, id="float_lr"), pytest.param(torch.tensor(0.01), id="tensor_lr")]


def _lr_kind(lr) -> str:
    return "tensor" if isinstance(lr, torch.Tensor) else "float"


@pytest.fixture(scope="module")
def torch_adamw_graphs() -> dict[str, tuple[list[int], int]]:
    """The reference behaviour: torch's own AdamW in the same train_step (30 steps), per lr kind: (new graphs per
    step, graph breaks). The breaks are torch's (zero_grad and the scheduler's step are frames dynamo skips,
    backward is not traced, and the scheduler's wrapper of opt.step is a skipped frame that calls the step's
    own, compiled, frame); a float lr recompiles that frame once, when dynamo makes it dynamic."""
    out = {}
    for param in _LRS:
        lr = param.values[0]
        _, _, new_graphs, breaks = _training(lambda ps, lr: torch.optim.AdamW(ps, lr=lr, weight_decay=0.1), lr,
                                             compiled=True, steps=30)
        out[_lr_kind(lr)] = (new_graphs, breaks)
    return out


@pytest.mark.parametrize("lr", _LRS)
@pytest.mark.parametrize("name", list(_OPTIMIZERS))
def test_compiled_train_step_stops_compiling(name, lr, torch_adamw_graphs):
    """torch.compile(train_step) over the optimizer's and the scheduler's steps (100 steps for AdamW, 30 for the
    others): no graph compiled after step 3, and (AdamW) no more graphs or graph breaks than torch's own
    AdamW in the same train_step, and the eager run's params and state at the end."""
    steps = 100 if name == "AdamW" else 30
    model, opt, new_graphs, breaks = _training(_OPTIMIZERS[name], lr, compiled=True, steps=steps)
    torch_graphs, torch_breaks = torch_adamw_graphs[_lr_kind(lr)]
    assert sum(new_graphs[3:]) == 0, new_graphs
    assert sum(torch_graphs[3:]) == 0, torch_graphs  # the reference behaviour this test holds ours to
    if name.startswith("AdamW"):  # torch's twin: no more graphs or breaks in the first steps either
        assert sum(new_graphs[:3]) <= sum(torch_graphs[:3]), (new_graphs[:3], torch_graphs[:3])
        assert breaks <= torch_breaks, (breaks, torch_breaks)
    # (SGD's first step, whose call differs from the later ones', runs eagerly: note [compiled step])
    eager, eager_opt, _, _ = _training(_OPTIMIZERS[name], lr, compiled=False, steps=steps)
    _assert_same_run(model, opt, eager, eager_opt)


@pytest.mark.skipif("triton" not in _backends.available("adam_step_", "cuda" if HAS_CUDA else "cpu")
                    or "triton" not in _backends.available("layer_norm_fwd", "cuda" if HAS_CUDA else "cpu"),
                    reason="no Triton here")
@pytest.mark.parametrize("lr", _LRS)
@pytest.mark.parametrize("name", ["AdamW", "SGD_momentum"])
def test_compiled_train_step_on_triton(name, lr):
    """The same compiled train_step with the norms and the optimizer on the Triton backend (under the
    interpreter where there is no GPU, hence 6 steps): no graph after step 3, eager's params and state."""
    model, opt, new_graphs, _ = _training(_OPTIMIZERS[name], lr, compiled=True, steps=6, backend="triton")
    assert sum(new_graphs[3:]) == 0, new_graphs
    eager, eager_opt, _, _ = _training(_OPTIMIZERS[name], lr, compiled=False, steps=6, backend="triton")
    _assert_same_run(model, opt, eager, eager_opt)


# -- (3) fullgraph=True over optimizer.step() ------------------------------------------------


_STEP_CASES = {
    "Adam_amsgrad": lambda ps: pyoptim.optim.Adam(ps, lr=1e-2, amsgrad=True),
    "AdamW_max_grad_norm": lambda ps: pyoptim.optim.AdamW(ps, lr=1e-2, max_grad_norm=0.5),
    "SGD_nesterov": lambda ps: pyoptim.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True),
    "SGD_plain": lambda ps: pyoptim.optim.SGD(ps, lr=1e-2),
    "Lion": lambda ps: pyoptim.optim.Lion(ps, lr=1e-3, weight_decay=0.1),
    "LAMB": lambda ps: pyoptim.optim.LAMB(ps, lr=1e-2),
    "Adagrad": lambda ps: pyoptim.optim.Adagrad(ps, lr=1e-2),
    "RMSprop_centered": lambda ps: pyoptim.optim.RMSprop(ps, lr=1e-2, momentum=0.5, centered=True),
}


# The Triton launchers are dispatcher ops where the library is loaded (note [triton step ops]); the C++ CPU
# kernels are the eager oracle there, so the two runs check the traced Triton calls against another backend.
_STEP_BACKENDS = [None] + (["triton"] if _backends.EXTENSION_LOADED and "triton" in _backends.available(
    "adam_step_", "cuda" if HAS_CUDA else "cpu") else [])


@pytest.mark.parametrize("backend", _STEP_BACKENDS, ids=lambda b: b or "default")
@pytest.mark.parametrize("name", list(_STEP_CASES))
def test_step_fullgraph(name, backend):
    """opt.step under torch.compile(fullgraph=True), after one eager step that makes the state: two param
    groups (one of two dtypes), a scheduler moving the lr; one graph, eager's params and state every step."""
    _reset()
    torch.manual_seed(0)
    device = "cuda" if backend == "triton" and HAS_CUDA else "cpu"
    init = [torch.randn(5, 3, device=device), torch.randn(7, device=device),
            torch.randn(4, dtype=torch.float64, device=device)]
    a = [p.clone().requires_grad_() for p in init]
    b = [p.clone().requires_grad_() for p in init]

    def make(params, backend=None):
        groups = [{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.0}]
        if backend is not None:
            for g in groups:
                g["backend"] = backend
        opt = _STEP_CASES[name](groups)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

    (oa, sa), (ob, sb) = make(a, backend), make(b)
    # The optimizer's own step (the scheduler wraps opt.step in a frame dynamo skips).
    step = torch.compile(lambda: type(oa).step(oa), fullgraph=True, backend="aot_eager")
    for i in range(6):
        for x, y in zip(a, b):
            g = torch.randn_like(x)
            x.grad, y.grad = g.clone(), g.clone()
        (oa.step if i == 0 else step)()
        ob.step()
        sa.step()
        sb.step()
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, **TOL[x.dtype], msg=lambda m: f"step {i}: {m}")
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert _graphs() <= 2, _graphs()  # the first compiled step, and the one that makes the moved lr dynamic
    for x, y in zip(a, b):
        for key, value in ob.state[y].items():
            torch.testing.assert_close(oa.state[x][key], value, **TOL[value.dtype])


# -- CUDA graphs -------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("clip", ["max_grad_norm", "clip_grad_norm_"])
@pytest.mark.parametrize("opt_name", ["AdamW", "SGD"])
def test_cuda_graph_of_a_whole_training_step(opt_name, clip):
    """Forward, backward, the clip (fused into the step, or pyoptim.nn.utils.clip_grad_norm_ before it) and the
    step (AdamW with capturable=True and a Tensor lr on the device) captured in one torch.cuda.graph, as torch's
    docs capture a whole network (warm-up on a side stream, grads made before the capture so that backward
    accumulates into the same tensors), and replayed 20 times over new batches: params, buffers and every state
    tensor equal an eager run's over the same batches."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    eager = ConvNet(pyoptim.nn).to(device)
    captured = copy.deepcopy(eager)
    fused = dict(max_grad_norm=0.5) if clip == "max_grad_norm" else {}

    def make(params):
        if opt_name == "AdamW":
            return pyoptim.optim.AdamW(params, lr=torch.tensor(1e-2, device=device), capturable=True, **fused)
        return pyoptim.optim.SGD(params, lr=1e-2, momentum=0.9, **fused)

    oe, oc = make(eager.parameters()), make(captured.parameters())
    batches = [(torch.randn(8, 3, 8, 8, device=device), torch.randn(8, 2, device=device)) for _ in range(21)]
    static_x, static_y = batches[0][0].clone(), batches[0][1].clone()

    def step(model, opt, x, y):
        opt.zero_grad(set_to_none=False)  # the grads stay the graph's tensors
        F.mse_loss(model(x), y).backward()
        if clip == "clip_grad_norm_":
            pyoptim.nn.utils.clip_grad_norm_(model.parameters(), 0.5)  # no host sync (error_if_nonfinite=False)
        opt.step()

    # Warm up on a side stream (the state, the grads and the step plan are made here), as torch's docs do.
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step(captured, oc, static_x, static_y)
    torch.cuda.current_stream().wait_stream(s)
    for _ in range(3):
        step(eager, oe, static_x, static_y)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # records, runs nothing: both models have taken 3 steps
        step(captured, oc, static_x, static_y)
    for x, y in batches[1:]:
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        step(eager, oe, x, y)
    torch.cuda.synchronize()
    _assert_same_run(captured, oc, eager, oe)
    for (name, s1), s2 in zip(captured.named_buffers(), eager.buffers()):
        torch.testing.assert_close(s1, s2, **TOL[torch.float32], msg=lambda m: f"{name}: {m}")
    assert int(captured.bn.num_batches_tracked) == 3 + 20  # the warm-up steps and the replays; the capture ran none
