"""The typed report: validation with one-line errors, exact round trips, 1.0 compatibility, load_report's refusals."""

from __future__ import annotations

import copy
import json
import math
import struct

import pytest

from walkaudit.errors import UsageError
from walkaudit.report import (
    ConfigInfo,
    Fit,
    GateResult,
    ModelInfo,
    Point,
    Report,
    SiteResult,
    Weight,
    dumps,
    load_report,
)
from walkaudit.report import model as model_mod
from walkaudit.report.gate import GateConfig, Threshold, evaluate
from walkaudit.report.schema import SCHEMA_VERSION, validate_report
from walkaudit.report.text import finite, format_sigma, printable

from .reports import (
        make_degenerate_site,
        make_global_report,
        make_report,
        make_site,
        typed,
    )


def odd_floats_report() -> dict:
    """Floats whose last bit matters, subnormals and big exponents: the round trip must keep every bit."""
    report = make_report(samples=10)
    report["clean_accuracy"] = 0.1 + 0.2  # 3 of 10 samples, within float rounding
    report["clean_counts"] = {"correct": 3, "samples": 10}
    for site in report["sites"]:
        for point in site["points"]:
            point.update(samples=10, accuracy=0.3, per_repeat={"correct": [3] * 3, "nonfinite": [0] * 3})
    report["sites"][0]["midpoint"] = 5e-324
    report["sites"][0]["ci95"] = [2.2250738585072014e-308, 1.7976931348623157e308]
    report["sites"][1]["activation_std"] = struct.unpack("<d", struct.pack("<Q", 0x3FB999999999999B))[0]
    report["sites"][1]["points"][0]["sigma"] = 1 / 3
    return report


# --- round trips --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("build", [
    make_report, make_global_report, odd_floats_report,
    lambda: make_report([make_site("up", 10.0, censored="above"), make_site("down", 1e-3, index=1, censored="below"),
                         make_site("none", None, index=2, activation_std=None, with_weight=False),
                         make_degenerate_site("flat", index=3)]),
    lambda: make_report(noise="combined", ratio=0.3, data_sha256=None, partial=True,
                        gate={"passed": False, "warnings": ["w"], "failures": [
                            {"rule": "max_drop", "site": "conv1", "value": 50.0, "threshold": 20.0, "message": "m"}]}),
])
def test_round_trip_is_exact(build):
    data = build()
    report = Report.from_dict(data)
    out = report.to_dict()
    assert Report.from_dict(out).to_dict() == out
    assert dumps(Report.from_dict(json.loads(dumps(out))).to_dict()) == dumps(out)  # JSON text, bit for bit
    expected = {**data, "schema": SCHEMA_VERSION, "summary": report.summary()}
    assert out == expected  # everything else comes back as it went in, floats bit-exact
    assert validate_report(out) == []


def test_floats_keep_every_bit():
    data = odd_floats_report()
    out = Report.from_dict(data).to_dict()
    assert out["sites"][0]["midpoint"] == 5e-324
    assert out["sites"][1]["activation_std"].hex() == data["sites"][1]["activation_std"].hex()
    assert out["clean_accuracy"].hex() == (0.1 + 0.2).hex()


def test_unknown_keys_survive_everywhere():
    data = make_report(gate={"passed": True, "failures": [], "warnings": [], "by": "ci"})
    data["future"] = {"a": [1, 2]}
    data["model"]["hash_kind"] = "sha256"
    data["sites"][0]["future_site"] = 1
    data["sites"][0]["points"][0]["per_repeat"]["future"] = True
    data["sites"][0]["fit"]["params"]["extra"] = 2.5
    out = Report.from_dict(data).to_dict()
    assert out["future"] == {"a": [1, 2]} and out["model"]["hash_kind"] == "sha256"
    assert out["sites"][0]["future_site"] == 1 and out["gate"]["by"] == "ci"
    assert out["sites"][0]["points"][0]["per_repeat"]["future"] is True
    assert out["sites"][0]["fit"]["params"]["extra"] == 2.5


def test_from_dict_does_not_share_state_with_its_input():
    data = make_report()
    data["runtime"]["notes"] = ["n1"]
    report = Report.from_dict(data)
    data["runtime"]["notes"].append("changed")
    data["sites"][0]["name"] = "changed"
    assert report.runtime.notes == ("n1",) and report.sites[0].name == "conv1"
    out = report.to_dict()
    out["runtime"]["notes"].append("x")
    assert report.runtime.notes == ("n1",)


