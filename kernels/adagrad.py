"""adagrad_step_ in Triton: a chunked multi-tensor launch, the design of csrc/cuda/adagrad_cuda.cu.

Host side: the checks of pyoptim._validation, then the tensor and chunk
tables of kernels/_multi_tensor.py (one row per tensor: the addresses of p, g
and sum, its numel, the address of its step, its param group); a small first
launch advances the steps. Device side: the per-element math of
csrc/include/pyoptim/adagrad.h and clip.h, reading every device input on the
device (note [no host sync]), rounded as torch rounds (note [exact fp32],
note [torch's fmas], note [bf16 rounding], all in kernels/_multi_tensor.py):
grad.add(param, alpha=weight_decay) and state_sum.addcmul_(g, g) are fused
multiply-adds, everything else rounds op by op as adagrad.h reads.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from pyoptim._validation import check_adagrad_args, group_l1

from ._multi_tensor import (LAUNCH, TL_DTYPE, TableCache, Work, add_l1, bf16_rne, device_type_required, exact_div,
                            exact_sqrt, float_table, fma, interpret, load_master, on_device, policy_key, policy_of,
                            program_chunk, step_count_kernel, step_flags, step_inputs, store_master, tensor_tables,
                            tl_types, via_cpu)

__all__ = ["adagrad_step_triton"]

_COUNT_BLOCK = 1024  # tensors per program of the step-count kernel
_META_COLS = 8  # columns of the tensor table: p, g, sum, extra, numel, step, group, index
_HYPER_COLS = 5  # columns of the hyperparameter table: lr, lr_decay, weight_decay, eps, l1


# -- device code ---------------------------------------------------------------


@triton.jit
def _adagrad_chunk(P, G, SUM, EXTRA, key, offs, numel, grad_mul, weight_decay, neg_clr, eps, l1, has_weight_decay,
                   has_l1, COMPUTE: tl.constexpr, MASKED: tl.constexpr, POLICY: tl.constexpr):
    # adagrad.h's adagrad_update over one chunk (masked: a tensor's last, partial chunk).
    if MASKED:
        mask = offs < numel
        zero = 0.0
        one = 1.0  # sum outside the tensor: keeps the discarded lanes free of 0/0
    else:
        mask = None
        zero = None
        one = None
    p = load_master(P, EXTRA, offs, mask, zero, COMPUTE, POLICY)
    g = tl.load(G + offs, mask=mask, other=zero).to(COMPUTE) * grad_mul
    s = tl.load(SUM + offs, mask=mask, other=one).to(COMPUTE)
    if has_l1:
        g = add_l1(g, p, l1)
    if has_weight_decay:
        g = fma(p, weight_decay, g)  # grad.add(param, alpha=weight_decay)
    s = fma(g, g, s)  # state_sum.addcmul_(grad, grad, value=1)
    p = p + exact_div(neg_clr * g, exact_sqrt(s) + eps)  # param.addcdiv_(grad, std, value=-clr)
    store_master(P, EXTRA, offs, mask, p, key, POLICY)
    if SUM.dtype.element_ty == tl.bfloat16:
        s = bf16_rne(s)
    tl.store(SUM + offs, s.to(SUM.dtype.element_ty), mask=mask)


@triton.jit
def _adagrad_kernel(
    META,  # [n_tensors, 8] int64: per tensor the addresses of p, g, sum, extra (masters or remainders, 0 without);
    #        numel; the address of its step; group; its index in the op's lists
    CHUNKS,  # [grid, 2] int64: per program its tensor's row in META and the chunk's index within that tensor
    HYPER,  # [groups, 5] float64: per group lr, lr_decay, weight_decay, eps, l1
    LR,  # [groups] float64: lr_tensor, read instead of HYPER's lr when HAS_LR_TENSOR
    GRAD_SCALE,  # [1] float32, read when HAS_GRAD_SCALE
    FOUND_INF,  # [1] float32, read when HAS_FOUND_INF
    GRAD_NORM,  # [1] float32: the norm of the grads as passed, read when HAS_GRAD_NORM
    max_grad_norm,  # float32: the norm to clip to, when HAS_GRAD_NORM
    seed_lo,  # int64: the low 32 bits of stochastic_seed (POLICY 3)
    seed_hi,  # int64: its high 32 bits
    DTYPE: tl.constexpr,  # storage type of p, g
    STATE: tl.constexpr,  # storage type of sum (note [state dtype])
    POLICY: tl.constexpr,  # precision.h's MasterWeights: 0 None, 1 fp32 masters, 2 remainders, 3 stochastic
    COMPUTE: tl.constexpr,  # math type: float32, or float64 for float64 storage
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
    SUM = tl.load(row + 2).to(tl.pointer_type(STATE))
    EXTRA = tl.load(row + 3).to(tl.pointer_type(tl.int8))  # null under POLICY 0 and 3: never read
    if ALIGNED:
        # In bytes: whole chunks then use 16-byte accesses.
        P = tl.multiple_of(P, 16)
        G = tl.multiple_of(G, 16)
        SUM = tl.multiple_of(SUM, 16)
    numel = tl.load(row + 4)
    STEP = tl.load(row + 5).to(tl.pointer_type(tl.float32))
    k = tl.load(row + 6)

    # adagrad.h's adagrad_scalars: computed in fp64, rounded once to COMPUTE.
    hyper = HYPER + 5 * k  # _HYPER_COLS
    lr, grad_mul = step_inputs(hyper, LR, k, GRAD_SCALE, GRAD_NORM, max_grad_norm, HAS_LR_TENSOR, HAS_GRAD_SCALE,
                               HAS_GRAD_NORM, MAXIMIZE)
    lr_decay = tl.load(hyper + 1)
    weight_decay = tl.load(hyper + 2)
    eps = tl.load(hyper + 3)
    l1 = tl.load(hyper + 4)
    step = tl.load(STEP).to(tl.float64)
    key = policy_key(seed_lo, seed_hi, step, row + 7, POLICY)
    clr = lr / (1.0 + (step - 1.0) * lr_decay)
    c_grad_mul = grad_mul.to(COMPUTE)
    c_weight_decay = weight_decay.to(COMPUTE)
    c_neg_clr = (-clr).to(COMPUTE)
    c_eps = eps.to(COMPUTE)
    c_l1 = l1.to(COMPUTE)
    has_weight_decay = weight_decay != 0.0
    has_l1 = l1 != 0.0

    start = chunk * BLOCK  # int64: tensors of 2^31 elements and more
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= numel:
        _adagrad_chunk(P, G, SUM, EXTRA, key, offs, numel, c_grad_mul, c_weight_decay, c_neg_clr, c_eps, c_l1,
                       has_weight_decay, has_l1, COMPUTE, False, POLICY)
    else:
        _adagrad_chunk(P, G, SUM, EXTRA, key, offs, numel, c_grad_mul, c_weight_decay, c_neg_clr, c_eps, c_l1,
                       has_weight_decay, has_l1, COMPUTE, True, POLICY)


# -- host code -----------------------------------------------------------------


_tensor_tables = TableCache()
_hyper_tables = TableCache()


def adagrad_step_triton(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    state_sums: Sequence[torch.Tensor],
    state_steps: Sequence[torch.Tensor],
    *,
    lr: Sequence[float],
    lr_decay: Sequence[float],
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
    """One Adagrad step over many tensors, in place (the contract of torch.ops.pyoptim.adagrad_step_)."""
    kwargs = dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, eps=eps, l1_weight_decay=l1_weight_decay,
                  group_sizes=group_sizes, maximize=maximize, lr_tensor=lr_tensor, grad_scale=grad_scale,
                  found_inf=found_inf, grad_norm=grad_norm, max_grad_norm=max_grad_norm,
                  stochastic_seed=stochastic_seed)
    lists = (params, grads, state_sums, state_steps)
    check_adagrad_args(*lists, **kwargs, master_params=master_params, param_remainders=param_remainders,
                       device_type=device_type_required())
    if len(params) == 0:
        return
    device = params[0].device
    extra = master_params if master_params is not None else param_remainders
    policy = policy_of(master_params, param_remainders, stochastic_seed)
    if interpret() and device.type != "cpu":
        if extra is None:
            via_cpu(adagrad_step_triton, lists, (0, 2, 3), **kwargs)
        else:
            name = "master_params" if master_params is not None else "param_remainders"
            via_cpu(lambda *ls, **kw: adagrad_step_triton(*ls[:4], **kw, **{name: ls[4]}), lists + (extra,),
                    (0, 2, 3, 4), **kwargs)
        return
    dtype = params[0].dtype
    block, num_warps = LAUNCH[dtype]
    seed = stochastic_seed or 0
    with on_device(device):
        group_of = [k for k, size in enumerate(group_sizes) for _ in range(size)]
        work = Work((params, grads, state_sums, extra), (True, False, True, True),
                    ([s.data_ptr() for s in state_steps], group_of, range(len(params))))
        tensors = tensor_tables(_tensor_tables, device, work, block)
        hyper_values = tuple(x for k in range(len(group_sizes))
                             for x in (lr[k], lr_decay[k], weight_decay[k], eps[k], group_l1(l1_weight_decay, k)))
        hyper = float_table(_hyper_tables, device, hyper_values, lambda: list(hyper_values))

        meta = tensors.views["meta"]
        n = len(params)
        step_count_kernel[(triton.cdiv(n, _COUNT_BLOCK),)](
            meta, found_inf, n, COLS=_META_COLS, STEP_COL=5, HAS_FOUND_INF=found_inf is not None, BLOCK=_COUNT_BLOCK,
            num_warps=4)
        for grid, chunk_table, is_aligned, _ in tensors.chunk_launches():
            _adagrad_kernel[grid](
                meta, chunk_table, hyper.views["hyper"], lr_tensor, grad_scale, found_inf, grad_norm,
                float(max_grad_norm), seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, **tl_types(dtype),
                STATE=TL_DTYPE[state_sums[0].dtype], POLICY=policy, MAXIMIZE=maximize,
                **step_flags(lr_tensor, grad_scale, found_inf, grad_norm), ALIGNED=is_aligned, BLOCK=block,
                num_warps=num_warps, enable_fp_fusion=False)  # note [exact fp32]
        work.finish()
