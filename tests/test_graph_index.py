"""GraphIndex (walkaudit/_graph/index.py) gives exactly what the per-call graph walks gave.

The reference functions below are the queries and plans as they were before the index (breadth-first walks over the
graph on every call), kept verbatim: the index's answers must be identical on every `--ops all` site of onnx's
bundled backend models (the ones tests/test_backend_models.py checks), on samples/*.onnx, and on random graphs.
"""

from __future__ import annotations

import random
from collections import defaultdict, deque
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from walkaudit._graph import passes as rewrite
from walkaudit._graph import queries as g
from walkaudit._graph.index import GraphIndex, members, node_inputs
from walkaudit._graph.sites import ALL, candidates
from walkaudit._loading.model import prepare_for_runtime, read_model, value_types

from .models import IR, mlp, resnet_block
from .test_backend_models import CASES

#: the float samples: a quantized model's prefix also computes its re-quantised sites' float values
#: (`_graph.quantized.pre_activation`), which the reference planner does not know (tests/test_quantized.py checks it)
SAMPLES = sorted(p for p in (Path(__file__).resolve().parents[1] / "samples").glob("*.onnx") if ".qdq." not in p.name)
RANDOM = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}


# -- the reference: the per-call walks as they were ------------------------------------------------------------------
def ref_producers(graph):
    return {out: i for i, node in enumerate(graph.node) for out in node.output if out}


def ref_consumers(graph):
    table = defaultdict(list)
    for i, node in enumerate(graph.node):
        for name in node_inputs(node):
            table[name].append(i)
    return table


def ref_static_values(graph):
    inputs = {i.name for i in graph.input} - {i.name for i in graph.initializer}
    static = {i.name for i in graph.initializer}
    for node in graph.node:
        reads = node_inputs(node)
        if not any(n in inputs or n not in static for n in reads) and node.op_type not in RANDOM:
            static.update(o for o in node.output if o)
    return static


def ref_descendants(graph, start, table=None):
    table = ref_consumers(graph) if table is None else table
    seen = set()
    queue = deque(table.get(start, []))
    while queue:
        i = queue.popleft()
        if i in seen:
            continue
        seen.add(i)
        for out in graph.node[i].output:
            queue.extend(table.get(out, []))
    return seen


def ref_ancestors(graph, targets, made_by=None):
    made_by = ref_producers(graph) if made_by is None else made_by
    seen = set()
    queue = deque(made_by[t] for t in targets if t in made_by)
    while queue:
        i = queue.popleft()
        if i in seen:
            continue
        seen.add(i)
        queue.extend(made_by[n] for n in node_inputs(graph.node[i]) if n in made_by)
    return seen


def ref_suffix_plan(graph, site, output, tables=None):
    """The old suffix_plan; `tables` (`ref_tables`) only saves rebuilding the same lookups on every call."""
    static, table, made_by = tables or ref_tables(graph)
    inits = {i.name for i in graph.initializer}
    keep = ref_descendants(graph, site, table) & ref_ancestors(graph, [output], made_by)
    made = {o for i in keep for o in graph.node[i].output}
    reads = {n for i in keep for n in node_inputs(graph.node[i])}
    keep |= ref_ancestors(graph, [n for n in reads - made if n in static and n not in inits], made_by)
    made = {o for i in keep for o in graph.node[i].output}
    reads = {n for i in keep for n in node_inputs(graph.node[i])}
    return sorted(keep), tuple(sorted(reads - made - inits - {site}))


def ref_tables(graph):
    """(static values, consumers, producers): what the old functions derived anew on every call."""
    return ref_static_values(graph), ref_consumers(graph), ref_producers(graph)


def ref_prefix_nodes(graph, outputs, made_by=None):
    return sorted(ref_ancestors(graph, outputs, made_by))


# -- the models -----------------------------------------------------------------------------------------------------
def backend_models():
    """(id, model) of every backend case with a model file, prepared as tests/test_backend_models.py does."""
    for case in CASES:
        if case.path.suffix == ".onnx":
            yield case.id, case.path


def load(path: Path) -> onnx.ModelProto:
    proto, _, _ = read_model(path)
    prepare_for_runtime(proto)
    return proto


def tensor_outputs(graph):
    return [o.name for o in graph.output if o.type.WhichOneof("value") == "tensor_type"]


def check_against_reference(model: onnx.ModelProto) -> None:
    """For every --ops all site and every tensor output: same plan with and without the index (old and new), same
    prefix nodes for the site and its frontier, and the same plans from `suffix_plans`."""
    graph = model.graph
    index = GraphIndex(graph)
    tables = ref_tables(graph)
    assert index.static == tables[0]
    sites = [s.name for s in candidates(model, value_types(model), (ALL,), index)]
    for out in tensor_outputs(graph):
        plans = index.suffix_plans(sites, out)
        assert list(plans) == sites
        for site in sites:
            want = ref_suffix_plan(graph, site, out, tables)
            assert plans[site] == want, (site, out)
            assert rewrite.suffix_plan(model, site, out, index=index) == want
            needed = [site, *want[1]]
            prefix = rewrite.prefix(model, needed, {}, index=index)
            assert [n.SerializeToString() for n in prefix.graph.node] == [
                graph.node[i].SerializeToString() for i in ref_prefix_nodes(graph, needed, tables[2])]


BACKEND = list(backend_models())


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for _, p in BACKEND], ids=[i for i, _ in BACKEND])
def test_index_plans_like_the_reference_on_backend_models(path):
    check_against_reference(load(path))


