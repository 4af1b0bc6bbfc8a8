"""multi_tensor_norm and clip_scale_ in Triton: chunked multi-tensor launches, the design of csrc/cuda/clip_cuda.cu.

Host side: the checks of pyoptim._validation, then the tensor and chunk
tables of kernels/_multi_tensor.py (one row per tensor: its address and
numel), so one launch serves any number of tensors (two when some are not
16-byte aligned). Device side: the per-element math of
csrc/include/pyoptim/vector_norm.h and clip.h.

The norm is deterministic and never syncs the host (note [no host sync]):
each program accumulates its chunk's terms in the math type (float32 for
16- and 32-bit storage, float64 for float64) and writes the chunk's
accumulation, in float64, to a partials buffer; one program per tensor then
combines that tensor's chunks in order (their partials are adjacent: the
table's "firsts" gives where they begin), and one program the tensors. Three
launches (four with unaligned tensors), whatever the number of tensors.

note [norm accuracy]: a chunk is 16384 elements, 16 per lane of a 1024-lane
float32 accumulator that is then summed as a tree, so a chunk's sum errs by a
few ulps at most, and the float64 sum of the chunks adds nothing that shows
in a float32 result, at any size (torch's CPU float32 norm of 2^28 ones
returns 11585 for 16384). For a norm_type p other than 1, 2 and inf, |x|^p is
exp(p * log|x|) in float64 (Triton's float32 exp and log are approximate on
GPUs, and the interpreter has no libdevice pow), and p reaches the kernels in
a float64 table: a Python float argument would be rounded to float32.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import triton
import triton.language as tl

from pyoptim._validation import check_clip_scale_args, check_norm_args

from ._multi_tensor import (LAUNCH, TableCache, Work, bf16_rne, clip_coef, device_type_required, float_table,
                            interpret, on_device, program_chunk, tensor_tables, tl_types, via_cpu)

__all__ = ["multi_tensor_norm_triton", "clip_scale_triton"]

_META_COLS = 2  # columns of the tensor table: address, numel
# The norm's chunk: ITERS blocks of BLOCK elements per program (note [norm accuracy]).
_NORM_BLOCK = 1024
_NORM_ITERS = 16
_NORM_WARPS = 4
_REDUCE_BLOCK = 1024  # partials per iteration of the per-tensor and total reductions

# vector_norm.h's NormKind
_L1, _L2, _LINF, _LP = 0, 1, 2, 3


def _norm_kind(p: float) -> int:
    if p == 1.0:
        return _L1
    if p == 2.0:
        return _L2
    if math.isinf(p):
        return _LINF
    return _LP


# -- device code ---------------------------------------------------------------


@triton.jit
def _norm_reduce(acc, KIND: tl.constexpr):
    # vector_norm.h's norm_combine over a block: a sum, or for Linf a max that keeps
    # NaN (tl.max ignores NaN, so the NaN lanes are summed in: 0, or NaN).
    if KIND == 2:  # Linf
        return tl.max(acc, axis=0) + tl.sum(tl.where(acc != acc, acc, 0.0), axis=0)
    else:
        return tl.sum(acc, axis=0)


@triton.jit
def _norm_finish(acc, P, KIND: tl.constexpr):
    # vector_norm.h's norm_finish, in float64.
    if KIND == 1:  # L2
        return tl.sqrt(acc)
    elif KIND == 3:  # Lp: acc^(1/p), 0 kept apart (log(0) is -inf)
        return tl.where(acc == 0.0, 0.0, tl.exp(tl.log(tl.where(acc == 0.0, 1.0, acc)) / tl.load(P)))
    else:
        return acc


@triton.jit
def _norm_chunk(X, start, numel, P, ACC: tl.constexpr, KIND: tl.constexpr, MASKED: tl.constexpr,
                BLOCK: tl.constexpr, ITERS: tl.constexpr):
    # The accumulation of vector_norm.h's norm_term over one chunk, in ACC. Masked
    # lanes (past a tensor's end) load 0, whose term is 0.
    acc = tl.zeros([BLOCK], ACC)
    if KIND == 3:
        p = tl.load(P)
    for it in range(ITERS):
        offs = start + it * BLOCK + tl.arange(0, BLOCK)
        if MASKED:
            x = tl.load(X + offs, mask=offs < numel, other=0.0).to(ACC)
        else:
            x = tl.load(X + offs).to(ACC)
        if KIND == 1:  # L2
            acc = acc + x * x
        elif KIND == 3:  # Lp
            x = tl.abs(x).to(tl.float64)
            acc = acc + tl.where(x == 0.0, 0.0, tl.exp(tl.log(tl.where(x == 0.0, 1.0, x)) * p)).to(ACC)
        elif KIND == 2:  # Linf: NaN-propagating max
            x = tl.abs(x)
            acc = tl.where((acc != acc) | (acc > x), acc, x)
        else:  # L1
            acc = acc + tl.abs(x)
    return _norm_reduce(acc, KIND)


@triton.jit
def _norm_chunks_kernel(
    META,  # [n_tensors, 2] int64: per tensor its address and numel
    CHUNKS,  # [grid, 2] int64: per program its tensor's row in META and the chunk's index within that tensor
    PARTIAL,  # [all chunks] float64: out, each chunk's accumulation, at chunk_base + program
    chunk_base,  # int: this launch's first chunk among all launches'
    P,  # [1] float64: the norm's order, read for KIND Lp
    DTYPE: tl.constexpr,  # storage type of the tensors
    COMPUTE: tl.constexpr,  # accumulation type of a chunk: float32, or float64 for float64 storage
    KIND: tl.constexpr,  # vector_norm.h's NormKind: 0 L1, 1 L2, 2 Linf, 3 Lp
    ALIGNED: tl.constexpr,  # every address in this launch is 16-byte aligned
    BLOCK: tl.constexpr,  # elements per iteration
    ITERS: tl.constexpr,  # iterations per chunk (one program)
):
    row, chunk = program_chunk(META, CHUNKS, 2)  # _META_COLS
    X = tl.load(row).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        X = tl.multiple_of(X, 16)
    numel = tl.load(row + 1)
    start = chunk * (BLOCK * ITERS)  # int64: tensors of 2^31 elements and more
    if start + BLOCK * ITERS <= numel:
        acc = _norm_chunk(X, start, numel, P, COMPUTE, KIND, False, BLOCK, ITERS)
    else:
        acc = _norm_chunk(X, start, numel, P, COMPUTE, KIND, True, BLOCK, ITERS)
    tl.store(PARTIAL + chunk_base + tl.program_id(0).to(tl.int64), acc.to(tl.float64))


@triton.jit
def _norm_tensors_kernel(
    META,  # [n_tensors, COLS] int64: a tensor table, column NUMEL_COL each tensor's numel
    FIRSTS,  # [n_tensors] int64: per tensor the index of its first chunk in PARTIAL
    PARTIAL,  # [all chunks] float64: each chunk's accumulation
    PER_TENSOR,  # [n_tensors] float32: out, each tensor's norm
    TENSOR_ACC,  # [n_tensors] float64: out, each tensor's accumulation
    P,  # [1] float64: the norm's order, read for KIND Lp
    KIND: tl.constexpr,
    CHUNK: tl.constexpr,  # elements per chunk
    BLOCK: tl.constexpr,  # partials per iteration
    COLS: tl.constexpr,  # columns of META (2 here: address, numel; other ops reduce over their own tables)
    NUMEL_COL: tl.constexpr,
):
    # One program per tensor: its chunks' partials combined in order.
    i = tl.program_id(0).to(tl.int64)
    chunks = (tl.load(META + COLS * i + NUMEL_COL) + CHUNK - 1) // CHUNK
    first = tl.load(FIRSTS + i)
    acc = tl.zeros([BLOCK], tl.float64)
    for c in range(0, chunks, BLOCK):
        offs = c + tl.arange(0, BLOCK)
        x = tl.load(PARTIAL + first + offs, mask=offs < chunks, other=0.0)
        if KIND == 2:
            acc = tl.where((acc != acc) | (acc > x), acc, x)
        else:
            acc = acc + x
    total = _norm_reduce(acc, KIND)
    tl.store(TENSOR_ACC + i, total)
    tl.store(PER_TENSOR + i, _norm_finish(total, P, KIND).to(tl.float32))


@triton.jit
def _norm_total_kernel(
    TENSOR_ACC,  # [n_tensors] float64: each tensor's accumulation
    TOTAL,  # [] float32: out, the norm of all tensors
    n_tensors,
    P,  # [1] float64: the norm's order, read for KIND Lp
    KIND: tl.constexpr,
    BLOCK: tl.constexpr,  # tensors per iteration
):
    acc = tl.zeros([BLOCK], tl.float64)
    for c in range(0, n_tensors, BLOCK):
        offs = c + tl.arange(0, BLOCK)
        x = tl.load(TENSOR_ACC + offs, mask=offs < n_tensors, other=0.0)
        if KIND == 2:
            acc = tl.where((acc != acc) | (acc > x), acc, x)
        else:
            acc = acc + x
    tl.store(TOTAL, _norm_finish(_norm_reduce(acc, KIND), P, KIND).to(tl.float32))


@triton.jit
def _scale_chunk(X, offs, numel, coef, COMPUTE: tl.constexpr, MASKED: tl.constexpr):
    # x * coef over one chunk, rounded once to the storage type.
    if MASKED:
        mask = offs < numel
    else:
        mask = None
    x = tl.load(X + offs, mask=mask).to(COMPUTE) * coef
    if X.dtype.element_ty == tl.bfloat16:
        x = bf16_rne(x)
    tl.store(X + offs, x.to(X.dtype.element_ty), mask=mask)


@triton.jit
def _clip_scale_kernel(
    META,  # [n_tensors, 2] int64: per tensor its address and numel
    CHUNKS,  # [grid, 2] int64: per program its tensor's row in META and the chunk's index within that tensor
    TOTAL_NORM,  # [1] float32
    max_norm,  # float32
    DTYPE: tl.constexpr,  # storage type of the tensors
    COMPUTE: tl.constexpr,  # math type: float32, or float64 for float64 storage
    ALIGNED: tl.constexpr,  # every address in this launch is 16-byte aligned
    BLOCK: tl.constexpr,  # elements per chunk (one program)
):
    coef = clip_coef(tl.load(TOTAL_NORM), max_norm)
    if coef == 1.0:
        return  # x * 1 == x: skip the writes
    row, chunk = program_chunk(META, CHUNKS, 2)  # _META_COLS
    X = tl.load(row).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        X = tl.multiple_of(X, 16)
    numel = tl.load(row + 1)
    start = chunk * BLOCK  # int64
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= numel:
        _scale_chunk(X, offs, numel, coef.to(COMPUTE), COMPUTE, False)
    else:
        _scale_chunk(X, offs, numel, coef.to(COMPUTE), COMPUTE, True)


# -- host code -----------------------------------------------------------------


_tensor_tables = TableCache()
_order_tables = TableCache()


def multi_tensor_norm_triton(tensors: Sequence[torch.Tensor], norm_type: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(total norm, per-tensor norms) of many tensors, float32 (the contract of torch.ops.pyoptim.multi_tensor_norm)."""
    check_norm_args(tensors, norm_type, device_type=device_type_required())
    if len(tensors) == 0:
        return torch.zeros(()), torch.zeros(0)
    device = tensors[0].device
    if interpret() and device.type != "cpu":
        return via_cpu(multi_tensor_norm_triton, (tensors,), (), norm_type)
    dtype = tensors[0].dtype
    kind = _norm_kind(norm_type)
    p = float(norm_type)
    chunk = _NORM_BLOCK * _NORM_ITERS
    n = len(tensors)
    with on_device(device):
        work = Work((tensors,), (False,))
        tables = tensor_tables(_tensor_tables, device, work, chunk)
        order = float_table(_order_tables, device, (p,), lambda: [p]).views["hyper"]
        meta = tables.views["meta"]
        n_chunks = sum(total for _, _, total in tables.launches)
        partial = torch.empty(max(n_chunks, 1), dtype=torch.float64, device=device)
        tensor_acc = torch.empty(n, dtype=torch.float64, device=device)
        per_tensor = torch.empty(n, dtype=torch.float32, device=device)
        total_norm = torch.empty((), dtype=torch.float32, device=device)
        types = tl_types(dtype)
        for grid, chunk_table, is_aligned, first in tables.chunk_launches():
            _norm_chunks_kernel[grid](
                meta, chunk_table, partial, first, order, **types, KIND=kind, ALIGNED=is_aligned,
                BLOCK=_NORM_BLOCK, ITERS=_NORM_ITERS, num_warps=_NORM_WARPS)
        _norm_tensors_kernel[(n,)](
            meta, tables.views["firsts"], partial, per_tensor, tensor_acc, order, KIND=kind, CHUNK=chunk,
            BLOCK=_REDUCE_BLOCK, COLS=_META_COLS, NUMEL_COL=1, num_warps=4)
        _norm_total_kernel[(1,)](tensor_acc, total_norm, n, order, KIND=kind, BLOCK=_REDUCE_BLOCK, num_warps=4)
        work.finish()  # frees the copies of non-dense tensors, after the kernels
    return total_norm, per_tensor


def clip_scale_triton(tensors: Sequence[torch.Tensor], total_norm: torch.Tensor, max_norm: float) -> None:
    """Scale every tensor in place by min(1, max_norm / (total_norm + 1e-6)) (the contract of pyoptim::clip_scale_)."""
    check_clip_scale_args(tensors, total_norm, max_norm, device_type=device_type_required())
    if len(tensors) == 0:
        return
    device = tensors[0].device
    if interpret() and device.type != "cpu":
        via_cpu(clip_scale_triton, (tensors,), (0,), total_norm, max_norm)
        return
    dtype = tensors[0].dtype
    block, num_warps = LAUNCH[dtype]
    with on_device(device):
        work = Work((tensors,), (True,))
        tables = tensor_tables(_tensor_tables, device, work, block)
        for grid, chunk_table, is_aligned, _ in tables.chunk_launches():
            _clip_scale_kernel[grid](
                tables.views["meta"], chunk_table, total_norm, float(max_norm), **tl_types(dtype),
                ALIGNED=is_aligned, BLOCK=block, num_warps=num_warps, enable_fp_fusion=False)
        work.finish()
