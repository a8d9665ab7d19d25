"""Shared fixtures. The real datasets live outside the repository, in ../shared/data (torchvision's layout:
MNIST/raw/, FashionMNIST/raw/); FASTMLP_TEST_DATA points elsewhere. Tests needing them skip when absent."""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def _data_root() -> Path:
    return Path(os.environ.get("FASTMLP_TEST_DATA") or REPO_ROOT.parent / "shared" / "data").resolve()


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
