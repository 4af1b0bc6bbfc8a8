"""SyncBatchNorm: 2 gloo processes on CPU against torch's BatchNorm on the concatenated batch; the fall-backs
(eval, a group of one, no process group) and convert_sync_batchnorm.

One spawn runs every scenario for every CPU backend (starting processes is most of the cost); each rank saves
what it computed and the tests below compare it with torch's single-process BatchNorm, run in float64.
"""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pyoptim
import pyoptim._backends
from tests.conftest import TOL, impls

WORLD = 2
C = 3

# name: per-rank batch sizes, the input's shape after N, layout, dtype, momentum, affine, training steps.
SCENARIOS = {
    # Uneven batches: the merge must weight each rank's statistics by its count, not average them.
    "uneven": dict(sizes=(3, 5), tail=(C, 4, 5), layout="nchw", dtype=torch.float64, momentum=0.1, affine=True,
                   steps=2),
    # A rank with one sample (count = L there): fine globally, though one rank alone has little.
    "one_sample": dict(sizes=(1, 4), tail=(C, 5), layout="nchw", dtype=torch.float64, momentum=0.3, affine=True,
                       steps=2),
    # A rank with an empty batch (the last batch of an epoch): it adds nothing and still joins the collectives.
    "empty_rank": dict(sizes=(0, 4), tail=(C, 3, 3), layout="nchw", dtype=torch.float64, momentum=0.1, affine=True,
                       steps=1),
    # (N, C) input: each rank's count is its batch size, one rank with a single row.
    "two_dim": dict(sizes=(1, 6), tail=(C,), layout="nchw", dtype=torch.float64, momentum=0.1, affine=False,
                    steps=2),
    # channels_last float32: the kernels' other layout and the stat dtype's rounding.
    "fp32_channels_last": dict(sizes=(5, 3), tail=(C, 4, 6), layout="channels_last", dtype=torch.float32,
                               momentum=0.1, affine=True, steps=2),
    # momentum=None: the cumulative average over the steps (1 / num_batches_tracked).
    "momentum_none": dict(sizes=(2, 3), tail=(C, 4), layout="nchw", dtype=torch.float64, momentum=None, affine=True,
                          steps=3),
}


def _cpu_backends() -> list[str]:
    return [b for d, b in impls("batch_norm_fwd") if d == "cpu"]


