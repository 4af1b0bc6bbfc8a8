"""BatchNorm1d/2d/3d, SyncBatchNorm and InstanceNorm1d/2d/3d: torch's modules, computed by pyoptim's kernels.

Each subclasses its torch twin (SyncBatchNorm: torch's _BatchNorm, as torch's
SyncBatchNorm does, note [not a torch SyncBatchNorm]), so parameters, buffers
(running_mean, running_var, num_batches_tracked), state_dict() keys,
reset_parameters() and repr are torch's own and weights load both ways; only
the forward runs our ops, chosen by `backend` (default: the fastest here).
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.distributed as dist

from pyoptim import _backends
from pyoptim._validation import check_batch_norm_fwd_args, norm_stat_dtype
from pyoptim.functional import batch_norm, instance_norm

_Device = Optional[Union[torch.device, str, int]]

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "InstanceNorm1d", "InstanceNorm2d",
           "InstanceNorm3d"]


class _BatchNormForward:
    """torch's _BatchNorm.forward with pyoptim's batch_norm; shared by BatchNorm1d/2d/3d and SyncBatchNorm."""

    backend: Optional[str]

    def _factor_and_mode(self) -> tuple[float, bool, bool]:
        """(exponential_average_factor, bn_training, counts): the factor of the step that `_count_step` then counts.

        torch's _BatchNorm.forward increments num_batches_tracked first and so
        leaves it incremented when the forward then raises (one value per
        channel, a bad weight); here the count moves only once the forward has
        succeeded: a call that raises writes nothing.
        """
        # exponential_average_factor is self.momentum, or 1 / num_batches_tracked
        # for momentum=None (a cumulative average), counting this step.
        factor = 0.0 if self.momentum is None else self.momentum
        counts = self.training and self.track_running_stats and self.num_batches_tracked is not None
        if counts and self.momentum is None:
            factor = 1.0 / (float(self.num_batches_tracked) + 1.0)  # a host read, as torch's
        # The batch's statistics normalize in training, and in eval when there are no running statistics.
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        return factor, bn_training, counts

    def _count_step(self, counts: bool) -> None:
        if counts:
            self.num_batches_tracked.add_(1)

    def _running_stats(self) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The running statistics to pass: None in training when they are not tracked (so they are not moved)."""
        if not self.training or self.track_running_stats:
            return self.running_mean, self.running_var
        return None, None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """torch.nn.BatchNorm*d's forward, by pyoptim's batch_norm."""
        self._check_input_dim(input)
        factor, bn_training, counts = self._factor_and_mode()
        running_mean, running_var = self._running_stats()
        out = batch_norm(input, running_mean, running_var, self.weight, self.bias, bn_training, factor, self.eps,
                         backend=self.backend)
        self._count_step(counts)
        return out


def _bias_kwargs(bias: bool) -> dict[str, bool]:
    """`bias=` for torch's norm constructors: passed on only when False, as older torch releases lack it."""
    return {} if bias else {"bias": False}


class BatchNorm1d(_BatchNormForward, torch.nn.BatchNorm1d):
    """torch.nn.BatchNorm1d, computed by pyoptim's kernels (`backend` picks one; default: the fastest here)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device: _Device = None, dtype: Optional[torch.dtype] = None,
                 *, bias: bool = True, backend: Optional[str] = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **_bias_kwargs(bias))
        self.backend = backend


class BatchNorm2d(_BatchNormForward, torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d, computed by pyoptim's kernels (`backend` picks one; default: the fastest here)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device: _Device = None, dtype: Optional[torch.dtype] = None,
                 *, bias: bool = True, backend: Optional[str] = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **_bias_kwargs(bias))
        self.backend = backend


class BatchNorm3d(_BatchNormForward, torch.nn.BatchNorm3d):
    """torch.nn.BatchNorm3d, computed by pyoptim's kernels (`backend` picks one; default: the fastest here)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device: _Device = None, dtype: Optional[torch.dtype] = None,
                 *, bias: bool = True, backend: Optional[str] = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **_bias_kwargs(bias))
        self.backend = backend


# -- SyncBatchNorm -----------------------------------------------------------------
#
# note [one collective each way]: the forward gathers one packed float64
# [count, mean(C), m2(C)] row per rank and merges the rows with Chan's formula
# (exact for uneven counts; a rank with no elements adds nothing), the
# backward all-reduces one packed [sum_dy(C), sum_dy_xmu(C)]. The global count
# stays a device tensor: no host sync, and every rank takes part in every
# collective, even with an empty batch, so no peer waits forever.


def _op(op: str, device: torch.device, backend: Optional[str]):
    return _backends.get(op, _backends.select(op, device, backend))


