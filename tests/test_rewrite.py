"""Graph surgery (rewrite.py) and site enumeration (sites.py) on small graphs, plus a property test over random DAGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from walkaudit._graph import passes as rewrite
from walkaudit._graph import queries as g
from walkaudit._graph.index import GraphIndex
from walkaudit._graph.sites import ALL, Selection, candidates, select
from walkaudit._loading.model import prepare_for_runtime, read_model, value_types
from walkaudit.errors import UsageError

from .models import IR, mlp, resnet_block


def session(model: onnx.ModelProto):
    """A CPU session without graph optimisations: these tests check the graphs, not onnxruntime's fusions.

    (Fusions that a rewrite blocks, e.g. MatMul+Add -> Gemm or the NCHWc Conv+Add, change the last bit of the
    original model's outputs: see test_runtime_sessions_keep_sigma_zero_exact.)
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def outputs_of(model: onnx.ModelProto, feeds: dict) -> dict[str, np.ndarray]:
    names = [o.name for o in model.graph.output]
    return dict(zip(names, session(model).run(names, feeds)))


def clean_values(model: onnx.ModelProto, types, names, feeds) -> dict[str, np.ndarray]:
    wanted = [n for n in dict.fromkeys(names) if n not in feeds]
    exposed = rewrite.expose(model, wanted, types)
    values = dict(zip(wanted, session(exposed).run(wanted, feeds)))
    values.update(feeds)
    return values


def x_for(model: onnx.ModelProto, batch: int = 5, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    vi = model.graph.input[0]
    shape = [batch if not d.HasField("dim_value") else d.dim_value for d in vi.type.tensor_type.shape.dim]
    return {vi.name: rng.normal(size=shape).astype(np.float32)}


def bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=True)


# -- suffix ------------------------------------------------------------------------------------------------------------
def test_suffix_plan_of_residual_block_keeps_the_add_and_feeds_the_skip():
    model = resnet_block()
    names = [n.name for n in model.graph.node]
    nodes, frontier = rewrite.suffix_plan(model, "b", "logits")
    assert [names[i] for i in nodes] == ["residual", "relu1", "pool", "flatten", "fc"]
    assert frontier == ("a",)  # the skip value, computed before the site, comes from the clean pass

    nodes, frontier = rewrite.suffix_plan(model, "a_relu", "logits")
    assert [names[i] for i in nodes] == ["conv1", "residual", "relu1", "pool", "flatten", "fc"]
    assert frontier == ("a",)

    # noise at the skip's source reaches both branches: nothing is read from the clean pass
    nodes, frontier = rewrite.suffix_plan(model, "a", "logits")
    assert [names[i] for i in nodes] == names[1:]
    assert frontier == ()


def test_suffix_model_reproduces_the_output_and_noise_changes_it():
    model = resnet_block()
    types = value_types(model)
    feeds = x_for(model)
    clean = clean_values(model, types, ["a", "b"], feeds)
    want = outputs_of(model, feeds)["logits"]
    part = rewrite.suffix(model, "b", "logits", types)
    assert [i.name for i in part.model.graph.input] == ["b", "a"]
    assert [o.name for o in part.model.graph.output] == ["logits"]
    assert {i.name for i in part.model.graph.initializer} == {"w", "bias"}  # only what the suffix reads
    onnx.checker.check_model(part.model, full_check=True)
    sess = session(part.model)
    got = sess.run(["logits"], {"b": clean["b"], "a": clean["a"]})[0]
    assert bits_equal(got, want)
    noisy = sess.run(["logits"], {"b": clean["b"] + np.float32(0.5), "a": clean["a"]})[0]
    assert not np.array_equal(noisy, want)


def test_suffix_of_the_class_output_is_a_pass_through():
    model = mlp()
    types = value_types(model)
    nodes, frontier = rewrite.suffix_plan(model, "logits", "logits")
    assert nodes == [] and frontier == ()
    part = rewrite.suffix(model, "logits", "logits", types)
    assert len(part.model.graph.node) == 0 and len(part.model.graph.initializer) == 0
    onnx.checker.check_model(part.model, full_check=True)
    y = np.arange(12, dtype=np.float32).reshape(3, 4) - 5.5
    assert bits_equal(session(part.model).run(["logits"], {"logits": y})[0], y)


def test_suffix_takes_constant_only_nodes_and_reads_dynamic_shapes_as_frontier():
    """A weight made by a Transpose of an initializer joins the suffix; a shape computed from the input is fed."""
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("Transpose", ["wt"], ["w"], name="w_T"),  # constant-only: must be rebuilt in the suffix
        helper.make_node("Shape", ["x"], ["x_shape"], name="shape"),  # depends on the input: frontier
        helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Reshape", ["r", "x_shape"], ["y"], name="reshape"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(rng.normal(size=(4, 4)).astype(np.float32), "wt")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR)
    types = value_types(model)
    assert [n.name for n in (model.graph.node[i] for i in rewrite.suffix_plan(model, "h", "y")[0])] == [
        "relu", "reshape"]
    assert rewrite.suffix_plan(model, "h", "y")[1] == ("x_shape",)
    # a site before the MatMul: the transposed weight is computed inside the suffix, from the initializer
    nodes_x, frontier_x = rewrite.suffix_plan(model, "x", "y")
    assert {model.graph.node[i].name for i in nodes_x} == {"w_T", "shape", "fc", "relu", "reshape"}
    assert frontier_x == ()
    feeds = x_for(model)
    want = outputs_of(model, feeds)["y"]
    clean = clean_values(model, types, ["h", "x_shape"], feeds)
    for site in ("h", "x"):
        part = rewrite.suffix(model, site, "y", types)
        onnx.checker.check_model(part.model, full_check=True)
        got = session(part.model).run(["y"], {n: clean[n] for n in (site, *part.frontier)})[0]
        assert bits_equal(got, want)


# -- inject ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("build", [mlp, resnet_block], ids=["mlp", "resnet_block"])
@pytest.mark.parametrize("terms", [(True, True), (True, False), (False, True)], ids=["mul+add", "mul", "add"])
def test_inject_keeps_outputs_checks_and_leaves_the_model_alone(build, terms):
    model = build()
    before = model.SerializeToString()
    types = value_types(model)
    sites = [s.name for s in candidates(model, types, (ALL,))]
    has_mul, has_add = terms
    injected, injections = rewrite.inject(model, sites, types, has_mul=has_mul, has_add=has_add)
    assert model.SerializeToString() == before
    onnx.checker.check_model(injected, full_check=True)
    assert [o.name for o in injected.graph.output] == [o.name for o in model.graph.output]
    assert [i.site for i in injections] == sites
    for k, inj in enumerate(injections):
        assert inj.mul == (f"walkaudit.mul.{k}" if has_mul else None)
        assert inj.add == (f"walkaudit.add.{k}" if has_add else None)
    new_inputs = [i.name for i in injected.graph.input][len(model.graph.input):]
    assert new_inputs == [t for inj in injections for t in (inj.mul, inj.add) if t]
    # each site's producer now writes <site>.clean and exactly one node writes the site's own name
    made_by = g.producers(injected.graph)
    for site in sites:
        assert injected.graph.node[made_by[f"{site}.clean"]].op_type == {n.output[0]: n.op_type for n in
                                                                         model.graph.node}[site]
        assert injected.graph.node[made_by[site]].name.startswith("walkaudit/")
    # σ = 0 (mul = 1, add = 0) gives the original outputs bit for bit
    feeds = x_for(model)
    want = outputs_of(model, feeds)
    clean = clean_values(model, types, sites, feeds)
    fed = dict(feeds)
    for inj in injections:
        if inj.mul:
            fed[inj.mul] = np.ones_like(clean[inj.site])
        if inj.add:
            fed[inj.add] = np.zeros_like(clean[inj.site])
    got = outputs_of(injected, fed)
    assert all(bits_equal(got[k], want[k]) for k in want)


def test_inject_at_the_output_site_applies_the_terms_exactly():
    model = mlp()
    types = value_types(model)
    injected, [inj] = rewrite.inject(model, ["logits"], types, has_mul=True, has_add=True)
    feeds = x_for(model, batch=7)
    y = outputs_of(model, feeds)["logits"]
    rng = np.random.default_rng(1)
    mul = rng.normal(1, 0.3, y.shape).astype(np.float32)
    add = rng.normal(0, 0.3, y.shape).astype(np.float32)
    got = outputs_of(injected, {**feeds, inj.mul: mul, inj.add: add})["logits"]
    assert bits_equal(got, y * mul + add)


def test_inject_converts_an_old_opset_copy_to_opset_7():
    """onnxruntime has no Mul/Add kernels before opset 7: inject converts its copy, the input model stays as it is."""
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Sigmoid", ["r"], ["y"])]
    graph = helper.make_graph(nodes, "old", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 6)], ir_version=3)
    before = model.SerializeToString()
    types = value_types(model)
    injected, injections = rewrite.inject(model, ["r", "y"], types, has_mul=True, has_add=True)
    assert model.SerializeToString() == before
    assert [(o.domain, o.version) for o in injected.opset_import] == [("", 7)]
    feeds = x_for(model)
    want = outputs_of(model, feeds)["y"]
    clean = clean_values(model, types, ["r", "y"], feeds)
    fed = {**feeds, **{i.mul: np.ones_like(clean[i.site]) for i in injections},
           **{i.add: np.zeros_like(clean[i.site]) for i in injections}}
    assert bits_equal(outputs_of(injected, fed)["y"], want)


