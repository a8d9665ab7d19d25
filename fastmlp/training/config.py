"""What determines a run's weights: TrainConfig, the tuned recipes, and what may change on resume."""

import math
from dataclasses import dataclass, fields, replace

from ..data import DATASETS
from ..models import BACKENDS

OPTIMIZERS = ("sgd", "adam")
PRECISIONS = ("fp32", "bf16")
SCHEDULES = ("cosine", "none")


@dataclass
class TrainConfig:
    """Everything that determines the trained weights (together with the machine)."""

    dataset: str = "mnist"
    backend: str = "fused"  # "fused" (fastmlp kernels) or "torch" (nn.Linear/nn.ReLU)
    precision: str = "fp32"  # "bf16": torch.autocast(bfloat16)'s arithmetic, float32 weights, state and loss
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
        if self.precision not in PRECISIONS:
            bad("precision", f"must be one of {', '.join(PRECISIONS)}")
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


# Fields a resumed run may change: they compute the same model another way (backend, precision) or
# only extend the run (epochs).
RESUME_MAY_CHANGE = ("epochs", "backend", "precision")


def resume_conflicts(config: TrainConfig, saved: dict) -> list[str]:
    """The fields of `config` that differ from a checkpoint's config and may not change on resume."""
    return [f.name for f in fields(TrainConfig)
            if f.name not in RESUME_MAY_CHANGE and f.name in saved and getattr(config, f.name) != saved[f.name]]


def replace_config(config: TrainConfig, **changes) -> TrainConfig:
    """dataclasses.replace, validated."""
    return replace(config, **changes).validate()
