"""Element types and graph shapes beyond the plain float32 single-input MLP: float16, bfloat16, QDQ-quantized,
several inputs, several outputs, dynamic non-batch dimensions, fixed batch sizes. Each audits end to end or is
refused with one clear message."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import walkaudit
from walkaudit._graph.sites import candidates
from walkaudit._loading.model import (
    FLOAT_TYPES,
    TensorSpec,
    find_class_output,
    load_model,
)
from walkaudit.cli import main
from walkaudit.errors import ModelError

try:
    from tests.models import IR, mlp
except ImportError:  # tests/ on sys.path instead of the repository root
    from models import IR, mlp

FAST = dict(provider="cpu", sigmas=(0.03, 0.3, 3.0), repeats=1)
FEATURES, HIDDEN, CLASSES = 16, 32, 4


def x_data(n=24, shape=(FEATURES,), seed=0, dtype=np.float32):
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype(dtype)


def assert_audited(report, sites=None):
    assert report.clean_accuracy == 1.0 or report.data.labels == "given"
    assert report.sites, "no sites were audited"
    if sites is not None:
        assert [s.name for s in report.sites] == sites
    for s in report.sites:
        assert len(s.points) == len(FAST["sigmas"])
        assert all(0.0 <= p.accuracy <= 1.0 for p in s.points)
        assert s.midpoint is not None or s.censored in ("above", "below"), s
    assert not report.partial


def _retype(model: onnx.ModelProto, elem: int, npdt) -> onnx.ModelProto:
    """Every float initializer, graph input and output of `model` in another float type."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    for i, t in enumerate(g.initializer):
        a = numpy_helper.to_array(t).astype(npdt)
        if elem == TensorProto.BFLOAT16:
            new = helper.make_tensor(t.name, elem, a.shape, a.view(np.uint16).tobytes(), raw=True)
        else:
            new = numpy_helper.from_array(a, t.name)
        g.initializer[i].CopyFrom(new)
    for v in [*g.input, *g.output]:
        v.type.tensor_type.elem_type = elem
    return out


# --- float16 and bfloat16 -----------------------------------------------------------------------------------------

def test_float16_model_end_to_end():
    model = _retype(mlp(), TensorProto.FLOAT16, np.float16)
    loaded = load_model(model)
    assert loaded.inputs[0].elem_type == TensorProto.FLOAT16
    report = walkaudit.audit(model, x_data(dtype=np.float64), **FAST)  # float64 data is cast to float16
    assert_audited(report, ["h", "logits"])
    assert report.sites[0].activation_std > 0


def test_float16_weights_with_cast_nodes():
    """float32 in and out, float16 weights and compute between two Casts (what converters write)."""
    base = _retype(mlp(), TensorProto.FLOAT16, np.float16)
    g = base.graph
    for node in g.node:
        node.input[:] = ["x16" if n == "x" else n for n in node.input]
        node.output[:] = ["logits16" if n == "logits" else n for n in node.output]
    g.node.insert(0, helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16, name="to_half"))
    g.node.append(helper.make_node("Cast", ["logits16"], ["logits"], to=TensorProto.FLOAT, name="to_float"))
    g.input[0].type.tensor_type.elem_type = TensorProto.FLOAT
    g.output[0].type.tensor_type.elem_type = TensorProto.FLOAT
    report = walkaudit.audit(base, x_data(), **FAST)
    assert_audited(report, ["h", "logits16"])


def test_bfloat16_weights_float_compute():
    """bfloat16 storage, Cast to float32 before use: audits end to end, sites are the float32 layer outputs."""
    model = mlp()
    g = model.graph
    casts = []
    for i, t in enumerate(g.initializer):
        name, a = t.name, numpy_helper.to_array(t).astype(ml_dtypes.bfloat16)
        g.initializer[i].CopyFrom(helper.make_tensor(name + "_bf16", TensorProto.BFLOAT16, a.shape,
                                                     a.view(np.uint16).tobytes(), raw=True))
        casts.append(helper.make_node("Cast", [name + "_bf16"], [name], to=TensorProto.FLOAT))
    nodes = [*casts, *g.node]
    del g.node[:]
    g.node.extend(nodes)
    report = walkaudit.audit(model, x_data(), **FAST)
    assert_audited(report, ["h", "logits"])
    assert report.sites[0].weight is None or report.sites[0].weight.mean_abs > 0


