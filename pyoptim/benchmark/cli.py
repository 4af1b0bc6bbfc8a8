"""`python -m pyoptim.benchmark`: pyoptim's implementations against torch's on the user's own shapes.

    python -m pyoptim.benchmark --model resnet50                 # AdamW and SGD over resnet50's parameters
    python -m pyoptim.benchmark --shapes 4096x4096,1024*24       # one 4096x4096 tensor and 24 of 1024 elements
    python -m pyoptim.benchmark --state-dict ckpt.pt --ops adam,lion,clip_adamw
    python -m pyoptim.benchmark --layer-norm 8192x1024,32768x4096 --batch-norm 64x64x56x56
    python -m pyoptim.benchmark --list                           # ops, models, impls here
    python -m pyoptim.benchmark                                  # the defaults of DEFAULT_CASES, said so

The method is the project's (pyoptim/benchmark/harness.py): the machine's
memory bandwidth first, then every implementation of an op on one case timed
in turns (CPU) or with CUDA events (GPU), GB/s from the bytes the op must
move and the fraction of the measured bandwidth, torch's variants beside
ours, JSON and a PNG per op under --out. The last table says which
implementation to pick for each case, and how it is written in code.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from pyoptim.benchmark import harness, models
from pyoptim.benchmark.harness import Case, Op

# The optimizer ops run over parameter cases when --ops does not say.
DEFAULT_PARAM_OPS = ("adam", "sgd")
DEFAULT_OUT = Path("pyoptim-benchmark")
# The cases of a run given none (`python -m pyoptim.benchmark` alone): a common model's parameter list (from
# the catalogue, so it needs nothing installed) and norm inputs of a common size, each a few seconds on a CPU.
DEFAULT_CASES = {"model": ["resnet18"], "layer_norm": ["4096x1024"], "batch_norm": ["32x64x56x56"]}
_CASE_FLAGS = ("shapes", "model", "state_dict", "layer_norm", "batch_norm")


def _default_flags() -> str:
    """DEFAULT_CASES as the command line that would give them."""
    return " ".join(f"--{k.replace('_', '-')} {','.join(v)}" for k, v in DEFAULT_CASES.items())
_DIMS = re.compile(r"[x\u00d7]", re.IGNORECASE)


# --------------------------------------------------------------------------
# The user's cases
# --------------------------------------------------------------------------

def parse_dims(text: str) -> tuple[int, ...]:
    """"4096x4096" -> (4096, 4096); every dim a positive integer."""
    try:
        dims = tuple(int(d) for d in _DIMS.split(text.strip()))
    except ValueError:
        raise ValueError(f"bad shape {text!r}: dims are integers separated by 'x', like 4096x4096") from None
    if not dims or any(d <= 0 for d in dims):
        raise ValueError(f"bad shape {text!r}: every dim must be positive")
    return dims


def parse_shapes(spec: str) -> tuple[tuple[int, ...], ...]:
    """A parameter list: comma-separated shapes, each optionally repeated with *N.

    "4096x4096,1024*24" -> one (4096, 4096) tensor and 24 tensors of (1024,).
    """
    out: list[tuple[int, ...]] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        shape, _, times = item.partition("*")
        n = 1
        if times:
            try:
                n = int(times)
            except ValueError:
                n = 0
            if n <= 0:
                raise ValueError(f"bad repeat in {item!r}: *N takes a positive integer, like 1024*24")
        out += [parse_dims(shape)] * n
    if not out:
        raise ValueError(f"no shapes in {spec!r}")
    return tuple(out)


def _floating_tensors(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(name, tensor) of every floating-point tensor in a (nested) state_dict."""
    import torch

    if isinstance(obj, torch.Tensor):
        return [(prefix, obj)] if obj.is_floating_point() else []
    if isinstance(obj, dict):
        out = []
        for k, v in obj.items():
            out += _floating_tensors(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    return []


# BatchNorm's running statistics: buffers a state_dict holds beside the parameters.
_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def state_dict_shapes(path: Path) -> models.NamedShapes:
    """The parameters of a saved state_dict (or a checkpoint holding one under "model", "state_dict" or
    "model_state_dict"): its floating-point tensors, BatchNorm's running statistics left out, tied tensors
    (one storage) counted once. Read with mmap, so a large file costs no memory."""
    import torch

    if not path.is_file():
        raise ValueError(f"--state-dict {path}: no such file")
    try:
        try:
            obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError:  # not the zip format mmap needs (a legacy file): read it whole
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever torch.load says, the user needs the file named
        raise ValueError(f"--state-dict {path}: torch.load(weights_only=True) cannot read it ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from e
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    seen: set[tuple[int, int]] = set()
    out: models.NamedShapes = []
    for name, t in _floating_tensors(obj):
        if name.rsplit(".", 1)[-1] in _BUFFER_SUFFIXES:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if t.numel() and key in seen:  # tied (GPT-2's head and embedding): one parameter
            continue
        seen.add(key)
        out.append((name, tuple(t.shape)))
    if not out:
        raise ValueError(f"{path}: no floating-point tensors found")
    return out


def _case_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.,*x+-]+", "_", text)[:60]


def param_cases(opts: argparse.Namespace) -> list[Case]:
    """The parameter-list cases of --shapes, --model and --state-dict, in that order."""
    cases = []
    for spec in opts.shapes or []:
        shapes = parse_shapes(spec)
        cases.append(Case(_case_name(spec), shapes, f"--shapes {spec}"))
    for name in opts.model or []:
        named, source = models.model_shapes(name, opts.model_source)
        cases.append(Case(name, tuple(s for _, s in named), f"{name} from {source}"))
    for path in opts.state_dict or []:
        named = state_dict_shapes(Path(path))
        cases.append(Case(_case_name(Path(path).stem), tuple(s for _, s in named), f"state_dict {path}"))
    return cases


def norm_cases(opts: argparse.Namespace) -> tuple[list[Case], list[Case]]:
    """(the (batch, hidden) cases of --layer-norm, the (N, C, H, W) cases of --batch-norm), one per pass
    (and layout)."""
    from pyoptim.benchmark.ops import batch_norm, layer_norm

    rows, nchw = [], []
    for spec in opts.layer_norm or []:
        for item in spec.split(","):
            dims = parse_dims(item)
            if len(dims) != 2:
                raise ValueError(f"--layer-norm takes (batch, hidden) as BxH, like 8192x1024: got {item!r}")
            rows += [layer_norm.norm_case(dims[0], dims[1], p) for p in opts.passes]
    for spec in opts.batch_norm or []:
        for item in spec.split(","):
            dims = parse_dims(item)
            if len(dims) != 4:
                raise ValueError(f"--batch-norm takes (N, C, H, W) as NxCxHxW, like 64x64x56x56: got {item!r}")
            nchw += [batch_norm.bn_case(dims, layout, p) for layout in opts.layouts for p in opts.passes]
    return rows, nchw


def plan(ops: dict[str, Op], opts: argparse.Namespace) -> list[tuple[Op, list[str]]]:
    """(op with the user's cases in place of its own, case names) for each op to run, in --ops order."""
    by_kind = {"params": param_cases(opts)}
    by_kind["rows"], by_kind["nchw"] = norm_cases(opts)
    if opts.ops:
        names = opts.ops
    else:
        names = [n for n in DEFAULT_PARAM_OPS if by_kind["params"]]
        names += [n for n, op in ops.items() if op.case_kind in ("rows", "nchw") and by_kind[op.case_kind]]
    out = []
    for name in names:
        if name not in ops:
            raise ValueError(f"unknown op {name!r}; known: {', '.join(ops)}")
        op = ops[name]
        cases = by_kind[op.case_kind]
        if not cases:
            flag = {"params": "--shapes, --model or --state-dict", "rows": "--layer-norm", "nchw": "--batch-norm"}
            raise ValueError(f"op {name} needs cases from {flag[op.case_kind]}")
        out.append((dataclasses.replace(op, cases={c.name: c for c in cases}, default_cases=tuple(c.name for c in cases)),
                    [c.name for c in cases]))
    return out


# --------------------------------------------------------------------------
# The verdict
# --------------------------------------------------------------------------

def picks(results: Sequence[dict[str, Any]], ops: dict[str, Op]) -> list[dict[str, Any]]:
    """For each (op, case): the fastest impl, the runner-up, the fastest torch impl, and how to write the pick.

    `tie` is True when the runner-up's interquartile range reaches the fastest's: the two are within this
    run's noise, and either will do.
    """
    out = []
    for res in results:
        op = ops[res["meta"]["op"]]
        by_case: dict[str, list[harness.Row]] = {}
        for r in res["rows"]:
            if r.ms is not None:
                by_case.setdefault(r.case, []).append(r)
        for case, rows in by_case.items():
            rows = sorted(rows, key=lambda r: r.ms)
            best, second = rows[0], (rows[1] if len(rows) > 1 else None)
            torch_rows = [r for r in rows if r.family == "torch"]
            torch_best = torch_rows[0] if torch_rows else None
            tie = (second is not None and best.ms_q3 is not None and second.ms_q1 is not None
                   and second.ms_q1 <= best.ms_q3)
            out.append(dict(
                op=op.name, case=case, pick=best.impl, ms=best.ms, GBps=best.GBps, frac_of_bw=best.frac_of_bw,
                runner_up=second.impl if second else None, runner_up_ms=second.ms if second else None, tie=tie,
                torch_best=torch_best.impl if torch_best else None, torch_best_ms=torch_best.ms if torch_best else None,
                speedup_vs_torch_best=(torch_best.ms / best.ms) if torch_best else None,
                usage=op.usage(best.impl),
            ))
    return out


def format_picks(rows: list[dict[str, Any]]) -> str:
    """The table of picks, then one line per op: which impl won how many of its cases."""
    head = ["op", "case", "pick", "ms", "of BW", "vs torch's best", "use"]
    lines = []
    for p in rows:
        vs = "-" if p["torch_best"] is None else (
            "(is torch's)" if p["pick"] == p["torch_best"] else f"{p['speedup_vs_torch_best']:.2f}x {p['torch_best']}")
        note = f" (tie with {p['runner_up']})" if p["tie"] else ""
        lines.append([p["op"], p["case"], p["pick"] + note, f"{p['ms']:.3f}",
                      "-" if p["frac_of_bw"] is None else f"{100 * p['frac_of_bw']:.0f}%", vs, p["usage"]])
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(c) for c in lines]
    for op in dict.fromkeys(p["op"] for p in rows):
        mine = [p for p in rows if p["op"] == op]
        wins: dict[str, int] = {}
        for p in mine:
            wins[p["pick"]] = wins.get(p["pick"], 0) + 1
        top = max(wins, key=wins.get)
        usage = next(p["usage"] for p in mine if p["pick"] == top)
        out.append(f"{op}: pick {top} ({wins[top]} of {len(mine)} cases): {usage}")
    return "\n".join(out)


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

