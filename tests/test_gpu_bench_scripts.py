"""The GPU benchmark scripts (benchmarks/gpu_step_bench.py, gpu_bench.py, gpu_infer_bench.py) on the
CPU: they import without a GPU, answer --help, refuse to run without one, and their verification logic (pure
comparisons, no CUDA) passes correct runs and fails idle or wrong ones with a message naming what
differed. fastmlp is imported inside the tests, not at collection (tests/test_cuda.py sets
FASTMLP_CUDA_KERNELS before the first import)."""

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_bench_script_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


step_bench = _load("gpu_step_bench")
layer_bench = _load("gpu_bench")
infer_bench = _load("gpu_infer_bench")
SIZES = [40, 32, 16, 10]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread is faster than several, and steadier on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs():
    """A reference run (torch eager, 20 steps of SGD on a small MLP, on the CPU) and its starting point."""
    import fastmlp

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    n = step_bench.VERIFY_STEPS * step_bench.BATCH
    xs = torch.randn(n, SIZES[0], generator=gen)
    ys = (xs[:, :10].argmax(1) + (torch.rand(n, generator=gen) < 0.1)) % 10  # learnable, a little noisy
    model = fastmlp.plain_mlp(SIZES)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    losses, state = step_bench.run_steps(step_bench.eager_step(model, step_bench._sgd(model)), model, xs, ys,
                                         step_bench.VERIFY_STEPS)
    return dict(xs=xs, ys=ys, start=start, losses=losses, state=state)


def _rerun(runs, make_model, make_step):
    model = make_model(SIZES)
    model.load_state_dict(runs["start"])
    return step_bench.run_steps(make_step(model), model, runs["xs"], runs["ys"], step_bench.VERIFY_STEPS)


def test_identical_runs_pass(runs):
    import fastmlp

    losses, state = _rerun(runs, fastmlp.plain_mlp, lambda m: step_bench.eager_step(m, step_bench._sgd(m)))
    assert step_bench.compare_runs(runs["start"], runs["losses"], runs["state"], losses, state) == []


def test_idle_run_fails_naming_what_differed(runs):
    """A no-op step: weights unchanged, the loss flat at its first value."""
    losses = [runs["losses"][0]] * len(runs["losses"])
    problems = step_bench.compare_runs(runs["start"], runs["losses"], runs["state"], losses, dict(runs["start"]))
    text = "; ".join(problems)
    assert any(p.startswith("loss of step") for p in problems), text
    assert any(p.startswith("weights:") for p in problems), text
    assert f"{len(runs['start'])} of {len(runs['start'])} parameters off" in text
    assert "off by 1 of eager's update" in text and f"tolerance {step_bench.UPDATE_TOL:g}" in text


def test_half_learning_rate_fails(runs):
    import fastmlp

    hyper = dict(step_bench.HYPER, lr=step_bench.HYPER["lr"] / 2)
    losses, state = _rerun(runs, fastmlp.plain_mlp,
                           lambda m: step_bench.eager_step(m, torch.optim.SGD(m.parameters(), **hyper)))
    problems = step_bench.compare_runs(runs["start"], runs["losses"], runs["state"], losses, state)
    assert any(p.startswith("weights:") for p in problems), problems


def test_perturbed_run_within_tolerance_passes(runs):
    """Rounding-sized noise on every loss and a 1% error in every update pass."""
    gen = torch.Generator().manual_seed(2)
    losses = [v * (1 + 1e-6) + 1e-6 for v in runs["losses"]]
    state = {}
    for name, w in runs["state"].items():
        update = w - runs["start"][name]
        noise = torch.randn(w.shape, generator=gen)
        state[name] = w + 0.01 * update.norm() * noise / noise.norm()
    assert step_bench.compare_runs(runs["start"], runs["losses"], runs["state"], losses, state) == []


def test_fused_cpu_step_passes(runs):
    """fastmlp's whole-step op on the CPU (another summation order than torch's) passes."""
    import fastmlp

    def make_step(m):
        opt = step_bench._sgd(m)
        return lambda x, y: m.sgd_step(x, y, opt)

    losses, state = _rerun(runs, fastmlp.FusedMLP, make_step)
    assert step_bench.compare_runs(runs["start"], runs["losses"], runs["state"], losses, state) == []


