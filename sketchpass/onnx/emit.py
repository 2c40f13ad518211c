"""Emit factor tensors and nodes into an onnx-graphsurgeon graph, and verify the result.

**U storage** (``u_storage=``).  Rademacher sketches are ``±1/√k``; the ``1/√k`` and the ``1/(2l)`` of
SK layers are folded into the trainable factors (``S1·c1/(2l)``, ``S2·c2/(2l)``), so the sketches are
emitted as exact ``±1`` matrices:

* ``"float"`` (default) — ``±1`` in the weight's dtype, as initializers (for Linear forms the ``±1``
  block is concatenated offline with its ``S`` into one initializer per MatMul/Gemm);
* ``"int8"`` — ``±1`` int8 initializers and a ``Cast`` to the weight dtype (4× smaller than float32);
  Linear forms ``Concat`` the cast block with ``S`` in the graph;
* ``"bits"`` — one bit per entry: a packed ``uint8`` initializer (``numpy.packbits``, big-endian bit
  order) unpacked in the graph with arithmetic only — ``Cast``, ``Mul``, ``Floor``, ``Sub``,
  ``Reshape``, ``Slice`` (every bit ``b_j = ⌊p/2^j⌋ − 2⌊p/2^{j+1}⌋``, value ``2b − 1``) — 32× smaller
  than float32, so the file tracks the effective parameters.  The unpacking depends on constants
  only, so runtimes fold it when they load the model.

Gaussian sketches are not ``±1``: they are always emitted as floats (``int8``/``bits`` raise).

Verified on: ONNX Runtime (CPU) for all three options, by the tests in ``tests/test_onnx_pass.py``.
TensorRT is not available on the machine this was built on, so it is unverified there; ``"float"``
and ``"int8"`` use only Conv/MatMul/Gemm/Add/Cast/Concat; ``"bits"`` also Floor/Mul/Sub/Slice/Reshape.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..options import U_STORAGE  # noqa: E402

_counter = itertools.count()


class Emitter:
    """Makes uniquely named constants and nodes in ``graph`` (names prefixed by the layer name)."""

    def __init__(self, graph: gs.Graph, dtype: np.dtype, storage: str = "float", names: set[str] | None = None,
                 opset: int | None = None):
        if storage not in U_STORAGE:
            raise ValueError(f"u_storage must be one of {U_STORAGE}, got {storage!r}")
        self.graph, self.dtype, self.storage = graph, np.dtype(dtype), storage
        self.opset = int(opset if opset is not None else graph.opset or 0)
        # names already taken (shared between the emissions into one model, so that they stay unique)
        self.names = names if names is not None else (set(graph.tensors().keys())
                                                      | {n.name for n in graph.nodes if n.name})

    def unique(self, name: str) -> str:
        base, i = name, 1
        while name in self.names:
            i += 1
            name = f"{base}_{i}"
        self.names.add(name)
        return name

    def const(self, name: str, values: np.ndarray, dtype=None) -> gs.Constant:
        return gs.Constant(self.unique(name), np.ascontiguousarray(values.astype(dtype or self.dtype)))

    def var(self, name: str, dtype=None) -> gs.Variable:
        return gs.Variable(self.unique(name), dtype=dtype or self.dtype)

    def node(self, op: str, name: str, inputs, outputs, **attrs) -> gs.Node:
        n = gs.Node(op, name=self.unique(name), attrs=attrs, inputs=list(inputs), outputs=list(outputs))
        self.graph.nodes.append(n)
        return n

    # ----------------------------------------------------------------- sketches
    def signs(self, name: str, pm1: np.ndarray) -> gs.Tensor:
        """A ``±1`` matrix as a tensor of the weight dtype, stored as ``self.storage`` says."""
        if self.storage == "float":
            return self.const(name, pm1)
        if self.storage == "int8":
            raw = self.const(f"{name}.int8", pm1, np.int8)
            out = self.var(name)
            self.node("Cast", f"{name}/Cast", [raw], [out], to=_onnx_type(self.dtype))
            return out
        return self._unpack(name, pm1)

    def _unpack(self, name: str, pm1: np.ndarray) -> gs.Tensor:
        """Packed bits (1 = +1) → ``±1`` of the weight dtype, with arithmetic ops only."""
        bits = (pm1.reshape(-1) > 0).astype(np.uint8)
        packed = np.packbits(bits)  # big-endian: bit 7 of byte 0 is element 0
        n = bits.size
        p = self.const(f"{name}.bits", packed.reshape(-1, 1), np.uint8)
        f = self.var(f"{name}/bytes", np.float32)
        self.node("Cast", f"{name}/Cast", [p], [f], to=onnx.TensorProto.FLOAT)
        # element j of a byte (big-endian) is bit 7-j: b = floor(p / 2^(7-j)) - 2 floor(p / 2^(8-j))
        inv_lo = self.const(f"{name}/inv_lo", (2.0 ** -np.arange(7, -1, -1)).reshape(1, 8), np.float32)
        inv_hi = self.const(f"{name}/inv_hi", (2.0 ** -np.arange(8, 0, -1)).reshape(1, 8), np.float32)
        lo, hi, flo, fhi = (self.var(f"{name}/{t}", np.float32) for t in ("lo", "hi", "flo", "fhi"))
        self.node("Mul", f"{name}/Mul_lo", [f, inv_lo], [lo])
        self.node("Mul", f"{name}/Mul_hi", [f, inv_hi], [hi])
        self.node("Floor", f"{name}/Floor_lo", [lo], [flo])
        self.node("Floor", f"{name}/Floor_hi", [hi], [fhi])
        two = self.const(f"{name}/two", np.array(2.0), np.float32)
        one = self.const(f"{name}/one", np.array(1.0), np.float32)
        t2, b, b2, pm = (self.var(f"{name}/{t}", np.float32) for t in ("t2", "b", "b2", "pm"))
        self.node("Mul", f"{name}/Mul_2hi", [fhi, two], [t2])
        self.node("Sub", f"{name}/Sub_bit", [flo, t2], [b])
        self.node("Mul", f"{name}/Mul_2b", [b, two], [b2])
        self.node("Sub", f"{name}/Sub_pm", [b2, one], [pm])
        flat_shape = self.const(f"{name}/flat", np.array([-1]), np.int64)
        flat = self.var(f"{name}/flatv", np.float32)
        self.node("Reshape", f"{name}/Reshape_flat", [pm, flat_shape], [flat])
        if packed.size * 8 != n:
            starts, ends = self.const(f"{name}/s0", np.array([0]), np.int64), self.const(f"{name}/s1",
                                                                                            np.array([n]), np.int64)
            cut = self.var(f"{name}/cut", np.float32)
            self.node("Slice", f"{name}/Slice", [flat, starts, ends], [cut])
            flat = cut
        shape = self.const(f"{name}/shape", np.array(pm1.shape), np.int64)
        shaped = self.var(f"{name}/shaped", np.float32)
        self.node("Reshape", f"{name}/Reshape", [flat, shape], [shaped])
        if self.dtype == np.float32:
            return shaped
        out = self.var(name)
        self.node("Cast", f"{name}/Cast_out", [shaped], [out], to=_onnx_type(self.dtype))
        return out

    def concat(self, name: str, parts: list[np.ndarray | tuple[str, np.ndarray]], axis: int) -> gs.Tensor:
        """Concatenate float blocks and ``("signs", ±1)`` blocks along ``axis``: offline for float storage,
        with a ``Concat`` node otherwise."""
        if self.storage == "float":
            return self.const(name, np.concatenate([p[1] if isinstance(p, tuple) else p for p in parts], axis))
        tensors = [self.signs(f"{name}.U", p[1]) if isinstance(p, tuple) else self.const(f"{name}.S", p)
                   for p in parts]
        out = self.var(name)
        self.node("Concat", f"{name}/Concat", tensors, [out], axis=axis)
        return out


def _onnx_type(dtype: np.dtype) -> int:
    return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
