"""The binding between a torch.optim optimizer and a FusedMLP's whole-step ops: which op serves the
optimizer, its validation (in full once, then a cheap test that it still holds), and the op's
arguments read from the optimizer's own state, started as torch starts it. Used by FusedMLP
(sgd_step, adam_step, train_step, train_steps) and CUDAGraphStep.

    args = bind(model, optimizer)           # StepArgs, read afresh at every step
    loss = args.step(x, target)             # the whole-step op, one batch
    losses = args.steps(x, target, 64, lrs) # the many-step op
"""

import operator
from dataclasses import dataclass

import torch

# optimizer kind -> (optimizer types, hyper-parameters that must not change under a cached validation)
_STEP_OPTIMIZERS = {
    "sgd": ((torch.optim.SGD,), ("momentum", "dampening", "weight_decay", "nesterov", "maximize")),
    "adam": ((torch.optim.Adam, torch.optim.AdamW),
             ("betas", "eps", "weight_decay", "amsgrad", "maximize", "differentiable", "decoupled_weight_decay")),
}
# Options the fused steps do not implement (dampening is checked as a value: any non-zero one).
_UNSUPPORTED = {"sgd": ("dampening", "nesterov", "maximize"), "adam": ("amsgrad", "maximize", "differentiable")}


def step_kind(optimizer, who: str) -> str:
    """"sgd" or "adam": which whole-step op serves `optimizer`; TypeError for any other optimizer."""
    for kind, (types, _) in _STEP_OPTIMIZERS.items():
        if type(optimizer) in types:
            return kind
    raise TypeError(
        f"{who} needs a torch.optim.SGD, Adam or AdamW optimizer, got {type(optimizer).__name__}"
    )


@dataclass(frozen=True)
class StepArgs:
    """The whole-step op's arguments for one optimizer and model, in the op's order:
    op(x, target, weights, biases, *state, lr, *hyper)."""

    kind: str  # "sgd" or "adam"
    weights: list
    biases: list  # empty when the model has no biases
    state: tuple  # SGD: (weight_bufs, bias_bufs), empty lists without momentum; Adam: (exp_avgs, exp_avg_sqs, steps)
    lr: float
    hyper: tuple  # SGD: (momentum, weight_decay); Adam: (beta1, beta2, eps, weight_decay, decoupled)

    @property
    def tensor_lists(self) -> tuple:
        return (self.weights, self.biases, *self.state)

    def step(self, x, target, lr=None, lr_scale=None, bf16=False):
        """One step on (x, target) at learning rate `lr` (default: the optimizer's) times lr_scale, in
        bfloat16 arithmetic when bf16 (the op's bf16 argument)."""
        op = torch.ops.fastmlp.mlp_sgd_step if self.kind == "sgd" else torch.ops.fastmlp.mlp_adam_step
        return op(x, target, *self.tensor_lists, self.lr if lr is None else lr, *self.hyper, lr_scale=lr_scale,
                  bf16=bf16)

    def steps(self, x, target, batch_size, lrs, bf16=False):
        """One step per consecutive batch of batch_size rows, step s at lrs[s]."""
        op = torch.ops.fastmlp.mlp_sgd_steps if self.kind == "sgd" else torch.ops.fastmlp.mlp_adam_steps
        return op(x, target, batch_size, *self.tensor_lists, list(lrs), *self.hyper, bf16=bf16)

    def graph_key(self) -> tuple:
        """Equal for two StepArgs whose op calls a captured CUDA graph can replay (same tensors,
        same hyper-parameters; the learning rate is passed at replay)."""
        return self.hyper, tuple((t.data_ptr(), t.dtype, t.shape) for ts in self.tensor_lists for t in ts)


def bind(model, optimizer, kind=None) -> StepArgs:
    """The whole-step op's arguments for `model` (a FusedMLP) trained by `optimizer` (torch.optim.SGD,
    Adam or AdamW; `kind` "sgd" / "adam" when already known). The optimizer's state is looked up
    every time (optimizer.load_state_dict() replaces it) and started as torch starts it."""
    kind = kind or step_kind(optimizer, "FusedMLP.train_step")
    weights, biases, group = validated(model, optimizer, kind)
    if kind == "sgd":
        momentum = float(group["momentum"])
        bufs = [_momentum_buffer(optimizer.state, p) for p in weights + biases] if momentum else []
        return StepArgs(kind, weights, biases, (bufs[: len(weights)], bufs[len(weights) :]), float(group["lr"]),
                        (momentum, float(group["weight_decay"])))
    states = [_adam_state(optimizer, group, p) for p in weights + biases]
    state = tuple([s[k] for s in states] for k in ("exp_avg", "exp_avg_sq", "step"))
    beta1, beta2 = group["betas"]
    hyper = (float(beta1), float(beta2), float(group["eps"]), float(group["weight_decay"]),
             bool(group.get("decoupled_weight_decay", False)))
    return StepArgs(kind, weights, biases, state, float(group["lr"]), hyper)


