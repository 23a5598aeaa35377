"""What each value of a graph depends on, by dataflow from the inputs: per sample, the batch's shape, or nothing.

Packed σ levels feed a suffix G tiled copies of a batch. A value the suffix reads from before the site may be fed
tiled only when each of its rows is a function of its own sample: a value derived from the batch's *size*
(`Range(0, N)` from `Shape(x)`, a `ConstantOfShape`, ...) holds numbers that describe the untiled batch, and tiled,
every level would read level 0's rows (GPT-2's sequence classifier picks its last token with
`GatherND(logits, Concat(Range(N), argmax))`). Such values must be recomputed inside the packed program.

The classification (`classify`), derived from the graph rather than from which axis looks like the batch:
- "constant": no graph input reaches it (`GraphIndex.static`).
- "shape": it reads the inputs only through their shapes (Shape, Size, then any op on such values: Gather, Concat,
  Range, ConstantOfShape, ...).
- "sample": it reads real input data, row by row.
- "indexed": it reads real input data and, through a data input (not a Reshape's target, a Slice's bounds or
  another operand that only says how to lay data out), a shape value that holds the batch size N.

A shape value "holds N" where its numbers come from the batch axis of a value's shape: `Shape(x)` is tracked entry
by entry (the batch axis is where x's inferred shape carries the inputs' batch symbol or another name of it,
`batch_symbols`, else axis 0), through Gather,
Slice, Concat, Squeeze, Unsqueeze, Cast and Identity with constant indices; any other op on it holds N when any of
its inputs does. A constant laid out in such a shape (ConstantOfShape, Expand, Tile: the zeros of an attention
mask [N, T]) holds only the constant, but any op computing on its rows (CumSum: 1, 2, ..., N) holds N. The
sequence length T of `Range(0, T)` (positions) does not hold N, so a position embedding added to token embeddings
stays per sample. Pure: facts of one index, types and batch symbol.

`batch_symbols`: the dimension symbols that shape inference gave the batch under other names. ONNX shape inference
names a dimension it cannot merge anew (`unk__1`): a ViT's class token, expanded to the batch by shape arithmetic and
concatenated to the patch tokens, gives the whole residual stream a batch dimension `unk__1`; a Concat's inputs and
output agree on every axis but the one it joins, so those symbols are the batch. So do a Reshape's sides where each
has one symbol and the rest match (`view(-1, T)`), and the output of a broadcasting op where an input has the batch
(BERT's embeddings: word + token type + position).

Constants laid out in the batch's shape stay "shape" values that do not hold N as long as every op on them works
element by element, picks by index or moves (`_ROWWISE`): an attention mask `(1 - ones[N, T]) * min` does not
hold N, its rows only count N (`sized`), and a value with one number everywhere (`uniform`, from ConstantOfShape)
does not hold N whatever indices pick from it — Hugging Face's masks gather `ones[N·T]` at `Range(N)·T + t`.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from walkaudit._graph.index import RANDOM_OPS, GraphIndex
from walkaudit._graph.ops import ELEMENTWISE

CONSTANT, SHAPE, SAMPLE, INDEXED = "constant", "shape", "sample", "indexed"

#: Inputs (by position) that only say how to lay data out: their numbers never become the output's numbers.
LAYOUT_INPUTS: dict[str, frozenset[int]] = {
    "Reshape": frozenset({1}), "Expand": frozenset({1}), "Tile": frozenset({1}), "Slice": frozenset({1, 2, 3, 4}),
    "Pad": frozenset({1, 3}), "Resize": frozenset({1, 2, 3}), "Upsample": frozenset({1}),
    "Squeeze": frozenset({1}), "Unsqueeze": frozenset({1}), "Split": frozenset({1}), "TopK": frozenset({1}),
    "CumSum": frozenset({1}), "ReduceSum": frozenset({1}), "ReduceMean": frozenset({1}),
    "ReduceMax": frozenset({1}), "ReduceMin": frozenset({1}), "ReduceProd": frozenset({1}),
    "ReduceL1": frozenset({1}), "ReduceL2": frozenset({1}), "ReduceLogSumExp": frozenset({1}),
    "ReduceSumSquare": frozenset({1}), "ReduceLogSum": frozenset({1}),
}
#: Longest vector tracked entry by entry (a shape vector has one entry per axis; longer ones count as a whole).
SHAPE_ENTRIES = 64
#: Ops that lay a constant out in a given shape: their numbers are the constant's, whatever the shape.
_FILLS = frozenset({"ConstantOfShape", "Expand", "Tile"})
#: Ops that move shape-vector entries without computing on them (tracked entry by entry).
_MOVES = frozenset({"Gather", "Slice", "Concat", "Squeeze", "Unsqueeze", "Cast", "Identity"})
#: Ops whose output numbers are all taken from their first input: laid out, moved or picked by index.
_SELECTS = frozenset({"Gather", "GatherElements", "GatherND", "Reshape", "Flatten", "Squeeze", "Unsqueeze",
                      "Transpose", "Slice", "Expand", "Tile", "Cast", "Identity"})
#: Ops whose every output element is computed from the elements at its own position (broadcast), picked by index
#: from a table, or moved: on a constant laid out in [N, ...] they give numbers that still do not hold N (a mask
#: `(1 - ones[N, T]) * -inf`, token-type embeddings `Gather(table, zeros[N, T])`), rows that still count N.
_ROWWISE = ELEMENTWISE | _SELECTS | {"Concat"}


def classify(index: GraphIndex, types: dict, batch) -> dict[str, str]:
    """Every value the graph's nodes write, and its inputs, by what it depends on (see the module docstring)."""
    kinds: dict[str, str] = {n: SAMPLE for n in index.inputs if n not in index.initializers}
    batches = batch_symbols(index, types, batch)
    holds: dict[str, list[bool] | bool] = {}  # shape values: per entry (or as a whole), whether it holds N
    sized: set[str] = set()  # shape values whose rows count N (a constant expanded to [N, ...])
    uniform: set[str] = set()  # shape values with one number everywhere (ConstantOfShape, and what selects from it)
    for i in index.order:
        node, writes = index.graph.node[i], index.writes[i]
        if all(w in index.static for w in writes):
            continue
        if node.op_type in ("Shape", "Size"):
            x = node.input[0]
            for w in writes:
                kinds[w] = SHAPE
                holds[w] = True if node.op_type == "Size" else _shape_entries(node, types.get(x), batches)
            continue
        if node.op_type in RANDOM_OPS:
            kinds.update((w, SAMPLE) for w in writes)
            continue
        layout = LAYOUT_INPUTS.get(node.op_type, frozenset())
        inputs = set(node.input)
        data = [n for k, n in enumerate(node.input) if n and n not in index.static and k not in layout]
        data += [n for n in index.reads[i] if n not in inputs and n not in index.static]  # subgraph captures
        sample = any(kinds.get(n, SAMPLE) in (SAMPLE, INDEXED) for n in data)
        carries = any(kinds.get(n) == INDEXED or (kinds.get(n) == SHAPE and _any(holds.get(n, True)))
                      for n in data)
        if sample:
            kind = INDEXED if carries else SAMPLE
            kinds.update((w, kind) for w in writes)
            continue
        if node.op_type == "ConstantOfShape" or (node.op_type in _SELECTS and node.input[0] in uniform):
            # one number everywhere, wherever the indices pick it (an attention mask of ones gathered per row by
            # indices counted from Range(N)): its numbers do not hold N; its rows may count N
            uniform.update(writes)
            kinds.update((w, SHAPE) for w in writes)
            holds.update((w, False) for w in writes)
            if any(n in sized for n in index.reads[i]) or _holds(index.reads[i], kinds, holds):
                sized.update(writes)
            continue
        if node.op_type in _FILLS and not any(kinds.get(n) in (SAMPLE, INDEXED) for n in index.reads[i]):
            # a value laid out in a shape: its numbers are its data input's (a constant's: they do not hold N), its
            # rows may count N (`sized`)
            kinds.update((w, SHAPE) for w in writes)
            holds.update((w, _holds(node.input[:1], kinds, holds)) for w in writes)
            if _holds(index.reads[i], kinds, holds):
                sized.update(writes)
            continue
        entries = _moved(node, index, holds) if node.op_type in _MOVES else None
        # any other op on shape values: its numbers hold N where an input's numbers do, or where it computes across
        # the rows of an N-sized value (CumSum over ConstantOfShape([N]) counts to N); element by element it does not
        rows = any(n in sized for n in index.reads[i])
        if rows and node.op_type in _ROWWISE:
            sized.update(writes)
        counts = (carries or (rows and node.op_type not in _ROWWISE)
                  or (not data and _holds(index.reads[i], kinds, holds)))  # Expand(constant, Shape(x))
        for w in writes:
            kinds[w] = SHAPE
            holds[w] = entries if entries is not None else counts
    return kinds


