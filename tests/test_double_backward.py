"""Double backward through the fused layers: the backward ops have derivatives of their own (the
ReLU mask held fixed, as PyTorch's ReLU does), so gradient penalties and Hessian-vector products work
through FusedLinearReLU, Linear and FusedMLP exactly as through nn.Linear / nn.ReLU."""

import pytest
import torch
from torch import nn

import fastmlp
from _helpers import DEVICES

f64 = torch.float64


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(7, 11, 13), (1, 5, 3), (4, 17, 1)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("fn", [fastmlp.linear_relu, fastmlp.linear], ids=["linear_relu", "linear"])
def test_gradgradcheck(device, shape, bias, fn):
    torch.manual_seed(sum(shape))
    m, k, n = shape
    x = torch.randn(m, k, dtype=f64, device=device, requires_grad=True)
    w = torch.randn(n, k, dtype=f64, device=device, requires_grad=True)
    b = torch.randn(n, dtype=f64, device=device, requires_grad=True) if bias else None
    inputs = (x, w, b) if bias else (x, w)
    assert torch.autograd.gradgradcheck(lambda *a: fn(*a), inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_gradgradcheck_only_input_requires_grad(device):
    """The gradient-penalty case: x requires grad, the parameters are constants."""
    torch.manual_seed(1)
    x = torch.randn(6, 9, dtype=f64, device=device, requires_grad=True)
    w, b = torch.randn(8, 9, dtype=f64, device=device), torch.randn(8, dtype=f64, device=device)
    assert torch.autograd.gradgradcheck(lambda x: fastmlp.linear_relu(x, w, b), (x,), eps=1e-6, atol=1e-6)


def _twins(sizes, device, dtype=f64):
    torch.manual_seed(2)
    fused = fastmlp.FusedMLP(sizes, device=device, dtype=dtype)
    return fused, fused.to_torch()


def _penalty_grads(model, x):
    """WGAN-GP style: mean (||d out.sum() / dx|| - 1)^2, differentiated w.r.t. the parameters."""
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
    penalty = ((g.norm(dim=1) - 1) ** 2).mean()
    # (the last bias does not reach d out / dx: its gradient is 0)
    return torch.autograd.grad(penalty, list(model.parameters()), allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sizes", [(784, 128, 64, 10), (30, 20, 1)], ids=lambda s: "-".join(map(str, s)))
def test_gradient_penalty_matches_plain_model(device, sizes):
    fused, plain = _twins(sizes, device)
    x = torch.randn(16, sizes[0], dtype=f64, device=device)
    for got, want in zip(_penalty_grads(fused, x), _penalty_grads(plain, x)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_hessian_vector_product_matches_plain_model(device):
    fused, plain = _twins((20, 16, 8, 4), device)
    x = torch.randn(10, 20, dtype=f64, device=device)
    y = torch.randint(0, 4, (10,), device=device)

    def hvp(model):
        params = list(model.parameters())
        loss = nn.functional.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        vs = [torch.ones_like(p) / p.numel() for p in params]
        dot = sum((g * v).sum() for g, v in zip(grads, vs))
        return torch.autograd.grad(dot, params)

    for got, want in zip(hvp(fused), hvp(plain)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_float32_penalty_close_to_plain():
    fused, plain = _twins((784, 128, 64, 10), "cpu", torch.float32)
    x = torch.randn(64, 784)
    for got, want in zip(_penalty_grads(fused, x), _penalty_grads(plain, x)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("fn,ref", [(fastmlp.linear_relu, lambda *a: torch.relu(nn.functional.linear(*a))),
                                    (fastmlp.linear, nn.functional.linear)], ids=["linear_relu", "linear"])
def test_torch_func_grad_of_grad(device, bias, fn, ref):
    """torch.func.grad of a fused layer, composed twice, w.r.t. the input and the weight."""
    from torch.func import grad
    torch.manual_seed(3)
    x = torch.randn(6, 5, dtype=f64, device=device)
    w = torch.randn(7, 5, dtype=f64, device=device)
    b = torch.randn(7, dtype=f64, device=device) if bias else None
    def second(layer, wrt):
        def loss(t):
            args = (t, w, b) if wrt == "x" else (x, t, b)
            return layer(*args).pow(3).sum()
        return grad(lambda t: grad(loss)(t).pow(2).sum())(x if wrt == "x" else w)
    for wrt in ("x", "w"):
        torch.testing.assert_close(second(fn, wrt), second(ref, wrt), rtol=1e-10, atol=1e-10)


def test_torch_func_through_fused_mlp():
    """torch.func.grad of a loss over FusedMLP's parameters (functional_call) equals the plain model's,
    and so does a gradient penalty taken with torch.func inside it."""
    from torch.func import functional_call, grad
    fused, plain = _twins((12, 9, 4), "cpu")
    x, y = torch.randn(5, 12, dtype=f64), torch.randint(0, 4, (5,))

    def grads(model):
        params = dict(model.named_parameters())

        def loss(p):
            out = functional_call(model, p, (x,))
            dx = grad(lambda xx: functional_call(model, p, (xx,)).sum())(x)
            return nn.functional.cross_entropy(out, y) + dx.pow(2).sum()

        return grad(loss)(params)

    got, want = grads(fused), grads(plain)
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-12)
