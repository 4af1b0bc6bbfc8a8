"""adam_step_ in Triton: a chunked multi-tensor launch, the design of csrc/cuda/adam_cuda.cu.

Host side (the launcher): the checks of pyoptim._validation, dense work
tensors made as csrc/adam_host.cpp's prepare_adam_work makes them, and one
int64 table holding every tensor's addresses, size and param group, plus a
chunk table mapping each program to (tensor, chunk). The kernel reads the
addresses and casts them to pointers (the trick of Triton's grouped-GEMM
tutorial), so one launch serves any number of tensors; a small first launch
advances the steps. Device side: the per-element math of
csrc/include/pyoptim/adam.h, op for op.

note [no host sync]: step, lr_tensor, grad_scale and found_inf are read by the
kernels, never by the host, so a call can be captured in a CUDA graph. The
tables are built on the host only when a call's tensors are new (note
[metadata cache]) and reach the GPU by a non-blocking copy from pinned memory.

note [exact fp32]: torch's single-tensor Adam rounds after every op. Triton's
`/` is div.full.f32 (2 ulp) and `tl.sqrt` sqrt.approx.f32 on NVIDIA GPUs, so
fp32 math uses div_rn and sqrt_rn, and launches pass enable_fp_fusion=False so
that no multiply-add is contracted into an fma. fp64's `/` and sqrt already
round correctly.

note [bias correction]: bc = 1 - beta^step is computed in fp64 from the step
the kernel reads, as exp(step * log(beta)): the interpreter has no libdevice
pow, and this form errs by about |step * log(beta)| ulps of fp64 (1e-14 at
most where beta^step is not negligible), far below the fp32 rounding of the
result.
"""

from __future__ import annotations

import collections
import contextlib
import os
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from pyoptim._validation import check_adam_args

__all__ = ["adam_step_triton"]

# Elements per program, by storage type: 16 KiB of each of p, g, m, v per
# program for 4-byte types; 2048 fp64 elements keep the per-thread registers
# of eight warps within limits. Each is a multiple of 16 bytes' worth of
# elements, so every chunk of a 16-byte aligned tensor starts 16-byte aligned.
_BLOCK = {torch.float32: 4096, torch.float16: 4096, torch.bfloat16: 4096, torch.float64: 2048}
_NUM_WARPS = 8
_COUNT_BLOCK = 1024  # tensors per program of the step-count kernel
_META_COLS = 8  # columns of the tensor table, below
_HYPER_COLS = 5  # lr, beta1, beta2, eps, weight_decay

_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
             torch.float64: tl.float64}


# -- device code ---------------------------------------------------------------


@triton.jit
def _div(a, b):
    # note [exact fp32]
    if a.dtype == tl.float32:
        return tl.math.div_rn(a, b)
    else:
        return a / b


@triton.jit
def _sqrt(x):
    # note [exact fp32]
    if x.dtype == tl.float32:
        return tl.sqrt_rn(x)
    else:
        return tl.sqrt(x)


@triton.jit
def _pow(base, exponent):
    # base^exponent in fp64 for base in [0, 1) (note [bias correction]); the
    # clamp keeps log finite for base 0, where 1e-300^step is 0 to 1 - bc.
    return tl.exp(exponent * tl.log(tl.maximum(base, 1e-300)))


@triton.jit
def _adam_update(p, g, m, v, vm, grad_mul, decay, weight_decay, m_weight, m_weight_comp, beta2, one_minus_beta2,
                 neg_step_size, bc2_sqrt, eps, has_weight_decay, lerp_low, AMSGRAD: tl.constexpr,
                 DECOUPLED: tl.constexpr):
    # adam.h's adam_update, op for op; `vm` is read and returned only when AMSGRAD.
    g = g * grad_mul
    if has_weight_decay:
        if DECOUPLED:
            p = p * decay
        else:
            g = g + weight_decay * p
    # torch.lerp(m, g, m_weight), the side of 0.5 chosen once per group
    if lerp_low:
        m = m + m_weight * (g - m)
    else:
        m = g - (g - m) * m_weight_comp
    v = v * beta2 + one_minus_beta2 * g * g
    second = v
    if AMSGRAD:
        vm = tl.where((vm != vm) | (vm > v), vm, v)  # NaN-propagating, as torch.maximum
        second = vm
    denom = _div(_sqrt(second), bc2_sqrt) + eps
    p = p + _div(neg_step_size * m, denom)
    return p, m, v, vm


