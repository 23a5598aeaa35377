"""Packed σ levels that cannot leak: a value the suffix reads that is derived from the batch's size (Range(0, N) from
Shape, ConstantOfShape, ...) is recomputed inside the packed program, never tiled (`dependence.classify`,
`passes.per_sample`); tiled, every level read level 0's rows (GPT-2's sequence classifier picks the last token with
GatherND(logits, Concat(Range(N), argmax)): `--sigmas 0.001,0.2,3` gave 1.0, 1.0, 1.0).

Differential: packed runs equal one-level runs bit for bit on hand-built graphs that index rows by Range, Shape or
ConstantOfShape of the batch (declared with the batch symbol, as the dynamo exporter writes them), on a tiny GPT-2
style "last non-pad token" classifier, and on every sample model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from walkaudit._graph import dependence, passes
from walkaudit._graph.index import GraphIndex
from walkaudit._loading.model import TensorSpec, load_model

from .models import IR
from .test_packing import _walk, _worker

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
V, T, D, C, F = 12, 5, 8, 4, 6
SIGMAS = (0.01, 0.5, 2.0, 8.0)


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def _weights(rng, *pairs):
    return [_init(name, rng.normal(0, 1 / np.sqrt(shape[0]), shape).astype(np.float32)) for name, shape in pairs]


def _model(nodes, inputs, inits, batch_values, output="logits", shape=("batch", C)):
    """A model whose `batch_values` are declared [batch, ...] (name -> the rest of the shape), as dynamo does."""
    info = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", *rest]) for n, rest in batch_values.items()]
    graph = helper.make_graph(nodes, "leak", inputs, [helper.make_tensor_value_info(output, TensorProto.FLOAT,
                                                                                    list(shape))],
                              inits, value_info=info)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR)


def last_token_classifier(seed: int = 0) -> onnx.ModelProto:
    """GPT-2's sequence classifier in small: token embedding, two MatMul sites, per-token scores [N, T, C], and the
    score at each sample's last non-pad token: GatherND(scores, Concat(Range(N), (argmax(ids == pad) − 1) mod T))."""
    rng = np.random.default_rng(seed)
    n = helper.make_node
    nodes = [
        n("Gather", ["emb", "input_ids"], ["tok"]),
        n("MatMul", ["tok", "w1"], ["h"]), n("Relu", ["h"], ["r"]),
        n("MatMul", ["r", "wc"], ["scores"]),
        n("Equal", ["input_ids", "pad"], ["is_pad"]), n("Cast", ["is_pad"], ["pad_f"], to=TensorProto.FLOAT),
        n("ArgMax", ["pad_f"], ["first_pad"], axis=1, keepdims=0),
        n("Sub", ["first_pad", "one"], ["before"]), n("Add", ["before", "length"], ["wrapped"]),
        n("Mod", ["wrapped", "length"], ["last"]),
        n("Shape", ["input_ids"], ["ids_shape"]), n("Gather", ["ids_shape", "zero"], ["count"]),
        n("Range", ["zero", "count", "one"], ["rows"]),
        n("Unsqueeze", ["rows", "axis1"], ["rows2"]), n("Unsqueeze", ["last", "axis1"], ["last2"]),
        n("Concat", ["rows2", "last2"], ["picks"], axis=1),
        n("GatherND", ["scores", "picks"], ["logits"]),
    ]
    inits = [*_weights(rng, ("emb", (V, D)), ("w1", (D, D)), ("wc", (D, C))),
             _init("pad", np.array(0, np.int64)), _init("one", np.array(1, np.int64)),
             _init("zero", np.array(0, np.int64)), _init("length", np.array(T, np.int64)),
             _init("axis1", np.array([1], np.int64))]
    return _model(nodes, [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", T])], inits,
                  {"rows": (), "rows2": (1,), "last2": (1,), "picks": (2,)})


def token_ids(samples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, T + 1, samples)
    return rng.integers(1, V, (samples, T)) * (np.arange(T)[None] < lengths[:, None])


def row_picker(kind: str, seed: int = 0) -> onnx.ModelProto:
    """x [N, F] -> MatMul (site) -> Relu -> MatMul -> z [N, C] -> the rows of z picked by an index derived from the
    batch size: Gather by Range(N), Gather by CumSum(ConstantOfShape([N])) − 1, or Slice to Shape(x)[0]."""
    rng = np.random.default_rng(seed)
    n = helper.make_node
    nodes = [n("MatMul", ["x", "w1"], ["h"]), n("Relu", ["h"], ["r"]), n("MatMul", ["r", "w2"], ["z"]),
             n("Shape", ["x"], ["x_shape"]), n("Slice", ["x_shape", "start0", "end1"], ["count1"])]
    declared = {}
    if kind == "range":
        nodes += [n("Squeeze", ["count1", "axis0"], ["count"]), n("Range", ["zero", "count", "one"], ["rows"]),
                  n("Gather", ["z", "rows"], ["logits"], axis=0)]
        declared = {"rows": ()}
    elif kind == "constant_of_shape":
        nodes += [n("ConstantOfShape", ["count1"], ["ones"], value=_init("v", np.array([1], np.int64))),
                  n("CumSum", ["ones", "zero"], ["counted"]), n("Sub", ["counted", "one"], ["rows"]),
                  n("Gather", ["z", "rows"], ["logits"], axis=0)]
        declared = {"ones": (), "rows": ()}
    else:  # slice
        nodes += [n("Slice", ["z", "start0", "count1", "axis0"], ["logits"])]
    inits = [*_weights(rng, ("w1", (F, D)), ("w2", (D, C))), _init("zero", np.array(0, np.int64)),
             _init("one", np.array(1, np.int64)), _init("start0", np.array([0], np.int64)),
             _init("end1", np.array([1], np.int64)), _init("axis0", np.array([0], np.int64))]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", F])], inits, declared)


def _packed_and_single(model, inputs, blocks=(0, 4), batch_size=100, limit=None, sigmas=SIGMAS, most=None):
    """The default sites' counts packed and one level at a time (`most`: at most that many sites, spread from the
    first to the last), and whether each packed site did pack."""
    counts, packed = {}, None
    for pack in (True, False):
        worker, sites = _worker(model, inputs, pack=pack, batch_size=batch_size, limit=limit)
        if most and len(sites) > most:
            sites = [sites[round(k * (len(sites) - 1) / (most - 1))] for k in range(most)]
        worker.clean_pass()
        counts[pack] = _walk(worker, sites, blocks, sigmas=sigmas)
        if pack:
            packed = {s: e.packable for (_, (s,)), e in worker._evaluations.items()}
        worker.source.close()
    return counts[True], counts[False], packed


def test_the_last_token_classifier_packs_without_reading_level_0s_rows():
    """Packed, the levels fall with σ as one level at a time does (bit for bit): the GatherND's row indices are
    recomputed for the tiled batch, not tiled (on main every level scored as σ = 0.01 did)."""
    packed, single, did = _packed_and_single(last_token_classifier(), {"input_ids": token_ids(250, 1)})
    assert all(did.values()) and len(did) == 2  # both sites took G tiled copies
    assert packed == single
    assert all(c.correct[-1].sum() < c.correct[0].sum() for c in packed)  # the largest σ does harm


@pytest.mark.parametrize("kind", ["range", "constant_of_shape", "slice"])
def test_rows_picked_by_the_batch_size_pack_bit_for_bit(kind):
    x = np.random.default_rng(3).normal(size=(250, F)).astype(np.float32)
    packed, single, did = _packed_and_single(row_picker(kind), x)
    assert all(did.values())
    assert packed == single
    assert any(c.correct[-1].sum() < c.correct[0].sum() for c in packed)


def test_values_are_classified_by_dataflow_not_by_their_declared_batch_axis():
    """Range(N) is declared [batch] like a per-sample value, but it reads the inputs only through their shape; the
    picks mix it with the data through GatherND's indices; the position of the last token is per sample."""
    loaded = load_model(last_token_classifier())
    index = GraphIndex(loaded.proto.graph)
    kinds = dependence.classify(index, loaded.types, passes.batch_dimension(loaded.inputs))
    assert kinds["rows"] == kinds["rows2"] == kinds["ids_shape"] == dependence.SHAPE
    assert kinds["picks"] == dependence.INDEXED and kinds["logits"] == dependence.INDEXED
    assert kinds["last2"] == kinds["h"] == kinds["scores"] == dependence.SAMPLE
    nodes, frontier = passes.per_sample(index.suffix_plan("h", "logits"), "h", index, loaded.types, "batch")
    assert "picks" not in frontier and "rows" not in frontier and "last2" in frontier
    made = {o for i in nodes for o in index.writes[i]}
    assert {"picks", "rows", "ids_shape"} <= made


def test_a_position_term_and_a_mask_laid_out_in_the_batch_shape_stay_per_sample():
    """Range(T) of the sequence length does not hold N, nor do the zeros of a mask expanded to [N, T]: token
    embeddings plus positions, and Where(mask, -inf, zeros), are fed by rows (recomputing them would rerun the
    model's prefix in every suffix)."""
    n = helper.make_node
    nodes = [n("Gather", ["emb", "input_ids"], ["tok"]), n("Shape", ["input_ids"], ["s"]),
             n("Gather", ["s", "one"], ["t"]), n("Range", ["zero", "t", "one"], ["positions"]),
             n("Gather", ["pos_emb", "positions"], ["pos"]), n("Add", ["tok", "pos"], ["x"]),
             n("Expand", ["zero_f", "s"], ["zeros"]), n("Equal", ["input_ids", "zero"], ["is_pad"]),
             n("Where", ["is_pad", "minus", "zeros"], ["mask_add"])]
    rng = np.random.default_rng(0)
    inits = [*_weights(rng, ("emb", (V, D)), ("pos_emb", (T, D))), _init("zero", np.array(0, np.int64)),
             _init("one", np.array(1, np.int64)), _init("zero_f", np.array(0, np.float32)),
             _init("minus", np.array(-1e4, np.float32))]
    graph = helper.make_graph(nodes, "positions", [helper.make_tensor_value_info("input_ids", TensorProto.INT64,
                                                                                 ["batch", T])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in ("x", "mask_add")],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR)
    index = GraphIndex(model.graph)
    types = {"input_ids": TensorSpec("input_ids", TensorProto.INT64, ("batch", T))}
    kinds = dependence.classify(index, types, "batch")
    assert kinds["positions"] == kinds["zeros"] == dependence.SHAPE
    assert kinds["x"] == kinds["mask_add"] == dependence.SAMPLE


def hf_encoder(seed: int = 0) -> onnx.ModelProto:
    """How Hugging Face's BERT and GPT-2 export, in small (no shapes declared: shape inference names the batch anew
    after every Reshape and broadcast, `unk__k`, as in the real exports):
    - embeddings: tokens + token types Gather(table, Expand(zeros[1, T], Shape(ids))) + positions Gather(Range(T));
    - an attention mask built from ones[N, T] (no mask input), flattened and gathered per row at Range(N)·T + t,
      then (1 − m)·−10⁴, added to the attention scores;
    - GPT-2's Conv1D: Reshape(h, [-1, D]) → Gemm (a site) → Reshape back to Shape(h)[0], T, D;
    - mean over the tokens → logits [N, C]."""
    rng = np.random.default_rng(seed)
    n = helper.make_node
    nodes = [
        n("Shape", ["input_ids"], ["ids_shape"]), n("Gather", ["ids_shape", "zero"], ["count"]),
        n("Gather", ["ids_shape", "one"], ["length"]),
        n("Gather", ["tok_emb", "input_ids"], ["tok"]),
        n("Expand", ["type_ids0", "ids_shape"], ["type_ids"]), n("Gather", ["type_emb", "type_ids"], ["types"]),
        n("Range", ["zero", "length", "one"], ["positions"]), n("Gather", ["pos_emb", "positions"], ["pos"]),
        n("Add", ["tok", "types"], ["tt"]), n("Add", ["tt", "pos"], ["x"]),
        n("ConstantOfShape", ["ids_shape"], ["ones"], value=_init("v", np.array([1], np.float32))),
        n("Reshape", ["ones", "flat"], ["ones_flat"]),
        n("Range", ["zero", "count", "one"], ["rows"]), n("Unsqueeze", ["rows", "axis1"], ["rows2"]),
        n("Mul", ["rows2", "length"], ["row_starts"]), n("Unsqueeze", ["positions", "axis0"], ["cols"]),
        n("Add", ["row_starts", "cols"], ["picks"]), n("Gather", ["ones_flat", "picks"], ["kept"]),
        n("Sub", ["one_f", "kept"], ["masked"]), n("Mul", ["masked", "big"], ["mask_add"]),
        n("Unsqueeze", ["mask_add", "axis1"], ["mask3"]),
        n("MatMul", ["x", "wq"], ["q"]), n("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
        n("MatMul", ["q", "xt"], ["scores"]), n("Add", ["scores", "mask3"], ["scores_masked"]),
        n("Softmax", ["scores_masked"], ["attn"], axis=-1), n("MatMul", ["attn", "x"], ["mixed"]),
        n("Add", ["x", "mixed"], ["h"]),
        n("Reshape", ["h", "rows_by_width"], ["h2"]), n("Gemm", ["h2", "wf", "bf"], ["f2"]), n("Relu", ["f2"], ["r2"]),
        n("Unsqueeze", ["count", "axis0"], ["count1"]), n("Unsqueeze", ["length", "axis0"], ["length1"]),
        n("Concat", ["count1", "length1", "width1"], ["back"], axis=0), n("Reshape", ["r2", "back"], ["f"]),
        n("ReduceMean", ["f"], ["pooled"], axes=[1], keepdims=0), n("MatMul", ["pooled", "wc"], ["logits"]),
    ]
    inits = [*_weights(rng, ("tok_emb", (V, D)), ("type_emb", (2, D)), ("pos_emb", (T, D)), ("wq", (D, D)),
                       ("wf", (D, D)), ("wc", (D, C))),
             _init("bf", np.zeros(D, np.float32)), _init("type_ids0", np.zeros((1, T), np.int64)),
             _init("zero", np.array(0, np.int64)), _init("one", np.array(1, np.int64)),
             _init("flat", np.array([-1], np.int64)), _init("rows_by_width", np.array([-1, D], np.int64)),
             _init("width1", np.array([D], np.int64)), _init("axis0", np.array([0], np.int64)),
             _init("axis1", np.array([1], np.int64)), _init("one_f", np.array(1, np.float32)),
             _init("big", np.array(-1e4, np.float32))]
    graph = helper.make_graph(nodes, "hf_encoder",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", T])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", C])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR)


