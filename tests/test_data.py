"""fastmlp.data: IDX parsing and validation (broken files made in a temp dir), where the files are looked
for, the real splits, and seeded batching."""

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from fastmlp import data
from fastmlp.data import CorruptDataError, DataError, DataNotFoundError

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
STEMS = [s for pair in data.FILES.values() for s in pair]


def idx_bytes(array, magic=None, dims=None):
    array = np.asarray(array, dtype=np.uint8)
    dims = array.shape if dims is None else dims
    magic = (0x0800 | len(dims)) if magic is None else magic
    return struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in dims) + array.tobytes()


def write(path, payload, gz=False):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


def link_dataset(src_dir: Path, dst_dir: Path, skip=()):
    """Symlinks the four real files of src_dir into dst_dir (except `skip` stems)."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    for stem in STEMS:
        if stem not in skip:
            name = stem + ".gz"
            os.symlink(src_dir / name, dst_dir / name)
    return dst_dir


@pytest.fixture(autouse=True)
def _no_env_root(monkeypatch, tmp_path):
    """Each test starts without $FASTMLP_DATA, in an empty working directory, with no system folders."""
    monkeypatch.delenv("FASTMLP_DATA", raising=False)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(data, "SYSTEM_DIRS", {})


# ---- read_idx: valid files ----------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
def test_read_idx_round_trip(tmp_path, gz):
    images = np.random.default_rng(0).integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = np.arange(7, dtype=np.uint8)
    p_img = write(tmp_path / "img", idx_bytes(images), gz)
    p_lab = write(tmp_path / "lab", idx_bytes(labels), gz)
    got = data.read_idx(p_img, 3, count=7, item_shape=(28, 28))
    assert got.dtype == torch.uint8 and got.shape == (7, 28, 28)
    assert np.array_equal(got.numpy(), images)
    assert np.array_equal(data.read_idx(p_lab, 1, count=7).numpy(), labels)


def test_gzip_recognized_by_content_not_name(tmp_path):
    labels = np.arange(10, dtype=np.uint8)
    p = write(tmp_path / "labels-without-gz-suffix", idx_bytes(labels), gz=True)
    assert np.array_equal(data.read_idx(p, 1).numpy(), labels)


# ---- read_idx: broken files: a CorruptDataError naming the file, never garbage ------------------------


def broken(tmp_path, payload, gz=False, name="bad-file-idx3-ubyte"):
    return write(tmp_path / name, payload, gz)


def expect_corrupt(path, match, **kwargs):
    kwargs.setdefault("ndim", 3)
    with pytest.raises(CorruptDataError, match=match) as info:
        data.read_idx(path, **kwargs)
    assert str(path) in str(info.value)
    return info.value


def test_bad_magic(tmp_path):
    p = broken(tmp_path, idx_bytes(np.zeros((2, 28, 28)), magic=0x12345678))
    expect_corrupt(p, "magic number 0x12345678, expected 0x00000803")


def test_labels_file_where_images_expected(tmp_path):
    p = broken(tmp_path, idx_bytes(np.zeros(60000)))
    expect_corrupt(p, "IDX file of 1 dimensions")


def test_wrong_image_size(tmp_path):
    p = broken(tmp_path, idx_bytes(np.zeros((3, 27, 28))))
    expect_corrupt(p, "items of shape 27x28, expected 28x28", count=3, item_shape=(28, 28))


def test_wrong_count(tmp_path):
    p = broken(tmp_path, idx_bytes(np.zeros((3, 28, 28))))
    expect_corrupt(p, "holds 3 items, expected 60000", count=60000, item_shape=(28, 28))


def test_truncated_raw_file(tmp_path):
    payload = idx_bytes(np.zeros((3, 28, 28)))
    p = broken(tmp_path, payload[:-100])
    expect_corrupt(p, "truncated")


def test_trailing_bytes(tmp_path):
    p = broken(tmp_path, idx_bytes(np.zeros((3, 28, 28))) + b"\0")
    expect_corrupt(p, "trailing bytes")


@pytest.mark.parametrize("size", [0, 3, 10])
def test_too_short_for_header(tmp_path, size):
    p = broken(tmp_path, b"\0\0\x08\x03\0\0\0\x03\0\0"[:size])
    expect_corrupt(p, "too short")


def test_truncated_gzip(tmp_path):
    compressed = gzip.compress(idx_bytes(np.random.default_rng(1).integers(0, 256, (50, 28, 28))))
    p = broken(tmp_path, compressed[: len(compressed) // 2], name="x.gz")
    expect_corrupt(p, "truncated gzip")


def test_corrupt_gzip(tmp_path):
    compressed = bytearray(gzip.compress(idx_bytes(np.random.default_rng(2).integers(0, 256, (50, 28, 28)))))
    for i in range(len(compressed) // 3, len(compressed) // 3 + 64):
        compressed[i] ^= 0x5A
    p = broken(tmp_path, bytes(compressed), name="x.gz")
    expect_corrupt(p, "gzip")


def test_gzip_crc_mismatch(tmp_path):
    compressed = bytearray(gzip.compress(idx_bytes(np.zeros((2, 28, 28)))))
    compressed[-8] ^= 0xFF  # the CRC32 in the trailer
    p = broken(tmp_path, bytes(compressed), name="x.gz")
    expect_corrupt(p, "corrupt gzip")


def test_garbage_file(tmp_path):
    p = broken(tmp_path, b"<html>404 Not Found</html>" * 10)
    expect_corrupt(p, "magic number")


def test_data_errors_are_also_standard_exceptions():
    assert issubclass(DataNotFoundError, FileNotFoundError) and issubclass(DataNotFoundError, DataError)
    assert issubclass(CorruptDataError, ValueError) and issubclass(CorruptDataError, DataError)


# ---- locating the files -----------------------------------------------------------------------------


def test_missing_files_one_error_listing_paths(tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        data.find_files("mnist", tmp_path / "nowhere")
    msg = str(info.value)
    assert str((tmp_path / "nowhere" / "MNIST" / "raw").absolute()) in msg
    assert "train-images-idx3-ubyte[.gz]" in msg
    assert "--download" in msg and "FASTMLP_DATA" in msg and "--root" in msg


def test_search_order_without_root(tmp_path, monkeypatch):
    env_root = tmp_path / "env"
    monkeypatch.setenv("FASTMLP_DATA", str(env_root))
    monkeypatch.setattr(data, "SYSTEM_DIRS", {"fashion-mnist": [tmp_path / "debian"]})
    with pytest.raises(DataNotFoundError) as info:
        data.find_files("fashion-mnist")
    listed = [line.strip() for line in str(info.value).splitlines() if line.startswith("  /")]
    assert listed == [
        str(env_root / "FashionMNIST" / "raw"),
        str(Path("data").absolute() / "FashionMNIST" / "raw"),
        str(tmp_path / "debian"),
        str(tmp_path / "debian" / "FashionMNIST" / "raw"),
    ]
    assert "apt install dataset-fashion-mnist" in str(info.value)
    # The Debian folder is searched for Fashion-MNIST only.
    with pytest.raises(DataNotFoundError) as info:
        data.find_files("mnist")
    assert "debian" not in str(info.value)


def test_env_then_cwd_then_system(tmp_path, monkeypatch, data_root):
    src = data_root / "FashionMNIST" / "raw"
    debian = link_dataset(src, tmp_path / "debian")
    monkeypatch.setattr(data, "SYSTEM_DIRS", {"fashion-mnist": [debian]})
    assert data.find_files("fashion-mnist") == debian
    cwd_dir = link_dataset(src, Path("data") / "FashionMNIST" / "raw")
    assert data.find_files("fashion-mnist") == cwd_dir
    env_dir = link_dataset(src, tmp_path / "env" / "FashionMNIST" / "raw")
    monkeypatch.setenv("FASTMLP_DATA", str(tmp_path / "env"))
    assert data.find_files("fashion-mnist") == env_dir


def test_explicit_root_is_the_only_place_searched(tmp_path, monkeypatch, data_root):
    monkeypatch.setenv("FASTMLP_DATA", str(data_root))
    assert data.find_files("mnist") == data_root / "MNIST" / "raw"
    with pytest.raises(DataNotFoundError) as info:
        data.find_files("mnist", tmp_path / "empty")
    assert str(data_root) not in str(info.value)


def test_incomplete_folder_is_reported(tmp_path, data_root):
    link_dataset(data_root / "MNIST" / "raw", tmp_path / "MNIST" / "raw", skip=["t10k-labels-idx1-ubyte"])
    with pytest.raises(DataNotFoundError, match="incomplete: missing t10k-labels-idx1-ubyte"):
        data.load_dataset("mnist", tmp_path)


def test_uncompressed_files_accepted(tmp_path, data_root):
    raw = tmp_path / "MNIST" / "raw"
    link_dataset(data_root / "MNIST" / "raw", raw, skip=["t10k-labels-idx1-ubyte"])
    gz = (data_root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").read_bytes()
    write(raw / "t10k-labels-idx1-ubyte", gzip.decompress(gz))
    _, labels = data.load_raw("mnist", "test", tmp_path)
    assert torch.bincount(labels.long()).tolist() == MNIST_TEST_COUNTS


# ---- whole-dataset checks on real files with one file replaced -------------------------------------------


def replaced(tmp_path, data_root, stem, payload, gz=True):
    raw = tmp_path / "MNIST" / "raw"
    link_dataset(data_root / "MNIST" / "raw", raw, skip=[stem])
    return write(raw / (stem + ".gz"), payload, gz)


def test_label_out_of_range(tmp_path, data_root):
    labels = np.zeros(10000, dtype=np.uint8)
    labels[1234] = 10
    p = replaced(tmp_path, data_root, "t10k-labels-idx1-ubyte", idx_bytes(labels))
    with pytest.raises(CorruptDataError, match=r"label 10 at index 1234 is outside 0-9") as info:
        data.load_dataset("mnist", tmp_path)
    assert str(p) in str(info.value)


def test_short_split_rejected(tmp_path, data_root):
    p = replaced(tmp_path, data_root, "t10k-labels-idx1-ubyte", idx_bytes(np.zeros(9999)))
    with pytest.raises(CorruptDataError, match="holds 9999 items, expected 10000") as info:
        data.load_dataset("mnist", tmp_path)
    assert str(p) in str(info.value)


def test_truncated_real_gzip(tmp_path, data_root):
    gz = (data_root / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz").read_bytes()
    p = replaced(tmp_path, data_root, "t10k-images-idx3-ubyte", gz[: len(gz) - 5000], gz=False)
    with pytest.raises(CorruptDataError, match="truncated gzip") as info:
        data.load_dataset("mnist", tmp_path)
    assert str(p) in str(info.value)


def test_unreadable_file(tmp_path, data_root):
    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    p = replaced(tmp_path, data_root, "t10k-labels-idx1-ubyte", idx_bytes(np.zeros(10000)))
    p.chmod(0)
    with pytest.raises(DataError, match="cannot read"):
        data.load_dataset("mnist", tmp_path)


# ---- the real splits -----------------------------------------------------------------------------------


def test_mnist_splits(mnist, data_root):
    assert {k: len(v) for k, v in mnist.items()} == {"train": 55000, "val": 5000, "test": 10000}
    for split in mnist.values():
        assert split.images.dtype == torch.float32 and split.images.shape[1:] == (784,)
        assert split.labels.dtype == torch.int64
        assert split.images.min().item() == -1.0 and split.images.max().item() == 1.0
    train_labels = torch.cat([mnist["train"].labels, mnist["val"].labels])
    assert torch.bincount(train_labels).tolist() == MNIST_TRAIN_COUNTS
    assert torch.bincount(mnist["test"].labels).tolist() == MNIST_TEST_COUNTS
    # (x / 255 - 0.5) / 0.5 of the raw bytes, as torchvision's ToTensor + Normalize((0.5,), (0.5,)).
    raw_images, _ = data.load_raw("mnist", "train", data_root)
    expected = (raw_images[-5000:].reshape(5000, -1).float() / 255 - 0.5) / 0.5
    torch.testing.assert_close(mnist["val"].images, expected, rtol=0, atol=1e-6)


def test_fashion_splits(fashion):
    assert {k: len(v) for k, v in fashion.items()} == {"train": 55000, "val": 5000, "test": 10000}
    train_labels = torch.cat([fashion["train"].labels, fashion["val"].labels])
    assert torch.bincount(train_labels).tolist() == [6000] * 10
    assert torch.bincount(fashion["test"].labels).tolist() == [1000] * 10


def test_validation_size(data_root):
    splits = data.load_dataset("mnist", data_root, val_size=0)
    assert len(splits["train"]) == 60000 and len(splits["val"]) == 0
    with pytest.raises(ValueError, match="val_size"):
        data.load_dataset("mnist", data_root, val_size=60000)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'cifar10'"):
        data.load_dataset("cifar10")


# ---- batches ---------------------------------------------------------------------------------------------


def test_epoch_order_depends_on_seed_and_epoch_only():
    a = data.epoch_order(1000, seed=3, epoch=5)
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(a, data.epoch_order(1000, seed=3, epoch=5))
    assert torch.equal(a.sort().values, torch.arange(1000))
    assert not torch.equal(a, data.epoch_order(1000, seed=3, epoch=6))
    assert not torch.equal(a, data.epoch_order(1000, seed=4, epoch=5))


@pytest.mark.parametrize("gather", [1, 2, 32])  # batches gathered at once: chunk edges inside / at the end
def test_iterate_batches_is_index_slicing(gather, monkeypatch):
    monkeypatch.setattr(data, "GATHER_BATCHES", gather)
    split = data.Split("t", torch.arange(10.0).repeat_interleave(784).reshape(10, 784), torch.arange(10))
    order = data.epoch_order(10, seed=0, epoch=0)
    batches = list(data.iterate_batches(split, 4, order))
    assert [len(y) for _, y in batches] == [4, 4, 2]
    labels = torch.cat([y for _, y in batches])
    assert torch.equal(labels, order)
    for x, y in batches:
        assert torch.equal(x[:, 0], y.float())
    plain = list(data.iterate_batches(split, 4))
    assert torch.equal(torch.cat([y for _, y in plain]), torch.arange(10))


# ---- --download ----------------------------------------------------------------------------------------------


def test_download_is_a_no_op_when_the_files_are_there(data_root, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_torchvision(name, *args, **kwargs):
        if name.startswith("torchvision"):
            raise AssertionError("torchvision must not be used when the files exist")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchvision)
    assert data.download("mnist", data_root) == data_root / "MNIST" / "raw"


def test_download_failure_is_a_data_error(tmp_path, monkeypatch):
    datasets = pytest.importorskip("torchvision.datasets")
    calls = []

    def offline(root, train, download):
        calls.append((root, train, download))
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: <urlopen error no network>")

    monkeypatch.setattr(datasets, "MNIST", offline)
    with pytest.raises(DataError, match="download into .* failed: Error downloading") as info:
        data.load_dataset("mnist", tmp_path / "new", download_missing=True)
    assert str((tmp_path / "new").absolute()) in str(info.value)
    assert calls == [(str(tmp_path / "new"), True, True)]