# -- expose ------------------------------------------------------------------------------------------------------------
def test_expose_adds_outputs_once_and_leaves_the_model_alone():
    model = resnet_block()
    before = model.SerializeToString()
    types = value_types(model)
    exposed = rewrite.expose(model, ["a", "x", "logits", "res", "a"], types)
    assert model.SerializeToString() == before
    assert [o.name for o in exposed.graph.output] == ["logits", "a", "res"]  # inputs and outputs are skipped
    onnx.checker.check_model(exposed, full_check=True)
    feeds = x_for(model)
    got = outputs_of(exposed, feeds)
    assert got["a"].shape == (5, 4, 6, 6) and got["res"].shape == (5, 4, 6, 6)
    assert bits_equal(got["logits"], outputs_of(model, feeds)["logits"])


# -- sites -------------------------------------------------------------------------------------------------------------
def test_default_sites_fold_the_bias_add_into_the_layer():
    model = mlp()
    sites = candidates(model, value_types(model))
    assert [(s.index, s.name, s.node, s.op_type, s.weight) for s in sites] == [
        (0, "h", "fc1", "MatMul+Add", "w1"), (1, "logits", "fc2", "Gemm", "w2")]
    assert sites[0].shape == ("N", 32) and sites[0].base_op == "MatMul"


