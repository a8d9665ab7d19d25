"""benchmarks/cpu_targets.py: issues 11 and 12's targets read from `fastmlp bench --json` files —
met, missed (naming the cases below), not measured (a case missing or failed), or not the target
machine (bf16 targets on a CPU without AMX-BF16); several runs count with their worst ratio."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "cpu_targets.py"


@pytest.fixture(scope="module")
def targets():
    spec = importlib.util.spec_from_file_location("_bench_cpu_targets", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_file(path, ratios, flags=("avx2", "avx512f"), cpu="Test CPU", isa="avx512"):
    """A bench file holding `ratios` ({case id: {variant: ratio or None}})."""
    results = [{"id": case, "speedup": dict(per)} for case, per in ratios.items()]
    path.write_text(json.dumps({
        "schema": "fastmlp-bench/2", "command": "fastmlp bench (test)", "results": results,
        "machine": {"cpu": cpu, "cpu_flags": list(flags), "threads": 2, "backend": {"cpu_isa": isa}}}))
    return str(path)


def _fp32_cases(targets, ratio=1.5):
    cases = {c: {"torch": ratio} for c in targets._layer_ids()}
    cases["trainer/mnist"] = {"torch": 3.6}
    cases["trainer/fashion-mnist"] = {"torch": 3.1}
    return cases


def _rows(targets, capsys, *argv):
    assert targets.main(list(argv)) == 0
    out = capsys.readouterr().out
    return {line.split(" | ")[1]: line for line in out.splitlines() if line.startswith("| 1")}


def test_all_layer_cases_and_epochs_met(targets, tmp_path, capsys):
    rows = _rows(targets, capsys, _run_file(tmp_path / "a.json", _fp32_cases(targets)))
    every, batch64, mnist, fashion = (t.text for t in targets.TARGETS[:4])
    assert "60 of 60" in rows[every] and "**met**" in rows[every]
    assert "5 of 5" in rows[batch64] and "**met**" in rows[batch64]
    assert "**met**" in rows[mnist] and "**met**" in rows[fashion]


def test_one_slow_case_misses_and_is_named(targets, tmp_path, capsys):
    cases = _fp32_cases(targets)
    cases["layer/8192x128x64/bwd"] = {"torch": 0.93}
    cases["layer/64x784x256/fwdbwd"] = {"torch": 1.05}  # >= 1.0 but not the 1.1 of batch 64
    cases["trainer/fashion-mnist"] = {"torch": 2.9}
    rows = _rows(targets, capsys, _run_file(tmp_path / "a.json", cases))
    every, batch64, _, fashion = (t.text for t in targets.TARGETS[:4])
    assert "**missed**" in rows[every] and "layer/8192x128x64/bwd 0.93x" in rows[every]
    assert "0.93x (layer/8192x128x64/bwd)" in rows[every]
    assert "**missed**" in rows[batch64] and "layer/64x784x256/fwdbwd 1.05x" in rows[batch64]
    assert "**missed**" in rows[fashion] and "2.90x" in rows[fashion]


def test_missing_or_failed_cases_are_not_measured(targets, tmp_path, capsys):
    cases = _fp32_cases(targets)
    del cases["layer/1x64x10/fwd"]
    cases["trainer/mnist"] = {"torch": None}  # fastmlp's epoch failed its check
    rows = _rows(targets, capsys, _run_file(tmp_path / "a.json", cases))
    every, _, mnist, _ = (t.text for t in targets.TARGETS[:4])
    assert "59 of 60" in rows[every] and "**not measured**" in rows[every] and "layer/1x64x10/fwd" in rows[every]
    assert "**not measured**" in rows[mnist] and "no valid ratio" in rows[mnist]


def test_several_runs_count_with_their_worst_ratio(targets, tmp_path, capsys):
    fast, slow = _fp32_cases(targets), _fp32_cases(targets)
    slow["trainer/mnist"] = {"torch": 3.2}
    failed = {"trainer/fashion-mnist": {"torch": None}}
    rows = _rows(targets, capsys, _run_file(tmp_path / "a.json", fast), _run_file(tmp_path / "b.json", slow),
                 _run_file(tmp_path / "c.json", failed))
    _, _, mnist, fashion = (t.text for t in targets.TARGETS[:4])
    assert "**missed**" in rows[mnist] and "3.20x" in rows[mnist]
    assert "**not measured**" in rows[fashion]


def test_bf16_targets_need_amx(targets, tmp_path, capsys):
    bf16 = {f"bf16/{s}/fwdbwd": {"torch": 4.5, "autocast": 3.2} for s in targets.BF16_SHAPES}
    bf16.update({"trainer-bf16/mnist": {"torch": 8.5, "autocast": 5.0},
                 "trainer-bf16/fashion-mnist": {"torch": 5.5, "autocast": 4.0}})
    no_amx = _rows(targets, capsys, _run_file(tmp_path / "a.json", bf16))
    assert all("not the target machine" in no_amx[t.text] for t in targets.TARGETS if t.issue == 11)
    amx = _rows(targets, capsys, _run_file(tmp_path / "b.json", bf16, flags=("avx512f", "amx_bf16")))
    layer_fp32, layer_autocast, mnist, fashion = (t.text for t in targets.TARGETS if t.issue == 11)
    assert "**met**" in amx[layer_fp32] and "**met**" in amx[layer_autocast] and "**met**" in amx[mnist]
    assert "**missed**" in amx[fashion] and "5.50x" in amx[fashion]


def test_refuses_other_files_and_mixed_machines(targets, tmp_path, capsys):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"rows": []}))
    assert targets.main([str(other)]) == 2
    assert "not a `fastmlp bench --json` file" in capsys.readouterr().err
    a = _run_file(tmp_path / "a.json", {"trainer/mnist": {"torch": 4.0}})
    b = _run_file(tmp_path / "b.json", {"trainer/mnist": {"torch": 4.0}}, isa="avx2")
    assert targets.main([a, b]) == 2
    assert "different CPUs or fastmlp ISAs" in capsys.readouterr().err
    assert targets.main([str(tmp_path / "missing.json")]) == 2


def test_targets_name_real_cases_that_cpu_check_runs(targets):
    """Every case a target needs is a `fastmlp bench` case, selected by the runs cpu_check.sh makes
    (so no target can wait for a case that is never measured), and the script parses."""
    import re
    import subprocess

    from fastmlp.bench.cases import all_case_ids, select_cases

    script = SCRIPT.parent / "cpu_check.sh"
    selected = set()
    for patterns in re.findall(r'--cases "([^"]+)"', script.read_text()):
        selected.update(select_cases(patterns.split(",")))
    for t in targets.TARGETS:
        assert set(t.cases) <= set(all_case_ids()), t.text
        assert set(t.cases) <= selected, t.text
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
