"""FusedMLP.adam_step (the mlp_adam_step op) against the ordinary autograd + torch.optim.Adam/AdamW step."""

import warnings

import pytest
import torch

import fastmlp
from _helpers import DEVICES, torch_train_step

CONFIGS = {
    "adam": (torch.optim.Adam, dict(lr=1e-2)),
    "adam_l2": (torch.optim.Adam, dict(lr=5e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
}


def _twins(sizes, dtype, device, cls, bias=True, **hyper):
    torch.manual_seed(0)
    fused = fastmlp.FusedMLP(sizes, bias=bias, dtype=dtype, device=device)
    plain = fused.to_torch()
    return (fused, cls(fused.parameters(), **hyper)), (plain, cls(plain.parameters(), **hyper))


def _tol(dtype):
    return dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-6)


def _assert_same_state(fused, fopt, plain, popt, tol):
    for a, b in zip(fused.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, **tol)
        fs, ps = fopt.state[a], popt.state[b]
        torch.testing.assert_close(fs["step"], ps["step"])
        torch.testing.assert_close(fs["exp_avg"], ps["exp_avg"], **tol)
        torch.testing.assert_close(fs["exp_avg_sq"], ps["exp_avg_sq"], rtol=tol["rtol"], atol=tol["atol"] ** 2)


def _assert_near_truth(ours, theirs, truth, name, allowance):
    """float32 results judged by their distance from the float64 truth, against PyTorch's own: the
    mean error within 8x PyTorch's, the largest within 8x PyTorch's plus `allowance` (the few weights
    whose near-zero gradient rounding flips the direction of their Adam step). Over 3 seeds of every
    case here the ratios stayed under 3.6x; computing 1 - beta2 in float32 instead of float64 (a real
    bug, fixed) made them 100-4000x."""
    ours, theirs, truth = ours.detach().double(), theirs.detach().double(), truth.detach().double()
    our_err, their_err = (ours - truth).abs(), (theirs - truth).abs()
    assert our_err.mean() <= 8 * their_err.mean() + 1e-9, (
        f"{name}: mean error {our_err.mean():.3g} vs PyTorch's {their_err.mean():.3g}")
    assert our_err.max() <= 8 * their_err.max() + allowance, (
        f"{name}: max error {our_err.max():.3g} vs PyTorch's {their_err.max():.3g}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sizes", [[784, 128, 64, 10], [784, 256, 10], [7, 3], [30, 17, 9, 5]])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("batch", [64, 1, 300])
def test_adam_step_matches_autograd_and_torch_adam(device, sizes, config, batch):
    """float64: equal to torch within rounding. float32: Adam divides by sqrt(exp_avg_sq), so a weight
    whose gradient is near zero moves by up to lr on rounding noise alone; the float32 runs (ours and
    torch's) are therefore judged by their distance from the same run in float64."""
    cls, hyper = CONFIGS[config]
    (fused, fopt), (plain, popt) = _twins(sizes, torch.float64, device, cls, **hyper)
    fused32 = fastmlp.FusedMLP(sizes, device=device)
    fused32.load_state_dict(fused.state_dict())
    plain32 = fused32.to_torch()
    fopt32, popt32 = cls(fused32.parameters(), **hyper), cls(plain32.parameters(), **hyper)
    steps = 4
    for _ in range(steps):
        x = torch.randn(batch, sizes[0], dtype=torch.float64, device=device)
        y = torch.randint(0, sizes[-1], (batch,), device=device)
        loss = torch_train_step(plain, popt, x, y)  # the float64 truth
        torch.testing.assert_close(fused.adam_step(x, y, fopt), loss, **_tol(torch.float64))
        torch.testing.assert_close(fused32.adam_step(x.float(), y, fopt32).double(), loss, rtol=1e-4, atol=1e-5)
        torch_train_step(plain32, popt32, x.float(), y)
    _assert_same_state(fused, fopt, plain, popt, _tol(torch.float64))
    allowance = 2e-3 * hyper["lr"] * steps
    for i, (a, b, t) in enumerate(zip(fused32.parameters(), plain32.parameters(), plain.parameters())):
        _assert_near_truth(a, b, t, f"parameter {i}", allowance)
        _assert_near_truth(fopt32.state[a]["exp_avg"], popt32.state[b]["exp_avg"], popt.state[t]["exp_avg"],
                           f"exp_avg {i}", 1e-7)


@pytest.mark.parametrize("batch", [5, 300])
def test_adam_step_every_cpu_isa(isa, batch):
    if isa == "fallback":
        pytest.skip("no compiled CPU kernels")
    (fused, fopt), (plain, popt) = _twins([70, 37, 10], torch.float32, "cpu", torch.optim.AdamW, lr=1e-2,
                                          weight_decay=1e-2)
    for _ in range(3):
        x, y = torch.randn(batch, 70), torch.randint(0, 10, (batch,))
        torch.testing.assert_close(fused.adam_step(x, y, fopt), torch_train_step(plain, popt, x, y), **_tol(x.dtype))
    _assert_same_state(fused, fopt, plain, popt, _tol(torch.float32))


@pytest.mark.parametrize("device", DEVICES[1:])  # torch allows capturable=True on GPUs only
def test_adam_step_with_step_counts_on_the_device(device):
    """Adam(capturable=True) keeps its step counts on the parameters' device; the op advances them there."""
    (fused, fopt), (plain, popt) = _twins([12, 6, 3], torch.float32, device, torch.optim.Adam, lr=1e-2,
                                          capturable=True)
    for _ in range(3):
        x, y = torch.randn(10, 12, device=device), torch.randint(0, 3, (10,), device=device)
        torch.testing.assert_close(fused.adam_step(x, y, fopt), torch_train_step(plain, popt, x, y))
    assert fopt.state[fused[0].weight]["step"].device.type == device
    _assert_same_state(fused, fopt, plain, popt, _tol(torch.float32))


def test_adam_step_mixes_with_ordinary_steps_and_checkpoints():
    (fused, fopt), (plain, popt) = _twins([12, 6, 3], torch.float32, "cpu", torch.optim.Adam, lr=1e-2)
    x, y = torch.randn(10, 12), torch.randint(0, 3, (10,))
    torch_train_step(fused, fopt, x, y)  # torch starts the state
    fused.adam_step(x, y, fopt)
    saved = fopt.state_dict()
    fopt2 = torch.optim.Adam(fused.parameters(), lr=1e-2)
    fopt2.load_state_dict(saved)  # new state tensors: the cached validation must not keep the old ones
    fused.adam_step(x, y, fopt2)
    torch_train_step(fused, fopt2, x, y)
    for _ in range(4):
        torch_train_step(plain, popt, x, y)
    _assert_same_state(fused, fopt2, plain, popt, _tol(torch.float32))


def test_train_step_picks_the_op():
    x, y = torch.randn(10, 12), torch.randint(0, 3, (10,))
    for cls, hyper in [(torch.optim.SGD, dict(lr=0.1, momentum=0.9)), (torch.optim.AdamW, dict(lr=1e-2))]:
        (fused, fopt), (plain, popt) = _twins([12, 6, 3], torch.float32, "cpu", cls, **hyper)
        for _ in range(2):
            torch.testing.assert_close(fused.train_step(x, y, fopt), torch_train_step(plain, popt, x, y))
    with pytest.raises(TypeError, match="needs a torch.optim.SGD, Adam or AdamW optimizer, got RMSprop"):
        fused.train_step(x, y, torch.optim.RMSprop(fused.parameters()))


def test_adam_step_rejects_what_it_cannot_do():
    model = fastmlp.FusedMLP([6, 4, 3])
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    with pytest.raises(TypeError, match="torch.optim.Adam or torch.optim.AdamW"):
        model.adam_step(x, y, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="amsgrad"):
        model.adam_step(x, y, torch.optim.Adam(model.parameters(), amsgrad=True))
    with pytest.raises(ValueError, match="maximize"):
        model.adam_step(x, y, torch.optim.Adam(model.parameters(), maximize=True))
    with pytest.raises(ValueError, match="exactly this model"):
        model.adam_step(x, y, torch.optim.Adam(list(model.parameters())[:2]))
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="shape"):
        model.adam_step(torch.randn(5, 7), y, opt)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="mlp_adam_step: target\\[3\\] = 3 is not a class index"):
        model.adam_step(x, torch.tensor([0, 1, 2, 3, 0]), opt)
    # Nothing was updated, and the step counts did not move.
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a, b)
    assert all(float(opt.state[p]["step"]) == 0 for p in model.parameters())


