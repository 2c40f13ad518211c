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

from ..batches import call_model


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