def test_wrong_first_loss_and_missing_parameter_fail(runs):
    losses = list(runs["losses"])
    losses[0] += 1e-3 * max(1.0, abs(losses[0]))  # step 1 starts from the same weights: 1e-4 allowed
    state = dict(runs["state"])
    state.pop("0.bias")
    problems = step_bench.compare_runs(runs["start"], runs["losses"], runs["state"], losses, state)
    assert any(p.startswith("loss of step 1 ") for p in problems), problems
    assert "weights: parameter 0.bias missing" in problems
    assert step_bench.compare_runs(runs["start"], runs["losses"], runs["state"], losses[:-1], runs["state"])


def test_layer_check_passes_fused_cpu_kernels_and_counts_flips():
    import fastmlp

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 40, generator=gen).requires_grad_()
    w = (torch.randn(24, 40, generator=gen) / 40**0.5).requires_grad_()
    b = torch.randn(24, generator=gen).requires_grad_()
    gy = torch.randn(64, 24, generator=gen)
    y = fastmlp.functional.linear_relu(x, w, b)
    y.backward(gy)
    check = layer_bench.check_layer(x, w, b, gy, y, x.grad, w.grad, b.grad)
    assert check["errors"] == 0 and check["mask_flips"] == 0, check["problems"]
    assert check["elements"] == y.numel() + x.numel() + w.numel() + b.numel()

    # A pre-activation within rounding of 0, put on the other side: a mask flip, not an error.
    with torch.no_grad():
        z = F.linear(x, w, b)
        b[0] -= z[5, 0]  # z[5, 0] is now ~0
        y = torch.relu(F.linear(x, w, b))
        z0 = F.linear(x.double(), w.double(), b.double())[5, 0].item()
        y[5, 0] = max(-z0, 1e-7) if z0 <= 0 else 0.0  # the other side of 0, within rounding of z0
    check = layer_bench.check_layer(x, w, b, gy, y, None, None, None)
    assert check["errors"] == 0 and check["mask_flips"] == 1, check["problems"]


def test_layer_check_fails_on_real_errors():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(32, 20, generator=gen)
    w = torch.randn(12, 20, generator=gen) / 20**0.5
    b = torch.randn(12, generator=gen)
    gy = torch.randn(32, 12, generator=gen)
    y = torch.relu(F.linear(x, w, b))
    dz = gy * (y > 0)
    gx, gw, gb = dz @ w, dz.T @ x, dz.sum(0)
    assert layer_bench.check_layer(x, w, b, gy, y, gx, gw, gb)["errors"] == 0

    bad_w = gw.clone()
    bad_w[3, 7] += 1e-3  # 1e-4 of |gw[3, 7]|, yet 10 times the float32 bound of that element
    check = layer_bench.check_layer(x, w, b, gy, y, gx, bad_w, gb)
    assert check["errors"] == 1 and check["problems"][0].startswith("grad_weight: 1 of 240 elements"), check

    i, j = (y > 1.0).nonzero()[0].tolist()  # a clearly positive output dropped by the ReLU: a real error
    bad_y = y.clone()
    bad_y[i, j] = 0.0
    check = layer_bench.check_layer(x, w, b, gy, bad_y, None, None, None)
    assert check["errors"] >= 1 and check["mask_flips"] == 0
    assert any(p.startswith("relu: 1 outputs on the wrong side") for p in check["problems"]), check


@pytest.mark.parametrize("script", [step_bench, layer_bench, infer_bench],
                         ids=["gpu_step_bench", "gpu_bench", "gpu_infer_bench"])
def test_help_and_no_gpu(script, capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        script.main(["--help"])
    assert e.value.code == 0
    assert "usage:" in capsys.readouterr().out
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.delenv("FASTMLP_CUDA_KERNELS", raising=False)  # restored afterwards, whatever main() does
    assert script.main([]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
