"""rmsprop_step_ in Triton: a chunked multi-tensor launch, the design of csrc/cuda/rmsprop_cuda.cu.

Host side: the checks of pyoptim._validation, then the tensor and chunk
tables of kernels/_multi_tensor.py (one row per tensor: the addresses of p, g,
square_avg, grad_avg and momentum_buffer, its numel, the address of its step,
its param group); a small first launch advances the steps (torch counts them;
the update reads none). Device side: the per-element math of
csrc/include/pyoptim/rmsprop.h and clip.h, reading every device input on the
device (note [no host sync]), rounded as torch rounds (note [exact fp32],
note [torch's fmas], note [bf16 rounding], all in kernels/_multi_tensor.py):
grad.add(param, alpha=weight_decay), square_avg's addcmul_, grad_avg's lerp_,
the centered square_avg.addcmul(grad_avg, grad_avg, value=-1) and
param.add_(buf, alpha=-lr) are fused multiply-adds, everything else rounds op
by op as rmsprop.h reads.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from pyoptim._validation import check_rmsprop_args, group_l1

from ._multi_tensor import (LAUNCH, TL_DTYPE, TableCache, Work, add_l1, bf16_rne, device_type_required, exact_div,
                            exact_sqrt, float_table, fma, interpret, load_master, on_device, policy_of, program_chunk,
                            row_tail, step_count_kernel, step_flags, step_inputs, store_master, tensor_tables, tl_types,
                            via_cpu)

__all__ = ["rmsprop_step_triton"]

_COUNT_BLOCK = 1024  # tensors per program of the step-count kernel
# columns of the tensor table: p, g, square_avg, grad_avg, momentum_buffer, extra, numel, step, group, index
_META_COLS = 10
_HYPER_COLS = 6  # columns of the hyperparameter table: lr, alpha, eps, weight_decay, momentum, l1


# -- device code ---------------------------------------------------------------


@triton.jit
def _rmsprop_chunk(P, G, SA, GA, BUF, EXTRA, key, offs, numel, grad_mul, weight_decay, alpha, one_minus_alpha, eps,
                   momentum, neg_lr, l1, has_weight_decay, has_l1, lerp_low, COMPUTE: tl.constexpr,
                   CENTERED: tl.constexpr, MOMENTUM: tl.constexpr, MASKED: tl.constexpr, POLICY: tl.constexpr):
    # rmsprop.h's rmsprop_update over one chunk (masked: a tensor's last, partial chunk).
    if MASKED:
        mask = offs < numel
        zero = 0.0
        one = 1.0  # square_avg outside the tensor: keeps the discarded lanes free of 0/0
    else:
        mask = None
        zero = None
        one = None
    p = load_master(P, EXTRA, offs, mask, zero, COMPUTE, POLICY)
    g = tl.load(G + offs, mask=mask, other=zero).to(COMPUTE) * grad_mul
    sa = tl.load(SA + offs, mask=mask, other=one).to(COMPUTE)
    if has_l1:
        g = add_l1(g, p, l1)
    if has_weight_decay:
        g = fma(p, weight_decay, g)  # grad.add(param, alpha=weight_decay)
    sa = fma(one_minus_alpha * g, g, sa * alpha)  # square_avg.mul_(alpha).addcmul_(grad, grad, value=1 - alpha)
    if CENTERED:
        ga = tl.load(GA + offs, mask=mask, other=zero).to(COMPUTE)
        # grad_avg.lerp_(grad, 1 - alpha), its side of 0.5 chosen once per group:
        #   ga + w * (g - ga), or g - (g - ga) * (1 - w)
        if lerp_low:
            ga = fma(one_minus_alpha, g - ga, ga)
        else:
            ga = fma(one_minus_alpha - 1.0, g - ga, g)
        avg = exact_sqrt(fma(-ga, ga, sa))  # square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()
    else:
        ga = sa  # unused
        avg = exact_sqrt(sa)
    avg = avg + eps
    if MOMENTUM:
        buf = tl.load(BUF + offs, mask=mask, other=zero).to(COMPUTE)
        buf = buf * momentum + exact_div(g, avg)  # buf.mul_(momentum).addcdiv_(grad, avg)
        p = fma(buf, neg_lr, p)  # param.add_(buf, alpha=-lr)
    else:
        buf = sa  # unused
        p = p + exact_div(neg_lr * g, avg)  # param.addcdiv_(grad, avg, value=-lr)
    store_master(P, EXTRA, offs, mask, p, key, POLICY)
    if SA.dtype.element_ty == tl.bfloat16:
        sa = bf16_rne(sa)
        if CENTERED:
            ga = bf16_rne(ga)
        if MOMENTUM:
            buf = bf16_rne(buf)
    tl.store(SA + offs, sa.to(SA.dtype.element_ty), mask=mask)
    if CENTERED:
        tl.store(GA + offs, ga.to(SA.dtype.element_ty), mask=mask)
    if MOMENTUM:
        tl.store(BUF + offs, buf.to(SA.dtype.element_ty), mask=mask)


@triton.jit
def _rmsprop_kernel(
    META,  # [n_tensors, 10] int64: per tensor the addresses of p, g, square_avg, grad_avg (0 unless CENTERED),
    #        momentum_buffer (0 unless MOMENTUM), extra (masters or remainders, 0 without); numel; the address of
    #        its step; group; its index in the op's lists
    CHUNKS,  # [grid, 2] int64: per program its tensor's row in META and the chunk's index within that tensor
    HYPER,  # [groups, 6] float64: per group lr, alpha, eps, weight_decay, momentum, l1
    LR,  # [groups] float64: lr_tensor, read instead of HYPER's lr when HAS_LR_TENSOR
    GRAD_SCALE,  # [1] float32, read when HAS_GRAD_SCALE
    FOUND_INF,  # [1] float32, read when HAS_FOUND_INF
    GRAD_NORM,  # [1] float32: the norm of the grads as passed, read when HAS_GRAD_NORM
    max_grad_norm,  # float32: the norm to clip to, when HAS_GRAD_NORM
    seed_lo,  # int64: the low 32 bits of stochastic_seed (POLICY 3)
    seed_hi,  # int64: its high 32 bits
    DTYPE: tl.constexpr,  # storage type of p, g
    STATE: tl.constexpr,  # storage type of the states (note [state dtype])
    POLICY: tl.constexpr,  # precision.h's MasterWeights: 0 None, 1 fp32 masters, 2 remainders, 3 stochastic
    COMPUTE: tl.constexpr,  # math type: float32, or float64 for float64 storage
    CENTERED: tl.constexpr,
    MOMENTUM: tl.constexpr,  # momentum buffers given
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
    row, chunk = program_chunk(META, CHUNKS, 10)  # _META_COLS
    P = tl.load(row + 0).to(tl.pointer_type(DTYPE))
    G = tl.load(row + 1).to(tl.pointer_type(DTYPE))
    SA = tl.load(row + 2).to(tl.pointer_type(STATE))
    GA = tl.load(row + 3).to(tl.pointer_type(STATE))  # null unless CENTERED: never read
    BUF = tl.load(row + 4).to(tl.pointer_type(STATE))  # null unless MOMENTUM: never read
    EXTRA = tl.load(row + 5).to(tl.pointer_type(tl.int8))  # null under POLICY 0 and 3: never read
    if ALIGNED:
        # In bytes: whole chunks then use 16-byte accesses.
        P = tl.multiple_of(P, 16)
        G = tl.multiple_of(G, 16)
        SA = tl.multiple_of(SA, 16)
        GA = tl.multiple_of(GA, 16)
        BUF = tl.multiple_of(BUF, 16)
    numel, k, key = row_tail(row, seed_lo, seed_hi, 6, POLICY)

    # rmsprop.h's rmsprop_scalars: computed in fp64, rounded once to COMPUTE.
    hyper = HYPER + 6 * k  # _HYPER_COLS
    lr, grad_mul = step_inputs(hyper, LR, k, GRAD_SCALE, GRAD_NORM, max_grad_norm, HAS_LR_TENSOR, HAS_GRAD_SCALE,
                               HAS_GRAD_NORM, MAXIMIZE)
    alpha = tl.load(hyper + 1)
    eps = tl.load(hyper + 2)
    weight_decay = tl.load(hyper + 3)
    momentum = tl.load(hyper + 4)
    l1 = tl.load(hyper + 5)
    c_grad_mul = grad_mul.to(COMPUTE)
    c_weight_decay = weight_decay.to(COMPUTE)
    c_alpha = alpha.to(COMPUTE)
    c_one_minus_alpha = (1.0 - alpha).to(COMPUTE)
    c_eps = eps.to(COMPUTE)
    c_momentum = momentum.to(COMPUTE)
    c_neg_lr = (-lr).to(COMPUTE)
    c_l1 = l1.to(COMPUTE)
    has_weight_decay = weight_decay != 0.0
    has_l1 = l1 != 0.0
    lerp_low = (c_one_minus_alpha < 0.5) & (c_one_minus_alpha > -0.5)  # torch.lerp decides on |rounded weight|

    start = chunk * BLOCK  # int64: tensors of 2^31 elements and more
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= numel:
        _rmsprop_chunk(P, G, SA, GA, BUF, EXTRA, key, offs, numel, c_grad_mul, c_weight_decay, c_alpha,
                       c_one_minus_alpha, c_eps, c_momentum, c_neg_lr, c_l1, has_weight_decay, has_l1, lerp_low,
                       COMPUTE, CENTERED, MOMENTUM, False, POLICY)
    else:
        _rmsprop_chunk(P, G, SA, GA, BUF, EXTRA, key, offs, numel, c_grad_mul, c_weight_decay, c_alpha,
                       c_one_minus_alpha, c_eps, c_momentum, c_neg_lr, c_l1, has_weight_decay, has_l1, lerp_low,
                       COMPUTE, CENTERED, MOMENTUM, True, POLICY)


# -- host code -----------------------------------------------------------------


_tensor_tables = TableCache()
_hyper_tables = TableCache()


def rmsprop_step_triton(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    square_avgs: Sequence[torch.Tensor],
    grad_avgs: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor],
    state_steps: Sequence[torch.Tensor],
    *,
    lr: Sequence[float],
    alpha: Sequence[float],
    eps: Sequence[float],
    weight_decay: Sequence[float],
    momentum: Sequence[float],
    l1_weight_decay: Sequence[float] = (),
    group_sizes: Sequence[int],
    centered: bool,
    maximize: bool,
    lr_tensor: Optional[torch.Tensor] = None,
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
    grad_norm: Optional[torch.Tensor] = None,
    max_grad_norm: float = 0.0,
    master_params: Optional[Sequence[torch.Tensor]] = None,
    param_remainders: Optional[Sequence[torch.Tensor]] = None,
    stochastic_seed: Optional[int] = None,
) -> None:
    """One RMSprop step over many tensors, in place (the contract of torch.ops.pyoptim.rmsprop_step_)."""
    kwargs = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                  l1_weight_decay=l1_weight_decay, group_sizes=group_sizes, centered=centered, maximize=maximize,
                  lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf, grad_norm=grad_norm,
                  max_grad_norm=max_grad_norm, stochastic_seed=stochastic_seed)
    lists = (params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps)
    check_rmsprop_args(*lists, **kwargs, master_params=master_params, param_remainders=param_remainders,
                       device_type=device_type_required())
    if len(params) == 0:
        return
    device = params[0].device
    extra = master_params if master_params is not None else param_remainders
    policy = policy_of(master_params, param_remainders, stochastic_seed)
    if interpret() and device.type != "cpu":
        if extra is None:
            via_cpu(rmsprop_step_triton, lists, (0, 2, 3, 4, 5), **kwargs)
        else:
            name = "master_params" if master_params is not None else "param_remainders"
            via_cpu(lambda *ls, **kw: rmsprop_step_triton(*ls[:6], **kw, **{name: ls[6]}), lists + (extra,),
                    (0, 2, 3, 4, 5, 6), **kwargs)
        return
    dtype = params[0].dtype
    block, num_warps = LAUNCH[dtype]
    has_momentum = len(momentum_buffers) > 0
    seed = stochastic_seed or 0
    with on_device(device):
        group_of = [k for k, size in enumerate(group_sizes) for _ in range(size)]
        work = Work((params, grads, square_avgs, grad_avgs if centered else None,
                     momentum_buffers if has_momentum else None, extra),
                    (True, False, True, True, True, True),
                    ([s.data_ptr() for s in state_steps], group_of, range(len(params))))
        tensors = tensor_tables(_tensor_tables, device, work, block)
        hyper_values = tuple(x for k in range(len(group_sizes))
                             for x in (lr[k], alpha[k], eps[k], weight_decay[k], momentum[k],
                                       group_l1(l1_weight_decay, k)))
        hyper = float_table(_hyper_tables, device, hyper_values, lambda: list(hyper_values))

        meta = tensors.views["meta"]
        n = len(params)
        step_count_kernel[(triton.cdiv(n, _COUNT_BLOCK),)](
            meta, found_inf, n, COLS=_META_COLS, STEP_COL=7, HAS_FOUND_INF=found_inf is not None, BLOCK=_COUNT_BLOCK,
            num_warps=4)
        for grid, chunk_table, is_aligned, _ in tensors.chunk_launches():
            _rmsprop_kernel[grid](
                meta, chunk_table, hyper.views["hyper"], lr_tensor, grad_scale, found_inf, grad_norm,
                float(max_grad_norm), seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, **tl_types(dtype),
                STATE=TL_DTYPE[square_avgs[0].dtype], POLICY=policy, CENTERED=centered, MOMENTUM=has_momentum,
                MAXIMIZE=maximize,
                **step_flags(lr_tensor, grad_scale, found_inf, grad_norm), ALIGNED=is_aligned, BLOCK=block,
                num_warps=num_warps, enable_fp_fusion=False)  # note [exact fp32]
        work.finish()