def test_typed_fields():
    report = typed(make_report(noise="combined", ratio=0.25))
    assert isinstance(report.model, ModelInfo) and report.model.file_name == "net.onnx"
    assert isinstance(report.config, ConfigInfo) and report.config.ratio == 0.25 and report.config.sigmas is None
    site = report.sites[0]
    assert isinstance(site, SiteResult) and isinstance(site.fit, Fit) and isinstance(site.weight, Weight)
    assert isinstance(site.points[0], Point) and len(site.points[0].per_repeat.correct) == 3
    assert site.shape == ("N", 8, 4, 4) and site.ci95 == pytest.approx((0.095, 0.105))
    assert report.clean_counts.correct == 450 and report.clean_counts.samples == 500
    assert report.gate is None
    assert site.fit.logistic == pytest.approx((0.9, 0.1, -1.0, 0.3))


def test_a_1_0_report_reads_without_the_1_1_keys():
    data = make_report(gate={"passed": True, "failures": [], "warnings": []})
    data["schema"] = "walkaudit.report/1"
    del data["clean_counts"]
    for site in data["sites"]:
        for point in site["points"]:
            del point["per_repeat"]
    report = Report.from_dict(data)
    assert report.clean_counts is None and report.sites[0].points[0].per_repeat is None
    assert report.gate is not None and report.gate.passed
    out = report.to_dict()
    assert out["schema"] == "walkaudit.report/1.1" and "clean_counts" not in out
    assert "per_repeat" not in out["sites"][0]["points"][0]


def test_gate_is_absent_until_a_gate_ran():
    report = typed(make_report())
    assert report.gate is None and "gate" not in report.to_dict()
    config = GateConfig(thresholds=(Threshold(None, 0.08),))
    gated = report.with_gate(evaluate(report, config), rules=config.to_dict())
    assert report.gate is None  # immutable: a copy carries the verdict
    out = gated.to_dict()
    assert out["gate"]["passed"] is False and out["config"]["gate"] == config.to_dict()
    assert validate_report(out) == []
    assert Report.from_dict(out).gate == gated.gate


def test_summary_is_derived_and_skips_sites_without_sigma50():
    data = make_report([make_degenerate_site("flat", 1e-4), make_site("b", 0.5, index=1)])
    data["summary"] = {"weakest_site": "nonsense", "min_midpoint": 123.0}
    out = Report.from_dict(data).to_dict()
    assert out["summary"] == {"weakest_site": "b", "min_midpoint": 0.5, "sites": 2}


def test_site_result_from_dict_and_to_dict():
    data = make_site("conv1", 0.1)
    site = SiteResult.from_dict(data)
    assert site.to_dict() == data
    broken = copy.deepcopy(data)
    broken["points"][1]["accuracy"] = "high"
    with pytest.raises(UsageError) as info:
        SiteResult.from_dict(broken)
    assert str(info.value) == 'site.points[1].accuracy: expected number, got string "high"'


def test_sigma50_of_a_site_whose_fit_found_no_midpoint_is_none():
    site = SiteResult.from_dict(make_degenerate_site("flat"))
    assert site.midpoint == 10.0 and site.sigma50 is None and site.sigma50_relative is None
    assert SiteResult.from_dict(make_site("x", 0.2, activation_std=0.5)).sigma50_relative == pytest.approx(0.4)


def test_repr_is_short():
    big = make_report([make_site(f"/very/long/name/{i}", 0.01 * (i + 1), index=i) for i in range(300)])
    report = typed(big)
    text = str(report)
    assert len(text) < 200 and "\n" not in text
    assert text == repr(report)
    assert "net.onnx" in text and "0.9000" in text and "300 sites" in text and "/very/long/name/0" in text
    assert len(repr(report.sites[0])) < 100
    hostile = typed(make_report([make_site("\x1b[2J", 0.1)]))
    assert "\x1b" not in repr(hostile) and "\\x1b[2J" in repr(hostile)


# --- compatibility constructor (api.py before the rewrite) ----------------------------------------------------------

