"""Weight noise: a site is a layer's weight initializer, perturbed once per repeat, and the engine's counts equal a
reference that runs the whole model with the perturbed weight put in place of the initializer.

Reference: for each repeat the same draw (`NoiseModel.draw_weight`, keyed by seed, weight, term and repeat), the
model copied with W' in the initializer, run by onnxruntime with every optimisation off; counted against the clean
model's predictions. The engine runs only the suffix after the weight; both are exact sessions, so the counts are
equal, not close.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from walkaudit._execution import strategies
from walkaudit._execution.runtime import Runtime
from walkaudit._execution.worker import Worker
from walkaudit._graph.sites import Selection, select
from walkaudit._graph.weights import SHARE_BYTES
from walkaudit._loading.data import from_arrays
from walkaudit._loading.model import load_model
from walkaudit._noise import NormalSource, make_noise
from walkaudit._units import BLOCK, WorkUnit
from walkaudit.errors import UsageError

from .models import IR, mlp, resnet_block


def shared_weight_model(seed: int = 0) -> onnx.ModelProto:
    """x -> MatMul(w) -> Relu -> MatMul(w) (the same initializer read twice) -> Gemm -> logits."""
    rng = np.random.default_rng(seed)
    f = lambda a, n: numpy_helper.from_array(np.asarray(a, np.float32), n)  # noqa: E731
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h1"], name="fc1"),
             helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
             helper.make_node("MatMul", ["r1", "w"], ["h2"], name="fc2"),
             helper.make_node("Gemm", ["h2", "w_out", "b_out"], ["logits"], name="head")]
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
                              [f(rng.normal(0, 0.25, (16, 16)), "w"), f(rng.normal(0, 0.25, (16, 4)), "w_out"),
                               f(np.zeros(4), "b_out")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR)


def plain(model: onnx.ModelProto):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def engine(model, x, kind, batch_size=64, seed=3, **noise):
    loaded = load_model(model)
    noise = make_noise(kind, **noise)
    sites = select(loaded.proto, loaded.types, Selection(), loaded.class_output.name, target=noise.target)
    worker = Worker(loaded, from_arrays(x, None, loaded.inputs), runtime=Runtime("cpu", exact=True), noise=noise,
                    source=NormalSource(seed, threads=1), sites=sites, batch_size=batch_size)
    return worker, sites


def counts(worker, site, sigmas, repeats=2):
    blocks = (0, -(-worker.data.samples // BLOCK))
    return worker.evaluate(WorkUnit(worker.key, (site,), tuple(sigmas), repeats, blocks, worker.source.seed))


def reference(model, x, noise, site, sigmas, repeats=2, seed=3) -> np.ndarray:
    """Correct predictions per (level, repeat) with W' in the model's initializer (a row with NaN/Inf scores is
    wrong, as the engine counts it)."""
    clean = np.argmax(plain(model).run(["logits"], {"x": x})[0], axis=1)
    init = next(t for t in model.graph.initializer if t.name == site)
    w = numpy_helper.to_array(init)
    src = NormalSource(seed, threads=1)
    out = np.zeros((len(sigmas), repeats), np.int64)
    for r in range(repeats):
        eps = np.zeros((noise.draws, 1, *w.shape), np.float32)
        for term in range(noise.draws):
            noise.draw_weight(src, site, term, r, out=eps[term, 0])
        for level, sigma in enumerate(sigmas):
            changed = onnx.ModelProto()
            changed.CopyFrom(model)
            target = next(t for t in changed.graph.initializer if t.name == site)
            target.CopyFrom(numpy_helper.from_array(noise.host(w, [sigma], eps)[0].astype(w.dtype), site))
            logits = plain(changed).run(["logits"], {"x": x})[0]
            pred = np.where(np.isfinite(logits).all(axis=1), np.argmax(logits, axis=1), -1)  # NaN/Inf: wrong
            out[level, r] = int((pred == clean).sum())
    src.close()
    return out


@pytest.mark.parametrize("kind, sigmas, noise", [
    ("weight-additive", (0.0, 0.05, 0.3, 1.5), {}),
    ("weight-multiplicative", (0.0, 0.2, 1.0, 4.0), {}),
    ("bitflip", (0.0, 1e-3, 2e-2, 0.1), {"target": "weights", "bits": "exponent,sign"}),
])
def test_weight_noise_counts_equal_the_whole_model_with_the_perturbed_weight(kind, sigmas, noise):
    model = resnet_block(seed=6)
    x = np.random.default_rng(6).normal(size=(150, 1, 6, 6)).astype(np.float32)
    worker, sites = engine(model, x, kind, **noise)
    assert [s.name for s in sites] == ["k0", "k1", "w"] and sites[0].op_type == "Conv weight"
    for site in sites:
        got = counts(worker, site.name, sigmas)
        assert np.array_equal(got.correct, reference(model, x, worker.noise, site.name, sigmas))
        assert got.correct[0].tolist() == [150, 150] and got.correct[-1].min() < 150
    worker.source.close()


def test_a_weight_read_by_two_layers_is_one_site_whose_noise_reaches_both():
    model = shared_weight_model()
    x = np.random.default_rng(1).normal(size=(128, 16)).astype(np.float32)
    worker, sites = engine(model, x, "weight-additive")
    assert [s.name for s in sites] == ["w", "w_out"]
    sigmas = (0.0, 0.1, 0.5)
    assert np.array_equal(counts(worker, "w", sigmas).correct, reference(model, x, worker.noise, "w", sigmas))
    worker.source.close()


def test_a_large_shared_weight_is_fed_perturbed_never_served_from_the_shared_cache():
    """A weight of ≥ 1 MB is shared between sessions by name (`Runtime`); the weight's suffix reads it as an input,
    so the perturbed values reach the layer (the counts equal the reference's, and the noise bites)."""
    hidden = SHARE_BYTES // (16 * 4) + 1
    model = mlp(seed=2, hidden=hidden)
    assert numpy_helper.to_array(model.graph.initializer[0]).nbytes >= SHARE_BYTES
    x = np.random.default_rng(2).normal(size=(64, 16)).astype(np.float32)
    worker, _ = engine(model, x, "weight-multiplicative")
    worker.clean_pass()  # the clean session takes the shared copy of w1 first
    assert any(k[0] == "w1" for k in worker.runtime._shared)
    sigmas = (0.0, 3.0)
    got = counts(worker, "w1", sigmas, repeats=1)
    assert np.array_equal(got.correct, reference(model, x, worker.noise, "w1", sigmas, repeats=1))
    assert got.correct[1, 0] < 64
    worker.source.close()


def test_weights_draw_once_per_repeat_whatever_the_batches():
    model = resnet_block(seed=8)
    x = np.random.default_rng(8).normal(size=(200, 1, 6, 6)).astype(np.float32)
    results = []
    for batch in (7, 128):
        worker, _ = engine(model, x, "weight-additive", batch_size=batch)
        results.append(counts(worker, "k1", (0.05, 0.2, 0.6), repeats=3))
        worker.source.close()
    assert results[0] == results[1]
    assert len({tuple(results[0].correct[:, r]) for r in range(3)}) > 1  # each repeat a fresh chip


def test_weight_draws_have_the_documented_distribution():
    """W' = W(1 + σε): (W'/W − 1)/σ has mean 0 and std 1 within 5 standard errors (65 536 weights, seed 0)."""
    noise = make_noise("weight-multiplicative")
    w = np.random.default_rng(0).uniform(0.5, 2, (256, 256)).astype(np.float32)
    src = NormalSource(0, threads=1)
    eps = np.zeros((1, 1, *w.shape), np.float32)
    noise.draw_weight(src, "w", 0, 0, out=eps[0, 0])
    again = np.zeros_like(eps)
    noise.draw_weight(src, "w", 0, 1, out=again[0, 0])
    src.close()
    z = (noise.host(w, [0.2], eps)[0].astype(np.float64) / w - 1) / 0.2
    assert abs(z.mean()) < 5 / np.sqrt(z.size) and abs(z.std() - 1) < 5 / np.sqrt(2 * z.size)
    assert np.corrcoef(eps.ravel(), again.ravel())[0, 1] < 5 / np.sqrt(z.size)  # repeats: independent draws


def test_weight_sites_by_name_and_the_errors():
    model = resnet_block()
    loaded = load_model(model)
    out = loaded.class_output.name
    chosen = select(loaded.proto, loaded.types, Selection(names=("w", "k0")), out, target="weights")
    w = next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "w")
    assert [s.name for s in chosen] == ["w", "k0"] and chosen[0].shape == w.shape
    with pytest.raises(UsageError, match="not the weight initializer"):
        select(loaded.proto, loaded.types, Selection(names=("a",)), out, target="weights")
    assert strategies.choose("walk", 17, [loaded.types["k0"]], "CPUExecutionProvider", "auto",
                             make_noise("weight-additive")) is strategies.WeightSuffix
    with pytest.raises(UsageError):
        strategies.choose("global", 17, [loaded.types["k0"]], "CPUExecutionProvider", "auto",
                          make_noise("weight-additive"))


