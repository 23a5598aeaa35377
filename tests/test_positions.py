"""The tail of a suffix on the positions its output reads (`positions.keep_read_positions`).

Real models: the BERT-style [CLS] classifiers in samples/ (torch, both exporters): every default site's pruned suffix
gives the unpruned suffix's logits, its last layer runs on one position, and a walk counts the same. Hand-built
graphs: each rule that ends the region (an op that mixes positions, a Reshape that folds the position axis, a size
shape inference does not know, the batch axis) keeps the model as it is, and each rule that extends it gives the
original's outputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import walkaudit
from walkaudit._graph import passes, positions
from walkaudit._graph.index import GraphIndex
from walkaudit._graph.sites import Selection, select
from walkaudit._loading.model import load_model, value_types

from .models import IR

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
CLS = [SAMPLES / f"digits_tokens_cls.{e}.onnx" for e in ("legacy", "dynamo")]


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def outputs(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return session(model).run(None, feeds)


# ---- real models ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=CLS, ids=lambda p: p.name.split(".")[1])
def cls_model(request):
    loaded = load_model(str(request.param))
    data = np.load(SAMPLES / "digits_tokens_val.npz")
    feeds = {i.name: data[i.name][:200] for i in loaded.inputs}
    return loaded, feeds, data


def clean_values(loaded, names, feeds) -> dict[str, np.ndarray]:
    """The clean values of `names` (graph inputs among them) on `feeds`."""
    inner = [n for n in names if n not in feeds]
    got = session(passes.expose(loaded.proto, inner, loaded.types)).run(inner, feeds)
    return {n: feeds[n] if n in feeds else got[inner.index(n)] for n in names}


def suffixes(loaded):
    index, batch = GraphIndex(loaded.proto.graph), passes.batch_dimension(loaded.inputs)
    out = loaded.class_output.name
    for site in select(loaded.proto, loaded.types, Selection()):
        plan = passes.per_sample(index.suffix_plan(site.name, out), site.name, index, loaded.types, batch)
        sfx = passes.suffix(loaded.proto, site.name, out, loaded.types, plan, index=index)
        yield site.name, sfx, positions.keep_read_positions(sfx.model, loaded.types, batch)


def test_every_site_of_a_cls_classifier_gives_the_same_logits_from_its_pruned_suffix(cls_model):
    loaded, feeds, _ = cls_model
    pruned_sites = []
    for site, sfx, pruned in suffixes(loaded):
        names = [i.name for i in sfx.model.graph.input]
        values = clean_values(loaded, names, feeds)
        (want,), (got,) = outputs(sfx.model, values), outputs(pruned, values)
        # rounding only: a one-row MatMul may take another kernel (observed ≤ 1e-6 on these logits)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=site)
        assert (got.argmax(1) == want.argmax(1)).all(), site
        pruned_sites.append(pruned is not sfx.model)
    # all but the logits (no op before them to prune) run their tail on the kept position
    assert pruned_sites[:-1] == [True] * (len(pruned_sites) - 1) and pruned_sites[-1] is False


def test_the_last_layer_of_a_pruned_suffix_computes_one_position(cls_model):
    """The value the [CLS] Gather reads is [N, 1, D] after pruning ([N, T, D] before)."""
    loaded, feeds, _ = cls_model
    site, sfx, pruned = next(iter(suffixes(loaded)))  # the first site: its suffix holds both layers
    seed = next(n for n in sfx.model.graph.node if n.op_type == "Gather" and n.output[0] in
                {i for m in sfx.model.graph.node if m.op_type in ("Gemm", "MatMul") for i in m.input})
    names = [i.name for i in sfx.model.graph.input]
    values = clean_values(loaded, names, feeds)
    shapes = []
    for model in (sfx.model, pruned):
        read = next(n.input[0] for n in model.graph.node if n.output[0] == seed.output[0])
        probe = onnx.ModelProto.FromString(model.SerializeToString())
        probe.graph.output.append(helper.make_empty_tensor_value_info(read))
        shapes.append(outputs(probe, values)[-1].shape)
    T = feeds["input_ids"].shape[1]
    assert shapes == [(200, T, shapes[0][2]), (200, 1, shapes[0][2])]


def test_a_walk_counts_the_same_with_the_tail_pruned(cls_model, monkeypatch):
    loaded, _, data = cls_model
    inputs = {i.name: data[i.name][:300] for i in loaded.inputs}
    kwargs = dict(sigmas=(0.0, 0.1, 0.3, 1.0), repeats=1, threads=2, provider="cpu", seed=3)
    pruned = walkaudit.audit(loaded.path, inputs, data["labels"][:300], **kwargs)
    monkeypatch.setattr(positions, "keep_read_positions", lambda model, types, batch: model)
    whole = walkaudit.audit(loaded.path, inputs, data["labels"][:300], **kwargs)
    assert [[p.accuracy for p in s.points] for s in pruned.sites] == [[p.accuracy for p in s.points]
                                                                       for s in whole.sites]


def test_exact_sessions_keep_the_whole_tail(cls_model, monkeypatch):
    """--exact promises σ = 0 bit for bit: a one-row MatMul may round differently, so no pruning there."""
    loaded, _, data = cls_model
    calls = []
    real = positions.keep_read_positions
    monkeypatch.setattr(positions, "keep_read_positions", lambda *a: calls.append(1) or real(*a))
    inputs = {i.name: data[i.name][:64] for i in loaded.inputs}
    walkaudit.audit(loaded.path, inputs, data["labels"][:64], sigmas=(0.0, 1.0), repeats=1, exact=True)
    assert calls == []
    walkaudit.audit(loaded.path, inputs, data["labels"][:64], sigmas=(0.0, 1.0), repeats=1)
    assert calls


# ---- hand-built graphs: each rule ----------------------------------------------------------------------------------

N, T, D = "batch", "seq", 4


def graph(nodes, inputs, output, inits=(), output_shape=None, opset: int = 17) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(output, TensorProto.FLOAT, output_shape)],
                          list(inits))
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = IR
    return onnx.shape_inference.infer_shapes(model)


def types_of(model):
    return value_types(model)


def i64(name, value):
    return numpy_helper.from_array(np.array(value, np.int64), name)


def f32(name, value):
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


X = helper.make_tensor_value_info("x", TensorProto.FLOAT, [N, T, D])
RNG = np.random.default_rng(0)
FEED = {"x": RNG.normal(size=(3, 5, D)).astype(np.float32)}
W = f32("w", RNG.normal(size=(D, D)))


def check(model, pruned: bool, feed=None):
    """The pass's result gives the model's outputs; it pruned (or not) as said."""
    feed = feed or FEED
    out = positions.keep_read_positions(model, types_of(model), N)
    assert (out is not model) == pruned
    np.testing.assert_allclose(outputs(out, feed)[0], outputs(model, feed)[0], rtol=0, atol=1e-6)
    return out


def test_position_wise_ops_before_a_gather_run_on_the_one_position():
    n = helper.make_node
    model = graph([n("MatMul", ["x", "w"], ["h"]), n("Relu", ["h"], ["r"]),
                   n("LayerNormalization", ["r", "g", "b"], ["ln"], axis=-1),
                   n("Gather", ["ln", "zero"], ["cls"], axis=1)],
                  [X], "cls", [W, f32("g", np.ones(D)), f32("b", np.zeros(D)), i64("zero", 0)])
    out = check(model, pruned=True)
    sliced = [m for m in out.graph.node if m.op_type == "Slice"]
    assert [m.input[0] for m in sliced] == ["x"]  # the one value entering the region


@pytest.mark.parametrize("index", [0, 2, -1, [1]])
def test_a_gather_of_any_one_index_reads_that_position(index):
    n = helper.make_node
    model = graph([n("Tanh", ["x"], ["h"]), n("Gather", ["h", "i"], ["y"], axis=1)], [X], "y", [i64("i", index)])
    check(model, pruned=True)


def test_a_slice_seed_keeps_its_range():
    n = helper.make_node
    model = graph([n("Sigmoid", ["x"], ["h"]), n("Slice", ["h", "s", "e", "a"], ["y"])], [X], "y",
                  [i64("s", [1]), i64("e", [3]), i64("a", [1])])
    check(model, pruned=True)


def test_softmax_across_positions_ends_the_region():
    n = helper.make_node
    model = graph([n("Softmax", ["x"], ["p"], axis=1), n("Gather", ["p", "zero"], ["y"], axis=1)], [X], "y",
                  [i64("zero", 0)])
    check(model, pruned=False)


def test_a_value_also_read_whole_is_sliced_only_on_the_way_into_the_region():
    """x feeds the region (Relu) and a mean over the positions (outside): the mean still sees every position."""
    n = helper.make_node
    model = graph([n("Relu", ["x"], ["r"]), n("ReduceMean", ["x"], ["m"], axes=[1], keepdims=1),
                   n("Add", ["r", "m"], ["s"]), n("Gather", ["s", "zero"], ["y"], axis=1)],
                  [X], "y", [i64("zero", 0)])
    out = check(model, pruned=True)
    assert any(m.op_type == "ReduceMean" and m.input[0] == "x" for m in out.graph.node)


def test_a_positional_term_is_sliced_and_a_broadcast_read_whole():
    n = helper.make_node
    pos = f32("pos", RNG.normal(size=(1, 5, D)))
    scale = f32("scale", RNG.normal(size=(1, 1, D)))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [N, 5, D])
    model = graph([n("Add", ["x", "pos"], ["h"]), n("Mul", ["h", "scale"], ["s"]),
                   n("Gather", ["s", "zero"], ["y"], axis=1)], [x], "y", [pos, scale, i64("zero", 0)])
    out = check(model, pruned=True)
    assert sorted(m.input[0] for m in out.graph.node if m.op_type == "Slice") == ["pos", "x"]


def test_a_reshape_that_folds_the_position_axis_ends_the_region():
    """[N, T, D] -> [N, T·D]: its axis 1 is no longer the positions."""
    n = helper.make_node
    model = graph([n("Relu", ["x"], ["r"]), n("Reshape", ["r", "shape"], ["flat"]),
                   n("Gather", ["flat", "zero"], ["y"], axis=1)], [X], "y", [i64("shape", [0, -1]), i64("zero", 0)])
    check(model, pruned=False)


def test_a_reshape_that_keeps_the_leading_axes_is_rebuilt_from_the_sliced_input():
    """Heads merged as the exporters write it: Reshape([N, T, H, d], Concat(Shape(x)[:2], [-1])), the shape vector
    holding T as a number."""
    n = helper.make_node
    x4 = helper.make_tensor_value_info("x", TensorProto.FLOAT, [N, T, 2, 2])
    model = graph([n("Shape", ["x"], ["sh"]), n("Slice", ["sh", "s0", "s2"], ["nt"]),
                   n("Concat", ["nt", "minus_one"], ["target"], axis=0),
                   n("Relu", ["x"], ["r"]), n("Reshape", ["r", "target"], ["merged"]),
                   n("MatMul", ["merged", "w"], ["h"]), n("Gather", ["h", "zero"], ["y"], axis=1)],
                  [x4], "y", [i64("s0", [0]), i64("s2", [2]), i64("minus_one", [-1]), W, i64("zero", 0)])
    check(model, pruned=True, feed={"x": RNG.normal(size=(3, 5, 2, 2)).astype(np.float32)})


def test_an_input_whose_size_shape_inference_does_not_know_ends_the_region():
    """b's axis 1 is unknown: it may be a broadcast (size 1) or the positions; slicing it could be wrong."""
    n = helper.make_node
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [N, None, D])
    model = graph([n("Add", ["x", "b"], ["h"]), n("Gather", ["h", "zero"], ["y"], axis=1)], [X, b], "y",
                  [i64("zero", 0)])
    check(model, pruned=False, feed={**FEED, "b": RNG.normal(size=(3, 1, D)).astype(np.float32)})


