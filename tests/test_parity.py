"""Fused layers against nn.Linear + nn.ReLU with copied weights: outputs, masks and every gradient."""

import copy

import pytest
import torch
from torch import nn

import fastmlp
from fastmlp._reference import pack_bits
from _helpers import DEVICES, assert_close_to_truth, cpu_isas

SHAPES = [  # (batch, in, out)
    (1, 1, 1),
    (3, 7, 5),
    (64, 784, 256),
    (64, 256, 10),
    (64, 784, 128),
    (64, 128, 64),
    (64, 64, 10),
    (1000, 300, 257),
    (1, 784, 256),
    (0, 784, 256),
    (33, 17, 129),
]


@pytest.fixture(params=cpu_isas())
def isa(request):
    if request.param != "fallback":
        fastmlp.set_cpu_isa(request.param)
    yield request.param
    if request.param != "fallback":
        fastmlp.set_cpu_isa("auto")


def _pair(fan_in, fan_out, bias, relu, dtype, device):
    ref = nn.Linear(fan_in, fan_out, bias=bias, dtype=dtype, device=device)
    cls = fastmlp.FusedLinearReLU if relu else fastmlp.Linear
    ours = cls(fan_in, fan_out, bias=bias, dtype=dtype, device=device)
    ours.load_state_dict(ref.state_dict())
    return ours, (nn.Sequential(ref, nn.ReLU()) if relu else ref)


def _run(module, x, gy):
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    y.backward(gy)
    params = list(module.parameters())
    return [y.detach(), x.grad] + [p.grad for p in params]


def _check(relu, shape_in, fan_out, bias, dtype, device, x=None):
    fan_in = shape_in[-1]
    torch.manual_seed(0)
    ours, ref = _pair(fan_in, fan_out, bias, relu, dtype, device)
    if x is None:
        x = torch.randn(shape_in, dtype=dtype, device=device)
    gy = torch.randn(*x.shape[:-1], fan_out, dtype=dtype, device=device)
    got = _run(ours, x, gy)
    want = _run(ref, x, gy)
    names = ["output", "grad_input", "grad_weight", "grad_bias"]
    if dtype == torch.float64:
        for g, w, n in zip(got, want, names):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10, msg=n)
    else:
        truth = _run(copy.deepcopy(ref).double(), x.double(), gy.double())
        for g, w, t, n in zip(got, want, truth, names):
            assert_close_to_truth(g, w, t, n)
    return ours, got


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("relu", [True, False], ids=["linear_relu", "linear"])
def test_matches_nn_linear(isa, device, dtype, shape, relu):
    batch, fan_in, fan_out = shape
    _check(relu, (batch, fan_in), fan_out, True, dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("relu", [True, False], ids=["linear_relu", "linear"])
def test_no_bias(isa, device, relu):
    ours, _ = _check(relu, (37, 50), 19, False, torch.float32, device)
    assert ours.bias is None


@pytest.mark.parametrize("device", DEVICES)
def test_leading_dims(device):
    _check(True, (4, 6, 33), 21, True, torch.float32, device)
    _check(False, (2, 3, 5, 33), 21, True, torch.float32, device)
    _check(True, (33,), 21, True, torch.float32, device)  # 1-D input, like nn.Linear


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("relu", [True, False], ids=["linear_relu", "linear"])
def test_non_contiguous_input(isa, device, relu):
    base = torch.randn(80, 2 * 96, device=device)
    _check(relu, (80, 96), 40, True, torch.float32, device, x=base[:, ::2])  # strided columns
    _check(relu, (80, 96), 40, True, torch.float32, device, x=torch.randn(96, 80, device=device).t())


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_gives_zero_parameter_grads(device):
    layer = fastmlp.FusedLinearReLU(13, 9, device=device)
    x = torch.randn(0, 13, device=device, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 9)
    y.sum().backward()
    assert x.grad.shape == (0, 13)
    assert torch.equal(layer.weight.grad, torch.zeros_like(layer.weight))
    assert torch.equal(layer.bias.grad, torch.zeros_like(layer.bias))


@pytest.mark.parametrize("device", DEVICES)
def test_relu_at_exact_zero_follows_pytorch(isa, device):
    """Integer-valued operands make many pre-activations exactly 0: ReLU'(0) must be 0, like PyTorch."""
    torch.manual_seed(1)
    ref = nn.Linear(24, 40, device=device)
    with torch.no_grad():
        ref.weight.copy_(torch.randint(-2, 3, ref.weight.shape))
        ref.bias.copy_(torch.randint(-2, 3, ref.bias.shape))
    x = torch.randint(-2, 3, (50, 24), device=device).float()
    ours = fastmlp.FusedLinearReLU.from_linear(ref)
    z = torch.nn.functional.linear(x, ref.weight, ref.bias)
    assert (z == 0).sum() > 50, "the test needs exact zeros in the pre-activation"
    gy = torch.randint(-3, 4, (50, 40), device=device).float()
    got = _run(ours, x, gy)
    want = _run(nn.Sequential(ref, nn.ReLU()), x, gy)
    for g, w in zip(got, want):  # small integers: every sum is exact, so results must be equal
        assert torch.equal(g, w)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_out", [1, 5, 8, 10, 64, 257])
def test_mask_is_packed_relu_bits(isa, device, n_out):
    torch.manual_seed(2)
    x = torch.randn(19, 30, device=device)
    w = torch.randn(n_out, 30, device=device)
    b = torch.randn(n_out, device=device)
    y, mask = torch.ops.fastmlp.linear_relu_fwd(x, w, b)
    assert mask.dtype == torch.uint8 and mask.shape == (19, (n_out + 7) // 8)
    assert torch.equal(mask, pack_bits(y > 0))


def test_nan_propagates_like_torch():
    x = torch.randn(4, 8)
    x[1, 3] = float("nan")
    layer = fastmlp.FusedLinearReLU(8, 20)
    want = torch.relu(torch.nn.functional.linear(x, layer.weight, layer.bias))
    torch.testing.assert_close(layer(x), want, equal_nan=True)


@pytest.mark.parametrize("relu", [True, False], ids=["linear_relu", "linear"])
def test_results_do_not_depend_on_thread_count(relu):
    """Every output is summed in one fixed order, whatever the split over threads."""
    torch.manual_seed(3)
    x = torch.randn(300, 784)
    layer = (fastmlp.FusedLinearReLU if relu else fastmlp.Linear)(784, 256)
    gy = torch.randn(300, 256)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            layer.zero_grad()
            results.append(_run(layer, x, gy))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)
