"""Rewrite matched layers into their planned forms, fitting each one on the inputs it will really see.

Without calibration data every layer is fitted data-free (``lstsq`` sketches, plain SVD).  With
calibration data we refit sequentially (the asymmetric objective of Zhang et al., "Accelerating Very
Deep Convolutional Networks for Classification and Detection", TPAMI 2015): layer ``i`` minimises
``‖Ŵ X̂ - W X‖²`` where ``X`` are its inputs in the original model and ``X̂`` its inputs in the model
whose earlier layers are already compressed.  With ``Ĉ = X̂X̂ᵀ`` and ``M = X X̂ᵀ``,
``‖ŴX̂ - WX‖² = ‖(Ŵ - W')X̂‖² + const`` for ``W' = W M Ĉ⁻¹``, so the usual fits of ``W'`` under
``Ĉ`` solve it.  Both Grams are shrunk by the same Ledoit–Wolf intensity (toward ``μI``), so that a
layer whose inputs did not change gets ``W' = W`` exactly.

On an fx graph the original and the compressed model are interpreted in lock step, node by node, over
all calibration batches (two forward passes in total).  Without a graph each layer needs its own
(early-stopped) forward passes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.fx
from torch import nn

from ..calib import CrossGramAccumulator, call_model, shrink_centered
from ..layers import LowRankConv1d, LowRankConv2d, LowRankLinear, SKConv1d, SKConv2d, SKLinear
from ..plan import Decision
from ..sketch.fit import _gram_factor
from .match import Site

_SK = {nn.Linear: SKLinear, nn.Conv1d: SKConv1d, nn.Conv2d: SKConv2d}
_LR = {nn.Linear: LowRankLinear, nn.Conv1d: LowRankConv1d, nn.Conv2d: LowRankConv2d}


def set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, attr, new)


def _dense_type(mod: nn.Module) -> type:
    for t in (nn.Conv1d, nn.Conv2d, nn.Linear):
        if isinstance(mod, t):
            return t
    raise TypeError(f"cannot factor a {type(mod).__name__}")


def _with_weight(mod: nn.Module, W: torch.Tensor) -> nn.Module:
    """A shallow stand-in of ``mod`` whose weight is ``W`` (for fitting a refit target)."""
    twin = copy.copy(mod)
    twin._parameters = dict(mod._parameters)
    twin._parameters["weight"] = nn.Parameter(W.to(mod.weight.dtype).reshape(mod.weight.shape), requires_grad=False)
    return twin


def build(site: Site, d: Decision, *, seed: int, dist: str, init: str, grams: torch.Tensor | None,
          weight: torch.Tensor | None = None, wc: torch.Tensor | None = None) -> nn.Module:
    """The module for one decision, fitted to ``weight`` (default: the layer's own) under ``grams``
    (``(groups, n, n)``, already shrunk; ``None`` = data-free); ``wc`` = ``weight @ grams`` per group
    when known (the refit has it), saving the svd fit that product."""
    mod = site.module if weight is None else _with_weight(site.module, weight)
    t = _dense_type(site.module)
    is_linear = t is nn.Linear
    gram = None if grams is None else (grams[0] if is_linear else grams)
    if d.method == "svd":
        return _LR[t].from_dense(mod, d.rank, gram=gram, wc=None if wc is None else (wc[0] if is_linear else wc))
    if d.method == "sketch":
        use = init
        if use == "calibrated" and gram is None:
            use = "lstsq"
        return _SK[t].from_dense(mod, d.k, d.l, init=use, seed=seed, gram=gram if use == "calibrated" else None,
                                 name=site.name, dist=dist)
    raise ValueError(f"decision {d.method!r} does not build a module")


def _target(W: torch.Tensor, acc: CrossGramAccumulator, groups: int, alpha: float | str):
    """``(W', Ĉ_s, W'Ĉ_s)``: the refit target, the shrunk compressed-input Grams (see module docstring)
    and their product per group (``= W M_s``, known without a product; ``None`` when ``W' = W``).

    ``Ĉ_s`` and ``M_s`` are shrunk with the same intensity toward the same target
    (:func:`~sketchpass.calib.shrink_centered`), so unchanged inputs give ``W' = W``."""
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


def _accumulate(acc: CrossGramAccumulator, mod: nn.Module, x: torch.Tensor, xh: torch.Tensor) -> None:
    if isinstance(mod, nn.Linear):
        rows = x.reshape(-1, mod.in_features)
        acc.add_rows(rows, rows if xh is x else xh.reshape(-1, mod.in_features))
    else:
        acc.add_conv_inputs(x, xh, mod.kernel_size, mod.stride, mod.padding, mod.dilation)


def _n_features(mod: nn.Module) -> tuple[int, int]:
    if isinstance(mod, nn.Linear):
        return mod.in_features, 1
    return mod.weight.shape[1] * mod.weight[0, 0].numel(), mod.groups


def _signal(y: torch.Tensor, mod: nn.Module) -> float:
    """``‖y - b‖²``: the layer's output energy without its bias, the denominator of the relative
    output error (the same quantity as ``tr(W C Wᵀ)`` in the predicted error)."""
    y = y.detach().double()
    if getattr(mod, "bias", None) is not None:
        b = mod.bias.detach().double()
        y = y - (b if isinstance(mod, nn.Linear) else b.reshape(1, -1, *([1] * (y.dim() - 2))))
    return float(y.square().sum())


def _rel(a: float, b: float) -> float:
    return a / b if b > 0 else 0.0


def fit_all(
    work: nn.Module,
    sites: list[Site],
    decisions: dict[str, Decision],
    *,
    seed: int,
    dist: str,
    init: str,
    batches: list | None,
    shrink: float | str = "auto",
    refit: bool = True,
    progress: Callable[[str], None] | None = None,
) -> None:
    """Replace every factored site of ``work`` in place (``work`` is the pass's private copy).

    ``refit=False`` fits every layer on its inputs in the *original* model (no sequential refit)."""
    todo = [s for s in sites if s.skip is None and decisions[s.name].method != "dense"]
    if not batches:
        for s in todo:
            set_module(work, s.path, build(s, decisions[s.name], seed=seed, dist=dist, init=init, grams=None))
            if progress:
                progress(s.name)
        return
    if isinstance(work, torch.fx.GraphModule):
        _lockstep(work, sites, decisions, batches, seed=seed, dist=dist, init=init, shrink=shrink, refit=refit,
                  progress=progress)
    else:
        _per_layer(work, sites, decisions, batches, seed=seed, dist=dist, init=init, shrink=shrink, refit=refit,
                   progress=progress)


# --------------------------------------------------------------------------- fx: lock step
def _placeholder_values(gm: torch.fx.GraphModule, batch) -> dict[torch.fx.Node, object]:
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    vals = {}
    if isinstance(batch, torch.Tensor):
        batch = (batch,)
    if isinstance(batch, dict):
        for n in phs:
            key = n.target.lstrip("*")
            if key in batch:
                vals[n] = batch[key]
            elif n.args:
                vals[n] = n.args[0]
            else:
                raise ValueError(f"calibration batch has no value for model input {key!r} (keys: {sorted(batch)})")
        return vals
    batch = list(batch)
    for i, n in enumerate(phs):
        if i < len(batch):
            vals[n] = batch[i]
        elif n.args:
            vals[n] = n.args[0]
        else:
            raise ValueError(f"calibration batch has {len(batch)} inputs but the model needs {n.target!r} too")
    return vals


def _run_node(gm, node, env, module=None):
    args = torch.fx.node.map_arg(node.args, lambda n: env[n])
    kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: env[n])
    if node.op == "call_module":
        return (module or gm.get_submodule(node.target))(*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    if node.op == "get_attr":
        obj = gm
        for part in node.target.split("."):
            obj = getattr(obj, part)
        return obj
    raise RuntimeError(f"unexpected node {node.op}")


@torch.no_grad()
def _lockstep(gm, sites, decisions, batches, *, seed, dist, init, shrink, refit, progress):
    by_path = {s.path: s for s in sites if s.skip is None}
    originals = {p: s.module for p, s in by_path.items()}
    nodes = list(gm.graph.nodes)
    last = {}
    for i, n in enumerate(nodes):
        for a in n.all_input_nodes:
            last[a] = i
    env_o = [dict() for _ in batches]
    env_n = [dict() for _ in batches]
    fitted: set[str] = set()
    err_num: dict[str, float] = {}
    err_den: dict[str, float] = {}
    was_training = gm.training
    gm.eval()
    try:
        for i, node in enumerate(nodes):
            if node.op == "placeholder":
                for c, b in enumerate(batches):
                    v = _placeholder_values(gm, b)[node]
                    env_o[c][node] = v
                    env_n[c][node] = v
            elif node.op == "output":
                break
            elif node.op == "call_module" and node.target in by_path:
                site = by_path[node.target]
                orig = originals[node.target]
                d = decisions[site.name]
                if d.method != "dense" and site.name not in fitted:
                    n_feat, groups = _n_features(orig)
                    acc = CrossGramAccumulator(n_feat, groups, weight=orig.weight)
                    for c in range(len(batches)):
                        x = env_o[c][node.args[0]]
                        xh = env_n[c][node.args[0]] if refit else x
                        _accumulate(acc, orig, x, xh)
                    W_t, grams, wc = _target(orig.weight, acc, groups, shrink)
                    new = build(site, d, seed=seed, dist=dist, init=init, grams=grams, weight=W_t, wc=wc)
                    set_module(gm, node.target, new)
                    fitted.add(site.name)
                    if progress:
                        progress(site.name)
                current = gm.get_submodule(node.target)
                for c in range(len(batches)):
                    if current is orig and _shared(node, env_o[c], env_n[c]):  # dense and same input: run once
                        yo = yn = _run_node(gm, node, env_o[c], module=orig)
                    else:
                        _unshare(node, env_o[c], env_n[c])
                        yo = _run_node(gm, node, env_o[c], module=orig)
                        yn = _run_node(gm, node, env_n[c], module=current)
                    env_o[c][node], env_n[c][node] = yo, yn
                    if yn is not yo:
                        err_num[site.name] = err_num.get(site.name, 0.0) + float((yn - yo).double().square().sum())
                    else:
                        err_num.setdefault(site.name, 0.0)
                    err_den[site.name] = err_den.get(site.name, 0.0) + _signal(yo, orig)
            else:
                for c in range(len(batches)):
                    if _shared(node, env_o[c], env_n[c]):  # nothing compressed upstream yet: one stream
                        env_o[c][node] = env_n[c][node] = _run_node(gm, node, env_o[c])
                    else:
                        _unshare(node, env_o[c], env_n[c])
                        env_o[c][node] = _run_node(gm, node, env_o[c], module=_orig_module(node, originals))
                        env_n[c][node] = _run_node(gm, node, env_n[c])
            for a in node.all_input_nodes:
                if last.get(a) == i:
                    for c in range(len(batches)):
                        env_o[c].pop(a, None)
                        env_n[c].pop(a, None)
    finally:
        gm.train(was_training)
    for name in err_num:
        decisions[name].measured_error = _rel(err_num[name], err_den[name])


def _shared(node, env_o: dict, env_n: dict) -> bool:
    """Whether both streams hold the very same objects for every input of ``node`` (true until the first
    compressed layer upstream): then the node runs once and both streams share the result."""
    return all(env_n[a] is env_o[a] for a in node.all_input_nodes)


def _unshare(node, env_o: dict, env_n: dict) -> None:
    """Before the streams run ``node`` separately, give the compressed stream its own copy of any input
    still shared with the original stream, so an in-place op (``relu_``, ``+=``) in one stream can never
    change the other's value."""
    for a in node.all_input_nodes:
        v = env_n[a]
        if v is env_o[a] and isinstance(v, torch.Tensor):
            env_n[a] = v.clone()


def _orig_module(node, originals):
    return originals.get(node.target) if node.op == "call_module" else None


# --------------------------------------------------------------------------- modules: per layer
class _Stop(Exception):
    pass


@torch.no_grad()
def _capture_input(model: nn.Module, module: nn.Module, batch):
    """The first input of ``module`` when ``model`` runs on ``batch`` (the forward stops there)."""
    box = {}

    def hook(mod, inputs):
        box["x"] = inputs[0]
        raise _Stop

    h = module.register_forward_pre_hook(hook)
    try:
        call_model(model, batch)
    except _Stop:
        pass
    finally:
        h.remove()
    if "x" not in box:
        return None
    return box["x"]


@torch.no_grad()
def _per_layer(work, sites, decisions, batches, *, seed, dist, init, shrink, refit, progress):
    reference = copy.deepcopy(work)  # the original, untouched, for X
    ref_modules = dict(reference.named_modules())
    work.eval()
    reference.eval()
    for s in sites:
        if s.skip is not None or decisions[s.name].method == "dense":
            continue
        n_feat, groups = _n_features(s.module)
        acc = CrossGramAccumulator(n_feat, groups, weight=s.module.weight)
        seen = False
        for b in batches:
            x = _capture_input(reference, ref_modules[s.path], b)
            xh = _capture_input(work, work.get_submodule(s.path), b) if refit else x
            if x is None or xh is None:
                continue
            seen = True
            _accumulate(acc, s.module, x, xh)
        d = decisions[s.name]
        if not seen:
            new = build(s, d, seed=seed, dist=dist, init=init, grams=None)
        else:
            W_t, grams, wc = _target(s.module.weight, acc, groups, shrink)
            new = build(s, d, seed=seed, dist=dist, init=init, grams=grams, weight=W_t, wc=wc)
        set_module(work, s.path, new)
        if progress:
            progress(s.name)
    # measured errors: one pass over both models with output hooks
    outs: dict[str, list] = {}
    hooks = []
    for s in sites:
        if s.skip is not None:
            continue
        for tag, root in (("o", reference), ("n", work)):
            def hook(mod, inp, out, key=(s.name, tag)):
                outs.setdefault(key[0], {"o": [], "n": []})[key[1]].append(out.detach().double())
            hooks.append(root.get_submodule(s.path).register_forward_hook(hook))
    num: dict[str, float] = {}
    den: dict[str, float] = {}
    paths = {s.name: s.path for s in sites}
    try:
        for b in batches:
            call_model(reference, b)
            call_model(work, b)
            for name, d in outs.items():
                num[name] = num.get(name, 0.0) + sum(float((n - o).square().sum()) for o, n in zip(d["o"], d["n"]))
                mod = ref_modules[paths[name]]
                den[name] = den.get(name, 0.0) + sum(_signal(o, mod) for o in d["o"])
                d["o"].clear()
                d["n"].clear()
    finally:
        for h in hooks:
            h.remove()
    for name in num:
        decisions[name].measured_error = _rel(num[name], den[name])


__all__ = ["build", "fit_all", "set_module"]
