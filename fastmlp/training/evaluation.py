"""A model's loss, accuracy and confusion matrix on a split."""

import torch
import torch.nn.functional as F
from torch import nn

from ..data import NUM_CLASSES, Split, iterate_batches


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
def evaluate_with_confusion(model: nn.Module, split: Split, batch_size: int = 2500) -> tuple[dict, torch.Tensor]:
    """(evaluate()'s result, confusion_matrix()'s matrix) from one pass over `split`."""
    n = len(split)
    device = split.labels.device
    loss = torch.zeros((), dtype=torch.float64, device=device)
    counts = torch.zeros(NUM_CLASSES * NUM_CLASSES, dtype=torch.int64, device=device)
    for logits, y in _eval_logits(model, split, batch_size):
        loss += F.cross_entropy(logits, y, reduction="sum").double()
        counts += torch.bincount(y * NUM_CLASSES + logits.argmax(1), minlength=NUM_CLASSES * NUM_CLASSES)
    matrix = counts.view(NUM_CLASSES, NUM_CLASSES).cpu()
    if n == 0:
        return {"loss": None, "accuracy": None, "n": 0}, matrix
    return {"loss": loss.item() / n, "accuracy": int(matrix.diag().sum()) / n, "n": n}, matrix


def evaluate(model: nn.Module, split: Split, batch_size: int = 2500) -> dict:
    """{"loss": mean cross-entropy, "accuracy": fraction correct, "n": samples} of `model` on `split`."""
    return evaluate_with_confusion(model, split, batch_size)[0]


def confusion_matrix(model: nn.Module, split: Split, batch_size: int = 2500) -> torch.Tensor:
    """(10, 10) int64 CPU tensor: [i, j] = images of true class i that `model` predicts as class j.
    Its diagonal is the correct count per class, its row sums the images per class, its total len(split)."""
    return evaluate_with_confusion(model, split, batch_size)[1]


def per_class_accuracy(matrix: torch.Tensor) -> list[float | None]:
    """Fraction correct per true class from a confusion matrix (None for a class with no images)."""
    totals = matrix.sum(1)
    return [None if int(t) == 0 else int(matrix[i, i]) / int(t) for i, t in enumerate(totals)]
