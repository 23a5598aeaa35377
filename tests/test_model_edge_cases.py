"""Class outputs the loader used to get wrong (issue #14, items 11-13): ai.onnx.ml classifiers whose label and
scores come from one node, pass-through inputs listed as outputs, binary classifiers with one number per sample."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from walkaudit._execution.worker import predictions
from walkaudit._loading.model import load_model
from walkaudit.cli import main
from walkaudit.errors import ModelError

try:
    from tests.models import IR, mlp
except ImportError:  # tests/ on sys.path instead of the repository root
    from models import IR, mlp

FAST = ["--sigmas", "0.1,1", "--repeats", "1", "--provider", "cpu", "-q"]


def binary(head: str = "logit", shape=("N", 1), seed: int = 0) -> onnx.ModelProto:
    """x [N, 8] -> MatMul+Add -> Relu -> Gemm -> one logit [N, 1] (head "logit") or Sigmoid of it ("sigmoid")."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(0, 0.4, (8, 16)).astype(np.float32), "w1"),
             numpy_helper.from_array(np.zeros(16, np.float32), "b1"),
             numpy_helper.from_array(rng.normal(0, 0.4, (16, 1)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.zeros(1, np.float32), "b2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"]), helper.make_node("Add", ["h0", "b1"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]), helper.make_node("Gemm", ["r", "w2", "b2"], ["z"])]
    last = "z"
    if head == "sigmoid":
        nodes.append(helper.make_node("Sigmoid", ["z"], ["p"]))
        last = "p"
    if len(shape) == 1:
        inits.append(numpy_helper.from_array(np.array([1], np.int64), "axis"))
        nodes.append(helper.make_node("Squeeze", [last, "axis"], ["out"]))
        last = "out"
    graph = helper.make_graph(nodes, "binary", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info(last, TensorProto.FLOAT, list(shape))], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR)


def linear_classifier() -> onnx.ModelProto:
    """An ai.onnx.ml LinearClassifier writing label [N] and probabilities [N, 3] from one node (logreg_iris.onnx)."""
    node = helper.make_node("LinearClassifier", ["x"], ["label", "probabilities"], domain="ai.onnx.ml",
                            coefficients=[1.0, -1.0, 0.5, 0.5, -1.0, 1.0], intercepts=[0.0, 0.1, -0.1],
                            classlabels_ints=[0, 1, 2], post_transform="SOFTMAX")
    graph = helper.make_graph([node], "linclf", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
                              [helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
                               helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 3])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)],
                             ir_version=IR)


def save(tmp_path, model, x, name="m"):
    onnx.save(model, tmp_path / f"{name}.onnx")
    np.savez(tmp_path / f"{name}.npz", x=x)
    return [str(tmp_path / f"{name}.onnx"), "--data", str(tmp_path / f"{name}.npz")]


def refused(result, phrase):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.stderr and phrase in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def x8(n=96, seed=1):
    return np.random.default_rng(seed).normal(size=(n, 8)).astype(np.float32)


# --- the choice of the class output ---------------------------------------------------------------------------------

def test_scores_of_the_node_that_writes_the_label_are_audited():
    out = load_model(linear_classifier()).class_output
    assert (out.name, out.kind, out.num_classes) == ("probabilities", "scores", 3)
    assert load_model(linear_classifier(), output="label").class_output.kind == "label"  # the user's choice stands


def test_a_graph_input_passed_through_is_never_the_class_output():
    model = mlp()
    model.graph.output.insert(0, helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16]))
    assert load_model(model).class_output.name == "logits"
    with pytest.raises(ModelError, match="not computed by the model"):
        load_model(model, output="x")


def test_an_output_computed_by_pass_through_ops_only_is_not_chosen():
    model = mlp()
    model.graph.node.append(helper.make_node("Identity", ["x"], ["x_copy"]))
    model.graph.output.insert(0, helper.make_tensor_value_info("x_copy", TensorProto.FLOAT, ["N", 16]))
    assert load_model(model).class_output.name == "logits"


@pytest.mark.parametrize(("head", "shape", "kind"), [
    ("logit", ("N", 1), "binary-logit"), ("logit", ("N",), "binary-logit"),
    ("sigmoid", ("N", 1), "binary-probability"), ("sigmoid", ("N",), "binary-probability"),
])
def test_binary_outputs_are_read_with_their_threshold(head, shape, kind):
    model = binary(head, shape)
    out = load_model(model, output=model.graph.output[0].name).class_output
    assert (out.kind, out.num_classes) == (kind, 2)


def test_a_sigmoid_output_is_chosen_without_output_and_a_bare_number_is_refused(tmp_path):
    assert load_model(binary("sigmoid")).class_output.kind == "binary-probability"
    refused(CliRunner().invoke(main, [*save(tmp_path, binary("logit"), x8()), *FAST]), "--output")


