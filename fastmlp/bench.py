"""Benchmark runner: fastmlp against eager PyTorch and torch.compile, measured fairly.

    fastmlp bench                      # quick subset, prints the tables (python -m benchmarks does the same)
    fastmlp bench --full --json out.json
    fastmlp bench --compare old.json --fail-on-regression
    fastmlp bench --list               # case ids, for --cases

How things are measured (the same code serves `pytest benchmarks/`):

* Every variant of a case (fastmlp / torch eager / torch.compile, and for training also
  fastmlp-step, FusedMLP.sgd_step's whole-step op, and fastmlp-steps, FusedMLP.train_steps running
  all of an epoch part's steps in one op) runs in this process on the same input tensors,
  with its own copy of the same initial weights.
* Variants are interleaved: each round runs one chunk (a few ms) of every variant, the order rotating
  from round to round. Every iteration is timed on its own, and a variant's figure is the median of
  all its iterations (so an iteration hit by a preemption on a busy machine is an outlier, not a
  shifted chunk); the mean, which keeps such stalls, is in the JSON too. Speed-ups are ratios of
  medians. Epochs: the variants take turns every eighth of an epoch, each variant's epoch time is
  the sum of its eight parts, and its figure the median over epochs.
* Warm-up (including torch.compile's compilation, forward and backward) happens before timing. A
  variant that fails to build or compile is reported "n/a" with its error instead of stopping the run.
* GFLOP/s count 2*M*K*N per GEMM actually run: forward 1 GEMM, backward 2 (dX, dW), forward+backward 3.
  Bias, ReLU, loss and optimizer work is not counted.
* Layer "bwd" times only the backward (torch.autograd.grad of the layer output w.r.t. input, weight
  and bias, no retain_graph: torch.compile's donated buffers forbid it), each iteration's forward
  being run untimed just before it.
* torch.compile uses the default mode, dynamic=False (one static graph per shape), and dynamo's
  caches are reset before each case.

The training-step variants are a registry of step-function factories (STEP_VARIANTS): another
step path is a few lines, see register_step_variant().
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import fnmatch
import gc
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

SCHEMA = "fastmlp-bench/1"

# ---- what is benchmarked -------------------------------------------------------------------------

# (batch, in_features, out_features)
LAYER_SHAPES = [
    (64, 784, 256),
    (64, 256, 10),
    (64, 784, 128),
    (64, 128, 64),
    (64, 64, 10),
    (1024, 784, 256),
    (8192, 784, 256),
]
PASSES = ("fwd", "bwd", "fwdbwd")
GEMMS_PER_PASS = {"fwd": 1, "bwd": 2, "fwdbwd": 3}

# The project's models (layer widths): fastmlp.models.SIZES, by width.
MODELS = {
    "784-128-64-10": (784, 128, 64, 10),
    "784-256-10": (784, 256, 10),
}

# Epoch benchmark: an MNIST-sized training set, already tensors.
EPOCH_SAMPLES = 60000
BATCH = 64
IN_FEATURES = 784
NUM_CLASSES = 10
SGD = {"lr": 0.01, "momentum": 0.9}

BASELINES = ("torch", "compile")  # speed-ups are fastmlp's, against each of these

# Targets from the issue: reported, never asserted. (case-id glob, minimum speed-up vs eager torch)
TARGETS = [
    ("layer/64x784x256/fwdbwd", 1.8),
    ("layer/64x*/fwdbwd", 1.5),
    ("layer/8192x*/fwdbwd", 1.3),
    ("epoch/784-128-64-10", 3.0),
    ("epoch/784-256-10", 2.4),
]

QUICK_CASES = [
    "layer/64x*/fwdbwd",
    "layer/8192x784x256/fwdbwd",
    "step/*",
    "epoch/*",
]


def layer_id(shape, pass_):
    m, k, n = shape
    return f"layer/{m}x{k}x{n}/{pass_}"


def all_case_ids():
    ids = [layer_id(s, p) for s in LAYER_SHAPES for p in PASSES]
    ids += [f"step/{name}" for name in MODELS]
    ids += [f"epoch/{name}" for name in MODELS]
    return ids


def target_for(case_id):
    for pattern, minimum in TARGETS:
        if fnmatch.fnmatchcase(case_id, pattern):
            return minimum
    return None


def select_cases(patterns, ids=None):
    """Case ids matching any pattern: a case id, a glob (layer/64x*/fwd*) or else a substring (784-256)."""
    ids = all_case_ids() if ids is None else ids
    if not patterns:
        return list(ids)
    out = []
    exact = set(ids)
    for cid in ids:
        for p in patterns:
            p = p.strip()
            if not p:
                continue
            if p in exact:  # a whole case id means that case only
                hit = cid == p
            elif any(c in p for c in "*?["):
                hit = fnmatch.fnmatchcase(cid, p)
            else:
                hit = p in cid
            if hit:
                out.append(cid)
                break
    return out


# ---- the machine ---------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class LoadMonitor:
    """Cores' worth of CPU used by everything but this process (other processes, and the hypervisor's
    steal time) between start() and stop(): all CPUs' busy time from /proc/stat minus this process's
    own CPU time. None where /proc/stat is unavailable.

    With torch's default of one thread per core, any such load makes timings swing wildly (OpenMP
    regions wait for a descheduled thread), so the runner records it for every case."""

    def __init__(self):
        self._s = None

    @staticmethod
    def _sample():
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        busy = (sum(vals[:8]) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")
        t = os.times()
        return time.perf_counter(), busy, t.user + t.system

    def start(self):
        try:
            self._s = self._sample()
        except (OSError, ValueError, IndexError, AttributeError):
            self._s = None
        return self

    def stop(self) -> float | None:
        if self._s is None:
            return None
        try:
            w1, b1, o1 = self._sample()
        except (OSError, ValueError, IndexError, AttributeError):
            return None
        w0, b0, o0 = self._s
        if w1 - w0 <= 0:
            return None
        return round(max(0.0, ((b1 - b0) - (o1 - o0)) / (w1 - w0)), 2)


def other_cpu_load(seconds: float = 0.3) -> float | None:
    """Cores' worth of CPU used by other processes over `seconds` (see LoadMonitor)."""
    mon = LoadMonitor().start()
    time.sleep(seconds)
    return mon.stop()


