"""The report: dataclasses, its JSON form (schema walkaudit.report/1) and its terminal rendering."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

SCHEMA = "walkaudit.report/1"


@dataclass
class Point:
    sigma: float
    accuracy: float
    accuracy_std: float
    repeats: int
    samples: int
    nonfinite: int = 0  # noisy passes whose class output held NaN/Inf (counted as misclassified)


@dataclass
class SiteResult:
    index: int | None
    name: str
    node: str | None
    op_type: str
    shape: list | None
    activation_std: float | None
    weight: dict | None
    points: list[Point]
    midpoint: float | None
    midpoint_relative: float | None
    ci95: list[float] | None
    censored: str | None
    fit: dict


@dataclass
class Report:
    tool: dict
    model: dict
    data: dict
    config: dict
    runtime: dict
    clean_accuracy: float
    chance: float
    num_classes: int | None
    sites: list[SiteResult]
    gate: dict = field(default_factory=lambda: {"passed": True, "failures": [], "warnings": []})
    partial: bool = False

    @property
    def weakest(self) -> SiteResult | None:
        """The site with the lowest midpoint (censored-above sites only count by their bound)."""
        ranked = [s for s in self.sites if s.midpoint is not None]
        return min(ranked, key=lambda s: (s.censored == "above", s.midpoint), default=None)

    def summary(self) -> dict:
        w = self.weakest
        return {"weakest_site": w.name if w else None, "min_midpoint": w.midpoint if w else None,
                "sites": len(self.sites)}

    def to_dict(self) -> dict:
        body = asdict(self)
        body = {"schema": SCHEMA, **body, "summary": self.summary()}
        return _clean_floats(body)

    def to_json(self) -> str:
        return dumps(self.to_dict())


def dumps(report: dict) -> str:
    """A report dict as the JSON text walkaudit writes (the CLI's --json adds the gate to the dict first)."""
    return json.dumps(report, indent=2, allow_nan=False) + "\n"


def _clean_floats(value):
    """NaN/Inf are not JSON: they become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean_floats(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean_floats(v) for v in value]
    return value
