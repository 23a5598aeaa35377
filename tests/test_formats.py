"""Markdown and JUnit renderings of crafted reports."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from walkaudit.report import Report, render
from walkaudit.report.formats import to_github, to_html, to_junit, to_markdown
from walkaudit.report.formats.junit import MODEL_CASE
from walkaudit.report.gate import GateConfig, Threshold, evaluate

from .reports import (
        make_degenerate_site,
        make_global_report,
        make_report,
        make_site,
        typed,
    )


def gated(report: dict, config: GateConfig, **options) -> Report:
    """The typed report with the verdict of ``config`` and its rules recorded, as the CLI writes it."""
    typed_report = typed(report)
    return typed_report.with_gate(evaluate(typed_report, config, **options), rules=config.to_dict())


def failing_report() -> Report:
    """conv2 (0.05) fails fail-under 0.08 and clean accuracy 0.9 fails min 0.95; conv1 and fc pass."""
    return gated(make_report(), GateConfig(thresholds=(Threshold(None, 0.08, False),), min_clean_accuracy=0.95))


def table_rows(markdown: str) -> list[list[str]]:
    rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row.strip("|").split(" | ")] for row in rows[1:]]  # drop the header


# --- markdown -----------------------------------------------------------------------------------------------------

def test_markdown_heading_says_pass():
    text = to_markdown(gated(make_report(), GateConfig(thresholds=(Threshold(None, 0.01),))))
    first = text.splitlines()[0]
    assert first.startswith("## ") and "✅" in first and "`net.onnx`" in first and "passed" in first


def test_no_rules_says_no_gate_in_every_format():
    report = gated(make_report(), GateConfig())
    markdown = to_markdown(report)
    assert markdown.splitlines()[0] == "## walkaudit: `net.onnx` (no gate: no rules given)"
    assert "✅" not in markdown and "passed" not in markdown
    assert {row[-1] for row in table_rows(markdown)} == {"—"}
    assert "no gate (no rules given)" in to_html(report) and "gate passed" not in to_html(report)
    suite = ET.fromstring(to_junit(report)).find("testsuite")
    assert suite.get("skipped") == suite.get("tests") == "3" and suite.get("failures") == "0"
    assert report.to_dict()["gate"]["verdict"] == "no gate"


def test_a_partial_report_says_incomplete_in_every_format():
    report = gated(make_report(partial=True), GateConfig(thresholds=(Threshold(None, 0.01),)))
    assert report.to_dict()["gate"]["passed"] is None and report.to_dict()["partial"] is True
    markdown = to_markdown(report)
    assert "incomplete" in markdown.splitlines()[0] and "passed" not in markdown.splitlines()[0]
    html = to_html(report)
    assert "incomplete" in html and "gate passed" not in html
    suite = ET.fromstring(to_junit(report)).find("testsuite")
    case = next(c for c in suite.findall("testcase") if c.get("name") == "(incomplete)")
    assert case.find("error").get("type") == "incomplete" and suite.get("errors") == "1"
    assert any(ln.startswith("::error ") and "incomplete" in ln for ln in to_github(report).splitlines())
    assert render.gate_lines(report.gate)[-1].startswith("gate: incomplete")


def test_undecided_checks_are_shown_and_fail_unless_passed_by_policy():
    config = GateConfig(thresholds=(Threshold("conv2", 0.05),))  # conv2: 0.05, 95% CI 0.0475–0.0525
    failing = gated(make_report(), config)
    markdown = to_markdown(failing)
    assert "❔" in markdown.splitlines()[0] and "undecided (1 check, not shown)" in markdown.splitlines()[0]
    assert [row[-1] for row in table_rows(markdown)] == ["✅", "❔", "✅"]
    assert "### Undecided (1)" in markdown
    suite = ET.fromstring(to_junit(failing)).find("testsuite")
    assert suite.get("failures") == "1"
    assert "undecided" in suite.find("testcase[@name='conv2']/failure").get("type")
    assert any(ln.startswith("::error ") and "undecided" in ln for ln in to_github(failing).splitlines())
    assert "gate undecided" in to_html(failing)
    assert render.gate_lines(failing.gate)[-2:] == [f"UNDECIDED: {failing.gate.undecided[0].message}",
                                                    "gate: UNDECIDED (not shown)"]
    allowed = gated(make_report(), config, undecided="pass")
    suite = ET.fromstring(to_junit(allowed)).find("testsuite")
    assert suite.get("failures") == "0" and suite.find("testcase[@name='conv2']/skipped") is not None
    assert any(ln.startswith("::warning ") and "undecided" in ln for ln in to_github(allowed).splitlines())


def test_markdown_heading_says_fail_and_lists_failures():
    report = failing_report()
    text = to_markdown(report)
    first = text.splitlines()[0]
    assert "❌" in first and "failed (2 failures)" in first
    assert "### Failures (2)" in text
    failure_lines = [line for line in text.splitlines() if line.startswith("- ❌")]
    assert len(failure_lines) == 2
    assert any("`conv2`" in line and "fail\\_under" in line for line in failure_lines)
    assert any(line.startswith("- ❌ model") and "min\\_clean\\_accuracy" in line for line in failure_lines)


def test_markdown_context_line():
    text = to_markdown(typed(make_report(noise="combined", ratio=0.25)))
    context = text.splitlines()[2]
    for fragment in ("Clean accuracy **90.0%**", "chance 10.0%", "noise combined (ratio 0.25)",
                     "CPUExecutionProvider", "500 samples"):
        assert fragment in context


def test_markdown_has_a_row_for_every_site_with_status():
    report = failing_report()
    rows = table_rows(to_markdown(report))
    assert [row[1] for row in rows] == ["`conv1`", "`conv2`", "`fc`"]
    assert [row[-1] for row in rows] == ["✅", "❌", "✅"]
    assert [row[0] for row in rows] == ["0", "1", "2"]
    conv1 = rows[0]
    assert conv1[2] == "Conv" and conv1[3] == "0.1" and conv1[4] == "0.1" and conv1[5] == "0.095 – 0.105"


def test_markdown_marks_censored_sites():
    sites = [make_site("up", 10.0, index=0, censored="above", activation_std=2.0),
             make_site("down", 0.001, index=1, censored="below"),
             make_site("unmeasured", None, index=2)]
    rows = table_rows(to_markdown(typed(make_report(sites))))
    assert rows[0][3] == "> 10" and rows[0][4] == "> 5" and rows[0][5] == "—"
    assert rows[1][3] == "< 0.001"
    assert rows[2][3] == "—" and rows[2][-1] == "⚠️"


def test_markdown_escapes_pipes_and_backticks_in_site_names():
    sites = [make_site("a|b", 0.1, index=0), make_site("x`y", 0.2, index=1)]
    text = to_markdown(typed(make_report(sites)))
    rows = [line for line in text.splitlines() if line.startswith("| ")][1:]  # after the header
    assert "`a\\|b`" in rows[0]
    assert "``x`y``" in rows[1]
    # every row still has exactly 7 cells: unescaped pipes = 8 separators
    for row in rows:
        assert row.replace("\\|", "").count("|") == 8


def test_markdown_global_mode_and_partial_note():
    report = make_global_report(0.2)
    report["partial"] = True
    text = to_markdown(typed(report))
    rows = table_rows(text)
    assert len(rows) == 1 and rows[0][0] == "—" and rows[0][1] == "`global`"
    assert "Partial report" in text


def test_markdown_warnings_are_folded():
    report = make_report()
    report["gate"] = {"passed": True, "failures": [], "warnings": ["grid <too> narrow"]}
    text = to_markdown(typed(report))
    assert "<details><summary>Warnings (1)</summary>" in text
    assert "- grid \\<too\\> narrow" in text


# --- junit --------------------------------------------------------------------------------------------------------

def test_junit_one_suite_one_case_per_site_plus_model_case():
    root = ET.fromstring(to_junit(failing_report()))
    suites = root.findall("testsuite")
    assert root.tag == "testsuites" and len(suites) == 1
    suite = suites[0]
    assert suite.get("name") == "walkaudit"
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == ["conv1", "conv2", "fc", MODEL_CASE]
    assert {c.get("classname") for c in cases} == {"net.onnx"}
    assert suite.get("tests") == "4" and suite.get("failures") == "2" and suite.get("errors") == "0"
    failed = {c.get("name"): c.find("failure") for c in cases if c.find("failure") is not None}
    assert set(failed) == {"conv2", MODEL_CASE}
    assert "0.05" in failed["conv2"].get("message") and failed["conv2"].get("type") == "fail_under"
    assert failed[MODEL_CASE].get("type") == "min_clean_accuracy"


def test_junit_passing_report_has_no_failures_and_no_model_case():
    root = ET.fromstring(to_junit(gated(make_report(), GateConfig())))
    suite = root.find("testsuite")
    assert suite.get("failures") == "0" and suite.get("tests") == "3"
    assert root.findall(".//failure") == []
    assert MODEL_CASE not in [c.get("name") for c in suite.findall("testcase")]


def test_junit_model_case_when_min_clean_accuracy_configured_and_passing():
    report = gated(make_report(), GateConfig(min_clean_accuracy=0.5))
    suite = ET.fromstring(to_junit(report)).find("testsuite")
    model_case = [c for c in suite.findall("testcase") if c.get("name") == MODEL_CASE]
    assert len(model_case) == 1 and model_case[0].find("failure") is None


def test_junit_several_failures_of_one_site_make_one_failure_element():
    report = gated(make_report(), GateConfig(thresholds=(Threshold(None, 0.08, False), Threshold("conv2", 0.5, True))))
    root = ET.fromstring(to_junit(report))
    conv2 = next(c for c in root.iter("testcase") if c.get("name") == "conv2")
    failures = conv2.findall("failure")
    assert len(failures) == 1
    assert failures[0].get("type") == "fail_under,fail_under_relative"
    assert root.find("testsuite").get("failures") == "1"


def test_junit_escapes_names_and_messages():
    nasty = 'a<b>&"c\'\x01'
    report = make_report([make_site(nasty, 0.01, index=0)], model_path="dir/m&m<1>.onnx")
    report = gated(report, GateConfig(thresholds=(Threshold(None, 0.1, False),)))
    text = to_junit(report)
    root = ET.fromstring(text)  # parses: & < > quotes escaped, control character replaced
    case = root.find("testsuite/testcase")
    assert case.get("name") == 'a<b>&"c\'\\x01'
    assert case.get("classname") == "m&m<1>.onnx"
    assert case.find("failure") is not None


def test_junit_skips_sites_without_midpoint_and_carries_warnings():
    report = make_report([make_site("x", None, index=0), make_site("y", 0.1, index=1)])
    report["gate"] = {"passed": True, "failures": [], "warnings": ["w1", "w2"]}
    suite = ET.fromstring(to_junit(typed(report))).find("testsuite")
    assert suite.get("skipped") == "1"
    assert suite.find("testcase/skipped") is not None
    assert suite.find("system-out").text == "w1\nw2"


def test_junit_failure_for_unknown_site_goes_to_model_case():
    report = make_report()
    report["gate"] = {"passed": False, "warnings": [],
                      "failures": [{"rule": "max_drop", "site": "gone", "value": 50.0, "threshold": 20.0,
                                    "message": "σ50 fell"}]}
    suite = ET.fromstring(to_junit(typed(report))).find("testsuite")
    model_case = [c for c in suite.findall("testcase") if c.get("name") == MODEL_CASE]
    assert len(model_case) == 1 and model_case[0].find("failure").get("message") == "σ50 fell"


@pytest.mark.parametrize("render", [to_markdown, to_junit])
def test_renderers_return_strings_ending_in_newline(render):
    out = render(failing_report())
    assert isinstance(out, str) and out.endswith("\n")


# --- sites without σ50 and hostile names ------------------------------------------------------------------------------

HOSTILE = ["a\rb", "c\nd", "\x1b[2J\x1b]0;t\x07", "\x9b31m|x", "\u202eevil", "x`|`y"]


def test_markdown_site_whose_fit_found_no_midpoint_is_not_a_pass():
    report = gated(make_report([make_degenerate_site("flat"), make_site("ok", 0.5, index=1)]),
                   GateConfig(thresholds=(Threshold("ok", 0.01),)))
    rows = table_rows(to_markdown(report))
    assert rows[0][1] == "`flat`" and rows[0][3] == "—" and rows[0][5] == "—" and rows[0][-1] == "⚠️"
    assert rows[1][-1] == "✅"


def test_markdown_without_a_gate_has_a_plain_heading():
    text = to_markdown(typed(make_report()))
    assert text.splitlines()[0] == "## walkaudit: `net.onnx`"


def test_markdown_model_at_chance_says_so():
    report = gated(make_report([make_degenerate_site("a")], clean_accuracy=0.1), GateConfig(min_clean_accuracy=0.0))
    text = to_markdown(report)
    assert "failed (1 failure)" in text.splitlines()[0] and "**clean accuracy not above chance**" in text
    assert "- ❌ model · above\\_chance: clean accuracy 0.1 is not above chance 0.1" in text


def test_markdown_hostile_names_keep_one_row_each_and_no_control_characters():
    sites = [make_site(name, 0.1 * (i + 1), index=i) for i, name in enumerate(HOSTILE)]
    report = gated(make_report(sites, model_path="m\r\n# injected.onnx"),
                   GateConfig(thresholds=(Threshold(None, 1.0),)))
    text = to_markdown(report)
    assert not any(ord(c) < 32 and c != "\n" or 0x7F <= ord(c) <= 0x9F or c == "\u202e" for c in text)
    rows = [line for line in text.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == len(HOSTILE)
    for row in rows:
        assert row.replace("\\|", "").count("|") == 8
    assert "`a\\rb`" in rows[0] and "`\\x1b[2J\\x1b]0;t\\x07`" in rows[2]
    assert not any(line.startswith("# injected") for line in text.splitlines())


def test_junit_hostile_names_are_escaped_and_parse():
    sites = [make_site(name, 0.1 * (i + 1), index=i) for i, name in enumerate(HOSTILE)]
    report = gated(make_report(sites), GateConfig(thresholds=(Threshold(None, 1.0),)))
    text = to_junit(report)
    assert not any(ord(c) < 32 and c != "\n" or 0x7F <= ord(c) <= 0x9F for c in text)
    root = ET.fromstring(text)
    names = [c.get("name") for c in root.iter("testcase")]
    assert names[:3] == ["a\\rb", "c\\nd", "\\x1b[2J\\x1b]0;t\\x07"]
    assert all(f.get("message").startswith("site ") for f in root.iter("failure"))


def test_junit_skips_a_site_whose_fit_found_no_midpoint():
    report = gated(make_report([make_degenerate_site("flat")]), GateConfig())
    case = ET.fromstring(to_junit(report)).find("testsuite/testcase")
    assert "not above chance" in case.find("skipped").get("message")
