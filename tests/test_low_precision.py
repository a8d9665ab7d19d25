"""bfloat16 (and float16) on the CPU, and autocast: fastmlp's layers in a low-precision dtype, and
under torch.autocast, against nn.Linear + nn.ReLU doing the same, outputs and every gradient compared
with a float64 truth: our error at most 2x PyTorch's own plus a small floor. Tests taking `low_isa`
run once per CPU kernel family, and on the AMX kernels through their emulator ("amx-emulated")."""

import copy
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import fastmlp
from fastmlp._reference import pack_bits
from test_parity import _pair

ops = torch.ops.fastmlp
LOW = [torch.bfloat16, torch.float16]


def assert_close_low(ours, theirs, truth, name, factor=2.0):
    """Our max error to the float64 truth within `factor` times PyTorch's own, plus 2^-10 of the largest
    value (for elements PyTorch happens to round exactly)."""
    assert ours.shape == truth.shape and ours.dtype == theirs.dtype, (name, ours.shape, ours.dtype, theirs.dtype)
    if truth.numel() == 0:
        return
    truth = truth.double()
    theirs_err = (theirs.double() - truth).abs().max().item()
    ours_err = (ours.double() - truth).abs().max().item()
    tol = factor * theirs_err + 2.0**-10 * max(truth.abs().max().item(), 1e-30)
    assert ours_err <= tol, f"{name}: max error {ours_err:.3g} vs PyTorch's {theirs_err:.3g} (tol {tol:.3g})"


def _run(module, x, gy, autocast=None):
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    if autocast is None:
        y = module(x)
    else:
        with torch.autocast("cpu", dtype=autocast):
            y = module(x)
    y.backward(gy.to(y.dtype))
    return [y.detach(), x.grad] + [p.grad for p in module.parameters()]


