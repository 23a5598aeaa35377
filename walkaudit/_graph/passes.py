"""Graph surgery: functional passes that return a new model and never modify the one given.

- `expose`: make intermediate values graph outputs (the clean pass reads sites and what suffixes need).
- `suffix`: the part of the graph that noise at one site reaches, with that site as an input.
- `prefix`: the part of the graph that computes given values, and nothing after.
- `graph_noise`: a suffix that applies the noise for G σ levels itself, from a fed ε or RandomNormalLike (walk mode).
- `inject_fed`: noise after every site of the whole model from fed ε (global mode, opset ≥ 10).
- `inject`: Mul/Add nodes after sites whose noise terms are graph inputs (global mode, any opset).
None needs a random op unless asked (`graph_noise` without `fed`), so opset ≥ 22 models work too. Original output
names are kept in every pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from walkaudit._graph import queries as g
from walkaudit._loading.model import TensorSpec
from walkaudit.errors import ModelError


def _copy_without_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.Clear()
    return out


def _value_info(name: str, types: dict[str, TensorSpec]) -> onnx.ValueInfoProto:
    """A value info with the element type and rank only: every dimension stays free so packed batches fit.

    The onnx checker requires a shape on main-graph inputs and outputs; a rank with unknown dimensions satisfies
    it. Where the rank is unknown the shape is left out (onnxruntime still loads such a model).
    """
    spec = types.get(name)
    if spec is None:
        return onnx.ValueInfoProto(name=name)
    return helper.make_tensor_value_info(name, spec.elem_type, None if spec.shape is None else [None] * len(spec.shape))


def expose(model: onnx.ModelProto, names, types: dict[str, TensorSpec]) -> onnx.ModelProto:
    """A copy of `model` whose outputs also include `names` (graph inputs and existing outputs are skipped)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output} | {i.name for i in out.graph.input}
    for name in dict.fromkeys(names):
        if name not in have:
            out.graph.output.append(_value_info(name, types))
            have.add(name)
    return out


@dataclass(frozen=True)
class Suffix:
    """The nodes after a site, as a model of their own."""

    model: onnx.ModelProto
    site: str
    frontier: tuple[str, ...]  # clean values the suffix reads besides the site (from the clean pass)


def suffix_plan(model: onnx.ModelProto, site: str, output: str) -> tuple[list[int], tuple[str, ...]]:
    """Which nodes the noise at `site` reaches on its way to `output`, and which clean values they also read.

    Nodes: every node that depends on the site and that the output needs, plus the constant-only nodes that feed
    them (Constant, weight transposes, ...). Frontier: values the suffix reads that the site does not reach
    (skip connections from before the site, shape tensors, other branches, graph inputs).
    """
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    static = g.static_values(graph)
    keep = g.descendants(graph, site) & g.ancestors(graph, [output])
    made = {o for i in keep for o in graph.node[i].output}
    reads = {n for i in keep for n in g.node_inputs(graph.node[i])}
    keep |= g.ancestors(graph, [n for n in reads - made if n in static and n not in inits])
    made = {o for i in keep for o in graph.node[i].output}
    reads = {n for i in keep for n in g.node_inputs(graph.node[i])}
    return sorted(keep), tuple(sorted(reads - made - inits - {site}))


def suffix(model: onnx.ModelProto, site: str, output: str, types: dict[str, TensorSpec],
           plan: tuple[list[int], tuple[str, ...]] | None = None) -> Suffix:
    """The subgraph from `site` to `output` as a model whose inputs are the site and the frontier (`plan`: what
    `suffix_plan` gave for them, when the caller has it already)."""
    graph = model.graph
    nodes, frontier = plan or suffix_plan(model, site, output)
    nodes = [graph.node[i] for i in nodes]
    reads = {n for node in nodes for n in g.node_inputs(node)}
    out = _copy_without_graph(model)
    out.graph.name = f"{graph.name or 'graph'}_after_{site}"
    out.graph.node.extend(nodes)
    out.graph.input.extend(_value_info(n, types) for n in (site, *frontier))
    out.graph.initializer.extend(i for i in graph.initializer if i.name in reads)
    out.graph.output.extend(o for o in graph.output if o.name == output)
    return Suffix(out, site, frontier)


