"""``sketchpass.plan`` / ``apply`` / ``transform`` (DESIGN §2): validate the arguments, pick the frontend
for the model (PyTorch or ONNX, the latter imported only then) and run :mod:`sketchpass.pipeline`."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from .budget import Budget
from .options import ALL_KEYS, APPLY_KEYS, METHODS, PLAN_KEYS, Options  # noqa: F401  (METHODS re-exported)
from .pipeline import run_apply, run_plan, run_profile
from .plan import Plan
from .planner import check_ignore, check_overrides


def _is_onnx(model: Any) -> bool:
    if isinstance(model, (str, os.PathLike)):
        return True
    return type(model).__name__ == "ModelProto" and type(model).__module__.startswith("onnx")


def _frontend(model, o: Options, capture: str | None = None):
    if _is_onnx(model):
        try:
            from .onnx.frontend import OnnxFrontend
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(f"ONNX models need the onnx extras: pip install 'sketchpass[onnx]' ({exc})") from exc
        return OnnxFrontend(model, o)
    from .fx.frontend import TorchFrontend

    return TorchFrontend(model, o, capture)


def _budget(budget) -> Budget:
    return budget if isinstance(budget, Budget) else Budget.parse(budget)


def plan(model, budget, calib=None, method: str = "auto", seed: int = 0, ignore: Iterable[str] = (),
         overrides: dict | None = None, **options) -> Plan:
    """Choose a form for every layer so that the model meets ``budget`` with the least predicted loss, then
    fit, emit and measure it on held-out calibration batches (the closed loop of :mod:`sketchpass.pipeline`).

    Options (all of :class:`sketchpass.options.Options` but ``u_storage`` and ``check``): ``l``,
    ``granularity``, ``init``, ``dist``, ``sketch_sizes``, ``metric`` (how the output error is counted:
    ``"auto"``, ``"mse"``, ``"kl"``; :mod:`sketchpass.metric`), ``sensitivity_samples``, ``probes``,
    ``example_inputs``, ``max_gram_mb``, ``max_grams_mb``, ``max_batches``, ``batch_size``, ``holdout``,
    ``max_activation_mb``, ``shrink``, ``refit``, ``rounds``, ``tolerance``, ``capture``, ``blocks``, ``target``,
    ``threads``, ``timing_table``, ``timing_sizes``, ``latency_rounds``, ``progress``.

    Under ``torchrun`` (an initialised process group of several processes, :mod:`sketchpass.distributed`) each
    process passes its own shard as ``calib``; every process returns the same plan."""
    o = Options.from_kwargs(PLAN_KEYS, "plan", method=method, seed=seed, **options)
    b = _budget(budget)
    rules, ov = check_ignore(ignore), check_overrides(overrides)
    return run_plan(_frontend(model, o), b, calib, o, rules, ov, build=False).plan


def _apply_options(plan: Plan, options: dict, allowed, call: str) -> Options:
    given = dict(options)
    for key in ("shrink", "holdout", "refit"):  # replay the plan's own choices unless told otherwise
        if key not in given and key in plan.options:
            given[key] = plan.options[key]
    # the output error is counted as the plan counted it (plans made before metric= counted "mse")
    return Options.from_kwargs(allowed, call, **given).replace(metric=plan.options.get("metric", "mse"))


def apply(model, plan: Plan, calib=None, **options):
    """Rewrite a copy of ``model`` as ``plan`` says; with ``calib``, every factored layer is refitted on the
    inputs produced by the already-compressed layers before it, and the result is measured on held-out
    batches.  Options: ``max_batches``, ``batch_size``, ``holdout``, ``max_activation_mb``, ``shrink``,
    ``refit``, ``capture``, ``blocks``, ``u_storage``, ``check``, ``progress``, ``max_gram_mb``, ``max_grams_mb``,
    ``target``, ``threads``.  The result carries its
    plan (with measured errors) as ``small.sketchpass_plan`` (torch) or in its metadata (ONNX)."""
    if not isinstance(plan, Plan):
        raise TypeError(f"apply expects a sketchpass.Plan, got {type(plan).__name__} (use Plan.from_json)")
    o = _apply_options(plan, options, APPLY_KEYS, "apply")
    capture = o.capture if "capture" in options else ("modules" if plan.capture == "modules" else "auto")
    return run_apply(_frontend(model, o, capture), plan, calib, o)


def transform(model, budget, calib=None, method: str = "auto", seed: int = 0, ignore: Iterable[str] = (),
              overrides: dict | None = None, **options):
    """``apply(model, plan(model, budget, calib, ...), calib)``, in one run of the pipeline: the model
    returned is the one the plan's verify stage measured.  Takes the options of both."""
    o = Options.from_kwargs(ALL_KEYS, "transform", method=method, seed=seed, **options)
    b = _budget(budget)
    rules, ov = check_ignore(ignore), check_overrides(overrides)
    return run_plan(_frontend(model, o), b, calib, o, rules, ov, build=True).model


def profile(model, calib=None, **options) -> dict:
    """Time every candidate form of every layer of ``model`` on the target runtime (``target=``, ``threads=``)
    and store them in the timing table (``timing_table=``; default the one in the sketchpass cache), so that
    latency budgets planned later on this device read them instead of timing them.  Returns what was timed:
    per layer its dense time, its fastest form and how many forms are faster than dense."""
    o = Options.from_kwargs(PLAN_KEYS, "profile", **options)
    return run_profile(_frontend(model, o), calib, o)


def load(source, model=None):
    """Rebuild a compressed model from what was saved of it (``small.save_pretrained(d)`` or
    ``torch.save(small.state_dict(), f)``): its stored plan and weights, no recompression.  ``model``: the
    uncompressed model (needed for a state-dict file; a Hugging Face folder is rebuilt from its config).
    An ``.onnx`` path is read as it is (an ONNX model carries its plan in its metadata)."""
    from .saved import load as load_saved

    return load_saved(source, model)
