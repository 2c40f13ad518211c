"""Budgets and the budget solver (pure: candidates in, choices out; no torch, no graphs).

**Budget.**  ``Budget(params=0.5)`` limits the whole model's effective parameters to half;
``Budget(flops=0.6)`` limits multiply-accumulates per sample at the calibration shape;
``Budget(latency=0.7)`` limits the latency measured on the target runtime to 70% of the dense model's,
``Budget(latency_ms=12.5)`` to 12.5 ms.  Any of them may be given together and then all must hold.  For
params and flops a value in ``(0, 1]`` is a fraction of the original model, a value ``> 1`` an absolute
count; ``latency`` is always a fraction in ``(0, 1]`` and ``latency_ms`` always milliseconds.  Both latency
limits are the solver's unit ``"latency"`` (milliseconds).

**Solver.**  Each layer offers candidates ``(cost_u, loss)``: dense (loss 0) and factored forms of
several sizes, whose loss is the layer's predicted relative output error weighted by its measured
sensitivity.  We choose one candidate per layer to minimise ``Σ loss`` subject to
``fixed_u + Σ cost_u ≤ limit_u`` for every unit ``u`` — a multiple-choice knapsack.  We solve its
Lagrangian relaxation (``min Σ loss + Σ_u λ_u cost_u`` decomposes per layer; for a fixed direction of
``λ`` the smallest feasible scale is found by bisection, which walks the lower convex hulls of the
layers' trade-off curves), try several directions when there are two units, and then fill the slack
greedily with the upgrades that buy the most loss per unit of budget.  The result always satisfies
every limit, or :class:`InfeasibleBudgetError` says the smallest achievable value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

UNITS = ("params", "flops", "latency")  # the solver's units
KEYS = ("params", "flops", "latency", "latency_ms")  # what a Budget takes


class InfeasibleBudgetError(ValueError):
    """The budget cannot be met even with every layer at its smallest form."""


class Budget:
    """Limits on the whole model: ``params``, ``flops`` (MACs per sample), ``latency`` (fraction of the dense
    model's measured latency) and ``latency_ms`` (milliseconds)."""

    def __init__(self, params: float | None = None, flops: float | None = None, latency: float | None = None,
                 latency_ms: float | None = None):
        self.params = self._check("params", params)
        self.flops = self._check("flops", flops)
        self.latency = self._check("latency", latency)
        self.latency_ms = self._check("latency_ms", latency_ms)
        if self.latency is not None and self.latency > 1:
            raise ValueError(f"Budget latency={self.latency:g} must be a fraction of the dense model's latency in "
                             f"(0, 1]; give latency_ms= for milliseconds")
        if all(getattr(self, k) is None for k in KEYS):
            raise ValueError("a Budget needs at least one limit, e.g. Budget(params=0.5), Budget(flops=0.6) or "
                             "Budget(latency=0.7)")

    @property
    def timed(self) -> bool:
        """Whether the budget needs latencies measured on a target runtime."""
        return self.latency is not None or self.latency_ms is not None

    @staticmethod
    def _check(unit: str, value) -> float | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"Budget {unit}= must be a number, got {type(value).__name__}")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"Budget {unit}={value} is not a finite number; give a fraction in (0, 1] or an absolute "
                             f"count > 1")
        if value <= 0:
            raise ValueError(f"Budget {unit}={value:g} must be > 0: a fraction in (0, 1] or an absolute count > 1")
        return value

    @classmethod
    def parse(cls, text: str | Budget) -> Budget:
        """``"params=0.5"``, ``"params=0.5,flops=0.7"``, ``"params=2e6"``, ``"flops=50%"``."""
        if isinstance(text, Budget):
            return text
        values: dict[str, float] = {}
        for part in str(text).replace(";", ",").split(","):
            part = part.strip()
            if not part:
                continue
            if "=" not in part:
                raise ValueError(f"budget {text!r}: expected KEY=VALUE pairs like 'params=0.5,flops=0.7', got {part!r}")
            key, _, raw = (s.strip() for s in part.partition("="))
            if key not in KEYS:
                raise ValueError(f"budget {text!r}: unknown key {key!r}; expected one of {', '.join(KEYS)}")
            if key in values:
                raise ValueError(f"budget {text!r}: {key} is given twice")
            try:
                values[key] = float(raw[:-1]) / 100.0 if raw.endswith("%") else float(raw)
            except ValueError:
                raise ValueError(f"budget {text!r}: {key}={raw!r} is not a number") from None
            if not math.isfinite(values[key]):
                raise ValueError(f"budget {text!r}: {key}={raw!r} is not a finite number")
        if not values:
            raise ValueError(f"budget {text!r} is empty; expected e.g. 'params=0.5'")
        return cls(**values)

    def limits(self, totals: dict[str, float]) -> dict[str, float]:
        """Absolute limits given the model's totals ``{"params": P, "flops": M, "latency": dense ms}``."""
        out = {}
        for unit in ("params", "flops"):
            v = getattr(self, unit)
            if v is not None:
                out[unit] = v * totals[unit] if v <= 1.0 else v
        lat = []
        if self.latency is not None:
            if "latency" not in totals:
                raise ValueError("a latency budget needs the dense model's measured latency (a target runtime)")
            lat.append(self.latency * totals["latency"])
        if self.latency_ms is not None:
            lat.append(self.latency_ms)
        if lat:
            out["latency"] = min(lat)
        return out

    def to_dict(self) -> dict:
        return {u: getattr(self, u) for u in KEYS if getattr(self, u) is not None}

    def __eq__(self, other) -> bool:
        return isinstance(other, Budget) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return "Budget(" + ", ".join(f"{k}={v:g}" for k, v in self.to_dict().items()) + ")"


