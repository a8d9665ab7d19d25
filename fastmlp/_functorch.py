"""The layer ops under torch.func transforms (grad, vjp, and these composed; not vmap, for which the
ops have no batching rule). The compiled ops' autograd is C++ (torch::autograd::Function), which
functorch refuses; while a transform is active, fastmlp.functional goes through these Python
autograd.Functions instead. Each calls its op below autograd and differentiates with the same
formulas as csrc/autograd.cpp (those of fastmlp/_ops.py, here over these same Functions), so any
order of derivative composes."""

import types

import torch
from torch.autograd import Function

from . import _ops

_OPS = torch.ops.fastmlp


def _below_autograd(op, *args):
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


class _LinearReLU(Function):
    @staticmethod
    def forward(x, w, b):
        return _below_autograd(_OPS.linear_relu_fwd.default, x, w, b)

    setup_context = staticmethod(_ops._setup_linear_relu)

    @staticmethod
    def backward(ctx, gy, gmask):
        return _ops._backward_linear_relu(ctx, gy, gmask, ops=DIFFERENTIABLE_OPS)


class _Linear(Function):
    @staticmethod
    def forward(x, w, b):
        return _below_autograd(_OPS.linear_fwd.default, x, w, b)

    setup_context = staticmethod(_ops._setup_linear)

    @staticmethod
    def backward(ctx, gy):
        return _ops._backward_linear(ctx, gy, ops=DIFFERENTIABLE_OPS)


class _LinearReLUBackward(Function):
    @staticmethod
    def forward(gy, x, w, mask, needs):
        return _below_autograd(_OPS.linear_relu_bwd.default, gy, x, w, mask, needs)

    setup_context = staticmethod(_ops._setup_backward_op)

    @staticmethod
    def backward(ctx, ggx, ggw, ggb):
        return _ops._backward_of_backward(ctx, ggx, ggw, ggb, ops=DIFFERENTIABLE_OPS)


class _LinearBackward(Function):
    @staticmethod
    def forward(gy, x, w, needs):
        return _below_autograd(_OPS.linear_bwd.default, gy, x, w, needs)

    setup_context = staticmethod(_ops._setup_backward_op)

    @staticmethod
    def backward(ctx, ggx, ggw, ggb):
        return _ops._backward_of_backward(ctx, ggx, ggw, ggb, ops=DIFFERENTIABLE_OPS)


# The op names the formulas call, as these Functions.
DIFFERENTIABLE_OPS = types.SimpleNamespace(
    linear_relu_bwd=_LinearReLUBackward.apply,
    linear_bwd=_LinearBackward.apply,
    linear_fwd=_Linear.apply,
)


def linear_relu(x, w, b):
    """relu(x @ w.T + b) for a 2-D x, differentiable under torch.func."""
    return _LinearReLU.apply(x, w, b)[0]


def linear(x, w, b):
    """x @ w.T + b for a 2-D x, differentiable under torch.func."""
    return _Linear.apply(x, w, b)
