"""Tiny ONNX classifiers built in code (no torch needed), with planted structure the tests rely on."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR = 8  # onnxruntime 1.2x/1.3x load it; onnx 1.23 would write 14


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def mlp(seed: int = 0, features: int = 16, hidden: int = 32, classes: int = 4, opset: int = 17,
        batch="N") -> onnx.ModelProto:
    """x [N, features] -> MatMul+Add -> Relu -> Gemm -> logits [N, classes]."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 1 / np.sqrt(features), (features, hidden))
    w2 = rng.normal(0, 1 / np.sqrt(hidden), (hidden, classes))
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h_mm"], name="fc1"),
        helper.make_node("Add", ["h_mm", "b1"], ["h"], name="fc1_bias"),
        helper.make_node("Relu", ["h"], ["h_relu"], name="relu1"),
        helper.make_node("Gemm", ["h_relu", "w2", "b2"], ["logits"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])],
        [_init("w1", w1), _init("b1", rng.normal(0, 0.1, hidden)), _init("w2", w2), _init("b2", np.zeros(classes))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR)


def resnet_block(seed: int = 0, channels: int = 4, classes: int = 3, opset: int = 17) -> onnx.ModelProto:
    """Conv -> Relu -> Conv, a residual Add with the first conv's output, global pooling, Gemm."""
    rng = np.random.default_rng(seed)
    c = channels
    nodes = [
        helper.make_node("Conv", ["x", "k0", "c0"], ["a"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["a_relu"], name="relu0"),
        helper.make_node("Conv", ["a_relu", "k1", "c1"], ["b"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["b", "a"], ["res"], name="residual"),
        helper.make_node("Relu", ["res"], ["res_relu"], name="relu1"),
        helper.make_node("GlobalAveragePool", ["res_relu"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "w", "bias"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "resblock",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 6, 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        [_init("k0", rng.normal(0, 0.5, (c, 1, 3, 3))), _init("c0", rng.normal(0, 0.1, c)),
         _init("k1", rng.normal(0, 0.3, (c, c, 3, 3))), _init("c1", np.zeros(c)),
         _init("w", rng.normal(0, 1, (classes, c))), _init("bias", np.zeros(classes))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR)


def teacher_labels(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """Labels that the clean model gets right: its own predictions."""
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0].argmax(axis=1)


def cpu_session(model: onnx.ModelProto):
    """A plain onnxruntime session on the CPU provider, default options."""
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
