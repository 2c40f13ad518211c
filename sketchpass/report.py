"""Human-readable output: the plan table and its summary (rich)."""

from __future__ import annotations

import io

from rich.console import Console
from rich.table import Table

from .metric import metric as metric_of


def _fmt(n: float) -> str:
    n = float(n)
    for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suf}"
    return f"{n:.0f}"


def _shape(spec) -> str:
    if spec.op.startswith("conv"):
        k = "x".join(map(str, spec.kernel))
        g = f" g{spec.groups}" if spec.groups > 1 else ""
        return f"{spec.d_in}→{spec.d_out} {k}{g}"
    return f"{spec.d_in}→{spec.d_out}"


def decision_text(d) -> str:
    if d.method == "sketch":
        return f"sketch k={d.k} l={d.l}"
    if d.method == "svd":
        return f"svd r={d.rank}"
    return "skip" if d.skipped else "dense"


def _num(v, fmt=".4f") -> str:
    return "" if v is None else format(v, fmt)


def plan_table(plan) -> Table:
    """One row per layer.  ``weight`` is the output gain the solver weighed the layer's error by (its
    sensitivity, times the verify loop's correction when there was one); ``pred. err`` / ``meas. err``
    the layer's relative output error predicted on the calibration Grams and measured in the compressed
    model on the held-out batches; ``alone`` the model's output error with only this layer compressed
    (measured when the verify loop attributed the model's error to layers)."""
    corrected = any(lp.correction != 1.0 for lp in plan.layers)
    alone = any(lp.measured_output_error is not None for lp in plan.layers)
    timed = any(lp.dense_ms is not None for lp in plan.layers)
    t = Table(title="sketchpass plan", show_lines=False, header_style="bold")
    cols = [("layer", "left"), ("op", "left"), ("shape", "left"), ("decision", "left"), ("params", "right"),
            ("MACs", "right"), ("weight" if corrected else "sens.", "right"), ("pred. err", "right"),
            ("meas. err", "right")]
    if alone:
        cols.append(("alone", "right"))
    if timed:
        cols.append(("ms", "right"))
    cols.append(("note", "left"))
    for col, just in cols:
        t.add_column(col, justify=just, overflow="fold")
    for lp in plan.layers:
        s, d = lp.spec, lp.decision
        row = [s.name, s.op, _shape(s) if s.d_in else "", decision_text(d), f"{_fmt(s.params)}→{_fmt(d.params)}",
               f"{_fmt(s.macs)}→{_fmt(d.macs)}", f"{lp.weight:.3g}",
               f"{d.predicted_error:.4f}" if d.method != "dense" else "", _num(d.measured_error)]
        if alone:
            row.append(_num(lp.measured_output_error))
        if timed:
            row.append("" if lp.dense_ms is None else f"{lp.dense_ms:.3g}→{(d.ms or lp.dense_ms):.3g}")
        row.append(d.reason or "")
        t.add_row(*row)
    return t


def verify_lines(plan) -> list[str]:
    """What the verify stage measured: the output error against the prediction, each round of the loop,
    and the warning when they do not agree."""
    v = plan.verify
    t = plan.totals or {}
    pred = t.get("predicted_output_error", 0.0)
    unit = metric_of((plan.options or {}).get("metric", "mse")).unit
    if not v or v.get("measured") is None:
        why = (v or {}).get("reason", "no calibration data" if not plan.calib else "not verified")
        return [f"output error ({unit}): predicted {pred:.4g}; not measured ({why})"]
    lines = [f"output error ({unit}): predicted {v['predicted']:.4g}, measured {v['measured']:.4g} on "
             f"{v['samples']} held-out samples ({v['batches']} batch{'es' if v['batches'] != 1 else ''}); "
             f"measured / predicted = {v['ratio']:.3g}"]
    rounds = v.get("rounds") or []
    if len(rounds) > 1:
        parts = [f"round {r['round']}: predicted {r['predicted']:.4g}, measured {r['measured']:.4g} (×{r['ratio']:.3g}"
                 f"{', ' + str(r['changed_layers']) + ' layers changed' if r.get('changed_layers') else ''})"
                 for r in rounds]
        lines.append(f"verify loop (kept round {v.get('kept_round', 0)}): " + "; ".join(parts))
    if v.get("warning"):
        lines.append(f"WARNING: {v['warning']}")
    return lines


