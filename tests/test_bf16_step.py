"""The whole-step ops in bfloat16 arithmetic (bf16=True; FusedMLP.train_step(s)(..., precision="bf16") on
the CPU): against the plain model's step under torch.autocast("cpu", torch.bfloat16), against a float64
truth, against the pure-PyTorch reference, the rounding itself, and what they refuse."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastmlp
from fastmlp import _reference as ref

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=1e-4),
    "adamw": lambda p: torch.optim.AdamW(p, lr=2e-3, weight_decay=1e-2),
}

SHAPES = {  # sizes, bias, batch
    "mnist": ([784, 128, 64, 10], True, 64),
    "fashion": ([784, 256, 10], True, 64),
    "k-tails-nobias": ([785, 33, 17, 1], False, 7),
    "one-layer": ([33, 257], True, 5),
    "batch1": ([40, 10, 3], True, 1),
    "batch300": ([100, 48, 10], True, 300),  # dW summed over more than one K block
}


def _models(sizes, bias, make, seed=0):
    """(fused model, its optimizer, plain copy, its optimizer), the same parameters."""
    torch.manual_seed(seed)
    fused = fastmlp.FusedMLP(sizes, bias=bias)
    with torch.no_grad():  # biases away from zero, so that their rounding matters
        for layer in fused:
            if layer.bias is not None:
                layer.bias.uniform_(-0.2, 0.2)
    plain = fused.to_torch()
    return fused, make(fused.parameters()), plain, make(plain.parameters())


def _data(n, features, classes, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, features, generator=gen), torch.randint(0, classes, (n,), generator=gen)


def _autocast_step(plain, opt, x, y, dtype=torch.bfloat16):
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float64):
        logits = plain(x.to(dtype) if dtype == torch.float64 else x)
    loss = F.cross_entropy(logits.float() if dtype != torch.float64 else logits, y)
    loss.backward()
    opt.step()
    return loss.detach()


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_bf16_step_is_autocasts_step(low_isa, shape, optimizer):
    """Three bf16 steps of the fused op against the plain model's steps under autocast (the same
    roundings, so the same numbers up to float32 summation order), and both against a float64 truth
    (the same steps in float64 from the same start): ours within 2x autocast's own error + a floor."""
    sizes, bias, batch = SHAPES[shape]
    fused, fopt, plain, popt = _models(sizes, bias, OPTIMIZERS[optimizer])
    truth = fused.to_torch().double()
    topt = OPTIMIZERS[optimizer](truth.parameters())
    start = [p.detach().clone() for p in fused.parameters()]
    x, y = _data(3 * batch, sizes[0], sizes[-1])
    for xb, yb in zip(x.split(batch), y.split(batch)):
        loss = fused.train_step(xb, yb, fopt, precision="bf16")
        loss_ac = _autocast_step(plain, popt, xb, yb)
        loss_64 = _autocast_step(truth, topt, xb.double(), yb, torch.float64)
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss, loss_ac, rtol=1e-4, atol=1e-5)
        assert abs(loss.double() - loss_64) <= 2 * abs(loss_ac.double() - loss_64) + 2e-3
    for p0, p, q, t in zip(start, fused.parameters(), plain.parameters(), truth.parameters()):
        # Updates compared relative to the update's own size: bf16 roundings flip where float32 sums differ.
        step, scale = (p - p0).double(), (t.detach() - p0.double()).abs().max().item() + 1e-12
        assert (p.detach() - q.detach()).abs().max().item() <= 0.02 * scale + 1e-7
        ours, theirs = (p.detach().double() - t.detach()).abs().max(), (q.detach().double() - t.detach()).abs().max()
        assert ours <= 2 * theirs + 0.05 * scale, (ours, theirs, scale)
        assert step.abs().max() > 0  # the parameter moved


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_bf16_step_differs_from_float32(optimizer):
    """bf16=True really rounds: the same step in float32 gives other parameters (a mutant that ignores
    the flag passes the autocast comparison only by accident of the tolerance)."""
    sizes, bias, batch = SHAPES["mnist"]
    a, aopt, _, _ = _models(sizes, bias, OPTIMIZERS[optimizer])
    b, bopt, _, _ = _models(sizes, bias, OPTIMIZERS[optimizer])
    x, y = _data(batch, sizes[0], sizes[-1])
    la = a.train_step(x, y, aopt, precision="bf16")
    lb = b.train_step(x, y, bopt)
    assert la != lb
    # (Adam's first step moves each parameter by about lr * sign(gradient), so not all of them differ.)
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_rounding_is_torchs(low_isa):
    """The op's bfloat16 rounding of x, seen exactly: one layer with zero weights and two classes, batch 1,
    target 1, so dz = [0.5, -0.5] and SGD with lr 2 leaves weight[0] = -round(x), weight[1] = round(x).
    x holds ties (to even, both ways), carries into the exponent, subnormals (whose halves are still
    bfloat16 values), signs, and a K tail. AMX tiles read subnormal bf16 inputs as 0 and flush subnormal
    sums (TDPBF16PS, as oneDNN's AMX GEMMs): there those gradients are 0."""
    bits = np.array([0x3F808000, 0x3F818000, 0x3F80FFFF, 0x3F7FFFFF, 0x7F7F7FFF, 0x00008000, 0x00018000,
                     0x00000001, 0x80018001, 0xBF808000, 0xBF818001, 0x3EAAAAAB, 0x40490FDB, 0x00800000,
                     0x007FFFFF, 0x3F800000, 0xC2F6E979], dtype=np.uint32)
    x = torch.cat([torch.from_numpy(bits.view(np.float32)), torch.linspace(-3, 3, 20)]).reshape(1, -1)
    w = torch.zeros(2, x.shape[1])
    b = torch.zeros(2)
    torch.ops.fastmlp.mlp_sgd_step(x, torch.tensor([1]), [w], [b], [], [], 2.0, 0.0, 0.0, bf16=True)
    expected = x[0].to(torch.bfloat16).float()
    if low_isa.startswith("amx"):  # the step's GEMMs on the tiles (the AVX512-BF16 kernels are not used there)
        expected = torch.where(expected.abs() * 0.5 < 2.0**-126, 0.0, expected)
    assert torch.equal(w[1], expected) and torch.equal(w[0], -expected)
    assert torch.equal(b, torch.tensor([-1.0, 1.0]))


