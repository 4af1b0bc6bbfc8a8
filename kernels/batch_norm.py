"""BatchNorm in Triton: the six ops of csrc/ops.cpp, the structure of csrc/cuda/batch_norm_cuda.cu.

An (N, C, *) input is seen as (N, C, S) in one of two layouts (the planning
of csrc/batch_norm_host.cpp): NCHW-contiguous, element (n, c, s) at
(n * C + c) * S + s, or channels-last, N * S rows of C, element (n, c, s) at
(n * S + s) * C + c. Any other layout is copied to contiguous first; outputs
shaped like the input are torch.empty_like the input as read, so they keep
its layout. A tensor with S == 1 is both: its kernels are the channels-last
ones (rows of C), which read it with unit stride.

Per-channel reductions are deterministic (note [deterministic batch norm]):
  1. a partials kernel: each program owns one fixed slice of one channel
     (NCHW: a range of [BLOCK_N, BLOCK_S] tiles of the channel's N planes) or
     of BLOCK_C channels (channels-last: a range of rows), and writes its
     slice's partial to a workspace, [C, K] (NCHW) or [K, C] (channels-last);
  2. a merge kernel: per channel, the K partials in order k = 0 .. K-1, then
     the op's per-channel outputs (statistics, running statistics, weight
     and bias grads, the backward's per-channel terms).
No atomics: the bits depend only on the shape and the device's SM count.
Statistics are Welford-style: each tile's mean and sum of squared deviations
about that mean (two passes over the tile in registers), merged into the
slice's by Chan et al.'s formula (welford_merge of csrc/include/pyoptim/
welford.h), all of x less a shift (note [shifted statistics]), so a mean far
larger than the spread costs no digits. The
backward's sums (sum_dy, sum_dy_xmu) accumulate tile-shaped and are summed
once at the end of the slice.
Elementwise passes (normalize, grad_input) tile the input as a [M, L] matrix
(NCHW: N * C planes of S, channel = row % C; channels-last: N * S rows of C,
channel = column), per-channel terms gathered per tile.

The math is csrc/include/pyoptim/batch_norm.h's, in the same names:
  forward, training: mean, m2 (Welford), var = m2 / count,
    invstd = 1 / sqrt(max(var, 0) + eps) (nan kept), running' =
    (1 - momentum) * running + momentum * batch (variance unbiased: m2 / (count - 1))
  forward, eval: mean = running_mean, invstd = 1 / sqrt(max(running_var, 0) + eps) (nan kept)
  y = (x - mean) * scale + b, scale = invstd * w
  backward: sum_dy = sum(dy), sum_dy_xmu = sum(dy * (x - mean)),
    grad_weight = sum_dy_xmu * invstd, grad_bias = sum_dy;
    training: dx = (dy - mean_dy - (x - mean) * proj) * scale,
      mean_dy = sum_dy / count, proj = invstd * invstd * mean_dy_xmu (mean_dy_xmu = sum_dy_xmu / count)
    eval: dx = dy * scale
in float32 (float64 for float64 input), with correctly rounded fp32 division
and sqrt (note [exact fp32] of kernels/_multi_tensor.py) and bf16 outputs
rounded to nearest even (note [bf16 rounding]).

note [deterministic batch norm]: the slices are a function of the shape and
of the SM count alone (a few programs per SM, cached per device; a fixed
count under the interpreter), and each program and each merge adds in a
fixed order, so a device gives the same bits on every run.
"""

from __future__ import annotations

import functools
import struct
from typing import NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl

from pyoptim._validation import (check_batch_norm_backward_elemt_args, check_batch_norm_backward_reduce_args,
                                 check_batch_norm_bwd_args, check_batch_norm_elemt_args, check_batch_norm_fwd_args,
                                 check_batch_norm_stats_args)

from ._multi_tensor import bf16_rne, device_type_required, exact_div, exact_sqrt, interpret, on_device
from ._ops import launch, register_op

__all__ = ["batch_norm_fwd_triton", "batch_norm_bwd_triton", "batch_norm_stats_triton", "batch_norm_elemt_triton",
           "batch_norm_backward_reduce_triton", "batch_norm_backward_elemt_triton"]

# Elements per tile of the reduction kernels (up to four tile-shaped tensors
# live in the backward's: dy, x and two accumulators, 8 fp32 registers each
# per thread at 8 warps) and of the elementwise kernels (8 elements per thread
# at 4 warps, as kernels/_multi_tensor.py's LAUNCH). Unmeasured on a GPU.
_REDUCE_TILE = 2048
_REDUCE_WARPS = 8
_ELEM_TILE = 1024
_ELEM_WARPS = 4
# Channels per tile of the channels-last kernels: a row of C is read in
# pieces of up to this many contiguous elements (256 fp32 = 1 KB).
_MAX_BLOCK_C = 256
# Partials programs per SM: the slices per channel are chosen so that a
# reduction launches about this many programs per SM (note [deterministic
# batch norm]).
_PROGRAMS_PER_SM = 4
# The SM count assumed under the interpreter, where every program costs
# Python time: enough slices to exercise the merge on small inputs.
_INTERPRET_SMS = 2
_MERGE_BLOCK_C = 128  # channels per program of the merge kernels


# -- device code ---------------------------------------------------------------


@triton.jit
def _f64(bits):
    # A float64 passed by its bits (an int64 argument): Triton passes Python
    # floats as float32, which would round eps and momentum for fp64 math.
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def _store(P, v, mask):
    # v stored in P's dtype; to bf16 rounded to nearest even (note [bf16 rounding]).
    if P.dtype.element_ty == tl.bfloat16:
        tl.store(P, bf16_rne(v.to(tl.float32)), mask=mask)
    else:
        tl.store(P, v.to(P.dtype.element_ty), mask=mask)


@triton.jit
def _invstd(var, eps):
    # batch_norm_invstd: 1 / sqrt(max(var, 0) + eps), each step correctly
    # rounded; a nan variance stays nan, as torch's batch norm keeps it.
    return exact_div(tl.full(var.shape, 1.0, var.dtype), exact_sqrt(tl.where(var < 0, 0.0, var) + eps))


