"""adam_step_ in Triton: a chunked multi-tensor launch, the design of csrc/cuda/adam_cuda.cu.

Host side (the launcher): the checks of pyoptim._validation, dense work
tensors made as csrc's prepare_work (multi_tensor_host.cpp) makes them, and
one int64 table holding every tensor's addresses, size and param group, plus
a chunk table mapping each program to (tensor, chunk). The kernel reads the
addresses and casts them to pointers (the trick of Triton's grouped-GEMM
tutorial), so one launch serves any number of tensors (two when some tensors
are not 16-byte aligned); a small first launch advances the steps. Device
side: the per-element math of csrc/include/pyoptim/adam.h and clip.h.

note [no host sync]: step, lr_tensor, grad_scale, found_inf and grad_norm are
read by the kernels, never by the host, so a call can be captured in a CUDA
graph. The tables are built on the host only when a call's tensors are new
(note [metadata cache]) and reach the GPU by a non-blocking copy from pinned
memory.

note [exact fp32]: torch's single-tensor Adam rounds after every op (but
note [torch's fmas]). Triton's `/` is div.full.f32 (2 ulp) and `tl.sqrt`
sqrt.approx.f32 on NVIDIA GPUs, so fp32 math uses div_rn and sqrt_rn, and
launches pass enable_fp_fusion=False so that no multiply-add is contracted
into an fma behind our back. fp64's `/` and sqrt already round correctly.

note [torch's fmas]: three of the ops torch's Adam runs are fused
multiply-adds in ATen, on CPUs (its vectorized code) and on GPUs (nvcc's
contraction): grad.add(param, alpha=wd), torch.lerp and addcmul_. Each is one
rounded fma here too (for fp32 math, computed in fp64, where the product is
exact: the same bits on a GPU and in the interpreter, but for a rare double
rounding). Everything else rounds op by op, as adam.h's formula reads. After
10 fp32 steps, 0.3% of the values differ from torch.optim.Adam(foreach=False)
on a CPU (its sqrt, Sleef's, is not always correctly rounded), against 30%
with lerp and addcmul unfused.

note [bf16 rounding]: the interpreter converts fp32 to bf16 by truncation
where GPUs round to nearest even, and an optimizer's updates are often below
half a bf16 ulp, so truncation drifts by an ulp a step. The kernel rounds to
bf16 in integer ops instead: the GPU's result, bit for bit, on both.

note [bias correction]: bc = 1 - beta^step is computed in fp64 from the step
the kernel reads, as exp(step * log(beta)) with log(beta) from the host: the
interpreter has no libdevice pow, and this form errs by about
|step * log(beta)| ulps of fp64 (1e-14 at most where beta^step is not
negligible), far below the fp32 rounding of the result.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from pyoptim._validation import check_adam_args

__all__ = ["adam_step_triton"]

# (elements per program, warps per program), by storage type. Measured on an
# H200 (Triton 3.6, fp32 4 x 16M and 2000 x 8192 params, bf16 and fp64 alike):
# 1024 / 4 warps (8 elements a thread, ~90 registers, several programs per SM)
# beat 2048 / 8 by 2-5% and 4096 / 8 (~220 registers, one program per SM) by
# 35-70%. A block is a multiple of 16 bytes' worth of elements, so every
# chunk of a 16-byte aligned tensor starts aligned.
_LAUNCH = {torch.float32: (1024, 4), torch.float16: (1024, 4), torch.bfloat16: (1024, 4), torch.float64: (1024, 4)}
_COUNT_BLOCK = 1024  # tensors per program of the step-count kernel
_META_COLS = 8  # columns of the tensor table, below
_HYPER_COLS = 8  # columns of the hyperparameter table, below

_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
             torch.float64: tl.float64}


# -- device code ---------------------------------------------------------------


# Helpers are few and called a few times per program: the interpreter
# re-patches triton.language at every call of a @triton.jit function.


@triton.jit
def _fma(a, b, c):
    # a * b + c, rounded once (note [torch's fmas]).
    if c.dtype == tl.float32:
        # In fp64, where the product of fp32 operands is exact: the same bits
        # on a GPU and in the interpreter, whose tl.fma rounds twice.
        return (a.to(tl.float64) * b.to(tl.float64) + c.to(tl.float64)).to(tl.float32)
    else:
        return tl.fma(a, b, c)


@triton.jit
def _adam_update(p, g, m, v, vm, grad_mul, decay, weight_decay, m_weight, m_weight_minus_one, beta2,
                 one_minus_beta2, neg_step_size, bc2_sqrt, eps, has_weight_decay, lerp_low, AMSGRAD: tl.constexpr,
                 DECOUPLED: tl.constexpr):
    # adam.h's adam_update, op for op as torch computes each op (note [torch's
    # fmas]); `vm` is read and returned only when AMSGRAD.
    g = g * grad_mul
    if has_weight_decay:
        if DECOUPLED:
            p = p * decay
        else:
            g = _fma(p, weight_decay, g)  # grad.add(param, alpha=weight_decay)
    # torch.lerp(m, g, m_weight), its side of 0.5 chosen once per group:
    #   m + m_weight * (g - m), or g - (g - m) * (1 - m_weight)
    if lerp_low:
        m = _fma(m_weight, g - m, m)
    else:
        m = _fma(m_weight_minus_one, g - m, g)
    v = _fma(one_minus_beta2 * g, g, v * beta2)  # v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
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
def _bf16_rne(x):
    # fp32 -> bf16 rounding to nearest even, in integer ops (note [bf16 rounding]).
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    quiet_nan = (bits | 0x400000) >> 16  # a NaN stays a NaN whatever its payload
    return tl.where(x != x, quiet_nan, rounded).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _adam_chunk(P, G, M, V, VM, offs, numel, grad_mul, decay, weight_decay, m_weight, m_weight_minus_one, beta2,
                one_minus_beta2, neg_step_size, bc2_sqrt, eps, has_weight_decay, lerp_low,
                COMPUTE: tl.constexpr, AMSGRAD: tl.constexpr, DECOUPLED: tl.constexpr, MASKED: tl.constexpr):
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
    p = tl.load(P + offs, mask=mask, other=zero).to(COMPUTE)
    g = tl.load(G + offs, mask=mask, other=zero).to(COMPUTE)
    m = tl.load(M + offs, mask=mask, other=zero).to(COMPUTE)
    v = tl.load(V + offs, mask=mask, other=one).to(COMPUTE)
    if AMSGRAD:
        vm = tl.load(VM + offs, mask=mask, other=one).to(COMPUTE)
    else:
        vm = v  # unused
    p, m, v, vm = _adam_update(p, g, m, v, vm, grad_mul, decay, weight_decay, m_weight, m_weight_minus_one, beta2,
                               one_minus_beta2, neg_step_size, bc2_sqrt, eps, has_weight_decay, lerp_low,
                               AMSGRAD, DECOUPLED)
    if P.dtype.element_ty == tl.bfloat16:
        p = _bf16_rne(p)
        m = _bf16_rne(m)
        v = _bf16_rne(v)
        if AMSGRAD:
            vm = _bf16_rne(vm)
    tl.store(P + offs, p.to(P.dtype.element_ty), mask=mask)
    tl.store(M + offs, m.to(P.dtype.element_ty), mask=mask)
    tl.store(V + offs, v.to(P.dtype.element_ty), mask=mask)
    if AMSGRAD:
        tl.store(VM + offs, vm.to(P.dtype.element_ty), mask=mask)


@triton.jit
def _adam_count_kernel(
    META,  # [n_tensors, 8] int64: the tensor table (column 5: the address of each tensor's float32 step)
    FOUND_INF,  # [1] float32, read when HAS_FOUND_INF
    n_tensors,  # rows of META
    HAS_FOUND_INF: tl.constexpr,
    BLOCK: tl.constexpr,  # tensors per program
):
    # step += 1 for every tensor, unless found_inf is nonzero. Runs before
    # _adam_kernel, which reads the advanced step (as adam_cuda.cu does).
    if HAS_FOUND_INF:
        n_tensors = tl.where(tl.load(FOUND_INF) == 0.0, n_tensors, 0)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_tensors
    STEP = tl.load(META + offs * 8 + 5, mask=mask, other=0).to(tl.pointer_type(tl.float32))
    step = tl.load(STEP, mask=mask)
    tl.store(STEP, step + 1.0, mask=mask)


@triton.jit
def _adam_kernel(
    META,  # [n_tensors, 8] int64: per tensor the addresses of p, g, m, v, vm (0 without amsgrad), step; numel; group
    CHUNKS,  # [grid, 2] int64: per program its tensor's row in META and the chunk's index within that tensor
    HYPER,  # [groups, 8] float64: per group lr, beta1, beta2, eps, weight_decay, log(beta1), log(beta2), 0
    LR,  # [groups] float64: lr_tensor, read instead of HYPER's lr when HAS_LR_TENSOR
    GRAD_SCALE,  # [1] float32, read when HAS_GRAD_SCALE
    FOUND_INF,  # [1] float32, read when HAS_FOUND_INF
    GRAD_NORM,  # [1] float32: the norm of the grads as passed, read when HAS_GRAD_NORM
    max_grad_norm,  # float32: the norm to clip to, when HAS_GRAD_NORM
    DTYPE: tl.constexpr,  # storage type of p, g, m, v, vm
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
    pid = tl.program_id(0).to(tl.int64)
    slot = tl.load(CHUNKS + 2 * pid)
    chunk = tl.load(CHUNKS + 2 * pid + 1)
    row = META + 8 * slot  # _META_COLS
    P = tl.load(row + 0).to(tl.pointer_type(DTYPE))
    G = tl.load(row + 1).to(tl.pointer_type(DTYPE))
    M = tl.load(row + 2).to(tl.pointer_type(DTYPE))
    V = tl.load(row + 3).to(tl.pointer_type(DTYPE))
    VM = tl.load(row + 4).to(tl.pointer_type(DTYPE))  # null without AMSGRAD: never read
    if ALIGNED:
        # In bytes: whole chunks then use 16-byte accesses.
        P = tl.multiple_of(P, 16)
        G = tl.multiple_of(G, 16)
        M = tl.multiple_of(M, 16)
        V = tl.multiple_of(V, 16)
        VM = tl.multiple_of(VM, 16)
    STEP = tl.load(row + 5).to(tl.pointer_type(tl.float32))
    numel = tl.load(row + 6)
    k = tl.load(row + 7)

    # adam.h's adam_scalars: computed in fp64, rounded once to COMPUTE.
    hyper = HYPER + 8 * k  # _HYPER_COLS
    if HAS_LR_TENSOR:
        lr = tl.load(LR + k)
    else:
        lr = tl.load(hyper + 0)
    beta1 = tl.load(hyper + 1)
    beta2 = tl.load(hyper + 2)
    eps = tl.load(hyper + 3)
    weight_decay = tl.load(hyper + 4)
    log_beta1 = tl.load(hyper + 5)
    log_beta2 = tl.load(hyper + 6)
    step = tl.load(STEP).to(tl.float64)
    # clip.h's grad_multiplier: GradScaler's inverse scale x the clip factor x maximize's sign.
    if HAS_GRAD_SCALE:
        # GradScaler's own inverse: 1 / scale in double, rounded to float.
        inv_scale = (1.0 / tl.load(GRAD_SCALE).to(tl.float64)).to(tl.float32)
    else:
        inv_scale = tl.full([], 1.0, tl.float32)
    grad_mul = inv_scale.to(tl.float64)
    if HAS_GRAD_NORM:
        # torch.nn.utils.clip_grad_norm_'s float32 coef = max_norm / (norm + 1e-6),
        # which torch evaluates as reciprocal(norm + 1e-6) * max_norm, of the
        # unscaled grads' norm; clamped to 1, NaN kept (as torch.clamp).
        coef = tl.math.div_rn(1.0, tl.load(GRAD_NORM) * inv_scale + 1e-6) * max_grad_norm
        coef = tl.where(coef < 1.0, coef, tl.where(coef != coef, coef, 1.0))
        grad_mul = grad_mul * coef.to(tl.float64)
    if MAXIMIZE:
        grad_mul = -grad_mul
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
    has_weight_decay = weight_decay != 0.0
    lerp_low = c_m_weight < 0.5  # torch.lerp decides on the rounded weight

    start = chunk * BLOCK  # int64: tensors of 2^31 elements and more
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= numel:
        _adam_chunk(P, G, M, V, VM, offs, numel, c_grad_mul, c_decay, c_weight_decay, c_m_weight, c_m_weight_minus_one,
                    c_beta2, c_one_minus_beta2, c_neg_step_size, c_bc2_sqrt, c_eps, has_weight_decay, lerp_low,
                    COMPUTE, AMSGRAD, DECOUPLED, False)
    else:
        _adam_chunk(P, G, M, V, VM, offs, numel, c_grad_mul, c_decay, c_weight_decay, c_m_weight, c_m_weight_minus_one,
                    c_beta2, c_one_minus_beta2, c_neg_step_size, c_bc2_sqrt, c_eps, has_weight_decay, lerp_low,
                    COMPUTE, AMSGRAD, DECOUPLED, True)


# -- host code -----------------------------------------------------------------


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _is_dense(t: torch.Tensor) -> bool:
    """True when t's elements fill their memory span once, in some dim order (ATen's is_non_overlapping_and_dense)."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


