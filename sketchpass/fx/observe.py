"""Observe a captured model on calibration data: input Grams, shapes, MACs and output sensitivity.

Sensitivity (how much a layer's error matters at the model's output) is measured, not assumed: for a
small isotropic perturbation ``δ`` of layer ``i``'s output ``y_i`` with ``E‖δ‖² = ε² ‖y_i‖²``, the
model output ``f`` moves by ``E‖J_i δ‖² = ε² ‖y_i‖² ‖J_i‖²_F / D_i`` (``D_i`` = elements of ``y_i``),
so the gain ``g_i = ‖y_i‖² ‖J_i‖²_F / (D_i ‖f‖²)`` turns a relative layer error into a relative
output error.  ``‖J_i‖²_F = E_v ‖J_iᵀ v‖²`` for any ``v`` with ``E[v vᵀ] = I`` (Hutchinson); we draw
Rademacher ``±1`` probes, whose estimate of ``tr(J Jᵀ)`` has variance ``2(‖JJᵀ‖²_F − Σ_k (JJᵀ)_kk²)``
against ``2‖JJᵀ‖²_F`` for Gaussian ones (Hutchinson, 1989), so by default one backward pass over the
kept samples (``probes=1``) gives the gains of all layers at once.  The solver minimises
``Σ_i g_i e_i``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..calib import GramAccumulator, batch_size, call_model, iter_batches, slice_batch
from ..calib import output_tensors as _tensors
from .match import Site


@dataclass
class SiteStats:
    gram: GramAccumulator | None = None
    positions_in: int = 0  # summed over calls and samples
    positions_out: int = 0
    calls: int = 0


@dataclass
class Observation:
    stats: dict[str, SiteStats] = field(default_factory=dict)
    samples: int = 0
    batches: int = 0
    model_macs: int = 0  # per sample, whole model (torch's FLOP counter / 2)
    kept: list = field(default_factory=list)  # batches kept for the sensitivity probes


def observe(
    model: nn.Module,
    sites: list[Site],
    calib,
    *,
    max_batches: int | None = None,
    grams: bool = True,
    keep_samples: int = 0,
    progress: Callable[[int], None] | None = None,
) -> Observation:
    """One pass over the calibration data with forward hooks on every active site."""
    obs = Observation()
    active = [s for s in sites if s.skip is None]

    def make_hook(site: Site):
        st = obs.stats.setdefault(site.name, SiteStats())
        mod, spec = site.module, site.spec

        def hook(module, inputs, output):
            x = inputs[0]
            st.calls += 1
            if spec.op == "linear":
                rows = x.numel() // spec.d_in
                st.positions_in += rows
                st.positions_out += rows
                if grams:
                    if st.gram is None:
                        st.gram = GramAccumulator(spec.d_in)
                    st.gram.add_rows(x.reshape(-1, spec.d_in))
            else:
                st.positions_in += math.prod(x.shape[2:]) * x.shape[0]
                st.positions_out += math.prod(output.shape[2:]) * output.shape[0]
                if grams:
                    if st.gram is None:
                        st.gram = GramAccumulator(spec.d_in // spec.groups * spec.hw, spec.groups)
                    st.gram.add_conv_input(x, mod.kernel_size, mod.stride, mod.padding, mod.dilation)

        return hook

    handles = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i, batch in enumerate(iter_batches(calib, max_batches)):
                n = batch_size(batch)
                if i == 0:  # whole-model MACs per sample, on one sample, before any hook exists
                    with FlopCounterMode(display=False) as counter:
                        call_model(model, slice_batch(batch, 1))
                    obs.model_macs = int(counter.get_total_flops() // 2)
                    handles = [s.module.register_forward_hook(make_hook(s)) for s in active]
                call_model(model, batch)
                obs.samples += n
                obs.batches += 1
                if keep_samples and sum(batch_size(b) for b in obs.kept) < keep_samples:
                    obs.kept.append(batch)
                if progress:
                    progress(n)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if obs.batches == 0 and calib is not None:
        raise ValueError("the calibration data yielded no batches")
    return obs


def _sq(t: torch.Tensor) -> float:
    """``‖t‖²`` without a squared copy (any layout)."""
    return float(torch.linalg.vector_norm(t.detach().float())) ** 2


def sensitivity(model: nn.Module, sites: list[Site], batches: list, probes: int = 1, seed: int = 0) -> dict[str, float]:
    """Output gain ``g_i`` of every active site (see module docstring), from ``probes`` Hutchinson probes."""
    active = [s for s in sites if s.skip is None]
    if not active or not batches:
        return {s.name: 1.0 for s in active}
    zs: dict[str, list[torch.Tensor]] = {}
    ysq: dict[str, float] = {s.name: 0.0 for s in active}
    numel: dict[str, int] = {s.name: 0 for s in active}
    gsq: dict[str, float] = {s.name: 0.0 for s in active}

    def make_hook(site: Site):
        def hook(module, inputs, output):
            z = torch.zeros_like(output, requires_grad=True)
            zs.setdefault(site.name, []).append(z)
            ysq[site.name] += _sq(output)
            numel[site.name] += output.numel()
            return output + z

        return hook

    handles = [s.module.register_forward_hook(make_hook(s)) for s in active]
    gen = torch.Generator().manual_seed(seed)
    fsq = 0.0
    was_training = model.training
    model.eval()
    # only the perturbations z need gradients: with the weights frozen autograd records no weight
    # gradients and nothing upstream of the first matched layer
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        for batch in batches:
            zs.clear()
            with torch.enable_grad():
                outs = _tensors(call_model(model, batch))
                if not outs:
                    raise ValueError("the model output has no floating-point tensor to measure sensitivity on")
                fsq += sum(_sq(o) for o in outs)
                names = list(zs)
                leaves = [z for name in names for z in zs[name]]
                outs = [o for o in outs if o.requires_grad]  # outputs no matched layer feeds have no gain
                for p in range(probes if outs and leaves else 0):
                    v = [(torch.randint(0, 2, o.shape, generator=gen) * 2 - 1).to(o.dtype).to(o.device) for o in outs]
                    grads = torch.autograd.grad(outs, leaves, grad_outputs=v, allow_unused=True,
                                                retain_graph=p < probes - 1)
                    it = iter(grads)
                    for name in names:
                        for _ in zs[name]:
                            g = next(it)
                            if g is not None:
                                gsq[name] += _sq(g) / probes
    finally:
        for h in handles:
            h.remove()
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    out = {}
    for s in active:
        n = s.name
        if numel[n] == 0 or fsq == 0:
            out[n] = 0.0
            continue
        out[n] = ysq[n] * gsq[n] / (numel[n] * fsq)
    return out
