"""The engine's fast paths give the same numbers as the plain ones.

- The noise applied inside the suffix graph from a host draw (`rewrite.graph_noise(fed=True)`) against the same
  arithmetic in numpy (`noise.noisy_levels`), which feeds the suffix the noisy value instead.
- Values kept by the clean pass against values recomputed by each site's prefix.
- ε drawn ahead in the background against ε drawn in turn.
"""

from __future__ import annotations

import numpy as np
import pytest

import walkaudit
from walkaudit._execution import engine as engine_mod
from walkaudit._execution.engine import _fitting
from walkaudit._graph import passes as rewrite
from walkaudit._loading.model import value_types
from walkaudit._noise import Noise, NormalSource, noisy_levels

from .models import cpu_session, mlp, resnet_block


@pytest.mark.parametrize("kind", ["additive", "multiplicative", "combined"])
def test_noise_fed_to_the_graph_is_bit_identical_to_noise_applied_on_the_host(kind):
    model = resnet_block(seed=3)
    types = value_types(model)
    sfx = rewrite.suffix(model, "b", "logits", types)
    noise = Noise(kind, ratio=0.3)
    sm, sa = noise.scales(np.ones(1))
    program = rewrite.graph_noise(sfx, types, sm is not None, sa is not None, fed=True)
    assert program.eps_mul == ("walkaudit.eps_mul" if sm is not None else None)
    assert program.eps_add == ("walkaudit.eps_add" if sa is not None else None)

    x = np.random.default_rng(3).normal(size=(7, 1, 6, 6)).astype(np.float32)
    logits, a, b = cpu_session(rewrite.expose(model, ["a", "b"], types)).run(["logits", "a", "b"], {"x": x})
    sigmas = np.array([0.0, 0.05, 0.3, 2.0])
    eps = NormalSource(1, threads=1).normal((noise.draws, 1, *b.shape), (0,))

    feeds = {program.site: b, program.frontier[0]: a}
    m, s = noise.scales(sigmas)
    for name, scale in ((program.sigma_mul, m), (program.sigma_add, s)):
        if name:
            feeds[name] = scale.astype(np.float32).reshape(-1, 1, 1, 1, 1)
    for name, term in ((program.eps_mul, 0), (program.eps_add, -1)):
        if name:
            feeds[name] = eps[term]
    got = cpu_session(program.model).run(["logits"], feeds)[0]

    noisy = noisy_levels(noise, b, sigmas, eps).reshape(len(sigmas) * len(b), *b.shape[1:])
    host = cpu_session(sfx.model).run(["logits"], {"b": noisy, "a": np.concatenate([a] * len(sigmas))})[0]
    assert np.array_equal(got, host)
    assert np.array_equal(got[: len(x)], logits)  # σ = 0 is the clean model, bit for bit


def _engine(model, samples: int, batch_size: int, seed: int):
    """An Engine on the CPU over the model's default sites, with random data of the resnet_block's input shape."""
    loaded = walkaudit._loading.model.load_model(model)
    sites = walkaudit._graph.sites.select(loaded.proto, loaded.types, walkaudit._graph.sites.Selection(), loaded.class_output.name)
    engine = engine_mod.Engine(loaded, walkaudit._execution.runtime.Runtime("cpu"), Noise(), NormalSource(0, threads=1), sites,
                               batch_size=batch_size)
    x = np.random.default_rng(seed).normal(size=(samples, 1, 6, 6)).astype(np.float32)
    return engine, walkaudit._loading.data.from_arrays(x, None, loaded.inputs), sites


def _points(report) -> list:
    return [[(p.sigma, p.accuracy, p.accuracy_std) for p in s.points] for s in report.sites]


@pytest.mark.parametrize("kind", ["additive", "combined"])
def test_audit_gives_the_same_points_with_the_noise_applied_in_the_graph_or_on_the_host(kind, monkeypatch):
    model = resnet_block(seed=4)
    x = np.random.default_rng(4).normal(size=(300, 1, 6, 6)).astype(np.float32)
    args = dict(provider="cpu", repeats=2, seed=7, noise=kind, sigmas=(0.1, 0.5, 2.0, 8.0), batch_size=128)
    fed = walkaudit.audit(model, x, **args)
    monkeypatch.setattr(rewrite, "FED_NOISE_MIN_OPSET", 99)  # every opset now takes the host path
    host = walkaudit.audit(model, x, **args)
    assert _points(fed) == _points(host)


def test_clean_values_kept_by_the_clean_pass_spare_the_prefixes_and_change_nothing(monkeypatch):
    model = resnet_block(seed=5)
    x = np.random.default_rng(5).normal(size=(300, 1, 6, 6)).astype(np.float32)
    args = dict(provider="cpu", repeats=1, seed=2, sigmas=(0.2, 1.0, 5.0), batch_size=64, exact=True)
    described = []
    real_session = walkaudit._execution.runtime.Runtime.session

    def session(self, proto, what="model"):
        described.append(what)
        return real_session(self, proto, what)

    monkeypatch.setattr(walkaudit._execution.runtime.Runtime, "session", session)
    kept = walkaudit.audit(model, x, **args)
    prefixes_when_kept = sum(w.startswith("part of the model before") for w in described)

    described.clear()
    monkeypatch.setattr(engine_mod, "CACHE_BYTES", 0)  # nothing is kept or cached: every value comes from a prefix
    recomputed = walkaudit.audit(model, x, **args)
    prefixes_when_not = sum(w.startswith("part of the model before") for w in described)

    assert prefixes_when_kept == 0 and prefixes_when_not == len(kept.sites)
    assert _points(kept) == _points(recomputed)


