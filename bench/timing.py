"""Time the PyTorch pass on torchvision ResNet-50 (random weights) with 64 calibration images at 224².

Prints plan and apply times per method and writes ``docs/timing.json``.  Run alone on the machine
(other CPU-heavy processes distort the numbers badly: MKL/OpenMP threads spin when oversubscribed)::

    python bench/timing.py            # default: methods svd and auto, budget params=0.5
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import torch
import torchvision
from rich.console import Console
from rich.table import Table

import sketchpass as sp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--res", type=int, default=224)
    ap.add_argument("--budget", default="params=0.5")
    ap.add_argument("--methods", default="svd,auto")
    ap.add_argument("--out", default="docs")
    args = ap.parse_args()

    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)().eval()
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(args.batch, 3, args.res, args.res, generator=g) for _ in range(args.images // args.batch)]
    rows = []
    for method in args.methods.split(","):
        t0 = time.perf_counter()
        p = sp.plan(model, args.budget, calib=calib, method=method)
        t1 = time.perf_counter()
        small = sp.apply(model, p, calib=calib)
        t2 = time.perf_counter()
        del small
        rows.append({"model": args.model, "method": method, "budget": args.budget, "images": args.images,
                     "res": args.res, "plan_s": round(t1 - t0, 2), "apply_s": round(t2 - t1, 2),
                     "total_s": round(t2 - t0, 2), "achieved": {k: round(v, 4) for k, v in p.achieved().items()}})
    table = Table(title=f"{args.model}: plan + apply, {args.images} images at {args.res}², {os.cpu_count()} CPUs")
    for col in ("method", "budget", "achieved params", "plan s", "apply s", "total s"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["method"], r["budget"], f"{r['achieved'].get('params', 0):.4f}", f"{r['plan_s']:.1f}",
                      f"{r['apply_s']:.1f}", f"{r['total_s']:.1f}")
    Console().print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python bench/timing.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
            "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "cpus": os.cpu_count(), "machine": platform.machine(),
            "torch_threads": torch.get_num_threads()}
    (out / "timing.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
