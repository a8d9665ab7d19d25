"""The fake (meta) implementations check what the kernels check (fastmlp/_checks.py mirrors
csrc/checks.cpp): every bad call below fails with the same message on fake tensors (what
torch.compile and torch.export trace with) as on real CPU tensors, and a meta tensor among CPU
tensors is an error, not uninitialised output."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastmlp

ops = torch.ops.fastmlp



def _layer(m=4, k=5, n=3):
    torch.manual_seed(0)
    x, w, b = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
    return x, w, b, torch.randn(m, n), ops.linear_relu_fwd(x, w, b)[1]


def _net():
    torch.manual_seed(0)
    ws, bs = [torch.randn(8, 6), torch.randn(3, 8)], [torch.randn(8), torch.randn(3)]
    return torch.randn(5, 6), torch.randint(0, 3, (5,)), ws, bs


def _sgd(x, y, ws, bs, momentum=0.9, lr_scale=None, bf16=False, wbufs=None, bbufs=None):
    wbufs = [torch.zeros_like(w) for w in ws] if wbufs is None else wbufs
    bbufs = [torch.zeros_like(b) for b in bs] if bbufs is None else bbufs
    return ops.mlp_sgd_step, (x, y, ws, bs, wbufs, bbufs, 0.1, momentum, 0.0, lr_scale, bf16)


def _adam(x, y, ws, bs, betas=(0.9, 0.999), eps=1e-8, avgs=None, steps=None):
    params = ws + bs
    avgs = [torch.zeros_like(p) for p in params] if avgs is None else avgs
    steps = [torch.zeros(()) for _ in params] if steps is None else steps
    return ops.mlp_adam_step, (x, y, ws, bs, avgs, [torch.zeros_like(p) for p in params], steps, 1e-3,
                               *betas, eps, 0.0, False, None, False)


def _cases():
    x, w, b, gy, mask = _layer()
    nx, ny, ws, bs = _net()
    t = [True, True, True]
    return {
        "fwd 1-D x": (ops.linear_relu_fwd, (x[0], w, b)),
        "fwd 3-D w": (ops.linear_fwd, (x, w[None], b)),
        "fwd int x": (ops.linear_relu_fwd, (x.long(), w.long(), None)),
        "fwd w dtype": (ops.linear_relu_fwd, (x, w.double(), b)),
        "fwd features": (ops.linear_fwd, (x, torch.randn(3, 6), None)),
        "fwd bias shape": (ops.linear_relu_fwd, (x, w, torch.randn(4))),
        "fwd bias dtype": (ops.linear_fwd, (x, w, b.double())),
        "bwd gy shape": (ops.linear_relu_bwd, (gy[:, :2], x, w, mask, t)),
        "bwd gy dtype": (ops.linear_bwd, (gy.double(), x, w, t)),
        "bwd mask dtype": (ops.linear_relu_bwd, (gy, x, w, mask.float(), t)),
        "bwd mask shape": (ops.linear_relu_bwd, (gy, x, w, mask[:2], t)),
        "mlp 0-d x": (ops.mlp_forward, (torch.tensor(1.0), ws, bs)),
        "mlp no weights": (ops.mlp_forward, (nx, [], [])),
        "mlp biases count": (ops.mlp_forward, (nx, ws, bs[:1])),
        "mlp chain": (ops.mlp_forward, (nx, ws[::-1], [])),
        "mlp weight dtype": (ops.mlp_forward, (nx, [ws[0].double(), ws[1]], [])),
        "sgd 1-D x": _sgd(nx[0], ny, ws, bs),
        "sgd empty x": _sgd(nx[:0], ny[:0], ws, bs),
        "sgd target dtype": _sgd(nx, ny.float(), ws, bs),
        "sgd target shape": _sgd(nx, ny[:3], ws, bs),
        "sgd weight dtype": _sgd(nx.double(), ny, ws, bs),
        "sgd weight layout": _sgd(nx, ny, [ws[0], torch.randn(8, 3).t()], bs),
        "sgd missing bufs": _sgd(nx, ny, ws, bs, wbufs=[]),
        "sgd bias buf shape": _sgd(nx, ny, ws, bs, bbufs=[torch.zeros(8), torch.zeros(4)]),
        "sgd lr_scale": _sgd(nx, ny, ws, bs, lr_scale=torch.ones(2)),
        "sgd bf16 float64": _sgd(nx.double(), ny, [w.double() for w in ws], [b.double() for b in bs], bf16=True),
        "adam betas": _adam(nx, ny, ws, bs, betas=(1.0, 0.999)),
        "adam eps": _adam(nx, ny, ws, bs, eps=-1.0),
        "adam state count": _adam(nx, ny, ws, bs, steps=[torch.zeros(())]),
        "adam exp_avg shape": _adam(nx, ny, ws, bs, avgs=[torch.zeros(8, 6), torch.zeros(3, 7), torch.zeros(8),
                                                           torch.zeros(3)]),
        "adam step dtype": _adam(nx, ny, ws, bs, steps=[torch.zeros((), dtype=torch.int64)] * 4),
        "steps batch 0": (ops.mlp_sgd_steps, (nx, ny, 0, ws, bs, [], [], [0.1], 0.0, 0.0)),
        "steps lrs": (ops.mlp_sgd_steps, (nx, ny, 2, ws, bs, [], [], [0.1, 0.1], 0.0, 0.0)),
        "adam steps lrs": (ops.mlp_adam_steps, (nx, ny, 4, ws, bs, *_adam(nx, ny, ws, bs)[1][4:7], [0.1],
                                                0.9, 0.999, 1e-8, 0.0)),
    }


def _message(op, args):
    with pytest.raises(RuntimeError) as info:
        op(*args)
    return str(info.value).splitlines()[0]


@pytest.mark.skipif(fastmlp.backend("cpu") != "compiled", reason="compares with the compiled kernels' messages")
@pytest.mark.parametrize("case", list(_cases()))
def test_fake_impl_raises_the_kernels_message(case):
    op, args = _cases()[case]
    real = _message(op, args)
    assert real.startswith("fastmlp::"), real
    mode = FakeTensorMode()
    fake_args = torch.utils._pytree.tree_map_only(torch.Tensor, mode.from_tensor, args)
    with mode:
        assert _message(op, fake_args) == real


@pytest.mark.parametrize("which", ["w", "b", "gy", "mask"])
def test_a_meta_tensor_among_cpu_tensors_is_an_error(which):
    x, w, b, gy, mask = _layer()
    args = {"w": w, "b": b, "gy": gy, "mask": mask}
    args[which] = args[which].to("meta")
    with pytest.raises(RuntimeError, match=f"{which} is on meta but x is on cpu"):
        if which in ("w", "b"):
            ops.linear_relu_fwd(x, args["w"], args["b"])
        else:
            ops.linear_relu_bwd(args["gy"], x, args["w"], args["mask"], [True, True, True])


def test_meta_modules_and_steps_are_errors():
    with pytest.raises(RuntimeError, match="w is on meta but x is on cpu"):
        fastmlp.FusedLinearReLU(3, 5, device="meta")(torch.randn(4, 3))
    x, y, ws, bs = _net()
    with pytest.raises(RuntimeError, match=r"mlp_forward: weights\[1\] is Float on meta but x is Float on cpu"):
        ops.mlp_forward(x, [ws[0], ws[1].to("meta")], [])
    w1 = ws[1].clone()
    with pytest.raises(RuntimeError, match=r"mlp_sgd_step: weights\[1\] must match x's dtype and device"):
        ops.mlp_sgd_step(*_sgd(x, y, [ws[0], ws[1].to("meta")], bs, momentum=0.0)[1])
    assert torch.equal(ws[1], w1)
    with pytest.raises(RuntimeError, match="target is on meta but x is on cpu"):
        ops.mlp_sgd_step(*_sgd(x, y.to("meta"), ws, bs)[1])


def test_all_meta_calls_still_give_shapes():
    x, w, b, gy, mask = (t.to("meta") for t in _layer(6, 5, 11))
    y, m = ops.linear_relu_fwd(x, w, b)
    assert y.shape == (6, 11) and m.shape == (6, 2) and y.device.type == "meta"
    gx, gw, gb = ops.linear_relu_bwd(torch.empty(6, 11, device="meta"), x, w, m, [True, True, False])
    assert gx.shape == (6, 5) and gw.shape == (11, 5) and gb.shape == (0,)
    assert ops.mlp_forward(torch.empty(2, 3, 5, device="meta"), [w], [b]).shape == (2, 3, 11)
