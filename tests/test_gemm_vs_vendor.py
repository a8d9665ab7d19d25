"""benchmarks/gemm_vs_vendor.py: its check fails a wrong GEMM result, and a small run prints a row per
layer GEMM and writes them to JSON (in a subprocess: the script sets fastmlp's ISA and GEMM mode)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gemm_vs_vendor.py"


def _load():
    spec = importlib.util.spec_from_file_location("_bench_gemm_vs_vendor", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_check_passes_float32_and_fails_a_wrong_result():
    bench = _load()
    a, b = torch.randn(64, 300, dtype=torch.float64), torch.randn(300, 40, dtype=torch.float64)
    truth = a @ b
    bench.check("right", (a.float() @ b.float()), truth, 300)
    with pytest.raises(SystemExit, match="wrong"):
        bench.check("wrong", (a.float() @ b.float()) * 1.01, truth, 300)
    with pytest.raises(SystemExit, match="dropped"):
        bench.check("dropped", torch.zeros(64, 40), truth, 300)


def test_small_run_prints_and_records_every_gemm(tmp_path):
    import fastmlp

    if fastmlp.backend_info()["cpu"] != "compiled":
        pytest.skip("needs the compiled CPU extension")
    out = tmp_path / "gemms.json"
    shapes = "7x33x10,1x16x8"
    run = subprocess.run([sys.executable, str(SCRIPT), "--shapes", shapes, "--rounds", "1", "--threads", "1",
                          "--json", str(out)], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(Path(fastmlp.__file__).parent.parent)))
    assert run.returncode == 0, run.stdout + run.stderr
    for layer in ("7x33->10", "1x16->8"):
        for gemm in ("forward", "dX", "dW"):
            assert f"| {layer} | {gemm} |" in run.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [(r["shape"], r["gemm"]) for r in rows] == [(s, g) for s in shapes.split(",") for g in ("forward", "dX", "dW")]
    assert all(r["gflops"]["fastmlp"] > 0 and r["gflops"]["mkl"] > 0 for r in rows)
