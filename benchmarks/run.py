"""Entry point of the benchmarks (`make bench ARGS=...`): every op of every benchmarks/bench_<op>.py.

    python benchmarks/run.py [--ops adam,batch_norm] [--cases large,many_small,transformer]
        [--impls pyoptim-*,torch-fused] [--dtype fp32] [--device cpu|cuda]
        [--out DIR] [--quick] [--no-plot] [--threads N] [--default-allocator] [--list]

See harness.py for what is measured and how, and bench_adam.py for an op. The ops are found, not listed:
every benchmarks/bench_<op>.py that defines OP (adam, sgd, lion, lamb, clip, clip_adamw, layer_norm,
batch_norm).
"""

import sys
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
