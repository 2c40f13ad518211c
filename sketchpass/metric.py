"""How the model's output error is counted: the one quantity the solver minimises, the verify stage measures
and the plan reports (``metric=`` option).

``"mse"`` — the **relative squared error** of all the model's floating-point outputs,
``Σ‖f̂ − f‖² / Σ‖f‖²``.  The default for every model but language models: it asks nothing of what the
outputs mean.

``"kl"`` — the **mean KL divergence** ``KL(softmax(f) ‖ softmax(f̂))`` of the model's first floating-point
output with a class axis (a scalar loss before it is passed over), read as logits over its last axis, in nats
per position (a token of a language model, a sample of a classifier); with a 0/1 ``attention_mask`` in the batch
(modules capture) padded positions are not counted, under either metric. The default for language models
(``transformers`` models that generate): perplexity and next-token agreement follow the distributions, not the
raw logits — a logit error along a direction the softmax ignores (a shift of all logits) or on tokens it gives
no weight costs nothing, one on the likely tokens costs much. On SmolLM2-135M (``bench/llm.py``) the solver's
allocation under ``"mse"`` stopped tracking perplexity at large errors (at whole-model params 0.7: perplexity
124.87, uniform allocation 122.36); under ``"kl"`` it did not (94.39).

Sensitivities under either metric come from the same first-order model (:mod:`sketchpass.fx.observe`): a
perturbation ``δ`` of layer ``i``'s output moves the logits by ``J_i δ``; the squared error is ``‖J_i δ‖²`` and
the KL divergence ``½ (J_i δ)ᵀ F (J_i δ)`` with ``F = diag(p) − p pᵀ`` (the softmax's Fisher matrix, per
position).  A probe ``v`` with ``E[v vᵀ] = I`` (Rademacher) estimates ``tr(J_iᵀ J_i)``; one with
``E[v vᵀ] = F`` — ``v = e_y − p`` with ``y`` drawn from ``p`` — estimates ``tr(J_iᵀ F J_i)``, at the same cost
(one backward pass).
"""

from __future__ import annotations

import sys

import torch

METRICS = ("auto", "mse", "kl")


