"""What a site costs (pure: graph in, numbers out).

`site_macs`: the multiply-accumulates per sample of the site's operator, from the graph's shapes. Per sample means
per row of the leading (batch) dimension of the operator's output; recurrent ops count every time step.

    Conv / ConvInteger / QLinearConv   prod(Y[1:]) · prod(W[1:])          (W[1] is C / group already)
    ConvTranspose                      prod(X[1:]) · prod(W[1:])          (W: [C, M / group, k…])
    Gemm                               prod(Y[1:]) · K                    (K from A, or from B)
    MatMul (batched) / MatMulInteger /
    QLinearMatMul                      prod(Y[1:]) · K                    (K = A[-1]; 1-D by 1-D/2-D: no batch)
    LSTM / GRU / RNN                   T · D · G·H · (I + H)               (G = 4 / 3 / 1 gates, D directions, T steps)

A site of a layer with its bias folded in (MatMul+Add, Conv+Add) counts the layer. Ops without multiply-accumulates
(Relu, Add, pooling, ...) count 0; ops that do some that are not modelled here (Einsum, Attention, control flow)
and shapes that are not known give None.

`site_costs`: one number per site, proportional to the time its walk takes, for sharding (`shards.assign`): the
work per sample of the suffix the walk runs for the site (every node the noise reaches on its way to the class
output, `GraphIndex.suffix_plan`) plus drawing and adding the noise. Per suffix node: its MACs for the ops above,
otherwise ELEMENT_COST per output element (memory-bound elementwise work); the noise: NOISE_COST per element of the
site; OVERHEAD_COST for what every site pays per sample whatever its size. Nodes whose cost is not known (unknown
shapes, unmodelled ops) count as the mean known node; where nothing is known the cost is node counts (the suffix's
nodes, plus one for the site). Constant-only nodes count 0. What the estimate leaves out: the prefix run once per batch
for sites whose clean values were not kept, session set-up, and the adaptive search's varying number of σ levels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import onnx

from walkaudit._graph.index import GraphIndex
from walkaudit._graph.queries import node_label

__all__ = ["ELEMENT_COST", "NOISE_COST", "OVERHEAD_COST", "node_macs", "pass_cost", "site_costs", "site_macs",
           "sites_macs", "value_bytes"]

#: cost of one output element of an op without MACs, in MACs (onnxruntime's elementwise kernels run at memory speed)
ELEMENT_COST = 8.0
#: cost of one noise value, in MACs: the draw (Box–Muller on the host), y + σ·ε, folding and tiling the levels
NOISE_COST = 64.0
#: cost per sample of any site, in MACs: feeding the batch, reading the class output, the runs' own overhead.
#: These three weights were fitted to the per-site walk times of samples/mnist_lenet5 on one CPU thread (walk
#: seconds per site ≈ 0.6, 0.21, 0.035, 0.06, 0.03 against estimates in the ratio 21 : 6.5 : 1.6 : 1.2 : 1).
OVERHEAD_COST = 32768.0

_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
_CONV = {"Conv": (0, 1), "ConvInteger": (0, 1), "QLinearConv": (0, 3)}  # op -> (X, W) input positions
_MATMUL = {"MatMul": (0, 1), "MatMulInteger": (0, 1), "QLinearMatMul": (0, 3)}  # op -> (A, B)
#: ops that multiply-accumulate in ways not modelled here: their MACs are unknown (None), not 0
_UNMODELLED = frozenset({"Einsum", "Attention", "MultiHeadAttention", "GroupQueryAttention", "FusedConv",
                         "FusedGemm", "FusedMatMul", "DeformConv", "If", "Loop", "Scan", "QLinearAttention",
                         "DynamicQuantizeMatMul", "MatMulNBits", "QGemm", "Conv1D", "ConvTransposeWithDynamicPads"})

Shape = tuple  # dims: int, str (symbolic) or None


class _View:
    """The facts the estimates need of one model: its graph, value shapes (initializers included), the class
    output, and node positions by label."""

    def __init__(self, model, output: str | None = None):
        if isinstance(model, onnx.ModelProto):
            proto, shapes = model, _inferred_shapes(model)
            out = output or (model.graph.output[0].name if model.graph.output else None)
        else:  # a walkaudit LoadedModel: shape inference has run once already
            proto = model.proto
            shapes = {name: spec.shape for name, spec in model.types.items()}
            out = output or model.class_output.name
        for init in proto.graph.initializer:
            shapes.setdefault(init.name, tuple(init.dims))
        self.proto, self.shapes, self.output = proto, shapes, out
        self.nodes = {node_label(n, i): i for i, n in enumerate(proto.graph.node)}

    def shape(self, name: str) -> Shape | None:
        return self.shapes.get(name) if name else None

    def node_of(self, site) -> onnx.NodeProto | None:
        i = self.nodes.get(site.node)
        return None if i is None else self.proto.graph.node[i]


def _inferred_shapes(model: onnx.ModelProto) -> dict[str, Shape | None]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # inference gives up on some graphs; the declared shapes still serve
        inferred = model
    g = inferred.graph
    shapes: dict[str, Shape | None] = {}
    for vi in (*g.input, *g.value_info, *g.output):
        t = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
        if t is None or not t.HasField("shape"):
            shapes[vi.name] = None
            continue
        shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                for d in t.shape.dim)
    return shapes


def _known(dims) -> bool:
    return all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims)


def _prod(dims) -> int:
    return math.prod(int(d) for d in dims)


def _per_sample(shape: Shape | None) -> int | None:
    """Elements per sample: every dimension after the first (the batch); None when one is unknown."""
    if shape is None:
        return None
    rest = shape[1:]
    return _prod(rest) if _known(rest) else None


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _input(node: onnx.NodeProto, k: int) -> str:
    return node.input[k] if len(node.input) > k else ""


def node_macs(node: onnx.NodeProto, shape) -> int | None:
    """Multiply-accumulates per sample of one node (`shape`: value name -> dims or None): 0 for ops without any,
    None where the shapes are unknown or the op is not modelled."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx", "com.microsoft"):
        return None
    if op in _CONV:
        x, w = _CONV[op]
        out, weight = shape(node.output[0]), shape(_input(node, w))
        if out is None or weight is None or len(weight) < 2 or not _known(weight[1:]):
            return None
        per = _per_sample(out)
        return None if per is None else per * _prod(weight[1:])
    if op == "ConvTranspose":
        x, weight = shape(node.input[0]), shape(_input(node, 1))
        if x is None or weight is None or len(weight) < 2 or not _known(weight[1:]):
            return None
        per = _per_sample(x)
        return None if per is None else per * _prod(weight[1:])
    if op == "Gemm":
        out, a, b = shape(node.output[0]), shape(_input(node, 0)), shape(_input(node, 1))
        k = None
        if a is not None and len(a) == 2:
            k = a[0] if _attr(node, "transA", 0) else a[1]
        if not _known([k]) and b is not None and len(b) == 2:
            k = b[1] if _attr(node, "transB", 0) else b[0]
        per = _per_sample(out)
        return None if per is None or k is None or not _known([k]) else per * int(k)
    if op in _MATMUL:
        ia, ib = _MATMUL[op]
        out, a, b = shape(node.output[0]), shape(_input(node, ia)), shape(_input(node, ib))
        k = a[-1] if a else None
        if not _known([k]) and b:
            k = b[0] if len(b) == 1 else b[-2]
        if out is None or k is None or not _known([k]):
            return None
        if len(out) == 0 or (a is not None and len(a) == 1 and len(out) == 1):
            rows = _prod(out) if _known(out) else None  # no batch dimension: the whole product
        else:
            rows = _per_sample(out)
        return None if rows is None else rows * int(k)
    if op in _GATES:
        return _recurrent_macs(node, shape)
    if op in _UNMODELLED:
        return None
    return 0


