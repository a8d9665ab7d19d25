"""Inference on a user's images: each one prepared as the training images were, then classified.

    probs = fastmlp.predict("runs/mnist/checkpoint.pt", ["seven.png", "digits.npy"])   # (N, 10), rows sum to 1
    probs = fastmlp.predict(model, torch_images)                                      # any course model

Preparation rules (prepare_image), in order:
1. Read: any file Pillow reads (first frame), converted to 8-bit grayscale with Pillow's "L" (ITU-R 601-2
   luma; an alpha channel is dropped); a `.npy` / `.pt` file holding one (H, W) image or a stack (N, H, W);
   or a tensor / array of that shape. uint8 means 0-255, a float dtype 0-1 (other ranges are refused).
2. Refuse an image smaller than MIN_SIDE pixels on a side, or a blank one (all pixels equal).
3. Invert when it is dark-on-light: when its border (the outermost ring of pixels) is light (mean > 0.5)
   and lighter than its centre (the middle half of each side). MNIST and Fashion-MNIST are light on
   dark: none of their 140000 images meets both conditions, so a dataset image is never inverted.
4. A 28x28 image is taken as framed like the dataset's and used as it is (so a dataset image saved to a
   PNG gives exactly the training input). Any other size is cropped to its content's bounding box
   (pixels above a quarter of the way from the border's level to the brightest), resized with the aspect
   ratio kept (bilinear, antialiased) so that the longer side is FIT[dataset] pixels, and pasted into a
   black 28x28 canvas with its centre of mass at the centre, as far as the canvas allows. FIT: 20 for
   MNIST (its digits were fitted into 20x20 and centred by centre of mass), 28 for Fashion-MNIST (its
   items were fitted to 28 pixels on the longer side).
5. Normalise as the training data: (x / 255 - 0.5) / 0.5 (fastmlp.data.normalize), flattened to 784.
"""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import IMAGE_SHAPE, normalize
from .training import load_checkpoint, model_from_checkpoint

MIN_SIDE = 8
"""Smallest accepted height and width: below it a digit or garment cannot be made out."""

FIT = {"mnist": 20, "fashion-mnist": 28}
"""Dataset -> the longer side, in pixels, that a resized image's content is fitted to (rule 4)."""

CANVAS = IMAGE_SHAPE[0]
TENSOR_SUFFIXES = (".npy", ".pt")


class ImageError(ValueError):
    """An input image is missing, unreadable, not an image, too small or blank; the message names it."""


# ---- reading ----------------------------------------------------------------------------------


def _read_pillow(path: Path) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as image:
            if image.mode.startswith("I;16"):  # 16-bit grey: convert("L") would clip at 255, not scale
                wide = np.asarray(image, dtype=np.float64)
                return torch.from_numpy(np.rint(wide / 257).astype(np.uint8))
            gray = image.convert("L")
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file Pillow can read") from None
    except Image.DecompressionBombError as e:  # more pixels than Pillow agrees to decode
        raise ImageError(f"{path}: {e}") from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt image data
        raise ImageError(f"{path}: unreadable image ({e})") from e
    return torch.from_numpy(np.asarray(gray, dtype=np.uint8).copy())


def _read_tensor_file(path: Path):
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # numpy and torch raise many types for a bad file
        raise ImageError(f"{path}: not a readable {path.suffix} file ({type(e).__name__}: {e})") from e


