"""The benchmark harness: one module that every per-op script (bench_<op>.py) uses.

What it does, in order, for one run:

1. measures the device's memory bandwidth (the roofline): on CUDA a large
   device-to-device copy timed with CUDA events; on CPU an in-place update
   (`x.add_(1)` over 256 MB, read + write counted) and a copy, with torch's
   threads. The roofline is the copy number on CUDA and the in-place number
   on CPU (an optimizer step or a norm pass updates its buffers in place);
   both are reported.
2. for each op, each case and each provider (implementation): builds the
   inputs, sets the provider up, warms it up, and times one call: on CUDA with
   `triton.testing.do_bench` (median; torch.cuda.Event when Triton does not
   import), on CPU with time.perf_counter (median of many repeats, bounded by
   a time budget per measurement).
3. prints a table (case, impl, ms, GB/s, fraction of the roofline, speed-up
   over the op's baseline, usually torch's fused version; on CPU also minor
   page faults per call) and writes the rows, with the device name, torch
   version, pyoptim.backend_info(), git SHA and the measured bandwidth, as
   JSON plus a PNG bar plot: <out>/<op>_<device kind>.json / .png, fixed
   names so that a committed result is overwritten by the next run on that
   kind of device.

Adding an op: write benchmarks/bench_<op>.py that defines `OP = Op(...)` (see
bench_adam.py, about 100 lines); run.py finds it by its file name. An op
supplies its cases (the tensors it works on, as shapes: `PARAM_CASES` below
serve every optimizer-like op), a function that builds the inputs for a case,
the bytes one call must move, and its providers: a name and a `setup(inputs)`
returning the zero-argument callable that is timed.

note [CPU allocator]: with glibc's default malloc every freshly allocated
buffer over 32 MB is mmap'ed and munmap'ed on free, so a kernel that allocates
temporaries (torch's for-loop and foreach Adam) page-faults its whole
temporary in on every call and looks about 2x slower than it is in a training
loop with a caching allocator. On CPU the harness re-executes itself with
GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=16GiB
(freed memory stays with the process) unless --default-allocator is given,
and reports minor page faults per call so that the effect stays visible.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

try:
    import resource  # Unix only: minor page faults per call
except ImportError:  # pragma: no cover - Windows
    resource = None  # type: ignore[assignment]

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent

GLIBC_TUNABLES_KEEP_FREED = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184"

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}

# Timing settings per device and mode. CPU: seconds of warm-up and of timed
# repeats per measurement (the budget bounds the repeats, min_reps is always
# met); CUDA: do_bench's warm-up and repetition times, in ms.
CPU_TIMING = {
    "full": dict(warmup_s=0.25, budget_s=2.0, min_reps=5, max_reps=2000),
    "quick": dict(warmup_s=0.05, budget_s=0.3, min_reps=3, max_reps=200),
}
CUDA_TIMING = {
    "full": dict(warmup_ms=25, rep_ms=100),
    "quick": dict(warmup_ms=5, rep_ms=25),
}
# On CPU a call shorter than this is timed in batches of several calls, so
# that perf_counter's resolution and overhead stay below 1%.
CPU_MIN_SAMPLE_S = 200e-6


# --------------------------------------------------------------------------
# Cases, providers, ops
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """The tensors one call works on, as shapes (an op decides what they mean)."""

    name: str
    shapes: tuple[tuple[int, ...], ...]
    description: str

    @property
    def numel(self) -> int:
        """Elements over all tensors."""
        return sum(math.prod(s) for s in self.shapes)

    @property
    def ntensors(self) -> int:
        """How many tensors."""
        return len(self.shapes)


def gpt2_like_shapes(n_layer: int = 3, d: int = 768, vocab: int = 8192, n_ctx: int = 1024) -> tuple[tuple[int, ...], ...]:
    """GPT-2-small's parameter list (token and position embeddings, per layer ln/qkv/proj/ln/mlp, final ln)."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (n_ctx, d)]
    for _ in range(n_layer):
        shapes += [
            (d,), (d,),                  # ln_1 weight, bias
            (d, 3 * d), (3 * d,),        # attn.c_attn (qkv)
            (d, d), (d,),                # attn.c_proj
            (d,), (d,),                  # ln_2
            (d, 4 * d), (4 * d,),        # mlp.c_fc
            (4 * d, d), (d,),            # mlp.c_proj
        ]
    shapes += [(d,), (d,)]               # ln_f
    return tuple(shapes)


