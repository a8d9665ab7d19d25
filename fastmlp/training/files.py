"""The files of a run: checkpoints (written atomically, read back checked) and JSON."""

import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..models import model_for

CHECKPOINT_FORMAT = "fastmlp.train.checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"


def atomic_write(path, write) -> Path:
    """Calls write(file) on a temporary file next to `path`, then renames it to `path`, so `path` is
    either its old contents or the complete new ones, never a partial file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


_UMASK = os.umask(0)
os.umask(_UMASK)


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or not a fastmlp training checkpoint."""


def save_checkpoint(checkpoint: dict, path) -> Path:
    """Writes `checkpoint` (from Trainer.checkpoint()) to `path` atomically."""
    return atomic_write(path, lambda f: torch.save(checkpoint, f))


def load_checkpoint(path, map_location="cpu") -> dict:
    """Reads and checks a checkpoint written by save_checkpoint (tensors only, no pickled code)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {first})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a fastmlp training checkpoint")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {ckpt.get('version')}, this fastmlp reads "
                              f"version {CHECKPOINT_VERSION}")
    return ckpt


def model_from_checkpoint(checkpoint: dict, backend: str = "fused") -> nn.Sequential:
    """The checkpoint's model, with its weights, on the CPU, as FusedMLP ("fused") or plain PyTorch ("torch")."""
    model = model_for(checkpoint["config"]["dataset"], backend)  # no dropout: for inference
    model.load_state_dict(checkpoint["state_dict"])
    return model


def write_json(obj, path) -> Path:
    return atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))
