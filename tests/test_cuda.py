"""The hand-written CUDA kernels (csrc/cuda) against nn.Linear + nn.ReLU, the reference ops and
gradcheck. GPU tests skip without a GPU; the build/registration tests run anywhere.

The CUDA kernels serve CUDA tensors unless FASTMLP_CUDA_KERNELS=0 (read when fastmlp is imported);
this module sets FASTMLP_CUDA_KERNELS=1 before importing fastmlp. If fastmlp was already imported
with the kernels disabled, the GPU tests fail with a hint instead of silently testing the PyTorch
reference.

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
from _helpers import torch_train_step  # noqa: E402

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
def cuda_kernels(request):
    """The hand-written kernels serve CUDA tensors; reduced-precision cuBLAS paths are off for the
    nn.Linear reference (and TF32 for our float32 path)."""
    assert request.node.get_closest_marker("cuda") is not None, (
        "a test using the cuda_kernels fixture must be marked @pytest.mark.cuda (benchmarks/gpu_check.sh "
        "and -m cuda select GPU tests by that marker)"
    )
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    assert BUILT_WITH_CUDA_KERNELS, (
        "fastmlp's extension was built without its CUDA sources (or not built): rebuild with nvcc on PATH"
    )
    assert fastmlp.backend("cuda") == "compiled", (
        "fastmlp was imported with FASTMLP_CUDA_KERNELS=0 before tests/test_cuda.py ran; run "
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
        "for op in ('linear_relu_fwd', 'linear_relu_bwd', 'linear_fwd', 'linear_bwd', 'mlp_sgd_step'):\n"
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
def test_cuda_kernels_registered_unless_disabled():
    for value in (None, "1"):
        backend, where = _registration_in_subprocess(value)
        assert backend == "compiled"
        assert len(where) == 5 and all("csrc/cuda/ops_cuda.cpp" in w for w in where), where

    backend, where = _registration_in_subprocess("0")
    assert backend == "fallback"
    assert len(where) == 5 and all("_ops.py" in w for w in where), where


@pytest.mark.skipif(not BUILT_WITH_CUDA_KERNELS, reason="extension built without CUDA sources")
def test_register_cuda_kernels_is_idempotent():
    _ops._C.register_cuda_kernels()
    _ops._C.register_cuda_kernels()



def test_cuda_graph_step_refuses_a_cpu_model():
    """Needs no GPU: on a machine without one (or with a CPU model anywhere) the error says why."""
    model = fastmlp.FusedMLP([6, 4, 3])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="CUDAGraphStep needs a model on a CUDA device, got one on cpu"):
        fastmlp.CUDAGraphStep(model, opt, batch_size=4)
    with pytest.raises(TypeError, match="CUDAGraphStep needs a fastmlp.FusedMLP, got Sequential"):
        fastmlp.CUDAGraphStep(model.to_torch(), opt, batch_size=4)

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


@pytest.mark.cuda
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


@pytest.mark.cuda
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


@pytest.mark.cuda
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


@pytest.mark.cuda
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


@pytest.mark.cuda
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


@pytest.mark.cuda
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


@pytest.mark.cuda
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("fn", [fastmlp.functional.linear_relu, fastmlp.functional.linear], ids=["linear_relu", "linear"])
def test_gradcheck_float64(cuda_kernels, fn, bias):
    gen = torch.Generator(device="cuda").manual_seed(17)
    x = torch.randn(6, 9, dtype=torch.float64, device="cuda", generator=gen, requires_grad=True)
    w = torch.randn(5, 9, dtype=torch.float64, device="cuda", generator=gen, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, device="cuda", generator=gen, requires_grad=True) if bias else None
    inputs = (x, w, b) if bias else (x, w)
    assert torch.autograd.gradcheck(lambda *a: fn(*a), inputs)


@pytest.mark.cuda
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


@pytest.mark.cuda
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


@pytest.mark.cuda
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


@pytest.mark.cuda
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


@pytest.mark.cuda
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


# ---- GPU: the whole training step and its CUDA graph ----------------------------------------


def _step_models(sizes, bias, dtype, seed):
    torch.manual_seed(seed)
    plain = fastmlp.plain_mlp(sizes, bias=bias, device="cuda", dtype=dtype)
    fused = fastmlp.FusedMLP.from_torch(plain)
    return plain, fused


def _torch_sgd_steps(plain, batches, hyper, lrs):
    opt = torch.optim.SGD(plain.parameters(), **hyper)
    return _torch_steps(plain, opt, batches, lrs), opt


def _with_lrs(opt, batches, lrs):
    """Yields the batches, setting opt's learning rate to lrs[i] before batch i (a per-step schedule)."""
    for batch, lr in zip(batches, lrs):
        for g in opt.param_groups:
            g["lr"] = lr
        yield batch


def _torch_steps(plain, opt, batches, lrs):
    """Ordinary steps of `opt` on `plain`, one per batch with learning rate lrs[i]; the losses."""
    return torch.stack([torch_train_step(plain, opt, x, y) for x, y in _with_lrs(opt, batches, lrs)])