def test_default_sites_of_a_conv_block():
    model = resnet_block()
    sites = candidates(model, value_types(model))
    # conv1's only reader is an Add of a non-constant (the residual): no bias to fold
    assert [(s.name, s.op_type, s.weight) for s in sites] == [
        ("a", "Conv", "k0"), ("b", "Conv", "k1"), ("logits", "Gemm", "w")]


def test_matmul_whose_output_is_a_graph_output_is_not_folded():
    model = mlp()
    model.graph.output.append(helper.make_tensor_value_info("h_mm", TensorProto.FLOAT, ["N", 32]))
    sites = candidates(model, value_types(model))
    assert [(s.name, s.op_type) for s in sites] == [("h_mm", "MatMul"), ("logits", "Gemm")]


def test_ops_all_lists_every_float_node_output():
    for build, want in [(mlp, ["h_mm", "h", "h_relu", "logits"]),
                        (resnet_block, ["a", "a_relu", "b", "res", "res_relu", "pooled", "flat", "logits"])]:
        model = build()
        sites = candidates(model, value_types(model), (ALL,))
        assert [s.name for s in sites] == want
        assert [s.index for s in sites] == list(range(len(want)))


def test_ops_all_skips_integer_and_constant_outputs():
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),  # int64
        helper.make_node("Transpose", ["wt"], ["w"]),  # computed from an initializer only
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Reshape", ["h", "s"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                              [numpy_helper.from_array(np.eye(3, dtype=np.float32), "wt")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR)
    assert [s.name for s in candidates(model, value_types(model), (ALL,))] == ["h", "y"]