def build_parser(ops: dict[str, Op]) -> argparse.ArgumentParser:
    """The user's command line."""
    p = argparse.ArgumentParser(
        prog="python -m pyoptim.benchmark", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Time pyoptim's optimizers and norms against torch's on your shapes, with the machine's "
                    "measured memory bandwidth as the roofline, and say which to pick.",
        epilog="examples:\n"
               "  python -m pyoptim.benchmark --model resnet50\n"
               "  python -m pyoptim.benchmark --shapes 4096x4096,1024*24 --ops adam,clip_adamw\n"
               "  python -m pyoptim.benchmark --state-dict model.pt\n"
               "  python -m pyoptim.benchmark --layer-norm 8192x1024 --batch-norm 64x64x56x56\n"
               f"  python -m pyoptim.benchmark   (no cases: {_default_flags()})\n"
               "Every impl of an op holds its own params, grads and state at once (on CPU they are timed in "
               "turns): a large model needs several times its size in memory; --impls narrows the field.")
    csv = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    g = p.add_argument_group("cases (at least one)")
    g.add_argument("--shapes", action="append", metavar="SPEC",
                   help="a parameter list: comma-separated shapes, *N repeats one, like 4096x4096,1024*24 "
                        "(repeat the flag for several cases)")
    g.add_argument("--model", action="append", type=lambda s: [x for x in csv(s)], metavar="NAME",
                   help="a model's parameters, built on the meta device by torchvision or timm when installed, "
                        f"else from pyoptim's catalogue ({', '.join(models.CATALOGUE)})")
    g.add_argument("--model-source", choices=("auto", "catalogue", "torchvision", "timm"), default="auto",
                   help="where --model's shapes come from (default: torchvision, then timm, then the catalogue)")
    g.add_argument("--state-dict", action="append", metavar="FILE",
                   help="a saved state_dict (torch.save) or checkpoint: its floating-point tensors")
    g.add_argument("--layer-norm", action="append", metavar="BxH",
                   help="(batch, hidden) inputs for LayerNorm and RMSNorm, like 8192x1024,32768x4096")
    g.add_argument("--batch-norm", action="append", metavar="NxCxHxW",
                   help="(N, C, H, W) inputs for BatchNorm2d, like 64x64x56x56")
    g.add_argument("--passes", type=csv, default=["fwdbwd"],
                   help="norm passes: fwd, bwd, fwdbwd (default fwdbwd)")
    g.add_argument("--layouts", type=csv, default=["nchw", "cl"],
                   help="BatchNorm layouts: nchw, cl (channels_last) (default both)")
    p.add_argument("--ops", type=csv, default=None,
                   help=f"comma-separated ops (default: {','.join(DEFAULT_PARAM_OPS)} over parameter cases, "
                        f"layer_norm,rms_norm and batch_norm over norm cases); known: {','.join(ops)}")
    harness.add_run_arguments(p, DEFAULT_OUT)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--list", action="store_true", help="list the ops, models and impls here, then exit")
    for op in ops.values():
        if op.add_arguments is not None:
            op.add_arguments(p)
    return p


