"""GPU benchmark: one whole training step (batch 64, SGD with momentum) of the two project MLPs, and
a full MNIST epoch on GPU-resident data, against PyTorch's own step in three forms.

    python benchmarks/gpu_step_bench.py [--data DIR] [--steps 300] [--reps 7] [--no-compile] [--json out.json]

Variants (each builds its own model from the same initial weights, in this order):
  torch graph          THE baseline: PyTorch's whole step (forward, loss, backward, SGD step) captured
                       in one CUDA graph by hand (torch.cuda.graph), the like-for-like counterpart of
                       "fastmlp graph step"
  torch eager          nn.Sequential + F.cross_entropy + loss.backward() + torch.optim.SGD.step()
  torch compile        one train-step function (zero_grad, forward, loss, backward, opt.step())
                       under torch.compile(mode="reduce-overhead")
  fastmlp layers       FusedMLP (fused layer kernels, autograd) + torch.optim.SGD, eager
  fastmlp sgd_step     FusedMLP.sgd_step: the whole-step op, called eagerly
  fastmlp graph step   fastmlp.CUDAGraphStep: the whole-step op captured in a CUDA graph

Ratios: "x graph", "x eager" and "x compile" are that baseline's time / the variant's time, from the
same run (> 1: the variant is faster). "x graph" is the like-for-like comparison for the graph step.

torch.compile: PyTorch recommends compiling the highest-level function that compiles cleanly, for
training the train step with its optimizer ("Where to apply torch.compile?"), so the whole step is
one compiled function. Dynamo splits it where it does not trace: optimizer.zero_grad (skipped by
design) and loss.backward(); the backward is still compiled, by AOTAutograd together with the
forward, since this model has neither a graph break in its forward nor a backward hook (the two
cases compiled autograd exists for). Compiled autograd is therefore not enabled: it would add a
cache lookup to every backward and compile nothing more. (Dynamo's experimental, off-by-default
trace_autograd_ops flag, which traces backward() into the graph, is not used either.)
mode="reduce-overhead" is the mode torch.compile documents for small batches: it replays the
compiled graphs as CUDA graphs, removing the per-launch host overhead that dominates a batch-64
step of these MLPs (a few dozen tiny kernels); "max-autotune-no-cudagraphs" tunes GEMM kernels
instead and leaves every launch on the host.
A variant that fails to compile is reported as n/a.

Verification, before timing: every variant runs VERIFY_STEPS (20) steps from the initial weights on
the first 20 batches, and is compared with a separate torch eager run of the same steps:
  - the loss of step 1 (same weights, same batch) within 1e-4 * max(1, |loss|);
  - the loss of every step within 1e-2 * max(1, |loss|);
  - for every parameter tensor, its total update w - w0 within 0.3 of eager's update in L2 norm:
    ||(w - w0) - (w_eager - w0)|| <= 0.3 * ||w_eager - w0||.
Why these values (measured on the CPU with fastmlp's fused kernels against torch, both models, real
MNIST and random data, 20 steps): a correct float32 step differs from eager by ~1e-7 in the losses
and ~1e-6 of the update. Once in about a hundred runs a pre-activation lands within rounding of 0
and the two ReLUs pass a different gradient, a legitimate difference that training then carries
on: a single such flip moved a tensor's update by up to 0.18 and a loss by up to 6e-3. An idle step
(no update) is off by exactly 1.0 of the update; a step at half or double the learning rate by 0.5
or 1.0. A variant that fails is printed as FAILED with what differed, gets no timing and no ratio,
and the script exits with status 1.

Times are medians over --reps runs of --steps steps, measured with CUDA events around the loop
(so host overhead counts, as it does in training). Batches are slices of a GPU-resident dataset;
the graph variants copy each batch into their static input, which is part of the timed step.
Exit status: 0 when every variant passed verification (or, for torch compile, failed to compile),
1 when one failed or raised, 2 without a CUDA GPU.
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

MODELS = {"mnist 784-128-64-10": [784, 128, 64, 10], "fashion 784-256-10": [784, 256, 10]}
BATCH = 64
HYPER = dict(lr=0.02, momentum=0.9, weight_decay=5e-4)
COMPILE_MODE = "reduce-overhead"
BASELINES = ("torch graph", "torch eager", "torch compile")
EPOCH_VARIANTS = ("torch graph", "torch eager", "torch compile", "fastmlp layers", "fastmlp graph step")

# Verification (see the module docstring for why these values).
VERIFY_STEPS = 20
FIRST_LOSS_TOL = 1e-4  # step 1: same weights, same batch
LOSS_TOL = 1e-2  # every step, times max(1, |loss|)
UPDATE_TOL = 0.3  # per parameter tensor, L2 norm of the update's difference relative to eager's update


# ---- verification: the pure comparison (no CUDA needed) ----------------------------------------


def deviations(start, ref_losses, ref_state, losses, state):
    """How far a run (losses, state) is from the reference run (ref_losses, ref_state), both started
    from the parameters `start` (state_dicts, any device): {"first_loss", "loss", "loss_step",
    "update": {name: relative L2 error of the update}, "max_abs": {name: max |w - w_ref|},
    "missing": [names]}. Loss errors are |diff| / max(1, |ref|); NaN counts as infinite."""

    def rel(a, b):
        d = abs(float(a) - float(b)) / max(1.0, abs(float(b)))
        return d if d == d else math.inf

    out = dict(first_loss=0.0, loss=0.0, loss_step=0, update={}, max_abs={}, missing=[])
    if losses:
        out["first_loss"] = rel(losses[0], ref_losses[0]) if ref_losses else math.inf
    for i, (a, b) in enumerate(zip(losses, ref_losses)):
        d = rel(a, b)
        if d > out["loss"]:
            out["loss"], out["loss_step"] = d, i + 1
    for name, w0 in start.items():
        if name not in state:
            out["missing"].append(name)
            continue
        w0 = w0.detach().cpu().double()
        ref_update = ref_state[name].detach().cpu().double() - w0
        diff = (state[name].detach().cpu().double() - w0) - ref_update
        num, den = float(diff.norm()), float(ref_update.norm())
        err = num / den if den > 0 else (0.0 if num == 0 else math.inf)
        out["update"][name] = err if err == err else math.inf
        out["max_abs"][name] = float(diff.abs().max()) if diff.numel() else 0.0
    return out


def compare_runs(start, ref_losses, ref_state, losses, state):
    """What differs between a variant's run and the reference (eager) run of the same steps from the
    parameters `start`: a list of problems, [] when the losses and every parameter's update agree
    within FIRST_LOSS_TOL / LOSS_TOL / UPDATE_TOL."""
    if len(losses) != len(ref_losses):
        return [f"loss: {len(losses)} losses for the reference's {len(ref_losses)} steps"]
    d = deviations(start, ref_losses, ref_state, losses, state)
    problems = []
    if not d["first_loss"] <= FIRST_LOSS_TOL:
        problems.append(f"loss of step 1 (same weights, same batch): {float(losses[0]):.7g} vs eager "
                        f"{float(ref_losses[0]):.7g}, |diff| {d['first_loss']:.3g} x max(1, |loss|) > tolerance "
                        f"{FIRST_LOSS_TOL:g}")
    if not d["loss"] <= LOSS_TOL:
        i = d["loss_step"] - 1
        problems.append(f"loss of step {i + 1} of {len(losses)}: {float(losses[i]):.7g} vs eager "
                        f"{float(ref_losses[i]):.7g}, |diff| {d['loss']:.3g} x max(1, |loss|) > tolerance {LOSS_TOL:g}")
    problems += [f"weights: parameter {name} missing" for name in d["missing"]]
    bad = sorted((n for n, err in d["update"].items() if not err <= UPDATE_TOL), key=lambda n: -d["update"][n])
    if bad:
        worst = bad[0]
        others = f" (also {', '.join(bad[1:])})" if bad[1:] else ""
        problems.append(f"weights: {len(bad)} of {len(d['update'])} parameters off; worst {worst}: its update is "
                        f"off by {d['update'][worst]:.3g} of eager's update (L2 norm) > tolerance {UPDATE_TOL:g}, "
                        f"max |w - w_eager| {d['max_abs'][worst]:.3g}{others}")
    return problems


def eager_step(model, opt):
    """step(x, y): PyTorch's ordinary training step of `model` with optimizer `opt`; returns the loss."""

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def run_steps(step, model, xs, ys, steps, batch=BATCH):
    """Runs `step` on the first `steps` batches of (xs, ys); returns the losses (floats, read after
    each step: a graph variant overwrites its loss on the next call) and the final parameters (CPU)."""
    losses = [float(step(xs[i * batch:(i + 1) * batch], ys[i * batch:(i + 1) * batch])) for i in range(steps)]
    return losses, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