def test_select_include_exclude_names():
    model = resnet_block()
    types = value_types(model)
    assert [s.name for s in select(model, types, Selection())] == ["a", "b", "logits"]
    chosen = select(model, types, Selection(include="^conv"))  # matches node names
    assert [(s.index, s.name) for s in chosen] == [(0, "a"), (1, "b")]
    chosen = select(model, types, Selection(ops=(ALL,), include="relu", exclude="res"))
    assert [(s.index, s.name) for s in chosen] == [(0, "a_relu")]
    chosen = select(model, types, Selection(ops=("Gemm",), names=("res", "a_relu")))  # names override ops
    assert [(s.index, s.name, s.op_type) for s in chosen] == [(0, "res", "Add"), (1, "a_relu", "Relu")]
    assert [s.name for s in select(model, types, Selection(ops=("Relu", "Add")))] == ["a_relu", "res", "res_relu"]


def test_select_errors_name_the_sites():
    model = resnet_block()
    types = value_types(model)
    with pytest.raises(UsageError) as err:
        select(model, types, Selection(include="nothing_like_this"))
    assert "no site matches" in str(err.value) and "a, b, logits" in str(err.value)
    with pytest.raises(UsageError) as err:
        select(model, types, Selection(names=("missing",)))
    assert "'missing'" in str(err.value) and "a, a_relu, b, res, res_relu" in str(err.value)
    assert "…" in str(err.value)  # more than five candidates
    with pytest.raises(UsageError, match="^include '\\('") as err:  # the API names the field
        select(model, types, Selection(include="("))
    assert err.value.for_cli().startswith("--include '('")  # the CLI its flag
    with pytest.raises(UsageError, match="try ops all") as err:
        select(model, types, Selection(ops=("LSTM",)))
    assert "try --ops all" in err.value.for_cli()


# -- property: random small DAGs ---------------------------------------------------------------------------------------
OPS = ("linear", "gemm", "relu", "tanh", "sigmoid", "residual", "scale", "concat", "softmax", "reshape_like")