def machine_info() -> dict:
    import fastmlp

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = None
    info = {
        "cpu": cpu_model(),
        "cores": cores,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "fastmlp": getattr(fastmlp, "__version__", "?"),
        "backend": fastmlp.backend_info(),
        "loadavg": load,
        "other_cpu_load": other_cpu_load(),
    }
    return info


def measure_peak(n: int = 2048, seconds: float = 1.0) -> dict:
    """GFLOP/s of a large float32 torch.mm (n x n x n), single-thread and all threads: a ceiling for
    the GFLOP/s columns. Best of repeated runs (peak, not median)."""
    threads_before = torch.get_num_threads()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen)
    b = torch.randn(n, n, generator=gen)
    c = torch.empty(n, n)
    flops = 2.0 * n * n * n
    out = {"gemm": f"{n}x{n}x{n} float32 torch.mm", "flops": flops}
    try:
        for label, threads in (("single_thread", 1), ("all_threads", cores)):
            torch.set_num_threads(threads)
            torch.mm(a, b, out=c)  # warm-up
            best = math.inf
            t_end = time.perf_counter() + seconds
            reps = 0
            while reps < 3 or time.perf_counter() < t_end:
                t0 = time.perf_counter()
                torch.mm(a, b, out=c)
                best = min(best, time.perf_counter() - t0)
                reps += 1
            out[label] = {"threads": threads, "gflops": flops / best / 1e9, "best_ms": best * 1e3, "reps": reps}
    finally:
        torch.set_num_threads(threads_before)
    return out


# ---- timing core ---------------------------------------------------------------------------------

# A sampler runs `n` iterations of one variant and returns the seconds each took (each iteration is
# timed on its own: on a loaded machine a preemption then spoils one iteration, not a whole chunk).
Sampler = Callable[[int], list]

# "wall": time.perf_counter (the default, what a user waits). "cpu": time.process_time, this process's
# CPU time (all its threads): with --threads 1 it ignores the time the process spends descheduled,
# so it stays usable on a machine shared with other work (with more threads it also counts spinning
# and is no measure of elapsed time).
TIMERS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = time.perf_counter


def set_timer(name: str) -> None:
    global _clock
    _clock = TIMERS[name]


def summarize(rounds: list[list[float]]) -> dict:
    """Statistics of one variant's per-iteration times, pooled over its rounds; samples_s holds each
    round's median (what pytest-benchmark is given)."""
    pooled = sorted(t for r in rounds for t in r)
    q = statistics.quantiles(pooled, n=4) if len(pooled) >= 2 else [pooled[0]] * 3
    return {
        "median_s": statistics.median(pooled),
        "q1_s": q[0],
        "q3_s": q[2],
        "min_s": pooled[0],
        "mean_s": statistics.fmean(pooled),  # includes the stalls the median leaves out
        "rounds": len(rounds),
        "iterations": len(rounds[0]) if rounds else 0,
        "samples_s": [float(f"{statistics.median(r):.6g}") for r in rounds],
    }


@contextlib.contextmanager
def _no_gc():
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def calibrate(sampler: Sampler, target_s: float, max_n: int = 100000) -> int:
    """Iterations per chunk so that one chunk of `sampler` takes about target_s."""
    per_iter = min(sampler(1)[0] for _ in range(3))
    if per_iter <= 0:
        return max_n
    return int(max(1, min(max_n, round(target_s / per_iter))))


def interleave(samplers: dict[str, Sampler], n: int, rounds: int, warmup_rounds: int = 2,
               warmup_s: float = 0.0) -> dict[str, list[float]]:
    """Per-iteration seconds of each sampler, one chunk of `n` iterations per variant per round (a list
    per round),
    the order of variants rotating every round, after untimed warm-up rounds (at least
    `warmup_rounds`, and for at least `warmup_s` seconds: this machine's first ~0.1 s of work after
    a pause runs measurably slower)."""
    names = list(samplers)
    out = {name: [] for name in names}
    with _no_gc():
        r = 0
        t_end = time.perf_counter() + warmup_s
        while r < warmup_rounds or time.perf_counter() < t_end:
            for name in names:
                samplers[name](n)
            r += 1
        for r in range(rounds):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                out[name].append(samplers[name](n))
    return out


def _error_text(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    first = text.splitlines()[0] if text else type(e).__name__
    return first[:300]


def _configure_dynamo():
    with contextlib.suppress(Exception):
        import torch._dynamo

        cfg = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), 64))
        # Hitting the limit must fail loudly (reported n/a), never silently run eager code.
        if hasattr(cfg, "fail_on_recompile_limit_hit"):
            cfg.fail_on_recompile_limit_hit = True
    # Inductor's import logs a warning about CUDA on CPU-only machines: noise in a benchmark table.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def _reset_dynamo():
    with contextlib.suppress(Exception):
        import torch._dynamo

        torch._dynamo.reset()


def compile_module(fn):
    """torch.compile in the default mode with static shapes (see the module docstring)."""
    _configure_dynamo()
    return torch.compile(fn, dynamic=False)


# ---- layer cases ---------------------------------------------------------------------------------


def _layer_fastmlp(k, n):
    import fastmlp

    return fastmlp.FusedLinearReLU(k, n)


def _layer_torch(k, n):
    return nn.Sequential(nn.Linear(k, n), nn.ReLU())


def _layer_compile(k, n):
    return compile_module(_layer_torch(k, n))


# name -> factory(in_features, out_features) -> module computing relu(linear(x))
LAYER_VARIANTS: dict[str, Callable[[int, int], nn.Module]] = {
    "fastmlp": _layer_fastmlp,
    "torch": _layer_torch,
    "compile": _layer_compile,
}


def _layer_params(mod):
    mod = getattr(mod, "_orig_mod", mod)
    lin = mod if isinstance(mod, nn.Linear) else next(m for m in mod.modules() if isinstance(m, nn.Linear))
    return [lin.weight, lin.bias]


