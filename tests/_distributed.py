"""Multi-process cases of tests/test_distributed.py: each runs on every rank of a gloo process group (CPU).

run_cases(names, world_size) spawns the ranks once for a whole list of cases
(starting an interpreter and importing torch is most of a case's cost) and
returns {case: None (passed) or the failing rank's traceback}. The oracle of
every case is one process training the unsharded model on the whole batch
with torch.optim (or, where torch has no twin, with pyoptim on plain tensors,
which the single-process tests hold to its reference).
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import traceback
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

TOL = dict(rtol=2e-5, atol=2e-6)  # fp32, after 10 steps whose grads were averaged in another order
STEPS = 10
BATCH = 4  # rows per rank


# -- the models -----------------------------------------------------------------


class Block(torch.nn.Module):
    """A small transformer block: pre-norm MLP with a residual, then RMSNorm and a projection.

    Odd widths make FSDP2's Shard(0) uneven (8 and 7 rows of 15), and `gain`
    (one element) leaves rank 1 an empty shard.
    """

    def __init__(self, layer_norm, rms_norm, d: int = 15, h: int = 33) -> None:
        super().__init__()
        self.norm1 = layer_norm(d)
        self.fc1 = torch.nn.Linear(d, h)
        self.fc2 = torch.nn.Linear(h, d)
        self.norm2 = rms_norm(d)
        self.out = torch.nn.Linear(d, d)
        self.gain = torch.nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.fc2(F.gelu(self.fc1(self.norm1(x))))
        return self.out(self.norm2(x)) * self.gain


def blocks() -> tuple[torch.nn.Module, torch.nn.Module]:
    """(ours, torch's): the same weights, with pyoptim's LayerNorm/RMSNorm and with torch's."""
    import pyoptim

    torch.manual_seed(0)
    theirs = Block(torch.nn.LayerNorm, torch.nn.RMSNorm)
    with torch.no_grad():  # norm weights away from 1 and 0, so their grads matter
        for m in (theirs.norm1, theirs.norm2):
            m.weight.uniform_(0.5, 1.5)
        theirs.norm1.bias.uniform_(-0.5, 0.5)
    ours = Block(pyoptim.nn.LayerNorm, pyoptim.nn.RMSNorm)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def batches(world: int, steps: int = STEPS) -> list[torch.Tensor]:
    """`steps` global batches of world * BATCH rows (rank r takes rows [r * BATCH, (r + 1) * BATCH))."""
    g = torch.Generator().manual_seed(1)
    return [torch.randn(world * BATCH, 15, generator=g) for _ in range(steps)]


def loss_of(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).square().mean()


def train_single(model, opt, xs, clip=None, sched=None) -> None:
    """The oracle: one process, the whole batch; clip(params) before each step when given."""
    for x in xs:
        opt.zero_grad()
        loss_of(model, x).backward()
        if clip is not None:
            clip(model.parameters())
        opt.step()
        if sched is not None:
            sched.step()


def rows(x: torch.Tensor, rank: int) -> torch.Tensor:
    return x[rank * BATCH:(rank + 1) * BATCH]


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a DTensor (all-gathered), or `t` itself."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def assert_params_close(sharded: torch.nn.Module, single: torch.nn.Module, what: str, **tol) -> None:
    for (name, p), q in zip(sharded.named_parameters(), single.parameters()):
        torch.testing.assert_close(full(p).detach(), full(q).detach(), **(tol or TOL),
                                   msg=lambda m: f"{what}: {name}: {m}")


# -- FSDP2 ------------------------------------------------------------------------


def mesh1d():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (dist.get_world_size(),))


