"""The benchmark harness: one module that every op (pyoptim/benchmark/ops/<op>.py) and both command lines use:
the project's own run (benchmarks/run.py, `make bench`) and the user's (`python -m pyoptim.benchmark`, the
same method on the user's shapes, models and norm sizes).

What it does, in order, for one run:

1. measures the device's memory bandwidth (the roofline): on CUDA a large
   device-to-device copy timed with CUDA events; on CPU an in-place update
   (`x.add_(1)` over 256 MB, read + write counted) and a copy, with torch's
   threads. The roofline is the copy number on CUDA and the in-place number
   on CPU (an optimizer step or a norm pass updates its buffers in place),
   from the fastest call; both, as medians and fastest calls, are reported.
2. for each op, each case and each provider (implementation): builds the
   inputs, sets the provider up, warms it up, and times one call: on CUDA with
   `triton.testing.do_bench` (median; torch.cuda.Event when Triton does not
   import), one provider at a time; on CPU with time.perf_counter (median of
   many repeats, bounded by a time budget per measurement), the providers of
   a case taken in turns (note [interleaved CPU timing]) with the in-place
   bandwidth probe among them, whose median is that case's roofline (note
   [per-case CPU roofline]), and how much of the machine's CPU time other
   processes used meanwhile.
3. prints a table (case, impl, ms, spread, GB/s, fraction of the roofline,
   speed-up over the op's baseline, usually torch's fused version; on CPU
   also minor page faults per call) and writes the rows, with the device
   name, torch version, pyoptim.backend_info(), git SHA and the measured
   bandwidth, as JSON plus a PNG bar plot: <out>/<op>_<device kind>.json and
   .png (plus _<dtype> when not fp32), fixed names so that a committed result
   is overwritten by the next run on that kind of device.

Adding an op: write pyoptim/benchmark/ops/<op>.py that defines `OP = Op(...)`
(see ops/adam.py); discover_ops() finds it by its module. An op
supplies its cases (the tensors it works on, as shapes: `PARAM_CASES` below
serve every optimizer-like op), a function that builds the inputs for a case,
the bytes one call must move, and its providers: a name and a `setup(inputs)`
returning the zero-argument callable that is timed. An op's cases are only
its defaults: the user's command line swaps in cases of its own (dataclasses.replace).

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

PACKAGE_DIR = Path(__file__).resolve().parent
# The checkout this module runs from, if it does (git SHA, benchmarks/results);
# an installed pyoptim has none.
REPO_ROOT = PACKAGE_DIR.parents[1]
IN_CHECKOUT = (REPO_ROOT / "setup.py").is_file() and (REPO_ROOT / "csrc").is_dir()

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
# The CPU bandwidth buffer: 256 MB, far beyond any L3.
CPU_BW_BYTES = 256 * 2**20
BW_PROBE = "(in-place bandwidth)"


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
    # What a case's shapes mean, for the user's command line: "params" (a model's
    # parameter list), "rows" ((rows, N) inputs, the last dim normalized) or
    # "nchw" ((N, C, H, W) inputs, per-channel statistics).
    case_kind: str = "params"
    # Adds op-specific options (like --amsgrad) to the command line.
    add_arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None
    # Describes op-specific settings for the results' metadata.
    settings: Optional[Callable[[argparse.Namespace], dict]] = None
    # What a user writes for each impl, for the table of picks: pyoptim's public
    # API ("pyoptim.optim.AdamW") and torch's ("torch.optim.AdamW").
    api: str = ""
    torch_api: str = ""

    def usage(self, impl: str) -> str:
        """The call that stands for `impl` in user code, like pyoptim.optim.AdamW(..., backend="cpu")."""
        if impl.startswith("pyoptim-") and self.api:
            backend = impl[len("pyoptim-"):].removesuffix(FLAT_SUFFIX)
            kw = f'backend="{backend}"' + (", flat=True" if impl.endswith(FLAT_SUFFIX) else "")
            return f"{self.api[:-1]}, {kw})" if self.api.endswith(")") else f"{self.api}(..., {kw})"
        torch_kw = {"torch-forloop": "foreach=False", "torch-foreach": "foreach=True", "torch-fused": "fused=True"}
        if impl in torch_kw and self.torch_api:
            return f"{self.torch_api}(..., {torch_kw[impl]})"
        if impl == "torch" and self.torch_api:
            return self.torch_api
        return impl


# The name suffix of a provider that steps with flat storage (note [flat storage]: `flat=True`).
FLAT_SUFFIX = "-flat"


def pyoptim_providers(op: str, device, setup_for: Callable[[str], Callable[[Any], Callable[[], Any]]],
                      reference: bool = True,
                      flat_setup_for: Optional[Callable[[str], Callable[[Any], Callable[[], Any]]]] = None
                      ) -> list[Provider]:
    """One provider per pyoptim backend of `op` on `device`, named pyoptim-<backend>; `setup_for(backend)` builds it.

    Triton on the CPU is its interpreter: a numerics tool, timed only when
    --impls names it; so is the reference backend when `reference` is False
    (the norms: plain torch ops, a test oracle, not a contender). An op this pyoptim does not have (an older install)
    leaves every pyoptim provider unavailable, and torch's still run. With `flat_setup_for` (an optimizer with
    flat=True), each compiled backend also gets pyoptim-<backend>-flat: the same step over one buffer per
    group (the reference backend's per-tensor torch ops gain nothing from it).
    """
    from pyoptim import _backends

    try:
        available, no_op = _backends.available(op, device.type), None
    except KeyError:
        available, no_op = [], f"this pyoptim ({_pyoptim_version()}) has no op {op!r}"
    candidates = ("cuda", "triton", "reference") if device.type == "cuda" else ("cpu", "reference", "triton")
    variants = [(b, "", setup_for) for b in candidates]
    if flat_setup_for is not None:
        variants += [(b, FLAT_SUFFIX, flat_setup_for) for b in candidates if b != "reference"]
    return [
        Provider(
            f"pyoptim-{b}{suffix}", "pyoptim", setup(b),
            unavailable=None if b in available else
            no_op or f"pyoptim backend {b!r} is not available here (backend_info: {available})",
            default=not (b == "triton" and device.type == "cpu") and (reference or b != "reference"),
        )
        for b, suffix, setup in variants
    ]


def _pyoptim_version() -> str:
    import pyoptim

    return f"pyoptim {getattr(pyoptim, '__version__', '?')}"


def discover_ops() -> dict[str, Op]:
    """Every `OP` defined by a module of pyoptim.benchmark.ops, by op name."""
    import pkgutil

    from pyoptim.benchmark import ops as ops_pkg

    ops: dict[str, Op] = {}
    for info in sorted(pkgutil.iter_modules(ops_pkg.__path__), key=lambda m: m.name):
        mod = importlib.import_module(f"{ops_pkg.__name__}.{info.name}")
        for op in getattr(mod, "OPS", None) or [getattr(mod, "OP", None)]:
            if isinstance(op, Op):
                ops[op.name] = op
    return ops


def missing_module(module: str) -> Optional[str]:
    """Why `module` cannot serve here ("... is not importable"), or None when it is found (without importing it)."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    return None if found else f"{module} is not importable"


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


def _warm_up(fn: Callable[[], Any], warmup_s: float, budget_s: float) -> float:
    """Call fn() for warmup_s seconds and at least twice (the first call usually allocates state), once
    when that call took longer than budget_s; the fastest call's seconds."""
    t_end = time.perf_counter() + warmup_s
    n, t_call = 0, math.inf
    while n < 2 or time.perf_counter() < t_end:
        if n == 1 and t_call > budget_s:
            break
        t0 = time.perf_counter()
        fn()
        t_call = min(t_call, time.perf_counter() - t0)
        n += 1
    return t_call


def time_cpu_interleaved(fns: dict[str, Callable[[], Any]], *, warmup_s: float, budget_s: float, min_reps: int,
                         max_reps: int, first: Optional[str] = None) -> dict[str, Any]:
    """Median wall time of each fn() with time.perf_counter, the fns' samples taken in rounds; {name: Timing or exception}.

    note [interleaved CPU timing]: a small machine shared with other work (2
    cores, a parallel build next door) has spells, seconds long, in which a
    multi-threaded call runs 2-100x slower (one torch thread descheduled
    while the other waits for it at a barrier; torch's per-tensor parallel
    regions pay this once per tensor). Timed one after another, the impl that
    happens to fall in such a spell reads as slow. Here every round calls
    every fn once (in an order that rotates), so all fns have the same number
    of samples spread over the same span, and each median sees the same
    weather. Rounds go on until budget_s per fn is spent, and at least
    min_reps rounds unless those would take over twice the budget (calls of
    seconds, in such a spell, get one or two rounds: the run must end in
    minutes).

    `first` (the bandwidth probe, which evicts the caches) opens every round
    and the others rotate after it, so each of them follows it equally often.
    Rotated with the rest, it preceded the first impl in two rounds of three
    (probe, A, B / A, B, probe / B, probe, A): on an input that fits the
    caches that impl was timed cold twice as often as the other.
    """
    out: dict[str, Any] = {}
    state: dict[str, dict] = {}
    for name, fn in fns.items():
        try:
            t_call = _warm_up(fn, warmup_s, budget_s)
        except Exception as e:  # reported as that impl's error
            out[name] = e
            continue
        state[name] = dict(fn=fn, samples=[], flt=0, t_call=t_call,
                           inner=max(1, math.ceil(CPU_MIN_SAMPLE_S / max(t_call, 1e-9))))
    if not state:
        return out
    total_budget = budget_s * len(state)
    t_round = sum(st["t_call"] * st["inner"] for st in state.values())
    min_rounds = max(1, min(min_reps, int(2 * total_budget / t_round)))
    names = list(state)
    spent, rounds = 0.0, 0
    while rounds < max_reps and (rounds < min_rounds or spent < total_budget):
        live = [n for n in names if n not in out]
        if not live:
            break
        lead = [n for n in live if n == first]
        rest = [n for n in live if n != first]
        k = rounds % len(rest) if rest else 0
        for name in lead + rest[k:] + rest[:k]:
            st = state[name]
            fn, inner = st["fn"], st["inner"]
            f0 = _minflt()
            t0 = time.perf_counter()
            try:
                for _ in range(inner):
                    fn()
            except Exception as e:
                out[name] = e
                continue
            dt = time.perf_counter() - t0
            f1 = _minflt()
            st["samples"].append(dt / inner)
            spent += dt
            if f0 is not None:
                st["flt"] += f1 - f0
        rounds += 1
    for name, st in state.items():
        if name in out:
            continue
        ms = [x * 1e3 for x in st["samples"]]
        q1, q3 = _quartiles(ms)
        out[name] = Timing(
            ms=statistics.median(ms), ms_min=min(ms), ms_q1=q1, ms_q3=q3, reps=len(ms), calls_per_sample=st["inner"],
            minflt_per_call=None if resource is None else st["flt"] / (len(ms) * st["inner"]),
            method="perf_counter median, impls interleaved",
        )
    return out


def time_cpu(fn: Callable[[], Any], **kw: Any) -> Timing:
    """Median wall time of one fn() on CPU (see time_cpu_interleaved)."""
    t = time_cpu_interleaved({"fn": fn}, **kw)["fn"]
    if isinstance(t, Exception):
        raise t
    return t


def _triton_testing():
    if os.environ.get("PYOPTIM_BENCH_TIMER") == "events":  # force the torch.cuda.Event loop (to test it)
        return None
    try:
        import triton.testing
    except Exception:  # absent or broken: fall back to torch.cuda.Event
        return None
    return triton.testing


def time_cuda(fn: Callable[[], Any], *, warmup_ms: float, rep_ms: float) -> Timing:
    """Median time of fn() from CUDA events: triton.testing.do_bench when Triton imports, else a torch.cuda.Event loop."""
    import torch

    fn()  # state allocation stays out of do_bench's runtime estimate
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    # do_bench repeats for rep_ms: a call slower than rep_ms / 5 still gets about 5 samples.
    rep_ms = max(rep_ms, 5.5 * start.elapsed_time(end))
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
        nbytes = CPU_BW_BYTES
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.zeros(n, dtype=torch.float32, device=device)
    moved = 2 * n * 4  # read + written
    fns = {"copy": lambda: dst.copy_(src), "inplace": lambda: src.add_(1.0)}
    contention = CpuContention().start()
    if device.type == "cuda":
        ts = {k: time_fn(fn, device, mode) for k, fn in fns.items()}
    else:
        ts = time_cpu_interleaved(fns, **CPU_TIMING[mode])
        for t in ts.values():
            if isinstance(t, BaseException):
                raise t
    del src, dst, fns
    _free_memory(device)
    out: dict[str, Any] = {"bytes_per_call": moved, "method": ts["copy"].method,
                           "cpu_busy_elsewhere": contention.stop()}
    for k, t in ts.items():
        out[f"{k}_GBps"] = moved / t.ms / 1e6  # from the median time
        out[f"{k}_peak_GBps"] = None if t.ms_min is None else moved / t.ms_min / 1e6  # from the fastest call
        out[f"{k}_ms"] = t.ms
        out[f"{k}_ms_q1_q3"] = (t.ms_q1, t.ms_q3)
        out[f"{k}_reps"] = t.reps
    # The roofline: a D2D copy on GPUs; on CPUs the in-place update, the access
    # pattern of an optimizer step (a copy there also pays for write-allocate).
    # Its value is the fastest call's: what the memory can do. On a quiet
    # machine that is within a few % of the median; on a shared one the
    # median can sit at a fraction of it, and then every kernel would read
    # as running above the roofline.
    out["roofline"] = "copy" if device.type == "cuda" else "inplace"
    kind = out["roofline"]
    out["roofline_GBps"] = out[f"{kind}_peak_GBps"] or out[f"{kind}_GBps"]
    out["roofline_from"] = "fastest call" if out[f"{kind}_peak_GBps"] else "median"
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
    """The checkout's HEAD SHA (else $PYOPTIM_GIT_SHA, else "unknown") and whether the tree has uncommitted changes."""
    def git(*args: str) -> Optional[str]:
        try:
            r = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    # Only a checkout's own repository: an installed pyoptim inside some other
    # repository (a venv in a project) must not report that project's SHA.
    sha = git("rev-parse", "HEAD") if IN_CHECKOUT else None
    status = git("status", "--porcelain", "--untracked-files=no") if sha else None
    # A copy of the tree without .git (a GPU box) can be told its SHA.
    sha = sha or os.environ.get("PYOPTIM_GIT_SHA") or "unknown"
    return {"git_sha": sha, "git_dirty": None if status is None else bool(status)}


class CpuContention:
    """The share of the machine's CPU time that other processes used between start() and stop() (Linux; else None).

    A benchmark on a shared machine (a parallel build next to it) reads
    slow; this says so next to the numbers instead of leaving it to guess.
    """

    def __init__(self) -> None:
        self._t0: Optional[tuple[float, float, float]] = None

    @staticmethod
    def _sample() -> Optional[tuple[float, float, float]]:
        try:
            with open("/proc/stat") as f:
                vals = [int(x) for x in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        if resource is None:
            return None
        hz = os.sysconf("SC_CLK_TCK")
        user, nice, system, idle, iowait, irq, softirq, steal = vals
        busy = (user + nice + system + irq + softirq + steal) / hz
        total = busy + (idle + iowait) / hz
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return busy, total, ru.ru_utime + ru.ru_stime

    def start(self) -> "CpuContention":
        self._t0 = self._sample()
        return self

    def stop(self) -> Optional[float]:
        t1 = self._sample()
        if self._t0 is None or t1 is None or t1[1] <= self._t0[1]:
            return None
        busy, total, own = (b - a for a, b in zip(self._t0, t1))
        return max(0.0, min(1.0, (busy - own) / total))


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
    # The bandwidth frac_of_bw is of: on CPU measured in turns with this case's impls.
    roofline_GBps: Optional[float] = None
    # The share of the machine's CPU time other processes used while this case ran.
    cpu_busy_elsewhere: Optional[float] = None
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


def run_op(op: Op, cases: list[str], device, dtype, opts: argparse.Namespace, bandwidth: dict,
           progress: Optional["Progress"] = None) -> tuple[list[Row], dict[str, str]]:
    """Time every selected provider of `op` on every case; returns the rows and {impl: why skipped}.

    On CUDA the providers of a case are set up and timed one at a time, and
    fractions are of the run-start bandwidth; on CPU they are all set up, then
    timed in turns (note [interleaved CPU timing]) together with an in-place
    bandwidth probe (note [per-case CPU roofline]). Either way a case's tensors
    are freed before the next case's are made. `progress`, when given, prints
    the lines and counts the cases.
    """
    import torch

    say = progress.write if progress is not None else _say

    providers = op.providers(device, opts)
    run, skipped = _select(providers, opts.impls)
    skipped_why = {p.name: p.unavailable for p in skipped}
    mode = "quick" if opts.quick else "full"
    rows: list[Row] = []

    def err(e: BaseException) -> str:
        msg = str(e).strip().splitlines()
        return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]

    for case_name in cases:
        case = op.cases[case_name]
        nbytes = op.bytes_moved(case, dtype, opts)
        say(f"  {op.name} {case.name}: {case.ntensors} tensors, {case.numel:,} elements, "
            f"{nbytes / 1e6:,.1f} MB per call")
        inputs = op.make_inputs(case, device, dtype, opts)
        case_rows = {p.name: Row(op.name, case.name, p.name, p.family, case.numel, case.ntensors, nbytes) for p in run}
        results: dict[str, Any] = {}
        contention = CpuContention().start()
        if device.type == "cuda":
            for prov in run:
                fn = None
                try:
                    fn = prov.setup(inputs)
                    results[prov.name] = time_fn(fn, device, mode)
                except Exception as e:  # report it and go on with the others
                    results[prov.name] = e
                del fn
                _free_memory(device)  # each provider's state goes before the next one's
        else:
            # note [per-case CPU roofline]: the in-place bandwidth probe is timed
            # in turns with the providers, so that each fraction compares two
            # medians taken in the same weather: on a shared 2-core machine the
            # run-start number can be half of what a quiet spell allows.
            probe = torch.ones(CPU_BW_BYTES // 4, dtype=torch.float32)
            fns = {BW_PROBE: lambda: probe.add_(1.0)}
            for prov in run:
                try:
                    fns[prov.name] = prov.setup(inputs)
                except Exception as e:
                    results[prov.name] = e
            results.update(time_cpu_interleaved(fns, **CPU_TIMING[mode], first=BW_PROBE))
            del fns, probe
        busy_elsewhere = contention.stop()
        roofline = bandwidth["roofline_GBps"]
        probe_t = results.pop(BW_PROBE, None)
        if isinstance(probe_t, Timing):
            roofline = 2 * CPU_BW_BYTES / probe_t.ms / 1e6
            say(f"    {'in-place bandwidth':<20} {probe_t.ms:10.3f} ms  {roofline:8.1f} GB/s  ({probe_t.reps} samples; "
                "the roofline of this case's fractions)")
        for name, row in case_rows.items():
            t = results[name]
            row.cpu_busy_elsewhere = busy_elsewhere
            row.roofline_GBps = roofline
            if isinstance(t, BaseException):
                row.error = err(t)
                say(f"    {name:<20} ERROR {row.error}")
                continue
            row.ms, row.ms_min, row.ms_q1, row.ms_q3 = t.ms, t.ms_min, t.ms_q1, t.ms_q3
            row.reps, row.calls_per_sample, row.minflt_per_call = t.reps, t.calls_per_sample, t.minflt_per_call
            row.GBps = nbytes / t.ms / 1e6
            row.frac_of_bw = row.GBps / roofline
            say(f"    {name:<20} {t.ms:10.3f} ms  {row.GBps:8.1f} GB/s  ({t.reps} samples)")
        if busy_elsewhere is not None:
            say(f"    other processes used {100 * busy_elsewhere:.0f}% of the machine's CPU time meanwhile"
                + ("  <-- shared machine: these timings are noisy" if busy_elsewhere > 0.10 else ""))
        base = case_rows.get(op.baseline)
        for row in case_rows.values():
            if base is not None and base.ms is not None and row.ms is not None:
                row.speedup_vs_baseline = base.ms / row.ms
        rows += case_rows.values()
        if progress is not None:
            progress.update(f"{op.name} {case.name}")
        del inputs, results
        _free_memory(device)  # each case's tensors go before the next case's
    return rows, skipped_why


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------

def _fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(rows: list[Row], baseline: str, cpu: bool) -> str:
    """A fixed-width text table of the rows (spread: half the interquartile range, as a % of the median)."""
    head = ["case", "impl", "ms", "spread", "GB/s", "of BW", f"vs {baseline}"] + (["flt/call"] if cpu else []) + ["reps"]
    lines = []
    for r in rows:
        if r.error:
            cells = [r.case, r.impl, "ERROR", r.error[:70]] + [""] * (len(head) - 4)
        else:
            spread = None if r.ms_q1 is None or r.ms_q3 is None else 50 * (r.ms_q3 - r.ms_q1) / r.ms
            cells = [
                r.case, r.impl, _fmt(r.ms, ".3f"), "-" if spread is None else f"±{spread:.0f}%", _fmt(r.GBps, ".1f"),
                "-" if r.frac_of_bw is None else f"{100 * r.frac_of_bw:.0f}%",
                "-" if r.speedup_vs_baseline is None else f"{r.speedup_vs_baseline:.2f}x",
            ] + ([_fmt(r.minflt_per_call, ".0f")] if cpu else []) + [str(r.reps)]
        lines.append(cells)
    widths = [max([len(h)] + [len(c[i]) for c in lines if not (c[2] == "ERROR" and i >= 3)]) for i, h in enumerate(head)]
    left = {0, 1}

    def fmt_line(cells: list[str]) -> str:
        if len(cells) > 3 and cells[2] == "ERROR":
            return "  ".join([cells[0].ljust(widths[0]), cells[1].ljust(widths[1]), cells[2].rjust(widths[2]), cells[3]])
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
    parts = [f"{i} {by[('many_small', i)].GBps / by[('large', i)].GBps:.2g}" for i in impls]
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
    case_bw = {r.case: r.roofline_GBps for r in ok if r.roofline_GBps}
    if meta["device"] == "cpu" and case_bw:  # note [per-case CPU roofline]
        for ci, c in enumerate(cases):
            ax.hlines(case_bw[c], ci - 0.45, ci + 0.45, color="black", linestyle="--", linewidth=1)
            ax.text(ci, case_bw[c], f"in-place {case_bw[c]:.0f} GB/s", ha="center", va="bottom", fontsize=7)
    else:
        ax.axhline(bw["roofline_GBps"], color="black", linestyle="--", linewidth=1)
        ax.text(len(cases) - 0.5, bw["roofline_GBps"], f"measured {bw['roofline']} bandwidth {bw['roofline_GBps']:.0f} GB/s",
                ha="right", va="bottom", fontsize=8)
    ax.set_xticks(range(len(cases)), cases)
    ax.set_ylabel("GB/s (bytes the op must move / median time)")
    top = max([bw["roofline_GBps"], *case_bw.values(), *(r.GBps for r in ok)])
    if top / min(r.GBps for r in ok) > 30:  # a linear axis would hide the slow bars
        ax.set_yscale("log")
        ax.set_ylim(min(r.GBps for r in ok) / 2, top * 2.5)
    else:
        ax.set_ylim(0, top * 1.15)
    threads = f" ({meta['threads']} threads)" if meta["device"] == "cpu" else ""
    ax.set_title(f"{meta['op']} {meta['dtype']} on {meta['device_name']}{threads}\n"
                 f"torch {meta['torch']}, {meta['git_sha'][:10]}; bar labels: ms", fontsize=9)
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

class Progress:
    """A progress bar over a run's steps (the bandwidth, then each op's cases): tqdm's when it imports and
    stderr is a terminal, else one line per step (a log file gets no bar redrawn in it); write() prints a
    line without breaking the bar."""

    def __init__(self, total: int, desc: str = "benchmark") -> None:
        self.total, self.done, self._t0 = total, 0, time.perf_counter()
        self._bar = None
        try:
            from tqdm import tqdm
        except ImportError:  # optional: plain lines instead
            return
        if sys.stderr.isatty():
            self._bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)

    def write(self, msg: str) -> None:
        """Print one line (above the bar, when there is one)."""
        if self._bar is not None:
            self._bar.write(msg)
        else:
            print(msg, flush=True)

    def update(self, what: str) -> None:
        """One step done: `what` ("adam resnet50")."""
        self.done += 1
        if self._bar is not None:
            self._bar.set_postfix_str(what, refresh=False)
            self._bar.update(1)
        else:
            print(f"[{self.done}/{self.total}] {what} done, {time.perf_counter() - self._t0:.0f} s", flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _say(msg: str) -> None:
    print(msg, flush=True)


def add_run_arguments(p: argparse.ArgumentParser, default_out: Path) -> None:
    """The options of every run: which impls, dtype, device, where the results go, timing mode, threads."""
    csv = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    p.add_argument("--impls", type=csv, default=None,
                   help="comma-separated impl names or fnmatch patterns, like pyoptim-*,torch-fused "
                        "(default: every available impl; a non-default one such as pyoptim-triton on CPU "
                        "runs only when named exactly)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda when torch.cuda.is_available(), else cpu")
    p.add_argument("--out", type=Path, default=default_out,
                   help=f"where <op>_<device kind>[_<dtype>].json and .png go (default: {default_out})")
    p.add_argument("--quick", action="store_true", help="short warm-up and time budget: a smoke run")
    p.add_argument("--no-plot", action="store_true", help="write no PNG")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU; default: torch's)")
    p.add_argument("--default-allocator", action="store_true",
                   help="CPU: keep glibc's default malloc settings instead of re-executing with "
                        "GLIBC_TUNABLES that keep freed memory (see note [CPU allocator])")


def build_parser(ops: dict[str, Op], default_out: Path) -> argparse.ArgumentParser:
    """The command line of benchmarks/run.py: the project's ops and their own cases."""
    p = argparse.ArgumentParser(
        description="pyoptim benchmarks: each op's implementations against torch and peers, "
                    "with the device's measured memory bandwidth as the roofline.")
    csv = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    p.add_argument("--ops", type=csv, default=None, help=f"comma-separated ops (default: all: {','.join(ops)})")
    p.add_argument("--cases", type=csv, default=None, help="comma-separated cases (default: each op's defaults)")
    add_run_arguments(p, default_out)
    p.add_argument("--list", action="store_true", help="list ops, cases and impls here, then exit")
    for op in ops.values():
        if op.add_arguments is not None:
            op.add_arguments(p)
    return p


def maybe_reexec_with_allocator(device_type: str, opts: argparse.Namespace) -> None:
    """note [CPU allocator]: on CPU with glibc, re-exec this process once with GLIBC_TUNABLES that keep freed memory."""
    if device_type != "cpu" or opts.default_allocator or getattr(opts, "list", False):
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


def setup_device(parser: argparse.ArgumentParser, opts: argparse.Namespace, reexec: bool = True):
    """(device, dtype) of the run, after the allocator re-exec (CPU; only with `reexec`: a process that was not
    started by this command line, a test calling main(argv), must not be replaced) and --threads."""
    import torch

    device_type = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if reexec:
        maybe_reexec_with_allocator(device_type, opts)
    if device_type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False here")
    device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    return device, getattr(torch, DTYPES[opts.dtype])


def check_impls(parser: argparse.ArgumentParser, ops: Sequence[Op], device, opts: argparse.Namespace) -> None:
    """Every --impls pattern names some impl of every op (checked before anything is timed)."""
    import fnmatch

    for op in ops:
        names = [p.name for p in op.providers(device, opts)]
        for pat in opts.impls or []:
            if not any(fnmatch.fnmatchcase(n, pat) for n in names):
                parser.error(f"op {op.name}: no impl matches {pat!r}; known: {', '.join(names)}")


def without_pyoptim(op: Op, device, opts: argparse.Namespace) -> Optional[str]:
    """Why no pyoptim impl of `op` can run here (an op this pyoptim lacks), or None: such an op is not timed."""
    ours = [p for p in op.providers(device, opts) if p.family == "pyoptim"]
    if ours and all(p.unavailable for p in ours):
        return ours[0].unavailable
    return None


def list_ops(ops: Sequence[Op], device, opts: argparse.Namespace) -> None:
    """Print each op, its cases (* marks the defaults) and its impls here."""
    for op in ops:
        print(f"{op.name}: {op.description}")
        for c in op.cases.values():
            mark = "*" if c.name in op.default_cases else " "
            print(f"  case {mark} {c.name:<12} {c.ntensors:>5} tensors {c.numel:>12,} elements  {c.description}")
        for p in op.providers(device, opts):
            state = "default" if p.default else "on request"
            print(f"  impl   {p.name:<20} {state if p.unavailable is None else 'unavailable: ' + p.unavailable}")


def run_ops(plan: Sequence[tuple[Op, list[str]]], device, dtype, opts: argparse.Namespace,
            progress: Optional[Progress] = None) -> list[dict[str, Any]]:
    """Measure the bandwidth, then time each (op, its cases): print the op's table, write its JSON (and PNG).

    Returns one {"meta": ..., "rows": [Row, ...], "path": json path} per op.
    """
    import torch

    import pyoptim

    say = progress.write if progress is not None else _say
    device_type = device.type
    threads = torch.get_num_threads()
    name_here = device_name(device)
    say(f"device: {name_here} ({device_type}, {threads} torch threads), torch {torch.__version__}, "
        f"pyoptim {getattr(pyoptim, '__version__', '?')}")
    if device_type == "cpu":
        tun = os.environ.get("GLIBC_TUNABLES")
        say(f"allocator: {'GLIBC_TUNABLES=' + tun if tun else 'glibc defaults (freed buffers > 32 MB go back to the OS)'}")
    mode = "quick" if opts.quick else "full"
    say(f"timing: {CUDA_TIMING[mode] if device_type == 'cuda' else CPU_TIMING[mode]} ({mode})")
    say("measuring memory bandwidth ...")
    bw = measure_bandwidth(device, mode)
    peak = lambda k: "" if bw[f"{k}_peak_GBps"] is None else f" (fastest call {bw[f'{k}_peak_GBps']:.1f})"  # noqa: E731
    say(f"bandwidth (median, bytes read + written): in-place {bw['inplace_GBps']:.1f} GB/s{peak('inplace')}, "
        f"copy {bw['copy_GBps']:.1f} GB/s{peak('copy')}; roofline = {bw['roofline']} {bw['roofline_GBps']:.1f} GB/s "
        f"({bw['roofline_from']})")
    if bw["cpu_busy_elsewhere"] is not None:
        say(f"    other processes used {100 * bw['cpu_busy_elsewhere']:.0f}% of the machine's CPU time meanwhile"
            + ("  <-- shared machine: these timings are noisy" if bw["cpu_busy_elsewhere"] > 0.10 else ""))
    if progress is not None:
        progress.update("bandwidth")

    common_meta = {
        "device": device_type,
        "device_kind": device_kind(device),
        "device_name": name_here,
        "cpu_model": cpu_model(),
        "threads": threads,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "pyoptim": getattr(pyoptim, "__version__", None),
        "dtype": opts.dtype,
        **git_info(),
        "pyoptim_backend_info": pyoptim.backend_info(),
        "bandwidth": bw,
        "allocator": {"GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES"),
                      "reexeced": os.environ.get("PYOPTIM_BENCH_REEXECED") == "1"},
        "timing": {"mode": mode, **(CUDA_TIMING[mode] if device_type == "cuda" else CPU_TIMING[mode])},
        "hostname": platform.node(),
        "argv": sys.argv[1:],
        "triton": None,
    }
    try:
        import triton
        common_meta["triton"] = triton.__version__
    except Exception:
        pass

    opts.out.mkdir(parents=True, exist_ok=True)
    results = []
    for op, cases in plan:
        say(f"\n== {op.name}: {op.description}")
        t_op = time.perf_counter()
        rows, skipped = run_op(op, cases, device, dtype, opts, bw, progress)
        say("")
        say(format_table(rows, op.baseline, cpu=device_type == "cpu"))
        note = sweep_note(rows)
        if note:
            say(note)
        above = [f"{r.case}/{r.impl}" for r in rows if r.frac_of_bw is not None and r.frac_of_bw > 1.05]
        if above:
            say(f"above the roofline: {', '.join(above)} (a bandwidth measurement that met a busy spell, "
                "or data that stayed in cache)")
        for impl, why in skipped.items():
            say(f"skipped {impl}: {why}")
        meta = {
            "op": op.name,
            "description": op.description,
            **common_meta,
            "settings": op.settings(opts) if op.settings else {},
            "baseline": op.baseline,
            "cases": {c: {"description": op.cases[c].description, "ntensors": op.cases[c].ntensors,
                          "numel": op.cases[c].numel,
                          "roofline_GBps": next((r.roofline_GBps for r in rows if r.case == c), None),
                          "cpu_busy_elsewhere": next((r.cpu_busy_elsewhere for r in rows if r.case == c), None)}
                      for c in cases},
            "skipped": skipped,
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - t_op, 1),
        }
        # Fixed names, so that the next run on this kind of device overwrites a committed result.
        stem = opts.out / (f"{op.name}_{meta['device_kind']}" + ("" if opts.dtype == "fp32" else f"_{opts.dtype}"))
        json_path = Path(f"{stem}.json")
        json_path.write_text(json.dumps({"meta": meta, "rows": [dataclasses.asdict(r) for r in rows]},
                                        indent=1, default=str) + "\n")
        wrote = f"wrote {json_path}"
        if not opts.no_plot:
            why_not = write_plot(Path(f"{stem}.png"), rows, meta)
            wrote += f", {stem}.png" if why_not is None else f" ({why_not})"
        say(wrote)
        results.append({"meta": meta, "rows": rows, "path": json_path})
    return results


