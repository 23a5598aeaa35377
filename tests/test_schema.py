"""The report JSON Schema: crafted reports validate, broken ones don't; version checks; the docs copy is identical."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from walkaudit.errors import UsageError
from walkaudit.report import Report
from walkaudit.report.gate import GateConfig, Threshold, evaluate
from walkaudit.report.schema import (
    SCHEMA_ID,
    check_report_version,
    load_schema,
    schema_path,
    validate_report,
)

from .reports import make_global_report, make_report, make_site

jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[1]


def errors(report: dict) -> list[str]:
    validator = jsonschema.Draft202012Validator(load_schema())
    return [e.message for e in validator.iter_errors(report)]


def test_schema_is_a_valid_draft_2020_12_schema():
    schema = load_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)


def test_docs_copy_is_identical_to_the_packaged_schema():
    assert (ROOT / "docs" / "report.schema.json").read_bytes() == schema_path().read_bytes()


def test_load_schema_returns_a_fresh_dict():
    first = load_schema()
    first["title"] = "changed"
    assert load_schema()["title"] != "changed"


@pytest.mark.parametrize("build", [
    make_report,
    make_global_report,
    lambda: make_report([make_site("up", 10.0, censored="above"), make_site("down", 1e-3, index=1, censored="below"),
                         make_site("none", None, index=2, activation_std=None, with_weight=False)]),
    lambda: make_report(noise="combined", ratio=0.3, data_sha256=None, partial=True),
])
def test_crafted_reports_validate(build):
    assert errors(build()) == []


def test_gate_result_and_config_extras_validate():
    report = make_report()
    config = GateConfig(thresholds=(Threshold(None, 0.08, False),), min_clean_accuracy=0.95)
    report["gate"] = evaluate(Report.from_dict(report), config).to_dict()
    report["config"]["gate"] = config.to_dict()  # config allows more keys
    report["runtime"]["device"] = "H200"  # runtime allows more keys
    report["sites"][0]["fit"]["params"]["extra"] = 1.0  # so does fit.params
    assert report["gate"]["failures"]
    assert errors(report) == []


def _without(path: tuple, report: dict) -> dict:
    broken = copy.deepcopy(report)
    broken["gate"] = {"passed": True, "failures": [], "warnings": []}
    target = broken
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return broken


@pytest.mark.parametrize("path", [
    ("schema",), ("sites",), ("partial",), ("model", "sha256"), ("config", "noise"),
    ("runtime", "provider"), ("sites", 0, "censored"), ("sites", 0, "points", 0, "sigma"), ("sites", 1, "fit", "ok"),
    ("gate", "failures"), ("summary", "min_midpoint"),
])
def test_missing_required_key_is_invalid(path):
    assert errors(_without(path, make_report()))


@pytest.mark.parametrize("path, value", [
    (("config", "noise"), "gaussian"),
    (("config", "mode"), "layerwise"),
    (("config", "provider_requested"), "tensorrt"),
    (("model", "output_kind"), "logits"),
    (("data", "labels"), "predicted"),
    (("sites", 0, "censored"), "left"),
    (("sites", 0, "fit", "method"), "spline"),
    (("schema",), "walkaudit.report/2"),
    (("sites", 0, "ci95"), [0.1]),
    (("sites", 0, "index"), "0"),
    (("clean_accuracy",), 1.5),
    (("sites", 0, "shape"), [1, 2.5]),
    (("model", "sha256"), "xyz"),
])
def test_wrong_value_is_invalid(path, value):
    report = make_report()
    target = report
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    assert errors(report)


@pytest.mark.parametrize("where", [(), ("model",), ("sites", 0), ("sites", 0, "points", 0), ("gate",),
                                   ("sites", 0, "points", 0, "per_repeat"), ("clean_counts",)])
def test_new_keys_are_allowed_so_version_1_can_grow(where):
    """The contract: extend freely, never rename. A reader of /1 must accept keys added later."""
    report = make_report(gate={"passed": True, "failures": [], "warnings": []})
    target = report
    for key in where:
        target = target[key]
    target["surprise"] = 1
    assert errors(report) == []


def test_validate_report_lists_problems_with_their_place():
    report = make_report()
    report["sites"][1]["censored"] = "left"
    problems = validate_report(report)
    assert len(problems) == 1 and problems[0].startswith("sites/1/censored:")
    assert validate_report(make_report()) == []


# --- version check ------------------------------------------------------------------------------------------------

def test_current_and_minor_versions_are_accepted():
    check_report_version({"schema": SCHEMA_ID})
    check_report_version({"schema": "walkaudit.report/1.3"})


@pytest.mark.parametrize("report, message", [
    ({"schema": "walkaudit.report/2"},
     "walkaudit.report/2 is newer than this walkaudit understands (walkaudit.report/1)"),
    ({"schema": "walkaudit.report/0"}, "walkaudit.report/0 is older than this walkaudit understands"),
    ({}, "not a walkaudit report: no 'schema' key"),
    ({"schema": "pip-audit/1"}, "not a walkaudit report: schema 'pip-audit/1'"),
    ({"schema": 1}, "not a walkaudit report: schema 1"),
    ([], "not a walkaudit report: expected a JSON object, got list"),
])
def test_version_check_messages(report, message):
    with pytest.raises(UsageError) as info:
        check_report_version(report)
    text = str(info.value)
    assert text.startswith(message)
    assert "\n" not in text


def test_validate_report_checks_the_version_first():
    with pytest.raises(UsageError, match="newer"):
        validate_report({"schema": "walkaudit.report/2"})


def test_crafted_report_round_trips_through_json():
    report = make_report()
    assert errors(json.loads(json.dumps(report))) == []