@st.composite
def dags(draw):
    """A random MLP-like DAG: layers, activations, residual Adds, Concats of earlier values, shapes read from earlier
    values; sometimes an intermediate value is a second output."""
    opset = draw(st.integers(13, 21))
    seed = draw(st.integers(0, 2**16))
    features = draw(st.integers(1, 6))
    ops = draw(st.lists(st.sampled_from(OPS), min_size=1, max_size=6))
    widths = draw(st.lists(st.integers(1, 8), min_size=len(ops), max_size=len(ops)))
    picks = draw(st.lists(st.integers(0, 100), min_size=len(ops), max_size=len(ops)))
    second_output = draw(st.booleans())
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    values = [("x", features)]  # (name, width) of every float value so far
    cur, width = "x", features

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array, dtype=np.float32), name))
        return name

    for k, (op, w, pick) in enumerate(zip(ops, widths, picks)):
        out = f"v{k}"
        same = [v for v, vw in values if vw == width and v != cur]
        if op == "linear":
            mm = f"v{k}_mm"
            nodes.append(helper.make_node("MatMul", [cur, const(f"w{k}", rng.normal(size=(width, w)))], [mm]))
            nodes.append(helper.make_node("Add", [mm, const(f"b{k}", rng.normal(size=w))], [out]))
            values.append((mm, w))
            width = w
        elif op == "gemm":
            trans = pick % 2
            shape = (w, width) if trans else (width, w)
            nodes.append(helper.make_node("Gemm", [cur, const(f"w{k}", rng.normal(size=shape)),
                                                   const(f"b{k}", rng.normal(size=w))], [out], transB=trans))
            width = w
        elif op in ("relu", "tanh", "sigmoid"):
            nodes.append(helper.make_node(op.capitalize(), [cur], [out]))
        elif op == "residual" and same:
            nodes.append(helper.make_node("Add", [cur, same[pick % len(same)]], [out]))
        elif op == "concat":
            other, ow = values[pick % len(values)]
            nodes.append(helper.make_node("Concat", [cur, other], [out], axis=1))
            width += ow
        elif op == "softmax":
            nodes.append(helper.make_node("Softmax", [cur], [out], axis=-1))
        elif op == "reshape_like" and same:
            shape = f"v{k}_shape"
            nodes.append(helper.make_node("Shape", [same[pick % len(same)]], [shape]))
            nodes.append(helper.make_node("Reshape", [cur, shape], [out]))
        else:  # "scale", or a residual/reshape with no earlier value of the same width
            nodes.append(helper.make_node("Mul", [cur, const(f"s{k}", rng.normal(size=width))], [out]))
        values.append((out, width))
        cur = out
    outputs = [helper.make_tensor_value_info(cur, TensorProto.FLOAT, ["N", width])]
    inner = values[1:-1]
    if second_output and inner:
        name, vw = inner[seed % len(inner)]
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", vw]))
    graph = helper.make_graph(nodes, "dag", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR)
    onnx.checker.check_model(model, full_check=True)
    return model, rng.normal(size=(3, features)).astype(np.float32)


@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(dags())
def test_random_dags_rewrite_cleanly_and_sigma_zero_is_exact(case):
    model, x = case
    before = model.SerializeToString()
    types = value_types(model)
    feeds = {"x": x}
    want = outputs_of(model, feeds)
    sites = [s.name for s in candidates(model, types, (ALL,))]
    assert sites, "every generated graph has a float node output"
    made_by = g.producers(model.graph)
    pairs = [(site, out) for site in sites for out in want
             if out == site or made_by[out] in g.descendants(model.graph, site)]
    plans = {pair: rewrite.suffix_plan(model, *pair) for pair in pairs}
    clean = clean_values(model, types, [*sites, *(f for _, fr in plans.values() for f in fr)], feeds)

    injected, injections = rewrite.inject(model, sites, types, has_mul=True, has_add=True)
    onnx.checker.check_model(injected, full_check=True)
    assert [o.name for o in injected.graph.output] == list(want)
    fed = {**feeds, **{i.mul: np.ones_like(clean[i.site]) for i in injections},
           **{i.add: np.zeros_like(clean[i.site]) for i in injections}}
    got = outputs_of(injected, fed)
    assert all(bits_equal(got[k], want[k]) for k in want)

    assert {out for _, out in pairs} == set(want), "every output depends on some site"
    for (site, out), (_, frontier) in plans.items():
        part = rewrite.suffix(model, site, out, types)
        assert part.frontier == frontier
        onnx.checker.check_model(part.model, full_check=True)
        value = session(part.model).run([out], {n: clean[n] for n in (site, *frontier)})[0]
        assert bits_equal(value, want[out]), (site, out)
    assert model.SerializeToString() == before


# -- the product's sessions -------------------------------------------------------------------------------------------
# onnxruntime fuses across values that exposing or rewriting turns into graph outputs or inputs (MatMul+Add -> Gemm,
# Conv+BatchNormalization, the NCHWc Conv+Add); walkaudit._execution.runtime.EXACT (exact mode) disables those
# fusions, and these tests check it does.


