"""Quantized and half-precision models audit as deployed (issue 20, item 3).

The models are built here from the float LeNet-5 sample, torch-free and deterministic: onnxruntime.quantization's
`quantize_static` (QDQ and QOperator, per-channel INT8 weights, calibrated on 200 digits of samples/mnist_val.npz)
and `quantize_dynamic`, a plain float16 conversion (with fp16 inputs, as a `.half()` export, and with float32
inputs and Casts), and a small residual net built with onnx.helper (a frontier value from before the site).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import walkaudit
from walkaudit._execution.runtime import Runtime
from walkaudit._graph import passes
from walkaudit._graph.index import GraphIndex
from walkaudit._graph.sites import Selection, candidates, left_out, select
from walkaudit._loading import quantized
from walkaudit._loading.model import load_model
from walkaudit.errors import UsageError

quantization = pytest.importorskip("onnxruntime.quantization")
SAMPLES = Path(__file__).resolve().parent.parent / "samples"
X = np.load(SAMPLES / "mnist_val.npz")["x"]
LENET = SAMPLES / "mnist_lenet5.dynamo.onnx"
#: the dynamo LeNet trips quantize_dynamic's shape inference; the legacy export holds the same weights
LENET_LEGACY = SAMPLES / "mnist_lenet5.legacy.onnx"


class _Digits(quantization.CalibrationDataReader):
    def __init__(self):
        self._batches = iter([{"x": X[i : i + 50]} for i in range(0, 200, 50)])

    def get_next(self):
        return next(self._batches, None)


def _static(source: Path, target: Path, fmt: str, activations: str = "QUInt8") -> Path:
    logging.getLogger().setLevel(logging.ERROR)  # its "consider pre-processing" advice
    quantization.quantize_static(str(source), str(target), _Digits(),
                                 quant_format=getattr(quantization.QuantFormat, fmt), per_channel=True,
                                 activation_type=getattr(quantization.QuantType, activations),
                                 weight_type=quantization.QuantType.QInt8)
    return target


def to_float16(model: onnx.ModelProto, float32_io: bool = False) -> onnx.ModelProto:
    """The model in float16: initializers, Constant tensors, Casts to float and every float value. `float32_io`:
    float32 inputs and outputs with a Cast at each (what converters write with keep_io_types); else the inputs and
    outputs are float16 too (a torch `.half()` export)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    del graph.value_info[:]
    half = lambda t: numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name)  # noqa: E731
    for t in graph.initializer:
        if t.data_type == TensorProto.FLOAT:
            t.CopyFrom(half(t))
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT:
                a.t.CopyFrom(half(a.t))
            if node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = TensorProto.FLOAT16
    first, last = [], []
    for values, is_input in ((graph.input, True), (graph.output, False)):
        for v in values:
            if v.type.tensor_type.elem_type != TensorProto.FLOAT:
                continue
            if not float32_io:
                v.type.tensor_type.elem_type = TensorProto.FLOAT16
                continue
            inner = f"{v.name}.fp16"
            for node in graph.node:
                names = node.input if is_input else node.output
                for k, name in enumerate(names):
                    if name == v.name:
                        names[k] = inner
            cast = (helper.make_node("Cast", [v.name], [inner], to=TensorProto.FLOAT16) if is_input else
                    helper.make_node("Cast", [inner], [v.name], to=TensorProto.FLOAT))
            (first if is_input else last).append(cast)
    nodes = [*first, *graph.node, *last]
    del graph.node[:]
    graph.node.extend(nodes)
    return out


