"""BatchNorm's CPU kernels, the cases internal to them: the block partitions
(note [batch norm blocks] in csrc/cpu/batch_norm_cpu.h) against torch in
float64, results that do not depend on scheduling, the two layouts against
each other, and statistics of data far from 0. The ops' contract against
torch and the reference, every backend, is tests/test_batch_norm.py."""

from __future__ import annotations

import contextlib

import pytest
import torch

from pyoptim import _backends

pytestmark = pytest.mark.skipif(not _backends.EXTENSION_LOADED, reason="the C++ extension is not built")

EPS = 1e-5

# (shape, layout): what each one takes through the kernels.
CASES = [
    # C = 3 channels for 2 threads: each channel cut into 3 blocks (1 with one thread).
    ((2, 3, 20000), "nchw"),
    # One channel: all N * S elements one run, cut into blocks.
    ((1, 1, 100000), "nchw"),
    # Odd C and 49-element runs of a small tensor: sample-major (note [batch norm sample-major]), vector tails.
    ((8, 33, 7, 7), "nchw"),
    # Sample-major cut into 2 blocks mid-sample (63 runs: block 1 starts at channel 4 of sample 3).
    ((7, 9, 23, 23), "nchw"),
    # Sample-major with runs shorter than a vector (4 elements, masked) and 3 chunks per block.
    ((3000, 3, 2, 2), "nchw"),
    # Runs shorter than a line in a tensor past kBatchNormCpuSampleMajorBytes (9.4 MB): still sample-major.
    ((98304, 8, 3), "nchw"),
    # Runs of 1200 elements in 4.8 MB: channel-major with runs of 4.8 KB (past kBatchNormCpuShortRunBytes).
    ((32, 32, 1200), "nchw"),
    # (N, C): S = 1 read as rows of C (channels-last), 4 vectors and a tail of 7 channels.
    ((300, 71), "nchw"),
    # Channels-last rows cut into one block per thread; C = 8 is half a vector.
    ((4, 8, 64, 64), "cl"),
    # Channels-last 3-d with odd C (33: vectors and a scalar tail).
    ((3, 33, 6, 5, 7), "cl"),
    # 8.4 MB of output: y and dx take streaming stores.
    ((2, 16, 256, 256), "nchw"),
]


def _id(case):
    shape, layout = case
    return "x".join(map(str, shape)) + "-" + layout


@contextlib.contextmanager
def _threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _make(shape, layout, dtype=torch.float32, offset=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) + offset).to(dtype)
    if layout == "cl":
        # (N, C, *) with C innermost.
        order = (0,) + tuple(range(2, len(shape))) + (1,)
        back = [0] * len(shape)
        for i, d in enumerate(order):
            back[d] = i
        x = x.permute(order).contiguous().permute(back)
    return x


def _fwd_bwd(x, dy, w, b, rm, rv, training=True):
    ops = torch.ops.pyoptim
    out, mean, invstd, nrm, nrv = ops.batch_norm_fwd(x, w, b, rm, rv, training, 0.1, EPS)
    dx, dw, db = ops.batch_norm_bwd(dy, x, w, mean, invstd, training, [True, True, True])
    return [out, mean, invstd, nrm, nrv, dx, dw, db]


def _params(c, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(c, generator=g), torch.randn(c, generator=g), torch.randn(c, generator=g),
            torch.rand(c, generator=g) + 0.5)


@pytest.mark.parametrize("case", CASES, ids=_id)
@pytest.mark.parametrize("threads", [1, 2])
def test_blocks_match_float64(case, threads):
    """Every block partition's merged statistics, y and grads against torch run in float64."""
    shape, layout = case
    x, dy = _make(shape, layout), _make(shape, layout, seed=2)
    w, b, rm, rv = _params(shape[1])
    with _threads(threads):
        out, mean, invstd, nrm, nrv, dx, dw, db = _fwd_bwd(x, dy, w, b, rm, rv)
    rmd, rvd = rm.double(), rv.double()
    ro, rmean, rinv = torch.native_batch_norm(x.double(), w.double(), b.double(), rmd, rvd, True, 0.1, EPS)
    rdx, rdw, rdb = torch.ops.aten.native_batch_norm_backward(dy.double(), x.double(), w.double(), None, None, rmean,
                                                               rinv, True, EPS, [True, True, True])
    count = x.numel() // shape[1]
    for got, want, scale in [(out, ro, 1), (mean, rmean, 1), (invstd, rinv, 1), (nrm, rmd, 1), (nrv, rvd, 1),
                             (dx, rdx, 1), (dw, rdw, count ** 0.5), (db, rdb, count ** 0.5)]:
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * scale)
    assert out.stride() == x.stride() and dx.stride() == x.stride()