def prefix(model: onnx.ModelProto, outputs, types: dict[str, TensorSpec]) -> onnx.ModelProto:
    """The part of the graph that computes `outputs` (and nothing after), with the model's inputs.

    A site's clean value and frontier come from this instead of the whole model: the suffix's work is not done
    twice, and nothing blocks the fusions of the rest of the graph.
    """
    graph = model.graph
    inputs = {i.name for i in graph.input}
    nodes = [graph.node[i] for i in sorted(g.ancestors(graph, outputs))]
    reads = {n for node in nodes for n in g.node_inputs(node)}
    out = _copy_without_graph(model)
    out.graph.name = f"{graph.name or 'graph'}_prefix"
    out.graph.node.extend(nodes)
    inits = {i.name for i in graph.initializer}
    # old IR versions list initializers as inputs too: keep only those the prefix still holds
    out.graph.input.extend(i for i in graph.input if i.name not in inits or i.name in reads)
    out.graph.initializer.extend(i for i in graph.initializer if i.name in reads)
    out.graph.output.extend(_value_info(n, types) for n in dict.fromkeys(outputs) if n not in inputs)
    return out


@dataclass(frozen=True)
class Injection:
    """Where the noise terms of one site enter a rewritten graph."""

    site: str
    mul: str | None  # graph input holding the multiplicative term
    add: str | None  # graph input holding the additive term


def term_names(site: str, index: int, has_mul: bool, has_add: bool) -> Injection:
    return Injection(
        site,
        f"walkaudit.mul.{index}" if has_mul else None,
        f"walkaudit.add.{index}" if has_add else None,
    )


def inject(
    model: onnx.ModelProto, sites: list[str], types: dict[str, TensorSpec], has_mul: bool, has_add: bool
) -> tuple[onnx.ModelProto, list[Injection]]:
    """Insert y' = y · mul + add after each site, with mul and add as new graph inputs.

    The site's producer is made to write `<site>.clean`; the new nodes write the site's own name, so every reader,
    graph outputs included, sees the noisy value and every output keeps its name.
    """
    out = _at_least_opset(model, _MIN_INJECT_OPSET)
    graph = out.graph
    made_by = g.producers(graph)
    injections = [term_names(s, i, has_mul, has_add) for i, s in enumerate(sites)]
    after: dict[int, list[onnx.NodeProto]] = {}
    for inj in injections:
        producer = graph.node[made_by[inj.site]]
        clean = f"{inj.site}.clean"
        producer.output[list(producer.output).index(inj.site)] = clean
        new, value = [], clean
        if inj.mul:
            target = inj.site if not inj.add else f"{inj.site}.scaled"
            new.append(helper.make_node("Mul", [value, inj.mul], [target], name=f"walkaudit/mul/{inj.site}"))
            value = target
        if inj.add:
            new.append(helper.make_node("Add", [value, inj.add], [inj.site], name=f"walkaudit/add/{inj.site}"))
        after[made_by[inj.site]] = after.get(made_by[inj.site], []) + new
        for term in (inj.mul, inj.add):
            if term:
                graph.input.append(_value_info_like(term, inj.site, types))
    nodes = []
    for i, node in enumerate(graph.node):
        nodes.append(node)
        nodes.extend(after.get(i, []))
    del graph.node[:]
    graph.node.extend(nodes)
    return out, injections


