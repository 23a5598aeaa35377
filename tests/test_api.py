"""The Python API: arrays and ModelProtos in, a Report out; the user's model is never modified."""

from __future__ import annotations

import json

import numpy as np
import pytest

import walkaudit
from walkaudit._execution import engine as engine_mod
from walkaudit.errors import UsageError

from .models import mlp, resnet_block, teacher_labels


def test_audit_takes_a_model_proto_and_arrays_and_leaves_the_proto_alone():
    model = mlp(seed=7)
    before = model.SerializeToString()
    x = np.random.default_rng(0).normal(size=(128, 16)).astype(np.float32)
    report = walkaudit.audit(model, x, teacher_labels(model, x), provider="cpu", sigmas=(0.01, 0.3, 3, 30),
                             repeats=2)
    assert model.SerializeToString() == before
    assert isinstance(report, walkaudit.Report)
    assert report.model["path"] is None and report.data["labels"] == "given"
    assert [len(s.points) for s in report.sites] == [4, 4]
    assert all(p.repeats == 2 and p.samples == 128 for s in report.sites for p in s.points)


def test_one_hot_labels_equal_class_ids():
    model = mlp(seed=2)
    x = np.random.default_rng(1).normal(size=(64, 16)).astype(np.float32)
    y = teacher_labels(model, x)
    a = walkaudit.audit(model, x, y, provider="cpu", sigmas=(0.1, 1.0), repeats=1).to_dict()
    b = walkaudit.audit(model, x, np.eye(4)[y], provider="cpu", sigmas=(0.1, 1.0), repeats=1).to_dict()
    assert a["sites"] == b["sites"]


def test_unknown_option_and_bad_values_are_usage_errors():
    model = mlp()
    x = np.zeros((4, 16), np.float32)
    with pytest.raises(TypeError):
        walkaudit.audit(model, x, nonsense=1)
    with pytest.raises(UsageError, match="repeats"):
        walkaudit.audit(model, x, repeats=0)
    with pytest.raises(UsageError, match="no data"):
        walkaudit.audit(model)


def test_packed_and_one_level_at_a_time_runs_agree(monkeypatch):
    """Tiling σ levels into one run must not change the result (same noise, same predictions)."""
    model = resnet_block(seed=5)
    x = np.random.default_rng(3).normal(size=(96, 1, 6, 6)).astype(np.float32)
    args = dict(provider="cpu", sigmas=(0.05, 0.2, 0.8, 3.2), repeats=2, seed=11)
    packed = walkaudit.audit(model, x, **args).to_dict()
    monkeypatch.setattr(engine_mod.SiteEvaluator, "_choose_group", lambda self, start, values, levels: 1)
    single = walkaudit.audit(model, x, **args).to_dict()
    for p, s in zip(packed["sites"], single["sites"]):
        assert [q["accuracy"] for q in p["points"]] == [q["accuracy"] for q in s["points"]]


def test_batch_size_does_not_change_clean_accuracy_or_site_statistics():
    model = resnet_block(seed=6)
    x = np.random.default_rng(4).normal(size=(100, 1, 6, 6)).astype(np.float32)
    a = walkaudit.audit(model, x, provider="cpu", sigmas=(0.1, 1.0), repeats=1, batch_size=100)
    b = walkaudit.audit(model, x, provider="cpu", sigmas=(0.1, 1.0), repeats=1, batch_size=7)
    assert a.clean_accuracy == b.clean_accuracy == 1.0
    for sa, sb in zip(a.sites, b.sites):
        assert sa.activation_std == pytest.approx(sb.activation_std, rel=1e-6)


def test_fixed_batch_model_is_padded_and_walked(tmp_path):
    model = mlp(seed=3, batch=8)
    x = np.random.default_rng(5).normal(size=(20, 16)).astype(np.float32)  # 20 = 8 + 8 + 4 (padded)
    report = walkaudit.audit(model, x, provider="cpu", sigmas=(0.01, 10.0), repeats=1)
    assert report.config["batch_size"] == 8
    assert any("fixed batch size of 8" in n for n in report.runtime["notes"])
    assert report.clean_accuracy == 1.0
    assert all(s.points[0].accuracy == 1.0 and s.points[0].samples == 20 for s in report.sites)


def test_sites_that_do_not_feed_the_class_output_are_not_walked():
    """A side output computed from the input: its layer cannot change the class decision."""
    from onnx import TensorProto, helper, numpy_helper

    model = mlp(seed=4)
    w = numpy_helper.from_array(np.ones((16, 2), np.float32), "w_side")
    model.graph.initializer.append(w)
    model.graph.node.append(helper.make_node("MatMul", ["x", "w_side"], ["side"], name="side_fc"))
    model.graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, ["N", 2]))
    x = np.random.default_rng(0).normal(size=(32, 16)).astype(np.float32)
    report = walkaudit.audit(model, x, provider="cpu", sigmas=(0.1, 1.0), repeats=1, output="logits")
    assert [s.name for s in report.sites] == ["h", "logits"]
    with pytest.raises(UsageError, match="does not feed the class output"):
        walkaudit.audit(model, x, provider="cpu", output="logits",
                        selection=walkaudit.api.Selection(names=("side",)))


def test_report_to_json_is_the_dict_as_json():
    model = mlp(seed=3)
    x = np.random.default_rng(3).normal(size=(64, 16)).astype(np.float32)
    report = walkaudit.audit(model, x, provider="cpu", sigmas=(0.1, 1.0), repeats=1)
    text = report.to_json()
    assert text.endswith("\n") and json.loads(text) == report.to_dict()
