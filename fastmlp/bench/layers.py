"""Layer cases: one FusedLinearReLU against nn.Linear + nn.ReLU (eager and torch.compile), forward,
backward and both, every variant built with the same weights and fed the same x and dY."""

from __future__ import annotations

import math
from time import perf_counter

import torch
from torch import nn

from .cases import GEMMS_PER_PASS, PASSES
from .timing import Clock, Sampler
from .variants import Variant, compile_fn, error_text, reset_dynamo
from .verify import check_layer


def _fastmlp(k, n):
    import fastmlp

    return fastmlp.FusedLinearReLU(k, n)


def _torch(k, n):
    return nn.Sequential(nn.Linear(k, n), nn.ReLU())


def _compile(k, n):
    return compile_fn(_torch(k, n))


# name -> Variant whose build(in_features, out_features) returns a module computing relu(linear(x)).
LAYER_VARIANTS: dict[str, Variant] = {
    "fastmlp": Variant(_fastmlp, ours=True, about="FusedLinearReLU"),
    "torch": Variant(_torch, ours=False, about="nn.Linear + nn.ReLU, eager"),
    "compile": Variant(_compile, ours=False, about="nn.Linear + nn.ReLU under torch.compile"),
}


def layer_params(mod):
    mod = getattr(mod, "_orig_mod", mod)
    lin = mod if isinstance(mod, nn.Linear) else next(m for m in mod.modules() if isinstance(m, nn.Linear))
    return [lin.weight, lin.bias]


class LayerCase:
    """One shape, every variant built with the same weights and fed the same x and dY, each checked
    (verify.check_layer) before it is timed: a variant that fails goes to .wrong, not .modules."""

    def __init__(self, shape, variants=None, seed=0, registry=None):
        registry = LAYER_VARIANTS if registry is None else registry
        self.shape = tuple(shape)
        m, k, n = self.shape
        gen = torch.Generator().manual_seed(seed)
        ref = nn.Linear(k, n)
        with torch.no_grad():
            bound = 1.0 / math.sqrt(k)
            ref.weight.uniform_(-bound, bound, generator=gen)
            ref.bias.uniform_(-bound, bound, generator=gen)
        self.weight, self.bias = ref.weight.detach(), ref.bias.detach()
        self.x = torch.randn(m, k, generator=gen).requires_grad_(True)
        self.gy = torch.randn(m, n, generator=gen)
        self.ours = {name for name in (variants or registry) if registry[name].ours}
        self.errors: dict[str, str] = {}  # variants that could not be built or run
        self.wrong: dict[str, str] = {}  # variants that computed something else
        self.checks: dict[str, dict] = {}
        self.modules: dict[str, nn.Module] = {}
        reset_dynamo()
        for name in variants or registry:
            try:
                mod = registry[name].build(k, n)
                with torch.no_grad():
                    w, b = layer_params(mod)
                    w.copy_(self.weight)
                    b.copy_(self.bias)
                # Warm-up, and compilation of forward and backward for torch.compile.
                for p in PASSES:
                    self._sampler(mod, p, perf_counter)(2)
                check = self.check(mod)
            except Exception as e:  # noqa: BLE001 - reported as n/a
                self.errors[name] = error_text(e)
                continue
            self.checks[name] = check.as_dict()
            if check.ok:
                self.modules[name] = mod
            else:
                self.wrong[name] = f"{check.errors} wrong elements: {check.worst}"

    def check(self, mod):
        y = mod(self.x)
        grads = torch.autograd.grad(y, [self.x, *layer_params(mod)], self.gy)
        return check_layer(self.x, self.weight, self.bias, self.gy, y, *grads)

    def flops(self, pass_):
        m, k, n = self.shape
        return GEMMS_PER_PASS[pass_] * 2.0 * m * k * n

    def sampler(self, name, pass_, clock: Clock) -> Sampler:
        return self._sampler(self.modules[name], pass_, clock)

    def _sampler(self, mod, pass_, clock: Clock) -> Sampler:
        x, gy = self.x, self.gy
        inputs = [x, *layer_params(mod)]
        grad = torch.autograd.grad

        # Each timed region includes freeing what the iteration made (outputs, graph), as in training.
        if pass_ == "fwd":  # the training forward: autograd on, what backward needs is saved

            def run(iters):
                ts = []
                for _ in range(iters):
                    t0 = clock()
                    mod(x)
                    ts.append(clock() - t0)
                return ts

        elif pass_ == "bwd":  # backward only, each iteration's forward run untimed just before it

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

