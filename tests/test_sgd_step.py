"""FusedMLP.sgd_step (the whole-step op) against the ordinary autograd + torch.optim.SGD step."""

import pytest
import torch

import fastmlp
from _helpers import DEVICES, torch_train_step, two_fused_steps


def _twins(sizes, dtype, device, bias=True, **sgd):
    torch.manual_seed(0)
    fused = fastmlp.FusedMLP(sizes, bias=bias, dtype=dtype, device=device)
    plain = fused.to_torch()
    return (fused, torch.optim.SGD(fused.parameters(), **sgd)), (plain, torch.optim.SGD(plain.parameters(), **sgd))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sizes", [[784, 128, 64, 10], [784, 256, 10], [7, 3], [30, 17, 9, 5]])
@pytest.mark.parametrize(
    "sgd",
    [dict(lr=0.05, momentum=0.9), dict(lr=0.1), dict(lr=0.02, momentum=0.5, weight_decay=1e-3),
     dict(lr=0.05, weight_decay=1e-2)],
    ids=["momentum", "plain", "weight_decay", "decay_only"],
)
@pytest.mark.parametrize("batch", [64, 1, 200])
def test_sgd_step_matches_autograd_and_torch_sgd(device, dtype, sizes, sgd, batch):
    (fused, fopt), (plain, popt) = _twins(sizes, dtype, device, **sgd)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-6)
    for _ in range(5):
        x = torch.randn(batch, sizes[0], dtype=dtype, device=device)
        y = torch.randint(0, sizes[-1], (batch,), device=device)
        torch.testing.assert_close(fused.sgd_step(x, y, fopt), torch_train_step(plain, popt, x, y), **tol)
    for a, b in zip(fused.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, **tol)
    # The optimizer state is torch's own: it can be saved, loaded and stepped normally afterwards.
    if sgd.get("momentum"):
        for a, b in zip(fused.parameters(), plain.parameters()):
            torch.testing.assert_close(fopt.state[a]["momentum_buffer"], popt.state[b]["momentum_buffer"], **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [5, 300])
def test_sgd_step_every_cpu_isa(isa, dtype, batch):
    """Each instruction set's kernels, with a batch summed in one K block (the update applied strip
    by strip) and one longer than any K block (the gradient parked between blocks)."""
    if isa == "fallback":
        pytest.skip("no compiled CPU kernels")
    (fused, fopt), (plain, popt) = _twins([70, 37, 10], dtype, "cpu", lr=0.05, momentum=0.9, weight_decay=1e-3)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-6)
    for _ in range(3):
        x, y = torch.randn(batch, 70, dtype=dtype), torch.randint(0, 10, (batch,))
        torch.testing.assert_close(fused.sgd_step(x, y, fopt), torch_train_step(plain, popt, x, y), **tol)
    for a, b in zip(fused.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, **tol)
        torch.testing.assert_close(fopt.state[a]["momentum_buffer"], popt.state[b]["momentum_buffer"], **tol)


# eps well above float64 rounding noise: a gradient that is 0 in one summation order and 1e-17 in
# another must not become a step of +-lr (Adam divides by sqrt(exp_avg_sq) + eps).
WHOLE_STEP_OPTIMIZERS = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
                         "adam": lambda p: torch.optim.Adam(p, lr=1e-2, eps=1e-4)}


