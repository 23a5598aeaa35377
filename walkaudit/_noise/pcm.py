"""Analog in-memory computing on phase-change memory (PCM): programming noise, drift and read noise of the weights,
with the statistics of IBM aihwkit's `PCMLikeNoiseModel` (aihwkit/inference/noise/pcm.py; Nandakumar et al.,
ICECS 2019, fitted on one million PCM devices). The level is the time t in seconds since programming.

Per weight initializer W (a layer's crossbar) and repeat (one programmed chip):

1. Map W to a pair of conductances (aihwkit's `SinglePairConductanceConverter`): s = g_max / max|W|,
   g⁺ = clip(s·W, 0, g_max), g⁻ = clip(−s·W, 0, g_max), g_max = 25 µS.
2. Programming noise per device: g_p = max(g + σ_p(g)·ε₁, 0), σ_p(g) = c₀ + c₁·(g/g_max) + c₂·(g/g_max)² µS with
   (c₀, c₁, c₂) = (0.26348, 1.9650, −1.1731).
3. Drift: ν = |μ_ν + σ_ν·ε₂| with μ_ν = clip(−0.0155·ln(g/g_max) + 0.0244, 0.049, 0.1) and
   σ_ν = clip(−0.0125·ln(g/g_max) − 0.0059, 0.008, 0.045); at t (t' = t + t₀, t₀ = 20 s) g_d = g_p·(t'/t₀)^(−ν).
4. Read (1/f) noise accumulated since programming: g = max(g_d + |g_d|·q_s·√ln((t' + t_r)/(2·t_r))·ε₃, 0) with
   q_s = min(0.0088 / max((|g_p|/g_max)^0.65, 10⁻³), 0.2), t_r = 250 ns.
5. Back to weights, W' = (g⁺ − g⁻)/s, and global drift compensation (aihwkit's default `GlobalDriftCompensation`
   rescales a layer's output by its response at programming over its response now): here W' is scaled by
   Σ|W_p| / Σ|W'|, W_p the programmed weights of step 2 — the same factor for a drift that is uniform.

ε₁, ε₂, ε₃ are independent N(0, 1) per device: six terms (two devices per weight), one draw per repeat shared by
every t (common random numbers), so the curve over t is one chip ageing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from walkaudit._analysis.sweep import Plan
from walkaudit._noise.base import NoiseModel

G_MAX = 25.0  # µS: the conductance the largest |w| maps to (aihwkit's default converter)
PROG_COEFF = (0.26348, 1.9650, -1.1731)  # µS, fitted at g_max = 25 µS
T0 = 20.0  # s: the first read after programming, the drift's reference time
T_READ = 250e-9  # s: the read duration of the 1/f fit
ZERO_CLIP = 1e-7


def programmed(g: np.ndarray, eps: np.ndarray) -> np.ndarray:
    """Step 2: g + σ_p(g)·ε, clipped at 0."""
    r = g / G_MAX
    sigma = PROG_COEFF[0] + PROG_COEFF[1] * r + PROG_COEFF[2] * r * r
    return np.maximum(g + sigma * eps, 0.0)


def drift_exponents(g: np.ndarray, eps: np.ndarray) -> np.ndarray:
    """Step 3: ν per device from its target conductance."""
    log_r = np.log(np.maximum(np.abs(g / G_MAX), ZERO_CLIP))
    mu = np.clip(-0.0155 * log_r + 0.0244, 0.049, 0.1)
    sd = np.clip(-0.0125 * log_r - 0.0059, 0.008, 0.045)
    return np.abs(mu + sd * eps)


def at_time(g_prog: np.ndarray, nu: np.ndarray, eps: np.ndarray, t: float) -> np.ndarray:
    """Steps 3–4 at t seconds after programming."""
    t = t + T0
    g_drift = g_prog * (t / T0) ** (-nu) if t > T0 else g_prog
    q_s = np.minimum(0.0088 / np.maximum((np.abs(g_prog) / G_MAX) ** 0.65, 1e-3), 0.2)
    sigma = q_s * np.sqrt(np.log((t + T_READ) / (2 * T_READ)))
    return np.maximum(g_drift + np.abs(g_drift) * sigma * eps, 0.0)


@dataclass(frozen=True)
class PCM(NoiseModel):
    """aihwkit's PCM statistical model on each layer's weights; the level t is seconds since programming."""

    kind: ClassVar[str] = "weight-pcm"
    target: ClassVar[str] = "weights"
    terms: ClassVar[tuple[str, ...]] = ("prog+", "prog-", "nu+", "nu-", "read+", "read-")
    relative: ClassVar[bool] = True

    def plan(self) -> Plan:
        # from a second to 30 years (10^9 s) and beyond; a site whose accuracy programming noise alone halves is
        # censored below
        return Plan(start=0.0, stop=8.0, lowest=-2.0, highest=10.0, per_decade=1)

    def describe(self) -> dict:
        return {"noise": self.kind, "ratio": None, "target": self.target,
                "level": "t: seconds since programming (aihwkit PCMLikeNoiseModel statistics, t0 = 20 s, "
                         "g_max = 25 uS, global drift compensation)"}

    def host(self, y, sigmas, eps, map_=map, axis: int = 0):
        sigmas = np.atleast_1d(np.asarray(sigmas, dtype=np.float64))
        w = y.astype(np.float64)
        scale = G_MAX / max(float(np.abs(w).max()), ZERO_CLIP)
        e = np.asarray(eps, dtype=np.float64)[:, 0]
        targets = (np.clip(w * scale, 0.0, G_MAX), np.clip(-w * scale, 0.0, G_MAX))
        progs = [programmed(g, e[i]) for i, g in enumerate(targets)]
        nus = [drift_exponents(g, e[2 + i]) for i, g in enumerate(targets)]
        reference = np.abs(progs[0] - progs[1]).sum()
        out = np.empty((len(sigmas), *y.shape), dtype=y.dtype)

        def level(i: int) -> None:
            plus, minus = (at_time(progs[d], nus[d], e[4 + d], float(sigmas[i])) for d in (0, 1))
            g = plus - minus
            total = np.abs(g).sum()
            out[i] = (g * (reference / total if total > 0 else 1.0) / scale).astype(y.dtype)

        list(map_(level, range(len(sigmas))))
        return out
