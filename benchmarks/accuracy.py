"""Accuracy of the default recipes (3 seeds) and wall time per epoch, fastmlp vs plain PyTorch.

    python benchmarks/accuracy.py --root ../shared/data                 # both datasets, seeds 0 1 2, timing
    python benchmarks/accuracy.py --root ../shared/data --skip-accuracy --rounds 5
    python benchmarks/accuracy.py --quick --root ../shared/data         # smoke run: a subset, 1 epoch

Accuracy: `fastmlp.train.train(default_config(dataset, seed=s))` for each seed: training on the first
55000 training images, the recipe chosen on the last 5000 (validation), test accuracy measured once at
the end. --variants adds the same recipe in plain PyTorch ("torch") or as the course-style loop ("course").

Epoch time: four variants of each model train side by side from the same initial weights with the
same recipe, one epoch each per round, their order rotating from round to round (so load from other
processes on a shared machine hits them alike); the figure is the median over rounds of the training pass
(evaluation excluded):
  fused           fastmlp.train.Trainer as `fastmlp train` runs it: FusedMLP, whole fused steps (on the
                  CPU 32 per op call, FusedMLP.train_steps), batches gathered from whole-dataset tensors
  fused-autograd  the same FusedMLP layers under autograd, loss.backward() and torch.optim.SGD.step()
  torch           the same model as nn.Linear/nn.ReLU (plain_mlp) in eager PyTorch, same tensor batches
  course  the classic course loop: torchvision dataset + ToTensor + Normalize, DataLoader(batch_size=64,
          shuffle=True), nn.Sequential, images.view(B, -1) in the loop
"""

import argparse
import gzip
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from fastmlp import data as D  # noqa: E402
from fastmlp import train as T  # noqa: E402
from fastmlp.models import SIZES  # noqa: E402
from fastmlp.modules import plain_mlp  # noqa: E402

TARGETS = {"mnist": 0.98, "fashion-mnist": 0.89}


# ---- accuracy ------------------------------------------------------------------------------------------


def course_train(config: T.TrainConfig, splits, torch_root: Path, epochs=None, log=None):
    """The course-style loop with `config`'s recipe; returns (model, history of epoch seconds)."""
    loader, model, optimizer = course_setup(config, torch_root)
    seconds = []
    step = [0]
    total = config.epochs * len(loader)
    for epoch in range(epochs or config.epochs):
        seconds.append(course_epoch(config, loader, model, optimizer, step, total))
        if log:
            log(f"  course epoch {epoch + 1}: {seconds[-1]:.2f}s")
    return model, seconds


def course_setup(config: T.TrainConfig, torch_root: Path):
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    cls = getattr(datasets, D.DATASETS[config.dataset])
    trainset = cls(str(torch_root), train=True, download=False, transform=transform)
    n = (D.COUNTS["train"] - config.val_size) if config.train_limit is None else config.train_limit
    trainset = torch.utils.data.Subset(trainset, range(n))  # the same 55000 images as the other variants
    g = torch.Generator().manual_seed(config.seed)
    loader = torch.utils.data.DataLoader(trainset, batch_size=config.batch_size, shuffle=True, generator=g)
    torch.manual_seed(config.seed)
    model = plain_mlp(SIZES[config.dataset])
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                    weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return loader, model, optimizer


def course_epoch(config, loader, model, optimizer, step, total):
    criterion = torch.nn.CrossEntropyLoss()
    start = time.perf_counter()
    for images, labels in loader:
        images = images.view(images.shape[0], -1)
        if config.schedule == "cosine":
            for group in optimizer.param_groups:
                group["lr"] = config.lr * 0.5 * (1 + math.cos(math.pi * step[0] / total))
        optimizer.zero_grad()
        output = model(images)
        loss = criterion(output, labels)
        loss.backward()
        optimizer.step()
        step[0] += 1
    return time.perf_counter() - start


def torchvision_root(dataset: str, root, tmp: Path) -> Path:
    """A folder torchvision's dataset class reads: ROOT/<Name>/raw/ with uncompressed IDX files."""
    src = D.find_files(dataset, root)
    raw = tmp / D.DATASETS[dataset] / "raw"
    if not raw.exists():
        raw.mkdir(parents=True)
        for stems in D.FILES.values():
            for stem in stems:
                path = D._find_file(src, stem)
                payload = path.read_bytes()
                (raw / stem).write_bytes(gzip.decompress(payload) if payload[:2] == b"\x1f\x8b" else payload)
    return tmp


