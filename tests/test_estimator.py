"""Midpoints from the data (issue 21, items 2 and 6).

σ50 is where the measured curve crosses the halfway line. The logistic stands only where its residuals are within
binomial noise and its crossing lies between the levels clearly on either side of the line; otherwise σ50 comes from
the isotonic (monotone) fit of the points, with its interval from the same bootstrap. A clean accuracy within its
95 % interval of chance gives no σ50.

The coverage simulation drives the real adaptive search (`sweep.adaptive`) with paired counts drawn from
numpy's default_rng(21): a data set of 1024 samples, 90 % of them right without noise, whose predictions the noise
randomises (over 10 classes) with a probability d(σ) that has the curve's shape; the true σ50 is where d = 0.5
(the expected accuracy is then halfway between the data's clean accuracy and chance, whatever the data). Measured
over 250 curves per shape: coverage 0.972 (floor above chance), 0.944 (slow tail), 0.984 (plateau), 0.988 (steep
drop); 60 curves per shape here: the pooled coverage must be >= 0.93 and every shape's >= 0.88 (2 standard errors
of a 0.95 coverage on 60 curves below 0.93).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import optimize, special

import walkaudit
from walkaudit._analysis import fit, sweep
from walkaudit._units import BLOCK, Counts
from walkaudit.report.gate import RULE_ABOVE_CHANCE, GateConfig, Threshold, evaluate, parse_drop

ROOT = Path(__file__).resolve().parent.parent
CLASSES = 10
CHANCE = 1 / CLASSES
N_BLOCKS = 16
SHAPES = ("floor", "slow", "plateau", "steep")


def damage(shape: str, u: np.ndarray, m: float) -> np.ndarray:
    """The share of predictions the noise randomises at u = log10 σ, for a curve whose σ50 is 10**m."""
    if shape == "floor":  # levels off at 0.7 damage: a floor well above chance
        w = 0.25
        return 0.7 * special.expit((u - m + w * math.log(2.5)) / w)
    if shape == "slow":  # a power-law tail, still falling three decades past σ50
        s0 = 10**m / (2 ** (1 / 0.4) - 1)
        return 1 - (1 + 10**u / s0) ** -0.4
    if shape == "plateau":  # 0.4 of the damage two decades earlier, a plateau above the halfway line, the rest
        w = 0.1
        return 0.4 * special.expit((u - m + 2) / w) + 0.6 * special.expit((u - m - w * math.log(5)) / w)
    if shape == "steep":  # all of it inside a fiftieth of a decade
        return special.expit((u - m) / 0.01)
    raise ValueError(shape)


def simulated_midpoint(shape: str, m: float, rng: np.random.Generator, clean_ok: np.ndarray, repeats: int = 3):
    """The adaptive search and the fit on paired counts drawn for one curve."""
    samples = clean_ok.size
    clean = clean_ok.sum() / samples

    def serve(request):
        rows = np.concatenate([np.arange(r.start * BLOCK, min(r.stop * BLOCK, samples)) for r in request.blocks])
        n, right = rows.size, int(clean_ok[rows].sum())
        d = np.repeat(damage(shape, np.log10(np.array(request.sigmas)), m)[:, None], repeats, axis=1)
        lost = rng.binomial(right, d * (1 - 1 / CLASSES))
        gained = rng.binomial(n - right, d / CLASSES)
        return Counts(request.sigmas, right - lost + gained, np.zeros_like(lost), n, (), right, lost)

    curve = sweep.drive(sweep.adaptive(fit.halfway(clean, CHANCE), sweep.Plan(), 1.0, N_BLOCKS, clean), serve)
    sig, levels = curve.sorted()
    acc = np.stack([sweep.accuracy(lv, clean, CHANCE) for lv in levels])
    effective = np.array([sweep.effective_samples(lv, clean, CHANCE) for lv in levels])
    return fit.midpoint(sig, acc, clean=clean, chance=CHANCE, samples=effective, clean_samples=samples)


def test_intervals_cover_the_true_midpoint_on_curves_a_logistic_does_not_describe():
    rng = np.random.default_rng(21)
    clean_ok = rng.random(N_BLOCKS * BLOCK) < 0.9
    covered, total, estimators = {}, {}, set()
    for shape in SHAPES:
        hits = n = 0
        for _ in range(60):
            m = rng.uniform(-1, 1)
            result = simulated_midpoint(shape, m, rng, clean_ok)
            estimators.add(result.estimator)
            assert result.censored is None and abs(math.log10(result.value) - m) < 0.1
            if result.ci95 is not None:
                n += 1
                hits += result.ci95[0] <= 10**m <= result.ci95[1]
        assert n >= 57  # an interval for nearly every curve
        covered[shape], total[shape] = hits, n
        assert hits / n >= 0.88, (shape, hits, n)
    assert sum(covered.values()) / sum(total.values()) >= 0.93, covered
    assert {"logistic", "isotonic"} <= estimators


def test_isotonic_intervals_cover_the_truth_and_are_narrower_than_a_grid_step(monkeypatch):
    """Every logistic turned away (RESIDUAL_P above 1), so every curve gets the isotonic estimate: its interval is
    the bootstrap's percentile interval of the crossings read on the monotone cubic through the isotonic points,
    widened by the linear-vs-cubic allowance; the grid step only where one step holds most of the fall (the steep
    shape, whose step the search has narrowed to 1/32 decade). 40 curves per shape, default_rng(22). Measured:
    coverage 39, 40, 40, 39 of 40, median widths 0.090, 0.132, 0.076, 0.031 decades (before: a grid step or two,
    0.25 for the smooth shapes); over 250 curves per shape 0.984, 0.988, 1.0, 0.996."""
    monkeypatch.setattr(fit, "RESIDUAL_P", 2.0)
    rng = np.random.default_rng(22)
    clean_ok = rng.random(N_BLOCKS * BLOCK) < 0.9
    widths, hits = [], 0
    for shape in SHAPES:
        for _ in range(40):
            m = rng.uniform(-1, 1)
            result = simulated_midpoint(shape, m, rng, clean_ok)
            assert result.estimator == "isotonic" and result.ci95 is not None
            hits += result.ci95[0] <= 10**m <= result.ci95[1]
            widths.append(math.log10(result.ci95[1] / result.ci95[0]))
            if shape == "steep":  # the step, or less where the fall splits over two steps
                assert widths[-1] <= 1 / 32 + 1e-9
    assert hits / len(widths) >= 0.93
    assert np.median(widths) < 0.125 / 1.25  # a grid step of the first refinement was the least before


def test_a_curve_the_logistic_cannot_follow_gets_its_midpoint_from_the_points():
    """The issue's case: accuracy still 0.26 at σ = 100 (a tail no logistic with its floor at chance follows). The
    measured points cross 0.525 between σ = 1 (0.731) and σ = 1.78 (0.518): σ50 lies there, with an interval that
    holds the crossing, and the report says the isotonic fit gave it."""
    sigmas = np.array([0.01, 0.0316, 0.1, 0.316, 1.0, 1.334, 1.78, 2.37, 3.16, 10.0, 31.6, 100.0])
    means = np.array([0.955, 0.955, 0.954, 0.953, 0.731, 0.6, 0.518, 0.44, 0.40, 0.31, 0.27, 0.26])
    acc = np.random.default_rng(3).binomial(1000, np.repeat(means[:, None], 3, axis=1)) / 1000
    result = fit.midpoint(sigmas, acc, clean=0.955, chance=0.1, samples=1000, clean_samples=1000)
    points = optimize.isotonic_regression(acc.mean(axis=1), increasing=False).x
    k = int(np.argmax(points < 0.5275))
    assert sigmas[k - 1] <= result.value <= sigmas[k]
    assert result.ci95[0] <= result.value <= result.ci95[1] and result.ci95[1] <= 2.37
    assert result.to_dict()["estimator"] == "isotonic" and "residuals beyond binomial noise" in result.message


def _dense_crossing(report, name: str, half: float) -> float:
    site = report.site(name)
    u = np.log10([p.sigma for p in site.points])
    curve = optimize.isotonic_regression(np.array([p.accuracy for p in site.points]), increasing=False).x
    return fit._crossing_of(u, curve, half)


@pytest.mark.parametrize("model, data, options, grid", [
    # the case: multiplicative noise on the logits of an MNIST MLP with BatchNorm, and its hidden layer
    ("mnist_mlp_bn.dynamo.onnx", "mnist_val.npz", dict(noise="multiplicative", include="^(logits|getitem)$"),
     (-0.3, 1.2)),
    ("digits_rows_lstm.dynamo.onnx", "digits_rows_val.npz", {}, (-1.5, 1.5)),
    ("mnist_lenet5.dynamo.onnx", "mnist_val.npz", {}, (-1.0, 2.5)),
    ("digits_sklearn_mlp.onnx", "digits_val.npz", {}, (-1.5, 2.5)),
    ("digits_two_output.dynamo.onnx", "digits_val.npz", {}, (-1.5, 2.5)),
])
def test_sample_midpoints_lie_within_a_tenth_of_a_decade_of_the_dense_grid_crossing(model, data, options, grid):
    """The adaptive audit's σ50 of each site against the crossing of the same site measured on a fixed grid of 20
    levels a decade (the isotonic fit of those points, interpolated in log σ). Measured: 0.023, 0.001 (MLP-BN
    getitem, logits; reported 3.29 and 2.97 before the isotonic estimate), 0.001 and 0.009 decades (LSTM); LeNet-5,
    the sklearn MLP and the two-output model: every site within the tenth too."""
    pytest.importorskip("onnxruntime")
    path, values = str(ROOT / "samples" / model), str(ROOT / "samples" / data)
    adaptive = walkaudit.audit(path, data=values, provider="cpu", **options)
    dense = walkaudit.audit(path, data=values, provider="cpu", sigmas=tuple(10 ** np.arange(*grid, 0.05)), **options)
    half = fit.halfway(adaptive.clean_accuracy, adaptive.chance)
    assert [s.name for s in adaptive.sites] == [s.name for s in dense.sites] and adaptive.sites
    for site in adaptive.sites:
        assert site.censored is None and site.fit.estimator in ("logistic", "isotonic")
        assert abs(math.log10(site.midpoint) - _dense_crossing(dense, site.name, half)) <= 0.1, site.name


def test_a_clean_accuracy_within_its_interval_of_chance_gives_no_midpoint():
    """The issue's GPT-2 case: 2 of 1451 tokens right, chance 0.001: above chance, but not beyond its noise."""
    acc = np.array([0.0014, 0.0014, 0.0007, 0.0])
    result = fit.midpoint([0.1, 1.0, 10.0, 100.0], acc, clean=2 / 1451, chance=0.001, samples=1451,
                          clean_samples=1451)
    assert math.isnan(result.value) and result.ci95 is None and not result.ok and result.estimator == "none"
    assert "\n" not in result.message and "within its interval of chance" in result.message
    assert result.to_dict()["value"] is None
    assert fit.at_chance(2 / 1451, 0.001, 1451) and not fit.at_chance(0.2, 0.1, 1000)
    assert not fit.at_chance(0.0014, 0.001, None)  # without the count: only equality says "at chance"


