"""Model families beyond CNNs and MLPs: recurrent layers are default sites, sites whose samples run along another
axis than the first get per-sample noise, and compute-heavy ops left out are named in a note."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx import numpy_helper as nh

import walkaudit

T, I, H, C = 5, 3, 4, 2  # noqa: E741 (time, input, hidden, classes: the LSTM's names)


def lstm_classifier(seed: int = 0) -> onnx.ModelProto:
    """x [N, T, I] → Transpose → LSTM (Y_h [1, N, H]) → Squeeze → MatMul → logits [N, C], as a batch-first torch
    LSTM classifier exports."""
    rng = np.random.default_rng(seed)
    inits = [nh.from_array(rng.normal(0, .5, (1, 4 * H, I)).astype(np.float32), "W"),
             nh.from_array(rng.normal(0, .5, (1, 4 * H, H)).astype(np.float32), "R"),
             nh.from_array(rng.normal(0, 1, (H, C)).astype(np.float32), "Wfc"),
             nh.from_array(np.array([0], np.int64), "axis0")]
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),
             helper.make_node("LSTM", ["xt", "W", "R"], ["Y", "Y_h"], hidden_size=H),
             helper.make_node("Squeeze", ["Y_h", "axis0"], ["h"]),
             helper.make_node("MatMul", ["h", "Wfc"], ["logits"])]
    graph = helper.make_graph(nodes, "lstm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", T, I])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", C])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _x(n: int = 300, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, T, I)).astype(np.float32)


def test_recurrent_layers_are_default_sites_with_noise_drawn_per_sample_along_their_batch_axis():
    report = walkaudit.audit(lstm_classifier(), _x(), provider="cpu", sigmas=(0.005, 0.5, 5.0), repeats=2)
    assert [(s.name, s.op_type) for s in report.sites] == [("Y_h", "LSTM"), ("logits", "MatMul")]
    assert list(report.sites[0].shape) == [1, "N", H]
    assert any("Y_h: samples run along axis 1" in n for n in report.runtime.notes)
    accuracy = [p.accuracy for p in report.sites[0].points]
    assert accuracy[0] > 0.95 and accuracy[-1] < accuracy[0] - 0.2  # clean at small σ, the noise bites at large σ


def test_a_recurrent_sites_curve_does_not_depend_on_the_batch_size():
    """ε comes per sample along axis 1, keyed by the sample's block, as for batch-first sites."""
    reports = [walkaudit.audit(lstm_classifier(), _x(), provider="cpu", sigmas=(0.3, 3.0), batch_size=b).sites[0]
               for b in (64, 256)]
    assert reports[0].to_dict() == reports[1].to_dict()


def test_compute_heavy_ops_that_are_not_default_sites_are_named_in_a_note():
    model = lstm_classifier()
    graph = model.graph
    graph.node[-1].output[0] = "pre"
    graph.node.append(helper.make_node("Einsum", ["pre"], ["logits"], equation="nc->nc"))
    report = walkaudit.audit(model, _x(100), provider="cpu", sigmas=(0.1, 1.0), repeats=1)
    note = next(n for n in report.runtime.notes if n.startswith("not audited"))
    assert "1 Einsum" in note and "--ops Conv,ConvTranspose,Gemm,MatMul,LSTM,GRU,RNN,Einsum" in note