def run_accuracy(args, datasets, tmp):
    results = {}
    for dataset in datasets:
        splits = D.load_dataset(dataset, args.root)
        for variant in args.variants:
            rows = []
            for seed in args.seeds:
                overrides = dict(seed=seed)
                if args.quick:
                    overrides.update(epochs=1, train_limit=5000)
                cfg = T.default_config(dataset, **overrides,
                                       backend="torch" if variant == "torch" else "fused")
                start = time.perf_counter()
                if variant == "course":
                    model, seconds = course_train(cfg, splits, torchvision_root(dataset, args.root, tmp))
                    val = T.evaluate(model, splits["val"])
                    test = T.evaluate(model, splits["test"])
                    row = dict(seed=seed, val_accuracy=val["accuracy"], test_accuracy=test["accuracy"],
                               test_loss=test["loss"], train_seconds=sum(seconds),
                               mean_epoch_seconds=statistics.mean(seconds))
                else:
                    r = T.train(cfg, data=splits, log=lambda line: None, progress=False)
                    m = r.metrics
                    row = dict(seed=seed, val_accuracy=m["final_val_accuracy"], test_accuracy=m["final_test_accuracy"],
                               test_loss=m["final_test_loss"], train_seconds=m["train_seconds"],
                               mean_epoch_seconds=statistics.mean(h["epoch_seconds"] for h in m["history"]))
                row["wall_seconds"] = time.perf_counter() - start
                rows.append(row)
                print(f"  {dataset} {variant} seed {seed}: val {100 * row['val_accuracy']:.2f}%  "
                      f"test {100 * row['test_accuracy']:.2f}%  ({row['train_seconds']:.0f}s training)", flush=True)
            accs = [r["test_accuracy"] for r in rows]
            summary = dict(mean=statistics.mean(accs), std=statistics.stdev(accs) if len(accs) > 1 else 0.0,
                           min=min(accs), max=max(accs), target=TARGETS[dataset],
                           meets_target=statistics.mean(accs) >= TARGETS[dataset],
                           config={k: v for k, v in vars(cfg).items() if k != "seed"})
            results.setdefault(dataset, {})[variant] = dict(runs=rows, summary=summary)
    return results


# ---- epoch time ----------------------------------------------------------------------------------------


def run_timing(args, datasets, tmp):
    results = {}
    for dataset in datasets:
        cfg = T.default_config(dataset, seed=0)
        if args.quick:
            cfg = T.replace_config(cfg, train_limit=5000)
        splits = D.load_dataset(dataset, args.root)
        if cfg.train_limit is not None:
            splits = {**splits, "train": splits["train"].subset(cfg.train_limit)}
        trainers = {
            "fused": T.Trainer(cfg, splits),
            "fused-autograd": T.Trainer(cfg, splits),
            "torch": T.Trainer(T.replace_config(cfg, backend="torch"), splits),
        }
        trainers["fused-autograd"].fused_step = False
        loader, model, optimizer = course_setup(cfg, torchvision_root(dataset, args.root, tmp))
        step, total = [0], cfg.epochs * len(loader)
        run = {name: (lambda t=t: t.train_epoch()["epoch_seconds"]) for name, t in trainers.items()}
        run["course"] = lambda: course_epoch(cfg, loader, model, optimizer, step, total)
        names = list(run)
        times = {n: [] for n in names}
        for rnd in range(args.rounds):
            order = names[rnd % len(names):] + names[:rnd % len(names)]
            for name in order:
                times[name].append(run[name]())
            print(f"  {dataset} round {rnd + 1}/{args.rounds}: " +
                  "  ".join(f"{n} {times[n][-1]:.2f}s" for n in names), flush=True)
        n_train = len(splits["train"])
        res = {}
        for name in names:
            med = statistics.median(times[name])
            res[name] = dict(median_seconds=med, samples_per_second=n_train / med, seconds=times[name],
                             min_seconds=min(times[name]), max_seconds=max(times[name]))
        for name in names:
            res[name]["speedup_vs_course"] = res["course"]["median_seconds"] / res[name]["median_seconds"]
        results[dataset] = dict(train_images=n_train, batch_size=cfg.batch_size, optimizer=cfg.optimizer,
                                variants=res)
    return results


# ---- report ------------------------------------------------------------------------------------------------


