"""One read-only index of an ONNX main graph, built once per model and shared by every query and pass.

Producers, consumers (subgraph captures included), static values, initializers, graph inputs and outputs and a
topological order are derived once, in time linear in the graph. Descendant and ancestor sets are kept as Python
ints used as bitsets (bit i: node i), computed once in topological order; a site's suffix plan is then a few bitwise
operations on per-output tables instead of a walk over the graph, so planning every site of a model costs about as
much as planning one (`GraphIndex.suffix_plans`).

The index holds the graph it was built from and must not outlive changes to it: passes build new models and never
modify the one indexed.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import onnx

#: Ops whose outputs differ between runs: never static, whatever they read.
RANDOM_OPS = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
                        "Bernoulli"})


def subgraph_captures(node: onnx.NodeProto) -> set[str]:
    """Outer-scope names that the subgraphs of `node` (If, Loop, Scan) read implicitly."""
    captured: set[str] = set()
    for g in _subgraphs(node):
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


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs held by the node's attributes (the branches of If, the bodies of Loop and Scan)."""
    graphs: list[onnx.GraphProto] = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            graphs.append(attr.g)
        graphs.extend(attr.graphs)
    return graphs


def names_in_use(graph: onnx.GraphProto) -> set[str]:
    """Every name the graph uses: values, nodes, initializers, inputs, outputs, value infos, and the same in every
    subgraph (with the subgraphs' own names). A pass that adds anything takes its names outside this set."""
    names = {graph.name}
    names.update(v.name for v in (*graph.input, *graph.output, *graph.value_info, *graph.initializer))
    names.update(s.values.name for s in graph.sparse_initializer)
    for node in graph.node:
        names.add(node.name)
        names.update(node.input)
        names.update(node.output)
        for sub in _subgraphs(node):
            names |= names_in_use(sub)
    names.discard("")
    return names