def test_bfloat16_compute_is_audited_or_refused_clearly(tmp_path):
    """onnxruntime's CPU provider has few bfloat16 kernels: either it runs, or exit 2 names the missing kernel."""
    model = _retype(mlp(), TensorProto.BFLOAT16, ml_dtypes.bfloat16)
    path = tmp_path / "bf16.onnx"
    onnx.save(model, path)
    np.savez(tmp_path / "d.npz", x=x_data())
    result = CliRunner().invoke(main, [str(path), "--data", str(tmp_path / "d.npz"), "--sigmas", "0.1,1",
                                       "--repeats", "1", "--provider", "cpu", "-q"])
    if result.exit_code == 0:
        return
    assert result.exit_code == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("walkaudit: error: onnxruntime") and "cannot run this model" in line
    assert "no kernel for" in line and "Traceback" not in result.stderr


# --- quantized (QDQ) ------------------------------------------------------------------------------------------------

def qdq_mlp(seed=0) -> onnx.ModelProto:
    """x -Q/DQ-> MatMul(DQ(int8 W1)) + b1 -> Relu -Q/DQ-> MatMul(DQ(int8 W2)) + b2 -> logits."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 1 / np.sqrt(FEATURES), (FEATURES, HIDDEN)).astype(np.float32)
    w2 = rng.normal(0, 1 / np.sqrt(HIDDEN), (HIDDEN, CLASSES)).astype(np.float32)

    def q(w):
        s = np.abs(w).max() / 127
        return np.clip(np.round(w / s), -127, 127).astype(np.int8), np.float32(s)

    q1, s1 = q(w1)
    q2, s2 = q(w2)
    inits = [numpy_helper.from_array(a, n) for a, n in [
        (q1, "w1_q"), (np.array(s1, np.float32), "w1_s"), (np.array(0, np.int8), "w1_z"),
        (q2, "w2_q"), (np.array(s2, np.float32), "w2_s"), (np.array(0, np.int8), "w2_z"),
        (np.array(4 / 255, np.float32), "a_s"), (np.array(128, np.uint8), "a_z"),
        (np.array(8 / 255, np.float32), "h_s"), (np.array(0, np.uint8), "h_z"),
        (rng.normal(0, 0.1, HIDDEN).astype(np.float32), "b1"), (np.zeros(CLASSES, np.float32), "b2")]]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "a_s", "a_z"], ["x_q"], name="x_quant"),
        helper.make_node("DequantizeLinear", ["x_q", "a_s", "a_z"], ["x_dq"], name="x_dequant"),
        helper.make_node("DequantizeLinear", ["w1_q", "w1_s", "w1_z"], ["w1"], name="w1_dequant"),
        helper.make_node("MatMul", ["x_dq", "w1"], ["h_mm"], name="fc1"),
        helper.make_node("Add", ["h_mm", "b1"], ["h"], name="fc1_bias"),
        helper.make_node("Relu", ["h"], ["h_relu"], name="relu"),
        helper.make_node("QuantizeLinear", ["h_relu", "h_s", "h_z"], ["h_q"], name="h_quant"),
        helper.make_node("DequantizeLinear", ["h_q", "h_s", "h_z"], ["h_dq"], name="h_dequant"),
        helper.make_node("DequantizeLinear", ["w2_q", "w2_s", "w2_z"], ["w2"], name="w2_dequant"),
        helper.make_node("MatMul", ["h_dq", "w2"], ["o_mm"], name="fc2"),
        helper.make_node("Add", ["o_mm", "b2"], ["logits"], name="fc2_bias"),
    ]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", FEATURES])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])], inits)
    return helper.make_model(graph, ir_version=IR, opset_imports=[helper.make_opsetid("", 17)])


def test_qdq_sites_are_float_tensors_only():
    """onnxruntime runs this QDQ MLP as MatMulIntegerToFloat (+ bias Add) per layer, and walkaudit audits that graph
    (docs/method.md, "Sites in quantized and half-precision graphs"): the sites are the layers' float results before
    re-quantisation, never integer tensors or weights."""
    loaded = load_model(qdq_mlp())
    every = candidates(loaded.proto, loaded.types, ("all",))
    names = {s.name for s in every}
    assert all(loaded.types[s.name].elem_type in FLOAT_TYPES for s in every)
    assert not names & {"x_q", "h_q"}, "quantized (integer) tensors must never be sites"
    assert not names & {"w1", "w2", "w1_q", "w2_q"}, "weights are constants, not sites"
    layers = candidates(loaded.proto, loaded.types)
    assert [s.name for s in layers] == ["h", "logits"]
    assert [s.op_type for s in layers] == ["MatMulIntegerToFloat+Add"] * 2


def test_qdq_model_end_to_end():
    report = walkaudit.audit(qdq_mlp(), x_data(), **FAST)
    assert_audited(report, ["h", "logits"])


# --- several inputs -------------------------------------------------------------------------------------------------

def two_input_mlp() -> onnx.ModelProto:
    """x [N, 16] float and mask [N, 16] int64: logits of mlp(x * mask)."""
    base = mlp()
    nodes = [helper.make_node("Cast", ["mask"], ["mask_f"], to=TensorProto.FLOAT, name="mask_cast"),
             helper.make_node("Mul", ["x_in", "mask_f"], ["x"], name="masking"), *base.graph.node]
    graph = helper.make_graph(nodes, "two", [
        helper.make_tensor_value_info("x_in", TensorProto.FLOAT, ["N", FEATURES]),
        helper.make_tensor_value_info("mask", TensorProto.INT64, ["N", FEATURES])],
        list(base.graph.output), list(base.graph.initializer))
    return helper.make_model(graph, ir_version=IR, opset_imports=list(base.opset_import))


def test_multi_input_from_npz(tmp_path):
    model = two_input_mlp()
    path = tmp_path / "two.onnx"
    onnx.save(model, path)
    x = x_data()
    mask = (np.random.default_rng(1).random(x.shape) > 0.2).astype(np.int32)  # int32 on disk, int64 in the model
    labels = np.random.default_rng(2).integers(0, CLASSES, len(x)).astype(np.uint8)
    np.savez(tmp_path / "d.npz", x_in=x, mask=mask, labels=labels)
    report = walkaudit.audit(str(path), data=str(tmp_path / "d.npz"), **FAST)
    assert_audited(report, ["h", "logits"])
    assert report.data.labels == "given"
    # the same through arrays, a dict by input name
    again = walkaudit.audit(model, {"x_in": x, "mask": mask}, labels, **FAST)
    assert again.clean_accuracy == report.clean_accuracy
    assert [p.accuracy for p in again.sites[0].points] == [p.accuracy for p in report.sites[0].points]


def test_multi_input_global_mode():
    report = walkaudit.audit(two_input_mlp(), {"x_in": x_data(), "mask": np.ones((24, FEATURES), np.int64)},
                             mode="global", **FAST)
    assert [s.name for s in report.sites] == ["global"]
    assert len(report.sites[0].points) == 3


# --- several outputs ------------------------------------------------------------------------------------------------

def multi_output_mlp(order=("embedding", "logits", "probs", "label")) -> onnx.ModelProto:
    base = mlp()
    g = base.graph
    extra = [helper.make_node("Softmax", ["logits"], ["probs"], axis=1, name="softmax"),
             helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0, name="argmax"),
             helper.make_node("Identity", ["h_relu"], ["embedding"], name="embed")]
    vis = {"embedding": helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", HIDDEN]),
           "logits": helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES]),
           "probs": helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", CLASSES]),
           "label": helper.make_tensor_value_info("label", TensorProto.INT64, ["N"])}
    graph = helper.make_graph([*g.node, *extra], "multi", list(g.input), [vis[o] for o in order],
                              list(g.initializer))
    return helper.make_model(graph, ir_version=IR, opset_imports=list(base.opset_import))


def test_multi_output_auto_detect_and_override():
    model = multi_output_mlp()
    assert load_model(model).class_output.name == "logits"
    assert load_model(multi_output_mlp(("label", "embedding", "probs"))).class_output.name == "probs"
    assert load_model(multi_output_mlp(("embedding", "label"))).class_output.name == "embedding"
    only_label = load_model(multi_output_mlp(("label",))).class_output
    assert (only_label.name, only_label.kind) == ("label", "label")
    x = x_data()
    auto = walkaudit.audit(model, x, **FAST)
    assert auto.model["class_output"] == "logits"
    assert_audited(auto)
    probs = walkaudit.audit(model, x, output="probs", **FAST)
    assert probs.model["class_output"] == "probs"
    # softmax keeps the argmax: the same accuracies
    assert [p.accuracy for p in probs.sites[0].points] == [p.accuracy for p in auto.sites[0].points]
    label = walkaudit.audit(model, x, output="label", **FAST)
    assert label.model["output_kind"] == "label"
    assert [p.accuracy for p in label.sites[0].points] == [p.accuracy for p in auto.sites[0].points]


def test_multi_output_override_errors():
    with pytest.raises(ModelError, match=r"not an output of the model \(outputs: embedding, logits, probs, label\)"):
        load_model(multi_output_mlp(), output="scores")
    with pytest.raises(ModelError, match="neither scores"):
        find_class_output([TensorSpec("h4", TensorProto.FLOAT, ("N", 4, 5, 6))], "h4")
    assert find_class_output([TensorSpec("h3", TensorProto.FLOAT, ("N", 4, 5))], "h3").per_token  # a class per token
    # one logit named with --output is a binary classifier (threshold 0), not a regressor
    assert find_class_output([TensorSpec("value", TensorProto.FLOAT, ("N", 1))], "value").kind == "binary-logit"


def test_multi_output_cli_override(tmp_path):
    path = tmp_path / "multi.onnx"
    onnx.save(multi_output_mlp(), path)
    np.savez(tmp_path / "d.npz", x=x_data())
    args = [str(path), "--data", str(tmp_path / "d.npz"), "--sigmas", "0.1,1", "--repeats", "1", "--provider", "cpu",
            "-q", "--json", "-"]
    result = CliRunner().invoke(main, [*args, "--output", "probs"])
    assert result.exit_code == 0, result.stderr
    assert '"class_output": "probs"' in result.stdout
    result = CliRunner().invoke(main, [*args, "--output", "nope"])
    assert result.exit_code == 2 and "outputs: embedding, logits, probs, label" in result.stderr


def test_conv_head_output_with_trailing_ones():
    """[N, C, 1, 1] scores (squeezenet, densenet heads without Flatten) count as class scores."""
    base = mlp()
    g = base.graph
    g.node.append(helper.make_node("Unsqueeze", ["logits", "axes"], ["scores4d"], name="unsq"))
    g.initializer.append(numpy_helper.from_array(np.array([2, 3], np.int64), "axes"))
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("scores4d", TensorProto.FLOAT, ["N", CLASSES, 1, 1]))
    out = load_model(base).class_output
    assert (out.name, out.kind, out.num_classes) == ("scores4d", "scores", CLASSES)
    report = walkaudit.audit(base, x_data(), **FAST)
    assert_audited(report)
    assert report.num_classes == CLASSES


# --- dynamic and fixed dimensions -----------------------------------------------------------------------------------

def sequence_model(seed=0) -> onnx.ModelProto:
    """x [N, T, 8] with T dynamic: MatMul per step (site [N, T, 16]) -> Relu -> mean over T -> Gemm -> logits."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(0, 0.35, (8, 16)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.25, (16, CLASSES)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.zeros(CLASSES, np.float32), "b2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["steps"], name="proj"),
             helper.make_node("Relu", ["steps"], ["steps_relu"], name="relu"),
             helper.make_node("ReduceMean", ["steps_relu"], ["pooled"], axes=[1], keepdims=0, name="pool"),
             helper.make_node("Gemm", ["pooled", "w2", "b2"], ["logits"], name="fc")]
    graph = helper.make_graph(nodes, "seq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])], inits)
    return helper.make_model(graph, ir_version=IR, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("steps", [1, 5])
def test_dynamic_non_batch_dimension(steps):
    report = walkaudit.audit(sequence_model(), x_data(shape=(steps, 8)), **FAST)
    assert_audited(report, ["steps", "logits"])
    assert report.sites[0].shape[1] in ("T", None)


def test_dynamic_dimension_wrong_fixed_dim_refused():
    with pytest.raises(walkaudit.WalkauditError, match=r"expected float \[N, T, 8\], found float32 \[24, 5, 7\]"):
        walkaudit.audit(sequence_model(), x_data(shape=(5, 7)), **FAST)


@pytest.mark.parametrize("batch, n", [(1, 5), (4, 10)])
def test_fixed_batch_size(batch, n):
    """A model with a fixed batch dimension: the data is fed in runs of that size, the last one padded."""
    model = mlp(batch=batch)
    x = x_data(n=n)
    report = walkaudit.audit(model, x, **FAST)
    assert report.model.batch_size == batch
    assert report.data.samples == n
    assert_audited(report, ["h", "logits"])
    free = walkaudit.audit(mlp(), x, **FAST)
    assert report.clean_accuracy == free.clean_accuracy
    for a, b in zip(report.sites, free.sites):  # padding rows never enter the statistics
        assert a.name == b.name
        assert a.activation_std == pytest.approx(b.activation_std, rel=1e-5)
        assert a.points[0].accuracy == b.points[0].accuracy == 1.0  # σ = 0.03: no sample flips