def test_old_style_constructor_still_builds_a_typed_report():
    data = make_report()
    sites = [SiteResult(s["index"], s["name"], s["node"], s["op_type"], s["shape"], s["activation_std"], s["weight"],
                        points=[Point(p["sigma"], p["accuracy"], p["accuracy_std"], p["repeats"], p["samples"],
                                      p["nonfinite"]) for p in s["points"]],
                        midpoint=s["midpoint"], midpoint_relative=s["midpoint_relative"], ci95=s["ci95"],
                        censored=s["censored"], fit=s["fit"]) for s in data["sites"]]
    report = Report(tool=data["tool"], model=data["model"], data=data["data"], config=data["config"],
                    runtime=data["runtime"], clean_accuracy=0.9, chance=0.1, num_classes=10, sites=sites)
    assert report.model["path"] == "models/net.onnx" and report.data["labels"] == "given"
    assert report.sites[0].weight["mean_abs"] == 0.1 and report.config["batch_size"] == 256
    out = report.to_dict()
    assert validate_report(out) == []
    assert Report.from_dict(out).to_dict() == out
    assert out["sites"][0]["points"][0].keys() == {"sigma", "accuracy", "accuracy_std", "repeats", "samples",
                                                   "nonfinite"}


# --- validation errors ----------------------------------------------------------------------------------------------

def _set(report: dict, path: tuple, value) -> dict:
    target = report
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return report


_DELETE = object()


@pytest.mark.parametrize("path, value, message", [
    (("sites", 0, "midpoint"), "0.1", 'sites[0].midpoint: expected number or null, got string "0.1"'),
    (("sites",), "conv1", 'sites: expected array, got string "conv1"'),
    (("clean_accuracy",), "0.9", 'clean_accuracy: expected number, got string "0.9"'),
    (("sites",), _DELETE, "sites: missing (a required key)"),
    (("model", "sha256"), _DELETE, "model.sha256: missing (a required key)"),
    (("sites", 1, "censored"), "left", 'sites[1].censored: "left" is not one of null, "above", "below"'),
    (("clean_accuracy",), 1.5, "clean_accuracy: 1.5 is above the maximum 1"),
    (("sites", 0, "points", 2, "per_repeat", "correct"), [1, 2],
     "sites[0].points[2].per_repeat.correct: 2 entries, but repeats is 3"),
    (("sites", 0, "points", 2, "per_repeat", "nonfinite"), [0, 0, 501],
     "sites[0].points[2].per_repeat.nonfinite: a count is larger than samples (500)"),
    (("clean_counts",), {"correct": 600, "samples": 500}, "clean_counts: correct 600 is more than samples 500"),
    (("sites", 0, "midpoint"), math.nan, "sites[0].midpoint: non-finite number nan (JSON has no NaN or Infinity)"),
    (("chance",), math.inf, "chance: non-finite number inf (JSON has no NaN or Infinity)"),
    (("sites", 0, "ci95"), [0.1], "sites[0].ci95: expected at least 2 items, got 1"),
    (("runtime", "notes"), "a note", 'runtime.notes: expected array, got string "a note"'),
    (("sites", 0, "shape"), {"a": 1}, "sites[0].shape: an object is none of the allowed forms"),
    (("sites", 0, "points", 0, "repeats"), True, "sites[0].points[0].repeats: expected integer, got boolean true"),
])
def test_invalid_reports_raise_one_line_naming_the_path(path, value, message):
    with pytest.raises(UsageError) as info:
        Report.from_dict(_set(make_report(), path, value))
    assert str(info.value) == message


def test_long_values_and_control_characters_in_messages_are_cut_and_escaped():
    report = make_report()
    report["sites"][0]["midpoint"] = "\x1b[2J" + "x" * 10_000
    with pytest.raises(UsageError) as info:
        Report.from_dict(report)
    text = str(info.value)
    assert len(text) < 200 and "\x1b" not in text and "\\u001b" in text


def test_deep_nesting_is_refused_without_recursion():
    report = make_report()
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    report["extra"] = deep
    with pytest.raises(UsageError, match="nested more than 64 levels deep"):
        Report.from_dict(report)


@pytest.mark.parametrize("value", [[], "walkaudit", None, 3])
def test_not_an_object_is_refused(value):
    with pytest.raises(UsageError, match="not a walkaudit report"):
        Report.from_dict(value)


