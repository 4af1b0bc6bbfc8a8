"""The host-path issue's three GPU numbers, read from benchmarks/results/adam_<device>.json (gpu_check.sh prints
them first): AdamW over 2,000 x 8k against torch fused (target 5x), the transformer layout (1.1x), and one large
tensor's fraction of the measured HBM bandwidth (90%).

    python benchmarks/host_verdict.py [results/adam_cuda_H100.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TARGETS = {"many_small": ("x torch fused", 5.0), "transformer": ("x torch fused", 1.1), "large": ("of bandwidth", 0.9)}


def main(argv: list[str]) -> int:
    results = Path(__file__).resolve().parent / "results"
    paths = [Path(a) for a in argv] or sorted(results.glob("adam_cuda_*.json"), key=lambda p: p.stat().st_mtime)[-1:]
    if not paths:
        print("host verdict: no adam_cuda_*.json under benchmarks/results")
        return 1
    data = json.loads(paths[0].read_text())
    rows = {(r["case"], r["impl"]): r for r in data["rows"] if not r.get("error")}
    print(f"host verdict ({paths[0].name}, {data['meta'].get('device_name')}, sha {data['meta'].get('git_sha', '?')[:10]}):")
    ok = True
    for case, (what, target) in TARGETS.items():
        r = rows.get((case, "pyoptim-cuda"))
        if r is None:
            print(f"  {case:<12} no pyoptim-cuda row")
            ok = False
            continue
        value = r["frac_of_bw"] if case == "large" else r["speedup_vs_baseline"]
        met = value is not None and value >= target
        ok &= met
        shown = f"{100 * value:.0f}%" if case == "large" else f"{value:.2f}x"
        print(f"  {case:<12} {shown:>7} {what} (target {target if case != 'large' else f'{100 * target:.0f}%'}): "
              f"{'met' if met else 'NOT met'}  [{r['ms']:.3f} ms]")
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
