"""Quantisation to B bits with the observed range: each sample's value at a site is rounded to 2^B evenly spaced
levels between its own minimum and maximum (per-tensor dynamic quantisation, as an accelerator quantises an
activation per inference):

    Δ = (max − min) / (2^B − 1),    y' = clip(min + round((y − min) / Δ)·Δ, min, max)

The search walks B downwards: its noise axis is the relative step σ = 1/(2^B − 1) (B = log2(1 + 1/σ)), which rises
as B falls, so accuracy falls along it like along any other noise level. Between whole bit counts σ is a step that
is not a power of two (2^B levels for fractional B), which keeps the curve continuous for the fit; at whole B it is
exactly B-bit rounding. `--bits` gives the bit counts to evaluate instead ("8,6,4", "2-12"). Deterministic: no draw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from walkaudit._analysis.sweep import Plan
from walkaudit._noise.base import NoiseModel, parse_ints
from walkaudit.errors import UsageError

#: The bit counts the adaptive search spans: B = 24 (a float32 mantissa) down to B = 1.
MAX_BITS = 24


def step(bits) -> np.ndarray:
    """The noise axis of B bits: the step relative to the range, 1/(2^B − 1)."""
    return 1.0 / (np.exp2(np.asarray(bits, dtype=np.float64)) - 1.0)


def bits_of(sigma) -> np.ndarray:
    """B for a point of the noise axis: log2(1 + 1/σ)."""
    return np.log2(1.0 + 1.0 / np.asarray(sigma, dtype=np.float64))


@dataclass(frozen=True)
class Quantize(NoiseModel):
    """Round each sample's value to B bits over its own range; σ = 1/(2^B − 1)."""

    bits: str | None = None  # the bit counts to walk, e.g. "8,6,4" or "2-12"; None: the adaptive search
    kind: ClassVar[str] = "quantize"
    terms: ClassVar[tuple[str, ...]] = ()
    relative: ClassVar[bool] = True
    distribution: ClassVar[str] = "none"

    def __post_init__(self):
        if self.bits is not None:
            counts = parse_ints(self.bits, "bits")
            if not counts or min(counts) < 1 or max(counts) > MAX_BITS:
                raise UsageError(f"bits for quantize must be whole numbers from 1 to {MAX_BITS}, got {self.bits!r}")

    def grid(self):
        if self.bits is None:
            return None
        return tuple(float(s) for s in step(sorted(set(parse_ints(self.bits, "bits")), reverse=True)))

    def plan(self) -> Plan:
        return Plan(start=math.log10(step(12)), stop=0.0, lowest=math.log10(step(MAX_BITS)), highest=0.0)

    def level_of(self, sigma: float) -> float:
        return float(bits_of(sigma))

    def describe(self) -> dict:
        return {"noise": self.kind, "ratio": None, "bits": self.bits,
                "level": "bits B = log2(1 + 1/sigma): sigma = 1/(2^B - 1) is the step relative to the sample's range"}

    def host(self, y, sigmas, eps=None, map_=map, axis: int = 0):
        sigmas = np.atleast_1d(np.asarray(sigmas, dtype=np.float64))
        out = np.empty((len(sigmas), *y.shape), dtype=y.dtype)
        others = tuple(a for a in range(y.ndim) if a != axis)
        v = y.astype(np.float32, copy=False)
        lo = v.min(axis=others, keepdims=True) if others else v
        hi = v.max(axis=others, keepdims=True) if others else v
        span = hi - lo

        def level(i: int) -> None:
            if sigmas[i] == 0:  # no rounding: y itself, bit for bit
                out[i] = y
                return
            delta = span * np.float32(sigmas[i])
            with np.errstate(divide="ignore", invalid="ignore"):
                codes = np.rint((v - lo) / delta)
            q = np.where(delta > 0, lo + codes * delta, v)  # a constant sample has nothing to round
            out[i] = np.clip(q, lo, hi)

        list(map_(level, range(len(sigmas))))
        return out
