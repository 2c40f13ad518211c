"""Observe a captured model on calibration data: input Grams, shapes, MACs and output sensitivity.

Sensitivity (how much a layer's error matters at the model's output) is measured, not assumed: for a
small isotropic perturbation ``δ`` of layer ``i``'s output ``y_i`` with ``E‖δ‖² = ε² ‖y_i‖²``, the
model output ``f`` moves by ``E‖J_i δ‖² = ε² ‖y_i‖² ‖J_i‖²_F / D_i`` (``D_i`` = elements of ``y_i``),
so the gain ``g_i = ‖y_i‖² ‖J_i‖²_F / (D_i ‖f‖²)`` turns a relative layer error into a relative
output error.  ``‖J_i‖²_F = E_v ‖J_iᵀ v‖²`` for any ``v`` with ``E[v vᵀ] = I`` (Hutchinson); we draw
Rademacher ``±1`` probes, whose estimate of ``tr(J Jᵀ)`` has variance ``2(‖JJᵀ‖²_F − Σ_k (JJᵀ)_kk²)``
against ``2‖JJᵀ‖²_F`` for Gaussian ones (Hutchinson, 1989), so by default one backward pass over the
kept samples (``probes=1``) gives the gains of all layers at once.  The solver minimises
``Σ_i g_i e_i``.  Under ``metric="kl"`` (:mod:`sketchpass.metric`) the probes are ``v = e_y − p`` with ``y``
drawn from the output softmax ``p``, so ``E[v vᵀ] = F`` (its Fisher matrix) and
``g_i = ‖y_i‖² E‖J_iᵀ v‖² / (D_i · 2 · positions)`` turns a relative layer error into a mean KL divergence.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..batches import call_model, output_tensors, slice_batch
from ..batches import output_tensors as _tensors
from ..calib import same_padding
from ..metric import Metric, covers, real
from ..site import LayerInput, Site, layer_error


def layer_input(site: Site, mod: nn.Module, x: torch.Tensor, y: torch.Tensor | None,
                mask: torch.Tensor | None = None) -> LayerInput:
    """One call's input of a matched module as a :class:`LayerInput` (conv inputs explicitly padded).  ``mask``
    (:func:`sketchpass.batches.token_mask`, ``(samples, tokens)``): a linear layer whose input is
    ``(samples, tokens, d_in)`` keeps the rows of the real tokens only (its positions still count them all)."""
    spec = site.spec
    if spec.op == "linear":
        positions = x.numel() // spec.d_in
        rows = real(x, mask) if x.dim() == 3 and covers(x, mask) else x.reshape(-1, spec.d_in)
        return LayerInput(rows, x.shape[0] if x.dim() > 1 else 1, positions, positions, tuple(x.shape), x.dtype)
    n = x.shape[0]
    pad = mod.padding
    if isinstance(pad, str):
        pad = same_padding(pad, mod.kernel_size, mod.dilation)
    p_in = math.prod(x.shape[2:]) * n
    xp = F.pad(x, [p for d in reversed(pad) for p in (d, d)]) if any(pad) else x
    if y is not None:
        p_out = math.prod(y.shape[2:]) * n
    else:
        p_out = n * math.prod((xp.shape[2 + i] - mod.dilation[i] * (mod.kernel_size[i] - 1) - 1) // mod.stride[i] + 1
                              for i in range(len(mod.kernel_size)))
    return LayerInput(xp, n, p_in, p_out, tuple(x.shape), x.dtype)


@contextmanager
def observing(sites: list[Site], module_of: Callable[[Site], nn.Module], visit: Callable[[Site, LayerInput], None],
              mask: Callable[[], torch.Tensor | None] = lambda: None):
    """Hooks that call ``visit`` with every input of every site's module while the block runs (``mask()``: the
    current batch's token mask, :func:`layer_input`)."""
    def make_hook(site: Site):
        mod = module_of(site)

        def hook(module, inputs, output):
            visit(site, layer_input(site, mod, inputs[0].detach(), output, mask()))

        return hook

    handles = [module_of(s).register_forward_hook(make_hook(s)) for s in sites]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def observe_batch(model: nn.Module, sites: list[Site], module_of: Callable[[Site], nn.Module], batch,
                  visit: Callable[[Site, LayerInput], None], mask: torch.Tensor | None = None) -> None:
    """One forward pass of ``model`` on ``batch`` with a hook on every site's module."""
    with observing(sites, module_of, visit, lambda: mask), torch.no_grad():
        call_model(model, batch)


