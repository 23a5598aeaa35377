"""Which σ levels to evaluate: a fixed grid, or an adaptive search for the halfway crossing.

Adaptive search (the default), per site:
1. a coarse log grid (2 points a decade) over a starting range scaled to the site;
2. extend a decade at a time while the curve has not crossed the halfway line (up) or starts below it (down),
   never past the stated bounds;
3. levels are first evaluated on the first quarter of the sample blocks; those clearly above or below the halfway line keep
   that estimate, the others get the rest of the data;
4. refine inside the bracket where the mean accuracy crosses the halfway line, on all the data.
A search is a generator: it yields Requests (σ levels × a range of sample blocks) and is sent back their Counts, so
any executor can serve it (`drive` serves one with a function) and it is tested without onnxruntime.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import numpy as np

from walkaudit._units import Counts


@dataclass(frozen=True)
class Plan:
    """An adaptive search: decades are relative to a scale (the site's activation std for additive noise)."""

    start: float = -2.0  # log10 of the first σ / scale
    stop: float = 1.0  # log10 of the last σ / scale of the starting grid
    lowest: float = -5.0  # never below scale·10^lowest
    highest: float = 4.0  # never above scale·10^highest
    per_decade: int = 2
    refine: int = 3  # points added inside the crossing bracket
    head: float = 0.25  # share of the sample blocks a level is first evaluated on
    margin: float = 0.1  # a level this far (× (clean − chance)) from the halfway line needs no more samples

    def coarse(self, scale: float) -> np.ndarray:
        n = int(round((self.stop - self.start) * self.per_decade)) + 1
        return scale * np.logspace(self.start, self.stop, n)


@dataclass(frozen=True)
class Request:
    """Evaluate these σ levels (every repeat) over these sample blocks, and send back their Counts."""

    sigmas: tuple[float, ...]
    blocks: range


@dataclass
class Curve:
    """The counts gathered so far for one site, per σ level."""

    levels: dict[float, Counts] = field(default_factory=dict)

    def add(self, counts: Counts) -> None:
        """Add counts over new samples to what the curve holds for their σ levels."""
        for sigma in counts.sigmas:
            level = counts.level(sigma)
            old = self.levels.get(sigma)
            self.levels[sigma] = level if old is None else Counts(
                (sigma,), old.correct + level.correct, old.nonfinite + level.nonfinite, old.samples + level.samples)

    def sorted(self) -> tuple[np.ndarray, list[Counts]]:
        sig = np.array(sorted(self.levels))
        return sig, [self.levels[s] for s in sig]

    def mean(self, sigma: float) -> float:
        return float(np.mean(accuracy(self.levels[sigma])))


def accuracy(level: Counts) -> np.ndarray:
    """Accuracy per repeat of a one-level Counts."""
    return level.correct[0] / max(level.samples, 1)


#: A search: a generator that yields Requests, is sent each request's Counts, and returns the Curve.
Search = Generator[Request, Counts, Curve]


def _ask(curve: Curve, sigmas, blocks: range) -> Search:
    """Request `sigmas` over `blocks` (nothing when either is empty) and add the answer to the curve."""
    sigmas = tuple(float(s) for s in np.unique(np.atleast_1d(np.asarray(sigmas, dtype=np.float64))))
    if sigmas and len(blocks):
        curve.add((yield Request(sigmas, blocks)))
    return curve


def drive(search: Search, serve: Callable[[Request], Counts]) -> Curve:
    """Run a search to its end, serving each of its requests with `serve`."""
    try:
        request = next(search)
        while True:
            request = search.send(serve(request))
    except StopIteration as done:
        return done.value


def fixed(sigmas, n_blocks: int) -> Search:
    """Every σ of a fixed grid over all the data."""
    curve = Curve()
    yield from _ask(curve, sigmas, range(n_blocks))
    return curve


def _clear(level: Counts, half: float, margin: float) -> bool:
    """Is this level's side of the halfway line already certain? (4 standard errors and a margin away)"""
    acc = float(np.mean(accuracy(level)))
    n = level.samples * level.correct.size
    se = np.sqrt(max(acc * (1 - acc), 1.0 / n) / n)
    return abs(acc - half) > max(4 * se, margin)


def adaptive(half: float, plan: Plan, scale: float, n_blocks: int = 1, clean: float = 1.0) -> Search:
    """Search for the halfway crossing as described in the module docstring.

    Levels are first evaluated on the first quarter of the blocks (`plan.head`); a level whose side of the halfway
    line is already clear keeps that estimate, the others are completed on the remaining blocks.
    """
    scale = scale if np.isfinite(scale) and scale > 0 else 1.0
    step = 1.0 / plan.per_decade
    head = range(max(1, int(np.ceil(n_blocks * plan.head))))
    curve = Curve()
    yield from _ask(curve, plan.coarse(scale), head)

    top = plan.stop
    while curve.mean(max(curve.levels)) > half and top < plan.highest:
        top = min(plan.highest, top + 1.0)
        yield from _ask(curve, scale * 10 ** np.arange(top - 1.0 + step, top + step / 2, step), head)
    bottom = plan.start
    while curve.mean(min(curve.levels)) <= half and bottom > plan.lowest:
        bottom = max(plan.lowest, bottom - 1.0)
        yield from _ask(curve, scale * 10 ** np.arange(bottom, bottom + 1.0 - step / 2, step), head)

    tail = range(len(head), n_blocks)
    margin = plan.margin * max(clean - (2 * half - clean), 0.0)  # a fraction of (clean − chance)
    unclear = [s for s, level in curve.levels.items() if not _clear(level, half, margin)]
    yield from _ask(curve, unclear, tail)

    sig = sorted(curve.levels)
    means = [curve.mean(s) for s in sig]
    for a, b, ma, mb in zip(sig, sig[1:], means, means[1:]):
        if ma > half >= mb:  # the first crossing
            inner = np.logspace(np.log10(a), np.log10(b), plan.refine + 2)[1:-1]
            yield from _ask(curve, inner, range(n_blocks))
            break
    return curve
