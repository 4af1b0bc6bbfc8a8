"""lion_step_ in Triton: a chunked multi-tensor launch, the design of csrc/cpu/lion_cpu.cpp and csrc/cuda/lion_cuda.cu.

Host side: the checks of pyoptim._validation, then the tensor and chunk
tables of kernels/_multi_tensor.py (one row per tensor: the addresses of p, g
and m, its numel, its param group). Device side: the per-element math of
csrc/include/pyoptim/lion.h and clip.h, op for op as lion.h reads (no fma:
the launch passes enable_fp_fusion=False), reading lr_tensor, grad_scale,
found_inf and grad_norm on the device (note [no host sync]).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from pyoptim._validation import check_lion_args, group_l1

from ._multi_tensor import (LAUNCH, TL_DTYPE, TableCache, Work, add_l1, bf16_rne, device_type_required, float_table,
                            interpret, load_master, on_device, policy_of, program_chunk, row_tail, sign,
                            step_count_kernel, step_flags, step_inputs, store_master, tensor_tables, tl_types, via_cpu)

__all__ = ["lion_step_triton"]

_META_COLS = 8  # columns of the tensor table: p, g, m, extra, numel, step, group, index
_COUNT_BLOCK = 1024  # tensors per program of the step-count kernel
_HYPER_COLS = 5  # columns of the hyperparameter table: lr, beta1, beta2, weight_decay, l1


# -- device code ---------------------------------------------------------------


@triton.jit
def _lion_chunk(P, G, M, EXTRA, key, offs, numel, grad_mul, decay, beta1, one_minus_beta1, beta2, one_minus_beta2,
                neg_lr, l1, has_weight_decay, has_l1, COMPUTE: tl.constexpr, MASKED: tl.constexpr,
                POLICY: tl.constexpr):
    # lion.h's lion_update over one chunk (masked: a tensor's last, partial chunk).
    if MASKED:
        mask = offs < numel
        zero = 0.0
    else:
        mask = None
        zero = None
    p = load_master(P, EXTRA, offs, mask, zero, COMPUTE, POLICY)
    g = tl.load(G + offs, mask=mask, other=zero).to(COMPUTE) * grad_mul
    m = tl.load(M + offs, mask=mask, other=zero).to(COMPUTE)
    if has_l1:
        g = add_l1(g, p, l1)
    if has_weight_decay:
        p = p * decay
    p = p + neg_lr * sign(m * beta1 + one_minus_beta1 * g)
    m = m * beta2 + one_minus_beta2 * g
    store_master(P, EXTRA, offs, mask, p, key, POLICY)
    if M.dtype.element_ty == tl.bfloat16:
        m = bf16_rne(m)
    tl.store(M + offs, m.to(M.dtype.element_ty), mask=mask)


@triton.jit
def _lion_kernel(
    META,  # [n_tensors, 8] int64: per tensor the addresses of p, g, m, extra (masters or remainders, 0 without);
    #        numel; the address of its step (0 without state_steps); group; its index in the op's lists
    CHUNKS,  # [grid, 2] int64: per program its tensor's row in META and the chunk's index within that tensor
    HYPER,  # [groups, 5] float64: per group lr, beta1, beta2, weight_decay, l1
    LR,  # [groups] float64: lr_tensor, read instead of HYPER's lr when HAS_LR_TENSOR
    GRAD_SCALE,  # [1] float32, read when HAS_GRAD_SCALE
    FOUND_INF,  # [1] float32, read when HAS_FOUND_INF
    GRAD_NORM,  # [1] float32: the norm of the grads as passed, read when HAS_GRAD_NORM
    max_grad_norm,  # float32: the norm to clip to, when HAS_GRAD_NORM
    seed_lo,  # int64: the low 32 bits of stochastic_seed (POLICY 3)
    seed_hi,  # int64: its high 32 bits
    DTYPE: tl.constexpr,  # storage type of p, g
    STATE: tl.constexpr,  # storage type of m (note [state dtype])
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
    M = tl.load(row + 2).to(tl.pointer_type(STATE))
    EXTRA = tl.load(row + 3).to(tl.pointer_type(tl.int8))  # null under POLICY 0 and 3: never read
    if ALIGNED:
        # In bytes: whole chunks then use 16-byte accesses.
        P = tl.multiple_of(P, 16)
        G = tl.multiple_of(G, 16)
        M = tl.multiple_of(M, 16)
    numel, k, key = row_tail(row, seed_lo, seed_hi, 4, POLICY)

    # lion.h's lion_scalars: computed in fp64, rounded once to COMPUTE.
    hyper = HYPER + 5 * k  # _HYPER_COLS
    lr, grad_mul = step_inputs(hyper, LR, k, GRAD_SCALE, GRAD_NORM, max_grad_norm, HAS_LR_TENSOR, HAS_GRAD_SCALE,
                               HAS_GRAD_NORM, MAXIMIZE)
    beta1 = tl.load(hyper + 1)
    beta2 = tl.load(hyper + 2)
    weight_decay = tl.load(hyper + 3)
    l1 = tl.load(hyper + 4)
    c_grad_mul = grad_mul.to(COMPUTE)
    c_decay = (1.0 - lr * weight_decay).to(COMPUTE)
    c_beta1 = beta1.to(COMPUTE)
    c_one_minus_beta1 = (1.0 - beta1).to(COMPUTE)
    c_beta2 = beta2.to(COMPUTE)
    c_one_minus_beta2 = (1.0 - beta2).to(COMPUTE)
    c_neg_lr = (-lr).to(COMPUTE)
    c_l1 = l1.to(COMPUTE)
    has_weight_decay = weight_decay != 0.0
    has_l1 = l1 != 0.0

    start = chunk * BLOCK  # int64: tensors of 2^31 elements and more
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= numel:
        _lion_chunk(P, G, M, EXTRA, key, offs, numel, c_grad_mul, c_decay, c_beta1, c_one_minus_beta1, c_beta2,
                    c_one_minus_beta2, c_neg_lr, c_l1, has_weight_decay, has_l1, COMPUTE, False, POLICY)
    else:
        _lion_chunk(P, G, M, EXTRA, key, offs, numel, c_grad_mul, c_decay, c_beta1, c_one_minus_beta1, c_beta2,
                    c_one_minus_beta2, c_neg_lr, c_l1, has_weight_decay, has_l1, COMPUTE, True, POLICY)


# -- host code -----------------------------------------------------------------


_tensor_tables = TableCache()
_hyper_tables = TableCache()


def lion_step_triton(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    *,
    lr: Sequence[float],
    beta1: Sequence[float],
    beta2: Sequence[float],
    weight_decay: Sequence[float],
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
    state_steps: Optional[Sequence[torch.Tensor]] = None,
) -> None:
    """One Lion step over many tensors, in place (the contract of torch.ops.pyoptim.lion_step_)."""
    kwargs = dict(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, l1_weight_decay=l1_weight_decay,
                  group_sizes=group_sizes, maximize=maximize, lr_tensor=lr_tensor, grad_scale=grad_scale,
                  found_inf=found_inf, grad_norm=grad_norm, max_grad_norm=max_grad_norm,
                  stochastic_seed=stochastic_seed)
    lists = (params, grads, exp_avgs)
    optional = {k: v for k, v in (("master_params", master_params), ("param_remainders", param_remainders),
                                  ("state_steps", state_steps)) if v is not None}
    check_lion_args(*lists, **kwargs, **optional, device_type=device_type_required())
    if len(params) == 0:
        return
    device = params[0].device
    if interpret() and device.type != "cpu":
        names = list(optional)
        via_cpu(lambda *ls, **kw: lion_step_triton(*ls[:3], **kw, **dict(zip(names, ls[3:]))),
                lists + tuple(optional.values()), (0, 2) + tuple(range(3, 3 + len(names))), **kwargs)
        return
    extra = master_params if master_params is not None else param_remainders
    policy = policy_of(master_params, param_remainders, stochastic_seed)
    dtype = params[0].dtype
    block, num_warps = LAUNCH[dtype]
    seed = stochastic_seed or 0
    n = len(params)
    with on_device(device):
        group_of = [k for k, size in enumerate(group_sizes) for _ in range(size)]
        steps = [s.data_ptr() for s in state_steps] if state_steps is not None else [0] * n
        work = Work((params, grads, exp_avgs, extra), (True, False, True, True), (steps, group_of, range(n)))
        tensors = tensor_tables(_tensor_tables, device, work, block)
        hyper_values = tuple(x for k in range(len(group_sizes))
                             for x in (lr[k], beta1[k], beta2[k], weight_decay[k], group_l1(l1_weight_decay, k)))
        hyper = float_table(_hyper_tables, device, hyper_values, lambda: list(hyper_values))
        meta = tensors.views["meta"]
        if state_steps is not None:
            step_count_kernel[(triton.cdiv(n, _COUNT_BLOCK),)](
                meta, found_inf, n, COLS=_META_COLS, STEP_COL=5, HAS_FOUND_INF=found_inf is not None,
                BLOCK=_COUNT_BLOCK, num_warps=4)
        for grid, chunk_table, is_aligned, _ in tensors.chunk_launches():
            _lion_kernel[grid](
                meta, chunk_table, hyper.views["hyper"], lr_tensor, grad_scale, found_inf,
                grad_norm, float(max_grad_norm), seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, **tl_types(dtype),
                STATE=TL_DTYPE[exp_avgs[0].dtype], POLICY=policy, MAXIMIZE=maximize,
                **step_flags(lr_tensor, grad_scale, found_inf, grad_norm), ALIGNED=is_aligned, BLOCK=block,
                num_warps=num_warps, enable_fp_fusion=False)  # lion.h's roundings, op by op
        work.finish()
