"""Cost per site: MACs of the site's operator against hand counts, and the walk-time estimate used for sharding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from walkaudit._graph.cost import (
    NOISE_COST,
    OVERHEAD_COST,
    site_costs,
    site_macs,
    sites_macs,
)
from walkaudit._graph.sites import Selection, Site, select
from walkaudit._loading.model import load_model
from walkaudit.cli import main

from .models import IR, mlp, resnet_block

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def _init(name, shape):
    return numpy_helper.from_array(np.zeros(shape, np.float32), name)


def _model(nodes, inputs, outputs, inits, opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR)


def _info(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _one(node, inputs, output_shape, inits):
    """A model of one node; the site is its first output."""
    model = _model([node], inputs, [_info(node.output[0], output_shape)], inits)
    return model, Site(0, node.output[0], node.name, node.op_type, None)


def test_conv_with_groups_stride_and_pads():
    # X [N,4,8,8], W [6, 4/2, 3, 3], stride 2, pads 1 -> Y [N,6,4,4]: 6·4·4 outputs × (2·3·3) = 1728
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", group=2, strides=[2, 2], pads=[1, 1, 1, 1])
    model, site = _one(node, [_info("x", ["N", 4, 8, 8])], ["N", 6, None, None], [_init("w", (6, 2, 3, 3))])
    assert site_macs(model, site) == 6 * 4 * 4 * 2 * 3 * 3 == 1728


def test_conv_transpose_counts_per_input_element():
    # X [N,3,5,5], W [3, 4, 2, 2], stride 2 -> Y [N,4,10,10]: 3·5·5 inputs × 4·2·2 = 1200
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="deconv", strides=[2, 2])
    model, site = _one(node, [_info("x", ["N", 3, 5, 5])], ["N", 4, 10, 10], [_init("w", (3, 4, 2, 2))])
    assert site_macs(model, site) == 1200


def test_gemm_with_transposed_weights():
    node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)
    model, site = _one(node, [_info("x", ["N", 16])], ["N", 10], [_init("w", (10, 16)), _init("b", (10,))])
    assert site_macs(model, site) == 16 * 10


@pytest.mark.parametrize(("a", "b", "out", "macs"), [
    (["N", 16], (16, 32), ["N", 32], 16 * 32),
    (["N", 3, 5, 7], (7, 2), ["N", 3, 5, 2], 3 * 5 * 2 * 7),  # batched, weights broadcast
    (["N", 16], ("K2", 8), ["N", 8], 16 * 8),  # K from A
])
def test_matmul_including_batched(a, b, out, macs):
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    inits = [_init("w", b)] if all(isinstance(d, int) for d in b) else []
    inputs = [_info("x", a)] + ([] if inits else [_info("w", list(b))])
    model, site = _one(node, inputs, out, inits)
    assert site_macs(model, site) == macs


def test_batched_matmul_of_two_activations():
    # attention scores: [N, heads 2, 6, 8] @ [N, 2, 8, 6] -> [N, 2, 6, 6]: 2·6·6 × 8
    node = helper.make_node("MatMul", ["q", "k"], ["s"], name="scores")
    model, site = _one(node, [_info("q", ["N", 2, 6, 8]), _info("k", ["N", 2, 8, 6])], ["N", 2, 6, 6], [])
    assert site_macs(model, site) == 2 * 6 * 6 * 8


@pytest.mark.parametrize(("op", "gates", "direction", "layout"), [
    ("LSTM", 4, "bidirectional", 0), ("GRU", 3, "forward", 0), ("RNN", 1, "reverse", 1)])
def test_recurrent_ops_count_every_step_gate_and_direction(op, gates, direction, layout):
    steps, features, hidden = 5, 3, 4
    dirs = 2 if direction == "bidirectional" else 1
    x = ["N", steps, features] if layout else [steps, "N", features]
    node = helper.make_node(op, ["x", "w", "r"], ["y"], name="rnn", hidden_size=hidden, direction=direction,
                            layout=layout)
    y = ["N", steps, dirs, hidden] if layout else [steps, dirs, "N", hidden]
    model, site = _one(node, [_info("x", x)], y, [_init("w", (dirs, gates * hidden, features)),
                                                  _init("r", (dirs, gates * hidden, hidden))])
    assert site_macs(model, site) == steps * dirs * gates * hidden * (features + hidden)


def test_unknown_shapes_give_none_and_ops_without_macs_give_zero():
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    model, site = _one(node, [_info("x", ["N", "K"]), _info("w", ["K", "M"])], ["N", "M"], [])
    assert site_macs(model, site) is None
    relu = helper.make_node("Relu", ["x"], ["y"], name="relu")
    model, site = _one(relu, [_info("x", ["N", 8])], ["N", 8], [])
    assert site_macs(model, site) == 0
    einsum = helper.make_node("Einsum", ["x", "w"], ["y"], name="es", equation="nk,km->nm")
    model, site = _one(einsum, [_info("x", ["N", 8])], ["N", 4], [_init("w", (8, 4))])
    assert site_macs(model, site) is None  # does MACs, not modelled: unknown rather than 0


def test_shapes_measured_by_the_clean_pass_fill_in_unknown_ones():
    # MatMul+Add with an input of unknown shape (as after an ai.onnx.ml Scaler): the site's shape as run gives it
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"], name="mm"),
             helper.make_node("Add", ["mm", "b"], ["y"], name="bias")]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)], [_info("y", None)],
                   [_init("w", (16, 8)), _init("b", (8,))])
    site = Site(0, "y", "mm", "MatMul+Add", None)
    assert site_macs(model, site) is None
    assert site_macs(model, site, {"y": ("N", 8)}) == 16 * 8


def test_bias_add_sites_count_their_layer_and_ops_all_lists_every_node():
    loaded = load_model(mlp(features=16, hidden=32, classes=4))
    sites = select(loaded.proto, loaded.types, Selection(), loaded.class_output.name)
    assert [(s.op_type, site_macs(loaded, s)) for s in sites] == [("MatMul+Add", 16 * 32), ("Gemm", 32 * 4)]
    every = select(loaded.proto, loaded.types, Selection(("all",)), loaded.class_output.name)
    assert sites_macs(loaded, every) == [512, 0, 0, 128]  # MatMul, its Add, Relu, Gemm
    assert sites_macs(loaded.proto, every) == sites_macs(loaded, every)  # a bare ModelProto: inferred here


def test_lenet5_sample_by_hand():
    loaded = load_model(SAMPLES / "mnist_lenet5.dynamo.onnx")
    sites = select(loaded.proto, loaded.types, Selection(), loaded.class_output.name)
    hand = [6 * 28 * 28 * (1 * 5 * 5),  # conv 1→6, 5×5, on 28×28 (padded): 117 600
            16 * 10 * 10 * (6 * 5 * 5),  # conv 6→16, 5×5, on 14×14 → 10×10: 240 000
            400 * 120, 120 * 84, 84 * 10]
    assert sites_macs(loaded, sites) == hand
    assert [site_macs(loaded, s) for s in sites] == hand


def test_site_costs_follow_the_suffix():
    loaded = load_model(SAMPLES / "mnist_lenet5.dynamo.onnx")
    sites = select(loaded.proto, loaded.types, Selection(), loaded.class_output.name)
    costs = site_costs(loaded, sites)
    assert costs == site_costs(loaded.proto, sites, output=loaded.class_output.name)
    assert all(a > b > 0 for a, b in zip(costs, costs[1:]))  # a chain: every later suffix is part of the earlier
    # the last Gemm's suffix is empty: only its noise
    assert costs[-1] == OVERHEAD_COST + NOISE_COST * 10
    # the first conv's suffix holds the second conv and the three Gemms
    assert costs[0] > sum(sites_macs(loaded, sites)[1:])
    assert site_costs(loaded, []) == []


def test_residual_model_costs_count_the_skip_path_once():
    loaded = load_model(resnet_block(channels=4))
    sites = select(loaded.proto, loaded.types, Selection(), loaded.class_output.name)
    costs = site_costs(loaded, sites)
    assert len(costs) == 3 and costs[0] > costs[1] > costs[2] > 0


def test_unknown_shapes_fall_back_to_node_counts():
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="r0"), helper.make_node("Sigmoid", ["a"], ["b"], name="r1"),
             helper.make_node("Relu", ["b"], ["c"], name="r2")]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                   [helper.make_tensor_value_info("c", TensorProto.FLOAT, None)], [])
    sites = [Site(0, "a", "r0", "Relu", None), Site(1, "b", "r1", "Sigmoid", None), Site(2, "c", "r2", "Relu", None)]
    assert site_costs(model, sites) == [3.0, 2.0, 1.0]  # the site itself (its noise) plus its suffix's nodes


def test_inspect_shows_macs_in_the_table_and_the_json():
    model = str(SAMPLES / "mnist_lenet5.dynamo.onnx")
    result = CliRunner().invoke(main, ["inspect", model, "--json"], catch_exceptions=False)
    assert result.exit_code == 0
    assert [s["macs"] for s in json.loads(result.stdout)] == [117600, 240000, 48000, 10080, 840]
    result = CliRunner().invoke(main, ["inspect", model], catch_exceptions=False, env={"COLUMNS": "160"})
    assert result.exit_code == 0
    assert "MACs" in result.stdout and "117.6k" in result.stdout and "240k" in result.stdout
    assert any(line.rstrip(" │").endswith("840") for line in result.stdout.splitlines())


def test_lenet5_has_the_documented_layout():
    proto = onnx.load(SAMPLES / "mnist_lenet5.dynamo.onnx")
    assert [n.op_type for n in proto.graph.node if n.op_type in ("Conv", "Gemm")] == ["Conv", "Conv", "Gemm", "Gemm",
                                                                                         "Gemm"]