NAMES = ["output", "grad_input", "grad_weight", "grad_bias"]
SHAPES = [  # (input shape, out): K tails, N = 1 / 10 / 257, batch 1, an empty batch, 3-D input
    ((64, 785), 256), ((64, 784), 10), ((5, 33), 257), ((1, 784), 128), ((17, 40), 1), ((0, 33), 10),
    ((3, 4, 33), 20),
]


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{'x'.join(map(str, s[0]))}-{s[1]}")
@pytest.mark.parametrize("relu", [True, False], ids=["linear_relu", "linear"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_low_precision_layers_match_nn_linear(low_isa, dtype, shape, relu, bias):
    shape_in, fan_out = shape
    torch.manual_seed(fan_out)
    ours, ref = _pair(shape_in[-1], fan_out, bias, relu, dtype, "cpu")
    x = torch.randn(shape_in, dtype=dtype)
    gy = torch.randn(*shape_in[:-1], fan_out, dtype=dtype)
    got, want = _run(ours, x, gy), _run(ref, x, gy)
    truth = _run(copy.deepcopy(ref).double(), x.double(), gy.double())
    for g, w, t, n in zip(got, want, truth, NAMES):
        assert g.dtype == dtype, n
        assert_close_low(g, w, t, n)


@pytest.mark.skipif(fastmlp.backend("cpu") != "compiled", reason="needs the compiled extension")
@pytest.mark.parametrize("gemm_mode", ["vendor"], indirect=True)
@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", SHAPES[:5], ids=lambda s: f"{'x'.join(map(str, s[0]))}-{s[1]}")
@pytest.mark.parametrize("relu", [True, False], ids=["linear_relu", "linear"])
def test_vendor_gemm_is_pytorchs_layer_bit_for_bit(gemm_mode, dtype, shape, relu):
    """With ATen's low-precision GEMM (FASTMLP_GEMM=vendor), output, input and weight gradients equal
    nn.Linear + nn.ReLU's in that dtype bit for bit (fastmlp's ReLU + mask pass is exact); the bias
    gradient, summed in float32 in another order, within its rounding."""
    shape_in, fan_out = shape
    torch.manual_seed(fan_out)
    ours, ref = _pair(shape_in[-1], fan_out, True, relu, dtype, "cpu")
    x, gy = torch.randn(shape_in, dtype=dtype), torch.randn(*shape_in[:-1], fan_out, dtype=dtype)
    got, want = _run(ours, x, gy), _run(ref, x, gy)
    for g, w, n in zip(got[:3], want[:3], NAMES):
        assert torch.equal(g, w), n
    torch.testing.assert_close(got[3], want[3], rtol=2**-7, atol=1e-3)
    x[0, :3] = float("nan")  # NaN stays NaN through the ReLU, as with torch.relu
    with torch.no_grad():
        assert torch.equal(ours(x).nan_to_num(7.0), ref(x).nan_to_num(7.0))


@pytest.mark.parametrize("relu", [True, False], ids=["linear_relu", "linear"])
def test_non_contiguous_bf16_input(low_isa, relu):
    torch.manual_seed(3)
    ours, ref = _pair(96, 40, True, relu, torch.bfloat16, "cpu")
    x = torch.randn(80, 2 * 96, dtype=torch.bfloat16)[:, ::2]
    gy = torch.randn(80, 40, dtype=torch.bfloat16)
    truth = _run(copy.deepcopy(ref).double(), x.double(), gy.double())
    for g, w, t, n in zip(_run(ours, x, gy), _run(ref, x, gy), truth, NAMES):
        assert_close_low(g, w, t, n)


def test_bf16_relu_at_exact_zero_and_mask(low_isa):
    """Small integers: every bf16 sum is exact, so ours must equal PyTorch's bit for bit, ReLU'(0) = 0
    included, and the mask is packbits(y > 0)."""
    torch.manual_seed(1)
    x = torch.randint(-2, 3, (50, 24)).bfloat16()
    w = torch.randint(-2, 3, (40, 24)).bfloat16()
    b = torch.randint(-2, 3, (40,)).bfloat16()
    y, mask = ops.linear_relu_fwd(x, w, b)
    z = nn.functional.linear(x, w, b)
    assert (z == 0).sum() > 50
    assert torch.equal(y, z.relu()) and torch.equal(mask, pack_bits(y > 0))
    gy = torch.randint(-3, 4, (50, 40)).bfloat16()
    ours, ref = _pair(24, 40, True, True, torch.bfloat16, "cpu")
    with torch.no_grad():
        ref[0].weight.copy_(w), ref[0].bias.copy_(b), ours.weight.copy_(w), ours.bias.copy_(b)
    for g, want in zip(_run(ours, x, gy), _run(ref, x, gy)):
        assert torch.equal(g, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("sizes", [(784, 128, 64, 10), (784, 256, 10), (33, 7, 1)], ids=lambda s: "-".join(map(str, s)))
def test_autocast_model_matches_pytorch_autocast(low_isa, dtype, sizes):
    """Outputs in the autocast dtype, parameter gradients in float32, as nn.Linear under autocast."""
    torch.manual_seed(7)
    model = fastmlp.FusedMLP(sizes)
    plain = model.to_torch()
    x = torch.randn(48, sizes[0])
    gy = torch.randn(48, sizes[-1])
    got, want = _run(model, x, gy, autocast=dtype), _run(plain, x, gy, autocast=dtype)
    truth = _run(copy.deepcopy(plain).double(), x.double(), gy.double())
    assert got[0].dtype == want[0].dtype == dtype
    for i, (g, w, t) in enumerate(zip(got, want, truth)):
        assert g.dtype == w.dtype, i
        assert_close_low(g, w, t, f"tensor {i}")
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype):  # the one-op inference path
        ours, theirs = model(x), plain(x)
    assert ours.dtype == dtype
    assert_close_low(ours, theirs, truth[0], "inference output")


def test_autocast_mixed_with_nn_linear(low_isa):
    """fastmlp layers between nn.Linear layers under autocast: no dtype mismatch, PyTorch's results."""
    torch.manual_seed(8)
    plain = nn.Sequential(nn.Linear(30, 40), nn.ReLU(), nn.Linear(40, 20), nn.ReLU(), nn.Linear(20, 5))
    mixed = copy.deepcopy(plain)
    mixed[2] = fastmlp.FusedLinearReLU.from_linear(plain[2])
    mixed[3] = nn.Identity()
    x, gy = torch.randn(16, 30), torch.randn(16, 5)
    truth = _run(copy.deepcopy(plain).double(), x.double(), gy.double())
    got, want = _run(mixed, x, gy, autocast=torch.bfloat16), _run(plain, x, gy, autocast=torch.bfloat16)
    for i, (g, w, t) in enumerate(zip(got, want, truth)):
        assert g.dtype == w.dtype, i
        assert_close_low(g, w, t, f"tensor {i}")


def test_float64_is_not_cast_by_autocast():
    layer = fastmlp.FusedLinearReLU(8, 4, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(3, 8, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("sizes", [(784, 128, 64, 10), (784, 256, 10)], ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("batch", [0, 1, 64])
def test_bf16_inference_rounds_each_layer_like_the_plain_model(low_isa, sizes, batch):
    torch.manual_seed(batch)
    model = fastmlp.FusedMLP(sizes, dtype=torch.bfloat16).eval()
    plain = model.to_torch()
    x = torch.randn(batch, sizes[0], dtype=torch.bfloat16)
    with torch.inference_mode():
        ours, theirs = model(x), plain(x)
        truth = copy.deepcopy(plain).double()(x.double())
    assert ours.dtype == torch.bfloat16
    assert_close_low(ours, theirs, truth, "output")


def test_opcheck_bf16():
    torch.manual_seed(5)
    x, w, b = torch.randn(6, 12).bfloat16(), torch.randn(9, 12).bfloat16(), torch.randn(9).bfloat16()
    gy = torch.randn(6, 9).bfloat16()
    torch.library.opcheck(ops.linear_relu_fwd.default, (x, w, b))
    torch.library.opcheck(ops.linear_fwd.default, (x, w, None))
    _, mask = ops.linear_relu_fwd(x, w, b)
    torch.library.opcheck(ops.linear_relu_bwd.default, (gy, x, w, mask, [True, True, True]))
    torch.library.opcheck(ops.linear_bwd.default, (gy, x, w, [True, True, False]))
    torch.library.opcheck(ops.mlp_forward.default, (x, [w, torch.randn(3, 9).bfloat16()], [], False))


def test_torch_compile_fullgraph_bf16_and_autocast():
    torch.manual_seed(6)
    model = fastmlp.FusedMLP((40, 30, 10))
    plain = model.to_torch()
    x = torch.randn(8, 40)

    def loss_fn(m, inp):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return m(inp).float().square().mean()

    compiled = torch.compile(lambda inp: loss_fn(model, inp), fullgraph=True)
    got = compiled(x)
    got.backward()
    want = loss_fn(plain, x)
    want.backward()
    torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-3)
    for a, b in zip(model.parameters(), plain.parameters()):
        assert a.grad.dtype == torch.float32
        torch.testing.assert_close(a.grad, b.grad, rtol=5e-2, atol=5e-3)
    bf = fastmlp.FusedMLP((40, 30, 10), dtype=torch.bfloat16)
    out = torch.compile(bf, fullgraph=True)(x.bfloat16())
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("gemm_mode", ["fastmlp"], indirect=True)  # "auto" might time ATen's GEMM faster
@pytest.mark.parametrize("real", ["amx", "avx512-bf16"])
def test_bf16_gemms_and_their_emulators_agree_bit_for_bit(real, gemm_mode):
    """Where the CPU has the instructions, the kernel on them and on its emulator give the same bits:
    layer forward and backward (K tail, N tail, subnormal inputs) and the bf16 whole step's loss and
    parameters."""
    if real not in fastmlp.backend_info().get("supported_cpu_isas", []):
        pytest.skip(f"CPU lacks {real}")
    torch.manual_seed(9)
    x, w, b = torch.randn(70, 785).bfloat16(), torch.randn(257, 785).bfloat16(), torch.randn(257).bfloat16()
    x[0, :8] = torch.tensor([1e-39, -1e-39, 2e-40, 3e-39, -5e-40, 1e-38, 9e-39, -2e-39]).bfloat16()  # subnormal
    gy = torch.randn(70, 257).bfloat16()
    xs, ys = torch.randn(130, 785), torch.randint(0, 257, (130,))
    results = {}
    for isa in (real, f"{real}-emulated"):
        fastmlp.set_cpu_isa(isa)
        try:
            y, mask = ops.linear_relu_fwd(x, w, b)
            torch.manual_seed(1)
            model = fastmlp.FusedMLP([785, 65, 257])
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            losses = model.train_steps(xs, ys, opt, 64, precision="bf16")
            results[isa] = (y, mask, *ops.linear_relu_bwd(gy, x, w, mask, [True, True, True]), losses,
                            *model.parameters())
        finally:
            fastmlp.set_cpu_isa("auto")
    for a, e in zip(results[real], results[f"{real}-emulated"]):
        assert torch.equal(a, e)


@pytest.mark.skipif(fastmlp.backend("cpu") != "compiled", reason="needs the compiled extension")
def test_amx_refused_falls_back_to_float32_kernels():
    """Where Linux refuses AMX tile data (simulated with FASTMLP_REFUSE_AMX=1), bfloat16 still works, on
    the float32 kernels; "amx" is then neither chosen nor accepted."""
    code = (
        "import json, torch, fastmlp\n"
        "info = fastmlp.backend_info()\n"
        "torch.manual_seed(0)\n"
        "x, w = torch.randn(6, 33).bfloat16(), torch.randn(9, 33).bfloat16()\n"
        "y = fastmlp.linear_relu(x, w, None)\n"
        "ref = torch.relu(torch.nn.functional.linear(x.double(), w.double()))\n"
        "ok = y.dtype == torch.bfloat16 and bool(((y.double() - ref).abs() <= 2**-7 * ref.abs() + 1e-6).all())\n"
        "try:\n    fastmlp.set_cpu_isa('amx'); refused = False\nexcept RuntimeError:\n    refused = True\n"
        "print(json.dumps([info['cpu_isa'], info['cpu_bf16'], info['supported_cpu_isas'], bool(ok), refused]))\n"
    )
    env = dict(os.environ, FASTMLP_REFUSE_AMX="1")
    env.pop("FASTMLP_CPU_ISA", None)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    import json

    isa, bf16, supported, ok, refused = json.loads(r.stdout.strip().splitlines()[-1])
    assert isa != "amx" and "amx" not in supported and not bf16.startswith("amx") and refused
    assert ok


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_autocast_matches_pytorch_autocast(dtype):
    """AutocastCUDA: fastmlp layers follow torch.autocast("cuda") as nn.Linear does."""
    torch.manual_seed(11)
    model = fastmlp.FusedMLP((784, 128, 64, 10), device="cuda")
    plain = model.to_torch()
    x, gy = torch.randn(96, 784, device="cuda"), torch.randn(96, 10, device="cuda")

    def run(m):
        m.zero_grad(set_to_none=True)
        xr = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=dtype):
            y = m(xr)
        y.backward(gy.to(y.dtype))
        return [y.detach(), xr.grad] + [p.grad for p in m.parameters()]

    got, want = run(model), run(plain)
    truth = _run(copy.deepcopy(plain).double().cpu(), x.double().cpu(), gy.double().cpu())
    for i, (g, w, t) in enumerate(zip(got, want, truth)):
        assert g.dtype == w.dtype, i
        assert_close_low(g.cpu(), w.cpu(), t, f"tensor {i}", factor=4.0)


def test_autocast_in_the_pure_pytorch_fallback():
    """Without the extension (FASTMLP_DISABLE_EXTENSION=1) the ops' Python autocast rule casts as the
    compiled one does, so training under autocast works there too (the fallback's backward needs the
    dtypes the forward computed in)."""
    code = (
        "import torch, fastmlp\n"
        "assert fastmlp.backend() == 'fallback'\n"
        "torch.manual_seed(0)\n"
        "m = fastmlp.FusedMLP((20, 10, 3)); p = m.to_torch()\n"
        "x = torch.randn(8, 20)\n"
        "with torch.autocast('cpu', dtype=torch.bfloat16):\n"
        "    y, yp = m(x), p(x)\n"
        "y.float().sum().backward(); yp.float().sum().backward()\n"
        "assert y.dtype == torch.bfloat16 and torch.equal(y, yp)\n"
        "for a, b in zip(m.parameters(), p.parameters()):\n"
        "    assert a.grad.dtype == torch.float32 and torch.allclose(a.grad, b.grad, rtol=1e-2, atol=1e-3)\n"
        "opt = torch.optim.SGD(m.parameters(), lr=0.1)\n"
        "loss = m.train_step(x, torch.randint(0, 3, (8,)), opt, precision='bf16')\n"
        "print('ok', float(loss))\n"
    )
    env = dict(os.environ, FASTMLP_DISABLE_EXTENSION="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]
