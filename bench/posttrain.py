"""Post-training compression of the pretrained MNIST CNN (no fine-tuning).

What it measures
----------------
The small MNIST CNN of :func:`sketchpass.demo.models.load_mnist_cnn` (~421k parameters, ~99% test accuracy) is
compressed to several parameter budgets (``Budget(params=b)``, fraction of the whole model) and every
compressed model is evaluated on the full 10,000-image MNIST test set, with no training at all.

* calibration: the first ``--calib-n`` (1,024) images of the MNIST *train* set, as a list of batches of
  ``--calib-batch`` (128) images;
* configurations (one table row per configuration and budget):

  ===============================  ===========================================================
  ``svd``                          ``sp.plan(method="svd")`` (budget solver) + ``sp.apply`` with
                                   sequential refit
  ``svd (no refit)``               the same plan, ``sp.apply(..., refit=False)``
  ``svd uniform``                  every factorable layer but the first and the last at the same
                                   fraction of its own params (largest common fraction meeting the
                                   budget; first and last kept dense), sequential refit
  ``svd uniform (no refit)``       the same plan, ``refit=False`` — the usual "uniform whitened
                                   SVD" baseline
  ``sketch``                       ``sp.plan(method="sketch")`` + ``sp.apply`` with sequential refit
  ``auto``                         ``sp.plan(method="auto")`` + ``sp.apply`` with sequential refit
  ``sketch data-free``             ``sp.plan(calib=None, method="sketch", init="sketch")`` +
                                   ``sp.apply(model, plan)``: no data at all
  ===============================  ===========================================================

  The uniform allocation is built with the public ``overrides={layer: rank}`` argument of
  :func:`sketchpass.plan`.  The common fraction ``f`` is found by bisection: each layer gets the
  largest rank whose svd form has at most ``f`` times the layer's params (rank 1 at least), and the
  whole-model params of that allocation are computed with the plan's own arithmetic
  (``LayerSpec.form_params``, as ``Plan.recompute_totals`` does) — cheap, so the search does not
  re-run calibration at every step.  The allocation found is then planned for real with
  ``sp.plan(..., overrides=...)`` and its ``plan.totals`` are checked against the budget (the fraction
  is lowered if they ever disagree).  The data-free sketch plan gets ``example_inputs`` (one MNIST
  image) so that its FLOPs fraction is measured at the real input shape.

* recorded per row: requested budget, achieved params and FLOPs (MACs) fractions
  (``plan.achieved()``), test accuracy (%), plan and apply wall times (``time.perf_counter``), the
  plan's predicted relative output error (``plan.totals["predicted_output_error"]``, Σ weight × predicted
  layer error) and the one the pipeline measured on its held-out calibration batch (one of the 8
  batches; ``small.sketchpass_plan.verify["measured"]``), and the form chosen for every layer.  A row
  whose achieved params fraction exceeds the request (by more than 1e-9) is flagged ``BUDGET NOT MET``; a configuration
  that raises is recorded with its error instead of aborting the run.

Outputs (in ``--out``, default ``docs``): ``posttrain.json`` (rows and metadata), ``posttrain.png``
(accuracy vs params budget, one line per configuration) and ``posttrain.md`` (the command and the
table, generated from the run).  A rich table is printed on stdout.

How to run (about 6 minutes on 2 lightly loaded CPU cores: ~2.5 s per plan, ~5 s per apply, ~4.5 s per
evaluation of the 10,000 test images; several times longer when other processes share the cores)::

    python bench/posttrain.py                       # all budgets and configurations
    python bench/posttrain.py --budgets 0.5,0.25    # fewer budgets
    python bench/posttrain.py --configs svd,auto    # fewer configurations

MNIST and the pretrained CNN are fetched once into the sketchpass cache (see
:mod:`sketchpass.demo.data` and :mod:`sketchpass.demo.models`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import verify_record
from torch import nn

import sketchpass as sp
from sketchpass.demo.data import mnist_tensors
from sketchpass.demo.models import load_mnist_cnn

DEFAULT_BUDGETS = (0.5, 0.35, 0.25, 0.15, 0.10)
CONFIGS = ("svd", "svd (no refit)", "svd uniform", "svd uniform (no refit)", "sketch", "auto", "sketch data-free")
# short names accepted by --configs
CONFIG_KEYS = {
    "svd": "svd",
    "svd-norefit": "svd (no refit)",
    "uniform": "svd uniform",
    "uniform-norefit": "svd uniform (no refit)",
    "sketch": "sketch",
    "auto": "auto",
    "datafree": "sketch data-free",
}
Y_MIN, Y_MAX = 90.0, 100.0  # accuracy range of the plot; lower values are drawn clipped at Y_MIN
TOL = 1e-9


# --------------------------------------------------------------------------- helpers
def timed(fn: Callable, *args, **kwargs):
    """``(fn(*args, **kwargs), seconds)``."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