def test_kept_values_are_handed_over_site_by_site_and_then_forgotten():
    model = resnet_block(seed=6)
    engine, data, sites = _engine(model, samples=120, batch_size=50, seed=6)
    engine.clean_pass(data, None, keep=True)
    assert set(engine._kept) == {0, 1, 2}  # every batch
    before = engine.kept_bytes
    for site in sites:
        evaluator = engine.walk(site)
        assert len(evaluator._cache) == 3  # every batch of what this site reads, handed over
        assert set(evaluator._cache[0]) == {site.name, *rewrite.suffix_plan(model, site.name, "logits")[1]}
        assert engine.kept_bytes <= before  # what a later site also reads (a skip value) stays
        before = engine.kept_bytes
    assert engine.kept_bytes == 0
    engine.source.close()


def test_fitting_takes_later_sites_first_within_the_budget_and_counts_shared_values_once():
    batch = {"a": np.zeros(1000, np.float32), "b": np.zeros(50, np.float32), "c": np.zeros(100, np.float32),
             "d": np.zeros(10, np.float32)}
    reads = {"a": ("a",), "b": ("b", "a"), "c": ("c",), "d": ("d", "c")}
    # per batch: a 4000 B, b 200 B, c 400 B, d 40 B; 2 batches
    assert _fitting(reads, batch, 2, 10_000) == ["a", "b", "c", "d"]
    assert _fitting(reads, batch, 2, 2_000) == ["c", "d"]  # d then c (c already held: free); b would need a too
    assert _fitting(reads, batch, 2, 880) == ["c", "d"]  # d reads c: 80 + 800 B
    assert _fitting(reads, batch, 2, 879) == ["c"]  # d (with c) does not fit; c alone does
    assert _fitting(reads, batch, 2, 0) == []


def test_eps_drawn_ahead_gives_the_numbers_drawn_in_turn(monkeypatch):
    model = mlp(seed=8)
    x = np.random.default_rng(8).normal(size=(500, 16)).astype(np.float32)
    args = dict(provider="cpu", repeats=3, seed=1, sigmas=(0.1, 1.0, 10.0), batch_size=100)
    ahead = walkaudit.audit(model, x, **args)

    class Now:
        def __init__(self, value):
            self.value = value

        def result(self):
            return self.value

    monkeypatch.setattr(NormalSource, "later", lambda self, fn, *a: Now(fn(*a)))
    in_turn = walkaudit.audit(model, x, **args)
    assert _points(ahead) == _points(in_turn)


def test_device_copies_are_kept_only_for_cached_batches(monkeypatch):
    """With room in the cache for 5 of 20 batches, a walk holds the device copies of those 5 and of two more at most
    (the one running and the one whose ε is drawn ahead), not one per batch of the data set."""
    monkeypatch.setattr(engine_mod, "CACHE_BYTES", 0)
    engine, data, sites = _engine(resnet_block(seed=10), samples=200, batch_size=10, seed=10)
    clean = engine.clean_pass(data, None, keep=True)
    assert engine.kept_bytes == 0
    monkeypatch.setattr(engine_mod, "CACHE_BYTES", 5 * 10 * 144 * 4)  # 5 batches of site a (10 × 4×6×6 floats)
    evaluator = engine.walk(sites[0])
    held = []
    real = engine_mod.SuffixEvaluator._run

    def run(self, start, values, sigmas, eps):
        held.append(len(self._on_device))
        return real(self, start, values, sigmas, eps)

    monkeypatch.setattr(engine_mod.SuffixEvaluator, "_run", run)
    counts = evaluator.evaluate(data, clean.targets, [0.0, 1.0], repeats=2)
    assert counts.samples == 200 and counts.correct[0].tolist() == [200, 200]  # σ = 0 agrees with the clean pass
    assert len(evaluator._cache) == 5
    assert len(held) > 20 and max(held) <= 5 + 2
    engine.source.close()


@pytest.mark.parametrize("kind", ["additive", "multiplicative", "combined"])
@pytest.mark.parametrize("build", [mlp, resnet_block])
def test_global_mode_gives_the_same_points_with_the_noise_applied_in_the_graph_or_from_host_terms(kind, build,
                                                                                                monkeypatch):
    model = build(seed=12)
    shape = (240, 16) if build is mlp else (240, 1, 6, 6)
    x = np.random.default_rng(12).normal(size=shape).astype(np.float32)
    args = dict(provider="cpu", repeats=2, seed=5, noise=kind, mode="global", sigmas=(0.05, 0.3, 1.0, 4.0),
                batch_size=100, selection=walkaudit._graph.sites.Selection(ops=("all",)))
    made = []
    real = engine_mod.Engine.global_
    monkeypatch.setattr(engine_mod.Engine, "global_", lambda self: made.append(real(self)) or made[-1])
    fed = walkaudit.audit(model, x, **args)
    monkeypatch.setattr(rewrite, "FED_NOISE_MIN_OPSET", 99)  # host terms (rewrite.inject) for every opset
    terms = walkaudit.audit(model, x, **args)
    assert type(made[0]) is engine_mod.FedGlobalEvaluator and type(made[1]) is engine_mod.SiteEvaluator
    assert len(made[0].program.eps) >= 3  # --ops all: every float value is a site
    assert _points(fed) == _points(terms)
    assert fed.sites[0].points[0].accuracy < 1.0 or fed.sites[0].points[-1].accuracy < 1.0  # the noise does bite
