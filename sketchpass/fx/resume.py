"""Block runs that pause at each layer still to be fitted, for the block-chained sequential refit.

The refit fits a block's layers one step at a time, in call order, each on the inputs the already-fitted
layers produce.  Reaching a layer's input by running the block from its start again (:func:`.blocks.input_in_block`)
costs, per batch, one partial block forward per step: a Llama decoder layer has four steps (q/k/v, o,
gate/up, down), so its compressed stream ran about three blocks' worth of work where one would do.

A :class:`BlockRun` runs the compressed block once per batch instead, in a ``greenlet`` (a coroutine with
its own C stack, switched to and from in this thread): every layer of the block that is still to be fitted
has a *gate* in place of its ``forward``; a run that reaches a gate pauses there and hands the layer's input
to the refit; when the refit has fitted that layer and the run is resumed, the gate calls the fitted layer —
so the run continues exactly as a run from the block's start would, with every earlier layer in its fitted
form.  A run never passes a gate whose layer is not fitted yet (that layer's output would then be the dense
one, which a fresh run would not see): when the refit asks a run for something it cannot give without doing
so, or that it has already passed, the caller runs the block from its start as before.  The results are
therefore the very tensors the fresh runs give, bit for bit.

What runs in one thread also shares its thread-local state: the grad mode is saved and restored on every
switch (a run always sees ``no_grad``).  A paused run holds the block's intermediate tensors for its batch;
the caller bounds how many it keeps (``max_activation_mb``).
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable

import torch
from greenlet import getcurrent, greenlet
from torch import nn

from .blocks import Call, hidden_of

ENABLED = True  # off: every refit step runs the block from its start (the tests compare both)
MISS = object()  # what a run cannot give without passing a layer not yet fitted (or that it passed already)


class _Pause:
    __slots__ = ("path", "args")

    def __init__(self, path: str, args: tuple):
        self.path, self.args = path, args


class Gates:
    """Gates on the layers still to be fitted of one working copy: ``current(path)`` gives the module the
    working copy has at ``path`` now (the dense layer until it is fitted).  Removed by :meth:`remove`."""

    def __init__(self, current: Callable[[str], nn.Module]):
        self.current = current
        self._on: dict[str, tuple[nn.Module, object]] = {}  # path -> (the gated module, its own instance forward)

    def add(self, path: str, module: nn.Module) -> None:
        if path in self._on:
            return
        own = module.__dict__.get("forward", MISS)

        def gate(*args, **kwargs):
            run = BlockRun.active()
            if run is not None and path in run.waits:
                run.waits.discard(path)
                run.pause(path, args)
            target = self.current(path)
            if target is module:  # not replaced (kept dense this round): the layer itself
                return (type(module).forward.__get__(module) if own is MISS else own)(*args, **kwargs)
            return target(*args, **kwargs)

        module.forward = gate
        self._on[path] = (module, own)

    def __contains__(self, path: str) -> bool:
        return path in self._on

    def remove(self) -> None:
        for module, own in self._on.values():
            if own is MISS:
                module.__dict__.pop("forward", None)
            else:
                module.forward = own
        self._on.clear()


class _RunGreenlet(greenlet):
    """A greenlet that carries the :class:`BlockRun` it runs (``owner``)."""

    owner = None


class BlockRun:
    """``block`` run once on ``h`` with ``call``'s other inputs, pausing at the first call of every layer of
    ``waits`` (paths with a gate, see :class:`Gates`).  Made and driven from one thread (module docstring)."""

    def __init__(self, block: nn.Module, call: Call, h: torch.Tensor, waits: set[str], nbytes: int = 0):
        self.waits = set(waits)
        self.nbytes = nbytes  # the caller's estimate of what the paused run holds
        self.at: _Pause | None = None
        self.out = MISS
        self.done = False
        self._grad = False
        self._g = _RunGreenlet(lambda: hidden_of(call.run(block, h)))
        self._g.owner = self
        self._g.gr_context = contextvars.copy_context()

    @staticmethod
    def active() -> BlockRun | None:
        """The run executing now in this thread (the current greenlet's), if any: a gate reached by other code
        — another thread's pass, a run from the block's start — calls its layer as it stands."""
        return getattr(getcurrent(), "owner", None)

    def pause(self, path: str, args: tuple) -> None:
        """Called by a gate inside the run: hand ``args`` to the driver and wait to be resumed."""
        self._g.parent.switch(_Pause(path, args))

    def _switch(self, throw: bool = False):
        mine = torch.is_grad_enabled()
        torch.set_grad_enabled(self._grad)
        try:
            got = self._g.throw() if throw else self._g.switch()
        except BaseException:
            self.done, self.at = True, None
            raise
        finally:
            self._grad = torch.is_grad_enabled()
            torch.set_grad_enabled(mine)
        if isinstance(got, _Pause):
            self.at = got
        else:
            self.done, self.at, self.out = True, None, got
        return got

    def input_of(self, path: str, fitted: Callable[[str], bool]):
        """The first positional input of ``path``'s first call from here on (``None`` for a call with keyword
        arguments only), resuming past pauses at fitted layers; :data:`MISS` when the run would have to pass a
        layer not yet fitted, has finished, or passed ``path`` already."""
        while not self.done:
            if self.at is not None:
                if self.at.path == path:
                    return self.at.args[0] if self.at.args else None
                if not fitted(self.at.path):
                    return MISS
            self._switch()
        return MISS

    def output(self, fitted: Callable[[str], bool]):
        """The block's output hidden state (:func:`.blocks.hidden_of`), running to the end past fitted layers;
        :data:`MISS` when a layer on the way is not fitted yet."""
        while not self.done:
            if self.at is not None and not fitted(self.at.path):
                return MISS
            self._switch()
        return self.out

    def close(self) -> None:
        """Unwind a paused run (its frames and tensors are freed)."""
        if not self.done and self._g:  # started and not finished
            self._switch(throw=True)
        self.done, self.at = True, None
