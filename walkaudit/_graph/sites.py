"""Enumerate and select the injection sites of a graph (pure: graph in, sites out).

A site is a floating-point tensor of the main graph after which noise is added. The default set is the paper's
"layer": the output of every Conv, ConvTranspose, Gemm and MatMul, bias included: where the layer's only consumer is
an Add of a constant (MatMul + Add from skl2onnx and the torch exporters), the site is the Add's output.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from walkaudit._graph import queries as g
from walkaudit._graph.index import GraphIndex, index_for, members
from walkaudit._loading import quantized
from walkaudit._loading.model import FLOAT_TYPES, TensorSpec
from walkaudit.errors import UsageError, option

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "LSTM", "GRU", "RNN")
#: ops that compute much of a model but are not default sites: `left_out` names them in a note
HEAVY_OPS = ("Einsum", "Attention", "MultiHeadAttention", "FusedMatMul", "FusedConv", "FusedGemm", "MatMulInteger",
             "ConvInteger", "QLinearConv", "QLinearMatMul", "Scan", "Loop")
ALL = "all"


@dataclass(frozen=True)
class Site:
    """One place to inject noise."""

    index: int
    name: str  # the tensor
    node: str  # the node producing it (the layer's node when a bias Add was folded in)
    op_type: str  # e.g. "Conv", "MatMul+Add"
    shape: tuple | None
    weight: str | None = None  # initializer holding the layer's weights, when there is one
    module: str | None = None  # the exporter's module path (torch dynamo: `layer3.1.conv2`), when the graph says

    @property
    def base_op(self) -> str:
        return self.op_type.split("+")[0]


@dataclass(frozen=True)
class Selection:
    """How the user narrows or widens the set of sites."""

    ops: tuple[str, ...] = LAYER_OPS
    include: str | None = None
    exclude: str | None = None
    names: tuple[str, ...] = ()  # explicit tensor names; overrides ops


def _bias_add(graph: onnx.GraphProto, out: str, readers: Mapping[str, Sequence[int]],
              static: AbstractSet[str]) -> onnx.NodeProto | None:
    """The Add that adds a constant bias to `out`, when it is `out`'s only reader."""
    users = readers.get(out, [])
    if len(users) != 1 or any(o.name == out for o in graph.output):
        return None
    node = graph.node[users[0]]
    if node.op_type != "Add" or len(node.input) != 2:
        return None
    other = node.input[1] if node.input[0] == out else node.input[0]
    return node if other in static else None


#: integer types a model stores quantized values in (`candidates(stored=True)`: bit flips in the stored type)
STORED_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}


def _weight_of(node: onnx.NodeProto, static: AbstractSet[str], inits: AbstractSet[str],
               dequantized: Mapping[str, str] | None = None) -> str | None:
    """The initializer holding a layer's weights: read directly, the int8 initializer that a DequantizeLinear turns
    into them (QDQ models; `dequantized`: DequantizeLinear output -> its initializer input), or the int8 weights of a
    QLinearConv, QLinearMatMul or QGemm (input 3)."""
    if node.op_type in ("Conv", "ConvTranspose", "Gemm"):
        cand = node.input[1:2]
    elif node.op_type == "MatMul":
        cand = [n for n in node.input if n in static]
    elif node.op_type in ("QLinearConv", "QLinearMatMul", "QGemm"):
        cand = node.input[3:4]
    else:
        return None
    dequantized = dequantized or {}
    return next((n for n in (dequantized.get(c, c) for c in cand) if n in inits), None)


