"""Load and validate an ONNX classifier; find its inputs and its class output.

Nothing here runs the model. The user's file is only ever read.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from walkaudit._loading import quantized
from walkaudit.errors import ModelError, option

#: onnx tensor element types that count as floating point (sites, class scores).
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}
INT_TYPES = {TensorProto.INT64, TensorProto.INT32}

# onnxruntime 1.2x/1.3x loads IR versions up to 11..13; onnx 1.23 writes 14 by default without
# needing any IR-14 feature. We lower the IR version of our in-memory copy when nothing needs more.
_MAX_IR_SAFE = 10


@dataclass(frozen=True)
class TensorSpec:
    """Name, element type and shape (ints, symbolic names or None) of a graph value."""

    name: str
    elem_type: int
    shape: tuple | None

    @property
    def dtype(self) -> np.dtype:
        return helper.tensor_dtype_to_np_dtype(self.elem_type)

    @property
    def is_float(self) -> bool:
        return self.elem_type in FLOAT_TYPES

    def describe(self) -> str:
        if self.elem_type == TensorProto.UNDEFINED:
            return "non-tensor (sequence or map)"
        dims = "?" if self.shape is None else "[" + ", ".join("?" if d is None else str(d) for d in self.shape) + "]"
        return f"{TensorProto.DataType.Name(self.elem_type).lower()} {dims}"


@dataclass(frozen=True)
class ClassOutput:
    """The output that carries the class decision: scores [N, C], labels [N], or one number per sample of a binary
    classifier ([N] or [N, 1]): a logit (class 1 when > 0) or a probability (class 1 when > 0.5). `per_token`:
    scores [N, T, C], a class per position (a tagger, a language model's next token), C last."""

    name: str
    kind: str  # "scores" | "label" | "binary-logit" | "binary-probability"
    num_classes: int | None
    per_token: bool = False


#: Parts of an output's name that tell class scores among several candidates ("logits", "probabilities", ...).
SCORE_NAMES = ("prob", "logit", "score")

#: ClassOutput kinds of binary classifiers with one number per sample, and their decision thresholds.
BINARY_THRESHOLDS = {"binary-logit": 0.0, "binary-probability": 0.5}

#: Ops that only move or relabel values: an output computed from the inputs by these alone is a pass-through.
_PASS_THROUGH = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast", "CastLike", "Transpose",
                 "Expand", "Shape", "Size", "Constant", "ConstantOfShape", "Slice", "Gather", "Concat", "Split"}
#: Ops whose output counts as the model's own computation when ranking candidate class outputs.
_LAYER_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "MatMulInteger", "QLinearConv", "QLinearMatMul", "Einsum"}
_SHAPE_ONLY = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast", "CastLike"}


class _Graph:
    """What the choice of a class output needs to know about the main graph: who writes each value, and which
    values are graph inputs or constants."""

    def __init__(self, graph: onnx.GraphProto):
        self.producer = {o: n for n in graph.node for o in n.output if o}
        self.inputs = {i.name for i in graph.input}
        self.static = {i.name for i in graph.initializer}
        self._ancestors: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:  # constant-only values (Constant nodes and what only they feed)
            if all(i in self.static for i in node.input if i):
                self.static.update(o for o in node.output if o)

    def ancestors(self, name: str) -> list[onnx.NodeProto]:
        if name in self._ancestors:
            return self._ancestors[name]
        seen, stack, nodes = set(), [name], []
        while stack:
            node = self.producer.get(stack.pop())
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            nodes.append(node)
            stack.extend(i for i in node.input if i)
        self._ancestors[name] = nodes
        return nodes

    def computed(self, name: str) -> bool:
        """Does the model compute this value from its inputs (not a graph input, a constant or a pass-through)?"""
        if name in self.inputs or name in self.static or name not in self.producer:
            return False
        return any(n.op_type not in _PASS_THROUGH for n in self.ancestors(name))

    def layered(self, name: str) -> bool:
        """Is a Conv/Gemm/MatMul-like layer or an ai.onnx.ml operator among the value's ancestors?"""
        return any(n.op_type in _LAYER_OPS or n.domain == "ai.onnx.ml" for n in self.ancestors(name))

    def binary_kind(self, name: str) -> str:
        """A one-number output read through shape-only ops from a Sigmoid is a probability, else a logit."""
        node = self.producer.get(name)
        while node is not None and node.op_type in _SHAPE_ONLY and node.input:
            node = self.producer.get(node.input[0])
        return "binary-probability" if node is not None and node.op_type == "Sigmoid" else "binary-logit"


