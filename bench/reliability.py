"""Every kind of bad input and fault tried on ``sketchpass compress`` / ``inspect``: what it says, its exit code,
that nothing was written and that the input is byte-identical afterwards.

Each case runs in a fresh temporary folder holding a small real ONNX model (a conv net exported from torch),
its calibration data and whatever the case needs (a quantized copy made with ONNX Runtime's
``quantize_dynamic``, a model without any Conv/Gemm/MatMul, a model with external data, plan files, ...).
Most cases call the command line in this process (``sketchpass.cli.main``, what the ``sketchpass`` command
runs); the faults run it as a separate process: SIGINT / SIGTERM sent during the pass, a file-size limit
(``RLIMIT_FSIZE``, what a full disk or quota looks like to a writer), a read-only output folder (as an
unprivileged user when this runs as root), and two runs writing the same output at once.  After each case
the folder is compared with its state before: only the expected outputs may be new, no ``.tmp`` file or
``sketchpass-store-*`` folder may be left (``TMPDIR`` points into the folder), and every input must hash the
same.  ``tests/test_faults.py`` runs every case with the same checks.

Writes ``docs/reliability.md`` and ``docs/reliability.json``::

    python bench/reliability.py
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LIGHT = "light_resnet50.onnx"


@dataclass
class Case:
    name: str
    what: str  # the bad input or fault, in words
    argv: list[str]  # after "sketchpass"; {d} is the case folder
    rc: int  # expected exit code
    says: str | tuple[str, ...]  # expected in the one-line message (stderr); a tuple: any of them
    writes: tuple[str, ...] = ()  # files the case may create (only when rc == 0)
    mode: str = "inline"  # inline | process | sigint | sigterm | fsize | readonly | concurrent
    setup: str = ""  # name of an extra asset step


CASES = [
    Case("missing-input", "input file does not exist", ["compress", "{d}/nope.onnx", "-o", "{d}/o.onnx", "--budget",
         "params=0.5"], 1, "does not exist"),
    Case("corrupt-input", "input is not an ONNX model (random bytes)", ["compress", "{d}/garbage.onnx", "-o",
         "{d}/o.onnx", "--budget", "params=0.5"], 1, "not a valid ONNX model", setup="garbage"),
    Case("missing-external-data", "the model's external-data file is missing", ["compress", "{d}/ext.onnx", "-o",
         "{d}/o.onnx", "--budget", "params=0.5"], 1, "external data", setup="external"),
    Case("budget-empty-value", "budget `params=`", ["compress", "{d}/m.onnx", "-o", "{d}/o.onnx", "--budget",
         "params="], 1, "is not a number"),
    Case("budget-negative", "budget `params=-1`", ["compress", "{d}/m.onnx", "-o", "{d}/o.onnx", "--budget",
         "params=-1"], 1, "must be > 0"),
    Case("budget-overflow", "budget `flops=1e400`", ["compress", "{d}/m.onnx", "-o", "{d}/o.onnx", "--budget",
         "flops=1e400"], 1, "not a finite number"),
    Case("budget-not-a-number", "budget `latency=abc`", ["compress", "{d}/m.onnx", "-o", "{d}/o.onnx", "--budget",
         "latency=abc"], 1, "latency='abc' is not a number"),
    Case("budget-unknown-key", "budget `speed=2`", ["compress", "{d}/m.onnx", "-o", "{d}/o.onnx", "--budget",
         "speed=2"], 1, "unknown key 'speed'"),
    Case("latency-over-one", "budget `latency=1.5` (a fraction)", ["compress", "{d}/m.onnx", "-o", "{d}/o.onnx",
         "--budget", "latency=1.5"], 1, "give latency_ms= for milliseconds"),
    Case("latency-unknown-target", "`--target` that does not exist", ["compress", "{d}/m.onnx", "-o", "{d}/o.onnx",
         "--budget", "latency=0.7", "--calib", "{d}/calib.npz", "--target", "ort-npu"], 1,
         "unknown target 'ort-npu'"),
    Case("latency-target-missing", "`--target` whose execution provider is not installed", ["compress", "{d}/m.onnx",
         "-o", "{d}/o.onnx", "--budget", "latency=0.7", "--calib", "{d}/calib.npz", "--target", "ort-tensorrt"], 1,
         "is not available on this machine"),
    Case("latency-no-shapes", "a latency budget without calibration data or input shapes", ["compress",
         "{d}/dyn.onnx", "-o", "{d}/o.onnx", "--budget", "latency=0.7"], 1, "needs input shapes", setup="dyn"),
    Case("latency-infeasible", "a latency budget below what the model can reach", ["compress", "{d}/m.onnx", "-o",
         "{d}/o.onnx", "--budget", "latency=0.01", "--calib", "{d}/calib.npz"], 1, "smallest achievable is"),
    Case("budget-duplicate", "budget `params=0.5,params=0.4`", ["compress", "{d}/m.onnx", "-o", "{d}/o.onnx",
         "--budget", "params=0.5,params=0.4"], 1, "given twice"),
    Case("budget-infeasible", "budget below what the model can reach", ["compress", "{d}/m.onnx", "-o", "{d}/o.onnx",
         "--budget", "params=0.001"], 1, "smallest achievable"),
    Case("calib-nan", "calibration data with NaN", ["compress", "{d}/m.onnx", "-o", "{d}/o.onnx", "--budget",
         "params=0.5", "--calib", "{d}/nan.npz"], 1, "NaN or inf", setup="calib"),
    Case("calib-empty", "calibration file with zero samples", ["compress", "{d}/m.onnx", "-o", "{d}/o.onnx",
         "--budget", "params=0.5", "--calib", "{d}/empty.npz"], 1, "holds no samples", setup="calib"),
    Case("calib-wrong-name", "calibration array named unlike the input", ["compress", "{d}/m.onnx", "-o",
         "{d}/o.onnx", "--budget", "params=0.5", "--calib", "{d}/wrongname.npz"], 1, "wrong input names",
         setup="calib"),
    Case("calib-wrong-shape", "calibration images of the wrong size", ["compress", "{d}/m.onnx", "-o", "{d}/o.onnx",
         "--budget", "params=0.5", "--calib", "{d}/wrongshape.npz"], 1, "expects x: float32", setup="calib"),
    Case("calib-float-for-int", "float data for an integer input (token ids)", ["compress", "{d}/ids.onnx", "-o",
         "{d}/o.onnx", "--budget", "params=0.5", "--calib", "{d}/floatids.npz"], 1, "would change the values",
         setup="ids"),
    Case("calib-uint8-images", "uint8 images for a float input: cast, said once", ["compress", "{d}/m.onnx", "-o",
         "{d}/o.onnx", "--budget", "params=0.5", "--calib", "{d}/uint8.npz", "--report", "{d}/r.json"], 0,
         "wrote", writes=("o.onnx", "r.json"), setup="calib"),
    Case("calib-not-npz", "calibration file is not an .npz", ["compress", "{d}/m.onnx", "-o", "{d}/o.onnx",
         "--budget", "params=0.5", "--calib", "{d}/garbage.onnx"], 1, "not a readable .npz", setup="garbage"),
    Case("nothing-no-matmul", "a model without Conv/Gemm/MatMul", ["compress", "{d}/nomatmul.onnx", "-o",
         "{d}/o.onnx", "--budget", "params=0.5"], 1, "no Conv, Gemm or MatMul layer", setup="nomatmul"),
    Case("nothing-quantized", "a dynamically quantized model (ConvInteger, MatMulInteger)", ["compress",
         "{d}/quant.onnx", "-o", "{d}/o.onnx", "--budget", "params=0.5"], 1,
         "compress the float model first, then quantize", setup="quant"),
    Case("inspect-quantized", "`inspect` of the quantized model", ["inspect", "{d}/quant.onnx", "-q"], 0,
         "compress the float model first", setup="quant"),
    Case("output-is-input", "output path equal to the input", ["compress", "{d}/m.onnx", "-o", "{d}/m.onnx",
         "--budget", "params=0.5"], 1, "is the input file"),
    Case("output-exists", "output exists, no --force", ["compress", "{d}/m.onnx", "-o", "{d}/exists.onnx",
         "--budget", "params=0.5"], 1, "already exists", setup="exists"),
    Case("output-folder-missing", "output folder does not exist", ["compress", "{d}/m.onnx", "-o",
         "{d}/no/such/o.onnx", "--budget", "params=0.5"], 1, "does not exist"),
    Case("plan-corrupt", "--plan file is not JSON", ["compress", "{d}/m.onnx", "-o", "{d}/o.onnx", "--plan",
         "{d}/garbage.onnx"], 1, "not text", setup="garbage"),
    Case("plan-truncated", "--plan file cut short", ["compress", "{d}/m.onnx", "-o", "{d}/o.onnx", "--plan",
         "{d}/trunc.json"], 1, "not valid JSON", setup="plans"),
    Case("plan-future", "--plan from a future sketchpass (version 99)", ["compress", "{d}/m.onnx", "-o",
         "{d}/o.onnx", "--plan", "{d}/future.json"], 1, "plan version 99 is not supported", setup="plans"),
    Case("plan-foreign", "--plan is some other JSON", ["compress", "{d}/m.onnx", "-o", "{d}/o.onnx", "--plan",
         "{d}/foreign.json"], 1, "not a sketchpass plan", setup="plans"),
    Case("plan-other-model", "--plan made for another model", ["compress", "{d}/m.onnx", "-o", "{d}/o.onnx",
         "--plan", "{d}/other.json"], 1, "the plan expects", setup="plans"),
    Case("sigint", "SIGINT (Ctrl-C) during the pass", ["compress", "{d}/" + LIGHT, "-o", "{d}/o.onnx", "--budget",
         "params=0.5", "--calib", "{d}/light.npz", "--batch-size", "1"], 130, "interrupted", mode="sigint",
         setup="light"),
    Case("sigterm", "SIGTERM during the pass", ["compress", "{d}/" + LIGHT, "-o", "{d}/o.onnx", "--budget",
         "params=0.5", "--calib", "{d}/light.npz", "--batch-size", "1"], 143, "terminated", mode="sigterm",
         setup="light"),
    Case("disk-full", "the output cannot be written (file-size limit of 16 KiB)", ["compress", "{d}/m.onnx", "-o",
         "{d}/o.onnx", "--budget", "params=0.5"], 1, "File too large", mode="fsize"),
    Case("read-only-folder", "output folder not writable", ["compress", "{d}/m.onnx", "-o", "{d}/ro/o.onnx",
         "--budget", "params=0.5"], 1, ("not writable", "Operation not permitted"), mode="readonly"),
    Case("concurrent-writers", "two runs writing the same output with --force at once", ["compress", "{d}/m.onnx",
         "-o", "{d}/o.onnx", "--budget", "params=0.5", "--calib", "{d}/calib.npz", "--force", "-q"], 0, "wrote",
         writes=("o.onnx",), mode="concurrent", setup="calib"),
]


# --------------------------------------------------------------------------- assets
def _export(model, example, path: Path, names=("x",)):
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, example, str(path), dynamo=False, input_names=list(names), output_names=["y"],
                          dynamic_axes={names[0]: {0: "N"}, "y": {0: "N"}})


def make_assets(d: Path, setup: str) -> None:
    import onnx
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    _export(net, (torch.randn(2, 3, 16, 16),), d / "m.onnx")
    rng = np.random.default_rng(0)
    np.savez(d / "calib.npz", x=rng.standard_normal((64, 3, 16, 16)).astype(np.float32))
    if setup == "garbage":
        (d / "garbage.onnx").write_bytes(bytes(rng.integers(0, 256, 4096, dtype=np.uint8)))
    elif setup == "external":
        from sketchpass.onnx.load import save

        save(onnx.load(str(d / "m.onnx")), d / "ext.onnx", external_data=True)
        (d / "ext.onnx.data").unlink()
    elif setup == "calib":
        x = rng.standard_normal((64, 3, 16, 16)).astype(np.float32)
        bad = x.copy()
        bad[3, 0, 0, :5] = np.nan
        np.savez(d / "nan.npz", x=bad)
        np.savez(d / "empty.npz", x=np.zeros((0, 3, 16, 16), np.float32))
        np.savez(d / "wrongname.npz", input=x)
        np.savez(d / "wrongshape.npz", x=x[:, :, :8])
        np.savez(d / "uint8.npz", x=rng.integers(0, 256, (64, 3, 16, 16), dtype=np.uint8))
    elif setup == "ids":
        class Tok(nn.Module):
            def __init__(self):
                super().__init__()
                self.emb, self.fc = nn.Embedding(50, 32), nn.Linear(32, 16)

            def forward(self, ids):
                return self.fc(self.emb(ids))

        _export(Tok().eval(), (torch.randint(0, 50, (2, 7)),), d / "ids.onnx", names=("ids",))
        np.savez(d / "floatids.npz", ids=rng.standard_normal((8, 7)).astype(np.float32))
    elif setup == "nomatmul":
        from onnx import TensorProto, helper, numpy_helper

        g = helper.make_graph([helper.make_node("Add", ["x", "b"], ["h"]), helper.make_node("Softmax", ["h"], ["y"])],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                              [numpy_helper.from_array(np.ones(4, np.float32), "b")])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        onnx.save(m, str(d / "nomatmul.onnx"))
    elif setup == "quant":
        import logging

        from onnxruntime.quantization import QuantType, quantize_dynamic

        logging.getLogger().setLevel(logging.ERROR)
        quantize_dynamic(str(d / "m.onnx"), str(d / "quant.onnx"), weight_type=QuantType.QUInt8)
    elif setup == "dyn":  # every spatial dim symbolic: no shapes without data
        m = onnx.load(str(d / "m.onnx"))
        for i, dim in enumerate(m.graph.input[0].type.tensor_type.shape.dim):
            if i >= 2:
                dim.dim_param = f"s{i}"
        onnx.save(m, str(d / "dyn.onnx"))
    elif setup == "exists":
        shutil.copy(d / "m.onnx", d / "exists.onnx")
    elif setup == "plans":
        import sketchpass as sp

        p = sp.plan(str(d / "m.onnx"), sp.Budget(params=0.5))
        text = p.to_json()
        (d / "trunc.json").write_text(text[: len(text) // 2])
        (d / "future.json").write_text(json.dumps({**json.loads(text), "version": 99}))
        (d / "foreign.json").write_text(json.dumps({"name": "not a plan", "layers": []}))
        other = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 14 * 14, 10)).eval()
        (d / "other.json").write_text(sp.plan(other, sp.Budget(params=0.5), example_inputs=torch.randn(1, 3, 16, 16))
                                      .to_json())
    elif setup == "light":
        import onnx as onnx_pkg

        src = Path(onnx_pkg.__file__).parent / "backend" / "test" / "data" / "light" / LIGHT
        shutil.copy(src, d / LIGHT)
        np.savez(d / "light.npz", **{"gpu_0/data_0": rng.standard_normal((8, 3, 224, 224)).astype(np.float32)})


# --------------------------------------------------------------------------- running
def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _snapshot(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): _digest(p) for p in d.rglob("*") if p.is_file()}


def _cli() -> list[str]:
    return [sys.executable, "-m", "sketchpass.cli"]


def _inline(argv: list[str]) -> tuple[int, str]:
    from sketchpass.cli import main

    err = io.StringIO()
    out = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = main(argv)
    return rc, err.getvalue() + out.getvalue()


def _process(argv: list[str], env: dict, preexec=None, timeout: float = 600) -> tuple[int, str]:  # noqa: B006
    r = subprocess.run(_cli() + argv, capture_output=True, text=True, env=env, preexec_fn=preexec, timeout=timeout)
    return r.returncode, r.stderr


def _signalled(argv: list[str], env: dict, sig: int) -> tuple[int, str]:
    proc = subprocess.Popen(_cli() + argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    time.sleep(8.0)  # the pass is under way (imports take ~4 s, the pass on the light ResNet-50 ~20 s)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def _read_only(folder: Path, on: bool) -> None:
    """Make ``folder`` unwritable (or writable again): mode 0555 for an ordinary user; root writes through
    modes, so for root the folder is made immutable (``chattr +i``, ext4 and most Linux file systems)."""
    if os.geteuid() != 0:
        os.chmod(folder, 0o555 if on else 0o755)
        return
    r = subprocess.run(["chattr", "+i" if on else "-i", str(folder)], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"cannot make {folder} read-only as root: chattr failed ({r.stderr.strip()})")


def run_case(case: Case, root: Path) -> dict:
    d = root / case.name
    d.mkdir(parents=True)
    tmp = d / "tmp"
    tmp.mkdir()
    make_assets(d, case.setup)
    argv = [a.replace("{d}", str(d)) for a in case.argv]
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONUNBUFFERED": "1"}
    if case.mode == "readonly":
        ro = d / "ro"
        ro.mkdir()
        _read_only(ro, True)
    before = _snapshot(d)
    t0 = time.perf_counter()
    if case.mode in ("inline", "readonly"):
        try:
            rc, err = _inline(argv)
        finally:
            if case.mode == "readonly":
                _read_only(d / "ro", False)
    elif case.mode == "process":
        rc, err = _process(argv, env)
    elif case.mode == "fsize":
        import resource

        rc, err = _process(argv, env, lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384)))
    elif case.mode in ("sigint", "sigterm"):
        rc, err = _signalled(argv, env, signal.SIGINT if case.mode == "sigint" else signal.SIGTERM)
    elif case.mode == "concurrent":
        procs = [subprocess.Popen(_cli() + argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                  env=env) for _ in range(2)]
        outs = [p.communicate(timeout=600)[1] for p in procs]
        rc = max(p.returncode for p in procs)
        err = outs[-1]
    else:
        raise ValueError(case.mode)
    secs = time.perf_counter() - t0
    after = _snapshot(d)
    lines = [line for line in err.splitlines() if line.startswith(("sketchpass:", "wrote", "note: nothing"))]
    # onnxruntime writes a small `.ses` file into TMPDIR when it is imported: not ours, not counted
    new = sorted(p for p in set(after) - set(before) if not p.startswith("tmp/") or "sketchpass" in p)
    unexpected = [p for p in new if p not in case.writes]
    leftovers = [str(p.relative_to(d)) for p in d.rglob("*") if p.name.endswith(".tmp")
                 or p.name.startswith("sketchpass-store-")]
    changed = sorted(k for k in before if before[k] != after.get(k))
    valid = None
    if case.writes and "o.onnx" in case.writes and (d / "o.onnx").exists():
        import onnx

        try:
            onnx.checker.check_model(str(d / "o.onnx"), full_check=True)
            valid = True
        except onnx.checker.ValidationError:
            valid = False
    notes = []
    if case.name == "calib-uint8-images" and (d / "r.json").exists():
        rep = json.loads((d / "r.json").read_text())
        notes = [n for n in rep["plan"]["notes"] if "cast" in n]
    says = (case.says,) if isinstance(case.says, str) else case.says
    message = (lines[-1] if lines else (err.strip().splitlines() or [""])[-1]).replace(str(d) + "/", "")
    return {"case": case.name, "what": case.what, "command": "sketchpass " + " ".join(
                a.replace(str(d) + "/", "") for a in argv), "rc": rc, "expected_rc": case.rc, "message": message,
            "message_lines": len([x for x in err.splitlines() if x.startswith("sketchpass:")]),
            "says_expected": any(x in err for x in says), "new_files": new, "unexpected_files": unexpected,
            "leftovers": leftovers, "inputs_changed": changed, "output_valid": valid, "notes": notes,
            "seconds": round(secs, 1)}


def ok(r: dict) -> bool:
    return (r["rc"] == r["expected_rc"] and r["says_expected"] and not r["unexpected_files"] and not r["leftovers"]
            and not r["inputs_changed"] and r["output_valid"] is not False
            and (r["rc"] == 0 or r["message_lines"] == 1))


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="docs")
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    args = ap.parse_args(argv)
    chosen = [c for c in CASES if not args.cases or c.name in args.cases.split(",")]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        rows = []
        for c in chosen:
            r = run_case(c, Path(root))
            rows.append(r)
            print(f"  {'ok ' if ok(r) else 'BAD'} {c.name}: rc={r['rc']} {r['message'][:110]}", file=sys.stderr,
                  flush=True)
    meta = {"command": "python bench/reliability.py", "date": dt.datetime.now(dt.timezone.utc).isoformat(
        timespec="seconds"), "as_root": os.geteuid() == 0, "wall_s": round(time.perf_counter() - t0, 1)}
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    (out / "reliability.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = ["# Bad input and faults: what `sketchpass` says, and what it leaves behind", "",
             "*Generated by `bench/reliability.py`; do not edit by hand — re-run the command.*", "",
             "```", meta["command"], "```", "",
             f"- {meta['date']}; {len(rows)} cases, {sum(ok(r) for r in rows)} as expected; wall {meta['wall_s']} s",
             "- each case runs in a fresh folder (a small conv net exported to ONNX, its calibration data, what the "
             "case needs); `written`: files the run left in the folder (the case's own outputs only when it "
             "succeeds); `input`: every input file hashes the same afterwards; no `.tmp` file or temporary store "
             "folder is left in any case (`TMPDIR` points into the folder)", "",
             "| case | bad input or fault | command | exit | message (stderr) | written | input |",
             "|:---|:---|:---|---:|:---|:---|:---|"]
    for r in rows:
        written = ", ".join(r["new_files"]) if r["new_files"] else "nothing"
        if r["notes"]:
            written += f" (report note: “{r['notes'][0]}”)"
        msg = r["message"].replace("|", "\\|")
        lines.append(f"| {r['case']}{'' if ok(r) else ' **(unexpected)**'} | {r['what']} | `{r['command']}` | "
                     f"{r['rc']} | {msg} | {written} | {'unchanged' if not r['inputs_changed'] else 'CHANGED'} |")
    (out / "reliability.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(ok(r) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
