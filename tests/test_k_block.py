"""The K block of the CPU GEMMs (rows of B per packed panel; tuned per kind of CPU,
csrc/cpu/dispatch.cpp avx512_float_k_block) changes speed only: every element is summed in the same
order whatever the block, so each result must be the same bits under any block. Small blocks also run the paths a sum of many
blocks takes (partial sums parked in C, the whole step's weight gradient in its `partial` buffer)
on shapes whose sums fit one block of the CPU's own."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import fastmlp
from fastmlp import _ops
from _helpers import two_fused_steps

pytestmark = pytest.mark.skipif(fastmlp.backend("cpu") != "compiled", reason="the K block is the compiled kernels'")

BLOCKS = [16, 48, 1024]


@pytest.fixture
def k_block():
    """Sets a K block with set_cpu_k_block(n); each CPU's own again afterwards, and the layer GEMMs all
    fastmlp's (the vendor GEMM "auto" may time and choose for tall shapes has no K block to vary)."""
    mode = fastmlp.backend_info()["gemm"]
    fastmlp.set_gemm("fastmlp")
    try:
        yield _ops._C.set_cpu_k_block
    finally:
        _ops._C.set_cpu_k_block(0)
        fastmlp.set_gemm(mode)


def _layer_results(relu, shape, dtype):
    rows, fan_in, fan_out = shape
    torch.manual_seed(1)
    layer = (fastmlp.FusedLinearReLU if relu else fastmlp.Linear)(fan_in, fan_out, dtype=dtype)
    x = torch.randn(rows, fan_in, dtype=dtype, requires_grad=True)
    y = layer(x)
    y.backward(torch.randn_like(y))
    return [y.detach(), x.grad, layer.weight.grad, layer.bias.grad]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("relu", [True, False], ids=["linear_relu", "linear"])
@pytest.mark.parametrize("shape", [(64, 784, 256), (300, 785, 129), (2100, 33, 10)])
def test_layer_results_do_not_depend_on_k_block(isa, k_block, relu, shape, dtype):
    """Forward (K = in features), dX (K = out features) and dW (K = the batch: 300 and 2100 rows are
    sums of many blocks of 16 or 48, one of 1024 or of the CPU's own at 300) against the CPU's block."""
    if isa == "fallback":
        pytest.skip("the fallback is PyTorch's GEMM")
    want = _layer_results(relu, shape, dtype)
    for block in BLOCKS:
        k_block(block)
        assert fastmlp.backend_info()["cpu_k_block"] == block
        for name, a, b in zip(["output", "grad_input", "grad_weight", "grad_bias"], _layer_results(relu, shape, dtype),
                              want):
            assert torch.equal(a, b), f"{name} changed with K block {block}"


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("batch", [64, 300])
def test_step_does_not_depend_on_k_block(k_block, optimizer, batch):
    """The whole step: a batch longer than the block parks dW's partial sums in its own buffer, then
    updates from it; one within the block never materialises dW. Same bits either way."""
    runs = []
    for block in [0] + BLOCKS:
        k_block(block)
        runs.append(two_fused_steps(optimizer, batch))
    for block, run in zip(BLOCKS, runs[1:]):
        assert len(run) == len(runs[0])
        for a, b in zip(run, runs[0]):
            assert torch.equal(a, b), f"K block {block}"


@pytest.mark.parametrize("bad", [8, 100, 2048, -16])
def test_bad_k_block_is_refused(k_block, bad):
    before = fastmlp.backend_info()["cpu_k_block"]
    with pytest.raises(RuntimeError, match=f"multiple of 16 from 16 to 1024, or 0 for each CPU's own, got {bad}"):
        k_block(bad)
    assert fastmlp.backend_info()["cpu_k_block"] == before


def test_k_block_of_this_cpu_is_reported(k_block):
    """backend_info names the block in use: the CPU's own (a whole number of vectors) unless set."""
    own = fastmlp.backend_info()["cpu_k_block"]
    assert own % 8 == 0 and own >= 16
    k_block(64)
    assert fastmlp.backend_info()["cpu_k_block"] == 64
    k_block(0)
    assert fastmlp.backend_info()["cpu_k_block"] == own


def _kblock_ab():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "kblock_ab.py"
    spec = importlib.util.spec_from_file_location("_bench_kblock_ab", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kblock_ab_reports_every_case_and_restores_the_settings(tmp_path, monkeypatch):
    bench = _kblock_ab()
    monkeypatch.setattr(bench, "EPOCH_ROWS", 4096)  # a short "half epoch": this is a smoke test
    own, mode = fastmlp.backend_info()["cpu_k_block"], fastmlp.backend_info()["gemm"]
    out = tmp_path / "kb.json"
    assert bench.main(["--blocks", "64", "128", "--rounds", "1", "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["blocks"] == [64, 128] and set(got["cases"]) == set(bench.cases())
    assert all(c["ratio"] > 0 for c in got["cases"].values())
    assert fastmlp.backend_info()["cpu_k_block"] == own and fastmlp.backend_info()["gemm"] == mode


def test_kblock_ab_refuses_results_that_differ_between_blocks(monkeypatch):
    bench = _kblock_ab()

    def differ():
        return [torch.tensor(float(_ops._C.cpu_k_block()))]
    monkeypatch.setattr(bench, "cases", lambda: {"case": (differ, differ)})
    own, mode = fastmlp.backend_info()["cpu_k_block"], fastmlp.backend_info()["gemm"]
    with pytest.raises(SystemExit, match="case computes different bits with K blocks 64 and 128"):
        bench.main(["--blocks", "64", "128", "--rounds", "1"])
    assert fastmlp.backend_info()["cpu_k_block"] == own and fastmlp.backend_info()["gemm"] == mode


def test_kblock_ab_refuses_a_bad_block_and_restores_the_settings():
    bench = _kblock_ab()
    own, mode = fastmlp.backend_info()["cpu_k_block"], fastmlp.backend_info()["gemm"]
    with pytest.raises(RuntimeError, match="got 100"):
        bench.main(["--blocks", "64", "100", "--rounds", "1"])
    assert fastmlp.backend_info()["cpu_k_block"] == own and fastmlp.backend_info()["gemm"] == mode
