"""Inference cases: a whole course MLP's forward under torch.inference_mode(), FusedMLP (one op,
mlp_forward) against the plain nn.Linear/nn.ReLU model, eager and under torch.compile, at batch 1
(one request) and 64."""

from __future__ import annotations

import torch

from .cases import MODELS
from .timing import Clock, Sampler
from .variants import Variant, compile_fn, error_text, reset_dynamo
from .verify import check_output


def _fastmlp(sizes, state):
    import fastmlp

    model = fastmlp.FusedMLP(sizes)
    model.load_state_dict(state)
    return model.eval()


def _torch(sizes, state):
    import fastmlp

    model = fastmlp.plain_mlp(sizes)
    model.load_state_dict(state)
    return model.eval()


# name -> Variant whose build(sizes, state_dict) returns the model in eval mode.
INFER_VARIANTS: dict[str, Variant] = {
    "fastmlp": Variant(_fastmlp, ours=True, about="FusedMLP: the whole forward as one op"),
    "torch": Variant(_torch, ours=False, about="nn.Linear/nn.ReLU, eager"),
    "compile": Variant(lambda sizes, state: compile_fn(_torch(sizes, state)), ours=False,
                       about="the plain model under torch.compile"),
}


class InferenceCase:
    """One model at one batch size, every variant with the same weights and input, each output
    checked against a float64 truth (verify.check_output) before it is timed."""

    def __init__(self, name, batch, variants=None, seed=0):
        import fastmlp

        self.sizes, self.batch = tuple(MODELS[name]), batch
        torch.manual_seed(seed)
        plain = fastmlp.plain_mlp(self.sizes)
        state = plain.state_dict()
        self.x = torch.randn(batch, self.sizes[0])
        with torch.no_grad():
            truth = plain.double()(self.x.double())
            reference = _torch(self.sizes, state)(self.x)
        self.ours = {v for v in (variants or INFER_VARIANTS) if INFER_VARIANTS[v].ours}
        self.errors: dict[str, str] = {}
        self.wrong: dict[str, str] = {}
        self.models = {}
        reset_dynamo()
        for name_ in variants or INFER_VARIANTS:
            try:
                model = INFER_VARIANTS[name_].build(self.sizes, state)
                with torch.inference_mode():
                    for _ in range(3):  # warm-up (and compilation)
                        out = model(self.x)
            except Exception as e:  # noqa: BLE001 - reported as n/a
                self.errors[name_] = error_text(e)
                continue
            problem = check_output(out, reference, truth)
            if problem:
                self.wrong[name_] = problem
            else:
                self.models[name_] = model

    def flops(self):
        return sum(2.0 * self.batch * k * n for k, n in zip(self.sizes[:-1], self.sizes[1:]))

    def sampler(self, name, clock: Clock) -> Sampler:
        model, x = self.models[name], self.x

        def run(iters):
            ts = []
            with torch.inference_mode():
                for _ in range(iters):
                    t0 = clock()
                    model(x)
                    ts.append(clock() - t0)
            return ts

        return run
