"""The Trainer: model, optimizer, step strategy and position in a run; one call of train_epoch() per
epoch."""

import math
import time
from dataclasses import asdict

import torch
from torch import nn

from ..data import Split, derive_seed, epoch_order
from ..models import SIZES, model_for
from .config import TrainConfig
from .evaluation import evaluate
from .config import resume_conflicts
from .files import CHECKPOINT_FORMAT, CHECKPOINT_VERSION
from .strategies import AutogradSteps, GraphSteps, choose_strategy

def kernels(device: torch.device) -> str:
    """"compiled" or "fallback": what serves fastmlp's ops on `device` (fastmlp.backend)."""
    from .. import backend  # the package root's, imported when used

    return backend(device.type)


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
        strategy = choose_strategy(self.model, config, self.device, world)
        if config.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                                             weight_decay=config.weight_decay)
        else:  # capturable: step counts on the GPU, where a captured graph can advance them
            self.optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay,
                                              capturable=strategy is GraphSteps)
        self.strategy = (GraphSteps(self.model, self.optimizer, config.batch_size) if strategy is GraphSteps
                         else strategy())
        self.net = self.model
        if world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.epoch = 0  # epochs completed
        self.step = 0  # optimizer steps taken
        self.history: list[dict] = []
        self.train_seconds = 0.0

    @property
    def fused_step(self) -> bool:
        """Whether the whole step runs as one fastmlp op (any strategy but autograd)."""
        return not isinstance(self.strategy, AutogradSteps)

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
            loss_sum = self.strategy.epoch(self, order, bar, on_step)
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

    def set_lr(self, lr: float):
        for group in self.optimizer.param_groups:
            group["lr"] = lr

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
