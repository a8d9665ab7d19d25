"""FusedMLP.train_steps and the many-step ops (mlp_sgd_steps, mlp_adam_steps): many whole training steps
in one call, against the same steps made one call at a time, and what they refuse."""

import pytest
import torch

import fastmlp
from fastmlp import _reference as ref
from fastmlp.step_binding import bind
from _helpers import DEVICES

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "sgd-plain": lambda p: torch.optim.SGD(p, lr=0.1),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=1e-4),
    "adamw": lambda p: torch.optim.AdamW(p, lr=2e-3, weight_decay=1e-2),
}


def _pair(sizes, make, dtype=torch.float32, device="cpu", bias=True):
    """Two identical (model, optimizer) pairs."""
    out = []
    for _ in range(2):
        torch.manual_seed(0)
        model = fastmlp.FusedMLP(sizes, bias=bias, dtype=dtype, device=device)
        out.append((model, make(model.parameters())))
    return out


def _state(model, opt):
    """Parameters and every optimizer state tensor, in a fixed order."""
    out = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        for key in sorted(opt.state[p]):
            out.append(torch.as_tensor(opt.state[p][key]).clone())
    return out


def _one_at_a_time(model, opt, x, y, batch, lrs):
    losses = []
    for s, (xb, yb) in enumerate(zip(x.split(batch), y.split(batch))):
        for group in opt.param_groups:
            group["lr"] = lrs[s]
        losses.append(model.train_step(xb, yb, opt))
    return torch.stack(losses)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize(
    "sizes,bias", [([784, 128, 64, 10], True), ([784, 256, 10], True), ([30, 17, 9, 5], False)],
    ids=["mnist", "fashion", "odd-nobias"],
)
@pytest.mark.parametrize("rows,batch", [(1000, 64), (64, 64), (65, 64), (7, 1), (30, 100), (700, 300)])
def test_train_steps_equal_one_step_at_a_time(device, dtype, optimizer, sizes, bias, rows, batch):
    """Same steps, same arithmetic: losses, parameters and optimizer state are bit-identical to a
    train_step per batch (with the learning rate of each step), and the optimizer's lr is untouched."""
    (many, mopt), (one, oopt) = _pair(sizes, OPTIMIZERS[optimizer], dtype, device, bias)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(rows, sizes[0], dtype=dtype, generator=gen).to(device)
    y = torch.randint(0, sizes[-1], (rows,), generator=gen).to(device)
    count = -(-rows // batch)
    base = mopt.param_groups[0]["lr"]
    lrs = [base * (1 - 0.5 * s / count) for s in range(count)]
    # Twice, so the second call starts from optimizer state (momentum buffers, Adam's step counts).
    for _ in range(2):
        losses = many.train_steps(x, y, mopt, batch, lrs)
        expected = _one_at_a_time(one, oopt, x, y, batch, lrs)
        assert losses.shape == (count,) and losses.dtype == dtype
        assert torch.equal(losses, expected)
    for a, b in zip(_state(many, mopt), _state(one, oopt)):
        assert torch.equal(a, b)
    assert mopt.param_groups[0]["lr"] == base


def test_train_steps_default_lr_and_adam_counts():
    (many, mopt), (one, oopt) = _pair([12, 8, 3], OPTIMIZERS["adamw"])
    x, y = torch.randn(50, 12), torch.randint(0, 3, (50,))
    many.train_steps(x, y, mopt, 16)  # 4 steps at the optimizer's lr
    _one_at_a_time(one, oopt, x, y, 16, [oopt.param_groups[0]["lr"]] * 4)
    assert all(float(mopt.state[p]["step"]) == 4 for p in many.parameters())
    for a, b in zip(_state(many, mopt), _state(one, oopt)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_reference_steps_match_the_op(kind):
    """The pure-PyTorch fallback's many-step ops (what serves CUDA tensors without fastmlp's kernels)
    against the op in use, in float64."""
    make = OPTIMIZERS["sgd" if kind == "sgd" else "adamw"]
    (a, aopt), (b, bopt) = _pair([20, 11, 4], make, torch.float64)
    x, y = torch.randn(90, 20, dtype=torch.float64), torch.randint(0, 4, (90,))
    lrs = [0.01, 0.02, 0.03, 0.04]
    losses = a.train_steps(x, y, aopt, 25, lrs)
    args = bind(b, bopt, kind)
    fn = ref.mlp_sgd_steps if kind == "sgd" else ref.mlp_adam_steps
    with torch.no_grad():
        ref_losses = fn(x, y, 25, *args.tensor_lists, lrs, *args.hyper)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-12, atol=1e-14)
    for p, q in zip(_state(a, aopt), _state(b, bopt)):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_a_bad_label_in_a_late_batch_changes_nothing(kind):
    model, opt = _pair([10, 6, 3], OPTIMIZERS[kind])[0]
    model.train_step(torch.randn(4, 10), torch.tensor([0, 1, 2, 0]), opt)  # some optimizer state
    before = _state(model, opt)
    x, y = torch.randn(200, 10), torch.randint(0, 3, (200,))
    y[190] = 3
    with pytest.raises(RuntimeError, match=r"steps: target\[190\] = 3 is not a class index in \[0, 3\)"):
        model.train_steps(x, y, opt, 64)
    for a, b in zip(_state(model, opt), before):
        assert torch.equal(a, b)


def test_train_steps_rejects_bad_arguments():
    model, opt = _pair([10, 6, 3], OPTIMIZERS["sgd"])[0]
    x, y = torch.randn(100, 10), torch.randint(0, 3, (100,))
    for batch in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="batch_size must be a positive int"):
            model.train_steps(x, y, opt, batch)
    assert model.train_steps(x, y, opt, 10 ** 30).shape == (1,)  # one batch of all 100 rows
    with pytest.raises(ValueError, match=r"lrs must hold one learning rate per step \(4\), got 3"):
        model.train_steps(x, y, opt, 32, [0.1] * 3)
    with pytest.raises(ValueError, match=r"target must have shape \(100,\)"):
        model.train_steps(x, y[:99], opt, 32)
    with pytest.raises(ValueError, match="x must have shape"):
        model.train_steps(torch.randn(100, 9), y, opt, 32)
    with pytest.raises(TypeError, match="needs a torch.optim.SGD, Adam or AdamW"):
        model.train_steps(x, y, torch.optim.RMSprop(model.parameters()), 32)
    with pytest.raises(RuntimeError, match="x must hold at least one sample"):
        model.train_steps(torch.randn(0, 10), y[:0], opt, 32, [])


