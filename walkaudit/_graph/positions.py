"""Positions the output never reads: run the tail of a suffix on the positions that reach the output only.

A classifier over a sequence often reads one position at the end: BERT's pooler and a ViT's head take the class
token (`hidden[:, 0]`, a Gather or Slice along the token axis). Every op after the last attention is position-wise
(residual adds, LayerNorm, the FFN's MatMuls), and even the last attention needs its query, scores and context for
that one row only: the other T - 1 positions are computed and thrown away. onnxruntime does not see it; this pass
does. From the reading node (the *seed*) it walks back through ops that treat every position alike and moves the
selection in front of them (a Slice on each value that enters that region), so the region computes the kept
positions only. Noise at a site inside the region or before it reaches the output as before; the suffix just skips
what the output never reads. The numbers are the same up to rounding: a MatMul of one row may take another kernel
than one of T rows (7e-7 on the logits of the BERT benchmark), so `--exact` sessions do without it.

An op joins the region when every consumer of its output is in the region and wants the same axis, and the op
maps that axis to its inputs (`_input_axes`): element-wise ops with numpy broadcasting, LayerNormalization and
Softmax across other axes, MatMul rows and batch axes, Transpose, and a Reshape that keeps the axes up to the
token axis (its shape vector is then rebuilt from the sliced input). An input is sliced only where shape inference
says its axis is the output's (the same size or symbol) and read whole where the axis has size 1 (a broadcast);
anything else, unknown sizes included, ends the region.

Functional, like every pass: returns a new model (or the same one when there is nothing to prune).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from walkaudit._graph.ops import ELEMENTWISE
from walkaudit._graph.passes import _copy, _int64_constant, _Names
from walkaudit._loading.model import TensorSpec

_END = np.iinfo(np.int64).max
_UNKNOWN = "unknown"  # an input axis that may or may not be the output's (`_broadcast_axis`)


def keep_read_positions(model: onnx.ModelProto, types: dict[str, TensorSpec], batch) -> onnx.ModelProto:
    """`model` whose tail computes only the positions its output reads (see the module's doc), or `model` itself
    when no node reads one position of a sequence, or no op before it can run on that position alone (or the opset
    is older than 10).

    `types`: the inferred shapes of the values (the model's, by name); `batch`: the model's batch dimension, which
    is never a position axis.
    """
    graph, opset = model.graph, _opset(model)
    if opset < 10:  # Slice takes its starts and ends as inputs from opset 10
        return model
    for seed in reversed(range(len(graph.node))):  # the read nearest the output first: the class token's
        kept = _kept(graph.node[seed], graph, types, batch)
        if kept is None:
            continue
        region = _region(graph, seed, kept[0], types, opset)
        if region:
            return _rewrite(model, seed, kept, region)
    return model


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def constant_value(graph: onnx.GraphProto, name: str) -> np.ndarray | None:
    """The value of an initializer or of a Constant node's output (any of its value attributes), else None."""
    for t in graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name and len(node.attribute) == 1:
            (attr,) = node.attribute
            value = helper.get_attribute_value(attr)
            return numpy_helper.to_array(value) if attr.type == onnx.AttributeProto.TENSOR else np.array(value)
    return None


def _shape(graph: onnx.GraphProto, types: dict[str, TensorSpec], name: str) -> tuple | None:
    spec = types.get(name)
    if spec is not None:
        return spec.shape
    t = next((t for t in graph.initializer if t.name == name), None)
    return tuple(t.dims) if t is not None else None


def _kept(node: onnx.NodeProto, graph, types, batch) -> tuple[int, int, int] | None:
    """(axis, start, end) of the positions a Gather of one index, or a Slice of one axis with step 1, reads from a
    value of known shape and rank ≥ 2 (a shape vector is not a sequence), along an axis that is not the batch's
    and not of size 1; else None."""
    if node.op_type not in ("Gather", "Slice") or not node.input:
        return None
    shape = _shape(graph, types, node.input[0])
    if not shape or len(shape) < 2:
        return None
    if node.op_type == "Gather":
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        index = constant_value(graph, node.input[1])
        if index is None or index.size != 1 or index.ndim > 1:
            return None
        start = int(index.reshape(()))
        end = _END if start == -1 else start + 1
    else:
        parts = [constant_value(graph, n) if n else None for n in node.input[1:5]]
        if len(node.input) < 3 or parts[0] is None or parts[1] is None:
            return None
        starts, ends = parts[0], parts[1]
        axes, steps = (*parts[2:], None, None)[:2]
        axes = np.arange(len(starts)) if axes is None else axes
        if len(starts) != 1 or (steps is not None and int(steps[0]) != 1):
            return None
        axis, start, end = int(axes[0]), int(starts[0]), int(ends[0])
    axis %= len(shape)
    if shape[axis] in (batch, 1, None) or not isinstance(shape[axis], (int, str)):
        return None
    return axis, start, end


def _region(graph: onnx.GraphProto, seed: int, axis: int, types, opset: int) -> dict[int, list]:
    """node index -> the axis of each input (None: read whole) for the nodes that can run on the kept positions."""
    outputs = {o.name for o in graph.output}
    axes: dict[str, set[int]] = {}  # value -> axes the region's consumers want it sliced along
    whole: set[str] = set(outputs)  # values something reads whole
    region: dict[int, list] = {}
    for i in range(len(graph.node) - 1, -1, -1):
        node = graph.node[i]
        if i == seed:
            axes.setdefault(node.input[0], set()).add(axis)
            whole.update(node.input[1:])
            continue
        wanted = {a for o in node.output if o for a in axes.get(o, ())}
        read = [o for o in node.output if o in axes or o in whole]
        if len(wanted) == 1 and not any(o in whole for o in node.output):
            ins = _input_axes(node, wanted.pop(), graph, types, opset)
            if ins is not None and len(read) == 1 and read[0] == node.output[0]:
                region[i] = ins
                for name, a in zip(node.input, ins):
                    if a is None:
                        whole.add(name)
                    else:
                        axes.setdefault(name, set()).add(a)
                continue
        whole.update(node.input)
        for a in node.attribute:  # values a subgraph reads are read whole
            if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                whole.update(n for g in [a.g, *a.graphs] for sub in g.node for n in sub.input)
    return region


def _input_axes(node: onnx.NodeProto, p: int, graph, types, opset: int) -> list | None:
    """The axis of each input that holds output axis `p` (None: the input is read whole, as a broadcast or a
    weight), or None when the op does not treat the positions along `p` independently (or shapes are unknown)."""
    out = _shape(graph, types, node.output[0])
    maybe = [_shape(graph, types, n) if n else () for n in node.input]
    shapes = [s for s in maybe if s is not None]
    if out is None or len(shapes) < len(maybe):
        return None
    r, op = len(out), node.op_type
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if op in ELEMENTWISE:
        ins = [_broadcast_axis(s, p, out) for s in shapes]
        return None if _UNKNOWN in ins else ins
    if op == "LayerNormalization":
        return [p, None, None][: len(node.input)] if p < attrs.get("axis", -1) % r else None
    if op in ("Softmax", "LogSoftmax"):
        a = attrs.get("axis", -1 if opset >= 13 else 1) % r
        return [p] if (p != a if opset >= 13 else p < a) else None
    if op == "MatMul":
        (ra, rb) = (len(s) for s in shapes)
        if ra < 2 or rb < 2 or p == r - 1:
            return None
        if p == r - 2:
            return [ra - 2, None]
        ins = [_broadcast_axis(s, p, out) for s in shapes]
        return None if _UNKNOWN in ins else ins
    if op == "Transpose":
        return [attrs.get("perm", list(range(r))[::-1])[p]]
    if op == "Reshape":
        data = shapes[0]
        keeps = p < min(len(data), r) and all(data[k] is not None and data[k] == out[k] for k in range(p + 1))
        return [p, None] if keeps else None
    return None


def _broadcast_axis(shape: tuple, p: int, out: tuple):
    """Which axis of an input with `shape` holds axis `p` of the output (shape `out`) under numpy broadcasting:
    None when the input does not vary along it (absent, or size 1), _UNKNOWN when shape inference cannot say that
    it is the output's axis (another size or symbol, or unknown)."""
    q = p - (len(out) - len(shape))
    if q < 0 or shape[q] == 1:
        return None
    return q if shape[q] is not None and shape[q] == out[p] else _UNKNOWN


def _rewrite(model: onnx.ModelProto, seed: int, kept: tuple[int, int, int], region: dict[int, list]):
    """Slice the values that enter the region, rebuild its Reshapes' shape vectors, and make the seed read the
    sliced value from its start."""
    _, start, end = kept
    out = _copy(model)
    graph = out.graph
    names = _Names(graph)
    made = {o for i in region for o in graph.node[i].output}
    inits: dict[str, onnx.TensorProto] = {}
    slices: dict[tuple[str, int], str] = {}
    nodes: list[onnx.NodeProto] = []

    def constant(wanted: str, value: int) -> str:
        if wanted not in inits:
            inits[wanted] = _int64_constant(names, wanted, [value])
        return inits[wanted].name

    def add(op, inputs, wanted, **attrs) -> str:
        name = names.fresh(wanted)
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    for i, node in enumerate(graph.node):
        node = onnx.NodeProto.FromString(node.SerializeToString())
        if i in region:
            for k, a in enumerate(region[i]):
                name = node.input[k]
                if a is None or name in made:
                    continue
                if (name, a) not in slices:
                    slices[(name, a)] = add("Slice", [name, constant("walkaudit.kept_start", start),
                                                      constant("walkaudit.kept_end", end),
                                                      constant(f"walkaudit.axis_{a}", a)], f"{name}/kept_positions")
                node.input[k] = slices[(name, a)]
            if node.op_type == "Reshape":  # axes 0..p from the sliced input, the rest as the model says
                p, y = region[i][0], node.output[0]
                through = constant(f"walkaudit.axis_{p + 1}", p + 1)
                lead = add("Slice", [add("Shape", [node.input[0]], f"{y}/kept_shape"),
                                     constant("walkaudit.zero", 0), through], f"{y}/kept_lead")
                rest = add("Slice", [node.input[1], through, constant("walkaudit.end", _END)], f"{y}/kept_rest")
                node.input[1] = add("Concat", [lead, rest], f"{y}/kept_target", axis=0)
        elif i == seed:
            if node.op_type == "Gather":  # the same index shape, now 0: the first of the kept positions
                seed_index = constant_value(graph, node.input[1])
                assert seed_index is not None  # the seed was chosen for its constant index
                index = numpy_helper.from_array(np.zeros(seed_index.shape, np.int64),
                                                names.fresh("walkaudit.kept_index"))
                inits[index.name] = index
                node.input[1] = index.name
            else:
                node = helper.make_node("Identity", [node.input[0]], list(node.output), name=node.name)
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(inits.values())
    for v in [v for v in graph.value_info if v.name in made]:  # their shapes hold the kept positions only now
        graph.value_info.remove(v)
    return out