@pytest.mark.parametrize("optimizer", list(WHOLE_STEP_OPTIMIZERS))
@pytest.mark.parametrize("many", [False, True], ids=["train_step", "train_steps"])
def test_whole_step_relu_derivative_at_zero_is_zero(isa, optimizer, many):
    """The whole-step ops (mlp_sgd_step, mlp_adam_step, mlp_sgd_steps, mlp_adam_steps) use ReLU'(0) = 0
    like nn.ReLU: integer inputs, weights and biases (the last layer's / 8, all exact in float64)
    make many hidden pre-activations exactly 0, where a mask set at z >= 0 would pass the gradient."""
    gen = torch.Generator().manual_seed(7)
    fused = fastmlp.FusedMLP([12, 16, 8, 4], dtype=torch.float64)
    with torch.no_grad():
        for i, layer in enumerate(fused):
            scale = 0.125 if i == len(fused) - 1 else 1.0
            layer.weight.copy_(torch.randint(-1, 2, layer.weight.shape, generator=gen) * scale)
            layer.bias.copy_(torch.randint(-1, 2, layer.bias.shape, generator=gen) * scale)
    plain = fused.to_torch()
    x = torch.randint(-2, 3, (32, 12), generator=gen).double()
    y = torch.randint(0, 4, (32,), generator=gen)
    with torch.no_grad():  # the first step's, while the parameters are still integers
        z1 = plain[0](x[:16])
        z2 = plain[2](z1.relu())
    assert (z1 == 0).sum() >= 5 and (z2 == 0).sum() >= 5, "the test needs exact zeros in both hidden layers"
    make = WHOLE_STEP_OPTIMIZERS[optimizer]
    fopt, popt = make(fused.parameters()), make(plain.parameters())
    batches = list(zip(x.split(16), y.split(16)))
    if many:
        losses = fused.train_steps(x, y, fopt, 16)
    else:
        losses = torch.stack([fused.train_step(xb, yb, fopt) for xb, yb in batches])
    want = torch.stack([torch_train_step(plain, popt, xb, yb) for xb, yb in batches])
    tol = dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(losses, want, **tol)
    for a, b in zip(fused.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("batch", [64, 300])
def test_step_does_not_depend_on_thread_count(optimizer, batch):
    """Every weight row's gradient and update are computed by one thread in one fixed order (and the
    small GEMMs a thread count decides to run serially sum in the same order), so a step on one or
    two threads leaves bit-identical parameters and optimizer state and returns the same loss."""
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs.append(two_fused_steps(optimizer, batch))
    finally:
        torch.set_num_threads(before)
    assert len(runs[0]) == len(runs[1])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_sgd_step_without_bias():
    (fused, fopt), (plain, popt) = _twins([20, 8, 4], torch.float32, "cpu", bias=False, lr=0.1, momentum=0.9)
    x, y = torch.randn(16, 20), torch.randint(0, 4, (16,))
    for _ in range(3):
        fused.sgd_step(x, y, fopt)
        torch_train_step(plain, popt, x, y)
    for a, b in zip(fused.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b)


def test_sgd_step_mixes_with_ordinary_steps():
    (fused, fopt), (plain, popt) = _twins([12, 6, 3], torch.float32, "cpu", lr=0.1, momentum=0.9)
    x, y = torch.randn(10, 12), torch.randint(0, 3, (10,))
    torch_train_step(fused, fopt, x, y)  # torch starts the momentum buffers
    fused.sgd_step(x, y, fopt)
    for _ in range(2):
        torch_train_step(plain, popt, x, y)
    for a, b in zip(fused.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b)


def test_sgd_step_follows_changes_to_optimizer_and_model():
    """The per-step validation is cached; every change it guards against must still be seen."""
    (fused, fopt), (plain, popt) = _twins([12, 6, 3], torch.float32, "cpu", lr=0.1, momentum=0.9)
    x, y = torch.randn(10, 12), torch.randint(0, 3, (10,))
    for change in [None, ("momentum", 0.5), ("weight_decay", 1e-2), ("lr", 0.05), ("momentum", 0.0)]:
        if change:
            fopt.param_groups[0][change[0]] = popt.param_groups[0][change[0]] = change[1]
        torch.testing.assert_close(fused.sgd_step(x, y, fopt), torch_train_step(plain, popt, x, y))
    for a, b in zip(fused.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b)
    fopt.param_groups[0]["nesterov"] = True
    with pytest.raises(ValueError, match="nesterov"):
        fused.sgd_step(x, y, fopt)
    fopt.param_groups[0]["nesterov"] = False
    fused[0].weight = torch.nn.Parameter(fused[0].weight.detach().clone())  # not the optimizer's any more
    with pytest.raises(ValueError, match="exactly this model"):
        fused.sgd_step(x, y, fopt)
    fopt = torch.optim.SGD(fused.parameters(), lr=0.1)
    fused.sgd_step(x, y, fopt)
    fopt.param_groups[0]["params"].pop()  # a parameter left out of the optimizer
    with pytest.raises(ValueError, match="exactly this model"):
        fused.sgd_step(x, y, fopt)
    fopt = torch.optim.SGD(fused.parameters(), lr=0.1)
    fused[1] = fastmlp.Linear(6, 3)  # a new layer
    with pytest.raises(ValueError, match="exactly this model"):
        fused.sgd_step(x, y, fopt)


def test_sgd_step_rejects_what_it_cannot_do():
    model = fastmlp.FusedMLP([6, 4, 3])
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    with pytest.raises(TypeError, match="torch.optim.SGD"):
        model.sgd_step(x, y, torch.optim.Adam(model.parameters()))
    with pytest.raises(ValueError, match="nesterov"):
        model.sgd_step(x, y, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True))
    with pytest.raises(ValueError, match="exactly this model"):
        model.sgd_step(x, y, torch.optim.SGD(list(model.parameters())[:2], lr=0.1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="shape"):
        model.sgd_step(torch.randn(5, 7), y, opt)
    with pytest.raises(RuntimeError, match="not a class index"):
        model.sgd_step(x, torch.tensor([0, 1, 2, 3, 0]), opt)
    with pytest.raises(RuntimeError, match="target must be int64"):
        model.sgd_step(x, y.int(), opt)


@pytest.mark.parametrize("option", [dict(dampening=0.1), dict(maximize=True)], ids=["dampening", "maximize"])
def test_sgd_step_rejects_dampening_and_maximize(option):
    """Both are refused whether set at construction or after a step (the validation is cached), and
    whichever entry point is used."""
    name = next(iter(option))
    model = fastmlp.FusedMLP([6, 4, 3])
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, **option)
    for call in (model.sgd_step, model.train_step, lambda x, y, opt: model.train_steps(x, y, opt, 4)):
        with pytest.raises(ValueError, match=f"does not support {name}"):
            call(x, y, opt)
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a, b)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.sgd_step(x, y, opt)
    opt.param_groups[0].update(option)
    with pytest.raises(ValueError, match=f"does not support {name}"):
        model.sgd_step(x, y, opt)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_parameter_groups_must_share_hyper_parameters(kind):
    """Several parameter groups work when they agree (the step equals torch's); any difference,
    at construction or set after a step, is refused."""
    make, differ = {
        "sgd": (lambda groups: torch.optim.SGD(groups, lr=0.1, momentum=0.9), ("momentum", 0.5)),
        "adam": (lambda groups: torch.optim.Adam(groups, lr=1e-2), ("betas", (0.8, 0.99))),
    }[kind]
    torch.manual_seed(0)
    fused = fastmlp.FusedMLP([10, 7, 3])
    plain = fused.to_torch()

    def split(model):  # weights in one group, biases in another
        return [{"params": [p for n, p in model.named_parameters() if n.endswith(k)]} for k in ("weight", "bias")]

    fopt, popt = make(split(fused)), make(split(plain))
    x, y = torch.randn(12, 10), torch.randint(0, 3, (12,))
    torch.testing.assert_close(fused.train_step(x, y, fopt), torch_train_step(plain, popt, x, y))
    for a, b in zip(fused.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b)
    for key, value in [("lr", 0.05), differ]:
        fopt.param_groups[1][key] = value  # after a step: the cached validation must see it
        with pytest.raises(ValueError, match="all parameter groups must share their hyper-parameters"):
            fused.train_step(x, y, fopt)
        with pytest.raises(ValueError, match="all parameter groups must share their hyper-parameters"):
            fused.train_steps(x, y, fopt, 4)
        fopt.param_groups[1][key] = fopt.param_groups[0][key]
        fused.train_step(x, y, fopt)
    groups = split(fused)
    groups[1][differ[0]] = differ[1]
    with pytest.raises(ValueError, match="all parameter groups must share their hyper-parameters"):
        fused.train_step(x, y, make(groups))


