"""Interleaved A/B of the transform time of two sketchpass source trees on the same job: all-MiniLM-L6-v2 as a
sentence encoder (:mod:`bench.transformer`'s ``Encoder``), ``--calib-n`` sentences of *Emma* in batches of 32,
``sp.transform(model, Budget(params=--budget), calib, method="svd")``.

Every run is a fresh process importing one tree (``--a``: a checkout of the older commit; ``--b``: this one),
with the same thread count; the runs alternate A B B A A B … so that drift on a noisy machine falls on both
sides; the table gives each side's median with its min–max, and the median and min–max of the per-pair
ratios B / A.  Only the transform is timed (model loading and data preparation are not).  Also written: the
share of padding among the calibration batches' tokens.  Writes ``ab_transform.json`` / ``.md`` into
``--out`` (default ``docs``)::

    git worktree add /tmp/before <commit>
    python bench/ab_transform.py --a /tmp/before --b . --pairs 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def child(tree: str, calib_n: int, budget: float, threads: int) -> dict:
    sys.path.insert(0, str(Path(tree).resolve()))
    import torch

    torch.set_num_threads(threads)
    import sketchpass as sp
    from sketchpass.demo import text

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from transformer import Encoder

    tok, bert = text.load_minilm()
    model = Encoder(bert).eval()
    calib = text.sentence_batches(tok, text.sentences(text.austen("emma"), calib_n, seed=0), batch_size=32)
    t0 = time.perf_counter()
    small = sp.transform(model, sp.Budget(params=budget), calib=calib, method="svd", progress=False)
    secs = time.perf_counter() - t0
    real = sum(int(b["attention_mask"].sum()) for b in calib)
    total = sum(b["attention_mask"].numel() for b in calib)
    return {"seconds": secs, "module": sp.__file__, "threads": torch.get_num_threads(),
            "achieved_params": small.sketchpass_plan.achieved()["params"],
            "measured_output_error": (small.sketchpass_plan.verify or {}).get("measured"),
            "padding_share": 1 - real / total}


def run_one(tree: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", tree, "--calib-n", str(args.calib_n), "--budget", str(args.budget),
           "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"the run on {tree} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--a", help="the baseline source tree (a checkout of the older commit)")
    ap.add_argument("--b", default=".", help="the tree compared with it (default: this one)")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--calib-n", type=int, default=512)
    ap.add_argument("--budget", type=float, default=0.8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="docs")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.calib_n, args.budget, args.threads)))
        return 0
    if not args.a:
        ap.error("--a (the baseline tree) is required")
    trees = {"a": args.a, "b": args.b}
    runs: dict = {"a": [], "b": []}
    order = []
    for p in range(args.pairs):
        for side in (("a", "b") if p % 2 == 0 else ("b", "a")):
            r = run_one(trees[side], args)
            runs[side].append(r)
            order.append(side)
            print(f"  {side}: {r['seconds']:.1f} s ({r['module']})", file=sys.stderr, flush=True)
    ta = [r["seconds"] for r in runs["a"]]
    tb = [r["seconds"] for r in runs["b"]]
    ratios = [b / a for a, b in zip(ta, tb)]
    def commit(tree: str) -> str:  # the tree's commit, marked when its sketchpass/ differs from it
        head = subprocess.run(["git", "-C", tree, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", tree, "status", "--porcelain", "--", "sketchpass"], capture_output=True,
                               text=True).stdout.strip()
        return head + (" + uncommitted changes" if dirty else "")

    meta = {"command": "python bench/ab_transform.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "a": commit(args.a),
            "b": commit(args.b), "order": order, "threads": args.threads, "cpus": os.cpu_count(),
            "calib_n": args.calib_n, "budget": args.budget, "load_avg": os.getloadavg()[0],
            "padding_share": runs["b"][0]["padding_share"]}
    res = {"meta": meta, "a": runs["a"], "b": runs["b"],
           "median_a": statistics.median(ta), "median_b": statistics.median(tb),
           "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    (out / "ab_transform.json").write_text(json.dumps(res, indent=1) + "\n")
    lines = ["# Transform time, interleaved A/B of two source trees", "",
             "*Generated by `bench/ab_transform.py`; do not edit by hand — re-run the command.*", "", "```",
             meta["command"], "```", "",
             f"- {meta['date']}; A = commit `{meta['a']}`, B = commit `{meta['b']}`; {args.threads} threads, "
             f"{meta['cpus']} CPUs; order {' '.join(order)}; load average {meta['load_avg']:.2f} at the end",
             f"- all-MiniLM-L6-v2 sentence encoder, {args.calib_n} sentences of *Emma* in batches of 32 "
             f"({meta['padding_share']:.0%} of their tokens are padding), `Budget(params={args.budget:g})`, "
             "`method=\"svd\"`; only `sp.transform` is timed, each run a fresh process", "",
             "| | median s | min–max s | runs |", "|:---|---:|---:|---:|",
             f"| A | {res['median_a']:.1f} | {min(ta):.1f}–{max(ta):.1f} | {len(ta)} |",
             f"| B | {res['median_b']:.1f} | {min(tb):.1f}–{max(tb):.1f} | {len(tb)} |", "",
             f"B / A per pair: median **{res['ratio_median']:.3f}** (min {res['ratio_min']:.3f}, max "
             f"{res['ratio_max']:.3f}); measured output error A {runs['a'][0]['measured_output_error']:.4f}, "
             f"B {runs['b'][0]['measured_output_error']:.4f}."]
    (out / "ab_transform.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
