"""Training cases: whole steps and epochs of the two course MLPs.

step/MODEL and epoch/MODEL run every step variant (STEP_VARIANTS) on a pre-made random MNIST-sized
set, SGD(lr=0.01, momentum=0.9), batch 64. trainer/DATASET runs whole epochs of the Trainer that
`fastmlp train` runs (its default recipe: shuffled batches, cosine schedule, weight decay), fused
against --backend torch, on the real dataset when it is found (else a random stand-in, marked so).

Every variant is checked (verify.check_training) against the eager PyTorch step before it is timed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .cases import BATCH, EPOCH_SAMPLES, IN_FEATURES, MODELS, NUM_CLASSES, SGD
from .timing import Clock, Sampler
from .variants import Variant, compile_fn, error_text, reset_dynamo
from .verify import LOSS_TOL, LOSS_TOL_BF16, UPDATE_TOL, UPDATE_TOL_BF16, check_epoch, check_training


@dataclass
class Stepper:
    """One variant's training loop on its own model and optimizer."""

    model: nn.Module  # holds the parameters the steps update
    step: Callable  # step(x, y) -> loss: one whole training step on one batch
    many: Callable | None = None  # many(x, y, batch) -> losses: the steps over x's consecutive batches, one call


def eager_step(model: nn.Module, sgd: dict | None = None):
    """step(x, y): the ordinary training step of `model` (cross-entropy, backward, torch.optim.SGD with
    `sgd`, default SGD), the baseline every step variant is measured against."""
    opt = torch.optim.SGD(model.parameters(), **(SGD if sgd is None else sgd))

    def step(x, y):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def _model(kind, sizes, state):
    import fastmlp

    model = fastmlp.FusedMLP(sizes) if kind == "fused" else fastmlp.plain_mlp(sizes)
    model.load_state_dict(state)
    return model


def _torch(sizes, state):
    model = _model("plain", sizes, state)
    return Stepper(model, eager_step(model))


def _compile(sizes, state):
    """The whole step under torch.compile: forward, loss, backward and the optimizer step in one
    compiled function (dynamo compiles the forward and loss with their backward through AOTAutograd,
    and the optimizer step as its own graph), as PyTorch's compiled-optimizer recipe does."""
    model = _model("plain", sizes, state)
    return Stepper(model, compile_fn(eager_step(model)))


def _fastmlp(sizes, state):
    model = _model("fused", sizes, state)
    return Stepper(model, eager_step(model))


def _fused_with_sgd(sizes, state):
    model = _model("fused", sizes, state)
    return model, torch.optim.SGD(model.parameters(), **SGD)


def _fastmlp_step(sizes, state):
    model, opt = _fused_with_sgd(sizes, state)
    return Stepper(model, lambda x, y: model.sgd_step(x, y, opt))


def _fastmlp_steps(sizes, state):
    model, opt = _fused_with_sgd(sizes, state)
    return Stepper(model, lambda x, y: model.train_steps(x, y, opt, len(y))[0],
                   many=lambda x, y, batch: model.train_steps(x, y, opt, batch))


# name -> Variant whose build(sizes, state_dict) returns a Stepper: one whole training step
# (forward, loss, zero_grad(set_to_none=True), backward, SGD(lr=0.01, momentum=0.9).step()) on a
# model of those sizes starting from `state_dict` (keys as in fastmlp.plain_mlp / FusedMLP).
STEP_VARIANTS: dict[str, Variant] = {
    "fastmlp": Variant(_fastmlp, ours=True, about="FusedMLP modules, autograd, torch.optim.SGD"),
    "fastmlp-step": Variant(_fastmlp_step, ours=True, about="FusedMLP.sgd_step: the whole step as one op"),
    "fastmlp-steps": Variant(_fastmlp_steps, ours=True,
                             about="FusedMLP.train_steps: an eighth of the epoch per op in the epoch case"),
    "torch": Variant(_torch, ours=False, about="nn.Linear/nn.ReLU, autograd, torch.optim.SGD, eager"),
    "compile": Variant(_compile, ours=False, about="the same whole step under torch.compile"),
}


def register_step_variant(name: str, build: Callable, ours: bool = True, about: str = "") -> None:
    """Adds a training-step variant, e.g. another fused whole-step path:

        register_step_variant("fastmlp-mine", lambda sizes, state: Stepper(model, step))

    It then appears in the step/epoch benchmarks (runner and pytest) next to the others, checked
    against eager PyTorch like them."""
    STEP_VARIANTS[name] = Variant(build, ours=ours, about=about)


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


# The check: twice over the first CHECK_STEPS batches and a short one of half a batch (like an
# epoch's last), once step by step, then as the epoch case times the variant (many steps per call
# where it can).
CHECK_STEPS = 20


