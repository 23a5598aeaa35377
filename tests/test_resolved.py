"""One resolved audit: the driver resolves every choice once (`ResolvedAudit`) and every executor builds its workers
from it. Differential: every bundled sample model audited in process, on a local Ray cluster (two actors, each its
own slice of the data) and as two shards merged gives the same report, timings and placement aside. The two-output
model failed here before: its Ray workers re-chose the class output without the data and audited the embedding."""

from __future__ import annotations

import copy
import dataclasses
import pickle
from pathlib import Path

import numpy as np
import pytest

from walkaudit import api
from walkaudit._execution.resolved import ResolvedAudit
from walkaudit.errors import RuntimeFailure
from walkaudit.report.merge import merge

pytestmark = pytest.mark.slow  # the quick run (`python -m pytest -q`) leaves this module out

SAMPLES = Path(__file__).resolve().parent.parent / "samples"

#: (model, data, limit, options): one of each kind the samples hold
CASES = [
    ("digits_two_output.dynamo.onnx", "digits_val.npz", 200, {}),  # two outputs: the class output from the data
    ("digits_tokens_transformer.dynamo.onnx", "digits_tokens_val.npz", 100, {}),  # tokens, [T·N, D] folds, axis 1
    ("digits_tokens_cls.dynamo.onnx", "digits_tokens_val.npz", 150, {}),  # [CLS]: the pruned tail
    ("digits_rows_lstm.dynamo.onnx", "digits_rows_val.npz", 200, {}),  # LSTM: samples along axis 1
    ("digits_pixel_lm.dynamo.onnx", "digits_pixel_lm_val.npz", 100, {}),  # per-token scoring, mask, ignore label
    ("digits_sklearn_mlp.onnx", "digits_val.npz", 200, {}),  # sklearn: label and probability outputs
    ("digits_sklearn_mlp_zipmap.onnx", "digits_val.npz", 200, {}),  # ZipMap
    ("mnist_lenet5.dynamo.onnx", "mnist_val.npz", 200, {}),
    ("mnist_mlp_bn.legacy.onnx", "mnist_val.npz", 200, {}),  # MLP with BatchNormalization nodes
    ("mnist_mlp.dynamo.onnx", "mnist_val.npz", 200, {"noise": "weight-additive"}),  # sites are weights
    ("digits_tokens_transformer.legacy.onnx", "digits_tokens_val.npz", 100, {}),  # sequence-first attention
    ("mnist_lenet5.legacy.onnx", "mnist_val.npz", 200, {}),
    ("mnist_mlp.jax.onnx", "mnist_val.npz", 200, {}),  # jax2onnx
    ("mnist_lenet5.qdq.onnx", "mnist_val.npz", 200, {}),  # INT8 QDQ: the fused graph, dequantised sites
    ("mnist_lenet5.qdq.onnx", "mnist_val.npz", 200, {"noise": "bitflip", "sigmas": (1e-3, 1e-1)}),  # int8 bits
]
OPTIONS = dict(sigmas=(0.3, 3.0), repeats=1, seed=4, provider="cpu", threads=1, batch_size=64)


def _plain(report) -> dict:
    """The report without what may differ between executors: timings, and the note saying where units ran."""
    body = copy.deepcopy(report.to_dict())
    runtime = body["runtime"]
    runtime.pop("elapsed_s")
    runtime["notes"] = [n for n in runtime["notes"] if "Ray workers" not in n]
    body["config"].pop("shard")
    body.pop("gate", None)
    body["config"].pop("gate", None)
    return body


def _audit(name: str, data: str, limit: int, **options):
    return api.audit(str(SAMPLES / name), data=str(SAMPLES / data), limit=limit, **{**OPTIONS, **options})


@pytest.mark.parametrize("name, data, limit, options", CASES,
                         ids=[c[0].removesuffix(".onnx") + (f"-{c[3]['noise']}" if c[3] else "") for c in CASES])
