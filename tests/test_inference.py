"""Inference in one op (mlp_forward): FusedMLP and the fused layers without a gradient to compute run
the whole forward as one op, with no ReLU masks; the same result as the layer-by-layer forward."""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fastmlp
from _helpers import DEVICES, assert_close_to_truth

ops = torch.ops.fastmlp

NETS = [(784, 128, 64, 10), (784, 256, 10), (37, 5), (20, 33, 1, 17)]


def _truth(x, weights, biases, relu_last=False):
    """The MLP in float64, on the CPU."""
    h = x.detach().double().cpu()
    for i, w in enumerate(weights):
        h = nn.functional.linear(h, w.detach().double().cpu(), biases[i].detach().double().cpu() if biases else None)
        if i + 1 < len(weights) or relu_last:
            h = h.relu()
    return h


class OpLog(TorchDispatchMode):
    """Records the fastmlp ops dispatched (below autograd)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fastmlp":
            self.ops.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sizes", NETS, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("batch", [0, 1, 5, 64, 300])
def test_matches_plain_model(isa, device, dtype, sizes, batch):
    torch.manual_seed(batch)
    model = fastmlp.FusedMLP(sizes, device=device, dtype=dtype)
    plain = model.to_torch()
    x = torch.randn(batch, sizes[0], device=device, dtype=dtype)
    with torch.no_grad():
        ours, theirs = model(x), plain(x)
    weights = [m.weight for m in model]
    truth = _truth(x, weights, [m.bias for m in model])
    assert ours.dtype == dtype and ours.device == x.device
    assert_close_to_truth(ours.cpu(), theirs.cpu(), truth, "output")


CUDA_ONLY = [p for p in DEVICES if p != "cpu"]


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 7, 64, 65])
def test_half_precision_on_cuda(device, dtype, batch):
    """float16 / bfloat16: float32 sums rounded once per layer, like the plain model's cuBLAS GEMMs."""
    torch.manual_seed(batch)
    model = fastmlp.FusedMLP((784, 256, 10), device=device, dtype=dtype)
    plain = model.to_torch()
    x = torch.randn(batch, 784, device=device, dtype=dtype)
    with torch.no_grad():
        ours, theirs = model(x), plain(x)
    truth = _truth(x, [m.weight for m in model], [m.bias for m in model])
    assert ours.dtype == dtype
    assert_close_to_truth(ours.float().cpu(), theirs.float().cpu(), truth, "output")