@dataclass
class LoadedModel:
    """A validated model in memory plus what walkaudit needs to know about it."""

    proto: onnx.ModelProto
    path: str | None
    sha256: str | None
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    types: dict[str, TensorSpec] = field(repr=False)
    class_output: ClassOutput = None  # type: ignore[assignment]
    notes: list[str] = field(default_factory=list)  # what loading could not do (the report's runtime notes)

    @property
    def opset(self) -> int:
        return default_opset(self.proto)

    @property
    def producer(self) -> str:
        p = self.proto
        return f"{p.producer_name} {p.producer_version}".strip()

    @property
    def batch_size(self) -> int | None:
        """The fixed batch size of the model's inputs, or None when dimension 0 is dynamic."""
        fixed = {s.shape[0] for s in self.inputs if s.shape and isinstance(s.shape[0], int)}
        return fixed.pop() if len(fixed) == 1 else None

    @functools.cached_property
    def batch_names(self) -> frozenset:
        """The batch's dimension symbols: dimension 0 of the first input and the names shape inference gave it
        besides (`dependence.batch_symbols`: `unk__1` after a ViT's class token). Empty for a fixed or unknown
        batch. Computed once per model."""
        from walkaudit._graph.dependence import batch_symbols
        from walkaudit._graph.index import GraphIndex
        from walkaudit._graph.passes import batch_dimension

        return batch_symbols(GraphIndex(self.proto.graph), self.types, batch_dimension(self.inputs))


def default_opset(proto: onnx.ModelProto) -> int:
    for op in proto.opset_import:
        if op.domain in ("", "ai.onnx"):
            return op.version
    return 0


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_external_data(proto: onnx.ModelProto, folder: Path) -> None:
    """Refuse external-data locations outside the model's folder (CVE-2024-27318 class) or missing."""
    root = folder.resolve()
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        target = (root / location).resolve()
        if os.path.isabs(location) or ".." in Path(location).parts or root not in (target, *target.parents):
            raise ModelError(f"external data of tensor '{tensor.name}' points outside the model's folder: {location!r}")
        if not target.is_file():
            raise ModelError(f"external data file of tensor '{tensor.name}' is missing: {location}")


