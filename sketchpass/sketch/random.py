"""Seeded, counter-based sketch matrices.

Every sketch matrix ``U`` used by sketchpass is a pure function of
``(seed, layer name, branch, shape, distribution)``; nothing depends on global RNG state, the
platform, the thread count or the framework.  The algorithm (generator id ``"sp-splitmix64-v1"``):

1. **Key.**  ``key = int.from_bytes(blake2b(f"sketchpass|{seed}|{name}|{branch}".encode("utf-8"),
   digest_size=8).digest(), "little")`` — a 64-bit unsigned integer.
2. **Counter stream.**  Element ``i`` (row-major flat index over the whole requested shape,
   ``i = 0, 1, ...``) draws the 64-bit word ``r(i) = splitmix64(key + (i + 1) * 0x9E3779B97F4A7C15 mod 2^64)``
   where ``splitmix64`` is the finaliser of Steele, Lea & Flood ("Fast splittable pseudorandom
   number generators", OOPSLA 2014)::

       z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
       z = (z ^ (z >> 27)) * 0x94D049BB133111EB
       z =  z ^ (z >> 31)                         (all mod 2^64)

3. **Values.**
   * ``"rademacher"`` (default): ``+1/sqrt(k)`` if the top bit of ``r(i)`` is 0, else ``-1/sqrt(k)``.
     Integer-only, hence bit-identical everywhere.
   * ``"gaussian"``: element ``i`` uses two words ``r(2i)`` and ``r(2i+1)`` of the stream
     (i.e. the counter runs over ``2 * size`` values), turned into uniforms
     ``u = (r >> 11) * 2^-53`` and the Box–Muller transform
     ``z = sqrt(-2 ln(1 - u1)) * cos(2 pi u2)``, computed in float64 by numpy, scaled by
     ``1/sqrt(k)`` so entries are ``N(0, 1/k)``.

``k`` is the size of one sketch.  With ``l`` independent sketches stacked into ``m = l k`` rows, each
block of ``k`` rows satisfies ``E[U_i^T U_i] = I`` (DESIGN §1); the stacked matrix is generated as one
``(m, d)`` array, so its blocks are independent because their counters differ.

The torch path (:func:`sketch_tensor`) is the numpy array handed to torch without any arithmetic, so
numpy, torch and ONNX emission see the very same bits.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

GENERATOR_ID = "sp-splitmix64-v1"
DISTRIBUTIONS = ("rademacher", "gaussian")

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def layer_key(seed: int, name: str, branch: str) -> int:
    """The 64-bit key of one sketch stream: blake2b-64 of ``"sketchpass|seed|name|branch"``."""
    text = f"sketchpass|{int(seed)}|{name}|{branch}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def _splitmix64(z: np.ndarray) -> np.ndarray:
    z = z.copy()
    z ^= z >> np.uint64(30)
    z *= _M1
    z ^= z >> np.uint64(27)
    z *= _M2
    z ^= z >> np.uint64(31)
    return z


def random_words(key: int, count: int) -> np.ndarray:
    """The first ``count`` 64-bit words of the stream with ``key`` (uint64 array)."""
    with np.errstate(over="ignore"):
        counter = np.arange(1, count + 1, dtype=np.uint64)
        z = np.uint64(key) + counter * _GOLDEN
        return _splitmix64(z)


def sketch_matrix(
    seed: int,
    name: str,
    branch: str,
    shape: int | Sequence[int],
    k: int,
    dist: str = "rademacher",
) -> np.ndarray:
    """A float64 sketch array of ``shape`` whose entries have mean 0 and variance ``1/k``.

    ``k`` is the size of one sketch (the rows of one block); callers stack ``l`` blocks as rows.
    """
    if dist not in DISTRIBUTIONS:
        raise ValueError(f"unknown sketch distribution {dist!r}; expected one of {DISTRIBUTIONS}")
    if int(k) < 1:
        raise ValueError(f"sketch size k must be >= 1, got {k}")
    shape = (int(shape),) if np.isscalar(shape) else tuple(int(s) for s in shape)
    size = int(np.prod(shape, dtype=np.int64))
    key = layer_key(seed, name, branch)
    scale = 1.0 / np.sqrt(float(k))
    if dist == "rademacher":
        words = random_words(key, size)
        top = (words >> np.uint64(63)).astype(np.float64)  # 0 or 1
        values = (1.0 - 2.0 * top) * scale
    else:
        words = random_words(key, 2 * size)
        u = (words >> np.uint64(11)).astype(np.float64) * (2.0**-53)
        u1, u2 = u[0::2], u[1::2]
        values = np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * np.pi * u2) * scale
    return values.reshape(shape)


def sketch_tensor(seed: int, name: str, branch: str, shape, k: int, dist: str = "rademacher", *,
                  dtype=None, device=None):
    """:func:`sketch_matrix` as a torch tensor (same bits; cast to ``dtype`` on ``device`` at the end)."""
    import torch

    t = torch.from_numpy(sketch_matrix(seed, name, branch, shape, k, dist))
    return t.to(dtype=dtype or torch.float32, device=device)