def main(argv: Optional[list[str]] = None, only: Optional[list[str]] = None,
         default_out: Optional[Path] = None) -> int:
    """The project's run (benchmarks/run.py): each op's own cases; `only` restricts the ops."""
    t_start = time.perf_counter()
    ops = discover_ops()
    if only is not None:
        ops = {k: v for k, v in ops.items() if k in only}
    parser = build_parser(ops, default_out or (REPO_ROOT / "benchmarks" / "results" if IN_CHECKOUT
                                               else Path("pyoptim-benchmark")))
    opts = parser.parse_args(argv)
    device, dtype = setup_device(parser, opts)

    op_names = opts.ops or list(ops)
    for name in op_names:
        if name not in ops:
            parser.error(f"unknown op {name!r}; known: {', '.join(ops)}")
    chosen = []
    for name in op_names:
        why = without_pyoptim(ops[name], device, opts)
        if why is None:
            chosen.append(ops[name])
        else:
            print(f"skipped op {name}: {why}")
    if opts.list:
        list_ops(chosen, device, opts)
        return 0
    # Check every name before anything is timed.
    for op in chosen:
        for c in opts.cases or []:
            if c not in op.cases:
                parser.error(f"op {op.name}: unknown case {c!r}; known: {', '.join(op.cases)}")
    check_impls(parser, chosen, device, opts)
    run_ops([(op, opts.cases or list(op.default_cases or op.cases)) for op in chosen], device, dtype, opts)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    return 0
