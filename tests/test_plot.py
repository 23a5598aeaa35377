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

from .reports import (
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
    assert str(info.value).startswith("matplotlib is not installed: pip install matplotlib")
    assert "pip install walkaudit" not in str(info.value)  # walkaudit is not on an index


# --- what the figure shows -------------------------------------------------------------------------------------------

def _curve_labels(figure):
    ax = figure.axes[0]
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_legend_is_in_network_order_and_many_sites_are_distinguishable():
    pytest.importorskip("matplotlib")
    names = [f"/encoder/layer.{i}/Conv_output_0" for i in range(14)]
    sites = [make_site(n, 10 ** (-2 + (i * 7 % 14) / 7), index=i) for i, n in enumerate(names)]
    figure = plot_report(typed(make_report(sites)))
    labels = [t for t in _curve_labels(figure) if "layer." in t]
    order = [int(t.split("layer.")[1].split("/")[0]) for t in labels]
    assert order == sorted(order) and len(labels) == 12  # the 12 weakest, in network order
    assert all(t.endswith("Conv_output_0") for t in labels) and len(set(labels)) == len(labels)
    from walkaudit.report.plot import _styles

    styles = _styles(24)
    assert len(set(styles)) == 24 and len({c for c, _ in styles[:20]}) == 20


def test_plain_tick_labels_floor_threshold_and_one_site():
    pytest.importorskip("matplotlib")
    report = typed(make_report([make_site("only", 2.0, index=0)]))
    report = report.with_gate(evaluate(report, GateConfig(thresholds=(Threshold(None, 0.5, False),))),
                              rules=GateConfig(thresholds=(Threshold(None, 0.5, False),)).to_dict())
    figure = plot_report(report)
    figure.canvas.draw()
    ax_acc, ax_mid = figure.axes[:2]
    assert "(1 site;" in ax_acc.get_title()
    ticks = [t.get_text() for t in ax_mid.get_xticklabels() if t.get_text()]
    assert ticks and all("10^" not in t and "×" not in t and "$" not in t for t in ticks)
    assert ax_mid.get_xlim()[0] == pytest.approx(0.1)  # the decade at or below the threshold and the bars
    assert any("fail under 0.5" in t for t in _curve_labels(figure))
    assert any(line.get_xdata()[0] == 0.5 for line in ax_mid.get_lines() if line.get_linestyle() == "--")


def test_baseline_overlay_and_relative_view():
    pytest.importorskip("matplotlib")
    new = typed(make_report([make_site("a", 0.1, index=0, activation_std=2.0),
                             make_site("b", 0.2, index=1, activation_std=4.0)]))
    old = typed(make_report([make_site("a", 0.2, index=0, activation_std=2.0),
                             make_site("b", 0.2, index=1, activation_std=4.0)]))
    figure = plot_report(new, baseline=old)
    assert any("baseline" in t for t in _curve_labels(figure))
    ticks = [ln for ln in figure.axes[1].get_lines() if ln.get_gid() == "baseline"]
    assert sorted(ln.get_xdata()[0] for ln in ticks) == [0.2, 0.2]
    relative = plot_report(new, relative=True)
    assert "activation std" in relative.axes[0].get_xlabel()
    bars = sorted(p.get_x() + p.get_width() for p in relative.axes[1].patches)
    assert bars == pytest.approx([0.05, 0.05])


def test_plot_command_takes_baseline_and_relative(tmp_path):
    pytest.importorskip("matplotlib")
    import json

    from click.testing import CliRunner

    from walkaudit.cli import main

    (tmp_path / "r.json").write_text(json.dumps(make_report()))
    result = CliRunner().invoke(main, ["plot", str(tmp_path / "r.json"), "-o", str(tmp_path / "c.png"),
                                       "--baseline", str(tmp_path / "r.json"), "--relative"])
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "c.png").stat().st_size > 1000
