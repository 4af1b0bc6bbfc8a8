"""Entry point of the benchmarks (`make bench ARGS=...`): every op of every benchmarks/bench_<op>.py.

    python benchmarks/run.py [--ops adam,batch_norm,host] [--cases large,many_small,transformer]
        [--impls pyoptim-*,torch-fused] [--dtype fp32] [--device cpu|cuda]
        [--out DIR] [--quick] [--no-plot] [--threads N] [--default-allocator] [--list]

See harness.py for what is measured and how, and bench_adam.py for an op. The ops are found, not listed:
every benchmarks/bench_<op>.py that defines OP (adam, sgd, lion, lamb, adagrad, rmsprop, clip,
clip_adamw, layer_norm, batch_norm). After them, bench_host.py times the optimizer step's host path (microseconds per step over tiny
tensors, not GB/s); `--ops host` runs it alone.
"""

import sys
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_host  # noqa: E402
from harness import main  # noqa: E402


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
    rc = main(argv) if others else 0
    if host and rc == 0 and "--list" not in argv:
        rc = bench_host.main(argv)  # it reads --device, --quick and --out, and ignores the rest
    sys.exit(rc)
