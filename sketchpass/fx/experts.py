"""Mixture-of-experts layers whose experts are stored fused, as 3-D parameters.

``transformers`` (5.x) keeps the routed experts of its MoE decoders (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3,
GPT-OSS, Phi-MoE, Granite-MoE, ...) in one module per layer, its weights stacked over the experts:
``gate_up_proj`` ``(experts, 2·inter, hidden)`` (or ``up_proj`` without a gate), ``down_proj``
``(experts, hidden, inter)``, transposed in some models, with or without biases; the class is marked by
``transformers.integrations.moe.use_experts_implementation``, which sets ``has_gate``, ``has_bias``,
``is_transposed`` and ``has_post_expert_norm`` on every instance and gives it ``_apply_gate`` (the gate:
``act(gate) · up``, or the model's own).  No ``nn.Linear`` is there to factor, and the experts hold most of such a
model's parameters.

:func:`unfuse` replaces such a module, in the pass's working copy, by :class:`RoutedExperts`: one ``nn.Linear``
per expert for the up (gate+up) projection and one for the down projection, holding views of the fused weights
(no copy), and a forward that loops over the experts the tokens are routed to, as transformers' eager path does.
Each replacement is **checked** before it is used: on random hidden states routed to every expert, it must give
the fused module's output (to float tolerance); a module that fails the check (another calling convention, a gate
this forward does not reproduce) is kept as it is, with a note.  The pass then factors the experts like any
linear layer.  An expert's inputs are the tokens routed to it, which change when earlier layers are compressed:
the refit fits it on the inputs the compressed model routes to it (``Site.extra["routed"]``), with the original
weight as the target.  The result keeps :class:`RoutedExperts` (also where no expert of a module was factored: its
``save_pretrained`` then writes every expert under its own name, which transformers' checkpoint conversions leave
alone, so :func:`sketchpass.load` reads it back).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

_FLAGS = ("has_gate", "has_bias", "is_transposed")


def _up_name(mod: nn.Module) -> str:
    return "gate_up_proj" if getattr(mod, "has_gate", True) else "up_proj"


def is_fused(mod: nn.Module) -> bool:
    """A transformers experts module with stacked 3-D weights (module docstring)."""
    if isinstance(mod, RoutedExperts) or not all(hasattr(mod, f) for f in _FLAGS):
        return False
    up, down = getattr(mod, _up_name(mod), None), getattr(mod, "down_proj", None)
    return (isinstance(up, torch.Tensor) and isinstance(down, torch.Tensor) and up.dim() == 3 and down.dim() == 3
            and up.shape[0] == down.shape[0] and up.device.type != "meta")


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool, requires_grad: bool) -> nn.Linear:
    w = weight.t().contiguous() if transposed else weight  # (out, in); a view of the fused weight when not transposed
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(w, requires_grad=requires_grad)
    if bias is not None:
        lin.bias = nn.Parameter(bias, requires_grad=requires_grad)
    return lin


class RoutedExperts(nn.Module):
    """The experts of a fused module (``impl``, which keeps its activation, gate and norm but no longer its
    stacked weights) as ``nn.Linear`` layers: ``up[e]`` (gate and up projections together when the module has a
    gate) and ``down[e]``.  Called as the fused module is: ``(hidden_states (tokens, hidden), top_k_index (tokens,
    k), top_k_weights (tokens, k))``."""

    def __init__(self, impl: nn.Module, up: list[nn.Linear], down: list[nn.Linear]):
        super().__init__()
        self.impl = impl
        self.up = nn.ModuleList(up)
        self.down = nn.ModuleList(down)

    @classmethod
    def of(cls, fused: nn.Module, copy_weights: bool = False) -> RoutedExperts:
        """The module for ``fused``, taken apart (its stacked weights leave it); ``copy_weights``: each expert
        gets its own copy rather than a view."""
        name = _up_name(fused)
        up_w, down_w = getattr(fused, name), fused.down_proj
        bias = bool(fused.has_bias)
        up_b = getattr(fused, name + "_bias", None) if bias else None
        down_b = getattr(fused, "down_proj_bias", None) if bias else None
        t, grad = bool(fused.is_transposed), up_w.requires_grad

        def part(x, e):
            if x is None:
                return None
            v = x.detach()[e]
            return v.clone() if copy_weights else v

        ups = [_linear(part(up_w, e), part(up_b, e), t, grad) for e in range(up_w.shape[0])]
        downs = [_linear(part(down_w, e), part(down_b, e), t, grad) for e in range(up_w.shape[0])]
        for attr in (name, "down_proj", name + "_bias", "down_proj_bias"):
            if attr in fused._parameters:
                del fused._parameters[attr]
            elif attr in fused._buffers:
                del fused._buffers[attr]
        out = cls(fused, ups, downs)
        out.train(fused.training)
        return out

    @property
    def num_experts(self) -> int:
        return len(self.up)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        impl = self.impl
        out = torch.zeros_like(hidden_states)
        index = top_k_index.reshape(hidden_states.shape[0], -1)
        weights = top_k_weights.reshape(index.shape)
        with torch.no_grad():
            hit = torch.unique(index).tolist()
        for e in hit:
            if not 0 <= e < len(self.up):  # expert-parallel sentinels and padding slots: no expert here
                continue
            token, slot = torch.where(index == e)
            h = self.up[e](hidden_states[token])
            h = impl._apply_gate(h) if impl.has_gate else impl.act_fn(h)
            h = self.down[e](h)
            if getattr(impl, "has_post_expert_norm", False):
                h = impl.post_expert_norm(h)
            out.index_add_(0, token, (h * weights[token, slot, None]).to(out.dtype))
        return out

    def own_storage(self) -> int:
        """Give every expert weight that is a view of a larger storage (the fused weight) its own copy, in place
        (``save_pretrained`` refuses tensors that share memory).  Returns how many were copied."""
        n = 0
        for mod in (*self.up, *self.down):
            if not isinstance(mod, nn.Linear):
                continue
            for key, t in list(mod._parameters.items()):
                if t is not None and t.untyped_storage().nbytes() != t.numel() * t.element_size():
                    mod._parameters[key] = nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad)
                    n += 1
        return n


def _check(fused: nn.Module, routed: RoutedExperts, top_k: int) -> str | None:
    """``None`` when ``routed`` gives ``fused``'s output on random tokens routed to every expert, else why not.
    ``fused`` still holds its weights (``routed`` was taken apart from a copy of it)."""
    up = routed.up[0].weight
    E = routed.num_experts
    hidden = routed.up[0].in_features
    k = max(1, min(top_k, E))
    T = 2 * E + 3
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, hidden, generator=g).to(dtype=up.dtype, device=up.device)
    idx = ((torch.arange(T)[:, None] + torch.arange(k)[None, :] * max(1, E // k)) % E).to(up.device)
    w = torch.rand(T, k, generator=g).to(dtype=up.dtype, device=up.device)
    try:
        with torch.no_grad():
            want = fused(x, idx, w)
            got = routed(x, idx, w)
    except Exception as exc:  # noqa: BLE001 - any failure means: not the calling convention we reproduce
        return f"calling it as (hidden_states, top_k_index, top_k_weights) failed ({type(exc).__name__}: {exc})"
    if not isinstance(want, torch.Tensor) or want.shape != got.shape:
        return f"it returns {type(want).__name__}, not a tensor of the hidden states' shape"
    err = float((want.double() - got.double()).norm() / want.double().norm().clamp_min(1e-30))
    tol = 1e-5 if up.dtype in (torch.float32, torch.float64) else 2e-2
    if not err <= tol:
        return f"a loop over its experts does not reproduce it (relative error {err:.2g} on random routed tokens)"
    return None


def unfuse(work: nn.Module, check: bool = True, only: set[str] | None = None) -> tuple[list[str], list[str]]:
    """Replace, in ``work`` (in place), every fused experts module (:func:`is_fused`) by :class:`RoutedExperts`;
    ``check``: only those that pass :func:`_check`, their experts views of the fused weights (``False`` when
    rebuilding a saved model's structure: every expert gets its own copy, which the saved weights then fill);
    ``only``: the paths to consider.  Returns the replaced paths and notes."""
    done, notes, kept = [], [], {}
    classes = set()
    for path, mod in list(work.named_modules()):
        if not path or not is_fused(mod) or (only is not None and path not in only):
            continue
        if check:  # taken apart from a copy of the module, so that the check can still call the fused one
            routed = RoutedExperts.of(copy.deepcopy(mod, {id(t): t for t in (*mod.parameters(), *mod.buffers())}))
            top_k = getattr(getattr(mod, "config", None), "num_experts_per_tok", 2)
            why = _check(mod, routed, top_k if isinstance(top_k, int) else 2)
            if why is not None:
                kept.setdefault(f"{type(mod).__name__}: {why}", []).append(path)
                continue
        else:
            routed = RoutedExperts.of(mod, copy_weights=True)
        parent, _, attr = path.rpartition(".")
        setattr(work.get_submodule(parent) if parent else work, attr, routed)
        done.append(path)
        classes.add(type(mod).__name__)
    if done:
        first = work.get_submodule(done[0])
        notes.append(f"{len(done)} fused mixture-of-experts module(s) ({'/'.join(sorted(classes))}, "
                     f"{first.num_experts} experts each, weights stacked in 3-D tensors) taken apart into one "
                     "nn.Linear per expert and projection (checked to give the same outputs), so that their experts "
                     "can be factored; the result keeps that form (a loop over the experts hit, as transformers' eager "
                     "path)")
    for why, paths in kept.items():
        more = ", ..." if len(paths) > 1 else ""
        notes.append(f"{len(paths)} fused experts module(s) kept as they are ({paths[0]}{more}; {why}): their experts "
                     "are not factored")
    return done, notes