# The parameter lists every optimizer-like op (Adam, SGD, clip_grad_norm_)
# runs on. large and many_small hold about the same number of elements (16.8M
# and 16.4M): their difference is the cost of many tensors, where multi-tensor
# launches pay. transformer is GPT-2-small's layout with the vocabulary cut to
# 8192 and 3 layers (28.3M params, 40 tensors from 768 to 6.3M elements), so
# that a CPU run stays quick; the full model (124M) would add nothing but time.
PARAM_CASES: dict[str, Case] = {
    c.name: c
    for c in (
        Case("large", ((16 * 2**20,),), "one tensor of 16M elements"),
        Case("many_small", ((8192,),) * 2000, "2,000 tensors of 8,192 elements"),
        Case("transformer", gpt2_like_shapes(), "GPT-2-small layout, vocab 8192, 3 layers"),
    )
}


@dataclass
class Provider:
    """One implementation of an op: `setup(inputs)` returns the zero-argument callable that is timed."""

    name: str
    family: str  # "pyoptim", "torch" or "peer": ordering and plot colours
    setup: Callable[[Any], Callable[[], Any]]
    # Why it cannot run here (a missing package, a backend not built), or None.
    unavailable: Optional[str] = None
    # False: runs only when --impls names it exactly (e.g. Triton's CPU interpreter).
    default: bool = True


@dataclass
class Op:
    """An op to benchmark: its cases, how to build inputs, the bytes it must move, and its providers."""

    name: str
    description: str
    cases: dict[str, Case]
    # (case, device, dtype, opts) -> inputs, shared by every provider (each copies what it writes).
    make_inputs: Callable[[Case, Any, Any, argparse.Namespace], Any]
    # (case, dtype, opts) -> bytes one call must read plus write.
    bytes_moved: Callable[[Case, Any, argparse.Namespace], int]
    # (device, opts) -> every provider worth listing on this device, available or not.
    providers: Callable[[Any, argparse.Namespace], list[Provider]]
    default_cases: Sequence[str] = ()
    baseline: str = "torch-fused"
    # Adds op-specific options (like --amsgrad) to the command line.
    add_arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None
    # Describes op-specific settings for the results' metadata.
    settings: Optional[Callable[[argparse.Namespace], dict]] = None


def discover_ops() -> dict[str, Op]:
    """Every `OP` defined by a benchmarks/bench_<name>.py, by op name."""
    ops: dict[str, Op] = {}
    for path in sorted(BENCH_DIR.glob("bench_*.py")):
        spec = importlib.util.spec_from_file_location(f"_pyoptim_bench_{path.stem}", path)
        mod = importlib.util.module_from_spec(spec)
        assert spec.loader is not None
        spec.loader.exec_module(mod)
        op = getattr(mod, "OP", None)
        if isinstance(op, Op):
            ops[op.name] = op
    return ops


# --------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------

@dataclass
class Timing:
    """A measurement: median and spread in ms, repeats, and (CPU) minor page faults per call."""

    ms: float
    ms_min: Optional[float] = None
    ms_q1: Optional[float] = None
    ms_q3: Optional[float] = None
    reps: Optional[int] = None
    calls_per_sample: int = 1
    minflt_per_call: Optional[float] = None
    method: str = ""


def _quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def _minflt() -> Optional[int]:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else None


