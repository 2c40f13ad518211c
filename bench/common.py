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


class PeakRSS:
    """The process's peak resident memory while the ``with`` block runs (``/proc/self/statm`` sampled every
    ``interval`` s on a thread; ``ru_maxrss`` cannot be reset, so it cannot give one stage's peak)."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak_mb = self.start_mb = 0.0

    @staticmethod
    def now_mb() -> float:
        import os

        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def __enter__(self):
        import threading

        self.start_mb = self.peak_mb = self.now_mb()
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(self.interval):
                self.peak_mb = max(self.peak_mb, self.now_mb())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self.now_mb())
        return False
