"""The noise models have the requested statistics, σ = 0 is exact, and the normal numbers are reproducible.

Statistics are measured on 131 072 values per case drawn with fixed seeds, so every number below is deterministic;
the tolerances are stated next to each check and sit ≥ 7 standard errors away from the expected value.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from walkaudit import _noise as noise_mod
from walkaudit._graph import passes as rewrite
from walkaudit._loading.model import value_types
from walkaudit._noise import CHUNK, NoiseModel, NormalSource, make_noise
from walkaudit.errors import UsageError

from .models import mlp, resnet_block


def apply(y: np.ndarray, mul: np.ndarray | None, add: np.ndarray | None) -> np.ndarray:
    """y' = y · mul + add (with broadcasting), in y's dtype: the reference form the fast paths are checked against."""
    out = y * mul if mul is not None else np.array(y, copy=True)
    if add is not None:
        out = out + add
    return out.astype(y.dtype, copy=False)

SHAPE = (256, 512)  # one site value: 256 samples x 512 features
N = SHAPE[0] * SHAPE[1]
STD_TOL = 0.02  # relative error of a standard deviation; its standard error is 1/sqrt(2N) ≈ 0.002
MEAN_TOL = 5 / np.sqrt(N)  # in units of the noise std: 5 standard errors ≈ 0.014


def session(model):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.fixture
def source():
    src = NormalSource(seed=1234, threads=2)
    yield src
    src.close()


def draw(source: NormalSource, noise: NoiseModel, shape, key=(0,), repeats: int = 1) -> np.ndarray:
    """ε as the engine draws it: [draws, R, N, ...]."""
    return source.normal((noise.draws, repeats, *shape), key)


def activations(seed: int = 7) -> np.ndarray:
    """A site value with magnitudes bounded away from 0 (|y| in [0.5, 2]), both signs."""
    rng = np.random.default_rng(seed)
    return (rng.uniform(0.5, 2.0, SHAPE) * rng.choice([-1.0, 1.0], SHAPE)).astype(np.float32)


def noisy_value(noise: NoiseModel, sigma: float, y: np.ndarray, eps: np.ndarray) -> np.ndarray:
    mul, add = noise.factors(np.array([sigma]), eps)
    return apply(y, None if mul is None else mul[0, 0], None if add is None else add[0, 0])


# -- the noise models --------------------------------------------------------------------------------------------------
def test_additive_noise_has_std_sigma(source):
    noise, sigma, y = make_noise("additive"), 0.3, activations()
    out = noisy_value(noise, sigma, y, draw(source, noise, SHAPE))
    assert out.dtype == np.float32 and out.shape == SHAPE
    d = out.astype(np.float64) - y
    assert abs(d.std() / sigma - 1) < STD_TOL
    assert abs(d.mean()) < MEAN_TOL * sigma
    # the same noise for every magnitude of y
    small, large = np.abs(y) < 1, np.abs(y) >= 1
    assert abs(d[small].std() / d[large].std() - 1) < 2 * STD_TOL


def test_multiplicative_noise_is_y_times_normal_1_sigma(source):
    noise, sigma, y = make_noise("multiplicative"), 0.3, activations()
    out = noisy_value(noise, sigma, y, draw(source, noise, SHAPE))
    rel = (out.astype(np.float64) - y) / y
    assert abs(rel.std() / sigma - 1) < STD_TOL
    assert abs(rel.mean()) < MEAN_TOL * sigma
    # the absolute noise scales with |y|: std(y'−y) is σ·rms(y) in each magnitude band
    d = out.astype(np.float64) - y
    for band in (np.abs(y) < 1, np.abs(y) >= 1):
        want = sigma * np.sqrt(np.mean(np.square(y[band].astype(np.float64))))
        assert abs(d[band].std() / want - 1) < 2 * STD_TOL


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.9])
def test_combined_noise_splits_sigma_by_ratio(source, ratio):
    noise, sigma, y = make_noise("combined", ratio), 0.4, activations()
    sm, sa = noise.scales(np.array(sigma))
    assert np.isclose(sm, sigma * (1 - ratio)) and np.isclose(sa, sigma * ratio)
    assert noise.draws == 2
    eps = draw(source, noise, SHAPE)
    out = noisy_value(noise, sigma, y, eps)
    d = out.astype(np.float64) - y
    y64 = y.astype(np.float64)
    # var(y'−y) = (σm·y)² + σa², element by element: the standardised difference has std 1
    z = d / np.sqrt((sm * y64) ** 2 + sa**2)
    assert abs(z.std() - 1) < STD_TOL
    assert abs(z.mean()) < MEAN_TOL
    for band in (np.abs(y) < 1, np.abs(y) >= 1):
        want = np.sqrt(np.mean((sm * y64[band]) ** 2) + sa**2)
        assert abs(d[band].std() / want - 1) < 2 * STD_TOL
    # the two terms come from independent draws
    mul, add = noise.factors(np.array([sigma]), eps)
    assert abs(np.corrcoef((mul[0, 0] - 1).ravel(), add[0, 0].ravel())[0, 1]) < 0.02  # s.e. 1/sqrt(N) ≈ 0.0028


def test_scales_and_missing_terms():
    s = np.array([0.0, 0.5, 2.0])
    sm, sa = make_noise("additive").scales(s)
    assert sm is None and np.array_equal(sa, s)
    sm, sa = make_noise("multiplicative").scales(s)
    assert sa is None and np.array_equal(sm, s)
    eps = np.ones((1, 2, 3, 4), np.float32)
    mul, add = make_noise("additive").factors(s, eps)
    assert mul is None and add.shape == (2, 3, 3, 4)
    mul, add = make_noise("multiplicative").factors(s, eps)
    assert add is None and mul.shape == (2, 3, 3, 4)


@pytest.mark.parametrize("kind, ratio", [("unknown", 0.5), ("combined", 1.5), ("combined", -0.1)])
def test_bad_noise_settings_are_usage_errors(kind, ratio):
    with pytest.raises(UsageError):
        make_noise(kind, ratio)


# -- σ = 0 and common random numbers -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["additive", "multiplicative", "combined", "uniform"])
def test_sigma_zero_is_bit_identical(source, kind):
    noise = make_noise(kind, 0.3)
    y = activations()
    y[0, :8] = [0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -3.4e38, 3.4e38]  # zeros, specials, subnormal, extremes
    mul, add = noise.factors(np.array([0.0]), draw(source, noise, SHAPE))
    if mul is not None:
        assert np.all(mul == 1)
    if add is not None:
        assert np.all(add == 0)
    out = apply(y, None if mul is None else mul[0, 0], None if add is None else add[0, 0])
    assert out.dtype == y.dtype and np.array_equal(out, y, equal_nan=True)
    assert not np.shares_memory(out, y)  # apply never hands back the caller's array


@pytest.mark.parametrize("kind", ["additive", "multiplicative", "combined", "uniform"])
def test_levels_share_one_draw(source, kind):
    """Common random numbers: the terms of level l are the same ε scaled by σ_l, exactly (float32 arithmetic)."""
    noise = make_noise(kind, 0.3)
    sigmas = np.array([0.0, 0.01, 0.1, 1.0, 3.0])
    eps = draw(source, noise, (16, 8), repeats=3)
    mul, add = noise.factors(sigmas, eps)
    sm, sa = noise.scales(sigmas)
    for r in range(3):
        for level in range(len(sigmas)):
            if mul is not None:
                assert np.array_equal(mul[r, level], eps[0, r] * np.float32(sm[level]) + np.float32(1))
            if add is not None:
                assert np.array_equal(add[r, level], eps[-1, r] * np.float32(sa[level]))
    # and repeats are different draws
    term = add if add is not None else mul
    assert not np.array_equal(term[0, 1], term[1, 1])


# -- the graph path gives the same values as the host path ------------------------------------------------------------
@pytest.mark.parametrize("kind", ["additive", "multiplicative", "combined", "uniform"])
def test_graph_terms_match_host_apply_at_an_output_site(source, kind):
    """inject at the class output: the graph's Mul/Add give exactly noise.apply(y, mul, add)."""
    noise = make_noise(kind, 0.4)
    model = mlp(features=16, hidden=32, classes=4)
    types = value_types(model)
    x = np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32)
    y = session(model).run(["logits"], {"x": x})[0]
    sm, sa = noise.scales(np.ones(1))
    injected, [inj] = rewrite.inject(model, ["logits"], types, has_mul=sm is not None, has_add=sa is not None)
    sigmas = np.array([0.0, 0.2, 1.5])
    mul, add = noise.factors(sigmas, draw(source, noise, y.shape))
    sess = session(injected)
    for level in range(len(sigmas)):
        feeds = {"x": x}
        if inj.mul:
            feeds[inj.mul] = mul[0, level]
        if inj.add:
            feeds[inj.add] = add[0, level]
        got = sess.run(["logits"], feeds)[0]
        want = apply(y, None if mul is None else mul[0, level], None if add is None else add[0, level])
        assert np.array_equal(got, want)
        if sigmas[level] == 0:
            assert np.array_equal(got, y)
        else:
            assert not np.array_equal(got, y)


