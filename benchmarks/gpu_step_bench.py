"""GPU benchmark: one whole training step (batch 64, SGD with momentum) of the two project MLPs, and
a full MNIST epoch on GPU-resident data, against eager PyTorch and torch.compile.

    python benchmarks/gpu_step_bench.py [--data DIR] [--steps 300] [--reps 7] [--no-compile] [--json out.json]

Variants (each builds its own model from the same initial weights):
  torch eager          nn.Sequential + F.cross_entropy + loss.backward() + torch.optim.SGD.step()
  torch compile-ro     the model under torch.compile(mode="reduce-overhead") and a compiled SGD step
  torch graph          the eager step captured whole in one CUDA graph (torch.cuda.graph)
  fastmlp layers       FusedMLP (fused layer kernels, autograd) + torch.optim.SGD, eager
  fastmlp sgd_step     FusedMLP.sgd_step: the whole-step op, called eagerly
  fastmlp graph step   fastmlp.CUDAGraphStep: the whole-step op captured in a CUDA graph

Times are medians over --reps runs of --steps steps, measured with CUDA events around the loop
(so host overhead counts, as it does in training). Batches are slices of a GPU-resident dataset;
the graph variants copy each batch into their static input, which is part of the timed step.
"""

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("FASTMLP_CUDA_KERNELS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fastmlp  # noqa: E402
import fastmlp.data  # noqa: E402
from fastmlp.bench import eager_step  # noqa: E402

MODELS = {"mnist 784-128-64-10": [784, 128, 64, 10], "fashion 784-256-10": [784, 256, 10]}
BATCH = 64
HYPER = dict(lr=0.02, momentum=0.9, weight_decay=5e-4)


def _plain(sizes, state):
    m = fastmlp.plain_mlp(sizes, device="cuda")
    m.load_state_dict(state)
    return m


def _fused(sizes, state):
    m = fastmlp.FusedMLP(sizes, device="cuda")
    m.load_state_dict(state)
    return m


def _compiled_step(model):
    cmodel = torch.compile(model, mode="reduce-overhead")
    opt = torch.optim.SGD(model.parameters(), **HYPER)

    @torch.compile(fullgraph=False)
    def opt_step():
        opt.step()

    def step(x, y):
        loss = F.cross_entropy(cmodel(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt_step()
        return loss

    return step


def _graphed_step(model, x0, y0):
    """The documented whole-network capture recipe: warm up on a side stream, then capture."""
    opt = torch.optim.SGD(model.parameters(), **HYPER)
    sx, sy = x0.clone(), y0.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(sx), sy).backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(g):
        sloss = F.cross_entropy(model(sx), sy)
        sloss.backward()
        opt.step()

    def step(x, y):
        sx.copy_(x)
        sy.copy_(y)
        g.replay()
        return sloss

    return step


def _sgd_step(model):
    opt = torch.optim.SGD(model.parameters(), **HYPER)
    return lambda x, y: model.sgd_step(x, y, opt)


def _fastmlp_graph_step(model, x0, y0):
    opt = torch.optim.SGD(model.parameters(), **HYPER)
    return fastmlp.CUDAGraphStep(model, opt, batch_size=x0.shape[0])


def _time_loop(step, xs, ys, steps, reps):
    n = xs.shape[0] // BATCH
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    out = []
    i = 0
    for _ in range(reps):
        torch.cuda.synchronize()
        start.record()
        for _ in range(steps):
            j = i % n
            step(xs[j * BATCH:(j + 1) * BATCH], ys[j * BATCH:(j + 1) * BATCH])
            i += 1
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) * 1000.0 / steps)  # us per step
    return statistics.median(out)


def _epoch_ms(step, xs, ys, reps):
    """Wall time of one pass over all full batches of (xs, ys), median over reps."""
    n = xs.shape[0] // BATCH
    out = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for j in range(n):
            step(xs[j * BATCH:(j + 1) * BATCH], ys[j * BATCH:(j + 1) * BATCH])
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(out), n