# ---- variants (CUDA) -------------------------------------------------------------------------


def _sgd(model):
    return torch.optim.SGD(model.parameters(), **HYPER)


def _plain(sizes, state):
    import fastmlp

    m = fastmlp.plain_mlp(sizes, device="cuda")
    m.load_state_dict(state)
    return m


def _fused(sizes, state):
    import fastmlp

    m = fastmlp.FusedMLP(sizes, device="cuda")
    m.load_state_dict(state)
    return m


def _compiled_step(model):
    """The whole train step as one torch.compile'd function (why this form and mode: module docstring).
    compiler.reset() first: compiled code is cached per code object, so every instance of train_step
    (one per model) would otherwise pile guards and recompilations onto the same cache entry."""
    torch.compiler.reset()
    return torch.compile(eager_step(model, _sgd(model)), mode=COMPILE_MODE)


def _graphed_step(model, x0, y0):
    """PyTorch's documented whole-network capture recipe (warm up on a side stream, then capture
    forward, loss, backward and optimizer.step() in one graph), then the starting point restored."""
    opt = _sgd(model)
    start = {k: v.clone() for k, v in model.state_dict().items()}
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
    # The warm-up trained the model 3 steps. Put the starting weights back and zero the momentum
    # buffers, in place (the graph holds their addresses): with a zero buffer the captured
    # `buf = momentum * buf + grad` is SGD's first step `buf = grad`, so the replays make the same
    # steps as eager from the same weights.
    with torch.no_grad():
        for k, v in model.state_dict().items():
            v.copy_(start[k])
        for st in opt.state.values():
            st["momentum_buffer"].zero_()

    def step(x, y):
        sx.copy_(x)
        sy.copy_(y)
        g.replay()
        return sloss

    return step


