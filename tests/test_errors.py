"""Bad input gets a clear exception naming the argument, never a crash or garbage."""

import pytest
import torch

import fastmlp

ops = torch.ops.fastmlp

# The argument checks under test are the compiled kernels' (the fallback raises PyTorch's own errors).
pytestmark = pytest.mark.skipif(fastmlp.backend("cpu") != "compiled", reason="needs the compiled extension")


def _xwb(m=4, k=5, n=3, dtype=torch.float32):
    return torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype), torch.randn(n, dtype=dtype)


def test_feature_mismatch_names_both_sizes():
    layer = fastmlp.FusedLinearReLU(5, 3)
    with pytest.raises(RuntimeError, match="linear_relu_fwd: x has 6 features but w expects 5"):
        layer(torch.randn(2, 6))
    with pytest.raises(RuntimeError, match="input has 6 features .* weight expects 5"):
        layer(torch.randn(4, 2, 6))  # other shapes are checked in Python before flattening
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"mlp_forward: weights\[0\] must have shape \(\*, 6\)"):
        layer(torch.randn(2, 6))


def test_zero_dim_input():
    with pytest.raises(RuntimeError, match="at least 1 dimension"):
        fastmlp.linear_relu(torch.tensor(1.0), torch.randn(3, 1))


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.complex64])
def test_unsupported_cpu_dtype(dtype):
    x, w, b = _xwb()
    with pytest.raises(RuntimeError, match="x must be float32, float64, bfloat16 or float16 on the CPU"):
        ops.linear_relu_fwd(x.to(dtype), w.to(dtype), b.to(dtype))


def test_mixed_dtypes():
    x, w, b = _xwb()
    with pytest.raises(RuntimeError, match="w has dtype Double but x has dtype Float"):
        ops.linear_relu_fwd(x, w.double(), b)
    with pytest.raises(RuntimeError, match="b has dtype Double"):
        ops.linear_fwd(x, w, b.double())


def test_bad_shapes():
    x, w, b = _xwb()
    with pytest.raises(RuntimeError, match="x must be 2-D"):
        ops.linear_relu_fwd(x[0], w, b)
    with pytest.raises(RuntimeError, match="w must be 2-D"):
        ops.linear_fwd(x, w[0], b)
    with pytest.raises(RuntimeError, match=r"b must have shape \(3,\)"):
        ops.linear_relu_fwd(x, w, torch.randn(4))
    with pytest.raises(RuntimeError, match="x has 5 features but w expects 6"):
        ops.linear_fwd(x, torch.randn(3, 6), None)


def test_backward_op_checks():
    x, w, b = _xwb()
    y, mask = ops.linear_relu_fwd(x, w, b)
    needs = [True, True, True]
    with pytest.raises(RuntimeError, match=r"gy must have shape \(4, 3\)"):
        ops.linear_relu_bwd(torch.randn(4, 2), x, w, mask, needs)
    with pytest.raises(RuntimeError, match="mask must be uint8"):
        ops.linear_relu_bwd(torch.randn(4, 3), x, w, mask.float(), needs)
    with pytest.raises(RuntimeError, match=r"mask must have shape \(4, 1\)"):
        ops.linear_relu_bwd(torch.randn(4, 3), x, w, mask[:2], needs)
    with pytest.raises(RuntimeError, match="gy has dtype Double"):
        ops.linear_bwd(torch.randn(4, 3, dtype=torch.float64), x, w, needs)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_mixed_devices():
    """One CUDA tensor sends the call to the CUDA kernels, which name the tensor on the other device
    (csrc/cuda/ops_cuda.cpp check_cuda, then csrc/checks.cpp against x's device)."""
    if fastmlp.backend("cuda") != "compiled":
        pytest.skip("FASTMLP_CUDA_KERNELS=0: PyTorch's reference serves CUDA tensors, with PyTorch's own errors")
    x, w, b = _xwb()
    gy = torch.randn(4, 3)
    needs = [True, True, True]
    with pytest.raises(RuntimeError, match="linear_relu_fwd: x must be a CUDA tensor here, got one on cpu"):
        ops.linear_relu_fwd(x, w.cuda(), b)
    with pytest.raises(RuntimeError, match=r"linear_fwd: w is on cpu but x is on cuda:\d"):
        ops.linear_fwd(x.cuda(), w, None)
    with pytest.raises(RuntimeError, match=r"linear_relu_fwd: b is on cpu but x is on cuda:\d"):
        ops.linear_relu_fwd(x.cuda(), w.cuda(), b)
    with pytest.raises(RuntimeError, match=r"linear_bwd: gy is on cpu but x is on cuda:\d"):
        ops.linear_bwd(gy, x.cuda(), w.cuda(), needs)
    _, mask = ops.linear_relu_fwd(x, w, b)
    with pytest.raises(RuntimeError, match=r"linear_relu_bwd: mask is on cpu but x is on cuda:\d"):
        ops.linear_relu_bwd(gy.cuda(), x.cuda(), w.cuda(), mask, needs)


def test_unknown_cpu_isa():
    if not fastmlp.backend_info()["extension"]:
        pytest.skip("no compiled extension")
    with pytest.raises(RuntimeError, match="not supported"):
        fastmlp.set_cpu_isa("sse9")
    assert fastmlp.backend_info()["cpu_isa"] == fastmlp.backend_info()["supported_cpu_isas"][0]
