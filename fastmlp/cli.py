"""The `fastmlp` command (also `python -m fastmlp`, and `torchrun ... -m fastmlp` for data parallel).

    fastmlp train --dataset mnist --out runs/mnist            # the default recipe
    fastmlp train --resume runs/mnist/checkpoint.pt           # continue an interrupted run
    fastmlp evaluate --checkpoint runs/mnist/checkpoint.pt
    fastmlp bench ...                                         # fastmlp.bench

Exit codes: 0 success, 1 runtime failure (e.g. dataset files missing or corrupt), 2 usage error (bad
arguments; nothing is written), 130 interrupted.
"""

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

import torch

from .data import DATASETS, DataError
from .models import BACKENDS
from .train import (CHECKPOINT_NAME, OPTIMIZERS, RECIPES, SCHEDULES, CheckpointError, TrainConfig,
                    default_config, evaluate_checkpoint, load_checkpoint, resume_conflicts, train)

PROG = "fastmlp"


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


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
    sub = parser.add_subparsers(dest="command", metavar="{train,evaluate,bench}")
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
    t.add_argument("--seed", type=_non_negative_int)
    t.add_argument("--backend", choices=BACKENDS, help="fused: fastmlp kernels (default); torch: nn.Linear+nn.ReLU")
    t.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    t.add_argument("--root", type=Path, help="dataset root holding MNIST/raw/ or FashionMNIST/raw/ "
                                             "(default: $FASTMLP_DATA, then ./data)")
    t.add_argument("--download", action="store_true", help="download the dataset with torchvision if missing")
    t.add_argument("--out", type=Path, help="output folder: checkpoint.pt, metrics.json, curves.png (default: "
                                            "runs/DATASET-BACKEND-seedSEED, or the checkpoint's folder with --resume)")
    t.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    t.add_argument("--resume", type=Path, metavar="CKPT", help="continue the run saved in CKPT")
    t.add_argument("--val-size", type=_non_negative_int, help="validation images held out of the 60000 (default 5000)")
    t.add_argument("--train-limit", type=_positive_int, metavar="N",
                   help="train on the first N training images only (quick runs)")
    t.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: torch's choice)")
    t.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar per epoch (default: when stderr is a terminal)")

    e = sub.add_parser("evaluate", help="evaluate a checkpoint",
                       description="Accuracy and loss of a checkpoint on the test (or validation) split.")
    e.add_argument("--checkpoint", type=Path, required=True, metavar="CKPT")
    e.add_argument("--split", choices=["test", "val"], default="test")
    e.add_argument("--backend", choices=BACKENDS, default="fused")
    e.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    e.add_argument("--root", type=Path)
    e.add_argument("--threads", type=_positive_int)
    e.add_argument("--json", action="store_true", help="print the result as JSON")

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
    if out.exists() and not out.is_dir():
        error(f"--out {out}: exists and is not a folder")
    existing = out / CHECKPOINT_NAME
    resuming_here = args.resume is not None and existing.exists() and existing.resolve() == args.resume.resolve()
    if existing.exists() and not resuming_here and not args.overwrite:
        error(f"--out {out} already holds a run ({existing}); continue it with --resume {existing}, "
              f"choose another --out, or pass --overwrite")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = train(config, device=args.device, root=args.root, out=out, resume=ckpt,
                       progress=args.progress, download=args.download)
    except DataError as exc:
        print(f"{PROG} train: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n{PROG} train: interrupted; continue with: {PROG} train --resume {out / CHECKPOINT_NAME}",
              file=sys.stderr)
        return 130
    if result.checkpoint_path is not None:  # rank 0 only
        print(f"wrote {out}/: {CHECKPOINT_NAME}, metrics.json, curves.png", flush=True)
    return 0


def cmd_evaluate(args, error) -> int:
    try:
        ckpt = load_checkpoint(args.checkpoint)
    except CheckpointError as exc:
        error(f"--checkpoint: {exc}")
    _check_device(args.device, error)
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
        return cmd_bench([])
    except _UsageError:
        return 2


if __name__ == "__main__":
    sys.exit(main())