def _run_check_steps(stepper: Stepper, X, Y):
    rows = CHECK_STEPS * BATCH + BATCH // 2
    batches = _batches(rows, BATCH)
    losses = [stepper.step(X[lo:hi], Y[lo:hi]) for lo, hi in batches]
    if stepper.many is not None:
        losses += list(stepper.many(X[:rows], Y[:rows], BATCH))
    else:
        losses += [stepper.step(X[lo:hi], Y[lo:hi]) for lo, hi in batches]
    return [float(v) for v in losses], {k: v.detach().clone() for k, v in stepper.model.state_dict().items()}


@dataclass
class EpochPlan:
    parts: list  # consecutive runs of (lo, hi) batches; each sampler iteration runs the next one
    scale: float  # timed steps' total -> a whole epoch's


class TrainCase:
    """One model, every step variant starting from the same weights, on the same data; each checked
    against eager torch before timing (a variant that fails goes to .wrong, not .steppers)."""

    def __init__(self, name, variants=None, seed=0, registry=None):
        registry = STEP_VARIANTS if registry is None else registry
        self.name = name
        self.sizes = tuple(MODELS[name])
        torch.manual_seed(seed)
        import fastmlp

        start = fastmlp.plain_mlp(self.sizes).state_dict()
        self.X, self.Y = training_data()
        self.epoch_batches = _batches(len(self.X), BATCH)  # 938 steps, the last one of 32
        self.ours = {v for v in (variants or registry) if registry[v].ours}
        self.errors: dict[str, str] = {}
        self.wrong: dict[str, str] = {}
        self.steppers: dict[str, Stepper] = {}
        reset_dynamo()
        names = list(variants or registry)
        runs = {}
        # The reference runs first, and also when it is not among the variants timed.
        for vname in ["torch"] + [v for v in names if v != "torch"]:
            try:
                variant = registry.get(vname) or STEP_VARIANTS[vname]
                stepper = variant.build(self.sizes, {k: v.clone() for k, v in start.items()})
                runs[vname] = _run_check_steps(stepper, self.X, self.Y)  # also the warm-up (and compilation)
                if vname in names:
                    self.steppers[vname] = stepper
            except Exception as e:  # noqa: BLE001 - reported as n/a
                self.errors[vname] = error_text(e)
        ref = runs.get("torch")
        for vname in list(self.steppers):
            problems = ["not checked: the torch reference failed"] if ref is None else \
                check_training(start, ref[0], ref[1], *runs[vname])
            if problems:
                self.wrong[vname] = "; ".join(problems)
                del self.steppers[vname]
        if "torch" not in names:
            self.errors.pop("torch", None)

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

    def epoch_plan(self, epoch_steps=None, segments=1) -> EpochPlan:
        """The epoch (its first `epoch_steps` steps when given, None: all) cut into `segments`
        consecutive parts."""
        batches = self.epoch_batches[:epoch_steps]
        nseg = max(1, min(segments, len(batches)))
        bounds = [round(i * len(batches) / nseg) for i in range(nseg + 1)]
        parts = [batches[bounds[i] : bounds[i + 1]] for i in range(nseg)]
        return EpochPlan(parts, len(self.epoch_batches) / len(batches))

    def step_sampler(self, vname, clock: Clock) -> Sampler:
        """Seconds per step, over consecutive batches of the training set, cycling over the first 64."""
        step, X, Y = self.steppers[vname].step, self.X, self.Y
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

    def epoch_sampler(self, vname, plan: EpochPlan, clock: Clock) -> Sampler:
        """Each iteration runs the plan's next part and returns its seconds (len(plan.parts)
        iterations make one epoch). A variant with many() gets each part as one call."""
        stepper, X, Y = self.steppers[vname], self.X, self.Y
        parts, pos = plan.parts, [0]

        def run(iters):
            ts = []
            for _ in range(iters):
                part = parts[pos[0]]
                t0 = clock()
                if stepper.many is not None:  # the part's batches are consecutive rows
                    lo, hi = part[0][0], part[-1][1]
                    stepper.many(X[lo:hi], Y[lo:hi], BATCH)
                else:
                    for lo, hi in part:
                        stepper.step(X[lo:hi], Y[lo:hi])
                ts.append(clock() - t0)
                pos[0] = (pos[0] + 1) % len(parts)
            return ts

        return run


# ---- trainer epochs --------------------------------------------------------------------------------

