"""fastmlp.models and fastmlp.train: architectures, short real-data runs whose loss falls, fused vs torch
trajectories, determinism, bit-exact resume, checkpoints (atomic, loadable into plain PyTorch)."""

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import fastmlp
from fastmlp import data, models, train as T
from fastmlp.train import CheckpointError, TrainConfig, default_config

pytestmark = pytest.mark.usefixtures("one_thread")

TIMING_KEYS = {"epoch_seconds", "samples_per_second"}


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def strip_timing(history):
    return [{k: v for k, v in h.items() if k not in TIMING_KEYS} for h in history]


# ---- models -------------------------------------------------------------------------------------------


def test_architectures():
    m = models.mnist_mlp()
    assert isinstance(m, fastmlp.FusedMLP) and m.sizes == (784, 128, 64, 10)
    assert [type(x) for x in m] == [fastmlp.FusedLinearReLU, fastmlp.FusedLinearReLU, fastmlp.Linear]
    f = models.fashion_mlp()
    assert f.sizes == (784, 256, 10)
    plain = models.mnist_mlp(backend="torch")
    assert [type(x) for x in plain] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert list(plain.state_dict()) == list(m.state_dict())
    with pytest.raises(ValueError, match="backend"):
        models.mlp([2, 2], backend="jax")


def test_dropout_keeps_the_state_dict_keys():
    torch.manual_seed(3)
    plain_init = models.mnist_mlp("torch").state_dict()
    for backend in ("fused", "torch"):
        torch.manual_seed(3)
        m = models.mnist_mlp(backend, dropout=0.2)
        assert sum(isinstance(x, nn.Dropout) for x in m.modules()) == 2
        fastmlp.plain_mlp(models.MNIST_SIZES).load_state_dict(m.state_dict())  # strict
        assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), plain_init.values()))
    with pytest.raises(ValueError, match="dropout"):
        models.mnist_mlp(dropout=1.0)


@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist"])
def test_both_backends_start_from_the_same_weights(dataset):
    torch.manual_seed(7)
    a = models.model_for(dataset, "fused")
    torch.manual_seed(7)
    b = models.model_for(dataset, "torch")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


# ---- config -----------------------------------------------------------------------------------------------


def test_default_recipes_keep_the_course_setup():
    for dataset in ("mnist", "fashion-mnist"):
        c = default_config(dataset)
        assert c.batch_size == 64 and c.backend == "fused" and c.epochs <= 30 and c.val_size == 5000


@pytest.mark.parametrize("change", [dict(epochs=0), dict(batch_size=-1), dict(lr=0.0), dict(lr=float("nan")),
                                    dict(optimizer="rmsprop"), dict(schedule="step"), dict(momentum=1.0),
                                    dict(dataset="cifar10"), dict(backend="jax"), dict(train_limit=0),
                                    dict(dropout=1.0), dict(precision="fp16")])
def test_config_validation(change):
    with pytest.raises(ValueError, match=next(iter(change))):
        TrainConfig(**change).validate()


