"""Latency on the target runtime (DESIGN §2, ``Budget(latency=…)``): the runtimes a plan can be timed on
(:mod:`.targets`), honest timing on a noisy machine (:mod:`.timing`), and the on-disk table of measured
layer forms (:mod:`.cache`).  The pipeline times every candidate form of every layer as a standalone
subgraph with the layer's real input shape (through the frontend), solves on the measured costs, then
measures the emitted whole model against the dense one and corrects (:mod:`sketchpass.pipeline`)."""

from .cache import TimingCache, default_table
from .targets import TARGETS, Target, available_targets, resolve_target
from .timing import Timing, measure

__all__ = ["TARGETS", "Target", "Timing", "TimingCache", "available_targets", "default_table", "measure",
           "resolve_target"]
