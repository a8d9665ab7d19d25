"""MNIST and Fashion-MNIST from their IDX files, held as whole tensors on the training device.

    splits = load_dataset("mnist", root="../shared/data")      # {"train", "val", "test"} -> Split
    for x, y in iterate_batches(splits["train"], 64, generator):  # x: (64, 784) float32, y: (64,) int64
        ...

Files are looked for in torchvision's layout, ROOT/MNIST/raw/ and ROOT/FashionMNIST/raw/, gzip-compressed
(`*-ubyte.gz`) or not (`*-ubyte`). Roots, in order: the `root` argument alone when given, otherwise
$FASTMLP_DATA, ./data and, for Fashion-MNIST, /usr/share/datasets/fashion-mnist/ (Debian's
dataset-fashion-mnist package). Every file is checked (IDX magic number, 28x28 images, 60000/10000 items,
labels 0-9, complete gzip stream) and any problem raises a DataError naming the file.

Images are normalized once, (x / 255 - 0.5) / 0.5 as in the classic PyTorch course, into one (N, 784)
float32 tensor; batches are index slices of it in a seeded random order.
"""

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DATASETS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
"""Dataset name (as on the command line) -> torchvision's folder (and class) name."""

CLASS_NAMES = {
    "mnist": tuple(str(digit) for digit in range(10)),
    "fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"),
}
"""Dataset name -> the names of its classes 0-9 (Fashion-MNIST's as in its paper and torchvision)."""

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
COUNTS = {"train": 60000, "test": 10000}
IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10
VAL_SIZE = 5000
"""The validation split: the last VAL_SIZE images of the 60000 training images, always the same ones."""

SYSTEM_DIRS = {"fashion-mnist": [Path("/usr/share/datasets/fashion-mnist")]}
"""Folders holding the four files directly (distribution packages), searched after the roots."""

_IDX_MAGIC = {1: 0x00000801, 3: 0x00000803}  # unsigned-byte data, 1-D (labels) / 3-D (images)
_GZIP_MAGIC = b"\x1f\x8b"


class DataError(Exception):
    """A dataset file is missing, unreadable or not what it should be."""


class DataNotFoundError(DataError, FileNotFoundError):
    """No complete copy of the dataset in any of the folders searched."""


class CorruptDataError(DataError, ValueError):
    """A dataset file exists but is truncated, corrupt or has the wrong format or contents."""


# ---- IDX files --------------------------------------------------------------------------------


def _read_bytes(path: Path) -> bytes:
    """The file's contents, decompressed when it is gzip (recognized by its magic bytes, not its name)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from e
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except EOFError as e:
        raise CorruptDataError(f"{path}: truncated gzip file (the compressed stream ends early); "
                               f"download it again") from e
    except (OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError: bad CRC, bad header, ...
        raise CorruptDataError(f"{path}: corrupt gzip file ({e}); download it again") from e


def read_idx(path, ndim: int, count: int | None = None, item_shape: tuple | None = None) -> torch.Tensor:
    """Reads an unsigned-byte IDX file (gzip-compressed or not) into a uint8 tensor, checking its magic
    number, its number of dimensions, the number of items (`count`), the shape of each item
    (`item_shape`) and that the data is exactly as long as the header says.

    Raises CorruptDataError naming the file on any mismatch.
    """
    path = Path(path)
    data = _read_bytes(path)
    header = 4 + 4 * ndim
    if len(data) < header:
        raise CorruptDataError(f"{path}: {len(data)} bytes, too short for an IDX header ({header} bytes); "
                               f"the file is truncated or not an IDX file")
    magic = int.from_bytes(data[:4], "big")
    if magic != _IDX_MAGIC[ndim]:
        found = f"0x{magic:08x}"
        if magic in _IDX_MAGIC.values():
            found += f" (an IDX file of {magic & 0xFF} dimensions)"
        raise CorruptDataError(f"{path}: IDX magic number {found}, expected 0x{_IDX_MAGIC[ndim]:08x} "
                               f"(unsigned bytes, {ndim} dimension{'s' if ndim > 1 else ''})")
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if count is not None and dims[0] != count:
        raise CorruptDataError(f"{path}: holds {dims[0]} items, expected {count}")
    if item_shape is not None and dims[1:] != tuple(item_shape):
        shape = "x".join(map(str, dims[1:]))
        want = "x".join(map(str, item_shape))
        raise CorruptDataError(f"{path}: items of shape {shape}, expected {want}")
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise CorruptDataError(f"{path}: {what}: {len(data)} bytes, expected {expected} "
                               f"for the dimensions {dims} in its header")
    array = np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)
    return torch.from_numpy(array.copy())


# ---- locating the files -----------------------------------------------------------------------


def _check_name(dataset: str) -> str:
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
    return dataset


def candidate_dirs(dataset: str, root=None) -> list[Path]:
    """The folders searched for `dataset`'s files, in order (see the module docstring)."""
    folder = DATASETS[_check_name(dataset)]
    if root is not None:
        return [Path(root) / folder / "raw"]
    roots = []
    if os.environ.get("FASTMLP_DATA"):
        roots.append(Path(os.environ["FASTMLP_DATA"]))
    roots.append(Path("data"))
    dirs = [r / folder / "raw" for r in roots]
    for d in SYSTEM_DIRS.get(dataset, []):
        dirs += [d, d / folder / "raw"]
    return dirs


