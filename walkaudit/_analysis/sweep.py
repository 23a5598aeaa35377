"""Which σ levels to evaluate: a fixed grid, or an adaptive search for the halfway crossing.

Adaptive search (the default), per site:
1. a coarse log grid (2 points a decade) over a starting range scaled to the site;
2. extend a decade at a time while the curve has not crossed the halfway line (up) or starts below it (down),
   never past the stated bounds. Upward also while the top of the curve has not settled (`fit.top`, the fit's own
   criterion): until the accuracy at the largest σ is at chance within 2 standard errors, or the last levels (at
   least 3, spanning at least a decade) are flat (a weighted slope within 2 standard errors of 0, no scatter beyond
   their binomial noise), so that the fit can tell a plateau from a curve still falling;
3. levels are first evaluated on a quarter of the sample blocks spread evenly over the whole data (the *head*: every
   4th block, so that data sorted by class or by difficulty is still represented); those clearly above or below the
   halfway line keep that estimate, the others get the remaining blocks. If the remaining blocks move the top back
   above the halfway line or unsettle it, step 2 goes on from there (new levels again on the head first);
4. refine inside the bracket where the mean accuracy crosses the halfway line, on all the data; where that step
   still holds most of the curve's fall (more than `Plan.steep` of it: the grid does not resolve where inside it
   the curve crosses), refine inside the new bracket again until it spans at most `Plan.resolution` decades.
A search is a generator: it yields Requests (σ levels × a set of sample blocks) and is sent back their Counts, so
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
    resolution: float = 1 / 32  # decades: a steep fall's crossing bracket is refined again until this narrow
    steep: float = 0.5  # ... steep: one step holds more than this share of the curve's fall (fit.UNRESOLVED)
    head: float = 0.25  # share of the sample blocks a level is first evaluated on
    margin: float = 0.1  # a level this far (× (clean − chance)) from the halfway line needs no more samples

    def coarse(self, scale: float) -> np.ndarray:
        n = int(round((self.stop - self.start) * self.per_decade)) + 1
        return scale * np.logspace(self.start, self.stop, n)


@dataclass(frozen=True)
class Request:
    """Evaluate these σ levels (every repeat) over these sample blocks, and send back their Counts.

    `blocks` is a tuple of `range`s of block indices (blocks of BLOCK samples): non-empty, in increasing order,
    disjoint and not adjacent (adjacent ranges are merged), e.g. ``(range(0, 1), range(4, 5), range(8, 9))`` or
    ``(range(0, 16),)``. The Counts sent back are the sum of the Counts of every range (one WorkUnit per range,
    ``WorkUnit.blocks = (r.start, r.stop)``): counts of disjoint blocks add up exactly.
    """

    sigmas: tuple[float, ...]
    blocks: tuple[range, ...]

    @property
    def block_count(self) -> int:
        """How many blocks the request covers."""
        return sum(len(r) for r in self.blocks)


def as_ranges(blocks) -> tuple[range, ...]:
    """Block indices (any iterable of ints, or of ranges) as sorted, merged, non-empty ranges."""
    if isinstance(blocks, range):
        blocks = (blocks,)
    index: set[int] = set()
    for b in blocks:
        index.update(b if isinstance(b, range) else (int(b),))
    ranges: list[range] = []
    for b in sorted(index):
        if ranges and ranges[-1].stop == b:
            ranges[-1] = range(ranges[-1].start, b + 1)
        else:
            ranges.append(range(b, b + 1))
    return tuple(ranges)


def spread(n_blocks: int, share: float) -> tuple[range, ...]:
    """ceil(share · n_blocks) blocks (at least one) evenly spread over all `n_blocks` blocks (every 1/share-th
    block, centred), as ranges."""
    k = min(n_blocks, max(1, int(np.ceil(n_blocks * share))))
    return as_ranges(int((i + 0.5) * n_blocks / k) for i in range(k))


@dataclass
class Curve:
    """The counts gathered so far for one site, per σ level. `clean` (the clean accuracy of all the data) and
    `chance`: its accuracies are paired with the clean pass (`accuracy`)."""

    levels: dict[float, Counts] = field(default_factory=dict)
    clean: float | None = None
    chance: float = 0.0

    def add(self, counts: Counts) -> None:
        """Add counts over new samples to what the curve holds for their σ levels."""
        for sigma in counts.sigmas:
            level = counts.level(sigma)
            old = self.levels.get(sigma)
            self.levels[sigma] = level if old is None else old + level

    def sorted(self) -> tuple[np.ndarray, list[Counts]]:
        sig = np.array(sorted(self.levels))
        return sig, [self.levels[s] for s in sig]

    def accuracy(self, sigma: float) -> np.ndarray:
        """Accuracy per repeat at `sigma`, relative to the clean accuracy of the samples evaluated (`accuracy`)."""
        return accuracy(self.levels[sigma], self.clean, self.chance)

    def mean(self, sigma: float) -> float:
        return float(np.mean(self.accuracy(sigma)))

    def settled(self, clean: float, chance: float) -> bool:
        """Has the top of the curve reached chance or levelled off (`fit.top`)?"""
        # imported here: fit loads scipy, which the workers (and `import walkaudit`) need not import
        from walkaudit._analysis.fit import top as top_of

        sig, levels = self.sorted()
        means = [self.mean(s) for s in sig]
        trials = [effective_samples(lv, self.clean, self.chance) * lv.correct.size for lv in levels]
        return top_of(np.log10(sig), means, trials, clean=clean, chance=chance).kind != "unsettled"


#: the most the pairing may narrow a point's binomial noise: at most this many times its samples count
MAX_PAIRED_GAIN = 100.0


def accuracy(level: Counts, clean: float | None = None, chance: float = 0.0) -> np.ndarray:
    """Accuracy per repeat of a one-level Counts.

    With `clean` (the clean accuracy of all the data) and counts paired with the clean pass, the accuracy is read
    relative to the clean accuracy c of the samples evaluated: chance + (clean - chance) · (a - chance) / (c -
    chance). Over all the data c = clean and this is the accuracy measured; over a subset (the adaptive search's
    first levels) it undoes the subset's luck, so a curve starts at the clean accuracy its halfway line is drawn
    from."""
    raw = level.correct[0] / max(level.samples, 1)
    pair = level.pairing
    if clean is None or pair is None or level.samples == 0:
        return raw
    own = pair[0] / level.samples
    if own == clean or own <= chance:
        return raw
    return np.clip(chance + (clean - chance) * (raw - chance) / (own - chance), 0.0, 1.0)


def effective_samples(level: Counts, clean: float | None = None, chance: float = 0.0) -> float:
    """The samples a binomial accuracy would need to be as precise as this paired one (McNemar): over all the data
    the clean pass is fixed, so only its changes are noise: lost = b of the c clean-correct samples and gained = g of
    the n - c others per repeat give the variance (c q(1-q) + (n-c) p(1-p)) / n² with q = b / c, p = g / (n - c),
    at most the binomial a(1-a)/n. Between n and MAX_PAIRED_GAIN · n; n for unpaired counts and for subsets (their
    sampling is not the noise's)."""
    n = level.samples
    pair, gained = level.pairing, level.gained
    if clean is None or pair is None or gained is None or n == 0 or pair[0] / n != clean:
        return float(n)
    (clean_correct, lost), repeats = pair, level.correct.size
    right, wrong = clean_correct * repeats, (n - clean_correct) * repeats
    q = lost.sum() / right if right else 0.0
    p = gained.sum() / wrong if wrong else 0.0
    variance = (right * q * (1 - q) + wrong * p * (1 - p)) / repeats / n**2
    a = level.correct.sum() / (n * repeats)
    binomial = a * (1 - a) / n
    if variance <= binomial / MAX_PAIRED_GAIN:
        return MAX_PAIRED_GAIN * n
    return float(max(n, n * binomial / variance))


#: A search: a generator that yields Requests, is sent each request's Counts, and returns the Curve.
Search = Generator[Request, Counts, Curve]


def _ask(curve: Curve, sigmas, blocks) -> Search:
    """Request `sigmas` over `blocks` (block indices or ranges; nothing when either is empty) and add the answer to
    the curve."""
    sigmas = tuple(float(s) for s in np.unique(np.atleast_1d(np.asarray(sigmas, dtype=np.float64))))
    blocks = as_ranges(blocks)
    if sigmas and blocks:
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


def _clear(level: Counts, half: float, margin: float, curve: Curve) -> bool:
    """Is this level's side of the halfway line already certain? (4 standard errors and a margin away)"""
    acc = float(np.mean(accuracy(level, curve.clean, curve.chance)))
    n = level.samples * level.correct.size
    se = np.sqrt(max(acc * (1 - acc), 1.0 / n) / n)
    return abs(acc - half) > max(4 * se, margin)


def _first_crossing(curve: Curve, line: float) -> tuple[float, float] | None:
    """The levels (a, b) around the first fall of the mean accuracy through `line`, or None."""
    sig = sorted(curve.levels)
    means = [curve.mean(s) for s in sig]
    for a, b, ma, mb in zip(sig, sig[1:], means, means[1:]):
        if ma > line >= mb:
            return a, b
    return None


def _steep(curve: Curve, a: float, b: float, steep: float) -> bool:
    """Does the step from level a to level b hold more than `steep` of the curve's whole fall (the grid does
    not resolve where inside it the curve crosses)?"""
    means = [curve.mean(s) for s in sorted(curve.levels)]
    fall = max(means) - min(means)
    return fall > 0 and curve.mean(a) - curve.mean(b) > steep * fall


def adaptive(half: float, plan: Plan, scale: float, n_blocks: int = 1, clean: float = 1.0,
             targets: tuple[float, ...] = ()) -> Search:
    """Search for the halfway crossing as described in the module docstring.

    Levels are first evaluated on a share `plan.head` of the blocks spread over all the data (`spread`); a level
    whose side of the halfway line is already clear keeps that estimate, the others are completed on the remaining
    blocks. `targets`: more accuracy lines to bracket and refine the same way (clean − a tolerated drop, near the
    top of the curve): the grid then also starts where accuracy is above the highest of them.
    """
    scale = scale if np.isfinite(scale) and scale > 0 else 1.0
    step = 1.0 / plan.per_decade
    n_blocks = max(1, n_blocks)
    head = spread(n_blocks, plan.head)
    chance = 2 * half - clean
    curve = Curve(clean=clean, chance=chance)
    yield from _ask(curve, plan.coarse(scale), head)

    def rising() -> bool:
        """Does the top of the curve still call for a larger σ (above the halfway line, or not settled)?"""
        return curve.mean(max(curve.levels)) > half or (clean > chance and not curve.settled(clean, chance))

    taken = {b for r in head for b in r}
    tail = [b for b in range(n_blocks) if b not in taken]
    margin = plan.margin * max(clean - chance, 0.0)  # a fraction of (clean − chance)
    top = plan.stop
    decided: set[float] = set()
    while True:
        while top < plan.highest and rising():
            top = min(plan.highest, top + 1.0)
            yield from _ask(curve, scale * 10 ** np.arange(top - 1.0 + step, top + step / 2, step), head)
        if not decided:  # the first pass
            bottom, highest = plan.start, max((half, *targets))
            while curve.mean(min(curve.levels)) <= highest and bottom > plan.lowest:
                bottom = max(plan.lowest, bottom - 1.0)
                yield from _ask(curve, scale * 10 ** np.arange(bottom, bottom + 1.0 - step / 2, step), head)
        unclear = [s for s, level in curve.levels.items() if s not in decided
                   and (not _clear(level, half, margin, curve)
                        or any(not _clear(level, t, 0.0, curve) for t in targets))]
        decided.update(curve.levels)
        yield from _ask(curve, unclear, tail)
        if top >= plan.highest or not rising():  # the remaining blocks can move the top: then extend again
            break

    for line in (half, *targets):
        refined = False
        while (bracket := _first_crossing(curve, line)) is not None:
            a, b = bracket
            if refined and (np.log10(b / a) <= plan.resolution + 1e-9 or not _steep(curve, a, b, plan.steep)):
                break
            inner = [s for s in np.logspace(np.log10(a), np.log10(b), plan.refine + 2)[1:-1] if s not in curve.levels]
            if not inner:
                break
            refined = True
            yield from _ask(curve, inner, range(n_blocks))
    return curve
