"""Tests for walkaudit._analysis.fit: σ50 from synthetic accuracy-vs-σ curves.

Synthetic curves are drawn with numpy's default_rng and a fixed seed given in each test, with binomial sampling of
the accuracy at `SAMPLES` samples per point; recovery tolerance is 0.05 decades of σ unless a test says otherwise.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import optimize

from walkaudit._analysis.fit import Midpoint, halfway, logistic, midpoint

SAMPLES = 1000
TOL_DECADES = 0.05
GRID = 10 ** np.arange(-2.0, 3.01, 0.25)  # 4 points a decade, 1e-2 ... 1e3


def sample_curve(seed, *, sigma50, width, clean=0.95, chance=0.1, floor=None, repeats=3, sigmas=GRID):
    """Binomially sampled accuracies [L, R] of a logistic in log10 σ with midpoint parameter log10(sigma50)."""
    rng = np.random.default_rng(seed)
    lo = chance if floor is None else floor
    p = logistic(np.log10(sigmas), clean, lo, math.log10(sigma50), width)
    return rng.binomial(SAMPLES, np.repeat(p[:, None], repeats, axis=1)) / SAMPLES


def decades(a, b):
    return abs(math.log10(a) - math.log10(b))


def test_logistic_and_halfway():
    assert halfway(1.0, 0.1) == pytest.approx(0.55)
    assert logistic(0.5, 0.9, 0.1, 0.5, 0.2) == pytest.approx(0.5)
    assert logistic(10.0, 0.9, 0.1, 0.5, 0.2) == pytest.approx(0.1)
    assert logistic(-10.0, 0.9, 0.1, 0.5, 0.2) == pytest.approx(0.9)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("width", [0.1, 0.3, 0.6])
@pytest.mark.parametrize("sigma50", [0.05, 1.0, 40.0])
def test_recovers_known_midpoint(seed, width, sigma50):
    acc = sample_curve(seed, sigma50=sigma50, width=width)
    result = midpoint(GRID, acc, clean=0.95, chance=0.1, samples=SAMPLES)
    assert result.ok and result.censored is None
    assert decades(result.value, sigma50) < TOL_DECADES
    if result.estimator == "logistic":
        assert result.method == "logistic" and result.params["lo"] == 0.1  # pinned at chance
        assert result.params["w"] == pytest.approx(width, rel=0.3)
    else:  # the residual test rejects a true logistic at its level (5 %): the monotone fit stands in
        assert result.estimator == "isotonic" and "residuals beyond binomial noise" in result.message


def test_ci95_covers_truth_and_is_ordered():
    """40 curves (seeds 100..139, random σ50 and width): every interval ordered, >= 85 % contain the truth.

    The interval is a bootstrap over repeats and samples (it was the fit covariance, too narrow on real data: see
    tests/test_intervals.py), and reproducible: the same data give the same interval."""
    covered = 0
    for seed in range(100, 140):
        rng = np.random.default_rng(seed)
        sigma50, width = 10 ** rng.uniform(-1, 2), 10 ** rng.uniform(-1, -0.3)
        result = midpoint(GRID, sample_curve(seed, sigma50=sigma50, width=width), clean=0.95, chance=0.1,
                          samples=SAMPLES)
        assert result.ci_method == "bootstrap"
        lo, hi = result.ci95
        assert lo <= result.value <= hi
        assert decades(lo, hi) < 0.2  # well-sampled: a tight interval
        covered += lo <= sigma50 <= hi
    assert covered >= 34
    again = midpoint(GRID, sample_curve(139, sigma50=sigma50, width=width), clean=0.95, chance=0.1, samples=SAMPLES)
    assert again.ci95 == result.ci95


def test_censored_above_reports_grid_maximum():
    acc = sample_curve(3, sigma50=1e4, width=0.2)  # the drop starts beyond the grid's 1e3
    result = midpoint(GRID, acc, clean=0.95, chance=0.1)
    assert (result.censored, result.method, result.value, result.ci95) == ("above", "censored", GRID[-1], None)
    assert result.ok


def test_censored_below_reports_smallest_positive_sigma():
    acc = sample_curve(4, sigma50=1e-3, width=0.2)  # already at chance at the grid's 1e-2
    sigmas = np.concatenate([[0.0], GRID])  # the clean σ = 0 point is not the lower bound
    acc = np.vstack([np.full((1, 3), 0.95), acc])
    result = midpoint(sigmas, acc, clean=0.95, chance=0.1)
    assert (result.censored, result.method, result.value, result.ci95) == ("below", "censored", GRID[0], None)


def test_plateau_above_chance_uses_free_floor():
    """10 classes, clean 1.0, floor 0.45 (halfway 0.55): the crossing lies at m + w*ln(4.5), not at m."""
    m, width, floor = 0.0, 0.3, 0.45
    true_sigma50 = 10 ** (m + width * math.log((1.0 - floor) / (0.55 - floor) - 1))
    assert decades(true_sigma50, 10**m) > 0.4  # reporting the curve's m would fail this test
    for seed in (5, 6, 7):
        acc = sample_curve(seed, sigma50=10**m, width=width, clean=1.0, floor=floor)
        result = midpoint(GRID, acc, clean=1.0, chance=0.1, samples=SAMPLES)
        assert result.method == "logistic-free-floor" and result.ok
        assert "levels off" in result.message
        assert result.params["lo"] == pytest.approx(floor, abs=0.02)
        assert decades(result.value, true_sigma50) < TOL_DECADES
        assert result.ci95[0] <= result.value <= result.ci95[1]


def test_curve_reaching_chance_keeps_pinned_floor():
    acc = sample_curve(8, sigma50=1.0, width=0.3)
    assert midpoint(GRID, acc, clean=0.95, chance=0.1).method == "logistic"


def test_jagged_curve_falls_back_to_the_monotone_fit():
    """A curve no logistic follows: σ50 comes from the isotonic fit of the points, with a bootstrap interval that
    holds the grid step where that fit crosses the halfway line."""
    sigmas = 10 ** np.arange(-2.0, 1.01, 0.25)
    acc = np.array([0.95, 0.9, 0.3, 0.92, 0.2, 0.9, 0.15, 0.85, 0.1, 0.8, 0.1, 0.75, 0.1])
    result = midpoint(sigmas, acc, clean=0.95, chance=0.1)
    assert result.method == "isotonic" and result.estimator == "isotonic" and result.ok
    assert "poor" in result.message and "isotonic" in result.message
    iso = optimize.isotonic_regression(acc, increasing=False).x  # equal weights: one repeat of 100 samples each
    k = int(np.argmax(iso < 0.525))
    expected_u = np.log10(sigmas[k - 1]) + (iso[k - 1] - 0.525) / (iso[k - 1] - iso[k]) * 0.25
    assert math.log10(result.value) == pytest.approx(expected_u, abs=1e-9)
    assert result.ci95[0] <= sigmas[k - 1] and result.ci95[1] >= sigmas[k] and result.params == {}


def test_two_points_interpolate():
    result = midpoint([1.0, 0.1], [0.2, 0.9], clean=0.95, chance=0.1)  # unsorted on purpose
    assert result.method == "interpolation" and not result.ok
    assert "too few" in result.message
    assert math.log10(result.value) == pytest.approx(-1 + (0.9 - 0.525) / 0.7, abs=1e-9)


def test_steep_curve_gets_grid_bracket():
    acc = sample_curve(9, sigma50=10**0.6, width=0.01)  # falls within one grid step (0.5 -> 0.75)
    result = midpoint(GRID, acc, clean=0.95, chance=0.1)
    assert result.method == "logistic" and result.ci_method == "grid-bracket"
    assert result.ci95 == pytest.approx((10**0.5, 10**0.75))
    assert result.ci95[0] <= result.value <= result.ci95[1]


def test_zero_sigma_ignored_and_order_irrelevant():
    acc = sample_curve(10, sigma50=2.0, width=0.25)
    base = midpoint(GRID, acc, clean=0.95, chance=0.1)
    sigmas = np.concatenate([[0.0], GRID])
    with_zero = midpoint(sigmas, np.vstack([np.zeros((1, 3)), acc]), clean=0.95, chance=0.1)  # absurd σ=0 row
    perm = np.random.default_rng(10).permutation(GRID.size)
    shuffled = midpoint(GRID[perm], acc[perm], clean=0.95, chance=0.1)
    assert with_zero.value == pytest.approx(base.value, rel=1e-9)
    assert shuffled.value == pytest.approx(base.value, rel=1e-6)
    assert decades(base.value, 2.0) < TOL_DECADES


def test_mean_and_repeat_inputs_both_work():
    acc = sample_curve(11, sigma50=0.3, width=0.2)
    from_repeats = midpoint(GRID, acc, clean=0.95, chance=0.1)
    from_means = midpoint(GRID, acc.mean(axis=1), clean=0.95, chance=0.1)
    for result in (from_repeats, from_means):
        assert result.method == "logistic"
        assert decades(result.value, 0.3) < TOL_DECADES
    assert decades(from_repeats.value, from_means.value) < 0.01


def test_nan_accuracies_are_dropped():
    acc = sample_curve(12, sigma50=5.0, width=0.3)
    acc[3, 1] = np.nan
    acc[10, :] = np.nan  # a whole level lost
    result = midpoint(GRID, acc, clean=0.95, chance=0.1)
    assert result.method == "logistic" and decades(result.value, 5.0) < TOL_DECADES


@pytest.mark.parametrize(
    ("sigmas", "acc", "clean", "censored", "value", "ok"),
    [
        (GRID, np.full(GRID.size, 0.9), 0.95, "above", GRID[-1], True),  # flat, above halfway
        (GRID, np.full(GRID.size, 0.1), 0.95, "below", GRID[0], True),  # flat at chance
        ([0.5], [0.9], 0.95, "above", 0.5, True),  # one point
        (GRID, np.linspace(0.9, 0.1, GRID.size), 0.1, "above", GRID[-1], False),  # clean == chance
        (GRID, np.linspace(0.9, 0.1, GRID.size), 0.05, "above", GRID[-1], False),  # clean < chance
        (GRID, np.full(GRID.size, np.nan), 0.95, "above", math.nan, False),  # nothing usable
        ([0.0, 0.0], [0.9, 0.8], 0.95, "above", math.nan, False),  # only σ = 0
        ([], [], 0.95, "above", math.nan, False),
    ],
)
def test_degenerate_inputs_do_not_raise(sigmas, acc, clean, censored, value, ok):
    result = midpoint(sigmas, acc, clean=clean, chance=0.1)
    assert isinstance(result, Midpoint)
    assert result.censored == censored and result.method == "censored" and result.ok == ok
    assert result.value == value or (math.isnan(value) and math.isnan(result.value))
    assert result.message
    json.dumps(result.to_dict(), allow_nan=False)


def test_to_dict_is_json_ready():
    result = midpoint(GRID, sample_curve(13, sigma50=1.0, width=0.3), clean=0.95, chance=0.1)
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert set(data) == {"value", "ci95", "censored", "method", "estimator", "ok", "params", "ci_method",
                         "message"}
    assert data["value"] == pytest.approx(result.value) and data["ci95"] == pytest.approx(list(result.ci95))
    assert set(data["params"]) == {"hi", "lo", "m", "w"}


def test_shape_mismatch_is_a_programming_error():
    with pytest.raises(ValueError):
        midpoint([0.1, 1.0, 10.0], [0.9, 0.5], clean=0.95, chance=0.1)
