"""gradcheck (float64), torch.library.opcheck on every op, torch.compile(fullgraph=True)."""

import pytest
import torch

import fastmlp
from _helpers import DEVICES


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("fn", [fastmlp.linear_relu, fastmlp.linear], ids=["linear_relu", "linear"])
def test_gradcheck(device, bias, fn):
    torch.manual_seed(0)
    x = torch.randn(7, 11, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(13, 11, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(13, dtype=torch.float64, device=device, requires_grad=True) if bias else None
    inputs = (x, w, b)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_partial_needs(device):
    """Only some inputs require grad: the backward op must skip the rest and still be right."""
    torch.manual_seed(1)
    x = torch.randn(5, 6, dtype=torch.float64, device=device)
    w = torch.randn(4, 6, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, device=device)
    assert torch.autograd.gradcheck(lambda w: fastmlp.linear_relu(x, w, b), (w,))
    x.requires_grad_(True)
    w.requires_grad_(False)
    assert torch.autograd.gradcheck(lambda x: fastmlp.linear_relu(x, w, b), (x,))


def _op_cases(device):
    torch.manual_seed(2)
    x = torch.randn(9, 12, device=device)
    w = torch.randn(10, 12, device=device)
    b = torch.randn(10, device=device)
    gy = torch.randn(9, 10, device=device)
    _, mask = torch.ops.fastmlp.linear_relu_fwd(x, w, b)
    rg = lambda t: t.clone().requires_grad_(True)  # noqa: E731
    ops = torch.ops.fastmlp
    return [
        (ops.linear_relu_fwd.default, (x, w, b)),
        (ops.linear_relu_fwd.default, (rg(x), rg(w), rg(b))),
        (ops.linear_relu_fwd.default, (rg(x), w, None)),
        (ops.linear_fwd.default, (x, w, b)),
        (ops.linear_fwd.default, (rg(x), rg(w), rg(b))),
        (ops.linear_fwd.default, (x, rg(w), None)),
        (ops.linear_relu_bwd.default, (gy, x, w, mask, [True, True, True])),
        (ops.linear_relu_bwd.default, (gy, x, w, mask, [False, True, False])),
        (ops.linear_bwd.default, (gy, x, w, [True, True, True])),
        (ops.linear_bwd.default, (gy, x, w, [True, False, True])),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(10))
def test_opcheck(device, case):
    op, args = _op_cases(device)[case]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_matches_eager(device):
    torch.manual_seed(3)
    model = fastmlp.FusedMLP([784, 128, 64, 10], device=device)
    x = torch.randn(64, 784, device=device)
    target = torch.randint(0, 10, (64,), device=device)

    def loss_fn(m):
        return torch.nn.functional.cross_entropy(m(x), target)

    compiled = torch.compile(model, fullgraph=True)
    eager_loss = loss_fn(model)
    eager_loss.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    compiled_loss = loss_fn(compiled)
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss)
    for got, want in zip([p.grad for p in model.parameters()], eager_grads):
        torch.testing.assert_close(got, want)
