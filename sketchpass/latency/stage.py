"""The latency stages of the pipeline (frontend-agnostic: the frontend times, this decides).

**Candidates on measured costs.**  Every free layer's dense form and a subset of its candidate forms (all
sketch sizes, at most ``timing_sizes`` svd ranks spread over the grid) are timed together as standalone
subgraphs on the layer's real input shape (:meth:`Frontend.time_forms`), or read from the timing table.
A form is only offered when it measures faster than the dense layer (the never-slower rule), and only
the forms on the Pareto front of (measured time, predicted error) are kept: latency is not monotone in
the rank, and a slower form with a larger error is never worth having.

**The whole model.**  Layer times do not add up exactly to the model's (fusions, memory traffic,
threading across layers).  The solver's latency of a plan is the dense model's measured time, less the
dense times of the free layers, plus their chosen forms' times, plus an ``offset``; after the emitted model
is measured against the dense one (interleaved A/B), the offset takes up the difference and the solver
runs again (:func:`sketchpass.pipeline.close_loop`).
"""

from __future__ import annotations

from ..candidates import Form
from ..site import Site
from .cache import TimingCache
from .targets import Target


def timed_subset(forms: list[Form], max_svd: int) -> list[Form]:
    """All sketch forms, and at most ``max_svd`` svd ranks evenly spread over the grid (smallest and
    largest kept)."""
    svd = [f for f in forms if f.method == "svd"]
    if len(svd) > max_svd:
        idx = sorted({round(i * (len(svd) - 1) / (max_svd - 1)) for i in range(max_svd)}) if max_svd > 1 else [0]
        svd = [svd[i] for i in idx]
    return svd + [f for f in forms if f.method != "svd"]


def pareto(forms: list[Form], dense_ms: float) -> list[Form]:
    """The forms faster than dense and not beaten by a faster form with a smaller error."""
    out, best = [], float("inf")
    for f in sorted((f for f in forms if f.ms is not None and f.ms < dense_ms), key=lambda f: (f.ms, f.error)):
        if f.error < best:
            out.append(f)
            best = f.error
    return out


def form_key(target: Target, site: Site, method: str, size: int | None, l: int, extra: str) -> str:
    s = site.spec
    geo = f"{s.op}:{s.d_in}>{s.d_out}:k{s.kernel}:s{s.stride}:p{s.padding}:d{s.dilation}:g{s.groups}:b{int(s.bias)}"
    shape = "x".join(map(str, site.extra["input_shape"]))
    return f"{target.key()}|{geo}|in{shape}:{site.extra.get('input_dtype')}|{extra}|{method}:{size}:{l}"


def time_candidates(fe, sites: list[Site], choices: list, target: Target, cache: TimingCache, *, l: int,
                    max_svd: int, progress=None, refresh: bool = False) -> dict:
    """Attach measured times to every free layer's dense form and candidate forms (see module docstring);
    returns how many forms were timed and how many came from the table.  ``refresh``: time every form
    again and overwrite its table entry."""
    timed = cached = 0
    free = [(s, c) for s, c in zip(sites, choices) if c.fixed is None]
    for s, _ in free:
        if "input_shape" not in s.extra:
            raise ValueError(f"layer {s.name!r} has no recorded input shape: a latency budget needs calib= or "
                             "example_inputs= (inputs of the shape the model will run at)")
    extra = fe.timing_signature()
    for s, c in free:
        forms = timed_subset(c.forms, max_svd)
        todo = [("dense", "dense", None, 1)] + [(f"{f.method}:{f.size}", f.method, f.size, l) for f in forms]
        keys = {k: form_key(target, s, m, size, ll, extra) for k, m, size, ll in todo}
        got = {k: (None if refresh else cache.get(keys[k])) for k, *_ in todo}
        missing = [t for t in todo if got[t[0]] is None]
        if missing:
            # the dense form is timed with the others when any is missing, so their ratios are measured together
            run = missing if got["dense"] is not None and len(missing) < len(todo) else todo
            fresh = fe.time_forms(s, run, target)
            for k, t in fresh.items():
                cache.put(keys[k], t)
                got[k] = t
            timed += len(run)
        cached += len(todo) - len(missing)
        c.dense_ms, c.dense_spread = got["dense"].ms, got["dense"].spread
        for f in forms:
            t = got[f"{f.method}:{f.size}"]
            f.ms, f.spread = t.ms, t.spread
        c.forms = pareto(forms, c.dense_ms)
        if progress:
            progress(1, s.name)
    cache.save()
    return {"forms_timed": timed, "forms_from_table": cached, "table": str(cache.path)}


def suspect_table(measured_ratio: float, measured_ms: float, predicted_ms: float, total: float) -> bool:
    """The emitted model measured so far from its prediction that the layer times it was planned on are in
    doubt (timed on a busy machine, or a table from another setup): slower than dense, or a quarter of the
    dense time off the prediction."""
    return measured_ratio >= 1.0 or abs(measured_ms - predicted_ms) > 0.25 * total


def within_latency(measured: float, spread: float, limit: float, dense: float) -> bool:
    """Met: at most the limit within the measured spread and at most 3% over it, and faster than dense."""
    return measured - spread <= limit and measured <= 1.03 * limit and measured < dense


def next_offset(rounds: list[tuple[float, float]], total: float, limit: float) -> float:
    """The offset for the next solve from the rounds measured so far, each ``(layer_delta, measured)``: the
    sum over the free layers of (chosen form's time − dense time) and the whole emitted model's time.

    The solver predicts ``total + offset + layer_delta``.  Layer times measured one by one do not add up to
    the whole model's exactly: there is a constant part (per-node overhead, memory traffic between layers)
    and a proportional one (a saving measured alone is worth ``α`` of it inside the model).  One round gives
    the constant part alone (``offset = measured − total − layer_delta``); two or more give the line
    ``measured ≈ total + c + α · layer_delta`` (least squares, a secant step for two rounds), and the offset
    is the one under which the solver's budget ``total + offset + layer_delta ≤ limit`` asks for the
    ``layer_delta`` that line says meets ``limit``.  An implausible slope (noise, rounds too close together)
    falls back to the mean constant part."""
    resid = [m - total - d for d, m in rounds]
    mean_offset = sum(resid) / len(resid)
    if len(rounds) < 2:
        return mean_offset
    ds = [d for d, _ in rounds]
    ms = [m for _, m in rounds]
    n = len(rounds)
    md, mm = sum(ds) / n, sum(ms) / n
    var = sum((d - md) ** 2 for d in ds)
    if var <= (0.01 * total) ** 2 * n:  # the rounds' plans are too alike to tell a slope from noise
        return mean_offset
    alpha = sum((d - md) * (m - mm) for d, m in zip(ds, ms)) / var
    if not 0.2 <= alpha <= 2.0:
        return mean_offset
    c = mm - total - alpha * md
    want = (limit - total - c) / alpha  # the layer delta the line says meets the limit
    return limit - total - want