@pytest.mark.parametrize("build, site", [(mlp, "h"), (resnet_block, "b"), (resnet_block, "a")],
                         ids=["mlp-h", "resnet-b", "resnet-a"])
@pytest.mark.parametrize("kind", ["additive", "combined", "uniform"])
def test_walk_and_global_paths_agree(source, build, site, kind):
    """Noise at one site, σ levels packed along the batch: the suffix fed apply(y) (walk) and the whole model fed the
    terms (global) give identical class scores, level by level; σ = 0 gives the clean scores."""
    noise = make_noise(kind, 0.3)
    model = build()
    types = value_types(model)
    shape = [d if isinstance(d, int) else 6 for d in types["x"].shape]
    x = np.random.default_rng(2).normal(size=shape).astype(np.float32)
    part = rewrite.suffix(model, site, "logits", types)
    needed = [site, *part.frontier]
    exposed = rewrite.expose(model, needed, types)
    got = session(exposed).run(["logits", *needed], {"x": x})
    clean_logits, clean = got[0], dict(zip(needed, got[1:]))
    y = clean[site]
    sigmas = np.array([0.0, 0.1, 1.0])
    levels = len(sigmas)
    mul, add = noise.factors(sigmas, draw(source, noise, y.shape, key=(5,)))
    # walk: the host applies the terms and feeds [L·N, ...]
    noisy = apply(y[None], None if mul is None else mul[0], None if add is None else add[0])
    feeds = {site: noisy.reshape(levels * y.shape[0], *y.shape[1:])}
    feeds.update({f: np.concatenate([clean[f]] * levels) for f in part.frontier})
    walk = session(part.model).run(["logits"], feeds)[0].reshape(levels, y.shape[0], -1)
    # global: the rewritten model reads the terms as inputs
    sm, sa = noise.scales(np.ones(1))
    injected, [inj] = rewrite.inject(model, [site], types, has_mul=sm is not None, has_add=sa is not None)
    terms = {"x": np.concatenate([x] * levels)}
    if inj.mul:
        terms[inj.mul] = mul[0].reshape(levels * y.shape[0], *y.shape[1:])
    if inj.add:
        terms[inj.add] = add[0].reshape(levels * y.shape[0], *y.shape[1:])
    whole = session(injected).run(["logits"], terms)[0].reshape(levels, y.shape[0], -1)
    assert np.array_equal(walk, whole)
    assert np.array_equal(walk[0], clean_logits)
    assert not np.array_equal(walk[2], clean_logits)