def conv_bn(channels: int = 32) -> onnx.ModelProto:
    """Conv -> BatchNormalization -> Relu -> pooling -> Gemm: the legacy torch export, BN not folded."""
    rng = np.random.default_rng(0)
    c = channels

    def init(name, a):
        return numpy_helper.from_array(np.asarray(a, np.float32), name)

    nodes = [helper.make_node("Conv", ["x", "k"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["bn"]),
             helper.make_node("Relu", ["bn"], ["r"]), helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]), helper.make_node("Gemm", ["f", "w"], ["logits"], transB=1)]
    graph = helper.make_graph(
        nodes, "conv_bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        [init("k", rng.normal(size=(c, c, 3, 3)) * 0.1), init("s", rng.uniform(0.5, 2, c)),
         init("b", rng.normal(size=c)), init("m", rng.normal(size=c)), init("v", rng.uniform(0.5, 2, c)),
         init("w", rng.normal(size=(3, c)))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR)


def _runtime_session(model):
    from walkaudit._execution.runtime import Runtime

    return Runtime("cpu", exact=True).session(model, "model under test")


@pytest.mark.parametrize("build, site", [(lambda: mlp(features=300, hidden=64), "h_mm"), (resnet_block, "b"),
                                         (conv_bn, "c")], ids=["wide-mlp-matmul", "resnet-conv", "conv-bn"])
def test_runtime_sessions_keep_sigma_zero_exact(build, site):
    """With the sessions walkaudit itself makes, σ = 0 at a site reproduces the original model's output bit for bit."""
    model = build()
    types = value_types(model)
    feeds = x_for(model, batch=16, seed=4)
    want = _runtime_session(model).run(["logits"], feeds)[0]
    part = rewrite.suffix(model, site, "logits", types)
    needed = [site, *part.frontier]
    got = _runtime_session(rewrite.expose(model, needed, types)).run(["logits", *needed], feeds)
    clean = dict(zip(needed, got[1:]))
    walk = _runtime_session(part.model).run(["logits"], clean)[0]
    injected, [inj] = rewrite.inject(model, [site], types, has_mul=True, has_add=True)
    whole = _runtime_session(injected).run(["logits"], {**feeds, inj.mul: np.ones_like(clean[site]),
                                                        inj.add: np.zeros_like(clean[site])})[0]
    assert bits_equal(got[0], want), "the clean pass (sites exposed) differs from the original model"
    assert bits_equal(walk, want) and bits_equal(whole, want)


def test_prefix_computes_only_what_is_asked_and_the_same_values():
    model = resnet_block(seed=2)
    types = value_types(model)
    part = rewrite.prefix(model, ["a", "a_relu"], types)
    assert [n.op_type for n in part.graph.node] == ["Conv", "Relu"]
    assert [o.name for o in part.graph.output] == ["a", "a_relu"]
    assert {i.name for i in part.graph.initializer} == {"k0", "c0"}
    onnx.checker.check_model(part, full_check=True)
    feeds = x_for(model, batch=3, seed=1)
    full = session(rewrite.expose(model, ["a", "a_relu"], types)).run(["a", "a_relu"], feeds)
    got = session(part).run(["a", "a_relu"], feeds)
    assert all(bits_equal(g, f) for g, f in zip(got, full))


# -- the passes' contract: functional ---------------------------------------------------------------------------------
SAMPLE_MODEL = Path(__file__).resolve().parents[1] / "samples" / "mnist_lenet5.dynamo.onnx"


def test_every_pass_leaves_its_input_byte_identical():
    """expose, suffix, prefix, graph_noise, inject_fed and inject return new models and never modify theirs."""
    model = read_model(SAMPLE_MODEL)[0]
    prepare_for_runtime(model)
    types = value_types(model)
    sites = [s.name for s in candidates(model, types)]
    out = model.graph.output[0].name
    index = GraphIndex(model.graph)
    before = model.SerializeToString()
    sfx = rewrite.suffix(model, sites[1], out, types, index=index)
    passes = {
        "expose": lambda: rewrite.expose(model, sites, types),
        "suffix": lambda: rewrite.suffix(model, sites[0], out, types),
        "prefix": lambda: rewrite.prefix(model, [sites[1], *sfx.frontier], types, index=index),
        "inject_fed": lambda: rewrite.inject_fed(model, sites, types, True, True),
        "inject": lambda: rewrite.inject(model, sites, types, True, True),
    }
    for name, run in passes.items():
        run()
        assert model.SerializeToString() == before, f"{name} modified its input"
    suffix_before = sfx.model.SerializeToString()
    for fed in (True, False):
        rewrite.graph_noise(sfx, types, True, True, seeds=(1, 2), fed=fed)
        assert sfx.model.SerializeToString() == suffix_before, "graph_noise modified its input"


