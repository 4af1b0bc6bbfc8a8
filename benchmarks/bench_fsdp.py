"""The optimizer step under FSDP2: two gloo ranks on CPU, the transformer layout sharded as fully_shard shards it.

Every param of harness.gpt2_like_shapes() (GPT-2-small's layout, vocab 8192,
3 layers: 28.3M elements in 40 tensors) as a Shard(0) DTensor over a 1-D mesh
of the two ranks, with Shard(0) grads: each rank's local shards are half the
model (note [DTensor by unwrapping] in pyoptim/_dtensor.py: pyoptim steps
them in one fused call). Timed on each rank, both ranks stepping together
(a barrier before every timed call), one thread per rank:

- pyoptim-AdamW and torch-fused (torch.optim.AdamW(fused=True)) over the
  DTensor params, what an FSDP2 training loop runs;
- the same two over plain tensors holding one rank's shards: the
  single-process case over the same bytes, whose ratio the DTensor ratio
  should match (the target);
- AdamW with the clip: pyoptim's max_grad_norm=1.0 (one all-reduce of the
  partial squared norms) against torch.nn.utils.clip_grad_norm_ then the
  fused step, on DTensors and on plain shards.

Milliseconds per step, median over rounds; the slower rank's median is
reported (a step is as slow as its slowest rank).

    python benchmarks/bench_fsdp.py [--quick] [--out DIR]
    (run by `make bench` after the host benchmark; `--ops fsdp` runs it alone)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from pyoptim.benchmark.harness import REPO_ROOT, cpu_model, git_info, gpt2_like_shapes  # noqa: E402

WORLD = 2
KINDS = ("AdamW", "AdamW+clip")


def _optimizer(lib: str, kind: str, params: list):
    import torch

    import pyoptim

    if lib == "torch":
        return torch.optim.AdamW(params, lr=1e-3, fused=True)
    return pyoptim.optim.AdamW(params, lr=1e-3, **(dict(max_grad_norm=1.0) if kind == "AdamW+clip" else {}))


class _Subject:
    """One optimizer over the layout's params, DTensor shards or plain tensors of one rank's shards."""

    def __init__(self, lib: str, kind: str, dtensor: bool, mesh, shapes) -> None:
        import torch
        from torch.distributed.tensor import Shard, distribute_tensor

        g = torch.Generator().manual_seed(0)
        full = [torch.randn(s, generator=g) for s in shapes]
        if dtensor:
            self.params = [torch.nn.Parameter(distribute_tensor(t, mesh, [Shard(0)])) for t in full]
            for p in self.params:
                p.grad = torch.randn_like(p) * 1e-2
        else:  # this rank's shards, as plain tensors
            self.params = [torch.nn.Parameter(distribute_tensor(t, mesh, [Shard(0)]).to_local().clone())
                           for t in full]
            for p in self.params:
                p.grad = torch.randn_like(p) * 1e-2
        self.opt = _optimizer(lib, kind, self.params)
        self.clip = lib == "torch" and kind == "AdamW+clip"

    def step(self) -> None:
        import torch

        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()


def _rank(rank: int, init_file: str, out_dir: str, quick: bool) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(minutes=10))
    mesh = init_device_mesh("cpu", (WORLD,))
    shapes = gpt2_like_shapes()
    rounds = 5 if quick else 15
    rows = []
    for kind in KINDS:
        subjects = {f"{lib}{'' if dtensor else '-local'}": _Subject(lib, kind, dtensor, mesh, shapes)
                    for dtensor in (True, False) for lib in ("pyoptim", "torch")}
        for s in subjects.values():  # the state
            for _ in range(2):
                s.step()
        samples: dict[str, list[float]] = {name: [] for name in subjects}
        for r in range(rounds):
            names = list(subjects)
            k = r % len(names)
            for name in names[k:] + names[:k]:  # the same order on both ranks (the clip's collectives)
                dist.barrier()
                t0 = time.perf_counter()
                subjects[name].step()
                samples[name].append((time.perf_counter() - t0) * 1e3)
        rows.append(dict(optimizer=kind, ms={n: statistics.median(xs) for n, xs in samples.items()}))
        del subjects
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(rows, f)
    dist.destroy_process_group()


def run(quick: bool) -> dict[str, Any]:
    """Both ranks' medians, merged (the slower rank's), and the verdicts against the single-process ratio."""
    import torch.multiprocessing as mp

    out_dir = tempfile.mkdtemp(prefix="pyoptim_bench_fsdp_")
    mp.spawn(_rank, args=(os.path.join(out_dir, "init"), out_dir, quick), nprocs=WORLD, join=True)
    per_rank = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(WORLD)]
    rows = []
    for k, row in enumerate(per_rank[0]):
        ms = {name: max(per_rank[r][k]["ms"][name] for r in range(WORLD)) for name in row["ms"]}
        rows.append(dict(optimizer=row["optimizer"], ms=ms, per_rank=[per_rank[r][k]["ms"] for r in range(WORLD)]))
    verdicts = []
    for row in rows:
        ms = row["ms"]
        dtensor_ratio = ms["pyoptim"] / ms["torch"]
        local_ratio = ms["pyoptim-local"] / ms["torch-local"]
        verdicts.append(dict(optimizer=row["optimizer"], dtensor_ratio=dtensor_ratio, local_ratio=local_ratio,
                             unwrap_overhead=ms["pyoptim"] / ms["pyoptim-local"],
                             meets_target=dtensor_ratio <= local_ratio * 1.1))
    return dict(rows=rows, verdicts=verdicts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results"))
    opts, _ = parser.parse_known_args(argv)

    import torch

    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        print("fsdp: skipped (torch.distributed with gloo is not available)")
        return 0
    n = sum(int(torch.Size(s).numel()) for s in gpt2_like_shapes())
    print(f"fsdp: {cpu_model()}, torch {torch.__version__}, {WORLD} gloo ranks x 1 thread, "
          f"transformer layout ({n / 1e6:.1f}M params, Shard(0))")
    result = run(opts.quick)
    print(f"\n{'optimizer':<11} {'pyoptim':>9} {'torch':>9} {'ratio':>7} | {'local: pyoptim':>14} {'torch':>9} "
          f"{'ratio':>7} | target")
    for row, v in zip(result["rows"], result["verdicts"]):
        ms = row["ms"]
        print(f"{row['optimizer']:<11} {ms['pyoptim']:>7.1f}ms {ms['torch']:>7.1f}ms {v['dtensor_ratio']:>6.2f}x | "
              f"{ms['pyoptim-local']:>12.1f}ms {ms['torch-local']:>7.1f}ms {v['local_ratio']:>6.2f}x | "
              f"{'ok' if v['meets_target'] else 'missed'} (DTensor ratio within 10% of the local one)")
    meta = dict(device="cpu", device_kind="cpu", device_name=cpu_model(), torch=torch.__version__, world_size=WORLD,
                backend="gloo", threads_per_rank=1, layout="gpt2_like_shapes()", numel=n, **git_info())
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "fsdp_cpu.json"
    path.write_text(json.dumps(dict(meta=meta, **result), indent=1))
    print(f"wrote {path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