def _check_lists(parser: argparse.ArgumentParser, opts: argparse.Namespace) -> None:
    opts.model = [m for group in (opts.model or []) for m in group]
    for which in opts.passes:
        if which not in ("fwd", "bwd", "fwdbwd"):
            parser.error(f"--passes: unknown pass {which!r}; known: fwd, bwd, fwdbwd")
    for layout in opts.layouts:
        if layout not in ("nchw", "cl"):
            parser.error(f"--layouts: unknown layout {layout!r}; known: nchw, cl")


def _memory_note(chosen: Sequence[tuple[Op, list[str]]], device, dtype, opts: argparse.Namespace) -> Optional[str]:
    """A warning when the largest case, copied once per impl, may not fit in the device's free memory."""
    import torch

    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        try:
            meminfo = Path("/proc/meminfo").read_text()
            free = int(re.search(r"MemAvailable:\s+(\d+) kB", meminfo).group(1)) * 1024
        except (OSError, AttributeError):
            return None
    itemsize = torch.empty((), dtype=dtype).element_size()
    worst, what = 0, ""
    for op, cases in chosen:
        run, _ = harness._select(op.providers(device, opts), opts.impls)
        held = 1 if device.type == "cuda" else max(1, len(run))  # CUDA: one impl at a time
        for name in cases:
            case = op.cases[name]
            # the inputs, and per impl its copy of every tensor the op moves
            need = case.numel * itemsize * 2 + held * op.bytes_moved(case, dtype, opts)
            if need > worst:
                worst, what = need, f"{op.name} {name}"
    if worst > 0.8 * free:
        return (f"note: {what} may need about {worst / 2**30:.1f} GiB with {device.type} memory {free / 2**30:.1f} GiB "
                "free; --impls with fewer impls (like pyoptim-*,torch-fused) needs less")
    return None