def test_in_process_ray_and_merged_shards_give_the_same_report(ray_cluster, name, data, limit, options):
    from walkaudit._execution import ray_executor

    want = _audit(name, data, limit, **options)
    made = []

    def on_ray(audit, progress):
        made.append(ray_executor.connect(None, audit, workers=2, threads=1, piece_seconds=0.002)(audit, progress))
        return made[-1]

    got = _audit(name, data, limit, executor=on_ray, **options)
    assert len(made[0].slices) == 2  # two actors, each its own rows
    assert _plain(got) == _plain(want)
    shards = [_audit(name, data, limit, shard=(i, 2), **options) for i in (1, 2)]
    assert _plain(merge(shards)) == _plain(want)


def test_the_two_output_models_workers_score_the_class_output_the_driver_chose():
    """The driver chose `linear_1` from the data (the first float output, `relu`, is an embedding); a worker built
    from the resolved audit in another process scores that output, whatever it would choose by itself."""
    run = api.iter_audit(str(SAMPLES / "digits_two_output.dynamo.onnx"), data=str(SAMPLES / "digits_val.npz"),
                         **OPTIONS)
    run.start()
    try:
        audit = pickle.loads(pickle.dumps(run.resolved.with_model_bytes(run.loaded.proto)))
        assert audit.class_output.name == "linear_1"
        worker = audit.build(threads=1)
        try:
            stats = worker.clean_pass()
        finally:
            worker.source.close()
        assert worker.model.class_output == run.resolved.class_output
        assert (stats.correct, stats.samples) == (run.clean.correct, run.clean.samples)
        assert stats.correct / stats.samples > 0.9  # the embedding's argmax scores 0.02
    finally:
        run.close()


def test_the_resolved_audit_is_immutable_and_refuses_another_model():
    run = api.iter_audit(str(SAMPLES / "mnist_mlp.dynamo.onnx"), data=str(SAMPLES / "mnist_val.npz"), limit=64,
                         **OPTIONS)
    run.start()
    try:
        audit = run.resolved
        with pytest.raises(dataclasses.FrozenInstanceError):
            audit.batch_size = 7
        assert audit.sites == tuple(s.name for s in run.sites) and audit.batch_size == 64
        assert audit.data.path == str(SAMPLES / "mnist_val.npz") and audit.data.arrays is None
        assert np.array_equal(audit.data.labels, run.dataset.labels)
        other = api.iter_audit(str(SAMPLES / "mnist_lenet5.dynamo.onnx"), data=str(SAMPLES / "mnist_val.npz"),
                               limit=64, **OPTIONS)
        with pytest.raises(RuntimeFailure, match="was handed model"):
            audit.build(model=other.loaded)
        with pytest.raises(RuntimeFailure, match="carries no model"):
            audit.build()
    finally:
        run.close()


def test_the_driver_resolves_the_batch_size_of_a_fixed_batch_model_once(tmp_path):
    """A model with a fixed batch: the driver's resolved batch is the model's, its note said once."""
    from .models import mlp

    model = mlp(seed=1)
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 16
    x = np.random.default_rng(0).normal(size=(40, 16)).astype(np.float32)
    report = api.audit(model, x, sigmas=(0.1,), repeats=1, provider="cpu", threads=1, batch_size=32)
    assert report.config.batch_size == 16
    assert sum("fixed batch size of 16" in n for n in report.runtime.notes) == 1


def test_a_resolved_audit_survives_pickling_with_its_arrays():
    """In-memory data travels as arrays, with the labels the driver resolved (not re-read or re-derived)."""
    from .models import mlp, teacher_labels

    model = mlp(seed=1)
    x = np.random.default_rng(5).normal(size=(130, 16)).astype(np.float32)
    y = teacher_labels(model, x)
    y[::4] = (y[::4] + 1) % 4
    run = api.iter_audit(model, x, y, **OPTIONS)
    run.start()
    try:
        audit = pickle.loads(pickle.dumps(run.resolved.with_model_bytes(run.loaded.proto)))
        assert isinstance(audit, ResolvedAudit) and audit.data.path is None
        worker = audit.build(threads=1)
        try:
            stats = worker.clean_pass()
        finally:
            worker.source.close()
        assert (stats.correct, stats.samples) == (run.clean.correct, run.clean.samples) and stats.correct < 110
    finally:
        run.close()
