"""Small, named read-only queries over an ONNX main graph (pure: protos in, names out)."""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Iterable

import onnx


def subgraph_captures(node: onnx.NodeProto) -> set[str]:
    """Outer-scope names that the subgraphs of `node` (If, Loop, Scan) read implicitly."""
    captured: set[str] = set()
    for attr in node.attribute:
        graphs = ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else []) + list(attr.graphs)
        for g in graphs:
            defined = {i.name for i in g.input} | {i.name for i in g.initializer}
            for sub in g.node:
                defined.update(sub.output)
            for sub in g.node:
                captured.update(n for n in node_inputs(sub) if n and n not in defined)
    return captured


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """Every value a node reads: its inputs plus what its subgraphs capture."""
    names = [n for n in node.input if n]
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
        names += sorted(subgraph_captures(node) - set(names))
    return names


def producers(graph: onnx.GraphProto) -> dict[str, int]:
    """Tensor name -> index of the node that produces it."""
    return {out: i for i, node in enumerate(graph.node) for out in node.output if out}


def consumers(graph: onnx.GraphProto) -> dict[str, list[int]]:
    """Tensor name -> indices of the nodes that read it (subgraph captures included)."""
    table: dict[str, list[int]] = defaultdict(list)
    for i, node in enumerate(graph.node):
        for name in node_inputs(node):
            table[name].append(i)
    return table


def static_values(graph: onnx.GraphProto) -> set[str]:
    """Values that do not depend on any graph input: initializers and what is computed only from them."""
    inputs = {i.name for i in graph.input} - {i.name for i in graph.initializer}
    static = {i.name for i in graph.initializer}
    for node in graph.node:
        reads = node_inputs(node)
        if not any(n in inputs or n not in static for n in reads) and node.op_type not in _RANDOM_OPS:
            static.update(o for o in node.output if o)
    return static


_RANDOM_OPS = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}


def descendants(graph: onnx.GraphProto, start: str) -> set[int]:
    """Indices of the nodes that depend on value `start`, directly or through other nodes."""
    table = consumers(graph)
    seen: set[int] = set()
    queue = deque(table.get(start, []))
    while queue:
        i = queue.popleft()
        if i in seen:
            continue
        seen.add(i)
        for out in graph.node[i].output:
            queue.extend(table.get(out, []))
    return seen


def ancestors(graph: onnx.GraphProto, targets: Iterable[str]) -> set[int]:
    """Indices of the nodes needed to compute `targets`."""
    made_by = producers(graph)
    seen: set[int] = set()
    queue = deque(made_by[t] for t in targets if t in made_by)
    while queue:
        i = queue.popleft()
        if i in seen:
            continue
        seen.add(i)
        queue.extend(made_by[n] for n in node_inputs(graph.node[i]) if n in made_by)
    return seen


def node_label(node: onnx.NodeProto, index: int) -> str:
    """The node's name, or a stable made-up one for unnamed nodes."""
    return node.name or f"{node.op_type}_{index}"
