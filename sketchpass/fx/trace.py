"""Capture a PyTorch model for the pass: a torch.fx ``GraphModule`` when symbolic tracing works, else
a deep copy of the model whose layers are swapped by name (said in the plan).

The input model is never modified: tracing copies parameters by reference, so we trace a deep copy.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.fx
from torch import nn

from ..batches import slice_batch
from .experts import unfuse


@dataclass
class Captured:
    """The working copy the pass calibrates and rewrites."""

    model: nn.Module  # a GraphModule (capture == "fx") or a deep copy of the input ("modules")
    capture: str  # "fx" | "modules"
    notes: list[str] = field(default_factory=list)
    functional: bool = False  # F.linear / F.conv / matmul uses were turned into modules (needs the graph)
    transposed: list[str] = field(default_factory=list)  # paths of transposed-weight linears made nn.Linear
    routed: list[str] = field(default_factory=list)  # paths of fused experts taken apart (:mod:`.experts`)

    @property
    def graph(self) -> torch.fx.Graph | None:
        return self.model.graph if isinstance(self.model, torch.fx.GraphModule) else None


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict) or (hasattr(out, "values") and callable(out.values)):
        return [t for v in out.values() for t in _flat(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _flat(v)]
    return []


def _reproduces(gm: nn.Module, model: nn.Module, example) -> str | None:
    """``None`` if the traced graph gives the model's outputs on ``example``, else why not.

    fx records one path through Python control flow (``if x is None``, shape checks, ...); running it
    once against the original catches graphs that silently specialised on something else."""
    from ..batches import call_model

    try:
        with torch.no_grad():
            ref, got = _flat(call_model(model, example)), _flat(call_model(gm, example))
    except Exception as exc:  # noqa: BLE001 - any failure means the graph is unusable
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''}"
    if len(ref) != len(got) or any(a.shape != b.shape or not torch.allclose(a, b, rtol=1e-4, atol=1e-5)
                                   for a, b in zip(ref, got)):
        return "its outputs differ from the model's"
    return None


def is_transposed_linear(mod: nn.Module) -> bool:
    """A linear layer that stores its weight transposed, ``(in, out)``, and computes ``x @ W + b``: the
    ``Conv1D`` of Hugging Face ``transformers`` (GPT-2, GPT, ...), recognised by its shape contract rather
    than imported, so that ``transformers`` stays optional."""
    w = getattr(mod, "weight", None)
    return (type(mod).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2
            and getattr(mod, "nf", None) == w.shape[1] and getattr(mod, "nx", w.shape[0]) == w.shape[0])


def linearise(work: nn.Module) -> tuple[list[str], list[str]]:
    """Replace, in the working copy, every transposed-weight linear (:func:`is_transposed_linear`) whose
    weight is not shared with an equivalent ``nn.Linear`` holding the transposed weight (the same function,
    so every later stage deals with ``nn.Linear`` only).  Returns the replaced paths and notes."""
    owners: dict[int, int] = {}
    for _, mod in work.named_modules(remove_duplicate=False):
        for p in mod.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    done, notes, kinds = [], [], set()
    for path, mod in list(work.named_modules()):
        if not path or not is_transposed_linear(mod):
            continue
        if owners.get(id(mod.weight), 0) > 1:
            notes.append(f"{path}: its transposed weight is shared with another module (tied weights); kept as is")
            continue
        bias = getattr(mod, "bias", None)
        lin = nn.Linear(mod.weight.shape[0], mod.weight.shape[1], bias=bias is not None, device="meta")
        lin.weight = nn.Parameter(mod.weight.detach().t().contiguous(), requires_grad=mod.weight.requires_grad)
        if bias is not None:
            lin.bias = bias
        lin.train(mod.training)
        kinds.add(type(mod).__name__)
        parent_path, _, attr = path.rpartition(".")
        setattr(work.get_submodule(parent_path) if parent_path else work, attr, lin)
        done.append(path)
    if done:
        notes.append(f"{len(done)} {'/'.join(sorted(kinds))} layer(s) with transposed weights (x @ W + b, as in "
                     "transformers' GPT-2 family) matched as linear layers; those kept dense are emitted as they were")
    return done, notes


# torch.nn modules that fx keeps as leaves (one call_module node) although they hold nn.Linear layers of their own
# that a graph traced through them calls as modules; nn.MultiheadAttention stays a leaf (its projections are read
# through their weights, not called: kept dense, SkipReason.ATTENTION_INTERNAL)
TRACED_THROUGH = (nn.Transformer, nn.TransformerEncoder, nn.TransformerEncoderLayer, nn.TransformerDecoder,
                  nn.TransformerDecoderLayer)


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return False if isinstance(m, TRACED_THROUGH) else super().is_leaf_module(m, qualname)


def _trace(work: nn.Module) -> torch.fx.GraphModule:
    tracer = _Tracer()
    graph = tracer.trace(work)
    return torch.fx.GraphModule(tracer.root, graph, type(work).__name__)


def fast_path_off(model: nn.Module) -> int:
    """Turn off the fused inference path of every ``nn.TransformerEncoderLayer`` of ``model``; how many.  That path
    (eval mode, no autograd) reads ``linear1``/``linear2``'s weights and calls a fused kernel instead of the
    modules: the pass would not see them, and a factored layer there would not run (its weight property would be
    materialised each call).  The layer's own slow path computes the same function.  The encoders' nested-tensor
    path is off too (``enable_nested_tensor``: with a padding mask the layers would get a nested tensor of the real
    tokens, which the pass cannot observe); the layers then compute every position, the real ones as before."""
    layers = [m for m in model.modules() if isinstance(m, nn.TransformerEncoderLayer)]
    for mod in layers:
        mod.activation_relu_or_gelu = False  # one of the conditions the fast path requires
    for mod in model.modules():
        if isinstance(mod, nn.TransformerEncoder):
            mod.use_nested_tensor = False
    return len(layers)


def capture(model: nn.Module, mode: str = "auto", example=None, share: bool = False) -> Captured:
    """``mode``: ``"auto"`` (fx, falling back to modules), ``"fx"`` (fail if it cannot trace) or
    ``"modules"``.  With an ``example`` batch the traced graph is checked against the model.  The working copy
    is a copy of ``model``'s modules; with ``share`` it holds ``model``'s very tensors (the pass reads them and
    never writes one, so it holds the weights once) and whatever hands a model back must copy those it keeps
    (:meth:`sketchpass.fx.frontend.TorchFrontend.stamp`); without, a deep copy."""
    if mode not in ("auto", "fx", "modules"):
        raise ValueError(f"capture must be 'auto', 'fx' or 'modules', got {mode!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, an onnx.ModelProto or a path to an .onnx file; got "
                        f"{type(model).__name__}")
    work = copy.deepcopy(model, {id(t): t for t in (*model.parameters(), *model.buffers())} if share else None)
    fused = fast_path_off(work)  # the working copy calls every layer as a module, so the pass sees them
    transposed, tnotes = linearise(work)
    routed, enotes = unfuse(work)
    tnotes += enotes
    if fused:
        tnotes.append(f"{fused} nn.TransformerEncoderLayer(s): their fused inference path (which reads "
                      "linear1/linear2's weights instead of calling them) is off in the pass, and in the compressed "
                      "model where one of them is factored")
    cap = _capture(model, work, mode, example)
    cap.transposed = transposed
    cap.routed = routed
    cap.notes = tnotes + cap.notes
    return cap


def _capture(model: nn.Module, work: nn.Module, mode: str, example) -> Captured:
    if mode == "modules":
        return Captured(work, "modules", ["capture='modules': layers swapped by name (no fx graph)"])
    if isinstance(work, torch.fx.GraphModule):
        return Captured(work, "fx")
    try:
        gm = _trace(work)
    except Exception as exc:  # fx raises many kinds (TraceError, TypeError, NotImplementedError, ...)
        if mode == "fx":
            raise ValueError(f"torch.fx cannot trace {type(model).__name__}: {type(exc).__name__}: {exc}") from exc
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        return Captured(work, "modules", [
            f"torch.fx could not trace {type(model).__name__} ({type(exc).__name__}: {first}); fell back to "
            "swapping nn.Linear/nn.Conv modules by name — functional F.linear/F.conv/matmul uses are not matched"])
    gm.train(work.training)
    if example is not None:
        was = work.training
        work.eval()
        gm.eval()
        why = _reproduces(gm, work, slice_batch(example, 2))  # two samples are enough to check the graph
        work.train(was)
        gm.train(was)
        if why is not None:
            if mode == "fx":
                raise ValueError(f"the torch.fx graph of {type(model).__name__} does not reproduce it on the "
                                 f"calibration data ({why})")
            return Captured(work, "modules", [
                f"the torch.fx graph of {type(model).__name__} does not reproduce it on the calibration data "
                f"({why}); fell back to swapping modules by name"])
    return Captured(gm, "fx")
