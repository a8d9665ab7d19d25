"""The benchmark runner (fastmlp bench): tiny cases, the JSON it writes, --compare, --show, --list, and
the checks that keep a wrong or idle variant from ever getting a ratio. Timings are not checked (CI
machines are noisy); a few seconds in all, no torch.compile."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmlp
from fastmlp import bench
from fastmlp.bench import layers as bench_layers
from fastmlp.bench import training as bench_training
from fastmlp.data import Split

SMALL = "layer/64x64x10/fwdbwd"
BASE_ARGS = ["--repeat", "3", "--chunk-ms", "0.2", "--no-compile", "--no-peak", "--threads", "1"]


def run_json(tmp_path, name, *args, cases=SMALL):
    path = tmp_path / name
    status = bench.main(["--cases", cases, *BASE_ARGS, "--json", str(path), *args])
    return status, json.loads(path.read_text())


def check_variant(v):
    assert v["status"] == "ok"
    for key in ("median_s", "q1_s", "q3_s", "min_s", "mean_s", "median_us", "gflops"):
        assert isinstance(v[key], float) and v[key] > 0, key
    assert v["q1_s"] <= v["median_s"] <= v["q3_s"]
    assert v["rounds"] == 3 and len(v["samples_s"]) == 3
    assert v["iterations"] >= 1


def test_json_schema(tmp_path):
    status, doc = run_json(tmp_path, "run.json")
    assert status == 0
    assert doc["schema"] == bench.SCHEMA
    assert {"created", "command", "mode", "machine", "peak", "settings", "results"} <= set(doc)
    m = doc["machine"]
    assert {"cpu", "cpu_flags", "cores", "threads", "torch", "backend"} <= set(m)
    assert m["backend"]["cpu"] in ("compiled", "fallback")
    assert doc["settings"]["rounds"] == 3
    [r] = doc["results"]
    assert r["id"] == SMALL and r["kind"] == "layer" and r["pass"] == "fwdbwd"
    assert r["shape"] == {"batch": 64, "in": 64, "out": 10}
    assert r["flops"] == 3 * 2 * 64 * 64 * 10
    assert set(r["variants"]) == {"fastmlp", "torch"} and r["ours"] == ["fastmlp"]
    for v in r["variants"].values():
        check_variant(v)
    assert r["speedup"]["torch"] == pytest.approx(r["variants"]["torch"]["median_s"] / r["variants"]["fastmlp"]["median_s"])
    assert r["speedup"]["compile"] is None
    assert r["speedup_vs_torch"] == {"fastmlp": r["speedup"]["torch"]}
    for name in ("fastmlp", "torch"):  # both checked against the float64 truth, flips counted apart
        c = r["checks"][name]
        assert c["ok"] and c["errors"] == 0 and c["mask_flips"] >= 0 and c["elements"] > 0
    assert "target" not in r


def test_compare_flags_regression(tmp_path, capsys):
    _, doc = run_json(tmp_path, "run.json")
    r = doc["results"][0]
    # An earlier run where fastmlp was 3x faster and its speed-up 3x larger: now a regression.
    old = copy.deepcopy(doc)
    o = old["results"][0]
    for key in ("median_s", "q1_s", "q3_s", "min_s", "mean_s"):
        o["variants"]["fastmlp"][key] /= 3
    o["speedup"]["torch"] = r["speedup"]["torch"] * 3
    regressions, report = bench.compare(old, doc)
    assert [x["id"] for x in regressions] == [SMALL]
    assert any("median" in f for f in regressions[0]["flags"])
    assert any("vs torch" in f for f in regressions[0]["flags"])
    assert "REGRESSION" in report
    assert bench.compare(old, doc, criteria="ratio")[0][0]["flags"] == [f for f in regressions[0]["flags"] if "vs" in f]
    assert bench.compare(old, doc, criteria="median")[0][0]["flags"] == [f for f in regressions[0]["flags"] if "median" in f]

    # An earlier run that was 3x slower: no regression.
    better = copy.deepcopy(doc)
    b = better["results"][0]
    for key in ("median_s", "q1_s", "q3_s", "min_s", "mean_s"):
        b["variants"]["fastmlp"][key] *= 3
    b["speedup"]["torch"] = r["speedup"]["torch"] / 3
    assert bench.compare(better, doc)[0] == []

    # Through the command line: exit status 1 only with --fail-on-regression.
    old_path = tmp_path / "old.json"
    old_path.write_text(json.dumps(old))
    assert run_json(tmp_path, "new.json", "--compare", str(old_path))[0] == 0
    assert run_json(tmp_path, "new2.json", "--compare", str(old_path), "--fail-on-regression")[0] == 1
    assert "REGRESSION" in capsys.readouterr().out
    better_path = tmp_path / "better.json"
    better_path.write_text(json.dumps(better))
    assert run_json(tmp_path, "new3.json", "--compare", str(better_path), "--fail-on-regression")[0] == 0


def test_show_and_list(tmp_path, capsys):
    _, doc = run_json(tmp_path, "run.json")
    capsys.readouterr()
    assert bench.main(["--show", str(tmp_path / "run.json")]) == 0
    out = capsys.readouterr().out
    assert doc["command"] in out and SMALL in out and "fastmlp x vs torch" in out
    assert f"{doc['results'][0]['speedup']['torch']:.2f}x" in out
    assert bench.main(["--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == bench.all_case_ids()
    quick = {line.split()[0] for line in listed if line.endswith("[quick]")}
    assert quick == set(bench.select_cases(bench.QUICK_CASES)) and SMALL in quick and "layer/64x64x10/fwd" not in quick


def test_failing_variant_is_reported_not_fatal(tmp_path, monkeypatch):
    def broken(k, n):
        raise RuntimeError("cannot build this variant")

    monkeypatch.setitem(bench.LAYER_VARIANTS, "broken", bench.Variant(broken, ours=True))
    status, doc = run_json(tmp_path, "run.json", "--variants", "fastmlp,torch,broken")
    assert status == 0
    v = doc["results"][0]["variants"]
    assert v["broken"] == {"status": "n/a", "error": "RuntimeError: cannot build this variant"}
    check_variant(v["fastmlp"])


class _WrongLayer(nn.Linear):
    """relu(x @ W.T + b) with the bias dropped: a plausible kernel bug."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias * 0).relu()


