"""Runs cases: builds and checks their variants, times them interleaved, and makes the result record.

Every variant of a case runs in this process on the same inputs, with its own copy of the same
initial weights. Variants are interleaved: each round runs one chunk (a few ms) of every variant,
the order rotating from round to round; a variant's figure is the median of all its iterations
(the mean, which keeps stalls, is in the JSON too); ratios are ratios of medians. Epochs: the
variants take turns every eighth of an epoch, each variant's epoch time is the sum of its eight
parts, its figure the median over epochs; trainer epochs take turns whole.

Before any timing every variant is checked against PyTorch (verify.py); one that fails is reported
"wrong" with what differed, is not timed and gets no ratio, and the run fails.
"""

from __future__ import annotations

import gc
import statistics
from dataclasses import dataclass, field

from .cases import BASELINES, BATCH, SGD
from .inference import INFER_VARIANTS, InferenceCase
from .layers import BF16_LAYER_VARIANTS, LAYER_VARIANTS, Bf16LayerCase, LayerCase
from .machine import LoadMonitor
from .timing import TIMERS, calibrate, interleave, summarize
from .training import STEP_VARIANTS, TrainCase, TrainerCase


@dataclass
class Settings:
    rounds: int = 30  # timed interleaved rounds per case
    chunk_s: float = 0.002  # target time of one chunk (one variant, one round)
    epoch_rounds: int = 5  # timed rounds (epochs per variant) of the epoch and trainer benchmarks
    epoch_segments: int = 8  # variants take turns every 1/8 epoch, so slow drifts of the machine hit all alike
    epoch_steps: int | None = None  # None: whole epochs (938 steps); else extrapolated from this many
    epoch_budget_s: float | None = None  # whole epochs unless they would take longer than this (then extrapolated)
    variants: list[str] | None = None  # None: all
    warmup_rounds: int = 2
    warmup_s: float = 0.3  # and at least this long (layer and step cases)
    timer: str = "wall"  # see timing.TIMERS
    data_root: str | None = None  # trainer cases: the datasets' root (None: fastmlp.data's search)


