"""The Walking Noise paper's Gaussian models: one affine family, y' = y·(1 + σm·ε₁) + σa·ε₂ with ε ~ N(0, 1)
independent per element, sample, pass and site:

    additive        σa = σ                 (no multiplicative term)
    multiplicative  σm = σ                 (no additive term)
    combined        σm = σ(1 − r), σa = σr

σ = 0 gives y' = y bit for bit. Common random numbers: one draw of ε per repeat serves every σ level of a batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from walkaudit._analysis.sweep import Plan
from walkaudit._noise.base import Affine
from walkaudit.errors import UsageError


@dataclass(frozen=True)
class Additive(Affine):
    """y' = y + σ·ε: σ is absolute, in the units of the activation."""

    kind: ClassVar[str] = "additive"
    terms: ClassVar[tuple[str, ...]] = ("add",)

    def scales(self, sigma):
        return None, np.asarray(sigma, dtype=np.float64)


@dataclass(frozen=True)
class Multiplicative(Affine):
    """y' = y·(1 + σ·ε): σ is relative to the signal; many ReLU nets level off above chance under it."""

    kind: ClassVar[str] = "multiplicative"
    terms: ClassVar[tuple[str, ...]] = ("mul",)
    relative: ClassVar[bool] = True

    def scales(self, sigma):
        return np.asarray(sigma, dtype=np.float64), None

    def plan(self) -> Plan:
        return Plan(start=-2.0, stop=1.0, lowest=-4.0, highest=4.0)


@dataclass(frozen=True)
class Combined(Affine):
    """y' = y·(1 + σ(1−r)·ε₁) + σr·ε₂: the paper's amplitude σ and ratio r."""

    ratio: float = 0.5
    kind: ClassVar[str] = "combined"
    terms: ClassVar[tuple[str, ...]] = ("mul", "add")

    def __post_init__(self):
        if not 0.0 <= self.ratio <= 1.0:
            raise UsageError(f"ratio must be between 0 and 1, got {self.ratio}")

    def scales(self, sigma):
        sigma = np.asarray(sigma, dtype=np.float64)
        return sigma * (1.0 - self.ratio), sigma * self.ratio

    def describe(self) -> dict:
        return {"noise": self.kind, "ratio": self.ratio}


@dataclass(frozen=True)
class WeightAdditive(Additive):
    """W' = W + σ·ε on a layer's weight initializer, drawn once per repeat (a chip's programmed weights): σ in the
    weight's units, searched relative to the weight's std."""

    kind: ClassVar[str] = "weight-additive"
    target: ClassVar[str] = "weights"


@dataclass(frozen=True)
class WeightMultiplicative(Multiplicative):
    """W' = W·(1 + σ·ε) on a layer's weight initializer, drawn once per repeat: σ relative to each weight."""

    kind: ClassVar[str] = "weight-multiplicative"
    target: ClassVar[str] = "weights"
