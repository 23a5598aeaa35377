"""The σ search without onnxruntime: a synthetic logistic curve stands in for the model."""

from __future__ import annotations

import numpy as np
import pytest

from walkaudit._analysis import fit, sweep
from walkaudit._units import Counts
from walkaudit.config import parse_sigmas
from walkaudit.errors import UsageError

BATCH = 100  # samples per block of the stand-in data set


def serve(evaluate):
    """Answer a search's requests with a stand-in evaluate(sigmas, blocks) -> (correct, nonfinite, samples)."""
    return lambda request: Counts(request.sigmas, *evaluate(np.array(request.sigmas), request.blocks))


def adaptive(evaluate, half, plan, scale, n_batches=1, clean=1.0):
    return sweep.drive(sweep.adaptive(half, plan, scale, n_batches, clean), serve(evaluate))


def fixed(evaluate, sigmas, n_batches):
    return sweep.drive(sweep.fixed(sigmas, n_batches), serve(evaluate))


def synthetic(sigma50: float, width: float = 0.15, clean: float = 0.98, chance: float = 0.1, floor=None):
    """A noise-free model: every batch has exactly the expected accuracy (2 repeats)."""
    lo = chance if floor is None else floor
    calls = []

    def evaluate(sigmas, batches):
        calls.append((np.array(sigmas), batches))
        acc = fit.logistic(np.log10(sigmas), clean, lo, np.log10(sigma50), width)
        samples = BATCH * sum(len(r) for r in batches)
        correct = np.repeat(np.round(acc * samples)[:, None], 2, axis=1).astype(np.int64)
        return correct, np.zeros_like(correct), samples

    return evaluate, calls


def accuracy(curve):
    sig, levels = curve.sorted()
    return sig, np.stack([sweep.accuracy(lv) for lv in levels])


@pytest.mark.parametrize("sigma50", [3e-3, 0.2, 7.0, 300.0])
def test_adaptive_brackets_and_refines_the_crossing(sigma50):
    evaluate, calls = synthetic(sigma50)
    half = fit.halfway(0.98, 0.1)
    curve = adaptive(evaluate, half, sweep.Plan(), scale=1.0, n_batches=8, clean=0.98)
    sig, acc = accuracy(curve)
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
    adaptive(evaluate, 0.54, sweep.Plan(), scale=20.0)
    assert calls[0][0][0] == pytest.approx(20.0 * 1e-2)  # first coarse level = scale · 10^start


def test_adaptive_stops_at_the_bound_when_the_site_never_falls():
    evaluate, calls = synthetic(1e9)
    plan = sweep.Plan()
    curve = adaptive(evaluate, 0.54, plan, scale=1.0)
    sig, acc = accuracy(curve)
    assert sig.max() == pytest.approx(10**plan.highest)
    mid = fit.midpoint(sig, acc, clean=0.98, chance=0.1)
    assert mid.censored == "above" and mid.value == pytest.approx(10**plan.highest)


def test_adaptive_plateau_above_half_extends_to_the_bound_then_stops():
    evaluate, _ = synthetic(1.0, floor=0.6)  # levels off above the halfway line 0.54
    curve = adaptive(evaluate, 0.54, sweep.Plan(highest=3.0), scale=1.0)
    assert max(curve.levels) == pytest.approx(1e3)


def test_adaptive_extends_down_when_already_below_half():
    evaluate, _ = synthetic(1e-4)
    curve = adaptive(evaluate, 0.54, sweep.Plan(), scale=1.0)
    sig, acc = accuracy(curve)
    assert sig.min() < 1e-4 < sig.max()
    assert acc.mean(axis=1)[0] > 0.54


def test_fixed_grid_evaluates_exactly_the_grid_once():
    evaluate, calls = synthetic(1.0)
    curve = fixed(evaluate, (0.1, 1.0, 10.0), 3)
    assert len(calls) == 1 and sorted(curve.levels) == [0.1, 1.0, 10.0]
    assert calls[0][1] == (range(3),) and all(lv.samples == 300 for lv in curve.levels.values())


def test_clear_levels_keep_their_head_estimate_and_unclear_ones_get_all_data():
    evaluate, calls = synthetic(1.0, width=0.1)
    curve = adaptive(evaluate, 0.54, sweep.Plan(), scale=1.0, n_batches=8, clean=0.98)
    assert calls[0][1] == (range(2, 3), range(6, 7))  # the coarse grid first sees a quarter, spread over the data
    samples = {s: lv.samples for s, lv in curve.levels.items()}
    assert samples[0.01] == 200 and samples[10.0] == 200  # far from the crossing: the head was enough
    expected = {s: fit.logistic(np.log10(s), 0.98, 0.1, 0.0, 0.1) for s in samples}
    near = [s for s in samples if abs(expected[s] - 0.54) < 0.08]
    assert near and all(samples[s] == 800 for s in near)  # around σ50: every sample
    total = sum(len(sig) * sum(len(r) for r in b) for sig, b in calls)
    assert total < 0.4 * 25 * 8  # vs a 25-level fixed grid over all 8 batches


@pytest.mark.parametrize("text, expected", [
    ("0.01,0.1,1", (0.01, 0.1, 1.0)),
    ("1,0.1", (0.1, 1.0)),
    ("1e-3:1e2:6", (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)),
])
def test_parse_sigmas(text, expected):
    assert parse_sigmas(text) == pytest.approx(expected)