def time_cpu(fn: Callable[[], Any], *, warmup_s: float, budget_s: float, min_reps: int, max_reps: int) -> Timing:
    """Median wall time of fn() with time.perf_counter: warm-up, then repeats until the budget is spent."""
    # Warm-up: at least two calls (the first one usually allocates state).
    t_end = time.perf_counter() + warmup_s
    n = 0
    t_call = math.inf
    while n < 2 or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        t_call = min(t_call, time.perf_counter() - t0)
        n += 1
    inner = max(1, math.ceil(CPU_MIN_SAMPLE_S / max(t_call, 1e-9)))
    samples: list[float] = []
    f0 = _minflt()
    t_stop = time.perf_counter() + budget_s
    while len(samples) < max_reps and (len(samples) < min_reps or time.perf_counter() < t_stop):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) / inner)
    f1 = _minflt()
    ms = [s * 1e3 for s in samples]
    q1, q3 = _quartiles(ms)
    return Timing(
        ms=statistics.median(ms), ms_min=min(ms), ms_q1=q1, ms_q3=q3, reps=len(ms), calls_per_sample=inner,
        minflt_per_call=None if f0 is None else (f1 - f0) / (len(samples) * inner),
        method="perf_counter median",
    )


def _triton_testing():
    try:
        import triton.testing
    except Exception:  # absent or broken: fall back to torch.cuda.Event
        return None
    return triton.testing


def time_cuda(fn: Callable[[], Any], *, warmup_ms: float, rep_ms: float) -> Timing:
    """Median time of fn() from CUDA events: triton.testing.do_bench when Triton imports, else a torch.cuda.Event loop."""
    import torch

    fn()
    fn()  # state allocation stays out of do_bench's runtime estimate
    torch.cuda.synchronize()
    tt = _triton_testing()
    if tt is not None:
        try:
            times = tt.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")
        except (AssertionError, TypeError, ValueError):  # an older Triton without return_mode="all"
            times = None
        if isinstance(times, list) and times:
            q1, q3 = _quartiles(times)
            return Timing(ms=statistics.median(times), ms_min=min(times), ms_q1=q1, ms_q3=q3, reps=len(times),
                          method="triton.testing.do_bench median")
        ms = tt.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
        return Timing(ms=float(ms), method="triton.testing.do_bench median")
    # torch.cuda.Event fallback, flushing L2 between calls as do_bench does.
    flush = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device="cuda")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        fn()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end) / 3, 1e-3)
    for _ in range(max(1, int(warmup_ms / est))):
        fn()
    n = max(5, int(rep_ms / est))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for s, e in zip(starts, ends):
        flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    q1, q3 = _quartiles(times)
    return Timing(ms=statistics.median(times), ms_min=min(times), ms_q1=q1, ms_q3=q3, reps=n,
                  method="torch.cuda.Event median")


def time_fn(fn: Callable[[], Any], device, mode: str) -> Timing:
    """Time fn() on `device` with the settings of `mode` ("full" or "quick")."""
    if device.type == "cuda":
        return time_cuda(fn, **CUDA_TIMING[mode])
    return time_cpu(fn, **CPU_TIMING[mode])


# --------------------------------------------------------------------------
# Bandwidth
# --------------------------------------------------------------------------

def measure_bandwidth(device, mode: str) -> dict[str, Any]:
    """The device's memory bandwidth in GB/s (1e9 bytes/s, read + written): in-place update and copy."""
    import torch

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        nbytes = min(2**30, free // 8)  # a 1 GiB copy, far beyond any L2
    else:
        nbytes = 256 * 2**20  # 256 MB, far beyond any L3
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.zeros(n, dtype=torch.float32, device=device)
    moved = 2 * n * 4  # read + written
    copy = time_fn(lambda: dst.copy_(src), device, mode)
    del dst
    inplace = time_fn(lambda: src.add_(1.0), device, mode)
    del src
    _free_memory(device)
    out = {
        "bytes_per_call": moved,
        "copy_GBps": moved / copy.ms / 1e6,
        "copy_ms": copy.ms,
        "inplace_GBps": moved / inplace.ms / 1e6,
        "inplace_ms": inplace.ms,
        "method": copy.method,
    }
    # The roofline: a D2D copy on GPUs; on CPUs the in-place update, the access
    # pattern of an optimizer step (a copy there also pays for write-allocate).
    out["roofline"] = "copy" if device.type == "cuda" else "inplace"
    out["roofline_GBps"] = out[f"{out['roofline']}_GBps"]
    return out


# --------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------

def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device) -> str:
    """The GPU's name from torch, or the CPU's model."""
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def device_kind(device) -> str:
    """A short file-name tag: "cpu", or "cuda_" plus the GPU's model ("cuda_H100", "cuda_A100")."""
    if device.type != "cuda":
        return "cpu"
    words = [w for w in re.split(r"[\s_-]+", device_name(device)) if w and w.upper() not in ("NVIDIA", "GEFORCE", "TESLA")]
    for w in words:
        if re.fullmatch(r"[A-Z]{1,3}\d{2,4}[A-Za-z]*", w):
            return f"cuda_{w}"
    return "cuda_" + (re.sub(r"[^A-Za-z0-9]+", "_", " ".join(words)).strip("_") or "gpu")


