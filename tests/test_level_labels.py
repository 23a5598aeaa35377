"""Every human-facing output names the level of the report's noise model (issue 23): σ50 for the Gaussian models, w50
for uniform noise, BER50 for bit flips, t50 (seconds) for PCM drift, Δ50 with its bits B50 for quantisation; reports
without `config.level` (the Gaussian models' and those written before the other models) keep σ."""

from __future__ import annotations

import io
import math
import re
from pathlib import Path

import pytest
from rich.console import Console

from walkaudit._noise import NOISE_MODELS, REGISTRY, make_noise
from walkaudit.report import render
from walkaudit.report.formats import to_html, to_junit, to_markdown
from walkaudit.report.text import format_bits, midpoint_text, report_level

from .reports import make_report, make_site, typed

#: the kinds whose level is not σ, and what their midpoint is called
LABELS = {"uniform": "w50", "bitflip": "BER50", "weight-pcm": "t50", "quantize": "Δ50"}


def described(kind: str, midpoints=(0.0256, 0.05, 1.0), censored=(None, None, "above"), drop: bool = True) -> dict:
    """A report of `kind` as an audit writes it: `config` carries the model's own `describe()` (its `level`)."""
    sites = [make_site(f"s{i}", m, index=i, censored=c) for i, (m, c) in enumerate(zip(midpoints, censored))]
    if drop:
        for s in sites:
            s["tolerance"] = [{"drop": 0.01, "of": "1%", "sigma": 0.01, "ci95": [0.009, 0.011], "censored": None}]
    report = make_report(sites, noise=kind)
    report["config"].update(make_noise(kind).describe())
    return report


def terminal(report) -> str:
    out = io.StringIO()
    console = Console(file=out, width=10_000, color_system=None)
    render.show(console, render.site_table(report))
    render.show(console, [render.tolerance_title(report)])
    render.show(console, render.tolerance_table(report))
    render.show(console, render.summary_lines(report))
    render.show(console, render.compare_table(report, report))
    return out.getvalue()


def every_output(report) -> dict[str, str]:
    return {"terminal": terminal(report), "markdown": to_markdown(report), "html": to_html(report, baseline=report),
            "junit": to_junit(report)}


def test_each_model_declares_its_level_once_and_its_report_names_it():
    for kind in NOISE_MODELS:
        noise, level = make_noise(kind), REGISTRY[kind].level
        assert noise.label is level and noise.level == level.key
        text = noise.describe().get("level")
        # the JSON's config.level starts with the level's name; the Gaussian models write none (σ)
        assert (text is None) == (level.key == "sigma") and (text is None or text.startswith(level.key))
        expected = LABELS.get(kind, "σ50")
        assert level.midpoint == expected
        assert report_level(typed(described(kind)).config) is level


@pytest.mark.parametrize("kind", sorted(LABELS))
def test_every_format_labels_the_midpoint_with_the_models_symbol(kind):
    report = typed(described(kind))
    label, symbol = LABELS[kind], REGISTRY[kind].level.symbol
    for fmt, text in {**every_output(report), "repr": repr(report)}.items():
        assert label in text, fmt
        assert "σ50" not in text and "σ @" not in text, fmt  # nothing calls this level σ
    shown = terminal(report)
    assert f"Midpoint {REGISTRY[kind].level.name} {label} per site" in shown
    assert f"Tolerated noise: {symbol} at which accuracy falls" in shown and f"{symbol} @ 1% drop" in shown
    assert f"baseline {label}" in shown and f"new {label}" in shown and f"{label}: baseline vs new" in shown
    assert re.search(rf"weakest site: s0 \({re.escape(label)} 0\.0256", shown)
    markdown = to_markdown(report)
    assert f"| # | Site | Op | {label} |" in markdown and f"### Tolerated noise ({symbol} at which" in markdown
    assert f"({label} 0.0256" in markdown  # the weakest site in the context line
    assert f"<th>{label}</th>" in to_html(report) and f"<h2>{label} per site</h2>" in to_html(report)
    assert f"no gate rules: {label} 0.05" in to_junit(report)