def fsdp(model: torch.nn.Module, mesh) -> torch.nn.Module:
    """FSDP2 as torchtitan applies it: each layer, then the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in (model.norm1, model.fc1, model.fc2, model.norm2, model.out):
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def train_fsdp(model, opt, xs, rank, clip=None, sched=None) -> None:
    for x in xs:
        opt.zero_grad()
        loss_of(model, rows(x, rank)).backward()
        if clip is not None:
            norm = clip(model.parameters())
            assert type(norm).__name__ == "DTensor", type(norm)  # as torch's: callers call full_tensor()
        opt.step()
        if sched is not None:
            sched.step()


# (pyoptim's optimizer, the oracle's optimizer, the oracle's clip or None); each a function of params.
def _fsdp_optimizers():
    import pyoptim

    def torch_clip(max_norm):
        return lambda params: torch.nn.utils.clip_grad_norm_(params, max_norm)

    return {
        "adamw": (lambda ps: pyoptim.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
                  lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=False), None, None),
        "sgd_momentum": (lambda ps: pyoptim.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
                         lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3,
                                                    foreach=False), None, None),
        # the clip fused into the step: the global norm of the shards
        "adamw_max_grad_norm": (lambda ps: pyoptim.optim.AdamW(ps, lr=1e-2, max_grad_norm=0.05),
                                lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False), torch_clip(0.05), None),
        # pyoptim.nn.utils.clip_grad_norm_ over DTensor grads, then the step
        "sgd_clip_grad_norm_": (lambda ps: pyoptim.optim.SGD(ps, lr=0.1, momentum=0.5),
                                lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.5, foreach=False),
                                torch_clip(0.05), lambda params: pyoptim.nn.utils.clip_grad_norm_(params, 0.05)),
        "adagrad": (lambda ps: pyoptim.optim.Adagrad(ps, lr=0.05, lr_decay=0.01, initial_accumulator_value=0.1),
                    lambda ps: torch.optim.Adagrad(ps, lr=0.05, lr_decay=0.01, initial_accumulator_value=0.1,
                                                   foreach=False), None, None),
        "rmsprop": (lambda ps: pyoptim.optim.RMSprop(ps, lr=1e-2, momentum=0.5, centered=True),
                    lambda ps: torch.optim.RMSprop(ps, lr=1e-2, momentum=0.5, centered=True, foreach=False),
                    None, None),
        # no torch twin: the oracle is pyoptim's own step on the unsharded params
        "lion": (lambda ps: pyoptim.optim.Lion(ps, lr=1e-3, weight_decay=0.1),
                 lambda ps: pyoptim.optim.Lion(ps, lr=1e-3, weight_decay=0.1), None, None),
        "lamb_max_grad_norm": (lambda ps: pyoptim.optim.LAMB(ps, lr=1e-2, max_grad_norm=0.05),
                               lambda ps: pyoptim.optim.LAMB(ps, lr=1e-2, max_grad_norm=0.05), None, None),
    }


def fsdp_case(name: str) -> Callable[[int, int], None]:
    def case(rank: int, world: int) -> None:
        ours_opt, torch_opt, oracle_clip, our_clip = _fsdp_optimizers()[name]
        xs = batches(world)
        ours, theirs = blocks()
        train_single(theirs, torch_opt(theirs.parameters()), xs, clip=oracle_clip)
        model = fsdp(ours, mesh1d())
        opt = ours_opt(model.parameters())
        train_fsdp(model, opt, xs, rank, clip=our_clip)
        assert_params_close(model, theirs, name)
        # the state is DTensors placed as their params (what DCP saves); step a plain 0-d tensor, as torch's
        for p in model.parameters():
            for key, value in opt.state[p].items():
                if key == "step":
                    assert type(value) is torch.Tensor and value.dim() == 0, (key, type(value))
                else:
                    assert type(value).__name__ == "DTensor" and value.placements == p.placements, (key, value)
        if getattr(opt, "max_grad_norm", None) is not None:
            assert type(opt.grad_norm) is torch.Tensor and opt.grad_norm.dim() == 0

    return case


def fsdp_lamb_fp32_masters(rank: int, world: int) -> None:
    """LAMB with master_weights="fp32" over bf16 params, two Shard(0) DTensors (one unevenly split) and a plain
    tensor: the masters (DTensors placed as their params) track a one-process fp32-param LAMB fed the same bf16
    grads, their trust ratios from the masters' norms reduced across the mesh (note [LAMB's two passes]); each
    param is its master rounded to nearest."""
    import pyoptim
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = mesh1d()
    torch.manual_seed(4)
    shapes = [(8, 3), (5,), (6,)]
    values = [torch.randn(s).bfloat16().float() for s in shapes]
    grads = [[torch.randn(s).bfloat16() for s in shapes] for _ in range(STEPS)]
    params = [torch.nn.Parameter(distribute_tensor(v.bfloat16(), mesh, [Shard(0)])) for v in values[:2]]
    params.append(torch.nn.Parameter(values[2].bfloat16()))
    reference = [v.clone().requires_grad_() for v in values]
    opt = pyoptim.optim.LAMB(params, lr=1e-2, weight_decay=0.01, master_weights="fp32")
    ref = pyoptim.optim.LAMB(reference, lr=1e-2, weight_decay=0.01)
    for step_grads in grads:
        for i, (p, q, g) in enumerate(zip(params, reference, step_grads)):
            p.grad = distribute_tensor(g.clone(), mesh, [Shard(0)]) if i < 2 else g.clone()
            q.grad = g.float()
        opt.step()
        ref.step()
    for i, (p, q) in enumerate(zip(params, reference)):
        master = opt.state[p]["master_param"]
        if i < 2:
            assert type(master).__name__ == "DTensor" and master.placements == p.placements, type(master)
        # (the shards' norms add in another order than one process's: close, not equal)
        torch.testing.assert_close(full(master), q.detach(), **TOL, msg=lambda m: f"param {i}: {m}")
        assert torch.equal(full(p).detach(), full(master).bfloat16()), i


def fsdp_clip_as_torch_on_dtensors(rank: int, world: int) -> None:
    """The clip over FSDP2's DTensor grads against torch's clip_grad_norm_ over the same DTensor grads: AdamW's
    and LAMB's max_grad_norm and pyoptim.nn.utils.clip_grad_norm_ give torch's global norm every step, and
    their 10 steps equal torch's clip then the unclipped step (torch's AdamW, pyoptim's LAMB) on FSDP2."""
    import pyoptim

    mesh = mesh1d()
    xs = batches(world)
    pairs = {
        "adamw": (lambda ps: pyoptim.optim.AdamW(ps, lr=1e-2, max_grad_norm=0.05), None,
                  lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False)),
        "lamb": (lambda ps: pyoptim.optim.LAMB(ps, lr=1e-2, max_grad_norm=0.05), None,
                 lambda ps: pyoptim.optim.LAMB(ps, lr=1e-2)),
        "clip_grad_norm_": (lambda ps: pyoptim.optim.SGD(ps, lr=0.1, momentum=0.5),
                            lambda ps: pyoptim.nn.utils.clip_grad_norm_(ps, 0.05),
                            lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.5, foreach=False)),
    }
    for name, (ours_opt, ours_clip, oracle_opt) in pairs.items():
        ours, oracle = fsdp(blocks()[0], mesh), fsdp(blocks()[0], mesh)
        opt, ref = ours_opt(ours.parameters()), oracle_opt(oracle.parameters())
        for i, x in enumerate(xs):
            for model, o in ((ours, opt), (oracle, ref)):
                o.zero_grad()
                loss_of(model, rows(x, rank)).backward()
            torch_norm = torch.nn.utils.clip_grad_norm_(list(oracle.parameters()), 0.05)
            assert type(torch_norm).__name__ == "DTensor", type(torch_norm)
            ref.step()
            norm = ours_clip(list(ours.parameters())) if ours_clip is not None else None
            opt.step()
            norm = full(norm) if norm is not None else opt.grad_norm
            torch.testing.assert_close(norm, torch_norm.full_tensor(), **TOL, msg=lambda m: f"{name} {i}: {m}")
        assert_params_close(ours, oracle, name)