def members(bits: int) -> list[int]:
    """The indices of the set bits of `bits`, ascending: a node or value set stored as a Python int, as a list.

    Goes through numpy's unpackbits so that a set of thousands of members costs one C loop, not a Python one."""
    if not bits:
        return []
    raw = np.frombuffer(bits.to_bytes((bits.bit_length() + 7) // 8, "little"), np.uint8)
    return np.flatnonzero(np.unpackbits(raw, bitorder="little")).tolist()


@dataclass(frozen=True)
class _Cone:
    """For one graph output, per node i: what the nodes that depend on i (i included) and that the output needs
    read, make and need of constant-only nodes. Zero for nodes the output does not need."""

    nodes: list[int]  # node bits: D(i) ∩ A(output)
    reads: list[int]  # value bits: every value those nodes read
    made: list[int]  # value bits: every value those nodes write
    support: list[int]  # node bits: the constant-only nodes (and their ancestors) that feed those nodes


Plan = tuple[list[int], tuple[str, ...]]


class GraphIndex:
    """Read-only facts about one main graph, derived once (see the module docstring).

    Attributes are shared, not copied: treat them as read-only. `queries` returns copies for callers that want to
    own the result.
    """

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.node_count = len(graph.node)
        self.reads: tuple[tuple[str, ...], ...] = tuple(tuple(node_inputs(n)) for n in graph.node)
        self.writes: tuple[tuple[str, ...], ...] = tuple(tuple(o for o in n.output if o) for n in graph.node)
        self.producers: dict[str, int] = {out: i for i, outs in enumerate(self.writes) for out in outs}
        self.consumers: dict[str, tuple[int, ...]] = _consumers(self.reads)
        self.initializer_positions: dict[str, int] = {t.name: k for k, t in enumerate(graph.initializer)}
        self.initializers: frozenset[str] = frozenset(self.initializer_positions)
        self.inputs: tuple[str, ...] = tuple(i.name for i in graph.input)
        self.outputs: tuple[str, ...] = tuple(o.name for o in graph.output)
        self.static: frozenset[str] = frozenset(self._static())
        self.order: tuple[int, ...] = self._topological_order()
        self.position: dict[int, int] = {node: k for k, node in enumerate(self.order)}
        self._cones: dict[str, _Cone] = {}

    def check(self, graph: onnx.GraphProto) -> None:
        """Raise ValueError when this index was visibly built from another graph than `graph`."""
        if len(graph.node) != self.node_count or len(graph.initializer) != len(self.initializer_positions):
            raise ValueError(f"the graph index was built for another graph ({self.node_count} nodes, "
                             f"not {len(graph.node)})")

    # -- derived once, at construction ---------------------------------------------------------------------------
    def _static(self) -> set[str]:
        """Values that do not depend on any graph input: initializers and what is computed only from them (in node
        order, as ONNX lists nodes topologically); random ops are never static."""
        inputs = set(self.inputs) - self.initializers
        static = set(self.initializers)
        for node, reads, writes in zip(self.graph.node, self.reads, self.writes):
            if node.op_type not in RANDOM_OPS and not any(n in inputs or n not in static for n in reads):
                static.update(writes)
        return static

    def _topological_order(self) -> tuple[int, ...]:
        """Node indices, every producer before its readers (Kahn's algorithm, ties in graph order). ONNX graphs are
        acyclic; nodes on a cycle, if any, come last in graph order."""
        successors = self._successors
        waiting = [0] * self.node_count
        for nexts in successors:
            for c in nexts:
                waiting[c] += 1
        ready = deque(i for i in range(self.node_count) if not waiting[i])
        order: list[int] = []
        while ready:
            i = ready.popleft()
            order.append(i)
            for c in successors[i]:
                waiting[c] -= 1
                if not waiting[c]:
                    ready.append(c)
        placed = set(order)
        return tuple(order + [i for i in range(self.node_count) if i not in placed])

    @cached_property
    def _successors(self) -> list[tuple[int, ...]]:
        """Per node, the nodes that read one of its outputs (each once)."""
        return [tuple(dict.fromkeys(c for out in outs for c in self.consumers.get(out, ()))) for outs in self.writes]

    @cached_property
    def _predecessors(self) -> list[tuple[int, ...]]:
        """Per node, the nodes that produce what it reads (each once)."""
        return [tuple(dict.fromkeys(self.producers[n] for n in reads if n in self.producers)) for reads in self.reads]

    # -- descendant and ancestor sets, as bitsets computed once -----------------------------------------------------
    @cached_property
    def _descendant_bits(self) -> list[int]:
        """Per node i: the bitset of i and every node that depends on it."""
        bits = [0] * self.node_count
        for i in reversed(self.order):
            acc = 1 << i
            for c in self._successors[i]:
                acc |= bits[c]
            bits[i] = acc
        return bits

    @cached_property
    def _ancestor_bits(self) -> list[int]:
        """Per node i: the bitset of i and every node it needs."""
        bits = [0] * self.node_count
        for i in self.order:
            acc = 1 << i
            for p in self._predecessors[i]:
                acc |= bits[p]
            bits[i] = acc
        return bits

    def descendant_bits(self, value: str) -> int:
        """The nodes that depend on `value`, directly or through other nodes, as a bitset."""
        bits = 0
        for c in self.consumers.get(value, ()):
            bits |= self._descendant_bits[c]
        return bits

    def ancestor_bits(self, targets: Iterable[str]) -> int:
        """The nodes needed to compute `targets`, as a bitset."""
        bits = 0
        for t in targets:
            if t in self.producers:
                bits |= self._ancestor_bits[self.producers[t]]
        return bits

    def descendants(self, value: str) -> set[int]:
        """Indices of the nodes that depend on `value`."""
        return set(members(self.descendant_bits(value)))

    def ancestors(self, targets: Iterable[str]) -> set[int]:
        """Indices of the nodes needed to compute `targets`."""
        return set(members(self.ancestor_bits(targets)))

    # -- values as bits --------------------------------------------------------------------------------------------
    @cached_property
    def _value_names(self) -> list[str]:
        """Every value name the nodes read or write, graph inputs, outputs and initializers; its position is its bit."""
        names = dict.fromkeys(self.inputs)
        names.update(dict.fromkeys(self.initializer_positions))
        for reads, writes in zip(self.reads, self.writes):
            names.update(dict.fromkeys(reads))
            names.update(dict.fromkeys(writes))
        names.update(dict.fromkeys(self.outputs))
        return list(names)

    @cached_property
    def _value_ids(self) -> dict[str, int]:
        return {name: k for k, name in enumerate(self._value_names)}

    def _value_bits(self, names: Iterable[str]) -> int:
        bits = 0
        for n in names:
            bits |= 1 << self._value_ids[n]
        return bits

    @cached_property
    def _static_value_bits(self) -> int:
        return self._value_bits(n for n in self.static if n in self._value_ids)

    # -- suffix plans -----------------------------------------------------------------------------------------------
    def suffix_plan(self, site: str, output: str) -> Plan:
        """Which nodes the noise at `site` reaches on its way to `output`, and which clean values they also read.

        Nodes: every node that depends on the site and that the output needs, plus the constant-only nodes that
        feed them. Frontier: values the suffix reads that the site does not reach (skip connections from before the
        site, shape tensors, other branches, graph inputs), sorted by name.

        Where the site is not itself static, the nodes it reaches are not static either, so the frontier is what
        they read, less what they make, less every static value (an initializer, or made by the constant-only nodes
        that join the suffix): bitwise operations on the output's tables (`_cone`). A static site is planned node
        by node (`_plan_by_nodes`), with the same result.
        """
        if site in self.static:
            return self._plan_by_nodes(site, output)
        cone = self._cone(output)
        nodes = reads = made = support = 0
        for c in self.consumers.get(site, ()):
            nodes |= cone.nodes[c]
            reads |= cone.reads[c]
            made |= cone.made[c]
            support |= cone.support[c]
        site_bit = self._value_bits([site]) if site in self._value_ids else 0
        frontier = reads & ~made & ~self._static_value_bits & ~site_bit
        return members(nodes | support), tuple(sorted(self._value_names[k] for k in members(frontier)))

    def suffix_plans(self, sites: Iterable[str], output: str) -> dict[str, Plan]:
        """`suffix_plan` of every site (tensor names) to `output`, sharing the output's tables."""
        return {site: self.suffix_plan(site, output) for site in sites}

    def _plan_by_nodes(self, site: str, output: str) -> Plan:
        """`suffix_plan` by walking the suffix's nodes: the descendants of the site that the output needs, then the
        constant-only nodes feeding them (ancestors of the static values they read but do not make)."""
        keep = set(members(self.descendant_bits(site) & self.ancestor_bits([output])))
        made = {o for i in keep for o in self.writes[i]}
        reads = {n for i in keep for n in self.reads[i]}
        keep |= self.ancestors(n for n in reads - made if n in self.static and n not in self.initializers)
        made = {o for i in keep for o in self.writes[i]}
        reads = {n for i in keep for n in self.reads[i]}
        return sorted(keep), tuple(sorted(reads - made - self.initializers - {site}))

    def _cone(self, output: str) -> _Cone:
        """The per-node tables of `output`, computed once in reverse topological order: a node's entry is its own
        facts joined with its successors' entries (the nodes depending on it are itself and theirs)."""
        if output not in self._cones:
            self._cones[output] = self._build_cone(output)
        return self._cones[output]

    def _build_cone(self, output: str) -> _Cone:
        needed = self.ancestor_bits([output])
        n = self.node_count
        nodes, reads, made, support = [0] * n, [0] * n, [0] * n, [0] * n
        for i in reversed(self.order):
            if not (needed >> i) & 1:
                continue  # nothing that depends on i is needed either
            nodes[i] = 1 << i
            reads[i] = self._value_bits(self.reads[i])
            made[i] = self._value_bits(self.writes[i])
            support[i] = self._static_feed(i)
            for c in self._successors[i]:
                nodes[i] |= nodes[c]
                reads[i] |= reads[c]
                made[i] |= made[c]
                support[i] |= support[c]
        return _Cone(nodes, reads, made, support)

    def _static_feed(self, i: int) -> int:
        """The constant-only nodes that node i needs: ancestors of the static values it reads, initializers aside."""
        bits = 0
        for name in self.reads[i]:
            if name in self.static and name not in self.initializers and name in self.producers:
                bits |= self._ancestor_bits[self.producers[name]]
        return bits


def _consumers(reads: tuple[tuple[str, ...], ...]) -> dict[str, tuple[int, ...]]:
    """Value name -> the nodes reading it, in graph order, once per read (a node reading x twice is listed twice)."""
    table: dict[str, list[int]] = defaultdict(list)
    for i, names in enumerate(reads):
        for name in names:
            table[name].append(i)
    return {name: tuple(nodes) for name, nodes in table.items()}


def index_for(graph: onnx.GraphProto, index: GraphIndex | None) -> GraphIndex:
    """`index` when given (checked to match `graph`), else a new index of `graph`."""
    if index is None:
        return GraphIndex(graph)
    index.check(graph)
    return index