def test_many_bf16_steps_equal_one_at_a_time(low_isa):
    """mlp_*_steps with bf16=True: bit-identical to one bf16 step per call (the rounded weight copy the
    op keeps between steps is the rounding of the updated parameters)."""
    sizes, bias, batch = SHAPES["mnist"]
    x, y = _data(5 * batch + 3, sizes[0], sizes[-1])
    lrs = [0.05, 0.04, 0.03, 0.02, 0.01, 0.005]
    for make in OPTIMIZERS.values():
        many, mopt, _, _ = _models(sizes, bias, make)
        one, oopt, _, _ = _models(sizes, bias, make)
        losses = many.train_steps(x, y, mopt, batch, lrs, precision="bf16")
        ones = []
        for s, (xb, yb) in enumerate(zip(x.split(batch), y.split(batch))):
            for g in oopt.param_groups:
                g["lr"] = lrs[s]
            ones.append(one.train_step(xb, yb, oopt, precision="bf16"))
        assert torch.equal(losses, torch.stack(ones))
        assert all(torch.equal(p, q) for p, q in zip(many.parameters(), one.parameters()))


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_kernels_agree_with_the_reference(optimizer):
    """The compiled op against the pure-PyTorch reference's bf16 step (same roundings, torch's GEMMs):
    within a few bf16 roundings of the updates after 4 steps, for each CPU ISA."""
    if not fastmlp.backend_info()["extension"]:
        pytest.skip("no compiled extension")
    sizes, bias, batch = SHAPES["k-tails-nobias"]
    x, y = _data(4 * batch, sizes[0], sizes[-1])
    fused, fopt, _, _ = _models(sizes, bias, OPTIMIZERS[optimizer])
    from fastmlp.step_binding import bind
    start = [p.detach().clone() for p in fused.parameters()]
    for isa in fastmlp.backend_info()["supported_cpu_isas"] + ["amx-emulated"]:
        fastmlp.set_cpu_isa(isa)
        try:
            a, aopt, _, _ = _models(sizes, bias, OPTIMIZERS[optimizer])
            r, ropt, _, _ = _models(sizes, bias, OPTIMIZERS[optimizer])
            la = a.train_steps(x, y, aopt, batch, precision="bf16")
            args = bind(r, ropt)
            op = ref.mlp_sgd_steps if args.kind == "sgd" else ref.mlp_adam_steps
            with torch.no_grad():
                lr_ = op(x, y, batch, *args.tensor_lists, [args.lr] * 4, *args.hyper, bf16=True)
            torch.testing.assert_close(la, lr_, rtol=1e-3, atol=1e-4)
            for p0, p, q in zip(start, a.parameters(), r.parameters()):
                scale = (q.detach() - p0).abs().max().item()
                assert (p.detach() - q.detach()).abs().max().item() <= 0.02 * scale + 1e-7, isa
        finally:
            fastmlp.set_cpu_isa("auto")