def batch_symbols(index: GraphIndex, types: dict, batch) -> frozenset:
    """The symbols equal to the batch symbol `batch`: itself, those a Concat equates with it (its inputs and output
    have the same dimension on every axis but the joined one) or a Reshape (`_reshaped`), and those an elementwise
    op or MatMul gives an axis where an input has the batch (broadcasting meets N with N or 1). Empty when `batch`
    is not a symbol."""
    if not isinstance(batch, str):
        return frozenset()
    parent: dict[str, str] = {}

    def root(a: str) -> str:
        while parent.get(a, a) != a:
            a = parent[a]
        return a

    def union(a: str, b: str) -> None:
        parent.setdefault(a, a)
        parent.setdefault(b, b)
        parent[root(b)] = root(a)

    for i in index.order:
        node = index.graph.node[i]
        if node.op_type in ("Reshape", "Flatten"):
            pair = _reshaped(types.get(node.input[0]), types.get(node.output[0]))
            if pair is not None:
                union(*pair)
            continue
        if node.op_type != "Concat":
            continue
        known = [types[n].shape if n in types else None for n in (*node.input, *node.output)]
        shapes = [s for s in known if s is not None]
        if len(shapes) < len(known) or len({len(s) for s in shapes}) != 1:
            continue
        rank = len(shapes[0])
        joined = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0) % max(rank, 1)
        for axis in range(rank):
            dims = {s[axis] for s in shapes}
            if axis == joined or not all(isinstance(d, str) for d in dims):
                continue
            first, *rest = dims
            for other in rest:
                union(first, other)
    same = root(batch)
    batches = {batch, *(d for d in parent if root(d) == same)}
    for i in index.order:  # broadcasting: where an input's axis is the batch, so is the output's (N or 1 meets N)
        node = index.graph.node[i]
        if node.op_type not in ELEMENTWISE and node.op_type != "MatMul":
            continue
        out = types[node.output[0]].shape if node.output[0] in types else None
        if not out:
            continue
        skip = 2 if node.op_type == "MatMul" else 0  # MatMul broadcasts its leading axes only
        for name in node.input:
            shape = types[name].shape if name in types else None
            if not shape or len(shape) <= skip:
                continue
            for back in range(skip + 1, min(len(shape), len(out)) + 1):
                ours, theirs = out[-back], shape[-back]
                if theirs in batches and isinstance(ours, str) and ours not in batches:
                    batches.update(d for d in (ours, *parent) if root(d) == root(ours) or d == ours)
    return frozenset(batches)