class _IdleLayer(nn.Linear):
    def forward(self, x):
        return F.linear(x, self.weight, self.bias).relu() * 0


@pytest.mark.parametrize("layer", [_WrongLayer, _IdleLayer])
def test_wrong_layer_variant_fails_the_run(tmp_path, monkeypatch, capsys, layer):
    monkeypatch.setitem(bench.LAYER_VARIANTS, "fastmlp-bad", bench.Variant(layer, ours=True))
    status, doc = run_json(tmp_path, "run.json")
    assert status == 1
    [r] = doc["results"]
    bad = r["variants"]["fastmlp-bad"]
    assert bad["status"] == "wrong" and "output" in bad["error"]
    assert "fastmlp-bad" not in r["speedup_vs_torch"]
    assert not r["checks"]["fastmlp-bad"]["ok"] and r["checks"]["fastmlp-bad"]["errors"] > 0
    check_variant(r["variants"]["fastmlp"])  # the others still run
    assert f"FAILED: {SMALL}: fastmlp-bad" in capsys.readouterr().out


@pytest.mark.parametrize("layer", [_WrongLayer, _IdleLayer, None], ids=["no-bias", "idle", "float32-layer"])
def test_bf16_layer_case_checks_its_variants(tmp_path, monkeypatch, capsys, layer):
    """bf16 cases: the right layer under autocast, PyTorch's in float32 and under autocast pass the
    widened bounds; a wrong layer under autocast fails them."""
    if layer is not None:
        monkeypatch.setitem(bench.BF16_LAYER_VARIANTS, "fastmlp-bad",
                            bench.Variant(lambda k, n: bench_layers._Autocast(layer(k, n)), ours=True))
    status, doc = run_json(tmp_path, "bf16.json", cases="bf16/64x784x128/fwdbwd")
    [r] = doc["results"]
    assert r["kind"] == "bf16" and sorted(r["checks"]) == sorted(["fastmlp", "torch", "autocast"]
                                                                 + ([] if layer is None else ["fastmlp-bad"]))
    for name in ("fastmlp", "torch", "autocast"):
        check_variant(r["variants"][name])
    assert r["speedup"]["autocast"] > 0 and r["speedup"]["torch"] > 0
    if layer is None:
        assert status == 0
    else:
        assert status == 1 and r["variants"]["fastmlp-bad"]["status"] == "wrong"
        assert "FAILED: bf16/64x784x128/fwdbwd: fastmlp-bad" in capsys.readouterr().out


