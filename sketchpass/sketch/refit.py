"""The sequential-refit target (tensors in, tensors out; no graphs).

Layer ``i`` of a model whose earlier layers are already compressed sees inputs ``X̂`` instead of the
original ``X``.  We fit it to reproduce the *original* outputs from the inputs it really gets — the
asymmetric objective of Zhang et al., "Accelerating Very Deep Convolutional Networks for
Classification and Detection", TPAMI 2015: minimise ``‖Ŵ X̂ - W X‖²``.  With ``Ĉ = X̂X̂ᵀ`` and
``M = X X̂ᵀ``, ``‖ŴX̂ - WX‖² = ‖(Ŵ - W')X̂‖² + const`` for ``W' = W M Ĉ⁻¹``, so the usual fits of
``W'`` under ``Ĉ`` solve it (:func:`refit_target`).  Both Grams are shrunk by the same Ledoit–Wolf
intensity toward the same target (:func:`~sketchpass.calib.shrink_centered`), so that a layer whose
inputs did not change gets ``W' = W`` exactly.
"""

from __future__ import annotations

import torch

from ..calib import CrossGramAccumulator, shrink_centered
from .fit import _gram_factor


def refit_target(W: torch.Tensor, acc: CrossGramAccumulator, groups: int, alpha: float | str = "auto"):
    """``(W', Ĉ_s, W'Ĉ_s)``: the refit target (im2col layout, ``(d_out, n)`` float64), the shrunk
    compressed-input Grams ``(groups, n, n)`` and their product per group ``(groups, d_out/groups, n)``
    (``= W M_s``, known without a product; ``None`` when ``W' = W``)."""
    Wm = W.detach().double().reshape(W.shape[0], -1)
    co = Wm.shape[0] // groups
    hat = acc.hat
    alphas = hat.alphas(alpha)
    targets, grams, wcs = [], [], []
    for g in range(groups):
        a = float(alphas[g])
        C_hat = shrink_centered(hat.gram[g], hat.gram[g], hat.sum[g], hat.sum[g], hat.count, a)
        grams.append(C_hat)
        if acc.identical:  # inputs unchanged so far (M_s = Ĉ_s): the target is W itself, no solve needed
            continue
        Wg = Wm[g * co:(g + 1) * co]
        if acc.wcross is not None:  # W M_s straight from W M
            WM = shrink_centered(acc.wcross[g], hat.gram[g], acc.sum[g], hat.sum[g], hat.count, a, left=Wg)
        else:
            WM = Wg @ shrink_centered(acc.cross[g], hat.gram[g], acc.sum[g], hat.sum[g], hat.count, a)
        L = _gram_factor(C_hat, 1e-10)  # damps harder if round-off makes Ĉ indefinite
        targets.append(torch.cholesky_solve(WM.T, L).T)
        wcs.append(WM)
    if acc.identical:
        return Wm, torch.stack(grams), None
    return torch.cat(targets, 0), torch.stack(grams), torch.stack(wcs)