def residual_net(seed: int = 0) -> onnx.ModelProto:
    """conv(stride 2) → relu → conv → relu → conv, + the first relu → relu → pool → gemm: a skip connection,
    so that the sites after the first read a value from before them (their frontier)."""
    rng = np.random.default_rng(seed)
    inits = []

    def weight(name, *shape):
        inits.append(numpy_helper.from_array((rng.normal(size=shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32),
                                             name))
        return name

    nodes = [
        helper.make_node("Conv", ["x", weight("w1", 8, 1, 3, 3), weight("b1", 8)], ["c1"], pads=[1] * 4,
                         strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", weight("w2", 8, 8, 3, 3), weight("b2", 8)], ["c2"], pads=[1] * 4),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Conv", ["r2", weight("w3", 8, 8, 3, 3), weight("b3", 8)], ["c3"], pads=[1] * 4),
        helper.make_node("Add", ["c3", "r1"], ["s"]),
        helper.make_node("Relu", ["s"], ["r3"]),
        helper.make_node("GlobalAveragePool", ["r3"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", weight("w4", 10, 8), weight("b4", 10)], ["logits"], transB=1),
    ]
    graph = helper.make_graph(nodes, "residual",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 28, 28])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, onnx.ModelProto]:
    """name -> model: the float LeNet-5 sample and its quantized and half-precision twins, and the residual net's
    float and QDQ versions."""
    d = tmp_path_factory.mktemp("quantized")
    onnx.save(residual_net(), d / "residual.onnx")
    quantization.quantize_dynamic(str(LENET_LEGACY), str(d / "dynamic.onnx"))
    built = {"float": onnx.load(LENET),
             "qdq": onnx.load(_static(LENET, d / "qdq.onnx", "QDQ")),
             "qoperator": onnx.load(_static(LENET, d / "qop.onnx", "QOperator")),
             "dynamic": onnx.load(d / "dynamic.onnx"),
             "fp16": to_float16(onnx.load(LENET)),
             "fp16_float32_io": to_float16(onnx.load(LENET), float32_io=True),
             "residual": onnx.load(d / "residual.onnx"),
             "residual_qdq": onnx.load(_static(d / "residual.onnx", d / "residual_qdq.onnx", "QDQ")),
             # quantize_static's default: int8 activations, which onnxruntime turns into uint8 only where no other
             # node reads the pair (exposing a value there leaves an int8 Conv group unfused on x86)
             "residual_qdq_s8": onnx.load(_static(d / "residual.onnx", d / "residual_s8.onnx", "QDQ", "QInt8")),
             "qdq_s8": onnx.load(_static(LENET, d / "qdq_s8.onnx", "QDQ", "QInt8")),
             # QLinearAdd and QLinearGlobalAveragePool: com.microsoft ops onnx's shape inference does not know
             "residual_qoperator": onnx.load(_static(d / "residual.onnx", d / "residual_qop.onnx", "QOperator"))}
    return built


def _inputs(name: str, n: int) -> np.ndarray:
    return X[:n].astype(np.float16) if name == "fp16" else X[:n]


def deployed(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The unmodified model's class scores, from a plain onnxruntime session (its kernels: QLinearConv, ...)."""
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


QUANTIZED = ["qdq", "qoperator", "dynamic", "residual_qdq", "residual_qdq_s8", "qdq_s8", "residual_qoperator"]
EVERY = [*QUANTIZED, "fp16", "fp16_float32_io"]
FLOAT_OF = {name: "residual" if name.startswith("residual") else "float" for name in EVERY}


@pytest.mark.parametrize("name", QUANTIZED)
def test_clean_model_and_every_suffix_run_the_deployed_kernels(models, name):
    """The clean model with every site (and every suffix's frontier) exposed, and each site's suffix fed the clean
    values, give the deployed model's scores bit for bit: no fusion was stopped by what the audit reads. (A float
    or float16 model's clean session is exact, without the NCHWc layout: equal up to rounding, as always.)"""
    model, x = models[name], _inputs(name, 300)
    want = deployed(model, x)
    loaded = load_model(model)
    index, out = GraphIndex(loaded.proto.graph), loaded.class_output.name
    sites = [s.name for s in select(loaded.proto, loaded.types, Selection(), out, index=index)]
    batch = passes.batch_dimension(loaded.inputs)
    plans = {s: passes.per_sample(p, s, index, loaded.types, batch) for s, p in index.suffix_plans(sites, out).items()}
    exposed = list(dict.fromkeys(n for s, (_, frontier) in plans.items() for n in (s, *frontier)))
    runtime = Runtime("cpu")
    clean = runtime.session(passes.expose(loaded.proto, exposed, loaded.types), exact=True)
    values = dict(zip([out, *exposed], clean.run([out, *exposed], {"x": x})))
    assert np.array_equal(values[out], want)
    frontiers = 0
    for site in sites:
        sfx = passes.suffix(loaded.proto, site, out, loaded.types, plans[site], index=index)
        if not sfx.model.graph.node:
            continue
        frontiers += len(sfx.frontier)
        got = runtime.session(sfx.model).run([out], {n: values.get(n, x) for n in (site, *sfx.frontier)})[0]
        assert np.array_equal(got, want), site
    assert frontiers or not name.startswith("residual")  # the skip connection is read from before the site


def test_exposing_a_qdq_layers_float_output_would_stop_the_fusion(models):
    """Why the sites are the dequantised values: the float value between a QDQ Conv and its QuantizeLinear (the
    site before quantized models were handled) as a graph output makes onnxruntime run float Conv instead of
    QLinearConv, and the scores change."""
    model = models["qdq"]
    raw = onnx.load_from_string(model.SerializeToString())
    floats = [n.output[0] for n in raw.graph.node if n.op_type in ("Conv", "Gemm")]
    exposed = onnx.ModelProto()
    exposed.CopyFrom(raw)
    exposed.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in floats)
    x = X[:300]
    assert not np.array_equal(deployed(exposed, x), deployed(model, x))


@pytest.mark.parametrize("name", EVERY)
def test_audit_against_the_deployed_predictions_is_exact_at_zero_noise(models, name):
    """Labels = the deployed model's own predictions: clean accuracy 1.0, and σ → 0 gives 1.0 at every site."""
    model, x = models[name], _inputs(name, 200)
    labels = deployed(model, x).argmax(1)
    report = walkaudit.audit(model, x, labels, provider="cpu", sigmas=(1e-6, 1.0), repeats=1)
    assert report.clean_accuracy == 1.0
    assert len(report.sites) == len(candidates(*_typed(models[FLOAT_OF[name]])))
    assert all(s.points[0].accuracy == 1.0 for s in report.sites), [(s.name, s.points[0]) for s in report.sites]
    if name in QUANTIZED:
        assert any("quantized model" in n for n in report.runtime.notes)


FAMILY = {"Conv": "Conv", "QLinearConv": "Conv", "ConvInteger": "Conv", "Gemm": "Gemm", "QGemm": "Gemm",
          "MatMulInteger": "Gemm", "MatMul": "MatMul", "QLinearMatMul": "MatMul"}


@pytest.mark.parametrize("name", EVERY)
def test_sites_are_the_float_models_layers(models, name):
    """Same number of sites, the same layers in the same order (an integer op stands for its float layer), of the
    same rank (QGemm, a com.microsoft op that onnx's shape inference does not know, included)."""
    reference = candidates(*_typed(models[FLOAT_OF[name]]))
    want = [FAMILY[s.op_type] for s in reference]
    loaded = load_model(models[name])
    sites = candidates(loaded.proto, loaded.types)
    assert [FAMILY[s.op_type] for s in sites] == want
    assert [None if s.shape is None else len(s.shape) for s in sites] == [len(s.shape) for s in reference]
    assert want == (["Conv"] * 3 + ["Gemm"] if name.startswith("residual") else ["Conv"] * 2 + ["Gemm"] * 3)
    assert left_out(loaded.proto, Selection()) is None  # QLinearConv & co. are audited, not "left out"


def _typed(model):
    loaded = load_model(model)
    return loaded.proto, loaded.types


def test_sites_of_re_quantised_layers_are_dequantised_values_read_only_by_their_quantizer(models):
    for name in ("qdq", "qoperator"):
        loaded = load_model(models[name])
        graph = loaded.proto.graph
        for s in candidates(loaded.proto, loaded.types):
            made = next(n for n in graph.node if s.name in n.output)
            readers = [n for n in graph.node if s.name in n.input]
            assert made.op_type == "DequantizeLinear" and [r.op_type for r in readers] == ["QuantizeLinear"]
            assert list(readers[0].input[1:]) == list(made.input[1:])  # the same scale and zero point


def test_requantized_is_idempotent_and_survives_a_reload(models):
    """A worker built from the resolved audit reloads the loaded (already rewritten) model: nothing is added twice,
    the sites are the same."""
    once = quantized.requantized(models["qdq"])
    assert once is not models["qdq"] and quantized.requantized(once) is once
    assert quantized.requantized(models["float"]) is models["float"]
    first = load_model(models["qdq"])
    again = load_model(onnx.load_from_string(first.proto.SerializeToString()))
    assert len(again.proto.graph.node) == len(first.proto.graph.node)
    assert [s.name for s in candidates(again.proto, again.types)] == [s.name for s in
                                                                       candidates(first.proto, first.types)]


#: a fixed grid well above the activations' quantisation steps (0.01–0.1 here), 300 digits, one repeat
GRID = tuple(float(s) for s in np.round(np.logspace(-0.5, 1.5, 9), 4))


def _log_midpoints(model, name):
    x = _inputs(name, 300)
    report = walkaudit.audit(model, x, deployed(model, x).argmax(1), provider="cpu", sigmas=GRID, repeats=1)
    return np.log10([s.midpoint for s in report.sites])


def test_sigma50_agrees_with_the_float_model(models):
    """On the same weights, σ50 per layer agrees with the float model's within 0.15 decades (measured: QDQ and
    QOperator within 0.05, dynamic and float16 within 0.01): the site is the same value, before the activation the
    quantizer folded into the re-quantisation (LeNet's ReLUs are the uint8 range's floor)."""
    ref = _log_midpoints(models["float"], "float")
    for name in ("qdq", "qoperator", "dynamic", "fp16"):
        assert np.abs(_log_midpoints(models[name], name) - ref).max() <= 0.15, name


@pytest.mark.parametrize("name", ["qdq", "qoperator"])
def test_a_quantized_sites_clean_value_is_before_the_folded_relu(models, name):
    """The clean pass reads a quantized Conv's site as the float value before its folded ReLU where the
    re-quantisation clipped it (negative values), the deployed value elsewhere; the class output stays bit for bit
    the deployed model's."""
    model, x = models[name], X[:64]
    loaded = load_model(model)
    site = candidates(loaded.proto, loaded.types)[0].name
    out = loaded.class_output.name
    clean = Runtime("cpu").session(passes.expose(loaded.proto, [site], loaded.types), exact=True)
    scores, value = clean.run([out, site], {"x": x})
    assert np.array_equal(scores, deployed(model, x))
    assert (value < 0).mean() > 0.1  # ReLU cut these off: the deployed value there is 0
    float_conv = deployed_value(models["float"], x, candidates(*_typed(models["float"]))[0].name)
    assert np.corrcoef(value.ravel(), float_conv.ravel())[0, 1] > 0.99  # the float model's site, quantized


def deployed_value(model: onnx.ModelProto, x: np.ndarray, name: str) -> np.ndarray:
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    exposed.graph.output.append(helper.make_empty_tensor_value_info(name))
    session = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([name], {"x": x})[0]


def test_a_quantized_model_without_sites_of_the_selected_ops_says_it_is_quantized(models):
    loaded = load_model(models["qoperator"])
    with pytest.raises(UsageError) as err:
        select(loaded.proto, loaded.types, Selection(ops=("ConvTranspose",)), loaded.class_output.name)
    assert "quantized" in str(err.value) and "all" not in str(err.value)
    # an integer op named by itself selects its layers
    chosen = select(loaded.proto, loaded.types, Selection(ops=("QLinearConv",)), loaded.class_output.name)
    assert [s.op_type for s in chosen] == ["QLinearConv", "QLinearConv"]


def test_the_fused_graph_is_made_with_the_fusions_every_session_turns_off():
    from walkaudit._execution.runtime import FUSIONS_OFF

    assert list(quantized.FUSIONS_OFF) == FUSIONS_OFF


def test_values_after_com_microsoft_integer_ops_are_typed(models):
    """onnx's shape inference knows no QLinearAdd, QLinearGlobalAveragePool or QGemm: without the types the loader
    declares for their outputs, everything after them is untyped, the last layer is no site and a suffix cannot
    declare the skip connection it is fed (onnxruntime refuses it). The quantizer's value infos are dropped here so
    that only the loader's count."""
    model = onnx.ModelProto()
    model.CopyFrom(models["residual_qoperator"])
    del model.graph.value_info[:]
    assert {"QLinearAdd", "QLinearGlobalAveragePool", "QGemm"} <= {n.op_type for n in model.graph.node}
    loaded = load_model(model)
    sites = candidates(loaded.proto, loaded.types)
    assert [s.op_type for s in sites] == ["QLinearConv"] * 3 + ["QGemm"]
    assert all(s.shape is not None for s in sites)
    adds = [n.output[0] for n in loaded.proto.graph.node if n.op_type == "QLinearAdd"]
    assert all(loaded.types[a].shape is not None and len(loaded.types[a].shape) == 4 for a in adds)


def test_a_long_chain_of_com_microsoft_ops_is_typed_to_its_end():
    """Each round of shape inference types one more op of a chain of com.microsoft ops (their inputs' types come
    from the round before): MobileNetV3's squeeze-excitation blocks chain about 40 of them, and a fixed 8 rounds
    left the rest untyped, so a suffix fed a skip connection after them was refused by onnxruntime ("does not have
    type information"). A chain of 20 QLinearAdds is typed to its end, shape and element type."""
    links = 20
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             numpy_helper.from_array(np.array(3, np.uint8), "z")]
    nodes = [*(helper.make_node("QLinearAdd", [f"q{i}", "s", "z", f"q{i}", "s", "z", "s", "z"], [f"q{i + 1}"],
                                domain="com.microsoft") for i in range(links)),
             helper.make_node("DequantizeLinear", [f"q{links}", "s", "z"], ["y"])]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("q0", TensorProto.UINT8, ["N", 4, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    typed = {vi.name: vi for vi in quantized.typed_contrib_outputs(model).graph.value_info}
    assert set(typed) == {f"q{i}" for i in range(1, links + 1)}
    last = typed[f"q{links}"].type.tensor_type
    assert last.elem_type == TensorProto.UINT8
    assert [d.dim_param or d.dim_value for d in last.shape.dim] == ["N", 4, 5]
