"""Data parallel through PyTorch's own engine: `torchrun --nproc_per_node=2 -m fastmlp train ...` (2 CPU
processes, gloo, DistributedDataParallel over fastmlp modules) ends with the weights of one process
trained with the same global batch."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fastmlp import train as T
from fastmlp.train import load_checkpoint

from conftest import REPO_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

# Without dropout: its masks come from each process's RNG, so with dropout DDP only matches statistically.
# Batch 63 over 2 processes: 32 + 31 samples per step; 2899 = 46 * 63 + 1, so the last step gives one
# process a single sample and the other none.
BATCH, LIMIT, EPOCHS = 63, 2899, 2


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_torchrun_two_processes_equal_one(tmp_path, data_root, mnist):
    out = tmp_path / "ddp"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "fastmlp", "train", "--dataset", "mnist", "--epochs", str(EPOCHS), "--batch-size", str(BATCH),
           "--train-limit", str(LIMIT), "--dropout", "0", "--root", str(data_root), "--out", str(out), "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count(f"epoch 1/{EPOCHS}") == 1  # only rank 0 reports

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["batch_size"] == BATCH
    ddp = load_checkpoint(out / "checkpoint.pt")
    assert ddp["epoch"] == EPOCHS
    h = metrics["history"]
    assert h[1]["train_loss"] < h[0]["train_loss"] and h[1]["val_accuracy"] > 0.8  # it really trained

    cfg = T.default_config("mnist", epochs=EPOCHS, batch_size=BATCH, train_limit=LIMIT, dropout=0.0)
    single = T.train(cfg, data=mnist, log=lambda line: None)
    assert single.metrics["world_size"] == 1
    for k, v in single.model.state_dict().items():
        torch.testing.assert_close(ddp["state_dict"][k], v, rtol=1e-4, atol=2e-5, msg=k)
    for a, b in zip(metrics["history"], single.metrics["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["val_accuracy"] == pytest.approx(b["val_accuracy"], abs=1e-3)
    assert metrics["final_test_accuracy"] == pytest.approx(single.metrics["final_test_accuracy"], abs=1e-3)