class LayerCase:
    """One shape, every variant built with the same weights and fed the same x and dY."""

    def __init__(self, shape, variants=None, seed=0):
        self.shape = tuple(shape)
        m, k, n = self.shape
        gen = torch.Generator().manual_seed(seed)
        ref = nn.Linear(k, n)
        with torch.no_grad():
            bound = 1.0 / math.sqrt(k)
            ref.weight.uniform_(-bound, bound, generator=gen)
            ref.bias.uniform_(-bound, bound, generator=gen)
        self.x = torch.randn(m, k, generator=gen).requires_grad_(True)
        self.gy = torch.randn(m, n, generator=gen)
        self.errors: dict[str, str] = {}
        self.modules: dict[str, nn.Module] = {}
        _reset_dynamo()
        for name in variants or LAYER_VARIANTS:
            try:
                mod = LAYER_VARIANTS[name](k, n)
                with torch.no_grad():
                    w, b = _layer_params(mod)
                    w.copy_(ref.weight)
                    b.copy_(ref.bias)
                self.modules[name] = mod
                # Warm-up, and compilation of forward and backward for torch.compile.
                for p in PASSES:
                    self.sampler(name, p)(2)
            except Exception as e:  # noqa: BLE001 - reported as n/a
                self.modules.pop(name, None)
                self.errors[name] = _error_text(e)
        self.max_rel_diff: dict[str, float] = {}
        self.max_abs_diff = self._check()

    def _check(self):
        """Largest |difference| from eager torch over the output and the three gradients, per variant:
        a guard against timing something that computes the wrong thing."""
        if "torch" not in self.modules:
            return {}

        def outputs(mod):
            y = mod(self.x)
            return [y.detach(), *torch.autograd.grad(y, [self.x, *_layer_params(mod)], self.gy)]

        ref = outputs(self.modules["torch"])
        out, rel = {}, {}
        for name, mod in self.modules.items():
            if name != "torch":
                diffs = [(float((a - b).abs().max()), float(b.abs().max())) for a, b in zip(outputs(mod), ref)]
                out[name] = max(d for d, _ in diffs)
                rel[name] = max(d / max(s, 1.0) for d, s in diffs)
        self.max_rel_diff = rel
        return out

    def flops(self, pass_):
        m, k, n = self.shape
        return GEMMS_PER_PASS[pass_] * 2.0 * m * k * n

    def sampler(self, name, pass_) -> Sampler:
        mod, x, gy = self.modules[name], self.x, self.gy
        inputs = [x, *_layer_params(mod)]
        grad = torch.autograd.grad
        clock = _clock

        # Each timed region includes freeing what the iteration made (outputs, graph), as in training.
        if pass_ == "fwd":  # the training forward: autograd on, what backward needs is saved

            def run(iters):
                ts = []
                for _ in range(iters):
                    t0 = clock()
                    mod(x)
                    ts.append(clock() - t0)
                return ts

        elif pass_ == "bwd":

            def run(iters):
                ts = []
                for _ in range(iters):
                    y = mod(x)
                    t0 = clock()
                    grad(y, inputs, gy)
                    ts.append(clock() - t0)
                return ts

        elif pass_ == "fwdbwd":

            def run(iters):
                ts = []
                for _ in range(iters):
                    t0 = clock()
                    grad(mod(x), inputs, gy)
                    ts.append(clock() - t0)
                return ts

        else:
            raise ValueError(f"unknown pass {pass_!r}")
        return run


# ---- training cases ------------------------------------------------------------------------------


def eager_step(model: nn.Module, sgd: dict | None = None):
    """step(x, y): the ordinary training step of `model` (cross-entropy, backward, torch.optim.SGD with
    `sgd`, default SGD), the baseline every step variant is measured against."""
    opt = torch.optim.SGD(model.parameters(), **(SGD if sgd is None else sgd))

    def step(x, y):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step


def _step_fastmlp(sizes, state):
    import fastmlp

    model = fastmlp.FusedMLP(sizes)
    model.load_state_dict(state)
    return eager_step(model)


def _step_torch(sizes, state):
    import fastmlp

    model = fastmlp.plain_mlp(sizes)
    model.load_state_dict(state)
    return eager_step(model)