# -- the PCM preset (aihwkit's PCMLikeNoiseModel statistics) -----------------------------------------------------------
def test_pcm_steps_have_aihwkits_statistics():
    """Each step on 200 000 devices of one conductance (seed 0); tolerances 5 standard errors."""
    from scipy import stats

    from walkaudit._noise import pcm

    n = 200_000
    z = np.random.default_rng(0).standard_normal((3, n))
    g = np.full(n, 12.5)  # g_max / 2
    sigma_p = 0.26348 + 1.9650 * 0.5 - 1.1731 * 0.25
    d = pcm.programmed(g, z[0]) - g
    assert abs(d.std() / sigma_p - 1) < 5 / np.sqrt(2 * n) and abs(d.mean()) < 5 * sigma_p / np.sqrt(n)
    low = np.full(n, 0.25)  # g/g_max = 0.01: μ_ν = 0.0958, σ_ν = 0.0517 clipped to 0.045
    nu = pcm.drift_exponents(low, z[1])
    mu, sd = -0.0155 * np.log(0.01) + 0.0244, 0.045
    assert abs(nu.mean() - stats.foldnorm(mu / sd, scale=sd).mean()) < 5 * sd / np.sqrt(n)
    t = 1e4  # read noise: relative std q_s·√ln((t + t0 + t_r)/(2 t_r)), q_s = 0.0088/0.5^0.65 with ν = 0
    rel = pcm.at_time(g, np.zeros(n), z[2], t) / g - 1
    want = 0.0088 / 0.5**0.65 * np.sqrt(np.log((t + 20 + 250e-9) / (2 * 250e-9)))
    assert abs(rel.std() / want - 1) < 5 / np.sqrt(2 * n)
    assert np.allclose(pcm.at_time(g, np.full(n, 0.05), np.zeros(n), t), g * ((t + 20) / 20) ** -0.05)