def _two_outputs() -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """A digits-style classifier that also returns its hidden embedding first: relu [N, 32], then logits [N, 10]."""
    rng = np.random.default_rng(3)
    w1, w2 = rng.normal(0, 0.3, (16, 32)).astype(np.float32), rng.normal(0, 0.3, (32, 10)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["pre"]), helper.make_node("Relu", ["pre"], ["relu"]),
             helper.make_node("MatMul", ["relu", "w2"], ["linear_1"])]
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("relu", TensorProto.FLOAT, ["N", 32]),
                               helper.make_tensor_value_info("linear_1", TensorProto.FLOAT, ["N", 10])],
                              [nh.from_array(w1, "w1"), nh.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = rng.normal(size=(400, 16)).astype(np.float32)
    y = (np.maximum(x @ w1, 0) @ w2).argmax(axis=1)
    return model, x, y


def test_of_two_score_outputs_the_one_the_labels_agree_with_is_the_class_output():
    model, x, y = _two_outputs()
    report = walkaudit.audit(model, x, y, provider="cpu", sigmas=(0.1, 1.0), repeats=1)
    assert report.model.class_output == "linear_1" and report.clean_accuracy == 1.0


def test_of_two_score_outputs_without_labels_the_audit_is_refused_naming_them():
    import pytest

    model, x, _ = _two_outputs()
    with pytest.raises(walkaudit.WalkauditError, match="several outputs could be the class scores.*relu.*linear_1"):
        walkaudit.audit(model, x, provider="cpu")
    assert walkaudit.audit(model, x, provider="cpu", output="linear_1", sigmas=(0.1,)).model.class_output == "linear_1"


def test_outputs_without_an_inferred_type_are_named_in_a_note():
    """After an op shape inference does not know (a contrib op), later layers have no type: say so."""
    from walkaudit._graph.sites import Selection, untyped
    from walkaudit._loading.model import load_model

    model = lstm_classifier()
    loaded = load_model(model)
    types = {k: v for k, v in loaded.types.items() if k != "logits"}  # as if inference stopped before the head
    note = untyped(loaded.proto, types, Selection())
    assert note.startswith("1 output(s) of the selected ops have no inferred type") and "'logits'" in note
    assert untyped(loaded.proto, loaded.types, Selection()) is None


SAMPLES = Path(__file__).resolve().parent.parent / "samples"
FOLDED = [("digits_tokens_transformer.dynamo.onnx", "linear_1"),
          ("digits_tokens_transformer.legacy.onnx", "/encoder/layers.0/self_attn/Gemm_output_0")]


def _token_data() -> tuple[dict[str, np.ndarray], np.ndarray]:
    with np.load(SAMPLES / "digits_tokens_val.npz") as f:
        return {n: f[n] for n in ("input_ids", "attention_mask")}, f["labels"]


@pytest.mark.parametrize(("name", "site"), FOLDED)
def test_a_site_that_folds_tokens_and_samples_into_one_axis_gets_noise_per_sample(name, site):
    """nn.MultiheadAttention's output projection runs on [T·N, D] (token-major): no axis holds the samples, but
    each sample's rows are found from the clean values, so its noise is keyed by the sample and the curve does not
    depend on the batch size."""
    x, y = _token_data()
    reports = [walkaudit.audit(SAMPLES / name, x, y, sites=[site], provider="cpu",
                               sigmas=(0.1, 1.0, 10.0), repeats=1, seed=4, batch_size=b) for b in (64, 100)]
    bodies = []
    for report in reports:
        body = report.to_dict()
        body["runtime"].pop("elapsed_s")
        body["config"].pop("batch_size")
        bodies.append(body)
    assert bodies[0] == bodies[1]
    notes = [*bodies[0]["runtime"]["notes"], *bodies[0]["sites"][0].get("notes", [])]
    assert not any("no batch axis" in n for n in notes), notes
    accuracy = [p["accuracy"] for p in bodies[0]["sites"][0]["points"]]
    assert accuracy[0] > accuracy[-1]  # the noise reaches the output


def test_the_fold_of_a_token_major_value_is_told_from_the_clean_values():
    from walkaudit._execution.runtime import Runtime
    from walkaudit._execution.worker import Worker
    from walkaudit._graph.sites import Selection, select
    from walkaudit._loading.data import from_arrays
    from walkaudit._loading.model import load_model
    from walkaudit._noise import NormalSource, make_noise

    model = load_model(SAMPLES / "digits_tokens_transformer.dynamo.onnx")
    x, y = _token_data()
    sites = [s for s in select(model.proto, model.types, Selection(), model.class_output.name)
             if s.name in ("linear_1", "linear_2")]
    data = from_arrays(x, y, model.inputs, num_classes=10)
    worker = Worker(model, data, runtime=Runtime("cpu"), noise=make_noise("additive", 0.5),
                    source=NormalSource(0, threads=1), sites=sites, batch_size=64)
    assert worker.fold("linear_1", (64 * 64, 32), 64) == "sample-minor"  # row t·N + n
    assert worker.fold("linear_2", (64, 64, 64), 64) is None  # samples on axis 0: nothing folded
