"""Block chaining for the sequential refit of models captured by module swapping (no fx graph).

Without a graph, the inputs of a layer in the partly compressed model can only be had by running the
model up to that layer: once per layer, for both streams, so the refit's cost grows with the square of the
depth.  Most deep models are a stack of repeated blocks (the decoder layers of a language model, the
encoder layers of BERT) held in one ``nn.ModuleList`` and called one after the other, each on the previous
one's output.  For those, the refit keeps, per calibration batch, the two streams' hidden state at the
input of the current block and runs **only that block** to reach its layers; moving on runs the block once
per stream.  The whole cost is then a few block forwards per block — linear in the depth.

What a block is called with besides the hidden state (attention masks, rotary position embeddings, ...)
is recorded once per batch from one forward of the original model; key/value caches in it are dropped
(``None``, ``use_cache=False``) so that running a block again cannot append to a cache.  The chaining is
*checked* on the first calibration batch before it is used: every block must be called exactly once and in
order, and each block run on its recorded inputs must give the hidden state the next block received; the
layers outside the blocks must all run before the first block or after the last one.  When any of this
fails the refit runs the model up to every layer, as before, and the plan says why.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..batches import call_model, output_tensors
from ..metric import Metric
from .observe import Gains, _tensors, frozen


class _Stop(Exception):
    pass


@torch.no_grad()
def stop_at(module: nn.Module, run) -> tuple[tuple, dict] | None:
    """``(args, kwargs)`` of ``module``'s first call while ``run()`` runs (the run stops there), or ``None``
    when ``module`` is not called."""
    box = {}

    def hook(mod, args, kwargs):
        box["call"] = (args, kwargs)
        raise _Stop

    hd = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    except _Stop:
        pass
    finally:
        hd.remove()
    return box.get("call")


def first_input(module: nn.Module, run):
    """The first positional input of ``module``'s first call while ``run()`` runs (see :func:`stop_at`)."""
    call = stop_at(module, run)
    return call[0][0] if call is not None and call[0] else None


@contextmanager
def first_inputs(model: nn.Module, paths: list[str]):
    """``{path: first positional input}`` of the modules at ``paths``, filled while the ``with`` block runs the
    model (a module called with keyword arguments only gets ``None``)."""
    seen: dict = {}
    hooks = [model.get_submodule(p).register_forward_pre_hook(lambda m, a, p=p: seen.setdefault(p, a[0] if a else None))
             for p in paths]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


def _is_cache(v) -> bool:
    return type(v).__name__.endswith("Cache") and callable(getattr(v, "update", None))


def _sanitise(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    args = tuple(None if _is_cache(a) else a for a in args)
    kwargs = {k: (None if _is_cache(v) else v) for k, v in kwargs.items()}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return args, kwargs


def hidden_of(out) -> torch.Tensor | None:
    """A block's output hidden state: the output itself, or its first element (tuples, ModelOutputs)."""
    if isinstance(out, torch.Tensor):
        return out
    try:
        first = out[0]
    except (TypeError, IndexError, KeyError):
        return None
    return first if isinstance(first, torch.Tensor) else None


@dataclass
class Call:
    """One block's call with its hidden-state input taken out (``args[0]``, else ``kwargs['hidden_states']``)."""

    args: tuple
    kwargs: dict
    positional: bool

    @classmethod
    def of(cls, args: tuple, kwargs: dict) -> tuple[Call, torch.Tensor | None]:
        args, kwargs = _sanitise(args, dict(kwargs))
        if args and isinstance(args[0], torch.Tensor):
            return cls(args[1:], kwargs, True), args[0]
        if isinstance(kwargs.get("hidden_states"), torch.Tensor):
            h = kwargs.pop("hidden_states")
            return cls(args, kwargs, False), h
        return cls(args, kwargs, True), None

    def run(self, block: nn.Module, h: torch.Tensor):
        if self.positional:
            return block(h, *self.args, **self.kwargs)
        return block(*self.args, hidden_states=h, **self.kwargs)


def find_blocks(model: nn.Module, site_paths: list[str]) -> list[str] | None:
    """The paths of the repeated blocks holding the most layers: the children of an ``nn.ModuleList`` of at
    least two modules of one class."""
    best = None
    for path, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) < 2 or len({type(c) for c in mod}) != 1:
            continue
        paths = [f"{path}.{i}" if path else str(i) for i in range(len(mod))]
        n = sum(any(s.startswith(p + ".") for p in paths) for s in site_paths)
        if n and (best is None or n > best[0]):
            best = (n, paths)
    return None if best is None else best[1]