def test_cosine_schedule():
    splits = {"train": _fake_split(640), "val": _fake_split(0), "test": _fake_split(10)}
    tr = T.Trainer(TrainConfig(epochs=3, lr=0.1, batch_size=64), splits)
    total = 3 * 10
    assert tr.lr_at(0) == 0.1 and tr.lr_at(total) == 0.0
    assert math.isclose(tr.lr_at(total // 2), 0.05)
    lrs = [tr.lr_at(s) for s in range(total + 1)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    flat = T.Trainer(TrainConfig(epochs=3, lr=0.1, schedule="none"), splits)
    assert flat.lr_at(17) == 0.1


def _fake_split(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return fastmlp.data.Split("fake", torch.randn(n, 784, generator=g), torch.randint(0, 10, (n,), generator=g))


def test_evaluate():
    split = _fake_split(100)
    model = models.mnist_mlp().train()
    r = T.evaluate(model, split, batch_size=30)
    assert r["n"] == 100 and 0 <= r["accuracy"] <= 1 and r["loss"] > 0
    with torch.no_grad():
        logits = model(split.images)
    assert math.isclose(r["loss"], nn.functional.cross_entropy(logits, split.labels).item(), rel_tol=1e-5)
    assert r["accuracy"] * 100 == (logits.argmax(1) == split.labels).sum().item()
    assert model.training  # mode restored


# ---- training on real data ----------------------------------------------------------------------------


@pytest.mark.parametrize("dataset,min_acc", [("mnist", 0.85), ("fashion-mnist", 0.75)])
def test_short_run_loss_falls(dataset, min_acc, request):
    splits = request.getfixturevalue("mnist" if dataset == "mnist" else "fashion")
    cfg = default_config(dataset, epochs=2, train_limit=5000)
    losses = []
    trainer = T.Trainer(cfg, {**splits, "train": splits["train"].subset(5000)})
    for _ in range(cfg.epochs):
        trainer.train_epoch(on_step=lambda step, loss: losses.append(loss.item()))
    h = trainer.history
    assert len(losses) == 2 * math.ceil(5000 / 64)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.5 * first, (first, last)
    assert h[1]["train_loss"] < h[0]["train_loss"] < math.log(10)
    assert h[-1]["val_accuracy"] > min_acc


def _losses_and_weights(backend, splits, steps=50, optimizer="sgd", fused_step=True, precision="fp32"):
    cfg = default_config("mnist", backend=backend, epochs=1, train_limit=64 * steps, optimizer=optimizer,
                         lr=0.05 if optimizer == "sgd" else 1e-3, precision=precision)
    trainer = T.Trainer(cfg, {**splits, "train": splits["train"].subset(64 * steps)})
    assert trainer.fused_step == (backend == "fused")
    if not fused_step:
        trainer.strategy = T.AutogradSteps()
    losses = []
    trainer.train_epoch(on_step=lambda step, loss: losses.append(loss.item() / 64))
    assert len(losses) == steps
    return torch.tensor(losses), weights(trainer.model)


@pytest.mark.parametrize("optimizer,fused_step", [("sgd", True), ("sgd", False), ("adam", True), ("adam", False)],
                         ids=["sgd-fused-step", "sgd-autograd", "adam-fused-step", "adam-autograd"])
def test_fused_and_torch_trajectories_agree(mnist, optimizer, fused_step):
    """The first 50 steps: fastmlp (whole fused step, or fused layers under autograd) vs nn.Linear."""
    loss_f, w_f = _losses_and_weights("fused", mnist, optimizer=optimizer, fused_step=fused_step)
    loss_t, w_t = _losses_and_weights("torch", mnist, optimizer=optimizer)
    assert loss_f[-5:].mean() < 0.75 * loss_f[:5].mean()
    torch.testing.assert_close(loss_f, loss_t, rtol=1e-4, atol=1e-5)
    for k in w_f:
        torch.testing.assert_close(w_f[k], w_t[k], rtol=1e-4, atol=1e-5, msg=k)


def test_fused_step_only_where_it_applies(mnist):
    def uses(**kw):
        return type(T.Trainer(default_config("mnist", **kw), mnist).strategy)
    assert uses() is T.ManyFusedSteps and uses(optimizer="adam") is T.ManyFusedSteps
    assert uses(backend="torch") is T.AutogradSteps and uses(dropout=0.1) is T.AutogradSteps
    assert uses(precision="bf16") is T.ManyFusedSteps  # the op's bf16 arithmetic (GPU: autograd)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_bf16_trajectories_agree_with_pytorch_autocast(mnist, optimizer):
    """--precision bf16: the fused trainer (the whole-step op in bfloat16 arithmetic) against nn.Linear
    under autocast, 30 steps; and both within bf16 reach of the float32 run (the loss falls alike)."""
    loss_f, w_f = _losses_and_weights("fused", mnist, steps=30, optimizer=optimizer, precision="bf16")
    loss_t, w_t = _losses_and_weights("torch", mnist, steps=30, optimizer=optimizer, precision="bf16")
    loss_32, _ = _losses_and_weights("torch", mnist, steps=30, optimizer=optimizer)
    torch.testing.assert_close(loss_f, loss_t, rtol=2e-2, atol=2e-3)
    for k in w_f:
        torch.testing.assert_close(w_f[k], w_t[k], rtol=5e-2, atol=2e-3, msg=k)
    assert (loss_f - loss_32).abs().max() < 0.05 and loss_f[-5:].mean() < 0.9 * loss_f[:5].mean()
    assert not torch.equal(loss_f, loss_32)  # it did run in bfloat16


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_many_step_epochs_equal_one_call_per_step(mnist, monkeypatch, optimizer):
    """On the CPU the fused trainer runs a gathered chunk of batches per op (FusedMLP.train_steps, each
    step at its scheduled lr); one op call per step gives bit-identical weights, optimizer state, per-step
    losses and history, across chunk edges, a short last batch and two epochs of the cosine schedule."""
    n = 64 * (data.GATHER_BATCHES + 8) + 17
    cfg = default_config("mnist", epochs=2, train_limit=n, optimizer=optimizer,
                         lr=0.05 if optimizer == "sgd" else 1e-3)

    def run(per_batch=False):
        trainer = T.Trainer(cfg, {**mnist, "train": mnist["train"].subset(n)})
        assert isinstance(trainer.strategy, T.ManyFusedSteps)
        if per_batch:
            trainer.strategy = T.FusedSteps()
        steps = []
        for _ in range(cfg.epochs):
            trainer.train_epoch(on_step=lambda step, loss: steps.append((step, loss.item())))
        return trainer, steps

    calls = []
    train_steps = fastmlp.FusedMLP.train_steps
    monkeypatch.setattr(fastmlp.FusedMLP, "train_steps", lambda *a, **k: calls.append(1) or train_steps(*a, **k))
    many, many_steps = run()
    assert len(calls) == 2 * 2  # two chunks per epoch
    one, one_steps = run(per_batch=True)
    assert len(calls) == 4
    assert len(many_steps) == 2 * math.ceil(n / 64)
    assert [s for s, _ in many_steps] == list(range(1, len(many_steps) + 1))
    assert many_steps == one_steps
    assert strip_timing(many.history) == strip_timing(one.history)
    wm, wo = weights(many.model), weights(one.model)
    assert all(torch.equal(wm[k], wo[k]) for k in wm)
    assert many.optimizer.param_groups[0]["lr"] == one.optimizer.param_groups[0]["lr"] == many.lr_at(many.step - 1)
    for p, q in zip(many.model.parameters(), one.model.parameters()):
        for key, value in many.optimizer.state[p].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(one.optimizer.state[q][key])), key


def test_same_seed_same_result(mnist):
    cfg = default_config("mnist", epochs=1, train_limit=2000)
    a = T.train(cfg, data=mnist, log=lambda line: None)
    b = T.train(cfg, data=mnist, log=lambda line: None)
    wa, wb = weights(a.model), weights(b.model)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert strip_timing(a.metrics["history"]) == strip_timing(b.metrics["history"])
    c = T.train(T.replace_config(cfg, seed=1), data=mnist, log=lambda line: None)
    assert not torch.equal(weights(c.model)["0.weight"], wa["0.weight"])


@pytest.mark.parametrize("optimizer,dropout", [("sgd", 0.0), ("adam", 0.0), ("sgd", 0.2)])
def test_resume_is_bit_exact(mnist, tmp_path, optimizer, dropout):
    cfg = default_config("mnist", epochs=3, train_limit=1500, optimizer=optimizer, dropout=dropout,
                         lr=0.05 if optimizer == "sgd" else 1e-3)
    full = T.train(cfg, data=mnist, out=tmp_path / "full", log=lambda line: None)

    part = T.train(cfg, data=mnist, out=tmp_path / "part", stop_after=1, log=lambda line: None)
    assert not part.completed and part.metrics["epochs_completed"] == 1
    ckpt = T.load_checkpoint(tmp_path / "part" / "checkpoint.pt")
    assert ckpt["epoch"] == 1 and len(ckpt["history"]) == 1
    torch.manual_seed(999)  # disturb the global RNG: the checkpoint restores it
    resumed = T.train(cfg, data=mnist, out=tmp_path / "part", resume=tmp_path / "part" / "checkpoint.pt",
                      log=lambda line: None)

    wf, wr = weights(full.model), weights(resumed.model)
    assert all(torch.equal(wf[k], wr[k]) for k in wf), "resumed run differs from the uninterrupted one"
    assert strip_timing(full.metrics["history"]) == strip_timing(resumed.metrics["history"])
    assert full.metrics["final_test_accuracy"] == resumed.metrics["final_test_accuracy"]
    final = T.load_checkpoint(tmp_path / "part" / "checkpoint.pt")
    assert final["epoch"] == 3 and final["step"] == 3 * math.ceil(1500 / 64)


def test_resume_rejects_a_different_recipe(mnist, tmp_path):
    cfg = default_config("mnist", epochs=1, train_limit=640)
    T.train(cfg, data=mnist, out=tmp_path, log=lambda line: None)
    with pytest.raises(ValueError, match="lr=0.5"):
        T.train(T.replace_config(cfg, lr=0.5), data=mnist, resume=tmp_path / "checkpoint.pt")


def test_resume_with_the_other_backend_or_precision(mnist, tmp_path):
    cfg = default_config("mnist", epochs=3, train_limit=640)
    T.train(cfg, data=mnist, out=tmp_path, stop_after=1, log=lambda line: None)
    r = T.train(T.replace_config(cfg, backend="torch"), data=mnist, resume=tmp_path / "checkpoint.pt",
                stop_after=1, log=lambda line: None)
    assert r.metrics["backend"] == "torch" and r.metrics["epochs_completed"] == 2
    r = T.train(T.replace_config(cfg, precision="bf16"), data=mnist, resume=tmp_path / "checkpoint.pt",
                log=lambda line: None)
    assert r.metrics["precision"] == "bf16" and r.metrics["config"]["precision"] == "bf16"
    assert r.metrics["epochs_completed"] == 3


# ---- checkpoints ------------------------------------------------------------------------------------------


def test_checkpoint_loads_into_plain_pytorch(mnist, tmp_path):
    result = T.train(default_config("mnist", epochs=1, train_limit=640), data=mnist, out=tmp_path,
                     log=lambda line: None)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    plain = fastmlp.plain_mlp(ckpt["sizes"])
    plain.load_state_dict(ckpt["state_dict"])  # strict: same keys, same shapes
    x = mnist["test"].images[:100]
    with torch.no_grad():
        torch.testing.assert_close(plain(x), result.model(x), rtol=1e-5, atol=1e-5)
    for backend in ("fused", "torch"):
        m = T.model_from_checkpoint(ckpt, backend)
        assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), plain.state_dict().values()))
    r = T.evaluate_checkpoint(tmp_path / "checkpoint.pt", data=mnist)
    assert r["accuracy"] == result.metrics["final_test_accuracy"]


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    T.save_checkpoint({"format": T.CHECKPOINT_FORMAT, "version": T.CHECKPOINT_VERSION, "x": torch.ones(3)}, path)
    before = path.read_bytes()

    def failing_save(obj, f):
        f.write(b"partial data")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        T.save_checkpoint({"x": torch.zeros(3)}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left behind


def test_ctrl_c_inside_a_checkpoint_write_is_an_interrupt(tmp_path, monkeypatch):
    """Ctrl-C inside torch.save surfaced as the zip writer's RuntimeError while unwinding (a traceback
    and exit 1 from fastmlp train instead of its exit 130)."""
    path = tmp_path / "checkpoint.pt"
    T.save_checkpoint({"x": torch.ones(3)}, path)
    before = path.read_bytes()

    def interrupted_save(obj, f):
        try:
            f.write(b"partial data")
            raise KeyboardInterrupt
        finally:
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos")

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        T.save_checkpoint({"x": torch.zeros(3)}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        T.load_checkpoint(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        T.load_checkpoint(garbage)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.ones(2)}, other)
    with pytest.raises(CheckpointError, match="not a fastmlp training checkpoint"):
        T.load_checkpoint(other)
    truncated = tmp_path / "truncated.pt"
    T.save_checkpoint({"format": T.CHECKPOINT_FORMAT, "version": 1, "w": torch.ones(1000)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:500])
    with pytest.raises(CheckpointError):
        T.load_checkpoint(truncated)


def test_curves_png(tmp_path):
    history = [{"epoch": i, "train_loss": 1.0 / i, "val_loss": 1.2 / i, "val_accuracy": 0.9 + i / 100}
               for i in range(1, 4)]
    path = T.plot_curves(history, tmp_path / "curves.png", "test")
    assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