def _torch_graph(sizes, state, x0, y0):
    m = _plain(sizes, state)
    return _graphed_step(m, x0, y0), m


def _torch_eager(sizes, state, x0, y0):
    m = _plain(sizes, state)
    return eager_step(m, _sgd(m)), m


def _torch_compile(sizes, state, x0, y0):
    m = _plain(sizes, state)
    return _compiled_step(m), m


def _fastmlp_layers(sizes, state, x0, y0):
    m = _fused(sizes, state)
    return eager_step(m, _sgd(m)), m


def _fastmlp_sgd_step(sizes, state, x0, y0):
    m = _fused(sizes, state)
    opt = _sgd(m)
    return (lambda x, y: m.sgd_step(x, y, opt)), m


def _fastmlp_graph_step(sizes, state, x0, y0):
    import fastmlp

    m = _fused(sizes, state)
    return fastmlp.CUDAGraphStep(m, _sgd(m), batch_size=x0.shape[0]), m


# name -> make(sizes, state, x0, y0) -> (step, model), in print order: the baselines first.
VARIANTS = {
    "torch graph": _torch_graph,
    "torch eager": _torch_eager,
    "torch compile": _torch_compile,
    "fastmlp layers": _fastmlp_layers,
    "fastmlp sgd_step": _fastmlp_sgd_step,
    "fastmlp graph step": _fastmlp_graph_step,
}


# ---- timing ----------------------------------------------------------------------------------


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
    import fastmlp.data

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


def _error_text(e):
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def _measure(vname, make, sizes, state, start, ref, xs, ys, args, epoch):
    """One variant of one model: build, verify, then time. Returns its result row: status "ok",
    "FAILED" (verification: `problems`), "ERROR" (raised: `error`) or "n/a" (torch compile raised)."""
    t0 = time.perf_counter()
    try:
        step, model = make(sizes, state, xs[:BATCH], ys[:BATCH])
        losses, final = run_steps(step, model, xs, ys, VERIFY_STEPS)
    except Exception as e:  # noqa: BLE001 - one failed variant must not hide the others
        return dict(status="n/a" if vname == "torch compile" else "ERROR", error=_error_text(e))
    d = deviations(start, ref[0], ref[1], losses, final)
    verify = dict(first_loss_err=d["first_loss"], loss_err=d["loss"],
                  update_err=max(d["update"].values(), default=0.0), losses=losses)
    problems = compare_runs(start, ref[0], ref[1], losses, final)
    if problems:
        return dict(status="FAILED", problems=problems, verify=verify)
    try:
        for i in range(5):  # a few more steps before timing (verification already compiled and captured)
            step(xs[i * BATCH:(i + 1) * BATCH], ys[i * BATCH:(i + 1) * BATCH])
        setup_s = time.perf_counter() - t0
        row = dict(status="ok", us_per_step=_time_loop(step, xs, ys, args.steps, args.reps), setup_s=setup_s,
                   verify=verify)
        if epoch:
            row["epoch_ms"], row["epoch_steps"] = _epoch_ms(step, xs, ys, 3)
    except Exception as e:  # noqa: BLE001
        return dict(status="n/a" if vname == "torch compile" else "ERROR", error=_error_text(e), verify=verify)
    return row


