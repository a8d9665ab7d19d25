"""`fastmlp predict` and fastmlp.predict on real test images written to files (PNG, .npy, .pt), the
preparation rules (inversion, resizing), --json/--plot, bad inputs (exit 1, file named) and usage errors
(exit 2); `fastmlp evaluate`'s per-class accuracy and confusion matrix; train's confusion.png."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fastmlp import cli
from fastmlp import train as T
from fastmlp.data import load_raw, normalize
import fastmlp
from fastmlp.classify import ImageError, predict, prepare_image

pytestmark = pytest.mark.usefixtures("one_thread")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
N = 40  # test images written to files


def run_cli(*args):
    return cli.main([str(a) for a in args])


def cli_json(capsys, *args):
    capsys.readouterr()
    assert run_cli("predict", *args, "--json") == 0
    return json.loads(capsys.readouterr().out)


def assert_png(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_root):
    """A short MNIST run (2 epochs on 20000 images, ~94% test accuracy) with its files in --out."""
    out = tmp_path_factory.mktemp("predict") / "run"
    torch.set_num_threads(1)
    T.train(T.default_config("mnist", epochs=2, train_limit=20000), root=data_root, out=out, log=lambda line: None)
    return out


@pytest.fixture(scope="module")
def ckpt(run):
    return run / "checkpoint.pt"


@pytest.fixture(scope="module")
def test_items(data_root):
    images, labels = load_raw("mnist", "test", data_root)
    return images[:N], labels[:N]


@pytest.fixture(scope="module")
def pngs(tmp_path_factory, test_items):
    folder = tmp_path_factory.mktemp("pngs")
    paths = [folder / f"{i}.png" for i in range(N)]
    for path, image in zip(paths, test_items[0]):
        Image.fromarray(image.numpy()).save(path)
    return paths


def evaluated_classes(ckpt, images):
    """The classes the checkpoint's model gives the dataset items, as in training's evaluation."""
    model = T.model_from_checkpoint(T.load_checkpoint(ckpt)).eval()
    with torch.no_grad():
        return model(normalize(images)).argmax(1).tolist()


def test_png_round_trip_matches_evaluation(ckpt, pngs, test_items, data_root, capsys):
    records = cli_json(capsys, "--checkpoint", ckpt, *pngs)
    expected = evaluated_classes(ckpt, test_items[0])
    assert [r["top"][0]["class"] for r in records] == expected
    assert [r["source"] for r in records] == [str(p) for p in pngs]
    by_index = cli_json(capsys, "--checkpoint", ckpt, "--index", *range(N), "--root", data_root)
    assert [r["probabilities"] for r in by_index] == [r["probabilities"] for r in records]
    assert by_index[7]["source"] == f"mnist test[7] (label {int(test_items[1][7])})"


def test_json_schema(ckpt, pngs, capsys):
    records = cli_json(capsys, "--checkpoint", ckpt, *pngs[:3], "--top-k", "4")
    assert isinstance(records, list) and len(records) == 3
    for r in records:
        assert set(r) == {"source", "top", "probabilities"}
        assert len(r["probabilities"]) == 10 and abs(sum(r["probabilities"]) - 1) < 1e-5
        assert len(r["top"]) == 4
        for t in r["top"]:
            assert set(t) == {"class", "name", "probability"}
            assert t["name"] == str(t["class"]) and t["probability"] == r["probabilities"][t["class"]]
        probs = [t["probability"] for t in r["top"]]
        assert probs == sorted(probs, reverse=True) and probs[0] == max(r["probabilities"])


def test_text_output(ckpt, pngs, capsys):
    capsys.readouterr()
    assert run_cli("predict", "--checkpoint", ckpt, pngs[0], "--top-k", "2") == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{pngs[0]}: ") and line.count("%") == 2


def test_api_equals_cli(ckpt, pngs, test_items, capsys):
    records = cli_json(capsys, "--checkpoint", ckpt, *pngs)
    cli_probs = torch.tensor([r["probabilities"] for r in records])
    assert torch.equal(predict(ckpt, pngs), cli_probs)
    assert fastmlp.predict is predict  # the top-level name
    model = T.model_from_checkpoint(T.load_checkpoint(ckpt))
    assert torch.equal(predict(model, test_items[0]), cli_probs)  # a tensor stack, a bare module
    assert model.training  # predict restored the mode it found
    mixed = predict(str(ckpt), [pngs[0], test_items[0][1], test_items[0][2:4].float() / 255])
    assert torch.allclose(mixed, cli_probs[:4], atol=1e-6)


def test_tensor_files(ckpt, pngs, test_items, tmp_path, capsys):
    np.save(tmp_path / "stack.npy", test_items[0][:5].numpy())
    torch.save(test_items[0][5].float() / 255, tmp_path / "one.pt")
    records = cli_json(capsys, "--checkpoint", ckpt, tmp_path / "stack.npy", tmp_path / "one.pt")
    assert [r["source"] for r in records] == [f"{tmp_path / 'stack.npy'}[{i}]" for i in range(5)] + [
        str(tmp_path / "one.pt")]
    assert torch.allclose(torch.tensor([r["probabilities"] for r in records]), predict(ckpt, pngs[:6]), atol=1e-6)


def test_inverted_and_larger_images(ckpt, data_root):
    """Rules asserted: a light-background copy (255 - x) of a 28x28 image is inverted back exactly, so its
    class is the original's for every item; a 56x56 bilinear upscale is cropped to its content, fitted to
    20 px and centred by mass, which reframes the digit a little: at least 80% of 100 items keep their
    class (measured: 91%) and its accuracy is within 10 points of the originals'."""
    images, labels = load_raw("mnist", "test", data_root)
    images, labels = images[:100], labels[:100]
    original = predict(ckpt, images).argmax(1)
    assert torch.equal(predict(ckpt, 255 - images).argmax(1), original)
    larger = F.interpolate(images[:, None].float(), size=(56, 56), mode="bilinear")[:, 0]
    larger = predict(ckpt, larger.round().clamp(0, 255).to(torch.uint8)).argmax(1)
    assert (larger == original).float().mean() >= 0.8
    assert (larger == labels).float().mean() >= (original == labels).float().mean() - 0.1