def test_pcm_without_noise_returns_the_weights_and_compensates_a_uniform_drift():
    """ε = 0: at t = 0 the weights come back; where every |w| ≥ max|w|/2, ν is 0.049 for all devices (μ_ν clipped),
    so the drift is uniform and global drift compensation undoes it at any t."""
    noise = make_noise("weight-pcm")
    rng = np.random.default_rng(1)
    w = (rng.uniform(0.5, 1.0, (64, 32)) * rng.choice([-1, 1], (64, 32))).astype(np.float32)
    zero = np.zeros((6, 1, *w.shape), np.float32)
    out = noise.host(w, [0.0, 1e3, 1e9], zero)
    for level in out:
        assert np.allclose(level, w, rtol=1e-6, atol=0)


def test_pcm_weights_stray_further_as_the_chip_ages():
    noise = make_noise("weight-pcm")
    w = np.random.default_rng(2).normal(0, 0.1, (128, 64)).astype(np.float32)
    src = NormalSource(2, threads=1)
    eps = np.zeros((noise.draws, 1, *w.shape), np.float32)
    for term in range(noise.draws):
        noise.draw_weight(src, "w", term, 0, out=eps[term, 0])
    src.close()
    errors = [np.abs(v - w).mean() for v in noise.host(w, [1e2, 1e5, 1e8], eps)]
    assert errors[0] < errors[1] < errors[2]
    assert errors[0] > 0.01 * np.abs(w).mean()  # programming noise is there from the start


def test_pcm_counts_equal_the_whole_model_with_the_aged_weight():
    model = resnet_block(seed=6)
    x = np.random.default_rng(6).normal(size=(100, 1, 6, 6)).astype(np.float32)
    worker, _ = engine(model, x, "weight-pcm")
    sigmas = (1.0, 1e6)
    got = counts(worker, "k1", sigmas)
    assert np.array_equal(got.correct, reference(model, x, worker.noise, "k1", sigmas))
    worker.source.close()