def _graph_steps(step, opt, batches, lrs):
    """The same through a CUDAGraphStep; the losses (cloned: a graph reuses its output tensor)."""
    return torch.stack([step(x, y).clone() for x, y in _with_lrs(opt, batches, lrs)])


STEP_TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.float64: dict(rtol=1e-12, atol=1e-13)}


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("momentum,weight_decay", [(0.9, 5e-4), (0.0, 0.0)], ids=["momentum", "plain"])
@pytest.mark.parametrize("sizes,bias,batch", [
    ([784, 128, 64, 10], True, 64),
    ([784, 256, 10], True, 64),
    ([33, 17, 5], False, 7),
    ([40, 300, 3], True, 300),  # bias-gradient partial sums (batch > one row chunk)
], ids=["mnist", "fashion", "odd-nobias", "batch300"])
def test_mlp_sgd_step_matches_torch(cuda_kernels, sizes, bias, batch, momentum, weight_decay, dtype):
    plain, fused = _step_models(sizes, bias, dtype, seed=len(sizes) * batch)
    gen = torch.Generator(device="cuda").manual_seed(41)
    batches = [(torch.randn(batch, sizes[0], device="cuda", dtype=dtype, generator=gen),
                torch.randint(0, sizes[-1], (batch,), device="cuda", generator=gen)) for _ in range(4)]
    hyper = dict(lr=0.05, momentum=momentum, weight_decay=weight_decay)
    want, _ = _torch_sgd_steps(plain, batches, hyper, [0.05] * 4)
    opt = torch.optim.SGD(fused.parameters(), **hyper)
    got = torch.stack([fused.sgd_step(x, y, opt) for x, y in batches])
    assert got.dtype == dtype and got.device.type == "cuda"
    torch.testing.assert_close(got, want, **STEP_TOL[dtype])
    for p, q in zip(fused.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, **STEP_TOL[dtype])


@pytest.mark.cuda
def test_mlp_sgd_step_lr_scale_and_determinism(cuda_kernels):
    sizes = [784, 128, 64, 10]
    runs = []
    for lr, scale in [(0.02, None), (1.0, 0.02), (0.02, None)]:
        _, fused = _step_models(sizes, True, torch.float32, seed=3)
        weights = [m.weight for m in fused]
        biases = [m.bias for m in fused]
        wb = [torch.zeros_like(w) for w in weights]
        bb = [torch.zeros_like(b) for b in biases]
        gen = torch.Generator(device="cuda").manual_seed(5)
        for _ in range(3):
            x = torch.randn(64, 784, device="cuda", generator=gen)
            y = torch.randint(0, 10, (64,), device="cuda", generator=gen)
            s = None if scale is None else torch.tensor([scale], device="cuda")
            with torch.no_grad():
                torch.ops.fastmlp.mlp_sgd_step(x, y, weights, biases, wb, bb, lr, 0.9, 0.0, s)
        runs.append([p.detach().clone() for p in fused.parameters()])
    for a, b in zip(runs[0], runs[2]):
        assert torch.equal(a, b)  # bitwise reproducible
    for a, b in zip(runs[0], runs[1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.cuda
def test_mlp_sgd_step_bad_target_changes_nothing(cuda_kernels):
    _, fused = _step_models([20, 8, 4], True, torch.float32, seed=9)
    opt = torch.optim.SGD(fused.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(6, 20, device="cuda")
    good = torch.tensor([0, 1, 2, 3, 0, 1], device="cuda")
    fused.sgd_step(x, good, opt)  # creates the momentum buffers
    before = [t.clone() for t in fused.parameters()] + [opt.state[p]["momentum_buffer"].clone()
                                                      for p in fused.parameters()]
    for bad in (4, -1):
        y = good.clone()
        y[3] = bad
        loss = fused.sgd_step(x, y, opt)
        assert torch.isnan(loss)
        after = [t for t in fused.parameters()] + [opt.state[p]["momentum_buffer"] for p in fused.parameters()]
        for a, b in zip(before, after):
            assert torch.equal(a, b)
    assert torch.isfinite(fused.sgd_step(x, good, opt))


@pytest.mark.cuda
def test_mlp_sgd_step_cuda_argument_errors(cuda_kernels):
    _, fused = _step_models([20, 8, 4], True, torch.float32, seed=9)
    opt = torch.optim.SGD(fused.parameters(), lr=0.1)
    x = torch.randn(6, 20, device="cuda")
    y = torch.zeros(6, dtype=torch.int64, device="cuda")
    with pytest.raises(RuntimeError, match="target must be int64"):
        fused.sgd_step(x, y.int(), opt)
    with pytest.raises(RuntimeError, match="target is on"):
        fused.sgd_step(x, y.cpu(), opt)
    with pytest.raises(RuntimeError, match="x must be float32 or float64"):
        torch.ops.fastmlp.mlp_sgd_step(x.half(), y, [m.weight.half() for m in fused], [], [], [], 0.1, 0.0, 0.0)
    with pytest.raises(RuntimeError, match="lr_scale must be a one-element"):
        torch.ops.fastmlp.mlp_sgd_step(x, y, [m.weight for m in fused], [], [], [], 0.1, 0.0, 0.0,
                                       torch.ones(2, device="cuda"))


@pytest.mark.cuda
def test_cuda_graph_step_matches_torch(cuda_kernels):
    sizes = [784, 128, 64, 10]
    plain, fused = _step_models(sizes, True, torch.float32, seed=13)
    gen = torch.Generator(device="cuda").manual_seed(43)
    batches = [(torch.randn(64, 784, device="cuda", generator=gen),
                torch.randint(0, 10, (64,), device="cuda", generator=gen)) for _ in range(6)]
    batches.append((batches[0][0][:17], batches[0][1][:17]))  # a last, partial batch: eager fallback
    lrs = [0.05 * (1 - i / 10) for i in range(len(batches))]  # a per-step schedule
    hyper = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
    want, _ = _torch_sgd_steps(plain, batches, hyper, lrs)
    opt = torch.optim.SGD(fused.parameters(), **hyper)
    step = fastmlp.CUDAGraphStep(fused, opt, batch_size=64)
    got = _graph_steps(step, opt, batches, lrs)
    assert step.captures == 1  # the LR schedule did not force a new capture
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6)
    for p, q in zip(fused.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=2e-5, atol=2e-6)

    # Replacing the momentum buffers (load_state_dict) must lead to a new capture, not stale pointers.
    opt.load_state_dict(opt.state_dict())
    step(*batches[0])
    assert step.captures == 2


@pytest.mark.cuda
@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
def test_cuda_graph_adam_step_matches_torch(cuda_kernels, cls):
    """Adam(capturable=True): step counts on the GPU, advanced inside the graph."""
    sizes = [784, 256, 10]
    plain, fused = _step_models(sizes, True, torch.float32, seed=17)
    gen = torch.Generator(device="cuda").manual_seed(47)
    batches = [(torch.randn(64, 784, device="cuda", generator=gen),
                torch.randint(0, 10, (64,), device="cuda", generator=gen)) for _ in range(5)]
    batches.append((batches[0][0][:9], batches[0][1][:9]))  # partial batch: model.train_step
    lrs = [1e-3 * (1 - i / 10) for i in range(len(batches))]
    hyper = dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=1e-2, capturable=True)
    popt, fopt = cls(plain.parameters(), **hyper), cls(fused.parameters(), **hyper)
    want = _torch_steps(plain, popt, batches, lrs)
    step = fastmlp.CUDAGraphStep(fused, fopt, batch_size=64)
    got = _graph_steps(step, fopt, batches, lrs)
    assert step.captures == 1
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6)
    for p, q in zip(fused.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=2e-5, atol=2e-6)
        torch.testing.assert_close(fopt.state[p]["step"], popt.state[q]["step"])
        torch.testing.assert_close(fopt.state[p]["exp_avg_sq"], popt.state[q]["exp_avg_sq"], rtol=2e-5, atol=1e-9)


