"""The ONNX pass's done-when numbers (issue 4), measured in one run.

1. **MNIST CNN in ONNX Runtime.**  :func:`sketchpass.demo.models.load_mnist_cnn` exported with
   ``torch.onnx.export(dynamo=False)`` (dynamic batch), compressed by ``sketchpass.onnx.transform`` at
   ``Budget(params=0.25)`` (``method="auto"``) with the first 1,024 MNIST train images as calibration
   (batches of 128; inputs normalised with mean 0.1307, std 0.3081 by :func:`sketchpass.demo.data.mnist_tensors`),
   then evaluated on the 10,000 test images in ONNX Runtime (CPU).  The emitted model is checked
   with ``onnx.checker.check_model(full_check=True)``.
2. **U storage and file size.**  The same model planned with ``method="sketch"`` (so that the
   sketches exist) and applied with ``u_storage`` = ``float``, ``int8``, ``bits``; for each: the
   serialised file size against the effective parameter bytes ``4 · plan.totals["params_after"]``
   (float32), and the test accuracy.  The ``auto`` model's size is reported too.
3. **Light ResNet-50.**  ``onnx/backend/test/data/light/light_resnet50.onnx``: ``plan`` + ``apply``
   wall time at ``Budget(params=0.5)`` with the default options (``method="auto"``, 4 sensitivity
   samples), 2 random 224×224 calibration images; and, for reference, with ``method="svd"`` and
   ``sensitivity_samples=1``.

Writes ``docs/onnx_pass.json`` and ``docs/onnx_pass.md``.  Run under the shared CPU lock::

    flock /tmp/sketchpass-cpu.lock python bench/onnx_pass.py
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
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

import sketchpass as sp
import sketchpass.onnx as spx
from sketchpass.demo.data import mnist_tensors
from sketchpass.demo.models import load_mnist_cnn


def export(model) -> onnx.ModelProto:
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 1, 28, 28),), f, dynamo=False, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    return onnx.load_from_string(f.getvalue())


def accuracy(m: onnx.ModelProto, x: torch.Tensor, y: torch.Tensor) -> float:
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    pred = np.concatenate([s.run(None, {"x": b.numpy()})[0].argmax(1) for b in x.split(1000)])
    return float(100.0 * (pred == y.numpy()).mean())


def checker_ok(m: onnx.ModelProto) -> bool:
    try:
        onnx.checker.check_model(m, full_check=True)
        return True
    except Exception:
        return False


def forms(p: sp.Plan) -> str:
    return " ".join({"svd": f"r{lp.decision.rank}", "sketch": f"k{lp.decision.k}"}.get(lp.decision.method, "·")
                    for lp in p.layers)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="docs")
    ap.add_argument("--calib-n", type=int, default=1024)
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    res: dict = {}

    # 1. MNIST
    model = load_mnist_cnn().eval()
    m = export(model)
    xtr, _ = mnist_tensors("train", n=args.calib_n)
    xte, yte = mnist_tensors("test")
    calib = [{"x": b} for b in xtr.split(128)]
    dense_acc = accuracy(m, xte, yte)
    t0 = time.perf_counter()
    p = spx.plan(m, sp.Budget(params=0.25), calib=calib)
    t1 = time.perf_counter()
    small = spx.apply(m, p, calib=calib)
    t2 = time.perf_counter()
    res["mnist"] = {"budget": "params=0.25", "method": "auto", "dense_accuracy": dense_acc,
                    "accuracy": accuracy(small, xte, yte), "achieved": p.achieved(), "layers": forms(p),
                    "full_checker": checker_ok(small), "plan_s": round(t1 - t0, 2), "apply_s": round(t2 - t1, 2),
                    "file_bytes": len(small.SerializeToString()), "dense_file_bytes": len(m.SerializeToString()),
                    "effective_bytes": 4 * p.totals["params_after"]}

    # 2. U storage
    ps = spx.plan(m, sp.Budget(params=0.25), calib=calib, method="sketch")
    rows = []
    eff = 4 * ps.totals["params_after"]
    for st in spx.U_STORAGE:
        s = spx.apply(m, ps, calib=calib, u_storage=st)
        size = len(s.SerializeToString())
        rows.append({"u_storage": st, "file_bytes": size, "effective_bytes": eff,
                     "ratio": round(size / eff, 4), "accuracy": accuracy(s, xte, yte), "full_checker": checker_ok(s)})
    res["u_storage"] = {"method": "sketch", "budget": "params=0.25", "layers": forms(ps), "rows": rows}

    # 3. light resnet50
    path = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light", "light_resnet50.onnx")
    rng = np.random.default_rng(0)
    rc = [{"gpu_0/data_0": rng.standard_normal((1, 3, 224, 224)).astype(np.float32)} for _ in range(2)]
    for key, opts in (("resnet50_light", {}), ("resnet50_light_svd", {"method": "svd", "sensitivity_samples": 1})):
        t0 = time.perf_counter()
        pr = spx.plan(path, sp.Budget(params=0.5), calib=rc, **opts)
        t1 = time.perf_counter()
        sr = spx.apply(path, pr, calib=rc)
        t2 = time.perf_counter()
        sess = ort.InferenceSession(sr.SerializeToString(), providers=["CPUExecutionProvider"])
        out = sess.run(None, rc[0])[0]
        res[key] = {"budget": "params=0.5", "method": opts.get("method", "auto"),
                    "sensitivity_samples": opts.get("sensitivity_samples", 4), "calib_images": 2,
                    "plan_s": round(t1 - t0, 2), "apply_s": round(t2 - t1, 2),
                    "total_s": round(t2 - t0, 2), "achieved": pr.achieved(),
                    "factored_layers": sum(lp.decision.method != "dense" for lp in pr.layers),
                    "layers": len(pr.layers), "runs_in_ort": bool(np.isfinite(out).all())}

    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = {"command": "flock /tmp/sketchpass-cpu.lock python bench/onnx_pass.py",
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commit": commit,
            "onnx": onnx.__version__, "onnxruntime": ort.__version__, "torch": torch.__version__,
            "python": platform.python_version(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_avg": os.getloadavg()[0], "wall_s": round(time.perf_counter() - t_start, 1)}
    out_dir = Path(args.out)
    out_dir.mkdir(exist_ok=True)
    (out_dir / "onnx_pass.json").write_text(json.dumps({"meta": meta, **res}, indent=1) + "\n")
    mn, r50, us = res["mnist"], res["resnet50_light"], res["u_storage"]
    r50s = res["resnet50_light_svd"]
    compact = next(r for r in us["rows"] if r["u_storage"] == "bits")
    lines = [
        "# ONNX pass: done-when measurements", "",
        "*Generated by `bench/onnx_pass.py`; do not edit by hand — re-run the command.*", "",
        "```", meta["command"], "```", "",
        f"- {meta['date']}, commit `{commit}`; onnx {meta['onnx']}, onnxruntime {meta['onnxruntime']} (CPU), torch "
        f"{meta['torch']}, {meta['cpus']} CPU(s), load average {meta['load_avg']:.2f} at the end; "
        f"wall {meta['wall_s']} s",
        "- TensorRT is not available on this machine: every number and check here is ONNX Runtime (CPU).", "",
        "| done-when | measured | met |", "|:---|:---|:---|",
        f"| MNIST CNN → ONNX at `Budget(params=0.25)`, ≥ 98.5% in ORT, full checker | {mn['accuracy']:.2f}% "
        f"(dense {mn['dense_accuracy']:.2f}%), params {mn['achieved']['params']:.4f}, layers `{mn['layers']}`, "
        f"checker {'ok' if mn['full_checker'] else 'FAILED'} | "
        f"{'yes' if mn['accuracy'] >= 98.5 and mn['full_checker'] else 'NO'} |",
        f"| compact U storage: file size within 10% of effective params bytes | `bits`: {compact['file_bytes']:,} B "
        f"vs {compact['effective_bytes']:,} B (×{compact['ratio']:.3f}) | "
        f"{'yes' if abs(compact['ratio'] - 1) <= 0.10 else 'NO'} |",
        "| light ResNet-50 plan + rewrite < 30 s on 2 cores (default options: `method=\"auto\"`, 4 sensitivity "
        f"samples) | plan {r50['plan_s']} s + apply {r50['apply_s']} s = "
        f"{r50['total_s']} s ({r50['factored_layers']}/{r50['layers']} layers factored, params "
        f"{r50['achieved']['params']:.3f}) | {'yes' if r50['total_s'] < 30 else 'NO'} |", "",
        f"(With `method=\"svd\"` and 1 sensitivity sample: plan {r50s['plan_s']} s + apply {r50s['apply_s']} s = "
        f"{r50s['total_s']} s.)", "",
        f"## U storage (MNIST CNN, `method=\"sketch\"`, `Budget(params=0.25)`, layers `{us['layers']}`)", "",
        "| u_storage | file bytes | effective params bytes | ratio | test acc. % | full checker |",
        "|:---|---:|---:|---:|---:|:---|",
    ]
    for r in us["rows"]:
        lines.append(f"| `{r['u_storage']}` | {r['file_bytes']:,} | {r['effective_bytes']:,} | {r['ratio']:.3f} | "
                     f"{r['accuracy']:.2f} | {'ok' if r['full_checker'] else 'FAILED'} |")
    lines += ["", f"The `auto` MNIST model (all svd, no sketches) is {mn['file_bytes']:,} bytes for "
              f"{mn['effective_bytes']:,} effective bytes (dense file: {mn['dense_file_bytes']:,} bytes).", "",
              "Post-training sketches (no fine-tuning) lose accuracy, as measured for the torch pass in "
              "`docs/posttrain.md`; the U storage table is about file size, the accuracy column is for reference.",
              ""]
    (out_dir / "onnx_pass.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
