"""Which σ levels to evaluate: a fixed grid, or an adaptive search for the halfway crossing.

Adaptive search (the default), per site:
1. a coarse log grid (2 points a decade) over a starting range scaled to the site;
2. extend a decade at a time while the curve has not crossed the halfway line (up) or starts below it (down),
   never past the stated bounds;
3. refine inside the bracket where the mean accuracy crosses the halfway line.
The search only needs `evaluate(sigmas) -> accuracy per (σ, repeat)`, so it is pure and tested without onnxruntime.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .errors import UsageError


@dataclass(frozen=True)
class Plan:
    """An adaptive search: decades are relative to a scale (the site's activation std for additive noise)."""

    start: float = -2.0  # log10 of the first σ / scale
    stop: float = 1.0  # log10 of the last σ / scale of the starting grid
    lowest: float = -5.0  # never below scale·10^lowest
    highest: float = 4.0  # never above scale·10^highest
    per_decade: int = 2
    refine: int = 3  # points added inside the crossing bracket

    def coarse(self, scale: float) -> np.ndarray:
        n = int(round((self.stop - self.start) * self.per_decade)) + 1
        return scale * np.logspace(self.start, self.stop, n)


def default_plan(noise_kind: str) -> Plan:
    """Additive (and combined) σ are absolute, so their grid is relative to the site's activation std; a
    multiplicative σ is already relative to the signal."""
    if noise_kind == "multiplicative":
        return Plan(start=-2.0, stop=1.0, lowest=-4.0, highest=4.0)
    return Plan()


_RANGE = re.compile(r"^\s*([^:]+):([^:]+):(\d+)\s*$")


def parse_sigmas(text: str) -> tuple[float, ...]:
    """`0.01,0.1,1` (a list) or `1e-3:1e2:21` (21 log-spaced levels from 1e-3 to 1e2)."""
    m = _RANGE.match(text)
    try:
        if m:
            lo, hi, n = float(m.group(1)), float(m.group(2)), int(m.group(3))
            if lo <= 0 or hi <= lo or n < 2:
                raise UsageError(f"--sigmas range {text!r} needs 0 < start < stop and at least 2 levels")
            values = tuple(float(v) for v in np.logspace(np.log10(lo), np.log10(hi), n))
        else:
            values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"--sigmas {text!r}: expected a list like 0.01,0.1,1 or a range like 1e-3:1e2:21") from None
    return check_sigmas(values)


def check_sigmas(values) -> tuple[float, ...]:
    values = tuple(sorted(set(float(v) for v in values)))
    if not values:
        raise UsageError("--sigmas is empty")
    if any(not np.isfinite(v) or v < 0 for v in values):
        raise UsageError(f"--sigmas must be finite and non-negative, got {', '.join(map(str, values))}")
    if not any(v > 0 for v in values):
        raise UsageError("--sigmas needs at least one σ above 0")
    return values


@dataclass
class Curve:
    """Accumulated points of one site: σ → accuracy per repeat."""

    accuracy: dict[float, np.ndarray]
    nonfinite: dict[float, np.ndarray]

    def sorted(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        sig = np.array(sorted(self.accuracy))
        return sig, np.stack([self.accuracy[s] for s in sig]), np.stack([self.nonfinite[s] for s in sig])


Evaluate = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # sigmas -> (accuracy [L,R], nonfinite [L,R])


def _add(curve: Curve, evaluate: Evaluate, sigmas) -> None:
    new = np.array([s for s in np.atleast_1d(sigmas) if float(s) not in curve.accuracy], dtype=np.float64)
    if new.size == 0:
        return
    acc, bad = evaluate(new)
    for s, a, b in zip(new, acc, bad):
        curve.accuracy[float(s)] = a
        curve.nonfinite[float(s)] = b


def fixed(evaluate: Evaluate, sigmas) -> Curve:
    curve = Curve({}, {})
    _add(curve, evaluate, sigmas)
    return curve


def adaptive(evaluate: Evaluate, half: float, plan: Plan, scale: float) -> Curve:
    """Search for the halfway crossing as described in the module docstring."""
    scale = scale if np.isfinite(scale) and scale > 0 else 1.0
    step = 1.0 / plan.per_decade
    curve = Curve({}, {})
    _add(curve, evaluate, plan.coarse(scale))

    def mean_at(s: float) -> float:
        return float(np.mean(curve.accuracy[s]))

    top = plan.stop
    while mean_at(max(curve.accuracy)) > half and top < plan.highest:
        top = min(plan.highest, top + 1.0)
        _add(curve, evaluate, scale * 10 ** np.arange(top - 1.0 + step, top + step / 2, step))
    bottom = plan.start
    while mean_at(min(curve.accuracy)) <= half and bottom > plan.lowest:
        bottom = max(plan.lowest, bottom - 1.0)
        _add(curve, evaluate, scale * 10 ** np.arange(bottom, bottom + 1.0 - step / 2, step))
    sig = sorted(curve.accuracy)
    means = [mean_at(s) for s in sig]
    for a, b, ma, mb in zip(sig, sig[1:], means, means[1:]):
        if ma > half >= mb:  # the first crossing
            inner = np.logspace(np.log10(a), np.log10(b), plan.refine + 2)[1:-1]
            _add(curve, evaluate, inner)
            break
    return curve
