"""Per-token class outputs ([N, T, C]: a tagger, a language model's next token): accuracy over scored tokens.

A position is scored when its label is not the ignore label (-100 unless told) and the attention mask (the input
`attention_mask`, or the one named) is non-zero there. Counts count scored tokens and still add up exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import walkaudit
from walkaudit._execution.runtime import Runtime
from walkaudit._execution.worker import Worker
from walkaudit._graph.sites import Selection, select
from walkaudit._loading.data import from_arrays
from walkaudit._loading.model import load_model
from walkaudit._noise import NormalSource, make_noise
from walkaudit._units import BLOCK, WorkUnit
from walkaudit.cli import main
from walkaudit.errors import DataError, UsageError
from walkaudit.report.schema import validate_report

from .models import IR, cpu_session

VOCAB, CLASSES, T = 12, 5, 6
SAMPLES = Path(__file__).resolve().parents[1] / "samples"


def _init(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def tagger(seed: int = 0, mask: str | None = "used", out_t: int = T, hidden_output: bool = False,
           name: str = "logits") -> onnx.ModelProto:
    """input_ids [N, T] -> embedding -> MatMul+Add -> Relu -> MatMul+Add -> logits [N, out_t, C], position by
    position. mask "used": the embeddings are multiplied by `attention_mask` [N, T]; "unused": the input exists but
    the logits ignore it; None: no mask input. out_t < T: the logits keep only the first out_t positions.
    hidden_output: the hidden states [N, T, 16] are a second output (before the logits, named `name`)."""
    rng = np.random.default_rng(seed)
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", T])]
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["e"], name="embed")]
    x = "e"
    if mask is not None:
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", T]))
    if mask == "used":
        nodes += [helper.make_node("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT),
                  helper.make_node("Unsqueeze", ["mf", "last"], ["mu"]),
                  helper.make_node("Mul", ["e", "mu"], ["em"])]
        x = "em"
    nodes += [helper.make_node("MatMul", [x, "w1"], ["h0"], name="fc1"),
              helper.make_node("Add", ["h0", "b1"], ["h"], name="fc1_bias"),
              helper.make_node("Relu", ["h"], ["hr"], name="relu"),
              helper.make_node("MatMul", ["hr", "w2"], ["l0"], name="fc2"),
              helper.make_node("Add", ["l0", "b2"], ["l1"], name="fc2_bias")]
    if out_t != T:
        nodes.append(helper.make_node("Slice", ["l1", "zero", "stop", "one"], [name], name="crop"))
    else:
        nodes.append(helper.make_node("Identity", ["l1"], [name]))
    inits = [_init("emb", rng.normal(0, 1, (VOCAB, 8))), _init("w1", rng.normal(0, 0.35, (8, 16))),
             _init("b1", rng.normal(0, 0.1, 16)), _init("w2", rng.normal(0, 0.25, (16, CLASSES))),
             _init("b2", np.zeros(CLASSES))]
    inits += [numpy_helper.from_array(np.array(v, np.int64), n)
              for n, v in (("last", [-1]), ("zero", [0]), ("stop", [out_t]), ("one", [1]))]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", out_t, CLASSES])]
    if hidden_output:
        outputs.insert(0, helper.make_tensor_value_info("hr", TensorProto.FLOAT, ["N", T, 16]))
    graph = helper.make_graph(nodes, "tagger", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR)


def _data(model, n: int = 300, seed: int = 1, flip: float = 0.25):
    """Token ids, an attention mask (a prefix of 2..T tokens per row), and labels: the clean model's classes with
    a share `flip` changed, -100 at the first position of every row."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (n, T))
    mask = (np.arange(T)[None] < rng.integers(2, T + 1, (n, 1))).astype(np.int64)
    logits = _logits(model, ids, mask)
    labels = logits.argmax(-1)
    labels = np.where(rng.random(labels.shape) < flip, (labels + 1) % CLASSES, labels)
    labels[:, 0] = -100
    return {"input_ids": ids, "attention_mask": mask}, labels


def _logits(model, ids, mask=None):
    feeds = {"input_ids": ids}
    if any(i.name == "attention_mask" for i in model.graph.input):
        feeds["attention_mask"] = mask
    return cpu_session(model).run([model.graph.output[-1].name], feeds)[0]


def _without_timings(report) -> dict:
    body = report.to_dict()
    body["runtime"].pop("elapsed_s")
    return body


