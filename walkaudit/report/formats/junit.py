"""JUnit XML of a report, for CI test-result views (GitLab ``artifacts:reports:junit``, GitHub test reporters).

One ``<testsuite name="walkaudit">`` inside ``<testsuites>``; one ``<testcase>`` per site (``classname`` = model file
name, ``name`` = tensor name) with one ``<failure>`` carrying all of that site's gate failures; a ``(model)`` testcase
for model-level rules (min clean accuracy, and failures naming a site that is not in the report) when any exists or
when ``config.gate.min_clean_accuracy`` is recorded; sites without a σ50 and without failures are ``<skipped>``.
An undecided check is a ``<failure type="undecided">`` where it failed the gate (skipped where ``--undecided pass``
passed it). A partial report adds an ``(incomplete)`` testcase with an ``<error>``; without gate rules every site
is ``<skipped>`` ("no gate"), since nothing was tested. Gate warnings go to the suite's ``<system-out>``.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import replace

from walkaudit.report.formats.markdown import site_failures
from walkaudit.report.model import Failure, Report
from walkaudit.report.schema import SCHEMA_VERSION
from walkaudit.report.text import midpoint_text, printable, report_level

__all__ = ["INCOMPLETE_CASE", "MODEL_CASE", "to_junit"]

MODEL_CASE = "(model)"
INCOMPLETE_CASE = "(incomplete)"


def to_junit(report: Report) -> str:
    """Render ``report`` as a JUnit XML document (UTF-8 declaration included, ends with a newline)."""
    classname = _safe(report.model.file_name)
    gate = report.gate
    by_site = site_failures(gate)
    open_by_site = site_failures(gate, undecided=True)
    undecided_fails = gate is not None and not gate.passed
    if undecided_fails:  # an undecided check that failed the gate is a failure of its test case
        for name, entries in open_by_site.items():
            by_site[name] = by_site.get(name, []) + [replace(u, rule=f"{u.rule} (undecided)") for u in entries]
    gated = gate is not None and gate.decision != "no gate"
    known = {site.name for site in report.sites}
    model_level = list(by_site.get(None, []))
    for name, failures in by_site.items():
        if name is not None and name not in known:
            model_level += failures
    rules = report.config.gate_rules or {}
    want_model_case = bool(model_level) or rules.get("min_clean_accuracy") is not None

    suites = ET.Element("testsuites", name="walkaudit")
    suite = ET.SubElement(suites, "testsuite", name="walkaudit")
    properties = ET.SubElement(suite, "properties")
    for key, value in _properties(report):
        ET.SubElement(properties, "property", name=key, value=_safe(value))

    tests = failed = skipped = 0
    level = report_level(report.config)
    for site in report.sites:
        case = ET.SubElement(suite, "testcase", classname=classname, name=_safe(site.name), time="0")
        tests += 1
        failures = by_site.get(site.name, [])
        if failures:
            failed += 1
            _add_failure(case, failures)
        elif open_by_site.get(site.name):
            skipped += 1
            ET.SubElement(case, "skipped", message=_safe("undecided, passed by --undecided pass: " + "; ".join(
                u.message for u in open_by_site[site.name])))
        elif site.sigma50 is None:
            skipped += 1
            why = f"no {level.midpoint} was measured for this site" if site.midpoint is None else \
                f"no {level.midpoint}: {site.fit.message or 'the fit found no midpoint'}"
            ET.SubElement(case, "skipped", message=_safe(why))
        elif not gated:
            skipped += 1
            shown = midpoint_text(site.sigma50, site.censored, level)
            ET.SubElement(case, "skipped", message=_safe(f"no gate rules: {shown} not checked"))
        else:
            ET.SubElement(case, "system-out").text = _safe(midpoint_text(site.sigma50, site.censored, level))

    if want_model_case:
        case = ET.SubElement(suite, "testcase", classname=classname, name=MODEL_CASE, time="0")
        tests += 1
        if model_level:
            failed += 1
            _add_failure(case, model_level)

    errors = 0
    if gate is not None and gate.decision == "incomplete":
        case = ET.SubElement(suite, "testcase", classname=classname, name=INCOMPLETE_CASE, time="0")
        tests += 1
        errors += 1
        ET.SubElement(case, "error", type="incomplete", message="incomplete: the audit stopped before every site "
                      "was measured; the gate did not decide")
    warnings = gate.warnings if gate is not None else []
    if warnings:
        ET.SubElement(suite, "system-out").text = "\n".join(_safe(w) for w in warnings)

    for element in (suites, suite):
        element.set("tests", str(tests))
        element.set("failures", str(failed))
        element.set("errors", str(errors))
        element.set("time", f"{report.runtime.elapsed_s:.3f}")
    suite.set("skipped", str(skipped))

    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def _add_failure(case: ET.Element, failures: list[Failure]) -> None:
    messages = [f.message for f in failures]
    rules = sorted({f.rule for f in failures})
    element = ET.SubElement(case, "failure", message=_safe("; ".join(messages)), type=_safe(",".join(rules)))
    element.text = "\n".join(_safe(f"{f.rule}: {f.message} (value {f.value}, threshold {f.threshold})")
                             for f in failures)


def _properties(report: Report) -> list[tuple[str, str]]:
    pairs = [
        ("model", report.model.path), ("model.sha256", report.model.sha256), ("data", report.data.path),
        ("samples", report.data.samples), ("clean_accuracy", report.clean_accuracy), ("chance", report.chance),
        ("noise", report.config.noise), ("mode", report.config.mode), ("provider", report.runtime.provider),
        ("schema", SCHEMA_VERSION),
    ]
    return [(key, str(value)) for key, value in pairs if value is not None]


def _safe(text: object) -> str:
    """One printable line (control characters escaped, so XML 1.0 can carry it); ElementTree escapes & < > quotes."""
    return printable(text)
