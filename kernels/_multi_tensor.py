"""What the Triton multi-tensor kernels share: tensor and chunk tables, their cache, work tensors, device helpers.

Host side: the design of csrc's multi-tensor launch (multi_tensor_host.cpp).
`Work` makes dense work tensors as csrc's prepare_work makes them, and one
int64 row per tensor holding its addresses, size and whatever else the op
needs; `make_tensor_tables` adds a chunk table mapping each program to
(tensor, chunk). A kernel reads the addresses and casts them to pointers (the
trick of Triton's grouped-GEMM tutorial), so one launch serves any number of
tensors (two when some tensors are not 16-byte aligned).

Device side: helpers each kernel calls a few times per program (the
interpreter re-patches triton.language at every call of a @triton.jit
function, about 0.25 ms, so they stay few): the rounding of note [torch's
fmas] and note [bf16 rounding], a program's table row, and the step inputs
read on the device (clip.h's grad multiplier).

note [no host sync]: every tensor input a step reads per call (step,
lr_tensor, grad_scale, found_inf, grad_norm, a clip's total norm) is read by
the kernels, never by the host, so a call can be captured in a CUDA graph.
The tables are built on the host only when a call's tensors are new (note
[metadata cache]) and reach the GPU by a non-blocking copy from pinned memory.

note [exact fp32]: torch rounds after every op (but note [torch's fmas]).
Triton's `/` is div.full.f32 (2 ulp) and `tl.sqrt` sqrt.approx.f32 on NVIDIA
GPUs, so fp32 math uses div_rn and sqrt_rn, and launches pass
enable_fp_fusion=False so that no multiply-add is contracted into an fma
behind our back. fp64's `/` and sqrt already round correctly.

note [torch's fmas]: ATen computes `a.add(b, alpha=c)`, torch.lerp and
addcmul_ as fused multiply-adds, on CPUs (its vectorized code) and on GPUs
(nvcc's contraction). Each is one rounded fma here too (`fma`): for fp32 math
computed in fp64, where the product is exact, so that a GPU and the
interpreter (whose tl.fma rounds twice) give the same bits, but for a rare
double rounding.

note [bf16 rounding]: the interpreter converts fp32 to bf16 by truncation
where GPUs round to nearest even, and an optimizer's updates are often below
half a bf16 ulp, so truncation drifts by an ulp a step. Kernels round to bf16
in integer ops instead (`bf16_rne`): the GPU's result, bit for bit, on both.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
from typing import Callable, Optional, Sequence

import torch
import triton
import triton.language as tl

# (elements per program, warps per program) of the elementwise kernels, by
# storage type. Measured for Adam on an H200 (Triton 3.6, fp32 4 x 16M and
# 2000 x 8192 params, bf16 and fp64 alike): 1024 / 4 warps (8 elements a
# thread, ~90 registers, several programs per SM) beat 2048 / 8 by 2-5% and
# 4096 / 8 (~220 registers, one program per SM) by 35-70%. SGD and the clip
# scale, which stream fewer tensors alike, use it unmeasured. A block is a
# multiple of 16 bytes' worth of elements, so every chunk of a 16-byte aligned
# tensor starts aligned.
LAUNCH = {torch.float32: (1024, 4), torch.float16: (1024, 4), torch.bfloat16: (1024, 4), torch.float64: (1024, 4)}

TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
            torch.float64: tl.float64}


def tl_types(dtype: torch.dtype) -> dict[str, tl.dtype]:
    """The DTYPE (storage) and COMPUTE (math: float32, or float64 for float64) constexprs of a kernel."""
    return dict(DTYPE=TL_DTYPE[dtype], COMPUTE=tl.float64 if dtype == torch.float64 else tl.float32)


def step_flags(lr_tensor, grad_scale, found_inf, grad_norm) -> dict[str, bool]:
    """The HAS_* constexprs of a step kernel: which optional device inputs it reads."""
    return dict(HAS_LR_TENSOR=lr_tensor is not None, HAS_GRAD_SCALE=grad_scale is not None,
                HAS_FOUND_INF=found_inf is not None, HAS_GRAD_NORM=grad_norm is not None)


# -- device code ---------------------------------------------------------------


@triton.jit
def fma(a, b, c):
    # a * b + c, rounded once (note [torch's fmas]).
    if c.dtype == tl.float32:
        # In fp64, where the product of fp32 operands is exact: the same bits
        # on a GPU and in the interpreter, whose tl.fma rounds twice.
        return (a.to(tl.float64) * b.to(tl.float64) + c.to(tl.float64)).to(tl.float32)
    else:
        return tl.fma(a, b, c)


@triton.jit
def exact_div(a, b):
    # note [exact fp32]: a correctly rounded fp32 division (a / b is approximate on GPUs)
    if a.dtype == tl.float32:
        return tl.math.div_rn(a, b)
    else:
        return a / b


@triton.jit
def exact_sqrt(x):
    # note [exact fp32]: a correctly rounded fp32 square root
    if x.dtype == tl.float32:
        return tl.sqrt_rn(x)
    else:
        return tl.sqrt(x)


@triton.jit
def sign(x):
    # torch.sign: -1, 0 or 1, NaN kept (math.h's MathOps::sign).
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, x)).to(x.dtype)


@triton.jit
def add_l1(g, p, l1):
    # math.h's add_l1: g + l1 * sign(p), the gradient of l1 * |p| (sign(0) = 0).
    return g + l1 * sign(p)


@triton.jit
def bf16_rne(x):
    # fp32 -> bf16 rounding to nearest even, in integer ops (note [bf16 rounding]).
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    quiet_nan = (bits | 0x400000) >> 16  # a NaN stays a NaN whatever its payload
    return tl.where(x != x, quiet_nan, rounded).to(tl.uint16).to(tl.bfloat16, bitcast=True)


# -- the precision policy: csrc/include/pyoptim/precision.h, bit for bit ---------------------------------------
# POLICY constexprs: 0 None, 1 fp32 masters, 2 remainders, 3 stochastic (precision.h's MasterWeights). The
# hash runs in int64 holding uint32 values (products wrap; their low 32 bits are uint32's), the same on a
# GPU and in the interpreter.


def policy_of(master_params, param_remainders, stochastic_seed) -> int:
    """The POLICY constexpr of a step's precision arguments (at most one is given: the op's checks say so)."""
    if master_params is not None:
        return 1
    if param_remainders is not None:
        return 2
    return 3 if stochastic_seed is not None else 0


@triton.jit
def mix32(x):
    # precision.h's mix32 (lowbias32) on int64 values in [0, 2^32)
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


@triton.jit
def stochastic_key(seed_lo, seed_hi, step, tensor):
    # precision.h's stochastic_key (note [stochastic key]): seed_lo / seed_hi its 32-bit halves, step the
    # advanced step (float), tensor the index in the op's lists.
    k = mix32((tensor.to(tl.int64) + 0x9E3779B9) & 0xFFFFFFFF)
    k = mix32(k ^ (step.to(tl.int64) & 0xFFFFFFFF))
    k = mix32(k ^ seed_hi)
    return mix32(k ^ seed_lo)


@triton.jit
def policy_key(seed_lo, seed_hi, step, TENSOR, POLICY: tl.constexpr):
    # The stochastic key of the tensor whose index in the op's lists TENSOR points at, at step `step` (float64),
    # under POLICY 3 (stochastic rounding); 0 under the other policies, which never read it.
    key = 0
    if POLICY == 3:
        key = stochastic_key(seed_lo, seed_hi, step, tl.load(TENSOR))
    return key


@triton.jit
def row_tail(row, seed_lo, seed_hi, COL: tl.constexpr, POLICY: tl.constexpr):
    # The four columns of a step row from COL, for the ops that keep a step counter per tensor (SGD, Lion,
    # RMSprop): numel, the counter's address, the group and the tensor's index in the op's lists. Returns
    # (numel, group, policy_key's key; under POLICY 3 only is the counter read).
    numel = tl.load(row + COL)
    k = tl.load(row + COL + 2)
    step = 0.0
    if POLICY == 3:
        step = tl.load(tl.load(row + COL + 1).to(tl.pointer_type(tl.float32))).to(tl.float64)
    return numel, k, policy_key(seed_lo, seed_hi, step, row + COL + 3, POLICY)


@triton.jit
def load_master(P, EXTRA, offs, mask, other, COMPUTE: tl.constexpr, POLICY: tl.constexpr):
    # precision.h's load_master: the param's value in COMPUTE, from EXTRA (fp32 masters, int16 remainders);
    # `other` as tl.load's (None when unmasked).
    if POLICY == 1:
        return tl.load(EXTRA.to(tl.pointer_type(tl.float32)) + offs, mask=mask, other=other)
    elif POLICY == 2:
        hi = tl.load(P + offs, mask=mask, other=other).to(tl.uint16, bitcast=True).to(tl.int64)
        rem = tl.load(EXTRA.to(tl.pointer_type(tl.int16)) + offs, mask=mask, other=other).to(tl.int64)
        hi = (hi - tl.where(rem < 0, 1, 0)) & 0xFFFF  # note [remainder split]
        return ((hi << 16) | (rem & 0xFFFF)).to(tl.uint32).to(tl.float32, bitcast=True)
    else:
        return tl.load(P + offs, mask=mask, other=other).to(COMPUTE)


@triton.jit
def store_master(P, EXTRA, offs, mask, x, key, POLICY: tl.constexpr):
    # precision.h's store_master: x (the update's result) written back as POLICY says.
    if POLICY == 2:
        u = x.to(tl.uint32, bitcast=True).to(tl.int64)
        low = u & 0xFFFF
        hi = ((u >> 16) + tl.where(low >= 0x8000, 1, 0)) & 0xFFFF
        tl.store(P + offs, hi.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
        tl.store(EXTRA.to(tl.pointer_type(tl.int16)) + offs, low.to(tl.uint16).to(tl.int16, bitcast=True),
                 mask=mask)
    elif POLICY == 3:
        u = x.to(tl.uint32, bitcast=True).to(tl.int64)
        random = mix32(key ^ (offs & 0xFFFFFFFF)) & 0xFFFF
        special = (u & 0x7F800000) == 0x7F800000
        nan = (u & 0x7FFFFFFF) > 0x7F800000
        bits = tl.where(special, tl.where(nan, u | 0x400000, u), u + random) >> 16
        tl.store(P + offs, (bits & 0xFFFF).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        if POLICY == 1:
            tl.store(EXTRA.to(tl.pointer_type(tl.float32)) + offs, x, mask=mask)
        if P.dtype.element_ty == tl.bfloat16:
            x = bf16_rne(x)
        tl.store(P + offs, x.to(P.dtype.element_ty), mask=mask)


@triton.jit
def clip_coef(total_norm, max_norm):
    # clip.h's clip_coef, min(max_norm / (norm + 1e-6), 1) in float32, NaN
    # kept (as torch.clamp), but with the division as torch.nn.utils.
    # clip_grad_norm_ and pyoptim.reference evaluate it (Tensor.__rtruediv__):
    # reciprocal(norm + 1e-6) * max_norm, which can sit an ulp from clip.h's
    # max_norm / (norm + 1e-6).
    coef = tl.math.div_rn(1.0, total_norm + 1e-6) * max_norm
    return tl.where(coef < 1.0, coef, tl.where(coef != coef, coef, 1.0))


@triton.jit
def program_chunk(META, CHUNKS, COLS: tl.constexpr):
    # This program's row of the tensor table (META, COLS int64 a row) and the
    # index of its chunk within that tensor, from the chunk table.
    pid = tl.program_id(0).to(tl.int64)
    return META + COLS * tl.load(CHUNKS + 2 * pid), tl.load(CHUNKS + 2 * pid + 1)


@triton.jit
def step_inputs(HYPER_ROW, LR, k, GRAD_SCALE, GRAD_NORM, max_grad_norm, HAS_LR_TENSOR: tl.constexpr,
                HAS_GRAD_SCALE: tl.constexpr, HAS_GRAD_NORM: tl.constexpr, MAXIMIZE: tl.constexpr):
    # (lr, grad_mul) of param group k, in fp64, read on the device: lr from
    # LR (lr_tensor) or else the group's hyperparameter row (column 0), and
    # clip.h's grad_multiplier: GradScaler's inverse scale x the clip factor of
    # the unscaled grads' norm (GRAD_NORM is the norm of the grads as passed)
    # x maximize's sign.
    if HAS_LR_TENSOR:
        lr = tl.load(LR + k)
    else:
        lr = tl.load(HYPER_ROW)
    if HAS_GRAD_SCALE:
        # GradScaler's own inverse: 1 / scale in double, rounded to float.
        inv_scale = (1.0 / tl.load(GRAD_SCALE).to(tl.float64)).to(tl.float32)
    else:
        inv_scale = tl.full([], 1.0, tl.float32)
    mul = inv_scale.to(tl.float64)
    if HAS_GRAD_NORM:
        mul = mul * clip_coef(tl.load(GRAD_NORM) * inv_scale, max_grad_norm).to(tl.float64)
    if MAXIMIZE:
        mul = -mul
    return lr, mul


@triton.jit
def step_count_kernel(
    META,  # [n_tensors, COLS] int64: a tensor table (column STEP_COL: the address of each tensor's float32 step)
    FOUND_INF,  # [1] float32, read when HAS_FOUND_INF
    n_tensors,  # rows of META
    COLS: tl.constexpr,
    STEP_COL: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    BLOCK: tl.constexpr,  # tensors per program
):
    # step += 1 for every tensor, unless found_inf is nonzero. Runs before a
    # step's update kernel, which reads the advanced step (as csrc's
    # step_count_kernel does).
    if HAS_FOUND_INF:
        n_tensors = tl.where(tl.load(FOUND_INF) == 0.0, n_tensors, 0)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_tensors
    STEP = tl.load(META + offs * COLS + STEP_COL, mask=mask, other=0).to(tl.pointer_type(tl.float32))
    step = tl.load(STEP, mask=mask)
    tl.store(STEP, step + 1.0, mask=mask)


# -- host code -----------------------------------------------------------------


def interpret() -> bool:
    """True under TRITON_INTERPRET=1, where kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def device_type_required() -> Optional[str]:
    """The device type the validation checks demand: CUDA, or any under the interpreter."""
    return None if interpret() else "cuda"


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """No autograd, and `device` current when it is a GPU."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.no_grad())
    if device.type == "cuda":
        stack.enter_context(torch.cuda.device(device))
    return stack


def is_dense(t: torch.Tensor) -> bool:
    """True when t's elements fill their memory span once, in some dim order (ATen's is_non_overlapping_and_dense)."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


