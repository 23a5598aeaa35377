"""The noise models, behind one interface (`NoiseModel`).

A noise model owns everything that depends on what the noise is: how many normal arrays a noisy pass draws, the
formula on the host, the terms the graph passes insert, what σ means (absolute, or relative to the signal) and the
default search plan. The engine, the sweep and the report only talk to this interface.

The three Gaussian models of the Walking Noise paper are one affine family, y' = y·(1 + σm·ε₁) + σa·ε₂ with
ε ~ N(0, 1) independent per element, sample, pass and site:

    additive        σa = σ                 (no multiplicative term)
    multiplicative  σm = σ                 (no additive term)
    combined        σm = σ(1 − r), σa = σr

σ = 0 gives y' = y bit for bit. Common random numbers: one draw of ε per repeat serves every σ level of a batch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from walkaudit._analysis.sweep import Plan
from walkaudit.errors import UsageError


class NoiseModel(ABC):
    """What a noise model must say. `terms` names the graph terms it needs ("mul", "add"), in draw order."""

    kind: ClassVar[str]
    relative: ClassVar[bool] = False  # σ is relative to the signal already (its own relative σ50)

    @property
    @abstractmethod
    def terms(self) -> tuple[str, ...]: ...

    @property
    def draws(self) -> int:
        """How many independent normal arrays one noisy pass needs (one per term)."""
        return len(self.terms)

    @abstractmethod
    def scales(self, sigma) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(σ of the multiplicative term, σ of the additive term) per level; None where there is no such term."""

    def plan(self) -> Plan:
        """The adaptive search's plan: decades relative to the site's activation std (absolute σ)."""
        return Plan()

    def search_scale(self, activation_std: float) -> float:
        """The σ the search's decades are relative to."""
        return 1.0 if self.relative else activation_std

    def describe(self) -> dict:
        """The report's `config.noise` and `config.ratio`."""
        return {"noise": self.kind, "ratio": None}

    def host(self, y: np.ndarray, sigmas, eps: np.ndarray, map_=map) -> np.ndarray:
        """y' for every σ level at once: [L, N, ...] in float32, level by level into one buffer (no temporaries of
        that size), the levels spread over `map_` (a thread pool's map: numpy releases the GIL).

        eps: [draws, 1, N, ...] from one draw shared by the levels; ε[0] multiplies, ε[-1] adds. The graph passes
        (`walkaudit._graph.passes._noisy`) do the same arithmetic in the same order, so both give the same numbers.
        """
        sm, sa = self.scales(sigmas)
        out = np.empty((len(np.atleast_1d(sigmas)), *y.shape), dtype=np.float32)

        def level(i: int) -> None:
            dst = out[i]
            if sm is not None:
                np.multiply(eps[0, 0], np.float32(sm[i]), out=dst)
                dst += np.float32(1.0)
                np.multiply(dst, y, out=dst)
                if sa is not None:
                    dst += eps[-1, 0] * np.float32(sa[i])
            else:
                np.multiply(eps[-1, 0], np.float32(sa[i]), out=dst)
                np.add(dst, y, out=dst)

        list(map_(level, range(len(out))))
        return out

    def draw(self, source, site: str, term: int, repeat: int, rows: range, shape: tuple[int, ...],
             out: np.ndarray) -> None:
        """Fill `out` [len(rows), *shape] with the noise numbers of term `term` at `site` for data rows `rows`:
        standard normals keyed by (site, term, block, repeat) (`NormalSource.rows`)."""
        source.rows(site, term, repeat, rows, shape, out=out)

    def graph(self, y: str, mul: tuple[str, str] | None, add: tuple[str, str] | None, unit: str | None,
              node) -> str:
        """The graph's nodes for y' = y·(1 + σm·εm) + σa·εa, in the host's order of operations (`host`), so both
        give the same numbers. `mul`/`add`: (σ, ε) value names or None; `unit`: a value holding 1 in y's type;
        `node(op, inputs, name) -> output name` adds one node. Returns the name of y'."""
        out = y
        if mul:
            factor = node("Add", [node("Mul", list(mul), "scaled_mul"), unit], "factor")
            out = node("Mul", [out, factor], "noisy_mul")
        if add:
            out = node("Add", [out, node("Mul", list(add), "scaled_add")], "noisy_add")
        return out

    def factors(self, sigmas, eps: np.ndarray, dtype=np.float32) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The (mul, add) factors of y' = y·mul + add for every σ level, for graphs that take them as inputs
        (`walkaudit._graph.passes.inject`, any opset). eps: [draws, R, N, ...]; returns [R, L, N, ...] arrays."""
        sm, sa = self.scales(sigmas)
        extra = (1,) * (eps.ndim - 2)  # broadcast σ over N and the site's dimensions

        def scaled(e: np.ndarray, s: np.ndarray) -> np.ndarray:
            return e[:, None] * s.astype(np.float32).reshape(1, -1, *extra)

        mul = add = None
        if sm is not None:
            mul = scaled(eps[0], sm)
            mul += 1.0
            mul = mul.astype(dtype, copy=False)
        if sa is not None:
            add = scaled(eps[-1], sa).astype(dtype, copy=False)
        return mul, add


@dataclass(frozen=True)
class Additive(NoiseModel):
    """y' = y + σ·ε: σ is absolute, in the units of the activation."""

    kind: ClassVar[str] = "additive"
    terms: ClassVar[tuple[str, ...]] = ("add",)

    def scales(self, sigma):
        return None, np.asarray(sigma, dtype=np.float64)


@dataclass(frozen=True)
class Multiplicative(NoiseModel):
    """y' = y·(1 + σ·ε): σ is relative to the signal; many ReLU nets level off above chance under it."""

    kind: ClassVar[str] = "multiplicative"
    terms: ClassVar[tuple[str, ...]] = ("mul",)
    relative: ClassVar[bool] = True

    def scales(self, sigma):
        return np.asarray(sigma, dtype=np.float64), None

    def plan(self) -> Plan:
        return Plan(start=-2.0, stop=1.0, lowest=-4.0, highest=4.0)


@dataclass(frozen=True)
class Combined(NoiseModel):
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


MODELS: dict[str, type[NoiseModel]] = {m.kind: m for m in (Additive, Multiplicative, Combined)}
NOISE_MODELS = tuple(MODELS)


def make_noise(kind: str = "additive", ratio: float = 0.5) -> NoiseModel:
    """The noise model called `kind` (the ratio only matters for combined noise)."""
    if kind not in MODELS:
        raise UsageError(f"unknown noise model {kind!r} (choose from {', '.join(NOISE_MODELS)})")
    return Combined(ratio) if kind == "combined" else MODELS[kind]()

