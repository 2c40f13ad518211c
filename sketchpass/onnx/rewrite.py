"""Rewrite matched ONNX nodes into their planned forms (DESIGN §4: math → module → graph plumbing).

The factors come from the very constructors the torch pass uses (``SKLinear.from_dense``,
``SKConv{1,2}d.from_dense``, ``LowRank*.from_dense``), fed an ``nn.Linear``/``nn.Conv`` that holds the
ONNX weight, with ``name=`` the layer name and the plan's seed and distribution: the sketches ``U``
are keyed by ``(seed, name, branch)``, so a torch model and its ONNX export get identical factors.
Float32 weights are fitted in float32 modules (bit-for-bit the torch pass's factors); other dtypes
(fp16, bf16) in float64 modules, cast to the weight's dtype when emitted.

Fits use the Grams observed on the *original* model (no sequential refit through ORT: every layer
is fitted on its own original inputs, the torch pass's ``refit=False``).

Emitted forms (the matched node's input and output tensors are kept; the node and its now unused
weight are removed by ``cleanup``):

* svd, Conv: ``Conv(x, R; the original pads/strides/dilations/auto_pad/group)`` → ``Conv(·, L 1×1, bias)``;
* svd, Linear: ``MatMul(x, Rᵀ)`` → ``MatMul(·, Lᵀ)`` (Gemm: ``Gemm(x, Rᵀ, transA)`` → ``Gemm(·, Lᵀ, C, β)``);
* sketch, Conv: ``Conv(x, S1')`` → ``Conv(·, U1ᵀ 1×1, bias)``, ``Conv(x, U2 1×1)`` → ``Conv(·, S2')``,
  ``Add``; ``S1' = S1·c/(2l)``, ``S2' = S2·c/(2l)`` (``c = 1/√k`` for Rademacher ``U = c·(±1)``);
* sketch, Linear: ``x ↦ x M1 M2`` with ``M1 = [S1'ᵀ | U2ᵀ]`` (``d_in × 2m``) and ``M2 = [U1 ; S2'ᵀ]``
  (``2m × d_out``), as two MatMul (or Gemm) nodes.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ..layers import LowRankConv1d, LowRankConv2d, LowRankLinear, SKConv1d, SKConv2d, SKLinear
from ..plan import Decision
from .emit import Emitter
from .match import Site


# --------------------------------------------------------------------------- math → modules
def work_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float32 if weight.dtype == torch.float32 else torch.float64


def dense_module(site: Site) -> nn.Module:
    """An ``nn.Linear`` / ``nn.Conv{1,2}d`` holding the site's weight (geometry is irrelevant to the fits)."""
    W = site.weight.to(work_dtype(site.weight))
    if site.kind == "Conv":
        cls = nn.Conv1d if W.dim() == 3 else nn.Conv2d
        g = site.spec.groups
        mod = cls(W.shape[1] * g, W.shape[0], tuple(W.shape[2:]), groups=g, bias=False, device="meta")
    else:
        mod = nn.Linear(W.shape[1], W.shape[0], bias=False, device="meta")
    mod.weight = nn.Parameter(W, requires_grad=False)
    return mod


def build(site: Site, d: Decision, *, seed: int, dist: str, init: str, grams: torch.Tensor | None) -> nn.Module:
    """The torch module of one decision (same code path as the torch pass), ``grams`` already shrunk."""
    mod = dense_module(site)
    is_linear = site.kind != "Conv"
    gram = None if grams is None else (grams[0] if is_linear else grams)
    if d.method == "svd":
        cls = LowRankLinear if is_linear else (LowRankConv1d if site.weight.dim() == 3 else LowRankConv2d)
        return cls.from_dense(mod, d.rank, gram=gram)
    if d.method == "sketch":
        cls = SKLinear if is_linear else (SKConv1d if site.weight.dim() == 3 else SKConv2d)
        use = "lstsq" if init == "calibrated" and gram is None else init
        return cls.from_dense(mod, d.k, d.l, init=use, seed=seed, gram=gram if use == "calibrated" else None,
                              name=site.name, dist=dist)
    raise ValueError(f"decision {d.method!r} does not build a module")


def materialize(site: Site, module: nn.Module) -> torch.Tensor:
    return module.materialize().detach()


# --------------------------------------------------------------------------- modules → graph
def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _sign_scale(U: torch.Tensor, dist: str) -> tuple[np.ndarray, float, bool]:
    """``(values, c, is_pm1)``: Rademacher ``U = c·(±1)``; other sketches returned as they are (``c = 1``)."""
    u = _np(U)
    if dist == "rademacher":
        c = float(np.abs(u).max()) if u.size else 1.0
        return np.sign(u), c, True
    return u, 1.0, False


def _linear_nodes(em: Emitter, site: Site, x, y, M1, M2) -> None:
    node = site.node
    mid = em.var(f"{site.name}/sp_mid")
    if site.kind == "Gemm":
        c = node.inputs[2] if len(node.inputs) > 2 else None
        first = [x, M1]
        if em.opset < 11:  # C is optional only from opset 11
            first.append(em.const(f"{site.name}.sp.zero", np.zeros((1,))))
        em.node("Gemm", f"{site.name}/sp_Gemm_0", first, [mid], transA=int(site.attrs.get("transA", 0)))
        inputs = [mid, M2] + ([c] if c is not None and c.name else [])
        em.node("Gemm", f"{site.name}/sp_Gemm_1", inputs, [y], beta=float(site.attrs.get("beta", 1.0)))
    else:
        em.node("MatMul", f"{site.name}/sp_MatMul_0", [x, M1], [mid])
        em.node("MatMul", f"{site.name}/sp_MatMul_1", [mid, M2], [y])