def _step_compile(sizes, state):
    """torch.compile of model + loss (backward compiled by AOTAutograd); eager optimizer step."""
    import fastmlp

    model = fastmlp.plain_mlp(sizes)
    model.load_state_dict(state)
    opt = torch.optim.SGD(model.parameters(), **SGD)
    loss_fn = compile_module(lambda x, y: F.cross_entropy(model(x), y))

    def step(x, y):
        loss = loss_fn(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step


def _fused_with_sgd(sizes, state, method):
    """A FusedMLP starting from `state` and its torch.optim.SGD, for a variant that calls `method`."""
    import fastmlp

    model = fastmlp.FusedMLP(sizes)
    if not hasattr(model, method):
        raise RuntimeError(f"this fastmlp has no FusedMLP.{method}")
    model.load_state_dict(state)
    return model, torch.optim.SGD(model.parameters(), **SGD)


def _step_fastmlp_fused(sizes, state):
    """FusedMLP.sgd_step: forward, loss, backward and the SGD update in one fused op."""
    model, opt = _fused_with_sgd(sizes, state, "sgd_step")

    def step(x, y):
        return model.sgd_step(x, y, opt)

    return step


def _steps_fastmlp(sizes, state):
    """FusedMLP.train_steps: the fused step, and in the epoch benchmark many steps per op (one call
    per eighth of an epoch, see TrainCase.sampler)."""
    model, opt = _fused_with_sgd(sizes, state, "train_steps")

    def step(x, y):
        return model.train_steps(x, y, opt, len(y))[0]

    step.many = lambda x, y, batch: model.train_steps(x, y, opt, batch)
    return step


# name -> factory(sizes, state_dict) -> step(x, y): one whole training step (forward, loss,
# zero_grad(set_to_none=True), backward, SGD(lr=0.01, momentum=0.9).step()) on a model of those
# sizes starting from `state_dict` (keys as in fastmlp.plain_mlp / FusedMLP). A step may also have
# .many(x, y, batch): the steps over x's consecutive batches of `batch` rows in one call, which the
# epoch benchmark then uses for each run of consecutive batches. Variants named
# "fastmlp..." are fastmlp's own: each gets a speed-up against eager torch, and the targets are
# judged on the best of them.
STEP_VARIANTS: dict[str, Callable] = {
    "fastmlp": _step_fastmlp,  # FusedMLP modules, autograd, torch.optim.SGD
    "fastmlp-step": _step_fastmlp_fused,  # FusedMLP.sgd_step
    "fastmlp-steps": _steps_fastmlp,  # FusedMLP.train_steps (many steps per op)
    "torch": _step_torch,
    "compile": _step_compile,
}


def register_step_variant(name: str, factory: Callable) -> None:
    """Adds a training-step variant, e.g. a fused whole-step path:

        register_step_variant("fastmlp-mine", lambda sizes, state: my_step_function(sizes, state, **bench.SGD))

    It then appears in the step/epoch benchmarks (runner and pytest) next to the others."""
    STEP_VARIANTS[name] = factory


_DATA = {}


def training_data(samples=EPOCH_SAMPLES, seed=0):
    """A pre-made random training set: (samples, 784) float32 in [0, 1) and int64 labels."""
    key = (samples, seed)
    if key not in _DATA:
        _DATA.clear()
        gen = torch.Generator().manual_seed(seed)
        _DATA[key] = (
            torch.rand(samples, IN_FEATURES, generator=gen),
            torch.randint(0, NUM_CLASSES, (samples,), generator=gen),
        )
    return _DATA[key]


def _batches(samples, batch):
    return [(i, min(i + batch, samples)) for i in range(0, samples, batch)]


class TrainCase:
    """One model, every step variant starting from the same weights, on the same data."""

    def __init__(self, name, variants=None, seed=0):
        self.name = name
        self.sizes = tuple(MODELS[name])
        torch.manual_seed(seed)
        import fastmlp

        state = fastmlp.plain_mlp(self.sizes).state_dict()
        self.X, self.Y = training_data()
        self.epoch_batches = _batches(len(self.X), BATCH)  # 938 steps, the last one of 32
        self.errors: dict[str, str] = {}
        self.steps: dict[str, Callable] = {}
        _reset_dynamo()
        for vname in variants or STEP_VARIANTS:
            try:
                step = STEP_VARIANTS[vname](self.sizes, {k: v.clone() for k, v in state.items()})
                # Warm-up and compilation: a full batch and the epoch's last, partial one.
                for _ in range(3):
                    step(self.X[:BATCH], self.Y[:BATCH])
                lo, hi = self.epoch_batches[-1]
                for _ in range(2):
                    step(self.X[lo:hi], self.Y[lo:hi])
                self.steps[vname] = step
            except Exception as e:  # noqa: BLE001 - reported as n/a
                self.errors[vname] = _error_text(e)

    def _layer_flops(self, batch):
        # Per step: forward 1 GEMM per layer; backward dW per layer and dX for every layer but the
        # first (its input, the data, needs no gradient).
        total = 0.0
        for i, (k, n) in enumerate(zip(self.sizes[:-1], self.sizes[1:])):
            gemms = 2 if i == 0 else 3
            total += gemms * 2.0 * batch * k * n
        return total

    def flops(self, kind):
        if kind == "step":
            return self._layer_flops(BATCH)
        return sum(self._layer_flops(hi - lo) for lo, hi in self.epoch_batches)

    def sampler(self, vname, kind, epoch_steps=None, segments=1) -> Sampler:
        """kind "step": seconds per step. kind "epoch": the epoch (its first `epoch_steps` steps when
        given, None: all) cut into `segments` consecutive parts; each iteration runs the next part and
        returns its seconds (so `segments` iterations make one epoch; the sampler's .scale turns the
        timed steps' total into a whole epoch's)."""
        step, X, Y = self.steps[vname], self.X, self.Y
        clock = _clock
        if kind == "step":
            # Consecutive batches of the training set, cycling over the first 64 of them.
            batches = [(X[lo:hi], Y[lo:hi]) for lo, hi in self.epoch_batches[:64]]
            pos = [0]

            def run(iters):
                i = pos[0]
                ts = []
                for _ in range(iters):
                    xb, yb = batches[i]
                    t0 = clock()
                    step(xb, yb)
                    ts.append(clock() - t0)
                    i = (i + 1) % len(batches)
                pos[0] = i
                return ts

            return run
        if kind == "epoch":
            batches = self.epoch_batches[:epoch_steps]
            nseg = max(1, min(segments, len(batches)))
            bounds = [round(i * len(batches) / nseg) for i in range(nseg + 1)]
            parts = [batches[bounds[i] : bounds[i + 1]] for i in range(nseg)]
            pos = [0]

            many = getattr(step, "many", None)

            def run(iters):
                ts = []
                for _ in range(iters):
                    part = parts[pos[0]]
                    t0 = clock()
                    if many is not None:  # the part's batches are consecutive rows
                        lo, hi = part[0][0], part[-1][1]
                        many(X[lo:hi], Y[lo:hi], BATCH)
                    else:
                        for lo, hi in part:
                            step(X[lo:hi], Y[lo:hi])
                    ts.append(clock() - t0)
                    pos[0] = (pos[0] + 1) % nseg
                return ts

            run.segments = nseg
            run.scale = len(self.epoch_batches) / len(batches)
            return run
        raise ValueError(f"unknown training benchmark {kind!r}")


# ---- running cases -------------------------------------------------------------------------------


@dataclass
class Settings:
    rounds: int = 30  # timed interleaved rounds per case
    chunk_s: float = 0.002  # target time of one chunk (one variant, one round)
    epoch_rounds: int = 5  # timed rounds (epochs per variant) of the epoch benchmark
    epoch_segments: int = 8  # variants take turns every 1/8 epoch, so slow drifts of the machine hit all alike
    epoch_steps: int | None = None  # None: whole epochs (938 steps); else extrapolated from this many
    epoch_budget_s: float | None = None  # whole epochs unless they would take longer than this (then extrapolated)
    variants: list[str] | None = None  # None: all
    warmup_rounds: int = 2
    warmup_s: float = 0.3  # and at least this long (layer and step cases)
    timer: str = "wall"  # see TIMERS


@dataclass
class Runner:
    """Builds cases lazily (one compile per layer shape serves all three passes, one per model serves
    step and epoch) and measures them."""

    settings: Settings = field(default_factory=Settings)
    _layer: tuple | None = None
    _train: tuple | None = None

    def layer_case(self, shape) -> LayerCase:
        if self._layer is None or self._layer[0] != tuple(shape):
            self._layer = None
            gc.collect()
            variants = _filter_variants(LAYER_VARIANTS, self.settings.variants)
            self._layer = (tuple(shape), LayerCase(shape, variants))
        return self._layer[1]

    def train_case(self, name) -> TrainCase:
        if self._train is None or self._train[0] != name:
            self._train = None
            gc.collect()
            variants = _filter_variants(STEP_VARIANTS, self.settings.variants)
            self._train = (name, TrainCase(name, variants))
        return self._train[1]

    def release(self):
        self._layer = self._train = None
        _reset_dynamo()
        gc.collect()

    def run(self, case_id: str) -> dict:
        kind, _, rest = case_id.partition("/")
        s = self.settings
        set_timer(s.timer)
        if kind == "layer":
            dims, pass_ = rest.split("/")
            shape = tuple(int(v) for v in dims.split("x"))
            case = self.layer_case(shape)
            samplers = {name: case.sampler(name, pass_) for name in case.modules}
            errors, flops = case.errors, case.flops(pass_)
            info = {"shape": {"batch": shape[0], "in": shape[1], "out": shape[2]}, "pass": pass_,
                    "max_abs_diff_vs_torch": case.max_abs_diff,
                    "max_rel_diff_vs_torch": case.max_rel_diff}
            rounds, chunk = s.rounds, s.chunk_s
        elif kind in ("step", "epoch"):
            case = self.train_case(rest)
            total = len(case.epoch_batches)
            steps = None
            if kind == "epoch":
                steps = s.epoch_steps and min(s.epoch_steps, total)
                if steps is None and s.epoch_budget_s and case.steps:
                    # Whole epochs would take (rounds + 1 warm-up) x (sum of the variants' epochs).
                    per_round = sum(statistics.median(case.sampler(v, "step")(20)) for v in case.steps) * total
                    need = per_round * (s.epoch_rounds + 1)
                    if need > s.epoch_budget_s:
                        steps = max(30, int(total * s.epoch_budget_s / need))
                steps = None if steps is None or steps >= total else steps
            samplers = {name: case.sampler(name, kind, steps, s.epoch_segments) for name in case.steps}
            errors, flops = case.errors, case.flops(kind)
            info = {"model": rest, "sizes": list(case.sizes), "batch": BATCH, "optimizer": dict(SGD, name="SGD")}
            if kind == "epoch":
                info["epoch_steps"] = total
                info["timed_steps"] = total if steps is None else steps
                info["extrapolated"] = steps is not None
            if kind == "epoch" and samplers:
                # One epoch of warm-up, then epoch_rounds epochs per variant, taking turns by segment.
                first = next(iter(samplers.values()))
                nseg = first.segments
                info["segments"] = nseg
                return measure(case_id, kind, samplers, errors, flops, s.epoch_rounds * nseg, None, (nseg, 0.0),
                               info, group=nseg, scale=first.scale)
            rounds, chunk = s.rounds, s.chunk_s
        else:
            raise ValueError(f"unknown case {case_id!r}")
        return measure(case_id, kind, samplers, errors, flops, rounds, chunk, (s.warmup_rounds, s.warmup_s), info)


def _filter_variants(registry, wanted):
    if not wanted:
        return list(registry)
    return [v for v in registry if v in wanted]


def measure(case_id, kind, samplers, errors, flops, rounds, chunk_s, warmup, info, group=1, scale=1.0) -> dict:
    """Interleaves the samplers and returns the case's result record (see SCHEMA). chunk_s None: one
    iteration per variant per round. group > 1: every `group` consecutive rounds of a variant make one
    sample, the sum of their times x `scale` (the segments of an epoch)."""
    result = {"id": case_id, "kind": kind, **info, "flops": flops, "variants": {}, "speedup": {}}
    samples = {}
    iterations = 1
    if samplers:
        if chunk_s is not None:
            ref = samplers.get("torch") or next(iter(samplers.values()))
            iterations = calibrate(ref, chunk_s)
        mon = LoadMonitor().start()
        samples = interleave(samplers, iterations, rounds, *warmup)
        result["other_load"] = mon.stop()
        if group > 1:
            samples = {
                name: [[sum(r[0] for r in ts[i : i + group]) * scale] for i in range(0, len(ts) - group + 1, group)]
                for name, ts in samples.items()
            }
    for name, ts in samples.items():
        st = summarize(ts)
        result["variants"][name] = {
            "status": "ok",
            **st,
            "median_us": st["median_s"] * 1e6,
            "gflops": flops / st["median_s"] / 1e9,
        }
    for name, err in errors.items():
        result["variants"][name] = {"status": "n/a", "error": err}
    fm = result["variants"].get("fastmlp", {})
    for base in BASELINES:
        bv = result["variants"].get(base, {})
        if fm.get("status") == "ok" and bv.get("status") == "ok":
            result["speedup"][base] = bv["median_s"] / fm["median_s"]
        else:
            result["speedup"][base] = None
    # Every other variant against eager torch too (e.g. a registered fused whole-step path).
    tv = result["variants"].get("torch", {})
    result["speedup_vs_torch"] = {
        name: tv["median_s"] / d["median_s"]
        for name, d in result["variants"].items()
        if name != "torch" and d["status"] == "ok" and tv.get("status") == "ok"
    }
    tgt = target_for(case_id)
    if tgt is not None:
        ours = {v: x for v, x in result["speedup_vs_torch"].items() if is_fastmlp(v)}
        best = max(ours, key=ours.get) if ours else None
        result["target"] = {"vs": "torch", "min": tgt, "met": None if best is None else bool(ours[best] >= tgt),
                            "variant": best, "speedup": None if best is None else ours[best]}
    return result


def is_fastmlp(variant: str) -> bool:
    return variant == "fastmlp" or variant.startswith("fastmlp-")


# ---- output --------------------------------------------------------------------------------------


def fmt_time(seconds):
    if seconds is None:
        return "n/a"
    if seconds >= 1.0:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} µs"