def fmt_unit(unit: str, v: float) -> str:
    return f"{v:.3g} ms" if unit == "latency" else f"{v:,.0f}"


@dataclass(frozen=True)
class Candidate:
    """One form of one layer: its cost in every unit and its (weighted) predicted loss."""

    cost: dict[str, float]
    loss: float
    tag: object = None  # opaque to the solver (the frontend's description of the form)


def solve(
    layers: Sequence[Sequence[Candidate]],
    limits: dict[str, float],
    fixed: dict[str, float] | None = None,
    directions: int = 9,
) -> list[int]:
    """Indices of the chosen candidate per layer (see module docstring).

    ``layers[i]`` must be non-empty; ``fixed`` is the cost of everything outside these layers.
    Raises :class:`InfeasibleBudgetError` (with the smallest achievable value of each unit) when even
    the cheapest candidates exceed a limit.
    """
    units = list(limits)
    fixed = {u: float((fixed or {}).get(u, 0.0)) for u in units}
    if any(len(c) == 0 for c in layers):
        raise ValueError("every layer needs at least one candidate")

    def total(choice: list[int], u: str) -> float:
        return fixed[u] + sum(layers[i][c].cost[u] for i, c in enumerate(choice))

    def feasible(choice: list[int]) -> bool:
        return all(total(choice, u) <= limits[u] * (1 + 1e-12) for u in units)

    # Smallest achievable per unit (each unit on its own) -> clear error when infeasible.
    for u in units:
        low = fixed[u] + sum(min(c.cost[u] for c in cands) for cands in layers)
        if low > limits[u] * (1 + 1e-12):
            if u == "latency":
                raise InfeasibleBudgetError(
                    f"the latency budget {fmt_unit(u, limits[u])} cannot be met: the fastest plan the measured layer "
                    f"times allow is {fmt_unit(u, low)}, the smallest achievable")
            raise InfeasibleBudgetError(
                f"the {u} budget {fmt_unit(u, limits[u])} cannot be met: the smallest achievable is "
                f"{fmt_unit(u, low)} ({u} outside the factorable layers: {fmt_unit(u, fixed[u])})")
    scale = {u: max(limits[u], 1e-9) for u in units}

    def pick(lams: dict[str, float]) -> list[int]:
        choice = []
        for cands in layers:
            best, best_v = 0, math.inf
            for j, c in enumerate(cands):
                v = c.loss + sum(lams[u] * c.cost[u] / scale[u] for u in units)
                if v < best_v - 1e-15 or (abs(v - best_v) <= 1e-15 and c.loss < cands[best].loss):
                    best, best_v = j, v
            choice.append(best)
        return choice

    dirs = _directions(units, directions)

    best_choice, best_loss = None, math.inf
    total_loss = sum(max((c.loss for c in cands), default=0.0) for cands in layers) + 1.0
    for d in dirs:
        lo, hi = 0.0, 1.0
        while not feasible(pick({u: hi * d[u] for u in units})) and hi < 1e18:
            hi *= 4.0
        choice = pick({u: hi * d[u] for u in units})
        if not feasible(choice):
            continue
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if feasible(pick({u: mid * d[u] for u in units})):
                hi = mid
            else:
                lo = mid
            if hi - lo <= 1e-9 * max(hi, total_loss * 1e-9):
                break
        choice = _greedy_fill(layers, pick({u: hi * d[u] for u in units}), limits, fixed, scale, units)
        loss = sum(layers[i][c].loss for i, c in enumerate(choice))
        if loss < best_loss:
            best_choice, best_loss = choice, loss
    if best_choice is None:
        best_choice = _greedy_descend(layers, limits, fixed, scale, units)
    best_choice = _swap_search(layers, best_choice, limits, fixed, scale, units)
    assert feasible(best_choice)
    return best_choice