def _reshaped(before, after) -> tuple[str, str] | None:
    """The two symbols a Reshape equates: where each side has one symbol and the same product of known dimensions
    (GPT-2's `input_ids.view(-1, T)`: [batch, 32] → [unk__0, 32]), the element counts make them equal."""
    if before is None or after is None or before.shape is None or after.shape is None:
        return None
    sides = []
    for shape in (before.shape, after.shape):
        names = [d for d in shape if isinstance(d, str)]
        if len(names) != 1 or any(d is None for d in shape):
            return None
        sides.append((names[0], int(np.prod([d for d in shape if isinstance(d, int)], dtype=np.int64))))
    (a, known_a), (b, known_b) = sides
    return (a, b) if known_a == known_b and a != b else None


def _any(entries: list[bool] | bool) -> bool:
    return entries if isinstance(entries, bool) else any(entries)


def _holds(names, kinds: dict, holds: dict) -> bool:
    """Whether any of these values is a shape value that holds N."""
    return any(kinds.get(n) == SHAPE and _any(holds.get(n, True)) for n in names)


def _shape_entries(node: onnx.NodeProto, spec, batches: frozenset) -> list[bool] | bool:
    """Per entry of Shape(x), whether it is x's batch axis (where x's shape has one of `batches`, the symbols of
    the batch); True (all of it) when x's rank is unknown."""
    if spec is None or spec.shape is None:
        return True
    rank = len(spec.shape)
    axes = [a for a, d in enumerate(spec.shape) if d in batches]
    axis = axes[0] if len(axes) == 1 else 0
    entries = [a == axis for a in range(rank)]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    start, end = attrs.get("start", 0), attrs.get("end", rank)
    return entries[slice(start, end)]


