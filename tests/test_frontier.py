"""A late site's suffix stops at the nearest values that hold the samples: it never reruns the layers before it.

A ViT concatenates a class token, expanded to the batch by shape arithmetic, to its patch tokens; ONNX shape
inference cannot merge that Concat's batch dimension and names it anew (`unk__1`), so the whole residual stream
after it carries a symbol other than the inputs' batch. Read as "not per sample along axis 0", every late site's
suffix was planned back to the patch embedding (torchvision ViT-B/16: 1,647 of 2,068 nodes for layer 9's MLP output,
every earlier layer's attention included). `dependence.batch_symbols` tells that symbol is the batch (a Concat's
inputs and output agree on every axis but the one it joins); the packed and one-level runs still agree bit for bit.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from walkaudit._execution.runtime import Runtime
from walkaudit._execution.worker import Worker, site_axes
from walkaudit._graph import dependence, passes
from walkaudit._graph.index import GraphIndex
from walkaudit._graph.sites import Selection, select
from walkaudit._loading.data import from_arrays
from walkaudit._loading.model import load_model
from walkaudit._noise import NormalSource, make_noise

from .models import IR
from .test_leak import _packed_and_single
from .test_packing import _walk

P, D, C, LAYERS = 4, 8, 3, 3


def class_token_encoder(seed: int = 0) -> onnx.ModelProto:
    """x [batch, P, D] -> Concat(class token expanded to [N, 1, D] by Shape(x), x) -> LAYERS blocks: a MatMul site
    ("mix0", "mix1", ...), an activation computed sequence-first (Transpose to [T, N, D] and back), the residual
    ("h0", "h1", ...) -> the class token's row -> logits [batch, C]."""
    rng = np.random.default_rng(seed)
    n = helper.make_node
    w = lambda name, *shape: numpy_helper.from_array(  # noqa: E731
        rng.normal(0, 1 / np.sqrt(shape[0]), shape).astype(np.float32), name)
    i64 = lambda name, v: numpy_helper.from_array(np.array(v, np.int64), name)  # noqa: E731
    nodes = [n("Shape", ["x"], ["x_shape"]), n("Gather", ["x_shape", "zero"], ["count"], axis=0),
             n("Unsqueeze", ["count", "axis0"], ["count1"]), n("Concat", ["count1", "keep2"], ["wanted"], axis=0),
             # torch's expand(N, -1, -1): -1 replaced by 1 through Where, which ONNX's data propagation cannot see
             n("Equal", ["wanted", "keep3"], ["kept"]), n("Where", ["kept", "ones3", "wanted"], ["cls_shape"]),
             n("Expand", ["cls", "cls_shape"], ["cls_n"]), n("Concat", ["cls_n", "x"], ["tokens"], axis=1)]
    inits = [w("cls", 1, 1, D), i64("zero", 0), i64("axis0", [0]), i64("keep2", [-1, -1]),
             i64("keep3", [-1, -1, -1]), i64("ones3", [1, 1, 1]), i64("first", [0]),
             i64("second", [1]), i64("axis1", [1]), w("wc", D, C)]
    h = "tokens"
    for k in range(LAYERS):
        nodes += [n("MatMul", [h, f"w{k}"], [f"mix{k}"]), n("Transpose", [f"mix{k}"], [f"seq{k}"], perm=[1, 0, 2]),
                  n("Tanh", [f"seq{k}"], [f"act{k}"]), n("Transpose", [f"act{k}"], [f"back{k}"], perm=[1, 0, 2]),
                  n("Add", [h, f"back{k}"], [f"h{k}"])]
        inits.append(w(f"w{k}", D, D))
        h = f"h{k}"
    nodes += [n("Slice", [h, "first", "second", "axis1"], ["cls_row"]), n("Squeeze", ["cls_row", "axis1"], ["pooled"]),
              n("MatMul", ["pooled", "wc"], ["logits"])]
    graph = helper.make_graph(nodes, "class_token", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                   ["batch", P, D])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", C])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR)


def test_shape_inference_renames_the_batch_after_the_class_token():
    """The pattern itself: the residual stream's dimension 0 is a symbol other than the inputs' batch, and
    `batch_symbols` finds it equal to the batch through the Concat."""
    loaded = load_model(class_token_encoder())
    index = GraphIndex(loaded.proto.graph)
    renamed = loaded.types["h1"].shape[0]
    assert renamed != "batch" and isinstance(renamed, str)
    assert dependence.batch_symbols(index, loaded.types, "batch") >= {"batch", renamed}
    assert dependence.batch_symbols(index, loaded.types, 4) == frozenset()


def test_a_late_sites_suffix_does_not_rerun_the_earlier_layers():
    loaded = load_model(class_token_encoder())
    index = GraphIndex(loaded.proto.graph)
    plan = index.suffix_plan("mix1", "logits")
    nodes, frontier = passes.per_sample(plan, "mix1", index, loaded.types, "batch")
    made = {o for i in nodes for o in index.writes[i]}
    assert frontier == ("h0",)  # the residual stream, fed by rows
    assert not made & {"tokens", "cls_n", "cls_shape", "mix0", "h0"}, sorted(made)
    assert set(nodes) == set(plan[0])