ARGS = dict(provider="cpu", sigmas=(0.05, 0.3, 1.0, 3.0), repeats=2, seed=3)


def test_clean_token_accuracy_is_the_share_of_scored_tokens_predicted_right():
    model = tagger(seed=2)
    x, y = _data(model)
    report = walkaudit.audit(model, x, y, **ARGS)
    scored = (y != -100) & (x["attention_mask"] != 0)
    right = (_logits(model, x["input_ids"], x["attention_mask"]).argmax(-1) == y) & scored
    assert report.clean_accuracy == right.sum() / scored.sum()
    assert 0.6 < report.clean_accuracy < 0.9  # a quarter of the labels were changed
    assert report.clean_counts.samples == scored.sum() < y.size
    assert report.data.scored == "tokens" and report.data.samples == 300
    assert report.data.extra["scored_tokens"] == scored.sum() and report.data.extra["mask"] == "attention_mask"
    assert report.model.output_kind == "scores" and report.num_classes == CLASSES
    assert report.chance == pytest.approx(1 / CLASSES)
    assert [s.name for s in report.sites] == ["h", "l1"]
    for site in report.sites:
        assert all(p.samples == scored.sum() for p in site.points)
        assert site.points[0].accuracy > site.points[-1].accuracy  # noise lowers token accuracy


def test_without_labels_accuracy_is_agreement_over_the_unmasked_tokens():
    model = tagger(seed=3)
    x, _ = _data(model)
    report = walkaudit.audit(model, x, **ARGS)
    assert report.clean_accuracy == 1.0 and report.data.labels == "clean-predictions"
    assert report.clean_counts.samples == (x["attention_mask"] != 0).sum()
    assert report.data.scored == "tokens"


def test_labels_at_ignored_positions_and_logits_at_masked_positions_change_nothing():
    """The mask input is not read by this model: the logits at masked positions change with the token ids there."""
    model = tagger(seed=4, mask="unused")
    x, y = _data(model)
    masked = x["attention_mask"] == 0
    rng = np.random.default_rng(9)
    other_ids = np.where(masked, (x["input_ids"] + 1 + rng.integers(0, VOCAB - 1, masked.shape)) % VOCAB,
                         x["input_ids"])
    other_labels = np.where(masked | (y == -100), rng.integers(0, CLASSES, y.shape), y)
    other_labels[:, 0] = -100
    before = _logits(model, x["input_ids"])
    after = _logits(model, other_ids)
    assert not np.array_equal(before[masked], after[masked])  # the change reaches the logits
    assert np.array_equal(before[~masked], after[~masked])
    base = walkaudit.audit(model, x, y, **ARGS)
    changed = walkaudit.audit(model, {**x, "input_ids": other_ids}, other_labels, **ARGS)
    assert changed.clean_accuracy == base.clean_accuracy
    assert changed.clean_counts == base.clean_counts
    for a, b in zip(base.sites, changed.sites):
        assert a.points == b.points and a.midpoint == b.midpoint
    # and the mask does change what is counted
    unmasked = walkaudit.audit(model, {**x, "attention_mask": np.ones_like(x["attention_mask"])}, y, **ARGS)
    assert unmasked.clean_counts.samples > base.clean_counts.samples


def test_another_ignore_label_and_a_named_mask():
    model = tagger(seed=5, mask=None)
    x, y = _data(model)
    ids = x["input_ids"]
    a = walkaudit.audit(model, {"input_ids": ids}, y, **ARGS)
    b = walkaudit.audit(model, {"input_ids": ids}, np.where(y == -100, 7, y), ignore_label=7, **ARGS)
    assert _without_timings(a)["sites"] == _without_timings(b)["sites"]
    assert a.clean_counts == b.clean_counts and a.clean_counts.samples == (y != -100).sum()
    assert b.data.extra["ignore_label"] == 7 and a.data.extra["mask"] is None
    with pytest.raises(UsageError, match="^mask 'attention_mask' is not an input of the model"):
        walkaudit.audit(model, {"input_ids": ids}, y, mask="attention_mask", **ARGS)
    with pytest.raises(UsageError, match="^ignore_label must be a whole number"):
        walkaudit.audit(model, {"input_ids": ids}, y, ignore_label=1.5, **ARGS)