class Work:
    """A call's tensor-table rows, over dense work tensors that share each
    first-column tensor's layout (as csrc's prepare_work): a caller's tensor of
    another layout is copied, and `finish()` copies the mutated ones back.

    `columns` holds one list per column, one tensor per row (None for a column
    the call lacks: its address is 0); `mutated` says which columns the kernel
    writes. Row i is the addresses of the i-th tensors, then their numel, then
    `extra[c][i]` for each extra column c.
    """

    def __init__(self, columns: Sequence[Optional[Sequence[torch.Tensor]]], mutated: Sequence[bool],
                 extra: Sequence[Sequence[int]] = ()):
        self.writeback: list[tuple[torch.Tensor, torch.Tensor]] = []  # (caller's, work)
        self.copies: list[torch.Tensor] = []  # every work copy, alive until the kernels have read it
        self.rows: list[int] = []
        self.aligned: list[bool] = []  # per tensor: are all its addresses 16-byte aligned
        self.numels: list[int] = []
        self.cols = len(columns) + 1 + len(extra)
        n = len(columns[0])
        rows, aligned, numels = self.rows, self.aligned, self.numels
        per_row = zip(*(c if c is not None else itertools.repeat(None, n) for c in columns))
        for ts, more in zip(per_row, zip(*extra) if extra else itertools.repeat((), n)):
            # All contiguous is the common case, with nothing to copy (a plain
            # loop: this runs for every tensor of every step).
            for t in ts:
                if t is not None and not t.is_contiguous():
                    ts = self._dense(ts, mutated)
                    break
            bits = 0
            for t in ts:
                address = 0 if t is None else t.data_ptr()
                rows.append(address)
                bits |= address
            numel = ts[0].numel()
            rows.append(numel)
            rows += more
            aligned.append(bits % 16 == 0)
            numels.append(numel)

    def _dense(self, ts, mutated):
        p = ts[0]
        if is_dense(p):
            layout_of = p  # the first column's own layout: no copy of it
        else:
            layout_of = torch.empty_like(p, memory_format=torch.contiguous_format)
        contiguous = layout_of.is_contiguous()
        out = []
        for t, writes in zip(ts, mutated):
            # Contiguous tensors of one shape order their elements alike,
            # whatever the strides of their size-1 dims.
            if t is None or (t.is_contiguous() if contiguous else (t.stride() == layout_of.stride() and is_dense(t))):
                out.append(t)
                continue
            work = torch.empty_like(layout_of, dtype=t.dtype).copy_(t)
            self.copies.append(work)
            if writes:
                self.writeback.append((t, work))
            out.append(work)
        return out

    def finish(self) -> None:
        for caller, work in self.writeback:
            caller.copy_(work)
        self.writeback.clear()
        self.copies.clear()  # freed in stream order, after the kernels