# variant -> (TrainConfig.backend, TrainConfig.precision), per case precision. The bf16 cases time
# --precision bf16 against the float32 torch trainer (the headline ratio) and the torch trainer with
# --precision bf16 ("autocast"), against which they are checked.
TRAINER_VARIANTS = {
    "fp32": {"fastmlp": ("fused", "fp32"), "torch": ("torch", "fp32")},
    "bf16": {"fastmlp": ("fused", "bf16"), "torch": ("torch", "fp32"), "autocast": ("torch", "bf16")},
}
TRAINER_REFERENCE = {"fp32": "torch", "bf16": "autocast"}
TRAINER_OURS = {"fastmlp"}
# The strict check runs this many samples (40 batches and half of one, over two of the trainer's
# gathered chunks) step by step against the torch trainer before the timed epochs.
TRAINER_CHECK_SAMPLES = 40 * BATCH + BATCH // 2


def _splits(dataset, root):
    """(splits, description): the real dataset, or a random stand-in of the same sizes when its files
    are not found."""
    from fastmlp.data import DataNotFoundError, Split, load_dataset

    try:
        return load_dataset(dataset, root), "real"
    except DataNotFoundError:
        gen = torch.Generator().manual_seed(0)

        def split(name, n):
            return Split(name, torch.rand(n, IN_FEATURES, generator=gen) * 2 - 1,
                         torch.randint(0, NUM_CLASSES, (n,), generator=gen))

        return {"train": split("train", 55000), "val": split("val", 5000), "test": split("test", 10000)}, \
            "random stand-in (dataset files not found: pass --data ROOT)"


class TrainerCase:
    """Whole epochs of fastmlp.train.Trainer (what `fastmlp train` runs), --backend fused against
    torch, from the same seed on the same data, each epoch checked against the reference trainer's
    (TRAINER_REFERENCE: the torch trainer in the same precision)."""

    def __init__(self, dataset, root=None, variants=None, precision="fp32"):
        from fastmlp.training import Trainer, default_config

        self.dataset = dataset
        self.splits, self.data = _splits(dataset, root)
        registry = TRAINER_VARIANTS[precision]
        self.reference = TRAINER_REFERENCE[precision]
        self.tolerances = (LOSS_TOL_BF16, UPDATE_TOL_BF16) if precision == "bf16" else (LOSS_TOL, UPDATE_TOL)
        names = [v for v in registry if not variants or v in variants]
        self.ours = {v for v in names if v in TRAINER_OURS}
        self.errors: dict[str, str] = {}
        self.wrong: dict[str, str] = {}
        self.trainers = {}
        self.history: dict[str, list] = {}
        # The strict check: a short run, step by step, against the reference trainer (run for the check
        # even when it is not among the variants timed).
        short = {k: (v.subset(TRAINER_CHECK_SAMPLES) if k == "train" else v) for k, v in self.splits.items()}
        runs = {}
        for name in [self.reference] + [v for v in names if v != self.reference]:
            try:
                backend, precision_ = registry[name]
                config = default_config(dataset, backend=backend, precision=precision_)
                trainer = Trainer(config, short)
                start = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
                losses = []
                trainer.train_epoch(on_step=lambda step, loss: losses.append(float(loss)))
                runs[name] = (start, losses, trainer.model.state_dict())
                if name in names:
                    self.trainers[name] = Trainer(config, self.splits)
                    self.history[name] = []
            except Exception as e:  # noqa: BLE001 - reported as n/a
                if name in names:
                    self.errors[name] = error_text(e)
        ref = runs.get(self.reference)
        for name in [v for v in self.trainers if v not in ("torch", self.reference)]:
            problems = [f"not checked: the {self.reference} reference failed"] if ref is None else \
                check_training(ref[0], ref[1], ref[2], *runs[name][1:], *self.tolerances)
            if problems:
                self.wrong[name] = "; ".join(problems)
                self.trainers.pop(name)

    def sampler(self, name) -> Sampler:
        """Each iteration trains one epoch and returns the epoch's seconds as the trainer measures
        them (the figure `fastmlp train` prints: the training pass, without the validation after it)."""
        trainer, history = self.trainers[name], self.history[name]

        def run(iters):
            ts = []
            for _ in range(iters):
                entry = trainer.train_epoch()
                history.append(entry)
                ts.append(entry["epoch_seconds"])
            return ts

        return run

    def check_epochs(self):
        """After the timed epochs: each variant's epochs against the reference trainer's (same learning
        outcome); a variant that differs moves to .wrong."""
        ref = self.history.get(self.reference)
        if ref is None:
            return
        for name, hist in self.history.items():
            if name in ("torch", self.reference) or name not in self.trainers:
                continue
            problems = [p for a, b in zip(hist, ref) for p in check_epoch(a, b)]
            if len(hist) != len(ref):
                problems.append(f"{len(hist)} epochs for the reference's {len(ref)}")
            if problems:
                self.wrong[name] = "; ".join(problems)
                self.trainers.pop(name)