class _Work:
    """The call's tensor table rows, over dense work tensors that share each
    param's layout (as csrc's prepare_work): a caller's tensor of another
    layout is copied, and `finish()` copies the mutated ones back."""

    def __init__(self, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, group_sizes,
                 amsgrad: bool):
        self.writeback: list[tuple[torch.Tensor, torch.Tensor]] = []  # (caller's, work)
        self.copies: list[torch.Tensor] = []  # every work copy, alive until the kernels have read it
        self.rows: list[int] = []  # _META_COLS per tensor
        self.aligned: list[bool] = []  # per tensor: are all its addresses 16-byte aligned
        self.numels: list[int] = []
        group_of = [k for k, size in enumerate(group_sizes) for _ in range(size)]
        rows, aligned, numels = self.rows, self.aligned, self.numels
        for i, p in enumerate(params):
            g, m, v = grads[i], exp_avgs[i], exp_avg_sqs[i]
            vm = max_exp_avg_sqs[i] if amsgrad else None
            # All contiguous is the common case, with nothing to copy (a plain
            # loop: this runs for every tensor of every step).
            if not (p.is_contiguous() and g.is_contiguous() and m.is_contiguous() and v.is_contiguous()
                    and (vm is None or vm.is_contiguous())):
                p, g, m, v, vm = self._dense(p, g, m, v, vm)
            a_p, a_g, a_m, a_v = p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr()
            a_vm = vm.data_ptr() if amsgrad else 0
            numel = p.numel()
            rows += (a_p, a_g, a_m, a_v, a_vm, state_steps[i].data_ptr(), numel, group_of[i])
            aligned.append((a_p | a_g | a_m | a_v | a_vm) % 16 == 0)
            numels.append(numel)

    def _dense(self, p, g, m, v, vm):
        if _is_dense(p):
            layout_of = p  # the param's own layout: no copy of p
        else:
            layout_of = torch.empty_like(p, memory_format=torch.contiguous_format)
        contiguous = layout_of.is_contiguous()
        out = []
        for t, mutated in ((p, True), (g, False), (m, True), (v, True), (vm, True)):
            # Contiguous tensors of one shape order their elements alike,
            # whatever the strides of their size-1 dims.
            if t is None or (t.is_contiguous() if contiguous else (t.stride() == layout_of.stride() and _is_dense(t))):
                out.append(t)
                continue
            work = torch.empty_like(layout_of).copy_(t)
            self.copies.append(work)
            if mutated:
                self.writeback.append((t, work))
            out.append(work)
        return out

    def finish(self) -> None:
        for caller, work in self.writeback:
            caller.copy_(work)
        self.writeback.clear()
        self.copies.clear()  # freed in stream order, after the kernels


