"""A whole run: train() (what `fastmlp train` calls) with its log lines, metrics and files, and
evaluate_checkpoint() (what `fastmlp evaluate` calls)."""

import math
import os
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..data import CLASS_NAMES, Split, load_dataset
from ..models import SIZES
from .config import TrainConfig
from .evaluation import evaluate_with_confusion, per_class_accuracy
from .files import CHECKPOINT_NAME, load_checkpoint, model_from_checkpoint, save_checkpoint, write_json
from .plots import plot_confusion, plot_curves
from .trainer import Trainer, kernels

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
    serving = f"{kernels(trainer.device)} kernels, {trainer.strategy.name}" if c.backend == "fused" else "nn.Linear"
    recipe = f"{c.optimizer} lr {c.lr:g}" + (f" momentum {c.momentum:g}" if c.optimizer == "sgd" else "")
    recipe += (f" weight_decay {c.weight_decay:g}" if c.weight_decay else "")
    recipe += (f" dropout {c.dropout:g}" if c.dropout else "") + f", {c.schedule} schedule"
    where = f"{trainer.device}" + (f" x{trainer.world} processes" if trainer.world > 1 else "")
    if c.precision == "bf16":  # the whole-step op's bf16 arithmetic, or the model under autocast
        serving += ", bf16" if trainer.fused_step else ", bf16 autocast"
    return (f"{c.dataset} {'-'.join(map(str, SIZES[c.dataset]))} ({c.backend}: {serving}) on {where}; {recipe}; "
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
        "precision": c.precision,
        "device": str(trainer.device),
        "kernels": kernels(trainer.device) if c.backend == "fused" else "torch",
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


class TrainingDiverged(RuntimeError):
    """An epoch's training loss was not finite: the weights are lost to NaN or infinity. The run's
    files keep the last finite epoch."""


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
            if not math.isfinite(entry["train_loss"]):  # before the checkpoint: keep the last good one
                message = f"training diverged in epoch {entry['epoch']} (train loss {entry['train_loss']}); lower --lr"
                if ckpt_path is not None and ckpt_path.exists():
                    message += f"; {ckpt_path} keeps the last finite epoch"
                raise TrainingDiverged(message)
            if out is not None:
                save_checkpoint(trainer.checkpoint(), ckpt_path)
                write_json(run_metrics(trainer), out / "metrics.json")
        test, test_matrix = evaluate_with_confusion(trainer.model, splits["test"])
        log(f"test_acc {100 * test['accuracy']:.2f}%  test_loss {test['loss']:.4f}  "
            f"({len(splits['test'])} {config.dataset} test images, {trainer.train_seconds:.1f}s training)")
        result = run_metrics(trainer, test)
        if out is not None:
            if ckpt_path is not None and not ckpt_path.exists():  # resumed a finished run into a new folder
                save_checkpoint(trainer.checkpoint(), ckpt_path)
            write_json(result, out / "metrics.json")
            plot_curves(trainer.history, out / "curves.png", title, test["accuracy"])
            plot_confusion(test_matrix, CLASS_NAMES[config.dataset],
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
    result, matrix = evaluate_with_confusion(model, part)
    return {"dataset": cfg["dataset"], "split": split, "epoch": ckpt["epoch"], **result,
            "class_names": list(CLASS_NAMES[cfg["dataset"]]), "per_class_accuracy": per_class_accuracy(matrix),
            "confusion_matrix": matrix.tolist()}