def _op_args(device="cpu"):
    torch.manual_seed(0)
    ws = [torch.randn(8, 6, device=device), torch.randn(3, 8, device=device)]
    bs = [torch.randn(8, device=device), torch.randn(3, device=device)]
    params = ws + bs
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    steps = [torch.zeros(()) for _ in params]
    x, y = torch.randn(5, 6, device=device), torch.randint(0, 3, (5,), device=device)
    return x, y, ws, bs, m, v, steps


def test_adam_step_opcheck():
    args = _op_args() + (1e-3, 0.9, 0.999, 1e-8, 0.0, False)
    torch.library.opcheck(torch.ops.fastmlp.mlp_adam_step.default, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.skipif(fastmlp.backend("cpu") != "compiled", reason="the argument checks are the compiled op's")
def test_adam_step_argument_errors():
    x, y, ws, bs, m, v, steps = _op_args()
    op = torch.ops.fastmlp.mlp_adam_step

    def call(**over):
        a = dict(m=m, v=v, steps=steps, beta1=0.9, beta2=0.999, eps=1e-8, lr_scale=None)
        a.update(over)
        op(x, y, ws, bs, a["m"], a["v"], a["steps"], 1e-3, a["beta1"], a["beta2"], a["eps"], 0.0, False,
           a["lr_scale"])

    with pytest.raises(RuntimeError, match="one tensor per parameter"):
        call(m=m[:3])
    with pytest.raises(RuntimeError, match=r"exp_avg_sqs\[1\] must be a contiguous"):
        call(v=[v[0], torch.zeros(8, 5), v[2], v[3]])
    with pytest.raises(RuntimeError, match=r"steps\[2\] must be a one-element float32 or float64"):
        call(steps=[steps[0], steps[1], torch.zeros(2), steps[3]])
    with pytest.raises(RuntimeError, match="betas must lie in"):
        call(beta2=1.0)
    with pytest.raises(RuntimeError, match="eps must be >= 0"):
        call(eps=-1.0)
    with pytest.raises(RuntimeError, match="lr_scale must be a one-element"):
        call(lr_scale=torch.ones(2))
    assert all(float(s) == 0 for s in steps)


def _copy(args):
    return tuple([t.clone() for t in a] if isinstance(a, list) else a.clone() for a in args)


@pytest.mark.parametrize("many", [False, True], ids=["mlp_adam_step", "mlp_adam_steps"])
def test_adam_step_counts_that_cannot_be_written_fail_before_any_update(many):
    x, y, ws, bs, m, v, steps = _op_args()
    before = _copy((ws, bs, m, v))

    def call(counts):
        if many:
            return torch.ops.fastmlp.mlp_adam_steps(x, y, 5, ws, bs, m, v, counts, [1e-3], 0.9, 0.999, 1e-8, 0.0)
        return torch.ops.fastmlp.mlp_adam_step(x, y, ws, bs, m, v, counts, 1e-3, 0.9, 0.999, 1e-8, 0.0)

    with torch.inference_mode():
        frozen = [torch.zeros(()) for _ in steps]
    with pytest.raises(RuntimeError, match=r"steps\[0\] is an inference tensor"):
        call(frozen)
    assert all(torch.equal(a, b) for group, ref in zip((ws, bs, m, v), before) for a, b in zip(group, ref))
    # A count that requires grad is written as the parameters are (an optimizer step, no graph).
    counts = [s.clone().requires_grad_() for s in steps]
    call(counts)
    assert [float(c.detach()) for c in counts] == [1.0] * 4


@pytest.mark.skipif(fastmlp.backend("cpu") != "compiled", reason="the argument checks are the compiled op's")
def test_step_ops_refuse_tensors_that_share_memory():
    """Every parameter and state tensor is written in place: aliases gave silently wrong updates."""
    x, y, ws, bs, m, v, steps = _op_args()
    before = [t.clone() for t in ws + bs + m + v]
    sgd, adam = torch.ops.fastmlp.mlp_sgd_step, torch.ops.fastmlp.mlp_adam_step
    with pytest.raises(RuntimeError, match=r"mlp_sgd_step: weight_bufs\[0\] shares memory with weights\[0\]"):
        sgd(x, y, ws, bs, list(ws), m[2:], 0.1, 0.9, 0.0)
    with pytest.raises(RuntimeError, match=r"mlp_sgd_step: weights\[0\] shares memory with x"):
        sgd(ws[0][:5], y, ws, bs, m[:2], m[2:], 0.1, 0.9, 0.0)
    with pytest.raises(RuntimeError, match=r"mlp_sgd_steps: bias_bufs\[1\] shares memory with bias_bufs\[0\]"):
        torch.ops.fastmlp.mlp_sgd_steps(x, y, 5, ws, bs, m[:2], [m[2], m[2][:3]], [0.1], 0.9, 0.0)
    with pytest.raises(RuntimeError, match=r"mlp_adam_step: exp_avg_sqs\[0\] shares memory with exp_avgs\[0\]"):
        adam(x, y, ws, bs, m, m, steps, 1e-3, 0.9, 0.999, 1e-8, 0.0)
    with pytest.raises(RuntimeError, match=r"mlp_adam_steps: exp_avgs\[3\] shares memory with biases\[1\]"):
        torch.ops.fastmlp.mlp_adam_steps(x, y, 5, ws, bs, m[:3] + [bs[1]], v, steps, [1e-3], 0.9, 0.999, 1e-8, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(ws + bs + m + v, before))
    assert all(float(s) == 0 for s in steps)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_step_ops_in_grad_mode_are_optimizer_steps(kind):
    """Parameters that require grad, grad mode on: the op updates them as under no_grad, and its loss
    has no graph (no 'autograd kernel was not registered' warning; backward says there is nothing)."""

    def call(requires_grad):
        x, y, ws, bs, m, v, steps = _op_args()  # the same values every time
        params = [p.requires_grad_(requires_grad) for p in ws + bs]
        if kind == "sgd":
            loss = torch.ops.fastmlp.mlp_sgd_step(x, y, ws, bs, m[:2], m[2:], 0.1, 0.9, 0.0)
        else:
            loss = torch.ops.fastmlp.mlp_adam_step(x, y, ws, bs, m, v, steps, 1e-3, 0.9, 0.999, 1e-8, 0.0)
        return loss, [p.detach() for p in params]

    with torch.no_grad():
        expected, expected_params = call(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss, params = call(True)
    assert not loss.requires_grad and loss.grad_fn is None and torch.equal(loss, expected)
    assert all(torch.equal(a, b) for a, b in zip(params, expected_params))
    with pytest.raises(RuntimeError, match="does not require grad"):
        loss.backward()


@pytest.mark.parametrize("device", DEVICES)
def test_adam_step_lr_scale(device):
    """lr_scale multiplies lr (the step size and AdamW's decay both)."""
    results = []
    for lr, scale in [(0.01, None), (1.0, 0.01), (0.5, 0.02)]:
        x, y, ws, bs, m, v, steps = _op_args(device)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            xb = torch.randn(10, 6, generator=gen).to(device)
            yb = torch.randint(0, 3, (10,), generator=gen).to(device)
            s = None if scale is None else torch.tensor([scale], device=device)
            torch.ops.fastmlp.mlp_adam_step(xb, yb, ws, bs, m, v, steps, lr, 0.9, 0.999, 1e-8, 0.1, True, s)
        results.append([t.clone() for t in ws + bs])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
