"""Tolerances: per site, the σ at which accuracy falls by a stated drop — below the midpoint, growing with the drop,
in the JSON, the table, Markdown and HTML, and gateable."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from walkaudit._analysis import fit
from walkaudit.cli import main

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
ARGS = [str(SAMPLES / "mnist_mlp.dynamo.onnx"), "--data", str(SAMPLES / "mnist_val.npz"), "--provider", "cpu"]


def test_tolerance_of_a_known_curve_and_its_censoring():
    """A noise-free logistic: the 5-point drop sits where the curve says, with a tight interval."""
    sig = np.logspace(-2, 2, 33)
    acc = np.repeat(fit.logistic(np.log10(sig), 0.98, 0.1, np.log10(5), 0.2)[:, None], 3, axis=1)
    got = fit.tolerance(sig, acc, clean=0.98, drop=0.05, samples=100_000)
    want = 10 ** (np.log10(5) + 0.2 * np.log((0.98 - 0.1) / (0.93 - 0.1) - 1))  # logistic solved for 0.93
    assert got.censored is None and abs(np.log10(got.sigma / want)) < 0.02
    assert got.ci95[0] <= got.sigma <= got.ci95[1]
    assert fit.tolerance(sig, acc, clean=0.98, drop=0.95, samples=1000).censored == "above"
    assert fit.tolerance(sig[20:], acc[20:], clean=0.98, drop=0.01, samples=1000).censored == "below"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("tol")
    result = CliRunner().invoke(main, [*ARGS, "--drop", "1%", "--drop", "5%", "--json", str(out / "r.json"),
                                       "--markdown", str(out / "r.md"), "--html", str(out / "r.html")])
    assert result.exit_code == 0, result.stderr
    return json.loads((out / "r.json").read_text()), result.output, (out / "r.md").read_text(), \
        (out / "r.html").read_text()


def test_tolerances_lie_below_the_midpoint_and_move_with_the_drop(report):
    body, _, _, _ = report
    for site in body["sites"]:
        one, five = site["tolerance"]
        assert (one["of"], five["of"]) == ("1%", "5%") and one["drop"] == 0.01
        assert one["sigma"] < five["sigma"] < site["midpoint"]


def test_tolerances_are_shown_in_the_table_markdown_and_html(report):
    body, terminal, markdown, page = report
    assert "σ @ 1% drop" in terminal and "σ @ 5%" in markdown and "σ @ 1%" in page
    for site in body["sites"]:
        assert f"{site['tolerance'][0]['sigma']:.3g}" in markdown


def test_a_rule_on_a_tolerance_gates_it():
    passed = CliRunner().invoke(main, [*ARGS, "--drop", "1%", "--rule", "linear.*:0.01@1%", "-q"])
    failed = CliRunner().invoke(main, [*ARGS, "--drop", "1%", "--rule", "linear.*:100@1%", "-q"])
    assert passed.exit_code == 0 and failed.exit_code == 1
    assert "site linear: σ at a 1% drop" in failed.output


@pytest.mark.parametrize("width", [60, 100, None])
def test_the_drop_table_title_is_one_line_and_cells_show_the_json_interval(report, width):
    import io

    from rich.console import Console

    from walkaudit.report import render
    from walkaudit.report.model import Report

    body, terminal, _, _ = report
    assert render.TOLERANCE_TITLE in terminal.splitlines()  # a line of its own, whole
    out = io.StringIO()
    render.show(Console(file=out, width=width or 10_000, color_system=None),
                render.tolerance_table(Report.from_dict(body), width=width))
    shown = out.getvalue()
    assert "Tolerated" not in shown and "falls by" not in shown  # no title wrapped to the table's width
    for site in body["sites"]:
        for entry in site["tolerance"]:
            lo, hi = entry["ci95"]
            assert f"({lo:.3g}–{hi:.3g})" in shown.replace("\n", "") or f"{lo:.3g}" in shown, entry
    assert render.tolerance_cell({"sigma": 0.5, "ci95": [0.4, 0.6], "censored": None}) == "0.5 (0.4–0.6)"
    assert render.tolerance_cell({"sigma": 10.0, "ci95": None, "censored": "above"}).startswith(">")
