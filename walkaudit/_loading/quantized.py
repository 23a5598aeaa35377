"""Quantized graphs as deployed: which kind of quantisation a model uses, and the graph that audits it.

An INT8 model's layers run as integer kernels: onnxruntime fuses a QDQ group (DequantizeLinear → Conv →
QuantizeLinear) into QLinearConv, a QOperator model holds QLinearConv / QLinearMatMul / QGemm itself. The float value
between a layer and its re-quantisation never exists in those kernels, and making it (or the DequantizeLinear
output a fused group reads) a graph output stops the fusion: the audit would then run float-simulated quantisation,
not the model users deploy.

`requantized` gives every layer whose output is re-quantised a site that is free to read and to replace: the
layer's integer output q is dequantised into a new float value (the site) and quantised again with the same
scale and zero point, and everything that read q reads the copy:

    layer → q ─DequantizeLinear→ site ─QuantizeLinear→ q' → (what read q)

Q(DQ(q)) = q exactly, so the model computes what it computed, with the same kernels. The site is read only by the
QuantizeLinear: exposing it, cutting the graph there or feeding it as an input breaks no fusion, and noise added
to it is re-quantised by the graph where the deployed graph re-quantises. Pure: protos in, a new proto out; the
user's model is never changed. Applying it twice changes nothing (a layer already followed by such a pair is kept).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import onnx
from onnx import helper

#: integer-only layers: op -> (float layer family, index of y_scale, index of y_zero_point)
INTEGER_LAYERS = {"QLinearConv": ("Conv", 6, 7), "QLinearMatMul": ("MatMul", 6, 7), "QGemm": ("Gemm", 7, 8)}
#: dynamic quantisation: integer layers whose int32 result the graph itself scales back to float
DYNAMIC_LAYERS = {"ConvInteger": "Conv", "MatMulInteger": "MatMul"}
#: float layers of QDQ graphs (the sites' layers in a float model)
FLOAT_LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: ops that may sit between a QDQ layer and its QuantizeLinear (a bias Add; an activation the quantizer kept)
_BETWEEN = ("Add", "Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish")
#: ops between a dynamic layer's int32 result and its float value, in this order (each at most once)
_DYNAMIC_TAIL = ("Cast", "Mul", "Add")
SITE_SUFFIX = ".dequantized"
_DOMAINS = ("", "ai.onnx", "com.microsoft")


@dataclass(frozen=True)
class Kind:
    """How a model is quantized: counts of its quantisation ops by format."""

    qdq: int = 0  # QuantizeLinear nodes that re-quantise a float layer's output
    qoperator: int = 0  # QLinearConv / QLinearMatMul / QGemm nodes
    dynamic: int = 0  # ConvInteger / MatMulInteger nodes

    @property
    def quantized(self) -> bool:
        return bool(self.qdq or self.qoperator or self.dynamic)

    def describe(self) -> str:
        parts = [f"{n} {what}" for n, what in ((self.qdq, "QDQ layer(s)"), (self.qoperator, "QOperator layer(s)"),
                                                (self.dynamic, "dynamically quantized layer(s)")) if n]
        return ", ".join(parts)


def _readers(graph: onnx.GraphProto) -> dict[str, list[int]]:
    table: dict[str, list[int]] = defaultdict(list)
    for i, node in enumerate(graph.node):
        for name in node.input:
            if name:
                table[name].append(i)
    return table


def _is(node: onnx.NodeProto, op: str) -> bool:
    return node.op_type == op and node.domain in _DOMAINS


def _only_reader(graph, readers, outputs, name) -> onnx.NodeProto | None:
    users = readers.get(name, [])
    return graph.node[users[0]] if len(users) == 1 and name not in outputs else None


def qdq_quantize(graph: onnx.GraphProto, node: onnx.NodeProto, readers=None, outputs=None) -> onnx.NodeProto | None:
    """The QuantizeLinear that re-quantises a float layer's output (through a bias Add or an activation that is
    the only reader each time), or None."""
    readers = _readers(graph) if readers is None else readers
    outputs = {o.name for o in graph.output} if outputs is None else outputs
    value = node.output[0]
    for _ in range(4):
        nxt = _only_reader(graph, readers, outputs, value)
        if nxt is None:
            return None
        if _is(nxt, "QuantizeLinear"):
            return nxt
        if nxt.op_type not in _BETWEEN or not nxt.output:
            return None
        value = nxt.output[0]
    return None


def dynamic_value(graph: onnx.GraphProto, node: onnx.NodeProto, readers=None, outputs=None) -> str | None:
    """The float value a dynamically quantized layer (ConvInteger, MatMulInteger) computes: its int32 result after
    the Cast, the scale's Mul and the bias Add that follow it, or None."""
    readers = _readers(graph) if readers is None else readers
    outputs = {o.name for o in graph.output} if outputs is None else outputs
    value, floated, step = node.output[0], False, 0
    while step < len(_DYNAMIC_TAIL):  # each of Cast, Mul, Add at most once, in this order
        nxt = _only_reader(graph, readers, outputs, value)
        if nxt is None or nxt.op_type not in _DYNAMIC_TAIL[step:]:
            break
        step = _DYNAMIC_TAIL.index(nxt.op_type) + 1
        value, floated = nxt.output[0], floated or nxt.op_type == "Cast"
    return value if floated else None