# Tables used while a CUDA graph was captured: a graph reads them at every replay, so they are never freed.
_CAPTURED: list["Tables"] = []


class Tables:
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

    def chunk_launches(self) -> list[tuple[tuple[int], torch.Tensor, bool, int]]:
        """Per launch: its grid, its chunk table, whether all its tensors are 16-byte aligned, its first chunk."""
        return [((total,), self.views[f"chunks{i}"], aligned, first)
                for i, (aligned, first, total) in enumerate(self.launches)]

    def use(self, device: torch.device) -> "Tables":
        if self.stream is not None:
            stream = torch.cuda.current_stream(device)
            if stream != self.stream:
                # Used on another stream than it was made on: its memory must
                # not be reused before that stream is done with it.
                self.data.record_stream(stream)
            if torch.cuda.is_current_stream_capturing():
                _CAPTURED.append(self)
        return self


class TableCache:
    """The last few Tables made, by key (note [metadata cache]).

    note [metadata cache]: the tables depend only on the addresses, sizes and
    groups of a call's tensors (or on its hyperparameters), which an optimizer
    repeats every step; a cache hit builds and copies nothing.
    """

    def __init__(self, size: int = 8):
        self.size = size
        self.entries: collections.OrderedDict[tuple, Tables] = collections.OrderedDict()

    def get(self, device: torch.device, key: tuple, make: Callable[[], Tables]) -> Tables:
        """The tables of `key` on `device`, made by `make()` when not cached, ready for the current stream."""
        key = (device,) + key
        tables = self.entries.get(key)
        if tables is None:
            tables = self.entries[key] = make()
            if len(self.entries) > self.size:
                self.entries.popitem(last=False)
        else:
            self.entries.move_to_end(key)
        return tables.use(device)