# -- internal names never collide with the model's ---------------------------------------------------------------------
#: Names the passes would pick for what they add; the hostile model below uses every one of them itself.
HOSTILE_VALUES = ["h.clean", "h.scaled", "walkaudit.sigma_add", "walkaudit.eps_add", "walkaudit.eps_mul",
                  "walkaudit.mul.0", "walkaudit.add.0", "walkaudit.mul.1", "walkaudit.add.1", "walkaudit/noisy_add",
                  "walkaudit/noisy_mul", "walkaudit/factor", "walkaudit/scaled_add", "walkaudit/levels",
                  "walkaudit/count", "walkaudit/eps_add", "walkaudit/eps_mul", "h.clean/shape", "h.clean/lifted",
                  "walkaudit.eps_add.0", "walkaudit.eps_mul.0", "walkaudit/sigma_shape", "h.clean/levels",
                  "walkaudit.mul.0.clean", "walkaudit.one_1"]
HOSTILE_INITS = ["walkaudit.one", "walkaudit.zero", "walkaudit.minus_one", "walkaudit.end", "walkaudit.unit",
                 "walkaudit.sigma_shape.0"]
HOSTILE_NODES = ["walkaudit/fold", "walkaudit/fold/h", "walkaudit/mul/h", "walkaudit/add/h", "walkaudit/noisy_add",
                 "h.clean/rest", "walkaudit.mul.0/sigma_add"]


