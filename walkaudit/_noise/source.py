"""Reproducible standard normal numbers (Box–Muller in float32), uniforms and random words: keyed draws, drawing
ahead on a thread.

ε for a site is drawn per block of samples (`walkaudit._units.BLOCK`), keyed by (seed, site name, noise term, block,
repeat) and, inside a block, by chunk of CHUNK values: the numbers a sample gets never depend on the batch size, on
which other sites are audited, on the number of threads or on the worker that draws them.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from walkaudit._units import BLOCK

#: Normal numbers are drawn in chunks of this many values, each from its own stream, so the numbers depend on the
#: seed and the key only, never on how many threads drew them.
CHUNK = 1 << 18


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


def uniform(rng: np.random.Generator, out: np.ndarray) -> None:
    """Fill the float32 vector `out` with U(−½, ½) numbers (24-bit uniforms on [0, 1), shifted)."""
    rng.random(out.size, dtype=np.float32, out=out)
    out -= np.float32(0.5)


def words(rng: np.random.Generator, out: np.ndarray) -> None:
    """Fill the float32 vector `out`'s bits with uniform 32-bit words (read back with `.view(np.uint32)`)."""
    out.view(np.uint32)[:] = rng.integers(0, 1 << 32, out.size, dtype=np.uint32)


#: what `NormalSource.fill` draws per kind, and the key entry that gives each kind other than normal its own streams
DRAWS = {"normal": box_muller, "uniform": uniform, "bits": words}
DIST_KEYS = {"uniform": 1, "bits": 2}


def name_key(name: str) -> int:
    """A stable 64-bit integer for a tensor name (the same in every process and Python version)."""
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "little")


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

    def fill(self, out: np.ndarray, key: tuple[int, ...], dist: str = "normal", first_chunk: int = 0) -> None:
        """Fill the float32 array `out` (C-contiguous) with the numbers of `key`, from its chunk `first_chunk` on:
        standard normals, U(−½, ½) ("uniform") or uniform 32-bit words stored in the floats' bits ("bits"). The kinds
        draw from streams of their own (the kind is part of the key), so no two kinds share numbers."""
        flat = out.reshape(-1)
        starts = range(0, flat.size, CHUNK)
        fill_chunk = DRAWS[dist]
        key = key if dist == "normal" else (*key, DIST_KEYS[dist])

        def fill(start: int) -> None:
            # the key's length goes in too: numpy's SeedSequence pads short entropy with zeros, so without it
            # (1,) and (1, 0) -- or chunk 2 of key (1,) and chunk 0 of key (1, 2) -- would draw the same numbers
            rng = np.random.default_rng([self.seed, len(key), *key, first_chunk + start // CHUNK])
            fill_chunk(rng, flat[start : start + CHUNK])

        if self._pool is None or flat.size <= CHUNK:
            for s in starts:
                fill(s)
        else:
            list(self._pool.map(fill, starts))

    def normal(self, shape: tuple[int, ...], key: tuple[int, ...], dist: str = "normal") -> np.ndarray:
        out = np.empty(shape, dtype=np.float32)
        self.fill(out, key, dist)
        return out

    def rows(self, site: str, term: int, repeat: int, rows: range, row_shape: tuple[int, ...],
             out: np.ndarray | None = None, dist: str = "normal") -> np.ndarray:
        """ε [len(rows), *row_shape] for samples `rows` of the data set at `site`: block by block, each block keyed
        by (site, term, block, repeat) and drawn whole, so a sample's numbers never depend on how rows are batched.
        """
        out = np.empty((len(rows), *row_shape), np.float32) if out is None else out
        site_key = name_key(site)
        first, last = rows.start // BLOCK, (rows.stop - 1) // BLOCK if len(rows) else -1
        for block in range(first, last + 1):
            lo, hi = max(rows.start, block * BLOCK), min(rows.stop, (block + 1) * BLOCK)
            key = (site_key, term, block, repeat)
            if lo == block * BLOCK and hi == (block + 1) * BLOCK:
                self.fill(out[lo - rows.start : hi - rows.start], key, dist)
                continue
            self._part(key, row_shape, lo - block * BLOCK, hi - block * BLOCK, out[lo - rows.start : hi - rows.start],
                       dist)
        return out

    def _part(self, key: tuple[int, ...], row_shape: tuple[int, ...], lo: int, hi: int, out: np.ndarray,
              dist: str = "normal") -> None:
        """Rows [lo, hi) of the block `key` as drawn whole, drawing only the chunks that hold them: a batch that
        covers part of a block (a data set of 8 samples, a batch of 100) costs its own rows, and nothing is kept."""
        size = int(np.prod(row_shape, dtype=np.int64))
        a, b = lo * size, hi * size
        first = a // CHUNK * CHUNK
        span = np.empty(min(-(-b // CHUNK) * CHUNK, BLOCK * size) - first, np.float32)  # whole chunks, as in the block
        self.fill(span, key, dist, first // CHUNK)
        out[...] = span[a - first : b - first].reshape(out.shape)

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
