"""Standalone timings for the torch frontend (``torch-cpu``, ``torch-cuda``): one layer form at a time on
the layer's real input shape, and the whole model (see :mod:`sketchpass.latency.timing`)."""

from __future__ import annotations

import torch

from ..batches import call_model, move_batch
from ..latency import Target, measure
from ..layers import form_module
from ..site import Site


def _device(target: Target) -> str:
    return "cuda" if target.name == "torch-cuda" else "cpu"


def _sync(target: Target):
    return torch.cuda.synchronize if target.name == "torch-cuda" else None


def time_forms(site: Site, forms: list[tuple[str, str, int | None, int]], target: Target,
               channels_last: bool = False, **kw) -> dict:
    """``{key: Timing}`` of the forms ``(key, method, size, l)`` of ``site``, measured together."""
    dev = _device(target)
    dtype = site.extra.get("input_dtype") or site.weight.dtype
    x = torch.randn(site.extra["input_shape"], dtype=torch.float32).to(dtype=dtype, device=dev)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    fns = {}
    with torch.no_grad():
        for key, method, size, l in forms:
            mod = form_module(site.spec, method, size, l, dtype=dtype, device=dev, name=site.name).eval()
            if channels_last and x.dim() == 4:
                mod = mod.to(memory_format=torch.channels_last)
            fns[key] = (lambda m=mod: m(x))
        torch.set_num_threads(target.threads)
        return measure(fns, sync=_sync(target), **kw)


def time_models(models: dict, batch, target: Target, **kw) -> dict:
    """``{key: Timing}`` of whole models on one batch, measured together (interleaved A/B)."""
    dev = _device(target)
    b = move_batch(batch, dev)
    fns = {}
    modes = {k: m.training for k, m in models.items()}
    with torch.no_grad():
        for key, m in models.items():
            m.eval()
            if dev != "cpu":
                m.to(dev)
            fns[key] = (lambda m=m: call_model(m, b))
        torch.set_num_threads(target.threads)
        out = measure(fns, sync=_sync(target), **kw)
    for k, m in models.items():
        m.train(modes[k])
        if dev != "cpu":
            m.to("cpu")
    return out
