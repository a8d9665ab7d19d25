"""The files of a run: checkpoints (written atomically, read back checked) and JSON."""

import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..models import SIZES, model_for

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
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        # Ctrl-C inside torch.save surfaces as the zip writer's RuntimeError while it unwinds: still
        # an interrupt for the caller (fastmlp train's exit 130), not an error.
        if not isinstance(exc, KeyboardInterrupt) and isinstance(exc.__context__, KeyboardInterrupt):
            raise KeyboardInterrupt from exc
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
    problem = _contents_problem(ckpt)
    if problem:
        raise CheckpointError(f"{path}: not a usable fastmlp training checkpoint: {problem}")
    return ckpt


def _contents_problem(ckpt: dict) -> str | None:
    """What makes a checkpoint of the right format unusable (evaluate, predict and --resume read all
    of this), or None: missing or mistyped entries, weights that do not fit the dataset's model or are
    not finite, optimizer state that does not fit the weights."""
    kinds = {"config": dict, "state_dict": dict, "optimizer": dict, "epoch": int, "step": int,
             "rng_state": torch.Tensor, "history": list, "train_seconds": (int, float)}
    for key, kind in kinds.items():
        if key not in ckpt:
            return f"no {key!r} entry"
        if not isinstance(ckpt[key], kind) or isinstance(ckpt[key], bool):
            return f"{key!r} is a {type(ckpt[key]).__name__}"
    if ckpt["epoch"] < 0 or ckpt["step"] < 0:
        return f"epoch {ckpt['epoch']}, step {ckpt['step']}"
    dataset = ckpt["config"].get("dataset")
    if dataset not in SIZES:
        return f"config dataset {dataset!r} (known: {', '.join(SIZES)})"
    with torch.device("meta"):  # shapes only: no memory, no initialisation, the global RNG untouched
        expected = model_for(dataset, "torch").state_dict()
    got = ckpt["state_dict"]
    if set(got) != set(expected):
        return f"state_dict holds {sorted(got)}, the {dataset} model has {sorted(expected)}"
    for name, want in expected.items():
        t = got[name]
        if not isinstance(t, torch.Tensor) or t.shape != want.shape or not t.is_floating_point():
            what = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            return f"state_dict {name} is {what}, the {dataset} model needs floating {tuple(want.shape)}"
        if not bool(torch.isfinite(t).all()):
            return f"state_dict {name} holds NaN or infinite values"
    shapes = [want.shape for want in expected.values()]  # the optimizer's parameter order
    opt = ckpt["optimizer"]
    if not isinstance(opt.get("state"), dict) or not isinstance(opt.get("param_groups"), list):
        return "optimizer state has no 'state' / 'param_groups'"
    for pid, state in opt["state"].items():
        if not isinstance(pid, int) or not 0 <= pid < len(shapes) or not isinstance(state, dict):
            return f"optimizer state for parameter {pid!r}"
        for key, t in state.items():
            if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape != shapes[pid]:
                return f"optimizer {key} of parameter {pid} is {tuple(t.shape)}, the parameter {tuple(shapes[pid])}"
    if ckpt["rng_state"].dtype != torch.uint8 or ckpt["rng_state"].shape != torch.get_rng_state().shape:
        return f"rng_state is {ckpt['rng_state'].dtype} {tuple(ckpt['rng_state'].shape)}"
    return None


def model_from_checkpoint(checkpoint: dict, backend: str = "fused") -> nn.Sequential:
    """The checkpoint's model, with its weights, on the CPU, as FusedMLP ("fused") or plain PyTorch ("torch")."""
    model = model_for(checkpoint["config"]["dataset"], backend)  # no dropout: for inference
    model.load_state_dict(checkpoint["state_dict"])
    return model


def write_json(obj, path) -> Path:
    return atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))
