#!/usr/bin/env bash
# Everything that needs a GPU, in one go, for a machine with a CUDA GPU,
# torch 2.11+ preinstalled and no network: build in place, run the CUDA tests,
# run the benchmark. Writes the log, test report and benchmark JSON/PNG under
# benchmarks/results/ (and to $OUT as they appear, when $OUT is set). Budget:
# about 6 minutes on 16 cores.
#
#   bash benchmarks/gpu_check.sh                    # all phases
#   PHASES="build test" bash benchmarks/gpu_check.sh
#   PYOPTIM_GIT_SHA=$(git rev-parse HEAD) ...       # where the copy has no .git
#   TEST_FILTER=..., BENCH_ARGS="--ops adam --quick" (one run instead of the default: norms, then
#   optimizers, then BatchNorm in bf16), *_TIMEOUT=seconds
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PHASES=${PHASES:-"build test bench"}
RESULTS=benchmarks/results
mkdir -p "$RESULTS"
LOGDIR=${OUT:-$RESULTS}
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '_')
LOG="$LOGDIR/gpu_check_${GPU:-unknown}.log"
exec > >(tee "$LOG") 2>&1
export PYTHONUNBUFFERED=1
export PYOPTIM_GIT_SHA=${PYOPTIM_GIT_SHA:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
status=0
t_start=$(date +%s)
elapsed() { echo "[$(( $(date +%s) - t_start )) s]"; }

echo "== gpu_check $(date -u +%FT%TZ) sha=$PYOPTIM_GIT_SHA"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv || true
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
$PY -c "import triton; print('triton', triton.__version__)" || true

if [[ " $PHASES " == *" build "* ]]; then
  echo "== build $(elapsed)"
  # Only this GPU's arch: the build is part of the device budget.
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
  # The CPU kernels for DEFAULT only: CPU speed is not what this machine measures.
  export MAX_JOBS=${MAX_JOBS:-16} PYOPTIM_PTXAS_VERBOSE=1 PYOPTIM_CPU_ISAS=${PYOPTIM_CPU_ISAS:-DEFAULT}
  if ! timeout ${BUILD_TIMEOUT:-300} $PY -m pip install -v --no-build-isolation --no-deps --no-index -e . >"$LOGDIR/build.log" 2>&1; then
    echo "BUILD FAILED"; grep -E "error|Error" "$LOGDIR/build.log" | cut -c1-400 | head -30; status=1
  fi
  # Registers and spills of the CUDA kernels (ptxas -v), in short.
  grep -E "registers|spill" "$LOGDIR/build.log" | sed 's/^ *//' | sort | uniq -c | sort -rn | head -12 || true
  $PY -m pyoptim info --compact || status=1
fi

if [[ " $PHASES " == *" test "* ]]; then
  echo "== CUDA tests $(elapsed)"
  timeout ${TEST_TIMEOUT:-200} $PY -m pytest -q --no-header -p no:cacheprovider tests -k "${TEST_FILTER:-cuda}" -o addopts="" \
    --junitxml="$LOGDIR/gpu_tests.xml" --maxfail=15 2>&1 | tail -60
  [[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
fi

if [[ " $PHASES " == *" bench "* ]]; then
  echo "== benchmark $(elapsed)"
  # The host path's three numbers first (AdamW: 2,000 x 8k and the transformer layout against torch
  # fused, one large tensor against the bandwidth), then the step's host cost over tiny tensors.
  timeout ${BENCH_HOST_TIMEOUT:-90} $PY benchmarks/run.py --device cuda --out "$RESULTS" --ops adam --quick \
    --impls pyoptim-cuda,torch-fused,torch-foreach && $PY benchmarks/host_verdict.py || status=1
  timeout ${BENCH_HOST_TIMEOUT:-90} $PY benchmarks/run.py --device cuda --out "$RESULTS" --ops host --quick || status=1
  if [[ -n "${BENCH_ARGS:-}" ]]; then
    timeout ${BENCH_TIMEOUT:-200} $PY benchmarks/run.py --device cuda --out "$RESULTS" $BENCH_ARGS || status=1
  else
    # The norms first, each family under its own timeout: their kernels are the ones least often
    # run on a GPU, and a slow first family must not leave the other without numbers.
    IMPLS="pyoptim-cuda,pyoptim-triton,torch*,liger,apex*,deepspeed*"
    timeout ${BENCH_NORM_TIMEOUT:-120} $PY benchmarks/run.py --device cuda --out "$RESULTS" --ops batch_norm,layer_norm \
      --impls "$IMPLS" || status=1
    timeout ${BENCH_TIMEOUT:-200} $PY benchmarks/run.py --device cuda --out "$RESULTS" --ops adam,sgd,clip,clip_adamw \
      --impls "$IMPLS" || status=1
    # The rest of the optimizer family, quick (fewer rounds): first numbers on a GPU, against torch's
    # fused/foreach variants where torch has them and the user-written foreach versions where not.
    timeout ${BENCH_FAMILY_TIMEOUT:-120} $PY benchmarks/run.py --device cuda --out "$RESULTS" \
      --ops lion,lamb,adagrad,rmsprop --quick --impls "$IMPLS" || status=1
    # BatchNorm in bf16 too (float32 parameters): mixed precision's case on GPUs, where its kernels differ most.
    timeout ${BENCH_BF16_TIMEOUT:-90} $PY benchmarks/run.py --device cuda --out "$RESULTS" --ops batch_norm --dtype bf16 \
      --impls pyoptim-cuda,pyoptim-triton,torch || status=1
    # bf16 AdamW in each precision policy (issue 15) against torch's fused, quick: the first GPU numbers of
    # its element-by-element CUDA path.
    timeout ${BENCH_PRECISION_TIMEOUT:-90} $PY benchmarks/run.py --device cuda --out "$RESULTS" --ops precision \
      --quick --impls "pyoptim-cuda*,torch*" || status=1
  fi
  if [[ -n "${OUT:-}" ]]; then
    cp "$RESULTS"/*cuda*.json "$RESULTS"/*cuda*.png "$OUT"/ 2>/dev/null || true
  fi
fi
echo "== gpu_check done $(elapsed), status $status"
exit $status
