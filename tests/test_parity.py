"""Fused layers against nn.Linear + nn.ReLU with copied weights: outputs, masks and every gradient.
Tests taking the `isa` fixture (conftest.py) run once per CPU kernel family."""

import copy

import pytest
import torch
from torch import nn

import fastmlp
from fastmlp._reference import pack_bits
from _helpers import DEVICES, assert_close_to_truth

SHAPES = [  # (batch, in, out)
    (1, 1, 1),
    (3, 7, 5),
    (64, 784, 256),
    (64, 256, 10),
    (64, 784, 128),
    (64, 128, 64),
    (64, 64, 10),
    (1000, 300, 257),
    (700, 33, 10),  # more rows than one block of the bias gradient's sum (runner.h kBiasSumRows), K tail
    (1, 784, 256),
    (0, 784, 256),
    (33, 17, 129),
    # A handful of rows: the forward's dot-product path (csrc/cpu/gemm_impl.h, dot_block), with K
    # tails, a partial column group and mask byte, and the crossovers either side.
    (2, 784, 256),
    (4, 33, 70),
    (6, 784, 128),
    (7, 64, 64),
    (16, 100, 10),
    (17, 100, 10),
]

NAMES = ["output", "grad_input", "grad_weight", "grad_bias"]  # what _run returns, in order


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
    if dtype == torch.float64:
        for g, w, n in zip(got, want, NAMES):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10, msg=n)
    else:
        truth = _run(copy.deepcopy(ref).double(), x.double(), gy.double())
        for g, w, t, n in zip(got, want, truth, NAMES):
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
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("relu", [True, False], ids=["linear_relu", "linear"])
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_no_input_features(isa, device, dtype, relu):
    """in_features = 0: every output row is the bias (then ReLU), the weight gradient is empty and the
    bias gradient is grad_output summed over the batch (where the ReLU is on)."""
    ours, ref = _pair(0, 9, True, relu, dtype, device)
    # nn.Linear starts the bias of a layer without inputs at zero, which would hide a dropped bias.
    bias = torch.tensor([1.5, -2.0, 0.25, -0.5, 3.0, -1.0, 0.75, 2.5, -0.125], dtype=dtype, device=device)
    with torch.no_grad():
        ours.bias.copy_(bias)
        (ref[0] if relu else ref).bias.copy_(bias)
    torch.manual_seed(4)
    x = torch.randn(6, 0, dtype=dtype, device=device)
    gy = torch.randn(6, 9, dtype=dtype, device=device)
    got = _run(ours, x, gy)
    y, gx, gw, gb = got
    on = bias > 0 if relu else torch.ones_like(bias, dtype=torch.bool)
    assert torch.equal(y, torch.where(on, bias, 0).expand(6, 9))
    assert gx.shape == (6, 0) and gw.shape == (9, 0)
    torch.testing.assert_close(gb, torch.where(on, gy, 0).sum(0))
    for g, w, name in zip(got, _run(ref, x, gy), NAMES):
        torch.testing.assert_close(g, w, msg=name)


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
@pytest.mark.parametrize("rows", [1, 19])
def test_mask_is_packed_relu_bits(isa, device, n_out, rows):
    torch.manual_seed(2)
    x = torch.randn(rows, 30, device=device)
    w = torch.randn(n_out, 30, device=device)
    b = torch.randn(n_out, device=device)
    y, mask = torch.ops.fastmlp.linear_relu_fwd(x, w, b)
    assert mask.dtype == torch.uint8 and mask.shape == (rows, (n_out + 7) // 8)
    assert torch.equal(mask, pack_bits(y > 0))


def test_nan_propagates_like_torch():
    x = torch.randn(4, 8)
    x[1, 3] = float("nan")
    layer = fastmlp.FusedLinearReLU(8, 20)
    want = torch.relu(torch.nn.functional.linear(x, layer.weight, layer.bias))
    torch.testing.assert_close(layer(x), want, equal_nan=True)


def _nan_case(where, relu, device):
    """(ours, PyTorch's twin, x, grad_output) with a NaN in `where`; for grad_output, one NaN where the
    ReLU is on and one where it is off."""
    torch.manual_seed(5)
    ours, ref = _pair(8, 20, True, relu, torch.float32, device)
    x = torch.randn(6, 8, device=device)
    gy = torch.randn(6, 20, device=device)
    if where == "x":
        x[1, 3] = float("nan")
    elif where == "weight":
        with torch.no_grad():
            ours.weight[5, 2] = (ref[0] if relu else ref).weight[5, 2] = float("nan")
    else:
        z = torch.nn.functional.linear(x, ours.weight, ours.bias)
        for positions in ((z > 0).nonzero(), (z <= 0).nonzero()):
            gy[tuple(positions[0])] = float("nan")
    return ours, ref, x, gy


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("where", ["grad_output", "x", "weight"])
@pytest.mark.parametrize("relu", [True, False], ids=["linear_relu", "linear"])
def test_nan_in_backward_like_torch(isa, device, where, relu):
    """A NaN in grad_output, x or the weight is NaN in the same output and gradient entries as with
    PyTorch. ReLU's backward selects like PyTorch's (0 where z <= 0, else grad_output), so a NaN of
    grad_output where the ReLU is off gives no NaN, as multiplying by the mask would."""
    ours, ref, x, gy = _nan_case(where, relu, device)
    got, want = _run(ours, x, gy), _run(ref, x, gy)
    for g, w, name in zip(got, want, NAMES):
        assert torch.equal(g.isnan(), w.isnan()), f"{name}: NaN at {g.isnan().nonzero().tolist()}, " \
            f"PyTorch's at {w.isnan().nonzero().tolist()}"
        if where == "grad_output" or not relu:  # no NaN pre-activation: every other entry as PyTorch's too
            torch.testing.assert_close(g, w, equal_nan=True, msg=name)
    assert any(g.isnan().any() for g in got[1:]), "the case must put a NaN in some gradient"


@pytest.mark.xfail(strict=True, reason="ReLU'(NaN): PyTorch's ReLU backward passes grad_output where the "
                   "pre-activation is NaN (it zeroes only z <= 0); fastmlp's mask is z > 0 and zeroes it")
@pytest.mark.parametrize("where", ["x", "weight"])
def test_nan_preactivation_gradients_like_torch(where):
    ours, ref, x, gy = _nan_case(where, True, "cpu")
    for g, w, name in zip(_run(ours, x, gy), _run(ref, x, gy), NAMES):
        torch.testing.assert_close(g, w, equal_nan=True, msg=name)


@pytest.mark.skipif(fastmlp.backend("cpu") != "compiled", reason="the fallback is PyTorch's GEMM: no such promise")
@pytest.mark.parametrize("relu", [True, False], ids=["linear_relu", "linear"])
@pytest.mark.parametrize("rows", [2100, 300, 6, 3])
@pytest.mark.parametrize("n_out", [256, 10])
def test_results_do_not_depend_on_thread_count(relu, rows, n_out):
    """Every output is summed in one fixed order, whatever the split over threads (2100 rows: tall
    GEMMs split by rows, runner.h kRowSplitRows, and dW a sum of many K blocks; 300 and 2100 rows:
    the bias gradient summed in blocks of rows, split by blocks; 3 rows: dW a sum of 3 terms, split
    by rows too). fastmlp's GEMMs only: in "auto" mode each thread count times its own choice of GEMM
    per shape, and where the vendor GEMM wins for one count and not the other the results differ."""
    torch.manual_seed(3)
    x = torch.randn(rows, 784)
    layer = (fastmlp.FusedLinearReLU if relu else fastmlp.Linear)(784, n_out)
    gy = torch.randn(rows, n_out)
    before, mode = torch.get_num_threads(), fastmlp.backend_info()["gemm"]
    fastmlp.set_gemm("fastmlp")
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            layer.zero_grad()
            results.append(_run(layer, x, gy))
    finally:
        torch.set_num_threads(before)
        fastmlp.set_gemm(mode)
    for a, b in zip(*results):
        assert torch.equal(a, b)
