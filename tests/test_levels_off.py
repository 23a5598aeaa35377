"""Curves that level off above chance, and curves that only look as if they do (pure: no onnxruntime).

`fit.top` says whether the top of a curve is at chance, a plateau, or unsettled; the adaptive search extends σ until
it is not unsettled, and the fit fits a free floor only on a plateau. Noisy curves are binomial draws from
numpy's default_rng with the seed given in each test (checked locally over 20–40 seeds: the tolerances stated hold
with margin); the other curves are exact expected accuracies.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from walkaudit._analysis import fit, sweep
from walkaudit._units import Counts

PER_BLOCK = 100  # samples per block of the stand-in data set
REPEATS = 3


def noisy(curve, seed):
    """Serve a search's requests with binomial draws (every repeat, every level) from `curve`(log10 σ)."""
    rng = np.random.default_rng(seed)

    def serve(request):
        p = curve(np.log10(np.array(request.sigmas)))
        samples = PER_BLOCK * request.block_count
        correct = rng.binomial(samples, np.repeat(p[:, None], REPEATS, axis=1)).astype(np.int64)
        return Counts(request.sigmas, correct, np.zeros_like(correct), samples)

    return serve


def search(curve, seed, *, clean, chance, n_blocks, plan=sweep.Plan()):  # noqa: B008 (Plan is frozen)
    """Run the adaptive search on a noisy curve; (σ, accuracy [L, R], samples [L], fit.midpoint of them)."""
    curve_ = sweep.drive(sweep.adaptive(fit.halfway(clean, chance), plan, 1.0, n_blocks, clean), noisy(curve, seed))
    sig, levels = curve_.sorted()
    acc = np.stack([sweep.accuracy(lv) for lv in levels])
    samples = np.array([lv.samples for lv in levels])
    return sig, acc, samples, fit.midpoint(sig, acc, clean=clean, chance=chance, samples=samples)


def shown(sig, acc, samples, *, clean, chance):
    return fit.top(np.log10(sig), acc.mean(axis=1), samples * acc.shape[1], clean=clean, chance=chance)


# --- the criterion ------------------------------------------------------------------------------------------------

U = np.arange(-1.0, 2.01, 0.5)  # 2 levels a decade, 10^-1 ... 10^2
N = np.full(U.size, 3000.0)  # predictions behind each mean


@pytest.mark.parametrize("floor, kind", [(0.1, "chance"), (0.5, "plateau"), (0.12, "chance")])
def test_top_of_a_curve_that_has_settled(floor, kind):
    """Exact means: at chance, a plateau at 0.5 (chance 0.1), and a floor 0.02 above chance (< 5 % of clean -
    chance: counted as chance, not as a plateau)."""
    means = fit.logistic(U, 0.95, floor, -0.5, 0.1)
    result = fit.top(U, means, N, clean=0.95, chance=0.1)
    assert result.kind == kind
    assert result.level == pytest.approx(floor, abs=1e-3)


def test_top_of_a_curve_still_falling_is_unsettled():
    """Still falling 0.03 per decade at 3000 predictions a level (the slope is 3.3 standard errors from 0)."""
    means = 0.5 - 0.03 * U
    assert fit.top(U, means, N, clean=0.95, chance=0.1).kind == "unsettled"
    # the same fall measured on 100 predictions a level is within the noise: flat
    assert fit.top(U, means, np.full(U.size, 100.0), clean=0.95, chance=0.1).kind == "plateau"


def test_top_needs_three_levels_over_a_decade():
    means = np.full(U.size, 0.5)
    assert fit.top(U, means, N, clean=0.95, chance=0.1).kind == "plateau"
    assert fit.top(U[-2:], means[-2:], N[-2:], clean=0.95, chance=0.1).kind == "unsettled"  # two levels
    dense = np.array([1.5, 1.75, 2.0])  # three levels, half a decade
    assert fit.top(dense, np.full(3, 0.5), np.full(3, 3000.0), clean=0.95, chance=0.1).kind == "unsettled"


def test_top_that_scatters_beyond_its_noise_is_unsettled():
    means = np.array([0.95, 0.9, 0.6, 0.5, 0.3, 0.5, 0.3])  # no trend at the top, but jagged
    assert fit.top(U, means, N, clean=0.95, chance=0.1).kind == "unsettled"


# --- the fit ------------------------------------------------------------------------------------------------------

def test_a_curve_still_falling_gets_no_free_floor():
    """A binary classifier whose logits fall steeply, then keep falling slowly (15 % of the samples are robust):
    the free-floor logistic would say "levels off at 0.547" with 0.530 measured at σ = 100 and falling."""
    u = np.arange(-1.0, 2.01, 0.25)
    means = 0.5 + 0.4 * (0.85 * fit.logistic(u, 1, 0, 0.0, 0.15) + 0.15 * fit.logistic(u, 1, 0, 2.0, 0.4))
    acc = np.repeat(means[:, None], 3, axis=1)
    result = fit.midpoint(10**u, acc, clean=0.9, chance=0.5, samples=2000)
    assert result.method != "logistic-free-floor" and "levels off" not in result.message
    assert result.params.get("lo", 0.5) == 0.5
    assert result.note and "neither reached chance nor levelled off by σ = 100" in result.note
    assert result.note in result.message
    assert 10 ** u[4] < result.value < 10 ** u[5]  # still reported: the crossing is between 0.730 and 0.613


