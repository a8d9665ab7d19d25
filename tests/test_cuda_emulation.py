"""Runs the CUDA kernels of csrc/cuda on the CPU emulator in tests/cuda_emulation (no GPU needed):
every tile configuration, operand layout and dtype path of the GEMMs, the dReLU + bias-grad
kernels, the one-kernel inference of a whole small MLP and the whole step's multi-tensor SGD and
Adam updates, checked bit for bit against exact references, with AddressSanitizer and UBSan on the
quick run. The emulated threads are fibers with
real barrier / warp-shuffle semantics (see emu.h).

This checks index math, bounds, barriers, mask-byte ownership and WMMA alignment rules; it does not
replace running on a GPU (see tests/test_cuda.py).
"""

import hashlib
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS = os.path.join(ROOT, "tests", "cuda_emulation")


def _cuda_include():
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    try:
        from torch.utils.cpp_extension import CUDA_HOME

        candidates.append(CUDA_HOME)
    except Exception:
        pass
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "include", "cuda_fp16.h")):
            return os.path.join(home, "include")
    return None


CXX = os.environ.get("CXX", "g++")
CUDA_INCLUDE = _cuda_include()
pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the emulator uses ucontext (Linux)"),
    pytest.mark.skipif(shutil.which(CXX) is None, reason=f"no C++ compiler ({CXX})"),
    pytest.mark.skipif(CUDA_INCLUDE is None, reason="no CUDA headers (cuda_fp16.h) to compile against"),
]


def _build(flags):
    """Compiles the harness (cached under build/ by a hash of the sources and flags)."""
    sources = [os.path.join(HARNESS, f) for f in sorted(os.listdir(HARNESS))]
    cuda_dir = os.path.join(ROOT, "csrc", "cuda")
    sources += [os.path.join(cuda_dir, f) for f in sorted(os.listdir(cuda_dir)) if f.endswith((".cuh", ".h"))]
    h = hashlib.sha256(" ".join([CXX, *flags, CUDA_INCLUDE]).encode())
    for path in sources:
        with open(path, "rb") as f:
            h.update(path.encode() + f.read())
    out_dir = os.path.join(ROOT, "build", "cuda_emulation")
    os.makedirs(out_dir, exist_ok=True)
    exe = os.path.join(out_dir, "run_kernels-" + h.hexdigest()[:16])
    if not os.path.exists(exe):
        cmd = [CXX, "-std=c++20", *flags, "-Wall", "-Wextra", "-Wno-unknown-pragmas",
               "-I", os.path.join(ROOT, "csrc"), "-I", CUDA_INCLUDE,
               os.path.join(HARNESS, "run_kernels.cpp"), "-o", exe + ".tmp"]  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, f"compiling the emulation harness failed:\n{' '.join(cmd)}\n{r.stderr[-5000:]}"
        os.replace(exe + ".tmp", exe)
    return exe


def _run(exe, *args, env=None):
    r = subprocess.run([exe, *args], capture_output=True, text=True, env=env)
    tail = (r.stdout[-4000:] + "\n" + r.stderr[-4000:]).strip()
    assert r.returncode == 0 and "ALL OK" in r.stdout, f"emulated kernels failed (rc={r.returncode}):\n{tail}"
    return r.stdout


def test_emulated_kernels_quick_with_sanitizers():
    exe = _build(["-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"])
    env = dict(os.environ)
    # ucontext fibers: ASan warns once about swapcontext and cannot check fake stacks across switches.
    env["ASAN_OPTIONS"] = "detect_stack_use_after_return=0:" + env.get("ASAN_OPTIONS", "")
    _run(exe, "quick", env=env)


@pytest.mark.slow
def test_emulated_kernels_full():
    _run(_build(["-O2"]))