def _data(name: str, step: int, spec: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole batch (x, dy) of one step of one scenario, the same in every process."""
    g = torch.Generator().manual_seed(1000 * (list(SCENARIOS).index(name) + 1) + step)
    shape = (sum(spec["sizes"]),) + spec["tail"]
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 3
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    return x.to(spec["dtype"]), dy.to(spec["dtype"])


def _local(t: torch.Tensor, rank: int, spec: dict) -> torch.Tensor:
    """This rank's slice of the batch, in the scenario's layout."""
    start = sum(spec["sizes"][:rank])
    t = t[start:start + spec["sizes"][rank]].clone()
    if spec["layout"] == "channels_last":
        t = t.contiguous(memory_format=torch.channels_last)
    return t


def _init(m: torch.nn.Module) -> torch.nn.Module:
    """Affine parameters and running statistics that are not the defaults, the same everywhere."""
    with torch.no_grad():
        if m.weight is not None:
            m.weight.copy_(1 + 0.25 * torch.arange(C))
            m.bias.copy_(0.5 - 0.3 * torch.arange(C))
        m.running_mean.copy_(0.1 * torch.arange(C))
        m.running_var.copy_(1 + 0.5 * torch.arange(C))
    return m


def _torch_bn(spec: dict, dtype=torch.float64) -> torch.nn.Module:
    cls = torch.nn.BatchNorm1d if len(spec["tail"]) <= 2 else torch.nn.BatchNorm2d
    return _init(cls(C, momentum=spec["momentum"], affine=spec["affine"], dtype=dtype))


def _step(m: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor) -> dict:
    """One forward and backward: output, grads (then cleared) and buffers after it."""
    x = x.detach().requires_grad_()
    y = m(x)
    y.backward(dy)
    rec = {"out": y.detach(), "grad_input": x.grad}
    for name, p in m.named_parameters():
        rec[f"{name}.grad"] = p.grad
        p.grad = None
    for name, b in m.named_buffers():
        rec[name] = b.detach().clone()
    return rec


def _net(ours_last: bool) -> torch.nn.Module:
    """Conv-BN-ReLU-Conv-BN in float64, the same weights in every process; the last BN ours or torch's."""
    torch.manual_seed(7)
    last = pyoptim.nn.BatchNorm2d(4, backend="reference") if ours_last else torch.nn.BatchNorm2d(4)
    net = torch.nn.Sequential(torch.nn.Conv2d(C, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Conv2d(4, 4, 1), torch.nn.Sequential(last))
    return net.double()


NET_SPEC = dict(sizes=(3, 2), tail=(C, 5, 5), layout="nchw", dtype=torch.float64)


def _net_data() -> tuple[torch.Tensor, torch.Tensor]:
    """The net's whole batch: x (5, C, 5, 5) and dy (5, 4, 5, 5)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn((sum(NET_SPEC["sizes"]),) + NET_SPEC["tail"], generator=g, dtype=torch.float64)
    return x, torch.randn((x.shape[0], 4) + x.shape[2:], generator=g, dtype=torch.float64)


def _worker(rank: int, init_file: str, out_dir: str, backends: list[str]) -> None:
    torch.set_num_threads(1)  # two processes on a 2-core machine
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=30))
    # Every rank creates every group (torch's rule), then uses its own: a world of one.
    own_group = [dist.new_group([r]) for r in range(WORLD)][rank]
    results: dict = {}

    def record(key, run):
        # A failure fails the tests that read this key, not the others'. A backend that fails probe() below
        # (one not built here) is not run at all; one that fails later on one rank only leaves the other in
        # a collective, which the 30 s timeout ends.
        try:
            results[key] = run()
        except Exception as e:  # noqa: BLE001 - reported by the test that reads the key
            results[key] = f"{type(e).__name__}: {e}"[:2000]

    def scenario(backend, name, spec):
        m = _init(pyoptim.nn.SyncBatchNorm(C, momentum=spec["momentum"], affine=spec["affine"],
                                           dtype=spec["dtype"], backend=backend))
        steps = []
        for step in range(spec["steps"]):
            x, dy = _data(name, step, spec)
            steps.append(_step(m, _local(x, rank, spec), _local(dy, rank, spec)))
        m.eval()  # no collective: each rank normalizes its own batch by the running statistics
        x, dy = _data(name, 99, spec)
        return {"train": steps, "eval": [_step(m, _local(x, rank, spec), _local(dy, rank, spec))]}

    def group_of_one(backend):
        spec = SCENARIOS["uneven"]
        m = _init(pyoptim.nn.SyncBatchNorm(C, process_group=own_group, dtype=spec["dtype"], backend=backend))
        x, dy = _data("uneven", 0, spec)
        return [_step(m, _local(x, rank, spec), _local(dy, rank, spec))]

    def converted_net():
        net = pyoptim.nn.SyncBatchNorm.convert_sync_batchnorm(_net(ours_last=True))
        x, dy = _net_data()
        return [_step(net, _local(x, rank, NET_SPEC), _local(dy, rank, NET_SPEC))]

    def probe(backend):
        # SyncBatchNorm's four ops on this rank, then a vote: a backend that fails here on either rank (one
        # not built yet) is skipped on both, so that neither waits in a collective the other never joins.
        get = lambda op: pyoptim._backends.get(op, backend)  # noqa: E731
        x, dy = torch.randn(2, C, 3), torch.randn(2, C, 3)
        try:
            mean, m2 = get("batch_norm_stats")(x)
            invstd = (m2 / 6 + 1e-5).rsqrt()
            get("batch_norm_elemt")(x, None, None, mean, invstd)
            s_dy, s_dy_xmu = get("batch_norm_backward_reduce")(dy, x, mean)
            get("batch_norm_backward_elemt")(dy, x, mean, invstd, None, s_dy / 6, s_dy_xmu / 6)
            error = None
        except Exception as e:  # noqa: BLE001
            error = f"{type(e).__name__}: {e}"[:2000]
        ok = torch.tensor([0.0 if error else 1.0])
        dist.all_reduce(ok, dist.ReduceOp.MIN)
        return error or (None if ok.item() == 1.0 else "failed on the other rank")

    for backend in backends:
        error = probe(backend)
        for name, spec in SCENARIOS.items():
            record((backend, name), (lambda: error) if error else (lambda: scenario(backend, name, spec)))
        record((backend, "group_of_one"), (lambda: error) if error else (lambda: group_of_one(backend)))
    default = pyoptim._backends.select("batch_norm_fwd", "cpu")  # what the converted net's first BN runs on
    error = probe(default)
    record(("converted_net",), (lambda: f"backend {default}: {error}") if error else converted_net)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of the 2 ranks computed: {key: [record per step]} per rank."""
    tmp = tmp_path_factory.mktemp("sync_bn")
    # A file store, not a TCP port: nothing to race for with other tests on the machine.
    mp.spawn(_worker, args=(str(tmp / "store"), str(tmp), _cpu_backends()), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def _get(rank: dict, key: tuple):
    """A rank's records for `key`, or the error it met there, raised here."""
    got = rank[key]
    if isinstance(got, str):
        raise AssertionError(f"{key} failed in the worker: {got}")
    return got


def _tol(t: torch.Tensor) -> dict:
    tol = TOL[t.dtype]
    return dict(rtol=tol["rtol"], atol=tol["atol"] * (max(1.0, float(t.abs().max())) if t.numel() else 1.0))


def _close(a: torch.Tensor, e: torch.Tensor, what: str, tol=None) -> None:
    assert a.dtype == e.dtype and a.shape == e.shape, (what, a.dtype, e.dtype, a.shape, e.shape)
    if e.is_floating_point():
        torch.testing.assert_close(a, e, **(tol or _tol)(e), msg=lambda m: f"{what}: {m}")
    else:
        assert torch.equal(a, e), (what, a, e)


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_equals_batch_norm_on_the_whole_batch(ranks, backend, name):
    """Outputs and input grads (concatenated over ranks), weight and bias grads (summed over ranks: each rank
    keeps its local sums, as torch's SyncBatchNorm, and DDP adds them), running statistics and
    num_batches_tracked (on every rank), step by step, as one process's BatchNorm on the whole batch."""
    spec = SCENARIOS[name]
    single = _torch_bn(spec)
    for step in range(spec["steps"]):
        x, dy = _data(name, step, spec)
        exact = _step(single, x.double(), dy.double())
        recs = [_get(r, (backend, name))["train"][step] for r in ranks]
        for key, e in exact.items():
            e = e.to(spec["dtype"]) if e.is_floating_point() else e
            what = f"step {step} {key}"
            if key in ("out", "grad_input"):
                got = torch.cat([rec[key] for rec in recs])
                _close(got, e, what)
                for r, rec in enumerate(recs):
                    if spec["layout"] == "channels_last" and rec[key].shape[0] > 1:
                        assert rec[key].is_contiguous(memory_format=torch.channels_last), (what, r)
            elif key.endswith(".grad"):
                _close(sum(rec[key] for rec in recs), e, what)
            else:
                for r, rec in enumerate(recs):
                    _close(rec[key], e, f"{what} on rank {r}")


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_eval_is_local_batch_norm(ranks, backend, name):
    """In eval each rank normalizes its own batch by the running statistics it trained (no collective)."""
    spec = SCENARIOS[name]
    single = _torch_bn(spec)
    for step in range(spec["steps"]):  # the running statistics the ranks reached
        x, dy = _data(name, step, spec)
        _step(single, x.double(), dy.double())
    single.eval()
    x, dy = _data(name, 99, spec)
    for r, rank in enumerate(ranks):
        exact = _step(single, _local(x, r, spec).double(), _local(dy, r, spec).double())
        for key, e in exact.items():
            _close(_get(rank, (backend, name))["eval"][0][key], e.to(spec["dtype"]) if e.is_floating_point() else e,
                   f"rank {r} {key}")


@pytest.mark.parametrize("backend", _cpu_backends())
def test_group_of_one_is_local_batch_norm(ranks, backend):
    """A process group of one rank: plain BatchNorm on that rank's batch, grads and statistics included."""
    spec = SCENARIOS["uneven"]
    x, dy = _data("uneven", 0, spec)
    for r, rank in enumerate(ranks):
        single = _init(torch.nn.BatchNorm2d(C, dtype=torch.float64))
        exact = _step(single, _local(x, r, spec), _local(dy, r, spec))
        for key, e in exact.items():
            _close(_get(rank, (backend, "group_of_one"))[0][key], e, f"rank {r} {key}")


def test_converted_net_equals_the_net_on_the_whole_batch(ranks):
    """convert_sync_batchnorm on Conv-BN-ReLU-Conv-BN (torch's and our BN): across the two ranks, the net's
    output and input grads are the single-process net's on the whole batch, its parameter grads their sum.
    The conv biases right before a norm have grad 0 in exact arithmetic: what is left is a sum of roundings,
    compared at 1e-9 / 1e-11 of the largest magnitude (float64; a wrong merge is off by 1e-3 or more)."""
    net = _net(ours_last=False)
    x, dy = _net_data()
    exact = _step(net, x, dy)
    recs = [_get(r, ("converted_net",))[0] for r in ranks]
    assert recs[0].keys() == exact.keys()
    for key, e in exact.items():
        if key in ("out", "grad_input"):
            _close(torch.cat([rec[key] for rec in recs]), e, key)
        elif key.endswith(".grad"):
            _close(sum(rec[key] for rec in recs), e, key,
                   tol=lambda t: dict(rtol=1e-9, atol=1e-11 * max(1.0, float(t.abs().max()))))
        else:
            for r, rec in enumerate(recs):
                _close(rec[key], e, f"{key} on rank {r}")


# -- in this process: no process group ---------------------------------------------------------------------------


def test_convert_sync_batchnorm_keeps_weights_and_buffers():
    net = _net(ours_last=True)
    with torch.no_grad():
        net[1].running_mean.normal_()
    net[4][0].eval()
    params = {name: p for name, p in net.named_parameters()}
    buffers = {name: b for name, b in net.named_buffers()}
    keys = net.state_dict().keys()
    converted = pyoptim.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    assert type(converted[1]) is pyoptim.nn.SyncBatchNorm and type(converted[4][0]) is pyoptim.nn.SyncBatchNorm
    assert type(converted[0]) is torch.nn.Conv2d
    assert converted[4][0].backend == "reference"  # ours carries its backend over
    assert not converted[4][0].training and converted[1].training  # each module's mode
    assert converted.state_dict().keys() == keys
    # The very Parameter and buffer objects (as torch's convert_sync_batchnorm): an optimizer built before
    # still updates them. Hence device and dtype (float64) are theirs.
    for name, p in converted.named_parameters():
        assert p is params[name], name
    for name, b in converted.named_buffers():
        assert b is buffers[name], name
    bare = torch.nn.BatchNorm1d(5, momentum=None, affine=False, eps=1e-3)
    new = pyoptim.nn.SyncBatchNorm.convert_sync_batchnorm(bare)
    assert type(new) is pyoptim.nn.SyncBatchNorm
    assert (new.num_features, new.eps, new.momentum, new.affine, new.weight) == (5, 1e-3, None, False, None)


@pytest.mark.parametrize("kwargs", [{}, dict(momentum=None), dict(track_running_stats=False)],
                         ids=["default", "momentum_none", "no_running_stats"])
def test_without_a_process_group_is_batch_norm(bn_impl, kwargs):
    """No process group initialized in this process: SyncBatchNorm trains and evaluates as BatchNorm2d."""
    assert not dist.is_initialized()
    device = torch.device("cuda" if bn_impl[0] == "cuda" else "cpu")
    ours = pyoptim.nn.SyncBatchNorm(C, device=device, backend=bn_impl[1], **kwargs)
    theirs = torch.nn.BatchNorm2d(C, device=device, **kwargs)
    for step, mode in enumerate(("train", "train", "eval")):
        ours.train(mode == "train")
        theirs.train(mode == "train")
        x = torch.randn(3 + step, C, 4, 4, device=device) * 2 + 3
        dy = torch.randn_like(x)
        a, e = _step(ours, x, dy), _step(theirs, x, dy)
        assert a.keys() == e.keys()
        for key in e:
            _close(a[key], e[key], f"step {step} ({mode}) {key}")
