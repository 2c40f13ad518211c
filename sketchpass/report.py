"""Human-readable output: the plan table and summary, and progress bars (rich)."""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


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


def plan_table(plan) -> Table:
    t = Table(title="sketchpass plan", show_lines=False, header_style="bold")
    for col, just in (("layer", "left"), ("op", "left"), ("shape", "left"), ("decision", "left"),
                      ("params", "right"), ("MACs", "right"), ("sens.", "right"), ("pred. err", "right"),
                      ("meas. err", "right"), ("note", "left")):
        t.add_column(col, justify=just, overflow="fold")
    for lp in plan.layers:
        s, d = lp.spec, lp.decision
        t.add_row(
            s.name, s.op, _shape(s) if s.d_in else "", decision_text(d),
            f"{_fmt(s.params)}→{_fmt(d.params)}", f"{_fmt(s.macs)}→{_fmt(d.macs)}",
            f"{lp.sensitivity:.3g}", f"{d.predicted_error:.4f}" if d.method != "dense" else "",
            "" if d.measured_error is None else f"{d.measured_error:.4f}", d.reason or "")
    return t


def summary_lines(plan) -> list[str]:
    t = plan.totals
    lines = []
    if t:
        ach = plan.achieved()
        req = ", ".join(f"{k}={v:g}" for k, v in plan.budget.items())
        got = ", ".join(f"{k}={v:.4f}" for k, v in ach.items())
        lines.append(f"budget requested: {req}   achieved (fraction of the whole model): {got}")
        lines.append(f"params {t['params_before']:,} → {t['params_after']:,}    "
                     f"MACs/sample {t['macs_before']:,} → {t['macs_after']:,}")
        lines.append(f"predicted relative output error (Σ sensitivity × layer error): "
                     f"{t.get('predicted_output_error', 0.0):.4f}")
    counts: dict[str, int] = {}
    for lp in plan.layers:
        key = decision_text(lp.decision).split(" ")[0]
        counts[key] = counts.get(key, 0) + 1
    lines.append("layers: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    cal = plan.calib
    lines.append("calibration: " + ("none (data-free fits; sensitivities not measured)" if not cal else
                                    f"{cal.get('samples', 0)} samples in {cal.get('batches', 0)} batches"))
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


def _enabled(flag: bool | None) -> bool:
    if flag is None:
        return sys.stderr.isatty()
    return bool(flag)


@contextlib.contextmanager
def progress_bar(description: str, total: float | None, enabled: bool | None) -> Iterator:
    """A rich progress bar on stderr; yields ``advance(n=1, label=None)``."""
    if not _enabled(enabled):
        yield lambda *a, **k: None
        return
    console = Console(stderr=True)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[label]}"), TimeElapsedColumn(), console=console, transient=True) as p:
        task = p.add_task(description, total=total, label="")

        def advance(n: float = 1, label: str | None = None):
            p.update(task, advance=n, label=label or "")

        yield advance
