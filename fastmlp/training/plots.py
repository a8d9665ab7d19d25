"""The pictures of a run (matplotlib without a display, written atomically): loss and accuracy curves,
the confusion matrix."""

import warnings
from pathlib import Path

import torch

from .files import atomic_write

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
