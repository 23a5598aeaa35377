"""The worker's fast paths give the same numbers as the plain ones, and units give the same counts however they
are cut, batched or threaded.

- The noise applied inside the suffix graph from a host draw (`FedSuffix`) against the same arithmetic in numpy
  (`HostApplied`); global mode's fed graph against host-computed factors.
- Values kept by the clean pass against values recomputed by each site's prefix.
- ε drawn ahead in the background against ε drawn in turn.
- Counts of disjoint sample ranges add up to their union's; batch sizes and threads change nothing.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest

import walkaudit
from walkaudit._execution import strategies
from walkaudit._execution.runtime import Runtime
from walkaudit._execution.worker import Worker, _fitting, graph_seeds
from walkaudit._graph import passes as rewrite
from walkaudit._graph.sites import Selection, select
from walkaudit._loading.data import from_arrays
from walkaudit._loading.model import load_model, value_types
from walkaudit._noise import NormalSource, make_noise
from walkaudit._units import BLOCK, WorkUnit

from .models import cpu_session, mlp, resnet_block


def _worker(model, x, *, kind="additive", mode="walk", batch_size=50, seed=0, threads=1, ops=None, **options):
    loaded = load_model(model)
    sites = select(loaded.proto, loaded.types, Selection(ops=ops) if ops else Selection(), loaded.class_output.name)
    worker = Worker(loaded, from_arrays(x, None, loaded.inputs), runtime=Runtime("cpu"), noise=make_noise(kind, 0.3),
                    source=NormalSource(seed, threads=threads), sites=sites, mode=mode, batch_size=batch_size,
                    **options)
    return worker, sites


def _unit(worker, sites, sigmas=(0.0, 0.2, 1.0, 5.0), blocks=None, repeats=2):
    blocks = blocks or (0, -(-worker.data.samples // BLOCK))
    return WorkUnit(worker.key, tuple(sites), tuple(sigmas), repeats, blocks, worker.source.seed, mode=worker.mode)


def _x(samples: int, seed: int, shape=(1, 6, 6)):
    return np.random.default_rng(seed).normal(size=(samples, *shape)).astype(np.float32)


@pytest.mark.parametrize("kind", ["additive", "multiplicative", "combined"])
def test_noise_fed_to_the_graph_is_bit_identical_to_noise_applied_on_the_host(kind):
    model = resnet_block(seed=3)
    types = value_types(model)
    sfx = rewrite.suffix(model, "b", "logits", types)
    noise = make_noise(kind, ratio=0.3)
    program = rewrite.graph_noise(sfx, types, "mul" in noise.terms, "add" in noise.terms, fed=True)
    assert (program.eps_mul is not None) == ("mul" in noise.terms)
    assert (program.eps_add is not None) == ("add" in noise.terms)

    x = _x(7, 3)
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

    noisy = noise.host(b, sigmas, eps).reshape(len(sigmas) * len(b), *b.shape[1:])
    host = cpu_session(sfx.model).run(["logits"], {"b": noisy, "a": np.concatenate([a] * len(sigmas))})[0]
    assert np.array_equal(got, host)
    assert np.array_equal(got[: len(x)], logits)  # σ = 0 is the clean model, bit for bit


@pytest.mark.parametrize("kind", ["additive", "combined"])
def test_fed_suffix_and_host_applied_noise_give_the_same_counts(kind):
    x = _x(300, 4)
    counts = []
    for path in (strategies.FedSuffix, strategies.HostApplied):
        worker, sites = _worker(resnet_block(seed=4), x, kind=kind, seed=7, strategy=path, batch_size=128)
        counts.append([worker.evaluate(_unit(worker, [s.name])) for s in sites])
        worker.source.close()
    assert counts[0] == counts[1]
    assert counts[0][0].correct[0].tolist() == [300, 300]  # σ = 0: the clean model's own predictions


def test_choose_picks_the_path_from_the_opset_rank_provider_and_source():
    spec = value_types(resnet_block())["b"]
    unknown = type(spec)(spec.name, spec.elem_type, None)
    cpu, cuda = "CPUExecutionProvider", "CUDAExecutionProvider"
    assert strategies.choose("walk", 17, [spec], cpu, "auto") is strategies.FedSuffix
    assert strategies.choose("walk", 17, [spec], cuda, "auto") is strategies.DrawnSuffix
    assert strategies.choose("walk", 22, [spec], cuda, "auto") is strategies.FedSuffix  # no random ops at 22+
    assert strategies.choose("walk", 17, [spec], cpu, "graph") is strategies.DrawnSuffix
    assert strategies.choose("walk", 9, [spec], cpu, "auto") is strategies.HostApplied
    assert strategies.choose("walk", 17, [unknown], cpu, "auto") is strategies.HostApplied
    assert strategies.choose("global", 17, [spec, spec], cpu, "auto") is strategies.FedGlobal
    assert strategies.choose("global", 9, [spec], cpu, "auto") is strategies.TermsGlobal
    assert strategies.choose("global", 17, [spec, unknown], cpu, "auto") is strategies.TermsGlobal


def test_clean_values_kept_by_the_clean_pass_spare_the_prefixes_and_change_nothing(monkeypatch):
    x = _x(300, 5)
    described = []
    real_session = Runtime.session

    def session(self, proto, what="model", **kw):
        described.append(what)
        return real_session(self, proto, what, **kw)

    monkeypatch.setattr(Runtime, "session", session)
    results = {}
    for budget in (256 << 20, 0):  # 0: nothing is kept or cached, every value comes from a prefix
        described.clear()
        worker, sites = _worker(resnet_block(seed=5), x, batch_size=64, cache_bytes=budget)
        worker.clean_pass(keep=True)
        results[budget] = [worker.evaluate(_unit(worker, [s.name], repeats=1)) for s in sites]
        results[budget, "prefixes"] = sum(w.startswith("part of the model before") for w in described)
        worker.source.close()
    assert results[256 << 20, "prefixes"] == 0 and results[0, "prefixes"] == len(sites)
    assert results[256 << 20] == results[0]


def test_kept_values_are_handed_over_site_by_site_and_then_forgotten():
    model = resnet_block(seed=6)
    worker, sites = _worker(model, _x(120, 6), batch_size=50)
    worker.clean_pass(keep=True)
    assert set(worker._kept) == {0, 1, 2}  # every batch
    before = worker.kept_bytes
    for site in sites:
        taken = worker._take(site.name)
        assert len(taken) == 3  # every batch of what this site reads, handed over
        assert set(taken[0]) == {site.name, *rewrite.suffix_plan(model, site.name, "logits")[1]}
        assert worker.kept_bytes <= before  # what a later site also reads (a skip value) stays
        before = worker.kept_bytes
    assert worker.kept_bytes == 0
    worker.source.close()


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
    assert [s.to_dict() for s in ahead.sites] == [s.to_dict() for s in in_turn.sites]


def test_device_copies_are_kept_only_for_cached_batches(monkeypatch):
    """With room in the cache for 5 of 20 batches, a walk holds the device copies of those 5 and of two more at most
    (the one running and the one whose ε is drawn ahead), not one per batch of the data set."""
    worker, sites = _worker(resnet_block(seed=10), _x(200, 10), batch_size=10, cache_bytes=0)
    worker.clean_pass(keep=True)
    assert worker.kept_bytes == 0
    worker.cache_bytes = 5 * 10 * 144 * 4  # 5 batches of site a (10 × 4×6×6 floats)
    held = []
    real = strategies.FedSuffix.run

    def run(self, values, sigmas, eps, device=None):
        held.append(len(worker._evaluations["walk", (sites[0].name,)].on_device))
        return real(self, values, sigmas, eps, device)

    monkeypatch.setattr(strategies.FedSuffix, "run", run)
    counts = worker.evaluate(_unit(worker, [sites[0].name], sigmas=(0.0, 1.0)))
    assert counts.samples == 200 and counts.correct[0].tolist() == [200, 200]  # σ = 0 agrees with the clean pass
    assert len(worker._evaluations["walk", (sites[0].name,)].cache) == 5
    assert len(held) > 20 and max(held) <= 5 + 2
    worker.source.close()


@pytest.mark.parametrize("kind", ["additive", "multiplicative", "combined"])
@pytest.mark.parametrize("build", [mlp, resnet_block])
def test_global_mode_gives_the_same_counts_with_the_noise_applied_in_the_graph_or_from_host_factors(kind, build):
    shape = (16,) if build is mlp else (1, 6, 6)
    x = _x(240, 12, shape)
    counts = []
    for path in (strategies.FedGlobal, strategies.TermsGlobal):
        worker, sites = _worker(build(seed=12), x, kind=kind, mode="global", batch_size=100, seed=5, ops=("all",),
                                strategy=path)
        names = [s.name for s in sites]
        counts.append(worker.evaluate(_unit(worker, names, sigmas=(0.05, 0.3, 1.0, 4.0))))
        if path is strategies.FedGlobal:
            # every float value is a site
            assert len(worker._evaluations["global", tuple(names)].strategy.program.eps) >= 3
        worker.source.close()
    assert counts[0] == counts[1]
    assert counts[0].correct.min() < 240  # the noise does bite


def test_packed_and_one_level_at_a_time_runs_give_the_same_counts():
    x = _x(96, 3)
    counts = []
    for pack in (True, False):
        worker, sites = _worker(resnet_block(seed=5), x, seed=11, pack=pack)
        counts.append([worker.evaluate(_unit(worker, [s.name], sigmas=(0.05, 0.2, 0.8, 3.2))) for s in sites])
        assert all(e.packable is pack for e in worker._evaluations.values())
        worker.source.close()
    assert counts[0] == counts[1]


def test_counts_of_disjoint_sample_ranges_add_up_to_their_union():
    worker, sites = _worker(resnet_block(seed=13), _x(600, 13), batch_size=100, seed=3)  # 10 blocks, the last short
    site = [sites[0].name]
    whole = worker.evaluate(_unit(worker, site, blocks=(0, 10)))
    parts = [worker.evaluate(_unit(worker, site, blocks=b)) for b in ((0, 3), (3, 4), (4, 10))]
    assert parts[0] + parts[1] + parts[2] == whole
    assert parts[2] + parts[0] + parts[1] == whole  # in any order
    assert whole.samples == 600
    worker.source.close()


@pytest.mark.parametrize("other", [dict(batch_size=256), dict(batch_size=100), dict(batch_size=7), dict(threads=3)])
def test_batch_size_and_threads_change_no_count(other):
    x = _x(500, 14)
    base = dict(batch_size=64, threads=1)
    results = []
    for args in (base, {**base, **other}):
        worker, sites = _worker(resnet_block(seed=14), x, seed=9, **args)
        stats = worker.clean_pass()
        results.append(([worker.evaluate(_unit(worker, [s.name])) for s in sites],
                        [stats.std(s.name) for s in sites], stats.correct))
        worker.source.close()
    assert results[0][0] == results[1][0]
    assert results[0][1:] == results[1][1:]  # the clean statistics are bit-identical too


def test_units_and_counts_travel_by_pickle():
    worker, sites = _worker(mlp(seed=1), np.random.default_rng(1).normal(size=(70, 16)).astype(np.float32))
    unit = _unit(worker, [sites[0].name])
    assert pickle.loads(pickle.dumps(unit)) == unit
    counts = worker.evaluate(unit)
    assert pickle.loads(pickle.dumps(counts)) == counts
    worker.source.close()


def test_a_worker_refuses_units_of_another_model_or_seed():
    worker, sites = _worker(mlp(seed=1), np.zeros((8, 16), np.float32))
    unit = _unit(worker, [sites[0].name])
    for wrong in (dict(model="0" * 64), dict(seed=unit.seed + 1)):
        with pytest.raises(walkaudit.WalkauditError):
            worker.evaluate(WorkUnit(**{**unit.__dict__, **wrong}))
    worker.source.close()


def test_graph_seeds_are_integers_unique_per_site_and_independent_of_the_selection():
    loaded = load_model(resnet_block())
    names = [o for node in loaded.proto.graph.node for o in node.output]
    for seed in (0, 839, 10**9, (1 << 63) - 1):
        seeds = [s for n in names for s in graph_seeds(seed, loaded, n)]
        assert len(set(seeds)) == len(seeds) and all(0 <= s < 1 << 24 for s in seeds)


def test_a_worker_built_from_the_resolved_audit_gives_the_drivers_counts():
    """What a remote worker gets (the resolved audit: model bytes, data, sites, targets, ...) rebuilds the same
    numbers."""
    import pickle

    model = resnet_block(seed=15)
    x = _x(200, 15)
    run = walkaudit.iter_audit(model, x, provider="cpu", seed=2, sigmas=(0.1, 1.0))
    run.start()
    here = run._executor.worker
    audit = pickle.loads(pickle.dumps(run.resolved.with_model_bytes(run.loaded.proto)))
    remote = audit.build(threads=1)
    for site in run.sites:
        unit = _unit(here, [site.name])
        assert remote.evaluate(unit) == here.evaluate(unit)
    assert remote._kept == {}  # no clean pass of its own
    remote.source.close()
    run.close()


def test_site_scales_give_each_site_its_own_sigma_in_one_global_unit():
    """Scale 0 silences a site exactly; scale 2 at σ equals scale 1 at 2σ bit for bit (powers of two are exact)."""
    x = _x(256, 16)
    worker, sites = _worker(resnet_block(seed=16), x, mode="global", seed=3, ops=("Conv", "Gemm"))
    names = tuple(s.name for s in sites)
    only_last, _ = _worker(resnet_block(seed=16), x, mode="global", seed=3, ops=("Conv", "Gemm"))
    silenced = worker.evaluate(WorkUnit(worker.key, names, (0.5, 2.0), 2, (0, 4), 3,
                                        site_scales=(0.0,) * (len(names) - 1) + (1.0,), mode="global"))
    alone = only_last.evaluate(WorkUnit(worker.key, names[-1:], (0.5, 2.0), 2, (0, 4), 3, mode="global"))
    assert silenced == alone
    doubled = worker.evaluate(WorkUnit(worker.key, names, (0.5,), 2, (0, 4), 3, site_scales=(2.0,) * len(names),
                                       mode="global"))
    plain = worker.evaluate(WorkUnit(worker.key, names, (1.0,), 2, (0, 4), 3, mode="global"))
    assert np.array_equal(doubled.correct, plain.correct) and doubled.correct.min() < 256  # the noise bites
    worker.source.close()
    only_last.source.close()
