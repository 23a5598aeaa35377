"""The perturbation interface: what a noise model must say (`NoiseModel`), and the affine family (`Affine`).

A noise model owns everything that depends on what the noise is:

- **what** it perturbs (`target`): a site's value (its output) — weights come with `target = "weights"`;
- **its draw** (`distribution`, `draws`, `draw`): numbers keyed by (seed, site name, term, block, repeat) from the
  one keyed source (`NormalSource.rows`): normals, uniforms or raw 32-bit words, so shards, Ray and `--resume`
  reproduce them whatever the batching;
- **its formula** on the host (`host`) and, where it has one, in the graph (`graph`, `graph_applies`; `graph_draw`
  when the graph can draw the numbers itself): both give the same numbers. A model without graph nodes runs on the
  host path (`strategies.HostApplied`);
- **its level** (`level`, `level_of`; `label`, the registry's symbol, name and unit for people) and **how it is
  searched** (`plan`, `search_scale`, `grid`): the sweep walks a
  positive *noise axis* on which more is noisier (σ; a bit error rate; 1/(2^B − 1) for B bits), in decades;
- **how the report names it** (`describe`).

A new model is one module and one line in `walkaudit._noise.registry`.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

from walkaudit._analysis.sweep import Plan
from walkaudit._noise.registry import REGISTRY, Level
from walkaudit._noise.source import name_key
from walkaudit.errors import UsageError

#: what a model can perturb
TARGETS = ("activations", "weights")
#: the last entry of a weight draw's key (`NoiseModel.draw_weight`)
WEIGHT_KEY = 1 << 40


class NoiseModel(ABC):
    """What a noise model must say. `terms` names the numbers one noisy pass draws, in draw order."""

    kind: ClassVar[str]
    #: what it perturbs: "activations" (a site's value) or "weights" (the initializer a layer reads)
    target: ClassVar[str] = "activations"
    #: it perturbs values as the model stores them: the int8/uint8 of a quantized model where it has them
    stored: ClassVar[bool] = False
    #: the level is relative to the signal already (its own relative midpoint; the search is not scaled)
    relative: ClassVar[bool] = False
    #: what `draw` fills: "normal" (N(0, 1)), "uniform" (U(−½, ½)) or "bits" (uniform 32-bit words); "none"
    distribution: ClassVar[str] = "normal"
    #: the model has graph nodes (`graph`, `scales`: y' = y·(1 + σm·εm) + σa·εa) that the fed suffix and the global
    #: paths apply; False: the host computes y' (`strategies.HostApplied`), walk mode only
    graph_applies: ClassVar[bool] = False
    #: (op, attributes) drawing one term in the graph (`--noise-source graph`), or None: the host always draws
    graph_draw: ClassVar[tuple[str, dict] | None] = None

    @property
    @abstractmethod
    def terms(self) -> tuple[str, ...]: ...

    @property
    def label(self) -> Level:
        """What the level is for people (symbol, name, unit), declared once with the model's registry entry."""
        return REGISTRY[self.kind].level

    @property
    def level(self) -> str:
        """The report's name for the level the search walks ("sigma", "width", "ber", "bits", "t")."""
        return self.label.key

    @property
    def draws(self) -> int:
        """How many independent arrays of numbers one noisy pass draws (one per term)."""
        return len(self.terms)

    @property
    def walk_only(self) -> bool:
        """Global mode needs graph nodes on activations; weights and host-only models walk one site at a time."""
        return self.target == "weights" or not self.graph_applies

    def plan(self) -> Plan:
        """The adaptive search's plan: decades of the noise axis, relative to `search_scale`."""
        return Plan()

    def search_scale(self, activation_std: float) -> float:
        """The noise-axis value the search's decades are relative to."""
        return 1.0 if self.relative else activation_std

    def grid(self) -> tuple[float, ...] | None:
        """A fixed grid on the noise axis this model's options ask for (None: the adaptive search)."""
        return None

    def level_of(self, sigma: float) -> float:
        """The model's level at a point of the noise axis (the identity unless the axis is a transform of it)."""
        return sigma

    def describe(self) -> dict:
        """The report's `config.noise`, `config.ratio` and, for models other than the Gaussian ones, `config.level`
        (what the noise axis σ of the points and midpoints means) and their options."""
        return {"noise": self.kind, "ratio": None}

    @abstractmethod
    def host(self, y: np.ndarray, sigmas, eps: np.ndarray, map_=map, axis: int = 0) -> np.ndarray:
        """y' for every level at once, [L, *y.shape]; eps: [draws, 1, *y.shape] from one draw shared by the levels
        (common random numbers); `axis`: y's sample axis; `map_`: a thread pool's map over the levels."""

    def draw(self, source, site: str, term: int, repeat: int, rows: range, shape: tuple[int, ...],
             out: np.ndarray) -> None:
        """Fill `out` [len(rows), *shape] (float32) with the numbers of term `term` at `site` for data rows `rows`,
        keyed by (site, term, block, repeat) (`NormalSource.rows`); raw words are stored in float32's bits."""
        source.rows(site, term, repeat, rows, shape, out=out, dist=self.distribution)


    def draw_weight(self, source, site: str, term: int, repeat: int, out: np.ndarray) -> None:
        """Fill `out` (the weight's shape, float32) with the numbers of term `term` for weight `site` in `repeat`: one
        draw per repeat for every sample (a chip's weights are programmed once and read by every inference), keyed
        by (site, term, repeat) and a mark no activation key holds (activation keys end in a repeat, never
        WEIGHT_KEY), so it never depends on the batch."""
        source.fill(out, (name_key(site), term, repeat, WEIGHT_KEY), self.distribution)


class Affine(NoiseModel):
    """y' = y·(1 + σm·εm) + σa·εa: the Walking Noise paper's Gaussian family, and uniform noise."""

    graph_applies: ClassVar[bool] = True
    graph_draw: ClassVar[tuple[str, dict] | None] = ("RandomNormalLike", {})

    @abstractmethod
    def scales(self, sigma) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(σ of the multiplicative term, σ of the additive term) per level; None where there is no such term."""

    def host(self, y: np.ndarray, sigmas, eps: np.ndarray, map_=map, axis: int = 0) -> np.ndarray:
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
                assert sa is not None  # every affine model has a term
                np.multiply(eps[-1, 0], np.float32(sa[i]), out=dst)
                np.add(dst, y, out=dst)

        list(map_(level, range(len(out))))
        return out

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




def parse_ints(text: str, what: str) -> list[int]:
    """Whole numbers from "3", "0,7,31" or ranges "23-30" (UsageError naming `what` otherwise)."""
    values: list[int] = []
    for part in str(text).split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if m is None:
            raise UsageError(f"{what} must be whole numbers or ranges such as '0-7,31', got {text!r}")
        first = int(m.group(1))
        values.extend(range(first, int(m.group(2)) + 1) if m.group(2) else (first,))
    return values