@torch.inference_mode()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    """Top-1 accuracy in % of ``model`` on ``(x, y)``."""
    model.eval()
    correct = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in zip(x.split(batch), y.split(batch)))
    return 100.0 * correct / len(y)


def forms_text(plan: sp.Plan) -> str:
    """One compact token per layer: ``r24`` (svd rank), ``k24`` (sketch, ``k24x2`` when l > 1), ``·`` dense."""
    out = []
    for lp in plan.layers:
        d = lp.decision
        if d.method == "svd":
            out.append(f"r{d.rank}")
        elif d.method == "sketch":
            out.append(f"k{d.k}" + (f"x{d.l}" if d.l and d.l > 1 else ""))
        else:
            out.append("·")
    return " ".join(out)


def measured_output_error(small: nn.Module) -> float | None:
    """The relative output error the pipeline measured on its held-out calibration batch (None if not
    measured, e.g. data-free)."""
    plan = getattr(small, "sketchpass_plan", None)
    return None if plan is None or not plan.verify else plan.verify.get("measured")


# --------------------------------------------------------------------------- uniform allocation
def uniform_rank(spec: sp.LayerSpec, fraction: float) -> int:
    """Largest svd rank whose params are at most ``fraction`` of the layer's own (1 at least)."""
    lo, hi = 1, spec.max_rank()
    if spec.form_params("svd", lo) > fraction * spec.params:
        return 1
    while lo < hi:  # form_params is increasing in the rank
        mid = (lo + hi + 1) // 2
        if spec.form_params("svd", mid) <= fraction * spec.params:
            lo = mid
        else:
            hi = mid - 1
    return lo


def uniform_ranks(specs: list[sp.LayerSpec], fraction: float) -> dict[str, int]:
    return {s.name: uniform_rank(s, fraction) for s in specs}


def uniform_params_fraction(ref: sp.Plan, specs: list[sp.LayerSpec], ranks: dict[str, int]) -> float:
    """Whole-model params fraction of ``ref`` with ``specs`` set to svd ``ranks``, everything else as
    dense (the arithmetic of ``Plan.recompute_totals``)."""
    t = ref.totals
    after = t["params_before"] - sum(s.params for s in specs) + sum(s.form_params("svd", ranks[s.name]) for s in specs)
    return after / t["params_before"]


def uniform_plan(model: nn.Module, budget: float, calib, ref: sp.Plan, seed: int) -> tuple[sp.Plan, float]:
    """The svd plan with every factorable layer of ``ref`` (those not skipped) except the first and the
    last at the same fraction of its own params: the largest common fraction whose plan meets
    ``budget``.  Keeping the first and last layers dense is the usual practice of low-rank papers (a
    1→32 first conv or a 10-way classifier has almost nothing to gain and everything to lose); without
    it uniform allocation collapses (8.9% at params=0.15).  Returns ``(plan, fraction)``."""
    factorable = [lp.spec for lp in ref.layers if not lp.decision.skipped]
    specs = factorable[1:-1] if len(factorable) > 2 else factorable
    keep = {s.name: None for s in factorable if s not in specs}
    if not specs:
        raise RuntimeError("no factorable layer in the plan")
    if uniform_params_fraction(ref, specs, uniform_ranks(specs, 0.0)) > budget + TOL:
        raise sp.InfeasibleBudgetError(f"params={budget} is below what rank 1 everywhere achieves")
    lo, hi = 0.0, 1.0  # lo always feasible
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if uniform_params_fraction(ref, specs, uniform_ranks(specs, mid)) <= budget + TOL:
            lo = mid
        else:
            hi = mid
    fraction = lo
    for _ in range(20):  # confirm on the real plan; lower the fraction should the arithmetic ever disagree
        overrides = {**uniform_ranks(specs, fraction), **keep}
        plan = sp.plan(model, sp.Budget(params=budget), calib=calib, method="svd", seed=seed, overrides=overrides)
        if plan.achieved()["params"] <= budget + TOL:
            return plan, fraction
        print(f"warning: uniform allocation at fraction {fraction:.4f}: estimated params fraction "
              f"{uniform_params_fraction(ref, specs, overrides):.6f} but the plan reports "
              f"{plan.achieved()['params']:.6f}", file=sys.stderr)
        fraction *= 0.97
    return plan, fraction


