"""What is benchmarked: the case catalog and case-id selection.

Case ids: layer/MxKxN/PASS (one FusedLinearReLU against nn.Linear + nn.ReLU), bf16/MxKxN/PASS (the
same under torch.autocast(bfloat16), against PyTorch in float32 and under autocast), step/MODEL and
epoch/MODEL (training steps on a pre-made random set, every step variant), trainer/DATASET (whole
epochs of `fastmlp train`'s own Trainer, fused against --backend torch), trainer-bf16/DATASET (its
--precision bf16 against --backend torch in float32 and with --precision bf16), infer/MODEL/bBATCH
(the whole forward under torch.inference_mode()).
"""

from __future__ import annotations

import fnmatch

# Layer widths (in, out) of the two course MLPs, at batch 1 (inference-sized), 64 (the training
# batch), 1024 and 8192 (large batch).
LAYER_WIDTHS = [(784, 256), (256, 10), (784, 128), (128, 64), (64, 10)]
LAYER_BATCHES = [1, 64, 1024, 8192]
LAYER_SHAPES = [(m, k, n) for m in LAYER_BATCHES for k, n in LAYER_WIDTHS]  # (batch, in, out)
PASSES = ("fwd", "bwd", "fwdbwd")
# bf16 layer cases: the shapes of issue 11's targets.
BF16_LAYER_SHAPES = [(64, 784, 256), (64, 784, 128), (512, 784, 256)]
GEMMS_PER_PASS = {"fwd": 1, "bwd": 2, "fwdbwd": 3}

# The project's models (layer widths): fastmlp.models.SIZES, by width.
MODELS = {
    "784-128-64-10": (784, 128, 64, 10),
    "784-256-10": (784, 256, 10),
}
# The trainer cases: fastmlp.models.SIZES' datasets.
DATASETS = ("mnist", "fashion-mnist")

INFER_BATCHES = (1, 64)

# Step and epoch cases: an MNIST-sized training set, already tensors.
EPOCH_SAMPLES = 60000
BATCH = 64
IN_FEATURES = 784
NUM_CLASSES = 10
SGD = {"lr": 0.01, "momentum": 0.9}

# fastmlp's variant gets a ratio against each of these present in a case ("autocast": PyTorch under
# torch.autocast(bfloat16), in the bf16 cases).
BASELINES = ("torch", "compile", "autocast")

QUICK_CASES = [
    "layer/64x*/fwdbwd",
    "layer/8192x784x256/fwdbwd",
    "bf16/*/fwdbwd",
    "step/*",
    "epoch/*",
    "trainer/*",
    "infer/*",
]


def layer_id(shape, pass_):
    m, k, n = shape
    return f"layer/{m}x{k}x{n}/{pass_}"


def all_case_ids():
    ids = [layer_id(s, p) for s in LAYER_SHAPES for p in PASSES]
    ids += [layer_id(s, p).replace("layer/", "bf16/") for s in BF16_LAYER_SHAPES for p in PASSES]
    ids += [f"step/{name}" for name in MODELS]
    ids += [f"epoch/{name}" for name in MODELS]
    ids += [f"trainer/{name}" for name in DATASETS]
    ids += [f"trainer-bf16/{name}" for name in DATASETS]
    ids += [f"infer/{name}/b{batch}" for name in MODELS for batch in INFER_BATCHES]
    return ids


def select_cases(patterns, ids=None):
    """Case ids matching any pattern: a case id, a glob (layer/64x*/fwd*) or else a substring (784-256)."""
    ids = all_case_ids() if ids is None else ids
    if not patterns:
        return list(ids)
    out = []
    exact = set(ids)
    for cid in ids:
        for p in patterns:
            p = p.strip()
            if not p:
                continue
            if p in exact:  # a whole case id means that case only
                hit = cid == p
            elif any(c in p for c in "*?["):
                hit = fnmatch.fnmatchcase(cid, p)
            else:
                hit = p in cid
            if hit:
                out.append(cid)
                break
    return out