@triton.jit
def _adam_chunk(P, G, M, V, VM, offs, numel, grad_mul, decay, weight_decay, m_weight, m_weight_comp, beta2,
                one_minus_beta2, neg_step_size, bc2_sqrt, eps, has_weight_decay, lerp_low,
                COMPUTE: tl.constexpr, AMSGRAD: tl.constexpr, DECOUPLED: tl.constexpr, MASKED: tl.constexpr):
    # Load, update and store one chunk. Unmasked (a whole chunk) the loads can
    # be vectorized; masked (a tensor's last, partial chunk) they cannot,
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
    p, m, v, vm = _adam_update(p, g, m, v, vm, grad_mul, decay, weight_decay, m_weight, m_weight_comp, beta2,
                               one_minus_beta2, neg_step_size, bc2_sqrt, eps, has_weight_decay, lerp_low,
                               AMSGRAD, DECOUPLED)
    tl.store(P + offs, p.to(P.dtype.element_ty), mask=mask)
    tl.store(M + offs, m.to(P.dtype.element_ty), mask=mask)
    tl.store(V + offs, v.to(P.dtype.element_ty), mask=mask)
    if AMSGRAD:
        tl.store(VM + offs, vm.to(P.dtype.element_ty), mask=mask)


@triton.jit
def _as_ptr(address, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    ptr = address.to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)  # bytes: lets whole chunks use 16-byte accesses
    return ptr


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
    META,  # [n_tensors, 8] int64: per tensor the addresses of p, g, m, v, vm (0 without amsgrad) and step; numel; group
    CHUNKS,  # [grid, 2] int64: per program its tensor's row in META and the chunk's index within that tensor
    HYPER,  # [groups, 5] float64: per group lr, beta1, beta2, eps, weight_decay
    LR,  # [groups] float64: lr_tensor, read instead of HYPER's lr when HAS_LR_TENSOR
    GRAD_SCALE,  # [1] float32, read when HAS_GRAD_SCALE
    FOUND_INF,  # [1] float32, read when HAS_FOUND_INF
    DTYPE: tl.constexpr,  # storage type of p, g, m, v, vm
    COMPUTE: tl.constexpr,  # math type: float32, or float64 for float64 storage
    AMSGRAD: tl.constexpr,
    DECOUPLED: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_LR_TENSOR: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
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
    P = _as_ptr(tl.load(row + 0), DTYPE, ALIGNED)
    G = _as_ptr(tl.load(row + 1), DTYPE, ALIGNED)
    M = _as_ptr(tl.load(row + 2), DTYPE, ALIGNED)
    V = _as_ptr(tl.load(row + 3), DTYPE, ALIGNED)
    if AMSGRAD:
        VM = _as_ptr(tl.load(row + 4), DTYPE, ALIGNED)
    else:
        VM = P  # unused
    STEP = tl.load(row + 5).to(tl.pointer_type(tl.float32))
    numel = tl.load(row + 6)
    k = tl.load(row + 7)

    # adam.h's adam_scalars: computed in fp64, rounded once to COMPUTE.
    hyper = HYPER + 5 * k  # _HYPER_COLS
    if HAS_LR_TENSOR:
        lr = tl.load(LR + k)
    else:
        lr = tl.load(hyper + 0)
    beta1 = tl.load(hyper + 1)
    beta2 = tl.load(hyper + 2)
    eps = tl.load(hyper + 3)
    weight_decay = tl.load(hyper + 4)
    step = tl.load(STEP).to(tl.float64)
    if HAS_GRAD_SCALE:
        # GradScaler's own inverse: 1 / scale in double, rounded to float.
        grad_mul = (1.0 / tl.load(GRAD_SCALE).to(tl.float64)).to(tl.float32).to(tl.float64)
    else:
        grad_mul = tl.full([], 1.0, tl.float64)
    if MAXIMIZE:
        grad_mul = -grad_mul
    bc1 = 1.0 - _pow(beta1, step)
    bc2 = 1.0 - _pow(beta2, step)
    m_weight = 1.0 - beta1

    # adam.h's AdamScalars, rounded once to COMPUTE
    c_grad_mul = grad_mul.to(COMPUTE)
    c_decay = (1.0 - lr * weight_decay).to(COMPUTE)
    c_weight_decay = weight_decay.to(COMPUTE)
    c_m_weight = m_weight.to(COMPUTE)
    c_m_weight_comp = beta1.to(COMPUTE)
    c_beta2 = beta2.to(COMPUTE)
    c_one_minus_beta2 = (1.0 - beta2).to(COMPUTE)
    c_neg_step_size = (-(lr / bc1)).to(COMPUTE)
    c_bc2_sqrt = tl.sqrt(bc2).to(COMPUTE)
    c_eps = eps.to(COMPUTE)
    has_weight_decay = weight_decay != 0.0
    lerp_low = m_weight < 0.5

    start = chunk * BLOCK  # int64: tensors of 2^31 elements and more
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= numel:
        _adam_chunk(P, G, M, V, VM, offs, numel, c_grad_mul, c_decay, c_weight_decay, c_m_weight, c_m_weight_comp,
                    c_beta2, c_one_minus_beta2, c_neg_step_size, c_bc2_sqrt, c_eps, has_weight_decay, lerp_low,
                    COMPUTE, AMSGRAD, DECOUPLED, False)
    else:
        _adam_chunk(P, G, M, V, VM, offs, numel, c_grad_mul, c_decay, c_weight_decay, c_m_weight, c_m_weight_comp,
                    c_beta2, c_one_minus_beta2, c_neg_step_size, c_bc2_sqrt, c_eps, has_weight_decay, lerp_low,
                    COMPUTE, AMSGRAD, DECOUPLED, True)