def _conv(em: Emitter, site: Site, name: str, x, w, out, bias=None, geometry: bool = True) -> None:
    a = site.attrs
    nd = len(a["kernel"])
    attrs = {"group": a["group"]}
    if geometry:
        attrs.update(strides=list(a["strides"]), dilations=list(a["dilations"]), kernel_shape=list(a["kernel"]))
        if a["auto_pad"] != "NOTSET":
            attrs["auto_pad"] = a["auto_pad"]
        else:
            attrs["pads"] = list(a["pads"])
    else:
        attrs.update(kernel_shape=[1] * nd, strides=[1] * nd, dilations=[1] * nd, pads=[0] * (2 * nd))
    em.node("Conv", f"{site.name}/{name}", [x, w] + ([bias] if bias is not None else []), [out], **attrs)


def emit(em: Emitter, site: Site, d: Decision, module: nn.Module, dist: str) -> None:
    """Replace ``site.node`` in ``em.graph`` by the nodes of ``module`` (``d`` says which form)."""
    node = site.node
    x, y = node.inputs[0], node.outputs[0]
    node.outputs = []  # the old node is dead from here on; cleanup removes it and its weight
    bias = node.inputs[2] if site.kind == "Conv" and len(node.inputs) > 2 and node.inputs[2].name else None
    nm = site.name
    if d.method == "svd":
        if site.kind == "Conv":
            first, second = module[0], module[1]
            mid = em.var(f"{nm}/sp_mid")
            _conv(em, site, "sp_Conv_R", x, em.const(f"{nm}.sp.R", _np(first.weight)), mid)
            _conv(em, site, "sp_Conv_L", mid, em.const(f"{nm}.sp.L", _np(second.weight)), y, bias, geometry=False)
        else:
            R, L = _np(module[0].weight), _np(module[1].weight)  # (r, d_in), (d_out, r)
            _linear_nodes(em, site, x, y, em.const(f"{nm}.sp.R", R.T), em.const(f"{nm}.sp.L", L.T))
        return
    l = module.l
    u1, c1, pm1 = _sign_scale(module.U1, dist)
    u2, c2, pm2 = _sign_scale(module.U2, dist)
    if not (pm1 and pm2) and em.storage != "float":
        raise ValueError(f"layer {nm!r}: u_storage={em.storage!r} needs Rademacher (±1) sketches; this plan uses "
                         f"dist={dist!r} — use u_storage='float'")
    S1 = _np(module.S1) * (c1 / (2 * l))
    S2 = _np(module.S2) * (c2 / (2 * l))
    if site.kind == "Conv":
        G, m = module.groups, module.m
        one = (1,) * len(site.attrs["kernel"])
        u1t = np.transpose(u1, (0, 2, 1)).reshape(module.out_channels, m, *one)  # per group U1ᵀ, 1×1
        u2w = u2.reshape(G * m, module.in_channels // G, *one)
        b1, b1o, b2, b2o = (em.var(f"{nm}/sp_{t}") for t in ("b1", "b1o", "b2", "b2o"))
        _conv(em, site, "sp_Conv_S1", x, em.const(f"{nm}.sp.S1", S1), b1)
        _conv(em, site, "sp_Conv_U1", b1, em.signs(f"{nm}.sp.U1", u1t) if pm1 else em.const(f"{nm}.sp.U1", u1t),
              b1o, bias, geometry=False)
        _conv(em, site, "sp_Conv_U2", x, em.signs(f"{nm}.sp.U2", u2w) if pm2 else em.const(f"{nm}.sp.U2", u2w),
              b2, geometry=False)
        _conv(em, site, "sp_Conv_S2", b2, em.const(f"{nm}.sp.S2", S2), b2o)
        em.node("Add", f"{nm}/sp_Add", [b1o, b2o], [y])
        return
    # Linear: y = x M1 M2, M1 = [S1'ᵀ | U2ᵀ], M2 = [U1 ; S2'ᵀ]
    M1 = em.concat(f"{nm}.sp.M1", [S1.T, ("signs", u2.T)] if pm2 else [S1.T, u2.T], axis=1)
    M2 = em.concat(f"{nm}.sp.M2", [("signs", u1), S2.T] if pm1 else [u1, S2.T], axis=0)
    _linear_nodes(em, site, x, y, M1, M2)


def measured_error(site: Site, module: nn.Module, gram_raw: torch.Tensor | None) -> float:
    """Relative output error ``Σ_g tr(Δ_g C_g Δ_gᵀ) / Σ_g tr(W_g C_g W_gᵀ)`` on the (unshrunk) calibration
    Grams; the relative Frobenius error without data."""
    W = site.weight.double().reshape(site.weight.shape[0], -1)
    D = materialize(site, module).double().reshape(W.shape[0], -1) - W
    G = site.spec.groups if site.kind == "Conv" else 1
    co = W.shape[0] // G
    num = den = 0.0
    for g in range(G):
        Wg, Dg = W[g * co:(g + 1) * co], D[g * co:(g + 1) * co]
        if gram_raw is None:
            num += float((Dg * Dg).sum())
            den += float((Wg * Wg).sum())
        else:
            C = gram_raw[g]
            num += float(((Dg @ C) * Dg).sum())
            den += float(((Wg @ C) * Wg).sum())
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)