def test_bf16_needs_float32():
    model = fastmlp.FusedMLP([8, 4, 3], dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(5, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="bf16=True needs float32 x and parameters, got Double"):
        model.train_step(x, y, opt, precision="bf16")
    with pytest.raises(RuntimeError, match="bf16=True needs float32"):
        model.train_steps(x, y, opt, 2, precision="bf16")
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))


def test_bf16_ops_compile_and_check():
    """The schema's bf16 argument through torch.compile(fullgraph=True) and opcheck."""
    sizes, bias, batch = [20, 8, 4], True, 6
    x, y = _data(2 * batch, sizes[0], sizes[-1])
    model, opt, _, _ = _models(sizes, bias, OPTIMIZERS["sgd"])
    from fastmlp.step_binding import bind
    args = bind(model, opt)
    ws, bs, wb, bb = [t for t in args.tensor_lists]
    torch.library.opcheck(torch.ops.fastmlp.mlp_sgd_steps.default,
                          (x, y, batch, [w.detach().clone() for w in ws], [b.detach().clone() for b in bs],
                           [t.clone() for t in wb], [t.clone() for t in bb], [0.1, 0.1], 0.9, 0.0),
                          {"bf16": True}, test_utils=("test_schema", "test_faketensor"))

    @torch.compile(fullgraph=True, backend="eager")
    def step(x, y):
        return torch.ops.fastmlp.mlp_sgd_step(x, y, ws, bs, wb, bb, 0.1, 0.9, 0.0, bf16=True)

    with torch.no_grad():
        loss = step(x[:batch], y[:batch])
    assert loss.shape == () and torch.isfinite(loss)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_ops_refuse_bf16_and_train_step_uses_autocast():
    """On a GPU the step ops refuse bf16=True with a message; FusedMLP.train_step(precision="bf16")
    trains there under autocast instead."""
    from fastmlp.step_binding import bind
    model = fastmlp.FusedMLP([8, 4, 3], device="cuda")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(5, 8, device="cuda"), torch.tensor([0, 1, 2, 0, 1], device="cuda")
    with pytest.raises(RuntimeError, match="bf16=True is implemented for CPU tensors only"):
        bind(model, opt).step(x, y, bf16=True)
    before = [p.detach().clone() for p in model.parameters()]
    loss = model.train_step(x, y, opt, precision="bf16")
    assert torch.isfinite(loss) and any(not torch.equal(p, q) for p, q in zip(before, model.parameters()))
