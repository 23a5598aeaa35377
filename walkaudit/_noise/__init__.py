"""The noise models and the source of normal numbers.

Every noise model is written as y' = y · mul + add, with ε ~ N(0, 1) independent per element, sample, pass and site:

    additive        mul = 1                   add = σ·ε
    multiplicative  mul = 1 + σ·ε             add = 0
    combined        mul = 1 + σ(1−r)·ε1       add = σr·ε2

σ = 0 gives mul = 1 and add = 0 exactly, so y' = y bit for bit. The same two terms serve the host path (walk mode
feeds y' to the part of the graph after the site) and the graph path (rewrite.py inserts Mul and Add nodes that read
the terms as graph inputs), so there is one formula.

Common random numbers: one draw of ε per repeat serves every σ level of a batch (the terms of level l are the same
ε scaled by σ_l), which cuts the cost of drawing and makes the curves smooth in σ.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from walkaudit.errors import UsageError

NOISE_MODELS = ("additive", "multiplicative", "combined")

#: Normal numbers are drawn in chunks of this many values, each from its own stream, so the numbers depend on the
#: seed and the key only, never on how many threads drew them.
CHUNK = 1 << 18


@dataclass(frozen=True)
class Noise:
    kind: str = "additive"
    ratio: float = 0.5  # combined only: σa = σ·r, σm = σ·(1−r)

    def __post_init__(self):
        if self.kind not in NOISE_MODELS:
            raise UsageError(f"unknown noise model {self.kind!r} (choose from {', '.join(NOISE_MODELS)})")
        if not 0.0 <= self.ratio <= 1.0:
            raise UsageError(f"--ratio must be between 0 and 1, got {self.ratio}")

    @property
    def draws(self) -> int:
        """How many independent normal arrays one noisy pass needs."""
        return 2 if self.kind == "combined" else 1

    def scales(self, sigma: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(σ of the multiplicative term, σ of the additive term); None where the model has no such term."""
        sigma = np.asarray(sigma, dtype=np.float64)
        if self.kind == "additive":
            return None, sigma
        if self.kind == "multiplicative":
            return sigma, None
        return sigma * (1.0 - self.ratio), sigma * self.ratio

    def terms(self, sigmas, eps: np.ndarray, dtype=np.float32) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The (mul, add) terms for every σ level from one draw per repeat.

        eps: [draws, R, N, ...] normal numbers. Returns arrays of shape [R, L, N, ...] (or None for a missing term).
        """
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


def noisy_levels(noise: Noise, y: np.ndarray, sigmas, eps: np.ndarray, map_=map) -> np.ndarray:
    """y' for every σ level at once: [L, N, ...] in float32, level by level into one buffer (no temporaries of
    that size), the levels spread over `map_` (a thread pool's map: numpy releases the GIL).

    The same arithmetic, in the same order, as `apply(y, *noise.terms(sigmas, eps))`: the values are bit-identical.
    eps: [draws, 1, N, ...] from one draw shared by the levels.
    """
    sm, sa = noise.scales(sigmas)
    out = np.empty((len(sigmas), *y.shape), dtype=np.float32)

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

    list(map_(level, range(len(sigmas))))
    return out


def apply(y: np.ndarray, mul: np.ndarray | None, add: np.ndarray | None) -> np.ndarray:
    """y' = y · mul + add (with broadcasting), in y's dtype."""
    out = y * mul if mul is not None else np.array(y, copy=True)
    if add is not None:
        out = out + add
    return out.astype(y.dtype, copy=False)


def box_muller(rng: np.random.Generator, out: np.ndarray) -> None:
    """Fill the float32 vector `out` with standard normal numbers: the Box–Muller transform of uniform pairs.

    z₁ = r·cos θ, z₂ = r·sin θ with r = √(−2 ln u₁), θ = 2π·u₂ are two independent N(0, 1) numbers. In float32 with
    numpy's vectorised log, sqrt, cos and sin this draws about 2.4x faster than numpy's float32 ziggurat
    (`Generator.standard_normal`): 234 against 88 M values/s on one core here (docs/performance.md), and the draw is
    what limits noisy evaluation on the CPU. u₁ has 24 bits, so |z| ≤ 5.8: the mass left out is 8e-9.
    """
    half = (out.size + 1) // 2
    r = rng.random(half, dtype=np.float32)
    theta = rng.random(half, dtype=np.float32)
    np.subtract(np.float32(1.0), r, out=r)  # (0, 1]: the log is finite
    np.log(r, out=r)
    np.multiply(r, np.float32(-2.0), out=r)
    np.sqrt(r, out=r)
    np.multiply(theta, np.float32(2.0 * np.pi), out=theta)
    rest = out.size - half
    np.multiply(r, np.cos(theta), out=out[:half])
    np.multiply(r[:rest], np.sin(theta[:rest]), out=out[half:])


class NormalSource:
    """Reproducible standard normal numbers keyed by (seed, *key), drawn in parallel threads (`box_muller` per
    chunk of CHUNK values, each chunk from its own generator).

    numpy releases the GIL while it fills an array, so threads draw in parallel. `later` draws on one more thread,
    in the background, while the caller does something else (runs onnxruntime).
    """

    def __init__(self, seed: int, threads: int | None = None):
        self.seed = int(seed)
        self.threads = threads or min(8, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
        self._ahead = ThreadPoolExecutor(1)  # draws ahead (`later`); it hands the chunks on to the pool

    def normal(self, shape: tuple[int, ...], key: tuple[int, ...]) -> np.ndarray:
        out = np.empty(shape, dtype=np.float32)
        flat = out.reshape(-1)
        starts = range(0, flat.size, CHUNK)

        def fill(start: int) -> None:
            # the key's length goes in too: numpy's SeedSequence pads short entropy with zeros, so without it
            # (1,) and (1, 0) -- or chunk 2 of key (1,) and chunk 0 of key (1, 2) -- would draw the same numbers
            rng = np.random.default_rng([self.seed, len(key), *key, start // CHUNK])
            box_muller(rng, flat[start : start + CHUNK])

        if self._pool is None or flat.size <= CHUNK:
            for s in starts:
                fill(s)
        else:
            list(self._pool.map(fill, starts))
        return out

    def later(self, fn, *args) -> Future:
        """Run fn(*args) (a draw) in the background, so that it overlaps onnxruntime's run of the previous one."""
        return self._ahead.submit(fn, *args)

    def map(self, fn, items) -> list:
        """fn over items on this source's threads (in order); plain map without a pool."""
        return list(self._pool.map(fn, items)) if self._pool is not None else list(map(fn, items))

    def close(self) -> None:
        self._ahead.shutdown()
        if self._pool is not None:
            self._pool.shutdown()
