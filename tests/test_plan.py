"""Multi-execution plans: the optimiser against brute force and an analytical optimum; plans on the samples keep
their measured drop within the bound; the clean and the noise-trained twins get different plans."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from walkaudit._analysis import plan as planner
from walkaudit.cli import main
from walkaudit.planning import parse_bound, plan

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
CANDIDATES = planner.CANDIDATES


def brute_force(drops, macs, budget, steps=1000):
    """Every combination, with the optimiser's own rounding of the drops to whole parts of the budget."""
    units = np.ceil(planner.monotone(drops) / budget * steps - 1e-9)
    best = None
    for ks in itertools.product(range(len(CANDIDATES)), repeat=len(macs)):
        if sum(units[i, k] for i, k in enumerate(ks)) <= steps:
            cost = sum(CANDIDATES[k] * m for k, m in zip(ks, macs))
            if best is None or cost < best[0] - 1e-9:
                best = (cost, tuple(CANDIDATES[k] for k in ks))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_the_optimiser_finds_the_least_cost_plan_within_the_budget(seed):
    rng = np.random.default_rng(seed)
    sites = 3
    a = rng.uniform(0.001, 0.05, sites)  # drop ≈ a / n: noise variance falls as 1/n
    drops = a[:, None] / np.array(CANDIDATES)[None, :] + rng.normal(0, 0.001, (sites, len(CANDIDATES)))
    macs = rng.integers(100, 10_000, sites)
    budget = float(rng.uniform(0.01, 0.06))
    got = planner.choose(drops, macs, budget)
    want = brute_force(drops, macs, budget)
    if want is None:
        assert got is None
    else:
        assert np.dot(got, macs) == pytest.approx(want[0])
        assert planner.predicted_drop(drops, got) <= budget + 1e-12


def test_the_optimiser_meets_the_analytical_optimum():
    """drop_i(n) = a_i / n with cost c_i per run: Lagrange gives n_i ∝ √(a_i / c_i), scaled so Σ a_i / n_i equals
    the budget; with a = (1, 16), c = (1, 1) and budget 2.5 that is n = (2, 8) exactly, cost 10."""
    a, macs = np.array([1.0, 16.0]), np.array([1.0, 1.0])
    drops = a[:, None] / np.array(CANDIDATES)[None, :]
    assert planner.choose(drops, macs, 2.5) == (2, 8)
    assert planner.choose(drops, macs, 2.5 * 0.999) != (2, 8)  # a hair less budget needs more repetitions
    assert planner.cost_ratio((2, 8), macs) == 5.0


def test_no_plan_when_even_the_most_repetitions_exceed_the_budget():
    drops = np.full((2, len(CANDIDATES)), 0.3)
    assert planner.choose(drops, [1, 1], 0.5) is None
    assert planner.choose(np.zeros((2, len(CANDIDATES))), [1, 1], 0.0) == (1, 1)


def test_measured_drops_are_made_monotone_and_non_negative():
    assert planner.monotone([0.05, 0.06, -0.01, 0.02]).tolist() == [0.06, 0.06, 0.02, 0.02]


@pytest.mark.parametrize("text, value, relative", [("1%", 0.01, False), ("5%rel", 0.05, True), ("0.02", 0.02, False)])
def test_parse_bound(text, value, relative):
    bound = parse_bound(text)
    assert bound.value == pytest.approx(value) and bound.relative is relative


@pytest.fixture(scope="module")
def twins():
    """Plans for the clean and the additive-noise-trained MNIST MLP at σ = 4, bound 1 point."""
    return {name: plan(SAMPLES / f"{name}.dynamo.onnx", data=str(SAMPLES / "mnist_val.npz"), sigma=4.0,
                       max_drop="1%", provider="cpu")
            for name in ("mnist_mlp", "mnist_mlp_additive")}


def test_every_plan_on_the_samples_keeps_its_measured_drop_within_the_bound(twins):
    for result in twins.values():
        assert result["met"] and result["measured_drop"] <= result["max_drop_points"]
        assert all(r["measured_drop"] > result["max_drop_points"] for r in result["rounds"][:-1])  # tightened
        assert all(1 <= s["repeats"] <= 16 for s in result["sites"])
        assert result["cost_ratio"] >= 1.0


def test_the_noise_trained_twin_needs_a_cheaper_plan_and_has_a_larger_uniform_budget(twins):
    clean, trained = twins["mnist_mlp"], twins["mnist_mlp_additive"]
    assert trained["cost_ratio"] < clean["cost_ratio"]
    assert trained["uniform_sigma"] > 1.3 * clean["uniform_sigma"]


def test_the_plan_command_writes_the_plan_and_gates_its_cost(tmp_path):
    out = tmp_path / "plan.json"
    args = ["plan", str(SAMPLES / "mnist_mlp_additive.dynamo.onnx"), "--data", str(SAMPLES / "mnist_val.npz"),
            "--sigma", "4", "--max-drop", "1%", "--provider", "cpu", "--json", str(out), "-q"]
    cheap = CliRunner().invoke(main, [*args, "--max-cost", "100x"])
    assert cheap.exit_code == 0, cheap.stderr
    report = json.loads(out.read_text())
    assert report["plan"]["met"] and report["gate"]["passed"]
    assert {s["name"] for s in report["plan"]["sites"]} == {"linear", "linear_1", "logits"}
    dear = CliRunner().invoke(main, [*args, "--max-cost", "1.5x"])
    assert dear.exit_code == 1 and "--max-cost" in dear.output
    bad = CliRunner().invoke(main, [*args, "--max-cost", "0.5x"])
    assert bad.exit_code == 2 and bad.stderr.count("\n") == 1


def test_a_bound_no_plan_can_meet_exits_1_and_says_so():
    result = CliRunner().invoke(main, ["plan", str(SAMPLES / "mnist_mlp_multiplicative.dynamo.onnx"), "--data",
                                       str(SAMPLES / "mnist_val.npz"), "--sigma", "4", "--max-drop", "1%",
                                       "--max-repeats", "4", "--provider", "cpu", "-q"])
    assert result.exit_code == 1, result.stderr
    assert "no plan with at most 4 repetitions per layer keeps the drop within 1%" in result.output