class _Tables:
    """The device tables of one call signature (note [metadata cache])."""

    def __init__(self, device: torch.device, data: torch.Tensor, pieces: list[tuple[str, int, int]],
                 launches: Optional[list[tuple[bool, int, int]]] = None):
        self.stream = None
        if device.type == "cuda":
            data = data.pin_memory()
            self.host = data  # the copy's source: a captured graph re-reads it at every replay
            data = data.to(device, non_blocking=True)
            self.stream = torch.cuda.current_stream(device)
        self.data = data
        self.views = {name: data[begin:end] for name, begin, end in pieces}
        self.launches = launches or []  # (aligned, first chunk, chunks) of each launch

    def use(self, device: torch.device) -> "_Tables":
        if self.stream is not None:
            stream = torch.cuda.current_stream(device)
            if stream != self.stream:
                # Used on another stream than it was made on: its memory must
                # not be reused before that stream is done with it.
                self.data.record_stream(stream)
            if torch.cuda.is_current_stream_capturing():
                # A captured graph reads these tables at every replay: never free them.
                _CAPTURED.append(self)
        return self


# note [metadata cache]: the tables depend only on the addresses, sizes and
# groups of a call's tensors (or on its hyperparameters), which an optimizer
# repeats every step; a cache hit builds and copies nothing.
_CACHE_SIZE = 8
_tensor_tables: collections.OrderedDict[tuple, _Tables] = collections.OrderedDict()
_hyper_tables: collections.OrderedDict[tuple, _Tables] = collections.OrderedDict()
_CAPTURED: list[_Tables] = []