def library_revision() -> dict:
    """The git commit of the checkout and whether ``sketchpass/`` differs from it (read-only git calls)."""
    root = Path(__file__).resolve().parent.parent

    def git(*cmd):
        return subprocess.run(["git", "-C", str(root), *cmd], capture_output=True, text=True, timeout=30, check=False)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": None, "library_modified": None}
        return {"commit": head.stdout.strip(),
                "library_modified": git("diff", "--quiet", "HEAD", "--", "sketchpass").returncode != 0}
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "library_modified": None}


# --------------------------------------------------------------------------- one budget
def run_budget(b: float, model, calib, example, test, configs, args, layer_names: list[str]) -> list[dict]:
    """Every requested configuration at params budget ``b``; one row dict each.  ``layer_names`` is filled
    with the plan's layer names (in plan order) the first time a plan succeeds."""
    rows: list[dict] = []
    xt, yt = test

    def record(config, method, allocation, refit, plan, plan_s, make_small, note=None):
        row = {"config": config, "method": method, "allocation": allocation, "refit": refit,
               "budget_params": b, "achieved_params": None, "achieved_flops": None, "accuracy": None,
               "plan_s": plan_s, "apply_s": None, "eval_s": None, "predicted_output_error": None,
               "measured_output_error": None,
               "forms": None, "budget_met": None, "note": note, "error": None}
        try:
            if isinstance(plan, Exception):
                raise plan
            ach = plan.achieved()
            layer_names[:] = layer_names or plan.names()
            row.update(achieved_params=ach.get("params"), achieved_flops=ach.get("flops"),
                       predicted_output_error=plan.totals.get("predicted_output_error"), forms=forms_text(plan))
            row["budget_met"] = row["achieved_params"] is not None and row["achieved_params"] <= b + TOL
            small, row["apply_s"] = timed(make_small)
            row["measured_output_error"] = measured_output_error(small)
            # the plan's own verify record (with the loop's rounds) where the row applies it as planned; the
            # apply's measurement for the no-refit rows (the plan was measured with refit)
            src = plan if refit and plan.verify and plan.verify.get("rounds") else small.sketchpass_plan
            if src.verify and src.verify.get("measured") is not None:
                row["verify"] = verify_record(src, "MNIST CNN", f"params={b:g} ({config})", "torch")
            row["accuracy"], row["eval_s"] = timed(accuracy, small, xt, yt, args.eval_batch)
        except Exception as exc:  # keep going: a failing configuration is a result too
            row["error"] = f"{type(exc).__name__}: {exc}"
        rows.append(row)
        status = "ERROR " + row["error"] if row["error"] else f"acc {row['accuracy']:.2f}%"
        print(f"  params={b:<5g} {config:<24} {status}", file=sys.stderr, flush=True)

    def try_plan(**kw):
        try:
            return timed(sp.plan, model, sp.Budget(params=b), seed=args.seed, **kw)
        except Exception as exc:
            return exc, None

    svd_plan = None
    if {"svd", "svd (no refit)", "svd uniform", "svd uniform (no refit)"} & set(configs):
        svd_plan, svd_s = try_plan(calib=calib, method="svd")
        for config, refit in (("svd", True), ("svd (no refit)", False)):
            if config in configs:
                record(config, "svd", "solver", refit, svd_plan, svd_s,
                       lambda refit=refit: sp.apply(model, svd_plan, calib=calib, refit=refit))

    if {"svd uniform", "svd uniform (no refit)"} & set(configs):
        if isinstance(svd_plan, Exception):
            uni, uni_s, note = svd_plan, None, None
        else:
            try:
                (uni, fraction), uni_s = timed(uniform_plan, model, b, calib, svd_plan, args.seed)
                note = f"fraction {fraction:.4f}"
            except Exception as exc:
                uni, uni_s, note = exc, None, None
        for config, refit in (("svd uniform", True), ("svd uniform (no refit)", False)):
            if config in configs:
                record(config, "svd", "uniform", refit, uni, uni_s,
                       lambda refit=refit: sp.apply(model, uni, calib=calib, refit=refit), note)

    for method in ("sketch", "auto"):
        if method in configs:
            p, s = try_plan(calib=calib, method=method)
            record(method, method, "solver", True, p, s, lambda p=p: sp.apply(model, p, calib=calib))

    if "sketch data-free" in configs:
        p, s = try_plan(calib=None, method="sketch", init="sketch", example_inputs=example)
        record("sketch data-free", "sketch", "solver", False, p, s, lambda p=p: sp.apply(model, p),
               "init=sketch, no calibration data")
    return rows