def test_hugging_face_embeddings_and_masks_stay_per_sample():
    """Token types expanded to the batch's shape, a mask of ones gathered per row by Range(N)·T + t, and the
    batch renamed by Reshape and broadcasting: the residual stream is per sample, so a late site's suffix is the
    layers after it plus shape arithmetic (before: the type embeddings and the mask counted as "holding N", every
    later value as "indexed", and each suffix recomputed the whole model: BERT's cost ratio 1.12, GPT-2's 1.25)."""
    loaded = load_model(hf_encoder())
    index = GraphIndex(loaded.proto.graph)
    batch = passes.batch_dimension(loaded.inputs)
    kinds = dependence.classify(index, loaded.types, batch)
    assert kinds["types"] == kinds["kept"] == kinds["mask_add"] == dependence.SHAPE
    assert kinds["rows"] == kinds["picks"] == dependence.SHAPE
    assert {kinds[v] for v in ("tt", "x", "scores_masked", "h", "h2", "f2", "f", "logits")} == {dependence.SAMPLE}
    assert loaded.types["h2"].shape[0] not in dependence.batch_symbols(index, loaded.types, batch)  # N·T rows
    nodes, frontier = passes.per_sample(index.suffix_plan("f2", "logits"), "f2", index, loaded.types, batch)
    ops = {loaded.proto.graph.node[i].op_type for i in nodes}
    assert ops.isdisjoint({"MatMul", "Softmax"}) or {loaded.proto.graph.node[i].output[0] for i in nodes
                                                     if loaded.proto.graph.node[i].op_type == "MatMul"} == {"logits"}
    assert "h" not in {o for i in nodes for o in index.writes[i]}  # the attention is not rerun
    assert all(kinds[f] == dependence.SAMPLE for f in frontier)