def test_check_layer_counts_mask_flips_apart_from_errors():
    torch.manual_seed(0)
    x, w, b, gy = torch.randn(8, 5), torch.randn(3, 5), torch.randn(3), torch.randn(8, 3)
    b[0] = -(x[2] @ w[0]) + 1e-7  # one pre-activation within float32 rounding of 0
    near = torch.zeros(8, 3, dtype=torch.bool)
    near[2, 0] = True

    def run(mask_of):  # a layer whose ReLU keeps mask_of(z), with its output and gradients
        xr, wr, br = (t.clone().requires_grad_(True) for t in (x, w, b))
        z = F.linear(xr, wr, br)
        y = torch.where(mask_of(z), z, torch.zeros_like(z))
        return (y, *torch.autograd.grad(y, [xr, wr, br], gy))

    ok = bench.check_layer(x, w, b, gy, *run(lambda z: z > 0))
    assert ok.ok and ok.mask_flips == 0 and ok.elements > 0
    flip = bench.check_layer(x, w, b, gy, *run(lambda z: (z > 0) ^ near))  # the boundary element flipped
    assert flip.ok and flip.mask_flips == 1
    far = near.roll(1, 0)  # a flip away from the boundary is an error
    assert not bench.check_layer(x, w, b, gy, *run(lambda z: (z > 0) ^ far)).ok
    assert not bench.check_layer(x, w, b * 0, gy, *run(lambda z: z > 0)).ok  # a dropped bias
    y, gx, gw, gb = run(lambda z: z > 0)
    assert not bench.check_layer(x, w, b, gy, y, gx, gw, gb * 2).ok
    assert not bench.check_layer(x, w, b, gy, y, gx, gw + 1e-3, gb).ok


