"""Packing σ levels (G tiled copies of a batch in one run) on transformers: the exporters compute Reshape targets
from Shape(x), and such shape vectors must be recomputed inside a suffix, not tiled (`passes.per_sample`).

The hand-built attention classifier below has what the exporters write for a BERT-style model: int64 `input_ids` and
`attention_mask`, a positional term [1, T, D] from Shape(input_ids), the heads split by Reshape(q, Concat(Shape(x)[:2],
[H, D/H])) and merged by Reshape(ctx, Concat(Shape(x)[:2], [-1])), an additive mask [N, 1, 1, T]. The committed
samples from torch (both exporters) are checked the same way where present; a sequence-first site [T, N, D] packs
along axis 1, and a graph that mixes the samples of a batch is still refused by the σ = 0 check.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from walkaudit._execution.runtime import Runtime
from walkaudit._execution.worker import Worker
from walkaudit._graph import passes
from walkaudit._graph.index import GraphIndex
from walkaudit._graph.sites import Selection, select
from walkaudit._loading.data import from_arrays, load
from walkaudit._loading.model import load_model
from walkaudit._noise import NormalSource, make_noise
from walkaudit._units import BLOCK, WorkUnit

from .models import IR

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
VOCAB, T, D, H, CLASSES = 20, 6, 8, 2, 3


def attention_classifier(seed: int = 0) -> onnx.ModelProto:
    """input_ids, attention_mask [N, T] -> embeddings + positions -> one self-attention layer -> mean -> logits."""
    rng = np.random.default_rng(seed)

    def w(name, *shape, scale=1.0):
        return numpy_helper.from_array(rng.normal(0, scale / np.sqrt(shape[0]), shape).astype(np.float32), name)

    def i64(name, values):
        return numpy_helper.from_array(np.array(values, np.int64), name)

    def f32(name, value):
        return numpy_helper.from_array(np.array(value, np.float32), name)

    n = helper.make_node
    nodes = [
        n("Gather", ["emb", "input_ids"], ["tok"]),
        n("Shape", ["input_ids"], ["ids_shape"]),
        n("Gather", ["ids_shape", "one_scalar"], ["length"]),
        n("Range", ["zero_scalar", "length", "one_scalar"], ["positions"]),
        n("Gather", ["pos_emb", "positions"], ["pos"]),
        n("Unsqueeze", ["pos", "axis0"], ["pos3"]),  # [1, T, D]
        n("Add", ["tok", "pos3"], ["x"]),
        n("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        n("Sub", ["one_f", "mask_f"], ["masked"]),
        n("Mul", ["masked", "big_negative"], ["mask_add"]),
        n("Unsqueeze", ["mask_add", "axes12"], ["mask4"]),  # [N, 1, 1, T]
        n("Shape", ["x"], ["x_shape"]),
        n("Slice", ["x_shape", "start0", "end2"], ["nt"]),
        n("Concat", ["nt", "heads"], ["split_shape"], axis=0),  # [N, T, H, D/H] as numbers
        n("Concat", ["nt", "minus_one"], ["merge_shape"], axis=0),  # [N, T, -1]
        *(m for name in ("q", "k", "v") for m in (
            n("MatMul", ["x", f"w_{name}"], [f"{name}_mm"]),
            n("Add", [f"{name}_mm", f"b_{name}"], [name]),
            n("Reshape", [name, "split_shape"], [f"{name}_heads"]))),
        n("Transpose", ["q_heads"], ["qh"], perm=[0, 2, 1, 3]),
        n("Transpose", ["k_heads"], ["kh"], perm=[0, 2, 3, 1]),
        n("Transpose", ["v_heads"], ["vh"], perm=[0, 2, 1, 3]),
        n("MatMul", ["qh", "kh"], ["scores"]),
        n("Mul", ["scores", "scale"], ["scaled"]),
        n("Add", ["scaled", "mask4"], ["masked_scores"]),
        n("Softmax", ["masked_scores"], ["probs"], axis=-1),
        n("MatMul", ["probs", "vh"], ["ctx"]),
        n("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),
        n("Reshape", ["ctx_t", "merge_shape"], ["ctx_merged"]),
        n("MatMul", ["ctx_merged", "w_o"], ["o_mm"]),
        n("Add", ["o_mm", "b_o"], ["o"]),
        n("Add", ["o", "x"], ["residual"]),
        n("Add", ["residual", "pos3"], ["with_pos"]),  # the positional term again, after every site
        n("ReduceMean", ["with_pos"], ["pooled"], axes=[1], keepdims=0),
        n("Gemm", ["pooled", "w_c", "b_c"], ["logits"]),
    ]
    inits = [
        w("emb", VOCAB, D, scale=np.sqrt(VOCAB)), w("pos_emb", T, D, scale=np.sqrt(T)),
        *(w(f"w_{name}", D, D) for name in ("q", "k", "v", "o")), *(w(f"b_{name}", D, scale=0.1) for name in "qkvo"),
        w("w_c", D, CLASSES, scale=3.0), w("b_c", CLASSES, scale=0.1),
        i64("one_scalar", 1), i64("zero_scalar", 0), i64("axis0", [0]), i64("axes12", [1, 2]), i64("start0", [0]),
        i64("end2", [2]), i64("heads", [H, D // H]), i64("minus_one", [-1]),
        f32("one_f", 1.0), f32("big_negative", -1e4), f32("scale", 1 / np.sqrt(D // H)),
    ]
    graph = helper.make_graph(
        nodes, "attention",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR)


def tokens(samples: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, T + 1, samples)
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int64)
    return {"input_ids": rng.integers(1, VOCAB, (samples, T)) * mask, "attention_mask": mask}


def _worker(model, inputs, *, pack: bool, batch_size: int = 100, limit: int | None = None):
    """A walk-mode Worker over `inputs` (arrays by name, or the path of a data file) at the default sites."""
    loaded = load_model(model)
    sites = select(loaded.proto, loaded.types, Selection(), loaded.class_output.name)
    data = (load(inputs, loaded.inputs, limit=limit) if isinstance(inputs, (str, Path)) else
            from_arrays(inputs if isinstance(inputs, dict) else {"x": inputs}, None, loaded.inputs))
    worker = Worker(loaded, data, runtime=Runtime("cpu"), noise=make_noise("additive", 0.3),
                    source=NormalSource(5, threads=1), sites=sites, batch_size=batch_size, pack=pack)
    return worker, [s.name for s in sites]


def _walk(worker: Worker, sites: list[str], blocks: tuple[int, int], sigmas=(0.1, 0.5, 2.0, 8.0)):
    """Each site's counts over `blocks` at four σ levels, two repeats."""
    return [worker.evaluate(WorkUnit(worker.key, (site,), sigmas, 2, blocks, worker.source.seed)) for site in sites]