def _recurrent_macs(node: onnx.NodeProto, shape) -> int | None:
    """LSTM / GRU / RNN: per time step and direction, the gates' input and recurrent products."""
    gates = _GATES[node.op_type]
    x, w = shape(node.input[0]), shape(_input(node, 1))
    if x is None or len(x) != 3:
        return None
    steps = x[1] if _attr(node, "layout", 0) else x[0]
    hidden = _attr(node, "hidden_size")
    directions, features = None, x[2]
    if w is not None and len(w) == 3:
        directions = w[0]
        features = w[2] if _known([w[2]]) else features
        if hidden is None and _known([w[1]]):
            hidden = w[1] // gates
    if directions is None or not _known([directions]):
        directions = 2 if _attr(node, "direction", b"forward") in (b"bidirectional", "bidirectional") else 1
    if not _known([steps, hidden, features]):
        return None
    return int(steps) * int(directions) * gates * int(hidden) * (int(features) + int(hidden))


def _site_macs(view: _View, site, shapes: Mapping[str, Shape] | None = None) -> int | None:
    if getattr(site, "index", 0) is None:  # the global pseudo-site
        return None
    node = view.node_of(site)
    if node is None:
        return None
    shapes = dict(shapes or {})
    layer_out = node.output[0] if node.output else ""
    if _per_sample(view.shape(layer_out)) is None and layer_out != site.name:
        # the layer's own output of a folded bias Add (Conv+Add, MatMul+Add) has the site's shape
        site_shape = shapes.get(site.name) or view.shape(site.name)
        if site_shape is not None:
            shapes.setdefault(layer_out, tuple(site_shape))

    def shape(name: str) -> Shape | None:
        known = view.shape(name)
        return tuple(shapes[name]) if name in shapes and _per_sample(known) is None else known

    return node_macs(node, shape)