# -- against PyTorch: stored curves of benchmarks/weight_noise_reference.py --------------------------------------------
@pytest.mark.parametrize("kind", ["weight-additive", "weight-multiplicative"])
def test_weight_noise_midpoints_agree_with_the_torch_reference(kind):
    """Each layer's midpoint from walkaudit's audit (its draws, suffix-only runs) against the midpoint walkaudit's fit
    finds on torch's curve for the same weights (torch's draws, the whole model in torch): the 95 % intervals
    overlap and the midpoints are within 0.1 decades (measured: ≤ 0.06, 8 repeats of 1000 samples)."""
    import json
    from pathlib import Path

    import walkaudit
    from walkaudit._analysis import fit

    root = Path(__file__).resolve().parent.parent
    ref = json.loads((root / "benchmarks" / "weight_noise_reference.json").read_text())
    grid, n = ref["grid"][kind], ref["samples"]
    report = walkaudit.audit(str(root / ref["model"]), data=str(root / ref["data"]), noise=kind, sigmas=tuple(grid),
                             repeats=ref["repeats"], provider="cpu")
    assert report.clean_accuracy == ref["clean_correct"] / n  # the same model, the same data
    assert [s.name for s in report.sites] == list(ref["correct"][kind])
    for site in report.sites:
        torch_curve = np.array(ref["correct"][kind][site.name]) / n
        theirs = fit.midpoint(np.array(grid), torch_curve, clean=report.clean_accuracy, chance=ref["chance"],
                              samples=np.full(len(grid), n))
        assert abs(np.log10(site.midpoint / theirs.value)) < 0.1
        assert site.ci95[0] <= theirs.ci95[1] and theirs.ci95[0] <= site.ci95[1]


@pytest.mark.parametrize("kind, options", [("weight-additive", {}), ("bitflip", {"target": "weights"})])
def test_a_worker_built_from_the_resolved_audit_serves_the_same_weight_sites(kind, options):
    """What a remote worker (Ray) gets, the resolved audit, rebuilds the weight sites and their counts."""
    import pickle

    import walkaudit

    model = resnet_block(seed=15)
    x = np.random.default_rng(15).normal(size=(128, 1, 6, 6)).astype(np.float32)
    sigmas = (0.1, 1.0) if kind == "weight-additive" else (1e-3, 3e-2)
    run = walkaudit.iter_audit(model, x, provider="cpu", seed=2, sigmas=sigmas, noise=kind, **options)
    list(run)
    remote = pickle.loads(pickle.dumps(run.resolved.with_model_bytes(run.loaded.proto))).build(threads=1)
    assert [s.name for s in remote.sites] == [s.name for s in run.sites] == ["k0", "k1", "w"]
    for site in run.report().to_dict()["sites"]:
        got = remote.evaluate(WorkUnit(remote.key, (site["name"],), sigmas, 3, (0, 2), 2))
        assert got.correct.tolist() == [p["per_repeat"]["correct"] for p in site["points"]]
    remote.source.close()


@pytest.mark.parametrize("kind, sigma", [("weight-additive", 1000.0), ("weight-pcm", 1e8)])
def test_an_int8_models_weights_take_value_noise_rounded_and_saturated(kind, sigma, monkeypatch):
    """On the INT8 sample the weight sites are int8 initializers: the noisy weight is rounded to the nearest step
    and saturated at -128/127, never wrapped by a cast (200.7 became -56, and additive noise of σ = 1000 steps spread
    the weights uniformly over the byte instead of piling them at the rails)."""
    from pathlib import Path

    sample = Path(__file__).resolve().parent.parent / "samples"
    with np.load(sample / "mnist_val.npz") as d:
        x = d["x"][:16]
    worker, sites = engine(str(sample / "mnist_lenet5.qdq.onnx"), x, kind)
    site = next(s.name for s in sites if worker.model.types[s.name].dtype == np.int8)
    fed = []
    original = strategies.run

    def spy(session, outputs, feeds, what):
        fed.append(feeds[site].copy())
        return original(session, outputs, feeds, what)

    monkeypatch.setattr(strategies, "run", spy)
    weight = numpy_helper.to_array(next(t for t in worker.model.proto.graph.initializer if t.name == site))
    worker.evaluate(WorkUnit(worker.key, (site,), (1e-6 if kind == "weight-additive" else 20.0, sigma), 1, (0, 1),
                             worker.source.seed))
    small, large = fed
    assert small.dtype == large.dtype == np.int8
    if kind == "weight-additive":
        assert np.array_equal(small, weight)  # far below half a step: every weight rounds back to itself
        rails = np.isin(large, (-128, 127)).mean()
        assert rails > 0.5, rails  # wrapped, about 2 in 256 would sit there
    else:  # programming and read noise push the weights at the rails (each channel's ±127) past them: saturated
        rails = np.abs(weight.astype(int)) >= 120
        assert rails.sum() >= 4 and np.all(np.sign(large[rails]) == np.sign(weight[rails]))
