"""The `fastmlp` command: a short training run and its files (metrics.json schema, checkpoint, curves.png),
evaluate, resume, usage errors (exit 2, nothing written), missing data (exit 1), bench delegation."""

import json
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch

import fastmlp
from fastmlp import cli
from fastmlp.train import load_checkpoint

from conftest import REPO_ROOT

pytestmark = pytest.mark.usefixtures("one_thread")

QUICK = ["--epochs", "2", "--train-limit", "2000", "--no-progress"]


def run_cli(*args):
    return cli.main([str(a) for a in args])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_root):
    """One short MNIST run through the CLI, shared by the tests that read its outputs."""
    out = tmp_path_factory.mktemp("cli") / "run"
    torch.set_num_threads(1)
    assert run_cli("train", "--dataset", "mnist", *QUICK, "--root", data_root, "--out", out) == 0
    return out


def test_train_writes_its_files(trained):
    assert sorted(p.name for p in trained.iterdir()) == ["checkpoint.pt", "confusion.png", "curves.png", "metrics.json"]
    assert (trained / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_schema(trained):
    m = json.loads((trained / "metrics.json").read_text())
    expected = {"dataset": str, "backend": str, "device": str, "epochs": int, "seed": int,
                "final_test_accuracy": float, "train_seconds": float, "history": list}
    for key, kind in expected.items():
        assert isinstance(m[key], kind), key
    assert (m["dataset"], m["backend"], m["device"], m["epochs"], m["seed"]) == ("mnist", "fused", "cpu", 2, 0)
    assert m["precision"] == "fp32" == m["config"]["precision"]
    assert m["epochs_completed"] == 2 and m["train_size"] == 2000 and m["test_size"] == 10000
    assert 0.5 < m["final_test_accuracy"] <= 1 and m["train_seconds"] > 0
    assert [h["epoch"] for h in m["history"]] == [1, 2]
    for h in m["history"]:
        for key in ("train_loss", "val_loss", "val_accuracy", "lr", "epoch_seconds", "samples_per_second"):
            assert isinstance(h[key], float), key
    assert m["config"]["train_limit"] == 2000


def test_checkpoint_is_plain_pytorch_loadable(trained):
    ckpt = torch.load(trained / "checkpoint.pt", weights_only=True)
    model = fastmlp.plain_mlp(ckpt["sizes"])
    model.load_state_dict(ckpt["state_dict"])
    assert ckpt["sizes"] == [784, 128, 64, 10] and ckpt["epoch"] == 2


def test_evaluate(trained, data_root, capsys):
    m = json.loads((trained / "metrics.json").read_text())
    capsys.readouterr()
    assert run_cli("evaluate", "--checkpoint", trained / "checkpoint.pt", "--root", data_root, "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["accuracy"] == m["final_test_accuracy"] and result["n"] == 10000
    assert run_cli("evaluate", "--checkpoint", trained / "checkpoint.pt", "--root", data_root,
                   "--backend", "torch") == 0
    assert f"accuracy {100 * m['final_test_accuracy']:.2f}%" in capsys.readouterr().out


def test_epoch_lines(data_root, tmp_path, capsys):
    assert run_cli("train", "--dataset", "fashion-mnist", "--epochs", "1", "--train-limit", "500",
                   "--root", data_root, "--out", tmp_path / "o", "--no-progress") == 0
    out, err = capsys.readouterr()
    line = next(line for line in out.splitlines() if line.startswith("epoch 1/1"))
    for part in ("train_loss", "val_acc", "samples/s"):
        assert part in line
    assert "test_acc" in out
    assert "batch/s" not in err and "it/s" not in err  # no progress bar


def test_bf16_run(data_root, tmp_path, capsys):
    """--precision bf16 through the CLI: recorded in metrics.json and the run's line; learns."""
    assert run_cli("train", "--dataset", "mnist", *QUICK, "--precision", "bf16", "--root", data_root,
                   "--out", tmp_path / "o") == 0
    assert "fused steps, many per op, bf16" in capsys.readouterr().out  # the whole-step op's bf16
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["precision"] == "bf16" == m["config"]["precision"] and m["final_test_accuracy"] > 0.5


def test_progress_bar(data_root, tmp_path, capsys):
    assert run_cli("train", "--dataset", "mnist", "--epochs", "1", "--train-limit", "500", "--root", data_root,
                   "--out", tmp_path / "o", "--progress") == 0
    assert "epoch 1/1" in capsys.readouterr().err  # tqdm's bar, on stderr


def test_resume_through_the_cli_is_bit_exact(data_root, tmp_path):
    common = ["--dataset", "mnist", "--train-limit", "800", "--root", data_root, "--no-progress",
              "--optimizer", "adam", "--lr", "0.001"]
    assert run_cli("train", *common, "--epochs", "3", "--out", tmp_path / "full") == 0
    # Interrupted after epoch 1 (the cosine schedule spans the planned 3 epochs) ...
    from fastmlp import train as T
    cfg = T.default_config("mnist", train_limit=800, optimizer="adam", lr=0.001, epochs=3)
    T.train(cfg, root=data_root, out=tmp_path / "part", stop_after=1, log=lambda line: None)
    # ... and continued from the command line, with no options but --resume.
    assert run_cli("train", "--resume", tmp_path / "part" / "checkpoint.pt", "--root", data_root,
                   "--no-progress") == 0
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "part" / "checkpoint.pt")
    assert a["epoch"] == b["epoch"] == 3
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    ma = json.loads((tmp_path / "full" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "part" / "metrics.json").read_text())
    assert ma["final_test_accuracy"] == mb["final_test_accuracy"]
    assert len(mb["history"]) == 3


def test_extending_a_run_without_schedule_matches_a_longer_run(data_root, tmp_path):
    common = ["--dataset", "fashion-mnist", "--train-limit", "600", "--root", data_root, "--no-progress",
              "--schedule", "none"]
    assert run_cli("train", *common, "--epochs", "2", "--out", tmp_path / "long") == 0
    assert run_cli("train", *common, "--epochs", "1", "--out", tmp_path / "short") == 0
    assert run_cli("train", "--resume", tmp_path / "short" / "checkpoint.pt", "--epochs", "2", "--root", data_root,
                   "--no-progress") == 0
    a = load_checkpoint(tmp_path / "long" / "checkpoint.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "short" / "checkpoint.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- usage errors: exit 2, nothing written ------------------------------------------------------------------

BAD_ARGS = [
    [],
    ["--epochs", "0"],
    ["--epochs", "two"],
    ["--batch-size", "0"],
    ["--lr", "-1"],
    ["--lr", "nan"],
    ["--optimizer", "rmsprop"],
    ["--momentum", "1.5"],
    ["--weight-decay", "-1"],
    ["--dropout", "1"],
    ["--dataset", "cifar10"],
    ["--device", "tpu"],
    ["--backend", "jax"],
    ["--precision", "fp16"],
    ["--seed", "-3"],
    ["--unknown-option"],
    ["--resume", "{tmp}/missing.pt"],
    ["--resume", "{tmp}/out/metrics.json"],
]


@pytest.mark.parametrize("args", BAD_ARGS, ids=lambda a: " ".join(a) or "no-dataset")
def test_usage_errors_exit_2_and_write_nothing(args, tmp_path, data_root, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text("{\"earlier\": true}")
    args = [a.format(tmp=tmp_path) for a in args]
    if args and args[0] != "--dataset" and "--resume" not in args:
        args = ["--dataset", "mnist", *args]
    assert run_cli("train", *args, "--root", data_root, "--out", out) == 2
    assert "usage: fastmlp" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["metrics.json"]
    assert (out / "metrics.json").read_text() == "{\"earlier\": true}"


def test_usage_error_does_not_create_out(tmp_path, data_root):
    assert run_cli("train", "--dataset", "mnist", "--epochs", "-1", "--root", data_root,
                   "--out", tmp_path / "new") == 2
    assert not (tmp_path / "new").exists()


def test_resume_with_a_conflicting_option_is_a_usage_error(trained, data_root, capsys):
    before = (trained / "checkpoint.pt").read_bytes()
    assert run_cli("train", "--resume", trained / "checkpoint.pt", "--lr", "0.5", "--root", data_root) == 2
    assert "these options differ from it: --lr 0.5 (checkpoint: " in capsys.readouterr().err
    assert (trained / "checkpoint.pt").read_bytes() == before


def test_existing_run_is_not_overwritten(trained, data_root, capsys):
    before = (trained / "checkpoint.pt").read_bytes()
    assert run_cli("train", "--dataset", "mnist", "--root", data_root, "--out", trained) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (trained / "checkpoint.pt").read_bytes() == before


def test_evaluate_usage_errors(tmp_path):
    assert run_cli("evaluate") == 2
    assert run_cli("evaluate", "--checkpoint", tmp_path / "missing.pt") == 2


def test_missing_data_exit_1(tmp_path, capsys):
    assert run_cli("train", "--dataset", "mnist", "--root", tmp_path / "empty", "--out", tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "empty" / "MNIST" / "raw") in err and "--download" in err
    assert not (tmp_path / "out").exists()


def test_help_exits_0(capsys):
    assert run_cli("--help") == 0
    assert run_cli("train", "--help") == 0
    assert "default recipes" in capsys.readouterr().out


# ---- bench delegates to fastmlp.bench ---------------------------------------------------------------------


def test_bench_delegates(monkeypatch):
    calls = []
    fake = types.ModuleType("fastmlp.bench")
    fake.main = lambda argv: calls.append(argv) or 3
    monkeypatch.setitem(sys.modules, "fastmlp.bench", fake)
    monkeypatch.setattr(fastmlp, "bench", fake, raising=False)
    assert run_cli("bench", "--quick", "--json", "x.json") == 3
    assert calls == [["--quick", "--json", "x.json"]]


def test_bench_missing(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fastmlp.bench", None)
    monkeypatch.delattr(fastmlp, "bench", raising=False)
    assert run_cli("bench") == 1
    assert "not part of this installation" in capsys.readouterr().err


# ---- as a real process ---------------------------------------------------------------------------------------


def _env():
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    return env


def test_python_dash_m(tmp_path, data_root):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "fastmlp", "train", "--dataset", "mnist", "--epochs", "1",
                        "--train-limit", "300", "--root", str(data_root), "--out", str(out), "--threads", "1"],
                       capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    assert "epoch 1/1" in r.stdout and (out / "metrics.json").exists()
    assert "it/s" not in r.stderr  # stderr is not a terminal: no progress bar
    r = subprocess.run([sys.executable, "-m", "fastmlp", "train", "--dataset", "mnist", "--epochs", "0"],
                       capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 2 and "must be at least 1" in r.stderr


def test_console_script():
    exe = shutil.which("fastmlp")
    if exe is None:
        pytest.skip("the fastmlp console script is not installed (pip install .)")
    r = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "train" in r.stdout


def test_out_must_be_a_folder(tmp_path, data_root):
    target = tmp_path / "a-file"
    target.write_text("keep me")
    assert run_cli("train", "--dataset", "mnist", "--root", data_root, "--out", target) == 2
    assert target.read_text() == "keep me"


def test_the_command_freezes_its_imports_and_main_argv_does_not():
    # As the command (argv from sys.argv) the imported objects are frozen out of the garbage
    # collector; called as a library function, main(argv) leaves the caller's collector alone.
    code = ("import gc, sys; from fastmlp.cli import main; "
            "assert main(['--help']) == 0 and gc.get_freeze_count() == 0; "
            "sys.argv = ['fastmlp', '--help']; main(); print('frozen', gc.get_freeze_count())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.split("frozen")[1]) > 10000


# ---- what the command refuses, so that nothing the user saved is lost (found by fuzzing) ------------


def test_plot_never_replaces_an_input_or_a_file_that_is_not_a_png(trained, data_root, tmp_path, capsys):
    ckpt = trained / "checkpoint.pt"
    before = ckpt.read_bytes()
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    for plot, why in [(ckpt, "is one of this command's inputs"), (notes, "exists and is not a PNG image"),
                      (tmp_path / "no" / "c.png", "no folder"), (tmp_path, "is a folder")]:
        assert run_cli("evaluate", "--checkpoint", ckpt, "--root", data_root, "--plot", plot) == 2
        assert why in capsys.readouterr().err
    assert ckpt.read_bytes() == before and notes.read_text() == "mine"
    png = tmp_path / "c.png"
    for _ in range(2):  # a PNG, its own earlier output, is replaced
        assert run_cli("evaluate", "--checkpoint", ckpt, "--root", data_root, "--plot", png) == 0


def test_train_does_not_replace_files_of_a_run_without_checkpoint(data_root, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "metrics.json").write_text("my notes")
    assert run_cli("train", "--dataset", "mnist", *QUICK, "--root", data_root, "--out", out) == 2
    assert "already holds metrics.json" in capsys.readouterr().err
    assert (out / "metrics.json").read_text() == "my notes" and not (out / "checkpoint.pt").exists()


@pytest.mark.parametrize("case", ["file", "long"])
def test_an_out_that_cannot_be_made_is_a_usage_error(case, data_root, tmp_path, capsys):
    (tmp_path / "f").write_text("")
    out = tmp_path / "f" / "run" if case == "file" else tmp_path / ("a" * 300)
    assert run_cli("train", "--dataset", "mnist", *QUICK, "--root", data_root, "--out", out) == 2
    assert "--out" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--threads", "99999999999"], ["--seed", str(10 ** 23)]])
def test_huge_numbers_are_usage_errors(args, capsys):
    assert run_cli("train", "--dataset", "mnist", *args) == 2
    assert "must be below" in capsys.readouterr().err


@pytest.mark.parametrize("edit, why", [
    (lambda c: c.pop("epoch"), "no 'epoch' entry"),
    (lambda c: c["config"].pop("dataset"), "config dataset None"),
    (lambda c: c["state_dict"].__setitem__("0.weight", torch.zeros(128, 700)), "the mnist model needs"),
    (lambda c: c["state_dict"]["2.bias"].fill_(float("nan")), "2.bias holds NaN"),
    (lambda c: c["optimizer"]["state"][0].__setitem__("momentum_buffer", torch.zeros(5)), "momentum_buffer"),
])
def test_a_checkpoint_with_bad_contents_is_refused_by_every_command(edit, why, trained, data_root, tmp_path, capsys):
    ckpt = torch.load(trained / "checkpoint.pt", weights_only=True)
    edit(ckpt)
    bad = tmp_path / "bad.pt"
    torch.save(ckpt, bad)
    assert run_cli("evaluate", "--checkpoint", bad, "--root", data_root) == 2
    assert run_cli("predict", "--checkpoint", bad, "--index", "0", "--root", data_root) == 1
    assert run_cli("train", "--resume", bad, "--out", tmp_path / "again") == 2
    err = capsys.readouterr().err
    assert err.count(why) == 3 and "Traceback" not in err, err


def test_resume_with_fewer_epochs_than_done_is_a_usage_error(trained, capsys):
    assert run_cli("train", "--resume", trained / "checkpoint.pt", "--epochs", "1") == 2
    assert "has already trained 2 epochs" in capsys.readouterr().err


def test_evaluate_val_of_a_run_without_validation(data_root, tmp_path, capsys):
    out = tmp_path / "noval"
    assert run_cli("train", "--dataset", "mnist", "--epochs", "1", "--train-limit", "300", "--val-size", "0",
                   "--no-progress", "--root", data_root, "--out", out) == 0
    assert run_cli("evaluate", "--checkpoint", out / "checkpoint.pt", "--root", data_root, "--split", "val") == 2
    assert "held out no validation images" in capsys.readouterr().err


def test_a_diverging_run_exits_1_and_saves_no_nan_checkpoint(data_root, tmp_path, capsys):
    out = tmp_path / "div"
    assert run_cli("train", "--dataset", "mnist", "--epochs", "2", "--train-limit", "300", "--lr", "1e30",
                   "--no-progress", "--root", data_root, "--out", out) == 1
    err = capsys.readouterr().err
    assert "training diverged in epoch 1 (train loss nan); lower --lr" in err and "Traceback" not in err
    assert not (out / "checkpoint.pt").exists()


def test_ctrl_c_before_the_first_checkpoint_names_none(data_root, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "train", interrupted)
    assert run_cli("train", "--dataset", "mnist", "--root", data_root, "--out", tmp_path / "new") == 130
    err = capsys.readouterr().err
    assert "interrupted; no epoch was saved" in err and "--resume" not in err
