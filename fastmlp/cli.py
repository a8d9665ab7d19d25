"""The `fastmlp` command (also `python -m fastmlp`, and `torchrun ... -m fastmlp` for data parallel).

    fastmlp train --dataset mnist --out runs/mnist            # the default recipe
    fastmlp train --resume runs/mnist/checkpoint.pt           # continue an interrupted run
    fastmlp evaluate --checkpoint runs/mnist/checkpoint.pt --plot confusion.png
    fastmlp predict --checkpoint runs/mnist/checkpoint.pt seven.png --plot seven-probs.png
    fastmlp bench ...                                         # fastmlp.bench

Exit codes: 0 success, 1 runtime failure (e.g. dataset files missing or corrupt), 2 usage error (bad
arguments; nothing is written), 130 interrupted.
"""

import argparse
import gc
import json
import sys
from dataclasses import fields
from pathlib import Path

import torch

from .data import CLASS_NAMES, DATASETS, NUM_CLASSES, DataError, load_raw
from .models import BACKENDS
from .classify import FIT, ImageError, load_images, probabilities, resolve_model
from .training import (CHECKPOINT_NAME, OPTIMIZERS, PRECISIONS, RECIPES, SCHEDULES, CheckpointError, TrainConfig,
                    default_config, evaluate_checkpoint, load_checkpoint, new_figure, plot_confusion,
                    resume_conflicts, save_figure, train, TrainingDiverged)

PROG = "fastmlp"
# What a run writes into --out besides the checkpoint.
RUN_FILES = ("metrics.json", "curves.png", "confusion.png")