def test_dataset_images_are_used_as_they_are(data_root):
    """No MNIST or Fashion-MNIST image meets the dark-on-light rule: a 28x28 item is prepared unchanged."""
    for dataset in ("mnist", "fashion-mnist"):
        images, _ = load_raw(dataset, "test", data_root)
        for image in images[:500]:
            assert torch.equal(prepare_image(image, "item"), image)


def test_resized_image_is_framed(test_items):
    big = torch.zeros(100, 60, dtype=torch.uint8)
    big[10:90, 20:40] = 255  # a bar 80 tall, 20 wide, off-centre
    out = prepare_image(big, "bar")
    rows, cols = out.nonzero()[:, 0], out.nonzero()[:, 1]
    assert rows.max() - rows.min() + 1 == 20 and 4 <= cols.max() - cols.min() + 1 <= 6
    assert abs(rows.float().mean() - 13.5) <= 1 and abs(cols.float().mean() - 13.5) <= 1


def test_plot_is_a_png(ckpt, pngs, data_root, tmp_path, capsys):
    path = tmp_path / "probs.png"
    assert run_cli("predict", "--checkpoint", ckpt, *pngs[:2], "--index", "3", "--root", data_root,
                   "--plot", path) == 0
    assert_png(path)
    assert [p.name for p in tmp_path.iterdir()] == ["probs.png"]  # no temporary file left


# ---- bad inputs: exit 1 naming the file; usage errors: exit 2 ----------------------------------------------


def _bad_file(kind, folder):
    path = folder / {"missing": "missing.png", "text": "text.png", "tiny": "tiny.png", "blank": "blank.png",
                     "npy": "bad.npy"}[kind]
    if kind == "text":
        path.write_text("not an image\n")
    elif kind == "tiny":
        Image.fromarray(np.full((4, 4), 200, np.uint8)).save(path)
    elif kind == "blank":
        Image.fromarray(np.full((28, 28), 255, np.uint8)).save(path)
    elif kind == "npy":
        np.save(path, np.full((28, 28), 2.0))  # float outside [0, 1]
    return path