def _constant(index: GraphIndex, name: str) -> np.ndarray | None:
    """An initializer's or a Constant node's value, else None."""
    if name in index.initializer_positions:
        return numpy_helper.to_array(index.graph.initializer[index.initializer_positions[name]])
    producer = index.producers.get(name)
    if producer is None:
        return None
    node = index.graph.node[producer]
    if node.op_type == "Constant" and len(node.attribute) == 1:
        (attr,) = node.attribute
        value = helper.get_attribute_value(attr)
        return numpy_helper.to_array(value) if attr.type == onnx.AttributeProto.TENSOR else np.array(value)
    return None


def _entries(index: GraphIndex, name: str, holds: dict) -> list[bool] | None:
    """The per-entry flags of a shape value, or of a constant (none holds N); None when not known entry by entry."""
    if name in holds:
        flags = holds[name]
        return None if isinstance(flags, bool) else flags
    if name in index.initializer_positions:  # its size from its dims: a weight is never read for this
        size = int(np.prod(index.graph.initializer[index.initializer_positions[name]].dims, dtype=np.int64))
        return None if size > SHAPE_ENTRIES else [False] * size
    value = _constant(index, name)
    return None if value is None or value.size > SHAPE_ENTRIES else [False] * int(value.size)


def _moved(node: onnx.NodeProto, index: GraphIndex, holds: dict) -> list[bool] | None:
    """The per-entry flags after an op that moves entries (constant indices), or None (then: any input's)."""
    op = node.op_type
    first = _entries(index, node.input[0], holds)
    if first is None:
        return None
    if op in ("Squeeze", "Unsqueeze", "Cast", "Identity"):
        return first
    if op == "Concat":
        parts = [_entries(index, n, holds) for n in node.input]
        known = [p for p in parts if p is not None]
        return [f for p in known for f in p] if len(known) == len(parts) else None
    if op == "Gather":
        at = _constant(index, node.input[1])
        if at is None or at.ndim > 1:
            return None
        try:
            return [first[int(k)] for k in np.atleast_1d(at)]
        except IndexError:
            return None
    # Slice: opset ≥ 10 bounds as inputs (one axis, the vector's own), or the attributes of older opsets
    bounds = [_constant(index, n) if n else None for n in node.input[1:5]]
    start, end = (bounds + [None, None])[:2]
    if len(node.input) >= 3 and start is not None and end is not None:
        steps = bounds[3] if len(bounds) > 3 and bounds[3] is not None else [1]
        return first[slice(int(start[0]), int(end[0]), int(np.atleast_1d(steps)[0]))]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if "starts" in attrs and "ends" in attrs:
        return first[slice(int(attrs["starts"][0]), int(attrs["ends"][0]))]
    return None