def markdown(report) -> str:
    lines = []
    acc = report.get("accuracy")
    if acc:
        lines += ["### Test accuracy (default recipes, test set measured once at the end)", ""]
        for dataset, variants in acc.items():
            for variant, res in variants.items():
                s, c = res["summary"], res["summary"]["config"]
                lines.append(f"**{dataset}**, {variant}: {c['optimizer']} lr {c['lr']}"
                             + (f" momentum {c['momentum']}" if c["optimizer"] == "sgd" else "")
                             + (f" weight decay {c['weight_decay']}" if c["weight_decay"] else "")
                             + f", {c['schedule']} schedule, {c['epochs']} epochs, batch {c['batch_size']}")
                lines += ["", "| seed | val acc | test acc | test loss | training s | s/epoch |",
                          "|---:|---:|---:|---:|---:|---:|"]
                for r in res["runs"]:
                    lines.append(f"| {r['seed']} | {100 * r['val_accuracy']:.2f}% | {100 * r['test_accuracy']:.2f}% | "
                                 f"{r['test_loss']:.4f} | {r['train_seconds']:.1f} | {r['mean_epoch_seconds']:.2f} |")
                verdict = "meets" if s["meets_target"] else "MISSES"
                lines += [f"| **mean** | | **{100 * s['mean']:.2f}%** | | | |", "",
                          f"spread: min {100 * s['min']:.2f}%, max {100 * s['max']:.2f}%, std {100 * s['std']:.2f} "
                          f"points; target >= {100 * s['target']:.1f}%: {verdict}", ""]
    timing = report.get("timing")
    if timing:
        lines += ["### Wall time per training epoch (median of interleaved rounds, evaluation excluded)", "",
                  "| model | variant | s/epoch (median) | min-max s | samples/s | speed-up vs course |",
                  "|---|---|---:|---:|---:|---:|"]
        labels = {"fused": "fastmlp FusedMLP, fused SGD step (default), tensor batches",
                  "fused-autograd": "fastmlp FusedMLP layers under autograd + torch.optim.SGD, tensor batches",
                  "torch": "eager PyTorch nn.Linear/nn.ReLU, tensor batches",
                  "course": "course loop (DataLoader + ToTensor + Normalize, nn.Sequential)"}
        for dataset, t in timing.items():
            arch = "-".join(map(str, SIZES[dataset]))
            for name, v in t["variants"].items():
                lines.append(f"| {dataset} {arch} | {labels[name]} | {v['median_seconds']:.2f} | "
                             f"{v['min_seconds']:.2f}-{v['max_seconds']:.2f} | {v['samples_per_second']:,.0f} | "
                             f"{v['speedup_vs_course']:.1f}x |")
        lines.append("")
    env = report["environment"]
    lines.append(f"Machine: {env['cpu']}, {env['cpus']} CPUs, torch {env['torch']} with {env['threads']} thread(s), "
                 f"fastmlp kernels: {env['kernels']}. Command: `{env['command']}`")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, help="dataset root (default: $FASTMLP_DATA, ./data)")
    p.add_argument("--datasets", default="mnist,fashion-mnist")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--variants", default="fused", help="accuracy runs: any of fused,torch,course")
    p.add_argument("--rounds", type=int, default=3, help="interleaved epoch-time rounds per variant")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: batch-64 MLPs gain little from more, and a shared machine "
                        "makes multi-threaded timings erratic)")
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--quick", action="store_true", help="smoke run: 5000 images, 1 epoch")
    p.add_argument("--json", type=Path, help="write the raw results here")
    p.add_argument("--markdown", type=Path, help="write the tables here")
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.variants = args.variants.split(",")
    datasets = args.datasets.split(",")
    for d in datasets:
        if d not in D.DATASETS:
            p.error(f"unknown dataset {d!r}")
    for v in args.variants:
        if v not in ("fused", "torch", "course"):
            p.error(f"unknown variant {v!r}")
    torch.set_num_threads(args.threads)
    import fastmlp

    report = {"environment": {
        "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "kernels": fastmlp.backend("cpu"),
        "cpu_isa": fastmlp.backend_info().get("cpu_isa"),
        "command": "python benchmarks/accuracy.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }}
    try:
        with open("/proc/cpuinfo") as f:
            report["environment"]["cpu"] = next(line.split(":", 1)[1].strip() for line in f
                                                if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    tmp = Path(tempfile.mkdtemp(prefix="fastmlp-accuracy-"))
    try:
        if not args.skip_timing:
            print("epoch time (interleaved rounds):", flush=True)
            report["timing"] = run_timing(args, datasets, tmp)
        if not args.skip_accuracy:
            print("accuracy:", flush=True)
            report["accuracy"] = run_accuracy(args, datasets, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = markdown(report)
    print("\n" + text)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(text + "\n")
    ok = all(v["summary"]["meets_target"] for d in report.get("accuracy", {}).values() for v in d.values())
    return 0 if ok or args.quick else 1


if __name__ == "__main__":
    sys.exit(main())