def fsdp_dcp(rank: int, world: int) -> None:
    """DCP save of the FSDP2 model and optimizer after 5 steps, load into fresh ones: the next 5 steps equal the
    uninterrupted run's."""
    import pyoptim
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    xs = batches(world)
    mesh = mesh1d()

    def make():
        model = fsdp(blocks()[0], mesh)
        return model, pyoptim.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, max_grad_norm=0.05)

    straight, straight_opt = make()
    train_fsdp(straight, straight_opt, xs, rank)
    first, first_opt = make()
    train_fsdp(first, first_opt, xs[:5], rank)
    obj = [tempfile.mkdtemp(prefix="pyoptim_dcp_") if rank == 0 else None]
    dist.broadcast_object_list(obj)
    path = obj[0]
    dcp.save({"model": get_model_state_dict(first), "optim": get_optimizer_state_dict(first, first_opt)},
             checkpoint_id=path)
    second, second_opt = make()
    state = {"model": get_model_state_dict(second), "optim": get_optimizer_state_dict(second, second_opt)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(second, state["model"])
    set_optimizer_state_dict(second, second_opt, state["optim"])
    p0 = next(iter(second.parameters()))
    assert type(second_opt.state[p0]["exp_avg"]).__name__ == "DTensor"
    assert float(second_opt.state[p0]["step"]) == 5.0
    train_fsdp(second, second_opt, xs[5:], rank)
    assert_params_close(second, straight, "resumed", rtol=0, atol=0)  # the same arithmetic, bit for bit


def mixed_params(rank: int, world: int) -> None:
    """One optimizer over DTensor params (Shard(0), Replicate, a Partial grad of a Replicate param, a 2-D mesh
    whose first dimension replicates) and plain params (the same on every rank), with the fused clip: equals
    torch's AdamW after torch's clip_grad_norm_ over the full tensors."""
    import pyoptim
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    mesh = mesh1d()
    mesh2 = init_device_mesh("cpu", (world, 1), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(3)
    shapes = [(7, 3), (5,), (4, 2), (6,), (3,), (2, 2)]
    values = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(STEPS)]
    layouts = [(mesh, [Shard(0)]), (mesh, [Replicate()]), (mesh, [Replicate()]), (mesh2, [Replicate(), Shard(0)]),
               None, None]  # the last two: plain tensors

    def ours_of(t, layout):
        if layout is None:
            return t.clone().requires_grad_()
        return torch.nn.Parameter(distribute_tensor(t.clone(), layout[0], layout[1]))

    params = [ours_of(t, lay) for t, lay in zip(values, layouts)]
    reference = [t.clone().requires_grad_() for t in values]
    opt = pyoptim.optim.AdamW(params, lr=1e-2, max_grad_norm=1.0)
    ref = torch.optim.AdamW(reference, lr=1e-2, foreach=False)
    def set_grads(step_grads):
        for i, (p, q, g) in enumerate(zip(params, reference, step_grads)):
            if i == 2:  # a Partial grad: each rank holds g / world
                p.grad = DTensor.from_local(g / world, mesh, [Partial()], run_check=False)
            elif layouts[i] is not None:
                p.grad = distribute_tensor(g.clone(), layouts[i][0], layouts[i][1])
            else:
                p.grad = g.clone()
            q.grad = g.clone()

    for step_grads in grads:
        set_grads(step_grads)
        opt.step()
        norm = torch.nn.utils.clip_grad_norm_(reference, 1.0)
        ref.step()
        torch.testing.assert_close(opt.grad_norm, norm, **TOL)
    for p, q in zip(params, reference):
        torch.testing.assert_close(full(p).detach(), q.detach(), **TOL)
    # pyoptim's clip_grad_norm_ over the same mix (the Partial grad's norm taken of its sum), then over the
    # DTensors alone (a Replicate DTensor back); the grads scaled as torch's
    set_grads(grads[0])
    torch.testing.assert_close(pyoptim.nn.utils.clip_grad_norm_(params, 2.0, norm_type=3.0),
                               torch.nn.utils.clip_grad_norm_(reference, 2.0, norm_type=3.0), **TOL)
    for p, q in zip(params, reference):
        torch.testing.assert_close(full(p.grad), q.grad, **TOL)
    dt = params[:2]
    norm = pyoptim.nn.utils.clip_grad_norm_(dt, 1e9, norm_type=float("inf"))
    assert type(norm).__name__ == "DTensor" and norm.placements == (Replicate(),)
    torch.testing.assert_close(norm.full_tensor(), torch.nn.utils.clip_grad_norm_(reference[:2], 1e9,
                                                                                  norm_type=float("inf")))
    # a Partial param is refused before anything is written
    bad = torch.nn.Parameter(DTensor.from_local(torch.ones(3), mesh, [Partial()], run_check=False))
    bad.grad = DTensor.from_local(torch.ones(3), mesh, [Partial()], run_check=False)
    try:
        pyoptim.optim.SGD([bad], lr=0.1).step()
    except ValueError as e:
        assert "Partial" in str(e)
    else:
        raise AssertionError("a Partial param was stepped")


# -- DDP ---------------------------------------------------------------------------


def _ddp_case(opt_pair, bucket_view: bool):
    def case(rank: int, world: int) -> None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        xs = batches(world)
        ours, theirs = blocks()
        ours_opt, torch_opt = opt_pair()
        train_single(theirs, torch_opt(theirs.parameters()), xs)
        model = DDP(ours, gradient_as_bucket_view=bucket_view)
        opt = ours_opt(model.parameters())
        for x in xs:
            opt.zero_grad()
            loss_of(model, rows(x, rank)).backward()
            opt.step()
        assert_params_close(model.module, theirs, "ddp")

    return case


def _adamw_pair():
    import pyoptim

    return (lambda ps: pyoptim.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, max_grad_norm=0.05),
            lambda ps: _clipped(torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=False), 0.05))