@pytest.mark.cuda
def test_cuda_graph_step_errors(cuda_kernels):
    _, fused = _step_models([20, 8, 4], True, torch.float32, seed=9)
    opt = torch.optim.SGD(fused.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        fastmlp.CUDAGraphStep(fused, opt, batch_size=0)
    with pytest.raises(TypeError, match="needs a torch.optim.SGD, Adam or AdamW"):
        fastmlp.CUDAGraphStep(fused, torch.optim.RMSprop(fused.parameters()), batch_size=4)
    with pytest.raises(ValueError, match="capturable=True"):
        fastmlp.CUDAGraphStep(fused, torch.optim.Adam(fused.parameters()), batch_size=4)
    step = fastmlp.CUDAGraphStep(fused, opt, batch_size=4)
    with pytest.raises(ValueError, match="x must be a torch.float32 tensor of shape"):
        step(torch.randn(4, 20, device="cuda", dtype=torch.float64), torch.zeros(4, dtype=torch.int64, device="cuda"))
    with pytest.raises(ValueError, match="target must be an int64 tensor"):
        step(torch.randn(4, 20, device="cuda"), torch.zeros(4, dtype=torch.int32, device="cuda"))


@pytest.mark.cuda
def test_trainer_uses_the_cuda_graph_step(cuda_kernels):
    from fastmlp import train as T
    from fastmlp.data import Split

    g = torch.Generator().manual_seed(0)
    n = 64 * 5 + 17  # a partial last batch too
    data = Split("fake", torch.randn(n, 784, generator=g), torch.randint(0, 10, (n,), generator=g))
    val = Split("val", data.images[:100], data.labels[:100])
    results = []
    for device in ("cuda", "cpu"):
        splits = {"train": data.to(device), "val": val.to(device), "test": val.to(device)}
        tr = T.Trainer(T.TrainConfig(epochs=2, lr=0.05, batch_size=64), splits, device=device)
        assert (tr.graph_step is not None) == (device == "cuda")
        results.append([tr.train_epoch()["train_loss"] for _ in range(2)])
    assert tr.graph_step is None
    torch.testing.assert_close(torch.tensor(results[0]), torch.tensor(results[1]), rtol=1e-4, atol=1e-5)