@pytest.mark.parametrize("path", SAMPLES, ids=[p.name for p in SAMPLES])
def test_index_plans_like_the_reference_on_samples(path):
    model = load(path)
    check_against_reference(model)
    # the samples are small: plan every site to every value too, not only to the outputs
    index = GraphIndex(model.graph)
    tables = ref_tables(model.graph)
    sites = [s.name for s in candidates(model, value_types(model), (ALL,), index)]
    for site in sites[:: max(1, len(sites) // 6)]:
        for out in sites:
            assert index.suffix_plan(site, out) == ref_suffix_plan(model.graph, site, out, tables)


def test_suffix_plan_without_an_index_matches_too():
    for model in (mlp(), resnet_block()):
        for site in [s.name for s in candidates(model, value_types(model), (ALL,))]:
            assert rewrite.suffix_plan(model, site, "logits") == ref_suffix_plan(model.graph, site, "logits")


# -- random graphs: structure only (ops, not numbers) ---------------------------------------------------------------
@st.composite
def structures(draw):
    """A random DAG of made-up nodes over graph inputs, initializers and earlier values: constant-only nodes, random
    ops, nodes reading a value twice, unused outputs, an If whose branch captures outer values, and sometimes the
    node list shuffled (the index sorts topologically; the reference does not care about order)."""
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    inputs = [f"x{k}" for k in range(draw(st.integers(1, 3)))]
    inits = [f"w{k}" for k in range(draw(st.integers(0, 4)))]
    values = inputs + inits
    nodes = []
    for k in range(draw(st.integers(1, 25))):
        kind = rng.choice(["op", "op", "op", "constant", "random", "twice", "if"])
        outs = [f"v{k}"] + ([f"v{k}b"] if rng.random() < 0.2 else [])
        if kind == "constant":
            reads = rng.sample(inits, min(len(inits), rng.randint(0, 2)))
        elif kind == "random":
            reads = [rng.choice(values)] if rng.random() < 0.5 else []
        else:
            reads = rng.sample(values, min(len(values), rng.randint(1, 3)))
        if kind == "twice":
            reads = reads + reads[:1]
        op = {"random": "RandomNormalLike", "constant": "Konst"}.get(kind, "Op")
        if kind == "if":
            captured = rng.choice(values)
            branch = helper.make_graph([helper.make_node("Op", [captured], ["inner"])], f"b{k}", [],
                                       [helper.make_tensor_value_info("inner", TensorProto.FLOAT, None)])
            nodes.append(helper.make_node("If", reads[:1], outs[:1], then_branch=branch, else_branch=branch))
            outs = outs[:1]
        else:
            nodes.append(helper.make_node(op, reads, outs))
        values += outs
    if draw(st.booleans()):
        rng.shuffle(nodes)
    graph = helper.make_graph(
        nodes, "structure", [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in rng.sample(values, min(3, len(values)))],
        [numpy_helper.from_array(np.zeros(1, np.float32), n) for n in inits])
    return helper.make_model(graph, ir_version=IR), values


@settings(max_examples=120, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(structures())
def test_index_answers_like_the_reference_on_random_structures(case):
    model, values = case
    graph = model.graph
    index = GraphIndex(graph)
    assert g.producers(graph, index) == ref_producers(graph)
    assert g.consumers(graph, index) == ref_consumers(graph)
    assert g.static_values(graph, index) == ref_static_values(graph)
    position = index.position
    for i, node in enumerate(graph.node):  # the order is topological
        assert all(position[index.producers[n]] < position[i] for n in node_inputs(node) if n in index.producers)
    tables = ref_tables(graph)
    for value in values:
        assert g.descendants(graph, value, index) == ref_descendants(graph, value)
        assert g.ancestors(graph, [value], index) == ref_ancestors(graph, [value])
        for out in values:
            assert index.suffix_plan(value, out) == ref_suffix_plan(graph, value, out, tables), (value, out)


# -- the index itself -----------------------------------------------------------------------------------------------
def test_index_tables_of_a_residual_block():
    model = resnet_block()
    index = GraphIndex(model.graph)
    names = [n.name for n in model.graph.node]
    assert index.producers["b"] == names.index("conv1")
    assert index.consumers["a"] == (names.index("relu0"), names.index("residual"))
    assert index.initializers == {"k0", "c0", "k1", "c1", "w", "bias"}
    assert index.inputs == ("x",) and index.outputs == ("logits",)
    assert index.static == index.initializers
    assert index.order == tuple(range(len(names)))
    assert sorted(index.descendants("a")) == list(range(1, len(names)))
    assert sorted(index.ancestors(["res"])) == [0, 1, 2, 3]


def test_suffix_plans_plans_every_site_at_once():
    model = resnet_block()
    index = GraphIndex(model.graph)
    sites = ["a", "a_relu", "b", "res", "logits"]
    assert index.suffix_plans(sites, "logits") == {s: rewrite.suffix_plan(model, s, "logits") for s in sites}


def test_an_index_of_another_graph_is_refused():
    with pytest.raises(ValueError, match="another graph"):
        rewrite.suffix_plan(mlp(), "h", "logits", index=GraphIndex(resnet_block().graph))


def test_members_lists_set_bits_in_order():
    assert members(0) == []
    assert members(0b1011) == [0, 1, 3]
    assert members(1 << 10_000 | 1 << 7) == [7, 10_000]