@dataclass(frozen=True)
class Anchor:
    """A layer whose output is re-quantised: where its integer output q is made, and what holds q's scale."""

    layer: int  # the layer node's index
    made: int  # the index of the node writing q (the QuantizeLinear of a QDQ layer, else the layer)
    q: str
    scale: tuple[str, ...]  # q's scale and zero point (as the holder names them)
    axis: tuple = ()  # the QuantizeLinear's axis attribute, when it has one


def anchors(graph: onnx.GraphProto) -> list[Anchor]:
    """Every re-quantised layer of the graph, in graph order: integer-only layers (QLinearConv, QLinearMatMul,
    QGemm with a y_scale) and float layers of QDQ groups (Conv, Gemm, MatMul, ... whose output reaches one
    QuantizeLinear through a bias Add or an activation)."""
    readers, outputs = _readers(graph), {o.name for o in graph.output}
    made_by = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    found = []
    for i, node in enumerate(graph.node):
        if node.op_type in INTEGER_LAYERS and node.domain in _DOMAINS:
            _, s, z = INTEGER_LAYERS[node.op_type]
            if len(node.input) > s and node.input[s]:  # QGemm without y_scale writes float
                scale = (node.input[s], *(node.input[z:z + 1] if len(node.input) > z and node.input[z] else ()))
                found.append(Anchor(i, i, node.output[0], scale))
        elif node.op_type in FLOAT_LAYERS and node.domain in ("", "ai.onnx") and node.output:
            quant = qdq_quantize(graph, node, readers, outputs)
            if quant is not None:
                axis = tuple(a for a in quant.attribute if a.name == "axis")
                scale = tuple(n for n in quant.input[1:3] if n)
                found.append(Anchor(i, made_by[quant.output[0]], quant.output[0], scale, axis))
    return found


def kind(model: onnx.ModelProto) -> Kind:
    """How the model is quantized (all zero for a float model)."""
    graph = model.graph
    qop = sum(1 for n in graph.node if n.op_type in INTEGER_LAYERS and n.domain in _DOMAINS)
    dyn = sum(1 for n in graph.node if n.op_type in DYNAMIC_LAYERS and n.domain in ("", "ai.onnx"))
    return Kind(len(anchors(graph)) - qop, qop, dyn)


def _requantizes(graph, readers, outputs, q: str, scale: tuple[str, ...]) -> str | None:
    """The site of q when q already has its pair: read by one DequantizeLinear whose value one QuantizeLinear
    re-quantises, both with q's scale; else None."""
    dq = _only_reader(graph, readers, outputs, q)
    if dq is None or not _is(dq, "DequantizeLinear") or tuple(dq.input[1:]) != scale:
        return None
    back = _only_reader(graph, readers, outputs, dq.output[0])
    ok = back is not None and _is(back, "QuantizeLinear") and tuple(back.input[1:]) == scale
    return dq.output[0] if ok else None


def sites(model: onnx.ModelProto) -> dict[int, str]:
    """{layer node index: its site} for the re-quantised layers of a `requantized` model."""
    graph = model.graph
    readers, outputs = _readers(graph), {o.name for o in graph.output}
    found = {}
    for a in anchors(graph):
        site = _requantizes(graph, readers, outputs, a.q, a.scale)
        if site is not None:
            found[a.layer] = site
    return found


