"""Find the weight-carrying layers of a captured model (pattern / check, DESIGN §4).

Patterns: ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` modules; in an fx graph also ``F.linear``,
``F.conv1d``/``F.conv2d`` and ``matmul`` (``x @ W``) whose weight is a parameter.  Functional uses are
normalised into ``call_module`` nodes of equivalent ``nn.Linear``/``nn.ConvNd`` modules (sharing the
parameters), so every later stage deals with modules only.

Checks return a *reason* when they decline; declined layers stay in the plan as skipped.
"""

from __future__ import annotations

import operator

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..plan import LayerSpec, SkipReason
from ..site import Site
from .trace import Captured

_LINEAR_FNS = {F.linear, torch._C._nn.linear}
_CONV_FNS = {F.conv1d: 1, F.conv2d: 2, torch.conv1d: 1, torch.conv2d: 2}
_MATMUL_FNS = {operator.matmul, torch.matmul}
_UNSUPPORTED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Conv3d, nn.LazyLinear)


def _tup(v, n):
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * n


def spec_of(name: str, mod: nn.Module, source: str = "module") -> LayerSpec:
    if isinstance(mod, nn.Linear):
        return LayerSpec(name, "linear", mod.in_features, mod.out_features, bias=mod.bias is not None, source=source)
    n = 1 if isinstance(mod, nn.Conv1d) else 2
    return LayerSpec(name, f"conv{n}d", mod.in_channels, mod.out_channels, tuple(mod.kernel_size),
                     tuple(mod.stride), mod.padding if isinstance(mod.padding, str) else tuple(mod.padding),
                     tuple(mod.dilation), mod.groups, mod.bias is not None, source=source)


def check(mod: nn.Module) -> tuple[SkipReason, str] | None:
    """Why this layer cannot be factored (reason and detail), or ``None``."""
    w = getattr(mod, "weight", None)
    if w is None or not torch.is_floating_point(w):
        return SkipReason.NOT_FLOAT, "weight is missing or not floating point"
    if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
        if mod.padding_mode != "zeros":
            return (SkipReason.PADDING,
                    f"padding_mode={mod.padding_mode!r} does not commute with the input-mode sketch; kept dense")
        if mod.groups > 1 and mod.in_channels // mod.groups == 1:
            return (SkipReason.DEPTHWISE,
                    f"depthwise conv (groups={mod.groups}, one input channel per group): nothing to factor")
        if isinstance(mod.padding, str) and mod.padding == "same" and any(
                (d * (k - 1)) % 2 for k, d in zip(mod.kernel_size, mod.dilation)):
            return SkipReason.PADDING, "padding='same' with an even kernel is asymmetric; not supported"
    return None


