"""The in-graph noise source (RandomNormalLike, the GPU path) run on the CPU provider."""

from __future__ import annotations

import numpy as np
import pytest

import walkaudit
from walkaudit._graph import passes as rewrite
from walkaudit._loading.model import value_types
from walkaudit.errors import UsageError

from .models import cpu_session, mlp, resnet_block


def scales(kind: str, sigma, ratio: float = 0.25) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(σ of the multiplicative term, σ of the additive term) of a noise kind, as the noise models define them
    (kept here so that these tests of the graph do not depend on the noise module's API)."""
    sigma = np.asarray(sigma, dtype=np.float64)
    if kind == "additive":
        return None, sigma
    if kind == "multiplicative":
        return sigma, None
    return sigma * (1.0 - ratio), sigma * ratio


@pytest.mark.parametrize("kind", ["additive", "multiplicative", "combined"])
def test_graph_noise_has_the_requested_statistics_per_level(kind):
    """The site is the class output, so the program returns the noisy site itself: [G·N, C]."""
    model = mlp(seed=0)
    types = value_types(model)
    sm, sa = scales(kind, np.ones(1))
    program = rewrite.graph_noise(rewrite.suffix(model, "logits", "logits", types), types, sm is not None,
                                  sa is not None, seeds=(6, 7))
    y = np.random.default_rng(0).normal(2.0, 1.0, size=(4000, 4)).astype(np.float32)
    sigmas = np.array([0.0, 0.1, 0.5])
    feeds = {program.site: y}
    m, a = scales(kind, sigmas)
    if program.sigma_mul:
        feeds[program.sigma_mul] = m.astype(np.float32).reshape(-1, 1, 1)
    if program.sigma_add:
        feeds[program.sigma_add] = a.astype(np.float32).reshape(-1, 1, 1)
    out = cpu_session(program.model).run(["logits"], feeds)[0].reshape(3, *y.shape)
    assert np.array_equal(out[0], y)  # σ = 0 is bit-identical
    for level, sigma in enumerate(sigmas[1:], start=1):
        diff = (out[level] - y).astype(np.float64)
        sm_, sa_ = scales(kind, np.array([sigma]))
        var_mul = 0.0 if sm_ is None else float((sm_[0] ** 2 * y.astype(np.float64) ** 2).mean())
        var_add = 0.0 if sa_ is None else float(sa_[0] ** 2)
        want = np.sqrt(var_mul + var_add)
        # 16000 values: the std of a std estimate is ~0.6 %; allow 3 %
        assert np.sqrt((diff**2).mean()) == pytest.approx(want, rel=0.03)
    # common random numbers: the levels scale the same ε
    if kind == "additive":
        np.testing.assert_allclose((out[2] - y) / 0.5, (out[1] - y) / 0.1, rtol=1e-3, atol=1e-4)


def test_graph_noise_on_a_residual_block_tiles_the_skip_value():
    model = resnet_block(seed=1)
    types = value_types(model)
    sfx = rewrite.suffix(model, "b", "logits", types)
    assert sfx.frontier == ("a",)  # the skip connection from before the site
    program = rewrite.graph_noise(sfx, types, False, True, seed=0)
    x = np.random.default_rng(1).normal(size=(5, 1, 6, 6)).astype(np.float32)
    clean = cpu_session(rewrite.expose(model, ["a", "b"], types)).run(["logits", "a", "b"], {"x": x})
    out = cpu_session(program.model).run(["logits"], {program.site: clean[2], program.frontier[0]: clean[1],
                                                   program.sigma_add: np.zeros((3, 1, 1, 1, 1), np.float32)})[0]
    assert np.array_equal(out, np.concatenate([clean[0]] * 3))


def test_graph_noise_for_one_level_reads_the_skip_value_as_fed_and_gives_the_same_numbers():
    """tile=False: no copy of the frontier per run (no Expand), and for one level the tiled program's output."""
    model = resnet_block(seed=1)
    types = value_types(model)
    sfx = rewrite.suffix(model, "b", "logits", types)
    x = np.random.default_rng(1).normal(size=(5, 1, 6, 6)).astype(np.float32)
    clean = cpu_session(rewrite.expose(model, ["a", "b"], types)).run(["a", "b"], {"x": x})
    eps = np.random.default_rng(2).normal(size=(1, *clean[1].shape)).astype(np.float32)
    outs = []
    for tile in (True, False):
        program = rewrite.graph_noise(sfx, types, False, True, fed=True, tile=tile)
        assert any(n.op_type == "Expand" for n in program.model.graph.node) is tile
        assert (program.frontier == sfx.frontier) is not tile  # untiled: the frontier keeps its names
        outs.append(cpu_session(program.model).run(["logits"], {
            program.site: clean[1], program.frontier[0]: clean[0], program.eps_add: eps,
            program.sigma_add: np.full((1, 1, 1, 1, 1), 0.3, np.float32)})[0])
    assert np.array_equal(outs[0], outs[1])
    assert not np.array_equal(outs[0], cpu_session(model).run(["logits"], {"x": x})[0])  # the noise is there


def test_audit_with_graph_noise_is_reproducible_and_close_to_host_noise():
    """Same seed, same report; graph-drawn and host-drawn ε have the same distribution, so midpoints averaged over
    four seeds agree within 0.1 decades (a single seed's midpoints of a 400-sample site scatter by ±0.1)."""
    model = resnet_block(seed=2)
    x = np.random.default_rng(2).normal(size=(400, 1, 6, 6)).astype(np.float32)
    args = {"provider": "cpu", "repeats": 2}
    a = walkaudit.audit(model, x, noise_source="graph", seed=4, **args).to_dict()
    b = walkaudit.audit(model, x, noise_source="graph", seed=4, **args).to_dict()
    assert a["runtime"]["noise_source"] == "graph" and a["sites"] == b["sites"]
    mean = {}
    for source in ("graph", "host"):
        reports = [walkaudit.audit(model, x, noise_source=source, seed=s, **args).to_dict() for s in range(4)]
        assert {r["runtime"]["noise_source"] for r in reports} == {source}
        mean[source] = np.mean([[np.log10(s["midpoint"]) for s in r["sites"]] for r in reports], axis=0)
    assert np.all(np.abs(mean["graph"] - mean["host"]) < 0.1), mean


def test_graph_noise_refuses_opsets_without_random_ops():
    model = mlp(opset=22)
    with pytest.raises(UsageError, match="opset 10 to 21"):
        walkaudit.audit(model, np.zeros((8, 16), np.float32), noise_source="graph", provider="cpu")


# -- seeds ------------------------------------------------------------------------------------------------------------
def _seed_attributes(program: rewrite.GraphNoise) -> dict[str, float]:
    """RandomNormalLike node name -> its seed attribute, as stored in the proto (float32)."""
    return {n.name: next(a.f for a in n.attribute if a.name == "seed")
            for n in program.model.graph.node if n.op_type == "RandomNormalLike"}


@pytest.mark.parametrize("seeds", [(0, 1), (12345, 54321), (2**24 - 1, 2**24 - 2)])
def test_graph_seeds_read_back_as_exactly_the_integers_given(seeds):
    model = mlp(seed=0)
    types = value_types(model)
    program = rewrite.graph_noise(rewrite.suffix(model, "h", "logits", types), types, True, True, seeds=seeds)
    attrs = _seed_attributes(program)
    assert sorted(attrs) == ["walkaudit/eps_add", "walkaudit/eps_mul"]
    assert (attrs["walkaudit/eps_mul"], attrs["walkaudit/eps_add"]) == seeds
    assert all(float(v).is_integer() for v in attrs.values())


def test_graph_seed_keeps_its_old_meaning():
    model = mlp(seed=0)
    types = value_types(model)
    program = rewrite.graph_noise(rewrite.suffix(model, "h", "logits", types), types, True, True, seed=21)
    assert _seed_attributes(program) == {"walkaudit/eps_mul": 42.0, "walkaudit/eps_add": 43.0}


@pytest.mark.parametrize("seeds", [(-1, 0), (0, 2**24), (1.0, 2), (True, 3), ("1", 2), (1, 2, 3)])
def test_graph_seeds_outside_float32_integers_are_refused(seeds):
    model = mlp(seed=0)
    types = value_types(model)
    sfx = rewrite.suffix(model, "h", "logits", types)
    with pytest.raises(ValueError, match="seed"):
        rewrite.graph_noise(sfx, types, True, True, seeds=seeds)


def test_graph_seed_and_seeds_together_are_refused():
    model = mlp(seed=0)
    types = value_types(model)
    with pytest.raises(ValueError, match="not both"):
        rewrite.graph_noise(rewrite.suffix(model, "h", "logits", types), types, False, True, seed=1, seeds=(2, 3))