def test_a_model_at_chance_reports_no_midpoint_and_fails_the_gate():
    """The MNIST MLP scored against shuffled labels (default_rng(0)): clean accuracy ~ 0.1 = chance, above it only
    by luck. Every site: midpoint null, a one-line note, fit.estimator 'none'; the gate fails on the model (its
    clean accuracy within its 95 % interval of chance), whatever the rules: a σ50 threshold, a minimum clean
    accuracy it clears numerically, a comparison with itself as the baseline."""
    pytest.importorskip("onnxruntime")
    with np.load(ROOT / "samples/mnist_val.npz") as d:
        x, y = d["x"][:512], np.random.default_rng(0).permutation(d["y"][:512])
    report = walkaudit.audit(str(ROOT / "samples/mnist_mlp.dynamo.onnx"), x, y, provider="cpu", chance=0.1,
                             sigmas=(0.1, 1.0, 10.0), repeats=1)
    assert fit.at_chance(report.clean_accuracy, 0.1, report.clean_counts.samples)
    for site in report.sites:
        assert site.midpoint is None and site.sigma50 is None and site.fit.estimator == "none"
        assert sum("within its interval of chance" in n for n in site.extra["notes"]) == 1
    assert report.clean_accuracy > 0.1  # above chance by luck, within its interval
    for config, baseline in ((GateConfig(thresholds=(Threshold(None, 1e-9),)), None),
                             (GateConfig(min_clean_accuracy=0.05), None),
                             (GateConfig(max_drop=parse_drop("20%")), report)):
        verdict = evaluate(report, config, baseline=baseline)
        assert not verdict.passed and [f.rule for f in verdict.failures] == [RULE_ABOVE_CHANCE], config
        assert "within its 95% interval of chance 0.1" in verdict.failures[0].message