def read_file(path) -> torch.Tensor:
    """The image(s) in the file `path`: (H, W) or (N, H, W), uint8 or float, as stored. Raises ImageError."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such image file")
    if path.suffix.lower() in TENSOR_SUFFIXES:
        return as_image_tensor(_read_tensor_file(path), str(path))
    return _read_pillow(path)


def as_image_tensor(data, source: str) -> torch.Tensor:
    """`data` (a tensor or numpy array) checked to be (H, W) or (N, H, W) images: uint8, or float in [0, 1]."""
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(np.ascontiguousarray(data))
    if not isinstance(data, torch.Tensor):
        raise ImageError(f"{source}: holds a {type(data).__name__}, not a tensor of images")
    if data.dim() not in (2, 3):
        raise ImageError(f"{source}: shape {tuple(data.shape)}; expected (H, W) or (N, H, W) grayscale images")
    if data.dtype != torch.uint8 and not data.is_floating_point():
        raise ImageError(f"{source}: dtype {data.dtype}; expected uint8 (0-255) or float (0-1)")
    if data.is_floating_point() and data.numel() and not (data.min() >= 0 and data.max() <= 1):
        raise ImageError(f"{source}: float values outside [0, 1] (min {data.min().item():.3g}, "
                         f"max {data.max().item():.3g}); give uint8 0-255 or float 0-1")
    return data.detach().cpu()


# ---- preparing one image ----------------------------------------------------------------------


def _border_and_centre(x: torch.Tensor) -> tuple[float, float]:
    h, w = x.shape
    border = torch.cat([x[0], x[-1], x[1:-1, 0], x[1:-1, -1]]).mean().item()
    centre = x[h // 4: h - h // 4, w // 4: w - w // 4].mean().item()
    return border, centre


def _crop_to_content(x: torch.Tensor, background: float) -> torch.Tensor:
    threshold = background + 0.25 * (x.max().item() - background)
    rows = (x > threshold).any(1).nonzero()
    cols = (x > threshold).any(0).nonzero()
    return x[rows.min(): rows.max() + 1, cols.min(): cols.max() + 1]


def _fit_and_centre(x: torch.Tensor, fit: int) -> torch.Tensor:
    """x (light on dark, in [0, 1]) resized so its longer side is `fit`, pasted into the 28x28 canvas
    with its centre of mass at the centre (clamped so the whole image stays inside)."""
    h, w = x.shape
    scale = fit / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    x = F.interpolate(x[None, None], size=size, mode="bilinear", antialias=True, align_corners=False)[0, 0]
    x = x.clamp(0, 1)
    mass = x.sum().clamp(min=1e-12)
    centre = [(x.sum(1 - axis) * torch.arange(n)).sum().item() / mass.item() for axis, n in enumerate(size)]
    canvas = torch.zeros(CANVAS, CANVAS)
    top, left = (min(max(round((CANVAS - 1) / 2 - c), 0), CANVAS - n) for c, n in zip(centre, size))
    canvas[top: top + size[0], left: left + size[1]] = x
    return canvas


def prepare_image(image: torch.Tensor, source: str, fit: int = FIT["mnist"]) -> torch.Tensor:
    """One (H, W) image (uint8, or float in [0, 1]) -> uint8 (28, 28), light on dark, framed like the
    dataset's (rules 2-4 of the module docstring). Raises ImageError naming `source`."""
    h, w = image.shape
    if min(h, w) < MIN_SIDE:
        raise ImageError(f"{source}: image of {w}x{h} pixels is too small (at least {MIN_SIDE}x{MIN_SIDE})")
    x = image.to(torch.float32) / 255 if image.dtype == torch.uint8 else image.to(torch.float32)
    if x.max() == x.min():
        raise ImageError(f"{source}: blank image (every pixel is {x[0, 0].item():.3g})")
    border, centre = _border_and_centre(x)
    if border > 0.5 and border > centre:  # dark on light: the border is the background
        x, border = 1 - x, 1 - border
    if (h, w) != IMAGE_SHAPE:
        x = _fit_and_centre(_crop_to_content(x, border), fit)
    return (x * 255).round().to(torch.uint8)


def load_images(images, fit: int = FIT["mnist"]) -> tuple[torch.Tensor, list[str]]:
    """`images` (a path, a tensor/array, or a list mixing them) -> (uint8 (N, 28, 28) prepared images,
    N source names: the path, with [i] for the i-th image of a stack; "tensor" for in-memory data)."""
    if isinstance(images, (str, Path, torch.Tensor, np.ndarray)):
        images = [images]
    prepared, sources = [], []
    for k, item in enumerate(images):
        if isinstance(item, (str, Path)):
            name, data = str(item), read_file(item)
        else:
            name = "tensor" if len(images) == 1 else f"images[{k}]"
            data = as_image_tensor(item, name)
        stack = data if data.dim() == 3 else data[None]
        for i, image in enumerate(stack):
            source = name if data.dim() == 2 else f"{name}[{i}]"
            prepared.append(prepare_image(image, source, fit))
            sources.append(source)
    if not prepared:
        raise ImageError("no images given")
    return torch.stack(prepared), sources


# ---- the model --------------------------------------------------------------------------------


def resolve_model(model_or_checkpoint) -> tuple[nn.Module, str | None]:
    """(model, dataset) from an nn.Module (dataset None), a checkpoint path or a loaded checkpoint dict
    (its FusedMLP, with the weights, and its dataset). Raises fastmlp.training.CheckpointError."""
    if isinstance(model_or_checkpoint, nn.Module):
        return model_or_checkpoint, None
    ckpt = model_or_checkpoint
    if isinstance(ckpt, (str, Path)):
        ckpt = load_checkpoint(ckpt)
    return model_from_checkpoint(ckpt, "fused"), ckpt["config"]["dataset"]


def probabilities(model: nn.Module, images: torch.Tensor, device="cpu") -> torch.Tensor:
    """Class probabilities (N, 10), float32 on the CPU, of uint8 (N, 28, 28) images prepared as above.
    Runs in eval mode under torch.inference_mode() (a FusedMLP then runs its forward as one op); the
    model's mode is restored and it is left on `device`."""
    was_training = model.training
    model.to(device).eval()
    try:
        with torch.inference_mode():
            return model(normalize(images).to(device)).softmax(1).float().cpu()
    finally:
        model.train(was_training)


def predict(model_or_checkpoint, images, device="cpu", dataset: str | None = None) -> torch.Tensor:
    """Class probabilities (N, 10) of `images` (file paths, tensors/arrays, or a list mixing them; see the
    module docstring) under a model or a `fastmlp train` checkpoint (path or dict). `dataset` selects the
    framing of resized images (FIT); default: the checkpoint's dataset, MNIST's for a bare module.
    Raises ImageError or fastmlp.training.CheckpointError naming the bad file."""
    model, ckpt_dataset = resolve_model(model_or_checkpoint)
    prepared, _ = load_images(images, FIT[dataset or ckpt_dataset or "mnist"])
    return probabilities(model, prepared, device)
