"""Entry point of the benchmarks (`make bench ARGS=...`): every op of every benchmarks/bench_<op>.py.

    python benchmarks/run.py [--ops adam,batch_norm,host] [--cases large,many_small,transformer]
        [--impls pyoptim-*,torch-fused] [--dtype fp32] [--device cpu|cuda]
        [--out DIR] [--quick] [--no-plot] [--threads N] [--default-allocator] [--list]

The harness and the ops live in the package (pyoptim/benchmark/harness.py for what is measured and how,
pyoptim/benchmark/ops/adam.py for an op), so that an installed pyoptim runs the same method on a user's
shapes (`python -m pyoptim.benchmark`); this script runs the project's own cases, with the working tree's
pyoptim. The ops are found, not listed: every module of pyoptim/benchmark/ops that defines OP (adam, sgd,
lion, lamb, adagrad, rmsprop, precision, clip, clip_adamw, layer_norm, rms_norm, batch_norm; an op this
pyoptim lacks is skipped). After them, bench_host.py times the optimizer step's host path (microseconds per
step over tiny tensors, not GB/s; `--ops host` runs it alone) and bench_fsdp.py the step under FSDP2 on two
gloo ranks (milliseconds per step against torch's fused AdamW, on DTensor shards and on plain ones; `--ops
fsdp` runs it alone).
"""

import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
for path in (BENCH_DIR, BENCH_DIR.parent):  # bench_host, and the working tree's pyoptim
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import bench_fsdp  # noqa: E402
import bench_host  # noqa: E402
from pyoptim.benchmark.harness import main  # noqa: E402


# Benchmarks of their own kind (not GB/s), run after the others: --ops names them like any op.
_EXTRA = ("host", "fsdp")


def _split_extra(argv: list[str]) -> tuple[list[str], list[str], bool]:
    """(argv without the extra benchmarks in --ops, the extras to run, whether any other op remains)."""
    out, extras, others = [], list(_EXTRA), True
    i = 0
    while i < len(argv):
        arg = argv[i]
        value = None
        if arg == "--ops" and i + 1 < len(argv):
            value, i = argv[i + 1], i + 1
        elif arg.startswith("--ops="):
            value = arg.split("=", 1)[1]
        if value is None:
            out.append(arg)
        else:
            names = [n for n in value.split(",") if n]
            extras = [n for n in _EXTRA if n in names]
            rest = [n for n in names if n not in _EXTRA]
            others = bool(rest)
            if rest:
                out += ["--ops", ",".join(rest)]
        i += 1
    return out, extras, others


if __name__ == "__main__":
    argv, extras, others = _split_extra(sys.argv[1:])
    rc = main(argv, default_out=BENCH_DIR / "results") if others else 0
    if "--list" not in argv:
        for name in extras:
            if rc == 0:
                # They read --device (host), --quick and --out, and ignore the rest.
                rc = {"host": bench_host.main, "fsdp": bench_fsdp.main}[name](argv)
    sys.exit(rc)
