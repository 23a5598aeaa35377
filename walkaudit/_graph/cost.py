"""Estimated cost of auditing each site (pure: graph in, numbers out)."""

from __future__ import annotations


def site_costs(model, sites) -> list[float]:
    """One number per site, proportional to the time its walk takes: for now every site costs the same."""
    return [1.0 for _ in sites]
