"""Model-zoo topologies end to end: the "light" models bundled with onnx's backend test data.

They are the classic zoo networks (ResNet-50, DenseNet-121, Inception v1/v2, ShuffleNet, SqueezeNet, VGG-19, AlexNet,
ZFNet-512) at full size, input [1, 3, 224, 224]: fixed batch 1, opset 9, IR version 3 (initializers listed as graph
inputs), old-style Sum skip connections, LRN, Dropout, class scores [1, 1000] or [1, 1000, 1, 1]. Their weights are
stored as ConstantOfShape nodes filled with one constant, which makes every output degenerate, so the test replaces
each weight by seeded random values of its shape (He init by fan-in for Conv/Gemm, near-identity BatchNorm).

AlexNet, ZFNet and VGG-19 carry 60-140 M parameters (240-570 MB): marked slow. Each model is read and randomised
once, by a module-scoped fixture, and released before the next one is loaded: the suite holds one zoo model at a
time (an lru_cache kept the last one, VGG-19's 570 MB among them, alive until the session ended).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

import walkaudit
from walkaudit._graph import weights
from walkaudit._graph.sites import Selection, candidates
from walkaudit._loading.model import load_model

pytestmark = pytest.mark.slow  # the quick run (`python -m pytest -q`) leaves this module out

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
MODELS = sorted(p.stem for p in LIGHT.glob("*.onnx")) if LIGHT.is_dir() else []
HEAVY = {"light_bvlc_alexnet", "light_zfnet512", "light_vgg19"}  # > 50 M parameters
SIGMAS = (0.03, 0.3, 3.0)  # multiplicative: relative to the signal, so one grid fits every site of every model


def _fan_in(node: onnx.NodeProto, shape: tuple[int, ...]) -> int:
    if node.op_type == "Conv":
        return int(np.prod(shape[1:]))
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return shape[1] if trans_b else shape[0]
    return shape[0]


def randomize(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """Every ConstantOfShape weight and every float initializer replaced by seeded random values of the same shape."""
    rng = np.random.default_rng(seed)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in g.node:
        for i, name in enumerate(node.input):
            readers.setdefault(name, []).append((node, i))

    def role(name: str):
        for node, i in readers.get(name, []):
            if node.op_type == "Unsqueeze":  # DenseNet/Inception v2 apply BatchNorm as Unsqueeze -> Mul/Add
                return role(node.output[0])
            return node, i
        return None, None

    def value(name: str, shape: tuple[int, ...]) -> np.ndarray:
        node, i = role(name)
        op = node.op_type if node is not None else ""
        if op in ("Conv", "Gemm", "MatMul") and i == 1:
            w = rng.standard_normal(shape, dtype=np.float32)
            w *= np.float32(np.sqrt(2.0 / max(_fan_in(node, shape), 1)))
            return w
        if op == "BatchNormalization" or op == "Mul":
            if op == "Mul" or i in (1, 4):  # scale, variance
                return rng.uniform(0.8, 1.2, shape).astype(np.float32)
            return rng.normal(0, 0.1, shape).astype(np.float32)  # bias, mean
        return rng.normal(0, 0.05, shape).astype(np.float32)  # conv/gemm biases, Add terms

    made, nodes = [], []
    for node in g.node:
        if node.op_type == "ConstantOfShape" and node.input[0] in inits:
            shape = tuple(int(d) for d in numpy_helper.to_array(inits[node.input[0]]))
            made.append(numpy_helper.from_array(value(node.output[0], shape), node.output[0]))
        else:
            nodes.append(node)
    del g.node[:]
    g.node.extend(nodes)
    used = {n for node in g.node for n in node.input}
    kept = []
    for t in g.initializer:
        if t.name not in used:
            continue
        if t.data_type == TensorProto.FLOAT and not any(n.op_type == "Reshape" for n, _ in readers.get(t.name, [])):
            t = numpy_helper.from_array(value(t.name, tuple(t.dims)), t.name)
        kept.append(t)
    dropped = {t.name for t in g.initializer} - {t.name for t in kept}
    inputs = [i for i in g.input if i.name not in dropped]
    del g.initializer[:], g.input[:]
    g.initializer.extend(kept + made)
    g.input.extend(inputs)
    model.ir_version = max(model.ir_version, 4)  # initializers need not be graph inputs from IR 4 on
    return model


def zoo_model(name: str) -> onnx.ModelProto:
    return randomize(onnx.load(str(LIGHT / f"{name}.onnx")))


def inputs(n: int = 4) -> np.ndarray:
    return np.random.default_rng(7).normal(size=(n, 3, 224, 224)).astype(np.float32)


def few_sites(model: onnx.ModelProto) -> tuple[str, ...]:
    loaded = load_model(model)
    sites = candidates(loaded.proto, loaded.types)
    assert len(sites) >= 3
    return tuple(dict.fromkeys(s.name for s in (sites[len(sites) // 2], sites[-2], sites[-1])))


@dataclass(frozen=True)
class Zoo:
    name: str
    model: onnx.ModelProto
    sites: tuple[str, ...]  # three sites spread over the graph (few_sites)


def _zoo(name: str):
    model = zoo_model(name)
    return Zoo(name, model, few_sites(model))


@pytest.fixture(scope="module", params=[pytest.param(n, marks=pytest.mark.slow if n in HEAVY else ()) for n in MODELS])
def zoo(request):
    """Each zoo model, loaded once for the tests that take it; pytest groups those tests by model and drops the model
    before loading the next."""
    return _zoo(request.param)


@pytest.fixture(scope="module")
def squeezenet():
    """SqueezeNet, loaded once for the tests that need one small zoo model."""
    return _zoo("light_squeezenet")


def test_the_zoo_is_there():
    assert {"light_resnet50", "light_densenet121", "light_inception_v1", "light_inception_v2", "light_squeezenet",
            "light_shufflenet"} <= set(MODELS), MODELS


def test_zoo_model_audits_end_to_end(zoo):
    model, names = zoo.model, zoo.sites
    loaded = load_model(model)
    assert loaded.batch_size == 1
    assert loaded.class_output.kind == "scores" and loaded.class_output.num_classes == 1000
    report = walkaudit.audit(model, inputs(), provider="cpu", noise="multiplicative", sigmas=SIGMAS, repeats=1,
                             selection=Selection(names=names))
    assert report.model.batch_size == 1
    assert report.data.samples == 4 and report.data.labels == "clean-predictions"
    assert report.clean_accuracy == 1.0 and report.num_classes == 1000
    assert any("fixed batch size of 1" in n for n in report.runtime.notes)
    assert [s.name for s in report.sites] == list(names)
    for site in report.sites:
        assert [p.sigma for p in site.points] == list(SIGMAS)
        assert all(p.samples == 4 and p.repeats == 1 for p in site.points)
        assert site.midpoint is not None or site.censored in ("above", "below"), site
        assert site.activation_std is not None and np.isfinite(site.activation_std) and site.activation_std > 0
    # random weights make the outputs depend on the input: at σ = 3 noise at the logits flips predictions
    assert report.sites[-1].points[-1].accuracy < 1.0
    assert not report.partial


def test_zoo_additive_noise_and_shared_weights_change_nothing(squeezenet, monkeypatch):
    """Additive noise on a zoo model; handing large initializers to onnxruntime as shared OrtValues (the default)
    gives bit-identical results to serializing them into every session."""
    model, names = squeezenet.model, squeezenet.sites
    kwargs = dict(provider="cpu", sigmas=(0.1, 1.0, 10.0), repeats=2, selection=Selection(names=names))
    monkeypatch.setattr(weights, "SHARE_BYTES", 1 << 14)
    shared = walkaudit.audit(model, inputs(2), **kwargs)
    monkeypatch.setattr(weights, "SHARE_BYTES", 1 << 62)
    serialized = walkaudit.audit(model, inputs(2), **kwargs)
    for a, b in zip(shared.sites, serialized.sites):
        assert a.activation_std == b.activation_std
        assert [(p.accuracy, p.accuracy_std) for p in a.points] == [(p.accuracy, p.accuracy_std) for p in b.points]
        assert a.midpoint is not None or a.censored


def test_zoo_model_through_the_cli(squeezenet, tmp_path):
    """The CLI on a zoo file with IR version 3 and 224x224 inputs: JSON report, exit 0."""
    import json

    from click.testing import CliRunner

    from walkaudit.cli import main

    path = tmp_path / "squeezenet.onnx"
    onnx.save(squeezenet.model, path)
    pattern = "^(" + "|".join(map(re.escape, squeezenet.sites)) + ")$"
    np.savez(tmp_path / "x.npz", data_0=inputs(2))
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    out = tmp_path / "report.json"
    result = CliRunner().invoke(main, [str(path), "--data", str(tmp_path / "x.npz"), "--sigmas", "0.3,3",
                                       "--noise", "multiplicative", "--repeats", "1", "--provider", "cpu",
                                       "--include", pattern,
                                       "-q", "--json", str(out)])
    assert result.exit_code == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["model"]["batch_size"] == 1 and len(report["sites"]) == 3
    assert all(before[p] == p.read_bytes() for p in before)