def test_the_floor_is_never_above_the_accuracy_at_the_largest_sigma():
    """A plateau reached slowly (15 % of the samples hold out half a decade longer): flat within the noise of 300
    samples a level, so a plateau, but a free logistic (symmetric in log σ) puts its floor above the last points.
    The floor is set at the accuracy measured at the largest σ instead."""
    u = np.arange(-1.0, 2.01, 0.25)
    means = 0.3 + 0.65 * (0.85 * fit.logistic(u, 1, 0, 0.0, 0.15) + 0.15 * fit.logistic(u, 1, 0, 0.5, 0.3))
    assert fit.top(u, means, np.full(u.size, 900.0), clean=0.95, chance=0.1).kind == "plateau"
    result = fit.midpoint(10**u, np.repeat(means[:, None], 3, axis=1), clean=0.95, chance=0.1, samples=300)
    assert result.method == "logistic-free-floor"
    assert result.params["lo"] == pytest.approx(means[-1], abs=1e-12)
    assert "set there (a free fit put it higher)" in result.message


# --- the search ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_search_follows_a_slow_curve_down_to_chance(seed):
    """Logistic with width 0.6 decades (σ50 = 1, clean 0.98, chance 0.1): the halfway line is crossed inside the
    coarse grid, but accuracy is still 0.23 at its top (σ = 10) and reaches chance only at σ ≈ 10^3. The search
    goes on until its top is at chance, the fit keeps the floor at chance, and σ50 is within 0.01 decades of the
    truth (16,000 samples; over seeds 0-39 the largest error was 0.0071)."""
    curve = lambda u: fit.logistic(u, 0.98, 0.1, 0.0, 0.6)  # noqa: E731
    sig, acc, samples, mid = search(curve, seed, clean=0.98, chance=0.1, n_blocks=160)
    assert sig.max() >= 10**3 - 1e-9
    assert shown(sig, acc, samples, clean=0.98, chance=0.1).kind == "chance"
    assert mid.method == "logistic" and mid.params["lo"] == 0.1 and mid.note is None
    assert abs(math.log10(mid.value)) < 0.01


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_search_finds_a_true_plateau_and_the_fit_frees_the_floor(seed):
    """Plateau at 0.5 with chance 0.1 (halfway line 0.54): accuracy is at 0.50 from σ ≈ 10; the search looks a
    decade past it to see it flat, and the free floor lands within 0.02 of 0.5 (never above the accuracy at the
    largest σ), σ50 within 0.03 decades of 0.15·ln 11 (4,000 samples; over seeds 0-99 every curve got a free floor,
    and the largest errors were 0.011 and 0.023)."""
    curve = lambda u: fit.logistic(u, 0.98, 0.5, 0.0, 0.15)  # noqa: E731
    sig, acc, samples, mid = search(curve, seed, clean=0.98, chance=0.1, n_blocks=40)
    assert shown(sig, acc, samples, clean=0.98, chance=0.1).kind == "plateau"
    assert "levels off" in mid.message and abs(math.log10(mid.value) - 0.15 * math.log(11)) < 0.03
    if mid.estimator == "logistic":  # else its residuals failed the test (at its 5 % level): the isotonic fit stands
        assert mid.method == "logistic-free-floor"
        assert mid.params["lo"] == pytest.approx(0.5, abs=0.02) and mid.params["lo"] <= acc[-1].mean()


def test_search_adds_nothing_when_the_coarse_grid_already_reaches_chance():
    """σ50 = 0.1, width 0.15: at chance by σ = 10, the coarse grid's top; no level above it is asked for."""
    curve = lambda u: fit.logistic(u, 0.98, 0.1, -1.0, 0.15)  # noqa: E731
    sig, *_ = search(curve, 0, clean=0.98, chance=0.1, n_blocks=40)
    assert sig.max() == pytest.approx(10 ** sweep.Plan().stop)


def test_search_goes_on_when_the_remaining_blocks_lift_the_top_above_the_halfway_line():
    """The head (every 4th block) falls to 0.50, the other blocks to 0.60: all the data never cross the halfway
    line 0.54. The head alone says the top (σ = 10) is below it; once the other blocks are in, the search goes on
    up to its bound instead of stopping at a top that is above the line."""
    n_blocks = 8
    head = {b for r in sweep.spread(n_blocks, sweep.Plan().head) for b in r}

    def serve(request):
        p = np.zeros(len(request.sigmas))
        for r in request.blocks:
            for b in r:
                p = p + fit.logistic(np.log10(np.array(request.sigmas)), 0.98, 0.5 if b in head else 0.6, 0.0, 0.1)
        correct = np.round(np.repeat(p[:, None], REPEATS, axis=1) * PER_BLOCK).astype(np.int64)
        return Counts(request.sigmas, correct, np.zeros_like(correct), PER_BLOCK * request.block_count)

    plan = sweep.Plan()
    curve = sweep.drive(sweep.adaptive(0.54, plan, 1.0, n_blocks, 0.98), serve)
    assert max(curve.levels) == pytest.approx(10**plan.highest)
    assert curve.mean(max(curve.levels)) > 0.54
    assert all(lv.samples <= n_blocks * PER_BLOCK for lv in curve.levels.values())  # no block counted twice