def test_integral_floats_become_ints():
    data = make_report()
    data["sites"][0]["index"] = 0.0
    data["num_classes"] = 10.0
    report = Report.from_dict(data)
    assert report.sites[0].index == 0 and isinstance(report.sites[0].index, int)
    assert isinstance(report.num_classes, int)


# --- load_report ----------------------------------------------------------------------------------------------------

def _write(tmp_path, text: str | bytes, name="r.json"):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_load_report_reads_a_valid_file(tmp_path):
    path = _write(tmp_path, json.dumps(make_report()))
    report = load_report(path)
    assert isinstance(report, Report) and [s.name for s in report.sites] == ["conv1", "conv2", "fc"]
    assert load_report(_write(tmp_path, b"\xef\xbb\xbf" + json.dumps(make_report()).encode(), "bom.json")).sites


@pytest.mark.parametrize("text, fragment", [
    ("", "is not a JSON report: Expecting value"),
    ("{", "is not a JSON report"),
    (b"\xff\xfe{}", "not UTF-8 text"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    (json.dumps(make_report()).replace('"chance": 0.1', '"chance": NaN'), "non-finite number NaN"),
    (json.dumps(make_report()).replace('"chance": 0.1', '"chance": -Infinity'), "non-finite number -Infinity"),
    (json.dumps(make_report()).replace('"chance": 0.1', '"chance": 1e999'), "number 1e999 is out of range"),
    (json.dumps(make_report()).replace('"seed": 0', '"seed": ' + "9" * 5000), "is not a valid report"),
    (json.dumps(make_report()).replace('"seed": 0', '"seed": ' + "9" * 400), "config.seed: integer out of range"),
    (json.dumps(dict(make_report(), schema="walkaudit.report/2")), "walkaudit.report/2 is newer"),
    ("[]", "not a walkaudit report: expected a JSON object, got list"),
])
def test_load_report_refuses_with_one_line(tmp_path, text, fragment):
    path = _write(tmp_path, text)
    with pytest.raises(UsageError) as info:
        load_report(path)
    message = str(info.value)
    assert fragment in message and str(path) in message and "\n" not in message


def test_load_report_missing_file_and_directory(tmp_path):
    with pytest.raises(UsageError, match="report not found"):
        load_report(tmp_path / "nope.json")
    with pytest.raises(UsageError, match="not a regular file"):
        load_report(tmp_path)


def test_load_report_checks_the_size_before_reading(tmp_path, monkeypatch):
    path = _write(tmp_path, json.dumps(make_report()))
    monkeypatch.setattr(model_mod, "MAX_REPORT_BYTES", 100)

    def no_read(*args, **kwargs):
        raise AssertionError("the file was opened")

    monkeypatch.setattr(type(path), "open", no_read)
    with pytest.raises(UsageError, match="more than the 0 MiB"):
        load_report(path)


def test_load_report_refuses_a_sparse_file_over_64_mib(tmp_path):
    path = tmp_path / "huge.json"
    with open(path, "wb") as fh:
        fh.truncate(65 * 1024 * 1024)
    with pytest.raises(UsageError, match="65 MiB, more than the 64 MiB"):
        load_report(path)


# --- text helpers ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, shown", [
    ("plain/name:0", "plain/name:0"),
    ("\x1b[2J", "\\x1b[2J"),
    ("\x1b]0;title\x07", "\\x1b]0;title\\x07"),
    ("a\rb\nc\td", "a\\rb\\nc\\td"),
    ("\x9b31m", "\\x9b31m"),
    ("\u202eevil", "\\u202eevil"),
    ("\ud800", "\\ud800"),
    ("日本語 ✅", "日本語 ✅"),
])
def test_printable(text, shown):
    assert printable(text) == shown
    assert printable(printable(text)) == printable(text)


def test_finite_and_format_sigma():
    assert finite(1) == 1.0 and finite(True) is None and finite(math.nan) is None and finite(10**400) is None
    assert format_sigma(0.05123) == "0.0512" and format_sigma(10.0, "above") == "> 10"
    assert format_sigma(1e-3, "below") == "< 0.001" and format_sigma(None) == "—"
    assert format_sigma(0.05123, digits=4) == "0.05123"