def candidates(model: onnx.ModelProto, types: dict[str, TensorSpec], ops=LAYER_OPS,
               index: GraphIndex | None = None, stored: bool = False) -> list[Site]:
    """Every site of the requested op types (`("all",)`: every float node output), in graph order.

    `index`: the model's `GraphIndex`, when the caller has one (else one is built). `stored`: a site is the value as
    the model stores it: int8/uint8 outputs count too (QLinearConv), and a layer output that only a QuantizeLinear
    reads is replaced by the quantized value (QDQ models)."""
    graph = model.graph
    index = index_for(graph, index)
    readers, static, inits = index.consumers, index.static, index.initializers
    outputs = set(index.outputs)
    everything = ALL in ops
    kinds = FLOAT_TYPES | STORED_TYPES if stored else FLOAT_TYPES
    dequantized = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.output}
    sites: list[Site] = []
    seen: set[str] = set()
    layered = {} if everything else quantized_sites(model, ops)
    for i, node in enumerate(graph.node):
        if i in layered:
            name, op_type = layered[i], node.op_type
            quantized_value = _quantized(graph, name, readers, types) if stored else None
            if quantized_value is not None:  # stored: the int8 value the layer's site is re-quantised to
                name, op_type = quantized_value, f"{op_type}+QuantizeLinear"
            if name not in seen and name in types:
                seen.add(name)
                sites.append(Site(len(sites), name, g.node_label(node, i), op_type, types[name].shape,
                                  _weight_of(node, static, inits, dequantized if stored else None)))
            continue
        if not everything and node.op_type not in ops and _family(node.op_type) not in ops:
            continue  # MatMulIntegerToFloat counts as a MatMul: its result is float
        for out in node.output:
            spec = types.get(out)
            if not out or out in static or spec is None or spec.elem_type not in kinds:
                continue
            if out not in readers and out not in outputs:
                continue  # an unused optional output
            name, op_type = out, node.op_type
            if not everything:
                bias = _bias_add(graph, out, readers, static)
                if bias is not None and types.get(bias.output[0]) is not None:
                    name, op_type = bias.output[0], f"{node.op_type}+Add"
            if stored:
                quantized = _quantized(graph, name, readers, types)
                if quantized is not None:
                    name, op_type = quantized, f"{op_type}+QuantizeLinear"
            if name in seen:
                continue
            seen.add(name)
            shape = types[name].shape
            weight = _weight_of(node, static, inits, dequantized if stored else None)
            sites.append(Site(len(sites), name, g.node_label(node, i), op_type, shape, weight))
    return sites


def _quantized(graph: onnx.GraphProto, out: str, readers: Mapping[str, Sequence[int]],
               types: dict[str, TensorSpec]) -> str | None:
    """The int8/uint8 value a QuantizeLinear makes of `out`, when it is `out`'s only reader."""
    users = readers.get(out, [])
    if len(users) != 1 or graph.node[users[0]].op_type != "QuantizeLinear":
        return None
    q = graph.node[users[0]].output[0]
    spec = types.get(q)
    return q if spec is not None and spec.elem_type in STORED_TYPES else None


def _family(op: str) -> str:
    """The float layer an integer-only or dynamically quantized op computes (QLinearConv: Conv), else the op."""
    if op in quantized.INTEGER_LAYERS:
        return quantized.INTEGER_LAYERS[op][0]
    return quantized.DYNAMIC_LAYERS.get(op, quantized.FLOAT_RESULT_LAYERS.get(op, op))


def quantized_sites(model: onnx.ModelProto, ops=LAYER_OPS) -> dict[int, str]:
    """{layer node index: its site} for the quantized layers of the requested op types: a re-quantised layer's site
    (`quantized.sites`: the value the loader put between its integer output and its re-quantisation), a dynamically
    quantized layer's float value (after its Cast, scale Mul and bias Add). An integer-only op (QLinearConv,
    MatMulInteger, ...) counts as its float layer (Conv, MatMul, ...) or by its own name."""
    graph = model.graph
    wanted = lambda op: op in ops or _family(op) in ops  # noqa: E731
    found = {i: site for i, site in quantized.sites(model).items() if wanted(graph.node[i].op_type)}
    for i, node in enumerate(graph.node):
        if node.op_type in quantized.DYNAMIC_LAYERS and wanted(node.op_type):
            value = quantized.dynamic_value(graph, node)
            if value is not None:
                found[i] = value
    return found


def _feeding(model: onnx.ModelProto, sites: list[Site], output: str | None,
             index: GraphIndex | None = None) -> list[Site]:
    """The sites whose noise can reach `output` (all of them when no output is named)."""
    if output is None:
        return sites
    index = index_for(model.graph, index)
    upstream = {o for i in members(index.ancestor_bits([output])) for o in index.writes[i]}
    return [s for s in sites if s.name in upstream]


