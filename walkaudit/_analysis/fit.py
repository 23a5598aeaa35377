"""Midpoint noise level σ50 of one site's accuracy-vs-σ curve (pure numpy/scipy).

σ50 is the noise level at which accuracy is halfway between clean accuracy and chance. The estimate follows
the design notes ("The method", Walking Noise, arXiv 2212.10430):

1. Points with σ <= 0 (the clean reference), non-finite σ and NaN accuracies are dropped.
2. Censoring: if the mean accuracy never drops below the halfway line inside the grid, σ50 > σmax ("above",
   value = σmax); if it is already at or below the line at the smallest σ > 0, σ50 < σmin ("below", value = σmin).
   No number outside the grid is ever reported as σ50.
3. Logistic fit in u = log10 σ with the lower asymptote pinned at chance, hi free, width w = 10**lw
   (``scipy.optimize.curve_fit``, Levenberg-Marquardt, every repeat a point, binomial-shaped weights).
   σ50 is where the fitted curve crosses the halfway line (not exactly m, since hi is free).
4. Plateau check: curves that level off above chance are refitted with a free lower asymptote; that fit is kept
   ("logistic-free-floor") when it is significantly better (F-test, p < 0.01) and its floor is clearly above chance.
5. Fallback: when the fit fails, crosses outside the grid, or leaves large residuals (a jagged curve), or there are
   fewer than 3 levels, σ50 is the linear interpolation in log σ of the first downward crossing of the halfway line
   (method "interpolation", ok=False).

The 95% interval of a logistic estimate uses the delta method on the fit covariance (``ci_method="fit-covariance"``),
with the covariance scaled by the observed residual variance, so scatter between repeats and lack of fit both widen it.
It is symmetric in log σ and may extend past the grid. When the fitted drop (90% -> 10%) is narrower than the grid
step at the crossing, the covariance says nothing useful and the interval is that grid step
(``ci_method="grid-bracket"``). It is None when censored, interpolated, or when the covariance is degenerate.
It describes the scatter of the measured points (noise draws, repeats), not the choice of evaluation set.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy import optimize, special, stats

__all__ = ["Midpoint", "logistic", "halfway", "midpoint"]

_DEFAULT_SAMPLES = 100  # smoothing of the binomial weights when the sample count is unknown
_Z95 = 1.959963984540054
_PLATEAU_P = 0.01  # F-test level for preferring a free lower asymptote
_PLATEAU_MIN_RISE = 0.05  # ... and its floor must sit this fraction of (clean - chance) above chance
_MAX_CI_HALF_WIDTH = 5.0  # decades; a wider delta-method interval means the covariance is degenerate
_POOR_FIT_RMS = 0.1  # residual RMS of level means, as a fraction of (clean - chance), that rejects a fit
_TRANSITION_WIDTH = 2 * math.log(9)  # the logistic falls from 90% to 10% of its drop over this many widths w


@dataclass(frozen=True)
class Midpoint:
    """σ50 of one site, how it was obtained, and how sure it is.

    ``value`` is σ50, or the grid bound when censored (σmax for "above", σmin for "below"); it is NaN only when no
    usable point with σ > 0 was given (``to_dict`` writes NaN as None). ``ok`` is True when the intended estimate was
    obtained: a logistic fit, or a clean censoring; fallbacks and degenerate inputs set it False and say why in
    ``message``.
    """

    value: float
    ci95: tuple[float, float] | None
    censored: str | None
    method: str
    ok: bool
    params: dict[str, float] = field(default_factory=dict)
    ci_method: str | None = None
    message: str | None = None

    def to_dict(self) -> dict:
        """JSON-ready dict; NaN and infinities become None."""
        return {
            "value": _json_float(self.value),
            "ci95": None if self.ci95 is None else [_json_float(v) for v in self.ci95],
            "censored": self.censored,
            "method": self.method,
            "ok": self.ok,
            "params": {k: _json_float(v) for k, v in self.params.items()},
            "ci_method": self.ci_method,
            "message": self.message,
        }


def logistic(u, hi, lo, m, w):
    """Accuracy at u = log10 σ: ``lo + (hi - lo) / (1 + exp((u - m) / w))`` (overflow-safe)."""
    return lo + (hi - lo) * special.expit(-(np.asarray(u, dtype=float) - m) / w)


def halfway(clean: float, chance: float) -> float:
    """The accuracy halfway between clean and chance."""
    return chance + (clean - chance) / 2.0


def midpoint(sigmas, accuracy, *, clean: float, chance: float, samples: int | None = None) -> Midpoint:
    """Estimate σ50 from accuracies ``accuracy`` ([L] or [L, R] repeats) measured at noise levels ``sigmas`` [L].

    ``samples`` (evaluation samples per point) sets how the binomial weights of the fit are smoothed near
    accuracy 0 and 1 (100 when unknown). Never raises on bad data
    (too few points, NaNs, flat curves, clean <= chance); raises ValueError only if the shapes do not match.
    """
    u, acc = _clean_inputs(sigmas, accuracy)
    if u.size == 0:
        return _degenerate(math.nan, "no finite accuracy at any σ > 0")
    sigma_max = float(10 ** u[-1])
    if not (np.isfinite(clean) and np.isfinite(chance)) or clean <= chance:
        return _degenerate(sigma_max, f"clean accuracy {clean} is not above chance {chance}: no midpoint")

    half = halfway(clean, chance)
    means = np.nanmean(acc, axis=1)
    if means[0] <= half:
        return Midpoint(float(10 ** u[0]), None, "below", "censored", True, {}, None,
                        "accuracy is already at or below the halfway line at the smallest σ > 0")
    if np.all(means >= half):
        return Midpoint(sigma_max, None, "above", "censored", True, {}, None,
                        "accuracy never falls below the halfway line inside the grid")

    u_interp = _interpolated_crossing(u, means, half)
    if u.size < 3:
        return _interpolation(u_interp, f"only {u.size} σ levels: too few for a logistic fit")

    fit = _choose_fit(u, acc, clean=clean, chance=chance, half=half, u_start=u_interp, samples=samples)
    if isinstance(fit, str):
        return _interpolation(u_interp, fit)
    return fit


# --- inputs -------------------------------------------------------------------------------------------------------

def _clean_inputs(sigmas, accuracy) -> tuple[np.ndarray, np.ndarray]:
    """u = log10 σ sorted ascending and accuracy as [L, R], keeping only σ > 0 levels with some finite accuracy."""
    sigmas = np.asarray(sigmas, dtype=float).reshape(-1)
    acc = np.asarray(accuracy, dtype=float)
    if acc.ndim == 1:
        acc = acc[:, None]
    if acc.ndim != 2 or acc.shape[0] != sigmas.size:
        raise ValueError(f"accuracy shape {acc.shape} does not match {sigmas.size} σ levels")
    keep = np.isfinite(sigmas) & (sigmas > 0) & np.isfinite(acc).any(axis=1)
    order = np.argsort(sigmas[keep], kind="stable")
    return np.log10(sigmas[keep][order]), acc[keep][order]


# --- logistic fits ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Fit:
    params: np.ndarray  # (hi, m, lw) or (hi, lo, m, lw)
    cov: np.ndarray
    rss: float  # weighted residual sum of squares over all points
    lo: float
    free_floor: bool

    @property
    def hi(self) -> float:
        return float(self.params[0])

    @property
    def m(self) -> float:
        return float(self.params[-2])

    @property
    def w(self) -> float:
        return float(10 ** self.params[-1])


def _choose_fit(u, acc, *, clean, chance, half, u_start, samples) -> Midpoint | str:
    """Fit pinned-floor and free-floor logistics, pick one, check it; a string says why no fit is usable."""
    rows, cols = np.nonzero(np.isfinite(acc))
    x, y = u[rows], acc[rows, cols]
    means = np.nanmean(acc, axis=1)
    weights = _binomial_sd(means, samples or _DEFAULT_SAMPLES)[rows]
    span = clean - chance

    pinned = _fit(x, y, weights, lo=chance, hi0=clean, m0=u_start, u=u)
    free = _fit(x, y, weights, lo=None, hi0=clean, m0=u_start, u=u, lo0=max(chance, float(means[-1])))
    chosen, note = pinned, None
    if free is not None and _is_plateau(pinned, free, n=x.size, chance=chance, span=span):
        chosen = free
        note = f"curve levels off above chance at {free.lo:.3g}: lower asymptote fitted"
    if chosen is None:
        return "logistic fit did not converge"
    if problem := _fit_problem(chosen, u, means, half=half, span=span):
        return problem if note is None else f"{note}, but {problem}"

    u_half, grad = _crossing(chosen, half)
    params = {"hi": chosen.hi, "lo": chosen.lo, "m": chosen.m, "w": chosen.w}
    method = "logistic-free-floor" if chosen.free_floor else "logistic"
    ci, ci_method, ci_note = _interval(chosen, u_half, grad, u)
    message = "; ".join(part for part in (note, ci_note) if part) or None
    return Midpoint(float(10**u_half), ci, None, method, True, params, ci_method, message)


def _fit_problem(fit: _Fit, u, means, *, half: float, span: float) -> str | None:
    """Why a converged fit cannot give σ50 (large residuals, no crossing, crossing off the grid), or None."""
    rms = float(np.sqrt(np.mean((means - logistic(u, fit.hi, fit.lo, fit.m, fit.w)) ** 2)))
    if rms > _POOR_FIT_RMS * span:
        return f"the logistic fit is poor (RMS residual {rms:.3g} > {_POOR_FIT_RMS:g} of clean - chance)"
    if not fit.lo < half < fit.hi:
        return "the fitted curve does not cross the halfway line"
    if not u[0] <= _crossing(fit, half)[0] <= u[-1]:
        return "the fitted crossing lies outside the σ grid"
    return None


def _interval(fit: _Fit, u_half: float, grad: np.ndarray, u: np.ndarray):
    """95% interval on σ50: delta method in log σ, or the grid step around the crossing for too-steep curves.

    Returns (ci95, ci_method, note).
    """
    k = min(max(int(np.searchsorted(u, u_half)), 1), u.size - 1)
    if _TRANSITION_WIDTH * fit.w < u[k] - u[k - 1]:
        return ((float(10 ** u[k - 1]), float(10 ** u[k])), "grid-bracket",
                "curve steeper than the σ grid resolves: interval is the grid step around the crossing")
    var = float(grad @ fit.cov @ grad) if np.all(np.isfinite(fit.cov)) else math.inf
    half_width = _Z95 * math.sqrt(var) if var >= 0 else math.inf
    if not half_width <= _MAX_CI_HALF_WIDTH:
        return None, None, "interval unavailable: the fit does not determine the curve's shape"
    return (float(10 ** (u_half - half_width)), float(10 ** (u_half + half_width))), "fit-covariance", None


def _fit(x, y, weights, *, lo, hi0, m0, u, lo0=None) -> _Fit | None:
    """Least-squares logistic fit; lo=None fits the lower asymptote too. None when the fit fails."""
    lw0 = math.log10(max((u[-1] - u[0]) / 10, 0.02))
    if lo is None:
        def model(xx, hi, lo_, m, lw):
            return logistic(xx, hi, lo_, m, 10**lw)
        p0 = [hi0, lo0, m0, lw0]
    else:
        def model(xx, hi, m, lw):
            return logistic(xx, hi, lo, m, 10**lw)
        p0 = [hi0, m0, lw0]
    if x.size <= len(p0):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            popt, pcov = optimize.curve_fit(model, x, y, p0=p0, sigma=weights, absolute_sigma=False, maxfev=2000)
        except (RuntimeError, ValueError, optimize.OptimizeWarning):
            return None
    if not np.all(np.isfinite(popt)):
        return None
    resid = (y - model(x, *popt)) / weights
    return _Fit(popt, pcov, float(resid @ resid), float(popt[1]) if lo is None else float(lo), lo is None)


def _is_plateau(pinned: _Fit | None, free: _Fit, *, n: int, chance: float, span: float) -> bool:
    """True when the free-floor fit sits clearly above chance and explains the data significantly better."""
    if free.lo - chance < _PLATEAU_MIN_RISE * span:
        return False
    if pinned is None:
        return True
    dof = n - 4
    if dof <= 0 or free.rss <= 0:
        return free.rss < pinned.rss
    f_stat = (pinned.rss - free.rss) / (free.rss / dof)
    return bool(stats.f.sf(f_stat, 1, dof) < _PLATEAU_P)


def _crossing(fit: _Fit, half: float) -> tuple[float, np.ndarray]:
    """u where the fitted curve equals ``half``, and its gradient with respect to the fit parameters."""
    hi, lo, m, w = fit.hi, fit.lo, fit.m, fit.w
    log_ratio = math.log(hi - half) - math.log(half - lo)
    u_half = m + w * log_ratio
    d_hi, d_m, d_lw = w / (hi - half), 1.0, w * math.log(10) * log_ratio
    if fit.free_floor:
        return u_half, np.array([d_hi, w / (half - lo), d_m, d_lw])
    return u_half, np.array([d_hi, d_m, d_lw])


def _binomial_sd(means: np.ndarray, samples: int) -> np.ndarray:
    """Binomial standard deviation of an accuracy from ``samples`` samples (smoothed away from 0 and 1)."""
    p = (np.clip(means, 0, 1) * samples + 1) / (samples + 2)
    return np.sqrt(p * (1 - p) / samples)


# --- fallbacks ----------------------------------------------------------------------------------------------------

def _interpolated_crossing(u: np.ndarray, means: np.ndarray, half: float) -> float:
    """u of the first downward crossing of ``half``, linear in log σ (requires means[0] > half > some mean)."""
    k = int(np.argmax(means < half))
    a, b = means[k - 1], means[k]
    return float(u[k - 1] + (a - half) / (a - b) * (u[k] - u[k - 1]))


def _interpolation(u_half: float, reason: str) -> Midpoint:
    return Midpoint(float(10**u_half), None, None, "interpolation", False, {}, None,
                    f"{reason}; σ50 interpolated at the first crossing of the halfway line")


def _degenerate(value: float, reason: str) -> Midpoint:
    return Midpoint(value, None, "above", "censored", False, {}, None, reason)


def _json_float(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None
