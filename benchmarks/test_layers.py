"""FusedLinearReLU vs nn.Linear+nn.ReLU (eager) vs torch.compile of the same: forward, backward and
forward+backward at every shape of fastmlp.bench.LAYER_SHAPES. One test per case and variant, grouped
by case; the variants of a case are timed together, interleaved (see conftest.py)."""

import pytest

from fastmlp import bench

CASES = [bench.layer_id(shape, p) for shape in bench.LAYER_SHAPES for p in bench.PASSES]  # shape-major:
# the three passes of a shape share one build (and one compilation)
PARAMS = [pytest.param(cid, v, id=f"{cid}-{v}") for cid in CASES for v in bench.LAYER_VARIANTS]
# The same under torch.autocast(bfloat16), against PyTorch in float32 and under autocast.
BF16_CASES = [bench.layer_id(shape, p).replace("layer/", "bf16/") for shape in bench.BF16_LAYER_SHAPES
              for p in bench.PASSES]
PARAMS += [pytest.param(cid, v, id=f"{cid}-{v}") for cid in BF16_CASES for v in bench.BF16_LAYER_VARIANTS]


@pytest.mark.parametrize("case_id,variant", PARAMS)
def test_layer(benchmark, fastmlp_bench, case_id, variant):
    fastmlp_bench.record(benchmark, case_id, variant)
