"""EfficientNet-Lite0 compressed by both frontends: the PyTorch pass and the ONNX pass, side by side.

What it measures
----------------
A CNN of the family of the converter-made OCR model whose predicted error did not hold up
(DESIGN.md section 1: depthwise convs, 1x1 projections, "same" padding): the pretrained ImageNet
EfficientNet-Lite0 of :func:`sketchpass.demo.models.load_efficientnet_lite0` (~4.65 M params), and its
ONNX export, each compressed post-training (no fine-tuning) at ``Budget(params=b)`` for every ``b`` of
``--budgets`` (default 0.9 — for context —, 0.7 and 0.6).

* **data** — augmented 224x224 crops of the photos bundled in scikit-image / scikit-learn
  (:func:`sketchpass.demo.models.sample_photos`, loaded as ``--source-size`` (320) squares, values in
  [0, 1]), made with torch ops only and a seeded ``torch.Generator``: per crop, a photo (round-robin),
  a random resized crop (area 25-100% of the square, aspect ratio log-uniform in [3/4, 4/3], bilinear
  antialiased resize to 224), a horizontal flip with probability 1/2, and colour jitter (brightness,
  contrast and saturation factors uniform in [0.8, 1.2], clamped to [0, 1]); then ``x * 2 - 1`` (the
  model's input scaling).  The **evaluation crops** (``--eval-n``, 320; seed ``--data-seed + 1``) are
  always of ``EVAL_PHOTOS`` (astronaut, chelsea, coffee, moon, rocket, flower).  The **calibration
  crops** (``--calib-n``, 128, in batches of ``--calib-batch``, 16) come in two splits (``--splits``),
  each a separate set of table rows:

  - ``photos`` (held-out photos): crops (seed ``--data-seed``) of ``CALIB_PHOTOS`` (camera, clock,
    coins, motorcycle, china, hubble_deep_field, immunohistochemistry, retina, brick, grass, gravel),
    none of which is an evaluation photo: the compressed model is evaluated on unseen images;
  - ``crops`` (held-out crops): crops (seed ``--data-seed + 2``) of the 11 ``DEFAULT_PHOTOS`` of
    :mod:`sketchpass.demo.models`, which include the 6 evaluation photos: calibration and evaluation
    share photos but not crops (different random draws; crops of one photo overlap in content).
* **ONNX export** — ``torch.onnx.export(model, x, dynamo=False, input_names=["x"],
  output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})`` (dynamic batch; the static "same"
  padding of the model exports as ``Pad`` nodes).  The dense export is checked against the torch model
  on the evaluation crops (``meta["dense_ort_vs_torch"]`` in the JSON, a line in the Markdown).
* **torch pass** — ``sp.transform(model, sp.Budget(params=b), calib=[batch, ...])``; the compressed
  ``nn.Module`` is run in torch; its plan is ``small.sketchpass_plan``.
* **ONNX pass** — ``sp.transform(onnx_model, sp.Budget(params=b), calib=[{"x": batch.numpy()}, ...])``
  on the same calibration crops; the compressed graph is run in ONNX Runtime (CPUExecutionProvider);
  its plan is ``sketchpass.onnx.plan_of(small)``.
* **recorded per row**, on the evaluation crops, against the dense model *of the same frontend* (torch
  dense logits for the torch pass, ORT dense logits for the ONNX pass): achieved params fraction
  (``plan.achieved()["params"]``; FLOPs too), **top-1 agreement** (% of crops whose argmax equals the
  dense argmax), **top-5 agreement** (% of crops whose dense argmax is among the compressed model's 5
  largest logits), **relative logit error** (mean over crops of ``||f_hat(x) - f(x)|| / ||f(x)||``,
  and its median), the plan's ``totals["predicted_output_error"]``, a measured output error if the
  plan records one (``totals["measured_output_error"]`` or a ``verify`` entry, when the library
  provides them; else blank), the count of layers per form, and the ``transform`` (plan + apply) wall
  time; and, as an in-sample reference, the relative logit error on the calibration crops themselves
  (``calib err``; the plan's own error figures come from calibration data).  The form of every layer
  (``rN`` svd rank N, ``kN`` sketch, ``·`` dense) is in the JSON.  A transform that raises is
  recorded with its error instead of aborting the run.
* **frontends within 1 point** — for every split and budget, ``|top-1 agreement (torch) - top-1
  agreement (ONNX)|`` is printed and compared with 1 percentage point.

Writes ``efficientnet.json`` and ``efficientnet.md`` into ``--out`` (default ``docs``) and prints the
table.  How to run (about 3 minutes on 2 quiet CPU cores, 5-13 s per ``transform``; 14 minutes when
another process shares the cores; ``--quick`` is a smoke run with tiny sizes that writes nothing unless
``--out`` is given)::

    nice -n 10 python bench/efficientnet.py
    python bench/efficientnet.py --quick --out /tmp/effnet
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from common import verify_record

import sketchpass as sp
import sketchpass.onnx as spx
from sketchpass.demo.models import DEFAULT_PHOTOS, load_efficientnet_lite0, sample_photos

CALIB_PHOTOS = ("camera", "clock", "coins", "motorcycle", "china",
                "hubble_deep_field", "immunohistochemistry", "retina", "brick", "grass", "gravel")
EVAL_PHOTOS = ("astronaut", "chelsea", "coffee", "moon", "rocket", "flower")
SPLITS = {  # name: (calibration photos, offset of the calibration seed from --data-seed)
    "photos": (CALIB_PHOTOS, 0),
    "crops": (tuple(DEFAULT_PHOTOS), 2),
}
DEFAULT_BUDGETS = (0.9, 0.7, 0.6)
FRONTEND_TOL = 1.0  # percentage points between the two frontends' top-1 agreement
TOL = 1e-9


# --------------------------------------------------------------------------- data
def augmented_crops(photos: torch.Tensor, n: int, seed: int, size: int = 224) -> torch.Tensor:
    """``n`` augmented ``size`` x ``size`` crops of ``photos`` ([P, 3, S, S] in [0, 1]), deterministic in
    ``seed``: random resized crop (area 25-100%, aspect log-uniform in [3/4, 4/3]), flip with p = 1/2,
    brightness / contrast / saturation jitter in [0.8, 1.2]; values in [0, 1]."""
    g = torch.Generator().manual_seed(seed)

    def u(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=g))

    out = torch.empty(n, 3, size, size)
    n_photos, side = photos.shape[0], photos.shape[-1]
    for i in range(n):
        img = photos[i % n_photos]
        area = u(0.25, 1.0) * side * side
        ratio = math.exp(u(math.log(3 / 4), math.log(4 / 3)))
        w = min(side, max(8, round(math.sqrt(area * ratio))))
        h = min(side, max(8, round(math.sqrt(area / ratio))))
        top = int(torch.randint(0, side - h + 1, (), generator=g))
        left = int(torch.randint(0, side - w + 1, (), generator=g))
        x = img[:, top:top + h, left:left + w][None]
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
        if float(torch.rand((), generator=g)) < 0.5:
            x = x.flip(-1)
        x = x * u(0.8, 1.2)  # brightness
        x = (x - x.mean()) * u(0.8, 1.2) + x.mean()  # contrast
        grey = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]
        x = (x - grey) * u(0.8, 1.2) + grey  # saturation
        out[i] = x.clamp(0.0, 1.0)
    return out


def to_model_input(x: torch.Tensor) -> torch.Tensor:
    return x * 2.0 - 1.0  # EfficientNet-Lite: (x - 0.5) / 0.5


# --------------------------------------------------------------------------- models and evaluation
def export(model: torch.nn.Module) -> onnx.ModelProto:
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, 224, 224),), f, dynamo=False, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    return onnx.load_from_string(f.getvalue())


@torch.inference_mode()
def torch_logits(model: torch.nn.Module, x: torch.Tensor, batch: int) -> np.ndarray:
    model.eval()
    return np.concatenate([model(b).float().numpy() for b in x.split(batch)])


def ort_logits(m: onnx.ModelProto, x: torch.Tensor, batch: int) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    s = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return np.concatenate([s.run(None, {"x": b.numpy()})[0] for b in x.split(batch)])


def compare(y: np.ndarray, ref: np.ndarray) -> dict:
    """Agreement of logits ``y`` with the reference logits ``ref`` ([N, classes])."""
    top1 = ref.argmax(1)
    top5 = np.argsort(-y, axis=1)[:, :5]
    rel = np.linalg.norm((y - ref).astype(np.float64), axis=1) / np.linalg.norm(ref.astype(np.float64), axis=1)
    return {"top1_agreement": float(100.0 * (y.argmax(1) == top1).mean()),
            "top5_agreement": float(100.0 * (top5 == top1[:, None]).any(1).mean()),
            "rel_logit_error": float(rel.mean()), "rel_logit_error_median": float(np.median(rel)),
            "rel_logit_error_max": float(rel.max()), "finite": bool(np.isfinite(y).all()),
            # the quantity the plan predicts and measures: relative squared error, pooled over the crops
            "rel_sq_error": float(np.square((y - ref).astype(np.float64)).sum()
                                  / np.square(ref.astype(np.float64)).sum())}


def _jsonable(v):
    try:
        json.dumps(v)
        return v
    except TypeError:
        return repr(v)


def plan_fields(plan: sp.Plan) -> dict:
    totals = plan.totals
    ach = plan.achieved()
    counts: dict[str, int] = {}
    layer_forms: dict[str, str] = {}
    for lp in plan.layers:
        d = lp.decision
        key = "skipped" if getattr(d, "skipped", None) else d.method
        counts[key] = counts.get(key, 0) + 1
        layer_forms[lp.spec.name] = ({"svd": f"r{d.rank}", "sketch": f"k{d.k}" + (f"x{d.l}" if d.l and d.l > 1 else "")}
                                     .get(d.method, "·"))
    measured = totals.get("measured_output_error")
    verify = getattr(plan, "verify", None)
    if callable(verify):  # a method, not a recorded result: do not call internals whose contract may change
        verify = None
    return {"achieved_params": ach.get("params"), "achieved_flops": ach.get("flops"),
            "predicted_output_error": totals.get("predicted_output_error"),
            "measured_output_error": measured, "verify": _jsonable(verify) if verify is not None else None,
            "forms": counts, "layers": len(plan.layers), "layer_forms": layer_forms}


def run_frontend(frontend: str, split: str, b: float, model, calib, x_eval, ref: np.ndarray,
                 x_cal, ref_cal: np.ndarray, batch: int) -> dict:
    row = {"split": split, "frontend": frontend, "budget_params": b, "calib_rel_logit_error": None,
           "achieved_params": None, "achieved_flops": None,
           "top1_agreement": None, "top5_agreement": None, "rel_logit_error": None,
           "rel_logit_error_median": None, "predicted_output_error": None, "measured_output_error": None,
           "rel_sq_error": None, "calib_rel_sq_error": None,
           "transform_s": None, "eval_s": None, "forms": None, "budget_met": None, "error": None}
    try:
        t0 = time.perf_counter()
        small = sp.transform(model, sp.Budget(params=b), calib=calib)
        row["transform_s"] = time.perf_counter() - t0
        plan = small.sketchpass_plan if frontend == "torch" else spx.plan_of(small)
        row.update(plan_fields(plan))
        label = "EfficientNet-Lite0" + (" (ONNX export)" if frontend == "onnx" else "")
        row["verify_record"] = verify_record(plan, label, f"params={b:g} ({split} calibration)", frontend)
        row["budget_met"] = row["achieved_params"] is not None and row["achieved_params"] <= b + TOL
        t0 = time.perf_counter()
        run = torch_logits if frontend == "torch" else ort_logits
        y = run(small, x_eval, batch)
        row["eval_s"] = time.perf_counter() - t0
        row.update(compare(y, ref))
        cal = compare(run(small, x_cal, batch), ref_cal)
        row["calib_rel_logit_error"], row["calib_rel_sq_error"] = cal["rel_logit_error"], cal["rel_sq_error"]
    except Exception as exc:  # a failing frontend is a result too
        row["error"] = f"{type(exc).__name__}: {exc}"
    status = ("ERROR " + row["error"]) if row["error"] else (
        f"top-1 {row['top1_agreement']:.2f}%, rel. logit err {row['rel_logit_error']:.4f}, "
        f"{row['transform_s']:.1f} s")
    print(f"  split={split:<6} params={b:g} {frontend:<5} {status}", file=sys.stderr, flush=True)
    return row


# --------------------------------------------------------------------------- output
def _f(v, fmt: str, none: str = "—") -> str:
    return none if v is None else format(v, fmt)


def _forms(r: dict) -> str:
    if not r.get("forms"):
        return ""
    order = {"svd": 0, "sketch": 1, "dense": 2, "skipped": 3}
    return " / ".join(f"{k} {v}" for k, v in sorted(r["forms"].items(), key=lambda kv: order.get(kv[0], 9)))


COLUMNS = (  # header, row -> text, right-aligned
    ("split", lambda r: r["split"] or "—", False),
    ("budget", lambda r: _f(r["budget_params"], "g"), True),
    ("frontend", lambda r: r["frontend"], False),
    ("params", lambda r: _f(r["achieved_params"], ".4f"), True),
    ("flops", lambda r: _f(r["achieved_flops"], ".4f"), True),
    ("top-1 agr. %", lambda r: _f(r["top1_agreement"], ".2f"), True),
    ("top-5 agr. %", lambda r: _f(r["top5_agreement"], ".2f"), True),
    ("rel. err (mean)", lambda r: _f(r["rel_logit_error"], ".4f"), True),
    ("(median)", lambda r: _f(r["rel_logit_error_median"], ".4f"), True),
    ("calib err", lambda r: _f(r["calib_rel_logit_error"], ".4f"), True),
    ("sq. err", lambda r: _f(r["rel_sq_error"], ".4g"), True),
    ("plan: pred.", lambda r: _f(r["predicted_output_error"], ".4g"), True),
    ("meas. (held-out calib)", lambda r: _f(r["measured_output_error"], ".4g"), True),
    ("transform s", lambda r: _f(r["transform_s"], ".1f"), True),
    ("layers", _forms, False),
    ("status", lambda r: ("ERROR: " + r["error"]) if r["error"] else
     ("ok" if r["budget_met"] in (True, None) else "BUDGET NOT MET"), False),
)


def gaps(rows: list[dict]) -> list[dict]:
    out = []
    keys = dict.fromkeys((r["split"], r["budget_params"]) for r in rows if r["budget_params"] is not None)
    for split, b in keys:
        by = {r["frontend"]: r for r in rows if r["budget_params"] == b and r["split"] == split}
        t, o = by.get("torch"), by.get("onnx")
        if t and o and t["top1_agreement"] is not None and o["top1_agreement"] is not None:
            d = t["top1_agreement"] - o["top1_agreement"]
            out.append({"split": split, "budget_params": b, "torch": t["top1_agreement"], "onnx": o["top1_agreement"],
                        "difference": d, "met": abs(d) <= FRONTEND_TOL + 1e-9})
        else:
            out.append({"split": split, "budget_params": b, "torch": t and t["top1_agreement"],
                        "onnx": o and o["top1_agreement"],
                        "difference": None, "met": None})
    return out


def table_lines(rows: list[dict]) -> list[str]:
    head = "| " + " | ".join(name for name, _, _ in COLUMNS) + " |"
    sep = "|" + "|".join("---:" if right else ":---" for _, _, right in COLUMNS) + "|"
    return [head, sep] + ["| " + " | ".join(fn(r).replace("|", "\\|") for _, fn, _ in COLUMNS) + " |" for r in rows]


def gap_lines(gs: list[dict]) -> list[str]:
    lines = ["| split | budget | torch top-1 agr. % | ONNX top-1 agr. % | difference (points) | within 1 point |",
             "|:---|---:|---:|---:|---:|:---|"]
    for g in gs:
        met = "—" if g["met"] is None else ("yes" if g["met"] else "NO")
        lines.append(f"| {g['split']} | {g['budget_params']:g} | {_f(g['torch'], '.2f')} | {_f(g['onnx'], '.2f')} | "
                     f"{_f(g['difference'], '+.2f')} | {met} |")
    return lines


def markdown(rows: list[dict], gs: list[dict], meta: dict) -> str:
    problems = [r for r in rows if r["error"] or r["budget_met"] is False]
    lines = [
        "# EfficientNet-Lite0: the PyTorch pass and the ONNX pass",
        "",
        "*Generated by `bench/efficientnet.py`; every number below comes from the run described here. "
        "Do not edit by hand — re-run the command.*",
        "",
        "```",
        meta["command"],
        "```",
        "",
        f"- date: {meta['date']}; sketchpass {meta['sketchpass']} at commit `{(meta['commit'] or '?')[:12]}`"
        + (" (with uncommitted changes in `sketchpass/`)" if meta["library_modified"] else "")
        + f"; torch {meta['torch']}, onnx {meta['onnx']}, onnxruntime {meta['onnxruntime']} (CPUExecutionProvider), "
        f"python {meta['python']}; {meta['cpu_count']} CPU(s), {meta['torch_threads']} torch thread(s) "
        f"({meta['torch_threads']} ORT intra-op threads); total wall time {meta['wall_s']:.0f} s (1-minute load "
        f"average {meta['load_avg_1min'][0]:g} at the start, {meta['load_avg_1min'][1]:g} at the end: the CPUs "
        "were shared, timings are slower than on an idle machine)",
        f"- model: `sketchpass.demo.models.load_efficientnet_lite0()` (pretrained ImageNet, "
        f"{meta['model_params']:,} params), inputs `x * 2 - 1`; ONNX export with `torch.onnx.export(dynamo=False)`, "
        f"{'dynamic' if meta['dynamic_batch'] else 'fixed'} batch; no fine-tuning; default options "
        "(`method=\"auto\"`, seed 0)",
        f"- evaluation: {meta['eval_n']} augmented crops (seed {meta['eval_seed']}) of the photos "
        f"{', '.join(meta['eval_photos'])}; crops: random resized (area 25–100%, aspect 3/4–4/3) of "
        f"{meta['source_size']}² squares to 224², flip p = 1/2, brightness / contrast / saturation × U[0.8, 1.2]",
        f"- calibration: {meta['calib_n']} augmented crops in batches of {meta['calib_batch']}, two splits: "
        + "; ".join(f"`{k}`: seed {v['seed']}, photos {', '.join(v['photos'])}" for k, v in meta["splits"].items())
        + " (`photos`: no evaluation photo is seen in calibration; `crops`: the evaluation photos are among "
        "the calibration photos, with other random crops)",
        "- every compressed model is compared with the dense model of its own frontend (torch logits for "
        "`torch`, ONNX Runtime logits for `onnx`): `top-1 agr.`: % of crops with the same argmax; `top-5 agr.`: % "
        "of crops whose dense argmax is in the compressed model's top 5; `rel. err`: relative logit error "
        "‖f̂ − f‖ / ‖f‖ per crop (mean, median); `sq. err`: relative squared logit error Σ‖f̂ − f‖² / Σ‖f‖² over the "
        "evaluation crops — the quantity the plan predicts (`plan: pred.`, `plan.totals[\"predicted_output_error\"]`) "
        "and measures on its held-out calibration batches (`meas. (held-out calib)`, "
        "`plan.totals[\"measured_output_error\"]`); `params`/`flops`: achieved fractions (`plan.achieved()`); "
        "`calib err`: mean ‖f̂ − f‖ / ‖f‖ on the calibration crops "
        "themselves (in-sample); `transform s`: wall time of `sp.transform` (plan + apply); "
        "`layers`: the plan's layers per form",
        f"- dense ONNX export vs dense torch on the evaluation crops: top-1 agreement "
        f"{meta['dense_ort_vs_torch']['top1_agreement']:.2f}%, relative logit error "
        f"{meta['dense_ort_vs_torch']['rel_logit_error']:.2g} (mean); the dense model's own predictions span "
        f"{meta['dense_classes']} distinct ImageNet classes over the {meta['eval_n']} evaluation crops",
        "",
        *table_lines(rows),
        "",
        "## The two frontends within 1 point (top-1 agreement)",
        "",
        *gap_lines(gs),
        "",
    ]
    factored = [r for r in rows if r.get("layer_forms")]
    if factored:
        lines += ["## Factored layers", "",
                  "Every layer not listed is kept dense (or skipped: the 16 depthwise convs; see `plan.report()`).",
                  "", "| split | budget | frontend | factored layers (`rN`: whitened-SVD rank N, `kN`: sketch) |",
                  "|:---|---:|:---|:---|"]
        for r in factored:
            text = ", ".join(f"`{n}` {f}" for n, f in r["layer_forms"].items() if f != "·") or "none"
            lines.append(f"| {r['split']} | {r['budget_params']:g} | {r['frontend']} | {text} |")
        lines.append("")
    if problems:
        lines += ["**Problems:**", ""]
        lines += [f"- {r['frontend']} @ split {r['split']}, params={r['budget_params']:g}: "
                  + (r["error"] or f"budget not met (achieved {r['achieved_params']:.6f})") for r in problems]
        lines.append("")
    return "\n".join(lines)


def print_table(rows: list[dict], gs: list[dict], title: str) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print("\n".join(table_lines(rows) + [""] + gap_lines(gs)))
        return
    t = Table(title=title, header_style="bold")
    for name, _, right in COLUMNS:
        t.add_column(name, justify="right" if right else "left", overflow="fold")
    prev = None
    for r in rows:
        if prev is not None and (r["split"], r["budget_params"]) != prev:
            t.add_section()
        prev = (r["split"], r["budget_params"])
        t.add_row(*(fn(r) for _, fn, _ in COLUMNS), style="red" if (r["error"] or r["budget_met"] is False) else None)
    c = Console(width=max(200, Console().width))
    c.print(t)
    for g in gs:
        if g["met"] is None:
            c.print(f"split={g['split']} params={g['budget_params']:g}: "
                    "frontend difference not available (a frontend failed)")
        else:
            c.print(f"split={g['split']} params={g['budget_params']:g}: "
                    f"top-1 agreement torch {g['torch']:.2f}% vs ONNX {g['onnx']:.2f}%, "
                    f"difference {g['difference']:+.2f} points: "
                    + ("within 1 point (met)" if g["met"] else "MORE than 1 point (NOT met)"))


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


# --------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default=",".join(f"{b:g}" for b in DEFAULT_BUDGETS),
                    help="comma-separated params budgets (fractions of the model), default %(default)s")
    ap.add_argument("--splits", default="photos,crops",
                    help="comma-separated calibration splits among photos, crops (default: both)")
    ap.add_argument("--frontends", default="torch,onnx", help="comma-separated among torch, onnx (default: both)")
    ap.add_argument("--calib-n", type=int, default=128, help="calibration crops (default %(default)s)")
    ap.add_argument("--calib-batch", type=int, default=16, help="calibration batch size (default %(default)s)")
    ap.add_argument("--eval-n", type=int, default=320, help="evaluation crops (default %(default)s)")
    ap.add_argument("--eval-batch", type=int, default=32, help="evaluation batch size (default %(default)s)")
    ap.add_argument("--source-size", type=int, default=320, help="side of the photo squares crops are cut from")
    ap.add_argument("--data-seed", type=int, default=0, help="calibration crops seed; evaluation uses seed + 1")
    ap.add_argument("--threads", type=int, default=2, help="torch threads and ORT intra-op threads (default 2)")
    ap.add_argument("--out", default=None, help="output directory for efficientnet.{json,md} "
                                                "(default docs; with --quick: nothing is written unless given)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 16 calibration crops (batches of 8), 32 evaluation crops, budget 0.7")
    args = ap.parse_args(argv)
    explicit = set(a.split("=")[0] for a in (sys.argv[1:] if argv is None else argv))
    if args.quick:
        if "--calib-n" not in explicit:
            args.calib_n = 16
        if "--calib-batch" not in explicit:
            args.calib_batch = 8
        if "--eval-n" not in explicit:
            args.eval_n = 32
        if "--budgets" not in explicit:
            args.budgets = "0.7"
    elif args.out is None:
        args.out = "docs"
    try:
        args.budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    except ValueError:
        ap.error(f"--budgets: not a comma-separated list of numbers: {args.budgets!r}")
    if not args.budgets or not all(0 < b <= 1 for b in args.budgets):
        ap.error("--budgets: every budget must be a fraction in (0, 1]")
    args.frontends = [f.strip() for f in args.frontends.split(",") if f.strip()]
    if not args.frontends or any(f not in ("torch", "onnx") for f in args.frontends):
        ap.error("--frontends: choose among torch, onnx")
    args.splits = [k.strip() for k in args.splits.split(",") if k.strip()]
    if not args.splits or any(k not in SPLITS for k in args.splits):
        ap.error(f"--splits: choose among {', '.join(SPLITS)}")
    if min(args.calib_n, args.calib_batch, args.eval_n, args.eval_batch) < 1:
        ap.error("sizes must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]

    model = load_efficientnet_lite0()
    eval_src = sample_photos(args.source_size, EVAL_PHOTOS)
    x_eval = to_model_input(augmented_crops(eval_src, args.eval_n, args.data_seed + 1))
    x_cals = {k: to_model_input(augmented_crops(sample_photos(args.source_size, SPLITS[k][0]), args.calib_n,
                                                args.data_seed + SPLITS[k][1])) for k in args.splits}

    onnx_model = export(model)
    dynamic = True
    ref_t = torch_logits(model, x_eval, args.eval_batch)
    ref_o = ort_logits(onnx_model, x_eval, args.eval_batch)
    dense_ort = compare(ref_o, ref_t)
    print(f"dense: {sum(p.numel() for p in model.parameters()):,} params; ORT vs torch top-1 "
          f"{dense_ort['top1_agreement']:.2f}%, rel. logit err {dense_ort['rel_logit_error']:.2g}; "
          f"{len(np.unique(ref_t.argmax(1)))} distinct predicted classes on {args.eval_n} eval crops",
          file=sys.stderr, flush=True)

    rows: list[dict] = []
    for fe, ref in (("torch", ref_t), ("onnx", ref_o)):
        if fe in args.frontends:
            rows.append({"split": None, "frontend": fe, "budget_params": None, "calib_rel_logit_error": None,
                         "achieved_params": 1.0, "achieved_flops": 1.0,
                         **compare(ref, ref), "predicted_output_error": None, "measured_output_error": None,
                         "transform_s": None, "eval_s": None, "forms": None, "budget_met": None, "error": None,
                         "dense": True})
    for split, x_cal in x_cals.items():
        calib_t = list(x_cal.split(args.calib_batch))
        calib_o = [{"x": b.numpy()} for b in calib_t]
        cal_t = torch_logits(model, x_cal, args.eval_batch)
        cal_o = ort_logits(onnx_model, x_cal, args.eval_batch)
        for b in args.budgets:
            for fe in args.frontends:
                if fe == "torch":
                    rows.append(run_frontend("torch", split, b, model, calib_t, x_eval, ref_t, x_cal, cal_t,
                                             args.eval_batch))
                else:
                    rows.append(run_frontend("onnx", split, b, onnx_model, calib_o, x_eval, ref_o, x_cal, cal_o,
                                             args.eval_batch))
    for r in rows:
        if r.get("dense"):
            r["frontend"] = f"{r['frontend']} (dense)"
    gs = gaps([r for r in rows if not r.get("dense")])

    argv_list = sys.argv[1:] if argv is None else list(argv)
    meta = {
        "benchmark": "efficientnet",
        "command": "nice -n 10 python bench/efficientnet.py" + "".join(" " + shlex.quote(a) for a in argv_list),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "sketchpass": sp.__version__, **library_revision(),
        "torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "model_params": sum(p.numel() for p in model.parameters()),
        "dynamic_batch": dynamic, "onnx_nodes": len(onnx_model.graph.node),
        "calib_n": args.calib_n, "calib_batch": args.calib_batch,
        "splits": {k: {"photos": list(SPLITS[k][0]), "seed": args.data_seed + SPLITS[k][1]} for k in args.splits},
        "eval_n": len(x_eval), "eval_seed": args.data_seed + 1,
        "eval_photos": list(EVAL_PHOTOS), "source_size": args.source_size, "budgets": args.budgets,
        "frontends": args.frontends, "quick": args.quick,
        "dense_ort_vs_torch": dense_ort, "dense_classes": int(len(np.unique(ref_t.argmax(1)))),
        "frontend_tolerance_points": FRONTEND_TOL,
        "wall_s": time.perf_counter() - t_start,
        "load_avg_1min": [round(load_start, 2), round(os.getloadavg()[0], 2)],
    }

    print_table(rows, gs, "EfficientNet-Lite0, post-training, agreement with the dense model "
                          f"({meta['eval_n']} eval crops)")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "efficientnet.json").write_text(json.dumps({"meta": meta, "rows": rows, "frontend_gap": gs},
                                                          indent=1) + "\n")
        (out / "efficientnet.md").write_text(markdown(rows, gs, meta))
        print(f"wrote {out / 'efficientnet.json'}, {out / 'efficientnet.md'} ({meta['wall_s']:.0f} s)", file=sys.stderr)
    bad = [r for r in rows if r["error"] or r["budget_met"] is False] + [g for g in gs if g["met"] is False]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