def test_the_batch_keeps_its_names_through_broadcasts_and_reshapes():
    """Shape inference names the batch anew where it cannot merge (`unk__k`, as in BERT's and GPT-2's exports):
    an elementwise op's axis where an input has the batch is the batch; a Reshape with one symbol on each side and
    the same known dimensions equates them; a Reshape folding the tokens into the rows does not."""
    n = helper.make_node
    graph = helper.make_graph([n("Add", ["a", "b"], ["c"]), n("Reshape", ["c", "s1"], ["d"]),
                               n("Reshape", ["c", "s2"], ["e"]), n("Add", ["b", "b"], ["f"])], "names", [], [])
    shapes = {"a": ("batch", T, D), "b": ("unk__1", T, D), "c": ("unk__2", T, D), "d": ("unk__3", T * D),
              "e": ("unk__4", D), "f": ("unk__5", T, D)}
    types = {k: TensorSpec(k, TensorProto.FLOAT, v) for k, v in shapes.items()}
    names = dependence.batch_symbols(GraphIndex(graph), types, "batch")
    assert names == {"batch", "unk__2", "unk__3"}  # not b's (a position term [1, T, D] broadcast), nor N·T rows


def test_a_hugging_face_style_encoder_packs_bit_for_bit():
    packed, single, did = _packed_and_single(hf_encoder(), {"input_ids": token_ids(250, 2)})
    assert all(did.values()) and len(did) >= 3
    assert packed == single
    assert any(c.correct[-1].sum() < c.correct[0].sum() for c in packed)