def _fmt_x(v):
    return "n/a" if v is None else f"{v:.2f}x"


def _variant_names(results):
    names = []
    for r in results:
        for v in r["variants"]:
            if v not in names:
                names.append(v)
    order = {"fastmlp": 0, "torch": 2, "compile": 3}
    return sorted(names, key=lambda v: (order.get(v, 1 if is_fastmlp(v) else 4), names.index(v)))


def _markdown(headers, rows):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)


def _target_cell(r):
    t = r.get("target")
    if not t:
        return ""
    mark = "?" if t["met"] is None else ("met" if t["met"] else "MISSED")
    by = f" by {t['variant']}" if t.get("variant") not in (None, "fastmlp") else ""
    return f">={t['min']:.1f}x {mark}{by}"


def format_tables(results, peak=None, threads=None) -> str:
    """Markdown tables: layers, then training. The % peak column uses the peak at `threads` (default:
    torch's current number of threads)."""
    parts = []
    layer = [r for r in results if r["kind"] == "layer"]
    train = [r for r in results if r["kind"] != "layer"]
    peak_gf = None
    if peak and "all_threads" in peak:
        th = threads or torch.get_num_threads()
        peak_gf = peak["single_thread"]["gflops"] if th == 1 else peak["all_threads"]["gflops"]
    for title, rows_in, label in (("Layers: FusedLinearReLU vs nn.Linear+nn.ReLU", layer, "case"),
                                  ("Training (batch 64, SGD momentum 0.9)", train, "case")):
        if not rows_in:
            continue
        names = _variant_names(rows_in)
        headers = [label]
        headers += [f"{v} median" for v in names]
        headers += [f"{v} GFLOP/s" for v in names]
        if peak_gf:
            headers.append("fastmlp % peak")
        headers += [f"fastmlp x vs {b}" for b in BASELINES]
        extra = [v for v in names if v not in ("fastmlp", *BASELINES)]
        headers += [f"{v} x vs torch" for v in extra]
        headers.append("target (vs torch)")
        rows = []
        for r in rows_in:
            row = [r["id"] + (f" (extrapolated from {r['timed_steps']} steps)" if r.get("extrapolated") else "")]
            vs = r["variants"]
            row += [fmt_time(vs[v]["median_s"]) if vs.get(v, {}).get("status") == "ok" else "n/a" for v in names]
            row += [f"{vs[v]['gflops']:.1f}" if vs.get(v, {}).get("status") == "ok" else "n/a" for v in names]
            if peak_gf:
                fm = vs.get("fastmlp", {})
                row.append(f"{100 * fm['gflops'] / peak_gf:.0f}%" if fm.get("status") == "ok" else "n/a")
            row += [_fmt_x(r["speedup"].get(b)) for b in BASELINES]
            row += [_fmt_x(r.get("speedup_vs_torch", {}).get(v)) for v in extra]
            row.append(_target_cell(r))
            rows.append(row)
        parts.append(f"### {title}\n\n" + _markdown(headers, rows))
        errs = [(r["id"], v, d["error"]) for r in rows_in for v, d in r["variants"].items() if d.get("status") != "ok"]
        if errs:
            parts.append("\n".join(f"n/a: {cid} {v}: {e}" for cid, v, e in errs))
    return "\n\n".join(parts)


