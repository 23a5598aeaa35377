"""The Python API: arrays and ModelProtos in, a Report out; the user's model is never modified."""

from __future__ import annotations

import json

import numpy as np
import pytest

import walkaudit
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
    assert report.model.path is None and report.data.labels == "given"
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
    with pytest.raises(UsageError, match="^repeats must be between 1 and"):  # the field's name, not the CLI flag
        walkaudit.audit(model, x, repeats=0)
    with pytest.raises(UsageError, match="no data"):
        walkaudit.audit(model)


def test_arrays_and_a_data_file_together_are_refused(tmp_path, monkeypatch):
    model = mlp()
    x = np.zeros((4, 16), np.float32)
    np.savez(tmp_path / "val.npz", x=x, y=np.zeros(4, np.int64))
    monkeypatch.setattr(walkaudit.api, "AuditRun", lambda *a, **k: pytest.fail("the audit ran"))
    for args in ((x, None), (x, np.zeros(4, np.int64)), (None, np.zeros(4, np.int64))):
        with pytest.raises(UsageError, match=r"either as arrays \(x, y\) or as a file \(data=...\), not both"):
            walkaudit.audit(model, *args, data=str(tmp_path / "val.npz"))


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
    assert report.config.batch_size == 8
    assert any("fixed batch size of 8" in n for n in report.runtime.notes)
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
                        selection=walkaudit.Selection(names=("side",)))


def test_report_to_json_is_the_dict_as_json():
    model = mlp(seed=3)
    x = np.random.default_rng(3).normal(size=(64, 16)).astype(np.float32)
    report = walkaudit.audit(model, x, provider="cpu", sigmas=(0.1, 1.0), repeats=1)
    text = report.to_json()
    assert text.endswith("\n") and json.loads(text) == report.to_dict()


def _without_timings(report) -> dict:
    body = report.to_dict()
    for key in ("elapsed_s",):
        body["runtime"].pop(key)
    return body


def test_a_site_audited_alone_equals_the_same_site_in_a_full_audit_bit_for_bit():
    """ε is keyed by the site's name, never by its place in the selection."""
    model = resnet_block(seed=21)
    x = np.random.default_rng(21).normal(size=(300, 1, 6, 6)).astype(np.float32)
    full = walkaudit.audit(model, x, provider="cpu", seed=4)
    for site in full.sites:
        alone = walkaudit.audit(model, x, provider="cpu", seed=4, selection=walkaudit.Selection(names=(site.name,)))
        assert alone.sites[0].to_dict() == {**site.to_dict(), "index": 0}


def test_batch_sizes_64_and_256_give_identical_reports():
    model = resnet_block(seed=22)
    x = np.random.default_rng(22).normal(size=(700, 1, 6, 6)).astype(np.float32)
    reports = [_without_timings(walkaudit.audit(model, x, provider="cpu", seed=5, batch_size=b)) for b in (64, 256)]
    assert reports[0]["config"].pop("batch_size") == 64 and reports[1]["config"].pop("batch_size") == 256
    assert reports[0] == reports[1]


def test_iter_audit_yields_each_site_as_it_finishes_and_resumes_from_finished_sites():
    model = resnet_block(seed=23)
    x = np.random.default_rng(23).normal(size=(200, 1, 6, 6)).astype(np.float32)
    run = walkaudit.iter_audit(model, x, provider="cpu", seed=6, sigmas=(0.1, 1.0, 10.0))
    first = next(iter(run))
    assert first.name == "a" and run.report(partial=True).partial and len(run.report(partial=True).sites) == 1
    uninterrupted = walkaudit.audit(model, x, provider="cpu", seed=6, sigmas=(0.1, 1.0, 10.0))
    resumed = walkaudit.iter_audit(model, x, provider="cpu", seed=6, sigmas=(0.1, 1.0, 10.0),
                                   done=[first.to_dict()])
    assert resumed.fingerprint == run.fingerprint
    assert [s.name for s in resumed] == [s.name for s in uninterrupted.sites]
    assert _without_timings(resumed.report()) == _without_timings(uninterrupted)


def test_import_walkaudit_is_lazy():
    import subprocess
    import sys

    code = ("import sys, walkaudit; "
            "print(sorted(m for m in ('onnx', 'onnxruntime', 'scipy', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_global_mode_takes_a_sigma_per_site():
    """Scale 0 silences a site: a global audit of sites a and b with a silenced equals one of b alone."""
    model = resnet_block(seed=24)
    x = np.random.default_rng(24).normal(size=(200, 1, 6, 6)).astype(np.float32)
    args = dict(provider="cpu", seed=2, sigmas=(0.3, 3.0), mode="global")
    both = walkaudit.audit(model, x, selection=walkaudit.Selection(names=("a", "b")), site_scales=(("a", 0.0),),
                           **args)
    alone = walkaudit.audit(model, x, selection=walkaudit.Selection(names=("b",)), **args)
    assert [p.to_dict() for p in both.sites[0].points] == [p.to_dict() for p in alone.sites[0].points]
    assert both.config.extra["site_scales"] == {"a": 0.0}
    with pytest.raises(UsageError, match="^site_scales: 'c' is not a selected site"):
        walkaudit.audit(model, x, selection=walkaudit.Selection(names=("a", "b")), site_scales=(("c", 2.0),), **args)
    with pytest.raises(UsageError, match="only applies in global mode"):
        walkaudit.audit(model, x, site_scales=(("a", 2.0),), provider="cpu")


def test_selection_shorthands_and_typed_options():
    """ops/include/exclude/sites build the Selection; the options are typed for type checkers (AuditOptions)."""
    import typing

    from walkaudit.config import AuditOptions

    model = mlp(seed=5)
    x = np.random.default_rng(5).normal(size=(64, 16)).astype(np.float32)
    args = dict(provider="cpu", sigmas=(0.1, 1.0), repeats=1)
    assert [s.name for s in walkaudit.audit(model, x, ops="all", **args).sites] == ["h_mm", "h", "h_relu", "logits"]
    assert [s.name for s in walkaudit.audit(model, x, sites=("logits",), **args).sites] == ["logits"]
    with pytest.raises(UsageError, match="given twice"):
        walkaudit.audit(model, x, ops="all", selection=walkaudit.Selection(), **args)
    hints = typing.get_type_hints(AuditOptions)
    assert hints["repeats"] is int and set(hints) >= {"ops", "sites", "drops", "site_scales"}
