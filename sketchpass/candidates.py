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
from .sketch.fit import DEFAULT_DAMP, _damped, fit_sketch, kron_gram, kron_right, svd_spectrum
from .sketch.random import sketch_matrix


@dataclass
class Form:
    method: str  # "svd" | "sketch"
    size: int  # rank, or m = k l
    params: int
    macs: int
    error: float
    ms: float | None = None  # measured on the target runtime (latency budgets), median of one call
    spread: float | None = None


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


def weight_groups(W: torch.Tensor, groups: int, out_scale: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The im2col weight of each group, ``(d_out/g, d_in/g · hw)`` — times ``diag(out_scale)`` when the
    layer's errors are weighed by a per-channel scale after it (:func:`~sketchpass.sketch.fit.fit_sketch`)."""
    Wm = W.detach().double().reshape(W.shape[0], -1)
    if out_scale is not None:
        Wm = Wm * out_scale.double().reshape(-1, 1)
    co = Wm.shape[0] // groups
    return [Wm[g * co:(g + 1) * co] for g in range(groups)]


def _scale_groups(out_scale, groups: int, d_out: int):
    if out_scale is None:
        return [None] * groups
    co = d_out // groups
    d = out_scale.double().reshape(-1)
    return [d[g * co:(g + 1) * co] for g in range(groups)]


def svd_error_curve(spec: LayerSpec, W: torch.Tensor, grams: torch.Tensor | None, weighted=None, out_scale=None):
    """``rank -> predicted relative error`` of the whitened-SVD form (one SVD per group).  ``weighted``
    (optional): :func:`weighted_groups` of the layer, whose ``W_g C_g`` products are then reused."""
    tails, total = [], 0.0
    for g, Wg in enumerate(weight_groups(W, spec.groups, out_scale)):
        WC = weighted[g][2] if weighted is not None else None
        s2 = svd_spectrum(Wg, None if grams is None else grams[g], WC=WC) ** 2
        tails.append(torch.flip(torch.cumsum(torch.flip(s2, [0]), 0), [0]))  # tails[i] = Σ_{j>=i} σ_j²
        total += float(s2.sum())

    def error(rank: int) -> float:
        num = sum(float(t[rank]) if rank < len(t) else 0.0 for t in tails)
        return num / total if total > 0 else 0.0

    return error


def weighted_groups(spec: LayerSpec, W: torch.Tensor, grams: torch.Tensor | None, out_scale=None):
    """Per group ``(W_g, C_g, W_g C_g, tr(W_g C_g W_gᵀ))`` — shared by every sketch size of a layer (``W_g``
    times ``diag(out_scale)`` when given)."""
    out = []
    for g, Wg in enumerate(weight_groups(W, spec.groups, out_scale)):
        C = None if grams is None else grams[g]
        WC = None if C is None else Wg @ C
        out.append((Wg, C, WC, float((Wg * Wg).sum()) if C is None else float((WC * Wg).sum())))
    return out


def sketch_error(spec: LayerSpec, W: torch.Tensor, grams: torch.Tensor | None, m: int, l: int, seed: int,
                 dist: str, init: str, weighted=None, out_scale=None) -> float:
    """Predicted relative error of the sketch form with ``m = l k`` rows: a real fit of the very
    sketches the layer will get (same seed and name)."""
    G, hw, k = spec.groups, spec.hw, m // l
    U1 = torch.from_numpy(sketch_matrix(seed, spec.name, "U1", (G, m, spec.d_out // G), k, dist))
    U2 = torch.from_numpy(sketch_matrix(seed, spec.name, "U2", (G, m, spec.d_in // G), k, dist))
    num = den = 0.0
    raw = weight_groups(W, spec.groups)
    scales = _scale_groups(out_scale, G, spec.d_out)
    for g, (_Wd, C, WC, d) in enumerate(weighted or weighted_groups(spec, W, grams, out_scale)):
        fit_init = init if (init != "calibrated" or C is not None) else "lstsq"
        _, _, e = fit_sketch(raw[g], U1[g], U2[g], l, hw, fit_init, C, WC=WC, return_error=True,
                             out_scale=scales[g])
        num += e
        den += d
    return num / den if den > 0 else 0.0


def nested_sketch_errors(spec: LayerSpec, W: torch.Tensor, grams: torch.Tensor | None, ms: list[int], l: int,
                         seed: int, dist: str, init: str, weighted=None, out_scale=None) -> dict[int, float] | None:
    """Predicted relative errors of the optimal sketch fits (``"calibrated"``, or ``"lstsq"`` data-free)
    for every size in ``ms`` at about the cost of the largest one; ``None`` where this shortcut does
    not apply (the caller then fits size by size with :func:`sketch_error`).

    The sketch streams are counter-based and row-major (:mod:`sketchpass.sketch.random`), so for one
    group the ``m``-row sketch is the first ``m`` rows of the ``M``-row one times ``sqrt(k_M/k_m)``,
    and the optimal error is invariant to that scale.  Hence with ``B = U2 ⊗ I_hw`` of the largest
    size, ``K = B C Bᵀ`` and its Cholesky factor are computed once (the factor of a leading block is
    the leading block of the factor), ``W C Bᵀ`` once, and ``P = Q_m Q_mᵀ`` from one QR of ``U1ᵀ``.
    Per size: ``e = tr((I-P) W C Wᵀ) - ⟨T, (I-P) W C B_mᵀ⟩`` with ``T`` from the leading block —
    the error :func:`~sketchpass.sketch.fit.fit_sketch` returns, up to its round-off guard ``λ``."""
    if spec.groups != 1 or not ms or not (init == "calibrated" or (init == "lstsq" and grams is None)):
        return None
    d_out, d_in, hw = spec.d_out, spec.d_in, spec.hw
    if max(ms) >= d_out or max(ms) > d_in or any(m % l for m in ms):
        return None  # P = I, or an over-complete input sketch (pseudo-inverse fits): size by size
    Wg, C, WC, total = (weighted or weighted_groups(spec, W, grams, out_scale))[0]  # Wg = D W with out_scale
    if total <= 0:
        return None
    M = max(ms)
    U1 = torch.from_numpy(sketch_matrix(seed, spec.name, "U1", (1, M, d_out), M // l, dist))[0]
    U2 = torch.from_numpy(sketch_matrix(seed, spec.name, "U2", (1, M, d_in), M // l, dist))[0]
    WCm = Wg if C is None else WC
    K = kron_gram(C, U2, hw)  # (M·hw)², rows ordered (sketch row, kernel position)
    Lk, info = torch.linalg.cholesky_ex(_damped(K, DEFAULT_DAMP))
    A = U1.T if out_scale is None else U1.T * out_scale.double().reshape(-1, 1)  # D A in the weighted space
    Q, Rq = torch.linalg.qr(A)  # (d_out, M): Q[:, :m] spans the first m columns of (D) U1ᵀ
    diag = Rq.diagonal().abs()
    if int(info) != 0 or float(diag.min()) <= 1e-10 * float(diag.max()):
        return None
    WCB = kron_right(WCm, U2, hw)  # (d_out, M·hw)
    # tr(P W C Wᵀ) = Σ_{i<m} q_iᵀ W C Wᵀ q_i: a cumulative sum over the columns of Q
    tr_p = torch.cumsum(((Q.T @ WCm) * (Q.T @ Wg)).sum(1), 0)
    out = {}
    for m in ms:
        s = m * hw
        Qm = Q[:, :m]
        tr_r = total - float(tr_p[m - 1])  # tr((I-P) W C Wᵀ)
        RCB = WCB[:, :s] - Qm @ (Qm.T @ WCB[:, :s])
        T = torch.cholesky_solve(RCB.T, Lk[:s, :s]).T
        out[m] = max(tr_r - float((T * RCB).sum()), 0.0) / total
    return out


def form_error(spec: LayerSpec, W: torch.Tensor, grams, method: str, size: int, *, l: int = 1, seed: int = 0,
               dist: str = "rademacher", init: str = "calibrated", out_scale=None) -> float:
    if method == "svd":
        return svd_error_curve(spec, W, grams, out_scale=out_scale)(size)
    return sketch_error(spec, W, grams, size, l, seed, dist, init, out_scale=out_scale)


def svd_forms(spec: LayerSpec, W: torch.Tensor, grams: torch.Tensor | None, units, granularity: int,
              weighted=None, out_scale=None) -> list[Form]:
    error = svd_error_curve(spec, W, grams, weighted, out_scale)
    return [Form("svd", r, spec.form_params("svd", r), spec.form_macs("svd", r), error(r))
            for r in size_grid(max_size(spec, "svd", units), granularity)]


def sketch_forms(spec: LayerSpec, W: torch.Tensor, grams: torch.Tensor | None, units, granularity: int, l: int,
                 seed: int, dist: str, init: str, max_sizes: int, weighted=None, out_scale=None) -> list[Form]:
    """Sketch candidates with sizes ``m = l k``, ``k`` on the grid, on at most ``max_sizes`` sizes."""
    limit = max_size(spec, "sketch", units)
    ks = [k for k in size_grid(limit // l + 1, granularity) if k * l < limit]
    if len(ks) > max_sizes:  # evenly spread subset, always keeping the smallest and largest
        idx = sorted({round(i * (len(ks) - 1) / (max_sizes - 1)) for i in range(max_sizes)})
        ks = [ks[i] for i in idx]
    if ks and weighted is None:
        weighted = weighted_groups(spec, W, grams, out_scale)
    nested = nested_sketch_errors(spec, W, grams, [k * l for k in ks], l, seed, dist, init, weighted,
                                  out_scale) or {}
    return [Form("sketch", k * l, spec.form_params("sketch", k * l), spec.form_macs("sketch", k * l),
                 nested[k * l] if k * l in nested else sketch_error(spec, W, grams, k * l, l, seed, dist, init,
                                                                    weighted, out_scale)) for k in ks]