def format_notes(results, elapsed=None, machine=None) -> str:
    lines = []
    if elapsed is not None:
        lines.append(f"{len(results)} cases in {elapsed:.0f} s.")
    lines.append("Medians of per-iteration times over interleaved rounds; speed-up = baseline median / fastmlp "
                 "median; targets are reported, not asserted.")
    ext = [r for r in results if r.get("extrapolated")]
    if ext:
        lines.append("Extrapolated epochs: " + ", ".join(f"{r['id']} timed {r['timed_steps']} of {r['epoch_steps']} steps"
                                                        for r in ext) + ".")
    # Relative to each tensor's largest value: at large batch a pre-activation within rounding of 0
    # may take the other side of the ReLU in one of the two, which moves a weight-gradient sum by one
    # term (a few units in a sum of thousands): a few percent, not a wrong kernel.
    wrong = [(r["id"], v, d) for r in results for v, d in (r.get("max_rel_diff_vs_torch") or {}).items() if d > 5e-2]
    for cid, v, d in wrong:
        lines.append(f"WARNING: {cid}: {v} differs from eager torch by up to {d:.3g} of the largest value "
                     "(output or gradients)")
    loads = [(r["other_load"], r["id"]) for r in results if r.get("other_load") is not None]
    if loads:
        mean = sum(v for v, _ in loads) / len(loads)
        worst = max(loads)
        lines.append(f"Other processes used {mean:.2f} cores on average while timing (most: {worst[0]:.2f} in {worst[1]}).")
        threads = (machine or {}).get("threads") or torch.get_num_threads()
        cores = (machine or {}).get("cores") or os.cpu_count() or threads
        spare = max(0, cores - threads)  # cores torch leaves idle
        if worst[0] > spare + 0.2:
            lines.append(f"WARNING: the machine was not idle ({threads} torch threads on {cores} cores, other load up "
                         f"to {worst[0]:.2f} cores); these timings are unreliable: a descheduled thread stalls every "
                         "parallel region. Rerun on a quiet machine (or with fewer --threads).")
        elif mean > 0.2:
            lines.append(f"Note: other processes ran on the {spare} core(s) torch left idle; expect some noise.")
    return "\n".join(lines)


