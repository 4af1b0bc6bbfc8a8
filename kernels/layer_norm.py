"""LayerNorm and RMSNorm in Triton: the design of csrc/cuda/norm_cuda.cu.

Forward: a program normalizes ROWS rows whose N elements fit one tile
(BLOCK_N <= _MAX_TILE), holding them in registers: statistics, then
normalize, from one read. Longer rows take a program each and three passes
over tiles of the row (sum, sum of squared deviations, normalize), the
re-reads served by L2. Backward: a fixed grid of G programs (a few per SM)
strides over the rows, writing dx and summing dy * xhat and dy over its rows
into its own row of a [G, N] partials buffer; a second kernel adds the G rows
of partials column by column, in order (note [deterministic weight grads]:
no atomics, the same bits on every run).

The per-row math is csrc/include/pyoptim/layer_norm.h's, in the same names:
  mean = x0 + sum(x - x0) / N (x0 = x[0]; 0 for RMSNorm), var = sum((x - mean)^2) / N
  rstd = 1 / sqrt(var + eps), xhat = (x - mean) * rstd, y = xhat * w + b
  g = dy * w, c1 = sum(g) / N (0 for RMSNorm), c2 = sum(g * xhat) / N
  dx = rstd * (g - c1 - xhat * c2)
Statistics are fp32 (fp64 for fp64 input); rstd uses a correctly rounded
division and sqrt (note [exact fp32] of kernels/adam.py).
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from pyoptim._validation import check_norm_bwd_args, check_norm_fwd_args, norm_stat_dtype, rms_norm_eps
from pyoptim.kernels._multi_tensor import exact_div, exact_sqrt
from pyoptim.kernels._ops import launch, register_op

__all__ = ["layer_norm_fwd_triton", "layer_norm_bwd_triton", "rms_norm_fwd_triton", "rms_norm_bwd_triton"]

# Elements of a row held in registers by one program: up to 4096 (16 KB of
# fp32 per operand; the backward keeps about six such tensors live). Longer
# rows stream in tiles of this size.
_MAX_TILE = 4096
# Elements per program in the one-tile path: short rows are grouped, ROWS per
# program, so a program moves at least ~4096 elements.
_TILE_ELEMS = 4096
# Backward programs per SM: enough to hide latency; each owns a partials row.
_BWD_PROGRAMS_PER_SM = 4
_REDUCE_COLS = 128  # columns per program of the partials reduction
_REDUCE_ROWS = 32  # partial rows per step of the partials reduction


# -- device code ---------------------------------------------------------------


@triton.jit
def _rstd(v):
    # 1 / sqrt(v), each step correctly rounded (note [exact fp32]).
    return exact_div(tl.full(v.shape, 1.0, v.dtype), exact_sqrt(v))


@triton.jit
def _norm_fwd_kernel(
    X,  # [M, N] input, row-major
    W,  # [N] weight, read when HAS_W
    B,  # [N] bias, read when HAS_B
    Y,  # [M, N] output, row-major, X's dtype
    MEAN,  # [M] fp32/fp64 statistics, written unless RMS
    RSTD,  # [M] fp32/fp64
    M,  # rows
    N,  # row length
    eps,  # float
    RMS: tl.constexpr,  # RMSNorm: mean pinned to 0
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    COMPUTE: tl.constexpr,  # math type: fp32, or fp64 for fp64 input
    ONE_TILE: tl.constexpr,  # the row fits one tile of BLOCK_N
    ROWS: tl.constexpr,  # rows per program (one-tile path; else 1)
    BLOCK_N: tl.constexpr,  # tile length, a power of 2
):
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    if ONE_TILE:
        rows = pid * ROWS + tl.arange(0, ROWS)
        mask = (rows[:, None] < M) & (cols[None, :] < N)
        offs = rows[:, None] * N + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(COMPUTE)
        if RMS:
            d = x
        else:
            # note [shifted mean] (csrc/include/pyoptim/layer_norm.h): x0 + sum(x - x0) / N.
            x0 = tl.load(X + rows * N, mask=rows < M, other=0.0).to(COMPUTE)
            mean = x0 + tl.sum(tl.where(mask, x - x0[:, None], 0.0), axis=1) / N
            d = tl.where(mask, x - mean[:, None], 0.0)
        var = tl.sum(d * d, axis=1) / N
        rstd = _rstd(var + eps)
        y = d * rstd[:, None]
        if HAS_W:
            y = y * tl.load(W + cols, mask=cols < N, other=0.0).to(COMPUTE)[None, :]
        if HAS_B:
            y = y + tl.load(B + cols, mask=cols < N, other=0.0).to(COMPUTE)[None, :]
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
        if not RMS:
            tl.store(MEAN + rows, mean, mask=rows < M)
        tl.store(RSTD + rows, rstd, mask=rows < M)
    else:
        row_x = X + pid * N
        row_y = Y + pid * N
        mean = 0.0
        if not RMS:
            x0 = tl.load(row_x).to(COMPUTE)  # note [shifted mean]
            acc = tl.zeros([BLOCK_N], dtype=COMPUTE)
            for start in range(0, N, BLOCK_N):
                c = start + cols
                acc += tl.where(c < N, tl.load(row_x + c, mask=c < N, other=0.0).to(COMPUTE) - x0, 0.0)
            mean = x0 + tl.sum(acc, axis=0) / N
        acc = tl.zeros([BLOCK_N], dtype=COMPUTE)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            x = tl.load(row_x + c, mask=c < N, other=0.0).to(COMPUTE)
            d = tl.where(c < N, x - mean, 0.0)
            acc += d * d
        var = tl.sum(acc, axis=0) / N
        rstd = _rstd(var + eps)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            x = tl.load(row_x + c, mask=c < N, other=0.0).to(COMPUTE)
            y = (x - mean) * rstd
            if HAS_W:
                y = y * tl.load(W + c, mask=c < N, other=0.0).to(COMPUTE)
            if HAS_B:
                y = y + tl.load(B + c, mask=c < N, other=0.0).to(COMPUTE)
            tl.store(row_y + c, y.to(Y.dtype.element_ty), mask=c < N)
        if not RMS:
            tl.store(MEAN + pid, mean)
        tl.store(RSTD + pid, rstd)


@triton.jit
def _norm_bwd_kernel(
    DY,  # [M, N] grad_out, row-major
    X,  # [M, N] input, row-major
    W,  # [N] weight, read when HAS_W
    MEAN,  # [M] statistics, read unless RMS
    RSTD,  # [M]
    DX,  # [M, N] grad_input, X's dtype
    PARTIAL,  # [G, 2, N] COMPUTE zeros: per program, its rows' sums of dy * xhat and dy (when PARTIALS)
    M,  # rows
    N,  # row length
    RMS: tl.constexpr,
    HAS_W: tl.constexpr,
    PARTIALS: tl.constexpr,  # weight or bias grads wanted
    COMPUTE: tl.constexpr,
    ONE_TILE: tl.constexpr,
    ROWS: tl.constexpr,  # rows per step (one-tile path; else 1)
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    pdw = PARTIAL + pid.to(tl.int64) * 2 * N
    pdb = pdw + N
    if ONE_TILE:
        cmask = cols < N
        if HAS_W:
            w = tl.load(W + cols, mask=cmask, other=0.0).to(COMPUTE)
        dw_acc = tl.zeros([BLOCK_N], dtype=COMPUTE)
        db_acc = tl.zeros([BLOCK_N], dtype=COMPUTE)
        for step in range(pid, tl.cdiv(M, ROWS), n_programs):
            rows = tl.arange(0, ROWS).to(tl.int64) + step * ROWS
            rmask = rows < M
            mask = rmask[:, None] & cmask[None, :]
            offs = rows[:, None] * N + cols[None, :]
            x = tl.load(X + offs, mask=mask, other=0.0).to(COMPUTE)
            dy = tl.load(DY + offs, mask=mask, other=0.0).to(COMPUTE)
            rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
            if RMS:
                xhat = x * rstd[:, None]
            else:
                mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
                xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            if HAS_W:
                g = dy * w[None, :]
            else:
                g = dy
            c2 = tl.sum(g * xhat, axis=1) / N
            if RMS:
                dx = rstd[:, None] * (g - xhat * c2[:, None])
            else:
                c1 = tl.sum(g, axis=1) / N
                dx = rstd[:, None] * (g - c1[:, None] - xhat * c2[:, None])
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
            if PARTIALS:
                dw_acc += tl.sum(dy * xhat, axis=0)
                db_acc += tl.sum(dy, axis=0)
        if PARTIALS:
            tl.store(pdw + cols, dw_acc, mask=cmask)
            tl.store(pdb + cols, db_acc, mask=cmask)
    else:
        for row in range(pid, M, n_programs):
            base = (tl.zeros([], dtype=tl.int64) + row) * N  # int64: rows past 2^31 elements
            row_x = X + base
            row_dy = DY + base
            row_dx = DX + base
            rstd = tl.load(RSTD + row)
            mean = 0.0
            if not RMS:
                mean = tl.load(MEAN + row)
            sg = tl.zeros([BLOCK_N], dtype=COMPUTE)
            sgx = tl.zeros([BLOCK_N], dtype=COMPUTE)
            for start in range(0, N, BLOCK_N):
                c = start + cols
                cm = c < N
                xhat = tl.where(cm, (tl.load(row_x + c, mask=cm, other=0.0).to(COMPUTE) - mean) * rstd, 0.0)
                dy = tl.load(row_dy + c, mask=cm, other=0.0).to(COMPUTE)
                if HAS_W:
                    g = dy * tl.load(W + c, mask=cm, other=0.0).to(COMPUTE)
                else:
                    g = dy
                sg += g
                sgx += g * xhat
                if PARTIALS:
                    # This program's own partials row: no other program writes it.
                    tl.store(pdw + c, tl.load(pdw + c, mask=cm) + dy * xhat, mask=cm)
                    tl.store(pdb + c, tl.load(pdb + c, mask=cm) + dy, mask=cm)
            c1 = tl.sum(sg, axis=0) / N
            c2 = tl.sum(sgx, axis=0) / N
            for start in range(0, N, BLOCK_N):
                c = start + cols
                cm = c < N
                xhat = (tl.load(row_x + c, mask=cm, other=0.0).to(COMPUTE) - mean) * rstd
                dy = tl.load(row_dy + c, mask=cm, other=0.0).to(COMPUTE)
                if HAS_W:
                    g = dy * tl.load(W + c, mask=cm, other=0.0).to(COMPUTE)
                else:
                    g = dy
                if RMS:
                    dx = rstd * (g - xhat * c2)
                else:
                    dx = rstd * (g - c1 - xhat * c2)
                tl.store(row_dx + c, dx.to(DX.dtype.element_ty), mask=cm)


@triton.jit
def _sum_partials_kernel(
    PARTIAL,  # [G, 2, N] COMPUTE
    OUT,  # [N] the weight's dtype
    G,  # partial rows
    N,  # columns
    WHICH,  # 0: the dy * xhat sums (dw), 1: the dy sums (db)
    BLOCK_G: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    # OUT[j] = sum over g of PARTIAL[g, WHICH, j], in a fixed order.
    cols = tl.program_id(0).to(tl.int64) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    acc = tl.zeros([BLOCK_G, BLOCK_COLS], dtype=PARTIAL.dtype.element_ty)
    for start in range(0, G, BLOCK_G):
        g = start + tl.arange(0, BLOCK_G)
        mask = (g[:, None] < G) & (cols[None, :] < N)
        acc += tl.load(PARTIAL + (g[:, None] * 2 + WHICH) * N + cols[None, :], mask=mask, other=0.0)
    tl.store(OUT + cols, tl.sum(acc, axis=0).to(OUT.dtype.element_ty), mask=cols < N)


# -- host code -----------------------------------------------------------------


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _plan(n: int, element_size: int) -> tuple[bool, int, int, int]:
    """(one tile?, BLOCK_N, ROWS, num_warps) for rows of n elements."""
    block_n = triton.next_power_of_2(max(n, 1))
    if block_n <= _MAX_TILE:
        rows = max(1, min(16, _TILE_ELEMS // block_n))
        elems = rows * block_n
        return True, block_n, rows, max(1, min(8, elems * element_size // 2048))
    return False, _MAX_TILE, 1, 8


def _compute(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _norm_fwd_triton(op: str, rms: bool, input: torch.Tensor, normalized_shape: Sequence[int],
                     weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float):
    m, n, stat_shape = check_norm_fwd_args(op, rms, input, normalized_shape, weight, bias,
                                           device_type=None if _interpret() else "cuda")
    x = input.contiguous()  # the kernels walk raw rows: no ignored strides
    w = weight.contiguous() if weight is not None else None
    b = bias.contiguous() if bias is not None else None
    y = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    sd = norm_stat_dtype(input.dtype)
    mean = torch.empty(stat_shape, dtype=sd, device=input.device)
    rstd = torch.empty(stat_shape, dtype=sd, device=input.device)
    if m > 0 and n > 0:
        one_tile, block_n, rows, warps = _plan(n, input.element_size())
        grid = (triton.cdiv(m, rows),)
        with torch.cuda.device(input.device) if input.is_cuda else contextlib.nullcontext():
            launch(_norm_fwd_kernel, x)[grid](x, w, b, y, mean, rstd, m, n, eps, RMS=rms, HAS_W=w is not None,
                                   HAS_B=b is not None, COMPUTE=_compute(input.dtype), ONE_TILE=one_tile, ROWS=rows,
                                   BLOCK_N=block_n, num_warps=warps)
    return y, mean, rstd


def _norm_bwd_triton(op: str, rms: bool, grad_out: torch.Tensor, input: torch.Tensor,
                     normalized_shape: Sequence[int], mean: Optional[torch.Tensor], rstd: torch.Tensor,
                     weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], output_mask: Sequence[bool]):
    m, n, _ = check_norm_bwd_args(op, rms, grad_out, input, normalized_shape, mean, rstd, weight, bias,
                                  device_type=None if _interpret() else "cuda")
    want_dw = bool(output_mask[1]) and weight is not None
    want_db = len(output_mask) > 2 and bool(output_mask[2]) and bias is not None
    wdtype = weight.dtype if weight is not None else (bias.dtype if bias is not None else input.dtype)
    dx = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    # Masked off: an empty tensor each (an op's outputs may not alias one another).
    dw = torch.zeros(list(normalized_shape), dtype=wdtype, device=input.device) if want_dw else input.new_empty(0)
    db = torch.zeros(list(normalized_shape), dtype=wdtype, device=input.device) if want_db else input.new_empty(0)
    if m > 0 and n > 0:
        x, dy = input.contiguous(), grad_out.contiguous()
        w = weight.contiguous() if weight is not None else None
        one_tile, block_n, rows, warps = _plan(n, input.element_size())
        steps = triton.cdiv(m, rows) if one_tile else m
        # note [deterministic weight grads]: a fixed number of programs per
        # device (per call under the interpreter, which pays per program).
        per_device = 4 if not input.is_cuda else _sm_count(input.device.index or 0) * _BWD_PROGRAMS_PER_SM
        g = max(1, min(steps, per_device))
        partials = want_dw or want_db
        cd = norm_stat_dtype(input.dtype)
        partial = torch.zeros((g, 2, n) if partials else (1,), dtype=cd, device=input.device)
        with torch.cuda.device(input.device) if input.is_cuda else contextlib.nullcontext():
            launch(_norm_bwd_kernel, x)[(g,)](dy, x, w, mean, rstd, dx, partial, m, n, RMS=rms, HAS_W=w is not None,
                                   PARTIALS=partials, COMPUTE=_compute(input.dtype), ONE_TILE=one_tile, ROWS=rows,
                                   # No fma behind the code's back: fma(dy, w, -c1) would leave the
                                   # rounding of dy * w, times rstd, where a row of one gives dx = 0
                                   # (setup.py's -ffp-contract=off / --fmad=false for the C++ backends).
                                   BLOCK_N=block_n, num_warps=warps, enable_fp_fusion=False)
            for which, out in ((0, dw if want_dw else None), (1, db if want_db else None)):
                if out is not None:
                    launch(_sum_partials_kernel, x)[(triton.cdiv(n, _REDUCE_COLS),)](
                        partial, out, g, n, which, BLOCK_G=_REDUCE_ROWS, BLOCK_COLS=_REDUCE_COLS, num_warps=4)
    return (dx if output_mask[0] else input.new_empty(0)), dw, db


def layer_norm_fwd_triton(input: torch.Tensor, normalized_shape: Sequence[int], weight: Optional[torch.Tensor],
                          bias: Optional[torch.Tensor], eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, mean, rstd) of LayerNorm (the contract of torch.ops.pyoptim.layer_norm_fwd)."""
    return _norm_fwd_triton("layer_norm_fwd", False, input, normalized_shape, weight, bias, eps)