def _find_file(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        p = directory / name
        if p.is_file():
            return p
    return None


def find_files(dataset: str, root=None) -> Path:
    """The first folder of candidate_dirs() holding all four files (each as `NAME` or `NAME.gz`).

    Raises DataNotFoundError listing every folder tried and how to get the data.
    """
    dirs = candidate_dirs(dataset, root)
    stems = [s for pair in FILES.values() for s in pair]
    partial = {}
    for d in dirs:
        missing = [s for s in stems if _find_file(d, s) is None]
        if not missing:
            return d
        if len(missing) < len(stems):
            partial[d] = missing
    lines = [f"{dataset}: dataset files not found. Looked for {', '.join(s + '[.gz]' for s in stems)} in:"]
    for d in dirs:
        note = f"  (incomplete: missing {', '.join(partial[d])})" if d in partial else ""
        lines.append(f"  {d.absolute()}{note}")
    folder = DATASETS[dataset]
    lines.append(
        f"Get the data with `fastmlp train --dataset {dataset} --download` (needs internet and torchvision), "
        f"or copy the four IDX files into ROOT/{folder}/raw/ and pass --root ROOT (root= in Python) "
        f"or set FASTMLP_DATA=ROOT."
    )
    if dataset == "fashion-mnist":
        lines.append("On Debian/Ubuntu, `apt install dataset-fashion-mnist` also works.")
    raise DataNotFoundError("\n".join(lines))


def download(dataset: str, root=None) -> Path:
    """Downloads `dataset` with torchvision's downloader into ROOT/<folder>/raw/ (ROOT: `root`, else
    $FASTMLP_DATA, else ./data) unless it is already there; returns the folder holding the files."""
    try:
        return find_files(dataset, root)
    except DataNotFoundError:
        pass
    try:
        from torchvision import datasets
    except ImportError as e:
        raise DataError("--download needs torchvision (pip install torchvision)") from e
    target = Path(root if root is not None else os.environ.get("FASTMLP_DATA") or "data")
    cls = getattr(datasets, DATASETS[dataset])
    try:
        for train in (True, False):
            cls(str(target), train=train, download=True)
    except Exception as e:  # network errors come in many types (URLError, RuntimeError, ...)
        raise DataError(f"{dataset}: download into {target.absolute()} failed: {e}") from e
    return find_files(dataset, target)


# ---- splits -----------------------------------------------------------------------------------


@dataclass
class Split:
    """One split as two tensors on one device: images (N, 784) float32, normalized; labels (N,) int64."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    def to(self, device) -> "Split":
        return Split(self.name, self.images.to(device), self.labels.to(device))

    def subset(self, n: int) -> "Split":
        """The first n samples (views, no copy)."""
        return Split(self.name, self.images[:n], self.labels[:n])


_RAW_CACHE: dict = {}


def load_raw(dataset: str, split: str, root=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The validated uint8 images (N, 28, 28) and labels (N,) of split "train" or "test".

    Results are cached per process (keyed by file path, size and modification time).
    """
    if split not in FILES:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(FILES)}")
    directory = find_files(dataset, root)
    paths = [_find_file(directory, stem) for stem in FILES[split]]
    key = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths)
    if key in _RAW_CACHE:
        return _RAW_CACHE[key]
    count = COUNTS[split]
    images = read_idx(paths[0], 3, count, IMAGE_SHAPE)
    labels = read_idx(paths[1], 1, count)
    bad = labels >= NUM_CLASSES
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise CorruptDataError(f"{paths[1]}: label {int(labels[i])} at index {i} is outside 0-{NUM_CLASSES - 1}")
    if len(_RAW_CACHE) >= 4:  # both splits of both datasets; keeps memory bounded
        _RAW_CACHE.pop(next(iter(_RAW_CACHE)))
    _RAW_CACHE[key] = (images, labels)
    return images, labels


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 784) in [-1, 1]: (x / 255 - 0.5) / 0.5, as ToTensor + Normalize(0.5, 0.5)."""
    x = images.reshape(images.shape[0], -1).to(torch.float32).div_(255.0)
    return x.sub_(0.5).div_(0.5)


def load_dataset(dataset: str, root=None, device="cpu", val_size: int = VAL_SIZE, download_missing: bool = False,
                 ) -> dict[str, Split]:
    """{"train": first 60000 - val_size training images, "val": the last val_size, "test": the 10000 test
    images}, each normalized once and placed on `device`. val_size=0 gives an empty "val" split."""
    _check_name(dataset)
    if not 0 <= val_size < COUNTS["train"]:
        raise ValueError(f"val_size must be in [0, {COUNTS['train']}), got {val_size}")
    if download_missing:
        download(dataset, root)
    splits = {}
    for split in ("train", "test"):
        images, labels = load_raw(dataset, split, root)
        x = normalize(images.to(device))
        y = labels.to(device=device, dtype=torch.int64)
        if split == "train":
            cut = COUNTS["train"] - val_size
            splits["train"] = Split("train", x[:cut], y[:cut])
            splits["val"] = Split("val", x[cut:], y[cut:])
        else:
            splits["test"] = Split("test", x, y)
    return splits


# ---- batches ----------------------------------------------------------------------------------


def derive_seed(*keys: int) -> int:
    """A 63-bit seed determined by the integers `keys` alone (numpy's SeedSequence mixing)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 32 | int(state[1])) >> 1


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator seeded from (seed, epoch) alone, so any epoch's order can be recreated (resume)."""
    g = torch.Generator()
    g.manual_seed(derive_seed(seed, epoch))
    return g


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the n training samples in `epoch` (0-based): a seeded random permutation (CPU int64)."""
    return torch.randperm(n, generator=epoch_generator(seed, epoch))


# Batches gathered by one index_select in iterate_chunks (and so trained by one many-step op call in
# the CPU trainer): one gather per chunk instead of two calls per step; 32 batches of 64 images are
# 6.4 MB (the measurements: BENCHMARKS.md).
GATHER_BATCHES = 32


def iterate_chunks(split: Split, batch_size: int, order: torch.Tensor | None = None):
    """Yields (images, labels) of GATHER_BATCHES consecutive batches at a time (fewer at the end) of
    `split` in `order` (a permutation of its indices; None: as stored): the inputs of a many-step op."""
    n, chunk = len(split), batch_size * GATHER_BATCHES
    if order is not None:
        order = order.to(split.images.device)
    for c in range(0, n, chunk):
        if order is None:
            yield split.images[c:c + chunk], split.labels[c:c + chunk]
        else:
            idx = order[c:c + chunk]
            yield split.images.index_select(0, idx), split.labels.index_select(0, idx)


def iterate_batches(split: Split, batch_size: int, order: torch.Tensor | None = None):
    """Yields (images, labels) batches of `split` in `order` (a permutation of its indices; None: as
    stored). The last batch is smaller when batch_size does not divide len(split). Shuffled batches are
    views of a chunk of GATHER_BATCHES batches gathered at once."""
    if order is None:
        for i in range(0, len(split), batch_size):
            yield split.images[i:i + batch_size], split.labels[i:i + batch_size]
        return
    for images, labels in iterate_chunks(split, batch_size, order):
        for i in range(0, len(labels), batch_size):
            yield images[i:i + batch_size], labels[i:i + batch_size]
