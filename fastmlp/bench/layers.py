"""Layer cases: one FusedLinearReLU against nn.Linear + nn.ReLU (eager and torch.compile), forward,
backward and both, every variant built with the same weights and fed the same x and dY; and the
same under torch.autocast(bfloat16) (bf16 cases: FusedLinearReLU under autocast against PyTorch's
float32 layer and PyTorch's layer under autocast)."""

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


class _Autocast(nn.Module):
    """`mod` run under torch.autocast("cpu", bfloat16): float32 parameters, bfloat16 GEMMs."""

    def __init__(self, mod):
        super().__init__()
        self.mod = mod

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.mod(x)


# The bf16 cases' variants: ours under autocast, PyTorch's float32 layer ("torch", the layer ours
# replaces) and PyTorch's layer under autocast.
BF16_LAYER_VARIANTS: dict[str, Variant] = {
    "fastmlp": Variant(lambda k, n: _Autocast(_fastmlp(k, n)), ours=True, about="FusedLinearReLU under autocast bf16"),
    "torch": Variant(_torch, ours=False, about="nn.Linear + nn.ReLU, float32, eager"),
    "autocast": Variant(lambda k, n: _Autocast(_torch(k, n)), ours=False,
                        about="nn.Linear + nn.ReLU under autocast bf16, eager"),
}
BF16_UNIT_ROUNDOFF = 2.0**-8


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

    # The unit roundoff the variants' operands and outputs may be rounded to (check_layer's `low`).
    low = 0.0

    def check(self, mod):
        y = mod(self.x)
        grads = torch.autograd.grad(y, [self.x, *layer_params(mod)], self.gy.to(y.dtype))
        return check_layer(self.x, self.weight, self.bias, self.gy, y.float(), *grads, low=self.low)

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



class Bf16LayerCase(LayerCase):
    """A layer under torch.autocast(bfloat16): the variants of BF16_LAYER_VARIANTS, each checked like
    a float32 layer but with bounds widened for operands and outputs rounded to bfloat16."""

    low = BF16_UNIT_ROUNDOFF

    def __init__(self, shape, variants=None, seed=0):
        super().__init__(shape, variants, seed, registry=BF16_LAYER_VARIANTS)

    def _sampler(self, mod, pass_, clock: Clock) -> Sampler:
        if pass_ == "fwd":
            return super()._sampler(mod, pass_, clock)
        # The incoming gradient in the output's dtype, as autograd hands it to a bfloat16 output.
        with torch.no_grad():
            gy = self.gy.to(mod(self.x).dtype)
        saved, self.gy = self.gy, gy
        try:
            return super()._sampler(mod, pass_, clock)
        finally:
            self.gy = saved
