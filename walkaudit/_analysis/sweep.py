"""Which σ levels to evaluate: a fixed grid, or an adaptive search for the halfway crossing.

Adaptive search (the default), per site:
1. a coarse log grid (2 points a decade) over a starting range scaled to the site;
2. extend a decade at a time while the curve has not crossed the halfway line (up) or starts below it (down),
   never past the stated bounds;
3. levels are first evaluated on the first quarter of the data; those clearly above or below the halfway line keep
   that estimate, the others get the rest of the data;
4. refine inside the bracket where the mean accuracy crosses the halfway line, on all the data.
The search only needs `evaluate(sigmas) -> accuracy per (σ, repeat)`, so it is pure and tested without onnxruntime.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from walkaudit.errors import UsageError


@dataclass(frozen=True)
class Plan:
    """An adaptive search: decades are relative to a scale (the site's activation std for additive noise)."""

    start: float = -2.0  # log10 of the first σ / scale
    stop: float = 1.0  # log10 of the last σ / scale of the starting grid
    lowest: float = -5.0  # never below scale·10^lowest
    highest: float = 4.0  # never above scale·10^highest
    per_decade: int = 2
    refine: int = 3  # points added inside the crossing bracket
    head: float = 0.25  # share of the batches a level is first evaluated on
    margin: float = 0.1  # a level this far (× (clean − chance)) from the halfway line needs no more samples

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
class Counts:
    """Correct predictions and non-finite outputs per repeat ([R], or [L, R] for L levels) over `samples` samples."""

    correct: np.ndarray
    nonfinite: np.ndarray
    samples: int

    @property
    def accuracy(self) -> np.ndarray:
        return self.correct / max(self.samples, 1)


@dataclass
class Curve:
    """Accumulated levels of one site."""

    levels: dict[float, Counts] = field(default_factory=dict)

    def sorted(self) -> tuple[np.ndarray, list[Counts]]:
        sig = np.array(sorted(self.levels))
        return sig, [self.levels[s] for s in sig]

    def mean(self, sigma: float) -> float:
        return float(np.mean(self.levels[sigma].accuracy))


#: evaluate(sigmas, batches) -> (correct [L, R], nonfinite [L, R], samples): counts over the batches in the range.
Evaluate = Callable[[np.ndarray, range], tuple[np.ndarray, np.ndarray, int]]


def _add(curve: Curve, evaluate: Evaluate, sigmas, batches: range) -> None:
    """Evaluate `sigmas` over `batches`, adding to what the curve already holds for them."""
    sigmas = np.unique(np.atleast_1d(np.asarray(sigmas, dtype=np.float64)))
    if sigmas.size == 0 or len(batches) == 0:
        return
    correct, nonfinite, samples = evaluate(sigmas, batches)
    for s, c, b in zip(sigmas, correct, nonfinite):
        old = curve.levels.get(float(s))
        if old is None:
            curve.levels[float(s)] = Counts(np.asarray(c), np.asarray(b), samples)
        else:
            curve.levels[float(s)] = Counts(old.correct + c, old.nonfinite + b, old.samples + samples)


def fixed(evaluate: Evaluate, sigmas, n_batches: int) -> Curve:
    curve = Curve()
    _add(curve, evaluate, sigmas, range(n_batches))
    return curve


def _clear(level: Counts, half: float, margin: float) -> bool:
    """Is this level's side of the halfway line already certain? (4 standard errors and a margin away)"""
    acc = float(np.mean(level.accuracy))
    n = level.samples * len(level.correct)
    se = np.sqrt(max(acc * (1 - acc), 1.0 / n) / n)
    return abs(acc - half) > max(4 * se, margin)


def adaptive(evaluate: Evaluate, half: float, plan: Plan, scale: float, n_batches: int = 1,
             clean: float = 1.0) -> Curve:
    """Search for the halfway crossing as described in the module docstring.

    Levels are first evaluated on the first quarter of the batches (`plan.head`); a level whose side of the halfway
    line is already clear keeps that estimate, the others are completed on the remaining batches.
    """
    scale = scale if np.isfinite(scale) and scale > 0 else 1.0
    step = 1.0 / plan.per_decade
    head = range(max(1, int(np.ceil(n_batches * plan.head))))
    curve = Curve()
    _add(curve, evaluate, plan.coarse(scale), head)

    top = plan.stop
    while curve.mean(max(curve.levels)) > half and top < plan.highest:
        top = min(plan.highest, top + 1.0)
        _add(curve, evaluate, scale * 10 ** np.arange(top - 1.0 + step, top + step / 2, step), head)
    bottom = plan.start
    while curve.mean(min(curve.levels)) <= half and bottom > plan.lowest:
        bottom = max(plan.lowest, bottom - 1.0)
        _add(curve, evaluate, scale * 10 ** np.arange(bottom, bottom + 1.0 - step / 2, step), head)

    tail = range(len(head), n_batches)
    margin = plan.margin * max(clean - (2 * half - clean), 0.0)  # a fraction of (clean − chance)
    unclear = [s for s, level in curve.levels.items() if not _clear(level, half, margin)]
    _add(curve, evaluate, unclear, tail)

    sig = sorted(curve.levels)
    means = [curve.mean(s) for s in sig]
    for a, b, ma, mb in zip(sig, sig[1:], means, means[1:]):
        if ma > half >= mb:  # the first crossing
            inner = np.logspace(np.log10(a), np.log10(b), plan.refine + 2)[1:-1]
            _add(curve, evaluate, inner, range(n_batches))
            break
    return curve