@pytest.mark.parametrize("text, phrase", [
    ("", "empty"), ("-1,2", "must be 0 or between"), ("0", "above 0"), ("a,b", "expected a list"),
    ("1:0.1:5", "0 < start < stop"), ("nan", "must be 0 or between"), ("1e300", "must be 0 or between"),
    ("1e-300", "must be 0 or between"), ("1e-3:1e2:100000000", "at most 10000"),
])
def test_parse_sigmas_refuses_bad_grids(text, phrase):
    with pytest.raises(UsageError, match=phrase):
        parse_sigmas(text)


def test_a_search_is_a_generator_of_requests_that_any_executor_can_serve():
    """The search yields requests and is sent counts: serving them in a hand-written loop gives the same curve."""
    evaluate, _ = synthetic(0.5)
    search = sweep.adaptive(0.54, sweep.Plan(), 1.0, 8, 0.98)
    request, served = next(search), []
    try:
        while True:
            assert isinstance(request, sweep.Request) and request.block_count > 0 and request.sigmas
            assert all(isinstance(r, range) and len(r) for r in request.blocks)
            served.append(request)
            request = search.send(serve(evaluate)(request))
    except StopIteration as done:
        by_hand = done.value
    driven = adaptive(evaluate, 0.54, sweep.Plan(), 1.0, 8, 0.98)
    assert sorted(by_hand.levels) == sorted(driven.levels) and len(served) >= 2
    assert all(by_hand.levels[s] == driven.levels[s] for s in by_hand.levels)


@pytest.mark.parametrize("n_blocks", [1, 2, 3, 7, 16, 157])
def test_block_sets_are_sorted_disjoint_ranges_and_head_and_tail_cover_the_data_once(n_blocks):
    head = sweep.spread(n_blocks, 0.25)
    assert sum(len(r) for r in head) == max(1, int(np.ceil(n_blocks / 4)))
    flat = [b for r in head for b in r]
    assert flat == sorted(set(flat)) and all(0 <= b < n_blocks for b in flat)
    assert all(a.stop < b.start for a, b in zip(head, head[1:]))  # disjoint and not adjacent
    if n_blocks >= 8:
        assert flat[0] < n_blocks / 4 and flat[-1] >= 3 * n_blocks / 4  # spread over the whole data
    assert sweep.as_ranges([3, 1, 2, 7, range(8, 10)]) == (range(1, 4), range(7, 10))
    assert sweep.as_ranges(range(5)) == (range(0, 5),)


def test_head_of_class_sorted_data_is_unbiased():
    """Data sorted by class, each class falling at its own σ: at every level of the first look, the head's accuracy
    matches the whole data's within 0.04, where the first quarter of the blocks (the old head) was off by > 0.2."""
    n_blocks, per_block, classes = 40, 64, 10
    block_class = np.arange(n_blocks) * classes // n_blocks  # sorted by class: 4 blocks a class
    sigma50 = 10 ** np.linspace(-1.5, 0.5, classes)  # class 0 fragile ... class 9 robust

    def evaluate(sigmas, blocks):
        idx = np.array([b for r in blocks for b in r])
        acc = fit.logistic(np.log10(sigmas)[:, None], 1.0, 0.1, np.log10(sigma50[block_class[idx]])[None, :], 0.1)
        correct = np.repeat(np.round(acc * per_block).sum(axis=1).astype(np.int64)[:, None], 2, axis=1)
        return correct, np.zeros_like(correct), per_block * len(idx)

    def mean_accuracy(sigmas, blocks):
        correct, _, samples = evaluate(np.array(sigmas), blocks)
        return correct[:, 0] / samples

    request = next(sweep.adaptive(0.55, sweep.Plan(), 1.0, n_blocks, 1.0))
    assert request.block_count == n_blocks // 4
    head = mean_accuracy(request.sigmas, request.blocks)
    whole = mean_accuracy(request.sigmas, (range(n_blocks),))
    first = mean_accuracy(request.sigmas, (range(n_blocks // 4),))
    assert np.max(np.abs(head - whole)) < 0.04
    assert np.max(np.abs(first - whole)) > 0.2


def test_a_steep_fall_is_refined_again_until_its_bracket_is_a_thirty_second_of_a_decade():
    """A fall inside a hundredth of a decade (w = 0.002): after the first refinement one step of 1/8 decade still
    holds all of it, so the search refines inside it once more (3 levels more, a step of 1/32 decade). A gentle
    curve (w = 0.15) spreads its fall over several steps and costs nothing more."""
    half = fit.halfway(0.98, 0.1)
    for width, extra, step in ((0.002, 3, 1 / 32), (0.15, 0, 1 / 8)):
        evaluate, _ = synthetic(2.0, width=width)
        curve = adaptive(evaluate, half, sweep.Plan(), scale=1.0, n_batches=8, clean=0.98)
        once = adaptive(synthetic(2.0, width=width)[0], half, sweep.Plan(resolution=1.0), scale=1.0, n_batches=8,
                        clean=0.98)
        sig, acc = accuracy(curve)
        k = int(np.argmax(acc.mean(axis=1) <= half))
        assert sig[k - 1] < 2.0 < sig[k] and np.log10(sig[k] / sig[k - 1]) == pytest.approx(step)
        assert len(curve.levels) - len(once.levels) == extra, width