# -- the source of normal numbers --------------------------------------------------------------------------------------
SIZE = 3 * CHUNK + 12345  # several chunks and a partial one


def test_normal_source_is_reproducible_whatever_the_threads():
    one, four = NormalSource(99, threads=1), NormalSource(99, threads=4)
    try:
        a = one.normal((SIZE,), (1, 2))
        b = four.normal((SIZE,), (1, 2))
        c = four.normal((SIZE,), (1, 2))  # a second call with the same key replays
        assert a.dtype == np.float32 and a.shape == (SIZE,)
        assert np.array_equal(a, b) and np.array_equal(b, c)
        shaped = four.normal((3, CHUNK + 4115), (1, 2))  # the numbers follow the flat index, whatever the shape
        assert np.array_equal(shaped.ravel(), a[: shaped.size])
    finally:
        one.close()
        four.close()


def test_normal_source_keys_and_seeds_give_different_numbers():
    src, other = NormalSource(99, threads=2), NormalSource(100, threads=2)
    try:
        base = src.normal((SIZE,), (1, 2))
        for different in (src.normal((SIZE,), (1, 3)), src.normal((SIZE,), (2, 1)), src.normal((SIZE,), (1, 2, 0)),
                          other.normal((SIZE,), (1, 2))):
            assert not np.any(different[:1000] == base[:1000])  # independent streams: no shared values
            assert abs(np.corrcoef(different, base)[0, 1]) < 0.01  # s.e. 1/sqrt(SIZE) ≈ 0.0011
        # and no chunk repeats another chunk of the same draw
        chunks = base[: 3 * CHUNK].reshape(3, CHUNK)
        assert not np.array_equal(chunks[0], chunks[1]) and not np.array_equal(chunks[1], chunks[2])
    finally:
        src.close()
        other.close()