# --------------------------------------------------------------------------- output
def _f(v, fmt: str, none: str = "—") -> str:
    return none if v is None else format(v, fmt)


COLUMNS = (  # header, row -> text, right-aligned
    ("budget", lambda r: _f(r["budget_params"], "g"), True),
    ("config", lambda r: r["config"], False),
    ("params", lambda r: _f(r["achieved_params"], ".4f"), True),
    ("flops", lambda r: _f(r["achieved_flops"], ".4f"), True),
    ("acc. %", lambda r: _f(r["accuracy"], ".2f"), True),
    ("pred. err", lambda r: _f(r["predicted_output_error"], ".4g"), True),
    ("meas. err", lambda r: _f(r["measured_output_error"], ".4g"), True),
    ("plan s", lambda r: _f(r["plan_s"], ".2f"), True),
    ("apply s", lambda r: _f(r["apply_s"], ".2f"), True),
    ("layers", lambda r: r["forms"] or "", False),
    ("status", lambda r: ("ERROR: " + r["error"]) if r["error"] else
     ("ok" if r["budget_met"] else "BUDGET NOT MET"), False),
)


def print_table(rows: list[dict], meta: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"post-training compression of the MNIST CNN (dense: {meta['dense_accuracy']:.2f}%)",
              header_style="bold")
    for name, _, right in COLUMNS:
        t.add_column(name, justify="right" if right else "left", overflow="fold")
    prev = None
    for r in rows:
        if prev is not None and r["budget_params"] != prev:
            t.add_section()
        prev = r["budget_params"]
        style = "red" if (r["error"] or r["budget_met"] is False) else None
        t.add_row(*(fn(r) for _, fn, _ in COLUMNS), style=style)
    Console(width=max(160, Console().width)).print(t)