def _directions(units: list[str], n: int) -> list[dict[str, float]]:
    """Directions of the multiplier vector λ: the one unit; a line of ``n`` points for two; a simplex grid
    (step 1/4) for three."""
    if len(units) == 1:
        return [{units[0]: 1.0}]
    if len(units) == 2:
        return [{units[0]: a, units[1]: 1.0 - a} for a in (i / (n - 1) for i in range(n))]
    steps = 4
    out = []
    for i in range(steps + 1):
        for j in range(steps + 1 - i):
            k = steps - i - j
            out.append({units[0]: i / steps, units[1]: j / steps, units[2]: k / steps})
    return out


def _greedy_fill(layers, choice, limits, fixed, scale, units) -> list[int]:
    """Spend the slack: repeatedly take the upgrade with the best loss decrease per unit of budget."""
    choice = list(choice)
    used = {u: fixed[u] + sum(layers[i][c].cost[u] for i, c in enumerate(choice)) for u in units}
    while True:
        best, best_ratio = None, 0.0
        for i, cands in enumerate(layers):
            cur = cands[choice[i]]
            for j, c in enumerate(cands):
                gain = cur.loss - c.loss
                if gain <= 0:
                    continue
                extra = {u: c.cost[u] - cur.cost[u] for u in units}
                if any(used[u] + extra[u] > limits[u] * (1 + 1e-12) for u in units):
                    continue
                spend = sum(max(extra[u], 0.0) / scale[u] for u in units)
                ratio = gain / max(spend, 1e-18)
                if ratio > best_ratio:
                    best, best_ratio = (i, j, extra), ratio
        if best is None:
            return choice
        i, j, extra = best
        choice[i] = j
        for u in units:
            used[u] += extra[u]


