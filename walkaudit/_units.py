"""The units of work and what they return: the vocabulary shared by the sweep, the executors and the driver.

- `WorkUnit`: a frozen, picklable request (model, site or sites, σ levels, repeats, a range of sample blocks,
  seed). Any executor evaluates it the same way: in this process, or elsewhere from the same resolved audit.
- `Counts`: what a unit returns, integers only (correct predictions and non-finite outputs per σ and repeat, and the
  samples seen), so counts of disjoint sample ranges add up exactly, in any order.
- `CleanStats`: what the clean pass returns, per sample block, so that passes over disjoint ranges merge into the
  statistics of their union bit for bit (float moments are summed in block order).

Samples are grouped in blocks of BLOCK rows. The noise ε of a sample depends only on the seed, the site's name, its
block, the repeat and the noise term: never on the batch size, the other sites, threads or the worker.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: Samples per block: the unit of sample ranges and of ε keys.
BLOCK = 64

#: The target of a position that is not scored (per-token outputs: the ignore label, or a zero of the attention
#: mask). No prediction equals it (predictions are class ids, or -1 for NaN/Inf scores).
UNSCORED = -(1 << 62)


def blocks_of(samples: int) -> int:
    """How many blocks `samples` samples make (the last one may be short)."""
    return -(-samples // BLOCK)


def block_rows(blocks: range, samples: int) -> range:
    """The sample rows of a range of blocks, clipped to the data."""
    return range(min(blocks.start * BLOCK, samples), min(blocks.stop * BLOCK, samples))


@dataclass(frozen=True)
class WorkUnit:
    """Evaluate `sigmas` × `repeats` with noise at `sites` over the samples of `blocks`.

    A walk unit has one site; a global unit has every selected site, noisy at once with the same σ (times the
    site's scale, when `site_scales` is given).
    """

    model: str  # the model's sha256 (or a name for in-memory models): a worker refuses another model's units
    sites: tuple[str, ...]
    sigmas: tuple[float, ...]
    repeats: int
    blocks: tuple[int, int]  # [start, stop) in blocks of BLOCK samples
    seed: int
    #: global units: σ of site i at level l is sigmas[l] · site_scales[i] (None: all 1), so any assignment of noise
    #: levels to sites is measured at once (multi-execution plans, relative budgets)
    site_scales: tuple[float, ...] | None = None
    mode: str = "walk"  # "walk": the noise at one site, the rest clean; "global": at every site of `sites` at once

    @property
    def block_range(self) -> range:
        return range(*self.blocks)


@dataclass(frozen=True, eq=False)
class Counts:
    """Correct predictions and noisy passes with NaN/Inf class scores per (σ, repeat), over `samples` samples.

    Paired with the clean pass (`clean_correct` and `lost` given; None when the worker had no clean predictions):
    `clean_correct` of the evaluated samples were right without noise, and per (σ, repeat) `lost` of those were
    wrong with it (the discordant pairs of McNemar's test: `lost` and `gained`).

    For a per-token class output ([N, T, C]) everything counts scored positions (tokens) instead: `samples` is the
    number of scored tokens in the unit's blocks, `correct` and `nonfinite` count tokens; they add up the same way."""

    sigmas: tuple[float, ...]
    correct: np.ndarray  # [levels, repeats] int64
    nonfinite: np.ndarray  # [levels, repeats] int64
    samples: int
    notes: tuple[str, ...] = ()  # what the executor had to do differently (one σ level per run, ...)
    clean_correct: int | None = None  # evaluated samples the clean model got right
    lost: np.ndarray | None = None  # [levels, repeats] int64: of those, wrong under noise

    @classmethod
    def zeros(cls, sigmas, repeats: int) -> Counts:
        shape = (len(sigmas), repeats)
        return cls(tuple(sigmas), np.zeros(shape, np.int64), np.zeros(shape, np.int64), 0)

    @property
    def pairing(self) -> tuple[int, np.ndarray] | None:
        """(clean_correct, lost) when these counts carry the pairing with the clean pass, else None."""
        if self.clean_correct is None or self.lost is None:
            return None
        return self.clean_correct, self.lost

    @property
    def paired(self) -> bool:
        """Whether these counts carry the pairing with the clean pass."""
        return self.pairing is not None

    @property
    def gained(self) -> np.ndarray | None:
        """[levels, repeats]: evaluated samples the clean model got wrong and the noisy one right."""
        pair = self.pairing
        return None if pair is None else self.correct - pair[0] + pair[1]

    def __add__(self, other: Counts) -> Counts:
        """The counts of two disjoint sample ranges with the same σ levels and repeats: their union's counts (paired
        only when both are)."""
        if self.sigmas != other.sigmas or self.correct.shape != other.correct.shape:
            raise ValueError("counts of different σ levels or repeats do not add")
        notes = tuple(sorted(set(self.notes + other.notes)))  # the same whatever order the pieces came back in
        mine, theirs = self.pairing, other.pairing  # paired only when both are
        return Counts(self.sigmas, self.correct + other.correct, self.nonfinite + other.nonfinite,
                      self.samples + other.samples, notes,
                      mine[0] + theirs[0] if mine is not None and theirs is not None else None,
                      mine[1] + theirs[1] if mine is not None and theirs is not None else None)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Counts) and self.sigmas == other.sigmas and self.samples == other.samples
                and np.array_equal(self.correct, other.correct) and np.array_equal(self.nonfinite, other.nonfinite)
                and self.clean_correct == other.clean_correct
                and (self.lost is None) == (other.lost is None)
                and (self.lost is None or other.lost is None or np.array_equal(self.lost, other.lost)))

    def level(self, sigma: float) -> Counts:
        i = self.sigmas.index(sigma)
        return Counts((sigma,), self.correct[i : i + 1], self.nonfinite[i : i + 1], self.samples, (),
                      self.clean_correct, None if self.lost is None else self.lost[i : i + 1])

    @property
    def evaluations(self) -> int:
        """Sample forward passes under noise these counts stand for."""
        return int(self.correct.size) * self.samples


