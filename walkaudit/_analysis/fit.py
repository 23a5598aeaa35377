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
4. Plateau check (`top`, binomial standard errors from samples × repeats): the top of the curve is *at chance*
   when the accuracy at the largest σ is within 2 standard errors of chance; it is *flat* when its last levels (at
   least 3, spanning at least a decade) show no trend (the weighted least-squares slope across them is within 2
   standard errors of 0) and no scatter beyond their noise (χ² about their pooled mean, p >= 0.01); a flat top is a
   *plateau* when its pooled accuracy is more than 2 standard errors and 5 % of (clean - chance) above chance
   (otherwise it is at chance). Only a plateau gets a free lower asymptote, never above the accuracy measured at
   the largest σ (a free fit that puts it higher is redone with the floor there: a logistic is symmetric in log σ,
   and a slowly flattening tail pulls its floor above the data). That fit is kept ("logistic-free-floor") when it
   also fits significantly better (F-test, p < 0.01). A top neither at chance nor flat ("unsettled") keeps the
   floor pinned at chance, and `Midpoint.note` says so. The adaptive search (`sweep.adaptive`) extends σ by the
   same criterion.
5. The points decide: the logistic stands (``Midpoint.estimator`` "logistic") only when its residuals are within
   binomial noise (χ² of the level means about the fit, each against the larger of the binomial variance of the
   fitted accuracy and the variance of its repeats' mean, on levels - parameters degrees of freedom: rejected at
   p < RESIDUAL_P) and its crossing lies between the levels clearly on either side of the halfway line (BRACKET_Z
   standard errors). Otherwise, and when the fit fails, crosses outside the grid or leaves large residuals, σ50 is
   the crossing of the isotonic (non-increasing) fit of the level means, read on the monotone piecewise cubic
   (PCHIP) through its points in log σ ("isotonic", method "isotonic"). Fewer than 3 levels: the linear
   interpolation in log σ of the first crossing ("interpolated", method "interpolation", ok=False). A clean
   accuracy within its binomial 95 % interval of chance (`at_chance`, with ``clean_samples``) gives no σ50 at all (NaN,
   "none").