def git_info() -> dict[str, Any]:
    """HEAD's SHA ("unknown" outside a git checkout) and whether the tree has uncommitted changes."""
    def git(*args: str) -> Optional[str]:
        try:
            r = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if sha else None
    return {"git_sha": sha or "unknown", "git_dirty": None if status is None else bool(status)}


def _free_memory(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------

@dataclass
class Row:
    """One (op, case, impl) result."""

    op: str
    case: str
    impl: str
    family: str
    numel: int
    ntensors: int
    bytes: int
    ms: Optional[float] = None
    GBps: Optional[float] = None
    frac_of_bw: Optional[float] = None
    speedup_vs_baseline: Optional[float] = None
    ms_min: Optional[float] = None
    ms_q1: Optional[float] = None
    ms_q3: Optional[float] = None
    reps: Optional[int] = None
    calls_per_sample: Optional[int] = None
    minflt_per_call: Optional[float] = None
    error: Optional[str] = None


def _select(providers: list[Provider], patterns: Optional[list[str]]) -> tuple[list[Provider], list[Provider]]:
    """(providers to run, providers skipped as unavailable) for --impls patterns (fnmatch; None: the defaults)."""
    import fnmatch

    if patterns is None:
        chosen = [p for p in providers if p.default]
    else:
        chosen = [p for p in providers
                  if any(p.name == pat or (p.default and fnmatch.fnmatchcase(p.name, pat)) for pat in patterns)]
    return [p for p in chosen if p.unavailable is None], [p for p in chosen if p.unavailable is not None]


def run_op(op: Op, cases: list[str], device, dtype, opts: argparse.Namespace, bandwidth: dict) -> tuple[list[Row], dict[str, str]]:
    """Time every selected provider of `op` on every case; returns the rows and {impl: why skipped}."""
    providers = op.providers(device, opts)
    run, skipped = _select(providers, opts.impls)
    skipped_why = {p.name: p.unavailable for p in skipped}
    mode = "quick" if opts.quick else "full"
    rows: list[Row] = []
    for case_name in cases:
        case = op.cases[case_name]
        nbytes = op.bytes_moved(case, dtype, opts)
        inputs = op.make_inputs(case, device, dtype, opts)
        case_rows: list[Row] = []
        for prov in run:
            row = Row(op.name, case.name, prov.name, prov.family, case.numel, case.ntensors, nbytes)
            print(f"  {op.name} {case.name:<12} {prov.name:<20}", end="", flush=True)
            fn = None
            try:
                fn = prov.setup(inputs)
                t = time_fn(fn, device, mode)
            except Exception as e:  # report it and go on with the others
                row.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                print(f" ERROR {row.error}")
            else:
                row.ms, row.ms_min, row.ms_q1, row.ms_q3 = t.ms, t.ms_min, t.ms_q1, t.ms_q3
                row.reps, row.calls_per_sample, row.minflt_per_call = t.reps, t.calls_per_sample, t.minflt_per_call
                row.GBps = nbytes / t.ms / 1e6
                row.frac_of_bw = row.GBps / bandwidth["roofline_GBps"]
                print(f" {t.ms:10.3f} ms  {row.GBps:8.1f} GB/s  ({t.reps} reps)")
            del fn
            _free_memory(device)  # each provider's state goes before the next one's
            case_rows.append(row)
        base = next((r for r in case_rows if r.impl == op.baseline and r.ms is not None), None)
        for r in case_rows:
            if base is not None and r.ms is not None:
                r.speedup_vs_baseline = base.ms / r.ms
        rows += case_rows
        del inputs
        _free_memory(device)  # each case's tensors go before the next case's
    return rows, skipped_why


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------

def _fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(rows: list[Row], baseline: str, cpu: bool) -> str:
    """A fixed-width text table of the rows."""
    head = ["case", "impl", "ms", "GB/s", "of BW", f"vs {baseline}"] + (["flt/call"] if cpu else []) + ["reps"]
    lines = []
    for r in rows:
        if r.error:
            cells = [r.case, r.impl, "ERROR", r.error[:60], "", ""] + ([""] if cpu else []) + [""]
        else:
            cells = [
                r.case, r.impl, _fmt(r.ms, ".3f"), _fmt(r.GBps, ".1f"),
                "-" if r.frac_of_bw is None else f"{100 * r.frac_of_bw:.0f}%",
                "-" if r.speedup_vs_baseline is None else f"{r.speedup_vs_baseline:.2f}x",
            ] + ([_fmt(r.minflt_per_call, ".0f")] if cpu else []) + [str(r.reps)]
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(head)]
    left = {0, 1}

    def fmt_line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [fmt_line(head), fmt_line(["-" * w for w in widths])]
    prev = None
    for r, cells in zip(rows, lines):
        if prev is not None and r.case != prev:
            out.append("")
        prev = r.case
        out.append(fmt_line(cells))
    return "\n".join(out)