def select(model: onnx.ModelProto, types: dict[str, TensorSpec], selection: Selection,
           output: str | None = None, index: GraphIndex | None = None, target: str = "activations",
           stored: bool = False) -> list[Site]:
    """The sites the user asked for, numbered in graph order; with `output`, only those that feed it.

    `index`: the model's `GraphIndex`, when the caller has one (else one is built). `target` "weights": the weights
    of the selected layers instead (`weight_sites`); `stored`: values as the model stores them (`candidates`).
    Raises UsageError when nothing matches.
    """
    ops = tuple(selection.ops) or LAYER_OPS
    index = index_for(model.graph, index)
    if target == "weights":
        return weight_sites(model, types, selection, output, index, stored)
    if selection.names:
        everything = with_modules(model, candidates(model, types, (ALL,), index, stored), index)
        pool = _feeding(model, everything, output, index)
        by_name = {s.name: s for s in pool}
        missing = [n for n in selection.names if n not in by_name]
        if missing:
            why = (f"does not feed the class output {output!r}" if missing[0] in {s.name for s in everything}
                   else "is not a float node output of the model")
            raise UsageError(f"site {missing[0]!r} {why}{_hint(pool)}")
        chosen = [by_name[n] for n in selection.names]
    else:
        pool = with_modules(model, _feeding(model, candidates(model, types, ops, index, stored), output, index),
                            index)
        chosen = pool
        include = _regex(selection.include, "include")
        exclude = _regex(selection.exclude, "exclude")
        if include is not None:
            chosen = [s for s in chosen if _matches(include, s)]
        if exclude is not None:
            chosen = [s for s in chosen if not _matches(exclude, s)]
        if not pool:
            raise UsageError(_nothing_found(model, ops))
    if not chosen:
        raise UsageError(f"no site matches the selection{_hint(pool)}")
    return [dataclasses.replace(s, index=i) for i, s in enumerate(chosen)]


def _matches(pattern: re.Pattern, site: Site) -> bool:
    """Does `--include`/`--exclude` match the site's tensor, node or module path?"""
    return any(pattern.search(text) for text in (site.name, site.node, site.module) if text)


#: the metadata torch's dynamo exporter writes on every node: the module scopes, outermost first, the last being the
#: FX node itself (`['', 'layer3', 'layer3.1', 'layer3.1.conv2', 'conv2d_5']`); `namespace` says the same as
#: `': Net/layer3: Sequential/layer3.1: Bottleneck/layer3.1.conv2: Conv2d/conv2d_5: aten.conv2d.default'`
NAME_SCOPES = "pkg.torch.onnx.name_scopes"
NAMESPACE = "namespace"


def _scopes(node: onnx.NodeProto) -> list[str]:
    """The module scopes of a node from its metadata (`NAME_SCOPES`, else `NAMESPACE`), the FX node name last;
    [] when the exporter wrote none."""
    meta = {p.key: p.value for p in node.metadata_props}
    if NAME_SCOPES in meta:
        try:
            scopes = ast.literal_eval(meta[NAME_SCOPES])
        except (ValueError, SyntaxError):
            scopes = None
        if isinstance(scopes, list) and all(isinstance(x, str) for x in scopes):
            return scopes
    if NAMESPACE in meta:
        return [part.split(": ", 1)[0].strip() for part in meta[NAMESPACE].split("/")]
    return []


def module_path(node: onnx.NodeProto) -> tuple[str, str] | None:
    """(the innermost module that ran the node, the FX node's own name), e.g. ('layer3.1.conv2', 'conv2d_5'); None
    when the node has no module scope (not a dynamo export, or an op of the top module itself)."""
    scopes = _scopes(node)
    modules = [s for s in scopes[:-1] if s]
    if not modules:
        return None
    return modules[-1], scopes[-1]


def with_modules(model: onnx.ModelProto, sites: Sequence[Site], index: GraphIndex | None = None) -> list[Site]:
    """The sites with their module path (`module_path` of the node that writes the site's tensor, else of the
    layer's node). Where two sites of the list share a module (q, k and the attention matmuls of one attention
    block), each is told apart by its FX node name: `layers.0.att/matmul_1`. Sites of graphs without module
    metadata are returned unchanged."""
    graph = model.graph
    index = index_for(graph, index)
    labels = {g.node_label(n, i): i for i, n in enumerate(graph.node)}
    found: list[tuple[str, str] | None] = []
    for site in sites:
        at = index.producers.get(site.name, labels.get(site.node))
        found.append(None if at is None else module_path(graph.node[at]))
    modules = _unique([None if f is None else f[0] for f in found],
                      [None if f is None else f"{f[0]}/{f[1]}" for f in found])
    return [s if m is None else dataclasses.replace(s, module=m) for s, m in zip(sites, modules)]


def _unique(short: list[str | None], long: list[str | None]) -> list[str | None]:
    """Per item its short label where no other item has it, else its long one; long labels that still repeat get
    `#1`, `#2`, ... in order."""
    def repeated(labels):
        seen: dict[str, int] = {}
        for x in labels:
            if x is not None:
                seen[x] = seen.get(x, 0) + 1
        return seen
    once = repeated(short)
    chosen = [a if a is None or once[a] == 1 else b for a, b in zip(short, long)]
    again, turn = repeated(chosen), dict[str, int]()
    out = []
    for x in chosen:
        if x is not None and again[x] > 1:
            turn[x] = turn.get(x, 0) + 1
            x = f"{x}#{turn[x]}"
        out.append(x)
    return out


