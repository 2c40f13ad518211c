"""Candidate forms of one layer with their costs and predicted errors (frontend-agnostic).

For a layer ``W`` with (shrunk) input Gram ``C`` (``None`` = data-free), a candidate is a form —
``svd`` of rank ``r`` or ``sketch`` with ``m = l k`` rows — with its params, MACs and predicted relative
output error ``tr(ΔCΔᵀ)/tr(WCWᵀ)`` summed over groups.  Whitened-SVD errors for every rank come from
one SVD (Eckart–Young); sketch errors need one calibrated fit per size, so they are evaluated on a
coarser set of sizes.  Forms that are not cheaper than dense in every budget unit are dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .plan import LayerSpec
from .sketch.fit import fit_sketch, svd_spectrum
from .sketch.random import sketch_matrix


@dataclass
class Form:
    method: str  # "svd" | "sketch"
    size: int  # rank, or m = k l
    params: int
    macs: int
    error: float


def size_grid(limit: int, granularity: int, max_count: int = 48) -> list[int]:
    """Sizes ``< limit`` on a grid of ``granularity`` (step 1 for layers too small for the grid),
    thinned to at most ``max_count`` sizes."""
    if limit <= 1:
        return []
    step = granularity if limit > 4 * granularity else max(1, min(granularity, limit // 4))
    sizes = list(range(step, limit, step))
    if len(sizes) > max_count:
        stride = math.ceil(len(sizes) / max_count)
        sizes = sizes[::stride]
    return sizes


def _cheaper(spec: LayerSpec, method: str, size: int, units: tuple[str, ...]) -> bool:
    if "params" in units and spec.form_params(method, size) >= spec.params:
        return False
    if "flops" in units and spec.form_macs(method, size) >= spec.macs:
        return False
    return True


def max_size(spec: LayerSpec, method: str, units: tuple[str, ...]) -> int:
    """Smallest size at which the form is no longer cheaper than dense (exclusive upper bound)."""
    hi = spec.max_rank() if method == "svd" else max(spec.d_in, spec.d_out) // spec.groups
    s = 1
    while s <= hi and _cheaper(spec, method, s, units):
        s += 1
    return s


def weight_groups(W: torch.Tensor, groups: int) -> list[torch.Tensor]:
    """The im2col weight of each group, ``(d_out/g, d_in/g · hw)``."""
    Wm = W.detach().double().reshape(W.shape[0], -1)
    co = Wm.shape[0] // groups
    return [Wm[g * co:(g + 1) * co] for g in range(groups)]


def svd_error_curve(spec: LayerSpec, W: torch.Tensor, grams: torch.Tensor | None):
    """``rank -> predicted relative error`` of the whitened-SVD form (one SVD per group)."""
    tails, total = [], 0.0
    for g, Wg in enumerate(weight_groups(W, spec.groups)):
        s2 = svd_spectrum(Wg, None if grams is None else grams[g]) ** 2
        tails.append(torch.flip(torch.cumsum(torch.flip(s2, [0]), 0), [0]))  # tails[i] = Σ_{j>=i} σ_j²
        total += float(s2.sum())

    def error(rank: int) -> float:
        num = sum(float(t[rank]) if rank < len(t) else 0.0 for t in tails)
        return num / total if total > 0 else 0.0

    return error


def _weighted(spec: LayerSpec, W: torch.Tensor, grams: torch.Tensor | None):
    """Per group ``(W_g, C_g, W_g C_g, tr(W_g C_g W_gᵀ))`` — shared by every sketch size of a layer."""
    out = []
    for g, Wg in enumerate(weight_groups(W, spec.groups)):
        C = None if grams is None else grams[g]
        WC = None if C is None else Wg @ C
        out.append((Wg, C, WC, float((Wg * Wg).sum()) if C is None else float((WC * Wg).sum())))
    return out


def sketch_error(spec: LayerSpec, W: torch.Tensor, grams: torch.Tensor | None, m: int, l: int, seed: int,
                 dist: str, init: str, weighted=None) -> float:
    """Predicted relative error of the sketch form with ``m = l k`` rows: a real fit of the very
    sketches the layer will get (same seed and name)."""
    G, hw, k = spec.groups, spec.hw, m // l
    U1 = torch.from_numpy(sketch_matrix(seed, spec.name, "U1", (G, m, spec.d_out // G), k, dist))
    U2 = torch.from_numpy(sketch_matrix(seed, spec.name, "U2", (G, m, spec.d_in // G), k, dist))
    num = den = 0.0
    for g, (Wg, C, WC, d) in enumerate(weighted or _weighted(spec, W, grams)):
        fit_init = init if (init != "calibrated" or C is not None) else "lstsq"
        _, _, e = fit_sketch(Wg, U1[g], U2[g], l, hw, fit_init, C, WC=WC, return_error=True)
        num += e
        den += d
    return num / den if den > 0 else 0.0


def form_error(spec: LayerSpec, W: torch.Tensor, grams, method: str, size: int, *, l: int = 1, seed: int = 0,
               dist: str = "rademacher", init: str = "calibrated") -> float:
    if method == "svd":
        return svd_error_curve(spec, W, grams)(size)
    return sketch_error(spec, W, grams, size, l, seed, dist, init)


def svd_forms(spec: LayerSpec, W: torch.Tensor, grams: torch.Tensor | None, units, granularity: int) -> list[Form]:
    error = svd_error_curve(spec, W, grams)
    return [Form("svd", r, spec.form_params("svd", r), spec.form_macs("svd", r), error(r))
            for r in size_grid(max_size(spec, "svd", units), granularity)]


def sketch_forms(spec: LayerSpec, W: torch.Tensor, grams: torch.Tensor | None, units, granularity: int, l: int,
                 seed: int, dist: str, init: str, max_sizes: int) -> list[Form]:
    """Sketch candidates with sizes ``m = l k``, ``k`` on the grid, on at most ``max_sizes`` sizes."""
    limit = max_size(spec, "sketch", units)
    ks = [k for k in size_grid(limit // l + 1, granularity) if k * l < limit]
    if len(ks) > max_sizes:  # evenly spread subset, always keeping the smallest and largest
        idx = sorted({round(i * (len(ks) - 1) / (max_sizes - 1)) for i in range(max_sizes)})
        ks = [ks[i] for i in idx]
    weighted = _weighted(spec, W, grams) if ks else None
    return [Form("sketch", k * l, spec.form_params("sketch", k * l), spec.form_macs("sketch", k * l),
                 sketch_error(spec, W, grams, k * l, l, seed, dist, init, weighted)) for k in ks]