def _cached(cache: collections.OrderedDict, key: tuple, make) -> _Tables:
    tables = cache.get(key)
    if tables is None:
        tables = cache[key] = make()
        if len(cache) > _CACHE_SIZE:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return tables


def _make_tensor_tables(device: torch.device, rows: list[int], aligned: list[bool], numels: list[int],
                        block: int) -> _Tables:
    # CHUNKS: (row in META, chunk index) for every chunk of every tensor, the
    # 16-byte aligned tensors' first (launched with ALIGNED), then the others.
    # Built on the CPU whatever torch's default device.
    n = len(numels)
    numel = torch.tensor(numels, dtype=torch.int64, device="cpu")
    chunks = (numel + block - 1) // block
    is_aligned = torch.tensor(aligned, dtype=torch.bool, device="cpu")
    parts, launches, offset = [], [], 0
    for flag in (True, False):
        slots = torch.nonzero((is_aligned == flag) & (chunks > 0)).flatten()
        counts = chunks[slots]
        total = int(counts.sum())
        if total == 0:
            continue
        first = torch.cumsum(counts, 0) - counts  # first chunk of each tensor, in this launch
        slot_of = torch.repeat_interleave(slots, counts)
        index = torch.arange(total, dtype=torch.int64, device="cpu") - torch.repeat_interleave(first, counts)
        parts.append(torch.stack([slot_of, index], dim=1).flatten())
        launches.append((flag, offset, total))
        offset += total
    meta = torch.tensor(rows, dtype=torch.int64, device="cpu")
    data = torch.cat([meta] + parts)
    pieces = [("meta", 0, n * _META_COLS)]
    pieces += [(f"chunks{i}", n * _META_COLS + 2 * off, n * _META_COLS + 2 * (off + total))
               for i, (_, off, total) in enumerate(launches)]
    return _Tables(device, data, pieces, launches)