def model_macs(model: nn.Module, batch) -> int:
    """Whole-model MACs per sample (torch's FLOP counter / 2) on one sample of ``batch``.  The weights are frozen
    while it counts: the counter's module tracker hooks the gradients of module inputs that require one, and
    fails on a module called on a slice of a parameter (DeBERTa-v2's ``LayerNorm(rel_embeddings.weight)``)."""
    with frozen(model, eval_mode=False), torch.no_grad(), FlopCounterMode(display=False) as counter:
        call_model(model, slice_batch(batch, 1))
    return int(counter.get_total_flops() // 2)


def _outputs(model: nn.Module, batch, hooks: dict[nn.Module, list]) -> list[torch.Tensor]:
    handles = []
    for mod, box in hooks.items():
        handles.append(mod.register_forward_hook(lambda m, i, o, box=box: box.append(o.detach())))
    try:
        with torch.no_grad():
            return [t.detach() for t in output_tensors(call_model(model, batch))]
    finally:
        for h in handles:
            h.remove()


def compare(original: nn.Module, emitted: nn.Module, batch, sites: list[Site],
            module_of: Callable[[nn.Module, Site], nn.Module]) -> tuple[list, list, dict]:
    """Both models on ``batch``: their float outputs and ``{site: (num, den)}`` of each site's output
    (:func:`sketchpass.site.layer_error`, summed over its calls, the k-th call of the emitted model's layer against
    the k-th of the original's).  Only the original's layer outputs are held: the emitted model's are compared as
    they come.  A site the two models call a different number of times is left out."""
    held = {s.name: [] for s in sites}
    ref = _outputs(original, batch, {module_of(original, s): held[s.name] for s in sites})
    sums = {s.name: [0.0, 0.0] for s in sites}
    calls = {s.name: 0 for s in sites}
    unlike: set[str] = set()  # sites whose calls do not pair up

    def make_hook(site: Site):
        name, box = site.name, held[site.name]

        def hook(mod, inputs, output):
            k = calls[name]
            calls[name] += 1
            if k < len(box) and box[k].shape == output.shape:
                n, d = layer_error(box[k], output, site)
                sums[name][0] += n
                sums[name][1] += d
                box[k] = None  # compared: no longer held
            else:
                unlike.add(name)

        return hook

    handles = [module_of(emitted, s).register_forward_hook(make_hook(s)) for s in sites]
    try:
        with torch.no_grad():
            out = [t.detach() for t in output_tensors(call_model(emitted, batch))]
    finally:
        for h in handles:
            h.remove()
    layers = {s.name: tuple(sums[s.name]) for s in sites
              if held[s.name] and s.name not in unlike and calls[s.name] == len(held[s.name])}
    return ref, out, layers


def single_layer_errors(original: nn.Module, sites: list[Site], modules: dict[str, nn.Module],
                        module_of: Callable[[nn.Module, Site], nn.Module], batches: list,
                        metric: Metric | None = None,
                        mask_of: Callable[[object], torch.Tensor | None] = lambda batch: None) -> dict:
    """``{site: (num, den)}`` of the output error (``metric``, at the real tokens of ``mask_of(batch)``; default
    ``(Σ‖f_i − f‖², Σ‖f‖²)``): the original model with only that site's module swapped in."""
    metric = metric or Metric()
    base = [_outputs(original, b, {}) for b in batches]
    out = {}
    for s in sites:
        fitted = modules[s.name]
        h = module_of(original, s).register_forward_hook(lambda m, i, o, f=fitted: f(i[0]))
        num = den = 0.0
        try:
            for b, ref in zip(batches, base):
                n, d = metric.errors(ref, _outputs(original, b, {}), mask_of(b))
                num, den = num + n, den + d
        finally:
            h.remove()
        out[s.name] = (num, den)
    return out


def _sq(t: torch.Tensor) -> float:
    """``‖t‖²`` without a squared copy (any layout)."""
    return float(torch.linalg.vector_norm(t.detach().float())) ** 2


@contextmanager
def frozen(model: nn.Module, eval_mode: bool = True):
    """``model`` with its parameters' ``requires_grad`` off (and in eval mode), restored after: autograd then
    records no weight gradients, and nothing upstream of the first tensor that needs one."""
    was_training = model.training
    if eval_mode:
        model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)
        if eval_mode:
            model.train(was_training)


