"""Data-parallel calibration on torch.distributed: a 2-process gloo run (torchrun, CPU) gives every rank the plan
and model of one process on the concatenated shards; shards of different sizes are fine; a rank that fails
(a bad shard, out of memory mid-refit) makes every rank exit with that error, never a hang."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sketchpass as sp

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parent))
import dist_worker as w  # noqa: E402

WORKER = Path(__file__).parent / "dist_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(case: str, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), str(WORKER), case, str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)


def _single(case: str):
    a, b = w.shards(case)
    small = sp.transform(w.model(case), sp.Budget(params=0.7), calib=a + b, **w.options(case))
    with torch.no_grad():
        return small.sketchpass_plan, small(input_ids=w.probe()).logits


def _sizes(plan):
    return [(lp.spec.name, lp.decision.method, lp.decision.size) for lp in plan.layers]


@pytest.mark.parametrize("case", ["even", "uneven", "moe"])
def test_two_gloo_ranks_equal_one_process_on_the_concatenated_shards(case, tmp_path):
    run = _torchrun(case, tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    plan, logits = _single(case)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    plans = [sp.Plan.from_json(g["plan"]) for g in got]
    n0, n1, _ = w.CASES[case]
    for p, g in zip(plans, got):
        assert _sizes(p) == _sizes(plan)
        assert p.calib["ranks"] == 2
        assert p.calib["samples"] == plan.calib["samples"] and p.calib["batches"] == plan.calib["batches"]
        assert any("data-parallel calibration over 2 processes (gloo)" in n for n in p.notes)
        for a, b in zip(p.layers, plan.layers):
            assert a.decision.predicted_error == pytest.approx(b.decision.predicted_error, rel=1e-5, abs=1e-12)
            assert a.sensitivity == pytest.approx(b.sensitivity, rel=1e-6)
        torch.testing.assert_close(g["logits"], logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[0]["logits"], got[1]["logits"], rtol=0, atol=0)  # the very same model
    same = [{k: v for k, v in p.to_dict().items() if k != "timings"} for p in plans]  # timings: each rank's own
    assert same[0] == same[1]
    if case == "even":  # verified on the union of the held-out batches, as one process would
        assert plan.calib["holdout_batches"] == 2
        v, v1 = plans[0].verify, plan.verify
        assert v["samples"] == v1["samples"] == 4
        assert v["measured"] == pytest.approx(v1["measured"], rel=1e-4)
        assert len(v["rounds"]) == len(v1["rounds"])
        assert plans[0].calib["mode"] == "blocks"
    else:
        assert plan.calib["samples"] == 2 * (n0 + n1)
    if case == "moe":  # the experts were factored, by their owners, into the same model on every rank
        assert sum(".experts." in lp.spec.name and lp.decision.method == "svd" for lp in plan.layers) >= 8


@pytest.mark.parametrize("case, stage, error", [
    ("bad-shard", "calibrating", "ValueError: calibration batch 2: 'attention_mask' contains NaN"),
    ("oom", "refitting", "MemoryError: simulated: out of memory"),
    ("candidates", "computing candidate forms", "MemoryError: simulated: out of memory in an eigendecomposition"),
])
def test_a_failing_rank_makes_every_rank_exit_with_its_error(case, stage, error, tmp_path):
    run = _torchrun(case, tmp_path)  # a rank left waiting would fail at the 60 s timeout with another message
    assert run.returncode != 0
    err0 = (tmp_path / "rank0.err").read_text()
    err1 = (tmp_path / "rank1.err").read_text()
    assert err0.startswith(f"RankFailedError: rank 1 of 2 failed while {stage}"), err0
    assert error.split(": ", 1)[1].split("'")[0] in err0
    assert err1.startswith(error.split(":")[0]), err1
    assert not (tmp_path / "rank0.pt").exists() and not (tmp_path / "rank1.pt").exists()


def test_without_torchrun_the_pass_runs_in_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert sp.distributed.init() is None and sp.distributed.world() is None
    plan = sp.plan(w.model(), sp.Budget(params=0.7), calib=w.shards("uneven")[1], **w.options("uneven"))
    assert "ranks" not in plan.calib and not any("data-parallel" in n for n in plan.notes)


def test_init_checks_its_timeout(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="timeout_s must be positive"):
        sp.distributed.init(timeout_s=0)
