"""Training and evaluation of the course MLPs on whole-tensor data.

    config = default_config("mnist", seed=1)          # the tuned recipe; any field can be overridden
    result = train(config, root="../shared/data", out="runs/mnist")
    result.metrics["final_test_accuracy"]             # a fraction, e.g. 0.981

One epoch visits the training split in a random order drawn from (seed, epoch) alone, so a run that is
stopped and resumed from its checkpoint (`resume=`) ends with exactly the weights of an uninterrupted run.
Under torchrun (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel and each global batch of
`batch_size` samples is split across the processes, so the result matches one process with the same batch.

The package, in the order a run uses it:

    config       TrainConfig, the tuned recipes, what may change on resume
    files        checkpoints (atomic writes, checked reads), JSON
    strategies   how optimizer steps are taken (fused many-step op, CUDA graph, fused op, autograd)
    trainer      Trainer: model, optimizer, strategy and position in the run
    evaluation   loss, accuracy, confusion matrix
    plots        curves.png, confusion.png
    run          train() and evaluate_checkpoint(), what `fastmlp train` / `evaluate` call
"""

from .config import (OPTIMIZERS, PRECISIONS, RECIPES, RESUME_MAY_CHANGE, SCHEDULES, TrainConfig, default_config,
                     replace_config, resume_conflicts)
from .evaluation import confusion_matrix, evaluate, evaluate_with_confusion, per_class_accuracy
from .files import (CHECKPOINT_FORMAT, CHECKPOINT_NAME, CHECKPOINT_VERSION, CheckpointError, atomic_write,
                    load_checkpoint, model_from_checkpoint, save_checkpoint, write_json)
from .plots import new_figure, plot_confusion, plot_curves, save_figure
from .run import TrainingDiverged, TrainResult, describe, evaluate_checkpoint, format_epoch, run_metrics, train
from .strategies import AutogradSteps, FusedSteps, GraphSteps, ManyFusedSteps, choose_strategy
from .trainer import Trainer, kernels

__all__ = [
    "CHECKPOINT_FORMAT", "CHECKPOINT_NAME", "CHECKPOINT_VERSION", "OPTIMIZERS", "PRECISIONS", "RECIPES",
    "RESUME_MAY_CHANGE", "SCHEDULES", "AutogradSteps", "CheckpointError", "FusedSteps", "GraphSteps", "ManyFusedSteps", "TrainConfig",
    "TrainResult", "Trainer", "TrainingDiverged", "atomic_write", "choose_strategy", "confusion_matrix", "default_config", "describe",
    "evaluate", "evaluate_checkpoint", "evaluate_with_confusion", "format_epoch", "kernels", "load_checkpoint", "model_from_checkpoint",
    "new_figure", "per_class_accuracy", "plot_confusion", "plot_curves", "replace_config", "resume_conflicts",
    "run_metrics", "save_checkpoint", "save_figure", "train", "write_json",
]
