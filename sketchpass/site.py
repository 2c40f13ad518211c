"""What a frontend hands the pipeline for each weight layer it found, and for each input it observed.

A :class:`Site` is one matched layer in the terms of the math: its :class:`~sketchpass.plan.LayerSpec`,
its dense weight in torch layout, an ``nn.Linear``/``nn.Conv`` holding that weight (``dense``, what the
factory in :mod:`sketchpass.layers` fits), why it cannot be factored (``skip``, a
:class:`~sketchpass.plan.SkipReason`, with ``detail``), and the frontend's own handle (``ref``: a module
path, an ONNX node).  A :class:`LayerInput` is one batch of a layer's inputs, normalised so that the
calibration math does not care which frontend produced it.  Nothing here imports torch.fx or onnx.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .plan import LayerSpec, SkipReason


@dataclass
class Site:
    """One weight layer.  ``kind`` is the frontend's op type (``"Linear"``, ``"Conv2d"``, ``"Gemm"``...), which
    ``ignore=`` / ``overrides=`` rules match as an op type; ``bias`` the bias vector added by the layer
    itself (``None`` if none), removed from its outputs when relative errors are measured."""

    name: str
    spec: LayerSpec
    kind: str
    weight: torch.Tensor | None = None
    dense: nn.Module | None = None
    bias: torch.Tensor | None = None
    skip: SkipReason | None = None
    detail: str | None = None
    ref: Any = None
    # filled by the pipeline
    gram: Any = None  # GramAccumulator of the layer's inputs (planning only)
    sensitivity: float = 1.0
    extra: dict = field(default_factory=dict)

    def set_skip(self, reason: SkipReason, detail: str) -> None:
        self.skip, self.detail = reason, detail

    @property
    def active(self) -> bool:
        return self.skip is None


@dataclass
class LayerInput:
    """One batch of a layer's inputs.  Linear: ``x`` is ``(rows, d_in)``.  Conv: ``x`` is the input
    ``(N, C_in, *spatial)`` with the layer's padding already applied (explicit zeros, asymmetric too), so
    that im2col with the layer's kernel, stride and dilation and no padding gives the exact patches it
    multiplies.  ``p_in`` / ``p_out``: input / output positions in the batch (summed over samples)."""

    x: torch.Tensor
    samples: int
    p_in: int
    p_out: int
    shape: tuple | None = None  # the raw input's shape (what a standalone timing of the layer feeds it)
    dtype: torch.dtype | None = None


def layer_error(y: torch.Tensor, yh: torch.Tensor, site: Site) -> tuple[float, float]:
    """``(‖ŷ − y‖², ‖y − b‖²)`` of one output of a layer and of its replacement: the numerator and denominator of
    the relative layer error the verify stage measures; the denominator is the output energy without the layer's
    own bias (the same quantity as ``tr(W C Wᵀ)`` in the predicted error)."""
    y = y.detach().double()
    num = float((yh.detach().double() - y).square().sum())
    if site.bias is not None:
        b = site.bias.detach().double()
        axis = 1 if site.spec.op.startswith("conv") else y.dim() - 1
        shape = [1] * y.dim()
        shape[axis] = -1
        y = y - b.reshape(shape)
    return num, float(y.square().sum())