def test_the_class_token_encoder_packs_bit_for_bit():
    """Fed the residual stream, packed runs (G tiled copies along axis 0) equal one-level runs bit for bit."""
    x = np.random.default_rng(5).normal(size=(120, P, D)).astype(np.float32)
    packed, single, did = _packed_and_single(class_token_encoder(), x, batch_size=50)
    assert did and all(did.values())
    assert packed == single
    assert any(c.correct[-1].sum() < c.correct[0].sum() for c in packed)


def test_the_batch_entry_of_a_sequence_first_shape_holds_n_after_the_class_token():
    """Shape(seq0) of a sequence-first [T, N, D] value whose N is the renamed batch: its entry 1 is N (not entry 0,
    the fallback for a shape without the batch symbol), so rows counted from it mixed with the data are "indexed"
    (recomputed for a packed batch, never tiled) and Range(T) from entry 0 is only a shape."""
    model = class_token_encoder()
    n = helper.make_node
    model.graph.node.extend([
        n("Shape", ["seq0"], ["seq_shape"]), n("Gather", ["seq_shape", "one"], ["seq_n"], axis=0),
        n("Gather", ["seq_shape", "zero"], ["seq_t"], axis=0),
        n("Range", ["zero", "seq_n", "one"], ["rows"]), n("Cast", ["rows"], ["rows_f"], to=TensorProto.FLOAT),
        n("Range", ["zero", "seq_t", "one"], ["positions"]), n("Cast", ["positions"], ["positions_f"],
                                                                to=TensorProto.FLOAT),
        n("ReduceSum", ["h0", "axes12"], ["total"], keepdims=0), n("Mul", ["total", "rows_f"], ["counted"]),
        n("ReduceSum", ["h0", "axes02"], ["per_token"], keepdims=0), n("Mul", ["per_token", "positions_f"],
                                                                      ["placed"])])
    model.graph.initializer.extend([numpy_helper.from_array(np.array(v, np.int64), k) for k, v in
                                    (("one", 1), ("axes12", [1, 2]), ("axes02", [0, 2]))])
    loaded = load_model(model)
    kinds = dependence.classify(GraphIndex(loaded.proto.graph), loaded.types, "batch")
    assert kinds["rows"] == kinds["positions"] == dependence.SHAPE
    assert kinds["counted"] == dependence.INDEXED
    assert kinds["placed"] == dependence.SAMPLE


@pytest.mark.parametrize("noise, sigmas", [(("additive", 0.3), (0.1, 0.5, 2.0, 8.0)),
                                           (("bitflip", 0.3), (1e-4, 0.01, 0.1))])
def test_a_sequence_first_site_packs_along_its_renamed_batch_axis(noise, sigmas):
    """act1 [T, N, D] between the Transposes carries the batch under its other name (`unk__0`) at axis 1: its
    batch axis is 1 (`LoadedModel.batch_names`), so packed σ levels fold into axis 1 and pass the σ = 0 check (it
    used to get axis 0, failed the check and ran one level at a time), and packed equals one-level runs bit for
    bit: noise fed to the graph (`FedSuffix`) and noise applied on the host (`HostApplied`: bit flips,
    folded into axis 1 the same way)."""
    model = class_token_encoder()
    loaded = load_model(model)
    shape = loaded.types["act1"].shape
    assert shape[1] != "batch" and shape[1] in loaded.batch_names and shape[0] not in loaded.batch_names
    assert passes.sample_axis(loaded.types["act1"], loaded.batch_names) == 1
    assert site_axes(loaded, ["act1", "mix1"]) == (("act1", 1), ("mix1", 0))
    x = np.random.default_rng(6).normal(size=(120, P, D)).astype(np.float32)
    counts, packable = {}, {}
    for pack in (True, False):
        loaded = load_model(model)
        sites = select(loaded.proto, loaded.types, Selection(names=("act1",)), loaded.class_output.name)
        worker = Worker(loaded, from_arrays({"x": x}, None, loaded.inputs), runtime=Runtime("cpu"),
                        noise=make_noise(*noise), source=NormalSource(5, threads=1), sites=sites,
                        batch_size=50, pack=pack)
        worker.clean_pass()
        counts[pack] = _walk(worker, ["act1"], (0, 4), sigmas)
        packable[pack] = [e.packable for e in worker._evaluations.values()]
        worker.source.close()
    assert packable[True] == [True]
    assert not any("one at a time" in note for note in counts[True][0].notes), counts[True][0].notes
    assert any("axis 1" in note for note in counts[True][0].notes)
    assert counts[True] == counts[False]
    assert counts[True][0].correct[-1].sum() < counts[True][0].correct[0].sum()
