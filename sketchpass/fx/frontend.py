"""The PyTorch frontend: the graph-specific steps of :mod:`sketchpass.pipeline` for an ``nn.Module``.

Capture (:mod:`.trace`): a torch.fx ``GraphModule`` when symbolic tracing works and reproduces the model on
the first calibration batch, else a deep copy whose layers are swapped by name ("modules"); matching
(:mod:`.match`); hooks for layer inputs, Hutchinson sensitivities and side-by-side runs (:mod:`.observe`);
the refit's lock-step segments (:mod:`.rewrite`).

In fx mode the sequential refit runs the graph from boundary to boundary (linear in the depth); in modules
mode there is no graph to cut, so every layer's inputs are captured by running the two models up to it
(the cost grows with the square of the depth) unless the layers sit in a stack of repeated blocks that can be
chained (:mod:`.blocks`) — the plan's notes say which mode was used, and why.
"""

from __future__ import annotations

import copy
from typing import Any, NamedTuple

import torch
import torch.fx
from torch import nn

from ..batches import (
    Calib,
    batch_size,
    call_model,
    channels_last_ok,
    check_batch,
    fingerprint,
    iter_batches,
    one_shot,
    slice_batch,
    to_channels_last,
    token_mask,
)
from ..metric import is_language_model
from ..metric import metric as metric_of
from ..options import Options
from ..pipeline import SensitivityUnavailable
from ..plan import Plan, SkipReason
from ..saved import attach_plan, drop_stale_quantizer
from ..site import LayerInput, Site
from ..store import Store, nbytes
from . import observe as fo
from . import resume
from .blocks import (
    Call,
    NotChained,
    block_index,
    check_chain,
    find_blocks,
    first_input,
    first_inputs,
    hidden_of,
    input_in_block,
    record_calls,
    sensitivity_by_block,
    shared_inputs,
    stop_at,
)
from .experts import RoutedExperts
from .match import find_sites
from .offload import gathered, hooked, real_tensors
from .rewrite import Segments, set_module
from .trace import capture


def _split(batch, n: int):
    """``(first n samples, the rest)`` of a torch batch."""
    size = batch_size(batch)

    def cut(t, sl):
        if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == size:
            return t[sl]
        return t

    def apply(sl):
        if isinstance(batch, torch.Tensor):
            return cut(batch, sl)
        if isinstance(batch, (tuple, list)):
            return type(batch)(cut(t, sl) for t in batch)
        return {k: cut(v, sl) for k, v in dict(batch).items()}

    return apply(slice(0, n)), apply(slice(n, None))


def _sharing_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules that shares its parameters and buffers: the compressed copy swaps modules,
    never writes a tensor, so the layers it keeps dense need no second copy of their weights."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


class _Pair(NamedTuple):
    """The last pair :meth:`TorchFrontend.site_inputs` returned, with what it was made from (holding its tensors,
    so that no ``is`` test below can meet a reused id)."""

    env: Any
    x: torch.Tensor
    xh: torch.Tensor
    group: tuple  # (the block's input group of the layer, original=)
    d_in: int
    pair: tuple


def unshare(result: nn.Module, user: nn.Module) -> int:
    """Give ``result`` its own copy of every parameter and buffer whose storage is one of ``user``'s (the dense
    layers, embeddings and norms the working copy shared), in place; tensors shared within ``result`` (tied
    weights) stay shared.  Returns how many tensors were copied."""
    theirs = {t.untyped_storage().data_ptr() for t in (*user.parameters(), *user.buffers()) if t.device.type != "meta"}
    copies: dict[int, torch.Tensor] = {}
    for mod in result.modules():
        for table in (mod._parameters, mod._buffers):
            for key, t in table.items():
                if t is None or t.device.type == "meta" or t.untyped_storage().data_ptr() not in theirs:
                    continue
                new = copies.get(id(t))
                if new is None:
                    new = t.detach().clone()
                    if isinstance(t, nn.Parameter):
                        new = nn.Parameter(new, requires_grad=t.requires_grad)
                    copies[id(t)] = new
                table[key] = new
    return len(copies)