@pytest.mark.parametrize("kind", ["missing", "text", "tiny", "blank", "npy"])
def test_bad_image_exits_1_naming_it(kind, ckpt, pngs, tmp_path, capsys):
    path = _bad_file(kind, tmp_path)
    assert run_cli("predict", "--checkpoint", ckpt, pngs[0], path) == 1
    out, err = capsys.readouterr()
    assert f"fastmlp predict: error: {path}: " in err and out == ""
    with pytest.raises(ImageError, match=str(path)):
        predict(ckpt, [path])


def test_an_image_too_large_to_decode_exits_1(ckpt, pngs, tmp_path, capsys, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.fromarray(np.zeros((60, 60), np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 3600 pixels: more than twice the limit
    assert run_cli("predict", "--checkpoint", ckpt, pngs[0], path) == 1
    assert f"fastmlp predict: error: {path}: " in capsys.readouterr().err


def test_a_16_bit_png_is_scaled_not_clipped(tmp_path, test_items):
    image = test_items[0][0]  # uint8 (28, 28)
    path = tmp_path / "wide.png"
    Image.fromarray(image.numpy().astype(np.uint16) * 257).save(path)  # the same picture, 16-bit
    assert Image.open(path).mode.startswith("I;16")
    eight = tmp_path / "eight.png"
    Image.fromarray(image.numpy()).save(eight)
    from fastmlp.classify import read_file
    assert torch.equal(read_file(path), read_file(eight))


def test_not_a_checkpoint_exits_1(run, pngs, capsys):
    for path in (run / "metrics.json", run / "missing.pt"):
        assert run_cli("predict", "--checkpoint", path, pngs[0]) == 1
        assert f"error: {path}: " in capsys.readouterr().err


USAGE_ERRORS = [[], ["--top-k", "0"], ["--top-k", "11", "{png}"], ["--split", "val", "--index", "1"],
                ["--index", "10000", "--root", "{root}"], ["--index", "-1"], ["--device", "tpu", "{png}"]]


@pytest.mark.parametrize("args", USAGE_ERRORS)
def test_usage_errors_exit_2(args, ckpt, pngs, data_root, capsys):
    args = [a.format(png=pngs[0], root=data_root) for a in args]
    assert run_cli("predict", "--checkpoint", ckpt, *args) == 2
    assert "usage: fastmlp predict" in capsys.readouterr().err
    assert run_cli("predict", pngs[0]) == 2  # --checkpoint is required


# ---- evaluate: per-class accuracy and confusion matrix ---------------------------------------------------------


def test_evaluate_per_class_and_confusion(ckpt, data_root, tmp_path, capsys):
    plot = tmp_path / "confusion.png"
    capsys.readouterr()
    assert run_cli("evaluate", "--checkpoint", ckpt, "--root", data_root, "--json", "--plot", plot) == 0
    r = json.loads(capsys.readouterr().out)
    matrix = torch.tensor(r["confusion_matrix"])
    assert matrix.shape == (10, 10) and matrix.sum() == r["n"] == 10000
    assert matrix.diag().sum() == round(r["accuracy"] * r["n"])
    per_class = torch.tensor(r["per_class_accuracy"], dtype=torch.float64)
    assert torch.allclose((per_class * matrix.sum(1)).sum() / r["n"], torch.tensor(r["accuracy"], dtype=torch.float64))
    assert r["class_names"] == [str(d) for d in range(10)]
    assert_png(plot)
    assert run_cli("evaluate", "--checkpoint", ckpt, "--root", data_root) == 0
    text = capsys.readouterr().out
    assert "rows: true class; columns: predicted class" in text
    assert f"{100 * r['per_class_accuracy'][3]:.2f}%" in text.splitlines()[-7]


def test_confusion_matrix_function(ckpt, mnist):
    model = T.model_from_checkpoint(T.load_checkpoint(ckpt))
    model.train()
    matrix = T.confusion_matrix(model, mnist["test"])
    assert matrix.dtype == torch.int64 and model.training  # mode restored
    assert matrix.sum(1).tolist() == torch.bincount(mnist["test"].labels, minlength=10).tolist()
    assert matrix.diag().sum() / 10000 == T.evaluate(model, mnist["test"])["accuracy"]


def test_train_writes_confusion_png(run):
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "confusion.png", "curves.png", "metrics.json"]
    assert_png(run / "confusion.png")