def test_a_mask_named_for_a_per_sample_output_is_refused():
    from .models import mlp

    x = np.zeros((8, 16), np.float32)
    with pytest.raises(UsageError, match="a mask applies to a class output per token"):
        walkaudit.audit(mlp(), x, mask="x", **ARGS)


def _worker(model, x, y, batch_size):
    loaded = load_model(model)
    sites = select(loaded.proto, loaded.types, Selection(), loaded.class_output.name)
    data = from_arrays(x, y, loaded.inputs, num_classes=CLASSES, per_token=True)
    return Worker(loaded, data, runtime=Runtime("cpu"), noise=make_noise("additive", 0.5),
                  source=NormalSource(5, threads=1), sites=sites, batch_size=batch_size), sites


def test_token_counts_of_disjoint_block_ranges_add_up_to_their_union():
    model = tagger(seed=6)
    x, y = _data(model, n=600)  # 10 blocks, the last short
    worker, sites = _worker(model, x, y, batch_size=100)
    stats = worker.clean_pass()
    scored = (y != -100) & (x["attention_mask"] != 0)
    assert stats.samples == scored.sum()

    def unit(blocks):
        return WorkUnit(worker.key, (sites[0].name,), (0.0, 0.3, 2.0), 2, blocks, 5)

    whole = worker.evaluate(unit((0, 10)))
    parts = [worker.evaluate(unit(b)) for b in ((0, 3), (3, 4), (4, 10))]
    assert parts[0] + parts[1] + parts[2] == whole
    assert parts[2] + parts[0] + parts[1] == whole
    assert whole.samples == scored.sum()
    assert parts[1].samples == scored[3 * BLOCK : 4 * BLOCK].sum()
    assert (whole.correct[0] == stats.correct).all()  # σ = 0 is the clean model
    worker.source.close()


def test_reports_are_bit_identical_at_batch_sizes_64_and_100():
    model = tagger(seed=7)
    x, y = _data(model, n=450)
    reports = [_without_timings(walkaudit.audit(model, x, y, provider="cpu", seed=2, batch_size=b))
               for b in (64, 100)]
    for r in reports:
        r["config"].pop("batch_size")
    assert reports[0] == reports[1]
    assert all(s["midpoint"] is not None for s in reports[0]["sites"])


def test_the_class_output_is_found_among_hidden_states_by_the_labels():
    model = tagger(seed=8, hidden_output=True, name="out")  # hr [N, T, 16] comes first and would fit the labels
    x, y = _data(model)
    loaded = load_model(model)
    assert loaded.class_output.name == "hr" and loaded.class_output.num_classes == 16  # before the evidence
    report = walkaudit.audit(model, x, y, **ARGS)
    assert report.model.class_output == "out" and report.num_classes == CLASSES
    with pytest.raises(walkaudit.errors.ModelError, match="several outputs could be the class scores"):
        walkaudit.audit(model, x, **ARGS)  # without labels they disagree, with nothing to choose by


@pytest.mark.parametrize("labels, message", [
    (lambda y: y[:, :4], "labels are [300, 4]"),  # checked against the mask input first
    (lambda y: y[:, 0], "labels must be class ids per position [N, T]"),
    (lambda y: np.where(y == 2, CLASSES, y), "labels out of range: found"),
])
def test_labels_that_do_not_fit_are_refused_in_one_line(labels, message):
    model = tagger(seed=9)
    x, y = _data(model)
    with pytest.raises(DataError, match=message.replace("[", r"\[")):
        walkaudit.audit(model, x, labels(y), **ARGS)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokens")
    model = tagger(seed=10)
    x, y = _data(model)
    onnx.save(model, folder / "tagger.onnx")
    onnx.save(tagger(seed=10, mask=None, out_t=T - 1), folder / "short.onnx")
    np.savez(folder / "val.npz", **x, labels=y)
    np.savez(folder / "ids.npz", input_ids=x["input_ids"], labels=y)
    np.savez(folder / "short_labels.npz", **x, labels=y[:, : T - 2])
    return folder


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_cli_reports_token_accuracy(files):
    result = _cli(files / "tagger.onnx", "--data", files / "val.npz", "--json", "-", "--provider", "cpu",
                  "--sigmas", "0.1,1,10", "--repeats", "1")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert validate_report(report) == []
    assert report["data"]["scored"] == "tokens"
    assert report["data"]["scored_tokens"] == report["clean_counts"]["samples"] < 300 * T
    assert report["data"]["ignore_label"] == -100 and report["data"]["mask"] == "attention_mask"
    assert report["clean_accuracy"] == report["clean_counts"]["correct"] / report["clean_counts"]["samples"]
    assert all(p["samples"] == report["data"]["scored_tokens"] for s in report["sites"] for p in s["points"])
    shown = _cli(files / "tagger.onnx", "--data", files / "val.npz", "--provider", "cpu", "--sigmas", "0.1,1,10",
                 "--repeats", "1")
    assert f"{report['data']['scored_tokens']} scored tokens in 300 sequences" in shown.stdout
    assert "clean token accuracy" in shown.stdout


