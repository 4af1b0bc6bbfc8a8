#!/usr/bin/env bash
# The wheel check (`make check-wheel`; CI can run it as it is): build the wheel as `make wheel` does (the
# archs of TORCH_CUDA_ARCH_LIST), install it into a fresh venv outside the source tree and run
# tools/wheel_smoke.py there: the import, `python -m pyoptim info` listing the archs, the torch pin in the
# metadata, one AdamW step and one LayerNorm forward/backward against torch, and the one fallback warning
# when the library cannot load (removed, or built for another torch release).
#
#   bash tools/check_wheel.sh                       # build, then check
#   WHEEL=dist/pyoptim-0.1.0-*.whl bash tools/check_wheel.sh   # check a wheel built before
#   PYTHON=.venv/bin/python (default): the interpreter that builds, and whose torch the fresh venv uses
#
# The fresh venv gets the build interpreter's torch (and the rest of its site-packages, pip included, but
# no pyoptim, editable or not) through links in a directory of its own on a .pth line: no multi-GB torch
# download, and pip still resolves the wheel's torch requirement against it (--no-index: nothing is
# fetched); the wheel itself is installed into the venv's own site-packages.
# The build reuses the objects of `make build` under build/ (the same flags): then it only links.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-.venv/bin/python}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/pyoptim-wheel.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
t0=$(date +%s)

if [[ -z "${WHEEL:-}" ]]; then
  echo "== building the wheel (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}, PYOPTIM_NO_CUDA=${PYOPTIM_NO_CUDA:-0})"
  "$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$WORK/dist" . >"$WORK/build.log" 2>&1 \
    || { tail -40 "$WORK/build.log"; echo "wheel build FAILED"; exit 1; }
  WHEEL=$(ls "$WORK"/dist/pyoptim-*.whl)
fi
echo "wheel: $WHEEL ($(du -h "$WHEEL" | cut -f1), $(( $(date +%s) - t0 )) s)"

# The archs the wheel must list: none for a CPU-only build, else TORCH_CUDA_ARCH_LIST as setup.py reads it.
ARCHS=$("$PY" - <<'EOF'
import os, shutil
import torch
from torch.utils import cpp_extension
cuda = (os.environ.get("PYOPTIM_NO_CUDA", "0") != "1" and torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")))
archs = []
if cuda:
    for item in os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0").replace(",", ";").replace(" ", ";").split(";"):
        item = item.strip().split("+")[0]
        if item:
            major, minor = item.split(".")
            archs.append(f"sm_{int(major) * 10 + int(minor.rstrip('af'))}")
print(",".join(archs))
EOF
)

echo "== a fresh venv in $WORK/venv"
BASE=$("$PY" -c "import sys; print(getattr(sys, '_base_executable', sys.executable))")
"$BASE" -m venv --without-pip "$WORK/venv"  # pip and setuptools come linked, as torch's metadata wants them
VPY="$WORK/venv/bin/python"
SITE=$("$PY" -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))")
VSITE=$("$VPY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
mkdir "$WORK/torch-site"
for entry in "$SITE"/*; do
  name=$(basename "$entry")
  case "$name" in
    pyoptim|pyoptim-*|__editable__*|*.pth|__pycache__) ;;
    *) ln -s "$entry" "$WORK/torch-site/$name" ;;
  esac
done
echo "$WORK/torch-site" > "$VSITE/_build_env_torch.pth"
"$VPY" -m pip install -q --no-index --no-build-isolation "$WHEEL"

echo "== smoke test (cwd $WORK, archs expected: ${ARCHS:-none})"
cd "$WORK"
env -u PYTHONPATH -u PYOPTIM_BACKEND -u PYOPTIM_GIT_SHA "$VPY" "$ROOT/tools/wheel_smoke.py" --archs "$ARCHS" --site "$VSITE"
echo "== wheel check passed ($(( $(date +%s) - t0 )) s)"
