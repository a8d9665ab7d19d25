"""One whole training step and one whole epoch (938 steps of batch 64 over a pre-made random
(60000, 784) tensor, SGD lr 0.01 momentum 0.9) of each project model (fastmlp.bench.MODELS), for every
step variant of fastmlp.bench.STEP_VARIANTS, and whole epochs of `fastmlp train`'s Trainer (fused vs
--backend torch, real data with --fastmlp-data ROOT; and with --precision bf16 against the float32
torch trainer and the torch trainer under autocast). Variants interleaved per case, each checked
against PyTorch first (see conftest.py)."""

import pytest

from fastmlp import bench

CASES = [f"{kind}/{model}" for model in bench.MODELS for kind in ("step", "epoch")]  # model-major: one build each
PARAMS = [pytest.param(cid, v, id=f"{cid}-{v}") for cid in CASES for v in bench.STEP_VARIANTS]
PARAMS += [pytest.param(f"{kind}/{d}", v, id=f"{kind}/{d}-{v}") for kind, precision in
           (("trainer", "fp32"), ("trainer-bf16", "bf16")) for d in bench.DATASETS
           for v in bench.TRAINER_VARIANTS[precision]]


@pytest.mark.parametrize("case_id,variant", PARAMS)
def test_training(benchmark, fastmlp_bench, case_id, variant):
    fastmlp_bench.record(benchmark, case_id, variant)
