"""Uniform noise of width w: y' = y + w·ε with ε ~ U(−½, ½), the classic model of rounding to a step of w (the
error of rounding a value that is not aligned with the grid is uniform over one step; its std is w/√12).

An affine model (the additive term of the Gaussian family with uniform ε), so every evaluation path applies it:
the fed suffix and the global paths from host-drawn ε, and `--noise-source graph` with RandomUniformLike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from walkaudit._noise.base import Affine


@dataclass(frozen=True)
class Uniform(Affine):
    """y' = y + w·U(−½, ½): the level w is the full width (one quantisation step), in the activation's units."""

    kind: ClassVar[str] = "uniform"
    terms: ClassVar[tuple[str, ...]] = ("add",)
    distribution: ClassVar[str] = "uniform"
    graph_draw: ClassVar[tuple[str, dict] | None] = ("RandomUniformLike", {"low": -0.5, "high": 0.5})

    def scales(self, sigma):
        return None, np.asarray(sigma, dtype=np.float64)

    def describe(self) -> dict:
        return {"noise": self.kind, "ratio": None, "level": "width: y' = y + width·U(-1/2, 1/2)"}