def _int_type(low, limit=None):
    """An argparse type: an int >= low and, with a limit, below it (torch takes seeds below 2^63, thread
    counts below 2^31), so a huge value is a usage error rather than an overflow deep inside."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        if limit is not None and value >= limit:
            raise argparse.ArgumentTypeError(f"must be below {limit}, got {value}")
        return value
    return parse


_positive_int = _int_type(1)
_non_negative_int = _int_type(0)


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _recipes_text():
    lines = ["default recipes (batch 64; any option below overrides them):"]
    for name, recipe in RECIPES.items():
        lines.append(f"  {name}: " + " ".join(f"{k}={v}" for k, v in recipe.items()))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Train and evaluate the course MLPs on fastmlp's fused Linear+ReLU kernels.")
    sub = parser.add_subparsers(dest="command", metavar="{train,evaluate,predict,bench}")
    sub.required = True

    t = sub.add_parser(
        "train", help="train the MNIST or Fashion-MNIST MLP",
        description="Train the MNIST (784-128-64-10) or Fashion-MNIST (784-256-10) MLP. Under "
                    "`torchrun --nproc_per_node=N -m fastmlp train ...` it trains data-parallel with "
                    "DistributedDataParallel (gloo on CPU, nccl on CUDA); --batch-size is then the global batch.",
        epilog=_recipes_text(), formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--dataset", choices=list(DATASETS), help="required unless --resume")
    t.add_argument("--epochs", type=_positive_int)
    t.add_argument("--batch-size", type=_positive_int, help="global batch size (default 64)")
    t.add_argument("--lr", type=_positive_float, help="peak learning rate")
    t.add_argument("--optimizer", choices=OPTIMIZERS)
    t.add_argument("--momentum", type=float, help="SGD momentum (default 0.9)")
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--dropout", type=float, help="dropout after each hidden ReLU (default 0)")
    t.add_argument("--schedule", choices=SCHEDULES, help="learning-rate schedule (cosine: per step, to 0)")
    t.add_argument("--seed", type=_int_type(0, 2 ** 63))
    t.add_argument("--backend", choices=BACKENDS, help="fused: fastmlp kernels (default); torch: nn.Linear+nn.ReLU")
    t.add_argument("--precision", choices=PRECISIONS,
                   help="fp32 (default), or bf16: torch.autocast(bfloat16)'s arithmetic (bfloat16 GEMM operands and "
                        "results, float32 sums, weights, optimizer state and loss), for either backend; fused on the "
                        "CPU: in the whole-step op")
    t.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    t.add_argument("--root", type=Path, help="dataset root holding MNIST/raw/ or FashionMNIST/raw/ "
                                             "(default: $FASTMLP_DATA, then ./data)")
    t.add_argument("--download", action="store_true", help="download the dataset with torchvision if missing")
    t.add_argument("--out", type=Path, help="output folder: checkpoint.pt, metrics.json, curves.png, confusion.png "
                                            "(default: runs/DATASET-BACKEND-seedSEED, or the checkpoint's folder "
                                            "with --resume)")
    t.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    t.add_argument("--resume", type=Path, metavar="CKPT", help="continue the run saved in CKPT")
    t.add_argument("--val-size", type=_non_negative_int, help="validation images held out of the 60000 (default 5000)")
    t.add_argument("--train-limit", type=_positive_int, metavar="N",
                   help="train on the first N training images only (quick runs)")
    t.add_argument("--threads", type=_int_type(1, 2 ** 31), help="torch CPU threads (default: torch's choice)")
    t.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar per epoch (default: when stderr is a terminal)")

    e = sub.add_parser("evaluate", help="evaluate a checkpoint",
                       description="Accuracy, loss, per-class accuracy and confusion matrix of a checkpoint on "
                                   "the test (or validation) split.")
    e.add_argument("--checkpoint", type=Path, required=True, metavar="CKPT")
    e.add_argument("--split", choices=["test", "val"], default="test")
    e.add_argument("--backend", choices=BACKENDS, default="fused")
    e.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    e.add_argument("--root", type=Path)
    e.add_argument("--threads", type=_int_type(1, 2 ** 31))
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.add_argument("--plot", type=Path, metavar="PNG", help="draw the confusion matrix into this PNG file")

    p = sub.add_parser(
        "predict", help="classify images with a checkpoint",
        description="Class probabilities of image files (any format Pillow reads; .npy/.pt tensors of (H, W) or "
                    "(N, H, W) images, uint8 or float 0-1) or dataset items (--index). Images are prepared as "
                    "the training data: grayscale, inverted when dark on light, cropped and resized to the "
                    "dataset's framing unless 28x28, normalised (see fastmlp.classify).")
    p.add_argument("images", nargs="*", type=Path, metavar="IMAGE")
    p.add_argument("--checkpoint", type=Path, required=True, metavar="CKPT")
    p.add_argument("--index", type=_non_negative_int, nargs="+", metavar="N", default=[],
                   help="dataset items to classify (of the checkpoint's dataset; see --split)")
    p.add_argument("--split", choices=["train", "test"], default="test", help="the file --index counts in")
    p.add_argument("--root", type=Path, help="dataset root, for --index")
    p.add_argument("--top-k", type=_positive_int, default=3, metavar="K", help="classes printed per image")
    p.add_argument("--json", action="store_true", help="print the result as one JSON list")
    p.add_argument("--plot", type=Path, metavar="PNG", help="draw each image beside its class probabilities")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])

    sub.add_parser("bench", help="benchmarks (fastmlp.bench; see `fastmlp bench --help`)", add_help=False)
    return parser


# Command-line option -> TrainConfig field, for options that go into the config.
_CONFIG_OPTIONS = {f.name: f.name for f in fields(TrainConfig)}


def _train_config(args, error):
    """The run's TrainConfig and checkpoint (or None): the recipe (or the checkpoint's config with
    --resume) with the options given on the command line applied."""
    ckpt = None
    explicit = {name: getattr(args, name) for name in _CONFIG_OPTIONS if getattr(args, name, None) is not None}
    if args.resume is not None:
        try:
            ckpt = load_checkpoint(args.resume)
        except CheckpointError as exc:
            error(f"--resume: {exc}")
        saved = dict(ckpt["config"])
        try:
            config = TrainConfig(**{**saved, **explicit}).validate()
        except (TypeError, ValueError) as exc:
            error(f"--resume: {exc}")
        if config.epochs < ckpt["epoch"]:
            error(f"--epochs {config.epochs}: the checkpoint's run has already trained {ckpt['epoch']} epochs")
        conflicts = resume_conflicts(config, saved)
        if conflicts:
            error("--resume continues the checkpoint's run; these options differ from it: " + ", ".join(
                f"--{k.replace('_', '-')} {getattr(config, k)} (checkpoint: {saved[k]})" for k in conflicts))
        return config, ckpt
    if args.dataset is None:
        error("--dataset is required (unless --resume)")
    try:
        return default_config(**explicit), None
    except ValueError as exc:
        error(str(exc).replace("_", "-"))


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _check_plot(plot, inputs, error):
    """--plot PNG, before any work: its folder must exist, and a file already there is replaced only if
    it is a PNG and none of the command's inputs (the checkpoint, the images)."""
    if plot is None:
        return
    try:
        if not plot.parent.is_dir():
            error(f"--plot {plot}: no folder {plot.parent}")
        if plot.is_dir():
            error(f"--plot {plot}: is a folder")
        if plot.exists():
            if any(plot.resolve() == Path(p).resolve() for p in inputs):
                error(f"--plot {plot}: is one of this command's inputs")
            with open(plot, "rb") as f:
                if f.read(len(_PNG_SIGNATURE)) != _PNG_SIGNATURE:
                    error(f"--plot {plot}: exists and is not a PNG image; not replaced")
    except OSError as exc:
        error(f"--plot {plot}: {exc.strerror or exc}")


