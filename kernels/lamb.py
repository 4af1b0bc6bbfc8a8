"""lamb_step_ in Triton: lamb.h's two passes as chunked multi-tensor launches, the design of csrc/cuda/lamb_cuda.cu.

Host side: the checks of pyoptim._validation, then the tensor and chunk
tables of kernels/_multi_tensor.py (one row per tensor: the addresses of p,
g, m, v and of its masters or remainders, its numel, the address of its step,
its param group, its index in the op's lists) and Adam's
hyperparameter rows (kernels/adam.py: bias correction as note [bias
correction] computes it). Device side, with no host sync (note [no host
sync]): the step count; pass 1 (m and v written, each program's sums of p * p
and u * u to two partials buffers); the per-tensor reduction of
multi_tensor_norm (kernels/clip.py's _norm_tensors_kernel: each tensor's
partials in order, deterministic); pass 2 (the trust ratio from the two sums,
and p moved along u, recomputed from the new m and v). Math op by op as
lamb.h reads, correctly rounded (note [exact fp32]), no fma. Under a precision
policy (note [precision policy] in pyoptim/optim/_base.py) p is read through
load_master in both passes (the trust ratio's ||p|| is the master's) and
written through store_master by the second; m and v are of their own dtype
(note [state dtype]).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from pyoptim._validation import check_lamb_args, check_lamb_norms, group_l1

from ._multi_tensor import (LAUNCH, TL_DTYPE, TableCache, Work, add_l1, bf16_rne, device_type_required, exact_div,
                            exact_sqrt, float_table, interpret, load_master, on_device, policy_key, policy_of,
                            program_chunk, step_count_kernel, step_flags, step_inputs, store_master, tensor_tables,
                            tl_types, via_cpu)
from .adam import _hyper_rows
from .clip import _norm_tensors_kernel

__all__ = ["lamb_step_triton", "lamb_moments_triton", "lamb_apply_triton"]

_COUNT_BLOCK = 1024  # tensors per program of the step-count kernel
_REDUCE_BLOCK = 1024  # partials per iteration of the per-tensor reduction
_META_COLS = 9  # columns of the tensor table: p, g, m, v, extra, numel, step, group, index
_HYPER_COLS = 8  # Adam's: lr, beta1, beta2, eps, weight_decay, log(beta1), log(beta2), l1


# -- device code ---------------------------------------------------------------


@triton.jit
def _lamb_coeffs(row, HYPER, LR, GRAD_SCALE, GRAD_NORM, max_grad_norm, COMPUTE: tl.constexpr,
                 MAXIMIZE: tl.constexpr, HAS_LR_TENSOR: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                 HAS_GRAD_NORM: tl.constexpr):
    # lamb.h's lamb_scalars of the tensor at `row` (but the ratio): in fp64,
    # rounded once to COMPUTE; neg_lr stays fp64 for the ratio's product.
    STEP = tl.load(row + 6).to(tl.pointer_type(tl.float32))
    k = tl.load(row + 7)
    hyper = HYPER + 8 * k  # _HYPER_COLS
    lr, grad_mul = step_inputs(hyper, LR, k, GRAD_SCALE, GRAD_NORM, max_grad_norm, HAS_LR_TENSOR, HAS_GRAD_SCALE,
                               HAS_GRAD_NORM, MAXIMIZE)
    beta1 = tl.load(hyper + 1)
    beta2 = tl.load(hyper + 2)
    eps = tl.load(hyper + 3)
    weight_decay = tl.load(hyper + 4)
    step = tl.load(STEP).to(tl.float64)
    bc1 = 1.0 - tl.exp(step * tl.load(hyper + 5))  # note [bias correction]
    bc2 = 1.0 - tl.exp(step * tl.load(hyper + 6))
    l1 = tl.load(hyper + 7)
    return (grad_mul.to(COMPUTE), beta1.to(COMPUTE), (1.0 - beta1).to(COMPUTE), beta2.to(COMPUTE),
            (1.0 - beta2).to(COMPUTE), bc1.to(COMPUTE), bc2.to(COMPUTE), eps.to(COMPUTE), weight_decay.to(COMPUTE),
            l1.to(COMPUTE), -lr, weight_decay != 0.0, l1 != 0.0, step)


@triton.jit
def _lamb_direction(p, m, v, bc1, bc2, eps, weight_decay, has_weight_decay):
    # lamb.h's lamb_direction: u = (m / bc1) / (sqrt(v / bc2) + eps) + wd * p
    u = exact_div(exact_div(m, bc1), exact_sqrt(exact_div(v, bc2)) + eps)
    if has_weight_decay:
        u = u + weight_decay * p
    return u


@triton.jit
def _lamb_moments_kernel(
    META,  # [n_tensors, 9] int64: per tensor the addresses of p, g, m, v, extra (masters or remainders: POLICY 1
    #        and 2, else 0); numel; the address of its step; group; its index in the op's lists
    CHUNKS,  # [grid, 2] int64: per program its tensor's row in META and the chunk's index within that tensor
    HYPER,  # [groups, 8] float64: per group lr, beta1, beta2, eps, weight_decay, log(beta1), log(beta2), l1
    LR,  # [groups] float64: lr_tensor, read instead of HYPER's lr when HAS_LR_TENSOR
    GRAD_SCALE,  # [1] float32, read when HAS_GRAD_SCALE
    FOUND_INF,  # [1] float32, read when HAS_FOUND_INF
    GRAD_NORM,  # [1] float32: the norm of the grads as passed, read when HAS_GRAD_NORM
    P_SQ,  # [all chunks] float64: out, each chunk's sum of p * p, at chunk_base + program
    U_SQ,  # [all chunks] float64: out, each chunk's sum of u * u, at chunk_base + program
    chunk_base,  # int: this launch's first chunk among all launches'
    max_grad_norm,  # float32: the norm to clip to, when HAS_GRAD_NORM
    DTYPE: tl.constexpr,  # storage type of p, g
    COMPUTE: tl.constexpr,  # math type: float32, or float64 for float64 storage
    STATE: tl.constexpr,  # storage type of m, v (note [state dtype])
    POLICY: tl.constexpr,  # precision.h's MasterWeights: 0 None, 1 fp32 masters, 2 remainders, 3 stochastic
    MAXIMIZE: tl.constexpr,
    HAS_LR_TENSOR: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    HAS_GRAD_NORM: tl.constexpr,
    BLOCK: tl.constexpr,  # elements per chunk (one program)
):
    if HAS_FOUND_INF:
        if tl.load(FOUND_INF) != 0.0:
            return  # a step with inf/nan grads changes nothing
    row, chunk = program_chunk(META, CHUNKS, 9)  # _META_COLS
    P = tl.load(row + 0).to(tl.pointer_type(DTYPE))
    G = tl.load(row + 1).to(tl.pointer_type(DTYPE))
    M = tl.load(row + 2).to(tl.pointer_type(STATE))
    V = tl.load(row + 3).to(tl.pointer_type(STATE))
    EXTRA = tl.load(row + 4).to(tl.pointer_type(tl.int8))  # null under POLICY 0 and 3: never read
    numel = tl.load(row + 5)
    (grad_mul, beta1, one_minus_beta1, beta2, one_minus_beta2, bc1, bc2, eps, weight_decay, l1, _neg_lr,
     has_weight_decay, has_l1, _step) = _lamb_coeffs(row, HYPER, LR, GRAD_SCALE, GRAD_NORM, max_grad_norm, COMPUTE,
                                              MAXIMIZE, HAS_LR_TENSOR, HAS_GRAD_SCALE, HAS_GRAD_NORM)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)  # int64: tensors of 2^31 elements and more
    mask = offs < numel
    # Outside the tensor p = g = m = 0 and v = 1: u = 0 there, and both sums
    # see zeros.
    p = load_master(P, EXTRA, offs, mask, 0.0, COMPUTE, POLICY)  # read, never written here
    g = tl.load(G + offs, mask=mask, other=0.0).to(COMPUTE) * grad_mul
    m = tl.load(M + offs, mask=mask, other=0.0).to(COMPUTE)
    v = tl.load(V + offs, mask=mask, other=1.0).to(COMPUTE)
    if has_l1:
        g = add_l1(g, p, l1)
    m = m * beta1 + one_minus_beta1 * g
    v = v * beta2 + one_minus_beta2 * g * g
    if M.dtype.element_ty == tl.bfloat16:
        m = bf16_rne(m)
        v = bf16_rne(v)
    else:
        m = m.to(M.dtype.element_ty)
        v = v.to(M.dtype.element_ty)
    tl.store(M + offs, m, mask=mask)
    tl.store(V + offs, v, mask=mask)
    # u from m and v as stored (lamb.h)
    u = _lamb_direction(p, m.to(COMPUTE), v.to(COMPUTE), bc1, bc2, eps, weight_decay, has_weight_decay)
    pid = chunk_base + tl.program_id(0).to(tl.int64)
    tl.store(P_SQ + pid, tl.sum(p * p, axis=0).to(tl.float64))
    tl.store(U_SQ + pid, tl.sum(u * u, axis=0).to(tl.float64))


@triton.jit
def _lamb_apply_kernel(
    META,  # [n_tensors, 9] int64: the tensor table of _lamb_moments_kernel
    CHUNKS,  # [grid, 2] int64: per program its tensor's row in META and the chunk's index within that tensor
    HYPER,  # [groups, 8] float64: as in _lamb_moments_kernel
    LR,  # [groups] float64: lr_tensor, read instead of HYPER's lr when HAS_LR_TENSOR
    GRAD_SCALE,  # [1] float32, read when HAS_GRAD_SCALE
    FOUND_INF,  # [1] float32, read when HAS_FOUND_INF
    GRAD_NORM,  # [1] float32, read when HAS_GRAD_NORM
    P_SQ,  # [n_tensors] float64: each tensor's sum of p * p
    U_SQ,  # [n_tensors] float64: each tensor's sum of u * u
    max_grad_norm,  # float32
    seed_lo,  # int64: the low 32 bits of stochastic_seed (POLICY 3)
    seed_hi,  # int64: its high 32 bits
    DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr,
    STATE: tl.constexpr,
    POLICY: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_LR_TENSOR: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    HAS_GRAD_NORM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    if HAS_FOUND_INF:
        if tl.load(FOUND_INF) != 0.0:
            return
    i = tl.load(CHUNKS + 2 * tl.program_id(0).to(tl.int64))
    row, chunk = program_chunk(META, CHUNKS, 9)  # _META_COLS
    P = tl.load(row + 0).to(tl.pointer_type(DTYPE))
    M = tl.load(row + 2).to(tl.pointer_type(STATE))
    V = tl.load(row + 3).to(tl.pointer_type(STATE))
    EXTRA = tl.load(row + 4).to(tl.pointer_type(tl.int8))
    numel = tl.load(row + 5)
    (_grad_mul, _beta1, _omb1, _beta2, _omb2, bc1, bc2, eps, weight_decay, _l1, neg_lr, has_weight_decay,
     _has_l1, step) = _lamb_coeffs(row, HYPER, LR, GRAD_SCALE, GRAD_NORM, max_grad_norm, COMPUTE, MAXIMIZE,
                             HAS_LR_TENSOR, HAS_GRAD_SCALE, HAS_GRAD_NORM)
    # lamb.h's lamb_trust_ratio, in fp64
    p_norm = tl.sqrt(tl.load(P_SQ + i))
    u_norm = tl.sqrt(tl.load(U_SQ + i))
    ratio = tl.where((p_norm > 0.0) & (u_norm > 0.0), p_norm / tl.where(u_norm > 0.0, u_norm, 1.0), 1.0)
    neg_lr_ratio = (neg_lr * ratio).to(COMPUTE)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    p = load_master(P, EXTRA, offs, mask, 0.0, COMPUTE, POLICY)
    m = tl.load(M + offs, mask=mask, other=0.0).to(COMPUTE)
    v = tl.load(V + offs, mask=mask, other=1.0).to(COMPUTE)
    p = p + neg_lr_ratio * _lamb_direction(p, m, v, bc1, bc2, eps, weight_decay, has_weight_decay)
    key = policy_key(seed_lo, seed_hi, step, row + 8, POLICY)
    store_master(P, EXTRA, offs, mask, p, key, POLICY)


# -- host code -----------------------------------------------------------------


_tensor_tables = TableCache()
_hyper_tables = TableCache()


def _lamb_triton(op: str, params, grads, exp_avgs, exp_avg_sqs, state_steps, norms, *, lr, beta1, beta2,
                 weight_decay, eps, l1_weight_decay=(), group_sizes, maximize, lr_tensor=None, grad_scale=None,
                 found_inf=None, grad_norm=None, max_grad_norm=0.0, master_params=None, param_remainders=None,
                 stochastic_seed=None) -> Optional[torch.Tensor]:
    """The passes of lamb_step_ that `op` makes (note [LAMB's two passes] in pyoptim/optim/lamb.py)."""
    kwargs = dict(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps,
                  l1_weight_decay=l1_weight_decay, group_sizes=group_sizes, maximize=maximize, lr_tensor=lr_tensor,
                  grad_scale=grad_scale, found_inf=found_inf, grad_norm=grad_norm, max_grad_norm=max_grad_norm,
                  stochastic_seed=stochastic_seed)
    lists = (params, grads, exp_avgs, exp_avg_sqs, state_steps)
    check_lamb_args(*lists, **kwargs, master_params=master_params, param_remainders=param_remainders,
                    device_type=device_type_required(), op=op)
    if op == "lamb_apply_":
        check_lamb_norms(op, norms, params)
    moments, apply = op != "lamb_apply_", op != "lamb_moments_"
    n = len(params)
    if n == 0:
        return torch.zeros(2, 0, dtype=torch.float64) if not apply else None
    device = params[0].device
    extra = master_params if master_params is not None else param_remainders
    policy = policy_of(master_params, param_remainders, stochastic_seed)
    if interpret() and device.type != "cpu":
        fn = {"lamb_step_": lamb_step_triton, "lamb_moments_": lamb_moments_triton,
              "lamb_apply_": lamb_apply_triton}[op]
        more = (norms,) if op == "lamb_apply_" else ()
        if extra is None:
            out = via_cpu(lambda *a, **k: _as_tuple(fn(*a, **k)), lists, (0, 2, 3, 4), *more, **kwargs)
        else:
            name = "master_params" if master_params is not None else "param_remainders"
            out = via_cpu(lambda *a, **k: _as_tuple(fn(*a[:5], *a[6:], **k, **{name: a[5]})), lists + (extra,),
                          (0, 2, 3, 4, 5), *more, **kwargs)
        return out[0] if op == "lamb_moments_" else None
    dtype = params[0].dtype
    block, num_warps = LAUNCH[dtype]
    seed = stochastic_seed or 0
    with on_device(device):
        group_of = [k for k, size in enumerate(group_sizes) for _ in range(size)]
        work = Work((params, grads, exp_avgs, exp_avg_sqs, extra), (apply, False, moments, moments, apply),
                    ([s.data_ptr() for s in state_steps], group_of, range(n)))
        tensors = tensor_tables(_tensor_tables, device, work, block)
        hyper_values = tuple(x for k in range(len(group_sizes))
                             for x in (lr[k], beta1[k], beta2[k], eps[k], weight_decay[k],
                                       group_l1(l1_weight_decay, k)))
        hyper = float_table(_hyper_tables, device, hyper_values, lambda: _hyper_rows(hyper_values)).views["hyper"]
        meta = tensors.views["meta"]
        flags = dict(**tl_types(dtype), STATE=TL_DTYPE[exp_avgs[0].dtype], POLICY=policy, MAXIMIZE=maximize,
                     **step_flags(lr_tensor, grad_scale, found_inf, grad_norm),
                     BLOCK=block, num_warps=num_warps, enable_fp_fusion=False)  # note [exact fp32]
        aux = (lr_tensor, grad_scale, found_inf, grad_norm)
        launches = tensors.chunk_launches()
        if moments:
            n_chunks = sum(total for _, _, total in tensors.launches)
            chunk_p_sq = torch.zeros(max(n_chunks, 1), dtype=torch.float64, device=device)
            chunk_u_sq = torch.zeros(max(n_chunks, 1), dtype=torch.float64, device=device)
            sums = torch.empty(2, n, dtype=torch.float64, device=device)  # rows: ||p||^2, ||u||^2
            norms_out = torch.empty(n, dtype=torch.float32, device=device)  # the reduction's norms, unused
            step_count_kernel[(triton.cdiv(n, _COUNT_BLOCK),)](
                meta, found_inf, n, COLS=_META_COLS, STEP_COL=6, HAS_FOUND_INF=found_inf is not None,
                BLOCK=_COUNT_BLOCK, num_warps=4)
            for grid, chunk_table, _, first in launches:
                _lamb_moments_kernel[grid](meta, chunk_table, hyper, *aux, chunk_p_sq, chunk_u_sq, first,
                                           float(max_grad_norm), **flags)
            for partial, out in ((chunk_p_sq, sums[0]), (chunk_u_sq, sums[1])):
                _norm_tensors_kernel[(n,)](meta, tensors.views["firsts"], partial, norms_out, out, hyper, KIND=1,
                                           CHUNK=block, BLOCK=_REDUCE_BLOCK, COLS=_META_COLS, NUMEL_COL=5,
                                           num_warps=4)  # L2
        else:
            sums = norms.contiguous()
        if apply:
            for grid, chunk_table, _, _ in launches:
                _lamb_apply_kernel[grid](meta, chunk_table, hyper, *aux, sums[0], sums[1], float(max_grad_norm),
                                         seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, **flags)
        work.finish()
    return sums if not apply else None


def _as_tuple(x):
    return None if x is None else (x,)


def lamb_step_triton(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    state_steps: Sequence[torch.Tensor],
    *,
    lr: Sequence[float],
    beta1: Sequence[float],
    beta2: Sequence[float],
    weight_decay: Sequence[float],
    eps: Sequence[float],
    l1_weight_decay: Sequence[float] = (),
    group_sizes: Sequence[int],
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
    """One LAMB step over many tensors, in place (the contract of torch.ops.pyoptim.lamb_step_)."""
    _lamb_triton("lamb_step_", params, grads, exp_avgs, exp_avg_sqs, state_steps, None, lr=lr, beta1=beta1,
                 beta2=beta2, weight_decay=weight_decay, eps=eps, l1_weight_decay=l1_weight_decay,
                 group_sizes=group_sizes, maximize=maximize, lr_tensor=lr_tensor, grad_scale=grad_scale,
                 found_inf=found_inf, grad_norm=grad_norm, max_grad_norm=max_grad_norm, master_params=master_params,
                 param_remainders=param_remainders, stochastic_seed=stochastic_seed)


def lamb_moments_triton(params, grads, exp_avgs, exp_avg_sqs, state_steps, **kwargs) -> torch.Tensor:
    """LAMB's first pass, returning the [2, n] norms (the contract of torch.ops.pyoptim.lamb_moments_)."""
    return _lamb_triton("lamb_moments_", params, grads, exp_avgs, exp_avg_sqs, state_steps, None, **kwargs)


def lamb_apply_triton(params, grads, exp_avgs, exp_avg_sqs, state_steps, norms, **kwargs) -> None:
    """LAMB's second pass from the given norms (the contract of torch.ops.pyoptim.lamb_apply_)."""
    _lamb_triton("lamb_apply_", params, grads, exp_avgs, exp_avg_sqs, state_steps, norms, **kwargs)
