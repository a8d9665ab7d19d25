"""The vendor-GEMM safety net of the CPU layer ops (csrc/cpu/gemm_choice.h, fastmlp.set_gemm):
with "vendor" every layer GEMM is ATen's (MKL) followed by fastmlp's own epilogue, and must give what
nn.Linear + nn.ReLU give, masks included; "auto" times large GEMMs both ways once and records the
choice; the whole-step ops never leave the hand-written kernels."""

import os
import subprocess
import sys

import pytest
import torch

import fastmlp
from fastmlp._reference import pack_bits
from test_inference import NETS, _truth
from test_parity import SHAPES, _check
from _helpers import assert_close_to_truth

pytestmark = pytest.mark.skipif(fastmlp.backend("cpu") != "compiled", reason="needs the compiled extension")


@pytest.mark.parametrize("gemm_mode", ["vendor"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("relu", [True, False], ids=["linear_relu", "linear"])
def test_vendor_layers_match_nn_linear(gemm_mode, dtype, shape, relu):
    batch, fan_in, fan_out = shape
    _check(relu, (batch, fan_in), fan_out, True, dtype, "cpu")


@pytest.mark.parametrize("gemm_mode", ["vendor"], indirect=True)
@pytest.mark.parametrize("relu", [True, False], ids=["linear_relu", "linear"])
def test_vendor_no_bias_and_non_contiguous(gemm_mode, relu):
    _check(relu, (37, 50), 19, False, torch.float32, "cpu")
    _check(relu, (80, 96), 40, True, torch.float32, "cpu", x=torch.randn(80, 2 * 96)[:, ::2])


@pytest.mark.parametrize("gemm_mode", ["vendor"], indirect=True)
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_vendor_no_input_features(gemm_mode):
    """in_features = 0: the output rows are the bias, through the vendor path too."""
    layer = fastmlp.FusedLinearReLU(0, 5)
    with torch.no_grad():
        layer.bias.copy_(torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0]))
    x = torch.randn(4, 0, requires_grad=True)
    y = layer(x)
    assert torch.equal(y, layer.bias.relu().expand(4, 5))
    y.sum().backward()
    assert x.grad.shape == (4, 0) and torch.equal(layer.bias.grad, (layer.bias > 0).float() * 4)


@pytest.mark.parametrize("gemm_mode", ["vendor"], indirect=True)
@pytest.mark.parametrize("n_out", [1, 10, 64, 257])
def test_vendor_mask_is_packed_relu_bits(gemm_mode, n_out):
    torch.manual_seed(2)
    x, w, b = torch.randn(19, 30), torch.randn(n_out, 30), torch.randn(n_out)
    y, mask = torch.ops.fastmlp.linear_relu_fwd(x, w, b)
    assert torch.equal(mask, pack_bits(y > 0))
    torch.testing.assert_close(y, torch.relu(torch.nn.functional.linear(x, w, b)))


@pytest.mark.parametrize("gemm_mode", ["vendor"], indirect=True)
@pytest.mark.parametrize("sizes", NETS, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("batch", [0, 1, 300])
def test_vendor_inference(gemm_mode, sizes, batch):
    torch.manual_seed(batch)
    model = fastmlp.FusedMLP(sizes).eval()
    x = torch.randn(batch, sizes[0])
    with torch.inference_mode():
        ours, theirs = model(x), model.to_torch()(x)
    truth = _truth(x, [m.weight for m in model], [m.bias for m in model])
    assert_close_to_truth(ours, theirs, truth, "output")


@pytest.mark.parametrize("gemm_mode", ["auto"], indirect=True)
def test_auto_times_large_gemms_once_and_records_the_choice(gemm_mode):
    assert fastmlp.backend_info()["gemm"] == "auto"
    assert fastmlp.gemm_choices() == []
    torch.manual_seed(0)
    small = fastmlp.FusedLinearReLU(784, 256)
    small(torch.randn(64, 784, requires_grad=True)).sum().backward()
    assert fastmlp.gemm_choices() == [], "a batch-64 layer must never be timed against the vendor GEMM"
    # 1100 x 784 -> 256: 2 * 1100 * 784 * 256 = 442 Mflop per GEMM, batch 1100: timed.
    _check(True, (1100, 784), 256, True, torch.float32, "cpu")
    choices = fastmlp.gemm_choices()
    assert sorted(c["kind"] for c in choices) == ["forward", "grad_input", "grad_weight"], choices
    for c in choices:
        assert c["dtype"] == "float32" and 1100 in (c["rows"], c["inner"]) and c["threads"] == torch.get_num_threads()
        assert c["fastmlp_us"] > 0 and c["vendor_us"] > 0 and c["gemm"] in ("fastmlp", "vendor")
        assert (c["gemm"] == "vendor") == (c["vendor_us"] * 1.03 < c["fastmlp_us"])
    vendor = {f"{c['kind']} {c['rows']}x{c['inner']}->{c['cols']}" for c in choices if c["gemm"] == "vendor"}
    assert set(fastmlp.backend_info()["cpu_vendor_gemm_shapes"]) == vendor
    # Same shapes again (another batch in the same power-of-two bucket): no new timing.
    _check(True, (1500, 784), 256, True, torch.float32, "cpu")
    assert len(fastmlp.gemm_choices()) == 3
    fastmlp.set_gemm("fastmlp")
    assert fastmlp.gemm_choices() == []


@pytest.mark.parametrize("gemm_mode", ["auto"], indirect=True)
def test_auto_times_only_from_batch_256_and_2_23_flop(gemm_mode):
    torch.manual_seed(0)
    _check(True, (255, 784), 256, True, torch.float32, "cpu")  # 102 Mflop per GEMM, but batch 255
    _check(True, (300, 128), 64, True, torch.float32, "cpu")  # batch 300, but 4.9 Mflop
    assert fastmlp.gemm_choices() == []
    _check(True, (512, 128), 64, True, torch.float32, "cpu")  # 2 * 512 * 128 * 64 = 2^23 flop
    choices = fastmlp.gemm_choices()
    assert sorted(c["kind"] for c in choices) == ["forward", "grad_input", "grad_weight"], choices
    assert all(512 in (c["rows"], c["inner"]) for c in choices)


@pytest.mark.parametrize("dtype, kernels", [("float16", "auto"), ("bfloat16", "avx2"), ("bfloat16", "auto")])
def test_auto_low_precision_gemm_called_again_does_not_deadlock(dtype, kernels):
    """A float16 GEMM (or bfloat16 without bf16 kernels) runs through the float32 choice: once both
    were recorded, the next call came back into the chooser while it held its lock, and hung. Run in
    a child process so that a hang fails this test instead of stopping the suite."""
    code = (
        "import torch, fastmlp; fastmlp.set_cpu_isa(%r); fastmlp.set_gemm('auto'); torch.manual_seed(0)\n"
        "x = torch.randn(300, 784, dtype=torch.%s); w = torch.randn(256, 784, dtype=x.dtype) / 28\n"
        "for _ in range(3):\n"
        "    y, mask = torch.ops.fastmlp.linear_relu_fwd(x, w, None)\n"
        "    torch.ops.fastmlp.linear_relu_bwd(torch.ones_like(y), x, w, mask, [True, True, True])\n"
        "ref = torch.relu(x.float() @ w.float().t())\n"
        "assert (y.float() - ref).abs().max() < 0.1 * ref.abs().max(), 'wrong result'\n"
        "print(len(fastmlp.gemm_choices()), 'choices')\n" % (kernels, dtype))
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, FASTMLP_GEMM="auto"))
    except subprocess.TimeoutExpired:
        pytest.fail(f"{dtype} layer GEMMs in auto mode did not return within 120 s (a deadlock)")
    assert r.returncode == 0 and "choices" in r.stdout, r.stderr


