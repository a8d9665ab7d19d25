#!/usr/bin/env bash
# One-shot GPU check of fastmlp's hand-written CUDA kernels, for a machine with a GPU and torch +
# nvcc preinstalled (no network needed). From the repository root:
#
#     bash benchmarks/gpu_check.sh
#
# 1. builds and installs fastmlp for this GPU's architecture only (quicker than the default list);
# 2. runs tests/test_cuda.py (parity, gradcheck, determinism, whole step, CUDA graph, errors) and the
#    other tests marked `cuda` (pytest -m cuda), in groups, each in its own process;
# 3. runs benchmarks/gpu_bench.py (fused layer vs F.linear + relu on cuBLAS) and
#    benchmarks/gpu_step_bench.py (whole training step vs eager torch and torch.compile) and
#    benchmarks/gpu_infer_bench.py (FusedMLP inference vs the plain model), printing their tables. FASTMLP_DATA=DIR (holding MNIST/raw/*.gz) makes the epoch timing use real MNIST.
# The experimental split-K FP32 GEMM (FASTMLP_CUDA_SPLITK=1, off by default) gets its own test group
# and float32 / training-step benchmark runs, next to the default path's.
# Every step has a time limit so that the whole script ends within about 9 minutes. Logs go to $OUT (if
# set) or to ./gpu_check_logs. Exit status: 0 only if the build, all tests and every benchmark (each
# checks its results before timing) passed.
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
# In groups, each in its own process: a crash (say, a kernel fault) loses one group's remaining
# tests, not the whole run. Every group's output is kept in pytest_<group>.txt. A group that
# collects no test (pytest exit status 5) fails: its selection no longer matches what it should run.
# --strict-markers: a `cuda` marker unknown to pytest (pyproject.toml not read) is an error, not an
# empty selection.
TEST_RC=0
run_tests() {  # name, timeout, pytest arguments...
  local name=$1 limit=$2; shift 2
  say "tests: $name"
  FASTMLP_CUDA_KERNELS=1 timeout "$limit" "$PY" -m pytest "$@" -q -rfEs -p no:cacheprovider --strict-markers \
    --rootdir "$ROOT" > "$LOGS/pytest_$name.txt" 2>&1
  local rc=$?
  tail -6 "$LOGS/pytest_$name.txt"
  if [ $rc -eq 0 ]; then say "tests: $name passed"
  elif [ $rc -eq 5 ]; then say "TESTS FAILED: $name collected no tests (rc=5, see pytest_$name.txt)"; TEST_RC=1
  else say "TESTS FAILED: $name (rc=$rc, see pytest_$name.txt)"; TEST_RC=1; fi
}
T="$ROOT/tests"
run_tests layers 120 "$T/test_cuda.py" -k "not step and not graph and not trainer and not errors"
run_tests step 90 "$T/test_cuda.py" -k "(step or graph or trainer) and not errors"
run_tests errors 60 "$T/test_cuda.py" -k "errors"
# The experimental split-K FP32 GEMM (off by default): the same tests with it on.
FASTMLP_CUDA_SPLITK=1 run_tests splitk 150 "$T/test_cuda.py" -k "not errors"
# Every other test that needs a GPU (parity, autograd, whole step, errors ...), on the same kernels:
# selected by the `cuda` marker (pyproject.toml), which tests/conftest.py pairs with a check that
# the compiled CUDA kernels, not the PyTorch reference, served each of them.
run_tests other 120 "$T" --ignore "$T/test_cuda.py" -m cuda

# ---- 3. benchmarks ------------------------------------------------------------------------------
# Each with a cap and what time is left, so that the script ends within about 9 minutes. The
# experimental split-K FP32 GEMM is measured right after its default counterpart.
DATA_ARG=()
[ -n "${FASTMLP_DATA:-}" ] && DATA_ARG=(--data "$FASTMLP_DATA")
# A benchmark that exits non-zero (a variant failed its check against PyTorch, or it timed out)
# fails the whole check: its numbers cannot be trusted.
BENCH_RC=0
bench() {  # name, cap seconds, deadline (seconds since start), command...
  local name=$1 cap=$2 deadline=$3; shift 3
  local left=$(( deadline - $(elapsed) )); [ $left -gt $cap ] && left=$cap
  if [ $left -lt 15 ]; then say "no time left for $name"; return; fi
  say "$name (limit ${left}s)"
  if ! FASTMLP_CUDA_KERNELS=1 timeout $left "$PY" "$@" > "$LOGS/$name.txt" 2>&1; then
    say "$name FAILED or timed out (see $name.txt)"; BENCH_RC=1
  fi
  tail -20 "$LOGS/$name.txt"
}
bench bench 90 330 "$ROOT/benchmarks/gpu_bench.py" --reps 9 --batch-ms 10 --json "$LOGS/bench.json"
# The hand-written GEMMs at every shape (the default sends GEMMs of >= 2^28 flop to cuBLAS): the
# measurements the vendor-GEMM rule in csrc/cuda/launch.h should come from.
FASTMLP_GEMM=fastmlp bench bench_handwritten 60 380 "$ROOT/benchmarks/gpu_bench.py" --reps 7 --batch-ms 10 \
  --json "$LOGS/bench_handwritten.json"
FASTMLP_CUDA_SPLITK=1 bench bench_splitk 45 400 "$ROOT/benchmarks/gpu_bench.py" --reps 9 --batch-ms 10 --dtypes fp32 \
  --json "$LOGS/bench_splitk.json"
bench step_bench 150 470 "$ROOT/benchmarks/gpu_step_bench.py" "${DATA_ARG[@]}" --steps 200 --reps 5 \
  --json "$LOGS/step_bench.json"
bench infer_bench 40 490 "$ROOT/benchmarks/gpu_infer_bench.py" --reps 7 --json "$LOGS/infer_bench.json"
FASTMLP_CUDA_SPLITK=1 bench step_bench_splitk 60 510 "$ROOT/benchmarks/gpu_step_bench.py" "${DATA_ARG[@]}" \
  --no-compile --steps 200 --reps 5 --json "$LOGS/step_bench_splitk.json"

say "done: tests rc=$TEST_RC, benchmarks rc=$BENCH_RC"
[ $TEST_RC -eq 0 ] && [ $BENCH_RC -eq 0 ]
