"""sgd_step_ in Triton: a chunked multi-tensor launch, the design of csrc/cuda/sgd_cuda.cu.

Host side: the checks of pyoptim._validation, then the tensor and chunk
tables of kernels/_multi_tensor.py (one row per tensor: the addresses of p, g
and the momentum buffer, its numel, its param group), so one launch serves any
number of tensors (two when some tensors are not 16-byte aligned). Device
side: the per-element math of csrc/include/pyoptim/sgd.h and clip.h, reading
lr_tensor, grad_scale, found_inf and grad_norm on the device (note [no host
sync]).

Every `a.add(b, alpha=c)` of torch's single-tensor SGD is one rounded fma
here, as ATen computes it (note [torch's fmas]): the weight decay
grad.add(param, alpha=wd), the momentum buf.mul_(momentum).add_(grad,
alpha=1 - dampening), Nesterov's grad.add(buf, alpha=momentum) and the update
param.add_(grad, alpha=-lr).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from pyoptim._validation import check_sgd_args, group_l1

from ._multi_tensor import (LAUNCH, TL_DTYPE, TableCache, Work, add_l1, bf16_rne, device_type_required, float_table,
                            fma, interpret, load_master, on_device, policy_of, program_chunk, row_tail,
                            step_count_kernel, step_flags, step_inputs, store_master, tensor_tables, tl_types, via_cpu)

__all__ = ["sgd_step_triton"]

_META_COLS = 8  # columns of the tensor table: p, g, buf, extra, numel, step, group, index
_COUNT_BLOCK = 1024  # tensors per program of the step-count kernel
_HYPER_COLS = 5  # columns of the hyperparameter table: lr, momentum, dampening, weight_decay, l1


# -- device code ---------------------------------------------------------------


@triton.jit
def _sgd_chunk(P, G, B, EXTRA, key, offs, numel, grad_mul, weight_decay, momentum, one_minus_dampening, neg_lr, l1,
               has_weight_decay, has_l1, COMPUTE: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
               FIRST_STEP: tl.constexpr, MASKED: tl.constexpr, POLICY: tl.constexpr):
    # sgd.h's sgd_update over one chunk, op for op as torch computes each op.
    # Unmasked (a whole chunk) the accesses can be vectorized; masked (a
    # tensor's last, partial chunk) they cannot.
    if MASKED:
        mask = offs < numel
        zero = 0.0
    else:
        mask = None
        zero = None
    p = load_master(P, EXTRA, offs, mask, zero, COMPUTE, POLICY)
    g = tl.load(G + offs, mask=mask, other=zero).to(COMPUTE) * grad_mul
    if has_l1:
        g = add_l1(g, p, l1)
    if has_weight_decay:
        g = fma(p, weight_decay, g)  # grad.add(param, alpha=weight_decay)
    if MOMENTUM:
        if FIRST_STEP:
            buf = g  # torch.clone(grad): the buffer is written, never read
        else:
            buf = tl.load(B + offs, mask=mask, other=zero).to(COMPUTE)
            buf = fma(g, one_minus_dampening, buf * momentum)  # buf.mul_(momentum).add_(g, alpha=1 - dampening)
        if NESTEROV:
            g = fma(buf, momentum, g)  # grad.add(buf, alpha=momentum)
        else:
            g = buf
        if B.dtype.element_ty == tl.bfloat16:
            buf = bf16_rne(buf)
        tl.store(B + offs, buf.to(B.dtype.element_ty), mask=mask)
    p = fma(g, neg_lr, p)  # param.add_(grad, alpha=-lr)
    store_master(P, EXTRA, offs, mask, p, key, POLICY)


@triton.jit
def _sgd_kernel(
    META,  # [n_tensors, 8] int64: per tensor the addresses of p, g, buf (0 without MOMENTUM), extra (masters or
    #        remainders, 0 without); numel; the address of its step (0 without state_steps); group; its index in
    #        the op's lists
    CHUNKS,  # [grid, 2] int64: per program its tensor's row in META and the chunk's index within that tensor
    HYPER,  # [groups, 5] float64: per group lr, momentum, dampening, weight_decay, l1
    LR,  # [groups] float64: lr_tensor, read instead of HYPER's lr when HAS_LR_TENSOR
    GRAD_SCALE,  # [1] float32, read when HAS_GRAD_SCALE
    FOUND_INF,  # [1] float32, read when HAS_FOUND_INF
    GRAD_NORM,  # [1] float32: the norm of the grads as passed, read when HAS_GRAD_NORM
    max_grad_norm,  # float32: the norm to clip to, when HAS_GRAD_NORM
    seed_lo,  # int64: the low 32 bits of stochastic_seed (POLICY 3)
    seed_hi,  # int64: its high 32 bits
    DTYPE: tl.constexpr,  # storage type of p, g
    STATE: tl.constexpr,  # storage type of buf (note [state dtype])
    POLICY: tl.constexpr,  # precision.h's MasterWeights: 0 None, 1 fp32 masters, 2 remainders, 3 stochastic
    COMPUTE: tl.constexpr,  # math type: float32, or float64 for float64 storage
    MOMENTUM: tl.constexpr,  # momentum buffers were given
    NESTEROV: tl.constexpr,
    FIRST_STEP: tl.constexpr,  # the buffers start as the (decayed, scaled) grads
    MAXIMIZE: tl.constexpr,
    HAS_LR_TENSOR: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    HAS_GRAD_NORM: tl.constexpr,
    ALIGNED: tl.constexpr,  # every address in this launch is 16-byte aligned
    BLOCK: tl.constexpr,  # elements per chunk (one program)
):
    if HAS_FOUND_INF:
        if tl.load(FOUND_INF) != 0.0:
            return  # a step with inf/nan grads changes nothing
    row, chunk = program_chunk(META, CHUNKS, 8)  # _META_COLS
    P = tl.load(row + 0).to(tl.pointer_type(DTYPE))
    G = tl.load(row + 1).to(tl.pointer_type(DTYPE))
    B = tl.load(row + 2).to(tl.pointer_type(STATE))  # null without MOMENTUM: never read
    EXTRA = tl.load(row + 3).to(tl.pointer_type(tl.int8))  # null under POLICY 0 and 3: never read
    if ALIGNED:
        # In bytes: whole chunks then use 16-byte accesses.
        P = tl.multiple_of(P, 16)
        G = tl.multiple_of(G, 16)
        B = tl.multiple_of(B, 16)
    numel, k, key = row_tail(row, seed_lo, seed_hi, 4, POLICY)

    # sgd.h's sgd_scalars: computed in fp64, rounded once to COMPUTE.
    hyper = HYPER + 5 * k  # _HYPER_COLS
    lr, grad_mul = step_inputs(hyper, LR, k, GRAD_SCALE, GRAD_NORM, max_grad_norm, HAS_LR_TENSOR, HAS_GRAD_SCALE,
                               HAS_GRAD_NORM, MAXIMIZE)
    momentum = tl.load(hyper + 1)
    dampening = tl.load(hyper + 2)
    weight_decay = tl.load(hyper + 3)
    l1 = tl.load(hyper + 4)
    c_grad_mul = grad_mul.to(COMPUTE)
    c_weight_decay = weight_decay.to(COMPUTE)
    c_momentum = momentum.to(COMPUTE)
    c_one_minus_dampening = (1.0 - dampening).to(COMPUTE)
    c_neg_lr = (-lr).to(COMPUTE)
    c_l1 = l1.to(COMPUTE)
    has_weight_decay = weight_decay != 0.0
    has_l1 = l1 != 0.0

    start = chunk * BLOCK  # int64: tensors of 2^31 elements and more
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= numel:
        _sgd_chunk(P, G, B, EXTRA, key, offs, numel, c_grad_mul, c_weight_decay, c_momentum, c_one_minus_dampening,
                   c_neg_lr, c_l1, has_weight_decay, has_l1, COMPUTE, MOMENTUM, NESTEROV, FIRST_STEP, False, POLICY)
    else:
        _sgd_chunk(P, G, B, EXTRA, key, offs, numel, c_grad_mul, c_weight_decay, c_momentum, c_one_minus_dampening,
                   c_neg_lr, c_l1, has_weight_decay, has_l1, COMPUTE, MOMENTUM, NESTEROV, FIRST_STEP, True, POLICY)


# -- host code -----------------------------------------------------------------


_tensor_tables = TableCache()
_hyper_tables = TableCache()


def sgd_step_triton(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor],
    *,
    lr: Sequence[float],
    momentum: Sequence[float],
    dampening: Sequence[float],
    weight_decay: Sequence[float],
    l1_weight_decay: Sequence[float] = (),
    group_sizes: Sequence[int],
    nesterov: bool,
    maximize: bool,
    is_first_step: bool,
    lr_tensor: Optional[torch.Tensor] = None,
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
    grad_norm: Optional[torch.Tensor] = None,
    max_grad_norm: float = 0.0,
    master_params: Optional[Sequence[torch.Tensor]] = None,
    param_remainders: Optional[Sequence[torch.Tensor]] = None,
    stochastic_seed: Optional[int] = None,
    state_steps: Optional[Sequence[torch.Tensor]] = None,
) -> None:
    """One SGD step over many tensors, in place (the contract of torch.ops.pyoptim.sgd_step_)."""
    kwargs = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                  l1_weight_decay=l1_weight_decay, group_sizes=group_sizes,
                  nesterov=nesterov, maximize=maximize, is_first_step=is_first_step, lr_tensor=lr_tensor,
                  grad_scale=grad_scale, found_inf=found_inf, grad_norm=grad_norm, max_grad_norm=max_grad_norm,
                  stochastic_seed=stochastic_seed)
    lists = (params, grads, momentum_buffers)
    optional = {k: v for k, v in (("master_params", master_params), ("param_remainders", param_remainders),
                                  ("state_steps", state_steps)) if v is not None}
    check_sgd_args(*lists, **kwargs, **optional, device_type=device_type_required())
    if len(params) == 0:
        return
    device = params[0].device
    if interpret() and device.type != "cpu":
        names = list(optional)
        via_cpu(lambda *ls, **kw: sgd_step_triton(*ls[:3], **kw, **dict(zip(names, ls[3:]))),
                lists + tuple(optional.values()), (0, 2) + tuple(range(3, 3 + len(names))), **kwargs)
        return
    extra = master_params if master_params is not None else param_remainders
    policy = policy_of(master_params, param_remainders, stochastic_seed)
    dtype = params[0].dtype
    block, num_warps = LAUNCH[dtype]
    has_momentum = len(momentum_buffers) > 0
    seed = stochastic_seed or 0
    n = len(params)
    with on_device(device):
        group_of = [k for k, size in enumerate(group_sizes) for _ in range(size)]
        steps = [s.data_ptr() for s in state_steps] if state_steps is not None else [0] * n
        work = Work((params, grads, momentum_buffers if has_momentum else None, extra), (True, False, True, True),
                    (steps, group_of, range(n)))
        tensors = tensor_tables(_tensor_tables, device, work, block)
        hyper_values = tuple(x for k in range(len(group_sizes))
                             for x in (lr[k], momentum[k], dampening[k], weight_decay[k], group_l1(l1_weight_decay, k)))
        hyper = float_table(_hyper_tables, device, hyper_values, lambda: list(hyper_values))
        meta = tensors.views["meta"]
        if state_steps is not None:
            step_count_kernel[(triton.cdiv(n, _COUNT_BLOCK),)](
                meta, found_inf, n, COLS=_META_COLS, STEP_COL=5, HAS_FOUND_INF=found_inf is not None,
                BLOCK=_COUNT_BLOCK, num_warps=4)
        state = momentum_buffers[0].dtype if has_momentum else dtype
        for grid, chunk_table, is_aligned, _ in tensors.chunk_launches():
            _sgd_kernel[grid](
                meta, chunk_table, hyper.views["hyper"], lr_tensor, grad_scale,
                found_inf, grad_norm, float(max_grad_norm), seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF,
                **tl_types(dtype), STATE=TL_DTYPE[state], POLICY=policy, MOMENTUM=has_momentum,
                NESTEROV=nesterov, FIRST_STEP=is_first_step, MAXIMIZE=maximize,
                **step_flags(lr_tensor, grad_scale, found_inf, grad_norm), ALIGNED=is_aligned, BLOCK=block,
                num_warps=num_warps, enable_fp_fusion=False)  # note [torch's fmas]
        work.finish()