The 95% interval of a logistic estimate is a bootstrap (``ci_method="bootstrap"``): BOOTSTRAP replicates resample
the R repeats with replacement as whole curves (common random numbers: one noise draw serves every σ of a repeat,
so its errors are shared across levels; deviations scaled by sqrt(R/(R-1)) to undo the bootstrap's shrinkage),
redraw each point's count binomially from its accuracy and the level's samples, and refit the chosen model with a
batched Levenberg-Marquardt started at the fit; the interval is the 2.5-97.5% percentile of the refitted crossings
in log σ. An isotonic estimate's interval comes from the same replicates, each refitted monotonically and read on
its cubic: their 2.5-97.5 % percentile, widened by the interpolation allowance (the distance between the cubic's and
the straight line's crossing of the estimate); where one grid step holds more than UNRESOLVED of the curve's fall,
the grid step instead (`_isotonic_midpoint`). The generator is seeded from the inputs, so the same data give the
same interval. When the fitted drop (90% -> 10%) is narrower than the grid step at the crossing, the interval is
that grid step (``ci_method="grid-bracket"``). It is
None when censored, interpolated, or when the replicates do not cross the halfway line inside the grid. It
describes the noise draws and repeats, not the choice of evaluation set.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
from scipy import interpolate, optimize, special, stats

__all__ = ["Midpoint", "Top", "logistic", "halfway", "midpoint", "top"]

_DEFAULT_SAMPLES = 100  # smoothing of the binomial weights when the sample count is unknown
_Z95 = 1.959963984540054
_PLATEAU_P = 0.01  # F-test level for preferring a free lower asymptote
_PLATEAU_MIN_RISE = 0.05  # ... and its floor must sit this fraction of (clean - chance) above chance
_TOP_Z = 2.0  # standard errors: "at chance", "no trend" and "above chance" at the top of a curve
_TOP_SCATTER_P = 0.01  # χ² level at which the top levels disagree with their pooled mean (not flat)
_TOP_DECADES = 1.0  # the top levels judged flat or not span at least this many decades ...
_TOP_LEVELS = 3  # ... and are at least this many
_MAX_CI_HALF_WIDTH = 5.0  # decades; a wider delta-method interval means the covariance is degenerate
_POOR_FIT_RMS = 0.1  # residual RMS of level means, as a fraction of (clean - chance), that rejects a fit
_TRANSITION_WIDTH = 2 * math.log(9)  # the logistic falls from 90% to 10% of its drop over this many widths w
BOOTSTRAP = 200  # bootstrap refits behind a 95% interval (400 moved bounds by ≤ 1 % at twice the cost)
_BOOT_MIN_VALID = 0.9  # share of refits that must cross the halfway line for an interval
BRACKET_Z = 2.0  # standard errors from the halfway line that put a level's side of it beyond doubt
UNRESOLVED = 0.5  # share of a curve's fall inside one grid step beyond which the step bounds the crossing
RESIDUAL_P = 0.05  # a logistic whose residuals are this improbable under binomial noise gives way to the isotonic fit


@dataclass(frozen=True)
class Midpoint:
    """σ50 of one site, how it was obtained, and how sure it is.

    ``value`` is σ50, or the grid bound when censored (σmax for "above", σmin for "below"); it is NaN only when no
    usable point with σ > 0 was given (``to_dict`` writes NaN as None). ``ok`` is True when the intended estimate was
    obtained: a logistic fit, or a clean censoring; fallbacks and degenerate inputs set it False and say why in
    ``message``. ``note``: a finding for the site's notes (the curve had not settled at the largest σ), also part
    of ``message``; not in ``to_dict``.
    """

    value: float
    ci95: tuple[float, float] | None
    censored: str | None
    method: str
    ok: bool
    params: dict[str, float] = field(default_factory=dict)
    ci_method: str | None = None
    message: str | None = None
    note: str | None = None

    @property
    def estimator(self) -> str:
        """What σ50 comes from: "logistic" (the fitted curve's crossing, inside the points' bracket), "isotonic"
        (the monotone fit of the points), "interpolated" (the points themselves, too few for either), "censored"
        (a grid bound) or "none" (no midpoint: nothing to measure)."""
        if self.method.startswith("logistic"):
            return "logistic"
        if self.method == "censored":
            return "censored" if math.isfinite(self.value) else "none"
        return {"interpolation": "interpolated"}.get(self.method, self.method)

    def to_dict(self) -> dict:
        """JSON-ready dict; NaN and infinities become None."""
        return {
            "value": _json_float(self.value),
            "ci95": None if self.ci95 is None else [_json_float(v) for v in self.ci95],
            "censored": self.censored,
            "method": self.method,
            "estimator": self.estimator,
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


@dataclass(frozen=True)
class Top:
    """What the top of a curve (its largest σ levels) shows about the curve's floor; see `top`.

    ``kind``: "chance" (at chance, or levelled off within noise or 5 % of (clean - chance) of it), "plateau"
    (levelled off clearly above chance, at ``level``) or "unsettled" (neither: still falling, or jagged, or too few
    levels to tell). ``level``: the pooled accuracy of the last levels (for "unsettled" and a top at chance within
    its noise, the accuracy at the largest σ).
    """

    kind: str
    level: float


def top(u, means, trials, *, clean: float, chance: float) -> Top:
    """Has the curve reached chance or levelled off at its largest σ? The criterion of the module docstring (4.):
    at chance, a plateau (flat above chance), or unsettled.

    ``u``: log10 σ ascending [L]; ``means``: mean accuracy per level [L]; ``trials``: the predictions behind each
    mean (samples × repeats) [L]. Accuracies are treated as binomial. Pure: the adaptive search stops extending σ
    by this, and the fit fits a free floor only on a "plateau".
    """
    u, means = np.asarray(u, dtype=float), np.asarray(means, dtype=float)
    trials = np.maximum(np.asarray(trials, dtype=float), 1.0)
    if means.size == 0:
        return Top("unsettled", math.nan)
    if means[-1] - chance <= _TOP_Z * _binomial_se(means[-1:], trials[-1:])[0]:
        return Top("chance", float(means[-1]))
    unsettled = Top("unsettled", float(means[-1]))
    spans = u[-1] - u[::-1]  # decades from the largest σ down to each level
    enough = np.nonzero((spans >= _TOP_DECADES - 1e-9) & (np.arange(u.size) >= _TOP_LEVELS - 1))[0]
    if enough.size == 0:
        return unsettled
    k = int(enough[0]) + 1  # the last k levels: at least _TOP_LEVELS, spanning at least _TOP_DECADES
    x, y, n = u[-k:], means[-k:], trials[-k:]
    pooled = float(np.sum(n * y) / np.sum(n))
    sd = _binomial_se(np.full(k, pooled), n)
    wt = 1.0 / sd**2
    xc = x - np.sum(wt * x) / np.sum(wt)
    slope = float(np.sum(wt * xc * y) / np.sum(wt * xc * xc))
    slope_se = float(1.0 / math.sqrt(np.sum(wt * xc * xc)))
    scatter = float(np.sum(((y - pooled) / sd) ** 2))
    if abs(slope) > _TOP_Z * slope_se or stats.chi2.sf(scatter, k - 1) < _TOP_SCATTER_P:
        return unsettled
    pooled_se = float(_binomial_se(np.array([pooled]), n.max(keepdims=True))[0])  # the levels share their samples
    if pooled - chance <= max(_TOP_Z * pooled_se, _PLATEAU_MIN_RISE * (clean - chance)):
        return Top("chance", pooled)
    return Top("plateau", pooled)


def _binomial_se(means: np.ndarray, trials: np.ndarray) -> np.ndarray:
    """Standard error of accuracies from `trials` predictions each (at least that of one success in `trials`)."""
    p = np.clip(means, 0.0, 1.0)
    return np.sqrt(np.maximum(p * (1 - p), 1.0 / trials) / trials)


def midpoint(sigmas, accuracy, *, clean: float, chance: float, samples=None,
             clean_samples: int | None = None) -> Midpoint:
    """Estimate σ50 from accuracies ``accuracy`` ([L] or [L, R] repeats) measured at noise levels ``sigmas`` [L].

    ``samples``: evaluation samples behind each accuracy, one number or one per level [L] (100 when unknown); with
    paired counts, the effective samples (`sweep.effective_samples`). It sets the binomial weights of the fit, the
    residual test and the binomial resampling of the bootstrap interval. ``clean_samples``: the samples behind
    ``clean``; with it, a clean accuracy whose binomial 95 % interval holds chance gives no midpoint (NaN). Never
    raises on bad data (too few points, NaNs, flat curves, clean <= chance); raises ValueError only if the shapes
    do not match. The result is a function of the inputs alone: the bootstrap is seeded from them.
    """
    u, acc, n = _clean_inputs(sigmas, accuracy, samples)
    if not (np.isfinite(clean) and np.isfinite(chance)) or clean <= chance:
        if u.size == 0:
            return _degenerate(math.nan, "no finite accuracy at any σ > 0")
        return _degenerate(float(10 ** u[-1]), f"clean accuracy {clean} is not above chance {chance}: no midpoint")
    if clean_samples is not None and at_chance(clean, chance, clean_samples):
        return _no_midpoint(clean, chance, clean_samples)
    if u.size == 0:
        return _degenerate(math.nan, "no finite accuracy at any σ > 0")
    sigma_max = float(10 ** u[-1])

    half = halfway(clean, chance)
    means = np.nanmean(acc, axis=1)
    if means[0] <= half:
        return Midpoint(float(10 ** u[0]), None, "below", "censored", True, {}, None,
                        "accuracy is already at or below the halfway line at the smallest σ > 0")
    if np.all(means >= half):
        return Midpoint(sigma_max, None, "above", "censored", True, {}, None,
                        "accuracy never falls below the halfway line inside the grid")

    if u.size < 3:
        return _interpolation(_interpolated_crossing(u, means, half),
                              f"only {u.size} σ levels: too few for a logistic fit")

    trials = n * np.isfinite(acc).sum(axis=1)
    shown = top(u, means, trials, clean=clean, chance=chance)
    unsettled = None if shown.kind != "unsettled" else (
        f"accuracy has neither reached chance nor levelled off by σ = {10 ** u[-1]:.3g} ({means[-1]:.3g} there, "
        f"chance {chance:.3g})")
    iso = _isotonic(means, trials)
    bracket = _evidence(u, iso, trials, half)
    fit = _choose_fit(u, acc, clean=clean, chance=chance, half=half, u_start=_interpolated_crossing(u, means, half),
                      samples=n, shown=shown)
    if not isinstance(fit, str) and (problem := _misfit(fit, u, means, acc, trials, bracket)):
        fit = problem if not fit.message else f"{fit.message}, but {problem}"
    result = _isotonic_midpoint(u, acc, n, half=half, clean=clean, chance=chance, reason=fit) \
        if isinstance(fit, str) else fit
    if unsettled is not None:
        if result.estimator == "logistic":
            unsettled += ": lower asymptote pinned at chance"
        message = "; ".join(part for part in (unsettled, result.message) if part)
        return replace(result, message=message, note=unsettled)
    return result


def at_chance(clean: float, chance: float, samples: int | None) -> bool:
    """Is a clean accuracy measured on `samples` samples within its binomial (Clopper-Pearson) 95 % interval of
    chance? Then nothing separates the model from guessing, and no σ50 means anything."""
    if samples is None or samples < 1 or not 0.0 <= chance <= 1.0:
        return False
    _, low, high = _clean_interval(clean, samples)
    return bool(low <= chance <= high)


def _clean_interval(clean: float, samples: int) -> tuple[int, float, float]:
    """(correct, low, high): the clean count and its Clopper-Pearson 95 % interval."""
    k = int(round(min(max(clean, 0.0), 1.0) * samples))
    ci = stats.binomtest(k, int(samples)).proportion_ci(0.95)
    return k, float(ci.low), float(ci.high)


def _no_midpoint(clean: float, chance: float, samples: int) -> Midpoint:
    k, low, high = _clean_interval(clean, samples)
    return Midpoint(math.nan, None, None, "censored", False, {}, None,
                    f"clean accuracy {clean:.3g} ({k} of {samples}, 95 % interval {low:.3g}-{high:.3g}) is within "
                    f"its interval of chance {chance:.3g}: no σ50")


# --- inputs -------------------------------------------------------------------------------------------------------

def _clean_inputs(sigmas, accuracy, samples=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """u = log10 σ sorted ascending, accuracy as [L, R] and samples per level [L], keeping only σ > 0 levels with
    some finite accuracy."""
    sigmas = np.asarray(sigmas, dtype=float).reshape(-1)
    acc = np.asarray(accuracy, dtype=float)
    if acc.ndim == 1:
        acc = acc[:, None]
    if acc.ndim != 2 or acc.shape[0] != sigmas.size:
        raise ValueError(f"accuracy shape {acc.shape} does not match {sigmas.size} σ levels")
    n = np.asarray(_DEFAULT_SAMPLES if samples is None else samples, dtype=float).reshape(-1)
    if n.size == 1:
        n = np.full(sigmas.size, n[0])
    if n.size != sigmas.size:
        raise ValueError(f"{n.size} sample counts do not match {sigmas.size} σ levels")
    n = np.where(np.isfinite(n) & (n >= 1), n, _DEFAULT_SAMPLES)
    keep = np.isfinite(sigmas) & (sigmas > 0) & np.isfinite(acc).any(axis=1)
    order = np.argsort(sigmas[keep], kind="stable")
    return np.log10(sigmas[keep][order]), acc[keep][order], n[keep][order]


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


def _choose_fit(u, acc, *, clean, chance, half, u_start, samples, shown: Top) -> Midpoint | str:
    """Fit the pinned-floor logistic and, when the top of the curve shows a plateau, the free-floor one; pick one,
    check it. A string says why no fit is usable."""
    rows, cols = np.nonzero(np.isfinite(acc))
    x, y = u[rows], acc[rows, cols]
    means = np.nanmean(acc, axis=1)
    weights = _binomial_sd(means, samples)[rows]
    span = clean - chance

    pinned = _fit(x, y, weights, lo=chance, hi0=clean, m0=u_start, u=u)
    chosen, note = pinned, None
    if shown.kind == "plateau":
        free = _fit(x, y, weights, lo=None, hi0=clean, m0=u_start, u=u, lo0=shown.level)
        found = f"({means[-1]:.3g} measured at σ = {10 ** u[-1]:.3g}): lower asymptote fitted"
        if free is not None and free.lo > means[-1]:  # never a floor above the data: set it at the data instead
            free = _fit(x, y, weights, lo=float(means[-1]), hi0=clean, m0=u_start, u=u)
            found = (f"as measured at σ = {10 ** u[-1]:.3g}: lower asymptote set there (a free fit put it "
                     "higher)")
        if free is not None and _is_plateau(pinned, free, n=x.size, chance=chance, span=span):
            chosen, note = free, f"curve levels off above chance at {free.lo:.3g} {found}"
    if chosen is None:
        return "logistic fit did not converge"
    if problem := _fit_problem(chosen, u, means, half=half, span=span):
        return problem if note is None else f"{note}, but {problem}"

    u_half = _crossing(chosen, half)[0]
    params = {"hi": chosen.hi, "lo": chosen.lo, "m": chosen.m, "w": chosen.w}
    method = "logistic" if chosen is pinned else "logistic-free-floor"
    ci, ci_method, ci_note = _interval(chosen, u_half, u, acc, samples, half=half, clean=clean, chance=chance)
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


def _interval(fit: _Fit, u_half: float, u: np.ndarray, acc: np.ndarray, samples: np.ndarray, *, half: float,
              clean: float, chance: float):
    """95% interval on σ50: a bootstrap percentile interval in log σ, or the grid step around the crossing for
    too-steep curves. Returns (ci95, ci_method, note)."""
    k = min(max(int(np.searchsorted(u, u_half)), 1), u.size - 1)
    if _TRANSITION_WIDTH * fit.w < u[k] - u[k - 1]:
        return ((float(10 ** u[k - 1]), float(10 ** u[k])), "grid-bracket",
                "curve steeper than the σ grid resolves: interval is the grid step around the crossing")
    seed = _data_seed(u, acc, samples, clean, chance)
    crossings = _bootstrap_crossings(fit, u, acc, samples, half=half, rng=np.random.default_rng(seed))
    if crossings.size < _BOOT_MIN_VALID * BOOTSTRAP:
        return None, None, "interval unavailable: most bootstrap refits do not cross the halfway line"
    lo, hi = np.quantile(crossings, [0.025, 0.975])
    lo, hi = min(float(lo), u_half), max(float(hi), u_half)
    if not hi - lo <= 2 * _MAX_CI_HALF_WIDTH:
        return None, None, "interval unavailable: the fit does not determine the curve's shape"
    return (float(10**lo), float(10**hi)), "bootstrap", None


def _data_seed(*parts) -> int:
    """A seed that is a function of the data alone, so that a report is reproducible."""
    h = hashlib.sha256()
    for part in parts:
        h.update(np.ascontiguousarray(np.asarray(part, dtype=np.float64)).tobytes())
        h.update(b"|")
    return int.from_bytes(h.digest()[:8], "little")


def _bootstrap_crossings(fit: _Fit, u, acc, samples, *, half: float, rng: np.random.Generator,
                         n_boot: int | None = None) -> np.ndarray:
    """The halfway crossings (u) of `n_boot` refits of `fit`'s model to resampled curves; failed refits dropped.

    Each replicate resamples the R repeats with replacement as whole curves (the same repeats at every level: one
    noise draw serves every σ of a repeat, so a repeat's errors are shared across its levels), then draws each
    point's count binomially from its accuracy and the level's samples. The refit starts from the fit itself.
    """
    n_boot = BOOTSTRAP if n_boot is None else n_boot
    levels, repeats = acc.shape
    means = np.nanmean(acc, axis=1)
    pick = rng.integers(0, repeats, size=(n_boot, repeats))
    scale = math.sqrt(repeats / (repeats - 1)) if repeats > 1 else 0.0  # undo the bootstrap's (R - 1)/R shrinkage
    y = means[None, :, None] + scale * (acc[:, pick].transpose(1, 0, 2) - means[None, :, None])  # [B, L, R]
    finite = np.isfinite(y)
    n = samples[None, :, None]
    y = rng.binomial(np.broadcast_to(n, y.shape).astype(np.int64), np.clip(np.nan_to_num(y), 0, 1)) / n
    sd = np.broadcast_to(_binomial_sd(means, samples)[None, :, None], y.shape)
    x = np.broadcast_to(u[None, :, None], y.shape).reshape(n_boot, -1)
    mask = finite.reshape(n_boot, -1)
    y, sd = y.reshape(n_boot, -1), sd.reshape(n_boot, -1)
    params = _lm_batch(np.broadcast_to(fit.params, (n_boot, fit.params.size)).copy(), x, y,
                       np.where(mask, 1.0 / sd, 0.0), lo=None if fit.free_floor else fit.lo)
    hi_, m, w = params[:, 0], params[:, -2], 10 ** params[:, -1]
    lo_ = params[:, 1] if fit.free_floor else np.full(n_boot, fit.lo)
    with np.errstate(all="ignore"):
        cross = m + w * (np.log(hi_ - half) - np.log(half - lo_))
    ok = np.isfinite(cross) & (lo_ < half) & (half < hi_)
    return cross[ok]


def _lm_batch(p: np.ndarray, x: np.ndarray, y: np.ndarray, wt: np.ndarray, *, lo: float | None,
              iterations: int = 30) -> np.ndarray:
    """Levenberg-Marquardt on a batch of weighted logistic fits at once: p [B, k] (hi, m, lw) or (hi, lo, m, lw),
    x, y, wt [B, N] (wt = 1/sd, 0 for missing points). Returns the fitted p; NaN rows where the fit broke down."""
    free = lo is None
    lam = np.full(p.shape[0], 1e-3)

    def residuals(q):
        hi_, m, lw = q[:, 0:1], q[:, -2:-1], q[:, -1:]
        lo_ = q[:, 1:2] if free else lo
        w = 10**lw
        s = special.expit(-(x - m) / w)
        r = (y - (lo_ + (hi_ - lo_) * s)) * wt
        return r, s, hi_, lo_, m, w

    r, s, hi_, lo_, m, w = residuals(p)
    cost = (r * r).sum(axis=1)
    eye = np.eye(p.shape[1])
    for _ in range(iterations):
        ds = s * (1 - s)
        cols = [s, 1 - s] if free else [s]
        cols += [(hi_ - lo_) * ds / w, (hi_ - lo_) * ds * (x - m) * math.log(10) / w]
        jac = np.stack(cols, axis=-1) * wt[..., None]  # d f / d p, weighted: [B, N, k]
        jac_t = jac.transpose(0, 2, 1)
        jtj = jac_t @ jac
        jtr = (jac_t @ r[..., None])[..., 0]
        damp = jtj + lam[:, None, None] * (jtj * eye + 1e-12 * eye)
        with np.errstate(all="ignore"):
            try:
                step = np.linalg.solve(damp, jtr[..., None])[..., 0]
            except np.linalg.LinAlgError:
                step = np.stack([np.linalg.lstsq(a, b, rcond=None)[0] for a, b in zip(damp, jtr)])
            trial = p + step
            r_t, s_t, hi_t, lo_t, m_t, w_t = residuals(trial)
            cost_t = (r_t * r_t).sum(axis=1)
        better = np.isfinite(cost_t) & (cost_t < cost)
        p = np.where(better[:, None], trial, p)
        r, s = np.where(better[:, None], r_t, r), np.where(better[:, None], s_t, s)
        hi_, m, w = (np.where(better[:, None], a, b) for a, b in ((hi_t, hi_), (m_t, m), (w_t, w)))
        if free:
            lo_ = np.where(better[:, None], lo_t, lo_)
        done = np.abs(cost - cost_t) <= 1e-9 * (1 + cost)
        cost = np.where(better, cost_t, cost)
        lam = np.where(better, lam / 3, lam * 4)
        if np.all(done | (lam > 1e8)):
            break
    return np.where(np.all(np.isfinite(p), axis=1, keepdims=True), p, np.nan)


def _fit(x, y, weights, *, lo, hi0, m0, u, lo0=None) -> _Fit | None:
    """Least-squares logistic fit; lo=None fits the lower asymptote too. None when the fit fails."""
    lw0 = math.log10(max((u[-1] - u[0]) / 10, 0.02))
    model: Callable[..., np.ndarray]
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


# --- the points themselves: residual test, monotone fit ------------------------------------------------------------

def _misfit(fit: Midpoint, u, means, acc, trials, bracket: tuple[int, int]) -> str | None:
    """Why a logistic estimate must not stand (its residuals exceed binomial noise, or its crossing leaves the
    bracket where the monotone fit of the points crosses the halfway line), or None.

    The test: χ² = Σ (mean - fitted)² / var over the levels, var the larger of the binomial variance of the fitted
    accuracy over the level's trials and the variance of the repeats' mean; the fit is rejected when
    P(χ²[levels - parameters] >= χ²) < RESIDUAL_P."""
    hi, lo, m, w = (fit.params[k] for k in ("hi", "lo", "m", "w"))
    fitted = logistic(u, hi, lo, m, w)
    var = _binomial_se(fitted, trials) ** 2
    repeats = np.isfinite(acc).sum(axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # one repeat: no spread
        spread = np.where(repeats > 1, np.nanvar(acc, axis=1, ddof=1) / np.maximum(repeats, 1), 0.0)
    chi2 = float(np.sum((means - fitted) ** 2 / np.maximum(var, spread)))
    dof = u.size - (4 if fit.method == "logistic-free-floor" else 3)
    if dof > 0 and (p := float(stats.chi2.sf(chi2, dof))) < RESIDUAL_P:
        return (f"the logistic leaves residuals beyond binomial noise (χ² {chi2:.3g} on {dof} degrees of freedom, "
                f"p = {p:.2g})")
    u_half = math.log10(fit.value)
    a, b = u[bracket[0]], u[bracket[1]]
    if not a - 1e-12 <= u_half <= b + 1e-12:
        return (f"the logistic crosses the halfway line at σ = {fit.value:.3g}, outside the levels around it that "
                f"are clearly on their side of the line ({10 ** a:.3g}-{10 ** b:.3g})")
    return None


def _evidence(u, curve, trials, half: float) -> tuple[int, int]:
    """The levels around the crossing of a non-increasing ``curve`` that are clearly on their side of ``half``: the
    last one before it more than BRACKET_Z binomial standard errors above, the first one after it as far below (the
    grid's ends when none is): a crossing outside them contradicts the points."""
    i, k = _bracket(u, curve, half)
    far = BRACKET_Z * _binomial_se(curve, trials)
    above = np.nonzero(curve[: i + 1] - half > far[: i + 1])[0]
    below = np.nonzero(half - curve[k:] > far[k:])[0]
    return (int(above[-1]) if above.size else 0), (k + int(below[0]) if below.size else u.size - 1)


def _isotonic(means: np.ndarray, trials: np.ndarray) -> np.ndarray:
    """The non-increasing fit of the level means, weighted by their trials (pool adjacent violators)."""
    means = np.asarray(means, dtype=float)
    return optimize.isotonic_regression(means, weights=np.maximum(np.asarray(trials, dtype=float), 1.0),
                                        increasing=False).x


def _bracket(u: np.ndarray, curve: np.ndarray, half: float) -> tuple[int, int]:
    """(k - 1, k): the levels around the first fall of a non-increasing ``curve`` below ``half`` (curve[0] > half >
    curve[-1] is assumed; a level exactly at ``half`` counts as above)."""
    k = max(int(np.argmax(curve < half)), 1)
    return k - 1, k


def _crossing_of(u: np.ndarray, curve: np.ndarray, half: float) -> float:
    """u where a non-increasing ``curve`` falls through ``half``, linear in log σ between its bracketing levels."""
    i, k = _bracket(u, curve, half)
    a, b = curve[i], curve[k]
    return float(u[i] + (a - half) / (a - b) * (u[k] - u[i])) if a > b else float(u[i])


def _isotonic_midpoint(u, acc, samples, *, half: float, clean: float, chance: float, reason: str) -> Midpoint:
    """σ50 from the monotone fit of the points, read with a monotone smooth interpolant (`_smooth_crossings`), with
    a bootstrap interval (the same resampling as the logistic's: repeats as whole curves, counts redrawn
    binomially, each replicate refitted monotonically and read the same way).

    The interval is the 2.5-97.5 % percentile of the replicates' crossings, widened on each side by the
    interpolation allowance: how far the straight line between the levels around the crossing reads it from the
    smooth interpolant (their disagreement is what the points leave open about the curve's shape between them).
    Where the grid does not resolve the fall (the step around the crossing holds more than UNRESOLVED of the
    curve's whole fall, so the curve may cross anywhere inside it), the interval instead holds the whole step:
    from the 2.5 % quantile of the replicates' lower levels to the 97.5 % quantile of their upper ones
    (``ci_method="grid-bracket"``)."""
    means = np.nanmean(acc, axis=1)
    trials = samples * np.isfinite(acc).sum(axis=1)
    iso = _isotonic(means, trials)
    u_half = float(_smooth_crossings(u, iso[None, :], half)[0])
    allowance = abs(u_half - _crossing_of(u, iso, half))
    rng = np.random.default_rng(_data_seed(u, acc, samples, clean, chance, 1))
    replicates = _resampled_means(u, acc, samples, rng)
    below, above = replicates[:, 0] <= half, replicates.min(axis=1) >= half  # crossing below / above the grid
    inside = ~(below | above)
    fits = np.stack([_isotonic(c, trials) for c in replicates[inside]]) if inside.any() else np.empty((0, u.size))
    message = f"{reason}: σ50 from the monotone (isotonic) fit of the points"
    steep = _unresolved(u, iso, half)
    lows, highs = np.full(len(replicates), -math.inf), np.full(len(replicates), math.inf)
    lows[above], highs[below] = u[-1], u[0]
    if steep:
        k = np.maximum(np.argmax(fits < half, axis=1), 1)
        lows[inside], highs[inside] = u[k - 1], u[k]
        # grid levels, not values between them (and no inf - inf where replicates leave the grid)
        lo = float(np.quantile(lows, 0.025, method="lower"))
        hi = float(np.quantile(highs, 0.975, method="higher"))
        message += "; the fall is steeper than the σ grid resolves: the interval holds the grid step"
    else:
        lows[inside] = highs[inside] = _smooth_crossings(u, fits, half)
        with np.errstate(invalid="ignore"):  # inf - inf where many replicates leave the grid: NaN, no interval
            lo = float(np.quantile(lows, 0.025)) - allowance
            hi = float(np.quantile(highs, 0.975)) + allowance
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return Midpoint(float(10**u_half), None, None, "isotonic", True, {}, None,
                        f"{message}; interval unavailable: resampled curves cross the halfway line outside the grid")
    ci = (float(10 ** min(lo, u_half)), float(10 ** max(hi, u_half)))
    return Midpoint(float(10**u_half), ci, None, "isotonic", True, {},
                    "grid-bracket" if steep else "bootstrap", message)


def _unresolved(u: np.ndarray, curve: np.ndarray, half: float) -> bool:
    """Does the grid step around the crossing of a non-increasing ``curve`` hold more than UNRESOLVED of its whole
    fall (then the points say little about where inside the step the curve crosses)?"""
    i, k = _bracket(u, curve, half)
    fall = curve[0] - curve[-1]
    return bool(fall > 0 and curve[i] - curve[k] > UNRESOLVED * fall)


def _smooth_crossings(u: np.ndarray, curves: np.ndarray, half: float) -> np.ndarray:
    """u where each non-increasing curve of ``curves`` [B, L] (each with curve[0] > half > its minimum) falls
    through ``half``, read on the monotone piecewise-cubic interpolant of its points in log σ
    (``scipy.interpolate.PchipInterpolator``: it keeps a monotone curve monotone, and follows the curvature the
    neighbouring levels show where a straight line between two levels cannot)."""
    k = np.maximum(np.argmax(curves < half, axis=1), 1)  # the first level below the line: the crossing is in k-1..k
    rows = np.arange(curves.shape[0])
    coef = interpolate.PchipInterpolator(u, curves.T, axis=0).c[:, k - 1, rows]  # [4, B]: the cubic of that step
    lo, hi = np.zeros(rows.size), u[k] - u[k - 1]
    for _ in range(40):  # bisection on each cubic at once: monotone on the step, so the root is unique
        mid = (lo + hi) / 2
        value = ((coef[0] * mid + coef[1]) * mid + coef[2]) * mid + coef[3]
        lo, hi = np.where(value >= half, mid, lo), np.where(value >= half, hi, mid)
    return u[k - 1] + (lo + hi) / 2


def _resampled_means(u, acc, samples, rng: np.random.Generator, n_boot: int | None = None) -> np.ndarray:
    """[n_boot, L] level means of bootstrap replicates: the repeats resampled as whole curves (deviations scaled by
    sqrt(R/(R-1))), each point's count redrawn binomially from its accuracy and the level's samples."""
    n_boot = BOOTSTRAP if n_boot is None else n_boot
    levels, repeats = acc.shape
    means = np.nanmean(acc, axis=1)
    pick = rng.integers(0, repeats, size=(n_boot, repeats))
    scale = math.sqrt(repeats / (repeats - 1)) if repeats > 1 else 0.0
    y = means[None, :, None] + scale * (acc[:, pick].transpose(1, 0, 2) - means[None, :, None])  # [B, L, R]
    finite = np.isfinite(y)
    n = np.maximum(np.round(samples), 1).astype(np.int64)[None, :, None]
    y = rng.binomial(np.broadcast_to(n, y.shape), np.clip(np.nan_to_num(y), 0, 1)) / n
    return np.where(finite, y, 0.0).sum(axis=2) / np.maximum(finite.sum(axis=2), 1)


# --- fallbacks ----------------------------------------------------------------------------------------------------

def _interpolated_crossing(u: np.ndarray, means: np.ndarray, half: float) -> float:
    """u of the first downward crossing of ``half``, linear in log σ (requires means[0] > half > some mean)."""
    k = int(np.argmax(means < half))
    a, b = means[k - 1], means[k]
    return float(u[k - 1] + (a - half) / (a - b) * (u[k] - u[k - 1]))


def _interpolation(u_half: float, reason: str, note: str | None = None) -> Midpoint:
    return Midpoint(float(10**u_half), None, None, "interpolation", False, {}, None,
                    f"{reason}; σ50 interpolated at the first crossing of the halfway line", note)


def _degenerate(value: float, reason: str) -> Midpoint:
    return Midpoint(value, None, "above", "censored", False, {}, None, reason)


def _json_float(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class Tolerance:
    """The σ at which a site's accuracy has fallen by `drop` (points of accuracy) from clean: its value (the grid's
    bound when censored), a 95 % interval and the censoring ("below": already that low at the smallest σ tested,
    "above": never that low in the grid)."""

    drop: float
    sigma: float | None
    ci95: tuple[float, float] | None
    censored: str | None

    def to_dict(self) -> dict:
        return {"drop": self.drop, "sigma": _json_float(self.sigma) if self.sigma is not None else None,
                "ci95": list(self.ci95) if self.ci95 else None, "censored": self.censored}


def tolerance(sigmas, accuracy, *, clean: float, drop: float, samples=None) -> Tolerance:
    """The σ where the mean accuracy first falls to clean − `drop`, interpolated in log σ on the curve made
    non-increasing (running minimum), with a bootstrap interval (repeats resampled as whole curves, counts redrawn
    binomially, as for σ50). No fit: near the top the curve's shape is the data's, not a logistic's."""
    u, acc, samples = _clean_inputs(sigmas, accuracy, samples)
    target = clean - drop
    means = np.nanmean(acc, axis=1)
    value, censored = _first_fall(u, means, target)
    if censored:
        return Tolerance(drop, float(10**value), None, censored)
    rng = np.random.default_rng(_data_seed(u, acc, samples, clean, drop))
    levels, repeats = acc.shape
    pick = rng.integers(0, repeats, size=(BOOTSTRAP, repeats))
    scale = math.sqrt(repeats / (repeats - 1)) if repeats > 1 else 0.0
    y = means[None, :, None] + scale * (acc[:, pick].transpose(1, 0, 2) - means[None, :, None])  # [B, L, R]
    n = samples[None, :, None]
    y = rng.binomial(np.broadcast_to(n, y.shape).astype(np.int64), np.clip(np.nan_to_num(y), 0, 1)) / n
    falls = [_first_fall(u, curve, target) for curve in y.mean(axis=2)]
    crossed = np.array([v for v, c in falls if c is None])
    ci = None
    if crossed.size >= _BOOT_MIN_VALID * BOOTSTRAP:
        lo, hi = np.quantile(crossed, [0.025, 0.975])
        ci = (float(10 ** min(lo, value)), float(10 ** max(hi, value)))
    return Tolerance(drop, float(10**value), ci, None)


def _first_fall(u: np.ndarray, means: np.ndarray, target: float) -> tuple[float, str | None]:
    """(log σ, censoring) of the first fall of the running minimum of `means` to `target`."""
    envelope = np.minimum.accumulate(means)
    below = np.nonzero(envelope <= target)[0]
    if below.size == 0:
        return float(u[-1]), "above"
    k = int(below[0])
    if k == 0:
        return float(u[0]), "below"
    a, b = envelope[k - 1], envelope[k]
    return float(u[k - 1] + (u[k] - u[k - 1]) * (a - target) / (a - b)), None