@dataclass(eq=False)
class CleanStats:
    """The clean model over some sample blocks: correct predictions, and per site and block the moments (count,
    sum, sum of squares, over finite values) of the site's activation. Merge passes over disjoint blocks with `+`.
    For a per-token class output, `correct` and `samples` count scored tokens (see `Counts`)."""

    correct: int = 0
    samples: int = 0
    moments: dict[str, dict[int, tuple[int, float, float]]] = field(default_factory=dict)
    shapes: dict[str, tuple] = field(default_factory=dict)  # each site's shape as run (dimension 0: the batch)
    width: int | None = None  # columns of the class scores
    classes: frozenset[int] = frozenset()  # class ids seen among the targets and the predictions

    def __add__(self, other: CleanStats) -> CleanStats:
        moments = {s: dict(self.moments.get(s, {})) for s in {*self.moments, *other.moments}}
        for site, blocks in other.moments.items():
            overlap = moments[site].keys() & blocks.keys()
            if overlap:
                raise ValueError(f"clean passes overlap at block {min(overlap)}")
            moments[site].update(blocks)
        return CleanStats(self.correct + other.correct, self.samples + other.samples, moments,
                          {**self.shapes, **other.shapes}, self.width or other.width, self.classes | other.classes)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.samples, 1)

    def std(self, site: str) -> float:
        """The site's activation std over every block held, summed in block order (so the same whatever the
        batching or the merge order)."""
        blocks = self.moments.get(site, {})
        count = total = squares = 0.0
        for b in sorted(blocks):
            c, s, q = blocks[b]
            count, total, squares = count + c, total + s, squares + q
        mean = total / max(count, 1)
        return float(np.sqrt(max(squares / max(count, 1) - mean * mean, 0.0)))


def moments(v: np.ndarray) -> tuple[int, float, float]:
    """(count, sum, sum of squares) of the finite values, accumulated in float64 without a float64 copy."""
    total = float(v.sum(dtype=np.float64))
    squares = float(np.square(v).sum(dtype=np.float64))
    if not (np.isfinite(total) and np.isfinite(squares)):
        v = v[np.isfinite(v)]
        return v.size, float(v.sum(dtype=np.float64)), float(np.square(v.astype(np.float64)).sum())
    return v.size, total, squares
