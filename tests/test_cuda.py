"""The hand-written CUDA kernels (csrc/cuda) against nn.Linear + nn.ReLU, the reference ops and
gradcheck. GPU tests skip without a GPU; the build/registration tests run anywhere.

The CUDA kernels are opt-in (FASTMLP_CUDA_KERNELS=1, read when fastmlp is imported), so this module
sets the variable before importing fastmlp. If fastmlp was already imported without it (another
test module first), the GPU tests fail with a hint instead of silently testing the PyTorch
reference: run `FASTMLP_CUDA_KERNELS=1 pytest tests/test_cuda.py`.

Parity data are small multiples of powers of two ("grid" data): every product and every partial sum
is exact in FP32, so any summation order gives the same FP32 result as cuBLAS, the ReLU mask cannot
flip on rounding noise, and float32/float64 results must match nn.Linear exactly. Random-data tests
compare against float64 with tolerances instead, using the kernels' own mask for the backward.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

_saved_env = os.environ.get("FASTMLP_CUDA_KERNELS")
os.environ["FASTMLP_CUDA_KERNELS"] = "1"  # read when fastmlp is first imported
import fastmlp  # noqa: E402
from fastmlp import _ops  # noqa: E402
from fastmlp import _reference as ref  # noqa: E402

# Restore the environment so that other tests' subprocesses do not inherit the opt-in.
if _saved_env is None:
    del os.environ["FASTMLP_CUDA_KERNELS"]
else:
    os.environ["FASTMLP_CUDA_KERNELS"] = _saved_env

# The directory holding the fastmlp package this process imported (source tree or site-packages).
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(fastmlp.__file__)))
HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
BUILT_WITH_CUDA_KERNELS = _ops._C is not None and bool(getattr(_ops._C, "has_cuda_kernels", lambda: False)())

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# (batch, in_features, out_features)
SHAPES = [
    (1, 1, 1),
    (3, 7, 5),
    (64, 784, 256),
    (64, 256, 10),
    (64, 784, 128),
    (64, 128, 64),
    (64, 64, 10),
    (1000, 300, 257),
    (0, 16, 8),  # empty batch
    (5, 0, 3),  # no input features: y = relu(b)
    (70, 33, 130),  # partial tiles everywhere
]
# Tolerances for the grid data: float32/float64 are exact; float16/bfloat16 allow one rounding
# difference in case cuBLAS rounds a bias addition separately.
EXACT = dict(rtol=0.0, atol=0.0)
TOL = {
    torch.float32: EXACT,
    torch.float64: EXACT,
    torch.float16: dict(rtol=1e-3, atol=1e-5),
    torch.bfloat16: dict(rtol=8e-3, atol=1e-5),
}


def _grid(shape, scale, gen):
    """Integers in [-4, 4] times `scale` (a power of two): exact in every dtype tested here."""
    return torch.randint(-4, 5, shape, generator=gen).to(torch.float64) * scale


@pytest.fixture
def cuda_kernels():
    """The hand-written kernels serve CUDA tensors; reduced-precision cuBLAS paths are off for the
    nn.Linear reference (and TF32 for our float32 path)."""
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    assert BUILT_WITH_CUDA_KERNELS, (
        "fastmlp's extension was built without its CUDA sources (or not built): rebuild with nvcc on PATH"
    )
    assert fastmlp.backend("cuda") == "compiled", (
        "fastmlp was imported before tests/test_cuda.py set FASTMLP_CUDA_KERNELS=1; run "
        "`FASTMLP_CUDA_KERNELS=1 pytest tests/test_cuda.py`"
    )
    m = torch.backends.cuda.matmul
    saved = (m.allow_tf32, m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction)
    m.allow_tf32 = False
    m.allow_fp16_reduced_precision_reduction = False
    m.allow_bf16_reduced_precision_reduction = False
    yield
    m.allow_tf32, m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction = saved


# ---- build and registration: no GPU needed ---------------------------------------------------


def test_extension_built_with_cuda_sources():
    if _ops._C is None:
        pytest.skip(f"no compiled extension ({_ops.FALLBACK_REASON})")
    from fastmlp import _build_meta

    archs = _ops._C.cuda_arch_list()
    if _build_meta.WITH_CUDA:
        assert archs and archs != "unknown", "the CUDA sources were not compiled by nvcc"
        assert _ops._C.has_cuda_kernels()
        assert callable(_ops._C.register_cuda_kernels)
    else:
        assert archs == ""
        assert not _ops._C.has_cuda_kernels()


def _registration_in_subprocess(env_value):
    """(backend("cuda"), where the CUDA kernel of each op is registered) in a fresh interpreter."""
    code = (
        "import torch, fastmlp\n"
        "print(fastmlp.backend('cuda'))\n"
        "for op in ('linear_relu_fwd', 'linear_relu_bwd', 'linear_fwd', 'linear_bwd'):\n"
        "    line = [l for l in torch._C._dispatch_dump('fastmlp::' + op).splitlines() if l.startswith('CUDA:')]\n"
        "    print(line[0] if line else 'CUDA: none')\n"
    )
    env = dict(os.environ)
    env.pop("FASTMLP_CUDA_KERNELS", None)
    if env_value is not None:
        env["FASTMLP_CUDA_KERNELS"] = env_value
    env["PYTHONPATH"] = PACKAGE_PARENT + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    lines = out.stdout.strip().splitlines()
    return lines[0], lines[1:]


@pytest.mark.skipif(not BUILT_WITH_CUDA_KERNELS, reason="extension built without CUDA sources")
def test_cuda_kernels_registered_only_when_enabled():
    backend, where = _registration_in_subprocess("1")
    assert backend == "compiled"
    assert len(where) == 4 and all("csrc/cuda/linear_ops.cu" in w for w in where), where

    for value in (None, "0"):
        backend, where = _registration_in_subprocess(value)
        assert backend == "fallback"
        assert len(where) == 4 and all("_ops.py" in w for w in where), where


@pytest.mark.skipif(not BUILT_WITH_CUDA_KERNELS, reason="extension built without CUDA sources")
def test_register_cuda_kernels_is_idempotent():
    _ops._C.register_cuda_kernels()
    _ops._C.register_cuda_kernels()


# ---- GPU: parity with nn.Linear + nn.ReLU ----------------------------------------------------


def _models(k, n, bias, relu, dtype, gen):
    w = _grid((n, k), 0.125, gen)
    b = _grid((n,), 0.125, gen) if bias else None
    plain = nn.Linear(k, n, bias=bias, device="cuda", dtype=dtype)
    fused = (fastmlp.FusedLinearReLU if relu else fastmlp.Linear)(k, n, bias=bias, device="cuda", dtype=dtype)
    with torch.no_grad():
        for m in (plain, fused):
            m.weight.copy_(w)
            if bias:
                m.bias.copy_(b)
    return (nn.Sequential(plain, nn.ReLU()) if relu else plain), fused, plain


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("m,k,n", SHAPES, ids=lambda s: str(s))
def test_parity_with_nn_linear(cuda_kernels, m, k, n, dtype, relu, bias):
    gen = torch.Generator().manual_seed(1000 * m + 10 * k + n)
    ref_model, fused, plain = _models(k, n, bias, relu, dtype, gen)
    x0 = _grid((m, k), 0.25, gen).to("cuda", dtype)
    gy = _grid((m, n), 0.25, gen).to("cuda", dtype)
    x_ref = x0.clone().requires_grad_()
    x = x0.clone().requires_grad_()

    y_ref = ref_model(x_ref)
    y = fused(x)
    assert y.dtype == dtype and y.shape == (m, n)
    torch.testing.assert_close(y, y_ref, **TOL[dtype])

    if relu:
        y2, mask = torch.ops.fastmlp.linear_relu_fwd(x0, fused.weight.detach(), None if not bias else fused.bias.detach())
        assert mask.dtype == torch.uint8 and mask.shape == (m, (n + 7) // 8)
        assert torch.equal(y2, y.detach())
        assert torch.equal(mask, ref.pack_bits(y2 > 0))
        assert torch.equal(mask, ref.pack_bits(y_ref.detach() > 0))

    y_ref.backward(gy)
    y.backward(gy)
    torch.testing.assert_close(x.grad, x_ref.grad, **TOL[dtype])
    torch.testing.assert_close(fused.weight.grad, plain.weight.grad, **TOL[dtype])
    if bias:
        torch.testing.assert_close(fused.bias.grad, plain.bias.grad, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_non_contiguous_inputs(cuda_kernels, dtype):
    m, k, n = 37, 50, 21
    gen = torch.Generator().manual_seed(7)
    x_base = _grid((m, 2 * k), 0.25, gen).to("cuda", dtype).requires_grad_()
    w_base = _grid((k, n), 0.125, gen).to("cuda", dtype).requires_grad_()  # w = w_base.t()
    b_base = _grid((2 * n,), 0.125, gen).to("cuda", dtype).requires_grad_()
    gy = _grid((n, m), 0.25, gen).to("cuda", dtype).t()  # non-contiguous gradient too

    def run(fn):
        for t in (x_base, w_base, b_base):
            t.grad = None
        x, w, b = x_base[:, ::2], w_base.t(), b_base[::2]
        assert not (x.is_contiguous() or w.is_contiguous() or b.is_contiguous())
        y = fn(x, w, b)
        y.backward(gy)
        return y.detach(), x_base.grad.clone(), w_base.grad.clone(), b_base.grad.clone()

    for ours, theirs in [
        (fastmlp.functional.linear_relu, lambda x, w, b: torch.relu(F.linear(x, w, b))),
        (fastmlp.functional.linear, F.linear),
    ]:
        for a, e in zip(run(ours), run(theirs)):
            torch.testing.assert_close(a, e, **TOL[dtype])


@pytest.mark.parametrize("needs", [[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], ids=str)
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
def test_backward_needs(cuda_kernels, needs, relu):
    needs = [bool(v) for v in needs]
    m, k, n = 70, 45, 19
    gen = torch.Generator().manual_seed(3)
    x = _grid((m, k), 0.25, gen).cuda()
    w = _grid((n, k), 0.125, gen).cuda()
    b = _grid((n,), 0.125, gen).cuda()
    gy = _grid((m, n), 0.25, gen).cuda()
    if relu:
        _, mask = torch.ops.fastmlp.linear_relu_fwd(x, w, b)
        got = torch.ops.fastmlp.linear_relu_bwd(gy, x, w, mask, needs)
        want = ref.linear_relu_bwd(gy, x, w, mask, needs)
    else:
        got = torch.ops.fastmlp.linear_bwd(gy, x, w, needs)
        want = ref.linear_bwd(gy, x, w, needs)
    for g, e, need in zip(got, want, needs):
        if need:
            torch.testing.assert_close(g, e, **EXACT)
        else:
            assert g.shape == (0,) and g.dtype == x.dtype and g.device == x.device


# ---- GPU: random data, against float64 -----------------------------------------------------

RANDOM_TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
}


@pytest.mark.parametrize("dtype", list(RANDOM_TOL), ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("m,k,n", [(64, 784, 256), (1000, 300, 257), (5000, 64, 300), (129, 1024, 1000)])
def test_random_data_against_float64(cuda_kernels, m, k, n, dtype):
    gen = torch.Generator(device="cuda").manual_seed(11)
    x = torch.randn(m, k, device="cuda", generator=gen).to(dtype)
    w = (torch.randn(n, k, device="cuda", generator=gen) / k**0.5).to(dtype)
    b = torch.randn(n, device="cuda", generator=gen).to(dtype)
    gy = torch.randn(m, n, device="cuda", generator=gen).to(dtype)
    y, mask = torch.ops.fastmlp.linear_relu_fwd(x, w, b)
    y64 = torch.relu(F.linear(x.double(), w.double(), b.double()))
    torch.testing.assert_close(y.double(), y64, **RANDOM_TOL[dtype])
    assert torch.equal(mask, ref.pack_bits(y > 0))
    needs = [True, True, True]
    got = torch.ops.fastmlp.linear_relu_bwd(gy, x, w, mask, needs)
    want = ref.linear_relu_bwd(gy.double(), x.double(), w.double(), mask, needs)  # same mask
    for g, e in zip(got, want):
        scale = e.abs().max().clamp_min(1.0)  # gw / gb sum over the batch: compare relative to size
        torch.testing.assert_close(g.double() / scale, e / scale, **RANDOM_TOL[dtype])


def test_tf32_path_is_exact_on_grid_data(cuda_kernels):
    """With TF32 allowed, float32 GEMMs run on tensor cores; grid data are exact in TF32."""
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("TF32 needs sm_80+")
    gen = torch.Generator().manual_seed(5)
    m, k, n = 300, 784, 256
    x = _grid((m, k), 0.25, gen).float().cuda()
    w = _grid((n, k), 0.125, gen).float().cuda()
    b = _grid((n,), 0.125, gen).float().cuda()
    gy = _grid((m, n), 0.25, gen).float().cuda()
    torch.backends.cuda.matmul.allow_tf32 = True  # restored by the fixture
    y, mask = torch.ops.fastmlp.linear_relu_fwd(x, w, b)
    grads = torch.ops.fastmlp.linear_relu_bwd(gy, x, w, mask, [True, True, True])
    torch.backends.cuda.matmul.allow_tf32 = False
    y_ref, mask_ref = ref.linear_relu_fwd(x, w, b)
    torch.testing.assert_close(y, y_ref, **EXACT)
    assert torch.equal(mask, mask_ref)
    for g, e in zip(grads, ref.linear_relu_bwd(gy, x, w, mask, [True, True, True])):
        torch.testing.assert_close(g, e, **EXACT)


def test_tf32_path_random_data(cuda_kernels):
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("TF32 needs sm_80+")
    gen = torch.Generator(device="cuda").manual_seed(13)
    x = torch.randn(512, 1024, device="cuda", generator=gen)
    w = torch.randn(512, 1024, device="cuda", generator=gen) / 32
    b = torch.randn(512, device="cuda", generator=gen)
    torch.backends.cuda.matmul.allow_tf32 = True  # restored by the fixture
    y, _ = torch.ops.fastmlp.linear_relu_fwd(x, w, b)
    y64 = torch.relu(F.linear(x.double(), w.double(), b.double()))
    torch.testing.assert_close(y.double(), y64, rtol=5e-3, atol=5e-3)


# ---- GPU: gradcheck, determinism, streams, devices, errors ----------------------------------


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("fn", [fastmlp.functional.linear_relu, fastmlp.functional.linear], ids=["linear_relu", "linear"])
def test_gradcheck_float64(cuda_kernels, fn, bias):
    gen = torch.Generator(device="cuda").manual_seed(17)
    x = torch.randn(6, 9, dtype=torch.float64, device="cuda", generator=gen, requires_grad=True)
    w = torch.randn(5, 9, dtype=torch.float64, device="cuda", generator=gen, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, device="cuda", generator=gen, requires_grad=True) if bias else None
    inputs = (x, w, b) if bias else (x, w)
    assert torch.autograd.gradcheck(lambda *a: fn(*a), inputs)


def test_deterministic(cuda_kernels):
    gen = torch.Generator(device="cuda").manual_seed(19)
    x = torch.randn(5000, 200, device="cuda", generator=gen)
    w = torch.randn(300, 200, device="cuda", generator=gen)
    b = torch.randn(300, device="cuda", generator=gen)
    gy = torch.randn(5000, 300, device="cuda", generator=gen)

    def run():
        y, mask = torch.ops.fastmlp.linear_relu_fwd(x, w, b)
        return (y, mask, *torch.ops.fastmlp.linear_relu_bwd(gy, x, w, mask, [True, True, True]))

    for a, e in zip(run(), run()):
        assert torch.equal(a, e)


def test_runs_on_current_stream(cuda_kernels):
    gen = torch.Generator().manual_seed(23)
    x = _grid((512, 256), 0.25, gen).float().cuda()
    w = _grid((384, 256), 0.125, gen).float().cuda()
    expected = ref.linear_relu_fwd(x, w, None)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        y, mask = torch.ops.fastmlp.linear_relu_fwd(x, w, None)
    s.synchronize()
    assert torch.equal(y, expected[0]) and torch.equal(mask, expected[1])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device(cuda_kernels):
    gen = torch.Generator().manual_seed(29)
    x = _grid((65, 40), 0.25, gen).float().to("cuda:1")
    w = _grid((33, 40), 0.125, gen).float().to("cuda:1")
    with torch.cuda.device(0):
        y, mask = torch.ops.fastmlp.linear_relu_fwd(x, w, None)
    assert y.device == x.device
    e = ref.linear_relu_fwd(x, w, None)
    assert torch.equal(y, e[0]) and torch.equal(mask, e[1])


def test_argument_errors(cuda_kernels):
    x = torch.randn(4, 3, device="cuda")
    w = torch.randn(5, 3, device="cuda")
    op = torch.ops.fastmlp
    with pytest.raises(RuntimeError, match="w has dtype"):
        op.linear_relu_fwd(x, w.double(), None)
    with pytest.raises(RuntimeError, match="x must be float32, float64, float16 or bfloat16"):
        op.linear_fwd(x.int(), w.int(), None)
    with pytest.raises(RuntimeError, match="x has 3 features but w expects 4"):
        op.linear_fwd(x, torch.randn(5, 4, device="cuda"), None)
    with pytest.raises(RuntimeError, match="b must have shape"):
        op.linear_relu_fwd(x, w, torch.randn(4, device="cuda"))
    with pytest.raises(RuntimeError, match="w is on"):
        op.linear_fwd(x, w.cpu(), None)
    _, mask = op.linear_relu_fwd(x, w, None)
    with pytest.raises(RuntimeError, match="mask must have shape"):
        op.linear_relu_bwd(torch.randn(4, 5, device="cuda"), x, w, mask[:, :0], [True, True, True])
    with pytest.raises(RuntimeError, match="gy must have shape"):
        op.linear_bwd(torch.randn(4, 6, device="cuda"), x, w, [True, True, True])


def test_fused_mlp_training_step_matches_plain(cuda_kernels):
    gen = torch.Generator().manual_seed(31)
    sizes = [784, 128, 64, 10]
    fused = fastmlp.FusedMLP(sizes, device="cuda")
    with torch.no_grad():
        for layer in fused:
            layer.weight.copy_(_grid(tuple(layer.weight.shape), 0.125, gen))
            layer.bias.copy_(_grid(tuple(layer.bias.shape), 0.125, gen))
    plain = fused.to_torch()
    x = _grid((64, 784), 0.25, gen).float().cuda()
    gy = _grid((64, 10), 0.25, gen).float().cuda()
    for model in (fused, plain):
        model(x).backward(gy)
    torch.testing.assert_close(fused(x), plain(x), **EXACT)
    for p, q in zip(fused.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **EXACT)