@pytest.mark.parametrize("model, data, extra, message", [
    ("short.onnx", "ids.npz", (), f"gives {T - 1} positions per sample but the labels have {T}"),
    ("tagger.onnx", "short_labels.npz", (), f"mask 'attention_mask' is [300, {T}] but the labels are [300, {T - 2}]"),
    ("short.onnx", "ids.npz", ("--mask", "nope"), "--mask 'nope' is not an input of the model"),
    ("short.onnx", "ids.npz", ("--ignore-label", "x"), "--ignore-label"),
])
def test_cli_refuses_what_cannot_be_read_in_one_line(files, model, data, extra, message):
    result = _cli(files / model, "--data", files / data, "--provider", "cpu", "--sigmas", "1", "--repeats", "1",
                  *extra)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_a_mask_of_another_length_than_the_output_is_refused():
    model = tagger(seed=11, out_t=T - 2)
    x, _ = _data(tagger(seed=11))
    with pytest.raises(DataError, match=f"gives {T - 2} positions per sample but the mask 'attention_mask' has {T}"):
        walkaudit.audit(model, x, **ARGS)


@pytest.mark.skipif(not (SAMPLES / "digits_pixel_lm.dynamo.onnx").exists(), reason="sample not built yet")
def test_the_pixel_language_model_sample():
    """A causal transformer over the digits' pixels (torch's dynamo export, samples/make.py): next-token accuracy
    over the scored positions (labels already shifted, -100 where not scored; padding masked), the same at batch
    sizes 64 and 100."""
    model = str(SAMPLES / "digits_pixel_lm.dynamo.onnx")
    data = np.load(SAMPLES / "digits_pixel_lm_val.npz")
    x, y = {k: data[k] for k in ("input_ids", "attention_mask")}, data["labels"]
    args = dict(provider="cpu", sigmas=(0.3, 3.0), repeats=1, sites=("linear_2", "logits"))
    reports = [walkaudit.audit(model, x, y, batch_size=b, **args) for b in (64, 100)]
    loaded = load_model(model)
    out = cpu_session(loaded.proto).run([loaded.class_output.name], x)[0]
    scored = (y != -100) & (x["attention_mask"] != 0)
    report = reports[0]
    assert loaded.class_output.per_token and report.data.scored == "tokens"
    assert report.clean_accuracy == ((out.argmax(-1) == y) & scored).sum() / scored.sum()
    assert report.clean_counts.samples == scored.sum() and report.chance == pytest.approx(1 / out.shape[-1])
    assert report.clean_accuracy > 3 * report.chance
    bodies = [_without_timings(r) for r in reports]
    for body in bodies:
        body["config"].pop("batch_size")
    for site in bodies[0]["sites"]:  # float moments of a block the batch grid cuts may differ in the last bit
        for key in ("activation_std", "midpoint_relative"):
            site[key] = pytest.approx(site[key], rel=1e-12)
    assert bodies[0] == bodies[1]


def test_a_worker_built_from_the_resolved_audit_counts_the_same_tokens(files):
    """Ray's workers are built from the resolved audit: they read the inputs from the file again and score the
    per-token labels and scored positions the driver resolved."""
    run = walkaudit.iter_audit(str(files / "tagger.onnx"), data=str(files / "val.npz"), provider="cpu", seed=4,
                               sigmas=(0.3, 3.0), repeats=2)
    run.start()
    try:
        worker = run.resolved.with_model_bytes(run.loaded.proto).build(threads=1)
        unit = WorkUnit(run.key, (run.sites[0].name,), (0.3, 3.0), 2, (0, 5), 4)
        here = run._executor.worker.evaluate(unit)
        assert worker.evaluate(unit) == here and here.samples == run.clean.samples
        worker.source.close()
    finally:
        run.close()