class Gains:
    """The sums the output gains are made of (module docstring), per active site: ``‖y_i‖²`` and elements of its
    outputs (at the real tokens), ``Σ ‖J_iᵀ v‖² / probes``, and the output scale ``fsq``; ``zs`` holds the
    current batch's perturbations of each site's outputs, in call order."""

    def __init__(self, active: list[Site], probes: int):
        self.probes = probes
        self.zs: dict[str, list[torch.Tensor]] = {}
        self.ysq = {s.name: 0.0 for s in active}
        self.numel = {s.name: 0 for s in active}
        self.gsq = {s.name: 0.0 for s in active}
        self.fsq = 0.0

    def perturb(self, site: Site, output: torch.Tensor, mask) -> torch.Tensor:
        """``output + z`` with a fresh zero perturbation ``z`` kept for the backward; ``‖y‖²`` counted."""
        z = torch.zeros_like(output, requires_grad=True)
        self.zs.setdefault(site.name, []).append(z)
        kept = real(output, mask) if output.dim() == 3 else output
        self.ysq[site.name] += _sq(kept)
        self.numel[site.name] += kept.numel()
        return output + z

    def add(self, counts: dict[str, int], grads) -> None:
        """Add the gradients at the perturbations of ``counts`` (site → how many, in order) from one probe."""
        it = iter(grads)
        for name, k in counts.items():
            for _ in range(k):
                g = next(it)
                if g is not None:
                    self.gsq[name] += _sq(g) / self.probes

    def result(self, active: list[Site]) -> dict[str, float]:
        out = {}
        for s in active:
            n = s.name
            zero = self.numel[n] == 0 or self.fsq == 0
            out[n] = 0.0 if zero else self.ysq[n] * self.gsq[n] / (self.numel[n] * self.fsq)
        return out


def sensitivity(model: nn.Module, sites: list[Site], batches: list, probes: int = 1, seed: int = 0,
                module_of: Callable[[Site], nn.Module] | None = None, metric: Metric | None = None,
                mask_of: Callable[[object], torch.Tensor | None] = lambda batch: None) -> dict[str, float]:
    """Output gain ``g_i`` of every active site (see module docstring), from ``probes`` Hutchinson probes whose
    covariance is ``metric``'s quadratic form (:mod:`sketchpass.metric`; default the relative squared error).
    ``mask_of(batch)``: the batch's real tokens (:func:`layer_input`); a layer's ``‖y_i‖² / D_i`` is then that
    of its real tokens' outputs, as its relative error is measured on their rows, and the model's output is
    probed and counted at its real tokens only (:func:`sketchpass.metric.real`)."""
    metric = metric or Metric()
    cur: dict = {"mask": None}
    active = [s for s in sites if s.skip is None]
    if not active or not batches:
        return {s.name: 1.0 for s in active}
    gains = Gains(active, probes)
    module_of = module_of or (lambda s: s.dense)
    handles = [module_of(s).register_forward_hook(lambda m, i, o, s=s: gains.perturb(s, o, cur["mask"]))
               for s in active]
    gen = torch.Generator().manual_seed(seed)
    try:
        with frozen(model):
            for batch in batches:
                gains.zs.clear()
                cur["mask"] = mask_of(batch)
                with torch.enable_grad():
                    outs = metric.outputs(_tensors(call_model(model, batch)))
                    if not outs:
                        raise ValueError("the model output has no floating-point tensor to measure sensitivity on")
                    gains.fsq += sum(metric.scale(o, cur["mask"]) for o in outs)
                    counts = {n: len(z) for n, z in gains.zs.items()}
                    leaves = [z for zs in gains.zs.values() for z in zs]
                    outs = [o for o in outs if o.requires_grad]  # outputs no matched layer feeds have no gain
                    for p in range(probes if outs and leaves else 0):
                        v = [metric.probe(o, gen, cur["mask"]) for o in outs]
                        gains.add(counts, torch.autograd.grad(outs, leaves, grad_outputs=v, allow_unused=True,
                                                              retain_graph=p < probes - 1))
    finally:
        for h in handles:
            h.remove()
    return gains.result(active)