def read_model(source: str | os.PathLike | onnx.ModelProto) -> tuple[onnx.ModelProto, str | None, str | None]:
    """Read a model file (or take a ModelProto) with its external data. Returns (proto, path, sha256)."""
    if isinstance(source, onnx.ModelProto):
        external = next((t.name for t in onnx.external_data_helper._get_all_tensors(source)
                         if t.data_location == TensorProto.EXTERNAL), None)
        if external is not None:  # onnxruntime would resolve the location against the working directory
            raise ModelError(f"tensor '{external}' of the model refers to external data; pass the model's path, or "
                             "a model loaded with its data (onnx.load(path))")
        proto = onnx.ModelProto()
        proto.CopyFrom(source)
        return proto, None, None
    path = Path(source)
    if not path.exists():
        raise ModelError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelError(f"model path is not a file: {path}")
    if path.stat().st_size == 0:
        raise ModelError(f"model file is empty: {path}")
    what = _other_format(path)
    if what:
        raise ModelError(f"{path} is not an ONNX model: {what}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise ModelError(f"{path} is not a valid ONNX model ({type(exc).__name__}: {_first_line(exc)})") from None
    if not proto.HasField("graph") or not proto.graph.node:
        raise ModelError(f"{path} is not an ONNX model with a graph (no nodes found)")
    _check_external_data(proto, path.parent)
    try:
        onnx.load_external_data_for_model(proto, str(path.parent))
    except Exception as exc:
        raise ModelError(f"cannot read external data of {path}: {_first_line(exc)}") from None
    return proto, str(path), _sha256(path)


#: export advice for a PyTorch file given as the model
TORCH_HINT = ("this looks like a PyTorch file (torch.save): export it with torch.onnx.export(model, example_input, "
              "'model.onnx') and audit that")


def _other_format(path: Path) -> str | None:
    """What a model file is instead of ONNX, by its first bytes (an ONNX file is protobuf, which never starts with
    these): a PyTorch file (a zip holding data.pkl, or a pickle), a NumPy file, a JSON document; None otherwise."""
    import zipfile

    try:
        with path.open("rb") as f:
            head = f.read(8)
    except OSError:
        return None
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (OSError, zipfile.BadZipFile):
            names = []
        if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return TORCH_HINT
        if names and all(n.endswith(".npy") for n in names):
            return "it is a NumPy .npz archive (data goes to --data)"
        return "it is a zip archive"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return TORCH_HINT + " (or another Python pickle)"
    if head.startswith(b"\x93NUMPY"):
        return "it is a NumPy .npy array (data goes to --data)"
    if head.lstrip()[:1] in (b"{", b"["):
        return "it looks like a JSON document (a walkaudit report is read by 'walkaudit compare' or 'walkaudit plot')"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def _spec(vi: onnx.ValueInfoProto) -> TensorSpec | None:
    if not vi.type.HasField("tensor_type"):
        return None
    tt = vi.type.tensor_type
    shape = None
    if tt.HasField("shape"):
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
    return TensorSpec(vi.name, tt.elem_type, shape)


#: Initializers larger than this are left out of the copy that the checker and shape inference see: both serialize
#: the whole model, which costs seconds for zoo-sized weights (and fails beyond 2 GB). Shape tensors are tiny.
SKELETON_BYTES = 1 << 16


def copy_fields(src, dst, skip: str | None = None) -> None:
    """Copy every set field of protobuf message `src` into the empty `dst`, except the field named `skip`."""
    for desc, value in src.ListFields():
        if desc.name == skip:
            continue
        repeated = getattr(desc, "is_repeated", None)  # protobuf >= 5.28; `label` is gone from upb in 6.x
        if repeated is None:
            repeated = desc.label == desc.LABEL_REPEATED
        if repeated:
            getattr(dst, desc.name).extend(value)
        elif desc.message_type is not None:
            getattr(dst, desc.name).CopyFrom(value)
        else:
            setattr(dst, desc.name, value)


def _tensor_bytes(t: onnx.TensorProto) -> int:
    """Size by the declared shape (8 bytes an element at most); reading raw_data's length would copy it."""
    return int(np.prod(t.dims, dtype=np.int64)) * 8


def skeleton(proto: onnx.ModelProto, limit: int = SKELETON_BYTES) -> onnx.ModelProto:
    """The model with its large initializers turned into typed graph inputs: what checking and shape inference need,
    without the weights. (onnxruntime still checks that every initializer's data fits its shape.)"""
    out = onnx.ModelProto()
    copy_fields(proto, out, skip="graph")
    g = out.graph
    copy_fields(proto.graph, g, skip="initializer")
    declared = {i.name for i in g.input}
    for t in proto.graph.initializer:
        if _tensor_bytes(t) <= limit or t.data_location == TensorProto.EXTERNAL:
            g.initializer.append(t)
        elif t.name not in declared:
            g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return out


def value_types(proto: onnx.ModelProto, bare: onnx.ModelProto | None = None,
                notes: list[str] | None = None) -> dict[str, TensorSpec]:
    """Type and shape of every value of the main graph that shape inference can tell. `bare`: its skeleton."""
    bare = skeleton(proto) if bare is None else bare
    try:
        inferred = onnx.shape_inference.infer_shapes(bare, data_prop=True)
    except Exception as exc:  # inference gives up on some graphs; the declared types still serve
        inferred = bare
        if notes is not None:
            notes.append(f"ONNX shape inference failed ({_first_line(exc)[:160]}); values without declared "
                         "types cannot be sites")
    g = inferred.graph
    specs: dict[str, TensorSpec] = {}
    for vi in [*g.input, *g.value_info, *g.output]:
        spec = _spec(vi)
        if spec is not None and spec.elem_type:
            specs[vi.name] = spec
    for init in proto.graph.initializer:
        specs.setdefault(init.name, TensorSpec(init.name, init.data_type, tuple(init.dims)))
    return specs


def data_inputs(proto: onnx.ModelProto) -> list[TensorSpec]:
    """Graph inputs that take data (old IR versions list initializers as inputs too)."""
    inits = {i.name for i in proto.graph.initializer}
    specs = []
    for vi in proto.graph.input:
        if vi.name in inits:
            continue
        spec = _spec(vi)
        if spec is None:
            raise ModelError(f"input '{vi.name}' is not a tensor; walkaudit feeds tensors only")
        specs.append(spec)
    return specs


def _known_dim(spec: TensorSpec, axis: int) -> int | None:
    """Dimension ``axis`` of ``spec``'s shape when it is a number (not a name, not unknown), else None."""
    d = None if spec.shape is None else spec.shape[axis]
    return d if isinstance(d, int) else None


def _score_like(spec: TensorSpec) -> bool:
    """Float [N, C] or [N, C, 1, ...] (a Conv classifier head without its Flatten), C known to be > 1 or unknown."""
    if not spec.is_float or spec.shape is None or len(spec.shape) < 2 or spec.shape[1] == 1:
        return False
    return all(d == 1 for d in spec.shape[2:])


def _token_like(spec: TensorSpec) -> bool:
    """Float [N, T, C], C last and known to be > 1 or unknown: class scores per position."""
    return (spec.is_float and spec.shape is not None and len(spec.shape) == 3 and spec.shape[2] != 1
            and not _score_like(spec))


def named_like_scores(spec: TensorSpec) -> bool:
    """Is the output named like class scores (`SCORE_NAMES`)?"""
    return any(k in spec.name.lower() for k in SCORE_NAMES)


def _named_first(candidates: list[TensorSpec]) -> TensorSpec:
    """The first candidate named like class scores, else the first."""
    return next((o for o in candidates if named_like_scores(o)), candidates[0])


def _regressor_like(spec: TensorSpec) -> bool:
    """Float [N], [N, 1] or [N, 1, 1, ...]: one number per sample."""
    if not spec.is_float or spec.shape is None:
        return False
    return len(spec.shape) == 1 or (len(spec.shape) >= 2 and all(d == 1 for d in spec.shape[1:]))


def find_class_output(outputs: list[TensorSpec], override: str | None = None,
                      graph: onnx.GraphProto | None = None) -> ClassOutput:
    """Pick the output that carries the class decision.

    Preference: a float output [N, C] with more than one column (logits or probabilities; trailing 1-dimensions
    of a convolutional head are accepted), then an integer label output [N], then float scores per position
    [N, T, C] (a tagger or a language model: a class per token), then one number per sample read from a Sigmoid (a
    binary classifier's probability). `override` names the output explicitly; one number per sample
    is then taken as a binary classifier's logit (threshold 0) or, from a Sigmoid, probability (threshold 0.5).
    With `graph`, outputs that the model does not compute (a graph input passed through, a constant) are never
    chosen, and outputs computed by a Conv/Gemm/MatMul layer (or an ai.onnx.ml operator) come first.
    """
    facts = _Graph(graph) if graph is not None else None
    names = [o.name for o in outputs]
    if override is not None:
        match = [o for o in outputs if o.name == override]
        if not match:
            path = override.endswith((".json", ".md", ".html", ".xml", ".png", ".svg")) or "/" in override
            hint = "; --output names the class output, -o/--out the report's file" if path else ""
            raise ModelError(f"--output {override!r} is not an output of the model (outputs: {', '.join(names)})"
                             f"{hint}")
        if facts is not None and not facts.computed(override):
            raise ModelError(f"output '{override}' is not computed by the model (a graph input or a constant passed "
                             "through): no noise can reach it")
        return _as_class_output(match[0], strict=True, facts=facts)
    found = "; ".join(f"{o.name}: {o.describe()}" for o in outputs) or "none"
    if facts is not None:
        usable = [o for o in outputs if facts.computed(o.name)]
        if outputs and not usable:
            raise ModelError(f"no output of the model is computed from its inputs (outputs: {found})")
        outputs = sorted(usable, key=lambda o: not facts.layered(o.name))  # stable: graph order within each group
    scores = [o for o in outputs if _score_like(o)]
    if scores:
        return _as_class_output(_named_first(scores), strict=False, facts=facts)
    labels = [o for o in outputs if o.elem_type in INT_TYPES and o.shape is not None and len(o.shape) == 1]
    if labels:
        return _as_class_output(labels[0], strict=False, facts=facts)
    tokens = [o for o in outputs if _token_like(o)]
    if tokens:
        return _as_class_output(_named_first(tokens), strict=False, facts=facts)
    if facts is not None:
        sigmoid = [o for o in outputs if _regressor_like(o) and facts.binary_kind(o.name) == "binary-probability"]
        if sigmoid:
            return ClassOutput(sigmoid[0].name, "binary-probability", 2)
    if outputs and all(_regressor_like(o) for o in outputs):
        raise ModelError(f"the model looks like a regressor, not a classifier: one number per sample "
                         f"(outputs: {found}); for a binary classifier name its logit or probability with "
                         f"{option('output')}")
    raise ModelError(f"no class output found: need float scores [N, C], scores per token [N, T, C] or integer "
                     f"labels [N] (outputs: {found})")


def _as_class_output(spec: TensorSpec, strict: bool, facts: _Graph | None = None) -> ClassOutput:
    if _regressor_like(spec):
        if strict:  # named by the user: a binary classifier's one number per sample
            return ClassOutput(spec.name, facts.binary_kind(spec.name) if facts else "binary-logit", 2)
        raise ModelError(f"output '{spec.name}' has one value per sample ({spec.describe()}): a regressor, "
                         f"not a classifier; for a binary classifier name it with {option('output')}")
    if _score_like(spec):
        return ClassOutput(spec.name, "scores", _known_dim(spec, 1))
    if spec.elem_type in INT_TYPES and spec.shape is not None and len(spec.shape) == 1:
        return ClassOutput(spec.name, "label", None)
    if _token_like(spec):
        return ClassOutput(spec.name, "scores", _known_dim(spec, 2), per_token=True)
    if spec.is_float and spec.shape is None:  # rank unknown: trust the user's choice, the clean pass checks it
        return ClassOutput(spec.name, "scores", None)
    raise ModelError(f"output '{spec.name}' ({spec.describe()}) is neither scores [N, C], scores per token "
                     "[N, T, C] (classes last) nor labels [N]")


def _label_scores(proto: onnx.ModelProto, types: dict[str, TensorSpec], label: str) -> ClassOutput | None:
    """The scores [N, C] written by the same node as the integer `label` output (an ai.onnx.ml classifier writes
    both): noise cannot reach a label from inside the node that writes it, so the scores are audited instead.
    None when the node writes no such scores, or its class labels are not 0 .. C-1 (argmax would not be the label)."""
    node = next((n for n in proto.graph.node if label in n.output), None)
    if node is None:
        return None
    scores = [types[o] for o in node.output if o and o != label and o in types and _score_like(types[o])]
    if not scores:
        return None
    spec = scores[0]
    c = _known_dim(spec, 1)
    for attr in node.attribute:
        if attr.name in ("classlabels_int64s", "classlabels_ints"):
            if list(attr.ints) != list(range(len(attr.ints))):
                return None
            c = c or len(attr.ints)
    return ClassOutput(spec.name, "scores", c)


def _output_specs(proto: onnx.ModelProto, types: dict[str, TensorSpec]) -> list[TensorSpec]:
    specs = []
    for vi in proto.graph.output:
        spec = _spec(vi)
        if spec is None:  # a sequence or map (e.g. skl2onnx's ZipMap): listed, never chosen
            specs.append(TensorSpec(vi.name, TensorProto.UNDEFINED, None))
            continue
        inferred = types.get(vi.name)
        if (spec.shape is None or not spec.elem_type) and inferred is not None:
            spec = inferred
        specs.append(spec)
    return specs


def _ml_class_count(proto: onnx.ModelProto) -> int | None:
    """Number of classes declared by an ai.onnx.ml classifier or ZipMap node, if any."""
    for node in proto.graph.node:
        for attr in node.attribute:
            if attr.name in ("classlabels_int64s", "classlabels_strings", "classlabels_ints"):
                n = len(attr.ints) or len(attr.strings)
                if n:
                    return n
    return None


def prepare_for_runtime(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Lower the IR version of our copy when onnx wrote a newer one than onnxruntime loads."""
    if proto.ir_version > _MAX_IR_SAFE:
        uses_new = any(op.domain not in ("", "ai.onnx", "ai.onnx.ml") for op in proto.opset_import)
        if not uses_new:
            proto.ir_version = _MAX_IR_SAFE
    return proto


def _deployed(proto: onnx.ModelProto, bare: onnx.ModelProto,
              notes: list[str]) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """A quantized model as onnxruntime runs it (a QDQ model: the graph with its groups fused, `quantized.fused`)
    with a site after each re-quantised layer (`quantized.requantized`: the same numbers and kernels), and a note
    saying what its sites are; a float model as it is."""
    found = quantized.kind(proto)
    if not found.quantized:
        return proto, bare
    changed = quantized.requantized(quantized.fused(proto) if found.qdq else proto)
    if changed is not proto:
        proto, bare = changed, skeleton(changed)
    bare = quantized.typed_contrib_outputs(bare)
    if found.qdq or found.qoperator:
        notes.append(f"quantized model ({found.describe()}): the layers run the deployed integer kernels; a "
                     "layer's site is its float value before re-quantisation (the deployed value where it is not "
                     "clipped), and noise added there is re-quantised with the layer's scale")
    if found.dynamic:
        notes.append(f"quantized model ({found.describe()}): each layer's site is the float value the graph "
                     "computes from its integer result; the next layer quantises it again, noise included")
    return proto, bare


def load_model(source, output: str | None = None, validate: bool = True) -> LoadedModel:
    """Read, check and describe a classifier. Raises ModelError with one clear line."""
    proto, path, sha = read_model(source)
    notes: list[str] = []
    bare = skeleton(proto)  # no weights: checking and inference stay fast and work past 2 GB
    if validate:
        try:
            onnx.checker.check_model(bare)
        except onnx.checker.ValidationError as exc:
            msg = _first_line(exc)
            # the checker refuses models newer than it knows; onnxruntime will say more
            if "opset" not in msg.lower() and "ir_version" not in msg.lower():
                raise ModelError(f"{path or 'model'} fails the ONNX checker: {msg}") from None
        except Exception as exc:  # a checker that cannot take the model at all: onnxruntime decides
            notes.append(f"the ONNX checker could not check the model ({_first_line(exc)[:160]})")
    prepare_for_runtime(proto)
    prepare_for_runtime(bare)
    proto, bare = _deployed(proto, bare, notes)
    types = value_types(proto, bare, notes)
    inputs = data_inputs(proto)
    if not inputs:
        raise ModelError("the model has no data inputs")
    outputs = _output_specs(proto, types)
    class_output = find_class_output(outputs, output, proto.graph)
    if class_output.kind == "label" and output is None:
        class_output = _label_scores(proto, types, class_output.name) or class_output
    if class_output.num_classes is None and not class_output.per_token:
        class_output = ClassOutput(class_output.name, class_output.kind, _ml_class_count(proto))
    return LoadedModel(proto, path, sha, inputs, outputs, types, class_output, notes)