def block_index(path: str, blocks: list[str]) -> int | None:
    for i, p in enumerate(blocks):
        if path.startswith(p + "."):
            return i
    return None


@torch.no_grad()
def record_calls(model: nn.Module, blocks: list[str], batch, every_input: bool = False):
    """One forward of ``model``: every block's call (hidden state taken out), the blocks' hidden inputs (the
    first block's only, unless ``every_input``), and the order the blocks were called in."""
    calls: list = [None] * len(blocks)
    hiddens: list = [None] * len(blocks)
    order: list[int] = []

    def hook(mod, args, kwargs, i):
        order.append(i)
        calls[i], h = Call.of(args, kwargs)
        if i == 0 or every_input:
            hiddens[i] = h

    handles = [model.get_submodule(p).register_forward_pre_hook(
        lambda m, a, k, i=i: hook(m, a, k, i), with_kwargs=True) for i, p in enumerate(blocks)]
    try:
        call_model(model, batch)
    finally:
        for hd in handles:
            hd.remove()
    return calls, hiddens, order


@torch.no_grad()
def check_chain(model: nn.Module, blocks: list[str], batch) -> str | None:
    """``None`` when chaining the blocks reproduces the model's own block inputs on ``batch``, else why not."""
    calls, hiddens, order = record_calls(model, blocks, batch, every_input=True)
    if order != list(range(len(blocks))):
        return f"the blocks under {blocks[0].rpartition('.')[0]!r} are not each called once, in order"
    if any(h is None for h in hiddens):
        return "a block's input is not a tensor"
    if any(h.is_nested for h in hiddens):
        return "a block's input is a nested tensor (nn.TransformerEncoder's fast path for a padding mask)"
    for i in range(len(blocks) - 1):
        try:
            out = hidden_of(calls[i].run(model.get_submodule(blocks[i]), hiddens[i]))
        except Exception as exc:  # noqa: BLE001 - a block that cannot run on its recorded inputs: no chaining
            return f"block {blocks[i]!r} does not run again on its recorded inputs ({type(exc).__name__}: {exc})"
        want = hiddens[i + 1]
        if out is None or out.shape != want.shape or not torch.allclose(
                out, want, rtol=1e-4, atol=1e-5 * max(float(want.abs().max()), 1.0)):
            return f"block {blocks[i]!r} run on its recorded inputs does not give the next block's input"
    return None


def input_in_block(block: nn.Module, call: Call, h: torch.Tensor, module: nn.Module):
    """The first input of ``module`` when ``block`` runs on ``h`` (the block stops there)."""
    return first_input(module, lambda: call.run(block, h))


@torch.no_grad()
def shared_inputs(block: nn.Module, call: Call, h: torch.Tensor, modules: dict[str, nn.Module]):
    """Run ``block`` once: every module (by path) gets the index of the first module, in call order, that
    received the very same input tensor (the q/k/v projections of one normalised state, gate and up), and
    the block's output hidden state is returned with them."""
    seen: list = []
    group: dict[str, int] = {}

    def hook(mod, inputs, path):
        x = inputs[0]
        for j, y in enumerate(seen):
            if y is x:
                group[path] = j
                return
        seen.append(x)
        group[path] = len(seen) - 1

    hds = [m.register_forward_pre_hook(lambda mod, inp, p=p: hook(mod, inp, p)) for p, m in modules.items()]
    try:
        out = hidden_of(call.run(block, h))
    finally:
        for hd in hds:
            hd.remove()
    return group, out


# --------------------------------------------------------------------------- sensitivities, block by block
class NotChained(Exception):
    """The block-wise backward cannot reproduce the whole model's (the message says why)."""