def _sgd_pair():
    import pyoptim

    return (lambda ps: pyoptim.optim.SGD(ps, lr=0.05, momentum=0.9),
            lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, foreach=False))


class _clipped:
    """torch's optimizer `opt` with torch's clip_grad_norm_ before each step (the oracle of max_grad_norm)."""

    def __init__(self, opt, max_norm):
        self.opt, self.max_norm = opt, max_norm

    def zero_grad(self):
        self.opt.zero_grad()

    def step(self):
        torch.nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]], self.max_norm)
        self.opt.step()


def ddp_sync_batch_norm(rank: int, world: int) -> None:
    """pyoptim's SyncBatchNorm inside DDP over each rank's half of the batch equals torch's BatchNorm2d over the
    whole batch in one process: outputs' loss, grads after DDP's all-reduce, running statistics."""
    import pyoptim
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    theirs = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                 torch.nn.Conv2d(4, 2, 1))
    ours = pyoptim.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(theirs))
    assert isinstance(ours[1], pyoptim.nn.SyncBatchNorm)
    model = DDP(ours, gradient_as_bucket_view=True)
    opt = pyoptim.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9, foreach=False)
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        x = torch.randn(world * 3, 3, 8, 8, generator=g)  # 3 images per rank
        for m, o, inp in ((model, opt, x[rank * 3:(rank + 1) * 3]), (theirs, ref, x)):
            o.zero_grad()
            m(inp).square().mean().backward()
            o.step()
    assert_params_close(model.module, theirs, "sync batch norm")
    torch.testing.assert_close(ours[1].running_mean, theirs[1].running_mean, **TOL)
    torch.testing.assert_close(ours[1].running_var, theirs[1].running_var, **TOL)
    assert int(ours[1].num_batches_tracked) == 5


