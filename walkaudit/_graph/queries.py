"""Small, named read-only queries over an ONNX main graph (pure: protos in, names out).

Each query takes an optional `index` (`GraphIndex` of the same graph): callers asking many questions of one model
build it once and pass it, instead of every query deriving producers, consumers and static values anew. Without
one, the query builds its own. The results are new objects the caller owns.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import onnx

from walkaudit._graph.index import GraphIndex, index_for, node_inputs, subgraph_captures

__all__ = ["GraphIndex", "ancestors", "consumers", "descendants", "node_inputs", "node_label", "producers",
           "static_values", "subgraph_captures"]

def producers(graph: onnx.GraphProto, index: GraphIndex | None = None) -> dict[str, int]:
    """Tensor name -> index of the node that produces it."""
    return dict(index_for(graph, index).producers)


def consumers(graph: onnx.GraphProto, index: GraphIndex | None = None) -> dict[str, list[int]]:
    """Tensor name -> indices of the nodes that read it (subgraph captures included; a node reading a value twice is
    listed twice). A defaultdict: names nobody reads give []."""
    table: dict[str, list[int]] = defaultdict(list)
    table.update((name, list(nodes)) for name, nodes in index_for(graph, index).consumers.items())
    return table


def static_values(graph: onnx.GraphProto, index: GraphIndex | None = None) -> set[str]:
    """Values that do not depend on any graph input: initializers and what is computed only from them."""
    return set(index_for(graph, index).static)


def descendants(graph: onnx.GraphProto, start: str, index: GraphIndex | None = None) -> set[int]:
    """Indices of the nodes that depend on value `start`, directly or through other nodes."""
    return index_for(graph, index).descendants(start)


def ancestors(graph: onnx.GraphProto, targets: Iterable[str], index: GraphIndex | None = None) -> set[int]:
    """Indices of the nodes needed to compute `targets`."""
    return index_for(graph, index).ancestors(targets)


def node_label(node: onnx.NodeProto, index: int) -> str:
    """The node's name, or a stable made-up one for unnamed nodes."""
    return node.name or f"{node.op_type}_{index}"