def _check_device(device, error):
    if device == "cuda" and not torch.cuda.is_available():
        error("--device cuda: CUDA is not available in this PyTorch/machine")


def cmd_train(args, error) -> int:
    config, ckpt = _train_config(args, error)
    _check_device(args.device, error)
    out = args.out
    if out is None:
        out = args.resume.parent if args.resume is not None else Path("runs") / (
            f"{config.dataset}-{config.backend}-seed{config.seed}")
    try:
        if out.exists() and not out.is_dir():
            error(f"--out {out}: exists and is not a folder")
        ancestor = out
        while not ancestor.exists():
            ancestor = ancestor.parent
    except OSError as exc:  # e.g. a name longer than the file system takes
        error(f"--out {out}: {exc.strerror or exc}")
    if not ancestor.is_dir():
        error(f"--out {out}: {ancestor} is not a folder")
    existing = out / CHECKPOINT_NAME
    resuming_here = args.resume is not None and existing.exists() and existing.resolve() == args.resume.resolve()
    if existing.exists() and not resuming_here and not args.overwrite:
        error(f"--out {out} already holds a run ({existing}); continue it with --resume {existing}, "
              f"choose another --out, or pass --overwrite")
    taken = [name for name in RUN_FILES if (out / name).exists()]
    if taken and not resuming_here and not args.overwrite:
        error(f"--out {out} already holds {', '.join(taken)}, which a run would replace; choose another --out, "
              f"or pass --overwrite")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = train(config, device=args.device, root=args.root, out=out, resume=ckpt,
                       progress=args.progress, download=args.download)
    except (DataError, OSError, TrainingDiverged) as exc:  # OSError: --out cannot be made or written
        print(f"{PROG} train: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        saved = out / CHECKPOINT_NAME
        hint = f"continue with: {PROG} train --resume {saved}" if saved.exists() else "no epoch was saved"
        print(f"\n{PROG} train: interrupted; {hint}", file=sys.stderr)
        return 130
    if result.checkpoint_path is not None:  # rank 0 only
        print(f"wrote {out}/: {CHECKPOINT_NAME}, {', '.join(RUN_FILES)}", flush=True)
    return 0


def cmd_evaluate(args, error) -> int:
    try:
        ckpt = load_checkpoint(args.checkpoint)
    except CheckpointError as exc:
        error(f"--checkpoint: {exc}")
    _check_device(args.device, error)
    if args.split == "val" and ckpt["config"].get("val_size", 5000) == 0:
        error("--split val: the checkpoint's run held out no validation images (val_size 0)")
    _check_plot(args.plot, [args.checkpoint], error)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = evaluate_checkpoint(ckpt, split=args.split, device=args.device, root=args.root,
                                     backend=args.backend)
    except DataError as exc:
        print(f"{PROG} evaluate: error: {exc}", file=sys.stderr)
        return 1
    result["checkpoint"] = str(args.checkpoint)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['dataset']} {result['split']}: accuracy {100 * result['accuracy']:.2f}%  "
              f"loss {result['loss']:.4f}  ({result['n']} images; checkpoint after epoch {result['epoch']})")
        print(confusion_table(result["confusion_matrix"], result["class_names"], result["per_class_accuracy"]))
    if args.plot is not None:
        plot_confusion(torch.tensor(result["confusion_matrix"]), result["class_names"], args.plot,
                       f"{result['dataset']} {result['split']} ({args.checkpoint})")
    return 0


def confusion_table(matrix, names, accuracy) -> str:
    """The confusion matrix as text: a row per true class (its name), a column per predicted class (its
    number), then the class's accuracy (diagonal / row total)."""
    width = max(len(name) for name in names) + 4
    lines = ["rows: true class; columns: predicted class",
             " " * width + "".join(f"{j:>6}" for j in range(len(names))) + "  accuracy"]
    for i, (name, row, acc) in enumerate(zip(names, matrix, accuracy)):
        cell = "-" if acc is None else f"{100 * acc:.2f}%"
        label = name if name == str(i) else f"{i} {name}"
        lines.append(f"{label:<{width}}" + "".join(f"{c:>6}" for c in row) + f"  {cell:>8}")
    return "\n".join(lines)


# ---- predict ----------------------------------------------------------------------------------