def format_machine(machine, peak=None) -> str:
    be = machine.get("backend", {})
    lines = [
        f"CPU: {machine['cpu']} ({machine['cores']} cores available, torch threads {machine['threads']})",
        f"torch {machine['torch']}, Python {machine['python']}, {machine['platform']}",
        f"fastmlp {machine['fastmlp']}: cpu backend {be.get('cpu')}, ISA {be.get('cpu_isa', 'n/a')}"
        + (f" ({be['fallback_reason']})" if be.get("fallback_reason") else ""),
    ]
    if machine.get("loadavg") is not None:
        busy = machine.get("other_cpu_load")
        lines.append(f"load average at start: {' '.join(str(v) for v in machine['loadavg'])}"
                     + ("" if busy is None else f"; other processes were using {busy:.2f} cores"))
    if peak:
        lines.append(
            f"peak ({peak['gemm']}): single thread {peak['single_thread']['gflops']:.1f} GFLOP/s, "
            f"{peak['all_threads']['threads']} threads {peak['all_threads']['gflops']:.1f} GFLOP/s"
        )
    return "\n".join(lines)


# ---- comparing with an earlier run ---------------------------------------------------------------


def compare(old: dict, new: dict, threshold: float = 0.10, criteria: str = "both") -> tuple[list[dict], str]:
    """Cases whose fastmlp median grew by more than `threshold` or whose speed-up against a baseline
    dropped by more than `threshold` (relative). criteria "ratio" or "median" checks only that one
    (on a shared machine absolute medians drift between runs far more than same-run ratios do).
    Returns (regressions, printable report)."""
    check_median = criteria in ("both", "median")
    check_ratio = criteria in ("both", "ratio")
    old_by_id = {r["id"]: r for r in old.get("results", [])}
    rows, regressions = [], []
    for r in new.get("results", []):
        o = old_by_id.get(r["id"])
        if o is None:
            continue
        flags = []
        fm_new = r["variants"].get("fastmlp", {})
        fm_old = o["variants"].get("fastmlp", {})
        t_change = None
        for v in [v for v in r["variants"] if is_fastmlp(v)]:
            vn, vo = r["variants"][v], o["variants"].get(v, {})
            if vn.get("status") == "ok" and vo.get("status") == "ok":
                change = vn["median_s"] / vo["median_s"] - 1
                if v == "fastmlp":
                    t_change = change
                if check_median and change > threshold:
                    flags.append(f"{v} median +{100 * change:.0f}%")
            if v != "fastmlp":  # its speed-up against eager torch
                sn, so = r.get("speedup_vs_torch", {}).get(v), o.get("speedup_vs_torch", {}).get(v)
                if check_ratio and sn is not None and so and sn / so < 1 - threshold:
                    flags.append(f"{v} x vs torch {so:.2f}->{sn:.2f}")
        for base in BASELINES:
            sn, so = r["speedup"].get(base), o.get("speedup", {}).get(base)
            if check_ratio and sn is not None and so is not None and so > 0 and sn / so < 1 - threshold:
                flags.append(f"x vs {base} {so:.2f}->{sn:.2f}")
        row = [
            r["id"],
            fmt_time(fm_old.get("median_s")) if fm_old.get("status") == "ok" else "n/a",
            fmt_time(fm_new.get("median_s")) if fm_new.get("status") == "ok" else "n/a",
            "n/a" if t_change is None else f"{100 * t_change:+.0f}%",
        ]
        for base in BASELINES:
            so, sn = o.get("speedup", {}).get(base), r["speedup"].get(base)
            row.append(f"{_fmt_x(so)} -> {_fmt_x(sn)}")
        row.append("REGRESSION: " + "; ".join(flags) if flags else "ok")
        rows.append(row)
        if flags:
            regressions.append({"id": r["id"], "flags": flags})
    headers = ["case", "fastmlp before", "fastmlp now", "change"] + [f"x vs {b}" for b in BASELINES] + ["verdict"]
    what = {"both": "median or speed-up", "ratio": "speed-up", "median": "median"}[criteria]
    report = [f"### Compared with {old.get('created', 'an earlier run')} (flagged: {what} worse by more than "
              f"{100 * threshold:.0f}%)", ""]
    if rows:
        report.append(_markdown(headers, rows))
    else:
        report.append("(no case in common)")
    om, nm = old.get("machine", {}), new.get("machine", {})
    diffs = [k for k in ("cpu", "cores", "threads", "torch") if om.get(k) != nm.get(k)]
    if diffs:
        report.append("\nwarning: the runs differ in " + ", ".join(f"{k} ({om.get(k)} vs {nm.get(k)})" for k in diffs))
    report.append(f"\n{len(regressions)} regression(s)")
    return regressions, "\n".join(report)


# ---- command line --------------------------------------------------------------------------------