def test_normal_source_keys_of_different_lengths_do_not_collide():
    """numpy's SeedSequence pads short entropy with zeros; keys that differ by trailing zeros or by where the chunk
    index sits must still draw different numbers."""
    src = NormalSource(99, threads=1)
    try:
        k1 = src.normal((3 * CHUNK,), (1,))
        assert not np.array_equal(src.normal((10,), (1, 0))[:10], k1[:10])
        assert not np.array_equal(src.normal((CHUNK,), (1, 2)), k1[2 * CHUNK :])  # (1,) chunk 2 vs (1, 2) chunk 0
        assert not np.array_equal(src.normal((CHUNK + 10,), ())[CHUNK:], k1[:10])  # () chunk 1 vs (1,) chunk 0
    finally:
        src.close()


def test_normal_source_is_standard_normal():
    src = NormalSource(5, threads=2)
    try:
        z = src.normal((SIZE,), (0,)).astype(np.float64)
    finally:
        src.close()
    se = 1 / np.sqrt(SIZE)  # ≈ 0.0011
    assert abs(z.mean()) < 7 * se
    assert abs(z.std() - 1) < 7 * se
    assert abs(np.mean(z**3)) < 7 * np.sqrt(15) * se  # symmetric (var of z³ is 15)
    assert abs(np.mean(z**4) - 3) < 7 * np.sqrt(96) * se  # normal kurtosis (var of z⁴ is 96)
    assert abs(np.mean(np.abs(z) < 1) - 0.6827) < 0.005