def zero_redundancy(rank: int, world: int) -> None:
    """ZeroRedundancyOptimizer(optimizer_class=pyoptim.optim.AdamW) under DDP equals torch's AdamW in one
    process; its consolidated state_dict loads into torch's AdamW."""
    import pyoptim
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    xs = batches(world)
    ours, theirs = blocks()
    train_single(theirs, torch.optim.AdamW(theirs.parameters(), lr=1e-2, weight_decay=0.1, foreach=False), xs)
    model = DDP(ours)
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=pyoptim.optim.AdamW, lr=1e-2,
                                  weight_decay=0.1)
    assert isinstance(opt.optim, pyoptim.optim.AdamW)
    for x in xs:
        opt.zero_grad()
        loss_of(model, rows(x, rank)).backward()
        opt.step()
    assert_params_close(model.module, theirs, "zero")
    opt.consolidate_state_dict(to=0)
    if rank == 0:
        sd = opt.state_dict()
        torch.optim.AdamW(theirs.parameters(), lr=1e-2).load_state_dict(sd)


CASES: dict[str, Callable[[int, int], None]] = {
    **{f"fsdp_{name}": fsdp_case(name) for name in ("adamw", "sgd_momentum", "adamw_max_grad_norm",
                                                     "sgd_clip_grad_norm_", "adagrad", "rmsprop", "lion",
                                                     "lamb_max_grad_norm")},
    "fsdp_lamb_fp32_masters": fsdp_lamb_fp32_masters,
    "fsdp_clip_as_torch_on_dtensors": fsdp_clip_as_torch_on_dtensors,
    "fsdp_dcp": fsdp_dcp,
    "mixed_params": mixed_params,
    "ddp_adamw_max_grad_norm": _ddp_case(_adamw_pair, bucket_view=False),
    "ddp_sgd_gradient_as_bucket_view": _ddp_case(_sgd_pair, bucket_view=True),
    "ddp_sync_batch_norm": ddp_sync_batch_norm,
    "zero_redundancy": zero_redundancy,
}


# -- the harness ----------------------------------------------------------------------


def _worker(rank: int, world: int, init_file: str, names: list[str], out_dir: str) -> None:
    torch.set_num_threads(1)  # two ranks on a shared machine
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    results = {}
    try:
        for name in names:
            try:
                CASES[name](rank, world)
                results[name] = None
            except Exception:
                results[name] = f"rank {rank}: {traceback.format_exc()}"
            dist.barrier()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


def run_cases(names: list[str], world: int = 2) -> dict[str, str | None]:
    """{case: None or a traceback} for each case of `names`, all run in one spawn of `world` gloo ranks."""
    import torch.multiprocessing as mp

    out_dir = tempfile.mkdtemp(prefix="pyoptim_dist_")
    init_file = os.path.join(out_dir, "init")
    mp.spawn(_worker, args=(world, init_file, names, out_dir), nprocs=world, join=True)
    merged: dict[str, str | None] = {name: None for name in names}
    for rank in range(world):
        with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
            for name, err in json.load(f).items():
                merged[name] = merged[name] or err
    return merged