def _tiled_notes(worker: Worker) -> list[str]:
    return [n for e in worker._evaluations.values() for n in e.notes if "tiled batch" in n]


def test_shape_vectors_leave_the_frontier_and_are_recomputed_in_the_suffix():
    """Without `per_sample` the attention sites' frontier holds the int64 shape vectors (the failing pattern); with
    it, only values of one row per sample along axis 0, and the nodes computing the shapes are in the suffix."""
    loaded = load_model(attention_classifier())
    index = GraphIndex(loaded.proto.graph)
    plan = index.suffix_plan("q", "logits")
    assert {"split_shape", "merge_shape", "pos3"} <= set(plan[1])  # what used to be tiled along axis 0
    nodes, frontier = passes.per_sample(plan, "q", index, loaded.types, "batch")
    assert all(loaded.types[f].shape[0] == "batch" for f in frontier), frontier
    assert set(frontier) == {"x", "kh", "vh", "mask4", "input_ids"}  # pos3: recomputed from the token ids' shape
    made = {o for i in nodes for o in index.writes[i]}
    assert {"split_shape", "merge_shape", "pos3", "x_shape"} <= made
    assert set(plan[0]) < set(nodes)
    # a fixed batch (or none known) leaves the plan as it is
    assert passes.per_sample(plan, "q", index, loaded.types, 4) is plan