def _with_hidden(out, h: torch.Tensor):
    """``out`` (a block's output) with its hidden state (:func:`hidden_of`) replaced by ``h``."""
    if isinstance(out, torch.Tensor):
        return h
    if isinstance(out, tuple) and not hasattr(out, "_fields"):
        return (h, *out[1:])
    if isinstance(out, list):
        return [h, *out[1:]]
    keys = getattr(out, "keys", None)
    if callable(keys) and list(keys()):  # a transformers ModelOutput: its first field
        out[list(keys())[0]] = h
        return out
    raise NotChained(f"a block's output ({type(out).__name__}) cannot carry a replaced hidden state")


def sensitivity_by_block(model: nn.Module, blocks: list[str], sites: list, batches: list, probes: int = 1,
                         seed: int = 0, module_of=None, metric=None, mask_of=lambda batch: None) -> dict[str, float]:
    """The gains of :func:`sketchpass.fx.observe.sensitivity`, with one block's backward at a time.

    Per batch, one forward of the model without the blocks' graphs: each block runs on a detached copy of its
    input (which is kept) and hands on a fresh leaf in place of its output hidden state, so only the layers
    before the first block and after the last one (the head: ``lm_head`` and the logits) keep a graph.  The
    probes' backward through the head gives the gradient at the last block's output; then each block, from the
    last to the first, runs again on its kept input with its layers perturbed, and one backward per probe takes
    the gradient on to its input (and gives its layers' gains); the layers before the first block get theirs
    from the gradient at the first block's input.  The probes are drawn in the same order as in the whole-model
    backward, so the gains are the same up to float rounding; memory holds one block's graph instead of the
    model's; the cost is one more forward of each block.  Raises :class:`NotChained` when that would not hold:
    a block called with a tensor that depends on a matched layer besides its hidden state (an encoder's output,
    a second stream one block hands the next: its graph would be cut), or the output reading a block's layers
    other than through the last block's hidden state (another block's hidden state; attention weights, router
    logits or hidden states a block gives or the model records — seen through a scalar perturbation of every
    block layer in the whole-model forward, whose gradient must not reach the output)."""
    metric = metric or Metric()
    module_of = module_of or (lambda s: s.dense)
    active = [s for s in sites if s.skip is None]
    if not active or not batches:
        return {s.name: 1.0 for s in active}
    where = {s.name: block_index(s.ref, blocks) for s in active}
    cur: dict = {"mask": None, "live": None}
    gains = Gains(active, probes)

    def make_hook(site):
        b = where[site.name]

        def hook(module, inputs, output):
            if not isinstance(output, torch.Tensor):
                raise NotChained(f"layer {site.name!r} gives a {type(output).__name__}, not a tensor")
            live = cur["live"]
            if live == "whole" and b is not None:
                # a block's layer in the whole-model forward: a scalar perturbation, only to see whether anything
                # but the block's hidden state (which is cut) carries the layer's output on
                z = torch.zeros((), dtype=output.dtype, device=output.device, requires_grad=True)
                box["fz"].append(z)
                return output + z
            if b != (None if live == "whole" else live):
                return None
            return gains.perturb(site, output, cur["mask"])

        return hook

    mods = [model.get_submodule(p) for p in blocks]
    box: dict = {}

    def pre(mod, args, kwargs, i):
        if not box["whole"]:  # a block run alone, in the backward pass
            return None
        call, h = Call.of(args, kwargs)
        if h is None:
            raise NotChained(f"block {blocks[i]!r} is called without a tensor hidden state")
        if any(t.requires_grad for t in output_tensors((call.args, call.kwargs))):
            raise NotChained(f"block {blocks[i]!r} is called with a tensor that depends on a matched layer "
                             "besides its hidden state (an encoder's output, a second stream a block hands on)")
        box["calls"][i] = call
        box["inputs"][i] = h.detach()
        if i == 0:
            box["h0"] = h  # with the graph of the layers before the blocks
        if args and args[0] is h:
            return (h.detach(), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h.detach()}

    def post(mod, args, kwargs, out, i):
        if not box["whole"]:
            return None
        h = hidden_of(out)
        if h is None:
            raise NotChained(f"block {blocks[i]!r} gives no tensor hidden state")
        leaf = h.detach().requires_grad_(True)
        box["leaves"][i] = leaf
        return _with_hidden(out, leaf)

    handles = [module_of(s).register_forward_hook(make_hook(s)) for s in active]
    for i, m in enumerate(mods):
        handles.append(m.register_forward_pre_hook(lambda mod, a, k, i=i: pre(mod, a, k, i), with_kwargs=True))
        handles.append(m.register_forward_hook(lambda mod, a, k, o, i=i: post(mod, a, k, o, i), with_kwargs=True))
    gen = torch.Generator().manual_seed(seed)
    try:
        with frozen(model):
            for batch in batches:
                _one_batch(model, blocks, mods, batch, metric, mask_of(batch), gen, gains, cur, box)
    finally:
        for hd in handles:
            hd.remove()
    return gains.result(active)