@pytest.mark.parametrize("kind", ["additive", "multiplicative", "combined", "uniform"])
@pytest.mark.parametrize("threads", [1, 3])
def test_noisy_levels_is_bit_identical_to_terms_then_apply(kind, threads):
    """The engine's level-by-level, threaded computation must give the same bits as the reference formula."""

    rng = np.random.default_rng(9)
    y = rng.normal(size=(7, 2, 3)).astype(np.float32)
    eps = rng.normal(size=(2, 1, 7, 2, 3)).astype(np.float32)
    sigmas = np.array([0.0, 0.03, 0.7, 5.0])
    noise = make_noise(kind, ratio=0.4)
    mul, add = noise.factors(sigmas, eps)
    want = apply(y[None], None if mul is None else mul[0], None if add is None else add[0])
    source = NormalSource(0, threads)
    try:
        got = noise.host(y, sigmas, eps, source.map)
    finally:
        source.close()
    assert got.tobytes() == want.tobytes()
    assert np.array_equal(got[0], y)  # σ = 0


@pytest.mark.parametrize("size", [1, 7, 100_001])
def test_box_muller_fills_every_element_with_standard_normals(size):
    from scipy import stats

    from walkaudit._noise import box_muller

    out = np.full(size, np.nan, dtype=np.float32)
    box_muller(np.random.default_rng(11), out)
    assert np.isfinite(out).all() and np.abs(out).max() < 5.8  # r = √(−2 ln u) with u ≥ 2⁻²⁴
    if size > 1000:
        # seeded, so deterministic; the bound is the KS critical value at α = 0.001
        assert stats.kstest(out.astype(np.float64), "norm").statistic < 1.95 / np.sqrt(size)
        half = (size + 1) // 2  # the two halves hold r·cos θ and r·sin θ of the same pairs: uncorrelated
        rest = size - half
        corr = np.corrcoef(out[:rest], out[half:])[0, 1]
        assert abs(corr) < 5 / np.sqrt(rest)
        # and so are their squares (a dependence that correlation of the values would miss)
        assert abs(np.corrcoef(out[:rest] ** 2, out[half:] ** 2)[0, 1]) < 5 / np.sqrt(rest)


def test_a_samples_eps_does_not_depend_on_how_rows_are_batched():
    """ε of rows [0, 300) drawn at once equals ε drawn in unaligned pieces (blocks are drawn whole and sliced)."""
    from walkaudit._units import BLOCK

    src = NormalSource(5, threads=2)
    whole = src.rows("conv1", 0, 2, range(300), (3, 4))
    pieces = np.concatenate([src.rows("conv1", 0, 2, range(a, b), (3, 4))
                             for a, b in ((0, 7), (7, 64), (64, 200), (200, 201), (201, 300))])
    assert np.array_equal(whole, pieces)
    assert np.array_equal(whole[BLOCK : 2 * BLOCK], src.normal((BLOCK, 3, 4), (noise_mod.name_key("conv1"), 0, 1, 2)))
    src.close()


def test_eps_keys_separate_sites_terms_repeats_and_seeds():
    src = NormalSource(5, threads=1)
    base = src.rows("conv1", 0, 0, range(64), (8,))
    for other in (src.rows("conv2", 0, 0, range(64), (8,)), src.rows("conv1", 1, 0, range(64), (8,)),
                  src.rows("conv1", 0, 1, range(64), (8,)), src.rows("conv1", 0, 0, range(64, 128), (8,)),
                  NormalSource(6, threads=1).rows("conv1", 0, 0, range(64), (8,))):
        assert not np.any(base == other)  # independent streams: not one equal value out of 512
    assert noise_mod.name_key("a") != noise_mod.name_key("b") and noise_mod.name_key("a") == noise_mod.name_key("a")
    src.close()


# -- uniform noise -----------------------------------------------------------------------------------------------------
def test_uniform_source_is_uniform_on_minus_half_half():
    """U(−½, ½): seeded, so deterministic; the KS bound is the critical value at α = 0.001, the moments within 7
    standard errors."""
    from scipy import stats

    src = NormalSource(3, threads=2)
    u = src.normal((SIZE,), (1, 2), dist="uniform").astype(np.float64)
    src.close()
    assert u.min() >= -0.5 and u.max() < 0.5
    assert stats.kstest(u, stats.uniform(loc=-0.5, scale=1).cdf).statistic < 1.95 / np.sqrt(SIZE)
    se = np.sqrt(1 / 12 / SIZE)
    assert abs(u.mean()) < 7 * se
    assert abs(u.std() - np.sqrt(1 / 12)) < 0.005


