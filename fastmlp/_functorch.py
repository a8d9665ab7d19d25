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


def _function(name, op, setup_context, formula):
    """An autograd.Function that runs `op` below autograd and differentiates with `formula` (one of
    fastmlp/_ops.py's backward functions) over DIFFERENTIABLE_OPS."""

    def forward(*args):
        return _below_autograd(op, *args)

    def backward(ctx, *grads):
        return formula(ctx, *grads, ops=DIFFERENTIABLE_OPS)

    return type(name, (Function,), {"forward": staticmethod(forward), "setup_context": staticmethod(setup_context),
                                    "backward": staticmethod(backward)})


_LinearReLU = _function("_LinearReLU", _OPS.linear_relu_fwd.default, _ops._setup_linear_relu,
                        _ops._backward_linear_relu)
_Linear = _function("_Linear", _OPS.linear_fwd.default, _ops._setup_linear, _ops._backward_linear)
_LinearReLUBackward = _function("_LinearReLUBackward", _OPS.linear_relu_bwd.default, _ops._setup_backward_op,
                                _ops._backward_of_backward)
_LinearBackward = _function("_LinearBackward", _OPS.linear_bwd.default, _ops._setup_backward_op,
                            _ops._backward_of_backward)


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