def _one_batch(model, blocks, mods, batch, metric, mask, gen, gains, cur, box) -> None:
    """One batch of :func:`sensitivity_by_block` (its hooks in place, the weights frozen): the whole-model forward,
    the probes' backward through the head, each block's backward from the last to the first, and the layers'
    before the first block."""
    zs, probes, last = gains.zs, gains.probes, len(mods) - 1
    zs.clear()
    box.update(calls=[None] * len(mods), inputs=[None] * len(mods), leaves=[None] * len(mods), h0=None, fz=[])
    cur.update(mask=mask, live="whole")
    box["whole"] = True
    try:
        with torch.enable_grad():
            outs = metric.outputs(_tensors(call_model(model, batch)))
    finally:
        box["whole"] = False
        cur["live"] = None
    if not outs:
        raise ValueError("the model output has no floating-point tensor to measure sensitivity on")
    if any(c is None for c in box["calls"]):
        raise NotChained("not every block ran")
    gains.fsq += sum(metric.scale(o, mask) for o in outs)
    counts = {n: len(z) for n, z in zs.items()}  # the layers outside the blocks (before the first, after the last)
    oz = [z for n in counts for z in zs[n]]
    leaves, fz = box["leaves"], box["fz"]
    outs = [o for o in outs if o.requires_grad]
    n_probes = probes if outs else 0
    prefix = box["h0"] is not None and box["h0"].requires_grad and bool(oz)
    ograds: list[list] = []  # per probe: the gradient at each outside perturbation
    g: list = []  # per probe: the gradient at the current block's output
    for p in range(n_probes):
        v = [metric.probe(o, gen, mask) for o in outs]
        grads = torch.autograd.grad(outs, oz + leaves + fz, grad_outputs=v, allow_unused=True,
                                    retain_graph=prefix or p < n_probes - 1)
        if any(t is not None and bool(t.any()) for t in grads[len(oz):len(oz) + last]):
            raise NotChained("the model's output reads the hidden state of a block other than the last")
        if any(t is not None for t in grads[len(oz) + len(leaves):]):
            raise NotChained("the model's output reads a block's layers through something else than the hidden "
                             "state the next block gets (attention weights, router logits, hidden states it records)")
        ograds.append(list(grads[:len(oz)]))
        gl = grads[len(oz) + last]
        g.append(torch.zeros_like(leaves[last]) if gl is None else gl)
    del outs, leaves, fz
    box["leaves"] = box["fz"] = None
    for i in range(last, -1, -1):
        zs.clear()
        cur["live"] = i
        h = box["inputs"][i].requires_grad_(True)
        with torch.enable_grad():
            out = hidden_of(box["calls"][i].run(mods[i], h))
        cur["live"] = None
        inner = {n: len(z) for n, z in zs.items()}
        bz = [z for n in inner for z in zs[n]]
        if out is None or not n_probes:
            continue
        if out.shape != g[0].shape:
            raise NotChained(f"block {blocks[i]!r} run again gives a hidden state of another shape")
        for p in range(n_probes):
            if not out.requires_grad:
                g[p] = torch.zeros_like(h)
                continue
            grads = torch.autograd.grad(out, bz + [h], grad_outputs=g[p], allow_unused=True,
                                        retain_graph=p < n_probes - 1)
            gains.add(inner, grads[:-1])
            g[p] = torch.zeros_like(h) if grads[-1] is None else grads[-1]
        box["inputs"][i] = None
        del out, h
    if prefix:
        for p in range(n_probes):
            more = torch.autograd.grad(box["h0"], oz, grad_outputs=g[p], allow_unused=True, retain_graph=True)
            ograds[p] = [a if b is None else (b if a is None else a + b) for a, b in zip(ograds[p], more)]
    for p in range(n_probes):
        gains.add(counts, ograds[p])
    box["h0"] = None