def _make_hyper_table(device: torch.device, hyper: tuple) -> _Tables:
    rows = []
    for k in range(0, len(hyper), 5):
        lr, beta1, beta2, eps, weight_decay = hyper[k:k + 5]
        # log(beta) on the host, so the GPU and the interpreter start from the
        # same value; a beta of 0 becomes 1e-300, whose beta^step leaves bc at 1.
        rows += (lr, beta1, beta2, eps, weight_decay, math.log(max(beta1, 1e-300)), math.log(max(beta2, 1e-300)), 0.0)
    data = torch.tensor(rows, dtype=torch.float64, device="cpu")
    return _Tables(device, data, [("hyper", 0, len(rows))])


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
    group_sizes: Sequence[int],
    amsgrad: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
    lr_tensor: Optional[torch.Tensor] = None,
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
    grad_norm: Optional[torch.Tensor] = None,
    max_grad_norm: float = 0.0,
) -> None:
    """One Adam/AdamW step over many tensors, in place (the contract of torch.ops.pyoptim.adam_step_)."""
    interpret = _interpret()
    check_adam_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr=lr, beta1=beta1,
                    beta2=beta2, weight_decay=weight_decay, eps=eps, group_sizes=group_sizes, amsgrad=amsgrad,
                    lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf, grad_norm=grad_norm,
                    max_grad_norm=max_grad_norm, device_type=None if interpret else "cuda")
    if len(params) == 0:
        return
    device = params[0].device
    if interpret and device.type != "cpu":
        _via_cpu(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr=lr, beta1=beta1,
                 beta2=beta2, weight_decay=weight_decay, eps=eps, group_sizes=group_sizes, amsgrad=amsgrad,
                 maximize=maximize, decoupled_weight_decay=decoupled_weight_decay, lr_tensor=lr_tensor,
                 grad_scale=grad_scale, found_inf=found_inf, grad_norm=grad_norm, max_grad_norm=max_grad_norm)
        return
    dtype = params[0].dtype
    block, num_warps = _LAUNCH[dtype]
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with torch.no_grad(), guard:
        work = _Work(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, group_sizes, amsgrad)
        tensors = _cached(_tensor_tables, (device, block, tuple(work.rows)),
                          lambda: _make_tensor_tables(device, work.rows, work.aligned, work.numels, block)).use(device)
        hyper_values = tuple(x for k in range(len(group_sizes))
                             for x in (lr[k], beta1[k], beta2[k], eps[k], weight_decay[k]))
        hyper = _cached(_hyper_tables, (device, hyper_values),
                        lambda: _make_hyper_table(device, hyper_values)).use(device)

        meta = tensors.views["meta"]
        n = len(params)
        _adam_count_kernel[(triton.cdiv(n, _COUNT_BLOCK),)](
            meta, found_inf, n, HAS_FOUND_INF=found_inf is not None, BLOCK=_COUNT_BLOCK, num_warps=4)
        for i, (is_aligned, _, total) in enumerate(tensors.launches):
            _adam_kernel[(total,)](
                meta, tensors.views[f"chunks{i}"], hyper.views["hyper"], lr_tensor, grad_scale, found_inf, grad_norm,
                float(max_grad_norm),
                DTYPE=_TL_DTYPE[dtype], COMPUTE=tl.float64 if dtype == torch.float64 else tl.float32,
                AMSGRAD=amsgrad, DECOUPLED=decoupled_weight_decay, MAXIMIZE=maximize,
                HAS_LR_TENSOR=lr_tensor is not None, HAS_GRAD_SCALE=grad_scale is not None,
                HAS_FOUND_INF=found_inf is not None, HAS_GRAD_NORM=grad_norm is not None, ALIGNED=is_aligned,
                BLOCK=block, num_warps=num_warps, enable_fp_fusion=False)  # note [exact fp32]
        work.finish()


def _via_cpu(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, lr_tensor, grad_scale,
             found_inf, grad_norm, **kwargs) -> None:
    # The interpreter dereferences the tables' addresses on the host, so GPU
    # tensors run on CPU copies, which are then copied back (this syncs: the
    # interpreter is for testing numerics only).
    lists = [[t.cpu() for t in ts] for ts in (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)]
    cpu = [None if t is None else t.cpu() for t in (lr_tensor, grad_scale, found_inf, grad_norm)]
    adam_step_triton(*lists, lr_tensor=cpu[0], grad_scale=cpu[1], found_inf=cpu[2], grad_norm=cpu[3], **kwargs)
    with torch.no_grad():
        for callers, copies in zip((params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps),
                                   (lists[0], lists[2], lists[3], lists[4], lists[5])):
            for caller, copy in zip(callers, copies):
                caller.copy_(copy)
