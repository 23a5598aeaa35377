"""The clean value of a QDQ layer's site: its float value before re-quantisation, where the deployed value shows it.

A QDQ layer's site (`_loading.quantized`: the dequantised value DQ(q) of its integer output q, read only by a
QuantizeLinear with q's scale) holds the layer's output after re-quantisation. Where the quantizer folded the
activation into it (a ReLU becomes the floor of the uint8 range) that is the value after the activation: noise
added there would also reach the units the ReLU cut off, which is not where the float model's site is. The float
value before re-quantisation is not observable in the fused kernel, and the float layer's output as a graph output
would stop the fusion. So the graphs that give clean values (the clean model with its sites exposed, a site's
prefix) compute the site as

    site = DQ(q)                            where q is inside its integer range: the deployed value, exactly
         = min(y, DQ(q_min)) / max(y, DQ(q_max)) where q is clipped at an end of the range

with y the layer's float output (bias included, activation not) from a copy of the layer that reads the same
dequantised inputs (for QLinearConv, QLinearMatMul and QGemm: Conv, MatMul and Gemm on their dequantised inputs):
the units the re-quantisation clipped keep their float value, every other unit the deployed one. The site's
QuantizeLinear gives q back from it exactly, so everything after the site (and the class output) is the deployed
model's, and the kernels are too (a QDQ model is onnxruntime's fused graph by then, `_loading.quantized.fused`, in
which no exposed value changes a kernel). In a suffix the site is an input: noise is added to this value and the
QuantizeLinear re-quantises (and clips) the sum, as the deployed kernel re-quantises its accumulator.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from walkaudit._loading import quantized as facts

#: activations a quantizer may keep between a layer and its QuantizeLinear: the site's float value is before them
_ACTIVATIONS = ("Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish")


def _range(zero_point: np.ndarray) -> tuple[int, int] | None:
    if zero_point.dtype.kind not in "iu":
        return None
    info = np.iinfo(zero_point.dtype)
    return int(info.min), int(info.max)


def pre_activation(graph: onnx.GraphProto, names, used: set[str]) -> None:
    """Compute each re-quantised layer's site among `names` as the module docstring says, in `graph` (a pass's own
    copy, changed in place; `used`: every name the model uses, fresh names are added to it). y comes from a copy of
    a QDQ layer, or from the float layer an integer-only one computes (QLinearConv → Conv on its dequantised
    inputs). Sites whose scale is not one number or whose zero point is not an initializer stay DQ(q)."""
    wanted = set(names)
    made_by = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    inits = {t.name: t for t in graph.initializer}
    before: dict[int, list[onnx.NodeProto]] = {}
    for site in sorted(wanted & set(made_by)):
        found = _site_parts(graph, site, made_by, inits)
        if found is None:
            continue
        dq_index, layer_nodes, lo, hi = found  # layer_nodes(fresh) -> (nodes, the float value they make)
        dq = graph.node[dq_index]

        def fresh(wanted_name: str) -> str:
            return facts.fresh_name(used, wanted_name)

        deployed = fresh(f"{site}.deployed")
        dq.output[0] = deployed
        new, value = layer_nodes(fresh)
        ends = []
        for bound, tag in ((lo, "low"), (hi, "high")):
            q_end = numpy_helper.from_array(np.array(bound[0], bound[1]), fresh(f"walkaudit.{site}.q_{tag}"))
            graph.initializer.append(q_end)
            end = fresh(f"{site}.{tag}")
            new.append(helper.make_node("DequantizeLinear", [q_end.name, *dq.input[1:]], [end], name=end))
            ends.append(end)
        names_ = {k: fresh(f"{site}.{k}") for k in ("at_low", "at_high", "min", "max", "upper")}
        new += [helper.make_node("Equal", [deployed, ends[0]], [names_["at_low"]], name=names_["at_low"]),
                helper.make_node("Equal", [deployed, ends[1]], [names_["at_high"]], name=names_["at_high"]),
                helper.make_node("Min", [value, deployed], [names_["min"]], name=names_["min"]),
                helper.make_node("Max", [value, deployed], [names_["max"]], name=names_["max"]),
                helper.make_node("Where", [names_["at_high"], names_["max"], deployed], [names_["upper"]],
                                 name=names_["upper"]),
                helper.make_node("Where", [names_["at_low"], names_["min"], names_["upper"]], [site],
                                 name=fresh(f"walkaudit/site/{site}"))]
        before.setdefault(dq_index, []).extend(new)
    if not before:
        return
    nodes = []
    for i, node in enumerate(graph.node):
        nodes.append(node)
        nodes.extend(before.get(i, []))  # after the site's DequantizeLinear: everything it reads is made by then
    del graph.node[:]
    graph.node.extend(nodes)


def _copies(chain: list[onnx.NodeProto], site: str):
    """A builder of copies of a QDQ layer and its bias Add, writing fresh names (`pre_activation`)."""

    def build(fresh):
        nodes, value = [], None
        for k, node in enumerate(chain):
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = fresh(f"walkaudit/float/{node.name or node.op_type}")
            if value is not None:  # read the copy before, not the original
                copy.input[next(j for j, n in enumerate(node.input) if n in chain[k - 1].output)] = value
            value = fresh(f"{site}.float")
            del copy.output[:]
            copy.output.append(value)
            nodes.append(copy)
        return nodes, value

    return build


def _float_twin(layer: onnx.NodeProto, site: str, inits: dict):
    """A builder of the float layer an integer-only layer computes (QLinearConv → Conv, QLinearMatMul → MatMul,
    QGemm → Gemm) from the same integer inputs, dequantised; None for a per-channel weight whose axis is unclear."""
    ins = list(layer.input) + [""] * (9 - len(layer.input))
    if layer.op_type == "QLinearConv":
        op, (x, w), bias, w_axis = "Conv", (ins[0:3], ins[3:6]), ins[8], 0
    elif layer.op_type == "QLinearMatMul":
        op, (x, w), bias, w_axis = "MatMul", (ins[0:3], ins[3:6]), "", -1
    elif layer.op_type == "QGemm":
        trans_b = next((a.i for a in layer.attribute if a.name == "transB"), 0)
        op, (x, w), bias, w_axis = "Gemm", (ins[0:3], ins[3:6]), ins[6], 0 if trans_b else 1
    else:
        return None
    attrs = [a for a in layer.attribute]

    def build(fresh):
        nodes = []

        def node(op_type, inputs, wanted, **kw):
            name = fresh(wanted)
            nodes.append(helper.make_node(op_type, inputs, [name], name=name, **kw))
            return name

        xf = node("DequantizeLinear", [n for n in x if n], f"{site}.float_input")
        per_channel = w[1] in inits and int(np.prod(inits[w[1]].dims)) > 1
        wf = node("DequantizeLinear", [n for n in w if n], f"{site}.float_weight",
                  **({"axis": w_axis} if per_channel else {}))
        args = [xf, wf]
        if bias:
            bias_scale = node("Mul", [x[1], w[1]], f"{site}.bias_scale")
            args.append(node("DequantizeLinear", [bias, bias_scale], f"{site}.float_bias",
                             **({"axis": 0} if per_channel else {})))
        value = fresh(f"{site}.float")
        made = helper.make_node(op, args, [value], name=fresh(f"walkaudit/float/{layer.name or op}"))
        made.attribute.extend(a for a in attrs if op != "MatMul")
        nodes.append(made)
        return nodes, value

    return build


def _site_parts(graph, site, made_by, inits):
    """(index of the site's DequantizeLinear, a builder of the layer's float value, q's (min, dtype), (max, dtype))
    for a site whose scale is one number and whose zero point is an initializer; else None."""
    dq = graph.node[made_by[site]]
    if not facts.is_op(dq, "DequantizeLinear") or len(dq.input) < 3 or dq.input[0] not in made_by:
        return None
    quant = graph.node[made_by[dq.input[0]]]
    scale, zero = inits.get(dq.input[1]), inits.get(dq.input[2])
    if scale is None or zero is None or int(np.prod(scale.dims)) != 1:
        return None
    bounds = _range(numpy_helper.to_array(zero))
    if bounds is None:
        return None
    dtype = numpy_helper.to_array(zero).dtype
    if quant.op_type in facts.INTEGER_LAYERS and quant.domain in facts.DOMAINS:
        build = _float_twin(quant, site, inits)
        return None if build is None else (made_by[site], build, (bounds[0], dtype), (bounds[1], dtype))
    if not facts.is_op(quant, "QuantizeLinear") or len(quant.input) < 3:
        return None
    chain: list[onnx.NodeProto] = []
    value = quant.input[0]
    for _ in range(4):
        if value not in made_by:
            return None
        node = graph.node[made_by[value]]
        if node.op_type in facts.FLOAT_LAYERS:
            chain.insert(0, node)
            break
        if node.op_type == "Add":
            chain.insert(0, node)
        elif node.op_type in _ACTIVATIONS:
            chain = []  # the float value is before the activation: drop what was after it
        else:
            return None
        value = next((n for n in node.input if n in made_by and graph.node[made_by[n]].op_type
                      in (*facts.FLOAT_LAYERS, "Add", *_ACTIVATIONS)), None)
        if value is None:
            return None
    else:
        return None
    return made_by[site], _copies(chain, site), (bounds[0], dtype), (bounds[1], dtype)