def test_the_batch_axis_is_never_a_position_axis():
    n = helper.make_node
    model = graph([n("Relu", ["x"], ["r"]), n("Gather", ["r", "zero"], ["y"], axis=0)], [X], "y", [i64("zero", 0)])
    check(model, pruned=False)


def test_attention_rows_query_scores_and_context_run_for_the_kept_position_only():
    """q·kᵀ, softmax over the keys and probs·v: the kept query row needs every key and value, one query."""
    n = helper.make_node
    model = graph([n("MatMul", ["x", "w"], ["q"]), n("Transpose", ["x"], ["kt"], perm=[0, 2, 1]),
                   n("MatMul", ["q", "kt"], ["scores"]), n("Softmax", ["scores"], ["p"], axis=-1),
                   n("MatMul", ["p", "x"], ["ctx"]), n("Gather", ["ctx", "zero"], ["y"], axis=1)],
                  [X], "y", [W, i64("zero", 0)])
    out = check(model, pruned=True)
    region = {m.output[0] for m in out.graph.node} - {m.output[0] for m in model.graph.node}
    assert any(name.startswith("x/kept_positions") for name in region)
    assert not any(m.op_type == "Transpose" and m.input[0].startswith("x/kept") for m in out.graph.node)


def test_sequence_first_values_keep_their_position_on_axis_0():
    """[T, N, D] (torch's MultiheadAttention without batch_first): x[0] reads position 0 along axis 0."""
    n = helper.make_node
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [T, N, D])
    model = graph([n("MatMul", ["x", "w"], ["h"]), n("Relu", ["h"], ["r"]), n("Gather", ["r", "zero"], ["y"], axis=0)],
                  [x], "y", [W, i64("zero", 0)])
    out = check(model, pruned=True)
    assert [m.input[0] for m in out.graph.node if m.op_type == "Slice"] == ["x"]


def test_models_before_opset_10_are_left_as_they_are():
    """Slice takes starts and ends as attributes before opset 10; the pass writes the input form."""
    n = helper.make_node
    model = graph([n("MatMul", ["x", "w"], ["h"]), n("Relu", ["h"], ["r"]), n("Gather", ["r", "zero"], ["y"], axis=1)],
                  [X], "y", [W, i64("zero", 0)], opset=9)
    check(model, pruned=False)