def main(argv: Optional[list[str]] = None) -> int:
    """Run the user's benchmark; 0 on success, 2 on a bad command line. Called with `argv` (not the process's
    own command line), it never re-executes the process for the allocator (note [CPU allocator])."""
    t_start = time.perf_counter()
    ops = harness.discover_ops()
    parser = build_parser(ops)
    opts = parser.parse_args(argv)
    _check_lists(parser, opts)
    chosen, defaults_note = [], None
    if not opts.list:
        if not any(getattr(opts, flag) for flag in _CASE_FLAGS):
            for flag, value in DEFAULT_CASES.items():
                setattr(opts, flag, value)
            defaults_note = (f"no cases given, so these defaults: {_default_flags()}; yours with --shapes, "
                             "--model, --state-dict, --layer-norm, --batch-norm (--help)")
        try:  # the cases are checked before the allocator re-exec, which imports everything again
            chosen = plan(ops, opts)
        except KeyError as e:  # str() of a KeyError is its message in quotes
            parser.error(str(e.args[0]) if e.args else str(e))
        except (ValueError, OSError) as e:
            parser.error(str(e))
        if not chosen:
            parser.error("nothing to run: give --shapes, --model, --state-dict, --layer-norm or --batch-norm")
    device, dtype = harness.setup_device(parser, opts, reexec=argv is None)
    if defaults_note:  # after the re-exec, so said once
        print(defaults_note)
    if opts.list:
        print("models:", ", ".join(models.known_models()), "(and torchvision's / timm's when installed)")
        harness.list_ops([dataclasses.replace(op, cases={}) for op in ops.values()], device, opts)
        return 0
    for op, _ in chosen:
        why = harness.without_pyoptim(op, device, opts)
        if why is not None:
            parser.error(f"op {op.name}: {why}")
    harness.check_impls(parser, [op for op, _ in chosen], device, opts)
    for op, cases in chosen:
        for name in cases:
            c = op.cases[name]
            print(f"case {op.name} {name}: {c.ntensors:,} tensors, {c.numel:,} elements ({c.description})")
    note = _memory_note(chosen, device, dtype, opts)
    if note:
        print(note)

    steps = 1 + sum(len(cases) for _, cases in chosen)
    progress = None if opts.no_progress else harness.Progress(steps)
    try:
        results = harness.run_ops(chosen, device, dtype, opts, progress)
    finally:
        if progress is not None:
            progress.close()
    chosen_ops = {op.name: op for op, _ in chosen}
    rows = picks(results, chosen_ops)
    print("\n== which to pick (fastest median per case; 'tie': the runner-up is within this run's spread)")
    print(format_picks(rows) if rows else "no results")
    kind = harness.device_kind(device) + ("" if opts.dtype == "fp32" else f"_{opts.dtype}")
    summary = opts.out / f"picks_{kind}.json"
    summary.write_text(json.dumps({"device": results[0]["meta"]["device_name"] if results else None,
                                   "torch": results[0]["meta"]["torch"] if results else None,
                                   "results": [str(r["path"]) for r in results], "picks": rows},
                                  indent=1, default=str) + "\n")
    print(f"wrote {summary}\ntotal {time.perf_counter() - t_start:.0f} s")
    return 0
