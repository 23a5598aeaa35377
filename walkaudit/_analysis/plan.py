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