def validated(model, optimizer, kind):
    """(weights, biases, hyper-parameter group) for a whole-step op of `kind` ("sgd" or "adam"),
    fully validated once per optimizer and configuration and then only checked for changes
    (see _StepCache, kept on the model)."""
    groups = optimizer.param_groups
    cached = model.__dict__.get("_step_cache")
    if cached is not None and cached.kind == kind and cached.holds(model, optimizer, groups):
        return cached.weights, cached.biases, groups[0]
    method = f"FusedMLP.{kind}_step"
    types, keys = _STEP_OPTIMIZERS[kind]
    if type(optimizer) not in types:
        names = " or ".join(f"torch.optim.{t.__name__}" for t in types)
        raise TypeError(f"{method} needs a {names} optimizer, got {type(optimizer).__name__}")
    if any(any(g.get(k) != groups[0].get(k) for k in ("lr",) + keys) for g in groups):
        raise ValueError(f"{method}: all parameter groups must share their hyper-parameters")
    group = groups[0]
    unsupported = [k for k in _UNSUPPORTED[kind] if group.get(k)]
    if unsupported:
        raise ValueError(f"{method} does not support {', '.join(unsupported)}")
    weights = [layer.weight for layer in model]
    biases = [layer.bias for layer in model if layer.bias is not None]
    owned = {id(p) for g in groups for p in g["params"]}
    if owned != {id(p) for p in weights + biases}:
        raise ValueError(f"{method}: the optimizer must hold exactly this model's parameters")
    model._step_cache = _StepCache(kind, keys, optimizer, groups, list(model), weights, biases)
    return weights, biases, group


def _adam_state(optimizer, group, param):
    # As torch.optim.Adam starts a parameter's state: the step count on the CPU unless capturable or
    # fused, where it lives on the parameter's device.
    state = optimizer.state[param]
    if not state:
        on_device = group["capturable"] or group["fused"]
        dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        state["step"] = torch.zeros((), dtype=dtype, device=param.device if on_device else None)
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    return state



def _momentum_buffer(state, param):
    # torch.optim.SGD starts a buffer as a copy of the first gradient; a zero buffer gives the same
    # first step (momentum * 0 + g == g exactly) and the same state_dict layout afterwards.
    buf = state[param].get("momentum_buffer")
    if buf is None:
        buf = state[param]["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.contiguous_format)
    return buf


class _StepCache:
    """What validated() checked, with a test that it still holds, cheaper than validating again: same
    optimizer, same parameter objects in its groups, same layers holding the same parameters, same
    hyper-parameters, one learning rate."""

    __slots__ = ("kind", "keys", "optimizer", "group_params", "hyper", "layers", "layer_params", "weights", "biases")

    def __init__(self, kind, keys, optimizer, groups, layers, weights, biases):
        self.kind, self.keys = kind, keys
        self.optimizer = optimizer
        self.group_params = [list(g["params"]) for g in groups]
        self.hyper = tuple(groups[0].get(k) for k in keys)
        self.layers = layers
        # Read from _parameters, as holds() does: module attribute access is the slow path.
        self.layer_params = [(m._parameters["weight"], m._parameters["bias"]) for m in layers]
        self.weights, self.biases = weights, biases

    def holds(self, model, optimizer, groups) -> bool:
        if optimizer is not self.optimizer or len(groups) != len(self.group_params):
            return False
        lr = groups[0]["lr"]
        for g, params in zip(groups, self.group_params):
            p = g["params"]
            if g["lr"] != lr or len(p) != len(params) or not all(map(operator.is_, p, params)):
                return False
            if tuple([g.get(k) for k in self.keys]) != self.hyper:
                return False
        if len(model) != len(self.layers) or not all(map(operator.is_, model, self.layers)):
            return False
        return all(m._parameters["weight"] is w and m._parameters["bias"] is b for m, (w, b) in zip(self.layers, self.layer_params))


