"""Run an ONNX graph in segments through ONNX Runtime, for the sequential refit (graph plumbing only).

The refit needs, at each boundary (the node of the next layers to fit, in topological order), the
tensors live there in two streams: the original model and the model whose earlier layers are already
compressed.  A segment is the nodes between two boundaries, as its own small model whose inputs are
the tensors it reads from the frontier and whose outputs are the tensors it makes that are still needed
after it; each stream's segment runs in its own ORT session, one batch at a time.  Tensors the segment
does not touch are carried over as they are, and a compressed-stream result that equals the original's
bit for bit is replaced by the original array, so the two streams keep sharing what no compressed layer
has changed (a layer whose inputs are shared is then refitted to exactly its original weight).

Node ``i`` of the compressed stream is a group of nodes: the original node, or the nodes that replace
it (:func:`sketchpass.onnx.rewrite.emit_protos`); the replacement keeps the node's input and output
tensor names, so both streams have the same frontier names.
"""

from __future__ import annotations

import numpy as np
import onnx

from .observe import session


def _subgraphs(n: onnx.NodeProto):
    for a in n.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            yield from a.graphs


def _subgraph_refs(g: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from the enclosing scope (used but not defined inside it)."""
    defined = {i.name for i in g.input} | {t.name for t in g.initializer}
    for n in g.node:
        defined.update(n.output)
    used = {o.name for o in g.output}
    for n in g.node:
        used |= node_reads(n)
    return used - defined


def node_reads(n: onnx.NodeProto) -> set[str]:
    """The tensors node ``n`` reads: its inputs and what its subgraphs read from outside them."""
    out = {i for i in n.input if i}
    for g in _subgraphs(n):
        out |= _subgraph_refs(g)
    return out


class Segments:
    """The two streams of one model, cut at boundaries (see module docstring)."""

    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.model = model
        self.nodes = list(g.node)
        self.inits = {t.name: t for t in g.initializer}
        self.producer: dict[str, int] = {}
        for i, n in enumerate(self.nodes):
            for o in n.output:
                if o:
                    self.producer[o] = i
        self.reads = [node_reads(n) for n in self.nodes]
        end = len(self.nodes)
        self.last: dict[str, int] = {}
        for i, r in enumerate(self.reads):
            for name in r:
                self.last[name] = i
        for o in g.output:
            self.last[o.name] = end
        self.groups: list[list[onnx.NodeProto]] = [[n] for n in self.nodes]
        self.extra: dict[str, onnx.TensorProto] = {}
        self.bounds: list[int] = []
        self._sessions: dict = {}

    def index_of(self, output_name: str) -> int:
        return self.producer[output_name]

    def topological(self) -> bool:
        seen = {i.name for i in self.model.graph.input} | set(self.inits)
        for n, r in zip(self.nodes, self.reads):
            if any(x not in seen and x in self.producer for x in r):
                return False
            seen.update(n.output)
        return True

    # ----------------------------------------------------------------- steps
    def plan_steps(self, outputs: list[str], inputs: list[str]) -> list[list[int]]:
        """Group layers (by their output and input tensor names) into steps: a layer joins the current
        step when its input is computed before the step's boundary.  Returns member indices per step."""
        order = sorted(range(len(outputs)), key=lambda i: self.producer[outputs[i]])
        steps: list[list[int]] = []
        self.bounds = []
        for i in order:
            idx = self.producer[outputs[i]]
            src = self.producer.get(inputs[i], -1)
            if steps and src < self.bounds[-1]:
                steps[-1].append(i)
            else:
                steps.append([i])
                self.bounds.append(idx)
        return steps

    def replace(self, index: int, nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto]) -> None:
        self.groups[index] = nodes
        for t in inits:
            self.extra[t.name] = t
        self._sessions = {k: v for k, v in self._sessions.items() if k[0] == "o"}  # compressed ones are stale

    # ----------------------------------------------------------------- running
    def _live_after(self, b: int, env: dict) -> dict:
        return {k: v for k, v in env.items() if self.last.get(k, -1) >= b}

    def _segment(self, stream: str, lo: int, hi: int, feed_types: dict):
        key = (stream, lo, hi)
        if key in self._sessions:
            return self._sessions[key]
        # one segment is run for every batch before the next: keep only its sessions (bounded memory)
        self._sessions = {k: v for k, v in self._sessions.items() if k[1:] == (lo, hi)}
        nodes = [n for i in range(lo, hi) for n in (self.groups[i] if stream == "n" else [self.nodes[i]])]
        made: set[str] = set()
        reads: set[str] = set()
        for n in nodes:
            reads |= node_reads(n) - made
            made.update(o for o in n.output if o)
        inits = {**self.inits, **(self.extra if stream == "n" else {})}
        ins = sorted(r for r in reads if r not in inits and r not in made)
        outs = sorted(o for o in made if self.last.get(o, -1) >= hi)
        g = onnx.GraphProto()
        g.name = f"segment_{lo}_{hi}"
        g.node.extend(nodes)
        for name in ins:
            g.input.append(onnx.helper.make_tensor_value_info(name, feed_types[name], None))
        for name in outs:
            vi = onnx.ValueInfoProto()
            vi.name = name  # no type: ORT infers it
            g.output.append(vi)
        g.initializer.extend(inits[r] for r in sorted(reads) if r in inits)
        m = onnx.ModelProto()
        m.ir_version = max(self.model.ir_version, 4)
        m.opset_import.extend(self.model.opset_import)
        m.functions.extend(self.model.functions)
        m.graph.CopyFrom(g)
        entry = (session(m), ins, outs)
        self._sessions[key] = entry
        return entry

    def _run(self, stream: str, lo: int, hi: int, env: dict) -> dict:
        if lo >= hi:
            return self._live_after(hi, env)
        types = {k: onnx.helper.np_dtype_to_tensor_dtype(v.dtype) for k, v in env.items()}
        sess, ins, outs = self._segment(stream, lo, hi, types)
        missing = [n for n in ins if n not in env]
        if missing:
            raise RuntimeError(f"refit segment {lo}..{hi} needs {missing[:3]} which no earlier segment produced")
        res = sess.run(outs, {n: env[n] for n in ins}) if outs else []
        out = self._live_after(hi, env)
        out.update(zip(outs, res))
        return out

    def start(self, feed: dict) -> tuple[dict, dict]:
        env = self._run("o", 0, self.bounds[0] if self.bounds else len(self.nodes), dict(feed))
        return env, dict(env)

    def advance(self, step: int, pair) -> tuple[dict, dict]:
        lo = self.bounds[step]
        hi = self.bounds[step + 1] if step + 1 < len(self.bounds) else len(self.nodes)
        env_o, env_n = pair
        new_o = self._run("o", lo, hi, env_o)
        new_n = self._run("n", lo, hi, env_n)
        for k, v in new_n.items():  # keep sharing what no compressed layer changed
            o = new_o.get(k)
            if o is not None and o is not v and o.shape == v.shape and o.dtype == v.dtype and np.array_equal(o, v):
                new_n[k] = o
        return new_o, new_n

    def spliced(self) -> list[onnx.NodeProto]:
        """The compressed stream's nodes, in order."""
        return [n for grp in self.groups for n in grp]