def _noisy(y: str, mul: tuple[str, str] | None, add: tuple[str, str] | None,
           prefix: str) -> tuple[list[onnx.NodeProto], str]:
    """Nodes computing y·(1 + σm·εm) + σa·εa, where `mul` and `add` are (σ, ε) value names or None, and the name of
    the result. The order of operations is the host's (`noise.noisy_levels`), so both give the same numbers. A mul
    term reads the initializer `walkaudit.unit` (1 in y's type), which the caller provides."""
    nodes: list[onnx.NodeProto] = []

    def node(op, inputs, name):
        nodes.append(helper.make_node(op, inputs, [name], name=name))
        return name

    out = y
    if mul:
        factor = node("Add", [node("Mul", list(mul), f"{prefix}/scaled_mul"), "walkaudit.unit"], f"{prefix}/factor")
        out = node("Mul", [out, factor], f"{prefix}/noisy_mul")
    if add:
        out = node("Add", [out, node("Mul", list(add), f"{prefix}/scaled_add")], f"{prefix}/noisy_add")
    return nodes, out


@dataclass(frozen=True)
class FedNoise:
    """A model with noise applied after every site from fed-in ε: feed the data inputs tiled G times along
    dimension 0, σ per level as a vector [G], and per site one ε [1, N, ...] per term, shared by the levels."""

    model: onnx.ModelProto
    sigma_mul: str | None
    sigma_add: str | None
    eps: tuple[tuple[str, str | None, str | None], ...]  # per site: (site, ε of the mul term, ε of the add term)