@triton.jit
def _shift(x0):
    # note [shifted statistics]: a partials program accumulates the moments of
    # x - shift, shift = the channel's first element (0 when it is inf or
    # nan), so that tile sums stay of the size of the spread, not of the
    # mean: with x = 1000 + randn in fp32, sums of raw x round to ulp(1000 *
    # tile) and cost the mean several ulps. Every slice of a channel shifts by
    # the same value, and the merge adds it back only at the end, so that the
    # partial means' differences (Chan's delta, squared into m2) are not
    # rounded to ulp(1000) either.
    return tl.where(x0 - x0 == 0, x0, 0.0)


@triton.jit
def _chan_merge(mean_a, m2_a, n_a, mean_b, m2_b, n_b):
    # welford.h's welford_merge: (mean_a, m2_a, n_a) absorbs (mean_b, m2_b,
    # n_b), counts int64 and n_b > 0. Returns the merged (mean, m2, count).
    n = n_a + n_b
    delta = mean_b - mean_a
    nb_over_n = exact_div(n_b.to(mean_a.dtype) + tl.zeros_like(mean_a), n.to(mean_a.dtype) + tl.zeros_like(mean_a))
    return mean_a + delta * nb_over_n, m2_a + (m2_b + delta * delta * n_a.to(mean_a.dtype) * nb_over_n), n


