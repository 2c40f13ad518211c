"""The ONNX pass: parity with the PyTorch pass, U storage, pass time — measured in one run.

1. **MNIST CNN, both frontends.**  :func:`sketchpass.demo.models.load_mnist_cnn` and its export
   (``torch.onnx.export(dynamo=False)``, dynamic batch), each compressed by ``sp.transform`` at
   ``Budget(params=b)`` for ``b`` in 0.25, 0.15, 0.10 (default options: ``method="auto"``, sequential refit,
   verify loop) with the first 1,024 MNIST train images as calibration (8 batches of 128, one held out by
   the pipeline; inputs normalised by :func:`sketchpass.demo.data.mnist_tensors`); accuracy on the 10,000
   test images in torch and in ONNX Runtime (CPU).  Also the torch plan applied by name to the export
   (``sp.apply(onnx_model, torch_plan, calib)``).  Done when the ONNX pass is within 0.1 points of the torch
   pass at every budget.  Every ONNX result passes ``onnx.checker.check_model(full_check=True)``.
2. **U storage and file size.**  The model planned with ``method="sketch"`` at ``params=0.25`` (so that the
   sketches exist) and applied with ``u_storage`` = ``float``, ``int8``, ``bits``; for each: the serialised
   file size against the effective parameter bytes ``4 · plan.totals["params_after"]`` (float32), and the
   test accuracy.
3. **Light ResNet-50.**  ``onnx/backend/test/data/light/light_resnet50.onnx``: ``sp.transform`` wall time at
   ``Budget(params=0.5)`` with the default options (16 sensitivity samples — here all there are), 2 random
   224×224 calibration images (one fits, one is held out); and with ``method="svd"``, ``sensitivity_samples=1``.

Writes ``docs/onnx_pass.json`` (with the verify records of every plan, for ``bench/verify_table.py``) and
``docs/onnx_pass.md``.  Run under the shared CPU lock::

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
from common import verify_record

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

    # 1. MNIST: the torch pass and the ONNX pass of its export, and the torch plan applied to the export
    model = load_mnist_cnn().eval()
    m = export(model)
    xtr, _ = mnist_tensors("train", n=args.calib_n)
    xte, yte = mnist_tensors("test")
    tcal = list(xtr.split(128))
    calib = [{"x": b} for b in tcal]
    dense_acc = accuracy(m, xte, yte)
    with torch.no_grad():
        dense_torch = float(100.0 * (torch.cat([model(b) for b in xte.split(1000)]).argmax(1) == yte).float().mean())
    rows, verify = [], []
    for b in (0.25, 0.15, 0.10):
        t0 = time.perf_counter()
        st = sp.transform(model, sp.Budget(params=b), calib=tcal)
        t1 = time.perf_counter()
        so = sp.transform(m, sp.Budget(params=b), calib=calib)
        t2 = time.perf_counter()
        pt, po = st.sketchpass_plan, spx.plan_of(so)
        sx = sp.apply(m, sp.Plan.from_json(pt.to_json()), calib=calib)  # the torch plan, by name, on the export
        with torch.no_grad():
            acc_t = float(100.0 * (torch.cat([st(x) for x in xte.split(1000)]).argmax(1) == yte).float().mean())
        acc_o, acc_x = accuracy(so, xte, yte), accuracy(sx, xte, yte)
        rows.append({"budget": b, "torch_accuracy": acc_t, "onnx_accuracy": acc_o, "torch_plan_on_onnx": acc_x,
                     "difference": round(acc_o - acc_t, 4), "torch_layers": forms(pt), "onnx_layers": forms(po),
                     "torch_params": pt.achieved()["params"], "onnx_params": po.achieved()["params"],
                     "torch_s": round(t1 - t0, 2), "onnx_s": round(t2 - t1, 2), "full_checker": checker_ok(so),
                     "torch_measured": pt.verify.get("measured"), "onnx_measured": po.verify.get("measured"),
                     "predicted": po.totals["predicted_output_error"]})
        verify += [verify_record(pt, "MNIST CNN", f"params={b:g}", "torch"),
                   verify_record(po, "MNIST CNN (ONNX export)", f"params={b:g}", "onnx")]
    res["mnist"] = {"dense_accuracy_ort": dense_acc, "dense_accuracy_torch": dense_torch, "rows": rows,
                    "file_bytes": len(so.SerializeToString()), "dense_file_bytes": len(m.SerializeToString())}
    res["verify"] = verify

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
        sr = sp.transform(path, sp.Budget(params=0.5), calib=rc, **opts)
        t1 = time.perf_counter()
        pr = spx.plan_of(sr)
        sess = ort.InferenceSession(sr.SerializeToString(), providers=["CPUExecutionProvider"])
        out = sess.run(None, rc[0])[0]
        res[key] = {"budget": "params=0.5", "method": opts.get("method", "auto"),
                    "sensitivity_samples": opts.get("sensitivity_samples", 16), "calib_images": len(rc),
                    "total_s": round(t1 - t0, 2), "achieved": pr.achieved(),
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
    within = all(abs(r["difference"]) <= 0.1 for r in mn["rows"])
    lines = [
        "# ONNX pass: parity with the PyTorch pass, U storage, pass time", "",
        "*Generated by `bench/onnx_pass.py`; do not edit by hand — re-run the command.*", "",
        "```", meta["command"], "```", "",
        f"- {meta['date']}, commit `{commit}`; onnx {meta['onnx']}, onnxruntime {meta['onnxruntime']} (CPU), torch "
        f"{meta['torch']}, {meta['cpus']} CPU(s), load average {meta['load_avg']:.2f} at the end; "
        f"wall {meta['wall_s']} s",
        "- TensorRT is not available on this machine: every number and check here is ONNX Runtime (CPU).", "",
        f"## MNIST CNN: the torch pass and the ONNX pass of its export (dense {mn['dense_accuracy_torch']:.2f}% in "
        f"torch, {mn['dense_accuracy_ort']:.2f}% in ORT)", "",
        "Default options (`method=\"auto\"`, sequential refit, verify loop), 1,024 calibration images (one batch "
        "of 128 held out), accuracy on the 10,000 test images.  `torch plan → ONNX`: the torch pass's plan applied "
        "by layer name to the export.  `meas.`: the output error each pass measured on its held-out batch.", "",
        "| budget | torch % | ONNX % | ONNX − torch | torch plan → ONNX % | layers (torch) | layers (ONNX) | "
        "meas. torch | meas. ONNX | time torch s | time ONNX s | checker |",
        "|---:|---:|---:|---:|---:|:---|:---|---:|---:|---:|---:|:---|",
    ]
    for r in mn["rows"]:
        diff = r["difference"] if abs(r["difference"]) >= 0.005 else 0.0
        lines.append(f"| params={r['budget']:g} | {r['torch_accuracy']:.2f} | {r['onnx_accuracy']:.2f} | "
                     f"{diff:+.2f} | {r['torch_plan_on_onnx']:.2f} | `{r['torch_layers']}` | "
                     f"`{r['onnx_layers']}` | {r['torch_measured']:.4g} | {r['onnx_measured']:.4g} | {r['torch_s']} | "
                     f"{r['onnx_s']} | {'ok' if r['full_checker'] else 'FAILED'} |")
    lines += ["", f"Done when the ONNX pass is within 0.1 points of the torch pass at every budget: "
              f"**{'met' if within else 'NOT met'}**.", "",
              "## Light ResNet-50 (`onnx` package test model, placeholder weights), `Budget(params=0.5)`", "",
              f"- default options: {r50['total_s']} s for `sp.transform` ({r50['factored_layers']}/{r50['layers']} "
              f"layers factored, params {r50['achieved']['params']:.3f}, runs in ORT: {r50['runs_in_ort']})",
              f"- `method=\"svd\"`, 1 sensitivity sample: {r50s['total_s']} s", "",
              f"## U storage (MNIST CNN, `method=\"sketch\"`, `Budget(params=0.25)`, layers `{us['layers']}`)", "",
              "| u_storage | file bytes | effective params bytes | ratio | test acc. % | full checker |",
              "|:---|---:|---:|---:|---:|:---|"]
    for r in us["rows"]:
        lines.append(f"| `{r['u_storage']}` | {r['file_bytes']:,} | {r['effective_bytes']:,} | {r['ratio']:.3f} | "
                     f"{r['accuracy']:.2f} | {'ok' if r['full_checker'] else 'FAILED'} |")
    lines += ["", f"The `bits` file is {compact['ratio']:.3f}× the effective parameter bytes.  Post-training sketches "
              "(no fine-tuning) lose accuracy, as measured for the torch pass in `docs/posttrain.md`; the U storage "
              "table is about file size, the accuracy column is for reference.", ""]
    (out_dir / "onnx_pass.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