def test_sgd_step_opcheck():
    torch.manual_seed(0)
    ws = [torch.randn(8, 6), torch.randn(3, 8)]
    bs = [torch.randn(8), torch.randn(3)]
    wb = [torch.zeros_like(w) for w in ws]
    bb = [torch.zeros_like(b) for b in bs]
    args = (torch.randn(5, 6), torch.randint(0, 3, (5,)), ws, bs, wb, bb, 0.1, 0.9, 0.0)
    torch.library.opcheck(torch.ops.fastmlp.mlp_sgd_step.default, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("device", DEVICES)
def test_sgd_step_lr_scale(device):
    """lr_scale (a one-element tensor, read where the step runs) multiplies lr."""
    results = []
    for lr, scale in [(0.03, None), (1.0, 0.03), (0.5, 0.06)]:
        torch.manual_seed(0)
        model = fastmlp.FusedMLP([12, 9, 4], device=device, dtype=torch.float64)
        ws, bs = [m.weight for m in model], [m.bias for m in model]
        wb, bb = [torch.zeros_like(w) for w in ws], [torch.zeros_like(b) for b in bs]
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            x = torch.randn(10, 12, dtype=torch.float64, generator=gen).to(device)
            y = torch.randint(0, 4, (10,), generator=gen).to(device)
            s = None if scale is None else torch.tensor([scale], dtype=torch.float64, device=device)
            with torch.no_grad():
                torch.ops.fastmlp.mlp_sgd_step(x, y, ws, bs, wb, bb, lr, 0.9, 1e-3, s)
        results.append([p.detach().clone() for p in model.parameters()])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    with pytest.raises(RuntimeError, match="lr_scale must be a one-element"):
        torch.ops.fastmlp.mlp_sgd_step(x, y, ws, bs, wb, bb, 0.1, 0.9, 0.0, torch.ones(1, device=device))