def _swap_search(layers, choice, limits, fixed, scale, units, max_rounds: int = 500, near: int = 3) -> list[int]:
    """Local search over pairs of moves: shrink one layer (to one of its next smaller forms) and grow
    another with what that frees, whenever the pair lowers the total loss and stays within every
    limit.  The Lagrangian solution sits on the convex hulls and the greedy fill only ever grows one
    layer at a time, so both miss e.g. two layers at rank 40 when the hull offers 32 and 48.  The
    shrinks tried are each layer's ``near`` next cheaper forms (cost summed over units, scaled by the
    limits), the grows any form of another layer that fits."""
    U = len(units)
    flat = [(i, j) for i, cands in enumerate(layers) for j in range(len(cands))]
    lay = np.array([i for i, _ in flat])
    cost = np.array([[layers[i][j].cost[u] for u in units] for i, j in flat], dtype=np.float64).reshape(-1, U)
    loss = np.array([layers[i][j].loss for i, j in flat], dtype=np.float64)
    start = np.cumsum([0] + [len(c) for c in layers])
    lim = np.array([limits[u] * (1 + 1e-12) for u in units])
    size = (cost / np.array([scale[u] for u in units])).sum(1)  # one scalar "size" per form
    choice = list(choice)
    tol = 1e-12 * max(1.0, float(np.abs(loss).max(initial=0.0)))
    for _ in range(max_rounds):
        cur = np.array([start[i] + c for i, c in enumerate(choice)])
        used = np.array([fixed[u] for u in units], dtype=np.float64) + cost[cur].sum(0)
        d_cost = cost - cost[cur[lay]]  # (F, U): change of cost when layer lay[f] takes form f
        d_loss = loss - loss[cur[lay]]
        best, best_gain = None, tol
        # single moves first (cheap), then pairs: a shrink of layer a (any form cheaper in some unit)
        ok1 = np.all(used + d_cost <= lim, axis=1)
        gain1 = np.where(ok1, -d_loss, -np.inf)
        f = int(np.argmax(gain1))
        if gain1[f] > best_gain:
            best, best_gain = (f,), float(gain1[f])
        shrinks = []
        for i, c in enumerate(choice):
            lo, hi = start[i], start[i + 1]
            below = [f for f in range(lo, hi) if size[f] < size[lo + c]]
            shrinks += sorted(below, key=lambda f: -size[f])[:near]
        for a in shrinks:
            room = used + d_cost[a]
            ok = np.all(room + d_cost <= lim, axis=1) & (lay != lay[a]) & (d_loss < 0)
            if not ok.any():
                continue
            gains = np.where(ok, -(d_loss[a] + d_loss), -np.inf)
            b = int(np.argmax(gains))
            if gains[b] > best_gain:
                best, best_gain = (int(a), b), float(gains[b])
        if best is None:
            return choice
        for f in best:
            choice[lay[f]] = int(f - start[lay[f]])
    return choice


def _greedy_descend(layers, limits, fixed, scale, units) -> list[int]:
    """Fallback for two units when no Lagrangian direction was feasible: from dense (the costliest
    candidate, loss 0) take the downgrades with the least loss per unit of violated budget."""
    choice = [max(range(len(c)), key=lambda j, c=c: sum(c[j].cost[u] / scale[u] for u in units)) for c in layers]
    used = {u: fixed[u] + sum(layers[i][c].cost[u] for i, c in enumerate(choice)) for u in units}
    while any(used[u] > limits[u] * (1 + 1e-12) for u in units):
        best, best_ratio = None, math.inf
        over = [u for u in units if used[u] > limits[u] * (1 + 1e-12)]
        for i, cands in enumerate(layers):
            cur = cands[choice[i]]
            for j, c in enumerate(cands):
                save = sum(max(cur.cost[u] - c.cost[u], 0.0) / scale[u] for u in over)
                if save <= 0:
                    continue
                ratio = max(c.loss - cur.loss, 0.0) / save
                if ratio < best_ratio:
                    best, best_ratio = (i, j), ratio
        if best is None:
            raise InfeasibleBudgetError("the budget cannot be met with both limits at once; relax one of them")
        i, j = best
        for u in units:
            used[u] += layers[i][j].cost[u] - layers[i][choice[i]].cost[u]
        choice[i] = j
    return choice
