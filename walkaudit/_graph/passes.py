"""Graph surgery: functional passes that return a new model and never modify the one given.

- `expose`: make intermediate values graph outputs (the clean pass reads sites and what suffixes need).
- `suffix`: the part of the graph that noise at one site reaches, with that site as an input.
- `per_sample`: a suffix plan whose frontier holds the samples along axis 0 (shape arithmetic recomputed inside).
- `prefix`: the part of the graph that computes given values, and nothing after.
- `graph_noise`: a suffix that applies the noise for G σ levels itself, from a fed ε or RandomNormalLike (walk mode).
- `inject_fed`: noise after every site of the whole model from fed ε (global mode, opset ≥ 10).
- `inject`: Mul/Add nodes after sites whose noise terms are graph inputs (global mode, any opset).

The contract of every pass: it is functional (it returns a new model and never modifies the model it is given),
original output names are kept, and every name it adds (values, nodes, initializers, graph inputs) is allocated by
`_Names`, so it never collides with a name the model already uses. The dataclasses returned (`Suffix`, `GraphNoise`,
`FedNoise`, `Injection`) carry the names callers must feed: callers never spell an internal name themselves.
None needs a random op unless asked (`graph_noise` without `fed`), so opset ≥ 22 models work too.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from walkaudit._graph import quantized, weights
from walkaudit._graph.index import (
    RANDOM_OPS,
    GraphIndex,
    Plan,
    index_for,
    members,
    names_in_use,
    node_inputs,
)
from walkaudit._loading.model import TensorSpec, copy_fields
from walkaudit.errors import ModelError


class _Names:
    """Allocates the names a pass adds: the wanted name itself while the model does not use it, else the first free
    `<wanted>_1`, `<wanted>_2`, ...

    It knows every name of the model (values, nodes, initializers, inputs, outputs, value infos, subgraphs) and every
    name it has handed out, so a pass can neither shadow a value of the model (onnxruntime: "Duplicate definition")
    nor give two of its own additions the same name.
    """

    def __init__(self, graph: onnx.GraphProto):
        self._used = names_in_use(graph)

    def fresh(self, wanted: str) -> str:
        name, k = wanted, 0
        while name in self._used:
            k += 1
            name = f"{wanted}_{k}"
        self._used.add(name)
        return name


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _copy_without_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model`'s metadata and opsets, an empty graph (copying the whole model first would copy its weights)."""
    out = onnx.ModelProto()
    copy_fields(model, out, skip="graph")
    return out