def test_uniform_noise_stays_within_half_a_step_with_std_width_over_sqrt12(source):
    noise, width, y = make_noise("uniform"), 0.3, activations()
    eps = source.normal((1, 1, *SHAPE), (4,), dist="uniform")
    d = noise.host(y, np.array([width]), eps)[0].astype(np.float64) - y
    assert np.abs(d).max() <= width / 2 * (1 + 1e-6)
    assert abs(d.std() / (width / np.sqrt(12)) - 1) < STD_TOL
    assert abs(d.mean()) < MEAN_TOL * width / np.sqrt(12)


def test_the_kinds_of_draw_never_share_numbers():
    src = NormalSource(5, threads=1)
    normal, uniform = (src.rows("conv1", 0, 0, range(64), (8,), dist=d) for d in ("normal", "uniform"))
    words = src.rows("conv1", 0, 0, range(64), (8,), dist="bits").view(np.uint32)
    src.close()
    assert not np.any(np.isclose(normal, uniform))
    assert len(np.unique(words)) == words.size  # 512 uniform words: distinct (a clash has odds of 3e-5)


def test_uniform_noise_drawn_in_the_graph_is_uniform():
    """`--noise-source graph` draws uniform ε with RandomUniformLike on (−½, ½): y' − y is within ±w/2, std w/√12."""
    noise = make_noise("uniform")
    model = mlp(features=16, hidden=512, classes=4)
    types = value_types(model)
    program = rewrite.graph_noise(rewrite.suffix(model, "h", "logits", types), types, False, True, seeds=(4, 5),
                                  noise=noise)
    assert any(n.op_type == "RandomUniformLike" for n in program.model.graph.node)
    h = np.random.default_rng(1).normal(size=(256, 512)).astype(np.float32)
    width = 0.5
    noisy = rewrite.expose(program.model, ["h"], types)
    got = session(noisy).run(["h"], {program.site: h, program.sigma_add: np.full((1, 1, 1), width, np.float32)})[0]
    d = got.astype(np.float64) - h
    assert np.abs(d).max() <= width / 2 * (1 + 1e-6)
    assert abs(d.std() / (width / np.sqrt(12)) - 1) < STD_TOL


# -- quantisation ------------------------------------------------------------------------------------------------------
def test_quantize_rounds_each_sample_to_2_to_the_b_levels_of_its_own_range():
    from walkaudit._noise.quantize import step

    noise = make_noise("quantize")
    y = activations()[:32]
    y[3] = 0.25  # a constant sample: nothing to round
    out = noise.host(y, step([8, 4, 1]))
    for level, bits in enumerate((8, 4, 1)):
        for n in range(len(y)):
            lo, hi = y[n].min(), y[n].max()
            got = out[level, n]
            assert got.min() >= lo and got.max() <= hi
            assert len(np.unique(got)) <= 2**bits
            if hi > lo:
                delta = (hi - lo) / (2**bits - 1)
                assert np.abs(got - y[n]).max() <= delta / 2 * (1 + 1e-5)
                grid = (got.astype(np.float64) - lo) / delta
                assert np.allclose(grid, np.rint(grid), atol=1e-3)  # on the grid of its own range
            else:
                assert np.array_equal(got, y[n])
    assert np.unique(out[2, 0]).tolist() == sorted({float(y[0].min()), float(y[0].max())})  # 1 bit: min or max