def _all_gather_rows(row: torch.Tensor, process_group: Any, world_size: int) -> torch.Tensor:
    """[world_size, len(row)]: every rank's row, in rank order, by one collective."""
    if dist.get_backend(process_group) == "gloo":
        # Gloo had no all_gather_into_tensor before recent torch releases; the list form works with every version.
        rows = [torch.empty_like(row) for _ in range(world_size)]
        dist.all_gather(rows, row, process_group)
        return torch.stack(rows)
    out = row.new_empty(world_size * row.numel())
    dist.all_gather_into_tensor(out, row, process_group)
    return out.view(world_size, row.numel())


class _SyncBatchNormFunction(torch.autograd.Function):
    """BatchNorm over the batches of every rank of a process group (torch's SyncBatchNorm, with pyoptim's ops)."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, eps, momentum, process_group, world_size,
                backend):
        # Every check before the first collective and the running statistics' update (the ops check again).
        check_batch_norm_fwd_args("batch_norm_fwd", input, weight, bias, running_mean, running_var, True, True)
        c = input.shape[1]
        count = input.numel() // c
        sd = norm_stat_dtype(input.dtype)
        if count > 0:
            mean, m2 = _op("batch_norm_stats", input.device, backend)(input)
        else:
            mean = m2 = torch.zeros(c, dtype=sd, device=input.device)
        local = torch.cat([torch.full((1,), count, dtype=torch.float64, device=input.device), mean.double(),
                           m2.double()])
        rows = _all_gather_rows(local, process_group, world_size)
        counts, means, m2s = rows[:, :1], rows[:, 1:c + 1], rows[:, c + 1:]
        # Chan et al.'s merge of all ranks at once, in float64:
        #   n = sum(n_r), mean = sum(n_r * mean_r) / n,
        #   m2 = sum(m2_r) + sum(n_r * (mean_r - mean)^2)
        n = counts.sum(0)
        total_mean = (counts * means).sum(0) / n.clamp_min(1)
        total_m2 = m2s.sum(0) + (counts * (means - total_mean).square()).sum(0)
        # No element on any rank: invstd 0, as batch_norm_fwd saves for an empty batch.
        invstd = torch.where(n > 0, 1.0 / torch.sqrt(total_m2 / n.clamp_min(1) + eps), 0.0)
        if running_mean is not None:
            # m2 / (n - 1): nan for a single element, as torch's; untouched when there is no element.
            unbiased = total_m2 / (n - 1)
            with torch.no_grad():
                new_mean = (1 - momentum) * running_mean.double() + momentum * total_mean
                new_var = (1 - momentum) * running_var.double() + momentum * unbiased
                running_mean.copy_(torch.where(n > 0, new_mean, running_mean.double()))
                running_var.copy_(torch.where(n > 0, new_var, running_var.double()))
        mean, invstd = total_mean.to(sd), invstd.to(sd)
        out = _op("batch_norm_elemt", input.device, backend)(input, weight, bias, mean, invstd)
        ctx.save_for_backward(input, weight, mean, invstd, n)
        ctx.process_group, ctx.backend = process_group, backend
        ctx.bias_dtype = bias.dtype if bias is not None else input.dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # as the C++ backends: no second derivative
    def backward(ctx, grad_out):
        input, weight, mean, invstd, n = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        c = input.shape[1]
        if input.numel() > 0:
            sum_dy, sum_dy_xmu = _op("batch_norm_backward_reduce", input.device, ctx.backend)(grad_out, input, mean)
        else:
            sum_dy = sum_dy_xmu = torch.zeros(c, dtype=mean.dtype, device=input.device)
        grad_input = grad_weight = grad_bias = None
        if need_input:
            packed = torch.cat([sum_dy, sum_dy_xmu])
            dist.all_reduce(packed, dist.ReduceOp.SUM, ctx.process_group)
            # The global count in float64: exact past float32's 2^24.
            mean_dy, mean_dy_xmu = (packed.double() / n.clamp_min(1)).to(mean.dtype).split(c)
            grad_input = _op("batch_norm_backward_elemt", input.device, ctx.backend)(
                grad_out, input, mean, invstd, weight, mean_dy, mean_dy_xmu)
        # The local sums, as torch's SyncBatchNorm: DDP all-reduces parameter gradients.
        if need_weight and weight is not None:
            grad_weight = (sum_dy_xmu * invstd).to(weight.dtype)
        if need_bias:
            grad_bias = sum_dy.to(ctx.bias_dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None


class SyncBatchNorm(_BatchNormForward, torch.nn.modules.batchnorm._BatchNorm):
    """torch.nn.SyncBatchNorm by pyoptim's ops, on any device a process group serves (gloo on CPU, nccl on GPU).

    note [not a torch SyncBatchNorm]: torch.nn.SyncBatchNorm's arguments,
    attributes (process_group), buffers, input checks and state_dict keys,
    and a `_BatchNorm` as torch's is (what FSDP's mixed precision and torch's
    fusion utilities look for), but not a subclass of torch.nn.SyncBatchNorm:
    DistributedDataParallel refuses any torch.nn.SyncBatchNorm in a CPU
    module (torch's has no CPU kernels), and this one runs on gloo.
    """

    _check_input_dim = torch.nn.SyncBatchNorm._check_input_dim
    _check_non_zero_input_channels = torch.nn.SyncBatchNorm._check_non_zero_input_channels

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: Optional[Any] = None, device: _Device = None,
                 dtype: Optional[torch.dtype] = None, *, bias: bool = True, backend: Optional[str] = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         **_bias_kwargs(bias))
        self.process_group = process_group
        self.backend = backend

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """torch.nn.SyncBatchNorm's forward by pyoptim's ops, without its GPU-only restriction."""
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        factor, bn_training, counts = self._factor_and_mode()
        running_mean, running_var = self._running_stats()
        # Statistics are synchronized only in training, across a group of more than one rank.
        world_size = 1
        process_group = None
        if bn_training and self.training and dist.is_available() and dist.is_initialized():
            process_group = self.process_group if self.process_group else dist.group.WORLD
            world_size = dist.get_world_size(process_group)
        if world_size == 1:
            out = batch_norm(input, running_mean, running_var, self.weight, self.bias, bn_training, factor,
                             self.eps, backend=self.backend)
        else:
            out = _SyncBatchNormFunction.apply(input, self.weight, self.bias, running_mean, running_var, self.eps,
                                               factor, process_group, world_size, self.backend)
        self._count_step(counts)
        return out

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group: Optional[Any] = None
                               ) -> torch.nn.Module:
        """Every BatchNorm*d (torch's or ours) in `module` as a pyoptim SyncBatchNorm, recursively, as torch's does."""
        module_output = module
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            # Built on the meta device, then given the module's own Parameter and
            # buffer objects: device, dtype, requires_grad and values are theirs.
            module_output = cls(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats, process_group, device="meta",
                                bias=module.bias is not None or not module.affine,
                                backend=getattr(module, "backend", None))
            if module.affine:
                with torch.no_grad():
                    module_output.weight = module.weight
                    module_output.bias = module.bias
            module_output.running_mean = module.running_mean
            module_output.running_var = module.running_var
            module_output.num_batches_tracked = module.num_batches_tracked
            module_output.training = module.training
            if hasattr(module, "qconfig"):
                module_output.qconfig = module.qconfig
        for name, child in module.named_children():
            module_output.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        del module
        return module_output


# -- InstanceNorm ------------------------------------------------------------------


class _InstanceNormForward:
    """torch's _InstanceNorm with pyoptim's instance_norm (torch's forward and its input checks are kept)."""

    backend: Optional[str]

    def _apply_instance_norm(self, input: torch.Tensor) -> torch.Tensor:
        return instance_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                             self.training or not self.track_running_stats,
                             self.momentum if self.momentum is not None else 0.0, self.eps, backend=self.backend)


class InstanceNorm1d(_InstanceNormForward, torch.nn.InstanceNorm1d):
    """torch.nn.InstanceNorm1d, computed by pyoptim's kernels (`backend` picks one; default: the fastest here)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = False,
                 track_running_stats: bool = False, device: _Device = None, dtype: Optional[torch.dtype] = None,
                 *, bias: bool = True, backend: Optional[str] = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **_bias_kwargs(bias))
        self.backend = backend


class InstanceNorm2d(_InstanceNormForward, torch.nn.InstanceNorm2d):
    """torch.nn.InstanceNorm2d, computed by pyoptim's kernels (`backend` picks one; default: the fastest here)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = False,
                 track_running_stats: bool = False, device: _Device = None, dtype: Optional[torch.dtype] = None,
                 *, bias: bool = True, backend: Optional[str] = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **_bias_kwargs(bias))
        self.backend = backend


class InstanceNorm3d(_InstanceNormForward, torch.nn.InstanceNorm3d):
    """torch.nn.InstanceNorm3d, computed by pyoptim's kernels (`backend` picks one; default: the fastest here)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = False,
                 track_running_stats: bool = False, device: _Device = None, dtype: Optional[torch.dtype] = None,
                 *, bias: bool = True, backend: Optional[str] = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **_bias_kwargs(bias))
        self.backend = backend