@pytest.mark.parametrize("gemm_mode", ["vendor"], indirect=True)
def test_whole_step_ops_keep_the_hand_written_gemm(gemm_mode):
    """The step ops' dW GEMM applies the optimizer update: vendor mode must not change a bit of them."""
    def run():
        torch.manual_seed(0)
        model = fastmlp.FusedMLP((784, 128, 64, 10))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        x, y = torch.randn(600, 784), torch.randint(0, 10, (600,))
        losses = [model.sgd_step(x[:64], y[:64], opt)] + list(model.train_steps(x, y, opt, batch_size=64))
        return torch.stack([torch.as_tensor(v) for v in losses]), [p.detach().clone() for p in model.parameters()]

    vendor_losses, vendor_params = run()
    fastmlp.set_gemm("fastmlp")
    losses, params = run()
    assert torch.equal(vendor_losses, losses)
    assert all(torch.equal(a, b) for a, b in zip(vendor_params, params))


def test_bad_modes_are_refused():
    with pytest.raises(RuntimeError, match="mode must be 'auto', 'fastmlp' or 'vendor', got 'mkl'"):
        fastmlp.set_gemm("mkl")
    assert fastmlp.backend_info()["gemm"] == "auto"
    env = dict(os.environ, FASTMLP_GEMM="mkl")
    code = "import warnings; warnings.simplefilter('error'); import fastmlp"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "FASTMLP_GEMM=mkl is not a GEMM mode" in r.stderr
    env["FASTMLP_GEMM"] = "vendor"
    code = "import fastmlp; print(fastmlp.backend_info()['gemm'])"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "vendor", r.stderr


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("mode", ["auto", "fastmlp", "vendor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_large_layer_either_gemm(mode, dtype):
    """On CUDA "auto" sends GEMMs of >= 2^28 flop to cuBLAS with fastmlp's ReLU + mask kernel; every
    mode gives nn.Linear's results within the dtype's error, and the mask of its output."""
    fastmlp.set_gemm(mode)
    try:
        torch.manual_seed(0)
        layer = fastmlp.FusedLinearReLU(784, 256, device="cuda", dtype=dtype)
        ref = torch.nn.Sequential(torch.nn.Linear(784, 256, device="cuda", dtype=dtype), torch.nn.ReLU())
        ref[0].load_state_dict(layer.state_dict())
        x = torch.randn(4096, 784, device="cuda", dtype=dtype, requires_grad=True)
        gy = torch.randn(4096, 256, device="cuda", dtype=dtype)
        y, mask = torch.ops.fastmlp.linear_relu_fwd(x, layer.weight, layer.bias)
        assert torch.equal(mask, pack_bits(y > 0))
        got = [layer(x)] + list(torch.autograd.grad(layer(x), [x, layer.weight, layer.bias], gy))
        want = [ref(x)] + list(torch.autograd.grad(ref(x), [x, *ref.parameters()], gy))
        tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
        for g, w in zip(got, want):
            torch.testing.assert_close(g.float(), w.float(), **tol)
    finally:
        fastmlp.set_gemm("auto")
