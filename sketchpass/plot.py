"""Plots for reports (matplotlib, imported only here; ``pip install 'sketchpass[plot]'``).

* :func:`plot_plan` — one plan: params per layer before/after and the predicted (and measured) error
  of every factored layer.
* :func:`plot_demo` — the demo: accuracy and achieved params vs the requested budget.

Both write atomically (a temporary file in the destination folder, then ``os.replace``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .store import default_mode


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(f"plots need matplotlib: pip install 'sketchpass[plot]' ({exc})") from None
    return plt


def _save(fig, path) -> Path:
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ValueError(f"cannot write {str(path)!r}: folder {str(folder)!r} does not exist")
    suffix = path.suffix or ".png"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format=suffix.lstrip(".") or "png")
        default_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    return path


def plot_plan(plan, path) -> Path:
    """Params per layer (dense vs chosen form, log scale) and predicted/measured relative errors."""
    plt = _pyplot()
    layers = plan.layers
    names = [lp.spec.name for lp in layers]
    x = range(len(layers))
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(max(6.0, 0.28 * len(layers) + 3), 6.5), sharex=True)
    a1.bar([i - 0.2 for i in x], [lp.spec.params for lp in layers], width=0.4, label="dense", color="#bbbbbb")
    a1.bar([i + 0.2 for i in x], [lp.decision.params for lp in layers], width=0.4, label="after", color="#3b75af")
    a1.set_yscale("log")
    a1.set_ylabel("params")
    ach = plan.achieved()
    req = ", ".join(f"{k}={v:g}" for k, v in plan.budget.items())
    got = ", ".join(f"{k}={v:.3f}" for k, v in ach.items())
    a1.set_title(f"sketchpass plan: requested {req}, achieved {got}")
    a1.legend()
    pred = [lp.decision.predicted_error if lp.decision.method != "dense" else 0.0 for lp in layers]
    meas = [lp.decision.measured_error or 0.0 for lp in layers]
    a2.bar([i - 0.2 for i in x], pred, width=0.4, label="predicted", color="#e08a2c")
    if any(meas):
        a2.bar([i + 0.2 for i in x], meas, width=0.4, label="measured", color="#5a9e4b")
    a2.set_ylabel("relative output error")
    a2.legend()
    a2.set_xticks(list(x))
    a2.set_xticklabels(names, rotation=90, fontsize=7)
    return _save(fig, path)


def plot_demo(rows: list[dict], dense_accuracy: float, path) -> Path:
    """Accuracy vs requested params budget (with the dense model's accuracy as a reference line)."""
    plt = _pyplot()
    rows = [r for r in rows if r.get("accuracy") is not None]
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    b = [r["budget"] for r in rows]
    ax.plot(b, [r["accuracy"] for r in rows], "o-", label="sketchpass (no fine-tuning)")
    for r in rows:
        ax.annotate(f"{r['accuracy']:.2f}%", (r["budget"], r["accuracy"]), textcoords="offset points",
                    xytext=(4, -12), fontsize=8)
    ax.axhline(dense_accuracy, color="#888888", ls="--", label=f"dense {dense_accuracy:.2f}%")
    ax.set_xlabel("params budget (fraction of the model)")
    ax.set_ylabel("MNIST test accuracy (%)")
    ax.set_title("sketchpass demo: pretrained MNIST CNN")
    ax.invert_xaxis()
    ax.legend(loc="lower left")
    return _save(fig, path)
