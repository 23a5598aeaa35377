"""plot_report writes real image files; bad suffixes and a missing matplotlib are usage errors."""

from __future__ import annotations

import builtins
import sys
import xml.etree.ElementTree as ET

import pytest

from walkaudit.errors import UsageError
from walkaudit.report.gate import GateConfig, Threshold, evaluate
from walkaudit.report.plot import MAX_BARS, plot_report

try:
    from tests.reports import make_global_report, make_report, make_site
except ImportError:  # tests/ on sys.path instead of the repository root
    from reports import make_global_report, make_report, make_site


def varied_report() -> dict:
    sites = [make_site("conv1", 0.1, index=0), make_site("conv2", 0.05, index=1),
             make_site("up", 10.0, index=2, censored="above"), make_site("down", 1e-3, index=3, censored="below"),
             make_site("none", None, index=4), make_site("we$ird$", 0.3, index=5)]
    report = make_report(sites)
    report["gate"] = evaluate(report, GateConfig(thresholds=(Threshold(None, 0.08, False),))).to_dict()
    return report


def test_png_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "report.png"
    assert plot_report(varied_report(), path) is None
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000


def test_svg_is_written_and_names_the_sites(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    path = tmp_path / "report.svg"
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # keep text as <text> so it can be read back
        plot_report(varied_report(), str(path))
    text = path.read_text(encoding="utf-8")
    assert ET.fromstring(text).tag.endswith("svg")
    for name in ("conv1", "conv2", "up", "down", "we$ird$", "net.onnx", "halfway 0.500"):
        assert name in text


def test_pdf_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "report.PDF"
    plot_report(make_global_report(), path)
    assert path.read_bytes().startswith(b"%PDF")


def test_many_sites_and_empty_reports_plot(tmp_path):
    pytest.importorskip("matplotlib")
    many = make_report([make_site(f"s{i}", 10 ** (-3 + i / 40), index=i) for i in range(MAX_BARS + 20)])
    plot_report(many, tmp_path / "many.png")
    plot_report(make_report([]), tmp_path / "empty.png")
    assert (tmp_path / "many.png").stat().st_size > 0 and (tmp_path / "empty.png").stat().st_size > 0


def test_plot_does_not_touch_pyplot_state(tmp_path):
    pytest.importorskip("matplotlib")
    had_pyplot = "matplotlib.pyplot" in sys.modules
    plot_report(varied_report(), tmp_path / "x.png")
    assert ("matplotlib.pyplot" in sys.modules) == had_pyplot


@pytest.mark.parametrize("name", ["report.jpg", "report", "report.png.txt"])
def test_unsupported_suffix_is_a_usage_error(tmp_path, name):
    with pytest.raises(UsageError, match="png, .svg or .pdf"):
        plot_report(make_report(), tmp_path / name)
    assert not (tmp_path / name).exists()


def test_unwritable_path_is_a_usage_error(tmp_path):
    pytest.importorskip("matplotlib")
    with pytest.raises(UsageError, match="cannot write plot"):
        plot_report(make_report(), tmp_path / "missing-dir" / "r.png")


def test_missing_matplotlib_is_a_usage_error(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(UsageError) as info:
        plot_report(make_report(), tmp_path / "r.png")
    assert str(info.value) == "matplotlib is not installed: pip install 'walkaudit[plot]'"
