"""DTensor params (FSDP2, tensor parallel): the optimizers and the clip run their fused ops on the local shards.

note [DTensor by unwrapping]: a step op is elementwise in every tensor it
takes, so on DTensor params it is the same op over each rank's local shards,
whatever the placements, provided the grad is placed as its param: Shard
(FSDP2's Shard(0), _StridedShard, tensor parallel's Shard(d)) and Replicate
alike. The optimizer unwraps params, grads and state (DTensors built by
`zeros_like(p)`, so they keep the param's mesh and placements and
`torch.distributed.checkpoint` saves and loads them) to their local tensors
and makes its one op call over all of them, plain params of the same device
and dtype included; nothing is all-gathered. What is not elementwise is made
global here: a grad placed otherwise than its param (a Partial grad of a
Replicate param, as sequence parallel leaves a norm weight's) is
redistributed to the param's placements first, as DTensor's own sharding
propagation would before a pointwise op; a param that is itself Partial is
refused (its value is a sum over ranks, which no per-rank update can move);
and norms (the clip's global norm, LAMB's per-tensor norms) are reduced
across the mesh from per-rank partial sums, one all-reduce per mesh
dimension for all the tensors of a step (note [masked replicas]).

A sharding strategy registered for the ops was the other way: DTensor's
register_sharding takes neither in-place schemas that return nothing
(pytorch#167219) nor Tensor keyword arguments (pytorch#167977), would
redistribute per op call rather than once per step, and cannot express the
one reduction a clipped or LAMB step needs across its tensors.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["is_dtensor", "local", "local_param_and_grad", "norm_class", "global_norm", "reduce_sums"]


def _dtensor_type() -> Optional[type]:
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without the public DTensor module
        return None
    return DTensor


DTensor = _dtensor_type()


def is_dtensor(t: Any) -> bool:
    """Whether `t` is a DTensor (False where torch.distributed is not built)."""
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The local tensor of a DTensor (the tensor itself otherwise), without autograd's to_local wrapper."""
    if not is_dtensor(t):
        return t
    inner = getattr(t, "_local_tensor", None)
    return inner if inner is not None else t.to_local()


def _placement_names(placements: Sequence[Any]) -> str:
    return ", ".join(map(str, placements))


def local_param_and_grad(p: Tensor, grad: Tensor, who: str) -> tuple[Tensor, Tensor]:
    """The local tensors of DTensor param `p` and of its grad placed as `p` (redistributed when it is not).

    Raises ValueError for a Partial param, a grad that is not a DTensor or
    lives on another mesh (`who` names the optimizer in the message).
    """
    if any(pl.is_partial() for pl in p.placements):
        raise ValueError(f"{who}: a DTensor param with a Partial placement ({_placement_names(p.placements)}) "
                         "cannot be stepped: its value is a sum over ranks; redistribute it to Shard or Replicate")
    if not is_dtensor(grad):
        raise ValueError(f"{who}: the grad of a DTensor param must be a DTensor on the param's mesh, got a "
                         f"{type(grad).__name__}")
    if grad.device_mesh != p.device_mesh:
        raise ValueError(f"{who}: a DTensor param and its grad live on different device meshes "
                         f"({p.device_mesh} and {grad.device_mesh})")
    if tuple(grad.placements) != tuple(p.placements):
        grad = grad.redistribute(p.device_mesh, p.placements)
    return local(p), local(grad)


def norm_class(t: Tensor) -> Optional[Hashable]:
    """The reduction a norm over `t`'s local tensor needs: None (a plain tensor, counted as it is), else
    (mesh, placements): what reduce_sums needs to make the local partial sums of such tensors global."""
    if not is_dtensor(t):
        return None
    return t.device_mesh, tuple(t.placements)


def _replica_mask(mesh: Any, placements: tuple) -> bool:
    # note [masked replicas]: a tensor replicated along a mesh dimension has
    # the same local sum on every rank of that dimension; summing over the
    # whole mesh, only the ranks at coordinate 0 of each such dimension add
    # theirs (exact, where dividing by the replica count would round), and
    # every shard is added once. A Partial tensor's partial sums do not add
    # up to its sum's norm: callers redistribute those first.
    coord = mesh.get_coordinate()
    if coord is None:  # this rank is not in the mesh
        return False
    return all(coord[d] == 0 for d, pl in enumerate(placements) if pl.is_replicate())


def reduce_sums(sums: dict[Hashable, Tensor], op: str = "sum") -> Tensor:
    """The global sum (op "sum") or max ("max") of per-class local partials `sums` (float64 tensors of one shape
    on one device, keyed by norm_class): each mesh's classes in one all-reduce per mesh dimension."""
    import torch.distributed as dist

    plain = [v for k, v in sums.items() if k is None]
    by_mesh: dict[Any, list[Tensor]] = {}
    for key, v in sums.items():
        if key is None:
            continue
        mesh, placements = key
        if op == "sum" and not _replica_mask(mesh, placements):
            v = torch.zeros_like(v)
        by_mesh.setdefault(mesh, []).append(v)
    parts = list(plain)
    reduce_op = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
    for mesh, values in by_mesh.items():
        v = torch.stack(values)
        v = v.sum(0) if op == "sum" else v.amax(0)
        for d in range(mesh.ndim):
            if mesh.size(d) > 1:
                dist.all_reduce(v, op=reduce_op, group=mesh.get_group(d))
        parts.append(v)
    if op == "sum":
        return torch.stack(parts).sum(0)
    return torch.stack(parts).amax(0)


def global_norm(totals: dict[Hashable, Tensor], norm_type: float) -> Tensor:
    """The p-norm (float32, 0-d) over every tensor, from the local p-norm of each norm_class's tensors."""
    if math.isinf(norm_type):
        return reduce_sums({k: t.double() for k, t in totals.items()}, "max").float()
    power = reduce_sums({k: t.double() ** norm_type for k, t in totals.items()})
    return (power ** (1.0 / norm_type)).float()


def replicated_like(total: Tensor, grads: Sequence[Tensor]) -> Tensor:
    """`total` as a Replicate DTensor on the grads' mesh when they are DTensors on one mesh (torch's
    clip_grad_norm_ returns one: callers call full_tensor() on it), else `total` itself."""
    if not grads or not is_dtensor(grads[0]):
        return total  # not all DTensors: no scan of the rest
    meshes = {g.device_mesh for g in grads if is_dtensor(g)}
    if len(meshes) != 1 or not all(is_dtensor(g) for g in grads):
        return total
    from torch.distributed.tensor import Replicate

    (mesh,) = meshes
    return DTensor.from_local(total, mesh, [Replicate()] * mesh.ndim, run_check=False)