def hostile() -> onnx.ModelProto:
    """x [N, 4] (and a second input named walkaudit.sigma_mul) -> MatMul -> h -> a chain of Adds, Muls and Tanhs
    through values named like walkaudit's internals, with initializers and nodes named so too -> logits [N, 3].

    The initializers hold values other than the ones walkaudit would give its own (1, 0, -1, ...), so a pass that
    read the model's value instead of its own would change the output."""
    rng = np.random.default_rng(7)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (4, 4)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(0, 0.5, (4, 3)).astype(np.float32), "w_out")]
    inits += [numpy_helper.from_array(rng.uniform(0.5, 1.5, 4).astype(np.float32), n) for n in HOSTILE_INITS]
    node_names = iter(HOSTILE_NODES + [f"n{k}" for k in range(100)])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name=next(node_names))]
    cur = "h"
    for k, value in enumerate(HOSTILE_VALUES):
        if k % 3 == 0:
            node = helper.make_node("Add", [cur, HOSTILE_INITS[k % len(HOSTILE_INITS)]], [value])
        elif k % 3 == 1:
            node = helper.make_node("Mul", [cur, "walkaudit.sigma_mul" if k == 4 else "h"], [value])
        else:
            node = helper.make_node("Tanh", [cur], [value])
        node.name = next(node_names)
        nodes.append(node)
        cur = value
    nodes.append(helper.make_node("MatMul", [cur, "w_out"], ["logits"], name=next(node_names)))
    graph = helper.make_graph(
        nodes, "hostile", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
                           helper.make_tensor_value_info("walkaudit.sigma_mul", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture(scope="module")
def hostile_case():
    model = hostile()
    types = value_types(model)
    rng = np.random.default_rng(3)
    feeds = {n: rng.normal(size=(5, 4)).astype(np.float32) for n in ("x", "walkaudit.sigma_mul")}
    sites = [s.name for s in candidates(model, types, (ALL,))]
    assert {"h", "h.clean", "walkaudit.sigma_add", "walkaudit/noisy_add"} <= set(sites)
    want = outputs_of(model, feeds)["logits"]
    return model, types, feeds, sites, want


def loads(model: onnx.ModelProto, checker: bool = True) -> None:
    """The onnx checker (single static assignment) and onnxruntime accept the model. (`graph_noise` gives its σ
    inputs no shape, which onnxruntime accepts and the checker does not: `checker=False`.)"""
    if checker:
        onnx.checker.check_model(model, full_check=True)
    session(model)


def test_expose_suffix_and_prefix_of_a_hostile_model_reproduce_it(hostile_case):
    model, types, feeds, sites, want = hostile_case
    index = GraphIndex(model.graph)
    plans = index.suffix_plans(sites, "logits")
    clean = clean_values(model, types, [*sites, *(f for _, fr in plans.values() for f in fr)], feeds)
    exposed = rewrite.expose(model, sites, types)
    loads(exposed)
    assert bits_equal(outputs_of(exposed, feeds)["logits"], want)
    for site in sites:
        part = rewrite.suffix(model, site, "logits", types, plans[site], index=index)
        loads(part.model)
        assert bits_equal(outputs_of(part.model, {n: clean[n] for n in (site, *part.frontier)})["logits"], want)
        needed = [site, *part.frontier]
        before = rewrite.prefix(model, needed, types, index=index)
        loads(before)
        got = outputs_of(before, {i.name: feeds[i.name] for i in before.graph.input})
        assert all(bits_equal(got[n], clean[n]) for n in needed if n not in feeds)


@pytest.mark.parametrize("fed", [True, False], ids=["fed", "in-graph"])
def test_graph_noise_on_a_hostile_model_is_exact_at_sigma_zero(hostile_case, fed):
    model, types, feeds, sites, want = hostile_case
    index = GraphIndex(model.graph)
    levels = 3
    for site in sites:
        sfx = rewrite.suffix(model, site, "logits", types, index=index)
        program = rewrite.graph_noise(sfx, types, True, True, seeds=(11, 12), fed=fed)
        loads(program.model, checker=False)
        clean = clean_values(model, types, [site, *sfx.frontier], feeds)
        run = {program.site: clean[site], **{p: clean[f] for p, f in zip(program.frontier, sfx.frontier)}}
        rank = clean[site].ndim
        for sigma in (program.sigma_mul, program.sigma_add):
            run[sigma] = np.zeros((levels, *[1] * (rank + 1)), np.float32)
        rng = np.random.default_rng(0)
        for eps in (program.eps_mul, program.eps_add):
            if eps:
                run[eps] = rng.normal(size=(1, *clean[site].shape)).astype(np.float32)
        assert bits_equal(outputs_of(program.model, run)["logits"], np.concatenate([want] * levels)), site


def test_inject_fed_on_a_hostile_model_is_exact_at_sigma_zero(hostile_case):
    model, types, feeds, sites, want = hostile_case
    levels = 2
    program = rewrite.inject_fed(model, sites, types, True, True)
    loads(program.model)
    clean = clean_values(model, types, sites, feeds)
    run = {n: np.concatenate([v] * levels) for n, v in feeds.items()}
    run[program.sigma_mul] = run[program.sigma_add] = np.zeros(levels, np.float32)
    rng = np.random.default_rng(1)
    for site, eps_mul, eps_add in program.eps:
        for eps in (eps_mul, eps_add):
            run[eps] = rng.normal(size=(1, *clean[site].shape)).astype(np.float32)
    assert bits_equal(outputs_of(program.model, run)["logits"], np.concatenate([want] * levels))


def test_inject_on_a_hostile_model_is_exact_at_sigma_zero(hostile_case):
    model, types, feeds, sites, want = hostile_case
    injected, injections = rewrite.inject(model, sites, types, has_mul=True, has_add=True)
    loads(injected)
    clean = clean_values(model, types, sites, feeds)
    run = dict(feeds)
    for inj in injections:
        run[inj.mul] = np.ones_like(clean[inj.site])
        run[inj.add] = np.zeros_like(clean[inj.site])
    assert len(set(run)) == len(feeds) + 2 * len(sites)  # every term has its own input
    assert bits_equal(outputs_of(injected, run)["logits"], want)
