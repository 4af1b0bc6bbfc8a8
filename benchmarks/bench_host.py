"""The host cost of an optimizer step: tiny tensors, so the arithmetic costs nothing and what is timed is the
Python and C++ work around the kernels (the step plan, note [step plan] in csrc/step_plan.cpp).

AdamW, SGD with momentum and AdamW(max_grad_norm=1) over 1, 40 and 2,000
params of 4 elements, in two modes: the same grad tensors every step
(zero_grad(set_to_none=False), gradient accumulation) and new grad tensors
assigned before every step, outside the timed call (the default
zero_grad(set_to_none=True) + backward loop). Beside torch's fused optimizer
(with torch.nn.utils.clip_grad_norm_ before it for the clip case), and with
flat storage (flat=True) beside one tensor of the same total size.
Microseconds per step, one thread (CPU), median over interleaved rounds.

    python benchmarks/bench_host.py [--device cpu|cuda] [--quick] [--out DIR]
    (run by `make bench` after the bandwidth benchmarks; `--ops host` runs it alone)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # the working tree's pyoptim
from pyoptim.benchmark.harness import device_kind, device_name, git_info  # noqa: E402

COUNTS = (1, 40, 2000)
NUMEL = 4
KINDS = ("AdamW", "SGD", "AdamW+clip")
TARGET_PER_TENSOR_US = 0.25


def _optimizer(lib: str, kind: str, params: list, flat: bool = False):
    import torch

    import pyoptim

    if lib == "torch":
        if kind == "SGD":
            return torch.optim.SGD(params, lr=0.1, momentum=0.9, fused=True)
        return torch.optim.AdamW(params, lr=1e-3, fused=True)
    clip = dict(max_grad_norm=1.0) if kind == "AdamW+clip" else {}
    if kind == "SGD":
        return pyoptim.optim.SGD(params, lr=0.1, momentum=0.9, flat=flat)
    return pyoptim.optim.AdamW(params, lr=1e-3, flat=flat, **clip)


class _Subject:
    """One optimizer over `count` params, and how one timed step runs."""

    def __init__(self, lib: str, kind: str, shapes: list, device, new_grads: bool, flat: bool = False) -> None:
        import torch

        self.params = [torch.randn(s, device=device, requires_grad=True) for s in shapes]
        self.grads = [[torch.randn(s, device=device) for s in shapes] for _ in range(2)]
        for p, g in zip(self.params, self.grads[0]):
            p.grad = g.clone()
        self.opt = _optimizer(lib, kind, self.params, flat)
        self.clip = lib == "torch" and kind == "AdamW+clip"
        self.new_grads = new_grads
        self.k = 0
        self.cuda = device.type == "cuda"

    def prepare(self) -> None:
        """New grad tensors (outside the timed call) in that mode."""
        if self.new_grads:
            self.k ^= 1
            for p, g in zip(self.params, self.grads[self.k]):
                p.grad = g.clone()
        if self.cuda:
            import torch
            torch.cuda.synchronize()

    def step(self) -> None:
        import torch

        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        if self.cuda:
            torch.cuda.synchronize()


def _time(subjects: dict[str, _Subject], rounds: int, per_round: int) -> dict[str, float]:
    """Median microseconds of one step per subject, the subjects interleaved round by round."""
    for s in subjects.values():  # state, then the plan
        for _ in range(3):
            s.prepare()
            s.step()
    samples: dict[str, list[float]] = {name: [] for name in subjects}
    for _ in range(rounds):
        for name, s in subjects.items():
            for _ in range(per_round):
                s.prepare()
                t0 = time.perf_counter_ns()
                s.step()
                samples[name].append((time.perf_counter_ns() - t0) / 1e3)
    return {name: statistics.median(xs) for name, xs in samples.items()}


def run(device, quick: bool) -> dict[str, Any]:
    """Every case; returns the rows and the verdicts against the host-path targets."""
    rounds, per_round = (5, 20) if quick else (15, 40)
    rows = []
    for kind in KINDS:
        for new_grads in (False, True):
            mode = "new grads" if new_grads else "same grads"
            for n in COUNTS:
                shapes = [(NUMEL,)] * n
                subjects = {
                    "torch-fused": _Subject("torch", kind, shapes, device, new_grads),
                    "pyoptim": _Subject("pyoptim", kind, shapes, device, new_grads),
                    "pyoptim-flat": _Subject("pyoptim", kind, shapes, device, new_grads, flat=True),
                    "pyoptim-one-tensor": _Subject("pyoptim", kind, [(NUMEL * n,)], device, new_grads),
                }
                us = _time(subjects, rounds if n < 2000 else max(3, rounds // 3), per_round)
                rows.append(dict(optimizer=kind, mode=mode, tensors=n, us=us))
                one = rows[-1]["us"]
                print(f"{kind:<11} {mode:<10} {n:>5} tensors: torch fused {one['torch-fused']:8.1f} us, "
                      f"pyoptim {one['pyoptim']:8.1f} us, flat {one['pyoptim-flat']:8.1f} us, "
                      f"one tensor {one['pyoptim-one-tensor']:8.1f} us", flush=True)
    verdicts = []
    for kind in KINDS:
        for mode in ("same grads", "new grads"):
            by_n = {r["tensors"]: r["us"] for r in rows if r["optimizer"] == kind and r["mode"] == mode}
            per_tensor = (by_n[2000]["pyoptim"] - by_n[1]["pyoptim"]) / 1999
            verdicts.append(dict(
                optimizer=kind, mode=mode,
                n1_vs_torch=by_n[1]["pyoptim"] / by_n[1]["torch-fused"],
                per_tensor_us=per_tensor,
                flat_2000_vs_one_tensor=by_n[2000]["pyoptim-flat"] / by_n[2000]["pyoptim-one-tensor"],
                speedup_2000_vs_torch=by_n[2000]["torch-fused"] / by_n[2000]["pyoptim"],
            ))
    return dict(rows=rows, verdicts=verdicts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results"))
    opts, _ = parser.parse_known_args(argv)

    import torch

    device_type = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device_type)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the host path is one thread's work
    print(f"host path: {device_name(device)}, torch {torch.__version__}, 1 thread, {NUMEL}-element params")
    try:
        result = run(device, opts.quick)
    finally:
        torch.set_num_threads(threads)
    print(f"\n{'optimizer':<11} {'mode':<10} {'n=1 ours/torch':>16} {'us per tensor':>14} {'flat/one tensor':>16} "
          f"{'2000: x torch':>14}")
    for v in result["verdicts"]:
        ok = "ok" if v["per_tensor_us"] <= TARGET_PER_TENSOR_US else f"above {TARGET_PER_TENSOR_US}"
        print(f"{v['optimizer']:<11} {v['mode']:<10} {v['n1_vs_torch']:>15.2f}x {v['per_tensor_us']:>10.3f} ({ok}) "
              f"{v['flat_2000_vs_one_tensor']:>15.2f}x {v['speedup_2000_vs_torch']:>13.2f}x")
    meta = dict(device=device_type, device_kind=device_kind(device), device_name=device_name(device),
                torch=torch.__version__, threads=1, numel_per_param=NUMEL, **git_info())
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"host_{device_kind(device)}.json"
    path.write_text(json.dumps(dict(meta=meta, **result), indent=1))
    print(f"wrote {path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