def _dataset_items(dataset, split, indices, root, error):
    """uint8 (N, 28, 28) dataset items and their source names; an index out of range is a usage error."""
    images, labels = load_raw(dataset, split, root)
    bad = [i for i in indices if i >= len(images)]
    if bad:
        error(f"--index {bad[0]}: the {dataset} {split} split has {len(images)} images (0-{len(images) - 1})")
    return images[indices], [f"{dataset} {split}[{i}] (label {int(labels[i])})" for i in indices]


def prediction_records(probs: torch.Tensor, sources, names, top_k: int) -> list[dict]:
    """The --json document: per image its source, the top_k classes and all probabilities."""
    records = []
    for source, row in zip(sources, probs.tolist()):
        top = sorted(range(len(row)), key=lambda c: -row[c])[:top_k]
        records.append({"source": source,
                        "top": [{"class": c, "name": names[c], "probability": row[c]} for c in top],
                        "probabilities": row})
    return records


def plot_predictions(images: torch.Tensor, probs: torch.Tensor, sources, names, path):
    """Per image, a row: the prepared 28x28 image beside a horizontal bar chart of its class probabilities
    (the course's view_classify), all in one PNG written atomically; None without matplotlib."""
    fig = new_figure(path, figsize=(7, 2.2 * len(sources)))
    if fig is None:
        return None
    axes = fig.subplots(len(sources), 2, squeeze=False, width_ratios=[1, 1.4])
    for (ax_image, ax_bars), image, row, source in zip(axes, images, probs, sources):
        ax_image.imshow(image.numpy(), cmap="gray", vmin=0, vmax=255)
        ax_image.set_title(source, fontsize=8)
        ax_image.axis("off")
        ax_bars.barh(range(NUM_CLASSES), row.numpy())
        ax_bars.set_yticks(range(NUM_CLASSES), names, fontsize=8)
        ax_bars.invert_yaxis()
        ax_bars.set_xlim(0, 1.05)
        ax_bars.set_title("class probability", fontsize=8)
    return save_figure(fig, path)


def cmd_predict(args, error) -> int:
    if not args.images and not args.index:
        error("give IMAGE files and/or --index N")
    if args.top_k > NUM_CLASSES:
        error(f"--top-k {args.top_k}: there are {NUM_CLASSES} classes")
    _check_device(args.device, error)
    _check_plot(args.plot, [args.checkpoint, *args.images], error)
    try:
        model, dataset = resolve_model(args.checkpoint)
        images, sources = load_images(args.images, FIT[dataset]) if args.images else (None, [])
        if args.index:
            items, names = _dataset_items(dataset, args.split, args.index, args.root, error)
            images = items if images is None else torch.cat([images, items])
            sources += names
    except (CheckpointError, ImageError, DataError) as exc:
        print(f"{PROG} predict: error: {exc}", file=sys.stderr)
        return 1
    probs = probabilities(model, images, args.device)
    names = CLASS_NAMES[dataset]
    records = prediction_records(probs, sources, names, args.top_k)
    if args.json:
        print(json.dumps(records, indent=2))
    else:
        for r in records:
            print(f"{r['source']}: " + ", ".join(f"{t['name']} {100 * t['probability']:.1f}%" for t in r["top"]))
    if args.plot is not None:
        plot_predictions(images, probs, sources, names, args.plot)
    return 0


def cmd_bench(argv) -> int:
    try:
        from . import bench
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}.bench":
            raise
        print(f"{PROG} bench: the benchmark module (fastmlp.bench) is not part of this installation",
              file=sys.stderr)
        return 1
    rc = bench.main(list(argv))
    return int(rc or 0)


def main(argv=None) -> int:
    """Entry point of the `fastmlp` console script; returns the exit code."""
    if argv is None:
        # The process is the fastmlp command: what torch and fastmlp imported lives until exit. Frozen,
        # it is left out of the full garbage collections that later imports (matplotlib, parts of
        # torch) and the interpreter's exit would otherwise run over it: ~0.4 M objects, ~0.15 s each.
        gc.freeze()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return cmd_bench(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: usage error (2) or --help (0)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    sub = parser._subparsers._group_actions[0].choices[args.command]

    class _UsageError(Exception):
        pass

    def error(message):
        sub.print_usage(sys.stderr)
        print(f"{PROG} {args.command}: error: {message}", file=sys.stderr)
        raise _UsageError

    try:
        if args.command == "train":
            return cmd_train(args, error)
        if args.command == "evaluate":
            return cmd_evaluate(args, error)
        if args.command == "predict":
            return cmd_predict(args, error)
        return cmd_bench([])
    except _UsageError:
        return 2


if __name__ == "__main__":
    sys.exit(main())
