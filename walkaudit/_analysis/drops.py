"""A tolerated accuracy drop (`Bound`): "1%" is one point of accuracy, "5%rel" five percent of clean − chance; a bare
number is refused (its unit would be a guess)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from walkaudit.errors import UsageError, option


@dataclass(frozen=True)
class Bound:
    """The largest accuracy drop allowed: `value` in points of accuracy (0.01 = one point), or with `relative`,
    a fraction of (clean − chance)."""

    value: float
    relative: bool = False

    def points(self, clean: float, chance: float) -> float:
        return self.value * (clean - chance) if self.relative else self.value

    def describe(self) -> str:
        return f"{self.value * 100:g}%" + ("rel" if self.relative else "")


def parse_bound(text: str, field_name: str = "max_drop") -> Bound:
    """`1%` (points of accuracy) or `5%rel` (of clean − chance). A bare number is refused: `0.5` reads as half a
    point to some and as fifty points to others (and a σ50 drop's bare number means decades), so a drop always
    names its unit."""
    raw = str(text).strip().lower()
    relative = raw.endswith("rel")
    raw = raw.removesuffix("rel").strip()
    try:
        value = float(raw.removesuffix("%").strip())
    except ValueError:
        raise UsageError(f"{option(field_name)} {text!r}: expected a drop like 1% or 5%rel") from None
    if not raw.endswith("%"):
        raise UsageError(f"{option(field_name)} {text!r}: give the drop's unit: '{value:g}%' ({value:g} points of "
                         f"accuracy), '{value * 100:g}%' ({value * 100:g} points) or '{value:g}%rel' (of clean − "
                         "chance)")
    value /= 100
    if not 0 <= value < 1 or not math.isfinite(value):
        raise UsageError(f"{option(field_name)} {text!r}: a drop between 0% and 100%")
    return Bound(value, relative)
