"""Quantized graphs as deployed: which kind of quantisation a model uses, and the graph that audits it.

A QDQ model is first replaced by the graph onnxruntime runs for it (`fused`), whose kernels no exposed value can
change; then every re-quantised layer gets a site (`requantized`). The com.microsoft integer ops' outputs get types
for onnx's shape inference (`typed_contrib_outputs`). docs/method.md, "Sites in quantized and half-precision graphs".

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
#: integer kernels with a float result (what onnxruntime fuses a QDQ MatMul into): their output is the site
FLOAT_RESULT_LAYERS = {"MatMulIntegerToFloat": "MatMul", "DynamicQuantizeMatMul": "MatMul"}
#: float layers of QDQ graphs (the sites' layers in a float model)
FLOAT_LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: ops that may sit between a QDQ layer and its QuantizeLinear (a bias Add; an activation the quantizer kept)
_BETWEEN = ("Add", "Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish")
#: ops between a dynamic layer's int32 result and its float value, in this order (each at most once)
_DYNAMIC_TAIL = ("Cast", "Mul", "Add")
SITE_SUFFIX = ".dequantized"
DOMAINS = ("", "ai.onnx", "com.microsoft")


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


def is_op(node: onnx.NodeProto, op: str) -> bool:
    return node.op_type == op and node.domain in DOMAINS


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
        if is_op(nxt, "QuantizeLinear"):
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
        if node.op_type in INTEGER_LAYERS and node.domain in DOMAINS:
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
    qop = sum(1 for n in graph.node if n.op_type in (*INTEGER_LAYERS, *FLOAT_RESULT_LAYERS) and n.domain in DOMAINS)
    dyn = sum(1 for n in graph.node if n.op_type in DYNAMIC_LAYERS and n.domain in ("", "ai.onnx"))
    integer = sum(1 for n in graph.node if n.op_type in INTEGER_LAYERS and n.domain in DOMAINS)
    return Kind(len(anchors(graph)) - integer, qop, dyn)


def _requantizes(graph, readers, outputs, q: str, scale: tuple[str, ...]) -> str | None:
    """The site of q when q already has its pair: read by one DequantizeLinear whose value one QuantizeLinear
    re-quantises, both with q's scale; else None."""
    dq = _only_reader(graph, readers, outputs, q)
    if dq is None or not is_op(dq, "DequantizeLinear") or tuple(dq.input[1:]) != scale:
        return None
    back = _only_reader(graph, readers, outputs, dq.output[0])
    ok = back is not None and is_op(back, "QuantizeLinear") and tuple(back.input[1:]) == scale
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


def fresh_name(used: set[str], wanted: str) -> str:
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
        site, again = fresh_name(used, site_name(a.q)), fresh_name(used, f"{a.q}.requantized")
        pair = [helper.make_node("DequantizeLinear", [a.q, *a.scale], [site],
                                 name=fresh_name(used, f"walkaudit/dequantize/{a.q}")),
                helper.make_node("QuantizeLinear", [site, *a.scale], [again],
                                 name=fresh_name(used, f"walkaudit/requantize/{a.q}"))]
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


#: com.microsoft integer ops whose output has their input's shape (QLinearAdd / QLinearMul: the inputs broadcast),
#: and the index of the output's zero point
_CONTRIB_SAME_SHAPE = {"QLinearAdd": 7, "QLinearMul": 7, "QLinearSigmoid": 4, "QLinearLeakyRelu": 4,
                       "QLinearGlobalAveragePool": 4}


def _broadcast(a: list, b: list) -> list:
    a, b = [1] * (len(b) - len(a)) + a, [1] * (len(a) - len(b)) + b
    return [y if x == 1 else x if y == 1 or x == y else (x if isinstance(x, int) else y) for x, y in zip(a, b)]


def _same_shape_type(node: onnx.NodeProto, shape, inits: dict) -> onnx.ValueInfoProto | None:
    dims = shape(node.input[0])
    if dims is None:
        return None
    if node.op_type in ("QLinearAdd", "QLinearMul"):
        other = shape(node.input[3]) if len(node.input) > 3 else None
        if other is None:
            return None
        dims = _broadcast(dims, other)
    if node.op_type == "QLinearGlobalAveragePool":
        last = any(a.name == "channels_last" and a.i for a in node.attribute)
        dims = [dims[0], *([1] * (len(dims) - 2)), dims[-1]] if last else [*dims[:2], *([1] * (len(dims) - 2))]
    k = _CONTRIB_SAME_SHAPE[node.op_type]
    zero = inits.get(node.input[k]) if len(node.input) > k and node.input[k] else None
    return helper.make_tensor_value_info(node.output[0], zero.data_type if zero is not None else
                                         onnx.TensorProto.UINT8, dims)


