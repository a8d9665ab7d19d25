"""Drop-in modules: FusedLinearReLU and Linear subclass nn.Linear (same parameters, initialisation and
state_dict keys), FusedMLP stacks them, convert() rewrites an existing model in place of
Linear -> ReLU pairs."""

import copy
import functools
import operator
from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn

from . import functional as F
from .step_binding import bind, step_kind


class FusedLinearReLU(nn.Linear):
    """nn.Linear followed by nn.ReLU, computed by one fused kernel.

    Same constructor, parameters, initialisation and state_dict keys as nn.Linear, so checkpoints
    move both ways between the two.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear_relu(x, self.weight, self.bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "FusedLinearReLU":
        """A module sharing `linear`'s parameters (no copy)."""
        return _adopt(cls, linear)


class Linear(nn.Linear):
    """nn.Linear on fastmlp's kernels (for output layers, which have no ReLU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Linear":
        """A module sharing `linear`'s parameters (no copy)."""
        return _adopt(cls, linear)


def _adopt(cls, linear):
    m = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    m.weight = linear.weight
    m.bias = linear.bias
    m.train(linear.training)
    return m


class FusedMLP(nn.Sequential):
    """An MLP with ReLU after every hidden layer and none after the last, e.g. FusedMLP([784, 128, 64, 10]).

    Layers are numbered as in the equivalent plain model nn.Sequential(Linear, ReLU, Linear, ReLU,
    Linear), i.e. "0", "2", "4", so state_dicts load into either (see to_torch()).
    """

    def __init__(self, sizes: Sequence[int], bias: bool = True, device=None, dtype=None):
        sizes = list(sizes)
        if any(isinstance(s, bool) or not hasattr(s, "__index__") for s in sizes):  # no 2.5 -> 2, True -> 1
            raise TypeError(f"FusedMLP: sizes must be integers, got {sizes}")
        sizes = [operator.index(s) for s in sizes]
        if len(sizes) < 2 or any(s <= 0 for s in sizes):
            raise ValueError(f"FusedMLP: sizes must list at least two positive widths, got {list(sizes)}")
        layers = OrderedDict()
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            cls = Linear if i == len(sizes) - 2 else FusedLinearReLU
            layers[str(2 * i)] = cls(fan_in, fan_out, bias=bias, device=device, dtype=dtype)
        super().__init__(layers)
        self.sizes = tuple(sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layers one after another. When no gradient is needed (torch.no_grad(), inference_mode,
        or nothing requires grad) the whole forward is one op, mlp_forward: no per-layer dispatch, no
        ReLU masks, nothing recorded for backward; same result within float32 rounding."""
        if torch._C._are_functorch_transforms_active() or (
                torch.is_grad_enabled() and (x.requires_grad or self._params_require_grad())):
            return super().forward(x)
        weights, biases = [], []
        for m in self._modules.values():
            p = m._parameters
            weights.append(p["weight"])
            if p["bias"] is not None:
                biases.append(p["bias"])
        if biases and len(biases) != len(weights):  # some layers without a bias (edited by hand)
            return super().forward(x)
        return F._mlp_forward(x, weights, biases, False)

    def _params_require_grad(self) -> bool:
        for m in self._modules.values():
            for p in m._parameters.values():
                if p is not None and p.requires_grad:
                    return True
        return False

    def to_torch(self) -> nn.Sequential:
        """The same network as plain nn.Linear/nn.ReLU modules (plain_mlp), with copies of the weights."""
        first = self[0]
        plain = plain_mlp(self.sizes, bias=first.bias is not None, device=first.weight.device, dtype=first.weight.dtype)
        plain.load_state_dict(self.state_dict())
        return plain

    def sgd_step(self, x: torch.Tensor, target: torch.Tensor, optimizer: torch.optim.SGD) -> torch.Tensor:
        """One whole training step in a single fused op: forward, mean softmax cross-entropy, backward
        and `optimizer`'s update. Same result, within float32 rounding, as

            loss = F.cross_entropy(self(x), target); optimizer.zero_grad(); loss.backward(); optimizer.step()

        `optimizer` must be a torch.optim.SGD over exactly this model's parameters (any lr, momentum,
        weight_decay; no dampening, Nesterov or maximize). Its momentum buffers are used and updated in
        place, so optimizer.state_dict() checkpoints, LR schedulers and ordinary steps keep working
        around it. Parameters' .grad is not written. Returns the loss (a detached scalar tensor).
        """
        self._check_input("sgd_step", x)
        return _without_grad(bind(self, optimizer, "sgd").step, x, target)

    def adam_step(self, x: torch.Tensor, target: torch.Tensor, optimizer: torch.optim.Adam) -> torch.Tensor:
        """sgd_step's twin for torch.optim.Adam and torch.optim.AdamW (any lr, betas, eps, weight_decay;
        no amsgrad, maximize or differentiable): one fused op with the same result, within float32
        rounding, as

            loss = F.cross_entropy(self(x), target); optimizer.zero_grad(); loss.backward(); optimizer.step()

        It uses and updates the optimizer's own state (exp_avg, exp_avg_sq and the step count, starting
        them as torch does), so state_dict() checkpoints, LR schedulers and ordinary steps keep working
        around it. Returns the loss (a detached scalar tensor)."""
        self._check_input("adam_step", x)
        return _without_grad(bind(self, optimizer, "adam").step, x, target)

    def train_step(self, x: torch.Tensor, target: torch.Tensor, optimizer: torch.optim.Optimizer,
                   precision: str = "fp32") -> torch.Tensor:
        """sgd_step or adam_step, as `optimizer` (torch.optim.SGD, Adam or AdamW) calls for.

        precision="bf16": mixed precision, float32 weights and optimizer state, bfloat16 GEMM operands
        with float32 sums, float32 softmax, loss and update; the arithmetic of the plain model's step
        under torch.autocast("cpu"/"cuda", torch.bfloat16) with the loss taken on float32 logits. On
        the CPU (float32 model) one op, like the float32 step (the op's bf16=True); on a GPU the fused
        layers under autocast with autograd, then optimizer.step() (which writes .grad)."""
        kind = step_kind(optimizer, "FusedMLP.train_step")
        if _precision(precision, "FusedMLP.train_step") == "bf16":
            self._check_input("train_step", x)
            if x.device.type != "cpu":
                return self._autocast_step(x, target, optimizer)
            return _without_grad(functools.partial(bind(self, optimizer, kind).step, bf16=True), x, target)
        return getattr(self, f"{kind}_step")(x, target, optimizer)

    def _autocast_step(self, x, target, optimizer):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            logits = self(x)
        loss = nn.functional.cross_entropy(logits.float(), target)
        loss.backward()
        optimizer.step()
        return loss.detach()

    def train_steps(self, x: torch.Tensor, target: torch.Tensor, optimizer: torch.optim.Optimizer,
                    batch_size: int, lrs: Sequence[float] | None = None, precision: str = "fp32") -> torch.Tensor:
        """Many training steps in one op: train_step on each consecutive batch of `batch_size` rows of x
        (the last batch shorter when batch_size does not divide len(x)), step s at learning rate lrs[s]
        (None: the optimizer's lr for every step). Same result as

            for s, (xb, yb) in enumerate(zip(x.split(batch_size), target.split(batch_size))):
                optimizer.param_groups[0]["lr"] = lrs[s]   # (for every group)
                self.train_step(xb, yb, optimizer)

        but on the CPU without the Python, dispatch and allocation around each step (~10% of a
        784-128-64-10 step of batch 64). The optimizer's lr is left as it was. Every label is checked
        before the first step. Returns the steps' losses, shape (steps,). precision="bf16": train_step's
        mixed precision (one op on the CPU; on a GPU one autocast step after another)."""
        kind = step_kind(optimizer, "FusedMLP.train_steps")
        bf16 = _precision(precision, "FusedMLP.train_steps") == "bf16"
        self._check_input("train_steps", x)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"FusedMLP.train_steps: batch_size must be a positive int, got {batch_size!r}")
        if target.shape != (x.shape[0],):
            raise ValueError(
                f"FusedMLP.train_steps: target must have shape ({x.shape[0]},), got {tuple(target.shape)}")
        count = -(-x.shape[0] // batch_size)
        batch_size = min(batch_size, max(1, x.shape[0]))  # one batch of every row: the op's int64 holds it
        args = bind(self, optimizer, kind)
        lrs = [args.lr] * count if lrs is None else [float(v) for v in lrs]
        if len(lrs) != count:
            raise ValueError(
                f"FusedMLP.train_steps: lrs must hold one learning rate per step ({count}), got {len(lrs)}")
        if bf16 and x.device.type != "cpu":
            return self._autocast_steps(x, target, optimizer, batch_size, lrs)
        return _without_grad(args.steps, x, target, batch_size, lrs, bf16)

    def _autocast_steps(self, x, target, optimizer, batch_size, lrs):
        if not ((target >= 0) & (target < self.sizes[-1])).all():  # as the fused op: before any step
            raise ValueError(f"FusedMLP.train_steps: every target must be a class index in [0, {self.sizes[-1]})")
        saved = [g["lr"] for g in optimizer.param_groups]
        losses = []
        try:
            for s, (xb, yb) in enumerate(zip(x.split(batch_size), target.split(batch_size))):
                for g in optimizer.param_groups:
                    g["lr"] = lrs[s]
                losses.append(self._autocast_step(xb, yb, optimizer))
        finally:
            for g, lr in zip(optimizer.param_groups, saved):
                g["lr"] = lr
        return torch.stack(losses)

    def _check_input(self, method, x):
        if x.dim() != 2 or x.shape[1] != self.sizes[0]:
            raise ValueError(f"FusedMLP.{method}: x must have shape (batch, {self.sizes[0]}), got {tuple(x.shape)}")

    @classmethod
    def from_torch(cls, model: nn.Module) -> "FusedMLP":
        """A FusedMLP with copies of the weights of `model`'s nn.Linear layers, taken in order
        (e.g. a plain Linear/ReLU/.../Linear nn.Sequential)."""
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError("FusedMLP.from_torch: the model has no nn.Linear layers")
        sizes = [linears[0].in_features] + [m.out_features for m in linears]
        first = linears[0]
        out = cls(sizes, bias=first.bias is not None, device=first.weight.device, dtype=first.weight.dtype)
        with torch.no_grad():
            for dst, src in zip(out, linears):
                if src.in_features != dst.in_features or (src.bias is None) != (dst.bias is None):
                    raise ValueError("FusedMLP.from_torch: the nn.Linear layers do not form a chain")
                dst.weight.copy_(src.weight)
                if src.bias is not None:
                    dst.bias.copy_(src.bias)
        return out


def _precision(precision, where):
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"{where}: precision must be 'fp32' or 'bf16', got {precision!r}")
    return precision


def _without_grad(op, *args):
    """op(*args) with grad mode off: what torch.no_grad() does, without building a context manager
    every step."""
    grad_enabled = torch.is_grad_enabled()
    torch._C._set_grad_enabled(False)
    try:
        return op(*args)
    finally:
        torch._C._set_grad_enabled(grad_enabled)


def plain_mlp(sizes: Sequence[int], bias: bool = True, device=None, dtype=None) -> nn.Sequential:
    """The plain-PyTorch twin of FusedMLP(sizes): nn.Sequential(Linear, ReLU, ..., Linear)."""
    layers = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(fan_in, fan_out, bias=bias, device=device, dtype=dtype))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def convert(module: nn.Module, inplace: bool = False) -> nn.Module:
    """Replaces every nn.Linear directly followed by nn.ReLU inside an nn.Sequential (at any depth)
    with a FusedLinearReLU holding the same parameters, and that ReLU with nn.Identity (so module
    names and state_dict keys do not change). Everything else is left as it is.

    Returns a converted deep copy, or `module` itself converted when inplace=True.
    """
    root = module if inplace else copy.deepcopy(module)
    for seq in [m for m in root.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for this, nxt in zip(names, names[1:]):
            lin, act = seq._modules[this], seq._modules[nxt]
            if type(lin) is nn.Linear and type(act) is nn.ReLU:
                seq._modules[this] = FusedLinearReLU.from_linear(lin)
                seq._modules[nxt] = nn.Identity()
    return root