def _sgd_args(rows=20):
    torch.manual_seed(0)
    ws = [torch.randn(8, 6), torch.randn(3, 8)]
    bs = [torch.randn(8), torch.randn(3)]
    return (torch.randn(rows, 6), torch.randint(0, 3, (rows,)), ws, bs, [torch.zeros_like(w) for w in ws],
            [torch.zeros_like(b) for b in bs])


def _adam_args(rows=20):
    x, y, ws, bs, _, _ = _sgd_args(rows)
    params = ws + bs
    return (x, y, ws, bs, [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params],
            [torch.zeros(()) for _ in params])


def test_steps_ops_opcheck():
    x, y, *rest = _sgd_args()
    torch.library.opcheck(torch.ops.fastmlp.mlp_sgd_steps.default,
                          (x, y, 6, *rest, [0.1, 0.1, 0.05, 0.05], 0.9, 0.0),
                          test_utils=("test_schema", "test_faketensor"))
    x, y, *rest = _adam_args()
    torch.library.opcheck(torch.ops.fastmlp.mlp_adam_steps.default,
                          (x, y, 8, *rest, [1e-3, 1e-3, 5e-4], 0.9, 0.999, 1e-8, 0.0, False),
                          test_utils=("test_schema", "test_faketensor"))


def test_steps_op_argument_errors():
    """The op's own checks (compiled or fallback), each naming the argument."""
    x, y, *rest = _sgd_args()
    op = torch.ops.fastmlp.mlp_sgd_steps
    with pytest.raises(RuntimeError, match="mlp_sgd_steps: batch_size must be >= 1, got 0"):
        op(x, y, 0, *rest, [0.1], 0.9, 0.0)
    with pytest.raises(RuntimeError, match=r"mlp_sgd_steps: lrs must hold one learning rate per step \(3 batches"):
        op(x, y, 8, *rest, [0.1, 0.1], 0.9, 0.0)
    # A batch larger than x is one batch of all its rows, up to the largest int64 (no overflow).
    state = [[t.clone() for t in group] for group in rest]
    huge = op(x, y, 2 ** 63 - 1, *state, [0.1], 0.9, 0.0)
    whole = op(x, y, x.shape[0], *rest, [0.1], 0.9, 0.0)
    assert huge.shape == (1,) and torch.equal(huge, whole)
    assert all(torch.equal(a, b) for group, ref in zip(state, rest) for a, b in zip(group, ref))
    x, y, *rest = _adam_args()
    with pytest.raises(RuntimeError, match=r"mlp_adam_steps: lrs must hold one learning rate per step \(1 batches"):
        torch.ops.fastmlp.mlp_adam_steps(x, y, 64, *rest, [], 0.9, 0.999, 1e-8, 0.0, False)
    assert all(float(s) == 0 for s in rest[-1])


def test_train_steps_under_torch_compile():
    """train_steps inside a fullgraph torch.compile region: the op traces through its fake."""
    (a, aopt), (b, bopt) = _pair([12, 8, 3], OPTIMIZERS["sgd"])
    x, y = torch.randn(40, 12), torch.randint(0, 3, (40,))
    args = bind(a, aopt, "sgd")

    @torch.compile(fullgraph=True)
    def epoch(x, y):
        return torch.ops.fastmlp.mlp_sgd_steps(x, y, 16, *args.tensor_lists, [0.05, 0.05, 0.05], *args.hyper).sum()

    with torch.no_grad():
        total = epoch(x, y)
    torch.testing.assert_close(total, b.train_steps(x, y, bopt, 16).sum())
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q)