def report(results, variants):
    """Prints the table of `results` ("model | variant" -> row from _measure), with each variant's
    ratios to the baselines (stored in its row), then one line per failed variant; returns those lines."""
    failures = []
    print("\nus per training step, median. x B = B's time / this variant's time (> 1: faster than B), same run;\n"
          "'torch graph' (PyTorch's whole step in one CUDA graph) is the like-for-like baseline of "
          "'fastmlp graph step'")
    hdr = (f"{'model':>20} | {'variant':>18} | {'us/step':>8} | {'x graph':>7} | {'x eager':>7} | {'x compile':>9} | "
           f"{'epoch ms':>8} | verified (max loss / update error)")
    print(hdr)
    print("-" * len(hdr))
    for mname in dict.fromkeys(k.split(' | ')[0] for k in results):
        base = {b: results.get(f"{mname} | {b}", {}).get("us_per_step") for b in BASELINES}
        for vname in variants:
            key = f"{mname} | {vname}"
            r = results.get(key)
            if r is None:
                continue
            if r["status"] != "ok":
                why = r.get("error") or "; ".join(r["problems"])
                print(f"{mname:>20} | {vname:>18} | {r['status']}: {why}")
                if r["status"] != "n/a":
                    failures.append(f"{r['status']}: {key}: {why}")
                continue
            r["ratios"] = {f"vs {b}": (base[b] / r["us_per_step"] if base[b] else None) for b in BASELINES}
            cols = [f"{x:{w}.2f}" if x is not None else f"{'-':>{w}}" for x, w in zip(r["ratios"].values(), (7, 7, 9))]
            ep = f"{r['epoch_ms']:8.1f}" if "epoch_ms" in r else f"{'-':>8}"
            v = r["verify"]
            print(f"{mname:>20} | {vname:>18} | {r['us_per_step']:8.1f} | {' | '.join(cols)} | {ep} | "
                  f"ok ({v['loss_err']:.1e} / {v['update_err']:.1e})")
    for line in failures:
        print(line)
    return failures


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="folder holding MNIST/raw/*.gz (else random data of the same shape)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant (slow to compile)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_step_bench: no CUDA GPU (torch.cuda.is_available() is False); this benchmark needs one",
              file=sys.stderr)
        return 2
    # Read by fastmlp when first imported: its hand-written CUDA kernels, unless the caller said 0.
    os.environ.setdefault("FASTMLP_CUDA_KERNELS", "1")
    import fastmlp

    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  fastmlp {fastmlp.backend_info()}")
    xs, ys, what = _load_mnist(args.data)
    print(f"# data: {what}, {xs.shape[0]} samples on the GPU; batch {BATCH}; SGD {HYPER}")
    print("# baseline: torch graph = PyTorch's own whole step (forward, loss, backward, SGD) in one CUDA graph,"
          " the like-for-like counterpart of fastmlp graph step; beside it torch eager and torch.compile"
          f" (whole step, mode={COMPILE_MODE!r})")
    print(f"# verification: {VERIFY_STEPS} steps from the same weights on the same batches against a torch eager"
          f" run: loss of step 1 within {FIRST_LOSS_TOL:g}, every loss within {LOSS_TOL:g} (x max(1, |loss|)),"
          f" each parameter's update within {UPDATE_TOL:g} of eager's (L2)")

    variants = {k: v for k, v in VARIANTS.items() if not (args.no_compile and k == "torch compile")}
    results = {}
    for mname, sizes in MODELS.items():
        torch.manual_seed(0)
        state = fastmlp.plain_mlp(sizes, device="cuda").state_dict()
        start = {k: v.detach().cpu().clone() for k, v in state.items()}
        ref_model = _plain(sizes, state)
        ref = run_steps(eager_step(ref_model, _sgd(ref_model)), ref_model, xs, ys, VERIFY_STEPS)
        del ref_model
        for vname, make in variants.items():
            epoch = sizes == MODELS["mnist 784-128-64-10"] and vname in EPOCH_VARIANTS
            row = _measure(vname, make, sizes, state, start, ref, xs, ys, args, epoch)
            results[f"{mname} | {vname}"] = row
            print(f"{mname} | {vname}", {k: v for k, v in row.items() if k != "verify"}, flush=True)
            torch.cuda.synchronize()

    failures = report(results, variants)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, fastmlp=fastmlp.backend_info(),
                           data=what, batch=BATCH, sgd=HYPER, baseline="torch graph", compile_mode=COMPILE_MODE,
                           verification=dict(steps=VERIFY_STEPS, first_loss_tol=FIRST_LOSS_TOL, loss_tol=LOSS_TOL,
                                             update_tol=UPDATE_TOL),
                           results=results, failures=failures), f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
