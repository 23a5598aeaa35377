"""Split the sites of an audit into N shards of about equal cost (pure).

`assign` is the longest-processing-time rule (LPT, Graham 1969): the costliest site first, each to the shard with
the least cost so far. The costliest shard then costs at most (4/3 − 1/(3N)) times the best possible split, and at
most the mean share plus one site's cost. Every site lands in exactly one shard; shards may be empty when N exceeds
the number of sites. The same costs and N always give the same shards.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence


def assign(costs: Sequence[float], n: int) -> list[list[int]]:
    """Site positions per shard: the longest-processing-time rule (costliest site first, to the least loaded shard;
    ties go to the lower shard), each shard's positions in site order. Deterministic for the same costs."""
    if n < 1:
        raise ValueError(f"the number of shards must be at least 1, got {n}")
    heap = [(0.0, k) for k in range(n)]  # (load, shard): the least loaded, then the lowest, on top
    shares: list[list[int]] = [[] for _ in range(n)]
    for position in sorted(range(len(costs)), key=lambda p: (-costs[p], p)):
        load, k = heapq.heappop(heap)
        shares[k].append(position)
        heapq.heappush(heap, (load + costs[position], k))
    return [sorted(s) for s in shares]


def loads(costs: Sequence[float], shares: Sequence[Sequence[int]]) -> list[float]:
    """The summed cost of each shard."""
    return [float(sum(costs[p] for p in share)) for share in shares]
