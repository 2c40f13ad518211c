"""Emit a fitted module as ONNX nodes (DESIGN §4: math → module → graph plumbing).

The module comes from the one factory the torch pass uses too (:func:`sketchpass.layers.factor_module`),
fed an ``nn.Linear``/``nn.Conv`` that holds the ONNX weight (float32 weights in float32, other dtypes in
float64, cast to the weight's dtype when emitted).  The emitted tensors are the very ones the module's
torch forward multiplies: the low-rank chains' two weights, and for SK layers :meth:`SKLinear.chain` /
:meth:`SKConv2d.branch_weights` — the trainable factors with every scale folded in and the sketches as
exact ``±1`` matrices (stored as floats, int8 or bits, :mod:`.emit`).

Each layer is emitted into a small scratch graph that reads the matched node's input tensor and writes
its output tensor (names kept; the Gemm ``C`` / Conv bias referenced by name), and exported to
``NodeProto`` s and initializers that replace the node (:class:`~sketchpass.onnx.frontend.OnnxFrontend`
splices them in; ``cleanup`` later drops the old weight).  Forms:

* svd, Conv: ``Conv(x, R; the original pads/strides/dilations/auto_pad/group)`` → ``Conv(·, L 1×1, bias)``;
* svd, Linear: ``MatMul(x, Rᵀ)`` → ``MatMul(·, Lᵀ)`` (Gemm: ``Gemm(x, Rᵀ, transA)`` → ``Gemm(·, Lᵀ, C, β)``);
* sketch, Conv: ``Conv(x, S1f)`` → ``Conv(·, Σ1ᵀ 1×1, bias)``, ``Conv(x, Σ2 1×1)`` → ``Conv(·, S2f)``, ``Add``;
* sketch, Linear: ``x ↦ x Bᵀ Aᵀ`` with ``Bᵀ = [S1fᵀ | Σ2ᵀ]`` (``d_in × 2m``) and ``Aᵀ = [Σ1 ; S2fᵀ]``
  (``2m × d_out``), as two MatMul (or Gemm) nodes.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
from torch import nn

from ..layers import LowRankConv1d, LowRankConv2d, LowRankLinear, dense_module
from ..site import Site
from .emit import Emitter


def work_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float32 if weight.dtype == torch.float32 else torch.float64


def stand_in(site: Site) -> nn.Module:
    """The ``nn.Linear`` / ``nn.Conv{1,2}d`` the fits and the torch-side checks use: the site's weight, its
    strides, dilations and groups, no padding (inputs are padded explicitly) and no bias (the node's bias
    stays in the graph)."""
    W = site.weight.to(work_dtype(site.weight))
    if site.kind == "Conv":
        a = site.ref.attrs
        return dense_module(W, stride=a["strides"], dilation=a["dilations"], groups=a["group"], padding=0)
    return dense_module(W)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _linear_nodes(em: Emitter, site: Site, x, y, M1, M2, c) -> None:
    ref = site.ref
    mid = em.var(f"{site.name}/sp_mid")
    if ref.kind == "Gemm":
        first = [x, M1]
        if em.opset < 11:  # C is optional only from opset 11
            first.append(em.const(f"{site.name}.sp.zero", np.zeros((1,))))
        em.node("Gemm", f"{site.name}/sp_Gemm_0", first, [mid], transA=int(ref.attrs.get("transA", 0)))
        inputs = [mid, M2] + ([c] if c is not None else [])
        em.node("Gemm", f"{site.name}/sp_Gemm_1", inputs, [y], beta=float(ref.attrs.get("beta", 1.0)))
    else:
        em.node("MatMul", f"{site.name}/sp_MatMul_0", [x, M1], [mid])
        em.node("MatMul", f"{site.name}/sp_MatMul_1", [mid, M2], [y])


def _conv(em: Emitter, site: Site, name: str, x, w, out, bias=None, geometry: bool = True) -> None:
    a = site.ref.attrs
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


def emit(em: Emitter, site: Site, module: nn.Module, dtype: np.dtype) -> None:
    """Nodes computing ``module`` from the site's input tensor into its output tensor, in ``em.graph``."""
    ref, nm = site.ref, site.name
    node = ref.node
    x, y = gs.Variable(ref.x, dtype=dtype), gs.Variable(ref.y, dtype=dtype)
    extra = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    bias = gs.Variable(extra.name, dtype=dtype) if extra is not None else None  # the node's own bias / C, by name
    if isinstance(module, (LowRankLinear, LowRankConv1d, LowRankConv2d)):
        if ref.kind == "Conv":
            first, second = module[0], module[1]
            mid = em.var(f"{nm}/sp_mid")
            _conv(em, site, "sp_Conv_R", x, em.const(f"{nm}.sp.R", _np(first.weight)), mid)
            _conv(em, site, "sp_Conv_L", mid, em.const(f"{nm}.sp.L", _np(second.weight)), y, bias, geometry=False)
        else:
            R, L = _np(module[0].weight), _np(module[1].weight)  # (r, d_in), (d_out, r)
            _linear_nodes(em, site, x, y, em.const(f"{nm}.sp.R", R.T), em.const(f"{nm}.sp.L", L.T), bias)
        return
    pm1 = module.folded()["signs"]
    if not pm1 and em.storage != "float":
        raise ValueError(f"layer {nm!r}: u_storage={em.storage!r} needs Rademacher (±1) sketches; this plan uses "
                         f"dist={module.dist!r} — use u_storage='float'")
    if ref.kind == "Conv":
        w = module.branch_weights()
        b1, b1o, b2, b2o = (em.var(f"{nm}/sp_{t}") for t in ("b1", "b1o", "b2", "b2o"))
        sig1 = _np(w["Sig1t"])
        sig2 = _np(w["Sig2w"])
        _conv(em, site, "sp_Conv_S1", x, em.const(f"{nm}.sp.S1", _np(w["S1f"])), b1)
        _conv(em, site, "sp_Conv_U1", b1, em.signs(f"{nm}.sp.U1", sig1) if pm1 else em.const(f"{nm}.sp.U1", sig1),
              b1o, bias, geometry=False)
        _conv(em, site, "sp_Conv_U2", x, em.signs(f"{nm}.sp.U2", sig2) if pm1 else em.const(f"{nm}.sp.U2", sig2),
              b2, geometry=False)
        _conv(em, site, "sp_Conv_S2", b2, em.const(f"{nm}.sp.S2", _np(w["S2f"])), b2o)
        em.node("Add", f"{nm}/sp_Add", [b1o, b2o], [y])
        return
    # Linear: y = x Bᵀ Aᵀ, Bᵀ = [S1fᵀ | Σ2ᵀ], Aᵀ = [Σ1 ; S2fᵀ]
    f = module.folded()
    S1f, S2f, sig1, sig2 = _np(f["S1f"]), _np(f["S2f"]), _np(f["Sig1"]), _np(f["Sig2"])
    M1 = em.concat(f"{nm}.sp.M1", [S1f.T, ("signs", sig2.T)] if pm1 else [S1f.T, sig2.T], axis=1)
    M2 = em.concat(f"{nm}.sp.M2", [("signs", sig1), S2f.T] if pm1 else [sig1, S2f.T], axis=0)
    _linear_nodes(em, site, x, y, M1, M2, bias)


def emit_protos(site: Site, module: nn.Module, *, dtype: np.dtype, storage: str, names: set[str],
                opset: int) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The nodes and initializers that replace ``site``'s node (see module docstring)."""
    scratch = gs.Graph(opset=opset)
    em = Emitter(scratch, dtype, storage, names=names, opset=opset)
    emit(em, site, module, dtype)
    g = gs.export_onnx(scratch, do_type_check=False).graph
    return list(g.node), list(g.initializer)