def sweep_note(rows: list[Row]) -> Optional[str]:
    """many_small against large (about the same elements): each impl's GB/s ratio, the cost of many tensors."""
    by = {(r.case, r.impl): r for r in rows if r.GBps}
    impls = [r.impl for r in rows if r.case == "large" and ("many_small", r.impl) in by and ("large", r.impl) in by]
    if not impls:
        return None
    parts = [f"{i} {by[('many_small', i)].GBps / by[('large', i)].GBps:.2f}" for i in impls]
    return ("sweep: many_small vs large at about the same total size, GB/s ratio (1.00: tensor count costs nothing): "
            + ", ".join(parts))


def write_plot(path: Path, rows: list[Row], meta: dict) -> Optional[str]:
    """A grouped bar plot of GB/s per case and impl, with the roofline; None (and no file) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # optional dependency
        return f"no plot ({type(e).__name__}: {e})"
    ok = [r for r in rows if r.GBps is not None]
    if not ok:
        return "no plot (no results)"
    cases = list(dict.fromkeys(r.case for r in ok))
    impls = list(dict.fromkeys(r.impl for r in ok))
    colours = {"pyoptim": "tab:blue", "torch": "tab:orange", "peer": "tab:green"}
    shades = {}
    for fam in colours:
        members = [i for i in impls if next(r.family for r in ok if r.impl == i) == fam]
        for k, i in enumerate(members):
            shades[i] = (colours[fam], 1.0 - 0.55 * k / max(1, len(members)))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 + 0.45 * len(cases) * len(impls)), 4.5))
    width = 0.8 / len(impls)
    by = {(r.case, r.impl): r for r in ok}
    for k, impl in enumerate(impls):
        xs, ys = [], []
        for ci, c in enumerate(cases):
            if (c, impl) in by:
                xs.append(ci - 0.4 + width * (k + 0.5))
                ys.append(by[(c, impl)].GBps)
        colour, alpha = shades.get(impl, ("tab:gray", 1.0))
        bars = ax.bar(xs, ys, width, label=impl, color=colour, alpha=alpha, edgecolor="black", linewidth=0.4)
        for b, c in zip(bars, [c for c in cases if (c, impl) in by]):
            r = by[(c, impl)]
            ax.annotate(f"{r.ms:.3g}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                        fontsize=6, rotation=90, xytext=(0, 2), textcoords="offset points")
    bw = meta["bandwidth"]
    ax.axhline(bw["roofline_GBps"], color="black", linestyle="--", linewidth=1)
    ax.text(len(cases) - 0.5, bw["roofline_GBps"], f"measured {bw['roofline']} bandwidth {bw['roofline_GBps']:.0f} GB/s",
            ha="right", va="bottom", fontsize=8)
    ax.set_xticks(range(len(cases)), cases)
    ax.set_ylabel("GB/s (bytes the op must move / median time)")
    ax.set_ylim(0, max(bw["roofline_GBps"], max(r.GBps for r in ok)) * 1.15)
    ax.set_title(f"{meta['op']} {meta['dtype']} on {meta['device_name']} ({meta['threads']} threads)\n"
                 f"torch {meta['torch']}, {meta['git_sha'][:10]}; bar labels: ms", fontsize=9)
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

def build_parser(ops: dict[str, Op]) -> argparse.ArgumentParser:
    """The command line of run.py (and of each bench_<op>.py run on its own)."""
    p = argparse.ArgumentParser(
        description="pyoptim benchmarks: each op's implementations against torch and peers, "
                    "with the device's measured memory bandwidth as the roofline.")
    csv = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    p.add_argument("--ops", type=csv, default=None, help=f"comma-separated ops (default: all: {','.join(ops)})")
    p.add_argument("--cases", type=csv, default=None, help="comma-separated cases (default: each op's defaults)")
    p.add_argument("--impls", type=csv, default=None,
                   help="comma-separated impl names or fnmatch patterns, like pyoptim-*,torch-fused "
                        "(default: every available impl; a non-default one such as pyoptim-triton on CPU "
                        "runs only when named exactly)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda when torch.cuda.is_available(), else cpu")
    p.add_argument("--out", type=Path, default=BENCH_DIR / "results",
                   help="where <op>_<device kind>.json and .png go (default: benchmarks/results)")
    p.add_argument("--quick", action="store_true", help="short warm-up and time budget: a smoke run")
    p.add_argument("--no-plot", action="store_true", help="write no PNG")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU; default: torch's)")
    p.add_argument("--default-allocator", action="store_true",
                   help="CPU: keep glibc's default malloc settings instead of re-executing with "
                        "GLIBC_TUNABLES that keep freed memory (see note [CPU allocator])")
    p.add_argument("--list", action="store_true", help="list ops, cases and impls here, then exit")
    for op in ops.values():
        if op.add_arguments is not None:
            op.add_arguments(p)
    return p


def maybe_reexec_with_allocator(device_type: str, opts: argparse.Namespace) -> None:
    """note [CPU allocator]: on CPU with glibc, re-exec this process once with GLIBC_TUNABLES that keep freed memory."""
    if device_type != "cpu" or opts.default_allocator or opts.list:
        return
    if "mmap_max" in os.environ.get("GLIBC_TUNABLES", ""):
        return
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = ":".join(x for x in (env.get("GLIBC_TUNABLES"), GLIBC_TUNABLES_KEEP_FREED) if x)
    env["PYOPTIM_BENCH_REEXECED"] = "1"
    argv = [sys.executable, *getattr(sys, "orig_argv", [sys.executable, *sys.argv])[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)


def main(argv: Optional[list[str]] = None, only: Optional[list[str]] = None) -> int:
    """Run the benchmarks; `only` restricts the ops (a bench_<op>.py run on its own passes its op)."""
    t_start = time.perf_counter()
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))  # the working tree's pyoptim
    ops = discover_ops()
    if only is not None:
        ops = {k: v for k, v in ops.items() if k in only}
    parser = build_parser(ops)
    opts = parser.parse_args(argv)

    import torch

    device_type = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    maybe_reexec_with_allocator(device_type, opts)
    if device_type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False here")
    device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    dtype = getattr(torch, DTYPES[opts.dtype])

    op_names = opts.ops or list(ops)
    for name in op_names:
        if name not in ops:
            parser.error(f"unknown op {name!r}; known: {', '.join(ops)}")

    if opts.list:
        for name in op_names:
            op = ops[name]
            print(f"{name}: {op.description}")
            for c in op.cases.values():
                mark = "*" if c.name in op.default_cases else " "
                print(f"  case {mark} {c.name:<12} {c.ntensors:>5} tensors {c.numel:>12,} elements  {c.description}")
            for p in op.providers(device, opts):
                state = "default" if p.default else "on request"
                print(f"  impl   {p.name:<20} {state if p.unavailable is None else 'unavailable: ' + p.unavailable}")
        return 0

    # Check every name before anything is timed.
    for name in op_names:
        op = ops[name]
        for c in opts.cases or []:
            if c not in op.cases:
                parser.error(f"op {name}: unknown case {c!r}; known: {', '.join(op.cases)}")
        if opts.impls:
            names = [p.name for p in op.providers(device, opts)]
            import fnmatch
            for pat in opts.impls:
                if not any(fnmatch.fnmatchcase(n, pat) for n in names):
                    parser.error(f"op {name}: no impl matches {pat!r}; known: {', '.join(names)}")

    import pyoptim

    threads = torch.get_num_threads()
    name_here = device_name(device)
    print(f"device: {name_here} ({device_type}, {threads} torch threads), torch {torch.__version__}, "
          f"pyoptim {getattr(pyoptim, '__version__', '?')}")
    if device_type == "cpu":
        tun = os.environ.get("GLIBC_TUNABLES")
        print(f"allocator: {'GLIBC_TUNABLES=' + tun if tun else 'glibc defaults (freed buffers > 32 MB go back to the OS)'}")
    mode = "quick" if opts.quick else "full"
    print(f"timing: {CUDA_TIMING[mode] if device_type == 'cuda' else CPU_TIMING[mode]} ({mode})")
    print("measuring memory bandwidth ...", flush=True)
    bw = measure_bandwidth(device, mode)
    print(f"bandwidth: in-place {bw['inplace_GBps']:.1f} GB/s, copy {bw['copy_GBps']:.1f} GB/s "
          f"(read + written); roofline = {bw['roofline']} {bw['roofline_GBps']:.1f} GB/s")

    common_meta = {
        "device": device_type,
        "device_kind": device_kind(device),
        "device_name": name_here,
        "cpu_model": cpu_model(),
        "threads": threads,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "dtype": opts.dtype,
        **git_info(),
        "pyoptim_backend_info": pyoptim.backend_info(),
        "bandwidth": bw,
        "allocator": {"GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES"),
                      "reexeced": os.environ.get("PYOPTIM_BENCH_REEXECED") == "1"},
        "timing": {"mode": mode, **(CUDA_TIMING[mode] if device_type == "cuda" else CPU_TIMING[mode])},
        "hostname": platform.node(),
        "argv": sys.argv[1:],
    }
    try:
        import triton
        common_meta["triton"] = triton.__version__
    except Exception:
        common_meta["triton"] = None

    opts.out.mkdir(parents=True, exist_ok=True)
    for name in op_names:
        op = ops[name]
        cases = opts.cases or list(op.default_cases or op.cases)
        print(f"\n== {name}: {op.description}")
        t_op = time.perf_counter()
        rows, skipped = run_op(op, cases, device, dtype, opts, bw)
        print()
        print(format_table(rows, op.baseline, cpu=device_type == "cpu"))
        note = sweep_note(rows)
        if note:
            print(note)
        for impl, why in skipped.items():
            print(f"skipped {impl}: {why}")
        meta = {
            "op": name,
            "description": op.description,
            **common_meta,
            "settings": op.settings(opts) if op.settings else {},
            "baseline": op.baseline,
            "cases": {c: {"description": op.cases[c].description, "ntensors": op.cases[c].ntensors,
                          "numel": op.cases[c].numel} for c in cases},
            "skipped": skipped,
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - t_op, 1),
        }
        stem = opts.out / f"{name}_{meta['device_kind']}"
        Path(f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": [dataclasses.asdict(r) for r in rows]},
                                                   indent=1, default=str) + "\n")
        print(f"wrote {stem}.json", end="")
        if not opts.no_plot:
            why_not = write_plot(Path(f"{stem}.png"), rows, meta)
            print(f", {stem}.png" if why_not is None else f" ({why_not})", end="")
        print()
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    return 0