def test_a_level_in_its_own_units_keeps_the_per_std_column_and_the_others_drop_it():
    uniform = typed(described("uniform"))
    assert "w50/std" in terminal(uniform) and "w50 / std" in to_markdown(uniform)
    for kind in ("bitflip", "weight-pcm", "quantize"):  # a BER, a time, a step: never over the activation std
        assert "/std" not in terminal(typed(described(kind))) and "/ std" not in to_markdown(typed(described(kind)))


def test_pcm_times_carry_their_unit_seconds():
    report = typed(described("weight-pcm", midpoints=(3.2e5, 1e6, 1e9)))
    shown = terminal(report)
    assert "3.2e+05 s" in shown and "weakest site: s0 (t50 3.2e+05 s)" in shown
    assert "level: time since programming t in s" in shown
    assert "t50 3.2e+05 s" in to_markdown(report) and "no gate rules: t50 1e+06 s not checked" in to_junit(report)
    assert "t (time since programming, s, log)" in to_html(report)


def test_quantize_shows_the_bits_a_step_stands_for():
    # Δ50 = 0.0256 is B50 = log2(1 + 1/0.0256) = 5.32 bits; a step censored above 1 is fewer than 1 bit
    assert math.log2(1 + 1 / 0.0256) == pytest.approx(5.32, abs=0.005)
    assert format_bits(0.0256) == "5.3 bits" and format_bits(1.0, "above") == "< 1.0 bits"
    assert format_bits(1e-4, "below") == "> 13.3 bits" and format_bits(None) == "—"
    report = typed(described("quantize"))
    shown = terminal(report)
    assert "weakest site: s0 (Δ50 0.0256, B50 5.3 bits)" in shown
    header = next(line for line in shown.splitlines() if "Δ50" in line and line.startswith("┃"))
    assert header.index("Δ50") < header.index("B50") < header.index("95% CI")
    row = next(line for line in shown.splitlines() if " s2 " in line)
    assert "> 1" in row and "< 1.0 bits" in row
    assert "0.01 (0.009–0.011), 6.7 bits" in shown  # the --drop table: Δ at a 1% drop, and its bits
    assert "| 5.3 bits |" in to_markdown(report) and "<td class=\"n\">5.3 bits</td>" in to_html(report)
    assert midpoint_text(0.0256, None, REGISTRY["quantize"].level) == "Δ50 0.0256, B50 5.3 bits"


@pytest.mark.parametrize("kind", ["additive", "multiplicative", "combined", "weight-additive", "bitflip"])
def test_reports_without_a_level_keep_sigma(kind):
    # the Gaussian models write no config.level; a report from before the other models has none either
    body = make_report(noise=kind, ratio=0.5 if kind == "combined" else None)
    report = typed(body)
    assert "level" not in body["config"] and report_level(report.config).symbol == "σ"
    markdown = to_markdown(report)
    assert "| # | Site | Op | σ50 | σ50 / std | 95% CI | Status |" in markdown.splitlines()  # as before
    assert "|--:|:-----|:---|----:|----------:|:-------|:------:|" in markdown.splitlines()
    shown = terminal(report)
    assert "Midpoint noise level σ50 per site" in shown and "σ50/std" in shown and "level:" not in shown
    assert "weakest site: conv2 (σ50 0.05)" in shown and "σ50: baseline vs new" in shown
    assert "no gate rules: σ50 0.1 not checked" in to_junit(report) and "σ (noise level, log)" in to_html(report)
    assert render.tolerance_title(report) == render.TOLERANCE_TITLE


def test_records_layout_keeps_the_labels():
    shown = io.StringIO()
    render.show(Console(file=shown, width=40, color_system=None), render.site_table(typed(described("quantize")),
                                                                                     width=40))
    assert "Δ50 0.0256  B50 5.3 bits" in shown.getvalue()


