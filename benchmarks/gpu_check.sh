#!/usr/bin/env bash
# One-shot GPU check of fastmlp's hand-written CUDA kernels, for a machine with a GPU and torch +
# nvcc preinstalled (no network needed). From the repository root:
#
#     bash benchmarks/gpu_check.sh
#
# 1. builds and installs fastmlp for this GPU's architecture only (quicker than the default list);
# 2. runs FASTMLP_CUDA_KERNELS=1 pytest tests/test_cuda.py (parity, gradcheck, determinism, ...);
# 3. runs benchmarks/gpu_bench.py (fused layer vs F.linear + relu on cuBLAS) and
#    benchmarks/gpu_step_bench.py (whole training step vs eager torch and torch.compile), printing
#    their tables. FASTMLP_DATA=DIR (holding MNIST/raw/*.gz) makes the epoch timing use real MNIST.
# Every step has a time limit so that the whole script ends within 8 minutes. Logs go to $OUT (if
# set) or to ./gpu_check_logs. Exit status: 0 only if the build and all tests passed.
#
# Needs pytest importable; if it is not installed, point FASTMLP_PYLIB at a folder holding the
# (pure-Python) pytest, _pytest, pluggy, iniconfig and packaging packages.
set -u -o pipefail

T0=$(date +%s)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOGS=${OUT:-$ROOT/gpu_check_logs}
mkdir -p "$LOGS"
PY=${PYTHON:-python}
if [ -n "${FASTMLP_PYLIB:-}" ]; then export PYTHONPATH="$FASTMLP_PYLIB${PYTHONPATH:+:$PYTHONPATH}"; fi

elapsed() { echo $(( $(date +%s) - T0 )); }
say() { echo "[gpu_check $(elapsed)s] $*" | tee -a "$LOGS/summary.txt"; }

: > "$LOGS/summary.txt"
say "repo $ROOT, logs in $LOGS"
if ! "$PY" - > "$LOGS/env.txt" 2>&1 <<'EOF'
import shutil, subprocess, torch
print("torch", torch.__version__, "cuda", torch.version.cuda)
assert torch.cuda.is_available(), "torch sees no CUDA GPU"
for i in range(torch.cuda.device_count()):
    print(f"gpu {i}:", torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i))
print("nvcc:", shutil.which("nvcc"))
if shutil.which("nvcc"):
    print(subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout)
EOF
then
  cat "$LOGS/env.txt"; say "FAILED: environment check (see env.txt)"; exit 1
fi
cat "$LOGS/env.txt"

# ---- 1. build -----------------------------------------------------------------------------------
ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$ARCH}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
say "building for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST with MAX_JOBS=$MAX_JOBS"
B0=$(date +%s)
if ! (cd "$ROOT" && timeout 280 "$PY" -m pip install --no-build-isolation --no-deps --no-index -v . ) > "$LOGS/build.txt" 2>&1; then
  tail -40 "$LOGS/build.txt"; say "FAILED: build (see build.txt)"; exit 1
fi
say "build ok in $(( $(date +%s) - B0 ))s; nvcc warnings: $(grep -c -i 'warning' "$LOGS/build.txt" || true) lines mentioning 'warning'"

# Run from outside the repository so that `import fastmlp` is the installed package, not ./fastmlp.
cd "$LOGS" || exit 1
if ! "$PY" -c "import fastmlp, sys; i = fastmlp.backend_info(); print(i); sys.exit(0 if i.get('cuda_kernels_built') else 1)" > "$LOGS/backend.txt" 2>&1; then
  cat "$LOGS/backend.txt"; say "FAILED: the installed extension has no CUDA kernels (see backend.txt)"; exit 1
fi
cat "$LOGS/backend.txt"

# ---- 2. tests -----------------------------------------------------------------------------------
say "running tests/test_cuda.py"
FASTMLP_CUDA_KERNELS=1 timeout 150 "$PY" -m pytest "$ROOT/tests/test_cuda.py" -q -rfEs -p no:cacheprovider \
  --rootdir "$ROOT" > "$LOGS/pytest.txt" 2>&1
TEST_RC=$?
tail -30 "$LOGS/pytest.txt"
if [ $TEST_RC -eq 0 ]; then say "tests/test_cuda.py passed"; else say "TESTS FAILED (rc=$TEST_RC, see pytest.txt)"; fi

# The CUDA cases of the rest of the suite (parity, autograd, modules, whole step) on the same kernels.
say "running the CUDA cases of the other test modules"
FASTMLP_CUDA_KERNELS=1 timeout 90 "$PY" -m pytest "$ROOT/tests/test_parity.py" "$ROOT/tests/test_autograd.py" \
  "$ROOT/tests/test_modules.py" "$ROOT/tests/test_sgd_step.py" -k cuda -q -rfEs -p no:cacheprovider \
  --rootdir "$ROOT" > "$LOGS/pytest_other.txt" 2>&1
OTHER_RC=$?
tail -15 "$LOGS/pytest_other.txt"
if [ $OTHER_RC -eq 0 ] || [ $OTHER_RC -eq 5 ]; then say "other CUDA cases passed (rc=$OTHER_RC)"
else say "OTHER CUDA CASES FAILED (rc=$OTHER_RC, see pytest_other.txt)"; TEST_RC=1; fi

# ---- 3. benchmarks ------------------------------------------------------------------------------
# Layer benchmark first (quick), then the training-step benchmark, each with what time is left.
LEFT=$(( 380 - $(elapsed) )); [ $LEFT -gt 90 ] && LEFT=90
if [ $LEFT -gt 20 ]; then
  say "layer benchmark (limit ${LEFT}s)"
  FASTMLP_CUDA_KERNELS=1 timeout $LEFT "$PY" "$ROOT/benchmarks/gpu_bench.py" --reps 9 --batch-ms 10 \
    --json "$LOGS/bench.json" > "$LOGS/bench.txt" 2>&1
  BENCH_RC=$?
  cat "$LOGS/bench.txt"
  [ $BENCH_RC -eq 0 ] || say "layer benchmark FAILED or timed out (rc=$BENCH_RC, see bench.txt)"
else
  say "no time left for the layer benchmark"
fi
LEFT=$(( 440 - $(elapsed) ))
if [ $LEFT -gt 30 ]; then
  DATA_ARG=()
  [ -n "${FASTMLP_DATA:-}" ] && DATA_ARG=(--data "$FASTMLP_DATA")
  say "training-step benchmark (limit ${LEFT}s)"
  FASTMLP_CUDA_KERNELS=1 timeout $LEFT "$PY" "$ROOT/benchmarks/gpu_step_bench.py" "${DATA_ARG[@]}" \
    --steps 200 --reps 5 --json "$LOGS/step_bench.json" > "$LOGS/step_bench.txt" 2>&1
  STEP_RC=$?
  cat "$LOGS/step_bench.txt"
  [ $STEP_RC -eq 0 ] || say "training-step benchmark FAILED or timed out (rc=$STEP_RC, see step_bench.txt)"
else
  say "no time left for the training-step benchmark"
fi

say "done: tests rc=$TEST_RC"
exit $TEST_RC
