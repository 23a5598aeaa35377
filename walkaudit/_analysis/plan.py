"""Tailored multi-execution (pure): how many times to repeat each layer so the network stays within a bound.

Repeating a layer's computation n times and averaging divides its noise σ by √n. Given, per site, the accuracy
drop measured with noise at that site alone for each candidate n (`drops[i][k]` for `candidates[k]`), choose one n
per site minimising the cost Σ nᵢ·macsᵢ subject to Σ dropᵢ(nᵢ) ≤ budget: the independent-layers model, where the
drops of layers noisy at once add up. It is optimistic when noise compounds across layers; the caller measures the
plan with every site noisy at once and tightens the budget until the measured drop meets the bound (`api.plan`).

The choice is exact for the model: a dynamic programme over the budget cut into `steps` equal parts, each drop
rounded up to a whole part, so a plan it returns never exceeds the budget under the model.
"""

from __future__ import annotations

import math

import numpy as np

#: Repetition counts the planner chooses from (a site runs 1, 2, 3, … times).
CANDIDATES = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16)


def monotone(drops: np.ndarray) -> np.ndarray:
    """Measured drops made non-negative and non-increasing in n (more repetitions never hurt): each value is the
    largest drop measured at that n or any larger one, which keeps the model conservative."""
    d = np.maximum(np.asarray(drops, dtype=np.float64), 0.0)
    return np.maximum.accumulate(d[..., ::-1], axis=-1)[..., ::-1]


def choose(drops, macs, budget: float, candidates=CANDIDATES, steps: int = 1000) -> tuple[int, ...] | None:
    """One repetition count per site from `candidates` minimising Σ n·macs with Σ drop ≤ budget, or None when
    even the largest counts exceed the budget. drops: [sites, len(candidates)]; ties go to fewer repetitions."""
    drops = monotone(drops)
    macs = np.asarray(macs, dtype=np.float64)
    sites = len(macs)
    if sites == 0:
        return ()
    if budget <= 0:
        return tuple([candidates[0]] * sites) if not drops.any() else None
    units = np.ceil(drops / budget * steps - 1e-9).astype(np.int64)  # each drop in whole parts of the budget
    inf = np.inf
    best = np.full(steps + 1, inf)  # best[b]: least cost of the sites so far using at most b parts
    best[0:] = 0.0
    picks = np.zeros((sites, steps + 1), np.int64)
    for i in range(sites):
        new = np.full(steps + 1, inf)
        pick = np.zeros(steps + 1, np.int64)
        for k, n in enumerate(candidates):
            u = units[i, k]
            if u > steps:
                continue
            cost = np.full(steps + 1, inf)
            cost[u:] = best[: steps + 1 - u] + n * macs[i]
            better = cost < new
            new[better], pick[better] = cost[better], k
        best, picks[i] = new, pick
    if not np.isfinite(best[steps]):
        return None
    chosen, b = [], steps
    for i in reversed(range(sites)):
        k = picks[i, b]
        chosen.append(candidates[k])
        b -= units[i, k]
    return tuple(reversed(chosen))


def predicted_drop(drops, plan: tuple[int, ...], candidates=CANDIDATES) -> float:
    """Σ dropᵢ(nᵢ) under the independent-layers model."""
    drops = monotone(drops)
    return float(sum(drops[i, candidates.index(n)] for i, n in enumerate(plan)))


def cost_ratio(plan: tuple[int, ...], macs) -> float:
    """The plan's multiply-accumulates over one plain pass of the same layers."""
    macs = np.asarray(macs, dtype=np.float64)
    total = macs.sum()
    return float(np.dot(plan, macs) / total) if total > 0 else 1.0


#: the normal quantile of a two-sided 95 % interval
Z95 = 1.959963984540054


def drop_interval(clean_correct: int, correct, samples: int, discordant=None) -> tuple[float, float, float]:
    """The accuracy drop with noise and its 95 % interval: (drop, low, high).

    `correct`: correct predictions under noise per draw [repeats], over the same `samples` the clean model got
    `clean_correct` right. The drop's variance has two parts: the spread over noise draws (their variance over the
    number of draws) and the sampling of the data, paired: for one sample the drop is c − n (c, n: right without and
    with noise), whose variance is P(c ≠ n) − drop². `discordant`: samples with c ≠ n per draw (McNemar's discordant
    pairs), where the counts carry the pairing; without it P(c ≠ n) is bounded from above by drop + 2·min(1 − clean,
    noisy) (a sample the clean model gets wrong can turn right under noise at most that often), which keeps the
    interval conservative."""
    correct = np.asarray(correct, dtype=np.float64)
    if samples <= 0 or correct.size == 0:
        return 0.0, -1.0, 1.0
    clean = clean_correct / samples
    noisy = correct / samples
    drop = float(clean - noisy.mean())
    between = noisy.var(ddof=1) / noisy.size if noisy.size > 1 else 0.0
    if discordant is not None:
        apart = float(np.mean(discordant)) / samples
    else:
        apart = min(1.0, max(drop, 0.0) + 2.0 * min(1.0 - clean, float(noisy.mean())))
    paired = max(apart - drop**2, 0.0) / samples
    half = Z95 * math.sqrt(between + paired)
    return drop, drop - half, drop + half


def noise_share(correct, samples: int, interval: tuple[float, float, float]) -> float:
    """The share of the interval's variance that comes from the spread over noise draws (what more draws narrow)."""
    noisy = np.asarray(correct, dtype=np.float64) / samples
    if noisy.size < 2:
        return 1.0
    drop, low, high = interval
    total = ((high - drop) / Z95) ** 2
    return float(min(1.0, noisy.var(ddof=1) / noisy.size / total)) if total > 0 else 0.0