def test_what_counts_across_the_batch_still_holds_n():
    """The rules that let masks through keep what does count N: CumSum over ones[N], Expand of Range(N), and a
    non-uniform table picked at rows computed from Range(N)."""
    n = helper.make_node
    nodes = [n("Shape", ["x"], ["s"]), n("Gather", ["s", "zero"], ["count"]),
             n("ConstantOfShape", ["s"], ["ones"], value=_init("v", np.array([1], np.float32))),
             n("CumSum", ["ones", "zero"], ["counted"]), n("Add", ["x", "counted"], ["by_cumsum"]),
             n("Range", ["zero", "count", "one"], ["rows"]), n("Unsqueeze", ["rows", "axis1"], ["rows2"]),
             n("Expand", ["rows2", "s"], ["rows_nf"]), n("Cast", ["rows_nf"], ["rows_f"], to=TensorProto.FLOAT),
             n("Add", ["x", "rows_f"], ["by_expand"]),
             n("Gather", ["table", "rows"], ["picked"]), n("Add", ["x", "picked"], ["by_table"]),
             n("Mul", ["ones", "x"], ["by_ones"])]
    inits = [_init("zero", np.array(0, np.int64)), _init("one", np.array(1, np.int64)),
             _init("axis1", np.array([1], np.int64)),
             _init("table", np.arange(64 * F, dtype=np.float32).reshape(64, F))]
    graph = helper.make_graph(nodes, "counts", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", F])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None)
                               for o in ("by_cumsum", "by_expand", "by_table", "by_ones")], inits)
    index = GraphIndex(graph)
    types = {"x": TensorSpec("x", TensorProto.FLOAT, ("batch", F))}
    kinds = dependence.classify(index, types, "batch")
    assert kinds["by_cumsum"] == kinds["by_expand"] == kinds["by_table"] == dependence.INDEXED
    assert kinds["by_ones"] == dependence.SAMPLE  # ones[N, F] times the data, element by element


