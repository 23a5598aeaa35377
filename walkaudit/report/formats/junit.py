"""JUnit XML of a report, for CI test-result views (GitLab ``artifacts:reports:junit``, GitHub test reporters).

One ``<testsuite name="walkaudit">`` inside ``<testsuites>``; one ``<testcase>`` per site (``classname`` = model file
name, ``name`` = tensor name) with one ``<failure>`` carrying all of that site's gate failures; a ``(model)`` testcase
for model-level rules (min clean accuracy, and failures naming a site that is not in the report) when any exists or
when ``config.gate.min_clean_accuracy`` is recorded; sites without a σ50 and without failures are ``<skipped>``.
Gate warnings go to the suite's ``<system-out>``.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import Any

from walkaudit.report.formats.markdown import format_sigma, model_name, site_failures

__all__ = ["MODEL_CASE", "to_junit"]

MODEL_CASE = "(model)"

# characters XML 1.0 cannot carry even escaped
_INVALID_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def to_junit(report: dict) -> str:
    """Render ``report`` as a JUnit XML document (UTF-8 declaration included, ends with a newline)."""
    classname = _safe(model_name(report))
    by_site = site_failures(report)
    site_names = [str(s.get("name")) for s in report.get("sites") or []]
    known = set(site_names)
    model_level = list(by_site.get(None, []))
    for name, failures in by_site.items():
        if name is not None and name not in known:
            model_level += failures
    gate_config = (report.get("config") or {}).get("gate")
    want_model_case = bool(model_level) or (
        isinstance(gate_config, dict) and gate_config.get("min_clean_accuracy") is not None)

    elapsed = (report.get("runtime") or {}).get("elapsed_s")
    suites = ET.Element("testsuites", name="walkaudit")
    suite = ET.SubElement(suites, "testsuite", name="walkaudit")
    properties = ET.SubElement(suite, "properties")
    for key, value in _properties(report):
        ET.SubElement(properties, "property", name=key, value=_safe(value))

    tests = failed = skipped = 0
    for site in report.get("sites") or []:
        name = str(site.get("name"))
        case = ET.SubElement(suite, "testcase", classname=classname, name=_safe(name), time="0")
        tests += 1
        failures = by_site.get(name, [])
        if failures:
            failed += 1
            _add_failure(case, failures)
        elif _number(site.get("midpoint")) is None:
            skipped += 1
            ET.SubElement(case, "skipped", message="no σ50 was measured for this site")
        else:
            sigma = format_sigma(site.get("midpoint"), site.get("censored"))
            ET.SubElement(case, "system-out").text = _safe(f"σ50 {sigma}")

    if want_model_case:
        case = ET.SubElement(suite, "testcase", classname=classname, name=MODEL_CASE, time="0")
        tests += 1
        if model_level:
            failed += 1
            _add_failure(case, model_level)

    warnings = (report.get("gate") or {}).get("warnings") or []
    if warnings:
        ET.SubElement(suite, "system-out").text = _safe("\n".join(str(w) for w in warnings))

    for element in (suites, suite):
        element.set("tests", str(tests))
        element.set("failures", str(failed))
        element.set("errors", "0")
        element.set("time", f"{_number(elapsed) or 0.0:.3f}")
    suite.set("skipped", str(skipped))

    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def _add_failure(case: ET.Element, failures: list[dict]) -> None:
    messages = [str(f.get("message", "")) for f in failures]
    rules = sorted({str(f.get("rule", "")) for f in failures})
    element = ET.SubElement(case, "failure", message=_safe("; ".join(messages)), type=_safe(",".join(rules)))
    element.text = _safe("\n".join(f"{f.get('rule')}: {f.get('message')} (value {f.get('value')}, "
                                   f"threshold {f.get('threshold')})" for f in failures))


def _properties(report: dict) -> list[tuple[str, str]]:
    model, data = report.get("model") or {}, report.get("data") or {}
    config, runtime = report.get("config") or {}, report.get("runtime") or {}
    pairs = [
        ("model", model.get("path")), ("model.sha256", model.get("sha256")), ("data", data.get("path")),
        ("samples", data.get("samples")), ("clean_accuracy", report.get("clean_accuracy")),
        ("chance", report.get("chance")), ("noise", config.get("noise")), ("mode", config.get("mode")),
        ("provider", runtime.get("provider")), ("schema", report.get("schema")),
    ]
    return [(key, str(value)) for key, value in pairs if value is not None]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return None
    return float(value)


def _safe(text: str) -> str:
    """Replace characters XML 1.0 cannot represent by U+FFFD; ElementTree escapes the rest (& < > and quotes)."""
    return _INVALID_XML.sub("\ufffd", str(text))
