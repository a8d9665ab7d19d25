"""The public functional API: drop-in counterparts of torch.relu(F.linear(...)) and F.linear.

Inputs of any leading shape (..., in_features) are flattened to 2-D for the kernels and reshaped
back, like nn.Linear. Gradients flow to input, weight and bias through the fused backward ops.
"""

import math

import torch

from . import _functorch, _ops  # noqa: F401  (_ops registers torch.ops.fastmlp.*)


def _flatten(name, x, weight, bias):
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError(f"fastmlp.{name}: input and weight must be tensors")
    if x.dim() == 0:
        raise RuntimeError(f"fastmlp.{name}: input must have at least 1 dimension, got a 0-d tensor")
    if weight.dim() != 2:
        raise RuntimeError(
            f"fastmlp.{name}: weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}"
        )
    if x.shape[-1] != weight.shape[1]:
        raise RuntimeError(
            f"fastmlp.{name}: input has {x.shape[-1]} features (last dimension of shape "
            f"{tuple(x.shape)}) but weight expects {weight.shape[1]}"
        )
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"fastmlp.{name}: bias must be a tensor or None")
    # Not reshape(-1, k): -1 is ambiguous when in_features == 0.
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


# The ops, looked up once (each torch.ops attribute access costs a dictionary walk per call).
_linear_relu_fwd = torch.ops.fastmlp.linear_relu_fwd.default
_linear_fwd = torch.ops.fastmlp.linear_fwd.default
_mlp_forward = torch.ops.fastmlp.mlp_forward.default


def _needs_grad(x, weight, bias) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad))


# A 2-D input goes to the op as it is (the ops check shapes and dtypes themselves, with messages
# naming the op and argument); other shapes are checked and flattened here first. Without a
# gradient to compute, the inference op serves: no ReLU mask.


def _as_2d(name, x, weight, bias):
    """(x as (M, in_features), whether x was that already)."""
    if (isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor) and x.dim() == 2
            and (bias is None or isinstance(bias, torch.Tensor))):
        return x, True
    return _flatten(name, x, weight, bias), False


def _layer(name, x, weight, bias, relu):
    x2, flat = _as_2d(name, x, weight, bias)
    if torch._C._are_functorch_transforms_active():  # torch.func: Python autograd (see _functorch)
        y = (_functorch.linear_relu if relu else _functorch.linear)(x2, weight, bias)
    elif not _needs_grad(x, weight, bias):
        return _mlp_forward(x, [weight], [] if bias is None else [bias], relu)
    else:
        y = _linear_relu_fwd(x2, weight, bias)[0] if relu else _linear_fwd(x2, weight, bias)
    return y if flat else y.reshape(*x.shape[:-1], weight.shape[0])


def linear_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """relu(x @ weight.T + bias) in one fused kernel; equals torch.relu(F.linear(x, weight, bias))."""
    return _layer("linear_relu", x, weight, bias, True)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias; equals F.linear(x, weight, bias)."""
    return _layer("linear", x, weight, bias, False)
