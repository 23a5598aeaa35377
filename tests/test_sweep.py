"""The σ search without onnxruntime: a synthetic logistic curve stands in for the model."""

from __future__ import annotations

import numpy as np
import pytest

from walkaudit import fit, sweep
from walkaudit.errors import UsageError


def synthetic(sigma50: float, width: float = 0.15, clean: float = 0.98, chance: float = 0.1, floor=None):
    lo = chance if floor is None else floor
    calls = []

    def evaluate(sigmas):
        calls.append(np.array(sigmas))
        u = np.log10(sigmas)
        acc = fit.logistic(u, clean, lo, np.log10(sigma50), width)
        acc = np.repeat(acc[:, None], 2, axis=1)
        return acc, np.zeros_like(acc, dtype=int)

    return evaluate, calls


@pytest.mark.parametrize("sigma50", [3e-3, 0.2, 7.0, 300.0])
def test_adaptive_brackets_and_refines_the_crossing(sigma50):
    evaluate, calls = synthetic(sigma50)
    half = fit.halfway(0.98, 0.1)
    curve = sweep.adaptive(evaluate, half, sweep.Plan(), scale=1.0)
    sig, acc, _ = curve.sorted()
    means = acc.mean(axis=1)
    # the crossing is inside the grid and at least the refine points sit inside the bracket
    assert means[0] > half > means[-1]
    below = sig[np.argmax(means <= half)]
    above = sig[np.argmax(means <= half) - 1]
    assert above < sigma50 < below
    assert np.log10(below / above) <= 0.5 / (sweep.Plan().refine + 1) + 1e-9
    # the fit on the adaptive points recovers the truth (noise-free curve: 0.02 decades)
    mid = fit.midpoint(sig, acc, clean=0.98, chance=0.1, samples=1000)
    assert abs(np.log10(mid.value / sigma50)) < 0.02


def test_adaptive_scales_the_start_to_the_site():
    evaluate, calls = synthetic(50.0)
    sweep.adaptive(evaluate, 0.54, sweep.Plan(), scale=20.0)
    assert calls[0][0] == pytest.approx(20.0 * 1e-2)  # first coarse level = scale · 10^start


def test_adaptive_stops_at_the_bound_when_the_site_never_falls():
    evaluate, calls = synthetic(1e9)
    plan = sweep.Plan()
    curve = sweep.adaptive(evaluate, 0.54, plan, scale=1.0)
    sig, _, _ = curve.sorted()
    assert sig.max() == pytest.approx(10**plan.highest)
    mid = fit.midpoint(*curve.sorted()[:2], clean=0.98, chance=0.1)
    assert mid.censored == "above" and mid.value == pytest.approx(10**plan.highest)


def test_adaptive_plateau_above_half_extends_to_the_bound_then_stops():
    evaluate, _ = synthetic(1.0, floor=0.6)  # levels off above the halfway line 0.54
    curve = sweep.adaptive(evaluate, 0.54, sweep.Plan(highest=3.0), scale=1.0)
    assert max(curve.accuracy) == pytest.approx(1e3)


def test_adaptive_extends_down_when_already_below_half():
    evaluate, _ = synthetic(1e-4)
    curve = sweep.adaptive(evaluate, 0.54, sweep.Plan(), scale=1.0)
    sig, acc, _ = curve.sorted()
    assert sig.min() < 1e-4 < sig.max()
    assert acc.mean(axis=1)[0] > 0.54


def test_fixed_grid_evaluates_exactly_the_grid_once():
    evaluate, calls = synthetic(1.0)
    curve = sweep.fixed(evaluate, (0.1, 1.0, 10.0))
    assert len(calls) == 1 and sorted(curve.accuracy) == [0.1, 1.0, 10.0]


@pytest.mark.parametrize("text, expected", [
    ("0.01,0.1,1", (0.01, 0.1, 1.0)),
    ("1,0.1", (0.1, 1.0)),
    ("1e-3:1e2:6", (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)),
])
def test_parse_sigmas(text, expected):
    assert sweep.parse_sigmas(text) == pytest.approx(expected)


@pytest.mark.parametrize("text, phrase", [
    ("", "empty"), ("-1,2", "non-negative"), ("0", "above 0"), ("a,b", "expected a list"),
    ("1:0.1:5", "0 < start < stop"), ("nan", "finite"),
])
def test_parse_sigmas_refuses_bad_grids(text, phrase):
    with pytest.raises(UsageError, match=phrase):
        sweep.parse_sigmas(text)
