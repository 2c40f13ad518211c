"""Graph plumbing of the torch rewrite: swapping modules by path, and running an fx graph in segments for
the sequential refit (the math of the refit is in :mod:`sketchpass.sketch.refit`, the stages in
:mod:`sketchpass.pipeline`).

**Lock-step segments.**  The refit needs, at each boundary (the first node of the next layers to fit),
the values that are live there in two streams: the original model and the model whose earlier layers
are already compressed.  :class:`Segments` runs the graph's nodes from one boundary to the next for both
streams of one batch, node by node; while a node's inputs are the very same objects in both streams and
its module is not replaced, it runs once and both streams share the result (true until the first
compressed layer, and for every branch that does not depend on one).  Before the streams run a node
separately, any input they still share is cloned for the compressed stream, so an in-place op
(``relu_``, ``+=``) in one can never change the other.  Values are dropped after their last use, so an
environment holds exactly the values live at its boundary; it is keyed by node name so that it can be
written to disk between steps (:class:`~sketchpass.store.Store`).
"""

from __future__ import annotations

import torch
import torch.fx
from torch import nn


def set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, attr, new)


def placeholder_values(gm: torch.fx.GraphModule, batch) -> dict[str, object]:
    """The value of every placeholder of ``gm`` for one calibration batch (tensor, tuple or dict)."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    vals = {}
    if isinstance(batch, torch.Tensor):
        batch = (batch,)
    if isinstance(batch, dict):
        for n in phs:
            key = n.target.lstrip("*")
            if key in batch:
                vals[n.name] = batch[key]
            elif n.args:
                vals[n.name] = n.args[0]
            else:
                raise ValueError(f"calibration batch has no value for model input {key!r} (keys: {sorted(batch)})")
        return vals
    batch = list(batch)
    for i, n in enumerate(phs):
        if i < len(batch):
            vals[n.name] = batch[i]
        elif n.args:
            vals[n.name] = n.args[0]
        else:
            raise ValueError(f"calibration batch has {len(batch)} inputs but the model needs {n.target!r} too")
    return vals


class Segments:
    """Runs ``gm``'s nodes between boundaries for both streams (see module docstring).

    ``replaced`` maps module paths to the compressed stream's modules (filled as layers are fitted)."""

    def __init__(self, gm: torch.fx.GraphModule, replaced: dict[str, nn.Module]):
        self.gm = gm
        self.nodes = [n for n in gm.graph.nodes if n.op != "output"]
        self.index = {n.name: i for i, n in enumerate(self.nodes)}
        self.last: dict[str, int] = {}
        for i, n in enumerate(gm.graph.nodes):
            for a in n.all_input_nodes:
                self.last[a.name] = i
        self.replaced = replaced
        self.bounds: list[int] = []

    def first_call(self, path: str) -> int:
        for i, n in enumerate(self.nodes):
            if n.op == "call_module" and n.target == path:
                return i
        raise KeyError(f"module {path!r} is not called in the graph")

    def plan_steps(self, paths: list[str]) -> list[list[int]]:
        """Group layers (by module path) into steps: a layer joins the current step when all the inputs of
        its first call are computed before the step's boundary.  Returns the member indices per step."""
        calls = sorted(range(len(paths)), key=lambda i: self.first_call(paths[i]))
        steps: list[list[int]] = []
        self.bounds = []
        for i in calls:
            idx = self.first_call(paths[i])
            node = self.nodes[idx]
            if steps and all(self.index[a.name] < self.bounds[-1] for a in node.all_input_nodes):
                steps[-1].append(i)
            else:
                steps.append([i])
                self.bounds.append(idx)
        return steps

    def input_name(self, path: str) -> str:
        node = self.nodes[self.first_call(path)]
        arg = node.args[0] if node.args else next(iter(node.kwargs.values()))
        return arg.name

    # ----------------------------------------------------------------- running
    def start(self, batch) -> tuple[dict, dict]:
        vals = placeholder_values(self.gm, batch)
        env = dict(vals)
        pair = (env, dict(env))  # same objects: nothing differs yet
        return self.run(0, self.bounds[0] if self.bounds else len(self.nodes), pair)

    def advance(self, step: int, pair):
        hi = self.bounds[step + 1] if step + 1 < len(self.bounds) else len(self.nodes)
        return self.run(self.bounds[step], hi, pair)

    def _value(self, node, env):
        args = torch.fx.node.map_arg(node.args, lambda n: env[n.name])
        kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: env[n.name])
        return args, kwargs

    def _exec(self, node, env, module=None):
        if node.op == "placeholder":
            return env[node.name]
        if node.op == "get_attr":
            obj = self.gm
            for part in node.target.split("."):
                obj = getattr(obj, part)
            return obj
        args, kwargs = self._value(node, env)
        if node.op == "call_module":
            return (module or self.gm.get_submodule(node.target))(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        raise RuntimeError(f"unexpected node {node.op}")

    @torch.no_grad()
    def run(self, lo: int, hi: int, pair):
        env_o, env_n = pair
        for i in range(lo, hi):
            node = self.nodes[i]
            if node.op == "placeholder":
                continue
            new = self.replaced.get(node.target) if node.op == "call_module" else None
            inputs = [a.name for a in node.all_input_nodes]
            if new is None and all(env_n[a] is env_o[a] for a in inputs):
                env_o[node.name] = env_n[node.name] = self._exec(node, env_o)
            else:
                for a in inputs:  # the compressed stream gets its own copy of anything still shared
                    v = env_n[a]
                    if v is env_o[a] and isinstance(v, torch.Tensor):
                        env_n[a] = v.clone()
                env_o[node.name] = self._exec(node, env_o)
                env_n[node.name] = self._exec(node, env_n, module=new)
            for a in inputs:
                if self.last.get(a) == i:
                    env_o.pop(a, None)
                    env_n.pop(a, None)
        return env_o, env_n
