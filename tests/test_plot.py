"""plot_report writes real image files; bad suffixes and a missing matplotlib are usage errors."""

from __future__ import annotations

import builtins
import sys
import xml.etree.ElementTree as ET

import pytest

from walkaudit.errors import UsageError
from walkaudit.report import Report
from walkaudit.report.gate import GateConfig, Threshold, evaluate
from walkaudit.report.plot import MAX_BARS, plot_report, save_figure

try:
    from tests.reports import (
        make_degenerate_site,
        make_global_report,
        make_report,
        make_site,
        typed,
    )
except ImportError:  # tests/ on sys.path instead of the repository root
    from reports import (
        make_degenerate_site,
        make_global_report,
        make_report,
        make_site,
        typed,
    )


def varied_report() -> Report:
    sites = [make_site("conv1", 0.1, index=0), make_site("conv2", 0.05, index=1),
             make_site("up", 10.0, index=2, censored="above"), make_site("down", 1e-3, index=3, censored="below"),
             make_site("none", None, index=4), make_site("we$ird$", 0.3, index=5)]
    report = typed(make_report(sites))
    return report.with_gate(evaluate(report, GateConfig(thresholds=(Threshold(None, 0.08, False),))))


def plot_to(report: Report, path) -> None:
    save_figure(plot_report(report), path)


def test_plot_report_returns_a_figure_and_writes_nothing(tmp_path, monkeypatch):
    matplotlib = pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    figure = plot_report(varied_report())
    assert isinstance(figure, matplotlib.figure.Figure)
    assert list(tmp_path.iterdir()) == []


def test_png_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "report.png"
    assert save_figure(plot_report(varied_report()), path) is None
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
    assert [p.name for p in tmp_path.iterdir()] == ["report.png"]  # no temporary file left


def test_svg_is_written_and_names_the_sites(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    path = tmp_path / "report.svg"
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # keep text as <text> so it can be read back
        plot_to(varied_report(), str(path))
    text = path.read_text(encoding="utf-8")
    assert ET.fromstring(text).tag.endswith("svg")
    for name in ("conv1", "conv2", "up", "down", "we$ird$", "net.onnx", "halfway 0.500"):
        assert name in text


def test_pdf_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "report.PDF"
    plot_to(typed(make_global_report()), path)
    assert path.read_bytes().startswith(b"%PDF")


def test_many_sites_and_empty_reports_plot(tmp_path):
    pytest.importorskip("matplotlib")
    many = make_report([make_site(f"s{i}", 10 ** (-3 + i / 40), index=i) for i in range(MAX_BARS + 20)])
    plot_to(typed(many), tmp_path / "many.png")
    plot_to(typed(make_report([])), tmp_path / "empty.png")
    assert (tmp_path / "many.png").stat().st_size > 0 and (tmp_path / "empty.png").stat().st_size > 0


def test_plot_does_not_touch_pyplot_state(tmp_path):
    pytest.importorskip("matplotlib")
    had_pyplot = "matplotlib.pyplot" in sys.modules
    plot_to(varied_report(), tmp_path / "x.png")
    assert ("matplotlib.pyplot" in sys.modules) == had_pyplot


HOSTILE_NAMES = ["cost_$5_to_$10", "\x1b[2J\x1b]0;pwned\x07", "a\rb\nc\x9b31m", "$\\frac{1}{0}$", "x_{y}^z$", "_hidden",
                 "\u202eevil", "日本語🙂", "\\$", "$$"]


def test_hostile_names_plot_without_warnings_and_model_names_with_dollars(tmp_path, recwarn):
    matplotlib = pytest.importorskip("matplotlib")
    sites = [make_site(name, 0.1 * (i + 1), index=i) for i, name in enumerate(HOSTILE_NAMES)]
    report = typed(make_report(sites, model_path="models/cost_$5_to_$10.onnx"))
    path = tmp_path / "hostile.svg"
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        plot_to(report, path)
    text = path.read_text(encoding="utf-8")
    assert "cost_$5_to_$10.onnx" in text
    assert "\x1b" not in text and "\\x1b[2J" in text
    assert [str(w.message) for w in recwarn] == []


def test_model_at_chance_plots(tmp_path):
    pytest.importorskip("matplotlib")
    report = typed(make_report([make_degenerate_site("a"), make_degenerate_site("b", index=1)], clean_accuracy=0.1))
    plot_to(report, tmp_path / "chance.png")
    assert (tmp_path / "chance.png").stat().st_size > 0


@pytest.mark.parametrize("name", ["report.jpg", "report", "report.png.txt"])
def test_unsupported_suffix_is_a_usage_error(tmp_path, name):
    pytest.importorskip("matplotlib")
    with pytest.raises(UsageError, match="png, .svg or .pdf"):
        save_figure(plot_report(typed(make_report())), tmp_path / name)
    assert not (tmp_path / name).exists()


def test_unwritable_path_is_a_usage_error(tmp_path):
    pytest.importorskip("matplotlib")
    with pytest.raises(UsageError, match="cannot write plot"):
        plot_to(typed(make_report()), tmp_path / "missing-dir" / "r.png")


def test_missing_matplotlib_is_a_usage_error(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(UsageError) as info:
        plot_report(typed(make_report()))
    assert str(info.value) == "matplotlib is not installed: pip install 'walkaudit[plot]'"
