"""The command line: compress / inspect / demo, and every bad input (one line, exit 1, no partial file,
input untouched)."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from sketchpass.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    path = d / "tiny.onnx"
    torch.onnx.export(m, (torch.randn(2, 3, 16, 16),), str(path), dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "n"}})
    rng = np.random.default_rng(0)
    np.savez(d / "calib.npz", x=rng.standard_normal((64, 3, 16, 16)).astype(np.float32))
    return d, path


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(err: str, contains: str):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("sketchpass: error: "), err
    assert "Traceback" not in err
    assert contains in lines[0], lines[0]


def _no_leftovers(folder: Path):
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]


def test_compress_writes_a_model_report_and_plot_that_run(files, capsys, tmp_path):
    d, src = files
    before = _digest(src)
    out, rep, plot = tmp_path / "small.onnx", tmp_path / "r.json", tmp_path / "r.png"
    code, stdout, err = _run(capsys, "compress", src, "-o", out, "--budget", "params=0.5", "--calib",
                             d / "calib.npz", "--report", rep, "--plot", plot, "-q")
    assert code == 0, err
    assert _digest(src) == before
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    x = np.random.default_rng(1).standard_normal((4, 3, 16, 16)).astype(np.float32)
    y_ref = ort.InferenceSession(str(src)).run(None, {"x": x})[0]
    y = ort.InferenceSession(str(out)).run(None, {"x": x})[0]
    r = json.loads(rep.read_text())
    assert r["format"] == "sketchpass.report"
    assert r["summary"]["achieved"]["params"] <= 0.5 + 1e-9
    # 64 samples in batches of 32: one batch fits, the other is held out to measure the output error
    assert r["plan"]["format"] == "sketchpass.plan" and r["plan"]["calib"]["samples"] == 32
    assert r["plan"]["calib"]["holdout_samples"] == 32
    measured = r["summary"]["measured_output_error"]
    assert measured == r["plan"]["verify"]["measured"] and measured > 0
    # the reported figure is what the written file does to the output on inputs like the calibration ones
    rel = float(np.square(y - y_ref).sum() / np.square(y_ref).sum())
    assert measured / 3 < rel < 3 * measured, (rel, measured)
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert "wrote" in err and "achieved params=" in err and "output error measured" in err
    _no_leftovers(tmp_path)


def test_compress_prints_the_plan_table(files, capsys, tmp_path):
    d, src = files
    code, stdout, err = _run(capsys, "compress", src, "-o", tmp_path / "o.onnx", "--budget", "params=0.6")
    assert code == 0, err
    assert "budget requested: params=0.6" in stdout and "achieved" in stdout
    assert "no calibration data" in stdout  # data-free is said in the report


def test_compress_warns_in_one_line_when_measured_and_predicted_disagree(files, capsys, tmp_path):
    """A tolerance of 1 (no disagreement accepted) and no loop rounds: the gap stays open, the file is still
    written (exit 0) and stderr says so in one warning line."""
    d, src = files
    out = tmp_path / "w.onnx"
    code, stdout, err = _run(capsys, "compress", src, "-o", out, "--budget", "params=0.5", "--calib",
                             d / "calib.npz", "--rounds", "0", "--tolerance", "1", "-q")
    assert code == 0 and out.exists(), err
    warn = [line for line in err.splitlines() if line.startswith("sketchpass: warning: ")]
    assert len(warn) == 1 and "× the predicted" in warn[0] and "rounds=0" in warn[0]
    assert spx_plan(out).verify["warning"] in warn[0]


def spx_plan(path):
    import sketchpass.onnx as spx

    return spx.plan_of(str(path))


def test_inspect_lists_layers_and_skip_reasons(files, capsys):
    d, src = files
    code, stdout, err = _run(capsys, "inspect", src, "--json", "-q")
    assert code == 0, err
    info = json.loads(stdout)
    assert info["summary"]["layers"] == 4 and info["summary"]["factorable_layers"] == 4
    assert [r["op"] for r in info["layers"]] == ["conv2d", "conv2d", "linear", "linear"]
    assert info["layers"][1]["macs"] == 16 * 32 * 9 * 16 * 16
    code, stdout, err = _run(capsys, "inspect", src, "-q")
    assert code == 0 and "4 of 4 weight layers can be factored" in stdout


def test_inspect_shows_skip_reason_of_a_depthwise_conv(capsys, tmp_path):
    m = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 8, 1)).eval()
    path = tmp_path / "dw.onnx"
    torch.onnx.export(m, (torch.randn(1, 4, 8, 8),), str(path), dynamo=False, input_names=["x"])
    code, stdout, err = _run(capsys, "inspect", path, "--json", "-q")
    assert code == 0, err
    rows = json.loads(stdout)["layers"]
    assert not rows[0]["factorable"] and "depthwise" in rows[0]["reason"]
    assert rows[1]["factorable"]


# --------------------------------------------------------------------------- bad input
def _bad(capsys, files, tmp_path, argv, contains, outputs=()):
    d, src = files
    before = _digest(src)
    code, _, err = _run(capsys, *argv)
    assert code == 1
    _one_error_line(err, contains)
    assert _digest(src) == before
    for o in outputs:
        assert not Path(o).exists(), f"partial output {o} left behind"
    _no_leftovers(tmp_path)


def test_missing_input(files, capsys, tmp_path):
    _bad(capsys, files, tmp_path, ["compress", tmp_path / "nope.onnx", "-o", tmp_path / "o.onnx", "--budget",
                                   "params=0.5"], "does not exist", [tmp_path / "o.onnx"])


def test_input_is_a_directory(files, capsys, tmp_path):
    _bad(capsys, files, tmp_path, ["compress", tmp_path, "-o", tmp_path / "o.onnx", "--budget", "params=0.5"],
         "is a directory")


@pytest.mark.parametrize("content", [b"this is not a model\n", b"\x08\x07\x12\x03abc\xff\xff\xff"])
def test_corrupt_or_non_onnx_input(files, capsys, tmp_path, content):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    _bad(capsys, files, tmp_path, ["compress", bad, "-o", tmp_path / "o.onnx", "--budget", "params=0.5"],
         "not a valid ONNX model", [tmp_path / "o.onnx"])
    assert bad.read_bytes() == content


def test_truncated_onnx_input(files, capsys, tmp_path):
    _, src = files
    bad = tmp_path / "cut.onnx"
    bad.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    _bad(capsys, files, tmp_path, ["compress", bad, "-o", tmp_path / "o.onnx", "--budget", "params=0.5"],
         "cut.onnx", [tmp_path / "o.onnx"])


def test_inspect_bad_input(files, capsys, tmp_path):
    bad = tmp_path / "x.onnx"
    bad.write_text("nope")
    _bad(capsys, files, tmp_path, ["inspect", bad], "not a valid ONNX model")
    _bad(capsys, files, tmp_path, ["inspect", tmp_path / "missing.onnx"], "does not exist")


def test_unreadable_calibration(files, capsys, tmp_path):
    d, src = files
    bad = tmp_path / "calib.npz"
    bad.write_bytes(b"garbage")
    out = tmp_path / "o.onnx"
    _bad(capsys, files, tmp_path, ["compress", src, "-o", out, "--budget", "params=0.5", "--calib", bad],
         "not a readable .npz", [out])
    _bad(capsys, files, tmp_path, ["compress", src, "-o", out, "--budget", "params=0.5", "--calib",
                                   tmp_path / "none.npz"], "does not exist", [out])


def test_calibration_with_wrong_input_names_or_shapes(files, capsys, tmp_path):
    d, src = files
    out = tmp_path / "o.onnx"
    np.savez(tmp_path / "names.npz", image=np.zeros((4, 3, 16, 16), np.float32))
    _bad(capsys, files, tmp_path, ["compress", src, "-o", out, "--budget", "params=0.5", "--calib",
                                   tmp_path / "names.npz"], "missing ['x'], unexpected ['image']", [out])
    np.savez(tmp_path / "shape.npz", x=np.zeros((4, 5, 16, 16), np.float32))
    _bad(capsys, files, tmp_path, ["compress", src, "-o", out, "--budget", "params=0.5", "--calib",
                                   tmp_path / "shape.npz"], "the model expects x: float32 [n, 3, 16, 16]", [out])


@pytest.mark.parametrize("budget,msg", [("params", "expected KEY=VALUE"), ("parms=0.5", "unknown key 'parms'"),
                                        ("params=abc", "not a number"), ("params=-1", "must be > 0")])
def test_budget_syntax_errors(files, capsys, tmp_path, budget, msg):
    d, src = files
    _bad(capsys, files, tmp_path, ["compress", src, "-o", tmp_path / "o.onnx", "--budget", budget], msg,
         [tmp_path / "o.onnx"])


def test_infeasible_budget_states_the_smallest_achievable(files, capsys, tmp_path):
    d, src = files
    _bad(capsys, files, tmp_path, ["compress", src, "-o", tmp_path / "o.onnx", "--budget", "params=0.01", "-q"],
         "smallest achievable is params=0.", [tmp_path / "o.onnx"])


def test_output_equal_to_input(files, capsys, tmp_path):
    d, src = files
    _bad(capsys, files, tmp_path, ["compress", src, "-o", src, "--budget", "params=0.5", "--force"],
         "is the input file")
    link = tmp_path / "link.onnx"
    os.symlink(src, link)
    _bad(capsys, files, tmp_path, ["compress", src, "-o", link, "--budget", "params=0.5", "--force"],
         "is the input file")


def test_existing_output_needs_force(files, capsys, tmp_path):
    d, src = files
    out = tmp_path / "o.onnx"
    out.write_bytes(b"keep me")
    _bad(capsys, files, tmp_path, ["compress", src, "-o", out, "--budget", "params=0.5"], "pass --force")
    assert out.read_bytes() == b"keep me"
    rep = tmp_path / "r.json"
    rep.write_text("old")
    _bad(capsys, files, tmp_path, ["compress", src, "-o", tmp_path / "new.onnx", "--budget", "params=0.5",
                                   "--report", rep], "report", [tmp_path / "new.onnx"])
    code, _, err = _run(capsys, "compress", src, "-o", out, "--budget", "params=0.5", "--force", "-q")
    assert code == 0, err
    onnx.checker.check_model(onnx.load(str(out)))


def test_output_folder_missing(files, capsys, tmp_path):
    d, src = files
    _bad(capsys, files, tmp_path, ["compress", src, "-o", tmp_path / "no" / "o.onnx", "--budget", "params=0.5"],
         "does not exist")


def test_write_failure_leaves_no_partial_file(files, capsys, tmp_path, monkeypatch):
    d, src = files
    out = tmp_path / "o.onnx"
    real_replace = os.replace

    def full_disk(a, b):
        if str(b) == str(out):
            raise OSError(28, "No space left on device", str(b))
        return real_replace(a, b)

    monkeypatch.setattr(os, "replace", full_disk)
    _bad(capsys, files, tmp_path, ["compress", src, "-o", out, "--budget", "params=0.5", "-q"],
         "No space left on device", [out])


def test_debug_shows_the_traceback(files, capsys, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        main(["--debug", "inspect", str(tmp_path / "missing.onnx")])


def test_command_line_syntax_error_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compress"])
    assert exc.value.code == 2


def test_console_script_entry_point(files, tmp_path):
    """The installed entry point: one line on stderr, exit 1, no traceback."""
    r = subprocess.run([sys.executable, "-m", "sketchpass", "inspect", str(tmp_path / "missing.onnx")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"sketchpass: error: input file '{tmp_path / 'missing.onnx'}' does "
                                             "not exist"]


@pytest.mark.assets
def test_demo_prints_the_table_and_writes_json_and_plot(capsys, tmp_path):
    code, stdout, err = _run(capsys, "demo", "--budgets", "0.25", "--out", tmp_path / "demo", "-q")
    assert code == 0, err
    assert "sketchpass demo" in stdout and "params=0.25" in stdout
    res = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert res["dense_accuracy"] > 98.9
    row = res["rows"][0]
    assert row["params_fraction"] <= 0.25 and row["accuracy"] >= 98.5
    assert (tmp_path / "demo" / "demo.png").read_bytes()[:4] == b"\x89PNG"


def test_demo_rejects_bad_budgets(capsys, tmp_path):
    code, _, err = _run(capsys, "demo", "--budgets", "0.5,abc", "--out", tmp_path)
    assert code == 1
    _one_error_line(err, "--budgets")
    code, _, err = _run(capsys, "demo", "--budgets", "1.5", "--out", tmp_path)
    assert code == 1 and "fraction in (0, 1]" in err