def _copy_with_stubs(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose large weights are stubs (`weights.stubbed`): the values stay where they are."""
    out = _copy_without_graph(model)
    copy_fields(model.graph, out.graph, skip="initializer")
    out.graph.initializer.extend(weights.stubbed(model.graph.initializer))
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


def _int64_constant(names: _Names, wanted: str, values: list[int]) -> onnx.TensorProto:
    """An int64 initializer under a fresh name (slice bounds, shapes)."""
    return onnx.numpy_helper.from_array(np.array(values, np.int64), names.fresh(wanted))


def expose(model: onnx.ModelProto, names, types: dict[str, TensorSpec]) -> onnx.ModelProto:
    """A copy of `model` (its large weights as stubs) whose outputs also include `names` (graph inputs and existing
    outputs are skipped).

    The site of a QDQ layer among `names` is computed as its float value before re-quantisation where the deployed
    value shows it (`quantized.pre_activation`; the class output and the kernels stay the deployed model's): the
    names that adds are fresh. Functional: returns a new model and never modifies `model`.
    """
    out = _copy_with_stubs(model)
    have = {o.name for o in out.graph.output} | {i.name for i in out.graph.input}
    for name in dict.fromkeys(names):
        if name not in have:
            out.graph.output.append(_value_info(name, types))
            have.add(name)
    quantized.pre_activation(out.graph, names, names_in_use(out.graph))
    return out


@dataclass(frozen=True)
class Suffix:
    """The nodes after a site, as a model of their own."""

    model: onnx.ModelProto
    site: str
    frontier: tuple[str, ...]  # clean values the suffix reads besides the site (from the clean pass)


def suffix_plan(model: onnx.ModelProto, site: str, output: str, index: GraphIndex | None = None) -> Plan:
    """Which nodes the noise at `site` reaches on its way to `output`, and which clean values they also read.

    Nodes: every node that depends on the site and that the output needs, plus the constant-only nodes that feed
    them (Constant, weight transposes, ...). Frontier: values the suffix reads that the site does not reach
    (skip connections from before the site, shape tensors, other branches, graph inputs).

    `index`: the model's `GraphIndex`. Pass it when planning many sites: the index plans each in a few bitwise
    operations (`GraphIndex.suffix_plans` plans them all); without it one is built for this call.
    """
    return index_for(model.graph, index).suffix_plan(site, output)


def per_sample(plan: Plan, site: str, index: GraphIndex, types: dict[str, TensorSpec], batch,
               kinds: dict[str, str] | None = None) -> Plan:
    """`plan` with a frontier of per-sample values only: what describes the batch as a whole is recomputed inside.

    A suffix is fed its frontier by rows: G copies stacked along axis 0 when σ levels are packed, a slice of the
    rows for part of a batch. That is right for values whose every row is a function of its own sample, along
    axis 0, and wrong for the others. Which values are which comes from the graph's dataflow
    (`dependence.classify`, or `kinds` when the caller has it), not from which axis looks like the batch:
    - "shape" values read the inputs only through their shapes: the shape arithmetic exporters put before a
      Reshape (Shape(x), Gather, Concat, ... an int64 vector that holds N as a *number*), `Range(0, N)`,
      `ConstantOfShape`. Tiled, such a vector is G times longer or still says N; either way a Reshape fails or
      every level reads level 0's rows.
    - "indexed" values mix real data with a number derived from the batch size through a data input (GPT-2's
      `Concat(Range(N), argmax)`, the indices of the GatherND that picks each sample's last token): tiled, every
      level would gather level 0's rows.
    - "sample" values whose inferred dimension 0 is not `batch` ([1, T, D] positional terms, [T, N, D]
      sequence-first tensors), nor a symbol shape inference gave the batch under another name
      (`dependence.batch_symbols`: a ViT's residual stream after its class token is concatenated).
    Their nodes join the suffix, back to values that do hold the samples (or graph inputs, or constants): the
    arithmetic then runs on the tiled batch and says G·N, as the model itself would for a batch of G·N samples.
    Values of unknown shape that the dataflow calls per sample stay in the frontier; the σ = 0 check before
    packing guards what this cannot see.

    `batch`: the model's batch dimension (the symbol at dimension 0 of its inputs; None when unknown); the plan is
    returned unchanged for a fixed batch (an int: the graph takes no tiled batch anyway). Pure: builds a new plan
    from the index's facts.
    """
    if isinstance(batch, int):
        return plan
    from walkaudit._graph.dependence import SAMPLE, batch_symbols, classify

    kinds = classify(index, types, batch) if kinds is None else kinds
    batches = batch_symbols(index, types, batch)
    nodes, frontier = plan
    keep = set(nodes)
    made = {o for i in keep for o in index.writes[i]}
    todo, seen = list(frontier), set()
    while todo:
        name = todo.pop()
        if name in seen or name in made:
            continue
        seen.add(name)
        spec, producer = types.get(name), index.producers.get(name)
        if producer is None or index.graph.node[producer].op_type in RANDOM_OPS:
            continue  # a graph input, or drawn anew per run: fed by rows
        if kinds.get(name, SAMPLE) == SAMPLE and (spec is None or spec.shape is None or not isinstance(batch, str)
                                                  or (spec.shape[:1] and spec.shape[0] in batches)):
            continue  # per sample along axis 0 (or of unknown shape): fed by rows
        keep.add(producer)
        made.update(index.writes[producer])
        for read in index.reads[producer]:
            if read in index.static:
                keep.update(members(index.ancestor_bits([read])))  # constant-only nodes feeding it (none for weights)
            else:
                todo.append(read)
    if len(keep) == len(nodes):
        return plan
    made = {o for i in keep for o in index.writes[i]}
    reads = {n for i in keep for n in index.reads[i]}
    return sorted(keep), tuple(sorted(reads - made - index.static - {site}))


def suffix(model: onnx.ModelProto, site: str, output: str, types: dict[str, TensorSpec],
           plan: Plan | None = None, index: GraphIndex | None = None) -> Suffix:
    """The subgraph from `site` to `output` as a model whose inputs are the site and the frontier.

    `plan`: what `suffix_plan` gave for them, when the caller has it already; `index`: the model's `GraphIndex`,
    when the caller has one. Functional: returns a new model and never modifies `model`. Adds no names.
    """
    graph = model.graph
    if plan is None:
        plan = index_for(graph, index).suffix_plan(site, output)
    elif index is not None:
        index.check(graph)
    nodes, frontier = plan
    reads = _reads_of(graph, nodes, index)
    out = _copy_without_graph(model)
    out.graph.name = f"{graph.name or 'graph'}_after_{site}"
    out.graph.node.extend(graph.node[i] for i in nodes)
    out.graph.input.extend(_value_info(n, types) for n in (site, *frontier))
    out.graph.initializer.extend(_initializers_read(graph, reads, index))
    out.graph.output.extend(o for o in graph.output if o.name == output)
    return Suffix(out, site, frontier)


def weight_fed(sfx: Suffix) -> Suffix:
    """The suffix of a weight site (an initializer) reading the weight as a graph input only: fed the perturbed
    weight per run, and never served from the runtime's shared initializers, which are keyed by name. Functional."""
    out = _copy(sfx.model)
    kept = [t for t in out.graph.initializer if t.name != sfx.site]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    return Suffix(out, sfx.site, sfx.frontier)


def prefix(model: onnx.ModelProto, outputs, types: dict[str, TensorSpec],
           index: GraphIndex | None = None) -> onnx.ModelProto:
    """The part of the graph that computes `outputs` (and nothing after), with the model's inputs.

    A site's clean value and frontier come from this instead of the whole model: the suffix's work is not done
    twice, and nothing blocks the fusions of the rest of the graph. `index`: the model's `GraphIndex`, when the
    caller has one. Functional: returns a new model and never modifies `model`. Adds names only for a QDQ site's
    clean value (as `expose`).
    """
    graph = model.graph
    index = index_for(graph, index)
    outputs = list(outputs)
    nodes = members(index.ancestor_bits(outputs))
    reads = _reads_of(graph, nodes, index)
    out = _copy_without_graph(model)
    out.graph.name = f"{graph.name or 'graph'}_prefix"
    out.graph.node.extend(graph.node[i] for i in nodes)
    # old IR versions list initializers as inputs too: keep only those the prefix still holds
    out.graph.input.extend(i for i in graph.input if i.name not in index.initializers or i.name in reads)
    out.graph.initializer.extend(_initializers_read(graph, reads, index))
    inputs = set(index.inputs)
    out.graph.output.extend(_value_info(n, types) for n in dict.fromkeys(outputs) if n not in inputs)
    quantized.pre_activation(out.graph, outputs, names_in_use(out.graph))  # the QDQ sites' clean values, as `expose`
    return out


def _reads_of(graph: onnx.GraphProto, nodes: list[int], index: GraphIndex | None) -> set[str]:
    """Every value the given nodes read (subgraph captures included)."""
    if index is None:
        return {n for i in nodes for n in node_inputs(graph.node[i])}
    return {n for i in nodes for n in index.reads[i]}


def _initializers_read(graph: onnx.GraphProto, reads: set[str], index: GraphIndex | None) -> list[onnx.TensorProto]:
    """The initializers named in `reads`, in the graph's order, the large ones as stubs (`weights`)."""
    if index is None:
        return weights.stubbed(t for t in graph.initializer if t.name in reads)
    positions = index.initializer_positions
    return weights.stubbed(graph.initializer[k] for k in sorted(positions[n] for n in reads if n in positions))


@dataclass(frozen=True)
class Injection:
    """Where the noise terms of one site enter a rewritten graph."""

    site: str
    mul: str | None  # graph input holding the multiplicative term
    add: str | None  # graph input holding the additive term


def inject(
    model: onnx.ModelProto, sites: list[str], types: dict[str, TensorSpec], has_mul: bool, has_add: bool
) -> tuple[onnx.ModelProto, list[Injection]]:
    """Insert y' = y · mul + add after each site, with mul and add as new graph inputs.

    The site's producer is made to write a fresh `<site>.clean`; the new nodes write the site's own name, so every
    reader, graph outputs included, sees the noisy value and every output keeps its name. The term inputs are named
    `walkaudit.mul.<k>` and `walkaudit.add.<k>` where free; the `Injection`s say what they are.

    Functional: returns a new model (converted to opset 7 when older) and never modifies `model`.
    """
    out = _at_least_opset(model, _MIN_INJECT_OPSET)
    graph = out.graph
    names = _Names(graph)
    made_by = {o: i for i, node in enumerate(graph.node) for o in node.output if o}
    injections = [Injection(site, names.fresh(f"walkaudit.mul.{k}") if has_mul else None,
                            names.fresh(f"walkaudit.add.{k}") if has_add else None) for k, site in enumerate(sites)]
    after: dict[int, list[onnx.NodeProto]] = {}
    for inj in injections:
        producer = graph.node[made_by[inj.site]]
        clean = names.fresh(f"{inj.site}.clean")
        producer.output[list(producer.output).index(inj.site)] = clean
        new, value = [], clean
        if inj.mul:
            target = inj.site if not inj.add else names.fresh(f"{inj.site}.scaled")
            new.append(helper.make_node("Mul", [value, inj.mul], [target],
                                        name=names.fresh(f"walkaudit/mul/{inj.site}")))
            value = target
        if inj.add:
            new.append(helper.make_node("Add", [value, inj.add], [inj.site],
                                        name=names.fresh(f"walkaudit/add/{inj.site}")))
        after.setdefault(made_by[inj.site], []).extend(new)
        for term in (inj.mul, inj.add):
            if term:
                graph.input.append(_value_info_like(term, inj.site, types))
    _insert_after(graph, after)
    return out, injections


def _insert_after(graph: onnx.GraphProto, after: dict[int, list[onnx.NodeProto]],
                  first: Iterable[onnx.NodeProto] = ()) -> None:
    """Rebuild the node list of `graph` (a pass's own copy): `first`, then each node followed by `after[its index]`."""
    nodes = list(first)
    for i, node in enumerate(graph.node):
        nodes.append(node)
        nodes.extend(after.get(i, []))
    del graph.node[:]
    graph.node.extend(nodes)


def _noisy(y: str, mul: tuple[str, str] | None, add: tuple[str, str] | None, prefix: str, names: _Names,
           unit: str | None, noise=None) -> tuple[list[onnx.NodeProto], str]:
    """The noise model's nodes (`NoiseModel.graph`; default: the affine Gaussian family's) for y' from `y`, where
    `mul` and `add` are (σ, ε) value names or None, and the name of the result. A mul term reads the initializer
    `unit` (1 in y's type), which the caller provides. Every node and value is named by `names`, from `prefix`."""
    from walkaudit._noise.gaussian import Additive

    nodes: list[onnx.NodeProto] = []

    def node(op, inputs, wanted):
        name = names.fresh(f"{prefix}/{wanted}")
        nodes.append(helper.make_node(op, inputs, [name], name=name))
        return name

    out = (noise or Additive()).graph(y, mul, add, unit, node)
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
               has_add: bool, noise=None) -> FedNoise:
    """After each site of a model run on G tiled copies of a batch, y' = y·(1 + σm·ε1) + σa·ε2 per copy.

    The site's producer writes a fresh `<site>.clean` [G·N, ...]; it is viewed as [G, N, ...], the noise for the G
    levels is applied with ε [1, N, ...] broadcast over them (the host's arithmetic, `NoiseModel.host`, op for
    op), and the result is folded back to [G·N, ...] under the site's name, so every reader sees the noisy value.
    Float32 sites of known rank and opset ≥ 10 (Slice with inputs); `inject` serves the rest. The σ and ε inputs
    are named in the returned `FedNoise`.

    Functional: returns a new model and never modifies `model`.
    """
    out = _copy(model)
    graph = out.graph
    names = _Names(graph)
    made_by = {o: i for i, node in enumerate(graph.node) for o in node.output if o}
    sm = names.fresh("walkaudit.sigma_mul") if has_mul else None
    sa = names.fresh("walkaudit.sigma_add") if has_add else None
    zero, one = _int64_constant(names, "walkaudit.zero", [0]), _int64_constant(names, "walkaudit.one", [1])
    minus_one = _int64_constant(names, "walkaudit.minus_one", [-1])
    end = _int64_constant(names, "walkaudit.end", [np.iinfo(np.int64).max])
    inits = [zero, one, minus_one, end]
    unit = None
    if has_mul:
        unit = onnx.numpy_helper.from_array(np.array(1, np.float32), names.fresh("walkaudit.unit"))
        inits.append(unit)
    first: list[onnx.NodeProto] = []  # nodes that read graph inputs only: they go first

    def node(into, op, inputs, wanted, **attrs):
        name = names.fresh(wanted)
        into.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    levels = node(first, "Slice", [node(first, "Shape", [sm or sa], "walkaudit/sigma_shape"), zero.name, one.name],
                  "walkaudit/levels")
    after: dict[int, list[onnx.NodeProto]] = {}
    eps: list[tuple[str, str | None, str | None]] = []
    for i, site in enumerate(sites):
        shape_of_site = types[site].shape
        if shape_of_site is None:  # `strategies.choose` takes this path only for sites of known rank
            raise ModelError(f"cannot feed noise to {site}: its rank is unknown")
        rank = len(shape_of_site)
        lifted = _int64_constant(names, f"walkaudit.sigma_shape.{i}", [-1] + [1] * rank)
        inits.append(lifted)
        producer = graph.node[made_by[site]]
        clean = names.fresh(f"{site}.clean")
        producer.output[list(producer.output).index(site)] = clean
        new: list[onnx.NodeProto] = []
        shape = node(new, "Shape", [clean], f"{clean}/shape")
        rest = node(new, "Slice", [shape, one.name, end.name], f"{clean}/rest")
        grid = node(new, "Concat", [levels, minus_one.name, rest], f"{clean}/grid", axis=0)
        noisy = node(new, "Reshape", [clean, grid], f"{clean}/levels")
        terms = {}  # term -> (σ reshaped to broadcast over [G, N, ...], fed ε)
        for term, sigma in (("mul", sm), ("add", sa)):
            if sigma:
                e = names.fresh(f"walkaudit.eps_{term}.{i}")
                graph.input.append(helper.make_tensor_value_info(e, types[site].elem_type, [None] * (rank + 1)))
                terms[term] = (node(new, "Reshape", [sigma, lifted.name], f"{clean}/sigma_{term}"), e)
        applied, noisy = _noisy(noisy, terms.get("mul"), terms.get("add"), clean, names,
                                 unit.name if unit else None, noise)
        new.extend(applied)
        new.append(helper.make_node("Reshape", [noisy, shape], [site], name=names.fresh(f"walkaudit/fold/{site}")))
        after.setdefault(made_by[site], []).extend(new)
        eps.append((site, terms["mul"][1] if "mul" in terms else None, terms["add"][1] if "add" in terms else None))
    _insert_after(graph, after, first)
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
        return _copy(model)
    from onnx import version_converter

    try:
        return version_converter.convert_version(model, opset)
    except Exception as exc:  # noqa: BLE001 -- the converter raises many kinds; each becomes a ModelError
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
#: RandomNormalLike's seed is a float attribute (float32 in the proto): integers below 2**24 are exact in it.
SEED_LIMIT = 2**24


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


def graph_seeds(seed: int | None, seeds: tuple[int, int] | None) -> tuple[float, float]:
    """The RandomNormalLike seed attributes of ε_mul and ε_add.

    `seeds=(seed_mul, seed_add)`: each must be an integer in [0, 2**24), where float32 (the attribute's type) holds
    it exactly, so two different seeds never collide. `seed` (the older form, unchecked): 2·seed and 2·seed + 1.
    Raises ValueError when both are given or a seed is out of range.
    """
    if seeds is None:
        base = 0 if seed is None else seed
        return float(2 * base), float(2 * base + 1)
    if seed is not None:
        raise ValueError("give graph_noise seed= or seeds=, not both")
    if len(seeds) != 2:
        raise ValueError(f"seeds must be (seed_mul, seed_add), got {seeds!r}")
    for value in seeds:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < SEED_LIMIT:
            raise ValueError(f"graph seeds must be integers in [0, 2**24) (exact in float32), got {value!r}")
    return float(seeds[0]), float(seeds[1])


def batch_dimension(inputs: list[TensorSpec]):
    """Dimension 0 of the model's first input: its batch dimension (a symbol when dynamic), or None."""
    return inputs[0].shape[0] if inputs and inputs[0].shape else None


def symbol_axis(spec: TensorSpec | None, batch) -> int | None:
    """The axis where a value's inferred shape has the batch dimension, when it has it exactly once; else None.
    `batch`: the batch's symbol (dimension 0 of the model's inputs), or all its names (`LoadedModel.batch_names`:
    shape inference may name it anew, `unk__1` inside a ViT's attention after the class token). Sequence-first
    attention (torch's MultiheadAttention) and LSTM outputs hold the samples along axis 1."""
    names = frozenset({batch}) if isinstance(batch, str) else batch
    if spec is None or spec.shape is None or not isinstance(names, frozenset) or not names:
        return None
    axes = [a for a, d in enumerate(spec.shape) if isinstance(d, str) and d in names]
    return axes[0] if len(axes) == 1 else None


def sample_axis(spec: TensorSpec | None, batch) -> int:
    """The axis of a value that holds the samples (`symbol_axis`), else 0."""
    axis = symbol_axis(spec, batch)
    return 0 if axis is None else axis


def graph_noise(sfx: Suffix, types: dict[str, TensorSpec], has_mul: bool, has_add: bool, seed: int | None = None,
                fed: bool = False, seeds: tuple[int, int] | None = None, noise=None, axis: int = 0,
                tile: bool = True) -> GraphNoise:
    """Prepend noise to a suffix: y' = y·(1 + σm·ε1) + σa·ε2 for G levels at once.

    ε is one array [1, N, ...] per run, broadcast over the G levels (common random numbers); the result
    [G, N, ...] is reshaped to [G·N, ...], and every frontier value is tiled the same way. The arithmetic is the
    host's (`NoiseModel.host`), op for op, so both give the same values. The suffix's inputs are renamed to fresh
    `<name>.clean` names and the new σ and ε inputs get fresh names too: the returned `GraphNoise` names them all.

    - `fed=False`: RandomNormalLike draws ε (opsets 10–21; the noise model's `graph_draw`, e.g. RandomUniformLike).
      With a `seed` attribute the generator is stateful per session: each run draws anew, a new session replays.
      `seeds=(seed_mul, seed_add)` are the attributes of ε1 and ε2, integers in [0, 2**24) (ValueError otherwise);
      the older `seed=` gives them 2·seed and 2·seed + 1, which float32 holds exactly only while
      2·seed + 1 < 2**24 (`graph_seeds`).
    - `fed=True`: ε is a graph input, drawn by the host (any opset from 10). onnxruntime then does the apply and
      the tiling in its own threads and arena.

    `noise`: the NoiseModel whose nodes apply the noise (`NoiseModel.graph`; default the affine Gaussian family's).
    `axis`: the site's batch axis (`sample_axis`); the G levels are folded into it, level-major ([T, G·N, D] for a
    sequence-first site), as the frontier, which holds the samples along axis 0 (`per_sample`), is tiled.
    `tile=False`: one level per run (G = 1), the frontier read as it is fed: no copy of it per run (onnxruntime's
    Expand copies even to the same shape), the same numbers.

    Functional: returns a new model and never modifies `sfx.model`.
    """
    seed_mul, seed_add = graph_seeds(seed, seeds)
    model, site = sfx.model, sfx.site
    elem = types[site].elem_type
    names = _Names(model.graph)
    nodes: list[onnx.NodeProto] = []
    inputs: list[onnx.ValueInfoProto] = []
    one, minus_one = _int64_constant(names, "walkaudit.one", [1]), _int64_constant(names, "walkaudit.minus_one", [-1])
    end = _int64_constant(names, "walkaudit.end", [np.iinfo(np.int64).max])
    zero = _int64_constant(names, "walkaudit.zero", [0])
    inits = [one, minus_one, end, zero]

    def node(op, inputs, wanted, **attrs):
        name = names.fresh(wanted)
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def lifted(value: str) -> tuple[str, str]:
        """value [N, ...] as [1, N, ...], and the shape [-1, ...] that folds a [G, N, ...] back to [G·N, ...]."""
        shape = node("Shape", [value], f"{value}/shape")
        rest = node("Slice", [shape, one.name, end.name], f"{value}/rest")
        folded = node("Concat", [minus_one.name, rest], f"{value}/folded", axis=0)
        lift = node("Concat", [one.name, shape], f"{value}/lift", axis=0)
        return node("Reshape", [value, lift], f"{value}/lifted"), folded

    def epsilon(term: str, seed_: float) -> str:
        if not fed:
            op, attrs = noise.graph_draw if noise is not None and noise.graph_draw else ("RandomNormalLike", {})
            return node(op, [y], f"walkaudit/eps_{term}", dtype=elem, seed=seed_, **attrs)
        name = names.fresh(f"walkaudit.eps_{term}")
        assert rank is not None  # fed ε needs the rank: checked known below, before any ε is made
        inputs.append(helper.make_tensor_value_info(name, elem, [None] * (rank + 1)))
        return name

    site_shape = types[site].shape
    rank = len(site_shape) if site_shape is not None else None
    if fed and rank is None:
        raise ModelError(f"cannot feed noise to {site}: its rank is unknown")
    renamed = {site: names.fresh(f"{site}.clean"), **{f: names.fresh(f"{f}.clean") for f in sfx.frontier if tile}}
    clean = renamed[site]
    y, folded = lifted(clean)
    sm = names.fresh("walkaudit.sigma_mul") if has_mul else None
    sa = names.fresh("walkaudit.sigma_add") if has_add else None
    mul = add = None  # (σ, ε) per term
    unit = None
    if sm:
        mul = (sm, epsilon("mul", seed_mul))
        unit = names.fresh("walkaudit.unit")
        inits.append(onnx.numpy_helper.from_array(np.array(1, helper.tensor_dtype_to_np_dtype(elem)), unit))
    if sa:
        add = (sa, epsilon("add", seed_add))
    applied, noisy = _noisy(y, mul, add, "walkaudit", names, unit, noise)
    nodes.extend(applied)
    if axis:  # [G, ..., N, ...] -> [..., G, N, ...] -> [..., G·N, ...]
        assert rank is not None  # `sample_axis` finds an axis other than 0 only in a shape it knows
        shape = node("Shape", [clean], f"{clean}/shape_at_axis")
        levels_first = node("Concat", [minus_one.name, shape], f"{clean}/levels_first", axis=0)
        noisy = node("Reshape", [noisy, levels_first], "walkaudit/levels")  # σ may carry more unit axes than y
        order = [*range(1, axis + 1), 0, *range(axis + 1, rank + 1)]
        noisy = node("Transpose", [noisy], "walkaudit/levels_to_batch_axis", perm=order)
        before, after = _int64_constant(names, "walkaudit.axis", [axis]), _int64_constant(names, "walkaudit.after",
                                                                                          [axis + 1])
        inits.extend([before, after])
        folded = node("Concat", [node("Slice", [shape, zero.name, before.name], f"{clean}/before_axis"), minus_one.name,
                                 node("Slice", [shape, after.name, end.name], f"{clean}/after_axis")],
                      f"{clean}/folded_at_axis", axis=0)
    nodes.append(helper.make_node("Reshape", [noisy, folded], [site], name=names.fresh("walkaudit/fold")))
    if tile:
        levels = node("Shape", [sm or sa], "walkaudit/levels")
        count = node("Slice", [levels, zero.name, one.name], "walkaudit/count")
    for f in sfx.frontier if tile else ():
        f_clean = renamed[f]
        f_lifted, f_folded = lifted(f_clean)
        shape = node("Shape", [f_lifted], f"{f_clean}/lifted_shape")
        rest = node("Slice", [shape, one.name, end.name], f"{f_clean}/tail")
        target = node("Concat", [count, rest], f"{f_clean}/target", axis=0)
        tiled = node("Expand", [f_lifted, target], f"{f_clean}/tiled")
        nodes.append(helper.make_node("Reshape", [tiled, f_folded], [f], name=names.fresh(f"walkaudit/fold/{f}")))

    out = _copy(model)
    graph = out.graph
    for vi in graph.input:
        vi.name = renamed.get(vi.name, vi.name)
    for name in (sm, sa):
        if name:
            graph.input.append(helper.make_tensor_value_info(name, elem, None))
    graph.input.extend(inputs)
    _insert_after(graph, {}, nodes)
    graph.initializer.extend(inits)
    # fed: the ε inputs; else internal values, not inputs
    eps_mul, eps_add = (mul[1] if mul else None, add[1] if add else None) if fed else (None, None)
    return GraphNoise(out, clean, tuple(renamed.get(f, f) for f in sfx.frontier), sm, sa, eps_mul, eps_add)