def covers(t: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Is ``mask`` (:func:`sketchpass.batches.token_mask`, ``(samples, tokens)``) the token mask of ``t``: does
    ``t`` have a feature axis after its first two, and are those the mask's?"""
    return mask is not None and t.dim() >= 3 and tuple(t.shape[:2]) == tuple(mask.shape)


def real(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The positions of ``t`` that hold real tokens: ``t[mask]`` (``(real positions, ...)``) when ``mask``
    :func:`covers` ``t``, else ``t`` itself (an output without a token axis: a pooled embedding, a class
    score)."""
    return t[mask.to(t.device)] if covers(t, mask) else t


class Metric:
    """One way of counting the output error: ``pair(ref, out) = (num, den)`` summed over batches, the error
    is ``Σ num / Σ den``.  Every method takes the batch's token ``mask`` (or ``None``): an output with a token
    axis is then counted at its real tokens only (:func:`real`) — what a model computes at padding means
    nothing."""

    name = "mse"
    label = "relative squared output error"
    unit = "relative, squared"

    def outputs(self, tensors: list) -> list:
        """The outputs the error is counted on."""
        return list(tensors)

    def pair(self, ref: torch.Tensor, out: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[float, float]:
        ref, out = real(ref, mask), real(out, mask)
        return float((out.detach().double() - ref.detach().double()).square().sum()), self._den(ref)

    def errors(self, refs: list, outs: list, mask: torch.Tensor | None = None) -> tuple[float, float]:
        """``(num, den)`` over the outputs this metric counts."""
        num = den = 0.0
        for a, b in zip(self.outputs(refs), self.outputs(outs)):
            n, d = self.pair(a, b, mask)
            num, den = num + n, den + d
        return num, den

    def denominator(self, refs: list, mask: torch.Tensor | None = None) -> float:
        """``Σ den`` of :meth:`errors` from the reference outputs alone."""
        return sum(self._den(real(a, mask)) for a in self.outputs(refs))

    def _den(self, ref: torch.Tensor) -> float:
        return float(ref.detach().double().square().sum())

    def probe(self, out: torch.Tensor, gen: torch.Generator, mask: torch.Tensor | None = None) -> torch.Tensor:
        """A probe ``v`` on one output whose covariance is the metric's local quadratic form (times 2 for KL);
        zero at padding."""
        v = (torch.randint(0, 2, out.shape, generator=gen) * 2 - 1).to(out.dtype).to(out.device)
        return _zero_padding(v, mask)

    def scale(self, out: torch.Tensor, mask: torch.Tensor | None = None) -> float:
        """What a sensitivity is divided by on one output: ``E‖Jᵀv‖² / Σ scale`` is the predicted error per unit
        relative layer error (``‖f‖²`` for the relative squared error; ``2 · positions`` for KL, whose quadratic
        form is ``½ δᵀFδ``)."""
        return float(real(out, mask).detach().double().square().sum())


def _zero_padding(v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if covers(v, mask):
        keep = mask.to(device=v.device, dtype=v.dtype).reshape(*mask.shape, *([1] * (v.dim() - 2)))
        return v * keep
    return v


class KL(Metric):
    name = "kl"
    label = "mean KL divergence of the output distributions"
    unit = "mean KL, nats per position"

    def outputs(self, tensors: list) -> list:
        """The first output with a class axis: a scalar before it (the loss a Hugging Face model returns first
        when the batch has ``labels``) is passed over."""
        if not tensors:
            return []
        for t in tensors:
            if t.dim() >= 1 and t.shape[-1] >= 2:
                return [t]
        raise ValueError(f"metric='kl' reads the model's first floating-point output with a class axis as logits "
                         f"over its last axis (at least 2 classes); the outputs have shapes "
                         f"{[tuple(t.shape) for t in tensors]}: use metric='mse'")

    CHUNK = 2**22  # logits per float64 log-softmax (32 MB): a batch's KL is summed chunk by chunk

    def pair(self, ref: torch.Tensor, out: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[float, float]:
        ref, out = real(ref, mask), real(out, mask)
        a, b = ref.detach().reshape(-1, ref.shape[-1]), out.detach().reshape(-1, out.shape[-1])
        rows = max(1, self.CHUNK // a.shape[1])
        kl = 0.0
        for i in range(0, a.shape[0], rows):
            p = torch.log_softmax(a[i:i + rows].double(), -1)
            q = torch.log_softmax(b[i:i + rows].double(), -1)
            kl += float((p.exp() * (p - q)).sum())
        return max(kl, 0.0), self._den(ref)

    def _den(self, ref: torch.Tensor) -> float:
        return float(ref.numel() // ref.shape[-1])

    def probe(self, out: torch.Tensor, gen: torch.Generator, mask: torch.Tensor | None = None) -> torch.Tensor:
        p = torch.softmax(out.detach().float(), -1)
        flat = p.reshape(-1, p.shape[-1])
        y = torch.multinomial(flat.cpu(), 1, generator=gen).to(p.device)
        v = flat.neg()
        v.scatter_add_(1, y, torch.ones_like(y, dtype=v.dtype))
        return _zero_padding(v.reshape(out.shape).to(out.dtype), mask)

    def scale(self, out: torch.Tensor, mask: torch.Tensor | None = None) -> float:
        out = real(out, mask)
        return 2.0 * (out.numel() // out.shape[-1])


def metric(name: str) -> Metric:
    if name == "mse":
        return Metric()
    if name == "kl":
        return KL()
    raise ValueError(f"metric must be one of {METRICS[1:]} once resolved, got {name!r}")


def is_language_model(model) -> bool:
    """A ``transformers`` model that generates text (``can_generate()``): its first output is next-token logits."""
    tf = sys.modules.get("transformers")  # a transformers model means transformers is imported
    if tf is None or not isinstance(model, getattr(tf, "PreTrainedModel", ())):
        return False
    try:
        return bool(model.can_generate())
    except Exception:  # noqa: BLE001 — a model whose check fails is not treated as a language model
        return False
