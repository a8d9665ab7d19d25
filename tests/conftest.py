"""Shared fixtures. The real datasets live outside the repository, in ../shared/data (torchvision's layout:
MNIST/raw/, FashionMNIST/raw/); FASTMLP_TEST_DATA points elsewhere. Tests needing them skip when absent."""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def _data_root() -> Path:
    return Path(os.environ.get("FASTMLP_TEST_DATA") or REPO_ROOT.parent / "shared" / "data").resolve()


def pytest_generate_tests(metafunc):
    # Parametrized here rather than in the fixture so that fastmlp is imported by the test modules
    # (tests/test_cuda.py sets FASTMLP_CUDA_KERNELS before its import), not by this conftest.
    if "isa" in metafunc.fixturenames:
        from _helpers import cpu_isas
        metafunc.parametrize("isa", cpu_isas(), indirect=True)
    if "low_isa" in metafunc.fixturenames:
        from _helpers import low_precision_isas
        metafunc.parametrize("low_isa", low_precision_isas(), indirect=True)


def _select_isa(name):
    import fastmlp
    if name != "fallback":
        fastmlp.set_cpu_isa(name)
    yield name
    if name != "fallback":
        fastmlp.set_cpu_isa("auto")


@pytest.fixture
def isa(request):
    """Runs the test once per CPU kernel family (see _helpers.cpu_isas), selected with
    fastmlp.set_cpu_isa and reset to "auto" afterwards; "fallback": the pure-PyTorch reference."""
    yield from _select_isa(request.param)


@pytest.fixture
def low_isa(request):
    """The `isa` fixture over _helpers.low_precision_isas(): also the AMX kernels on the emulator."""
    yield from _select_isa(request.param)


@pytest.fixture
def gemm_mode(request):
    """fastmlp.set_gemm(request.param) for the test (parametrize it indirectly), "auto" afterwards."""
    import fastmlp
    fastmlp.set_gemm(request.param)
    yield request.param
    fastmlp.set_gemm("auto")


@pytest.fixture(autouse=True)
def _cuda_tests_use_the_cuda_kernels(request):
    """A test marked `cuda` must be served by fastmlp's compiled CUDA kernels: with a build that lacks
    them the PyTorch reference serves CUDA tensors, and comparing it with nn.Linear would pass
    without testing a kernel. FASTMLP_CUDA_KERNELS=0 (read by fastmlp/_ops.py) asks for the
    reference on purpose and lifts the check."""
    if request.node.get_closest_marker("cuda") is None or os.environ.get("FASTMLP_CUDA_KERNELS") == "0":
        return
    import torch
    import fastmlp
    if torch.cuda.is_available():  # without a GPU the test skips (skipif, or the test's own fixture)
        assert fastmlp.backend("cuda") == "compiled", (
            "a CUDA test ran on the PyTorch reference, not fastmlp's CUDA kernels: rebuild the extension with "
            f"nvcc on PATH, or set FASTMLP_CUDA_KERNELS=0 to test the reference ({fastmlp.backend_info()})"
        )


@pytest.fixture
def one_thread():
    """Runs the test with one torch thread: on a busy 2-core machine OpenMP spin-waiting makes
    multi-threaded small-batch training many times slower, and no test here needs more threads."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The folder holding MNIST/raw/ and FashionMNIST/raw/ (real files); skips the test when missing."""
    root = _data_root()
    if not (root / "MNIST" / "raw").is_dir() or not (root / "FashionMNIST" / "raw").is_dir():
        pytest.skip(f"datasets not found in {root} (set FASTMLP_TEST_DATA to their root)")
    return root


@pytest.fixture(scope="session")
def mnist(data_root):
    """MNIST's train/val/test splits on the CPU, loaded once per session."""
    from fastmlp.data import load_dataset
    return load_dataset("mnist", data_root)


@pytest.fixture(scope="session")
def fashion(data_root):
    """Fashion-MNIST's train/val/test splits on the CPU, loaded once per session."""
    from fastmlp.data import load_dataset
    return load_dataset("fashion-mnist", data_root)