#: every sample model with its data (the transformers' own packing test is tests/test_packing.py's)
SAMPLE_CASES = [
    ("mnist_mlp.dynamo.onnx", "mnist_val.npz"), ("mnist_mlp.legacy.onnx", "mnist_val.npz"),
    ("mnist_mlp_bn.dynamo.onnx", "mnist_val.npz"), ("mnist_mlp_bn.legacy.onnx", "mnist_val.npz"),
    ("mnist_mlp_additive.dynamo.onnx", "mnist_val.npz"), ("mnist_mlp_multiplicative.dynamo.onnx", "mnist_val.npz"),
    ("mnist_lenet5.dynamo.onnx", "mnist_val.npz"), ("mnist_lenet5.legacy.onnx", "mnist_val.npz"),
    ("mnist_mlp.jax.onnx", "mnist_val.npz"), ("digits_sklearn_mlp.onnx", "digits_val.npz"),
    ("digits_sklearn_mlp_zipmap.onnx", "digits_val.npz"), ("digits_two_output.dynamo.onnx", "digits_val.npz"),
    ("digits_rows_lstm.dynamo.onnx", "digits_rows_val.npz"), ("digits_rows_lstm.legacy.onnx", "digits_rows_val.npz"),
    ("digits_tokens_cls.dynamo.onnx", "digits_tokens_val.npz"),
    ("digits_tokens_cls.legacy.onnx", "digits_tokens_val.npz"),
    ("digits_tokens_transformer.dynamo.onnx", "digits_tokens_val.npz"),
    ("digits_tokens_transformer.legacy.onnx", "digits_tokens_val.npz"),
    ("digits_pixel_lm.dynamo.onnx", "digits_pixel_lm_val.npz"), ("mnist_lenet5.qdq.onnx", "mnist_val.npz"),
]


@pytest.mark.parametrize("name, data", SAMPLE_CASES, ids=[c[0].rsplit(".", 1)[0] for c in SAMPLE_CASES])
def test_every_sample_model_packs_bit_for_bit(name, data):
    """Counted against the clean predictions (the inputs only), over rows 64-100 of 100 samples in batches of 64 (a
    unit that starts on a batch's last part), at five sites from the first to the last (every site of the
    transformers: tests/test_packing.py)."""
    model = load_model(str(SAMPLES / name))
    with np.load(SAMPLES / data) as arrays:
        inputs = {s.name: arrays[s.name if s.name in arrays else "x"][:100] for s in model.inputs}
    packed, single, did = _packed_and_single(str(SAMPLES / name), inputs, blocks=(1, 2), batch_size=64,
                                             sigmas=(0.3, 3.0), most=5)
    assert packed == single
    assert any(did.values()), did  # the comparison is of packed runs: at least one site took tiled copies
