"""Split the sites of an audit into N shards of about equal cost (pure)."""

from __future__ import annotations


def assign(costs: list[float], n: int) -> list[list[int]]:
    """Site positions per shard: the longest-processing-time rule (costliest site first, to the least loaded shard;
    ties go to the lower shard), each shard's positions in site order. Deterministic for the same costs."""
    load, shares = [0.0] * n, [[] for _ in range(n)]
    for position in sorted(range(len(costs)), key=lambda p: (-costs[p], p)):
        k = min(range(n), key=lambda s: (load[s], s))
        shares[k].append(position)
        load[k] += costs[position]
    return [sorted(s) for s in shares]