@pytest.mark.parametrize("kind, xlabel", [("bitflip", "BER (bit error rate)"),
                                          ("weight-pcm", "t (time since programming, s)"),
                                          ("quantize", "Δ (relative step 1/(2^B − 1); B = log2(1 + 1/Δ) bits)"),
                                          ("additive", "σ (noise level)")])
def test_the_plot_axes_name_the_level(kind, xlabel):
    pytest.importorskip("matplotlib")
    from walkaudit.report.plot import plot_report

    body = described(kind, drop=False)
    if kind == "additive":
        assert "level" not in body["config"]
    figure = plot_report(typed(body))
    curves, bars = figure.axes[:2]
    label = LABELS.get(kind, "σ50")
    assert curves.get_xlabel() == xlabel
    assert f"◆ {label}" in curves.get_title() and bars.get_title().startswith(f"{label} per site")
    assert bars.get_xlabel().startswith(label)
    # a relative step also gets a top axis in bits, B = log2(1 + 1/Δ), ticked at whole bit counts
    tops = [c for c in curves.child_axes if c.get_xlabel() == "B (bits)"]
    assert len(tops) == (kind == "quantize")
    if tops:
        assert [t for t in tops[0].get_xticks() if t in (1, 4, 8)] == [1, 4, 8]
    relative = plot_report(typed(body), relative=True).axes[0].get_xlabel()
    # only a level in the site's own units is divided by the activation std
    assert ("activation std" in relative) == (kind == "additive")


@pytest.mark.parametrize("kind", ["bitflip", "weight-pcm", "quantize"])
def test_the_gates_messages_and_the_github_annotations_name_the_level(kind):
    from walkaudit.report.formats import to_github
    from walkaudit.report.gate import Drop, GateConfig, Threshold, evaluate

    label, symbol = LABELS[kind], REGISTRY[kind].level.symbol
    report = typed(described(kind))
    baseline = typed(described(kind, midpoints=(0.5, 0.5, 1.0)))
    config = GateConfig((Threshold(None, 0.04), Threshold("s1", 0.5, drop="1%")), max_drop=Drop(0.1, "%"))
    gated = report.with_gate(evaluate(report, config, baseline), rules=config.to_dict())
    messages = [f.message for f in gated.gate.failures]
    assert f"site s0: {label} 0.0256 < 0.04" in " ".join(messages)
    assert any(f"site s1: {symbol} at a 1% drop 0.01 < 0.5" in m for m in messages)
    assert any(f"site s0: {label} fell from 0.5 to 0.0256" in m for m in messages)
    annotations = to_github(gated)
    assert label in annotations and "σ" not in annotations
    assert "σ" not in terminal(gated) + to_markdown(gated) + to_junit(gated)


def test_compare_names_the_level_in_its_table_and_its_warning(tmp_path):
    import json

    from click.testing import CliRunner

    from walkaudit.cli import main

    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps(described("bitflip", midpoints=(0.05, 0.05, 1.0))))
    new.write_text(json.dumps(described("bitflip")))
    result = CliRunner().invoke(main, ["compare", str(old), str(new)])
    assert result.exit_code == 0, result.output
    assert "baseline BER50" in result.output and "BER50: baseline vs new" in result.output
    assert "no --max-drop: BER50 drops are shown, not gated" in result.output
    assert "σ" not in result.output


def test_the_fits_sentences_name_the_level_of_a_real_audit():
    """A bit-flip audit's fit messages and site notes say BER (the fit writes them in σ)."""
    import numpy as np

    import walkaudit

    samples = Path(__file__).resolve().parent.parent / "samples"
    with np.load(samples / "mnist_val.npz") as d:
        x, y = d["x"][:200], d["y"][:200]
    report = walkaudit.audit(str(samples / "mnist_lenet5.legacy.onnx"), x, y, noise="bitflip", repeats=1,
                             provider="cpu", sigmas=(1e-6, 1e-5, 0.1), ops=("Gemm",))
    said = [s.fit.message for s in report.sites] + [n for s in report.to_dict()["sites"] for n in s["notes"]]
    assert any("BER" in text for text in said)
    assert not any("σ" in text for text in said), said
