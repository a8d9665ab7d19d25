"""Training and evaluation of the course MLPs on whole-tensor data.

    config = default_config("mnist", seed=1)          # the tuned recipe; any field can be overridden
    result = train(config, root="../shared/data", out="runs/mnist")
    result.metrics["final_test_accuracy"]             # a fraction, e.g. 0.981

One epoch visits the training split in a random order drawn from (seed, epoch) alone, so a run that is
stopped and resumed from its checkpoint (`resume=`) ends with exactly the weights of an uninterrupted run.
Under torchrun (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel and each global batch of
`batch_size` samples is split across the processes, so the result matches one process with the same batch.
"""

import json
import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import _ops
from .cuda_graph import CUDAGraphStep
from .data import (CLASS_NAMES, DATASETS, NUM_CLASSES, Split, derive_seed, epoch_order, iterate_batches,
                   iterate_chunks, load_dataset)
from .models import BACKENDS, SIZES, model_for

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "none")
CHECKPOINT_FORMAT = "fastmlp.train.checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class TrainConfig:
    """Everything that determines the trained weights (together with the machine)."""

    dataset: str = "mnist"
    backend: str = "fused"  # "fused" (fastmlp kernels) or "torch" (nn.Linear/nn.ReLU)
    epochs: int = 30
    batch_size: int = 64  # the global batch: split across processes under torchrun
    optimizer: str = "sgd"  # "sgd" (with momentum) or "adam"
    lr: float = 0.02  # the peak learning rate
    momentum: float = 0.9  # SGD only
    weight_decay: float = 5e-4
    dropout: float = 0.0  # after every hidden ReLU; masks from the global torch RNG, seeded per epoch
    schedule: str = "cosine"  # per-step cosine decay of lr to 0 over the run, or "none"
    seed: int = 0
    val_size: int = 5000  # the last val_size of the 60000 training images are held out for validation
    train_limit: int | None = None  # train on the first train_limit training images only (quick runs, tests)

    def validate(self) -> "TrainConfig":
        """Raises ValueError naming the first bad field."""
        def bad(name, why):
            raise ValueError(f"{name}: {why}, got {getattr(self, name)!r}")
        if self.dataset not in DATASETS:
            bad("dataset", f"must be one of {', '.join(DATASETS)}")
        if self.backend not in BACKENDS:
            bad("backend", f"must be one of {', '.join(BACKENDS)}")
        if self.optimizer not in OPTIMIZERS:
            bad("optimizer", f"must be one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            bad("schedule", f"must be one of {', '.join(SCHEDULES)}")
        for name in ("epochs", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "must be a positive integer")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            bad("lr", "must be a positive number")
        if not (math.isfinite(self.momentum) and 0 <= self.momentum < 1):
            bad("momentum", "must be in [0, 1)")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            bad("weight_decay", "must be >= 0")
        if not (math.isfinite(self.dropout) and 0 <= self.dropout < 1):
            bad("dropout", "must be in [0, 1)")
        if not isinstance(self.seed, int) or self.seed < 0:
            bad("seed", "must be a non-negative integer")
        if not isinstance(self.val_size, int) or not 0 <= self.val_size <= 20000:
            bad("val_size", "must be an integer in [0, 20000]")
        if self.train_limit is not None and (not isinstance(self.train_limit, int) or self.train_limit < 1):
            bad("train_limit", "must be a positive integer or None")
        return self


RECIPES = {
    "mnist": dict(epochs=30, optimizer="sgd", lr=0.02, momentum=0.9, weight_decay=5e-4, schedule="cosine"),
    "fashion-mnist": dict(epochs=30, optimizer="sgd", lr=0.02, momentum=0.9, weight_decay=5e-4, schedule="cosine"),
}
"""The default recipe per dataset (batch 64), chosen by validation accuracy (the last 5000 training images)
among SGD/Adam, learning rates, weight decay, dropout and 15-30 epochs; test results: BENCHMARKS.md."""


def default_config(dataset: str = "mnist", **overrides) -> TrainConfig:
    """The tuned recipe for `dataset`, with `overrides` applied."""
    if dataset not in RECIPES:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {', '.join(RECIPES)}")
    return TrainConfig(dataset=dataset, **{**RECIPES[dataset], **overrides}).validate()


# Fields a resumed run may change: they do not alter the weights (epochs only extends the run).
RESUME_MAY_CHANGE = ("epochs", "backend")


def resume_conflicts(config: TrainConfig, saved: dict) -> list[str]:
    """The fields of `config` that differ from a checkpoint's config and may not change on resume."""
    return [f.name for f in fields(TrainConfig)
            if f.name not in RESUME_MAY_CHANGE and f.name in saved and getattr(config, f.name) != saved[f.name]]


# ---- files ------------------------------------------------------------------------------------


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


def new_figure(path, **kwargs):
    """A matplotlib Figure (no display needed) for the picture `path`, or None, with a warning naming
    the file, when matplotlib is not installed. Write it with save_figure."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn(f"matplotlib is not installed: no {Path(path).name} (pip install matplotlib)", stacklevel=3)
        return None
    return Figure(layout="constrained", **kwargs)


def save_figure(fig, path) -> Path:
    """Writes `fig` to `path` as a PNG, atomically."""
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))


def plot_curves(history: list[dict], path, title: str = "", test_accuracy: float | None = None) -> Path | None:
    """Loss and accuracy per epoch as a PNG (matplotlib, no display needed); None without matplotlib."""
    fig = new_figure(path, figsize=(10, 4))
    if fig is None:
        return None
    from matplotlib.ticker import MaxNLocator
    epochs = [h["epoch"] for h in history]
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    if any(h.get("val_loss") is not None for h in history):
        ax_loss.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    ax_loss.legend()
    if any(h.get("val_accuracy") is not None for h in history):
        ax_acc.plot(epochs, [100 * h["val_accuracy"] for h in history], "o-", label="validation")
    if test_accuracy is not None and epochs:
        ax_acc.plot([epochs[-1]], [100 * test_accuracy], "s", color="C3", label="test (final)")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    ax_acc.legend()
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_confusion(matrix: torch.Tensor, names, path, title: str = "") -> Path | None:
    """The confusion matrix (rows: true class, columns: predicted) as a PNG: counts in the cells, shaded by
    the share of the row (so every class is readable whatever its size); None without matplotlib."""
    fig = new_figure(path, figsize=(7.5, 6.5))
    if fig is None:
        return None
    counts = matrix.to(torch.int64)
    shares = counts.double() / counts.sum(1, keepdim=True).clamp(min=1)
    ax = fig.subplots()
    image = ax.imshow(shares.numpy(), cmap="Blues", vmin=0, vmax=1)
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            if counts[i, j]:
                ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=7,
                        color="white" if shares[i, j] > 0.5 else "black")
    ticks = range(len(names))
    ax.set_xticks(ticks, names, rotation=45, ha="right")
    ax.set_yticks(ticks, names)
    ax.set(xlabel="predicted class", ylabel="true class", title=title or "confusion matrix")
    fig.colorbar(image, ax=ax, label="share of the true class")
    return save_figure(fig, path)


# ---- training ---------------------------------------------------------------------------------


def _eval_logits(model: nn.Module, split: Split, batch_size: int):
    """Yields (logits, labels) per batch of `split`, the model in eval mode (its mode restored after).
    Iterate it under torch.no_grad()."""
    was_training = model.training
    model.eval()
    try:
        for x, y in iterate_batches(split, batch_size):
            yield model(x), y
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int = 2500) -> dict:
    """{"loss": mean cross-entropy, "accuracy": fraction correct, "n": samples} of `model` on `split`."""
    n = len(split)
    if n == 0:
        return {"loss": None, "accuracy": None, "n": 0}
    loss = torch.zeros((), dtype=torch.float64, device=split.labels.device)
    correct = torch.zeros((), dtype=torch.int64, device=split.labels.device)
    for logits, y in _eval_logits(model, split, batch_size):
        loss += F.cross_entropy(logits, y, reduction="sum").double()
        correct += (logits.argmax(1) == y).sum()
    return {"loss": loss.item() / n, "accuracy": correct.item() / n, "n": n}


@torch.no_grad()
def confusion_matrix(model: nn.Module, split: Split, batch_size: int = 2500) -> torch.Tensor:
    """(10, 10) int64 CPU tensor: [i, j] = images of true class i that `model` predicts as class j.
    Its diagonal is the correct count per class, its row sums the images per class, its total len(split)."""
    counts = torch.zeros(NUM_CLASSES * NUM_CLASSES, dtype=torch.int64, device=split.labels.device)
    for logits, y in _eval_logits(model, split, batch_size):
        counts += torch.bincount(y * NUM_CLASSES + logits.argmax(1), minlength=NUM_CLASSES * NUM_CLASSES)
    return counts.view(NUM_CLASSES, NUM_CLASSES).cpu()


def per_class_accuracy(matrix: torch.Tensor) -> list[float | None]:
    """Fraction correct per true class from a confusion matrix (None for a class with no images)."""
    totals = matrix.sum(1)
    return [None if int(t) == 0 else int(matrix[i, i]) / int(t) for i, t in enumerate(totals)]


def _kernels(device: torch.device) -> str:
    if device.type == "cuda":
        return "compiled" if _ops.CUDA_KERNELS else "fallback"
    return "compiled" if _ops._C is not None else "fallback"


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _progress_bar(enabled: bool, total: int, desc: str):
    """A tqdm bar over an epoch's steps, or None (disabled, or tqdm not installed)."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True)


class Trainer:
    """Model, optimizer and position in the run; one call of train_epoch() per epoch."""

    def __init__(self, config: TrainConfig, splits: dict[str, Split], device="cpu", rank: int = 0, world: int = 1):
        self.config = config.validate()
        self.device = torch.device(device)
        self.splits = splits
        self.rank, self.world = rank, world
        torch.manual_seed(config.seed)
        # Built on the CPU, then moved: the same initial weights on every device.
        self.model = model_for(config.dataset, config.backend, config.dropout).to(self.device)
        params = self.model.parameters()
        # The whole step (forward, loss, backward, optimizer update) as one fastmlp op where it applies:
        # FusedMLP, no dropout, one process. Same result as autograd within float32 rounding.
        self.fused_step = hasattr(self.model, "train_step") and config.dropout == 0 and world == 1
        # On a GPU with fastmlp's CUDA kernels the whole step is also captured in a CUDA graph.
        use_graph = self.fused_step and self.device.type == "cuda" and _ops.CUDA_KERNELS
        if config.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                                             weight_decay=config.weight_decay)
        else:  # capturable: step counts on the GPU, where a captured graph can advance them
            self.optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay,
                                              capturable=use_graph)
        self.graph_step = CUDAGraphStep(self.model, self.optimizer, config.batch_size) if use_graph else None
        self.net = self.model
        if world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.epoch = 0  # epochs completed
        self.step = 0  # optimizer steps taken
        self.history: list[dict] = []
        self.train_seconds = 0.0

    @property
    def steps_per_epoch(self) -> int:
        return -(-len(self.splits["train"]) // self.config.batch_size)

    def lr_at(self, step: int) -> float:
        c = self.config
        if c.schedule == "none":
            return c.lr
        total = c.epochs * self.steps_per_epoch
        return c.lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))

    def train_epoch(self, progress: bool = False, on_step=None) -> dict:
        """One pass over the training split; appends to and returns the epoch's history entry.
        on_step(step, loss) is called after every optimizer step with this process's summed batch loss
        (a 0-d tensor); with the CPU's many-step op, after the op that ran the step."""
        c, train = self.config, self.splits["train"]
        order = epoch_order(len(train), c.seed, self.epoch)
        bar = _progress_bar(progress, self.steps_per_epoch, f"epoch {self.epoch + 1}/{c.epochs}")
        if c.dropout > 0:  # dropout masks, like the order, from (seed, epoch) alone, and per process
            torch.manual_seed(derive_seed(c.seed, self.epoch, 1, self.rank))
        self.model.train()
        _sync(self.device)
        start = time.perf_counter()
        try:
            if self.fused_step and self.device.type == "cpu":
                loss_sum = self._cpu_fused_epoch(order, bar, on_step)
            else:
                loss_sum = self._stepwise_epoch(order, bar, on_step)
            _sync(self.device)
        finally:
            if bar is not None:
                bar.close()
        seconds = time.perf_counter() - start
        loss_sum = torch.as_tensor(loss_sum, dtype=torch.float64, device=self.device)
        if self.world > 1:
            torch.distributed.all_reduce(loss_sum)
        self.epoch += 1
        self.train_seconds += seconds
        val = evaluate(self.model, self.splits["val"])
        entry = {
            "epoch": self.epoch,
            "train_loss": loss_sum.item() / len(train),
            "val_loss": val["loss"],
            "val_accuracy": val["accuracy"],
            "lr": self.optimizer.param_groups[0]["lr"],
            "epoch_seconds": seconds,
            "samples_per_second": len(train) / seconds if seconds > 0 else None,
        }
        self.history.append(entry)
        return entry

    def _set_lr(self, lr: float):
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _cpu_fused_epoch(self, order, bar, on_step) -> float:
        """The epoch on the CPU with the whole-step op, many steps per call (FusedMLP.train_steps): one
        call per gathered chunk of batches, the scheduled lr of each step passed along. Same steps,
        same order and same result as one call per batch. Returns the summed loss."""
        c, loss_sum = self.config, 0.0
        for x, y in iterate_chunks(self.splits["train"], c.batch_size, order):
            lrs = [self.lr_at(self.step + s) for s in range(-(-len(y) // c.batch_size))]
            losses = self.model.train_steps(x, y, self.optimizer, c.batch_size, lrs).tolist()
            self._set_lr(lrs[-1])  # where the per-step loop leaves it
            for s, mean in enumerate(losses):
                summed = mean * min(c.batch_size, len(y) - s * c.batch_size)
                loss_sum += summed
                self.step += 1
                if on_step is not None:
                    on_step(self.step, torch.tensor(summed))
            if bar is not None:
                bar.update(len(losses))
        return loss_sum

    def _stepwise_epoch(self, order, bar, on_step):
        """The epoch one step (one call) at a time: autograd, or the whole-step op on a GPU (in a CUDA
        graph where it can be). Returns the summed loss (a Python float on the CPU, else a device
        tensor, so that no step waits for the device)."""
        c = self.config
        fused_step = self.graph_step or (lambda x, y: self.model.train_step(x, y, self.optimizer))
        # The running loss: on the CPU a Python float, because a tensor op on a scalar costs 15-25 us
        # right after a training step has pushed the dispatcher out of cache.
        on_cpu = self.device.type == "cpu"
        loss_sum = 0.0 if on_cpu else torch.zeros((), dtype=torch.float64, device=self.device)
        for x, y in iterate_batches(self.splits["train"], c.batch_size, order):
            n_global = y.shape[0]
            if self.world > 1:  # this process's share of the global batch
                x = x.tensor_split(self.world)[self.rank]
                y = y.tensor_split(self.world)[self.rank]
            self._set_lr(self.lr_at(self.step))
            if self.fused_step:
                mean = fused_step(x, y)  # (a CUDA graph's output is overwritten by its next step)
                summed = mean.item() * n_global if on_cpu else mean * n_global
            else:
                self.optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(self.net(x), y, reduction="sum")
                # Mean over the global batch: DDP averages the gradients of the `world` processes.
                (loss * (self.world / n_global)).backward()
                self.optimizer.step()
                summed = loss.item() if on_cpu else loss.detach()
            loss_sum += summed if on_cpu else summed.double()
            self.step += 1
            if on_step is not None:
                on_step(self.step, torch.tensor(summed) if on_cpu else summed)
            if bar is not None:
                bar.update(1)
        return loss_sum

    def checkpoint(self) -> dict:
        """Everything needed to continue the run exactly; "state_dict" loads into plain_mlp(sizes)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "sizes": list(SIZES[self.config.dataset]),
            "state_dict": {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "rng_state": torch.get_rng_state(),
            "config": asdict(self.config),
            "history": [dict(h) for h in self.history],
            "train_seconds": self.train_seconds,
        }

    def load_checkpoint(self, ckpt: dict):
        """Continues from `ckpt` (see resume_conflicts for what must match)."""
        conflicts = resume_conflicts(self.config, ckpt["config"])
        if conflicts:
            raise ValueError("cannot resume: " + ", ".join(
                f"{k}={getattr(self.config, k)!r} but the checkpoint has {ckpt['config'][k]!r}" for k in conflicts))
        self.model.load_state_dict(ckpt["state_dict"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.epoch, self.step = int(ckpt["epoch"]), int(ckpt["step"])
        self.history = [dict(h) for h in ckpt["history"]]
        self.train_seconds = float(ckpt["train_seconds"])
        torch.set_rng_state(ckpt["rng_state"])


@dataclass
class TrainResult:
    model: nn.Module  # the trained model (not DDP-wrapped), on the training device
    metrics: dict  # as written to metrics.json
    checkpoint_path: Path | None = None
    completed: bool = True  # False when stopped early by stop_after
    trainer: Trainer | None = field(default=None, repr=False)


def _distributed(device: torch.device):
    """(rank, world, device, initialized_here) from torchrun's environment variables."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device, False
    import torch.distributed as dist
    created = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        created = True
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device, created


def format_epoch(entry: dict, epochs: int) -> str:
    parts = [f"epoch {entry['epoch']:>{len(str(epochs))}}/{epochs}", f"train_loss {entry['train_loss']:.4f}"]
    if entry.get("val_accuracy") is not None:
        parts += [f"val_loss {entry['val_loss']:.4f}", f"val_acc {100 * entry['val_accuracy']:.2f}%"]
    parts += [f"{entry['epoch_seconds']:.2f}s", f"{entry['samples_per_second']:,.0f} samples/s"]
    return "  ".join(parts)


def describe(trainer: "Trainer", resumed: bool = False) -> str:
    """One line: model, kernels, device, recipe and data sizes of a run."""
    c, s = trainer.config, trainer.splits
    kernels = f"{_kernels(trainer.device)} kernels" if c.backend == "fused" else "nn.Linear"
    if c.backend == "fused":
        step = f", fused {'SGD' if c.optimizer == 'sgd' else 'Adam'} step"
        kernels += (step + (" in a CUDA graph" if trainer.graph_step else "")) if trainer.fused_step else ", autograd"
    recipe = f"{c.optimizer} lr {c.lr:g}" + (f" momentum {c.momentum:g}" if c.optimizer == "sgd" else "")
    recipe += (f" weight_decay {c.weight_decay:g}" if c.weight_decay else "")
    recipe += (f" dropout {c.dropout:g}" if c.dropout else "") + f", {c.schedule} schedule"
    where = f"{trainer.device}" + (f" x{trainer.world} processes" if trainer.world > 1 else "")
    return (f"{c.dataset} {'-'.join(map(str, SIZES[c.dataset]))} ({c.backend}: {kernels}) on {where}; {recipe}; "
            f"{c.epochs} epochs of {trainer.steps_per_epoch} steps, batch {c.batch_size}; seed {c.seed}; "
            f"{len(s['train'])} train / {len(s['val'])} val / {len(s['test'])} test images"
            + (f"; resuming after epoch {trainer.epoch}" if resumed else ""))


def run_metrics(trainer: "Trainer", test: dict | None = None) -> dict:
    """The contents of metrics.json: the run's setup, per-epoch history and (once done) test results."""
    c, s = trainer.config, trainer.splits
    last = trainer.history[-1] if trainer.history else {}
    return {
        "dataset": c.dataset,
        "backend": c.backend,
        "device": str(trainer.device),
        "kernels": _kernels(trainer.device) if c.backend == "fused" else "torch",
        "fused_step": trainer.fused_step,
        "epochs": c.epochs,
        "epochs_completed": trainer.epoch,
        "seed": c.seed,
        "batch_size": c.batch_size,
        "optimizer": c.optimizer,
        "lr": c.lr,
        "schedule": c.schedule,
        "world_size": trainer.world,
        "threads": torch.get_num_threads(),
        "train_size": len(s["train"]),
        "val_size": len(s["val"]),
        "test_size": len(s["test"]),
        "final_val_accuracy": last.get("val_accuracy"),
        "final_val_loss": last.get("val_loss"),
        "final_test_accuracy": None if test is None else test["accuracy"],
        "final_test_loss": None if test is None else test["loss"],
        "train_seconds": trainer.train_seconds,
        "torch": torch.__version__,
        "config": asdict(c),
        "history": trainer.history,
    }


def train(config: TrainConfig, *, device="cpu", root=None, out=None, resume=None, progress: bool | None = None,
          download: bool = False, data: dict[str, Split] | None = None, stop_after: int | None = None,
          log=None) -> TrainResult:
    """Trains `config` and returns the model and its metrics.

    device: "cpu" or "cuda"; root: dataset root (see fastmlp.data); data: already loaded splits (skips
    loading); out: folder for checkpoint.pt (after every epoch), metrics.json and curves.png, None for no
    files; resume: a checkpoint (path or dict) to continue from; progress: tqdm bar per epoch (None: when
    stderr is a terminal); stop_after: return after this many epochs of this call (the checkpoint is saved
    as usual, the run can be resumed); log: called with one line per epoch (default: print).
    """
    config.validate()
    device = torch.device(device)
    rank, world, device, created = _distributed(device)
    main = rank == 0
    if log is None:
        log = (lambda line: print(line, flush=True)) if main else (lambda line: None)
    elif not main:
        log = lambda line: None  # noqa: E731
    if progress is None:
        progress = sys.stderr.isatty()
    progress = progress and main
    try:
        if data is None:
            data = load_dataset(config.dataset, root, device, config.val_size, download_missing=download)
        splits = {k: v.to(device) for k, v in data.items()}
        if config.train_limit is not None:
            splits["train"] = splits["train"].subset(config.train_limit)
        ckpt = load_checkpoint(resume) if isinstance(resume, (str, Path)) else resume
        trainer = Trainer(config, splits, device, rank, world)
        if ckpt is not None:
            trainer.load_checkpoint(ckpt)
            if config.epochs != ckpt["config"]["epochs"] and config.schedule != "none":
                warnings.warn(f"resuming with epochs={config.epochs} instead of {ckpt['config']['epochs']}: "
                              f"the lr schedule changes with the number of epochs", stacklevel=2)
        out = Path(out) if out is not None and main else None
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
        ckpt_path = out / CHECKPOINT_NAME if out is not None else None
        title = f"{config.dataset} {config.backend} seed {config.seed}"
        log(describe(trainer, resumed=ckpt is not None))
        ran = 0
        while trainer.epoch < config.epochs:
            if stop_after is not None and ran >= stop_after:
                if out is not None:
                    plot_curves(trainer.history, out / "curves.png", title)
                return TrainResult(trainer.model, run_metrics(trainer), ckpt_path, completed=False, trainer=trainer)
            entry = trainer.train_epoch(progress)
            ran += 1
            log(format_epoch(entry, config.epochs))
            if out is not None:
                save_checkpoint(trainer.checkpoint(), ckpt_path)
                write_json(run_metrics(trainer), out / "metrics.json")
        test = evaluate(trainer.model, splits["test"])
        log(f"test_acc {100 * test['accuracy']:.2f}%  test_loss {test['loss']:.4f}  "
            f"({len(splits['test'])} {config.dataset} test images, {trainer.train_seconds:.1f}s training)")
        result = run_metrics(trainer, test)
        if out is not None:
            if ckpt_path is not None and not ckpt_path.exists():  # resumed a finished run into a new folder
                save_checkpoint(trainer.checkpoint(), ckpt_path)
            write_json(result, out / "metrics.json")
            plot_curves(trainer.history, out / "curves.png", title, test["accuracy"])
            plot_confusion(confusion_matrix(trainer.model, splits["test"]), CLASS_NAMES[config.dataset],
                           out / "confusion.png", f"{title}: test set")
        return TrainResult(trainer.model, result, ckpt_path, completed=True, trainer=trainer)
    finally:
        if created:
            torch.distributed.destroy_process_group()


def evaluate_checkpoint(checkpoint, *, split: str = "test", device="cpu", root=None, backend: str = "fused",
                        data: dict[str, Split] | None = None) -> dict:
    """Loads a checkpoint (path or dict) and evaluates it on `split` ("test" or "val"): evaluate()'s
    loss, accuracy and n, plus "class_names", "per_class_accuracy" and "confusion_matrix" (a list of
    rows: true class; columns: predicted class)."""
    ckpt = load_checkpoint(checkpoint) if isinstance(checkpoint, (str, Path)) else checkpoint
    cfg = ckpt["config"]
    if data is None:
        data = load_dataset(cfg["dataset"], root, device, cfg.get("val_size", 5000))
    model = model_from_checkpoint(ckpt, backend).to(device)
    part = data[split].to(device)
    result = evaluate(model, part)
    matrix = confusion_matrix(model, part)
    return {"dataset": cfg["dataset"], "split": split, "epoch": ckpt["epoch"], **result,
            "class_names": list(CLASS_NAMES[cfg["dataset"]]), "per_class_accuracy": per_class_accuracy(matrix),
            "confusion_matrix": matrix.tolist()}


def replace_config(config: TrainConfig, **changes) -> TrainConfig:
    """dataclasses.replace, validated."""
    return replace(config, **changes).validate()
