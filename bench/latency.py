"""Latency budgets measured on the target runtime, against the proxies at the same measured latency.

What it measures
----------------
For every model, runtime and ``Budget(latency=b)`` (default b = 0.7 and 0.5):

* **latency plan** — ``sp.transform(model, Budget(latency=b), calib, method="svd", target=T)``: every layer
  form timed standalone on ``T``, the solver on measured costs, the emitted model measured against the dense
  one (interleaved A/B) and the plan corrected until it meets the budget.  Recorded: the measured ratio to
  dense (from the plan's own A/B), whether the budget is met (within the measured spread, at most +3%), the
  output error measured on the held-out calibration batch, the plan's predicted latency; and the time of one
  pass of every stage (``sp.plan(..., rounds=0, latency_rounds=0)``) with an empty timing table and again with
  the table warm, in all and for the timing stage alone;
* **flops plan** — ``Budget(flops=f)`` with ``f`` the latency plan's achieved FLOPs fraction: what a user who
  guesses "FLOPs ∝ latency" gets at the same FLOPs;
* **uniform plan** — every factorable layer at the same fraction of its own parameters (its rank
  ``⌊f · d_in·hw·d_out / (d_in·hw + d_out)⌋``), the fraction chosen so that the whole model has the latency
  plan's FLOPs; fitted by the same pipeline (``overrides=``).

The flops and uniform plans are then timed against the dense model with the same interleaved A/B
measurement on the same target and batch, so the table compares output error at (about) the same
*measured* latency.  Models: torchvision ResNet-50 (random weights, the ImageNet shapes), a
BERT-base-shaped encoder (``transformers.BertModel``, hidden 768, 4 layers, random weights, 128 tokens)
and the pretrained EfficientNet-Lite0 (:mod:`sketchpass.demo.models`).  Runtimes: ONNX Runtime on the CPU
(``ort-cpu``, the models exported with ``torch.onnx.export(dynamo=False)``) and PyTorch on the CPU
(``torch-cpu``).  Calibration: ``--images`` (32) augmented crops of the photos bundled with scikit-image /
scikit-learn at 224² in batches of ``--batch`` (4), or as many random token sequences for the encoder; the
batch is also the shape every latency is measured at.  Threads: ``--threads`` (2) for both runtimes.

Writes ``docs/latency.json``, ``docs/latency.md`` and ``docs/latency.png`` (output error against measured
latency, one panel per model and runtime)::

    python bench/latency.py                     # all models, both runtimes (about 40 minutes on 2 cores)
    python bench/latency.py --models resnet50 --runtimes ort-cpu
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from common import verify_record

import sketchpass as sp

MODELS = ("resnet50", "bert", "efficientnet")
RUNTIMES = ("ort-cpu", "torch-cpu")


# --------------------------------------------------------------------------- models and data
def load(name: str):
    torch.manual_seed(0)
    if name == "resnet50":
        import torchvision

        return torchvision.models.resnet50().eval(), "image"
    if name == "efficientnet":
        from sketchpass.demo.models import load_efficientnet_lite0

        return load_efficientnet_lite0(), "image"
    import transformers

    cfg = transformers.BertConfig(hidden_size=768, num_hidden_layers=4, num_attention_heads=12,
                                  intermediate_size=3072, max_position_embeddings=512)

    class Encoder(torch.nn.Module):  # the hidden states only (a deployable encoder's output)
        def __init__(self):
            super().__init__()
            self.bert = transformers.BertModel(cfg, add_pooling_layer=False)

        def forward(self, input_ids):
            return self.bert(input_ids=input_ids).last_hidden_state

    return Encoder().eval(), "tokens"


def batches(kind: str, n: int, batch: int) -> list[torch.Tensor]:
    if kind == "tokens":
        g = torch.Generator().manual_seed(0)
        return [torch.randint(0, 30000, (batch, 128), generator=g) for _ in range(n // batch)]
    from sketchpass.demo.models import sample_photos

    photos = sample_photos(256)
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        p = photos[i % len(photos)]
        y, x = (int(v) for v in torch.randint(0, 33, (2,), generator=g))
        crop = p[:, y:y + 224, x:x + 224]
        out.append(crop.flip(-1) if i % 2 else crop)
    x = torch.stack(out) * 2 - 1
    return list(x.split(batch))


def export(model, example, kind: str):
    import onnx

    f = io.BytesIO()
    name = "input_ids" if kind == "tokens" else "x"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), f, dynamo=False, input_names=[name], output_names=["y"],
                          dynamic_axes={name: {0: "N"}, "y": {0: "N"}})
    return onnx.load_from_string(f.getvalue()), name


# --------------------------------------------------------------------------- plans
def uniform_overrides(plan: sp.Plan, flops: float) -> dict:
    """Every factorable layer at one fraction of its own params, the largest whose whole-model FLOPs fraction
    does not exceed ``flops``."""
    specs = [lp.spec for lp in plan.layers if not lp.decision.skipped and lp.spec.d_in]
    t = plan.totals

    def ranks(f):
        return {s.name: max(1, min(s.max_rank(), int(f * s.params / (s.form_params("svd", 1) - (s.d_out if s.bias
                                                                                                  else 0)))))
                for s in specs}

    def frac(r):
        after = t["macs_before"] - sum(s.macs for s in specs) + sum(
            min(s.macs, s.form_macs("svd", r[s.name])) for s in specs)
        return after / t["macs_before"]

    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if frac(ranks(mid)) <= flops else (lo, mid)
    r = ranks(lo)
    return {s.name: (r[s.name] if s.form_macs("svd", r[s.name]) < s.macs else None) for s in specs}


def plan_of(small, runtime):
    if runtime == "ort-cpu":
        import sketchpass.onnx as spx

        return spx.plan_of(small)
    return small.sketchpass_plan


def time_ab(dense, small, batch, runtime, threads):
    from sketchpass.latency import resolve_target

    if runtime == "ort-cpu":
        from sketchpass.onnx.timing import time_models

        target = resolve_target("ort-cpu", "onnx", threads)
    else:
        from sketchpass.fx.timing import time_models

        target = resolve_target("torch-cpu", "torch", threads)
    t = time_models({"dense": dense, "small": small}, batch, target)
    return {"ratio": t["small"].ms / t["dense"].ms, "ms": t["small"].ms, "spread": t["small"].spread,
            "dense_ms": t["dense"].ms}


def run(name: str, runtime: str, budgets, args) -> list[dict]:
    model, kind = load(name)
    calib = batches(kind, args.images, args.batch)
    if runtime == "ort-cpu":
        target_model, inp = export(model, calib[0], kind)
        cal = [{inp: b.numpy()} for b in calib]
        feed = cal[0]
    else:
        target_model, cal = model, calib
        feed = calib[0]
    rows = []
    for b in budgets:
        table = str(Path(args.table_dir) / f"{name}-{runtime}-{b:g}.json")  # cold for every budget
        common = {"calib": cal, "method": "svd", "threads": args.threads}
        once = {"target": runtime, "timing_table": table, "rounds": 0, "latency_rounds": 0, **common}

        def plan_once(b=b, once=once):
            """Wall time of one pass of every stage, and of its timing stage.  With latency_rounds=0 one round
            may miss the budget by a hair (the loop is what corrects that): the time still counts."""
            t0 = time.perf_counter()
            try:
                q = sp.plan(target_model, sp.Budget(latency=b), **once)
            except sp.InfeasibleBudgetError:
                return time.perf_counter() - t0, None
            return time.perf_counter() - t0, q.latency.get("timing_s")

        try:
            cold, cold_timing = plan_once()  # one pass of every stage, the timing table empty
            t0 = time.perf_counter()
            small = sp.transform(target_model, sp.Budget(latency=b), target=runtime, timing_table=table, **common)
            loop_s = time.perf_counter() - t0
        except sp.InfeasibleBudgetError as exc:
            rows.append({"model": name, "runtime": runtime, "budget": b, "error": str(exc)})
            print(f"  {name} {runtime} latency={b}: {exc}", file=sys.stderr, flush=True)
            continue
        p = plan_of(small, runtime)
        warm, warm_timing = plan_once()  # the same pass again, the table warm
        m = p.latency["measured"]
        f = p.achieved()["flops"]
        row = {"model": name, "runtime": runtime, "budget": b, "latency": {
            "ratio": m["ratio"], "ms": m["ms"], "spread": m["spread"], "dense_ms": m["dense_ms"],
            "requested_ms": p.latency["requested_ms"], "predicted_ms": p.latency["predicted_ms"],
            "planning_dense_ms": p.latency["dense_ms"], "met": p.latency["met"],
            "rounds": len(p.latency.get("rounds", [])), "error": p.verify.get("measured"), "flops": f,
            "params": p.achieved()["params"], "plan_cold_s": round(cold, 1), "plan_warm_s": round(warm, 1),
            "timing_cold_s": cold_timing, "timing_warm_s": warm_timing, "transform_s": round(loop_s, 1),
            "forms_timed": p.latency.get("forms_timed")},
            "verify_record": verify_record(p, f"{name} ({runtime})", f"latency={b:g}", runtime)}
        sf = sp.transform(target_model, sp.Budget(flops=f), **common)
        pf = plan_of(sf, runtime)
        row["flops_plan"] = {"flops": pf.achieved()["flops"], "error": pf.verify.get("measured"),
                             **time_ab(target_model if runtime == "ort-cpu" else model, sf, feed, runtime,
                                       args.threads)}
        ov = uniform_overrides(p, f)
        su = sp.transform(target_model, sp.Budget(flops=1.0), overrides=ov, **common)
        pu = plan_of(su, runtime)
        row["uniform_plan"] = {"flops": pu.achieved()["flops"], "error": pu.verify.get("measured"),
                               **time_ab(target_model if runtime == "ort-cpu" else model, su, feed, runtime,
                                         args.threads)}
        rows.append(row)
        L = row["latency"]
        print(f"  {name} {runtime} latency={b}: ×{L['ratio']:.3f} (met {L['met']}), err {L['error']:.4g}; "
              f"flops plan ×{row['flops_plan']['ratio']:.3f} err {row['flops_plan']['error']:.4g}; uniform "
              f"×{row['uniform_plan']['ratio']:.3f} err {row['uniform_plan']['error']:.4g}; plan {cold:.0f} s "
              f"cold (timing {cold_timing} s), {warm:.0f} s warm (timing {warm_timing} s)",
              file=sys.stderr, flush=True)
    return rows


# --------------------------------------------------------------------------- output
def plot(rows, path: Path) -> None:
    from sketchpass.plot import _pyplot, _save

    plt = _pyplot()
    keys = sorted({(r["model"], r["runtime"]) for r in rows if "latency" in r})
    fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(4.2 * max(len(keys), 1), 3.6), squeeze=False)
    for ax, (mname, rt) in zip(axes[0], keys):
        rs = [r for r in rows if r["model"] == mname and r["runtime"] == rt and "latency" in r]
        for key, label, marker in (("latency", "latency plan", "o"), ("flops_plan", "flops= plan", "s"),
                                   ("uniform_plan", "uniform", "^")):
            ax.plot([r[key]["ratio"] for r in rs], [r[key]["error"] for r in rs], marker, label=label)
        ax.set_title(f"{mname} ({rt})", fontsize=9)
        ax.set_xlabel("measured latency / dense")
        ax.set_ylabel("output error (held-out)")
        ax.set_yscale("log")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--runtimes", default=",".join(RUNTIMES))
    ap.add_argument("--budgets", default="0.7,0.5")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="docs")
    ap.add_argument("--table-dir", default=None, help="where the timing tables go (default: a temporary folder, "
                    "so that the cold time is cold)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    budgets = [float(b) for b in args.budgets.split(",")]
    t_start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        args.table_dir = args.table_dir or tmp
        for name in args.models.split(","):
            for rt in args.runtimes.split(","):
                rows += run(name, rt, budgets, args)
    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True).stdout.strip()
    import onnxruntime as ort

    meta = {"command": "python bench/latency.py", "date": dt.datetime.now(dt.timezone.utc).isoformat(
        timespec="seconds"), "commit": commit, "torch": torch.__version__, "onnxruntime": ort.__version__,
        "python": platform.python_version(), "cpus": os.cpu_count(), "threads": args.threads, "batch": args.batch,
        "images": args.images, "wall_s": round(time.perf_counter() - t_start, 1), "load_avg": os.getloadavg()[0]}
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    (out / "latency.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = ["# Latency budgets on the target runtime", "",
             "*Generated by `bench/latency.py`; do not edit by hand — re-run the command.*", "",
             "```", meta["command"], "```", "",
             f"- {meta['date']}, commit `{commit}`; torch {meta['torch']}, onnxruntime {meta['onnxruntime']}; "
             f"{meta['cpus']} CPUs, {meta['threads']} threads for both runtimes; batch {args.batch} (224² images, or "
             f"128 tokens); wall {meta['wall_s']} s (load average {meta['load_avg']:.2f} at the end)",
             "- `measured`: the emitted model's latency over the dense one's, measured together (interleaved "
             "rounds, median; ± half the interquartile range); `met`: within the budget (inside the measured spread, "
             "at most +3%) and faster than dense; `error`: relative squared output error measured on the held-out "
             "calibration batch; `plan s`: one pass of every stage with an empty timing table, then with the table "
             "warm (`timing s`: the timing stage alone; calibration, fitting and verification are not cached); the "
             "`flops=` plan has the latency plan's FLOPs fraction, the uniform plan every layer at one fraction of "
             "its own params with the same FLOPs — both timed the same way", "",
             "| model | runtime | budget | measured | met | error | flops | rounds | plan s cold → warm "
             "| timing s cold → warm | `flops=` plan: measured / error | uniform: measured / error |",
             "|:---|:---|---:|---:|:---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "latency" not in r:
            lines.append(f"| {r['model']} | {r['runtime']} | {r['budget']:g} | — | NO: {r['error']} | | | | | | | |")
            continue
        L, F, U = r["latency"], r["flops_plan"], r["uniform_plan"]
        lines.append(f"| {r['model']} | {r['runtime']} | {r['budget']:g} | ×{L['ratio']:.3f} ± "
                     f"{L['spread'] / L['dense_ms']:.3f} | {'yes' if L['met'] else 'NO'} | {L['error']:.4g} | "
                     f"{L['flops']:.3f} | {L['rounds']} | {L['plan_cold_s']} → {L['plan_warm_s']} | "
                     f"{L['timing_cold_s'] or '—'} → {L['timing_warm_s'] or '—'} | "
                     f"×{F['ratio']:.3f} / {F['error']:.4g} | ×{U['ratio']:.3f} / {U['error']:.4g} |")
    (out / "latency.md").write_text("\n".join(lines) + "\n")
    if rows:
        plot(rows, out / "latency.png")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
