"""The model-family samples of issue #13 (samples/make.py --only families rebuilds them): a BERT-style token
transformer with int64 inputs and an attention mask, a BERT-style classifier that reads position 0 ([CLS]), an LSTM
classifier, a per-token language model and a two-output model whose first output is an embedding. Real exporters,
real data; no torch needed here."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import walkaudit
from walkaudit._graph.positions import constant_value

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
MANIFEST = json.loads((SAMPLES / "manifest.json").read_text())
FAMILY = {m["file"]: m for m in MANIFEST["family_models"]}
TRANSFORMERS = ["digits_tokens_transformer.dynamo.onnx", "digits_tokens_transformer.legacy.onnx"]
CLS = ["digits_tokens_cls.dynamo.onnx", "digits_tokens_cls.legacy.onnx"]
LSTMS = ["digits_rows_lstm.dynamo.onnx", "digits_rows_lstm.legacy.onnx"]
LM = "digits_pixel_lm.dynamo.onnx"
TWO_OUTPUT = "digits_two_output.dynamo.onnx"
IGNORE = -100
# A wide grid so every site crosses halfway inside it; one repeat: these tests check the plumbing, not the numbers.
FAST = {"provider": "cpu", "sigmas": (0.1, 1.0, 10.0, 100.0, 1000.0), "repeats": 1}


def feeds_and_labels(entry: dict, limit: int | None = None) -> tuple[dict, np.ndarray]:
    """The model inputs (by the manifest's input names) and the labels of a sample's data file."""
    with np.load(SAMPLES / entry["data"], allow_pickle=False) as data:
        feeds = {name: data[name][:limit] for name in entry["inputs"]}
        labels = data["labels" if "labels" in data else "y"][:limit]
    return feeds, labels


def session(name: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(SAMPLES / name), providers=["CPUExecutionProvider"])


def run(name: str, feeds: dict, output: str | None = None) -> np.ndarray:
    return session(name).run([output or FAMILY[name]["class_output"]], feeds)[0]


def test_the_manifest_lists_every_family_sample_and_its_data():
    assert sorted(FAMILY) == sorted([*TRANSFORMERS, *CLS, *LSTMS, LM, TWO_OUTPUT])
    for entry in FAMILY.values():
        assert entry["data"] in MANIFEST["data"], entry["file"]


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_the_manifest_hashes_match_the_files(name):
    entry = FAMILY[name]
    assert hashlib.sha256((SAMPLES / name).read_bytes()).hexdigest() == entry["sha256"]
    data = MANIFEST["data"][entry["data"]]
    assert hashlib.sha256((SAMPLES / entry["data"]).read_bytes()).hexdigest() == data["sha256"], entry["data"]


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_clean_accuracy_by_onnxruntime_matches_the_manifest(name):
    """Per sample for the classifiers; over the scored positions (label ≠ -100) for the per-token model."""
    entry = FAMILY[name]
    feeds, labels = feeds_and_labels(entry)
    logits = run(name, feeds)
    if labels.ndim == 2:
        scored = labels != IGNORE
        accuracy = float((logits.argmax(-1)[scored] == labels[scored]).mean())
    else:
        accuracy = float((logits.argmax(1) == labels).mean())
    assert accuracy == pytest.approx(entry["clean_accuracy"], abs=5e-5)
    assert accuracy > 2 / entry["num_classes"]  # trained: well above chance


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_every_input_has_a_dynamic_batch(name):
    """Batches of 1 and 7 give the rows of the whole-data batch (the exporters can bake the batch into Reshapes)."""
    feeds, _ = feeds_and_labels(FAMILY[name], limit=60)
    graph = onnx.load(str(SAMPLES / name), load_external_data=False).graph
    assert [i.name for i in graph.input] == list(feeds)
    for inp in graph.input:
        assert inp.type.tensor_type.shape.dim[0].dim_param, inp.name
    whole = run(name, feeds)
    for batch in (1, 7):
        part = run(name, {k: v[:batch] for k, v in feeds.items()})
        np.testing.assert_allclose(part, whole[:batch], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", [*TRANSFORMERS, *CLS])
def test_the_transformer_honours_its_attention_mask(name):
    """Masked positions are ignored (other pad ids there change nothing) and the mask matters (all ones changes the
    logits)."""
    feeds, _ = feeds_and_labels(FAMILY[name], limit=60)
    ids, mask = feeds["input_ids"], feeds["attention_mask"]
    assert (mask == 0).any(axis=1).all()  # every sequence is padded: lengths vary, all shorter than T
    logits = run(name, feeds)
    other_pad = np.where(mask == 0, (ids + 5) % 18, ids)
    np.testing.assert_allclose(run(name, {"input_ids": other_pad, "attention_mask": mask}), logits, atol=1e-4)
    unmasked = run(name, {"input_ids": ids, "attention_mask": np.ones_like(mask)})
    assert np.abs(unmasked - logits).max() > 1e-2


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_the_transformer_audits_with_its_attention_sites(name):
    """QKV projection (last dim 3·32), scores [N, 4 heads, 64, 64], context [N, 4, 64, 8], output projection and
    FFN of both encoder layers are default sites, and every site's midpoint is finite. Only attention scores may be
    censored above the grid: past the softmax's saturation each query attends one random position, and a layer whose
    attention the classifier barely needs then keeps accuracy above halfway (the second layer's does, at ~0.5)."""
    entry = FAMILY[name]
    feeds, labels = feeds_and_labels(entry, limit=60)
    report = walkaudit.audit(SAMPLES / name, data=str(SAMPLES / entry["data"]), limit=60, **FAST)
    assert report.model.class_output == "logits"
    assert report.clean_accuracy == pytest.approx(float((run(name, feeds).argmax(1) == labels).mean()))
    shapes = [(s.op_type, tuple(s.shape or ())[-2:]) for s in report.sites]
    last = [dims[-1] if dims else None for _, dims in shapes]
    assert last.count(96) == 2  # Q/K/V in-projection, one per layer
    assert sum(op == "MatMul" and dims == (64, 64) for op, dims in shapes) == 2  # attention scores
    # context per head; the legacy exporter leaves its last dimension symbolic ('unk__16')
    assert sum(op == "MatMul" and dims[0] == 64 and (dims[1] == 8 or isinstance(dims[1], str))
               for op, dims in shapes) == 2
    assert sum(op == "MatMul+Add" and d == 64 for (op, _), d in zip(shapes, last)) == 2  # FFN up-projection
    assert report.sites[-1].name == "logits"
    for site, (op, dims) in zip(report.sites, shapes):
        assert site.midpoint is not None and np.isfinite(site.midpoint), site.name
        assert site.censored is None or (op == "MatMul" and dims == (64, 64) and site.censored == "above"), site.name
        assert site.points[0].accuracy > site.points[-1].accuracy, site.name


@pytest.mark.parametrize("name", CLS)
def test_the_cls_classifier_reads_position_0_only(name):
    """Walking up from the class output through the head (Gemm, or MatMul and Add, on non-constant inputs), the first
    Gather or Slice reads index 0 along axis 1 of a [batch, seq, 32] value: the [CLS] read h[:, 0]."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(SAMPLES / name)))
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*graph.value_info, *graph.input, *graph.output]}
    value, steps = FAMILY[name]["class_output"], 0
    while producer[value].op_type not in ("Gather", "Slice"):
        node = producer[value]
        assert node.op_type in ("Gemm", "MatMul", "Add", "Squeeze", "Reshape"), (value, node.op_type)
        (value,) = [i for i in node.input if i and constant_value(graph, i) is None]
        steps += 1
        assert steps < 6, value
    read = producer[value]
    data = read.input[0]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in read.attribute}
    if read.op_type == "Gather":
        assert attrs.get("axis", 0) == 1
        assert constant_value(graph, read.input[1]).tolist() in (0, [0])
    else:  # Slice(data, starts, ends, axes)
        starts, ends, axes = (constant_value(graph, n).tolist() for n in read.input[1:4])
        assert (starts, ends, axes) == ([0], [1], [1])
    shape = shapes[data]
    assert len(shape) == 3 and shape[2] == 32, shape
    assert all(isinstance(d, str) for d in shape[:2]), shape  # batch and sequence axes are symbolic
    assert producer[data].op_type == "LayerNormalization"  # the last encoder layer's output
    assert shapes[FAMILY[name]["class_output"]][1] == 10


@pytest.mark.parametrize("name", CLS)
def test_the_cls_classifier_has_a_dynamic_sequence_axis(name):
    """Both inputs have a symbolic sequence axis; dropping the last column (padding in every validation sequence)
    leaves the logits unchanged, and a shorter prefix runs."""
    feeds, _ = feeds_and_labels(FAMILY[name], limit=60)
    graph = onnx.load(str(SAMPLES / name), load_external_data=False).graph
    for inp in graph.input:
        assert inp.type.tensor_type.shape.dim[1].dim_param, inp.name
    assert not feeds["attention_mask"][:, -1].any()
    whole = run(name, feeds)
    cut = run(name, {k: v[:, :-1] for k, v in feeds.items()})
    np.testing.assert_allclose(cut, whole, rtol=1e-4, atol=1e-4)
    assert run(name, {k: v[:, :16] for k, v in feeds.items()}).shape == whole.shape


@pytest.mark.parametrize("name", LSTMS)
def test_the_lstm_node_is_a_default_site(name):
    entry = FAMILY[name]
    report = walkaudit.audit(SAMPLES / name, data=str(SAMPLES / entry["data"]), limit=100, **FAST)
    ops = [s.op_type for s in report.sites]
    assert "LSTM" in ops and ops[-1] == "Gemm"
    lstm = report.sites[ops.index("LSTM")]
    assert lstm.censored is None and np.isfinite(lstm.midpoint)
    assert lstm.points[0].accuracy > lstm.points[-1].accuracy


def test_the_two_output_model_is_audited_on_its_logits_not_its_embedding():
    """The first output is a ReLU embedding [N, 32] that also looks like scores; its argmax is near chance. The
    audit must read the logits (the manifest's class output) and report their clean accuracy."""
    entry = FAMILY[TWO_OUTPUT]
    feeds, labels = feeds_and_labels(entry)
    sess = session(TWO_OUTPUT)
    first, second = (o.name for o in sess.get_outputs())
    assert second == entry["class_output"] and first == entry["embedding_output"]
    embedding = sess.run([first], feeds)[0]
    assert embedding.shape == (len(labels), 32)
    embedding_accuracy = float((embedding.argmax(1) == labels).mean())
    report = walkaudit.audit(SAMPLES / TWO_OUTPUT, data=str(SAMPLES / entry["data"]), **FAST)
    assert report.model.class_output == entry["class_output"]
    assert report.clean_accuracy == pytest.approx(entry["clean_accuracy"], abs=5e-5)
    assert abs(report.clean_accuracy - embedding_accuracy) > 0.5


def test_the_language_model_file_has_per_token_shapes_and_shifted_labels():
    """logits [N, T, V]; labels [N, T] are the inputs shifted by one with -100 at padding and at the last real
    position; numpy's token accuracy over the scored positions is the manifest's."""
    entry = FAMILY[LM]
    feeds, labels = feeds_and_labels(entry)
    ids, mask = feeds["input_ids"], feeds["attention_mask"]
    logits = run(LM, feeds)
    n, t = ids.shape
    assert logits.shape[:2] == (n, t) and labels.shape == (n, t) and logits.shape[2] == entry["num_classes"]
    assert ids.max() < entry["num_classes"]
    lengths = mask.sum(1)
    assert (mask == (np.arange(t) < lengths[:, None])).all()  # right-padded
    scored = np.arange(t) < (lengths - 1)[:, None]
    assert ((labels != IGNORE) == scored).all()
    assert (labels[:, :-1][scored[:, :-1]] == ids[:, 1:][scored[:, :-1]]).all()
    accuracy = float((logits.argmax(-1)[scored] == labels[scored]).mean())
    assert accuracy == pytest.approx(entry["clean_accuracy"], abs=5e-5)