def _parser(prog):
    p = argparse.ArgumentParser(
        prog=prog,
        description="Benchmark fastmlp's fused kernels against eager PyTorch and torch.compile "
        "(same process, same inputs, interleaved rounds, medians).",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the quick subset (default): " + ", ".join(QUICK_CASES))
    mode.add_argument("--full", action="store_true", help="every case (layer fwd/bwd/fwdbwd at every shape, step, epoch)")
    p.add_argument("--cases", action="append", metavar="PATTERNS",
                   help="comma-separated case-id globs or substrings (see --list); overrides --quick/--full")
    p.add_argument("--list", action="store_true", help="print the case ids and exit")
    p.add_argument("--show", metavar="JSON", help="print the tables of a saved run (--json output) and exit; "
                   "with --compare, compare it instead of a new run")
    p.add_argument("--json", metavar="PATH", help="write the results to PATH")
    p.add_argument("--compare", metavar="OLD_JSON", help="compare with an earlier --json output and flag regressions")
    p.add_argument("--threshold", type=float, default=0.10, help="relative change flagged by --compare (default 0.10)")
    p.add_argument("--criteria", choices=("both", "ratio", "median"), default="both",
                   help="what --compare flags: a speed-up ratio that dropped, a fastmlp median that grew, or "
                   "both (default)")
    p.add_argument("--fail-on-regression", action="store_true", help="exit with status 1 when --compare flags a case")
    p.add_argument("--threads", type=int, help="torch.set_num_threads(N) (default: torch's default)")
    p.add_argument("--timer", choices=sorted(TIMERS), default="wall",
                   help="wall: elapsed time (default); cpu: this process's CPU time, with --threads 1 a steadier "
                   "measure on a machine shared with other work")
    p.add_argument("--repeat", type=int, help="timed interleaved rounds per case (default 30 quick, 60 full; "
                   "epoch cases use a sixth of it, at least 3)")
    p.add_argument("--chunk-ms", type=float, default=2.0, help="target duration of one timed chunk (default 2 ms)")
    p.add_argument("--epoch-steps", type=int, help="time this many steps per epoch and extrapolate to 938")
    p.add_argument("--epoch-budget", type=float, help="seconds an epoch case may take before it is extrapolated from "
                   "fewer steps (default 45 quick, 150 full; 0: never)")
    p.add_argument("--variants", help="comma-separated subset of variants (fastmlp,torch,compile)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    p.add_argument("--no-peak", action="store_true", help="skip the peak GEMM measurement")
    return p


def main(argv=None, prog="fastmlp bench") -> int:
    args = _parser(prog).parse_args(argv)
    if args.list:
        quick = set(select_cases(QUICK_CASES))
        for cid in all_case_ids():
            print(cid + ("   [quick]" if cid in quick else ""))
        return 0
    if args.show:
        with open(args.show) as f:
            doc = json.load(f)
        print(show(doc))
        if args.compare:
            with open(args.compare) as f:
                regressions, report = compare(json.load(f), doc, args.threshold, args.criteria)
            print()
            print(report)
            return 1 if regressions and args.fail_on_regression else 0
        return 0
    threads_before = torch.get_num_threads()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        return _run(args, argv, prog)
    finally:
        torch.set_num_threads(threads_before)
        set_timer("wall")


def _run(args, argv, prog) -> int:
    _configure_dynamo()

    if args.cases:
        patterns = [p for group in args.cases for p in group.split(",")]
        mode = "cases"
    elif args.full:
        patterns, mode = None, "full"
    else:
        patterns, mode = QUICK_CASES, "quick"
    case_ids = select_cases(patterns)
    if not case_ids:
        print(f"no case matches {patterns}; see --list", file=sys.stderr)
        return 2

    variants = None
    if args.variants:
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.no_compile:
        variants = [v for v in (variants or list(dict.fromkeys([*LAYER_VARIANTS, *STEP_VARIANTS]))) if v != "compile"]
    rounds = args.repeat or (60 if mode == "full" else 30)
    settings = Settings(
        rounds=rounds,
        chunk_s=args.chunk_ms / 1e3,
        epoch_rounds=max(min(3, rounds), rounds // 6),
        epoch_steps=args.epoch_steps,
        epoch_budget_s=args.epoch_budget if args.epoch_budget is not None else (150.0 if mode == "full" else 45.0),
        variants=variants,
        timer=args.timer,
    )
    if args.timer == "cpu" and torch.get_num_threads() != 1:
        print("warning: --timer cpu sums the CPU time of all threads; use it with --threads 1", file=sys.stderr)

    old = None
    if args.compare:
        with open(args.compare) as f:
            old = json.load(f)

    t_start = time.perf_counter()
    machine = machine_info()
    print(f"fastmlp bench ({mode}: {len(case_ids)} cases, {settings.rounds} interleaved rounds per case, "
          f"epoch {settings.epoch_rounds} rounds, {settings.timer} timer)", flush=True)
    peak = None if args.no_peak else measure_peak()
    print(format_machine(machine, peak), flush=True)
    if (machine.get("other_cpu_load") or 0) > 0.2:
        print("warning: other processes are using the CPU; timings will be noisy (fewer --threads helps)", flush=True)

    runner = Runner(settings)
    results = []
    for cid in case_ids:
        t0 = time.perf_counter()
        try:
            r = runner.run(cid)
        except Exception as e:  # noqa: BLE001 - one broken case must not lose the others
            print(f"  {cid}: FAILED {_error_text(e)}", flush=True)
            results.append({"id": cid, "kind": cid.split("/")[0], "variants": {}, "speedup": {},
                            "error": _error_text(e)})
            continue
        results.append(r)
        cells = []
        for v, d in r["variants"].items():
            cells.append(f"{v} {fmt_time(d['median_s'])}" if d["status"] == "ok" else f"{v} n/a")
        sp = ", ".join(f"x{r['speedup'][b]:.2f} vs {b}" for b in BASELINES if r["speedup"].get(b))
        print(f"  {cid}: {'; '.join(cells)}  {sp}  ({time.perf_counter() - t0:.1f} s)", flush=True)
    runner.release()

    good = [r for r in results if "error" not in r]
    print()
    print(format_tables(good, peak))
    elapsed = time.perf_counter() - t_start
    print()
    print(format_notes(good, elapsed, machine))

    doc = {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([prog, *(argv if argv is not None else sys.argv[1:])]),
        "mode": mode,
        "machine": machine,
        "peak": peak,
        "settings": {
            "rounds": settings.rounds,
            "epoch_rounds": settings.epoch_rounds,
            "chunk_s": settings.chunk_s,
            "epoch_steps": settings.epoch_steps,
            "epoch_budget_s": settings.epoch_budget_s,
            "variants": settings.variants,
            "timer": settings.timer,
            "threads": torch.get_num_threads(),
            "elapsed_s": elapsed,
        },
        "results": results,
    }
    if args.json:
        write_json(args.json, doc)
        print(f"results written to {args.json}")

    status = 1 if any("error" in r for r in results) else 0
    if old is not None:
        regressions, report = compare(old, doc, args.threshold, args.criteria)
        print()
        print(report)
        if regressions and args.fail_on_regression:
            status = 1
    return status


def show(doc) -> str:
    """The printed report of a saved run."""
    good = [r for r in doc.get("results", []) if "error" not in r]
    parts = [f"command: {doc.get('command')}  ({doc.get('created')})",
             format_machine(doc["machine"], doc.get("peak")), "",
             format_tables(good, doc.get("peak"), doc["machine"].get("threads")), "",
             format_notes(good, doc.get("settings", {}).get("elapsed_s"), doc["machine"])]
    parts += [f"FAILED {r['id']}: {r['error']}" for r in doc.get("results", []) if "error" in r]
    return "\n".join(parts)


def write_json(path, doc):
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    sys.exit(main())
