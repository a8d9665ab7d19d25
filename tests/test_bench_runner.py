"""Smoke test of the benchmark runner (fastmlp bench): a tiny case, the JSON it writes, and --compare.
Timings are not checked (CI machines are noisy); a few seconds in all, no torch.compile."""

import copy
import json

import pytest

from fastmlp import bench

SMALL = "layer/64x64x10/fwdbwd"
BASE_ARGS = ["--repeat", "3", "--chunk-ms", "0.2", "--no-compile", "--no-peak", "--threads", "1"]


def run_json(tmp_path, name, *args):
    path = tmp_path / name
    status = bench.main(["--cases", SMALL, *BASE_ARGS, "--json", str(path), *args])
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
    assert {"cpu", "cores", "threads", "torch", "backend"} <= set(m)
    assert m["backend"]["cpu"] in ("compiled", "fallback")
    assert doc["settings"]["rounds"] == 3
    [r] = doc["results"]
    assert r["id"] == SMALL and r["kind"] == "layer" and r["pass"] == "fwdbwd"
    assert r["shape"] == {"batch": 64, "in": 64, "out": 10}
    assert r["flops"] == 3 * 2 * 64 * 64 * 10
    assert set(r["variants"]) == {"fastmlp", "torch"}
    for v in r["variants"].values():
        check_variant(v)
    assert r["speedup"]["torch"] == pytest.approx(r["variants"]["torch"]["median_s"] / r["variants"]["fastmlp"]["median_s"])
    assert r["speedup"]["compile"] is None
    assert r["max_abs_diff_vs_torch"]["fastmlp"] < 1e-3
    assert r["target"] == {"vs": "torch", "min": 1.5, "met": r["speedup"]["torch"] >= 1.5, "variant": "fastmlp",
                           "speedup": r["speedup"]["torch"]}


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


def test_failing_variant_is_reported_not_fatal(tmp_path, monkeypatch):
    def broken(k, n):
        raise RuntimeError("cannot build this variant")

    monkeypatch.setitem(bench.LAYER_VARIANTS, "broken", broken)
    status, doc = run_json(tmp_path, "run.json", "--variants", "fastmlp,torch,broken")
    assert status == 0
    v = doc["results"][0]["variants"]
    assert v["broken"] == {"status": "n/a", "error": "RuntimeError: cannot build this variant"}
    check_variant(v["fastmlp"])


def test_training_cases_and_step_registry(tmp_path, monkeypatch):
    # A fourth step variant plugs in through the registry (as a fused whole-step path would).
    monkeypatch.setitem(bench.STEP_VARIANTS, "fastmlp-again", bench.STEP_VARIANTS["fastmlp"])
    path = tmp_path / "train.json"
    status = bench.main(["--cases", "step/784-256-10,epoch/784-256-10", *BASE_ARGS, "--epoch-steps", "4",
                         "--json", str(path)])
    assert status == 0
    doc = json.loads(path.read_text())
    step, epoch = doc["results"]
    assert step["id"] == "step/784-256-10" and epoch["id"] == "epoch/784-256-10"
    expected = {v for v in bench.STEP_VARIANTS if v != "compile"}
    assert "fastmlp-again" in expected and "fastmlp-step" in expected
    assert set(step["variants"]) == expected
    assert set(step["speedup_vs_torch"]) == expected - {"torch"}
    for v in [*step["variants"].values(), *epoch["variants"].values()]:
        assert v["status"] == "ok" and v["median_s"] > 0
    assert epoch["extrapolated"] and epoch["timed_steps"] == 4 and epoch["epoch_steps"] == 938
    # Per step: forward 784x256 and 256x10, dW of both, dX of the second only.
    assert step["flops"] == 2 * 64 * (2 * 784 * 256 + 3 * 256 * 10)
    assert epoch["target"]["min"] == 2.4
    ours = {v: x for v, x in epoch["speedup_vs_torch"].items()}
    assert epoch["target"]["variant"] == max(ours, key=ours.get)


def test_epoch_parts_go_to_a_many_step_variant_whole(monkeypatch):
    """A step with .many (fastmlp-steps) gets each eighth of the epoch as one call over its rows."""
    calls = []

    def factory(sizes, state):
        def step(x, y):
            calls.append(("one", len(y)))

        step.many = lambda x, y, batch: calls.append(("many", len(x), len(y), batch))
        return step

    monkeypatch.setitem(bench.STEP_VARIANTS, "fastmlp-many", factory)
    case = bench.TrainCase("784-256-10", variants=["fastmlp-many"])
    calls.clear()
    run = case.sampler("fastmlp-many", "epoch", epoch_steps=10, segments=2)
    assert len(run(3)) == 3
    assert calls == [("many", 320, 320, 64)] * 3
    assert "fastmlp-steps" in bench.STEP_VARIANTS and bench.is_fastmlp("fastmlp-steps")


def test_threads_restored_and_models_match(tmp_path):
    import torch

    import fastmlp.models

    before = torch.get_num_threads()
    run_json(tmp_path, "run.json")  # --threads 1
    assert torch.get_num_threads() == before
    assert sorted(bench.MODELS.values()) == sorted(tuple(s) for s in fastmlp.models.SIZES.values())


def test_case_selection():
    ids = bench.all_case_ids()
    assert len(ids) == len(bench.LAYER_SHAPES) * 3 + 2 * len(bench.MODELS)
    assert bench.select_cases(["64x784x256/fwdbwd"]) == ["layer/64x784x256/fwdbwd"]
    assert bench.select_cases(["layer/8192*"]) == [f"layer/8192x784x256/{p}" for p in bench.PASSES]
    quick = bench.select_cases(bench.QUICK_CASES)
    assert "layer/64x784x256/fwdbwd" in quick and "epoch/784-128-64-10" in quick
    assert bench.main(["--cases", "no-such-case"]) == 2
    assert bench.select_cases(["layer/64x64x10/fwd"]) == ["layer/64x64x10/fwd"]
    assert bench.select_cases(["64x64x10/fwd"]) == ["layer/64x64x10/fwd", "layer/64x64x10/fwdbwd"]