@pytest.mark.parametrize("device", CUDA_ONLY)
def test_small_batch_is_one_cuda_kernel(device):
    """Up to 64 rows the whole network is one launch of mlp_forward_kernel; beyond, the layer GEMMs."""
    model = fastmlp.FusedMLP((784, 128, 64, 10), device=device)

    def kernels(batch):
        x = torch.randn(batch, 784, device=device)
        with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            model(x)
            torch.cuda.synchronize()
        return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]

    small, large = kernels(64), kernels(65)
    assert sum("mlp_forward_kernel" in k for k in small) == 1, small
    assert not any("gemm" in k for k in small), small
    assert not any("mlp_forward_kernel" in k for k in large) and sum("gemm" in k for k in large) == 3, large


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("relu_last", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_op_leading_dims_non_contiguous_and_options(isa, device, relu_last, bias):
    torch.manual_seed(1)
    weights = [torch.randn(n, k, device=device) / k ** 0.5 for k, n in [(19, 23), (23, 7)]]
    biases = [torch.randn(w.shape[0], device=device) for w in weights] if bias else []
    x = torch.randn(3, 19, 4, device=device).transpose(1, 2)  # (3, 4, 19), not contiguous
    y = ops.mlp_forward(x, weights, biases, relu_last)
    assert y.shape == (3, 4, 7)
    truth = _truth(x, weights, biases, relu_last)
    theirs = x
    for i, w in enumerate(weights):  # PyTorch's float32 result, for the tolerance
        theirs = nn.functional.linear(theirs, w, biases[i] if bias else None)
        theirs = theirs.relu() if i == 0 or relu_last else theirs
    assert_close_to_truth(y.cpu(), theirs.cpu(), truth, "output")
    if relu_last:
        assert (y >= 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_inference_is_one_op_without_masks(device):
    model = fastmlp.FusedMLP([784, 128, 64, 10], device=device)
    x = torch.randn(2, 784, device=device)
    for context in (torch.no_grad, torch.inference_mode):
        with context(), OpLog() as log:
            model(x)
        assert log.ops == ["mlp_forward"], context
    model.requires_grad_(False)  # grad mode on, but nothing to differentiate
    with OpLog() as log:
        y = model(x)
    assert log.ops == ["mlp_forward"] and not y.requires_grad
    model.requires_grad_(True)
    with OpLog() as log:
        y = model(x)
    assert log.ops == ["linear_relu_fwd", "linear_relu_fwd", "linear_fwd"] and y.requires_grad


@pytest.mark.parametrize("device", DEVICES)
def test_layers_without_grad_make_no_mask(device):
    layer = fastmlp.FusedLinearReLU(30, 20, device=device)
    head = fastmlp.Linear(20, 5, device=device)
    x = torch.randn(6, 30, device=device)
    with torch.no_grad(), OpLog() as log:
        y = head(layer(x))
    assert log.ops == ["mlp_forward", "mlp_forward"]
    with torch.no_grad():
        want = head.weight @ (layer.weight @ x.T + layer.bias[:, None]).relu() + head.bias[:, None]
    torch.testing.assert_close(y, want.T, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(fastmlp.backend("cpu") != "compiled", reason="the fallback is PyTorch's GEMM: no such promise")
def test_results_do_not_depend_on_thread_count():
    """fastmlp's GEMMs only (in "auto" mode each thread count times its own choice of GEMM per shape)."""
    torch.manual_seed(4)
    model = fastmlp.FusedMLP([784, 256, 10])
    before, mode = torch.get_num_threads(), fastmlp.backend_info()["gemm"]
    fastmlp.set_gemm("fastmlp")
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for batch in (1, 300):
                with torch.no_grad():
                    outs.append(model(torch.randn(batch, 784, generator=torch.Generator().manual_seed(batch))))
    finally:
        torch.set_num_threads(before)
        fastmlp.set_gemm(mode)
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[3])


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    torch.manual_seed(5)
    weights = [torch.randn(9, 12, device=device), torch.randn(4, 9, device=device)]
    biases = [torch.randn(9, device=device), torch.randn(4, device=device)]
    x = torch.randn(2, 3, 12, device=device)
    for args in ((x, weights, biases), (x, weights, [], True), (x[0, :1], weights[:1], biases[:1], True)):
        torch.library.opcheck(ops.mlp_forward.default, args)


def test_grad_required_is_refused():
    weights = [torch.randn(4, 3, requires_grad=True)]
    with pytest.raises(RuntimeError, match="mlp_forward is inference only"):
        ops.mlp_forward(torch.randn(2, 3), weights, [])
    with torch.no_grad():
        assert ops.mlp_forward(torch.randn(2, 3), weights, []).shape == (2, 4)


@pytest.mark.skipif(fastmlp.backend("cpu") != "compiled", reason="the fallback raises PyTorch's own errors")
def test_bad_arguments_are_named():
    x, w = torch.randn(2, 3), torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="weights must not be empty"):
        ops.mlp_forward(x, [], [])
    with pytest.raises(RuntimeError, match=r"weights\[1\] must have shape \(\*, 4\)"):
        ops.mlp_forward(x, [w, torch.randn(5, 3)], [])
    with pytest.raises(RuntimeError, match=r"biases must be empty or one per layer"):
        ops.mlp_forward(x, [w], [torch.randn(4), torch.randn(4)])
    with pytest.raises(RuntimeError, match=r"biases\[0\] must have shape \(4,\)"):
        ops.mlp_forward(x, [w], [torch.randn(3)])
    with pytest.raises(RuntimeError, match=r"weights\[0\] is Double"):
        ops.mlp_forward(x, [w.double()], [])
    with pytest.raises(RuntimeError, match="at least 1 dimension"):
        ops.mlp_forward(torch.tensor(1.0), [w], [])


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_inference(device):
    torch.manual_seed(6)
    model = fastmlp.FusedMLP([784, 128, 64, 10], device=device).eval()
    x = torch.randn(8, 784, device=device)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


def test_torch_export_runs():
    torch.manual_seed(7)
    model = nn.Sequential(fastmlp.FusedMLP([784, 64, 10]), nn.LogSoftmax(dim=1)).eval()
    x = torch.randn(5, 784)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(exported.module()(x), want)
    converted = fastmlp.convert(nn.Sequential(nn.Linear(20, 8), nn.ReLU(), nn.Linear(8, 3))).eval()
    x = torch.randn(4, 20)
    torch.testing.assert_close(torch.export.export(converted, (x,)).module()(x), converted(x))