def _fetch_attr(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _param_of(root: nn.Module, node):
    """The parameter a ``get_attr`` node fetches, else ``None``."""
    if isinstance(node, torch.fx.Node) and node.op == "get_attr":
        obj = _fetch_attr(root, node.target)
        return obj if isinstance(obj, nn.Parameter) else None
    return None


def _param_uses(cap: Captured) -> dict[int, list[str]]:
    """Every place a parameter is used: module-held names and (fx) get_attr nodes."""
    uses: dict[int, list[str]] = {}
    model = cap.model
    called: set[str] | None = None
    if cap.graph is not None:
        called = {n.target for n in cap.graph.nodes if n.op == "call_module"}
    for mname, mod in model.named_modules(remove_duplicate=False):
        if called is not None and mname not in called:
            continue
        for pname, p in mod.named_parameters(recurse=False, remove_duplicate=False):
            uses.setdefault(id(p), []).append(f"{mname}.{pname}" if mname else pname)
    if cap.graph is not None:
        for node in cap.graph.nodes:
            if node.op == "get_attr":
                obj = _fetch_attr(model, node.target)
                if isinstance(obj, nn.Parameter):
                    uses.setdefault(id(obj), []).extend([node.target] * max(len(node.users), 1))
    return uses


def _mha_children(model: nn.Module) -> set[str]:
    out = set()
    for mname, mod in model.named_modules():
        if isinstance(mod, nn.MultiheadAttention):
            out.add(f"{mname}.out_proj" if mname else "out_proj")
    return out


def _normalise_functional(cap: Captured) -> list[tuple[str, str, str]]:
    """Turn F.linear / F.conv / matmul-with-parameter nodes into call_module nodes.

    Returns ``(name, path, source)`` for each new module, and a list of declined ones is recorded
    as skipped sites by :func:`find_sites`."""
    gm, graph = cap.model, cap.graph
    made = []
    declined = []
    consumed: list[str] = []  # attributes now held by the new modules
    for node in list(graph.nodes):
        fn = node.target
        kind = None
        if node.op == "call_function" and fn in _LINEAR_FNS:
            kind = "linear"
        elif node.op == "call_function" and fn in _CONV_FNS:
            kind = "conv"
        elif (node.op == "call_function" and fn in _MATMUL_FNS) or (node.op == "call_method" and fn == "matmul"):
            kind = "matmul"
        if kind is None:
            continue
        args = list(node.args)
        kwargs = dict(node.kwargs)
        w_node = args[1] if len(args) > 1 else kwargs.get("weight", kwargs.get("other"))
        if not (isinstance(w_node, torch.fx.Node) and w_node.op == "get_attr"):
            if kind == "matmul" and isinstance(args[0], torch.fx.Node) and args[0].op == "get_attr":
                declined.append((args[0].target, "matmul with the parameter on the left (W @ x) is not matched"))
            continue
        weight = _fetch_attr(gm, w_node.target)
        if not isinstance(weight, nn.Parameter):
            continue
        name = w_node.target[:-len(".weight")] if w_node.target.endswith(".weight") else w_node.target
        path = "_sp_" + name.replace(".", "_")
        if kind == "linear":
            b_node = args[2] if len(args) > 2 else kwargs.get("bias")
            bias = _param_of(gm, b_node)
            if b_node is not None and bias is None:
                declined.append((name, "F.linear with a computed (non-parameter) bias is not matched"))
                continue
            mod = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
            mod.weight = weight
            if bias is not None:
                mod.bias = bias
            source = "function"
        elif kind == "conv":
            nd = _CONV_FNS[fn]
            names = ["input", "weight", "bias", "stride", "padding", "dilation", "groups"]
            vals = dict(zip(names, args))
            vals.update(kwargs)
            b_node = vals.get("bias")
            bias = _param_of(gm, b_node)
            if (b_node is not None and bias is None) or any(isinstance(vals.get(k), torch.fx.Node)
                                                             for k in ("stride", "padding", "dilation", "groups")):
                declined.append((name, "functional conv with computed bias or geometry is not matched"))
                continue
            cls = nn.Conv1d if nd == 1 else nn.Conv2d
            groups = int(vals.get("groups", 1))
            pad = vals.get("padding", 0)
            mod = cls(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
                      _tup(vals.get("stride", 1), nd), pad if isinstance(pad, str) else _tup(pad, nd),
                      _tup(vals.get("dilation", 1), nd), groups,
                      bias=bias is not None, device="meta")
            mod.weight = weight
            if bias is not None:
                mod.bias = bias
            source = "function"
        else:
            if len(w_node.users) > 1:
                declined.append((name, "matmul weight is also used elsewhere (tied weights); kept dense"))
                continue
            if weight.dim() != 2:
                declined.append((name, f"matmul with a {weight.dim()}-D parameter is not matched"))
                continue
            mod = nn.Linear(weight.shape[0], weight.shape[1], bias=False, device="meta")
            mod.weight = nn.Parameter(weight.detach().T.contiguous(), requires_grad=weight.requires_grad)
            source = "matmul"
        gm.add_submodule(path, mod)
        consumed.append(w_node.target)
        if kind != "matmul" and b_node is not None:
            consumed.append(b_node.target)
        with graph.inserting_before(node):
            new = graph.call_module(path, (args[0] if args else kwargs["input"],))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        made.append((name, path, source))
    if made:
        graph.eliminate_dead_code()
        graph.lint()
        # The parameters now live in the new modules: drop the old attributes nothing fetches any more,
        # so that parameter counts (and state_dict keys) do not hold them twice.
        still = {n.target for n in graph.nodes if n.op == "get_attr"}
        for target in dict.fromkeys(consumed):
            if target not in still:
                owner_path, _, attr = target.rpartition(".")
                owner = gm.get_submodule(owner_path) if owner_path else gm
                if attr in owner._parameters:
                    del owner._parameters[attr]
                elif hasattr(owner, attr):
                    delattr(owner, attr)
        gm.recompile()
    cap.notes.extend(f"{n}: {r}" for n, r in declined)
    return made


def find_sites(cap: Captured, normalise: bool = True) -> list[Site]:
    """All matched layers of the captured model, in execution order (fx) or module order, with a skip
    reason where declined.  ``site.ref`` is the module's path in the captured model, ``site.dense`` the
    module itself."""
    functional = _normalise_functional(cap) if (cap.graph is not None and normalise) else []
    cap.functional = cap.functional or bool(functional)
    fn_paths = {path: (name, source) for name, path, source in functional}
    uses = _param_uses(cap)
    mha = _mha_children(cap.model) if cap.graph is None else set()
    called = None
    if cap.graph is not None:
        called = [n.target for n in cap.graph.nodes if n.op == "call_module"]
    order = {p: i for i, p in enumerate(dict.fromkeys(called))} if called is not None else None
    sites = []
    for path, mod in cap.model.named_modules():
        if order is not None and path not in order:
            continue
        if isinstance(mod, _UNSUPPORTED):
            sites.append(Site(path, LayerSpec(path, type(mod).__name__, 0, 0), type(mod).__name__, ref=path,
                              skip=SkipReason.UNSUPPORTED_OP,
                              detail=f"{type(mod).__name__} is not supported; kept as is"))
            continue
        if not isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            continue
        name, source = fn_paths.get(path, (path, "module"))
        spec = spec_of(name, mod, source)
        reason = check(mod)
        if reason is None and path in mha:
            reason = (SkipReason.ATTENTION_INTERNAL,
                      "used inside nn.MultiheadAttention through its .weight (not callable as a module)")
        if reason is None:
            held = uses.get(id(mod.weight), [])
            if len(held) > 1:
                others = sorted({u for u in held if u != f"{path}.weight"}) or [f"{path}.weight"]
                reason = (SkipReason.SHARED_WEIGHT,
                          f"weight is shared with {', '.join(others[:3])} (tied weights); kept dense")
        site = Site(name, spec, type(mod).__name__, weight=getattr(mod, "weight", None), dense=mod,
                    bias=getattr(mod, "bias", None), ref=path)
        if reason is not None:
            site.set_skip(*reason)
        sites.append(site)
    if order is not None:
        sites.sort(key=lambda s: order[s.ref])
    return sites