@triton.jit
def _nchw_tile(t, c, N, C, S, s_tiles, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    # Tile t of channel c's N planes of S (NCHW): planes nb * BLOCK_N .., positions sb * BLOCK_S ..
    # Returns (offsets, mask, elements in the tile (int64)).
    nb = t // s_tiles
    sb = t - nb * s_tiles
    n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    s = sb * BLOCK_S + tl.arange(0, BLOCK_S)
    mask = (n < N)[:, None] & (s < S)[None, :]
    offs = (n.to(tl.int64) * C + c)[:, None] * S + s[None, :]
    count = tl.minimum(N - nb * BLOCK_N, BLOCK_N).to(tl.int64) * tl.minimum(S - sb * BLOCK_S, BLOCK_S)
    return offs, mask, count


@triton.jit
def _rows_program(R, C, rows_per_slice, BLOCK_C: tl.constexpr):
    """This program's slice k, channel tile (cols, their mask) and rows [r_start, r_end) in a rows-of-C reduction:
    program pid = k * cdiv(C, BLOCK_C) + channel tile."""
    pid = tl.program_id(0)
    c_blocks = tl.cdiv(C, BLOCK_C)
    k = pid // c_blocks
    cols = (pid - k * c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    r_start = k.to(tl.int64) * rows_per_slice
    return k, cols, cols < C, r_start, tl.minimum(r_start + rows_per_slice, R)


@triton.jit
def _stats_nchw_kernel(
    X,  # [N, C, S] input, NCHW-contiguous
    WS_MEAN,  # [C, K] COMPUTE: per slice, the mean of its elements less the channel's shift
    WS_M2,  # [C, K] COMPUTE: per slice, the sum of squared deviations about that mean
    WS_COUNT,  # [C, K] int64: per slice, its element count
    N,  # batch size
    C,  # channels
    S,  # elements per plane (prod of the dims past C)
    K,  # slices per channel
    s_tiles,  # tiles across a plane: cdiv(S, BLOCK_S)
    tiles,  # tiles per channel: cdiv(N, BLOCK_N) * s_tiles
    tiles_per_slice,  # the last slice may hold fewer
    COMPUTE: tl.constexpr,  # math type: fp32, or fp64 for fp64 input
    BLOCK_N: tl.constexpr,  # planes per tile
    BLOCK_S: tl.constexpr,  # positions per tile, a power of 2
):
    pid = tl.program_id(0)
    c = pid // K
    k = pid - c * K
    t0 = k * tiles_per_slice
    shift = _shift(tl.load(X + c.to(tl.int64) * S).to(COMPUTE))  # note [shifted statistics]
    mean = tl.zeros([], dtype=COMPUTE)  # of x - shift
    m2 = tl.zeros([], dtype=COMPUTE)
    count = tl.zeros([], dtype=tl.int64)
    for t in range(t0, tl.minimum(t0 + tiles_per_slice, tiles)):
        offs, mask, tile_count = _nchw_tile(t, c, N, C, S, s_tiles, BLOCK_N, BLOCK_S)
        x = tl.where(mask, tl.load(X + offs, mask=mask, other=0.0).to(COMPUTE) - shift, 0.0)
        tile_mean = exact_div(tl.sum(tl.sum(x, axis=1), axis=0), tile_count.to(COMPUTE))
        d = tl.where(mask, x - tile_mean, 0.0)
        tile_m2 = tl.sum(tl.sum(d * d, axis=1), axis=0)
        mean, m2, count = _chan_merge(mean, m2, count, tile_mean, tile_m2, tile_count)
    tl.store(WS_MEAN + pid, mean)  # pid == c * K + k
    tl.store(WS_M2 + pid, m2)
    tl.store(WS_COUNT + pid, count)


@triton.jit
def _stats_rows_kernel(
    X,  # [R, C] input, channels-last: R = N * S rows of C
    WS_MEAN,  # [K, C] COMPUTE: per slice of rows, each channel's mean less its shift
    WS_M2,  # [K, C] COMPUTE: per slice of rows, each channel's sum of squared deviations about it
    WS_COUNT,  # [K, C] int64: per slice of rows, the element count (its rows)
    R,  # rows
    C,  # channels
    rows_per_slice,  # a multiple of BLOCK_R; the last slice may hold fewer
    COMPUTE: tl.constexpr,  # math type: fp32, or fp64 for fp64 input
    BLOCK_R: tl.constexpr,  # rows per tile
    BLOCK_C: tl.constexpr,  # channels per tile, a power of 2
):
    k, cols, cmask, r_start, r_end = _rows_program(R, C, rows_per_slice, BLOCK_C)
    shift = _shift(tl.load(X + cols, mask=cmask, other=0.0).to(COMPUTE))  # note [shifted statistics]
    mean = tl.zeros([BLOCK_C], dtype=COMPUTE)  # of x - shift
    m2 = tl.zeros([BLOCK_C], dtype=COMPUTE)
    count = tl.zeros([], dtype=tl.int64)
    for r0 in range(r_start, r_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        mask = (rows < r_end)[:, None] & cmask[None, :]
        x = tl.load(X + rows[:, None] * C + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
        x = tl.where(mask, x - shift[None, :], 0.0)
        tile_count = tl.minimum(r_end - r0, BLOCK_R).to(tl.int64)
        tile_mean = exact_div(tl.sum(x, axis=0), tile_count.to(COMPUTE) + tl.zeros([BLOCK_C], dtype=COMPUTE))
        d = tl.where(mask, x - tile_mean[None, :], 0.0)
        tile_m2 = tl.sum(d * d, axis=0)
        mean, m2, count = _chan_merge(mean, m2, count, tile_mean, tile_m2, tile_count)
    out = k.to(tl.int64) * C + cols
    tl.store(WS_MEAN + out, mean, mask=cmask)
    tl.store(WS_M2 + out, m2, mask=cmask)
    tl.store(WS_COUNT + out, tl.zeros([BLOCK_C], dtype=tl.int64) + count, mask=cmask)


@triton.jit(do_not_specialize=["eps_bits", "momentum_bits"])
def _stats_merge_kernel(
    X,  # input, read unless EVAL: channel c's first element (its shift) at c * shift_stride
    WS_MEAN,  # [C, K] or [K, C] (strides stride_c, stride_k) COMPUTE partial means less the shift, read unless EVAL
    WS_M2,  # the same, partial sums of squared deviations
    WS_COUNT,  # the same, int64 partial counts
    RUNNING_MEAN,  # [C] running statistics' dtype, read when EVAL or HAS_RUNNING
    RUNNING_VAR,  # [C]
    MEAN,  # [C] stat dtype (= COMPUTE): the mean
    OUT2,  # [C] stat dtype: invstd when INVSTD, else m2
    NEW_RUNNING_MEAN,  # [C] running statistics' dtype, written when HAS_RUNNING (and not EVAL)
    NEW_RUNNING_VAR,  # [C]
    C,  # channels
    K,  # partials per channel
    stride_c,  # the workspace's strides (elements): (K, 1) for [C, K], (1, C) for [K, C]
    stride_k,
    shift_stride,  # S (NCHW) or 1 (rows of C)
    eps_bits,  # float64 eps, as int64 bits (see _f64)
    momentum_bits,  # float64 momentum, as int64 bits
    EVAL: tl.constexpr,  # statistics from the running ones, no partials
    HAS_RUNNING: tl.constexpr,  # training with running statistics to move
    INVSTD: tl.constexpr,  # OUT2 is invstd (batch_norm_fwd), else m2 (batch_norm_stats)
    COMPUTE: tl.constexpr,  # math type: fp32, or fp64 for fp64 input
    BLOCK_C: tl.constexpr,  # channels per program, a power of 2
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    eps = _f64(eps_bits).to(COMPUTE)
    if EVAL:
        mean = tl.load(RUNNING_MEAN + cols, mask=cmask, other=0.0).to(COMPUTE)
        var = tl.load(RUNNING_VAR + cols, mask=cmask, other=0.0).to(COMPUTE)
        tl.store(MEAN + cols, mean, mask=cmask)
        tl.store(OUT2 + cols, _invstd(var, eps), mask=cmask)
    else:
        ws = cols.to(tl.int64) * stride_c
        mean = tl.load(WS_MEAN + ws, mask=cmask, other=0.0)
        m2 = tl.load(WS_M2 + ws, mask=cmask, other=0.0)
        # Lanes past C count 2, so that no division of theirs is by zero.
        count = tl.load(WS_COUNT + ws, mask=cmask, other=2)
        for k in range(1, K):
            ws_k = ws + k * stride_k
            mean, m2, count = _chan_merge(mean, m2, count, tl.load(WS_MEAN + ws_k, mask=cmask, other=0.0),
                                          tl.load(WS_M2 + ws_k, mask=cmask, other=0.0),
                                          tl.load(WS_COUNT + ws_k, mask=cmask, other=2))
        mean = _shift(tl.load(X + cols.to(tl.int64) * shift_stride, mask=cmask, other=0.0).to(COMPUTE)) + mean
        tl.store(MEAN + cols, mean, mask=cmask)
        n = count.to(COMPUTE)
        if INVSTD:
            tl.store(OUT2 + cols, _invstd(exact_div(m2, n), eps), mask=cmask)
        else:
            tl.store(OUT2 + cols, m2, mask=cmask)
        if HAS_RUNNING:
            momentum = _f64(momentum_bits).to(COMPUTE)
            rm = tl.load(RUNNING_MEAN + cols, mask=cmask, other=0.0).to(COMPUTE)
            rv = tl.load(RUNNING_VAR + cols, mask=cmask, other=0.0).to(COMPUTE)
            unbiased = exact_div(m2, n - 1.0)  # count 1: 0 / 0, nan as torch
            _store(NEW_RUNNING_MEAN + cols, (1.0 - momentum) * rm + momentum * mean, cmask)
            _store(NEW_RUNNING_VAR + cols, (1.0 - momentum) * rv + momentum * unbiased, cmask)


@triton.jit
def _bwd_reduce_nchw_kernel(
    DY,  # [N, C, S] grad_out, NCHW-contiguous
    X,  # [N, C, S] input, NCHW-contiguous
    MEAN,  # [C] stat dtype
    WS_DY,  # [C, K] COMPUTE: per slice, sum(dy)
    WS_DY_XMU,  # [C, K] COMPUTE: per slice, sum(dy * (x - mean))
    N,  # batch size
    C,  # channels
    S,  # elements per plane
    K,  # slices per channel
    s_tiles,  # cdiv(S, BLOCK_S)
    tiles,  # tiles per channel
    tiles_per_slice,  # the last slice may hold fewer
    COMPUTE: tl.constexpr,  # math type: fp32, or fp64 for fp64 input
    BLOCK_N: tl.constexpr,  # planes per tile
    BLOCK_S: tl.constexpr,  # positions per tile, a power of 2
):
    pid = tl.program_id(0)
    c = pid // K
    k = pid - c * K
    t0 = k * tiles_per_slice
    mean = tl.load(MEAN + c).to(COMPUTE)
    acc_dy = tl.zeros([BLOCK_N, BLOCK_S], dtype=COMPUTE)
    acc_dy_xmu = tl.zeros([BLOCK_N, BLOCK_S], dtype=COMPUTE)
    for t in range(t0, tl.minimum(t0 + tiles_per_slice, tiles)):
        offs, mask, _ = _nchw_tile(t, c, N, C, S, s_tiles, BLOCK_N, BLOCK_S)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(COMPUTE)
        x = tl.load(X + offs, mask=mask, other=0.0).to(COMPUTE)
        acc_dy += dy
        acc_dy_xmu += dy * tl.where(mask, x - mean, 0.0)
    tl.store(WS_DY + pid, tl.sum(tl.sum(acc_dy, axis=1), axis=0))  # pid == c * K + k
    tl.store(WS_DY_XMU + pid, tl.sum(tl.sum(acc_dy_xmu, axis=1), axis=0))


@triton.jit
def _bwd_reduce_rows_kernel(
    DY,  # [R, C] grad_out, channels-last
    X,  # [R, C] input, channels-last
    MEAN,  # [C] stat dtype
    WS_DY,  # [K, C] COMPUTE: per slice of rows, sum(dy)
    WS_DY_XMU,  # [K, C] COMPUTE: per slice of rows, sum(dy * (x - mean))
    R,  # rows (N * S)
    C,  # channels
    rows_per_slice,  # a multiple of BLOCK_R; the last slice may hold fewer
    COMPUTE: tl.constexpr,  # math type: fp32, or fp64 for fp64 input
    BLOCK_R: tl.constexpr,  # rows per tile
    BLOCK_C: tl.constexpr,  # channels per program, a power of 2
):
    k, cols, cmask, r_start, r_end = _rows_program(R, C, rows_per_slice, BLOCK_C)
    mean = tl.load(MEAN + cols, mask=cmask, other=0.0).to(COMPUTE)
    acc_dy = tl.zeros([BLOCK_R, BLOCK_C], dtype=COMPUTE)
    acc_dy_xmu = tl.zeros([BLOCK_R, BLOCK_C], dtype=COMPUTE)
    for r0 in range(r_start, r_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        mask = (rows < r_end)[:, None] & cmask[None, :]
        offs = rows[:, None] * C + cols[None, :]
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(COMPUTE)
        x = tl.load(X + offs, mask=mask, other=0.0).to(COMPUTE)
        acc_dy += dy
        acc_dy_xmu += dy * tl.where(mask, x - mean[None, :], 0.0)
    out = k.to(tl.int64) * C + cols
    tl.store(WS_DY + out, tl.sum(acc_dy, axis=0), mask=cmask)
    tl.store(WS_DY_XMU + out, tl.sum(acc_dy_xmu, axis=0), mask=cmask)


@triton.jit(do_not_specialize=["count"])  # a count of 1 stays a tensor (count.to below)
def _bwd_merge_kernel(
    WS_DY,  # [C, K] or [K, C] (strides stride_c, stride_k) COMPUTE partial sums of dy
    WS_DY_XMU,  # the same, of dy * (x - mean)
    INVSTD,  # [C] stat dtype, read when WANT_DW
    SUM_DY,  # [C] stat dtype, written when SUMS
    SUM_DY_XMU,  # [C] stat dtype, written when SUMS
    GRAD_WEIGHT,  # [C] weight's dtype, written when WANT_DW: sum_dy_xmu * invstd
    GRAD_BIAS,  # [C] weight's dtype (input's without weight), written when WANT_DB: sum_dy
    MEAN_DY,  # [C] COMPUTE, written when MEANS: sum_dy / count
    MEAN_DY_XMU,  # [C] COMPUTE, written when MEANS: sum_dy_xmu / count
    C,  # channels
    K,  # partials per channel
    stride_c,  # the workspace's strides (elements): (K, 1) for [C, K], (1, C) for [K, C]
    stride_k,
    count,  # elements per channel (N * S)
    SUMS: tl.constexpr,  # batch_norm_backward_reduce: write SUM_DY, SUM_DY_XMU
    WANT_DW: tl.constexpr,
    WANT_DB: tl.constexpr,
    MEANS: tl.constexpr,  # batch_norm_bwd's training dx: write MEAN_DY, MEAN_DY_XMU
    COMPUTE: tl.constexpr,  # math type: fp32, or fp64 for fp64 input
    BLOCK_C: tl.constexpr,  # channels per program, a power of 2
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    ws = cols.to(tl.int64) * stride_c
    sum_dy = tl.load(WS_DY + ws, mask=cmask, other=0.0)
    sum_dy_xmu = tl.load(WS_DY_XMU + ws, mask=cmask, other=0.0)
    for k in range(1, K):
        sum_dy += tl.load(WS_DY + ws + k * stride_k, mask=cmask, other=0.0)
        sum_dy_xmu += tl.load(WS_DY_XMU + ws + k * stride_k, mask=cmask, other=0.0)
    if SUMS:
        tl.store(SUM_DY + cols, sum_dy, mask=cmask)
        tl.store(SUM_DY_XMU + cols, sum_dy_xmu, mask=cmask)
    if WANT_DW:
        _store(GRAD_WEIGHT + cols, sum_dy_xmu * tl.load(INVSTD + cols, mask=cmask, other=0.0).to(COMPUTE), cmask)
    if WANT_DB:
        _store(GRAD_BIAS + cols, sum_dy, cmask)
    if MEANS:
        n = count.to(COMPUTE) + tl.zeros([BLOCK_C], dtype=COMPUTE)
        tl.store(MEAN_DY + cols, exact_div(sum_dy, n), mask=cmask)
        tl.store(MEAN_DY_XMU + cols, exact_div(sum_dy_xmu, n), mask=cmask)


@triton.jit
def _elem_tile(M, L, C, CHANNELS_LAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr):
    # This program's [BLOCK_M, BLOCK_L] tile of the [M, L] input: (offsets,
    # mask, channel of each row ([BLOCK_M, 1], NCHW) or column ([1, BLOCK_L],
    # channels-last), its mask).
    pid = tl.program_id(0)
    l_blocks = tl.cdiv(L, BLOCK_L)
    mb = pid // l_blocks
    rows = mb.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid - mb * l_blocks) * BLOCK_L + tl.arange(0, BLOCK_L)
    mask = (rows < M)[:, None] & (cols < L)[None, :]
    offs = rows[:, None] * L + cols[None, :]
    if CHANNELS_LAST:
        ch = cols[None, :]
        ch_mask = (cols < L)[None, :]
    else:
        ch = (rows % C)[:, None]
        ch_mask = (rows < M)[:, None]
    return offs, mask, ch, ch_mask


@triton.jit
def _elemt_kernel(
    X,  # [M, L] input: NCHW [N * C, S] or channels-last [N * S, C]
    Y,  # [M, L] output, X's layout and dtype
    MEAN,  # [C] stat dtype
    INVSTD,  # [C] stat dtype
    W,  # [C] weight, read when HAS_W
    B,  # [C] bias, read when HAS_B
    M,  # rows
    L,  # row length
    C,  # channels (NCHW: channel = row % C; channels-last: L == C, channel = column)
    CHANNELS_LAST: tl.constexpr,  # rows of C (channel = column), else planes of S (channel = row % C)
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    COMPUTE: tl.constexpr,  # math type: fp32, or fp64 for fp64 input
    BLOCK_M: tl.constexpr,  # rows per tile
    BLOCK_L: tl.constexpr,  # columns per tile, a power of 2
):
    offs, mask, ch, ch_mask = _elem_tile(M, L, C, CHANNELS_LAST, BLOCK_M, BLOCK_L)
    mean = tl.load(MEAN + ch, mask=ch_mask, other=0.0).to(COMPUTE)
    scale = tl.load(INVSTD + ch, mask=ch_mask, other=0.0).to(COMPUTE)
    if HAS_W:
        scale = scale * tl.load(W + ch, mask=ch_mask, other=0.0).to(COMPUTE)
    x = tl.load(X + offs, mask=mask, other=0.0).to(COMPUTE)
    y = (x - mean) * scale
    if HAS_B:
        y = y + tl.load(B + ch, mask=ch_mask, other=0.0).to(COMPUTE)
    _store(Y + offs, y, mask)


@triton.jit
def _bwd_elemt_kernel(
    DY,  # [M, L] grad_out, X's layout
    X,  # [M, L] input, read when TRAINING
    DX,  # [M, L] grad_input, X's layout and dtype
    MEAN,  # [C] stat dtype, read when TRAINING
    INVSTD,  # [C] stat dtype
    W,  # [C] weight, read when HAS_W
    MEAN_DY,  # [C] stat dtype, read when TRAINING: sum_dy / count
    MEAN_DY_XMU,  # [C] stat dtype, read when TRAINING: sum_dy_xmu / count
    M,  # rows
    L,  # row length
    C,  # channels
    CHANNELS_LAST: tl.constexpr,  # rows of C (channel = column), else planes of S (channel = row % C)
    HAS_W: tl.constexpr,
    TRAINING: tl.constexpr,  # the statistics were the batch's: dx carries the reduction terms
    COMPUTE: tl.constexpr,  # math type: fp32, or fp64 for fp64 input
    BLOCK_M: tl.constexpr,  # rows per tile
    BLOCK_L: tl.constexpr,  # columns per tile, a power of 2
):
    offs, mask, ch, ch_mask = _elem_tile(M, L, C, CHANNELS_LAST, BLOCK_M, BLOCK_L)
    invstd = tl.load(INVSTD + ch, mask=ch_mask, other=0.0).to(COMPUTE)
    scale = invstd
    if HAS_W:
        scale = invstd * tl.load(W + ch, mask=ch_mask, other=0.0).to(COMPUTE)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(COMPUTE)
    if TRAINING:
        mean = tl.load(MEAN + ch, mask=ch_mask, other=0.0).to(COMPUTE)
        mean_dy = tl.load(MEAN_DY + ch, mask=ch_mask, other=0.0).to(COMPUTE)
        proj = invstd * invstd * tl.load(MEAN_DY_XMU + ch, mask=ch_mask, other=0.0).to(COMPUTE)
        x = tl.load(X + offs, mask=mask, other=0.0).to(COMPUTE)
        dx = (dy - mean_dy - (x - mean) * proj) * scale
    else:
        dx = dy * scale
    _store(DX + offs, dx, mask)


# -- host code -----------------------------------------------------------------


class _Dims(NamedTuple):
    N: int
    C: int
    S: int
    channels_last: bool  # element (n, c, s) at (n * S + s) * C + c, else (n * C + c) * S + s

    @property
    def count(self) -> int:
        return self.N * self.S

    @property
    def rows(self) -> bool:
        # Read as N * S rows of C: channels-last, or NCHW with S == 1 (the same addresses).
        return self.channels_last or self.S == 1


def _channels_last_order(dim: int) -> list[int]:
    return [0] + list(range(2, dim)) + [1]


def _is_channels_last(t: torch.Tensor) -> bool:
    return t.dim() >= 3 and t.permute(_channels_last_order(t.dim())).is_contiguous()


def _layout(input: torch.Tensor) -> tuple[torch.Tensor, _Dims]:
    """The input in a layout the kernels read, and its dims (batch_norm_layout of csrc/batch_norm_host.cpp)."""
    n, c = input.shape[0], input.shape[1]
    s = 1
    for d in input.shape[2:]:
        s *= d
    if input.is_contiguous():
        return input, _Dims(n, c, s, False)
    if _is_channels_last(input):
        return input, _Dims(n, c, s, True)
    return input.contiguous(), _Dims(n, c, s, False)


def _match_layout(t: torch.Tensor, dims: _Dims) -> torch.Tensor:
    """`t` (shaped like the input) in dims' layout: itself when it already is, else a copy."""
    if not dims.channels_last:
        return t.contiguous()
    if _is_channels_last(t) and not t.is_contiguous():
        return t
    order = _channels_last_order(t.dim())
    back = [order.index(i) for i in range(t.dim())]
    return torch.empty([t.shape[i] for i in order], dtype=t.dtype, device=t.device).permute(back).copy_(t)


def _channel(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A per-channel tensor (C elements, any shape and strides) as a dense [C]."""
    return None if t is None else t.reshape(-1).contiguous()


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _compute(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _bits(x: float) -> int:
    """A float64's bits as a signed int64 (read back by _f64)."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _programs(device: torch.device) -> int:
    """Partials programs a reduction aims for on `device` (note [deterministic batch norm])."""
    if device.type == "cuda" and not interpret():
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device()) * _PROGRAMS_PER_SM
    return _INTERPRET_SMS * _PROGRAMS_PER_SM


class _Reduce(NamedTuple):
    """A reduction's slicing: the partials kernel's grid and tiles, the workspace's shape and strides."""
    grid: tuple[int]
    K: int  # partials per channel
    ws_shape: tuple[int, int]
    stride_c: int
    stride_k: int
    args: tuple  # the partials kernel's arguments after the workspace pointers
    meta: dict  # its tile constexprs and num_warps


def _reduce_plan(dims: _Dims, device: torch.device) -> _Reduce:
    N, C, S = dims.N, dims.C, dims.S
    target = _programs(device)
    if dims.rows:
        R = N * S
        block_c = min(triton.next_power_of_2(C), _MAX_BLOCK_C)
        block_r = max(1, min(triton.next_power_of_2(R), _REDUCE_TILE // block_c))
        c_blocks = triton.cdiv(C, block_c)
        r_tiles = triton.cdiv(R, block_r)
        k = min(r_tiles, max(1, triton.cdiv(target, c_blocks)))
        per_slice = triton.cdiv(r_tiles, k)
        k = triton.cdiv(r_tiles, per_slice)  # no empty slice
        meta = dict(BLOCK_R=block_r, BLOCK_C=block_c, num_warps=_warps(block_r * block_c))
        return _Reduce((k * c_blocks,), k, (k, C), 1, C, (R, C, per_slice * block_r), meta)
    block_s = min(triton.next_power_of_2(S), _REDUCE_TILE)
    block_n = max(1, min(triton.next_power_of_2(N), _REDUCE_TILE // block_s))
    s_tiles = triton.cdiv(S, block_s)
    tiles = triton.cdiv(N, block_n) * s_tiles
    k = min(tiles, max(1, triton.cdiv(target, C)))
    per_slice = triton.cdiv(tiles, k)
    k = triton.cdiv(tiles, per_slice)
    meta = dict(BLOCK_N=block_n, BLOCK_S=block_s, num_warps=_warps(block_n * block_s))
    return _Reduce((C * k,), k, (C, k), k, 1, (N, C, S, k, s_tiles, tiles, per_slice), meta)


def _warps(tile: int) -> int:
    return max(1, min(_REDUCE_WARPS, tile // 256))


def _elem_plan(dims: _Dims) -> tuple[tuple[int], tuple[int, int, int], dict]:
    """(grid, (M, L, C), constexprs and num_warps) of an elementwise kernel."""
    N, C, S = dims.N, dims.C, dims.S
    if dims.rows:
        m, l = N * S, C
        block_l = min(triton.next_power_of_2(C), _MAX_BLOCK_C)
    else:
        m, l = N * C, S
        block_l = min(triton.next_power_of_2(S), _ELEM_TILE)
    block_m = max(1, min(triton.next_power_of_2(m), _ELEM_TILE // block_l))
    grid = (triton.cdiv(m, block_m) * triton.cdiv(l, block_l),)
    meta = dict(CHANNELS_LAST=dims.rows, BLOCK_M=block_m, BLOCK_L=block_l,
                num_warps=max(1, min(_ELEM_WARPS, block_m * block_l // 256)),
                enable_fp_fusion=False)  # note [exact fp32]: no contraction into fmas, the interpreter's bits
    return grid, (m, l, C), meta


def _stats(x: torch.Tensor, dims: _Dims, out2: torch.Tensor, mean: torch.Tensor, invstd: bool,
           running_mean: Optional[torch.Tensor] = None, running_var: Optional[torch.Tensor] = None,
           new_running_mean: Optional[torch.Tensor] = None, new_running_var: Optional[torch.Tensor] = None,
           momentum: float = 0.0, eps: float = 0.0) -> None:
    """Per-channel mean and invstd (or m2) of x into mean and out2, the running statistics moved (count > 0)."""
    plan = _reduce_plan(dims, x.device)
    compute = _compute(x.dtype)
    ws_mean = torch.empty(plan.ws_shape, dtype=mean.dtype, device=x.device)
    ws_m2 = torch.empty(plan.ws_shape, dtype=mean.dtype, device=x.device)
    ws_count = torch.empty(plan.ws_shape, dtype=torch.int64, device=x.device)
    kernel = _stats_rows_kernel if dims.rows else _stats_nchw_kernel
    launch(kernel, x)[plan.grid](x, ws_mean, ws_m2, ws_count, *plan.args, COMPUTE=compute, **plan.meta)
    launch(_stats_merge_kernel, x)[(triton.cdiv(dims.C, _MERGE_BLOCK_C),)](
        x, ws_mean, ws_m2, ws_count, running_mean, running_var, mean, out2, new_running_mean, new_running_var,
        dims.C, plan.K, plan.stride_c, plan.stride_k, 1 if dims.rows else dims.S, _bits(eps), _bits(momentum),
        EVAL=False, HAS_RUNNING=running_mean is not None, INVSTD=invstd, COMPUTE=compute, BLOCK_C=_MERGE_BLOCK_C,
        num_warps=4)


def _bwd_sums(dy: torch.Tensor, x: torch.Tensor, dims: _Dims, mean: torch.Tensor, *,
              sums: Optional[tuple[torch.Tensor, torch.Tensor]] = None, invstd: Optional[torch.Tensor] = None,
              grad_weight: Optional[torch.Tensor] = None, grad_bias: Optional[torch.Tensor] = None,
              means: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> None:
    """sum(dy) and sum(dy * (x - mean)) per channel (count > 0), into whichever of the outputs are given."""
    plan = _reduce_plan(dims, x.device)
    compute = _compute(x.dtype)
    sd = _stat_dtype(x.dtype)
    ws_dy = torch.empty(plan.ws_shape, dtype=sd, device=x.device)
    ws_dy_xmu = torch.empty(plan.ws_shape, dtype=sd, device=x.device)
    kernel = _bwd_reduce_rows_kernel if dims.rows else _bwd_reduce_nchw_kernel
    launch(kernel, x)[plan.grid](dy, x, mean, ws_dy, ws_dy_xmu, *plan.args, COMPUTE=compute, **plan.meta)
    sum_dy, sum_dy_xmu = sums if sums is not None else (None, None)
    mean_dy, mean_dy_xmu = means if means is not None else (None, None)
    launch(_bwd_merge_kernel, x)[(triton.cdiv(dims.C, _MERGE_BLOCK_C),)](
        ws_dy, ws_dy_xmu, invstd, sum_dy, sum_dy_xmu, grad_weight, grad_bias, mean_dy, mean_dy_xmu, dims.C, plan.K,
        plan.stride_c, plan.stride_k, dims.count, SUMS=sums is not None, WANT_DW=grad_weight is not None,
        WANT_DB=grad_bias is not None, MEANS=means is not None, COMPUTE=compute, BLOCK_C=_MERGE_BLOCK_C,
        num_warps=4)


def _elemt(x: torch.Tensor, dims: _Dims, y: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
           weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> None:
    grid, sizes, meta = _elem_plan(dims)
    launch(_elemt_kernel, x)[grid](x, y, mean, invstd, weight, bias, *sizes, HAS_W=weight is not None, HAS_B=bias is not None,
                        COMPUTE=_compute(x.dtype), **meta)


def _bwd_elemt(dy: torch.Tensor, x: torch.Tensor, dims: _Dims, dx: torch.Tensor, mean: torch.Tensor,
               invstd: torch.Tensor, weight: Optional[torch.Tensor], mean_dy: Optional[torch.Tensor],
               mean_dy_xmu: Optional[torch.Tensor], training: bool) -> None:
    grid, sizes, meta = _elem_plan(dims)
    launch(_bwd_elemt_kernel, x)[grid](dy, x, dx, mean, invstd, weight, mean_dy, mean_dy_xmu, *sizes, HAS_W=weight is not None,
                            TRAINING=training, COMPUTE=_compute(x.dtype), **meta)


def batch_norm_fwd_triton(input: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                          running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor], training: bool,
                          momentum: float, eps: float
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, save_mean, save_invstd, new_running_mean, new_running_var) of BatchNorm
    (the contract of torch.ops.pyoptim.batch_norm_fwd)."""
    check_batch_norm_fwd_args("batch_norm_fwd", input, weight, bias, running_mean, running_var, training, True,
                              device_type_required())
    x, dims = _layout(input)
    device = input.device
    sd = _stat_dtype(input.dtype)
    y = torch.empty_like(x)
    save_mean = torch.empty(dims.C, dtype=sd, device=device)
    save_invstd = torch.empty(dims.C, dtype=sd, device=device)
    moved = training and running_mean is not None
    # Not moved: empty [0] tensors of the input's dtype, as the CPU and CUDA ops return them.
    new_rm = torch.empty(dims.C if moved else 0, dtype=running_mean.dtype if moved else input.dtype, device=device)
    new_rv = torch.empty(dims.C if moved else 0, dtype=running_var.dtype if moved else input.dtype, device=device)
    if dims.C == 0:
        return y, save_mean, save_invstd, new_rm, new_rv
    w, b, rm, rv = _channel(weight), _channel(bias), _channel(running_mean), _channel(running_var)
    with on_device(device):
        if training and dims.count == 0:
            # Statistics of nothing: zeros, and the running statistics as they were (as torch leaves them).
            save_mean.zero_()
            save_invstd.zero_()
            if moved:
                new_rm.copy_(rm)
                new_rv.copy_(rv)
            return y, save_mean, save_invstd, new_rm, new_rv
        if training:
            _stats(x, dims, save_invstd, save_mean, True, rm, rv, new_rm if moved else None,
                   new_rv if moved else None, momentum, eps)
        else:
            launch(_stats_merge_kernel, x)[(triton.cdiv(dims.C, _MERGE_BLOCK_C),)](
                None, None, None, None, rm, rv, save_mean, save_invstd, None, None, dims.C, 0, 0, 0, 0, _bits(eps),
                _bits(momentum), EVAL=True, HAS_RUNNING=False, INVSTD=True, COMPUTE=_compute(input.dtype),
                BLOCK_C=_MERGE_BLOCK_C, num_warps=4)
        if dims.count > 0:
            _elemt(x, dims, y, save_mean, save_invstd, w, b)
    return y, save_mean, save_invstd, new_rm, new_rv


def batch_norm_bwd_triton(grad_out: torch.Tensor, input: torch.Tensor, weight: Optional[torch.Tensor],
                          save_mean: torch.Tensor, save_invstd: torch.Tensor, training: bool,
                          output_mask: Sequence[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_input, grad_weight, grad_bias) of BatchNorm (torch.ops.pyoptim.batch_norm_bwd)."""
    check_batch_norm_bwd_args(grad_out, input, weight, save_mean, save_invstd, training, device_type_required())
    x, dims = _layout(input)
    device = input.device
    want_dx = bool(output_mask[0])
    want_dw = bool(output_mask[1]) and weight is not None
    want_db = bool(output_mask[2])
    wdtype = weight.dtype if weight is not None else input.dtype
    dx = torch.empty_like(x) if want_dx else torch.empty(0, dtype=input.dtype, device=device)
    # Masked off: empty [0] tensors of the input's dtype, as the CPU and CUDA ops return them.
    dw = torch.empty(dims.C if want_dw else 0, dtype=wdtype if want_dw else input.dtype, device=device)
    db = torch.empty(dims.C if want_db else 0, dtype=wdtype if want_db else input.dtype, device=device)
    if dims.C == 0:
        return dx, dw, db
    with on_device(device):
        if dims.count == 0:
            dw.zero_()  # sums over no elements
            db.zero_()
            return dx, dw, db
        dy = _match_layout(grad_out, dims)
        w, mean, invstd = _channel(weight), _channel(save_mean), _channel(save_invstd)
        means = None
        if want_dx and training:
            terms = torch.empty((2, dims.C), dtype=_stat_dtype(input.dtype), device=device)
            means = (terms[0], terms[1])
        if want_dw or want_db or means is not None:
            _bwd_sums(dy, x, dims, mean, invstd=invstd, grad_weight=dw if want_dw else None,
                      grad_bias=db if want_db else None, means=means)
        if want_dx:
            _bwd_elemt(dy, x, dims, dx, mean, invstd, w, *(means or (None, None)), training)
    return dx, dw, db


def batch_norm_stats_triton(input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, m2) per channel, m2 = sum((x - mean)^2) (torch.ops.pyoptim.batch_norm_stats)."""
    check_batch_norm_stats_args(input, device_type_required())
    x, dims = _layout(input)
    sd = _stat_dtype(input.dtype)
    mean = torch.empty(dims.C, dtype=sd, device=input.device)
    m2 = torch.empty(dims.C, dtype=sd, device=input.device)
    if dims.C == 0:
        return mean, m2
    with on_device(input.device):
        if dims.count == 0:
            mean.zero_()  # Welford's state of no elements
            m2.zero_()
        else:
            _stats(x, dims, m2, mean, False)
    return mean, m2


def batch_norm_elemt_triton(input: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                            mean: torch.Tensor, invstd: torch.Tensor) -> torch.Tensor:
    """out = (x - mean) * invstd * weight + bias (torch.ops.pyoptim.batch_norm_elemt)."""
    check_batch_norm_elemt_args(input, weight, bias, mean, invstd, device_type_required())
    x, dims = _layout(input)
    y = torch.empty_like(x)
    if dims.C > 0 and dims.count > 0:
        with on_device(input.device):
            _elemt(x, dims, y, _channel(mean), _channel(invstd), _channel(weight), _channel(bias))
    return y


def batch_norm_backward_reduce_triton(grad_out: torch.Tensor, input: torch.Tensor, mean: torch.Tensor
                                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_dy, sum_dy_xmu) per channel (torch.ops.pyoptim.batch_norm_backward_reduce)."""
    check_batch_norm_backward_reduce_args(grad_out, input, mean, device_type_required())
    x, dims = _layout(input)
    sd = _stat_dtype(input.dtype)
    sum_dy = torch.empty(dims.C, dtype=sd, device=input.device)
    sum_dy_xmu = torch.empty(dims.C, dtype=sd, device=input.device)
    if dims.C == 0:
        return sum_dy, sum_dy_xmu
    with on_device(input.device):
        if dims.count == 0:
            sum_dy.zero_()
            sum_dy_xmu.zero_()
        else:
            _bwd_sums(_match_layout(grad_out, dims), x, dims, _channel(mean), sums=(sum_dy, sum_dy_xmu))
    return sum_dy, sum_dy_xmu


def batch_norm_backward_elemt_triton(grad_out: torch.Tensor, input: torch.Tensor, mean: torch.Tensor,
                                     invstd: torch.Tensor, weight: Optional[torch.Tensor], mean_dy: torch.Tensor,
                                     mean_dy_xmu: torch.Tensor) -> torch.Tensor:
    """grad_input = (dy - mean_dy - (x - mean) * invstd^2 * mean_dy_xmu) * invstd * weight
    (torch.ops.pyoptim.batch_norm_backward_elemt)."""
    check_batch_norm_backward_elemt_args(grad_out, input, mean, invstd, weight, mean_dy, mean_dy_xmu,
                                         device_type_required())
    x, dims = _layout(input)
    dx = torch.empty_like(x)
    if dims.C > 0 and dims.count > 0:
        with on_device(input.device):
            _bwd_elemt(_match_layout(grad_out, dims), x, dims, dx, _channel(mean), _channel(invstd),
                       _channel(weight), _channel(mean_dy), _channel(mean_dy_xmu), True)
    return dx


# note [triton ops] (kernels/_ops.py): the forward and backward launchers as dispatcher ops, with the C++ ops'
# schemas (the four SyncBatchNorm pieces stay plain launchers: its autograd.Function calls them eagerly).
register_op("batch_norm_fwd_triton", "(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean, "
            "Tensor? running_var, bool training, float momentum, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
            batch_norm_fwd_triton)
register_op("batch_norm_bwd_triton", "(Tensor grad_out, Tensor input, Tensor? weight, Tensor save_mean, "
            "Tensor save_invstd, bool training, bool[3] output_mask) -> (Tensor, Tensor, Tensor)",
            batch_norm_bwd_triton)
