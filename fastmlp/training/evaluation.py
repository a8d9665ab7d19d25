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