def _idle_steps(sizes, state):
    model = fastmlp.FusedMLP(sizes)
    model.load_state_dict(state)
    return bench.Stepper(model, lambda x, y: torch.tensor(2.3),
                         many=lambda x, y, batch: torch.full((-(-len(y) // batch),), 2.3))


def _half_lr_steps(sizes, state):
    model = fastmlp.FusedMLP(sizes)
    model.load_state_dict(state)
    opt = torch.optim.SGD(model.parameters(), **dict(bench.SGD, lr=bench.SGD["lr"] / 2))
    return bench.Stepper(model, lambda x, y: model.sgd_step(x, y, opt))


@pytest.mark.parametrize("build", [_idle_steps, _half_lr_steps])
def test_wrong_step_variant_fails_the_run(tmp_path, monkeypatch, capsys, build):
    monkeypatch.setitem(bench.STEP_VARIANTS, "fastmlp-bad", bench.Variant(build, ours=True))
    status, doc = run_json(tmp_path, "run.json", "--epoch-steps", "4", "--variants", "fastmlp-step,torch,fastmlp-bad",
                           cases="step/784-256-10,epoch/784-256-10")
    assert status == 1
    out = capsys.readouterr().out
    for r in doc["results"]:
        bad = r["variants"]["fastmlp-bad"]
        assert bad["status"] == "wrong" and "update of" in bad["error"]
        assert "fastmlp-bad" not in r["speedup_vs_torch"] and r["variants"]["fastmlp-step"]["status"] == "ok"
        assert f"FAILED: {r['id']}: fastmlp-bad" in out
    # Checked against eager torch even when torch is not among the variants timed.
    status, doc = run_json(tmp_path, "alone.json", "--variants", "fastmlp-bad", cases="step/784-256-10")
    assert status == 1 and set(doc["results"][0]["variants"]) == {"fastmlp-bad"}
    assert doc["results"][0]["variants"]["fastmlp-bad"]["status"] == "wrong"


def test_training_cases_and_step_registry(tmp_path, monkeypatch):
    # Another step variant plugs in through the registry (as a fused whole-step path would).
    monkeypatch.setitem(bench.STEP_VARIANTS, "fastmlp-again", bench.STEP_VARIANTS["fastmlp"])
    status, doc = run_json(tmp_path, "train.json", "--epoch-steps", "4", cases="step/784-256-10,epoch/784-256-10")
    assert status == 0
    step, epoch = doc["results"]
    assert step["id"] == "step/784-256-10" and epoch["id"] == "epoch/784-256-10"
    expected = {v for v in bench.STEP_VARIANTS if v != "compile"}
    assert "fastmlp-again" in expected and "fastmlp-step" in expected
    assert set(step["variants"]) == expected and set(step["ours"]) == expected - {"torch"}
    assert set(step["speedup_vs_torch"]) == expected - {"torch"}
    for v in [*step["variants"].values(), *epoch["variants"].values()]:
        assert v["status"] == "ok" and v["median_s"] > 0
    assert epoch["extrapolated"] and epoch["timed_steps"] == 4 and epoch["epoch_steps"] == 938
    # Per step: forward 784x256 and 256x10, dW of both, dX of the second only.
    assert step["flops"] == 2 * 64 * (2 * 784 * 256 + 3 * 256 * 10)
    assert "target" not in epoch


def test_epoch_parts_go_to_a_many_step_variant_whole():
    """A stepper with many() (fastmlp-steps) gets each part of the epoch as one call over its rows."""
    case = bench.TrainCase("784-256-10", variants=["torch"])
    plan = case.epoch_plan(epoch_steps=10, segments=2)
    assert [len(p) for p in plan.parts] == [5, 5] and plan.scale == pytest.approx(938 / 10)
    calls = []
    torch_stepper = case.steppers["torch"]
    case.steppers["many"] = bench.Stepper(torch_stepper.model, torch_stepper.step,
                                          many=lambda x, y, batch: calls.append((len(x), len(y), batch)))
    run = case.epoch_sampler("many", plan, clock=lambda: 0.0)
    assert run(3) == [0.0] * 3
    assert calls == [(320, 320, 64)] * 3
    assert bench.STEP_VARIANTS["fastmlp-steps"].ours and not bench.STEP_VARIANTS["torch"].ours


def _small_splits(dataset, root):
    gen = torch.Generator().manual_seed(1)

    def split(name, n):
        return Split(name, torch.rand(n, 784, generator=gen) * 2 - 1, torch.randint(0, 10, (n,), generator=gen))

    return {"train": split("train", 3000), "val": split("val", 500), "test": split("test", 100)}, "random stand-in"


def test_trainer_case_checks_and_times_the_trainer(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_training, "_splits", _small_splits)
    status, doc = run_json(tmp_path, "trainer.json", cases="trainer/mnist")
    assert status == 0
    [r] = doc["results"]
    assert r["kind"] == "trainer" and r["dataset"] == "mnist" and r["data"] == "random stand-in"
    assert r["ours"] == ["fastmlp"] and r["steps_per_epoch"] == 47
    for v in r["variants"].values():
        assert v["status"] == "ok" and v["rounds"] == 3 and v["gflops"] is None
    assert r["speedup"]["torch"] > 0


def test_bf16_trainer_case(tmp_path, monkeypatch):
    """trainer-bf16: --precision bf16 timed against the float32 torch trainer and checked against the
    torch trainer under autocast, with the bf16 tolerances."""
    monkeypatch.setattr(bench_training, "_splits", _small_splits)
    status, doc = run_json(tmp_path, "trainer.json", cases="trainer-bf16/mnist")
    assert status == 0
    [r] = doc["results"]
    assert r["kind"] == "trainer" and r["precision"] == "bf16" and r["ours"] == ["fastmlp"]
    assert sorted(r["variants"]) == ["autocast", "fastmlp", "torch"]
    assert all(v["status"] == "ok" for v in r["variants"].values())
    assert r["speedup"]["torch"] > 0 and r["speedup"]["autocast"] > 0


def test_inference_case(tmp_path, monkeypatch, capsys):
    status, doc = run_json(tmp_path, "infer.json", cases="infer/784-256-10/b1")
    assert status == 0
    [r] = doc["results"]
    assert r["kind"] == "infer" and r["batch"] == 1 and r["ours"] == ["fastmlp"]
    assert r["flops"] == 2 * (784 * 256 + 256 * 10)
    for v in r["variants"].values():
        check_variant(v)

    class Wrong(nn.Module):  # the plain model with its output bias dropped
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x) - self.model[-1].bias

    plain = bench.INFER_VARIANTS["torch"].build
    monkeypatch.setitem(bench.INFER_VARIANTS, "fastmlp-bad",
                        bench.Variant(lambda sizes, state: Wrong(plain(sizes, state)), ours=True))
    status, doc = run_json(tmp_path, "infer2.json", cases="infer/784-256-10/b1")
    assert status == 1 and doc["results"][0]["variants"]["fastmlp-bad"]["status"] == "wrong"
    assert "FAILED: infer/784-256-10/b1: fastmlp-bad" in capsys.readouterr().out


def test_trainer_epoch_check():
    ref = {"epoch": 1, "train_loss": 0.30, "val_accuracy": 0.95}
    assert bench.check_epoch({"epoch": 1, "train_loss": 0.301, "val_accuracy": 0.948}, ref) == []
    idle = bench.check_epoch({"epoch": 1, "train_loss": 2.30, "val_accuracy": 0.10}, ref)
    assert len(idle) == 2 and "train loss" in idle[0] and "validation accuracy" in idle[1]


def test_threads_restored_and_models_match(tmp_path):
    import fastmlp.models

    before = torch.get_num_threads()
    run_json(tmp_path, "run.json")  # --threads 1
    assert torch.get_num_threads() == before
    assert sorted(bench.MODELS.values()) == sorted(tuple(s) for s in fastmlp.models.SIZES.values())
    assert sorted(bench.DATASETS) == sorted(fastmlp.models.SIZES)


def test_case_selection():
    ids = bench.all_case_ids()
    assert len(ids) == (len(bench.LAYER_SHAPES) + len(bench.BF16_LAYER_SHAPES)) * 3 + 4 * len(bench.MODELS) + 2 * len(
        bench.DATASETS)
    assert bench.select_cases(["64x784x256/fwdbwd"]) == ["layer/64x784x256/fwdbwd", "bf16/64x784x256/fwdbwd"]
    assert bench.select_cases(["layer/64x784x256/fwdbwd"]) == ["layer/64x784x256/fwdbwd"]
    assert bench.select_cases(["layer/8192x784x256*"]) == [f"layer/8192x784x256/{p}" for p in bench.PASSES]
    quick = bench.select_cases(bench.QUICK_CASES)
    assert "layer/64x784x256/fwdbwd" in quick and "epoch/784-128-64-10" in quick and "trainer/mnist" in quick
    assert "infer/784-128-64-10/b1" in quick and "bf16/512x784x256/fwdbwd" in quick
    assert bench.main(["--cases", "no-such-case"]) == 2
    assert bench.select_cases(["layer/64x64x10/fwd"]) == ["layer/64x64x10/fwd"]
    assert bench.select_cases(["64x64x10/fwd"]) == ["layer/64x64x10/fwd", "layer/64x64x10/fwdbwd"]