def _names(graph: onnx.GraphProto) -> set[str]:
    used = {graph.name, *(v.name for v in (*graph.input, *graph.output, *graph.value_info, *graph.initializer))}
    for node in graph.node:
        used.update((node.name, *node.input, *node.output))
    return used


def _fresh(used: set[str], wanted: str) -> str:
    name, k = wanted, 0
    while name in used:
        k += 1
        name = f"{wanted}_{k}"
    used.add(name)
    return name


def site_name(q: str) -> str:
    """The name the site of integer value q is given (made unique where the model uses it)."""
    return q + SITE_SUFFIX


def requantized(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with a dequantise → quantise pair after each re-quantised layer's integer output (module
    docstring); the model itself when there is none to add."""
    graph = model.graph
    readers, outputs = _readers(graph), {o.name for o in graph.output}
    todo = [a for a in anchors(graph) if _requantizes(graph, readers, outputs, a.q, a.scale) is None]
    if not todo:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    used = _names(graph)
    after: dict[int, list[onnx.NodeProto]] = {}
    renamed: dict[str, str] = {}
    for a in todo:
        site, again = _fresh(used, site_name(a.q)), _fresh(used, f"{a.q}.requantized")
        pair = [helper.make_node("DequantizeLinear", [a.q, *a.scale], [site],
                                 name=_fresh(used, f"walkaudit/dequantize/{a.q}")),
                helper.make_node("QuantizeLinear", [site, *a.scale], [again],
                                 name=_fresh(used, f"walkaudit/requantize/{a.q}"))]
        for node in pair:
            node.attribute.extend(a.axis)
        after.setdefault(a.made, []).extend(pair)
        renamed[a.q] = again
    nodes = []
    for i, node in enumerate(graph.node):
        for k, name in enumerate(node.input):
            if name in renamed:  # q's readers read the copy; q itself stays a model output where it is one
                node.input[k] = renamed[name]
        nodes.append(node)
        nodes.extend(after.get(i, []))
    del graph.node[:]
    graph.node.extend(nodes)
    return out


def _dims(vi: onnx.ValueInfoProto) -> list | None:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else None)
            for d in t.shape.dim]


def typed_contrib_outputs(bare: onnx.ModelProto, rounds: int = 8) -> onnx.ModelProto:
    """`bare` with the type and shape of each QGemm output declared (onnx's shape inference does not know
    com.microsoft ops, so without them a QOperator model's Gemm sites, and everything after, are untyped):
    [M, N] from its inputs' inferred shapes and transA / transB, of its zero point's type (float without y_scale).
    The model itself when it has no QGemm."""
    gemms = [n for n in bare.graph.node if n.op_type == "QGemm" and n.output]
    if not gemms:
        return bare
    out = onnx.ModelProto()
    out.CopyFrom(bare)
    inits = {t.name: t for t in out.graph.initializer}
    for _ in range(rounds):
        try:
            inferred = onnx.shape_inference.infer_shapes(out)
        except Exception:  # noqa: BLE001 -- inference failing leaves the types as they are
            return out
        known = {vi.name: vi for vi in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output)}
        added = False
        for node in gemms:
            if node.output[0] in known:
                continue
            shapes = [_dims(known[n]) if n in known else (list(inits[n].dims) if n in inits else None)
                      for n in (node.input[0], node.input[3])]
            if any(s is None or len(s) != 2 for s in shapes):
                continue
            attrs = {a.name: a.i for a in node.attribute if a.name in ("transA", "transB")}
            rows = shapes[0][1 if attrs.get("transA") else 0]
            cols = shapes[1][0 if attrs.get("transB") else 1]
            zero = inits.get(node.input[8]) if len(node.input) > 8 and node.input[8] else None
            scaled = len(node.input) > 7 and node.input[7]
            elem = (zero.data_type if zero is not None else onnx.TensorProto.UINT8) if scaled else onnx.TensorProto.FLOAT
            out.graph.value_info.append(helper.make_tensor_value_info(node.output[0], elem, [rows, cols]))
            added = True
        if not added:
            break
    return out