# -- host code -----------------------------------------------------------------


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _is_dense(t: torch.Tensor) -> bool:
    """True when t's elements fill its memory span exactly once, in some dim order (ATen's is_non_overlapping_and_dense)."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


class _Work:
    """Dense work tensors sharing each param's layout, as csrc/adam_host.cpp's AdamWork."""

    def __init__(self, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, amsgrad: bool):
        self.writeback: list[tuple[torch.Tensor, torch.Tensor]] = []  # (caller's, work)
        n = len(params)
        self.p, self.g, self.m, self.v = [None] * n, [None] * n, [None] * n, [None] * n
        self.vm = [None] * n if amsgrad else None
        for i, p in enumerate(params):
            if p.is_contiguous():
                layout_of, contiguous = p, True
            elif _is_dense(p):
                layout_of, contiguous = p, False  # the param's own layout: no copy in the common case
            else:
                layout_of, contiguous = torch.empty_like(p, memory_format=torch.contiguous_format), True
            self.p[i] = self._mutated(p, layout_of, contiguous)
            self.g[i] = self._in_layout(grads[i], layout_of, contiguous)
            self.m[i] = self._mutated(exp_avgs[i], layout_of, contiguous)
            self.v[i] = self._mutated(exp_avg_sqs[i], layout_of, contiguous)
            if amsgrad:
                self.vm[i] = self._mutated(max_exp_avg_sqs[i], layout_of, contiguous)

    @staticmethod
    def _in_layout(t: torch.Tensor, layout_of: torch.Tensor, contiguous: bool) -> torch.Tensor:
        # Contiguous tensors of one shape order their elements alike, whatever
        # the strides of their size-1 dims.
        if (t.is_contiguous() if contiguous else (t.stride() == layout_of.stride() and _is_dense(t))):
            return t
        return torch.empty_like(layout_of).copy_(t)

    def _mutated(self, t: torch.Tensor, layout_of: torch.Tensor, contiguous: bool) -> torch.Tensor:
        work = self._in_layout(t, layout_of, contiguous)
        if work is not t:
            self.writeback.append((t, work))
        return work

    def finish(self) -> None:
        for caller, work in self.writeback:
            caller.copy_(work)
        self.writeback.clear()


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
    n = len(numels)
    numel = torch.tensor(numels, dtype=torch.int64)
    chunks = (numel + block - 1) // block
    is_aligned = torch.tensor(aligned, dtype=torch.bool)
    parts, launches, offset = [], [], 0
    for flag in (True, False):
        slots = torch.nonzero((is_aligned == flag) & (chunks > 0)).flatten()
        counts = chunks[slots]
        total = int(counts.sum())
        if total == 0:
            continue
        first = torch.cumsum(counts, 0) - counts  # first chunk of each tensor, in this launch
        slot_of = torch.repeat_interleave(slots, counts)
        index = torch.arange(total, dtype=torch.int64) - torch.repeat_interleave(first, counts)
        parts.append(torch.stack([slot_of, index], dim=1).flatten())
        launches.append((flag, offset, total))
        offset += total
    meta = torch.tensor(rows, dtype=torch.int64)
    data = torch.cat([meta] + parts)
    pieces = [("meta", 0, n * _META_COLS)]
    pieces += [(f"chunks{i}", n * _META_COLS + 2 * off, n * _META_COLS + 2 * (off + total))
               for i, (_, off, total) in enumerate(launches)]
    return _Tables(device, data, pieces, launches)


def _make_hyper_table(device: torch.device, hyper: tuple) -> _Tables:
    data = torch.tensor(hyper, dtype=torch.float64)
    return _Tables(device, data, [("hyper", 0, len(hyper))])


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
) -> None:
    """One Adam/AdamW step over many tensors, in place (the contract of torch.ops.pyoptim.adam_step_)."""
    interpret = _interpret()
    check_adam_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr=lr, beta1=beta1,
                    beta2=beta2, weight_decay=weight_decay, eps=eps, group_sizes=group_sizes, amsgrad=amsgrad,
                    lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
                    device_type=None if interpret else "cuda")
    if len(params) == 0:
        return
    device = params[0].device
    if interpret and device.type != "cpu":
        _via_cpu(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr=lr, beta1=beta1,
                 beta2=beta2, weight_decay=weight_decay, eps=eps, group_sizes=group_sizes, amsgrad=amsgrad,
                 maximize=maximize, decoupled_weight_decay=decoupled_weight_decay, lr_tensor=lr_tensor,
                 grad_scale=grad_scale, found_inf=found_inf)
        return
    dtype = params[0].dtype
    block = _BLOCK[dtype]
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with torch.no_grad(), guard:
        work = _Work(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, amsgrad)
        rows, aligned, numels = [], [], []
        group = 0
        for k, size in enumerate(group_sizes):
            for i in range(group, group + size):
                addresses = [work.p[i].data_ptr(), work.g[i].data_ptr(), work.m[i].data_ptr(), work.v[i].data_ptr(),
                             work.vm[i].data_ptr() if amsgrad else 0]
                numel = work.p[i].numel()
                rows += addresses
                rows += (state_steps[i].data_ptr(), numel, k)
                aligned.append(all(a % 16 == 0 for a in addresses))
                numels.append(numel)
            group += size
        tensors = _cached(_tensor_tables, (device, block, tuple(rows)),
                          lambda: _make_tensor_tables(device, rows, aligned, numels, block)).use(device)
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
                meta, tensors.views[f"chunks{i}"], hyper.views["hyper"], lr_tensor, grad_scale, found_inf,
                DTYPE=_TL_DTYPE[dtype], COMPUTE=tl.float64 if dtype == torch.float64 else tl.float32,
                AMSGRAD=amsgrad, DECOUPLED=decoupled_weight_decay, MAXIMIZE=maximize,
                HAS_LR_TENSOR=lr_tensor is not None, HAS_GRAD_SCALE=grad_scale is not None,
                HAS_FOUND_INF=found_inf is not None, ALIGNED=is_aligned, BLOCK=block,
                num_warps=_NUM_WARPS, enable_fp_fusion=False)  # note [exact fp32]
        work.finish()


def _via_cpu(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, lr_tensor, grad_scale,
             found_inf, **kwargs) -> None:
    # The interpreter dereferences the tables' addresses on the host, so GPU
    # tensors run on CPU copies, which are then copied back (this syncs: the
    # interpreter is for testing numerics only).
    lists = [[t.cpu() for t in ts] for ts in (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)]
    cpu = [None if t is None else t.cpu() for t in (lr_tensor, grad_scale, found_inf)]
    adam_step_triton(*lists, lr_tensor=cpu[0], grad_scale=cpu[1], found_inf=cpu[2], **kwargs)
    with torch.no_grad():
        for callers, copies in zip((params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps),
                                   (lists[0], lists[2], lists[3], lists[4], lists[5])):
            for caller, copy in zip(callers, copies):
                caller.copy_(copy)
