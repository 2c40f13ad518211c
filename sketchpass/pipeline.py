"""The pass, written once for both frontends (DESIGN §3).  Read it top to bottom:

    capture → find sites → observe → sensitivities → candidates → solve
            → fit and rewrite (sequential refit) → export → verify  ⟲ (correct the weights, solve again)

Each frontend (:mod:`sketchpass.fx.frontend` for PyTorch, :mod:`sketchpass.onnx.frontend` for ONNX)
implements only the graph-specific steps, behind the :class:`Frontend` protocol below: capture the model
and find its weight layers, run a calibration batch and show each layer's inputs, measure output
sensitivities, cut the model into refit steps and run them, swap a layer for its factored module, export
the result, and run the original and the emitted model side by side.  Everything else — which batches
are used for what, the Gram statistics, the candidates and the solver, the refit targets, the factory
of factored modules, the measured errors and the closed loop — is here or in the frontend-agnostic
modules this file calls, and is the same for both.

**Verify and the closed loop.**  With calibration data, one batch in ``holdout`` (default 8) is kept
out of fitting (:class:`~sketchpass.batches.Calib`).  After the emitted model is built, both models run
on the held-out batches: the relative squared output error ``Σ‖f̂ − f‖² / Σ‖f‖²`` is the measured
counterpart of the plan's predicted ``Σ_i w_i e_i`` (weights ``w_i`` = output gain of layer ``i``'s
relative error, ``e_i`` its predicted relative error), and every layer's relative output error
``Σ‖ŷ − y‖² / Σ‖y − b‖²`` is measured next to its prediction.  When the measured model error is more
than ``tolerance`` (default 3) times the predicted one, or less than a ``tolerance``-th of it, the
error is attributed to layers: the model's output error with only layer ``i`` compressed, ``E_i``,
gives its measured gain ``E_i / e_i``, which replaces the estimated one (layers kept dense get the
median correction of the measured ones), and all gains are scaled by ``E / Σ E_i`` so that the
prediction accounts for how the layers' errors combine.  The solver runs again on the same candidates
with the corrected weights, and the new plan is fitted, emitted and measured — at most ``rounds``
(default 2) times.  The round with the lowest measured error is kept; every round is recorded in
``plan.verify``, and when no round brings measured and predicted within the tolerance the plan carries a
one-line warning.

**Memory.**  Calibration data is streamed: observing holds one batch of activations plus every
layer's Gram (planning needs them all; they are dropped once the candidates exist); the sequential
refit holds the activations at the current refit boundary for all fitting batches in a
:class:`~sketchpass.store.Store` — in memory up to ``max_activation_mb`` (default 1024), on disk beyond
that — plus one batch being run and the Grams of the layers being fitted; verify holds one batch.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .batches import Calib
from .budget import Budget, InfeasibleBudgetError
from .calib import CrossGramAccumulator, GramAccumulator
from .distributed import Dist, announced, sum_cross, sum_gram, world
from .latency import TimingCache
from .latency.stage import next_offset, suspect_table, time_candidates, within_latency
from .layers import factor_module, with_weight
from .metric import Metric
from .options import Options
from .plan import Decision, Plan, SkipReason
from .planner import Choices, apply_ignore, candidates, choose, make_plan
from .progress import progress_bar
from .site import LayerInput, Site
from .sketch.refit import refit_target
from .store import Store


class SensitivityUnavailable(RuntimeError):
    """The frontend could not measure output sensitivities (the message is the plan's note)."""


class Frontend(Protocol):
    """The graph-specific steps.  A frontend object captures one model when it is made and keeps its
    working copies; ``name`` is ``"torch"`` or ``"onnx"``; ``capture`` names how it captured the model
    (``"fx"``, ``"modules"``, ``"onnx"``) and ``notes`` what the plan should say about it."""

    name: str
    capture: str
    notes: list[str]
    metric: Metric  # how the output error is counted (:mod:`sketchpass.metric`; ``auto`` resolved)

    # ----------------------------------------------------------------- data and capture
    def calib(self, calib: Any, o: Options) -> Calib:
        """The user's calibration data as a :class:`Calib` stream of validated batches."""

    def prepare(self, first: Any) -> None:
        """Capture the model (a first calibration batch, or ``None``, lets it check the capture)."""

    def sites(self) -> list[Site]:
        """Every weight layer, in execution order, with a skip reason where it cannot be factored."""

    def model_params(self, sites: list[Site]) -> int: ...

    def nothing_to_compress(self, sites: list[Site]) -> str | None:
        """``None`` when some site can be factored, else one sentence saying what was found and why none can."""

    def model_macs(self, sites: list[Site], batch: Any) -> int:
        """MACs per sample of the whole model, at the shapes of ``batch`` (``None``: the model's own)."""

    def positions_without_data(self, sites: list[Site], example: Any) -> list[str]:
        """Fill ``p_in`` / ``p_out`` of every site from ``example_inputs`` or static shapes (no calibration
        data); returns notes."""

    # ----------------------------------------------------------------- observe
    def observe_batch(self, batch: Any, sites: list[Site], visit: Callable[[Site, LayerInput], None]) -> None:
        """Run the original model on ``batch``, calling ``visit`` with every input of every site."""

    def calibration_groups(self, sites: list[Site]) -> tuple[list[list[Site]] | None, str | None]:
        """Groups of sites for block-by-block calibration (those outside the blocks first, then each block's),
        or ``(None, why not)``."""

    def observe_blocks(self, batches: Iterable, groups: list[list[Site]], visit: Callable[[Site, LayerInput], None],
                       on_batch: Callable[[Any], None], finish: Callable[[list[Site]], None], max_bytes: float) -> None:
        """Observe the groups of :meth:`calibration_groups` one after the other, calling ``on_batch`` with every
        batch of ``batches`` (read once) and ``finish(group)`` when a group's inputs have all been visited."""

    def sensitivities(self, sites: list[Site], batches: list, probes: int, seed: int) -> dict[str, float]:
        """Output gain of every site's relative error (raises :class:`SensitivityUnavailable`)."""

    # ----------------------------------------------------------------- fit and rewrite
    def begin(self) -> None:
        """Start a fresh compressed copy (each round of the loop starts from the original)."""

    def refit_steps(self, sites: list[Site]) -> list[list[Site]]:
        """The factored sites grouped into steps, in execution order: the sites of a step are fitted
        together at a boundary where all their inputs are known."""

    def start(self, batch: Any) -> Any:
        """Both streams (original and compressed) of ``batch`` run up to the first boundary."""

    def site_inputs(self, env: Any, site: Site, original: bool = False) -> tuple[LayerInput, LayerInput]:
        """The site's input in the original and in the compressed stream (the same object while equal;
        ``original``: the original input for both, without running the compressed stream to the site)."""

    def advance(self, step: int, env: Any) -> Any:
        """Both streams run from boundary ``step`` to boundary ``step + 1``."""

    def end_refit(self) -> None:
        """The refit is over (or was interrupted): drop what it kept between steps."""

    def replace(self, site: Site, module: torch.nn.Module) -> None:
        """Use the factored ``module`` for ``site`` in the compressed copy."""

    def export(self, plan: Plan) -> Any:
        """The emitted model: the compressed copy as an ``nn.Module`` / ``ModelProto``."""

    def stamp(self, emitted: Any, plan: Plan) -> None:
        """Attach the final ``plan`` (with what verify measured) to the emitted model."""

    # ----------------------------------------------------------------- verify
    def compare(self, emitted: Any, batch: Any, sites: list[Site]) -> tuple[list, list, dict]:
        """Both models on ``batch``: the original's float outputs, the emitted model's, and ``{site: (num, den)}``
        of each site's output (:func:`sketchpass.site.layer_error`, summed over its calls) where both models
        called it as often."""

    def output_mask(self, batch: Any) -> Any:
        """The batch's real tokens, where the output error counts them only (:func:`sketchpass.metric.real`), or
        ``None`` (every position counts)."""

    def single_layer_errors(self, sites: list[Site], batches: list) -> dict[str, tuple[float, float]]:
        """``{site: (num, den)}`` of the output error (``metric``) of ``f_i``, the original model with only that
        site's fitted module swapped in."""


# =========================================================================== the stages
class Clock:
    """Wall seconds per stage, summed over the calls (``plan.timings``)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - t0)

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def record(self) -> dict[str, float]:
        return {k: round(v, 2) for k, v in self.seconds.items()}


@contextmanager
def section(D: Dist | None, stage: str):
    """Local work of a data-parallel stage (:meth:`Dist.section`); nothing when running alone."""
    if D is None:
        yield
        return
    with D.section(stage):
        yield



@dataclass
class Stats:
    gram: GramAccumulator | None = None
    positions_in: int = 0
    positions_out: int = 0
    calls: int = 0


@dataclass
class Observed:
    samples: int = 0
    batches: int = 0
    kept: list = field(default_factory=list)  # the first samples, for the sensitivity probes
    stats: dict[str, Stats] = field(default_factory=dict)
    mode: str = "model"  # "model": every layer's Gram at once; "blocks": one block's at a time
    gram_bytes: int = 0  # Gram memory alive now, and at most
    peak_gram_bytes: int = 0
    reduced: bool = False  # data-parallel: samples and batches summed over the ranks


def gram_features(site: Site) -> int:
    return site.spec.d_in // site.spec.groups * site.spec.hw


def gram_bytes(site: Site) -> int:
    """Memory of one site's input Gram statistics (float64 ``groups × n × n``, plus the sums)."""
    n = gram_features(site)
    return site.spec.groups * (n * n + 2 * n + 1) * 8


def add_input(acc: GramAccumulator, site: Site, inp: LayerInput) -> None:
    if site.spec.op == "linear":
        acc.add_rows(inp.x)
    else:
        s = site.spec
        acc.add_conv_input(inp.x, s.kernel, s.stride, (0,) * len(s.kernel), s.dilation)


def observe(fe: Frontend, sites: list[Site], data: Calib, o: Options, grams: bool = True,
            done: Callable[[list[Site], bool], None] | None = None, notes: list[str] | None = None) -> Observed:
    """One pass over the fitting batches: every active site's input Gram and positions; the first
    ``sensitivity_samples`` samples are kept for the sensitivity probes.

    With ``done``, every group of sites whose statistics are complete is recorded
    (:func:`record_observation`, into ``notes``) and handed to ``done(group, whole)`` (``whole``: the group is
    every layer), after which its Grams are dropped.  Block by block (``blocks="on"``, or ``"auto"`` when all
    the Grams at once would exceed ``max_grams_mb``, and the frontend can chain the model's blocks) the groups
    are the layers outside the blocks, then each block in turn, and only one group's Grams exist at a time;
    otherwise the one group is every layer, after one pass of the whole model."""
    obs = Observed()
    active = [s for s in sites if s.skip is None]
    limit = o.max_gram_mb * 2**20
    wants = {s.name: grams and s.spec.groups * gram_features(s) ** 2 * 8 <= limit for s in active}
    for s in active:
        obs.stats[s.name] = Stats()
    total = sum(gram_bytes(s) for s in active if wants[s.name])
    groups = None
    if done is not None and grams and active:
        wanted = o.blocks == "on" or (o.blocks == "auto" and total > o.max_grams_mb * 2**20)
        if wanted:
            groups, why = fe.calibration_groups(active)
            mb = total / 2**20
            if groups is None and notes is not None:
                cause = "blocks='on'" if o.blocks == "on" else f"the Grams of all layers ({mb:.0f} MB) exceed " \
                                                                f"max_grams_mb={o.max_grams_mb:g}"
                notes.append(f"{cause}, but block-by-block calibration is not available ({why}): the whole model "
                             f"is calibrated at once")

    def visit(site: Site, inp: LayerInput) -> None:
        st = obs.stats[site.name]
        if st.calls == 0 and inp.shape is not None:  # the first call's input, for standalone timings
            site.extra.setdefault("input_shape", inp.shape)
            site.extra.setdefault("input_dtype", inp.dtype)
        st.calls += 1
        st.positions_in += inp.p_in
        st.positions_out += inp.p_out
        if wants[site.name]:
            if st.gram is None:
                st.gram = GramAccumulator(gram_features(site), site.spec.groups)
                obs.gram_bytes += gram_bytes(site)
                obs.peak_gram_bytes = max(obs.peak_gram_bytes, obs.gram_bytes)
            add_input(st.gram, site, inp)

    def count(batch, adv) -> None:
        n = data.size(batch)
        obs.samples += n
        obs.batches += 1
        have = sum(data.size(b) for b in obs.kept)
        if o.sensitivity_samples and have < o.sensitivity_samples:
            obs.kept.append(data.head(batch, o.sensitivity_samples - have))
        adv(n)

    D = world()

    def reduce(group: list[Site]) -> None:  # data-parallel: the statistics of every rank's shard, summed
        if D is None:
            return
        if not obs.reduced:
            obs.samples, obs.batches = (int(v) for v in D.sum_numbers([obs.samples, obs.batches]))
            obs.reduced = True
        sts = [obs.stats[s.name] for s in group]
        flat = D.sum_numbers([float(v) for st in sts for v in (st.calls, st.positions_in, st.positions_out)])
        for i, st in enumerate(sts):
            st.calls, st.positions_in, st.positions_out = (int(v) for v in flat[3 * i:3 * i + 3])
        for s, st in zip(group, sts):
            if wants[s.name] and st.calls:
                if st.gram is None:  # no input on this rank's shard: zeros to the sum
                    st.gram = GramAccumulator(gram_features(s), s.spec.groups)
                sum_gram(D, st.gram)

    def finish(group: list[Site], whole: bool = False) -> None:
        if D is not None:
            D.agree("calibrating")
        reduce(group)
        if obs.batches == 0:
            raise ValueError("the calibration data yielded no batches")
        record_observation(group, obs, o, notes if notes is not None else [])
        done(group, whole)
        for s in group:
            st = obs.stats.get(s.name)
            if st is not None and st.gram is not None:
                obs.gram_bytes -= gram_bytes(s)
                st.gram = None
            s.gram = None

    if groups is not None:
        obs.mode = "blocks"
        with progress_bar("calibrating", None, o.progress) as adv:
            try:
                fe.observe_blocks(data.fit(), groups, visit, lambda b: count(b, adv), finish,
                                  o.max_activation_mb * 2**20)
            except Exception as exc:
                if D is not None and not announced(exc):  # tell the other ranks, at their next collective
                    D.agree("calibrating", exc)
                raise
        if notes is not None:
            notes.append(f"calibrated block by block ({len(groups) - 1} blocks): at most "
                         f"{obs.peak_gram_bytes / 2**20:.0f} MB of Grams at once, against {total / 2**20:.0f} MB for "
                         "the whole model")
        return obs
    with progress_bar("calibrating", None, o.progress) as adv, section(D, "calibrating"):
        for batch in data.fit():
            fe.observe_batch(batch, active, visit)
            count(batch, adv)
    if done is not None:
        finish(active, True)
        return obs
    reduce(active)
    if obs.batches == 0:
        raise ValueError("the calibration data yielded no batches")
    return obs


def record_observation(sites: list[Site], obs: Observed, o: Options, notes: list[str]) -> None:
    """Positions per sample into the specs, Grams onto the sites; layers that never ran are kept dense."""
    for s in sites:
        st = obs.stats.get(s.name)
        if s.skip is not None or st is None:
            continue
        if st.calls == 0:
            s.set_skip(SkipReason.NOT_EXECUTED, "not executed on the calibration data")
            continue
        s.spec.p_in = max(1, round(st.positions_in / obs.samples))
        s.spec.p_out = max(1, round(st.positions_out / obs.samples))
        g = st.gram
        if g is not None and not all(bool(torch.isfinite(t).all()) for t in (g.gram, g.fourth, g.sum, g.sq_sum)):
            notes.append(f"{s.name}: its calibration inputs overflow (inf/NaN); fitted data-free")
            g = None
        elif g is None:
            notes.append(f"{s.name}: its input Gram would exceed max_gram_mb={o.max_gram_mb:g}; fitted data-free")
        s.gram = g


def measure_sensitivities(fe: Frontend, sites: list[Site], kept: list, o: Options, notes: list[str],
                          data: Calib | None = None) -> None:
    """The output gain of every active site, on the ``kept`` first samples.  Data-parallel: the first
    ``sensitivity_samples`` samples of the ranks' kept ones in rank order (those of one process on the
    concatenated shards), measured on rank 0 and broadcast."""
    active = [s for s in sites if s.skip is None]
    if not o.sensitivity_samples:
        notes.append("sensitivity_samples=0: every layer weighted equally")
        return
    D = world()
    if D is not None:
        parts = D.gather(kept)
        kept, have = [], 0
        for batch in (b for part in parts for b in part):
            if have >= o.sensitivity_samples:
                break
            kept.append(data.head(batch, o.sensitivity_samples - have))
            have += data.size(kept[-1])
    if not active or not kept:
        return
    sens: dict | str | None = None
    how = None
    with section(D, "measuring sensitivities"):
        if D is None or D.rank == 0:  # data-parallel: measured on rank 0, broadcast
            try:
                with progress_bar("sensitivity", None, o.progress):
                    sens = fe.sensitivities(active, kept, o.probes, o.seed)
            except SensitivityUnavailable as exc:
                sens = str(exc)
            how = getattr(fe, "sensitivity_note", None)
    if D is not None:
        sens, how = D.broadcast((sens, how))
    if how:
        notes.append(how)
    if isinstance(sens, str):
        notes.append(f"{sens}; every layer weighted equally")
        return
    if not any(v > 0 for v in sens.values()):
        notes.append("the model output does not move with the layers' outputs on the calibration data: "
                     "sensitivities cannot be measured, every layer weighted equally")
        return
    for s in active:
        s.sensitivity = float(sens.get(s.name, 1.0))


# --------------------------------------------------------------------------- fit and rewrite
def _accumulator(site: Site) -> CrossGramAccumulator:
    """The refit statistics of ``site``: ``W M`` when the layer has fewer outputs than input features (a conv's
    im2col rows, a down projection: fewer flops and less memory), else the cross Gram ``M`` itself (an up or
    square projection: ``rows·n²`` flops instead of ``2·rows·co·n``, and one product serves every layer
    that reads the same input)."""
    n, co = gram_features(site), site.spec.d_out // site.spec.groups
    return CrossGramAccumulator(n, site.spec.groups, weight=site.dense.weight if co < n else None)


def _accumulate(acc: CrossGramAccumulator, site: Site, x: LayerInput, xh: LayerInput,
                others: tuple[CrossGramAccumulator, ...] = ()) -> None:
    """Add a batch's input pair; ``others``: the accumulators of linear layers given the very same pair."""
    if site.spec.op == "linear":
        acc.add_rows(x.x, x.x if xh is x else xh.x, others=others)
    else:
        s = site.spec
        acc.add_conv_inputs(x.x, x.x if xh is x else xh.x, s.kernel, s.stride, (0,) * len(s.kernel), s.dilation)


def _build(site: Site, d: Decision, o_plan: dict, seed: int, init: str, grams=None, weight=None, wc=None):
    dense = site.dense if weight is None else with_weight(site.dense, weight)
    return factor_module(dense, d.method, rank=d.rank, k=d.k, l=d.l or 1, name=site.name, seed=seed,
                         dist=o_plan.get("dist", "rademacher"), init=init, gram=grams, wc=wc,
                         out_scale=site.extra.get("out_scale"))


def _finite(acc: CrossGramAccumulator) -> bool:
    parts = [acc.hat._gram, acc.hat.sum, acc.hat.fourth, acc.sum]
    parts += [t for t in (acc.cross, acc.wcross) if t is not None]
    return all(bool(torch.isfinite(t).all()) for t in parts)


def _made(D: Dist | None, group: list[Site], make: Callable[[Site], Any], counter: list[int]) -> list:
    """``make(site)`` for every site of ``group``; data-parallel, each by its owner (the ranks in turn, counted
    by ``counter``) and broadcast to the others."""
    if D is None:
        return [make(s) for s in group]
    owners = [D.owner(counter[0] + i) for i in range(len(group))]
    counter[0] += len(group)
    mine: dict[int, Any] = {}
    with section(D, f"fitting {group[0].name}"):
        for i, s in enumerate(group):
            if owners[i] == D.rank:
                mine[i] = make(s)
    return [D.broadcast(mine.get(i), src=owners[i]) for i in range(len(group))]


def fit_and_rewrite(fe: Frontend, sites: list[Site], plan: Plan, data: Calib | None, o: Options) -> dict:
    """Build every factored layer of ``plan`` into the frontend's fresh compressed copy.

    With data, layer by layer in execution order on the inputs the already-compressed layers produce
    (:mod:`sketchpass.sketch.refit`; ``refit=False``: on the original inputs).  Returns what the stage
    measured of itself (store peak, spilled batches)."""
    fe.begin()
    decisions = {lp.spec.name: lp.decision for lp in plan.layers}
    todo = [s for s in sites if decisions[s.name].method != "dense"]
    init = plan.options.get("init", "auto")
    build_init = "random" if init == "random" else plan.options.get("fit_init", "calibrated" if data else "lstsq")
    info: dict = {}
    with progress_bar("fitting", len(todo), o.progress) as adv:
        if data is None or init == "random" or not todo:
            for s in todo:
                fe.replace(s, _build(s, decisions[s.name], plan.options, plan.seed, build_init))
                adv(1, s.name)
            return info
        D = world()
        counter = [0]  # data-parallel: the layers' fits go to ranks in turn
        if not o.refit:  # every layer on its inputs in the original model: one pass (or one per block)
            notes: list[str] = []

            def done(group: list[Site], whole: bool) -> None:
                def make(s: Site):
                    grams = s.gram.shrunk(o.shrink) if s.gram is not None else None
                    return _build(s, decisions[s.name], plan.options, plan.seed, build_init, grams)

                for s, module in zip(group, _made(D, group, make, counter)):
                    s.gram = None
                    fe.replace(s, module)
                    adv(1, s.name)

            observe(fe, todo, data, o.replace(sensitivity_samples=0, progress=False), grams=True, done=done,
                    notes=notes)
            plan.notes.extend(n for n in notes if n not in plan.notes and not n.startswith("calibrated block by"))
            return info
        steps = fe.refit_steps(todo)
        notes: list[str] = []
        # a layer whose output does not reach the model's output (no gradient flows back to it: sensitivity 0,
        # e.g. a pooler whose result the model's forward drops) cannot change the model's error: it is fitted on
        # its original inputs, and the refit never runs the compressed model up to it
        unseen = {s.name for s in todo if s.sensitivity == 0}
        if unseen:
            notes.append(f"{len(unseen)} layer(s) whose output does not reach the model's output (sensitivity 0: "
                         f"{', '.join(sorted(unseen)[:3])}{', ...' if len(unseen) > 3 else ''}) fitted on their "
                         "original inputs")
        store = Store(o.max_activation_mb * 2**20, "refit activations")
        try:
            keys = []
            with section(D, "starting the refit"):
                for i, batch in enumerate(data.fit()):
                    store.put(i, fe.start(batch))
                    keys.append(i)
            if D is not None:
                D.same("the refit steps", [[s.name for s in step] for step in steps])
            for si, step in enumerate(steps):
                accs = {s.name: _accumulator(s) for s in step}
                seen = dict.fromkeys(accs, False)
                with section(D, f"refitting {step[0].name}"):
                    for key in keys:
                        env = store.get(key)
                        given: dict[tuple, list] = {}  # layers given the very same pair: one accumulation
                        for s in step:
                            pair = fe.site_inputs(env, s, original=s.name in unseen)
                            if pair is None:
                                continue
                            share = (id(pair[0]), id(pair[1]), s.spec.d_in, s.spec.groups) \
                                if s.spec.op == "linear" else (id(s),)
                            given.setdefault(share, [pair]).append(s)
                            seen[s.name] = True
                        for pair, first, *rest in given.values():
                            _accumulate(accs[first.name], first, *pair, others=tuple(accs[s.name] for s in rest))
                if D is not None:  # the union of the shards' statistics
                    flags = D.gather([seen[s.name] for s in step])
                    for j, s in enumerate(step):
                        seen[s.name] = any(f[j] for f in flags)
                        if seen[s.name]:
                            sum_cross(D, accs[s.name])
                for s in step:
                    if seen[s.name] and not _finite(accs[s.name]):
                        notes.append(f"{s.name}: its inputs overflow (inf/NaN) in the refit; fitted data-free")
                        seen[s.name] = False

                def make(s: Site, seen=seen, accs=accs):
                    d = decisions[s.name]
                    if not seen[s.name]:
                        return _build(s, d, plan.options, plan.seed, "lstsq" if build_init == "calibrated"
                                      else build_init)
                    W_t, grams, wc = refit_target(s.dense.weight, accs[s.name], s.spec.groups, o.shrink)
                    return _build(s, d, plan.options, plan.seed, build_init, grams, W_t, wc)

                for s, module in zip(step, _made(D, step, make, counter)):
                    fe.replace(s, module)
                    adv(1, s.name)
                del accs, make
                if si + 1 < len(steps):
                    with section(D, f"running the models past {step[-1].name}"):
                        for key in keys:
                            store.put(key, fe.advance(si, store.get(key)))
            info = {"refit_steps": len(steps), "store_peak_mb": round(store.peak_bytes / 2**20, 1),
                    "store_spilled": store.spilled}
            plan.notes.extend(n for n in notes if n not in plan.notes)
        finally:
            store.close()
            fe.end_refit()
    return info


# --------------------------------------------------------------------------- verify
def verify(fe: Frontend, emitted: Any, sites: list[Site], plan: Plan, data: Calib, o: Options) -> dict:
    """Both models on the held-out batches: the measured output error of the model (``fe.metric``), and the
    relative error of every factored layer's output (recorded in the decisions)."""
    factored = [s for s in sites if plan[s.name].decision.method != "dense"]
    num = den = 0.0
    lnum = {s.name: 0.0 for s in factored}
    lden = {s.name: 0.0 for s in factored}
    samples = batches = 0
    D = world()
    # the original model's outputs of every factored layer are held for the comparison: a held-out batch is
    # compared in pieces within max_activation_mb (the errors are sums over samples)
    per_sample = 4 * sum(s.spec.p_out * s.spec.d_out for s in factored)
    with progress_bar("verifying", None, o.progress) as adv, section(D, "verifying"):
        for batch in data.held_out():
            for part in data.pieces(batch, per_sample):
                ref, out, layers = fe.compare(emitted, part, factored)
                if len(ref) != len(out):
                    raise RuntimeError(f"the emitted model has {len(out)} float outputs, the original {len(ref)}")
                for a, b in zip(ref, out):
                    if a.shape != b.shape:
                        raise RuntimeError(f"the emitted model's output has shape {tuple(b.shape)}, the original's "
                                           f"{tuple(a.shape)}")
                n_, d_ = fe.metric.errors(ref, out, fe.output_mask(part))
                num, den = num + n_, den + d_
                del ref, out
                for name, (ln, ld) in layers.items():
                    lnum[name] += ln
                    lden[name] += ld
            n = data.size(batch)
            samples += n
            batches += 1
            adv(n)
    if D is not None:  # the union of the ranks' held-out batches
        names = [s.name for s in factored]
        flat = D.sum_numbers([num, den, samples, batches] + [lnum[k] for k in names] + [lden[k] for k in names])
        num, den, samples, batches = flat[0], flat[1], int(flat[2]), int(flat[3])
        lnum = dict(zip(names, flat[4:4 + len(names)]))
        lden = dict(zip(names, flat[4 + len(names):]))
    if batches == 0:
        return {"measured": None, "samples": 0, "batches": 0}
    for s in factored:
        plan[s.name].decision.measured_error = lnum[s.name] / lden[s.name] if lden[s.name] > 0 else 0.0
    measured = num / den if den > 0 else (0.0 if num == 0 else math.inf)
    return {"measured": measured, "samples": samples, "batches": batches}


def attribute(fe: Frontend, factored: list[Site], data: Calib, o: Options) -> dict[str, tuple[float, float]]:
    """Every factored layer's single-layer output error (:meth:`Frontend.single_layer_errors`) on the first
    ``sensitivity_samples`` held-out samples.  Data-parallel: rank 0's samples, sent to every rank, each rank
    measuring the layers it owns."""
    D = world()
    kept: list = []
    with section(D, "attributing the output error"):
        if D is None or D.rank == 0:
            have = 0
            for batch in data.held_out():
                if have >= max(o.sensitivity_samples, 1):
                    break
                kept.append(data.head(batch, max(o.sensitivity_samples, 1) - have))
                have += data.size(kept[-1])
    if D is None:
        return fe.single_layer_errors(factored, kept)
    kept = D.broadcast(kept)
    return D.spread("attributing the output error", factored, lambda mine: fe.single_layer_errors(mine, kept))


def ratio_of(measured: float | None, predicted: float) -> float | None:
    if measured is None:
        return None
    if predicted <= 1e-12:
        return 1.0 if measured <= 1e-12 else math.inf
    return measured / predicted


def within(ratio: float | None, tol: float) -> bool:
    return ratio is not None and 1.0 / tol <= ratio <= tol


def corrections(plan: Plan, single: dict[str, tuple[float, float]], measured: float) -> dict[str, float]:
    """New per-layer corrections from the single-layer measurements (see the module docstring)."""
    gains, ratios = {}, []
    for lp in plan.layers:
        name = lp.spec.name
        if name not in single or lp.decision.predicted_error <= 0 or lp.sensitivity <= 0:
            continue
        n, d = single[name]
        E = n / d if d > 0 else 0.0
        lp.measured_output_error = E
        gain = E / lp.decision.predicted_error
        gains[name] = gain
        ratios.append(max(gain / lp.sensitivity, 1e-12))
    if not gains:
        return {}
    total = sum(lp.measured_output_error or 0.0 for lp in plan.layers if lp.spec.name in gains)
    interaction = measured / total if total > 0 else 1.0
    median = statistics.median(ratios)
    out = {}
    for lp in plan.layers:
        base = gains[lp.spec.name] / lp.sensitivity if lp.spec.name in gains and lp.sensitivity > 0 else median
        out[lp.spec.name] = float(min(max(base * interaction, 1e-6), 1e6))
    return out


# =========================================================================== plan / apply
@dataclass
class Planned:
    plan: Plan
    model: Any = None


def _open_data(fe: Frontend, calib, o: Options, timed: bool = False) -> tuple[Calib | None, Any]:
    D = world()
    if D is not None:
        if fe.name != "torch":
            raise ValueError(f"data-parallel calibration ({D.size} processes) is for PyTorch models; run the ONNX pass "
                             "in one process")
        if timed:
            raise ValueError(f"a latency budget is timed on one process and its device: run it without torchrun (this "
                             f"is rank {D.rank} of {D.size})")
        if calib is None:
            raise ValueError("data-parallel calibration needs calib=: each rank's own shard of the calibration data")
    data = first = None
    with section(D, "reading the calibration data"):
        if calib is None:
            fe.prepare(None)
        else:
            data = fe.calib(calib, o)
            first = data.first()
            if first is None:
                raise ValueError("the calibration data yielded no batches")
            fe.prepare(first)
    if D is not None:  # the collectives follow the model's structure: it must be the same everywhere
        D.same("the model's layers and how the pass runs them",
               (fe.capture, [(s.name, s.skip) for s in fe.sites()], fe.notes))
        fe.notes.append(f"data-parallel calibration over {D.size} processes ({D.backend}): statistics summed over the "
                        "ranks' shards, layers' fits spread over the ranks")
    return data, first


def _calib_record(data: Calib | None) -> dict | None:
    """What the plan records of the calibration data (data-parallel: summed over the ranks; every rank calls
    this at the same point)."""
    D = world()
    if data is None or (data.counts is None and D is None):
        return None
    c = data.counts or {"batches": 0, "samples": 0, "holdout_batches": 0, "holdout_samples": 0}
    if D is not None:
        keys = ("batches", "samples", "holdout_batches", "holdout_samples")
        c = dict(zip(keys, (int(v) for v in D.sum_numbers([c.get(k, 0) for k in keys]))))
        c["ranks"] = D.size
    out = {"samples": c["samples"], "batches": c["batches"]}
    if c["holdout_batches"]:
        out.update(holdout_samples=c["holdout_samples"], holdout_batches=c["holdout_batches"])
    if "ranks" in c:
        out["ranks"] = c["ranks"]
    return out


def run_plan(fe: Frontend, budget: Budget, calib, o: Options, ignore: Iterable[str] = (), overrides: dict | None = None,
             build: bool = True) -> Planned:
    """Every stage: the plan, and (``build``) the emitted model of the round that was kept."""
    o.check_frontend(fe.name)
    clock = Clock()
    with clock("capture"):
        data, first = _open_data(fe, calib, o, timed=budget.timed)
    try:
        # ------------------------------------------------------------- find sites
        sites = fe.sites()
        notes = list(fe.notes)
        if o.metric == "auto" and fe.metric.name == "kl":
            notes.append("output error counted as the mean KL divergence of the next-token distributions "
                         "(metric='kl', the default for a language model; metric='mse' counts the logits' "
                         "relative squared error)")
        o = o.replace(metric=fe.metric.name)
        apply_ignore(sites, ignore)
        nothing = fe.nothing_to_compress(sites)
        if nothing:
            notes.append(nothing)
        # ------------------------------------------------------------- observe, and every layer's candidates
        units = tuple(u for u in ("params", "flops") if getattr(budget, u) is not None)  # forms must be cheaper in
        chosen: dict[str, Choices] = {}

        D = world()

        def done(group: list[Site], whole: bool) -> None:  # a group's statistics are complete: its candidates
            def work(mine: list[Site]) -> dict[str, Choices]:
                return dict(zip([s.name for s in mine], candidates(mine, units, o, True, overrides or {},
                                                                   o.progress if whole else False)))

            with clock("candidates"):  # data-parallel: every layer's candidates from its owner
                chosen.update(work(group) if D is None else D.spread("computing candidate forms", group, work))

        if data is not None:
            t0 = time.perf_counter()
            before = clock.seconds.get("candidates", 0.0)
            obs = observe(fe, sites, data, o, done=done, notes=notes)
            clock.add("calibration", time.perf_counter() - t0 - (clock.seconds.get("candidates", 0.0) - before))
        else:
            obs = None
            notes.append("no calibration data: data-free fits (weight error), every layer weighted equally")
            notes += fe.positions_without_data(sites, o.example_inputs)
            if budget.flops is not None and o.example_inputs is None and any(
                    "one position per sample" in n for n in notes):
                raise ValueError("a flops budget needs input shapes: pass calib= (or example_inputs= for data-free "
                                 "fits)")
        model_params = fe.model_params(sites)
        notes += [n for n in fe.notes if n not in notes]
        model_macs = max(fe.model_macs(sites, first if first is not None else o.example_inputs),
                         sum(s.spec.macs for s in sites if s.spec.d_in))
        if D is not None:
            model_macs = D.broadcast(model_macs)  # rank 0's first batch, as a single process would count
        # ------------------------------------------------------------- sensitivities
        if obs is not None:
            with clock("sensitivity"):
                measure_sensitivities(fe, sites, obs.kept, o, notes, data)
            obs.kept.clear()
        # ------------------------------------------------------------- candidates (the rest: fixed, or data-free)
        rest = [s for s in sites if s.name not in chosen]
        with clock("candidates"):
            for s, c in zip(rest, candidates(rest, units, o, data is not None, overrides or {}, o.progress)):
                chosen[s.name] = c
        choices = [chosen[s.name] for s in sites]
        for s in sites:
            s.gram = None  # the candidates hold what the solver needs: the Grams can go
        # ------------------------------------------------------------- latency: time the forms on the target
        lat = None
        if budget.timed:
            with clock("latency timing"):
                lat = setup_latency(fe, sites, choices, first, o)
        # ------------------------------------------------------------- solve
        weights = [s.sensitivity for s in sites]
        try:
            decisions = choose(choices, weights, budget, model_params=model_params, model_macs=model_macs,
                               granularity=o.granularity, l=o.l, latency=lat)
        except InfeasibleBudgetError as exc:
            raise InfeasibleBudgetError(f"{exc} — {nothing}" if nothing else str(exc)) from None
        if data is not None:
            notes += [n for n in data.notes if n not in notes]
        calib_rec = _calib_record(data)
        if calib_rec is not None and obs is not None:
            calib_rec.update(mode=obs.mode, peak_gram_mb=round(obs.peak_gram_bytes / 2**20, 3))
        plan = make_plan(choices, decisions, sites, budget=budget, o=o, frontend=fe.name, capture=fe.capture,
                         calib=calib_rec, notes=notes, model_params=model_params, model_macs=model_macs,
                         has_calib=data is not None)
        for lp, c in zip(plan.layers, choices):
            lp.dense_ms = c.dense_ms
        if lat is not None:
            plan.latency = {"target": lat["target"].to_dict(), "dense_ms": lat["total"],
                            "predicted_ms": predicted_latency(plan, lat), "input_shapes": lat["shapes"]}
        nothing_held = data is not None and not (calib_rec or {}).get("holdout_batches")
        if not build and lat is None and (data is None or not o.holdout or o.init == "random" or nothing_held):
            finish_unverified(plan, data, o)  # nothing to measure: no need to fit now
            plan.timings = clock.record()
            return Planned(plan)
        # ------------------------------------------------------------- fit, export, verify (⟲)
        return close_loop(fe, sites, plan, choices, budget, data, o, model_params, model_macs, build, lat, clock)
    finally:
        if data is not None:
            data.close()
        _close(fe)


def _close(fe: Frontend) -> None:
    """Let the frontend drop what it kept between the stages (optional: ``fe.close()``)."""
    close = getattr(fe, "close", None)
    if callable(close):
        close()


def _shapes(batch) -> dict:
    if hasattr(batch, "shape"):
        return {"input": list(batch.shape)}
    if isinstance(batch, dict):
        return {str(k): list(v.shape) for k, v in batch.items() if hasattr(v, "shape")}
    return {f"input {i}": list(v.shape) for i, v in enumerate(batch) if hasattr(v, "shape")}


def setup_latency(fe: Frontend, sites: list[Site], choices: list[Choices], first, o: Options) -> dict:
    """Resolve the target, time the dense model and every free layer's forms (see
    :mod:`sketchpass.latency.stage`); the context the solver and the loop use."""
    from .latency import TimingCache, resolve_target
    from .latency.stage import time_candidates

    target = resolve_target(o.target, fe.name, o.threads)
    batch = fe.timing_batch(first, o.example_inputs)
    if batch is None:
        raise ValueError("a latency budget needs input shapes: pass calib= (batches of the shape the model will run "
                         "at) or example_inputs=")
    cache = TimingCache(o.timing_table)
    t0 = time.perf_counter()
    with progress_bar("timing", sum(c.fixed is None for c in choices), o.progress) as adv:
        dense = fe.time_models({"dense": fe.dense_model()}, batch, target)["dense"]
        info = time_candidates(fe, sites, choices, target, cache, l=o.l, max_svd=o.timing_sizes, progress=adv)
    info["timing_s"] = round(time.perf_counter() - t0, 2)  # the stage's wall time (the table makes it short)
    return {"target": target, "batch": batch, "shapes": _shapes(batch), "total": dense.ms, "dense": dense,
            "offset": 0.0, "info": info}


def run_profile(fe: Frontend, calib, o: Options, overrides: dict | None = None) -> dict:
    """Time every candidate form of every layer on the target and store them in the timing table (the stages
    of :func:`run_plan` up to the timing; nothing is fitted): what ``sketchpass profile`` runs, so that later
    plans on the same device read their layer times from the table."""
    o.check_frontend(fe.name)
    data, first = _open_data(fe, calib, o, timed=True)
    try:
        sites = fe.sites()
        if data is not None:
            record_observation(sites, observe(fe, sites, data, o.replace(sensitivity_samples=0)), o, [])
        else:
            fe.positions_without_data(sites, o.example_inputs)
        choices = candidates(sites, (), o, data is not None, overrides or {}, o.progress)
        lat = setup_latency(fe, sites, choices, first, o)
    finally:
        if data is not None:
            data.close()
    layers = [{"name": s.name, "dense_ms": c.dense_ms, "fastest_ms": min((f.ms for f in c.forms), default=None),
               "forms": len(c.forms)} for s, c in zip(sites, choices) if c.dense_ms is not None]
    return {"target": lat["target"].to_dict(), "dense_ms": lat["total"], "input_shapes": lat["shapes"],
            "layers": layers, **lat["info"]}


def finish_unverified(plan: Plan, data: Calib | None, o: Options) -> None:
    why = ("no calibration data" if data is None else "init='random' builds fresh factors" if o.init == "random"
           else "holdout=0" if not o.holdout else "nothing to hold out (one batch of one sample)")
    plan.verify = {"measured": None, "predicted": plan.totals["predicted_output_error"], "reason": why}
    if f"output error not measured: {why}" not in plan.notes:
        plan.notes.append(f"output error not measured: {why}")


def _next_plan(choices, decisions, sites, budget, o, fe, current, plan, model_params, model_macs, corr):
    nxt = make_plan(choices, decisions, sites, budget=budget, o=o, frontend=fe.name, capture=fe.capture,
                    calib=current.calib, notes=list(plan.notes), model_params=model_params, model_macs=model_macs,
                    has_calib=current.calib is not None)
    for lp, c in zip(nxt.layers, choices):
        lp.correction = corr.get(lp.spec.name, 1.0)
        lp.dense_ms = c.dense_ms
        old = current[lp.spec.name]
        same = (old.decision.method, old.decision.size) == (lp.decision.method, lp.decision.size)
        lp.measured_output_error = old.measured_output_error if same else None
    nxt.recompute_totals(model_params, model_macs)
    return nxt


def _same(decisions, plan: Plan) -> bool:
    return [(d.method, d.size) for d in decisions] == [(lp.decision.method, lp.decision.size) for lp in plan.layers]


def predicted_latency(plan: Plan, lat: dict) -> float:
    """The solver's latency of ``plan``: the dense total, less the free layers' dense times, plus their chosen
    forms' times, plus the offset the whole-model measurements found."""
    free = [lp for lp in plan.layers if lp.dense_ms is not None]
    return lat["total"] + lat["offset"] + sum((lp.decision.ms or lp.dense_ms) - lp.dense_ms for lp in free)


def measure_latency(fe: Frontend, emitted: Any, lat: dict) -> dict:
    """The emitted model against the dense one, interleaved, on the timing batch.  For a fraction budget
    the compressed model's time is compared as ``ratio × the dense time measured when planning`` (a slower
    or faster spell of the machine moves both models alike)."""
    ab = fe.time_models({"dense": fe.dense_model(), "small": emitted}, lat["batch"], lat["target"])
    d, c = ab["dense"], ab["small"]
    ratio = c.ms / d.ms
    scale = lat["total"] / d.ms
    return {"dense_ms": d.ms, "dense_spread": d.spread, "ms": c.ms, "spread": c.spread, "ratio": ratio,
            "normalised_ms": c.ms * scale, "normalised_spread": c.spread * scale}


def close_loop(fe: Frontend, sites: list[Site], plan: Plan, choices: list[Choices], budget: Budget,
               data: Calib | None, o: Options, model_params: int, model_macs: int, build: bool,
               lat: dict | None = None, clock: Clock | None = None) -> Planned:
    """Fit, emit and measure the plan.  With a latency budget, while the emitted model misses it, the
    offset between the layer times and the whole model's takes up the measured difference and the solver
    runs again (``latency_rounds``); while measured and predicted output errors disagree by more than the
    tolerance, the error is attributed to layers, their weights corrected and the solver run again
    (``rounds``)."""
    clock = clock or Clock()
    rounds: list[dict] = []
    results: list[tuple] = []  # (measured error, plan, emitted, closed, latency met) of every round
    can_verify = bool(data is not None and o.holdout and o.init != "random")
    current = plan
    limit = None
    if lat is not None:
        limit = budget.limits({"params": float(model_params), "flops": float(model_macs), "latency": lat["total"]})[
            "latency"]
    err_rounds = lat_rounds = 0
    corr: dict[str, float] = {}
    while True:
        with clock("fit"):
            info = fit_and_rewrite(fe, sites, current, data, o)
            emitted = fe.export(current)
        with clock("verify"):
            ver = verify(fe, emitted, sites, current, data, o) if can_verify else {"measured": None}
        if ver["measured"] is None:
            finish_unverified(current, data, o)
        predicted = current.totals["predicted_output_error"]
        ratio = ratio_of(ver["measured"], predicted)
        prev = rounds[-1]["decisions"] if rounds else None
        now = {lp.spec.name: (lp.decision.method, lp.decision.size) for lp in current.layers}
        rec = {"round": len(rounds), "predicted": predicted, "measured": ver["measured"], "ratio": ratio,
               "params": current.achieved().get("params"), "flops": current.achieved().get("flops"),
               "changed_layers": 0 if prev is None else sum(prev[k] != v for k, v in now.items()),
               "decisions": now, **info}
        lat_ok = True
        if lat is not None:
            with clock("latency timing"):
                m = measure_latency(fe, emitted, lat)
            pred_ms = predicted_latency(current, lat)
            lat_ok = within_latency(m["normalised_ms"], m["normalised_spread"], limit, lat["total"]) and m["ratio"] < 1
            rec.update(latency_predicted_ms=pred_ms, latency_ms=m["normalised_ms"],
                       latency_spread=m["normalised_spread"], latency_ratio=m["ratio"], latency_met=lat_ok,
                       latency_offset=lat["offset"])
            current.latency = {**(current.latency or {}), "measured": m, "predicted_ms": pred_ms,
                               "requested_ms": limit, "met": lat_ok}
        rounds.append(rec)
        if ver["measured"] is not None and not math.isfinite(ver["measured"]):
            bad = [lp.spec.name for lp in current.layers if lp.decision.measured_error is not None
                   and not math.isfinite(lp.decision.measured_error)]
            raise RuntimeError(f"the compressed model's outputs on the held-out batches are not finite (measured "
                               f"output error {ver['measured']}) in round {len(rounds) - 1} of the verify loop: a "
                               f"factored layer gives inf/NaN" + (f" (first: {', '.join(bad[:3])})" if bad else ""))
        if ver["measured"] is not None:
            current.totals["measured_output_error"] = ver["measured"]
        results.append((ver["measured"], current, emitted, within(ratio, o.tolerance), lat_ok))
        # ---- the latency budget first: it must hold
        if lat is not None and not lat_ok and lat_rounds < o.latency_rounds:
            lat_rounds += 1
            if not lat.get("retimed") and suspect_table(m["ratio"], m["normalised_ms"], pred_ms, lat["total"]):
                # so far off that the layer times are in doubt: time every offered form again, once
                with progress_bar("re-timing", sum(c.fixed is None for c in choices), o.progress) as adv:
                    info = time_candidates(fe, sites, choices, lat["target"], TimingCache(o.timing_table), l=o.l,
                                           max_svd=o.timing_sizes, progress=adv, refresh=True)
                lat["retimed"], lat["since"], lat["offset"] = True, len(rounds), 0.0
                lat["info"]["forms_retimed"] = info["forms_timed"]
                rec["note"] = (f"measured {m['normalised_ms']:.3g} ms against {pred_ms:.3g} ms predicted: every "
                               "layer form timed again (the table's times were in doubt)")
            else:
                # the offset from what the whole model took against what its layer times predict, over the rounds
                # measured since the layer times were last taken (a constant part from one round; with more, a
                # line through them: next_offset)
                lat["offset"] = next_offset([(r["latency_predicted_ms"] - r["latency_offset"] - lat["total"],
                                              r["latency_ms"]) for r in rounds[lat.get("since", 0):]
                                             if "latency_ms" in r], lat["total"], limit)
            weights = [s.sensitivity * corr.get(s.name, 1.0) for s in sites]
            try:
                decisions = choose(choices, weights, budget, model_params=model_params, model_macs=model_macs,
                                   granularity=o.granularity, l=o.l, latency=lat)
            except InfeasibleBudgetError as exc:
                rec["note"] = f"latency correction: {exc}"
                break
            if _same(decisions, current):
                rec["note"] = "the corrected latency offset gives the same plan"
                break
            current = _next_plan(choices, decisions, sites, budget, o, fe, current, plan, model_params, model_macs,
                                 corr)
            continue
        if not can_verify or within(ratio, o.tolerance) or err_rounds >= o.rounds:
            break
        # ---- attribute the error to layers, correct their weights, solve again
        err_rounds += 1
        factored = [s for s in sites if current[s.name].decision.method != "dense"]
        with progress_bar("attributing", None, o.progress):
            with clock("attribute"):
                single = attribute(fe, factored, data, o)
        corr = corrections(current, single, ver["measured"])
        rec["alone"] = {lp.spec.name: lp.measured_output_error for lp in current.layers
                        if lp.measured_output_error is not None}
        if not corr:
            break
        weights = [s.sensitivity * corr.get(s.name, 1.0) for s in sites]
        decisions = choose(choices, weights, budget, model_params=model_params, model_macs=model_macs,
                           granularity=o.granularity, l=o.l, latency=lat)
        if _same(decisions, current):
            rec["note"] = "the corrected weights give the same plan"
            break
        current = _next_plan(choices, decisions, sites, budget, o, fe, current, plan, model_params, model_macs, corr)
    for rr in rounds:
        rr.pop("decisions")
    usable = [i for i, r in enumerate(results) if r[4]]
    if not usable:
        fastest = min(r["latency_ms"] for r in rounds)
        tried = ", ".join(format(r["latency_ms"], ".3g") for r in rounds)
        raise InfeasibleBudgetError(
            f"the latency budget {limit:.3g} ms could not be met on {lat['target'].name}: the emitted models measured "
            f"{tried} ms (fastest {fastest:.3g} ms; dense "
            f"{lat['total']:.3g} ms) after {len(rounds)} round(s); relax the budget or combine it with a params= or "
            f"flops= limit")
    if can_verify:
        # the round with the lowest measured error; within 5% of it, one whose prediction held, the later first
        low = min(results[i][0] for i in usable)
        near = [i for i in usable if results[i][0] <= 1.05 * low]
        kept_round = max(near, key=lambda i: (results[i][3], i))
    else:
        kept_round = usable[-1]
    measured, chosen, emitted = results[kept_round][:3]
    if lat is not None:
        chosen.latency = {**chosen.latency, "target": lat["target"].to_dict(), "dense_ms": lat["total"],
                          "dense_spread": lat["dense"].spread, "input_shapes": lat["shapes"], **lat["info"],
                          "rounds": [{k: r[k] for k in r if k.startswith("latency") or k == "round"} for r in rounds],
                          "kept_round": kept_round}
    chosen.timings = clock.record()
    if not can_verify:
        fe.stamp(emitted, chosen)
        return Planned(chosen, emitted if build else None)
    ratio = ratio_of(measured, chosen.totals["predicted_output_error"])
    ver = {"predicted": chosen.totals["predicted_output_error"], "measured": measured, "ratio": ratio,
           "samples": (chosen.calib or {}).get("holdout_samples", 0),
           "batches": (chosen.calib or {}).get("holdout_batches", 0),
           "tolerance": o.tolerance, "rounds": rounds, "kept_round": kept_round, "closed": within(ratio, o.tolerance),
           "warning": None}
    if not ver["closed"]:
        why = (rounds[-1].get("note") or f"{len(rounds)} round(s)") if o.rounds else "rounds=0"
        ver["warning"] = (f"measured output error {measured:.4g} is {ratio:.3g}× the predicted {ver['predicted']:.4g} "
                          f"(tolerance {o.tolerance:g}×; verify loop: {why}): the per-layer predictions do not hold on "
                          f"this model; check the result on your own metric")
    chosen.verify = ver
    if chosen is not plan and len(rounds) > 1:
        chosen.notes.append(f"verify loop: kept round {kept_round} of {len(rounds)} (lowest measured output error, "
                            "or within 5% of it with a prediction that held)")
    fe.stamp(emitted, chosen)
    return Planned(chosen, emitted if build else None)


def run_apply(fe: Frontend, plan: Plan, calib, o: Options) -> Any:
    """Rewrite a copy of the model as ``plan`` says (refitting on ``calib``), emit it and verify it."""
    import copy

    o.check_frontend(fe.name)
    if not isinstance(plan, Plan):
        raise TypeError(f"apply expects a sketchpass.Plan, got {type(plan).__name__} (use Plan.from_json)")
    data, first = _open_data(fe, calib, o)
    try:
        sites = {s.name: s for s in fe.sites()}
        out = copy.deepcopy(plan)
        out.verify = None
        out.options["metric"] = fe.metric.name  # the plan's own (``mse`` for plans made before metric=)
        for lp in out.layers:
            lp.decision.measured_error = None
        for lp in out.layers:
            d = lp.decision
            if lp.spec.name not in sites:
                if d.method != "dense":
                    raise ValueError(f"layer {lp.spec.name!r} of the plan is not in this model (it has: "
                                     f"{', '.join(list(sites)[:8])}...); was the plan made for another model?")
                continue
            s = sites[lp.spec.name]
            if d.method == "dense":
                continue
            spec = s.spec
            if (spec.d_in, spec.d_out, spec.groups) != (lp.spec.d_in, lp.spec.d_out, lp.spec.groups):
                raise ValueError(f"layer {spec.name!r}: the plan expects {lp.spec.d_in}→{lp.spec.d_out} (groups "
                                 f"{lp.spec.groups}), the model has {spec.d_in}→{spec.d_out} (groups {spec.groups}); "
                                 "was the plan made for another model?")
            if s.skip is not None and not s.skip.factorable:
                raise ValueError(f"layer {spec.name!r} cannot be factored here: {s.detail}")
            s.skip = None
            s.sensitivity = lp.sensitivity  # as planned (a layer of sensitivity 0 is fitted on its original inputs)
        names = set(out.names())
        fe_sites = [s for n, s in sites.items() if n in names]
        info = fit_and_rewrite(fe, fe_sites, out, data if out.options.get("init") != "random" else None, o)
        emitted = fe.export(out)
        out.calib = _calib_record(data) if data is not None else None
        if data is None or not o.holdout or out.options.get("init") == "random":
            finish_unverified(out, data, o.replace(init=out.options.get("init", "auto")))
        else:
            ver = verify(fe, emitted, fe_sites, out, data, o)
            predicted = out.totals.get("predicted_output_error", out.predicted_output_error())
            if ver["measured"] is None:
                finish_unverified(out, data, o)
            else:
                ratio = ratio_of(ver["measured"], predicted)
                out.totals["measured_output_error"] = ver["measured"]
                out.verify = {"predicted": predicted, "measured": ver["measured"], "ratio": ratio,
                              "samples": ver["samples"], "batches": ver["batches"], "tolerance": o.tolerance,
                              "rounds": [{"round": 0, "predicted": predicted, "measured": ver["measured"],
                                          "ratio": ratio, **info}],
                              "kept_round": 0, "closed": within(ratio, o.tolerance), "warning": None}
                if not out.verify["closed"]:
                    out.verify["warning"] = (f"measured output error {ver['measured']:.4g} is {ratio:.3g}× the "
                                             f"predicted {predicted:.4g} (tolerance {o.tolerance:g}×): the plan's "
                                             "per-layer predictions do not hold here; check the result on your "
                                             "own metric")
        if out.latency is not None and ("latency" in out.budget or "latency_ms" in out.budget) and world() is None:
            # the plan was made for a latency budget: measure what this application emitted, on its target
            from .latency import resolve_target

            target = resolve_target(o.target or out.latency.get("target", {}).get("name"), fe.name, o.threads)
            batch = fe.timing_batch(first, None)
            if batch is not None:
                ab = fe.time_models({"dense": fe.dense_model(), "small": emitted}, batch, target)
                out.latency = {**out.latency, "applied": {"target": target.to_dict(), "dense_ms": ab["dense"].ms,
                                                          "dense_spread": ab["dense"].spread, "ms": ab["small"].ms,
                                                          "spread": ab["small"].spread,
                                                          "ratio": ab["small"].ms / ab["dense"].ms}}
        fe.stamp(emitted, out)
        return emitted
    finally:
        if data is not None:
            data.close()
        _close(fe)
