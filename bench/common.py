"""What every benchmark records of a plan's verify stage (read by ``bench/verify_table.py``)."""

from __future__ import annotations


def verify_record(plan, model: str, budget: str, frontend: str) -> dict:
    """Predicted vs measured relative output error of ``plan``, before (round 0) and after the verify loop."""
    v = plan.verify or {}
    rounds = v.get("rounds") or []
    first = rounds[0] if rounds else {}
    return {"model": model, "budget": budget, "frontend": frontend, "method": plan.method,
            "predicted_before": first.get("predicted"), "measured_before": first.get("measured"),
            "ratio_before": first.get("ratio"), "rounds": len(rounds), "kept_round": v.get("kept_round"),
            "predicted_after": v.get("predicted"), "measured_after": v.get("measured"), "ratio_after": v.get("ratio"),
            "closed": v.get("closed"), "warning": v.get("warning"), "not_measured": v.get("reason"),
            "holdout_samples": v.get("samples")}