def test_predictions_of_binary_kinds():
    logits = np.array([[-1.0], [0.5], [np.nan], [0.0]], np.float32)
    pred, bad = predictions(logits, "binary-logit")
    assert pred.tolist() == [0, 1, -1, 0] and bad.tolist() == [False, False, True, False]
    probs = np.array([0.2, 0.7, 0.5, np.inf], np.float32)
    pred, bad = predictions(probs, "binary-probability")
    assert pred.tolist() == [0, 1, 0, -1] and bad.tolist() == [False, False, False, True]
    assert predictions(np.array([[1.0, 3.0], [2.0, 0.0]]), "scores")[0].tolist() == [1, 0]


@pytest.mark.parametrize(("head", "kind"), [("logit", "binary-logit"), ("sigmoid", "binary-probability")])
def test_binary_classifier_audits_end_to_end(tmp_path, head, kind):
    import json

    args = save(tmp_path, binary(head), x8())
    result = CliRunner().invoke(main, [*args, *FAST, "--output", "p" if head == "sigmoid" else "z", "--json", "-"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["model"]["output_kind"] == kind and report["num_classes"] == 2 and report["chance"] == 0.5
    assert report["clean_accuracy"] == 1.0  # no labels: agreement with the clean predictions


def test_refusals_are_one_line_with_exit_2(tmp_path):
    model = mlp()
    model.graph.output.insert(0, helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16]))
    args = save(tmp_path, model, np.zeros((8, 16), np.float32), "passthrough")
    refused(CliRunner().invoke(main, [*args, *FAST, "--output", "x"]), "not computed by the model")
    only_input = helper.make_model(helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "id", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                           ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])]),
        opset_imports=[helper.make_opsetid("", 17)], ir_version=IR)
    refused(CliRunner().invoke(main, [*save(tmp_path, only_input, np.zeros((8, 4), np.float32), "id"), *FAST]),
            "computed from its inputs")


def test_a_model_that_gives_one_class_for_every_sample_is_noted():
    import walkaudit

    from .models import mlp

    model = mlp(seed=1)
    for init in model.graph.initializer:  # zero weights: every score row ties, argmax gives class 0 everywhere
        init.raw_data = bytes(len(init.raw_data)) if init.raw_data else init.raw_data
        del init.float_data[:]
        if not init.raw_data:
            init.float_data.extend([0.0] * int(np.prod(init.dims)))
    x = np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32)
    report = walkaudit.audit(model, x, np.arange(64) % 4, provider="cpu", sigmas=(0.1, 1.0), repeats=1)
    assert any("gives class 0 for every sample" in n for n in report.runtime.notes)


def test_a_failing_shape_inference_is_said_in_the_report(monkeypatch):
    import walkaudit

    from .models import mlp

    def fail(*args, **kwargs):
        raise RuntimeError("[ShapeInferenceError] made up for the test")

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", fail)
    x = np.random.default_rng(0).normal(size=(32, 16)).astype(np.float32)
    report = walkaudit.audit(mlp(seed=2), x, provider="cpu", sigmas=(0.1,), repeats=1)
    assert any(n.startswith("ONNX shape inference failed") and "made up" in n for n in report.runtime.notes)


def test_onnxruntimes_logreg_iris_audits_its_probabilities_with_ops_all(tmp_path):
    """onnxruntime's own ai.onnx.ml classifier (label and scores from one node, then Normalizer and ZipMap), its
    input's batch freed: `--ops all` audits the scores the label comes from, noise at the class output itself."""
    import os

    import onnxruntime

    path = os.path.join(os.path.dirname(onnxruntime.__file__), "datasets", "logreg_iris.onnx")
    if not os.path.exists(path):
        pytest.skip("this onnxruntime build ships no datasets/logreg_iris.onnx")
    model = onnx.load(path)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    x = np.random.default_rng(0).normal([5.0, 3.0], 1.0, size=(60, 2)).astype(np.float32)
    result = CliRunner().invoke(main, [*save(tmp_path, model, x, "logreg"), "--ops", "all", "--provider", "cpu",
                                       "--sigmas", "0.01,1,100", "--repeats", "1", "--json", str(tmp_path / "r.json")])
    assert result.exit_code in (0, 1), result.stderr
    import json

    report = json.loads((tmp_path / "r.json").read_text())
    assert report["model"]["class_output"] == "probability_tensor"
    assert [s["name"] for s in report["sites"]] == ["probability_tensor"]
    accuracy = [p["accuracy"] for p in report["sites"][0]["points"]]
    assert accuracy[0] == 1.0 and accuracy[-1] < 0.9