def inject_fed(model: onnx.ModelProto, sites: list[str], types: dict[str, TensorSpec], has_mul: bool,
               has_add: bool) -> FedNoise:
    """After each site of a model run on G tiled copies of a batch, y' = y·(1 + σm·ε1) + σa·ε2 per copy.

    The site's producer writes `<site>.clean` [G·N, ...]; it is viewed as [G, N, ...], the noise for the G levels is
    applied with ε [1, N, ...] broadcast over them (the host's arithmetic, `noise.noisy_levels`, op for op), and the
    result is folded back to [G·N, ...] under the site's name, so every reader sees the noisy value. Float32 sites of
    known rank and opset ≥ 10 (Slice with inputs); `inject` serves the rest.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    made_by = g.producers(graph)
    sm, sa = ("walkaudit.sigma_mul" if has_mul else None), ("walkaudit.sigma_add" if has_add else None)
    inits = [onnx.numpy_helper.from_array(np.array(v, np.int64), n) for n, v in (
        ("walkaudit.zero", [0]), ("walkaudit.one", [1]), ("walkaudit.minus_one", [-1]),
        ("walkaudit.end", [np.iinfo(np.int64).max]))]
    if has_mul:
        inits.append(onnx.numpy_helper.from_array(np.array(1, np.float32), "walkaudit.unit"))
    first: list[onnx.NodeProto] = []  # nodes that read graph inputs only: they go first

    def node(into, op, inputs, name, **attrs):
        into.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    levels = node(first, "Slice", [node(first, "Shape", [sm or sa], "walkaudit/sigma_shape"), "walkaudit.zero",
                                   "walkaudit.one"], "walkaudit/levels")
    after: dict[int, list[onnx.NodeProto]] = {}
    eps = []
    for i, site in enumerate(sites):
        rank = len(types[site].shape)
        lifted = onnx.numpy_helper.from_array(np.array([-1] + [1] * rank, np.int64), f"walkaudit.sigma_shape.{i}")
        inits.append(lifted)
        producer = graph.node[made_by[site]]
        clean = f"{site}.clean"
        producer.output[list(producer.output).index(site)] = clean
        new: list[onnx.NodeProto] = []
        shape = node(new, "Shape", [clean], f"{clean}/shape")
        rest = node(new, "Slice", [shape, "walkaudit.one", "walkaudit.end"], f"{clean}/rest")
        grid = node(new, "Concat", [levels, "walkaudit.minus_one", rest], f"{clean}/grid", axis=0)
        noisy = node(new, "Reshape", [clean, grid], f"{clean}/levels")
        terms = {}  # term -> (σ reshaped to broadcast over [G, N, ...], fed ε)
        for term, sigma in (("mul", sm), ("add", sa)):
            if sigma:
                e = f"walkaudit.eps_{term}.{i}"
                graph.input.append(helper.make_tensor_value_info(e, types[site].elem_type, [None] * (rank + 1)))
                terms[term] = (node(new, "Reshape", [sigma, lifted.name], f"{clean}/sigma_{term}"), e)
        applied, noisy = _noisy(noisy, terms.get("mul"), terms.get("add"), clean)
        new.extend(applied)
        new.append(helper.make_node("Reshape", [noisy, shape], [site], name=f"walkaudit/fold/{site}"))
        names = [terms[t][1] if t in terms else None for t in ("mul", "add")]
        after.setdefault(made_by[site], []).extend(new)
        eps.append((site, *names))
    nodes = list(first)
    for i, n in enumerate(graph.node):
        nodes.append(n)
        nodes.extend(after.get(i, []))
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    for name in (sm, sa):
        if name:
            graph.input.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [None]))
    return FedNoise(out, sm, sa, tuple(eps))


#: Mul and Add broadcast without an attribute from opset 7 on, and onnxruntime has no kernels for earlier versions.
_MIN_INJECT_OPSET = 7


def _at_least_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """A copy of `model`, converted to `opset` of the default domain when it imports an older one."""
    version = next((op.version for op in model.opset_import if op.domain in ("", "ai.onnx")), opset)
    if version >= opset:
        out = onnx.ModelProto()
        out.CopyFrom(model)
        return out
    from onnx import version_converter

    try:
        return version_converter.convert_version(model, opset)
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ModelError(f"cannot add noise nodes to an opset {version} model: converting it to opset {opset} "
                         f"failed ({reason})") from None


def _value_info_like(name: str, site: str, types: dict[str, TensorSpec]) -> onnx.ValueInfoProto:
    spec = types[site]
    return helper.make_tensor_value_info(name, spec.elem_type, None if spec.shape is None else [None] * len(spec.shape))


#: Random ops have no onnxruntime kernel at opset ≥ 22; Slice takes its bounds as inputs from opset 10.
GRAPH_NOISE_OPSETS = range(10, 22)
#: A suffix that applies fed-in noise needs only Slice with inputs (opset 10) and Expand (8): any opset from 10.
FED_NOISE_MIN_OPSET = 10


@dataclass(frozen=True)
class GraphNoise:
    """A suffix that applies its own noise for G σ levels at once.

    Feed the clean site value and frontier untiled [N, ...], and σ per level [G, 1, ...] (rank of the site + 1).
    Where ε is fed (`eps_mul`, `eps_add` not None), feed one draw [1, N, ...] per term: it serves every level.
    """

    model: onnx.ModelProto
    site: str  # graph input: the clean site value [N, ...]
    frontier: tuple[str, ...]  # graph inputs: clean values [N, ...], tiled inside the graph
    sigma_mul: str | None  # graph input [G, 1, ...]
    sigma_add: str | None
    eps_mul: str | None = None  # graph input [1, N, ...] when ε comes from the host; None: drawn in the graph
    eps_add: str | None = None


def graph_noise(sfx: Suffix, types: dict[str, TensorSpec], has_mul: bool, has_add: bool, seed: int = 0,
                fed: bool = False) -> GraphNoise:
    """Prepend noise to a suffix: y' = y·(1 + σm·ε1) + σa·ε2 for G levels at once.

    ε is one array [1, N, ...] per run, broadcast over the G levels (common random numbers); the result
    [G, N, ...] is reshaped to [G·N, ...], and every frontier value is tiled the same way. The arithmetic is the
    host's (`noise.noisy_levels`), op for op, so both give the same values.

    - `fed=False`: RandomNormalLike draws ε (opsets 10–21). With a `seed` attribute the generator is stateful per
      session: each run draws anew, a new session replays. onnxruntime reads the (float) seed as an integer: ε1
      and ε2 get seeds 2·seed and 2·seed + 1.
    - `fed=True`: ε is a graph input, drawn by the host (any opset from 10). onnxruntime then does the apply and
      the tiling in its own threads and arena.
    """
    model, site = sfx.model, sfx.site
    elem = types[site].elem_type
    nodes: list[onnx.NodeProto] = []
    inputs: list[onnx.ValueInfoProto] = []
    inits = [
        onnx.numpy_helper.from_array(np.array([1], np.int64), "walkaudit.one"),
        onnx.numpy_helper.from_array(np.array([-1], np.int64), "walkaudit.minus_one"),
        onnx.numpy_helper.from_array(np.array([np.iinfo(np.int64).max], np.int64), "walkaudit.end"),
        onnx.numpy_helper.from_array(np.array([0], np.int64), "walkaudit.zero"),
    ]

    def node(op, inputs, name, **attrs):
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def lifted(value: str) -> tuple[str, str]:
        """value [N, ...] as [1, N, ...], and the shape [-1, ...] that folds a [G, N, ...] back to [G·N, ...]."""
        shape = node("Shape", [value], f"{value}/shape")
        rest = node("Slice", [shape, "walkaudit.one", "walkaudit.end"], f"{value}/rest")
        folded = node("Concat", ["walkaudit.minus_one", rest], f"{value}/folded", axis=0)
        lift = node("Concat", ["walkaudit.one", shape], f"{value}/lift", axis=0)
        return node("Reshape", [value, lift], f"{value}/lifted"), folded

    def epsilon(term: str, seed_: int) -> str:
        if not fed:
            return node("RandomNormalLike", [y], f"walkaudit/eps_{term}", dtype=elem, seed=float(seed_))
        name = f"walkaudit.eps_{term}"
        inputs.append(helper.make_tensor_value_info(name, elem, [None] * (rank + 1)))
        return name

    rank = len(types[site].shape) if types[site].shape is not None else None
    if fed and rank is None:
        raise ModelError(f"cannot feed noise to {site}: its rank is unknown")
    clean = f"{site}.clean"
    y, folded = lifted(clean)
    sm, sa = ("walkaudit.sigma_mul" if has_mul else None), ("walkaudit.sigma_add" if has_add else None)
    eps_mul = eps_add = None
    if sm:
        eps_mul = epsilon("mul", 2 * seed)
        inits.append(onnx.numpy_helper.from_array(np.array(1, helper.tensor_dtype_to_np_dtype(elem)), "walkaudit.unit"))
    if sa:
        eps_add = epsilon("add", 2 * seed + 1)
    applied, noisy = _noisy(y, (sm, eps_mul) if sm else None, (sa, eps_add) if sa else None, "walkaudit")
    nodes.extend(applied)
    nodes.append(helper.make_node("Reshape", [noisy, folded], [site], name="walkaudit/fold"))
    levels = node("Shape", [sm or sa], "walkaudit/levels")
    count = node("Slice", [levels, "walkaudit.zero", "walkaudit.one"], "walkaudit/count")
    for f in sfx.frontier:
        f_lifted, f_folded = lifted(f"{f}.clean")
        shape = node("Shape", [f_lifted], f"{f}.clean/lifted_shape")
        rest = node("Slice", [shape, "walkaudit.one", "walkaudit.end"], f"{f}.clean/tail")
        target = node("Concat", [count, rest], f"{f}.clean/target", axis=0)
        tiled = node("Expand", [f_lifted, target], f"{f}.clean/tiled")
        nodes.append(helper.make_node("Reshape", [tiled, f_folded], [f], name=f"walkaudit/fold/{f}"))

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    renamed = {site: clean, **{f: f"{f}.clean" for f in sfx.frontier}}
    for vi in graph.input:
        vi.name = renamed.get(vi.name, vi.name)
    for name in (sm, sa):
        if name:
            graph.input.append(helper.make_tensor_value_info(name, elem, None))
    graph.input.extend(inputs)
    body = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + body)
    graph.initializer.extend(inits)
    if not fed:
        eps_mul = eps_add = None  # internal values, not inputs
    return GraphNoise(out, clean, tuple(f"{f}.clean" for f in sfx.frontier), sm, sa, eps_mul, eps_add)
