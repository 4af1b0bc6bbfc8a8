#!/usr/bin/env bash
# Everything that needs a GPU, in one go, for a machine with a CUDA GPU,
# torch 2.11+ preinstalled and no network: build in place, run the CUDA tests,
# run the benchmark. Writes the log and JSON under benchmarks/results/ (and
# copies them to $OUT when set). Budget: about 8 minutes.
#
#   bash benchmarks/gpu_check.sh            # all phases
#   PHASES="build test" bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PHASES=${PHASES:-"build test bench"}
RESULTS=benchmarks/results
mkdir -p "$RESULTS"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '_' || echo unknown)
LOG="$RESULTS/gpu_check_${GPU}.log"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1
status=0

echo "== gpu_check $(date -u +%FT%TZ) sha=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv || true
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
$PY -c "import triton; print('triton', triton.__version__)" || true

if [[ " $PHASES " == *" build "* ]]; then
  echo "== build"
  # Only this GPU's arch: the build is part of the device budget.
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
  export MAX_JOBS=${MAX_JOBS:-16} PYOPTIM_PTXAS_VERBOSE=1
  t0=$(date +%s)
  if ! timeout 300 $PY -m pip install -v --no-build-isolation --no-deps --no-index -e . >"$RESULTS/build.log" 2>&1; then
    echo "BUILD FAILED"; tail -60 "$RESULTS/build.log"; status=1
  fi
  # Registers and spills of the CUDA kernels (ptxas -v).
  grep -E "Compiling entry|registers|spill" "$RESULTS/build.log" | sed 's/^ *//' | head -80 || true
  echo "build took $(( $(date +%s) - t0 )) s"
  $PY -m pyoptim info --compact || status=1
fi

if [[ " $PHASES " == *" test "* ]]; then
  echo "== CUDA tests"
  timeout 240 $PY -m pytest -q -x --no-header -p no:cacheprovider tests -k "cuda" -o addopts="" \
    --junitxml="$RESULTS/gpu_tests.xml" 2>&1 | tail -40
  [[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
fi

if [[ " $PHASES " == *" bench "* ]]; then
  echo "== benchmark"
  timeout 240 $PY benchmarks/run.py --device cuda --out "$RESULTS" || status=1
fi

if [[ -n "${OUT:-}" ]]; then
  cp "$RESULTS"/*.json "$RESULTS"/*.png "$RESULTS"/*.log "$RESULTS"/*.xml "$OUT"/ 2>/dev/null || true
fi
echo "== gpu_check done, status $status"
exit $status
