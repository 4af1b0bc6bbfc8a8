"""adam_step_ in Triton: a chunked multi-tensor launch, the design of csrc/cuda/adam_cuda.cu.

Host side (the launcher): the checks of pyoptim._validation, then the tensor
and chunk tables of kernels/_multi_tensor.py (one row per tensor: the
addresses of p, g, m, v, vm, its numel, the address of its step, its param
group), so one launch serves any number of tensors (two when some tensors are
not 16-byte aligned); a small first launch advances the steps. Device side:
the per-element math of csrc/include/pyoptim/adam.h and clip.h, reading every
device input on the device (note [no host sync]), rounded as torch rounds
(note [exact fp32], note [torch's fmas], note [bf16 rounding], all in
kernels/_multi_tensor.py).

Three of the ops torch's Adam runs are fused multiply-adds (note [torch's
fmas]): grad.add(param, alpha=wd), torch.lerp and addcmul_. Everything else
rounds op by op, as adam.h's formula reads. After 10 fp32 steps, 0.3% of the
values differ from torch.optim.Adam(foreach=False) on a CPU (its sqrt,
Sleef's, is not always correctly rounded), against 30% with lerp and addcmul
unfused.

note [bias correction]: bc = 1 - beta^step is computed in fp64 from the step
the kernel reads, as exp(step * log(beta)) with log(beta) from the host: the
interpreter has no libdevice pow, and this form errs by about
|step * log(beta)| ulps of fp64 (1e-14 at most where beta^step is not
negligible), far below the fp32 rounding of the result.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from pyoptim._validation import check_adam_args, group_l1

from ._multi_tensor import (LAUNCH, TL_DTYPE, TableCache, Work, add_l1, bf16_rne, device_type_required, float_table,
                            fma, interpret, load_master, on_device, policy_key, policy_of, program_chunk,
                            step_count_kernel, step_flags, step_inputs, store_master, tensor_tables, tl_types, via_cpu)

__all__ = ["adam_step_triton"]

_COUNT_BLOCK = 1024  # tensors per program of the step-count kernel
_META_COLS = 10  # columns of the tensor table: p, g, m, v, vm, extra, numel, step, group, index
_HYPER_COLS = 8  # columns of the hyperparameter table: lr, beta1, beta2, eps, weight_decay, log(beta1), log(beta2), l1


# -- device code ---------------------------------------------------------------


@triton.jit
def _adam_update(p, g, m, v, vm, grad_mul, decay, weight_decay, m_weight, m_weight_minus_one, beta2,
                 one_minus_beta2, neg_step_size, bc2_sqrt, eps, l1, has_weight_decay, has_l1, lerp_low,
                 AMSGRAD: tl.constexpr, DECOUPLED: tl.constexpr):
    # adam.h's adam_update, op for op as torch computes each op (note [torch's
    # fmas]); `vm` is read and returned only when AMSGRAD.
    g = g * grad_mul
    if has_l1:
        g = add_l1(g, p, l1)
    if has_weight_decay:
        if DECOUPLED:
            p = p * decay
        else:
            g = fma(p, weight_decay, g)  # grad.add(param, alpha=weight_decay)
    # torch.lerp(m, g, m_weight), its side of 0.5 chosen once per group:
    #   m + m_weight * (g - m), or g - (g - m) * (1 - m_weight)
    if lerp_low:
        m = fma(m_weight, g - m, m)
    else:
        m = fma(m_weight_minus_one, g - m, g)
    v = fma(one_minus_beta2 * g, g, v * beta2)  # v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    second = v
    if AMSGRAD:
        vm = tl.where((vm != vm) | (vm > v), vm, v)  # NaN-propagating, as torch.maximum
        second = vm
    if p.dtype == tl.float32:  # note [exact fp32]
        denom = tl.math.div_rn(tl.sqrt_rn(second), bc2_sqrt) + eps
        p = p + tl.math.div_rn(neg_step_size * m, denom)
    else:
        denom = tl.sqrt(second) / bc2_sqrt + eps
        p = p + neg_step_size * m / denom
    return p, m, v, vm


@triton.jit
def _adam_chunk(P, G, M, V, VM, EXTRA, key, offs, numel, grad_mul, decay, weight_decay, m_weight, m_weight_minus_one,
                beta2, one_minus_beta2, neg_step_size, bc2_sqrt, eps, l1, has_weight_decay, has_l1, lerp_low,
                COMPUTE: tl.constexpr, AMSGRAD: tl.constexpr, DECOUPLED: tl.constexpr, MASKED: tl.constexpr,
                POLICY: tl.constexpr):
    # Load, update and store one chunk. Unmasked (a whole chunk) the accesses
    # can be vectorized; masked (a tensor's last, partial chunk) they cannot,
    # since numel's divisibility is unknown to the compiler.
    if MASKED:
        mask = offs < numel
        zero = 0.0
        one = 1.0  # v and vm outside the tensor: keeps the discarded lanes free of 0/0
    else:
        mask = None
        zero = None
        one = None
    p = load_master(P, EXTRA, offs, mask, zero, COMPUTE, POLICY)
    g = tl.load(G + offs, mask=mask, other=zero).to(COMPUTE)
    m = tl.load(M + offs, mask=mask, other=zero).to(COMPUTE)
    v = tl.load(V + offs, mask=mask, other=one).to(COMPUTE)
    if AMSGRAD:
        vm = tl.load(VM + offs, mask=mask, other=one).to(COMPUTE)
    else:
        vm = v  # unused
    p, m, v, vm = _adam_update(p, g, m, v, vm, grad_mul, decay, weight_decay, m_weight, m_weight_minus_one, beta2,
                               one_minus_beta2, neg_step_size, bc2_sqrt, eps, l1, has_weight_decay, has_l1,
                               lerp_low, AMSGRAD, DECOUPLED)
    store_master(P, EXTRA, offs, mask, p, key, POLICY)
    if M.dtype.element_ty == tl.bfloat16:
        m = bf16_rne(m)
        v = bf16_rne(v)
        if AMSGRAD:
            vm = bf16_rne(vm)
    tl.store(M + offs, m.to(M.dtype.element_ty), mask=mask)
    tl.store(V + offs, v.to(M.dtype.element_ty), mask=mask)
    if AMSGRAD:
        tl.store(VM + offs, vm.to(M.dtype.element_ty), mask=mask)


@triton.jit
def _adam_kernel(
    META,  # [n_tensors, 10] int64: per tensor the addresses of p, g, m, v, vm (0 without amsgrad), extra (masters
    #        or remainders, 0 without), numel, step, group, its index in the op's lists
    CHUNKS,  # [grid, 2] int64: per program its tensor's row in META and the chunk's index within that tensor
    HYPER,  # [groups, 8] float64: per group lr, beta1, beta2, eps, weight_decay, log(beta1), log(beta2), l1
    LR,  # [groups] float64: lr_tensor, read instead of HYPER's lr when HAS_LR_TENSOR
    GRAD_SCALE,  # [1] float32, read when HAS_GRAD_SCALE
    FOUND_INF,  # [1] float32, read when HAS_FOUND_INF
    GRAD_NORM,  # [1] float32: the norm of the grads as passed, read when HAS_GRAD_NORM
    max_grad_norm,  # float32: the norm to clip to, when HAS_GRAD_NORM
    seed_lo,  # int64: the low 32 bits of stochastic_seed (POLICY 3)
    seed_hi,  # int64: its high 32 bits
    DTYPE: tl.constexpr,  # storage type of p, g
    STATE: tl.constexpr,  # storage type of m, v, vm (note [state dtype])
    POLICY: tl.constexpr,  # precision.h's MasterWeights: 0 None, 1 fp32 masters, 2 remainders, 3 stochastic
    COMPUTE: tl.constexpr,  # math type: float32, or float64 for float64 storage
    AMSGRAD: tl.constexpr,
    DECOUPLED: tl.constexpr,
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
    M = tl.load(row + 2).to(tl.pointer_type(STATE))
    V = tl.load(row + 3).to(tl.pointer_type(STATE))
    VM = tl.load(row + 4).to(tl.pointer_type(STATE))  # null without AMSGRAD: never read
    EXTRA = tl.load(row + 5).to(tl.pointer_type(tl.int8))  # null under POLICY 0 and 3: never read
    if ALIGNED:
        # In bytes: whole chunks then use 16-byte accesses.
        P = tl.multiple_of(P, 16)
        G = tl.multiple_of(G, 16)
        M = tl.multiple_of(M, 16)
        V = tl.multiple_of(V, 16)
        VM = tl.multiple_of(VM, 16)
    numel = tl.load(row + 6)
    STEP = tl.load(row + 7).to(tl.pointer_type(tl.float32))
    k = tl.load(row + 8)

    # adam.h's adam_scalars: computed in fp64, rounded once to COMPUTE.
    hyper = HYPER + 8 * k  # _HYPER_COLS
    lr, grad_mul = step_inputs(hyper, LR, k, GRAD_SCALE, GRAD_NORM, max_grad_norm, HAS_LR_TENSOR, HAS_GRAD_SCALE,
                               HAS_GRAD_NORM, MAXIMIZE)
    beta1 = tl.load(hyper + 1)
    beta2 = tl.load(hyper + 2)
    eps = tl.load(hyper + 3)
    weight_decay = tl.load(hyper + 4)
    log_beta1 = tl.load(hyper + 5)
    log_beta2 = tl.load(hyper + 6)
    l1 = tl.load(hyper + 7)
    step = tl.load(STEP).to(tl.float64)
    key = policy_key(seed_lo, seed_hi, step, row + 9, POLICY)
    bc1 = 1.0 - tl.exp(step * log_beta1)  # note [bias correction]
    bc2 = 1.0 - tl.exp(step * log_beta2)
    m_weight = 1.0 - beta1

    # adam.h's AdamScalars, rounded once to COMPUTE
    c_grad_mul = grad_mul.to(COMPUTE)
    c_decay = (1.0 - lr * weight_decay).to(COMPUTE)
    c_weight_decay = weight_decay.to(COMPUTE)
    c_m_weight = m_weight.to(COMPUTE)
    c_m_weight_minus_one = c_m_weight - 1.0  # torch.lerp's, exact where used (m_weight >= 0.5)
    c_beta2 = beta2.to(COMPUTE)
    c_one_minus_beta2 = (1.0 - beta2).to(COMPUTE)
    c_neg_step_size = (-(lr / bc1)).to(COMPUTE)
    c_bc2_sqrt = tl.sqrt(bc2).to(COMPUTE)
    c_eps = eps.to(COMPUTE)
    c_l1 = l1.to(COMPUTE)
    has_weight_decay = weight_decay != 0.0
    has_l1 = l1 != 0.0
    lerp_low = c_m_weight < 0.5  # torch.lerp decides on the rounded weight

    start = chunk * BLOCK  # int64: tensors of 2^31 elements and more
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= numel:
        _adam_chunk(P, G, M, V, VM, EXTRA, key, offs, numel, c_grad_mul, c_decay, c_weight_decay, c_m_weight,
                    c_m_weight_minus_one, c_beta2, c_one_minus_beta2, c_neg_step_size, c_bc2_sqrt, c_eps, c_l1,
                    has_weight_decay, has_l1, lerp_low, COMPUTE, AMSGRAD, DECOUPLED, False, POLICY)
    else:
        _adam_chunk(P, G, M, V, VM, EXTRA, key, offs, numel, c_grad_mul, c_decay, c_weight_decay, c_m_weight,
                    c_m_weight_minus_one, c_beta2, c_one_minus_beta2, c_neg_step_size, c_bc2_sqrt, c_eps, c_l1,
                    has_weight_decay, has_l1, lerp_low, COMPUTE, AMSGRAD, DECOUPLED, True, POLICY)


# -- host code -----------------------------------------------------------------


_tensor_tables = TableCache()
_hyper_tables = TableCache()


def _hyper_rows(hyper: tuple) -> list[float]:
    rows = []
    for k in range(0, len(hyper), 6):
        lr, beta1, beta2, eps, weight_decay, l1 = hyper[k:k + 6]
        # log(beta) on the host, so the GPU and the interpreter start from the
        # same value; a beta of 0 becomes 1e-300, whose beta^step leaves bc at 1.
        rows += (lr, beta1, beta2, eps, weight_decay, math.log(max(beta1, 1e-300)), math.log(max(beta2, 1e-300)), l1)
    return rows


def adam_step_triton(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    max_exp_avg_sqs: Sequence[torch.Tensor],
    state_steps: Sequence[torch.Tensor],
    *,
    lr: Sequence[float],
    beta1: Sequence[float],
    beta2: Sequence[float],
    weight_decay: Sequence[float],
    eps: Sequence[float],
    l1_weight_decay: Sequence[float] = (),
    group_sizes: Sequence[int],
    amsgrad: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
    lr_tensor: Optional[torch.Tensor] = None,
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
    grad_norm: Optional[torch.Tensor] = None,
    max_grad_norm: float = 0.0,
    master_params: Optional[Sequence[torch.Tensor]] = None,
    param_remainders: Optional[Sequence[torch.Tensor]] = None,
    stochastic_seed: Optional[int] = None,
) -> None:
    """One Adam/AdamW step over many tensors, in place (the contract of torch.ops.pyoptim.adam_step_)."""
    kwargs = dict(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps,
                  l1_weight_decay=l1_weight_decay, group_sizes=group_sizes,
                  amsgrad=amsgrad, maximize=maximize, decoupled_weight_decay=decoupled_weight_decay,
                  lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf, grad_norm=grad_norm,
                  max_grad_norm=max_grad_norm, stochastic_seed=stochastic_seed)
    lists = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
    check_adam_args(*lists, **kwargs, master_params=master_params, param_remainders=param_remainders,
                    device_type=device_type_required())
    if len(params) == 0:
        return
    device = params[0].device
    extra = master_params if master_params is not None else param_remainders
    policy = policy_of(master_params, param_remainders, stochastic_seed)
    if interpret() and device.type != "cpu":
        if extra is None:
            via_cpu(adam_step_triton, lists, (0, 2, 3, 4, 5), **kwargs)
        else:
            name = "master_params" if master_params is not None else "param_remainders"
            via_cpu(lambda *ls, **kw: adam_step_triton(*ls[:6], **kw, **{name: ls[6]}), lists + (extra,),
                    (0, 2, 3, 4, 5, 6), **kwargs)
        return
    dtype = params[0].dtype
    block, num_warps = LAUNCH[dtype]
    seed = stochastic_seed or 0
    with on_device(device):
        group_of = [k for k, size in enumerate(group_sizes) for _ in range(size)]
        work = Work((params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else None, extra),
                    (True, False, True, True, True, True),
                    ([s.data_ptr() for s in state_steps], group_of, range(len(params))))
        tensors = tensor_tables(_tensor_tables, device, work, block)
        hyper_values = tuple(x for k in range(len(group_sizes))
                             for x in (lr[k], beta1[k], beta2[k], eps[k], weight_decay[k],
                                       group_l1(l1_weight_decay, k)))
        hyper = float_table(_hyper_tables, device, hyper_values, lambda: _hyper_rows(hyper_values))

        meta = tensors.views["meta"]
        n = len(params)
        step_count_kernel[(triton.cdiv(n, _COUNT_BLOCK),)](
            meta, found_inf, n, COLS=_META_COLS, STEP_COL=7, HAS_FOUND_INF=found_inf is not None, BLOCK=_COUNT_BLOCK,
            num_warps=4)
        for grid, chunk_table, is_aligned, _ in tensors.chunk_launches():
            _adam_kernel[grid](
                meta, chunk_table, hyper.views["hyper"], lr_tensor, grad_scale, found_inf, grad_norm,
                float(max_grad_norm), seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, **tl_types(dtype),
                STATE=TL_DTYPE[exp_avgs[0].dtype], POLICY=policy, AMSGRAD=amsgrad, DECOUPLED=decoupled_weight_decay,
                MAXIMIZE=maximize, **step_flags(lr_tensor, grad_scale, found_inf, grad_norm), ALIGNED=is_aligned,
                BLOCK=block, num_warps=num_warps, enable_fp_fusion=False)  # note [exact fp32]
        work.finish()
