"""A whole course MLP's forward under torch.inference_mode() at batch 1 and 64: FusedMLP (one op)
vs the plain nn.Linear/nn.ReLU model, eager and under torch.compile. Variants interleaved per case,
each output checked against a float64 truth first (see conftest.py)."""

import pytest

from fastmlp import bench

CASES = [cid for cid in bench.all_case_ids() if cid.startswith("infer/")]
PARAMS = [pytest.param(cid, v, id=f"{cid}-{v}") for cid in CASES for v in bench.INFER_VARIANTS]


@pytest.mark.parametrize("case_id,variant", PARAMS)
def test_inference(benchmark, fastmlp_bench, case_id, variant):
    fastmlp_bench.record(benchmark, case_id, variant)