@pytest.mark.parametrize("case", CASES[:6], ids=_id)
def test_repeatable(case):
    """The same bits on every call at a given thread count: fixed blocks, merged in a fixed order."""
    shape, layout = case
    x, dy = _make(shape, layout), _make(shape, layout, seed=2)
    w, b, rm, rv = _params(shape[1])
    for threads in (1, 2):
        with _threads(threads):
            first = _fwd_bwd(x, dy, w, b, rm, rv)
            for _ in range(3):
                again = _fwd_bwd(x, dy, w, b, rm, rv)
                for a, b_ in zip(first, again):
                    assert torch.equal(a, b_)


@pytest.mark.parametrize("shape", [(4, 8, 64, 64), (3, 33, 6, 5, 7), (5, 19, 40)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layouts_agree(shape, dtype):
    """NCHW and channels-last (two different kernels) give the same results up to rounding."""
    x_cl, dy_cl = _make(shape, "cl", dtype), _make(shape, "cl", dtype, seed=2)
    x, dy = x_cl.contiguous(), dy_cl.contiguous()
    assert not x_cl.is_contiguous()
    w, b, rm, rv = _params(shape[1])
    a = _fwd_bwd(x, dy, w, b, rm, rv)
    c = _fwd_bwd(x_cl, dy_cl, w, b, rm, rv)
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=2e-2)
    for p, q in zip(a, c):
        torch.testing.assert_close(p, q, **tol)


@pytest.mark.parametrize("shape,layout,first_off", [
    ((64, 3, 40, 40), "nchw", 0.0),  # channel-major (runs of 6.4 KB)
    ((64, 3, 20, 20), "nchw", 0.0),  # sample-major (note [batch norm sample-major])
    ((64, 3, 20, 20), "nchw", 10.0),  # sample-major, the first sample 10 std off the rest
    ((64, 3, 20, 20), "cl", 0.0),
], ids=["nchw-channel-major", "nchw-sample-major", "nchw-sample-major-first-sample-off", "cl"])
def test_mean_far_from_zero(shape, layout, first_off):
    """x = 1000 + randn: note [batch norm shift] keeps invstd to float32's rounding (unshifted
    chunk means merged in float32 lost a part in 1e6 here; a one-pass sum of squares loses all;
    a shift from the first sample alone lost 1e-6 when that sample sat 10 std off)."""
    x = _make(shape, layout, offset=1000.0)
    x[0] += first_off
    out, mean, invstd, _, _ = torch.ops.pyoptim.batch_norm_fwd(x, None, None, None, None, True, 0.1, EPS)
    ro, rmean, rinv = torch.native_batch_norm(x.double(), None, None, None, None, True, 0.1, EPS)
    assert ((invstd.double() - rinv) / rinv).abs().max() < 1e-6
    # mean to within an ulp of 1000 (6.1e-5), and y with it.
    assert (mean.double() - rmean).abs().max() < 6.2e-5
    assert (out.double() - ro).abs().max() < 1e-4


@pytest.mark.parametrize("shape,layout", [((8, 5, 7, 7), "nchw"), ((2, 3, 40, 40), "nchw"), ((8, 5, 7, 7), "cl"),
                                          ((6, 5), "nchw")],
                         ids=["nchw-sample-major", "nchw-channel-major", "cl", "rows"])
def test_nan_stays_in_its_channel(shape, layout):
    """A NaN in one channel's data makes that channel's statistics and output NaN, as torch's, and no other's."""
    x = _make(shape, layout)
    x[1, 2] = float("nan")
    out, mean, invstd, _, _ = torch.ops.pyoptim.batch_norm_fwd(x, None, None, None, None, True, 0.1, EPS)
    ro, rmean, rinv = torch.native_batch_norm(x, None, None, None, None, True, 0.1, EPS)
    for got, want in [(mean, rmean), (invstd, rinv), (out, ro)]:
        assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.isnan(mean).tolist() == [c == 2 for c in range(shape[1])]