def tensor_tables(cache: TableCache, device: torch.device, work: Work, block: int) -> Tables:
    """The tables of `work`'s rows, chunked by `block` elements: from `cache`, else made."""
    return cache.get(device, (block, work.cols, tuple(work.rows)),
                     lambda: _make_tensor_tables(device, work, block))


def _make_tensor_tables(device: torch.device, work: Work, block: int) -> Tables:
    # Pieces: "meta" (the rows, work.cols int64 each); "chunks<i>" for launch
    # i, (row, chunk index within that tensor) per program, the 16-byte aligned
    # tensors' first (launched with ALIGNED), then the others; "firsts", per
    # tensor the index of its first chunk among all launches' chunks (its
    # chunks follow it in order). Built on the CPU whatever torch's default
    # device.
    n = len(work.numels)
    numel = torch.tensor(work.numels, dtype=torch.int64, device="cpu")
    chunks = (numel + block - 1) // block
    is_aligned = torch.tensor(work.aligned, dtype=torch.bool, device="cpu")
    firsts = torch.zeros(n, dtype=torch.int64, device="cpu")
    parts, launches, offset = [], [], 0
    for flag in (True, False):
        slots = torch.nonzero((is_aligned == flag) & (chunks > 0)).flatten()
        counts = chunks[slots]
        total = int(counts.sum())
        if total == 0:
            continue
        first = torch.cumsum(counts, 0) - counts  # first chunk of each tensor, in this launch
        firsts[slots] = offset + first
        slot_of = torch.repeat_interleave(slots, counts)
        index = torch.arange(total, dtype=torch.int64, device="cpu") - torch.repeat_interleave(first, counts)
        parts.append(torch.stack([slot_of, index], dim=1).flatten())
        launches.append((flag, offset, total))
        offset += total
    meta = torch.tensor(work.rows, dtype=torch.int64, device="cpu")
    data = torch.cat([meta, firsts] + parts)
    base = n * work.cols
    pieces = [("meta", 0, base), ("firsts", base, base + n)]
    base += n
    pieces += [(f"chunks{i}", base + 2 * off, base + 2 * (off + total)) for i, (_, off, total) in enumerate(launches)]
    return Tables(device, data, pieces, launches)