def _contrib_type(node: onnx.NodeProto, known: dict, inits: dict) -> onnx.ValueInfoProto | None:
    """The type and shape of a QGemm's or MatMulIntegerToFloat's output, from its inputs' (None when unknown)."""
    def shape(name):
        if name in known:
            return _dims(known[name])
        return list(inits[name].dims) if name in inits else None

    if node.op_type in _CONTRIB_SAME_SHAPE:
        return _same_shape_type(node, shape, inits)
    a, b = shape(node.input[0]), shape(node.input[1] if node.op_type != "QGemm" else node.input[3])
    if b is None or len(b) != 2:
        return None
    if node.op_type == "QGemm":
        attrs = {x.name: x.i for x in node.attribute if x.name in ("transA", "transB")}
        a = a if a is not None and len(a) == 2 else [None, None]
        dims = [a[1 if attrs.get("transA") else 0], b[0 if attrs.get("transB") else 1]]
        zero = inits.get(node.input[8]) if len(node.input) > 8 and node.input[8] else None
        scaled = len(node.input) > 7 and node.input[7]
        elem = (zero.data_type if zero is not None else onnx.TensorProto.UINT8) if scaled else onnx.TensorProto.FLOAT
    else:  # MatMulIntegerToFloat, DynamicQuantizeMatMul: [..., K] x [K, N] in float
        if a is None:
            return None
        dims, elem = [*a[:-1], b[1]], onnx.TensorProto.FLOAT
    return helper.make_tensor_value_info(node.output[0], elem, dims)


def typed_contrib_outputs(bare: onnx.ModelProto) -> onnx.ModelProto:
    """`bare` with the type and shape of the outputs of the com.microsoft integer ops quantized graphs hold (QGemm,
    MatMulIntegerToFloat, QLinearAdd, QLinearGlobalAveragePool, ...) declared: onnx's shape inference does not know
    them, and without them a quantized model's layer sites, and everything after, are untyped (and a suffix could
    not declare the values it is fed). The model itself when it has none. Each round of shape inference types the
    next op of every chain of them (MobileNetV3's squeeze-excitation blocks chain about 40), so the rounds go on
    until a round types nothing new."""
    ops = ("QGemm", *FLOAT_RESULT_LAYERS, *_CONTRIB_SAME_SHAPE)
    todo = [n for n in bare.graph.node if n.op_type in ops and n.domain == "com.microsoft" and n.output]
    if not todo:
        return bare
    out = onnx.ModelProto()
    out.CopyFrom(bare)
    inits = {t.name: t for t in out.graph.initializer}
    for _ in range(len(todo)):  # at least one more typed per round, or done
        try:
            inferred = onnx.shape_inference.infer_shapes(out)
        except Exception:  # noqa: BLE001 -- inference failing leaves the types as they are
            return out
        known = {vi.name: vi for vi in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output)}
        made = [vi for vi in (_contrib_type(n, known, inits) for n in todo if n.output[0] not in known) if vi]
        if not made:
            break
        out.graph.value_info.extend(made)
    return out


#: the fusions every walkaudit session turns off (`_execution.runtime.FUSIONS_OFF`): the fused graph is made with
#: them off too, so that it is the graph those sessions would run
FUSIONS_OFF = ("MatMulAddFusion", "ConvBNFusion")


def fused(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph onnxruntime's CPU provider runs for a QDQ model: its graph optimisations up to the extended level
    (QDQ groups fused into QLinearConv, QGemm, ...; int8 activations turned into uint8 where it can), as
    onnxruntime writes it out. Which groups it fuses depends on which values are graph outputs (a QuantizeLinear
    whose output is read elsewhere keeps its int8 type, and an int8 Conv group is not fused on x86), so an audit
    that exposed values of the model as given would run other kernels than the deployed model; in the fused graph
    the kernels are fixed, and it computes the deployed model's scores bit for bit. The model itself when
    onnxruntime cannot load it (its session will say why)."""
    import os
    import tempfile

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "fused.onnx")
        options.optimized_model_filepath = path
        try:
            ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"],
                                 disabled_optimizers=list(FUSIONS_OFF))
            return onnx.load(path)
        except Exception:  # noqa: BLE001 -- onnxruntime refuses many ways; the audit's own session reports it
            return model