def test_every_attention_site_packs_and_gives_the_unpacked_counts():
    """Every default site takes G tiled copies (the σ = 0 check passes, no note), and the packed counts equal one
    level at a time, bit for bit, over a range with a partial batch (250 samples, batches of 100, a unit of blocks
    1-3 that starts inside the first batch)."""
    model, inputs = attention_classifier(seed=1), tokens(250, seed=2)
    counts, sites = {}, None
    for pack in (True, False):
        worker, sites = _worker(model, inputs, pack=pack)
        worker.clean_pass()
        counts[pack] = _walk(worker, sites, (0, 4)) + _walk(worker, sites, (1, 3))
        assert all(e.packable is pack for e in worker._evaluations.values())
        if pack:
            assert _tiled_notes(worker) == []
        worker.source.close()
    assert len(sites) == 7  # q, k, v, scores, context, output projection, logits
    assert counts[True] == counts[False]
    # the noise does something: the largest σ loses agreement with the clean predictions at some site
    assert any(c.correct[-1].sum() < c.correct[0].sum() for c in counts[True])


def test_a_site_whose_frontier_is_too_large_to_copy_per_level_runs_levels_singly_without_copies(monkeypatch):
    """Above `CPU_TILE_ELEMENTS` of frontier per level, levels run one at a time from a program that reads the
    frontier as fed (no Expand); the counts are those of packed runs, bit for bit."""
    from walkaudit._execution import sizing

    model, inputs = attention_classifier(seed=1), tokens(250, seed=2)
    counts = {}
    for limit in (sizing.CPU_TILE_ELEMENTS, 0):
        monkeypatch.setattr(sizing, "CPU_TILE_ELEMENTS", limit)
        worker, sites = _worker(model, inputs, pack=True)
        counts[limit] = _walk(worker, sites, (0, 4))
        singly = {s for (_, (s,)), e in worker._evaluations.items() if e.single is not None}
        with_frontier = {s for (_, (s,)), e in worker._evaluations.items() if e.strategy.frontier}
        if limit:
            assert singly == set()
        else:
            assert singly == with_frontier and len(singly) >= 6
            for e in worker._evaluations.values():
                if e.single is not None:
                    assert not any(n.op_type == "Expand" for n in e.single.program.model.graph.node)
                    assert e.strategy._session is None  # the tiled program never ran, so it never had a session
                    assert e.packable is None  # nor was the σ = 0 packing check run for it
        worker.source.close()
    assert counts[0] == counts[sizing.CPU_TILE_ELEMENTS]


