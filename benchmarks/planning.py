"""Suffix planning for every site of a model: the old per-site graph walks against one GraphIndex.

Builds a synthetic model with onnx.helper (no torch): 1,000 residual blocks of 10 nodes (MatMul, bias Add, Relu, a
skip Add from the block before, a Constant-fed Reshape, ...) and a final MatMul: 10,001 nodes and 1,001 MatMul sites
(each folded with its bias Add, as `--ops MatMul` selects them). Then it times

- the old way: `suffix_plan` as it was before the index, one breadth-first walk of the graph per site, stopped after
  60 s (and the total extrapolated from the sites done);
- the index: `GraphIndex(graph)` built once, then `GraphIndex.suffix_plans` for every site;

and checks that both give the same plans for the sites the old way reached. With onnx's bundled light_densenet121
(121 Conv sites) it does the same on a real model.

    python benchmarks/planning.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from walkaudit._graph.index import GraphIndex
from walkaudit._graph.sites import Selection, select
from walkaudit._loading.model import prepare_for_runtime, read_model, value_types

OLD_BUDGET_S = 60.0


def synthetic(blocks: int = 1000, width: int = 8) -> onnx.ModelProto:
    """x [N, width] -> `blocks` residual blocks of 10 nodes -> MatMul -> logits [N, 4]."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []

    def init(name: str, shape) -> str:
        inits.append(numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32), name))
        return name

    cur, skip = "x", "x"
    for k in range(blocks):
        shape = helper.make_tensor(f"shape{k}", TensorProto.INT64, [2], [-1, width])
        nodes += [
            helper.make_node("MatMul", [cur, init(f"w{k}", (width, width))], [f"mm{k}"]),
            helper.make_node("Add", [f"mm{k}", init(f"b{k}", (width,))], [f"lin{k}"]),
            helper.make_node("Relu", [f"lin{k}"], [f"relu{k}"]),
            helper.make_node("Add", [f"relu{k}", skip], [f"res{k}"]),
            helper.make_node("Constant", [], [f"shape{k}"], value=shape),
            helper.make_node("Reshape", [f"res{k}", f"shape{k}"], [f"flat{k}"]),
            helper.make_node("Mul", [f"flat{k}", init(f"s{k}", (width,))], [f"scaled{k}"]),
            helper.make_node("Tanh", [f"scaled{k}"], [f"tanh{k}"]),
            helper.make_node("Sigmoid", [f"tanh{k}"], [f"gate{k}"]),
            helper.make_node("Mul", [f"gate{k}", f"res{k}"], [f"out{k}"]),
        ]
        skip, cur = cur, f"out{k}"
    nodes.append(helper.make_node("MatMul", [cur, init("w_out", (width, 4))], ["logits"]))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


# -- the old way: suffix_plan before GraphIndex, re-deriving every lookup per site: the reference the tests keep --
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.test_graph_index import ref_suffix_plan  # noqa: E402  (the one copy of the old code)


def old_suffix_plan(model, site, output):
    return ref_suffix_plan(model.graph, site, output)


# -- the measurement ------------------------------------------------------------------------------------------------
def compare(label: str, model: onnx.ModelProto, ops: tuple[str, ...]) -> None:
    out = model.graph.output[0].name
    sites = [s.name for s in select(model, value_types(model), Selection(ops=ops), out)]
    print(f"{label}: {len(model.graph.node)} nodes, {len(sites)} sites")

    start = time.perf_counter()
    index = GraphIndex(model.graph)
    built = time.perf_counter() - start
    plans = index.suffix_plans(sites, out)
    new = time.perf_counter() - start
    print(f"  index: {new:.3f} s for all sites ({built:.3f} s building the index)")

    start, old = time.perf_counter(), {}
    for site in sites:
        if time.perf_counter() - start > OLD_BUDGET_S:
            break
        old[site] = old_suffix_plan(model, site, out)
    spent = time.perf_counter() - start
    if len(old) == len(sites):
        print(f"  old per-site walks: {spent:.2f} s for all sites ({spent / new:.0f}x the index)")
    else:
        estimate = spent / len(old) * len(sites)
        print(f"  old per-site walks: stopped after {spent:.0f} s with {len(old)} of {len(sites)} sites; "
              f"all sites: ~{estimate:.0f} s extrapolated (~{estimate / new:.0f}x the index)")
    assert all(plans[s] == plan for s, plan in old.items()), "the index plans differently from the old walks"
    print(f"  same plans for the {len(old)} sites compared")


def main() -> None:
    compare("synthetic chain", synthetic(), ("MatMul",))
    densenet = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / "light_densenet121.onnx"
    if densenet.exists():
        model, _, _ = read_model(densenet)
        prepare_for_runtime(model)
        compare("light_densenet121", model, ("Conv",))


if __name__ == "__main__":
    main()
