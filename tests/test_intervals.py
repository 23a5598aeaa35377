"""Honest 95 % intervals on σ50 (issue #14, item 5).

The interval is a bootstrap: whole repeat curves resampled with replacement (one noise draw serves every σ of a
repeat, so a repeat's errors are shared across levels), each point's count redrawn binomially, the logistic refitted
or, for an isotonic estimate, the monotone fit redone and read on the monotone cubic through its points
(`walkaudit._analysis.fit`). Synthetic curves here are drawn the way real ones vary: binomial noise per point plus a
per-repeat random effect (the repeat's whole curve shifted in log σ), with a fixed seed, so the tests cannot flake.
"""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path

import numpy as np
import pytest

from walkaudit._analysis.fit import logistic, midpoint

GRID = 10 ** np.arange(-2.0, 3.01, 0.25)
SAMPLES = 1000
ROOT = Path(__file__).resolve().parent.parent


def curve(rng, sigma50, width, tau, repeats=3, samples=SAMPLES, clean=0.95, chance=0.1):
    """[L, R] accuracies: repeat r follows a logistic with midpoint log10(σ50) + δ_r, δ_r ~ N(0, tau), binomially
    sampled. By symmetry the mean curve crosses the halfway line at σ50."""
    shift = rng.normal(0, tau, repeats)
    p = logistic(np.log10(GRID)[:, None], clean, chance, math.log10(sigma50) + shift[None, :], width)
    return rng.binomial(samples, p) / samples


def coverage(tau, n=240, seed=2024):
    rng = np.random.default_rng(seed)
    covered = total = 0
    for _ in range(n):
        sigma50, width = 10 ** rng.uniform(-1, 2), 10 ** rng.uniform(-1, -0.3)
        result = midpoint(GRID, curve(rng, sigma50, width, tau), clean=0.95, chance=0.1, samples=SAMPLES)
        if result.ci95 is None:
            continue
        assert result.ci_method in ("bootstrap", "grid-bracket")
        assert result.ci95[0] <= result.value <= result.ci95[1]
        total += 1
        covered += result.ci95[0] <= sigma50 <= result.ci95[1]
    assert total >= 0.95 * n
    return covered / total


@pytest.mark.parametrize("tau", [0.0, 0.01])
def test_bootstrap_interval_covers_the_truth_about_95_percent_of_the_time(tau):
    """240 curves each, 3 repeats of 1000 samples, seed 2024. Measured: 0.971 without a random effect, 0.933 with a
    per-repeat shift of 0.01 decades (the size seen on LeNet-5); 0.842 with 0.03 decades. Stated tolerance:
    0.90-0.995."""
    assert 0.90 <= coverage(tau) <= 0.995


def test_interval_is_reproducible_and_fast():
    rng = np.random.default_rng(7)
    acc = curve(rng, 3.0, 0.2, 0.01)
    first = midpoint(GRID, acc, clean=0.95, chance=0.1, samples=SAMPLES)
    start = time.perf_counter()
    again = midpoint(GRID, acc.copy(), clean=0.95, chance=0.1, samples=SAMPLES)
    assert time.perf_counter() - start < 0.2
    assert again.ci95 == first.ci95 and again.value == first.value
    other = midpoint(GRID, curve(rng, 3.0, 0.2, 0.01), clean=0.95, chance=0.1, samples=SAMPLES)
    assert other.ci95 != first.ci95


def test_samples_per_level_are_accepted():
    rng = np.random.default_rng(8)
    acc = curve(rng, 1.0, 0.3, 0.0)
    per_level = np.where(np.abs(np.log10(GRID)) < 0.6, 1000, 256)
    result = midpoint(GRID, acc, clean=0.95, chance=0.1, samples=per_level)
    assert result.ci_method == "bootstrap" and result.ci95[0] < 1.0 < result.ci95[1]
    with pytest.raises(ValueError):
        midpoint(GRID, acc, clean=0.95, chance=0.1, samples=[1000, 1000])


@pytest.mark.slow
def test_lenet5_intervals_across_seeds_rarely_disjoint():
    """LeNet-5 on 1000 MNIST samples, seeds 0-7: of the 5 × 28 pairs of intervals of the same site, at most 3 are
    disjoint (measured: 0 of 140; 28 of the 40 σ50 are isotonic estimates, and the 40 intervals' median width is
    0.034 decades, 0.125 when an isotonic interval held a grid step; with the fit-covariance interval 5-7 pairs were
    disjoint). Two honest 95 % intervals of the same quantity are disjoint well under 1 % of the time."""
    pytest.importorskip("onnxruntime")
    import walkaudit

    reports = [walkaudit.audit(str(ROOT / "samples/mnist_lenet5.dynamo.onnx"), data=str(ROOT / "samples/mnist_val.npz"),
                               seed=s, provider="cpu") for s in range(8)]
    disjoint = pairs = 0
    for i in range(len(reports[0].sites)):
        intervals = [r.sites[i].ci95 for r in reports]
        assert all(ci is not None for ci in intervals)
        for a, b in itertools.combinations(intervals, 2):
            pairs += 1
            disjoint += a[1] < b[0] or b[1] < a[0]
    assert pairs == 140 and disjoint <= 3


def test_a_report_compared_with_itself_passes_a_20_percent_drop_gate(tmp_path):
    """`walkaudit compare r.json r.json --max-drop 20%` on LeNet-5's default audit (1000 MNIST samples): two of its
    five σ50 are isotonic estimates. Their intervals used to hold a whole grid step (0.125 decades: a fall of up to
    22 % could not be ruled out, "undecided", exit 1); read on the monotone cubic through the isotonic points they
    are 0.029 and 0.034 decades wide, and the gate passes (exit 0)."""
    pytest.importorskip("onnxruntime")
    from click.testing import CliRunner

    import walkaudit
    from walkaudit.cli import main

    report = walkaudit.audit(str(ROOT / "samples/mnist_lenet5.dynamo.onnx"), data=str(ROOT / "samples/mnist_val.npz"),
                             provider="cpu")
    isotonic = [s for s in report.sites if s.fit.estimator == "isotonic"]
    assert isotonic and all(math.log10(s.ci95[1] / s.ci95[0]) < 0.06 for s in isotonic)
    (tmp_path / "r.json").write_text(report.to_json())
    same = str(tmp_path / "r.json")
    result = CliRunner().invoke(main, ["compare", same, same, "--max-drop", "20%"], catch_exceptions=False)
    assert result.exit_code == 0 and "gate: passed" in result.stdout, result.stdout