def latency_lines(plan) -> list[str]:
    """The latency measured on the target: dense and compressed whole model with spread, requested and
    predicted, every round of the latency loop."""
    lt = plan.latency
    if not lt:
        return []
    t = lt.get("target", {})
    where = f"{t.get('name')} ({t.get('runtime')}, {t.get('threads')} threads; inputs {lt.get('input_shapes')})"
    m = lt.get("measured")
    if not m:
        return [f"latency on {where}: dense {lt['dense_ms']:.3g} ms; predicted {lt.get('predicted_ms', 0):.3g} ms "
                "(not measured yet)"]
    lines = [f"latency on {where}: dense {m['dense_ms']:.3g} ± {m['dense_spread']:.2g} ms, compressed "
             f"{m['ms']:.3g} ± {m['spread']:.2g} ms (measured together: ×{m['ratio']:.3f} of dense); requested "
             f"{lt['requested_ms']:.3g} ms of the dense {lt['dense_ms']:.3g} ms measured when planning, predicted "
             f"{lt['predicted_ms']:.3g} ms; {'met' if lt.get('met') else 'NOT met'}"]
    rounds = lt.get("rounds") or []
    if len(rounds) > 1:
        lines.append("latency loop: " + "; ".join(
            f"round {r['round']}: predicted {r['latency_predicted_ms']:.3g} ms, measured {r['latency_ms']:.3g} ms"
            for r in rounds if "latency_ms" in r))
    if "forms_timed" in lt:
        lines.append(f"timing table {lt['table']}: {lt['forms_timed']} forms timed, {lt['forms_from_table']} read "
                     "from the table" + (f" ({lt['timing_s']:.3g} s)" if "timing_s" in lt else ""))
    return lines


def summary_lines(plan) -> list[str]:
    t = plan.totals
    lines = []
    if t:
        ach = plan.achieved()
        req = ", ".join(f"{k}={v:g}" for k, v in plan.budget.items())
        got = ", ".join(f"{k}={v:.4f}" for k, v in ach.items()) or "nothing factored"
        lines.append(f"budget requested: {req}   achieved (fraction of the whole model): {got}")
        lines.append(f"params {t['params_before']:,} → {t['params_after']:,}    "
                     f"MACs/sample {t['macs_before']:,} → {t['macs_after']:,}")
        lines.extend(verify_lines(plan))
        lines.extend(latency_lines(plan))
    counts: dict[str, int] = {}
    for lp in plan.layers:
        key = decision_text(lp.decision).split(" ")[0]
        counts[key] = counts.get(key, 0) + 1
    lines.append("layers: " + (", ".join(f"{v} {k}" for k, v in counts.items()) or "none found"))
    cal = plan.calib
    if not cal:
        lines.append("calibration: none (data-free fits; sensitivities not measured)")
    else:
        held = (f", {cal['holdout_samples']} held out ({cal['holdout_batches']} batch"
                f"{'es' if cal['holdout_batches'] != 1 else ''})" if cal.get("holdout_batches") else "")
        lines.append(f"calibration: {cal.get('samples', 0)} samples in {cal.get('batches', 0)} batches for fitting"
                     + held)
    lines.append(f"method={plan.method} seed={plan.seed} generator={plan.generator} capture={plan.capture}")
    lines.extend(f"note: {n}" for n in plan.notes)
    return lines


def render_plan(plan, width: int | None = 140) -> str:
    buf = io.StringIO()
    console = Console(file=buf, width=width or 140, force_terminal=False, color_system=None)
    console.print(plan_table(plan))
    for line in summary_lines(plan):
        console.print(line, highlight=False, markup=False)
    return buf.getvalue()
