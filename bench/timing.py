"""Time the PyTorch pass on torchvision ResNet-50 (random weights) with 64 calibration images at 224².

Each method runs in a fresh Python process — what a user pays, one-time costs (kernel generation,
first allocations) included — and is timed as one ``sp.transform``: observe, sensitivities, candidates,
solve, fit with sequential refit, emit, verify on the held-out batch (and the verify loop's extra rounds,
counted in ``rounds``).  The process's peak resident memory (``ru_maxrss``) is recorded.  Prints a table
and writes ``docs/timing.json``.  Run it alone on the machine (other CPU-heavy processes distort the
numbers badly)::

    python bench/timing.py            # default: methods auto (the default of sp.plan) and svd, params=0.5
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path


def run_one(args) -> dict:
    """One plan + apply in this process; the result row."""
    import torch
    import torchvision
    from common import verify_record

    import sketchpass as sp

    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)().eval()
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(args.batch, 3, args.res, args.res, generator=g) for _ in range(args.images // args.batch)]
    import resource

    t0 = time.perf_counter()
    small = sp.transform(model, args.budget, calib=calib, method=args.one)
    t2 = time.perf_counter()
    p = small.sketchpass_plan
    v = p.verify or {}
    forms = {}
    for lp in small.sketchpass_plan.layers:
        forms[lp.decision.method] = forms.get(lp.decision.method, 0) + 1
    return {"model": args.model, "method": args.one, "budget": args.budget, "images": args.images, "res": args.res,
            "total_s": round(t2 - t0, 2), "rounds": len(v.get("rounds", [])),
            "predicted_output_error": v.get("predicted"), "measured_output_error": v.get("measured"),
            "verify_record": verify_record(p, f"torchvision {args.model} (random weights)",
                                           f"{args.budget} ({args.one})", "torch"),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "achieved": {k: round(v, 4) for k, v in p.achieved().items()}, "forms": forms,
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "torch_threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--res", type=int, default=224)
    ap.add_argument("--budget", default="params=0.5")
    ap.add_argument("--methods", default="auto,svd")
    ap.add_argument("--out", default="docs")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one method here, print its row as JSON
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args)))
        return

    from rich.console import Console
    from rich.table import Table

    rows = []
    for method in args.methods.split(","):
        cmd = [sys.executable, __file__, "--one", method] + [a for k, v in vars(args).items()
                                                             if k not in ("one", "methods", "out")
                                                             for a in (f"--{k}", str(v))]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    table = Table(title=f"{args.model}: sp.transform, {args.images} images at {args.res}², {os.cpu_count()} CPUs, "
                        "each method in a fresh process")
    for col in ("method", "budget", "achieved params", "forms", "verify rounds", "transform s", "peak RSS MB"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["method"], r["budget"], f"{r['achieved'].get('params', 0):.4f}",
                      " ".join(f"{k} {v}" for k, v in sorted(r["forms"].items())), str(r["rounds"]),
                      f"{r['total_s']:.1f}", f"{r['peak_rss_mb']:.0f}")
    Console().print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    first = rows[0] if rows else {}
    meta = {"command": "python bench/timing.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()
                                                            if k != "one"),
            "date": datetime.date.today().isoformat(), "torch": first.get("torch"),
            "torchvision": first.get("torchvision"), "cpus": os.cpu_count(), "machine": platform.machine(),
            "torch_threads": first.get("torch_threads"), "load_avg_1min_end": round(os.getloadavg()[0], 2),
            "fresh_process_per_method": True}
    (out / "timing.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