def test_gate_result_round_trip():
    result = GateResult(False, [], ["w"])
    assert GateResult.from_dict(result.to_dict()) == result


_POINT_CASES = [
    ("sigma", "1"), ("sigma", -1.0), ("sigma", None), ("sigma", True), ("sigma", [1]), ("accuracy", 1.5),
    ("accuracy", -0.1), ("accuracy", 1), ("accuracy_std", -1e-9), ("repeats", 2.5), ("repeats", 3.0), ("repeats", -1),
    ("samples", "500"), ("samples", False), ("nonfinite", {}), ("nonfinite", 0.0), ("sigma", _DELETE),
    ("nonfinite", _DELETE), ("per_repeat", None), ("per_repeat", []), ("per_repeat", {"correct": [1, 2, 3]}),
    ("per_repeat", {"correct": [1, 2, 3], "nonfinite": "000"}),
    ("per_repeat", {"correct": [1, 2.5, 3], "nonfinite": [0, 0, 0]}),
    ("per_repeat", {"correct": [1, -2, 3], "nonfinite": [0, 0, 0]}),
    ("per_repeat", {"correct": [1, True, 3], "nonfinite": [0, 0, 0]}),
    ("per_repeat", {"correct": [1, 2, 3.0], "nonfinite": [0, 0, 0], "more": 1}),
    ("more", "anything"),
    # the pairing with the clean pass (optional): clean_correct and per_repeat.lost are counts
    ("clean_correct", 5), ("clean_correct", -1), ("clean_correct", 2.5), ("clean_correct", "5"),
    ("clean_correct", None),
    ("per_repeat", {"correct": [1, 2, 3], "nonfinite": [0, 0, 0], "lost": [0, 1, 2]}),
    ("per_repeat", {"correct": [1, 2, 3], "nonfinite": [0, 0, 0], "lost": [0, -1, 2]}),
    ("per_repeat", {"correct": [1, 2, 3], "nonfinite": [0, 0, 0], "lost": [0, 1.5, 2]}),
    ("per_repeat", {"correct": [1, 2, 3], "nonfinite": [0, 0, 0], "lost": 3}),
]


@pytest.mark.parametrize("key, value", _POINT_CASES)
def test_the_hand_written_point_check_agrees_with_the_schema(key, value):
    """Points are checked by hand for speed; the schema's $defs/point must give the same verdict."""
    from walkaudit.report.schema import load_schema, schema_validator

    point = copy.deepcopy(make_report()["sites"][0]["points"][0])
    _set(point, (key,), value)
    schema = load_schema()
    validator = type(schema_validator())({"$defs": schema["$defs"], "$ref": "#/$defs/point"})
    schema_ok = validator.is_valid(point)
    try:
        model_mod._check_point(point, "p")
        hand_ok = True
    except UsageError:
        hand_ok = False
    assert hand_ok == schema_ok
    if not schema_ok:  # and through the whole report, one line naming the place
        report = make_report()
        report["sites"][0]["points"][0] = point
        with pytest.raises(UsageError, match=r"^sites\[0\]\.points\[0\]"):
            Report.from_dict(report)


def test_reports_without_the_pairing_or_the_estimator_still_read():
    """Reports written before points carried clean_correct / per_repeat.lost and fits their estimator read as
    before; the estimator is then named from the method."""
    data = make_report()
    report = Report.from_dict(data)
    point = report.sites[0].points[0]
    assert point.clean_correct is None and point.per_repeat.lost is None
    assert report.sites[0].fit.estimator == "logistic"
    data["sites"][0]["fit"]["method"] = "interpolation"
    assert Report.from_dict(data).sites[0].fit.estimator == "interpolated"
    data["sites"][0]["fit"]["estimator"] = "isotonic"
    data["sites"][0]["points"][0].update(clean_correct=7)
    data["sites"][0]["points"][0]["per_repeat"]["lost"] = [1, 0, 2]
    again = Report.from_dict(Report.from_dict(data).to_dict())
    assert again.sites[0].fit.estimator == "isotonic"
    assert again.sites[0].points[0].clean_correct == 7 and again.sites[0].points[0].per_repeat.lost == (1, 0, 2)
    data["sites"][0]["fit"]["estimator"] = "guess"
    with pytest.raises(UsageError, match="estimator"):
        Report.from_dict(data)