def weight_sites(model: onnx.ModelProto, types: dict[str, TensorSpec], selection: Selection,
                 output: str | None = None, index: GraphIndex | None = None, stored: bool = False) -> list[Site]:
    """One site per weight initializer of the selected layers, named by the initializer, numbered in graph order: a
    weight that two layers read is one site (its noise reaches both). `selection.names` may name the weights."""
    index = index_for(model.graph, index)
    if selection.names:
        by_weight: dict[str, Site] = {}
        for layer in _feeding(model, candidates(model, types, LAYER_OPS, index, stored), output, index):
            if layer.weight is not None:
                by_weight.setdefault(layer.weight, layer)
        missing = [n for n in selection.names if n not in by_weight]
        if missing:
            shown = ", ".join(list(by_weight)[:5]) + (", …" if len(by_weight) > 5 else "")
            raise UsageError(f"weight {missing[0]!r} is not the weight initializer of a layer that feeds the class "
                             f"output (weights include: {shown})")
        layers = [by_weight[n] for n in selection.names]
    else:
        layers = select(model, types, selection, output, index, stored=stored)
    sites: list[Site] = []
    for layer in layers:
        if layer.weight is None or layer.weight in {s.name for s in sites}:
            continue
        sites.append(Site(len(sites), layer.weight, layer.node, f"{layer.base_op} weight",
                          types[layer.weight].shape, layer.weight, layer.module))
    if not sites:
        raise UsageError("none of the selected layers reads its weights from an initializer: no weight sites")
    return sites


def _nothing_found(model: onnx.ModelProto, ops) -> str:
    """Why the selection's op types found no site, and what to do."""
    kind = quantized.kind(model)
    if kind.quantized:
        return (f"the model is quantized ({kind.describe()}) but none of its {'/'.join(ops)} layers has a site "
                f"(its float value before re-quantisation); name values with {option('names')}")
    return f"the model has no {'/'.join(ops)} layers with float outputs; try {option('ops')} all"


def _regex(pattern: str | None, field: str) -> re.Pattern | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"{option(field)} {pattern!r} is not a valid regular expression: {exc}") from None


def _hint(pool: list[Site]) -> str:
    if not pool:
        return ""
    names = ", ".join(s.name for s in pool[:5])
    return f" (sites include: {names}{', …' if len(pool) > 5 else ''})"


def weight_stats(model: onnx.ModelProto, site: Site) -> dict | None:
    """Magnitude of the weights feeding a site: mean |w| and the L2 norm of its initializer."""
    if site.weight is None:
        return None
    init = next((t for t in model.graph.initializer if t.name == site.weight), None)
    if init is None:
        return None
    w = numpy_helper.to_array(init).astype(np.float64)
    return {"name": site.weight, "mean_abs": float(np.abs(w).mean()), "l2": float(np.linalg.norm(w))}


def weight_std(model: onnx.ModelProto, name: str) -> float:
    """The std of an initializer's values (a weight site's scale, as an activation's std is its site's)."""
    init = next(t for t in model.graph.initializer if t.name == name)
    return float(numpy_helper.to_array(init).astype(np.float64).std())


def left_out(model: onnx.ModelProto, selection: Selection) -> str | None:
    """A note naming the compute-heavy op types of the model that the selection's op types leave out, and how to
    include them; None when there are none (or sites were named, or `all` taken)."""
    if selection.names or ALL in selection.ops:
        return None
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if (node.op_type in HEAVY_OPS and node.op_type not in selection.ops
                and _family(node.op_type) not in selection.ops):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    if not counts:
        return None
    listed = ", ".join(f"{n} {op}" for op, n in counts.items())
    ops = ",".join([*selection.ops, *counts])
    return f"not audited: {listed} node(s) (not default sites); include them with --ops {ops} or --ops all"


def untyped(model: onnx.ModelProto, types: dict[str, TensorSpec], selection: Selection) -> str | None:
    """A note naming the outputs of the selected op types that have no inferred type (after a contrib or custom op,
    shape inference knows nothing): they cannot be sites, and should not vanish without a word."""
    if ALL in selection.ops or selection.names:  # with every value a candidate, untyped ones are expected
        return None
    missing = [out for node in model.graph.node if node.op_type in selection.ops and node.domain in ("", "ai.onnx")
               for out in node.output if out and out not in types]
    if not missing:
        return None
    shown = ", ".join(repr(m) for m in missing[:3]) + (", …" if len(missing) > 3 else "")
    return (f"{len(missing)} output(s) of the selected ops have no inferred type and cannot be sites ({shown}); "
            "shape inference stops at ops it does not know (contrib or custom ops)")