def _has_module(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def _input_of(model: nn.Module, module: nn.Module, batch):
    """The first input of ``module`` when ``model`` runs on ``batch`` (the forward stops there)."""
    return first_input(module, lambda: call_model(model, batch))


class TorchFrontend:
    """See the module docstring and :class:`sketchpass.pipeline.Frontend`."""

    name = "torch"

    def __init__(self, model: nn.Module, o: Options, capture_mode: str | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected an nn.Module, an onnx.ModelProto or a path to an .onnx file; got "
                            f"{type(model).__name__}")
        self._offload_note = None
        self._owned = False  # self.model is the pass's own copy (its working copy may share its tensors)
        if hooked(model):  # accelerate-dispatched or offloaded: the pass works on a gathered CPU copy
            model, self._offload_note = gathered(model)
            self._owned = True
        real_tensors(model)
        self.model, self.o = model, o
        self.metric = metric_of("kl" if o.metric == "auto" and is_language_model(model) else
                                "mse" if o.metric == "auto" else o.metric)
        self.mode = capture_mode or o.capture
        self.cap = None
        self.capture = ""
        self.notes: list[str] = []
        self._sites: list[Site] = []
        self._channels_last = False
        self._data: Calib | None = None
        self._replaced: dict[str, nn.Module] = {}
        self._order: list[str] | None = None
        self._chain: list[str] | None = None
        self._group: dict[str, tuple[int, int]] = {}
        self._step_block: list[int | None] = []
        self._records: Store | None = None  # :meth:`_record`
        self._memo: _Pair | None = None  # the last pair site_inputs returned
        self._pending: dict[int, list[str]] = {}  # block -> the paths of its layers the refit fits (call order)
        self._runs: dict[int, tuple[int, resume.BlockRun]] = {}  # batch token -> (block, its paused run)
        self._gates: resume.Gates | None = None
        self._tokens = 0
        self.sensitivity_note: str | None = None  # how the sensitivities were measured (:meth:`sensitivities`)

    # ----------------------------------------------------------------- data and capture
    def calib(self, calib, o: Options) -> Calib:
        if not isinstance(calib, (torch.Tensor, dict, tuple, list)) and not hasattr(calib, "__iter__"):
            raise TypeError(f"calib must be a tensor, a tuple or dict of tensors, or an iterable of those (e.g. a "
                            f"DataLoader); got {type(calib).__name__}")
        single = isinstance(calib, (torch.Tensor, dict)) or (isinstance(calib, tuple) and all(
            isinstance(t, torch.Tensor) for t in calib))
        dtype = next((p.dtype for p in self.model.parameters() if torch.is_floating_point(p)), None)

        def open_batches(notes):
            for i, b in enumerate(iter_batches(calib)):
                yield check_batch(b, i, dtype, notes)

        self._data = Calib(open_batches, size=batch_size, split=_split, holdout=o.holdout,
                           max_batches=o.max_batches, reiterable=single or not one_shot(calib),
                           max_bytes=o.max_activation_mb * 2**20)
        return self._data

    def prepare(self, first) -> None:
        # the working copy holds the user's tensors (the pass never writes one): one copy of the weights in
        # memory; :meth:`stamp` copies those the result keeps
        self.cap = capture(self.model, self.mode, example=first, share=True)
        self.cap.model.eval()
        self.capture = self.cap.capture
        self._sites = find_sites(self.cap)
        for s in self._sites:  # an expert's inputs are the tokens routed to it (:mod:`.experts`)
            if any(s.ref.startswith(p + ".") for p in self.cap.routed):
                s.extra["routed"] = True
        self.notes = list(self.cap.notes) + ([self._offload_note] if self._offload_note else [])
        if self.cap.graph is not None:
            folded = self._batchnorms()
            if folded:
                self.notes.append(f"{folded} conv(s) followed by an inference-mode BatchNorm: their errors are "
                                  "weighed and measured after the BatchNorm (as in an export that folds it)")
        self._chain = None
        why = "blocks='off'" if self.o.blocks == "off" else "no calibration data"
        if first is not None:
            self._channels_last = channels_last_ok(self.cap.model, first)
            if self._channels_last and self._data is not None:  # the passes run faster in that layout
                self._data.prepare = to_channels_last
            if self.cap.capture == "modules":
                self._order = self._call_order(first)
                if self.o.blocks != "off":
                    self._chain, why = self._setup_chain(first)
        if self.cap.capture == "modules" and self._chain is None:
            self.notes.append(f"modules capture: the sequential refit runs the model up to every layer it fits, its "
                              f"cost growing with the square of the depth (block-chained refit off: {why})")

    def _setup_chain(self, first) -> tuple[list[str] | None, str | None]:
        """The repeated blocks the refit is chained over (:mod:`.blocks`), checked on the first batch; or
        ``None`` and why not (no stack of blocks holds the layers, or chaining them does not reproduce the
        model)."""
        paths = [s.ref for s in self._sites if s.skip is None]
        blocks = find_blocks(self.cap.model, paths)
        if blocks is None:
            return None, "no stack of repeated blocks (an nn.ModuleList of one class) holds its layers"
        parent = blocks[0].rpartition(".")[0] or "the model"
        wanted = set(paths)
        idx = [block_index(p, blocks) for p in (self._order or []) if p in wanted]
        inside = [i for i, b in enumerate(idx) if b is not None]
        why = None
        if [idx[i] for i in inside] != sorted(idx[i] for i in inside):
            why = "its layers are not called block by block"
        elif inside and any(idx[i] is None for i in range(inside[0], inside[-1] + 1)):
            why = "layers outside the blocks run between them"
        probe = slice_batch(first, 2)
        why = why or check_chain(self.cap.model, blocks, probe)
        if why is not None:
            return None, why
        # which layers of a block read the very same input (one refit step for them)
        calls, (h, *_), _ = record_calls(self.cap.model, blocks, probe)
        self._group = {}
        for i, bp in enumerate(blocks):
            mods = {s.ref: s.dense for s in self._sites if s.skip is None and s.ref.startswith(bp + ".")}
            group, h = shared_inputs(self.cap.model.get_submodule(bp), calls[i], h, mods)
            self._group.update({p: (i, g) for p, g in group.items()})
        self.notes.append(f"modules capture: the sequential refit is chained block by block over the {len(blocks)} "
                          f"blocks of {parent!r} (each step runs one block; the cost grows with the depth)")
        return blocks, None

    def _batchnorms(self) -> int:
        """Convs whose only use is an inference-mode BatchNorm: the error that matters is the one after it,
        ``diag(s)(Ŵ − W)x`` with ``s = γ/√(σ² + ε)``, so such a site gets ``out_scale = s`` (its fits and
        predicted errors weigh the output channels by it), its output is observed at the BatchNorm, and its
        bias for relative errors is the folded one ``s (b − μ) + β``.  The emitted model keeps the BatchNorm."""
        gm = self.cap.model
        calls: dict[str, list] = {}
        for n in gm.graph.nodes:
            if n.op == "call_module":
                calls.setdefault(n.target, []).append(n)
        count = 0
        for site in self._sites:
            if site.skip is not None or not site.spec.op.startswith("conv") or len(calls.get(site.ref, ())) != 1:
                continue
            node = calls[site.ref][0]
            users = list(node.users)
            if len(users) != 1 or users[0].op != "call_module" or len(calls.get(users[0].target, ())) != 1:
                continue
            u = users[0]
            bn = gm.get_submodule(u.target)
            if (not isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)) or bn.running_var is None
                    or bn.num_features != site.spec.d_out or not u.args or u.args[0] is not node):
                continue
            with torch.no_grad():
                s = (bn.weight.double() if bn.weight is not None else torch.ones(bn.num_features, dtype=torch.float64))
                s = s / torch.sqrt(bn.running_var.double() + bn.eps)
                b = site.bias.double() if site.bias is not None else torch.zeros_like(s)
                beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(s)
                site.bias = (b - bn.running_mean.double()) * s + beta
            # a channel the BatchNorm zeroes (γ = 0: timm's zero-initialised last BN of a residual block, a pruned
            # channel) does not reach the output whatever the conv gives it: its weight is floored, so that the fits
            # (which divide by it) stay finite and weigh it next to nothing; all of them zero: the fit is unweighted
            top = float(s.abs().max())
            floor = 1e-6 * top if top > 0 else 1.0
            site.extra["out_scale"] = torch.where(s.abs() < floor, torch.full_like(s, floor), s)
            site.extra["out_module"] = u.target
            count += 1
        return count

    def _out(self, root: nn.Module, site: Site) -> nn.Module:
        """The module whose output is the site's output as the pipeline measures it (BatchNorm-aware)."""
        return root.get_submodule(site.extra.get("out_module", site.ref))

    def _call_order(self, batch) -> list[str]:
        """The layers in the order of their first calls on one sample of ``batch``.  A layer that gives something
        else than a tensor (a subclass of ``nn.Linear`` with its own forward, like Llama-4's router returning
        scores and logits) is declined: a factored layer would not reproduce what it returns."""
        order: list[str] = []
        odd: dict[str, str] = {}

        def after(m, i, out, p):
            if not isinstance(out, torch.Tensor):
                odd.setdefault(p, type(out).__name__)

        # the experts of a module taken apart run in the order of their index, those the sample routes no token to
        # skipped: all of them are placed where the module is first called, up[e] then down[e] for every e
        wanted = {s.ref for s in self._sites if s.dense is not None}
        handles = [self.cap.model.get_submodule(r).register_forward_pre_hook(
            lambda m, i, r=r: order.extend(p for e in range(m.num_experts) for p in (f"{r}.up.{e}", f"{r}.down.{e}")
                                           if p in wanted)) for r in self.cap.routed]
        handles += [s.dense.register_forward_pre_hook(lambda m, i, p=s.ref: order.append(p))
                    for s in self._sites if s.dense is not None]
        handles += [s.dense.register_forward_hook(lambda m, i, o, p=s.ref: after(m, i, o, p))
                    for s in self._sites if s.dense is not None]
        try:
            with torch.no_grad():
                call_model(self.cap.model, slice_batch(batch, 1))
        finally:
            for h in handles:
                h.remove()
        for s in self._sites:
            if s.ref in odd and s.skip is None:
                base = next(c.__name__ for c in type(s.dense).__mro__ if c.__module__.startswith("torch.nn"))
                s.set_skip(SkipReason.UNSUPPORTED_OP, f"{type(s.dense).__name__} returns a {odd[s.ref]}, not a tensor "
                                                      f"(a subclass of nn.{base} with its own forward): kept as is")
        return list(dict.fromkeys(order))

    def sites(self) -> list[Site]:
        return self._sites

    def nothing_to_compress(self, sites) -> str | None:
        from ..planner import nothing_to_compress

        return nothing_to_compress(sites)

    def model_params(self, sites) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.model.parameters()}.values())

    def model_macs(self, sites, batch) -> int:
        if batch is None:
            return 0
        return fo.model_macs(self.cap.model, batch)

    def positions_without_data(self, sites, example) -> list[str]:
        if example is None:
            return ["no input shapes: MACs are counted at one position per sample (pass example_inputs= for real "
                    "MAC counts)"]
        stats: dict[str, list[int]] = {}

        def visit(site, inp):
            site.extra.setdefault("input_shape", inp.shape)
            site.extra.setdefault("input_dtype", inp.dtype)
            st = stats.setdefault(site.name, [0, 0])
            st[0] += inp.p_in
            st[1] += inp.p_out

        active = [s for s in sites if s.skip is None]
        fo.observe_batch(self.cap.model, active, lambda s: s.dense, example, visit)
        n = batch_size(example)
        for s in active:
            if s.name in stats:
                s.spec.p_in = max(1, round(stats[s.name][0] / n))
                s.spec.p_out = max(1, round(stats[s.name][1] / n))
        return []

    # ----------------------------------------------------------------- observe
    def observe_batch(self, batch, sites, visit) -> None:
        mask = self._mask(batch)
        if self._chain is None:
            fo.observe_batch(self.cap.model, sites, lambda s: s.dense, batch, visit, mask)
            return
        with fo.observing(sites, lambda s: s.dense, visit, lambda: mask), torch.no_grad():
            self._record(batch)  # the calibration forward records what the refit's start needs

    def _record(self, batch) -> tuple[list, torch.Tensor, dict]:
        """One forward of the original model on ``batch``: every block's call, the first block's input and the
        first inputs of the layers outside the blocks — what :meth:`start` needs of the batch.  Kept (by the
        batch's :func:`~sketchpass.batches.fingerprint`, in a :class:`Store` within ``max_activation_mb``) so
        that the refit reuses the calibration forward instead of running the model again."""
        paths = [s.ref for s in self._sites if s.skip is None and block_index(s.ref, self._chain) is None]
        with first_inputs(self.cap.model, paths) as outside, torch.no_grad():
            calls, hiddens, _ = record_calls(self.cap.model, self._chain, batch)
        rec = (calls, hiddens[0], outside)
        if self._records is None:
            self._records = Store(self.o.max_activation_mb * 2**20, "recorded block calls")
        self._records.put(fingerprint(batch), rec)
        return rec

    def close(self) -> None:
        """Drop what was kept between the stages (the recorded block calls and their temporary files)."""
        if self._records is not None:
            self._records.close()
            self._records = None

    def _mask(self, batch) -> torch.Tensor | None:
        """The batch's real tokens (:func:`~sketchpass.batches.token_mask`), in modules capture — the calibration
        and the refit of a Hugging Face model count the rows of real tokens only.  (An fx graph's refit streams
        its tensors without the batch; it counts every row, in calibration too.)"""
        return token_mask(batch) if self.cap.graph is None else None

    def calibration_groups(self, sites: list[Site]) -> tuple[list[list[Site]] | None, str | None]:
        """Block-by-block calibration: the layers outside the blocks, then each block's; or ``None`` and why not."""
        if self._chain is None:
            if self.cap.capture != "modules":
                return None, f"{self.cap.capture} capture: the refit runs the graph; blocks are chained in modules " \
                             "capture only"
            return None, next((n.split("block-chained refit off: ", 1)[1].rstrip(")") for n in self.notes
                               if "block-chained refit off: " in n), "no chained blocks")
        groups: list[list[Site]] = [[] for _ in range(len(self._chain) + 1)]
        for s in sites:
            b = block_index(s.ref, self._chain)
            groups[0 if b is None else b + 1].append(s)
        return groups, None

    @torch.no_grad()
    def observe_blocks(self, batches, groups, visit, on_batch, finish, max_bytes: float) -> None:
        """Calibration one block at a time (:meth:`calibration_groups`): one forward of the whole model per batch
        observes the layers outside the blocks and records every block's call (masks, position embeddings) and
        the first block's input; then, block after block, each batch's hidden state is run through that block
        alone, observing its layers, and replaced by the block's output.  The hidden states of all batches are
        held in a :class:`~sketchpass.store.Store` (on disk beyond ``max_bytes``)."""
        model = self.cap.model
        outside, per_block = groups[0], groups[1:]
        store = Store(max_bytes, "block-mode calibration activations")
        try:
            keys = []
            cur: dict = {"mask": None}
            with fo.observing(outside, lambda st: st.dense, visit, lambda: cur["mask"]):
                for k, batch in enumerate(batches):
                    on_batch(batch)
                    cur["mask"] = self._mask(batch)
                    calls, h, _ = self._record(batch)
                    store.put(k, (calls, h, cur["mask"]))
                    keys.append(k)
            finish(outside)
            for i, group in enumerate(per_block):
                block = model.get_submodule(self._chain[i])
                with fo.observing(group, lambda st: st.dense, visit, lambda: cur["mask"]):
                    for k in keys:
                        calls, h, cur["mask"] = store.get(k)
                        store.put(k, (calls, hidden_of(calls[i].run(block, h)), cur["mask"]))
                finish(group)
        finally:
            store.close()

    def sensitivities(self, sites, batches, probes, seed) -> dict[str, float]:
        """The output gains (:func:`sketchpass.fx.observe.sensitivity`).  With chained blocks, one block's backward
        at a time (:func:`~sketchpass.fx.blocks.sensitivity_by_block`: the same gains, memory for one block's
        graph); otherwise, or when the blocks cannot be run apart for it, one backward through the whole model.
        ``self.sensitivity_note`` says which."""
        # the backward keeps the outputs (and their perturbations) of the layers it runs through, of the samples
        # it runs on: batches are cut into chunks whose estimate stays within max_activation_mb (the gains are
        # sums over samples) — for the whole model, or for the largest block and the layers outside the blocks
        by_block = self._chain is not None
        if by_block:
            groups, _ = self.calibration_groups(sites)
            per_sample = 12 * max(sum(s.spec.p_out * s.spec.d_out for s in g) for g in groups)
        else:
            per_sample = 12 * sum(s.spec.p_out * s.spec.d_out for s in sites)
        chunk = max(1, int(self.o.max_activation_mb * 2**20 // max(per_sample, 1)))
        cut = []
        for b in batches:
            while batch_size(b) > chunk:
                head, b = _split(b, chunk)
                cut.append(head)
            cut.append(b)
        batches = cut
        model = self.cap.model
        kw = dict(probes=probes, seed=seed, module_of=lambda st: self._out(model, st), metric=self.metric,
                  mask_of=self._mask)
        self.sensitivity_note = None
        try:
            if by_block:
                try:
                    gains = sensitivity_by_block(model, self._chain, sites, batches, **kw)
                    self.sensitivity_note = (f"sensitivities measured block by block: one backward through each of "
                                             f"the {len(self._chain)} blocks at a time (the whole model's graph is "
                                             "never held)")
                    return gains
                except NotChained as exc:
                    self.sensitivity_note = (f"sensitivities measured with one backward through the whole model "
                                             f"(not block by block: {exc})")
                except RuntimeError as exc:  # a backward that fails on a block run alone: the whole model's may not
                    first = " ".join(str(exc).split())[:160]
                    self.sensitivity_note = (f"sensitivities measured with one backward through the whole model "
                                             f"(the block-by-block backward failed: {type(exc).__name__}: {first})")
            return fo.sensitivity(model, sites, batches, **kw)
        except RuntimeError as exc:  # e.g. in-place ops on tensors autograd needs: no backward through the model
            first = " ".join(str(exc).split())[:160]
            raise SensitivityUnavailable(f"sensitivities could not be measured (backward through the model "
                                         f"failed: {first})") from None

    # ----------------------------------------------------------------- fit and rewrite
    def begin(self) -> None:
        self.end_refit()
        self._memo = None
        self._replaced = {}
        self._fitted: dict[str, nn.Module] = {}
        self._segments = None
        if self.cap.graph is None:
            self._comp = _sharing_copy(self.cap.model)

    def refit_steps(self, sites: list[Site]) -> list[list[Site]]:
        if self.cap.graph is not None:
            self._segments = Segments(self.cap.model, self._replaced)
            groups = self._segments.plan_steps([s.ref for s in sites])
            return [[sites[i] for i in g] for g in groups]
        order = {p: i for i, p in enumerate(self._order or [])}
        ran = [s for s in sites if s.ref in order]
        ran.sort(key=lambda s: order[s.ref])
        rest = [[s] for s in sites if s.ref not in order]  # never called on the calibration data
        if self._chain is None:
            return [[s] for s in ran] + rest
        steps: list[list[Site]] = []
        self._step_block = []
        self._pending = {}
        for s in ran:
            b = block_index(s.ref, self._chain)
            if b is not None:
                self._pending.setdefault(b, []).append(s.ref)
            g = self._group.get(s.ref)
            if steps and b is not None and self._step_block[-1] == b and g is not None \
                    and g == self._group.get(steps[-1][-1].ref):
                steps[-1].append(s)  # the same input as the step's other layers: fitted together
            else:
                steps.append([s])
                self._step_block.append(b)
        self._step_block += [None] * len(rest)
        return steps + rest

    def start(self, batch):
        if self._segments is not None:
            return self._segments.start(batch)
        if self._chain is not None:
            # every block's call, and the original inputs of the layers outside the blocks (the refit then runs
            # only the compressed model to reach those): recorded by the calibration forward of this batch, or
            # by one forward of the original model now
            key = fingerprint(batch)
            if self._records is not None and key in self._records.keys():
                calls, h0, outside = self._records.get(key)
            else:
                calls, h0, outside = self._record(batch)
            self._tokens += 1
            return self._goto({"batch": batch, "calls": calls, "h0": h0, "at": None, "o": None, "n": None,
                               "outside": outside, "token": self._tokens}, 0)
        return batch

    def advance(self, step: int, env):
        if self._segments is not None:
            return self._segments.advance(step, env)
        if self._chain is not None:
            return self._goto(env, step + 1)
        return env

    # ----------------------------------------------------------------- block chaining (modules capture)
    def _replaced_in(self, i: int) -> bool:
        prefix = self._chain[i] + "."
        return any(p.startswith(prefix) for p in self._replaced)

    @torch.no_grad()
    def _goto(self, env: dict, step: int) -> dict:
        """Move a batch's block state to where refit step ``step`` reads its inputs."""
        b = self._step_block[step] if step < len(self._step_block) else None
        if b is None:  # a layer outside the blocks (before them, or after them all): the whole models run
            env["at"] = env["o"] = env["n"] = None
            env.pop("orig", None)
            return env
        if env["at"] is None:  # entering the blocks
            env["o"] = env["h0"]
            env["n"] = env["h0"] if not self._replaced else self._first_block_input(env["batch"])
            env["at"] = 0
        while env["at"] < b:
            i = env["at"]
            call = env["calls"][i]
            ho = self._original_block(env, i)[2]
            env.pop("orig", None)
            if env["n"] is env["o"] and not self._replaced_in(i):
                hn = ho  # nothing differs yet: one run serves both streams
            else:
                run = self._run(env, i, make=False)
                hn = resume.MISS if run is None else run.output(self._is_fitted)
                if hn is resume.MISS:
                    hn = hidden_of(call.run(self._comp.get_submodule(self._chain[i]), env["n"]))
            self._drop_run(env)
            env["o"], env["n"], env["at"] = ho, hn, i + 1
        return env

    # the compressed stream of a block: one paused run per batch (:mod:`.resume`) instead of a run from the
    # block's start for every refit step
    def _is_fitted(self, path: str) -> bool:
        return path in self._replaced

    def _run(self, env: dict, i: int, make: bool = True) -> resume.BlockRun | None:
        """The paused run of block ``i`` on the batch's compressed stream; made when ``make`` and within
        ``max_activation_mb`` for all the runs held (a run holds about what the original block's layer inputs
        take, :meth:`_original_block`), else ``None`` (the caller runs the block from its start)."""
        held = self._runs.get(env["token"])
        if held is not None and held[0] == i:
            return held[1]
        self._drop_run(env)
        waits = [p for p in self._pending.get(i, ()) if p not in self._replaced]
        if not make or not waits or not resume.ENABLED:
            return None
        size = nbytes(self._original_block(env, i)[1])
        if size + sum(r.nbytes for _, r in self._runs.values()) > self.o.max_activation_mb * 2**20:
            return None
        if self._gates is None:
            self._gates = resume.Gates(self._comp.get_submodule)
        for p in waits:
            self._gates.add(p, self._comp.get_submodule(p))
        run = resume.BlockRun(self._comp.get_submodule(self._chain[i]), env["calls"][i], env["n"], set(waits), size)
        self._runs[env["token"]] = (i, run)
        return run

    def _drop_run(self, env: dict) -> None:
        held = self._runs.pop(env.get("token"), None)
        if held is not None:
            held[1].close()

    def end_refit(self) -> None:
        """Unwind the paused block runs and take the gates off the working copy's layers."""
        runs, self._runs = list(self._runs.values()), {}
        for _, run in runs:
            run.close()
        if self._gates is not None:
            self._gates.remove()
            self._gates = None

    def _original_block(self, env: dict, i: int) -> tuple[int, dict, torch.Tensor | None]:
        """Block ``i`` of the original stream, run once per batch: ``(i, {layer path: its first input}, the
        block's output)`` — the original stream never changes, so every refit step in the block reads it from
        this one run (kept in the batch's state until the chain moves past the block)."""
        cache = env.get("orig")
        if cache is not None and cache[0] == i:
            return cache
        prefix = self._chain[i] + "."
        paths = [s.ref for s in self._sites if s.skip is None and s.ref.startswith(prefix)]
        with first_inputs(self.cap.model, paths) as seen, torch.no_grad():
            out = hidden_of(env["calls"][i].run(self.cap.model.get_submodule(self._chain[i]), env["o"]))
        env["orig"] = (i, seen, out)
        return env["orig"]

    def _first_block_input(self, batch):
        args, kwargs = stop_at(self._comp.get_submodule(self._chain[0]), lambda: call_model(self._comp, batch))
        return Call.of(args, kwargs)[1]

    def site_inputs(self, env, site: Site, original: bool = False) -> tuple[LayerInput, LayerInput] | None:
        mod = site.dense
        mask = None
        if self._segments is not None:
            env_o, env_n = env
            key = self._segments.input_name(site.ref)
            x, xh = env_o[key], env_n[key]
            xh = x if original else xh
        elif self._chain is not None and env["at"] is not None:
            i = env["at"]
            call = env["calls"][i]
            mask = self._mask(env["batch"])
            x = self._original_block(env, i)[1].get(site.ref)
            m = self._memo
            if m is not None and m.env is env and m.x is x and site.ref in self._group \
                    and m.group == (self._group[site.ref], original) and m.d_in == site.spec.d_in \
                    and site.spec.op == "linear":
                return m.pair  # a layer of the step that reads the same input as the one before: the same pair
            if original or (env["n"] is env["o"] and not self._replaced_in(i)):
                xh = x
            else:
                run = self._run(env, i)
                xh = resume.MISS if run is None else run.input_of(site.ref, self._is_fitted)
                if xh is resume.MISS:
                    xh = input_in_block(self._comp.get_submodule(self._chain[i]), call, env["n"],
                                        self._comp.get_submodule(site.ref))
            if x is None or xh is None:
                return None
        else:
            batch = env["batch"] if self._chain is not None else env
            mask = self._mask(batch)
            x = env["outside"].get(site.ref) if self._chain is not None else _input_of(self.cap.model, mod, batch)
            if x is None:  # not called on this batch: no run of the compressed model
                return None
            xh = x if original or not self._replaced else _input_of(self._comp, self._comp.get_submodule(site.ref),
                                                                       batch)
            if xh is None:
                return None
        if site.extra.get("routed"):  # the tokens routed to an expert differ between the two models: it is fitted
            x = xh  # on those the compressed model gives it, to its own weight
        m = self._memo
        if m is not None and m.env is env and m.x is x and m.xh is xh and m.d_in == site.spec.d_in \
                and site.spec.op == "linear":
            return m.pair
        inp = fo.layer_input(site, mod, x, None, mask)
        pair = inp, (inp if xh is x else fo.layer_input(site, mod, xh, None, mask))
        # layers that read the very same input (q/k/v of one hidden state) get the very same pair: the refit
        # accumulates their statistics from one product (the memo holds its tensors, so no id is reused)
        self._memo = _Pair(env, x, xh, (self._group.get(site.ref), original), site.spec.d_in, pair)
        return pair

    def replace(self, site: Site, module: nn.Module) -> None:
        self._memo = None
        module.train(False)
        self._fitted[site.name] = module
        self._replaced[site.ref] = module
        if self.cap.graph is None:
            set_module(self._comp, site.ref, module)

    def export(self, plan: Plan) -> nn.Module:
        self.end_refit()
        if self.cap.graph is None:
            small = self._comp
            self._comp = _sharing_copy(self.cap.model)  # the next round starts from the original
        elif self.cap.functional:  # functional uses were rewritten in the graph: the graph is the result
            small = copy.deepcopy(self.cap.model)
            for path, mod in self._replaced.items():
                set_module(small, path, copy.deepcopy(mod))
            small.delete_all_unused_submodules()
            small.graph.lint()
            small.recompile()
        else:  # keep the user's own class and forward: swap the fitted modules into a copy
            small = copy.deepcopy(self.model)
            for path, mod in self._replaced.items():
                set_module(small, path, copy.deepcopy(mod))
        for path in self.cap.transposed:  # kept dense: the user's own (transposed-weight) module, as it was
            if path not in self._replaced and isinstance(small.get_submodule(path), nn.Linear):
                set_module(small, path, copy.deepcopy(self.model.get_submodule(path)))
        # nn.TransformerEncoderLayer's fused inference path would bypass a factored linear1/linear2: off where
        # one is, as the user's model has it elsewhere (:func:`.trace.fast_path_off`)
        for name, mod in small.named_modules():
            if isinstance(mod, nn.TransformerEncoderLayer):
                factored = any(p.startswith(name + ".") for p in self._replaced)
                own = self.model.get_submodule(name) if _has_module(self.model, name) else None
                mod.activation_relu_or_gelu = not factored and getattr(own, "activation_relu_or_gelu", False)
        for name, mod in small.named_modules():  # and the nested-tensor path, which needs the layers' fast path
            if isinstance(mod, nn.TransformerEncoder) and any(p.startswith(name + ".") for p in self._replaced):
                mod.use_nested_tensor = False
        small.train(self.model.training)
        attach_plan(small, plan)
        return small

    def stamp(self, emitted: nn.Module, plan: Plan) -> None:
        if not self._owned:
            unshare(emitted, self.model)
        for mod in emitted.modules():  # experts that are views of a fused weight get their own storage
            if isinstance(mod, RoutedExperts):
                mod.own_storage()
        note = drop_stale_quantizer(emitted)
        if note is not None and note not in plan.notes:
            plan.notes.append(note)
        attach_plan(emitted, plan)

    # ----------------------------------------------------------------- verify
    def _module_in(self, root: nn.Module, site: Site) -> nn.Module:
        return root.get_submodule(site.ref)

    def compare(self, emitted: nn.Module, batch, sites) -> tuple[list, list, dict]:
        was = emitted.training
        emitted.eval()
        try:
            return fo.compare(self.cap.model, emitted, batch, sites, self._out)
        finally:
            emitted.train(was)

    def single_layer_errors(self, sites, batches) -> dict[str, tuple[float, float]]:
        return fo.single_layer_errors(self.cap.model, sites, self._fitted, self._module_in, batches, self.metric,
                                      mask_of=self._mask)

    def output_mask(self, batch) -> torch.Tensor | None:
        """The batch's real tokens for counting the output error (:meth:`_mask`)."""
        return self._mask(batch)

    # ----------------------------------------------------------------- latency
    def timing_signature(self) -> str:
        return f"channels_last={int(self._channels_last)}"

    def time_forms(self, site, forms, target) -> dict:
        from .timing import time_forms

        return time_forms(site, forms, target, channels_last=self._channels_last, rounds=5, min_round_ms=10.0)

    def dense_model(self) -> nn.Module:
        """What the compressed model is timed against: a copy of the user's model (same class, same forward)."""
        if getattr(self, "_dense_copy", None) is None:
            self._dense_copy = copy.deepcopy(self.model).eval()
        return self._dense_copy

    def timing_batch(self, first, example):
        batch = first if first is not None else example
        if batch is not None and self._channels_last:
            batch = to_channels_last(batch)
        return batch

    def time_models(self, models: dict, batch, target) -> dict:
        from .timing import time_models

        return time_models(models, batch, target)


def frontend(model: Any, o: Options, capture_mode: str | None = None) -> TorchFrontend:
    return TorchFrontend(model, o, capture_mode)