def float_table(cache: TableCache, device: torch.device, key: tuple, rows: Callable[[], list[float]]) -> Tables:
    """A float64 table (piece "hyper") of `rows()`, cached by `key` (an op's per-group hyperparameters)."""
    def make() -> Tables:
        data = torch.tensor(rows(), dtype=torch.float64, device="cpu")
        return Tables(device, data, [("hyper", 0, data.numel())])

    return cache.get(device, key, make)


def via_cpu(fn: Callable, lists: Sequence[Sequence[torch.Tensor]], mutated: Sequence[int], *args, **kwargs):
    """fn on CPU copies of GPU tensors, under the interpreter: the lists at `mutated` are copied back, and
    a tuple result is moved to the tensors' device.

    The interpreter dereferences the tables' addresses on the host, so GPU
    tensors run on CPU copies (this syncs: the interpreter is for testing
    numerics only).
    """
    device = lists[0][0].device
    cpu_lists = [[t.cpu() for t in ts] for ts in lists]

    def cpu(x):
        return x.cpu() if isinstance(x, torch.Tensor) else x

    out = fn(*cpu_lists, *map(cpu, args), **{k: cpu(v) for k, v in kwargs.items()})
    with torch.no_grad():
        for i in mutated:
            for caller, copy in zip(lists[i], cpu_lists[i]):
                caller.copy_(copy)
    return None if out is None else tuple(t.to(device) for t in out)
