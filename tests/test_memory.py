"""Memory bounded by one site's evaluation, whatever the number of sites: small versions of the blocks of the models
people deploy (a ResNet bottleneck, a depthwise-separable block with squeeze-excitation, a patch embedding with
attention), built with onnx.helper."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import walkaudit
from walkaudit._execution import runtime as runtime_mod
from walkaudit._execution.executors import InProcess
from walkaudit._execution.runtime import Runtime
from walkaudit._execution.worker import Worker
from walkaudit._graph.sites import Selection, select
from walkaudit._loading import data as data_mod
from walkaudit._loading.model import load_model
from walkaudit._noise import NormalSource, make_noise
from walkaudit._noise.source import CHUNK, name_key
from walkaudit._units import BLOCK, WorkUnit

from .models import IR


def _w(rng, name, shape, scale=0.5):
    return numpy_helper.from_array(rng.normal(0, scale, shape).astype(np.float32), name)


def _model(name, nodes, inits, x_shape, classes, opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *x_shape])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR)


def bottleneck(seed=0, c=8, mid=4, classes=5) -> onnx.ModelProto:
    """A ResNet-50 bottleneck: 1x1 reduce, 3x3, 1x1 expand, the residual Add, pooling, a classifier."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x", "k_in"], ["stem"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["stem"], ["s"]),
        helper.make_node("Conv", ["s", "k1"], ["c1"]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "k2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Conv", ["r2", "k3"], ["c3"]),
        helper.make_node("Add", ["c3", "s"], ["res"]),
        helper.make_node("Relu", ["res"], ["out"]),
        helper.make_node("GlobalAveragePool", ["out"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc", "fc_b"], ["logits"], transB=1),
    ]
    inits = [_w(rng, "k_in", (c, 3, 3, 3)), _w(rng, "k1", (mid, c, 1, 1)), _w(rng, "k2", (mid, mid, 3, 3)),
             _w(rng, "k3", (c, mid, 1, 1)), _w(rng, "fc", (classes, c), 1.0), _w(rng, "fc_b", (classes,), 0.1)]
    return _model("bottleneck", nodes, inits, (3, 8, 8), classes)


def depthwise_se(seed=0, c=8, classes=5) -> onnx.ModelProto:
    """MobileNetV3 / EfficientNet: a depthwise conv, squeeze-excitation (pool, 1x1 reduce, 1x1 expand, sigmoid
    gate), a pointwise conv, a classifier."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x", "k_in"], ["stem"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["stem"], ["s"]),
        helper.make_node("Conv", ["s", "dw"], ["d"], group=c, pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["d"], ["dr"]),
        helper.make_node("GlobalAveragePool", ["dr"], ["sq"]),
        helper.make_node("Conv", ["sq", "se1"], ["e1"]),
        helper.make_node("Relu", ["e1"], ["e1r"]),
        helper.make_node("Conv", ["e1r", "se2"], ["e2"]),
        helper.make_node("Sigmoid", ["e2"], ["gate"]),
        helper.make_node("Mul", ["dr", "gate"], ["excited"]),
        helper.make_node("Conv", ["excited", "pw"], ["p"]),
        helper.make_node("GlobalAveragePool", ["p"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc", "fc_b"], ["logits"], transB=1),
    ]
    inits = [_w(rng, "k_in", (c, 3, 3, 3)), _w(rng, "dw", (c, 1, 3, 3)), _w(rng, "se1", (2, c, 1, 1)),
             _w(rng, "se2", (c, 2, 1, 1)), _w(rng, "pw", (c, c, 1, 1)), _w(rng, "fc", (classes, c), 1.0),
             _w(rng, "fc_b", (classes,), 0.1)]
    return _model("depthwise_se", nodes, inits, (3, 8, 8), classes)


def patch_attention(seed=0, d=8, classes=5) -> onnx.ModelProto:
    """A ViT's front: a strided conv as patch embedding, tokens [N, T, D], one attention head with a residual,
    the mean token, a classifier."""
    rng = np.random.default_rng(seed)
    shape = numpy_helper.from_array(np.array([0, d, -1], np.int64), "shape")
    nodes = [
        helper.make_node("Conv", ["x", "patch"], ["emb"], strides=[4, 4]),  # [N, D, 2, 2]
        helper.make_node("Reshape", ["emb", "shape"], ["flat_emb"]),  # [N, D, T]
        helper.make_node("Transpose", ["flat_emb"], ["tokens"], perm=[0, 2, 1]),  # [N, T, D]
        helper.make_node("MatMul", ["tokens", "wq"], ["q"]),
        helper.make_node("MatMul", ["tokens", "wk"], ["k"]),
        helper.make_node("MatMul", ["tokens", "wv"], ["v"]),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["attn"], axis=-1),
        helper.make_node("MatMul", ["attn", "v"], ["ctx"]),
        helper.make_node("MatMul", ["ctx", "wo"], ["proj"]),
        helper.make_node("Add", ["proj", "tokens"], ["res"]),
        helper.make_node("ReduceMean", ["res"], ["mean"], axes=[1], keepdims=0),
        helper.make_node("Gemm", ["mean", "fc", "fc_b"], ["logits"], transB=1),
    ]
    inits = [_w(rng, "patch", (d, 3, 4, 4), 0.3), shape, *(_w(rng, n, (d, d), 0.4) for n in ("wq", "wk", "wv", "wo")),
             _w(rng, "fc", (classes, d), 1.0), _w(rng, "fc_b", (classes,), 0.1)]
    return _model("patch_attention", nodes, inits, (3, 8, 8), classes)


BLOCKS = {"bottleneck": bottleneck, "depthwise_se": depthwise_se, "patch_attention": patch_attention}


def _images(n=40, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 3, 8, 8)).astype(np.float32)


def _track_sessions(monkeypatch) -> list:
    """Weak references to every onnxruntime session walkaudit makes from here on."""
    made = []
    original = Runtime.session

    def session(self, *args, **kwargs):
        s = original(self, *args, **kwargs)
        made.append(weakref.ref(s))
        return s

    monkeypatch.setattr(Runtime, "session", session)
    return made


def _alive(made) -> int:
    gc.collect()
    return sum(1 for r in made if r() is not None)


@pytest.mark.parametrize("name", list(BLOCKS))
def test_a_sites_sessions_are_released_when_its_search_is_done(name, monkeypatch):
    """Between sites no session lives, however many sites (before: every site's suffix and prefix sessions, and
    the clean model's, lived until the end of the audit)."""
    made = _track_sessions(monkeypatch)
    run = walkaudit.iter_audit(BLOCKS[name](), _images(), provider="cpu", seed=1, sigmas=(0.1, 1.0, 10.0),
                               repeats=1)
    live = []
    for _ in run:
        live.append((run._executor.worker.live_evaluations, _alive(made)))
    sites = len(run.results)
    assert sites >= 5
    assert all(evaluations == 0 for evaluations, _ in live)  # a finished site holds nothing
    assert all(sessions == 0 for _, sessions in live)  # not even the clean model's, once its pass is done
    assert len(made) > sites  # and sessions were made for the sites: there was something to release


@pytest.mark.parametrize("name", list(BLOCKS))
def test_releasing_sites_leaves_the_report_unchanged_bit_for_bit(name):
    """The same audit with an executor that never releases (every evaluation kept, as before) gives the same
    report, timings aside."""
    model, x = BLOCKS[name](seed=3), _images(seed=3)

    class KeepAll(InProcess):
        def release(self, sites):  # as before: every evaluation kept to the end
            pass

    executors = []

    def keep_all(resolved, progress):
        executors.append(KeepAll(resolved.build(), progress.advance))
        return executors[-1]

    def body(report):
        d = report.to_dict()
        d["runtime"].pop("elapsed_s")
        return d

    released = walkaudit.audit(model, x, provider="cpu", seed=2, repeats=2)
    run = walkaudit.iter_audit(model, x, provider="cpu", seed=2, repeats=2, executor=keep_all)
    kept = list(run)
    assert executors[0].worker.live_evaluations == len(kept)  # nothing was released on that path
    assert body(released) == body(run.report())


def _worker(model, x, budget, sites=None):
    loaded = load_model(model, None)
    data = data_mod.from_arrays(x, None, loaded.inputs)
    chosen = select(loaded.proto, loaded.types, Selection(), loaded.class_output.name)
    source = NormalSource(5, 1)
    worker = Worker(loaded, data, runtime=Runtime("cpu", 1), noise=make_noise("additive", 0.5), source=source,
                    sites=chosen if sites is None else sites, batch_size=16, cache_bytes=budget)
    return worker, source


def test_every_cache_counts_against_one_budget_and_the_counts_do_not_depend_on_it():
    """The clean values kept by the clean pass and cached by the evaluations alive stay within `cache_bytes`
    together; a budget too small for them all changes where the values come from (the prefix), not the counts."""
    model, x = bottleneck(seed=4), _images(n=72, seed=4)
    counts, peaks = {}, {}
    for budget in (1 << 30, 60_000):
        worker, source = _worker(model, x, budget)
        try:
            worker.clean_pass(keep=True)
            held = [worker.cached_bytes]
            results = []
            for site in worker.sites:
                # three units of one site live at once (several σ rounds), then the site is released
                for sigmas in ((0.1, 1.0), (3.0,), (0.5, 2.0)):
                    unit = WorkUnit(worker.key, (site.name,), sigmas, 2, (0, 2), 5)
                    c = worker.evaluate(unit)
                    results.append((c.correct.tolist(), c.nonfinite.tolist(), c.samples))
                    held.append(worker.cached_bytes)
                worker.release((site.name,))
                held.append(worker.cached_bytes)
            counts[budget], peaks[budget] = results, worker.cache_peak
            assert max(held) <= worker.cache_peak <= budget
            assert worker.live_evaluations == 0 and worker.kept_bytes == 0  # all handed back
        finally:
            source.close()
    assert peaks[60_000] > 0  # the small budget was used...
    assert peaks[1 << 30] > 60_000  # ...and it bound: unbounded, the caches held more
    assert counts[60_000] == counts[1 << 30]


def test_the_report_states_the_cache_budget():
    report = walkaudit.audit(bottleneck(), _images(), provider="cpu", sigmas=(1.0,), repeats=1)
    assert report.to_dict()["runtime"]["cache_budget_bytes"] == 256 << 20


@pytest.mark.parametrize("row_shape", [(7,), (3, 50, 50), (CHUNK // 3 + 7,)])
@pytest.mark.parametrize("rows", [range(0, 8), range(5, 61), range(60, 130), range(100, 200)])
def test_part_of_a_noise_block_equals_the_block_drawn_whole_and_nothing_is_kept(rows, row_shape):
    """A batch that covers part of a block (8 samples in all, or a batch of 100) draws only the chunks it needs;
    its numbers are the whole block's, and the source keeps nothing between batches (it kept every partly used
    block before: 200 MB per site and repeat on ResNet-18's first layer with 8 images)."""
    source = NormalSource(9, 2)
    try:
        got = source.rows("site", 1, 2, rows, row_shape)
        blocks = range(rows.start // BLOCK, (rows.stop - 1) // BLOCK + 1)
        whole = np.concatenate([source.normal((BLOCK, *row_shape), (name_key("site"), 1, b, 2)) for b in blocks])
        start = rows.start - blocks[0] * BLOCK
        np.testing.assert_array_equal(got, whole[start : start + len(rows)])
        assert not [k for k, v in vars(source).items() if isinstance(v, dict) and v]
    finally:
        source.close()


def test_the_heap_is_trimmed_without_failing_where_the_c_library_cannot():
    runtime_mod.trim_heap()  # glibc: hands free pages back; elsewhere: nothing, and no error


@pytest.mark.slow
def test_the_default_batch_keeps_a_batch_of_site_values_within_a_gibibyte():
    """Without --batch-size a model with large activations gets a batch whose site values fit 1 GiB (an audit then
    needs about the memory inference does), a small one the default; the counts do not depend on it."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(16, 1, 3, 3)).astype(np.float32), "w")
    head = numpy_helper.from_array(rng.normal(size=(16, 4)).astype(np.float32), "head")
    nodes = [helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["conv"], ["pool"]),
             helper.make_node("Flatten", ["pool"], ["flat"]),
             helper.make_node("MatMul", ["flat", "head"], ["logits"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 512, 512])]
    graph = helper.make_graph(nodes, "wide", inputs,
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])], [w, head])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    x = rng.normal(size=(40, 1, 512, 512)).astype(np.float32)  # a conv site of 16 MiB a sample
    options = dict(provider="cpu", seed=1, sigmas=(0.1, 10.0), repeats=1, sites=("conv",))
    bounded = walkaudit.audit(model, x, **options)
    assert 1 <= bounded.config.batch_size <= 32  # 256 samples would hold 12 GiB of site values
    given = walkaudit.audit(model, x, batch_size=40, **options)
    assert [p.accuracy for p in bounded.sites[0].points] == [p.accuracy for p in given.sites[0].points]


# --- weights named, not copied ----------------------------------------------------------------------------------------

def test_derived_graphs_name_large_weights_and_the_runtime_holds_them_once(monkeypatch):
    """The suffix, prefix and exposed graphs carry a stub for every large weight (name, type, shape), never its
    bytes; the loaded model keeps its own; and the audit is the same bit for bit as with every weight serialized
    into every session (GPT-2's first site held three copies of 0.3–0.6 GB in protobufs: peak 4.2 → 2.1 GiB)."""
    from walkaudit._graph import passes, weights

    monkeypatch.setattr(weights, "SHARE_BYTES", 256)  # the (d, d) projections and the patch kernel are large here
    loaded = load_model(patch_attention(), None)
    big = {t.name for t in loaded.proto.graph.initializer if weights.shareable(t)}
    assert {"wq", "wk", "wv", "wo", "patch"} <= big
    derived = [passes.expose(loaded.proto, ["q"], loaded.types),
               passes.suffix(loaded.proto, "q", "logits", loaded.types).model,
               passes.prefix(loaded.proto, ["q", "tokens"], loaded.types)]
    for graph in derived:
        inits = {t.name: t for t in graph.graph.initializer}
        assert all(weights.is_stub(inits[n]) and not inits[n].raw_data for n in big & set(inits))
    assert {n for g in derived for n in big & {t.name for t in g.graph.initializer}} == big
    assert not any(weights.is_stub(t) for t in loaded.proto.graph.initializer)  # the model's own keep their bytes

    def body(report):
        d = report.to_dict()
        d["runtime"].pop("elapsed_s")
        return d

    x = _images(seed=4)
    named = walkaudit.audit(patch_attention(), x, provider="cpu", seed=3, repeats=2)
    monkeypatch.setattr(weights, "SHARE_BYTES", 1 << 62)  # nothing shared: every session parses its weights
    serialized = walkaudit.audit(patch_attention(), x, provider="cpu", seed=3, repeats=2)
    assert body(named) == body(serialized)


def test_a_weight_no_shared_model_holds_is_one_clear_failure():
    from walkaudit._graph import weights
    from walkaudit.errors import RuntimeFailure

    proto = patch_attention()
    graph = proto.graph
    kept = [weights.stub(t) if t.name == "wq" else t for t in graph.initializer]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    with pytest.raises(RuntimeFailure, match="weight 'wq'"):
        Runtime("cpu").session(proto, "part of the model")


def test_after_the_clean_pass_no_session_runs_the_whole_model_again(monkeypatch):
    """A site whose rows fold the samples with the tokens ([N·T, D] before GPT-2's Conv1D) is told apart by the
    clean values of one and two samples: they come from the site's own prefix, not from the whole clean model made
    again (+0.7 GB on GPT-2)."""
    from .test_leak import hf_encoder, token_ids

    made: list[str] = []
    original = Runtime.session

    def session(self, model, what="model", exact=False):
        made.append(what)
        return original(self, model, what, exact)

    monkeypatch.setattr(Runtime, "session", session)
    report = walkaudit.audit(hf_encoder(), {"input_ids": token_ids(60, 5)}, provider="cpu", seed=1, repeats=1,
                             sigmas=(0.1, 1.0, 10.0))
    assert any(s.name == "f2" for s in report.sites)  # the folded site was audited
    assert made.count("model") == 1, made


def test_the_weights_bytes_are_counted_from_their_shapes_without_encoding_the_model():
    from walkaudit._graph import weights

    proto = patch_attention()
    assert weights.nbytes(proto) == sum(numpy_helper.to_array(t).nbytes for t in proto.graph.initializer)
