"""sketchpass: make neural networks smaller by rewriting Conv/Linear layers into sketch factors.

See DESIGN §2 for the public API.  Importing this package never imports onnx.
"""

from __future__ import annotations

from . import distributed, sketch
from .api import apply, load, plan, profile, transform
from .budget import Budget, InfeasibleBudgetError
from .finetune import finetune
from .layers import LowRankConv1d, LowRankConv2d, LowRankLinear, SKConv1d, SKConv2d, SKLinear
from .options import Options
from .plan import Decision, LayerSpec, Plan, SkipReason
from .sketch.random import GENERATOR_ID

__version__ = "0.1.0"

__all__ = [
    "Budget",
    "Decision",
    "InfeasibleBudgetError",
    "LayerSpec",
    "Options",
    "Plan",
    "SkipReason",
    "apply",
    "finetune",
    "load",
    "plan",
    "profile",
    "transform",
    "GENERATOR_ID",
    "LowRankConv1d",
    "LowRankConv2d",
    "LowRankLinear",
    "SKConv1d",
    "SKConv2d",
    "SKLinear",
    "__version__",
    "distributed",
    "sketch",
]
