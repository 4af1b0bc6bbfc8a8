"""Entry point of the benchmarks (`make bench ARGS=...`): every op of every benchmarks/bench_<op>.py.

    python benchmarks/run.py [--ops adam,batch_norm,host] [--cases large,many_small,transformer]
        [--impls pyoptim-*,torch-fused] [--dtype fp32] [--device cpu|cuda]
        [--out DIR] [--quick] [--no-plot] [--threads N] [--default-allocator] [--list]

The harness and the ops live in the package (pyoptim/benchmark/harness.py for what is measured and how,
pyoptim/benchmark/ops/adam.py for an op), so that an installed pyoptim runs the same method on a user's
shapes (`python -m pyoptim.benchmark`); this script runs the project's own cases, with the working tree's
pyoptim. The ops are found, not listed: every module of pyoptim/benchmark/ops that defines OP (adam, sgd,
lion, lamb, adagrad, rmsprop, clip, clip_adamw, layer_norm, rms_norm, batch_norm; an op this pyoptim lacks
is skipped). After them, bench_host.py times the optimizer step's host path (microseconds per step over
tiny tensors, not GB/s); `--ops host` runs it alone.
"""

import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
for path in (BENCH_DIR, BENCH_DIR.parent):  # bench_host, and the working tree's pyoptim
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import bench_host  # noqa: E402
from pyoptim.benchmark.harness import main  # noqa: E402


def _split_host(argv: list[str]) -> tuple[list[str], bool, bool]:
    """(argv without "host" in --ops, whether to run the host benchmark, whether any other op remains)."""
    out, host, others = [], True, True
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
            host = "host" in names
            rest = [n for n in names if n != "host"]
            others = bool(rest)
            if rest:
                out += ["--ops", ",".join(rest)]
        i += 1
    return out, host, others


if __name__ == "__main__":
    argv, host, others = _split_host(sys.argv[1:])
    rc = main(argv, default_out=BENCH_DIR / "results") if others else 0
    if host and rc == 0 and "--list" not in argv:
        rc = bench_host.main(argv)  # it reads --device, --quick and --out, and ignores the rest
    sys.exit(rc)