def markdown(rows: list[dict], meta: dict, layer_names: list[str]) -> str:
    head = "| " + " | ".join(name for name, _, _ in COLUMNS) + " |"
    sep = "|" + "|".join("---:" if right else ":---" for _, _, right in COLUMNS) + "|"
    body = ["| " + " | ".join(fn(r).replace("|", "\\|") for _, fn, _ in COLUMNS) + " |" for r in rows]
    problems = [r for r in rows if r["error"] or r["budget_met"] is False]
    clipped = [r for r in rows if r["accuracy"] is not None and r["accuracy"] < Y_MIN]
    lines = [
        "# Post-training compression of the MNIST CNN",
        "",
        "*Generated by `bench/posttrain.py`; every number below comes from the run described here. "
        "Do not edit by hand — re-run the command.*",
        "",
        "```",
        meta["command"],
        "```",
        "",
        f"- date: {meta['date']}; sketchpass {meta['sketchpass']} at commit `{(meta['commit'] or '?')[:12]}`"
        + (" (with uncommitted changes in `sketchpass/`)" if meta["library_modified"] else "")
        + f"; torch {meta['torch']}, python {meta['python']}, "
        f"{meta['cpu_count']} CPU(s), {meta['torch_threads']} torch thread(s); total wall time "
        f"{meta['wall_s']:.0f} s (1-minute load average {meta['load_avg_1min'][0]:g} at the start, "
        f"{meta['load_avg_1min'][1]:g} at the end: timings are slower when other processes share the CPUs)",
        f"- model: `sketchpass.demo.models.load_mnist_cnn()`, {meta['model_params']:,} params, "
        f"dense test accuracy **{meta['dense_accuracy']:.2f}%**; no fine-tuning",
        f"- calibration: first {meta['calib_samples']:,} MNIST train images in batches of {meta['calib_batch']}; "
        f"evaluation: the {meta['test_samples']:,} MNIST test images",
        "- `budget`: requested `Budget(params=b)`; `params`/`flops`: achieved fractions of the whole model "
        "(`plan.achieved()`); `pred. err`: `plan.totals[\"predicted_output_error\"]`; `meas. err`: "
        "the output error measured on the held-out calibration batch (the same quantity, measured); "
        "`plan s`/`apply s`: wall times (the `(no refit)` "
        "rows reuse the plan of the row above; the uniform plan time includes the fraction search)",
        f"- `layers`: the form of each layer ({', '.join(f'`{n}`' for n in layer_names)}): `rN` svd rank N, "
        "`kN` sketch with k = N, `·` dense",
        "",
        *([head, sep, *body]),
        "",
        "![accuracy vs params budget](posttrain.png)",
        "",
    ]
    if clipped:
        lines += [f"In the plot, accuracies below {Y_MIN:g}% are drawn at the bottom edge (▼) with their value: "
                  + ", ".join(f"{r['config']} @ {r['budget_params']:g}: {r['accuracy']:.2f}%" for r in clipped)
                  + ".", ""]
    uni = [r for r in rows if r["allocation"] == "uniform" and r["refit"] and r["note"]]
    if uni:
        lines += ["Uniform allocation, common fraction of each layer's params: "
                  + ", ".join(f"{r['budget_params']:g} → {r['note'].split()[-1]}" for r in uni) + ".", ""]
    if problems:
        lines += ["**Problems:**", ""]
        lines += [f"- {r['config']} @ params={r['budget_params']:g}: "
                  + (r["error"] or f"budget not met (achieved {r['achieved_params']:.6f})") for r in problems]
        lines.append("")
    else:
        lines += ["Every budget was met (achieved params fraction ≤ requested).", ""]
    return "\n".join(lines)