def test_quantize_error_falls_with_bits_and_sigma_zero_is_exact():
    from walkaudit._noise.quantize import bits_of, step

    noise = make_noise("quantize")
    y = activations()
    bits = np.array([1, 2, 4, 8, 12])
    errors = [np.abs(q - y).mean() for q in noise.host(y, step(bits))]
    assert all(a > b for a, b in zip(errors, errors[1:]))
    assert np.array_equal(noise.host(y, [0.0])[0], y)
    assert np.allclose(bits_of(step(bits)), bits) and np.all(np.diff(step(bits)) < 0)  # the axis rises as B falls
    assert noise.level_of(float(step(6))) == pytest.approx(6)


def test_quantize_takes_each_samples_range_along_its_sample_axis():
    """A sample's quantised value depends on that sample only: alone, or in a batch, along axis 0 or axis 1."""
    noise = make_noise("quantize")
    y = activations()[:16].reshape(16, 8, 64)
    alone = np.stack([noise.host(y[n : n + 1], [0.05])[0, 0] for n in range(16)])
    assert np.array_equal(noise.host(y, [0.05])[0], alone)
    moved = np.ascontiguousarray(y.swapaxes(0, 1))  # [8, 16, 64], samples along axis 1
    assert np.array_equal(noise.host(moved, [0.05], axis=1)[0].swapaxes(0, 1), alone)


def test_quantize_bits_give_a_fixed_grid_walked_downwards():
    from walkaudit._noise.quantize import step

    noise = make_noise("quantize", bits="2-4,8")
    assert noise.grid() == tuple(float(s) for s in step([8, 4, 3, 2]))
    assert make_noise("quantize").grid() is None
    for bad in ("0", "25", "eight", "4-"):
        with pytest.raises(UsageError):
            make_noise("quantize", bits=bad)


# -- the new models through the engine ---------------------------------------------------------------------------------
def _counts(kind: str, batch_size: int, strategy=None, bits=None, sigmas=(0.0, 0.05, 0.3, 2.0)):
    from walkaudit._execution.runtime import Runtime
    from walkaudit._execution.worker import Worker
    from walkaudit._graph.sites import Selection, select
    from walkaudit._loading.data import from_arrays
    from walkaudit._loading.model import load_model
    from walkaudit._units import WorkUnit

    loaded = load_model(resnet_block(seed=4))
    x = np.random.default_rng(4).normal(size=(300, 1, 6, 6)).astype(np.float32)
    sites = select(loaded.proto, loaded.types, Selection(), loaded.class_output.name)
    worker = Worker(loaded, from_arrays(x, None, loaded.inputs), runtime=Runtime("cpu"),
                    noise=make_noise(kind, bits=bits), source=NormalSource(7, threads=1), sites=sites,
                    batch_size=batch_size, strategy=strategy)
    try:
        return [worker.evaluate(WorkUnit(worker.key, (s.name,), tuple(sigmas), 2, (0, 5), 7)) for s in sites]
    finally:
        worker.source.close()


def test_uniform_noise_gives_the_same_counts_applied_in_the_graph_or_on_the_host():
    from walkaudit._execution import strategies

    fed, host = (_counts("uniform", 128, path) for path in (strategies.FedSuffix, strategies.HostApplied))
    assert fed == host
    assert fed[0].correct[0].tolist() == [300, 300] and fed[0].correct[-1].min() < 300


@pytest.mark.parametrize("kind, sigmas", [("quantize", (0.0, 1 / 15, 1 / 3, 1.0)), ("bitflip", (0.0, 1e-4, 1e-2, 0.1))])
def test_host_only_models_give_counts_independent_of_the_batch_size(kind, sigmas):
    """Quantize (per-sample ranges) and bit flips (keyed words) run on the host path; a sample's numbers depend on
    the sample only, so batches of 128 and 7 count the same, and the noise bites as its level rises."""
    a, b = (_counts(kind, size, sigmas=sigmas) for size in (128, 7))
    assert a == b
    assert a[0].correct[0].tolist() == [300, 300]  # level 0: the clean model's own predictions
    assert a[0].correct[-1].max() < a[0].correct[1].min()