@dataclass
class Runner:
    """Builds cases lazily (one compile per layer shape serves all three passes, one per model serves
    step and epoch) and measures them."""

    settings: Settings = field(default_factory=Settings)
    _layer: tuple | None = None
    _train: tuple | None = None

    @property
    def clock(self):
        return TIMERS[self.settings.timer]

    def layer_case(self, shape, bf16=False) -> LayerCase:
        key = (tuple(shape), bf16)
        if self._layer is None or self._layer[0] != key:
            self._layer = None
            gc.collect()
            if bf16:
                case = Bf16LayerCase(shape, _filter_variants(BF16_LAYER_VARIANTS, self.settings.variants))
            else:
                case = LayerCase(shape, _filter_variants(LAYER_VARIANTS, self.settings.variants))
            self._layer = (key, case)
        return self._layer[1]

    def train_case(self, name) -> TrainCase:
        if self._train is None or self._train[0] != name:
            self._train = None
            gc.collect()
            self._train = (name, TrainCase(name, _filter_variants(STEP_VARIANTS, self.settings.variants)))
        return self._train[1]

    def release(self):
        from .variants import reset_dynamo

        self._layer = self._train = None
        reset_dynamo()
        gc.collect()

    def run(self, case_id: str) -> dict:
        kind, _, rest = case_id.partition("/")
        if kind in ("layer", "bf16"):
            return self._run_layer(case_id, rest, bf16=kind == "bf16")
        if kind in ("step", "epoch"):
            return self._run_training(case_id, kind, rest)
        if kind in ("trainer", "trainer-bf16"):
            return self._run_trainer(case_id, rest, "bf16" if kind == "trainer-bf16" else "fp32")
        if kind == "infer":
            return self._run_inference(case_id, rest)
        raise ValueError(f"unknown case {case_id!r}")

    def _run_layer(self, case_id, rest, bf16=False):
        s = self.settings
        dims, pass_ = rest.split("/")
        shape = tuple(int(v) for v in dims.split("x"))
        case = self.layer_case(shape, bf16)
        samplers = {name: case.sampler(name, pass_, self.clock) for name in case.modules}
        info = {"shape": {"batch": shape[0], "in": shape[1], "out": shape[2]}, "pass": pass_, "checks": case.checks}
        return measure(case_id, "bf16" if bf16 else "layer", samplers, case, case.flops(pass_), s.rounds, s.chunk_s,
                       (s.warmup_rounds, s.warmup_s), info)

    def _run_training(self, case_id, kind, rest):
        s = self.settings
        case = self.train_case(rest)
        info = {"model": rest, "sizes": list(case.sizes), "batch": BATCH, "optimizer": dict(SGD, name="SGD")}
        if kind == "step":
            samplers = {name: case.step_sampler(name, self.clock) for name in case.steppers}
            return measure(case_id, kind, samplers, case, case.flops(kind), s.rounds, s.chunk_s,
                           (s.warmup_rounds, s.warmup_s), info)
        total = len(case.epoch_batches)
        steps = s.epoch_steps and min(s.epoch_steps, total)
        if steps is None and s.epoch_budget_s and case.steppers:
            # Whole epochs would take (rounds + 1 warm-up) x (sum of the variants' epochs).
            per_round = sum(statistics.median(case.step_sampler(v, self.clock)(20)) for v in case.steppers) * total
            if per_round * (s.epoch_rounds + 1) > s.epoch_budget_s:
                steps = max(30, int(total * s.epoch_budget_s / (per_round * (s.epoch_rounds + 1))))
        steps = None if steps is None or steps >= total else steps
        plan = case.epoch_plan(steps, s.epoch_segments)
        samplers = {name: case.epoch_sampler(name, plan, self.clock) for name in case.steppers}
        nseg = len(plan.parts)
        info.update(epoch_steps=total, timed_steps=total if steps is None else steps, extrapolated=steps is not None,
                    segments=nseg)
        # One epoch of warm-up, then epoch_rounds epochs per variant, taking turns by segment.
        return measure(case_id, kind, samplers, case, case.flops(kind), s.epoch_rounds * nseg, None, (nseg, 0.0),
                       info, group=nseg, scale=plan.scale)

    def _run_inference(self, case_id, rest):
        s = self.settings
        model, _, batch = rest.partition("/b")
        case = InferenceCase(model, int(batch), _filter_variants(INFER_VARIANTS, s.variants))
        samplers = {name: case.sampler(name, self.clock) for name in case.models}
        info = {"model": model, "sizes": list(case.sizes), "batch": case.batch, "mode": "torch.inference_mode()"}
        return measure(case_id, "infer", samplers, case, case.flops(), s.rounds, s.chunk_s,
                       (s.warmup_rounds, s.warmup_s), info)

    def _run_trainer(self, case_id, dataset, precision):
        s = self.settings
        case = TrainerCase(dataset, s.data_root, s.variants, precision)
        samplers = {name: case.sampler(name) for name in case.trainers}
        info = {"dataset": dataset, "data": case.data, "recipe": "fastmlp.train.default_config", "precision": precision,
                "steps_per_epoch": next(iter(case.trainers.values())).steps_per_epoch if case.trainers else None}
        # One epoch of warm-up, then epoch_rounds epochs per variant, taking turns.
        return measure(case_id, "trainer", samplers, case, None, s.epoch_rounds, None, (1, 0.0), info,
                       after=case.check_epochs)


def _filter_variants(registry, wanted):
    if not wanted:
        return list(registry)
    return [v for v in registry if v in wanted]


def measure(case_id, kind, samplers, case, flops, rounds, chunk_s, warmup, info, group=1, scale=1.0,
            after=None) -> dict:
    """Interleaves the samplers of `case`'s checked variants and returns the case's result record
    (see cli.SCHEMA). chunk_s None: one iteration per variant per round. group > 1: every `group`
    consecutive rounds of a variant make one sample, the sum of their times x `scale` (the segments
    of an epoch). after(): a check run after timing (trainer epochs), which may add to case.wrong."""
    result = {"id": case_id, "kind": kind, **info, "flops": flops, "ours": sorted(case.ours), "variants": {},
              "speedup": {}}
    samples = {}
    if samplers:
        iterations = 1
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
    if after is not None:
        after()
    for name, ts in samples.items():
        if name in case.wrong:
            continue
        st = summarize(ts)
        result["variants"][name] = {"status": "ok", **st, "median_us": st["median_s"] * 1e6,
                                    "gflops": flops / st["median_s"] / 1e9 if flops else None}
    for name, err in case.errors.items():
        result["variants"][name] = {"status": "n/a", "error": err}
    for name, err in case.wrong.items():
        result["variants"][name] = {"status": "wrong", "error": err}
    ok = {n: d for n, d in result["variants"].items() if d["status"] == "ok"}
    # fastmlp's plain variant against each baseline (what --compare follows), and every variant
    # against eager torch; one ratio per variant, no best-of.
    for base in BASELINES:
        f, b = ok.get("fastmlp"), ok.get(base)
        result["speedup"][base] = b["median_s"] / f["median_s"] if f and b else None
    t = ok.get("torch")
    result["speedup_vs_torch"] = {n: t["median_s"] / d["median_s"] for n, d in ok.items() if n != "torch" and t}
    return result