def layer_norm_bwd_triton(grad_out: torch.Tensor, input: torch.Tensor, normalized_shape: Sequence[int],
                          mean: torch.Tensor, rstd: torch.Tensor, weight: Optional[torch.Tensor],
                          bias: Optional[torch.Tensor], output_mask: Sequence[bool]
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_input, grad_weight, grad_bias) of LayerNorm (the contract of torch.ops.pyoptim.layer_norm_bwd)."""
    return _norm_bwd_triton("layer_norm_bwd", False, grad_out, input, normalized_shape, mean, rstd, weight, bias,
                            output_mask)


def rms_norm_fwd_triton(input: torch.Tensor, normalized_shape: Sequence[int], weight: Optional[torch.Tensor],
                        eps: Optional[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, rstd) of RMSNorm (the contract of torch.ops.pyoptim.rms_norm_fwd)."""
    y, _, rstd = _norm_fwd_triton("rms_norm_fwd", True, input, normalized_shape, weight, None,
                                  rms_norm_eps(eps, input.dtype))
    return y, rstd


def rms_norm_bwd_triton(grad_out: torch.Tensor, input: torch.Tensor, normalized_shape: Sequence[int],
                        rstd: torch.Tensor, weight: Optional[torch.Tensor], output_mask: Sequence[bool]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_input, grad_weight) of RMSNorm (the contract of torch.ops.pyoptim.rms_norm_bwd)."""
    dx, dw, _ = _norm_bwd_triton("rms_norm_bwd", True, grad_out, input, normalized_shape, None, rstd, weight,
                                 None, output_mask)
    return dx, dw


# note [triton ops] (kernels/_ops.py): the launchers as dispatcher ops, with the C++ ops' schemas.
register_op("layer_norm_fwd_triton", "(Tensor input, int[] normalized_shape, Tensor? weight, Tensor? bias, float eps) "
            "-> (Tensor, Tensor, Tensor)", layer_norm_fwd_triton)
register_op("layer_norm_bwd_triton", "(Tensor grad_out, Tensor input, int[] normalized_shape, Tensor mean, "
            "Tensor rstd, Tensor? weight, Tensor? bias, bool[3] output_mask) -> (Tensor, Tensor, Tensor)",
            layer_norm_bwd_triton)
register_op("rms_norm_fwd_triton", "(Tensor input, int[] normalized_shape, Tensor? weight, float? eps) "
            "-> (Tensor, Tensor)", rms_norm_fwd_triton)
register_op("rms_norm_bwd_triton", "(Tensor grad_out, Tensor input, int[] normalized_shape, Tensor rstd, "
            "Tensor? weight, bool[2] output_mask) -> (Tensor, Tensor)", rms_norm_bwd_triton)