def site_macs(model, site, shapes: Mapping[str, Shape] | None = None) -> int | None:
    """Multiply-accumulates per sample of the site's operator (see the module docstring); None where unknown.

    model: a walkaudit LoadedModel or an onnx.ModelProto (shape inference runs on it). shapes: shapes of values that
    the graph leaves unknown, e.g. the site's shape as the clean pass saw it (the graph's own shapes come first)."""
    return _site_macs(_View(model), site, shapes)


def sites_macs(model, sites: Sequence) -> list[int | None]:
    """`site_macs` of many sites of one model, the model looked at once."""
    view = _View(model)
    return [_site_macs(view, s) for s in sites]


def site_costs(model, sites: Sequence, output: str | None = None) -> list[float]:
    """One number per site, proportional to the time its walk takes (see the module docstring): the suffix's work
    per sample plus the noise's.

    model: a walkaudit LoadedModel (its class output is the suffixes' end) or an onnx.ModelProto (`output`, else its
    first graph output)."""
    if not sites:
        return []
    view = _View(model, output)
    index = GraphIndex(view.proto.graph)
    node_cost, typical, overhead = _node_costs(view, index)
    out = []
    plans = index.suffix_plans(dict.fromkeys(s.name for s in sites), view.output) if view.output else {}
    for s in sites:
        nodes = plans[s.name][0] if s.name in plans else []
        size = _per_sample(view.shape(s.name))
        noise = typical if size is None else NOISE_COST * max(size, 1)
        out.append(overhead + noise + sum(node_cost[i] for i in nodes))
    return out


def _node_costs(view: _View, index: GraphIndex) -> tuple[list[float], float, float]:
    """(per node its cost per sample, the mean known node's cost, the per-sample overhead) in MAC units: MACs where
    modelled, ELEMENT_COST per output element for ops without, the mean known node where unknown, 0 for
    constant-only nodes."""
    costs: list[float | None] = []
    for i, node in enumerate(view.proto.graph.node):
        if all(o in index.static for o in index.writes[i]) and index.writes[i]:
            costs.append(0.0)  # constant-only: computed from weights, not per sample
            continue
        macs = node_macs(node, view.shape)
        if macs:
            costs.append(float(macs))
        elif macs == 0:
            sizes = [_per_sample(view.shape(o)) for o in index.writes[i]]
            found = [s for s in sizes if s is not None]
            costs.append(None if len(found) < len(sizes) else ELEMENT_COST * sum(found))
        else:
            costs.append(None)
    known = [c for c in costs if c is not None and c > 0]
    typical = sum(known) / len(known) if known else 1.0
    overhead = OVERHEAD_COST if known else 0.0  # nothing known: node counts alone
    return [typical if c is None else c for c in costs], typical, overhead


def pass_cost(model, output: str | None = None) -> float:
    """The cost per sample of one whole forward pass, in the units of `site_costs` (a site's walk over one σ level
    and one repeat costs `site_costs(...)[k] / pass_cost(...)` clean passes)."""
    view = _View(model, output)
    node_cost, _, overhead = _node_costs(view, GraphIndex(view.proto.graph))
    return overhead + sum(node_cost)


def value_bytes(model, names=None) -> tuple[int, int]:
    """(bytes per sample of the named values, of the largest value of the graph) by their inferred shapes and
    types (float32 where the type is unknown; values of unknown shape count 0). `names` None: every node output."""
    view = _View(model)
    graph = view.proto.graph
    types = {} if isinstance(model, onnx.ModelProto) else model.types
    outs = [o for n in graph.node for o in n.output if o]

    def size(name: str) -> int:
        n = _per_sample(view.shape(name)) or 0
        spec = types.get(name)
        item = onnx.helper.tensor_dtype_to_np_dtype(spec.elem_type).itemsize if spec is not None and \
            spec.elem_type not in (0, onnx.TensorProto.STRING) else 4
        return n * item

    chosen = outs if names is None else list(names)
    return sum(size(n) for n in chosen), max((size(n) for n in outs), default=0)