def _load_mnist(root):
    if root:
        try:
            images, labels = fastmlp.data.load_raw("mnist", "train", root)
            return fastmlp.data.normalize(images).cuda(), labels.to(torch.int64).cuda(), "MNIST train (real)"
        except Exception as e:  # noqa: BLE001 - fall back to synthetic data, said so in the output
            print(f"# could not read MNIST from {root}: {e}; using random data of the same shape")
    gen = torch.Generator(device="cuda").manual_seed(0)
    xs = torch.randn(60000, 784, device="cuda", generator=gen)
    ys = torch.randint(0, 10, (60000,), device="cuda", generator=gen)
    return xs, ys, "random data of MNIST's shape"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="folder holding MNIST/raw/*.gz (else random data of the same shape)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant (slow to compile)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_step_bench: no CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  fastmlp {fastmlp.backend_info()}")
    xs, ys, what = _load_mnist(args.data)
    print(f"# data: {what}, {xs.shape[0]} samples on the GPU; batch {BATCH}; SGD {HYPER}")

    variants = {
        "torch eager": lambda s, st, x0, y0: eager_step(_plain(s, st), HYPER),
        "torch compile-ro": lambda s, st, x0, y0: _compiled_step(_plain(s, st)),
        "torch graph": lambda s, st, x0, y0: _graphed_step(_plain(s, st), x0, y0),
        "fastmlp layers": lambda s, st, x0, y0: eager_step(_fused(s, st), HYPER),
        "fastmlp sgd_step": lambda s, st, x0, y0: _sgd_step(_fused(s, st)),
        "fastmlp graph step": lambda s, st, x0, y0: _fastmlp_graph_step(_fused(s, st), x0, y0),
    }
    if args.no_compile:
        del variants["torch compile-ro"]
    if not hasattr(fastmlp, "CUDAGraphStep"):
        del variants["fastmlp graph step"]

    results = {}
    for mname, sizes in MODELS.items():
        torch.manual_seed(0)
        state = fastmlp.plain_mlp(sizes, device="cuda").state_dict()
        x0, y0 = xs[:BATCH], ys[:BATCH]
        for vname, make in variants.items():
            key = f"{mname} | {vname}"
            t0 = time.perf_counter()
            try:
                step = make(sizes, state, x0, y0)
                for _ in range(20):  # warm-up (and compilation)
                    step(x0, y0)
                loss0 = float(step(x0, y0))
                setup_s = time.perf_counter() - t0
                us = _time_loop(step, xs, ys, args.steps, args.reps)
                row = dict(us_per_step=us, setup_s=setup_s, loss_after_warmup=loss0)
                if sizes == MODELS["mnist 784-128-64-10"] and vname in ("torch eager", "torch compile-ro",
                                                                       "fastmlp layers", "fastmlp graph step"):
                    row["epoch_ms"], row["epoch_steps"] = _epoch_ms(step, xs, ys, 3)
            except Exception as e:  # noqa: BLE001 - one failed variant must not hide the others
                row = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            results[key] = row
            print(key, row, flush=True)
            torch.cuda.synchronize()

    print("\nus per training step, median (x = eager torch / variant; > 1 means faster than eager)")
    print(f"{'model':>20} | {'variant':>20} | {'us/step':>8} | {'x eager':>7} | {'epoch ms':>8}")
    for mname in MODELS:
        base = results.get(f"{mname} | torch eager", {}).get("us_per_step")
        for vname in variants:
            r = results[f"{mname} | {vname}"]
            if "error" in r:
                print(f"{mname:>20} | {vname:>20} | FAILED: {r['error']}")
                continue
            ratio = f"{base / r['us_per_step']:7.2f}" if base else "      -"
            ep = f"{r['epoch_ms']:8.1f}" if "epoch_ms" in r else "       -"
            print(f"{mname:>20} | {vname:>20} | {r['us_per_step']:8.1f} | {ratio} | {ep}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, data=what,
                           results=results), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