def test_counts_do_not_depend_on_the_batch_size():
    """Shape vectors recomputed per run: batches of 100, 64 and 7 give the same counts (packed)."""
    model, inputs = attention_classifier(seed=3), tokens(200, seed=4)
    results = []
    for batch_size in (100, 64, 7):
        worker, sites = _worker(model, inputs, pack=True, batch_size=batch_size)
        results.append(_walk(worker, sites, (0, -(-200 // BLOCK))))
        assert _tiled_notes(worker) == []
        worker.source.close()
    assert results[0] == results[1] == results[2]


SAMPLE_MODELS = ["digits_tokens_transformer.dynamo.onnx", "digits_tokens_transformer.legacy.onnx"]


@pytest.mark.parametrize("name", SAMPLE_MODELS)
def test_committed_transformer_samples_pack_at_every_site_with_a_batch_axis(name):
    """The torch-built transformer of `samples/` (nn.TransformerEncoder, both exporters): every default site that
    holds the samples along one axis packs, the sequence-first [T, N, 3D] in-projections of attention included
    (folded along axis 1); only the out-projections [T·N, D], where samples and positions share one axis, run a
    level at a time. Packed counts equal the unpacked ones on 150 samples, over a unit that starts inside a batch
    (blocks 1-3: rows 64-150 of batches of 100)."""
    path, data_path = SAMPLES / name, SAMPLES / "digits_tokens_val.npz"
    if not path.exists() or not data_path.exists():
        pytest.skip(f"samples/{name} not built")
    counts, unpacked = {}, {}
    for pack in (True, False):
        worker, sites = _worker(str(path), data_path, pack=pack, limit=150)
        counts[pack] = _walk(worker, sites, (1, 3), sigmas=(0.3, 3.0))
        unpacked[pack] = {s for (_, (s,)), e in worker._evaluations.items() if not e.packable}
        loaded = worker.model
        worker.source.close()
    merged = {s for s in sites if "batch" not in loaded.types[s].shape}  # [T·N, D]: no axis holds the samples
    assert len(merged) == 2 and unpacked[True] == merged and unpacked[False] == set(sites)
    assert any(loaded.types[s].shape[1] == "batch" for s in sites)  # sequence-first sites were among those packed
    assert counts[True] == counts[False]


def batch_mixing_mlp(seed: int = 0) -> onnx.ModelProto:
    """x [N, 4] -> MatMul -> h (a site) -> h + 0.1·Σ_batch h -> MatMul -> logits: each sample's output depends on the
    whole batch, so G tiled copies of a batch do not give G copies of its outputs."""
    rng = np.random.default_rng(seed)
    n = helper.make_node
    nodes = [n("MatMul", ["x", "w1"], ["h"]), n("ReduceSum", ["h", "axis0"], ["total"], keepdims=1),
             n("Mul", ["total", "tenth"], ["shared"]), n("Add", ["h", "shared"], ["mixed"]),
             n("MatMul", ["mixed", "w2"], ["logits"])]
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (4, 8)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.5, (8, 3)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.array([0], np.int64), "axis0"),
             numpy_helper.from_array(np.array(0.1, np.float32), "tenth")]
    graph = helper.make_graph(nodes, "mixing", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR)


def test_a_graph_that_mixes_the_batch_is_not_packed_and_gives_the_unpacked_counts():
    """The σ = 0 check (on a few rows) still refuses what a tiled batch changes: a note, one level per run, and the
    counts of `pack=False`."""
    x = np.random.default_rng(6).normal(size=(120, 4)).astype(np.float32)
    counts = {}
    for pack in (True, False):
        worker, _ = _worker(batch_mixing_mlp(), x, pack=pack)
        counts[pack] = _walk(worker, ["h"], (0, 2))
        assert [e.packable for e in worker._evaluations.values()] == [False]
        if pack:
            assert len(_tiled_notes(worker)) == 1
        worker.source.close()
    assert counts[True] == counts[False]


def sequence_first(seed: int = 0) -> onnx.ModelProto:
    """x [N, T, D] -> Transpose -> [T, N, D] -> MatMul (a site with the samples along axis 1) -> Transpose back ->
    mean over T -> Gemm -> logits, as torch's sequence-first attention computes its in-projection."""
    rng = np.random.default_rng(seed)
    n = helper.make_node
    nodes = [n("Transpose", ["x"], ["x_t"], perm=[1, 0, 2]), n("MatMul", ["x_t", "w"], ["s"]),
             n("Relu", ["s"], ["r"]), n("Transpose", ["r"], ["r_t"], perm=[1, 0, 2]),
             n("ReduceMean", ["r_t"], ["pooled"], axes=[1], keepdims=0), n("Gemm", ["pooled", "w_c"], ["logits"])]
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (D, D)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(0, 1.0, (D, CLASSES)).astype(np.float32), "w_c")]
    graph = helper.make_graph(nodes, "seq_first", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", T, D])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR)


def test_a_sequence_first_site_packs_along_its_batch_axis_and_gives_the_unpacked_counts():
    """A site [T, N, D] gets its G levels folded into axis 1 (`graph_noise(axis=1)`): it packs, and the counts equal
    one level at a time over a unit that starts inside a batch (blocks 1-3 of 250 samples, batches of 100)."""
    x = np.random.default_rng(7).normal(size=(250, T, D)).astype(np.float32)
    counts = {}
    for pack in (True, False):
        worker, sites = _worker(sequence_first(), x, pack=pack)
        assert "s" in sites
        counts[pack] = _walk(worker, ["s"], (1, 4)) + _walk(worker, ["s"], (0, 4))
        assert [e.packable for e in worker._evaluations.values()] == [pack]
        worker.source.close()
    assert counts[True] == counts[False]
    assert counts[True][1].correct[-1].sum() < counts[True][1].correct[0].sum()  # the noise does something
