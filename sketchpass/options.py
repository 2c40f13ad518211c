"""Typed, frozen option sets, validated at the edge (DESIGN §4): unknown keys are errors that list the
known ones, bad values are errors that say what is allowed.

:class:`Options` holds every option of :func:`sketchpass.plan`, :func:`sketchpass.apply` and
:func:`sketchpass.transform`, for both frontends.  ``PLAN_KEYS`` / ``APPLY_KEYS`` say which ones each
call takes (``transform`` takes both).  Where a default differs between the frontends it is said here
and in the plan's notes; options that only one frontend can use (``capture`` for torch; ``batch_size``,
``u_storage`` and ``check`` for ONNX) are refused by the other with a one-line error.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any

from .metric import METRICS
from .sketch.random import DISTRIBUTIONS

METHODS = ("auto", "sketch", "svd")
INIT_CHOICES = ("auto", "calibrated", "lstsq", "sketch", "random")
CAPTURES = ("auto", "fx", "modules")
BLOCKS = ("auto", "on", "off")
U_STORAGE = ("float", "int8", "bits")


@dataclass(frozen=True)
class Options:
    """Every option of the pass.  Defaults are the same in both frontends.

    Planning: ``method``, ``seed``, ``l`` (sketches per layer), ``granularity`` (size grid), ``init``
    (``"auto"``: calibrated sketches with data, lstsq without; ``"random"``: fresh factors for training),
    ``dist``, ``sketch_sizes`` (sketch sizes evaluated per layer; default 4 for ``auto``, 8 for ``sketch``),
    ``metric`` (how the output error is counted, :mod:`sketchpass.metric`: ``"mse"`` the relative squared error of
    the outputs, ``"kl"`` the mean KL divergence of the first output's softmax; ``"auto"``: ``"kl"`` for
    ``transformers`` language models, ``"mse"`` otherwise), ``sensitivity_samples``, ``probes``,
    ``example_inputs`` (shapes for MACs without data), ``max_gram_mb`` (a layer whose input Gram would be larger
    is fitted data-free).

    Data: ``max_batches`` (use at most this many calibration batches), ``batch_size`` (ONNX ``.npz``
    calibration files: samples per batch), ``holdout`` (one calibration batch in ``holdout`` is kept out of
    fitting to measure the output error; 0 = measure nothing), ``max_activation_mb`` (calibration
    activations kept in memory between refit steps; beyond it they go to a temporary folder).

    Fitting and checking: ``shrink`` (Gram shrinkage: ``"auto"`` = Ledoit–Wolf, or a number in [0, 1]),
    ``refit`` (sequential refit on the inputs the compressed model produces), ``rounds`` (re-solves of the
    verify loop when the measured output error exceeds ``tolerance`` × the predicted one), ``capture``
    (torch: ``"auto"``/``"fx"``/``"modules"``), ``blocks`` (torch, modules capture, a stack of repeated blocks checked
    to reproduce the model — :mod:`sketchpass.fx.blocks`: ``"auto"`` chains the refit block by block, and
    calibrates block by block — one block's Grams at a time — when the Grams of all layers at once would exceed
    ``max_grams_mb`` (default 4096); ``"on"`` calibrates block by block always; ``"off"`` neither: the model
    is calibrated whole and run up to every layer in the refit), ``u_storage`` and
    ``check`` (ONNX emission), ``progress`` (bars on stderr; default: when stderr is a terminal).

    Latency budgets: ``target`` (the runtime the latency is measured on; default ``"torch-cpu"`` for PyTorch
    models, ``"ort-cpu"`` for ONNX ones; :mod:`sketchpass.latency.targets`), ``threads`` (default: torch's
    thread count / the CPU count for ONNX Runtime), ``timing_table`` (a timing table file; default the one in
    the sketchpass cache), ``timing_sizes`` (svd ranks timed per layer, 8), ``latency_rounds`` (re-solves when
    the measured whole-model latency misses the budget, 3)."""

    method: str = "auto"
    seed: int = 0
    l: int = 1
    granularity: int = 8
    init: str = "auto"
    dist: str = "rademacher"
    sketch_sizes: int | None = None
    metric: str = "auto"
    sensitivity_samples: int = 16
    probes: int = 1
    example_inputs: Any = None
    max_gram_mb: float = 2048
    max_grams_mb: float = 4096
    max_batches: int | None = None
    batch_size: int | None = None
    holdout: int = 8
    max_activation_mb: float = 1024
    shrink: float | str = "auto"
    refit: bool = True
    rounds: int = 2
    tolerance: float = 3.0
    capture: str = "auto"
    blocks: str = "auto"
    target: str | None = None
    timing_table: str | None = None
    threads: int | None = None
    timing_sizes: int = 8
    latency_rounds: int = 3
    u_storage: str = "float"
    check: bool = True
    progress: bool | None = None

    def __post_init__(self):
        def positive_int(name, allow_zero=False, allow_none=False):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if allow_zero else 1):
                what = "a non-negative int" if allow_zero else "a positive int"
                raise ValueError(f"{name} must be {what}{' or None' if allow_none else ''}, got {v!r}")

        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise TypeError(f"seed must be an int, got {type(self.seed).__name__}")
        positive_int("l")
        positive_int("granularity")
        positive_int("sketch_sizes", allow_none=True)
        positive_int("sensitivity_samples", allow_zero=True)
        positive_int("probes")
        positive_int("max_batches", allow_none=True)
        positive_int("batch_size", allow_none=True)
        positive_int("holdout", allow_zero=True)
        if self.holdout == 1:
            raise ValueError("holdout must be 0 (measure nothing) or at least 2 (one batch in holdout is kept out of "
                             "fitting), got 1")
        positive_int("rounds", allow_zero=True)
        positive_int("threads", allow_none=True)
        positive_int("timing_sizes")
        positive_int("latency_rounds", allow_zero=True)
        if self.target is not None and not isinstance(self.target, str):
            raise TypeError(f"target must be a name such as 'ort-cpu' or 'torch-cpu', got {self.target!r}")
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")
        if self.init not in INIT_CHOICES:
            raise ValueError(f"init must be one of {INIT_CHOICES}, got {self.init!r}")
        if self.dist not in DISTRIBUTIONS:
            raise ValueError(f"dist must be one of {DISTRIBUTIONS}, got {self.dist!r}")
        if self.capture not in CAPTURES:
            raise ValueError(f"capture must be one of {CAPTURES}, got {self.capture!r}")
        if self.blocks not in BLOCKS:
            raise ValueError(f"blocks must be one of {BLOCKS}, got {self.blocks!r}")
        if self.u_storage not in U_STORAGE:
            raise ValueError(f"u_storage must be one of {U_STORAGE}, got {self.u_storage!r}")
        if self.shrink != "auto" and not (isinstance(self.shrink, (int, float)) and not isinstance(self.shrink, bool)
                                          and 0 <= self.shrink <= 1):
            raise ValueError(f"shrink must be 'auto' or a number in [0, 1], got {self.shrink!r}")
        for name in ("max_gram_mb", "max_grams_mb", "max_activation_mb", "tolerance"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        if self.tolerance < 1:
            raise ValueError(f"tolerance must be >= 1 (a factor between measured and predicted), got {self.tolerance}")
        for name in ("refit", "check"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.progress is not None and not isinstance(self.progress, bool):
            raise TypeError(f"progress must be True, False or None, got {self.progress!r}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_kwargs(cls, allowed: frozenset[str], call: str, **kwargs) -> Options:
        """Options from keyword arguments; keys outside ``allowed`` are refused with the known ones listed."""
        unknown = set(kwargs) - allowed
        if unknown:
            raise TypeError(f"unknown option(s) {sorted(unknown)} for {call}; known: {sorted(allowed)}")
        return cls(**kwargs)

    def replace(self, **changes) -> Options:
        return dataclasses.replace(self, **changes)

    def given(self) -> dict:
        """The options that differ from the defaults."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != f.default}

    def check_frontend(self, frontend: str) -> None:
        """Refuse options that the other frontend alone can use."""
        only = {"capture": "torch", "blocks": "torch", "batch_size": "onnx", "u_storage": "onnx", "check": "onnx"}
        for name, owner in only.items():
            f = next(x for x in fields(self) if x.name == name)
            if owner != frontend and getattr(self, name) != f.default:
                kind = "PyTorch" if owner == "torch" else "ONNX"
                raise TypeError(f"option {name}= applies to {kind} models only; this is a "
                                f"{'PyTorch' if frontend == 'torch' else 'ONNX'} model")


ALL_KEYS = frozenset(f.name for f in fields(Options))
# what plan() and apply() take; transform() takes both
APPLY_KEYS = frozenset({"max_batches", "batch_size", "holdout", "max_activation_mb", "shrink", "refit", "capture",
                        "blocks", "u_storage", "check", "progress", "max_gram_mb", "max_grams_mb", "target",
                        "threads"})
PLAN_KEYS = ALL_KEYS - {"u_storage", "check"}
PLAN_ARGS = frozenset({"method", "seed"})  # named parameters of plan(), not **options