def plot(rows: list[dict], meta: dict, path: Path) -> None:
    """Accuracy vs requested params budget, one line per configuration: the full 0–100% range on the left,
    a zoom on ``[Y_MIN, Y_MAX]`` on the right where lower values are clipped (▼ at the edge, labelled)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_full, ax_zoom) = plt.subplots(1, 2, figsize=(12, 5.4))
    markers = dict(zip(CONFIGS, "osD^vPX"))
    budgets = sorted({r["budget_params"] for r in rows})
    pad = 0.06 * (max(budgets) - min(budgets) or 1.0)
    for i, config in enumerate(CONFIGS):
        pts = sorted((r["budget_params"], r["accuracy"]) for r in rows
                     if r["config"] == config and r["accuracy"] is not None)
        if not pts:
            continue
        xs, accs = [p[0] for p in pts], [p[1] for p in pts]
        (line,) = ax_full.plot(xs, accs, marker=markers[config], label=config, alpha=0.9)
        color = line.get_color()
        ax_zoom.plot(xs, [max(a, Y_MIN) for a in accs], marker=markers[config], color=color, alpha=0.9)
        for x, acc in pts:
            if acc < Y_MIN:  # clipped: a down arrow at the bottom edge, labelled with the value
                ax_zoom.plot([x], [Y_MIN], marker="v", color=color, markersize=10, clip_on=False)
                ax_zoom.annotate(f"{acc:.1f}", (x, Y_MIN), textcoords="offset points", xytext=(5, 4 + 9 * i),
                                 fontsize=7, color=color)  # one label height per configuration
    dense = meta["dense_accuracy"]
    for ax, (lo, hi), title in ((ax_full, (0, 100), "all values"),
                                (ax_zoom, (Y_MIN, Y_MAX), f"zoom: values < {Y_MIN:g}% clipped (▼, labelled)")):
        ax.axhline(dense, color="k", ls="--", lw=1, label=f"dense ({dense:.2f}%)" if ax is ax_full else None)
        ax.set_ylim(lo, hi)
        ax.set_xlim(min(budgets) - pad, max(budgets) + 2 * pad)
        ax.set_xticks(budgets)
        ax.set_xlabel("params budget (fraction of the model)")
        ax.set_ylabel("MNIST test accuracy (%)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle(f"MNIST CNN, post-training compression, no fine-tuning "
                 f"({meta['calib_samples']} calibration images, {meta['test_samples']} test images)", fontsize=11)
    fig.legend(*ax_full.get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default=",".join(f"{b:g}" for b in DEFAULT_BUDGETS),
                    help="comma-separated params budgets (fractions of the model), default %(default)s")
    ap.add_argument("--configs", default=",".join(CONFIG_KEYS),
                    help=f"comma-separated configurations among {', '.join(CONFIG_KEYS)} (default: all)")
    ap.add_argument("--out", default="docs", help="output directory for posttrain.{json,md,png} (default %(default)s)")
    ap.add_argument("--calib-n", type=int, default=1024, help="calibration images (first N of MNIST train)")
    ap.add_argument("--calib-batch", type=int, default=128, help="calibration batch size")
    ap.add_argument("--eval-batch", type=int, default=1000, help="evaluation batch size")
    ap.add_argument("--seed", type=int, default=0, help="sketchpass seed")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = ap.parse_args(argv)
    try:
        args.budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    except ValueError:
        ap.error(f"--budgets: not a comma-separated list of numbers: {args.budgets!r}")
    if not args.budgets or not all(0 < b <= 1 for b in args.budgets):
        ap.error("--budgets: every budget must be a fraction in (0, 1]")
    keys = [k.strip() for k in args.configs.split(",") if k.strip()]
    unknown = [k for k in keys if k not in CONFIG_KEYS]
    if unknown or not keys:
        ap.error(f"--configs: unknown {unknown}; choose among {', '.join(CONFIG_KEYS)}")
    args.configs = [CONFIG_KEYS[k] for k in keys]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model = load_mnist_cnn()
    x_cal, _ = mnist_tensors("train", n=args.calib_n)
    calib = list(x_cal.split(args.calib_batch))
    example = [x_cal[:1]]
    test = mnist_tensors("test")
    dense_acc = accuracy(model, *test, args.eval_batch)
    print(f"dense accuracy {dense_acc:.2f}% on {len(test[1])} test images; "
          f"{len(args.budgets)} budgets x {len(args.configs)} configurations", file=sys.stderr)

    rows: list[dict] = []
    layer_names: list[str] = []
    for b in args.budgets:
        rows += run_budget(b, model, calib, example, test, args.configs, args, layer_names)

    argv_list = sys.argv[1:] if argv is None else list(argv)
    meta = {
        "benchmark": "posttrain",
        "command": "python bench/posttrain.py" + "".join(" " + shlex.quote(a) for a in argv_list),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "sketchpass": sp.__version__,
        **library_revision(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "model_params": sum(p.numel() for p in model.parameters()),
        "dense_accuracy": dense_acc,
        "calib_samples": len(x_cal),
        "calib_batch": args.calib_batch,
        "test_samples": len(test[1]),
        "seed": args.seed,
        "budgets": args.budgets,
        "configs": args.configs,
        "layers": layer_names,
        "wall_s": time.perf_counter() - t_start,
        # other processes on the machine slow every timing down: the 1-minute load average, start and end
        "load_avg_1min": [round(load_start, 2), round(os.getloadavg()[0], 2)],
    }

    print_table(rows, meta)
    (out / "posttrain.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (out / "posttrain.md").write_text(markdown(rows, meta, layer_names))
    plot(rows, meta, out / "posttrain.png")
    bad = [r for r in rows if r["error"] or r["budget_met"] is False]
    for r in bad:
        print(f"WARNING: {r['config']} @ params={r['budget_params']:g}: "
              + (r["error"] or f"budget not met (achieved {r['achieved_params']:.6f})"), file=sys.stderr)
    print(f"wrote {out / 'posttrain.json'}, {out / 'posttrain.md'}, {out / 'posttrain.png'} "
          f"({meta['wall_s']:.0f} s)", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
