"""The CLI on saved reports (compare, plot, --baseline): hostile files are one line and exit 2, stdout carries only the
document asked for, broken models fail the gate, and names never reach the terminal raw."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from rich.console import Console

from walkaudit.cli import main
from walkaudit.report import render

from .models import mlp
from .reports import make_degenerate_site, make_report, make_site, typed


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _replace(old: str, new: str):
    return lambda: json.dumps(make_report()).replace(old, new, 1)


def _change(path: tuple, value):
    def build():
        report = make_report()
        target = report
        for key in path[:-1]:
            target = target[key]
        if value is None:
            del target[path[-1]]
        else:
            target[path[-1]] = value
        return json.dumps(report)
    return build


HOSTILE = {
    "empty": lambda: "",
    "not-json": lambda: "this is not json",
    "binary": lambda: b"\x89PNG\r\n\x1a\n\x00\xff",
    "deep": lambda: "[" * 200_000 + "]" * 200_000,
    "deep-extra": lambda: json.dumps(make_report())[:-1] + ', "x": ' + "[" * 900 + "]" * 900 + "}",
    "nan": _replace('"chance": 0.1', '"chance": NaN'),
    "infinity": _replace('"accuracy_std": 0.01', '"accuracy_std": Infinity'),
    "overflow": _replace('"chance": 0.1', '"chance": 1e999'),
    "huge-int": _replace('"seed": 0', '"seed": ' + "9" * 5000),
    "midpoint-string": _change(("sites", 0, "midpoint"), "0.1"),
    "sites-string": _change(("sites",), "conv1"),
    "clean-string": _change(("clean_accuracy",), "0.9"),
    "no-sites": _change(("sites",), None),
    "points-object": _change(("sites", 0, "points"), {"sigma": 1}),
    "notes-string": _change(("runtime", "notes"), "\x1b[2J"),
    "name-number": _change(("sites", 0, "name"), 7),
    "future": _change(("schema",), "walkaudit.report/2"),
    "not-walkaudit": _change(("schema",), "\x1b]0;pwned\x07"),
    "list": lambda: "[]",
}


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "good.json").write_text(json.dumps(make_report()))
    return tmp_path


def _check_refusal(result, before, folder):
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("walkaudit: error: "), result.stderr
    assert "unexpected" not in lines[0]
    assert not any(ord(c) < 32 or 0x7F <= ord(c) <= 0x9F for c in lines[0])
    assert result.stdout == ""
    assert digest(folder) == before  # nothing written, nothing changed


@pytest.mark.parametrize("case", sorted(HOSTILE))
@pytest.mark.parametrize("position", ["old", "new"])
def test_compare_refuses_hostile_reports_with_one_line(folder, case, position):
    text = HOSTILE[case]()
    (folder / "bad.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    (folder / "out.md").write_text("user's file\n")
    before = digest(folder)
    files = ["bad.json", "good.json"] if position == "old" else ["good.json", "bad.json"]
    result = invoke("compare", *(folder / f for f in files), "--max-drop", "20%", "--markdown", folder / "out.md")
    _check_refusal(result, before, folder)


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_plot_refuses_hostile_reports_with_one_line(folder, case):
    text = HOSTILE[case]()
    (folder / "bad.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    (folder / "out.png").write_bytes(b"user's image")
    before = digest(folder)
    _check_refusal(invoke("plot", folder / "bad.json", "-o", folder / "out.png"), before, folder)


@pytest.mark.parametrize("case", ["nan", "midpoint-string", "deep", "future", "missing"])
def test_audit_refuses_a_hostile_baseline_before_running(folder, case, monkeypatch):
    import walkaudit.api

    onnx.save(mlp(seed=1), folder / "mlp.onnx")
    np.savez(folder / "val.npz", x=np.zeros((8, 16), np.float32))
    if case != "missing":
        text = HOSTILE[case]()
        (folder / "bad.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    (folder / "out.json").write_text("{}")
    before = digest(folder)
    monkeypatch.setattr(walkaudit.api, "audit", lambda *a, **k: pytest.fail("audit ran"))
    result = invoke(folder / "mlp.onnx", "--data", folder / "val.npz", "--baseline", folder / "bad.json",
                    "--max-drop", "20%", "--json", folder / "out.json", "--quiet")
    _check_refusal(result, before, folder)


def test_compare_refuses_a_missing_file(folder):
    result = invoke("compare", folder / "good.json", folder / "missing.json")
    assert result.exit_code == 2 and result.stderr.splitlines() == [
        f"walkaudit: error: report not found: {folder / 'missing.json'}"]


# --- stdout carries only the document -------------------------------------------------------------------------------

@pytest.mark.parametrize("flag, start", [("--markdown", "## "), ("--junit", "<?xml"), ("--json", "{")])
def test_compare_document_to_stdout_alone(folder, flag, start):
    worse = make_report([make_site("conv1", 0.01, index=0), make_site("conv2", 0.05, index=1),
                         make_site("fc", 1.0, index=2, op_type="Gemm")])
    (folder / "worse.json").write_text(json.dumps(worse))
    result = invoke("compare", folder / "good.json", folder / "worse.json", "--max-drop", "20%", flag, "-")
    assert result.exit_code == 1
    assert result.stdout.startswith(start)
    assert "σ50: baseline vs new" not in result.stdout and "gate: FAILED" not in result.stdout
    assert "σ50: baseline vs new" in result.stderr and "gate: FAILED" in result.stderr
    if flag == "--json":
        out = typed(json.loads(result.stdout))
        assert out.gate is not None and not out.gate.passed
        assert out.config.gate_rules["max_drop"] == "20%"


# --- broken models and the verdict ----------------------------------------------------------------------------------

def broken_report() -> dict:
    return make_report([make_degenerate_site("conv1", 10.0, index=0), make_degenerate_site("conv2", 10.0, index=1),
                        make_degenerate_site("fc", 10.0, index=2)], clean_accuracy=0.0)


def test_compare_healthy_to_broken_fails(folder):
    (folder / "broken.json").write_text(json.dumps(broken_report()))
    result = invoke("compare", folder / "good.json", folder / "broken.json", "--max-drop", "20%")
    assert result.exit_code == 1
    assert "dec" not in result.stdout.replace("decades", "")  # no "+3.68 dec" from the grid's end
    assert "FAIL: clean accuracy 0 is not above chance 0.1" in " ".join(result.stdout.split())
    assert "gate: FAILED" in result.stdout


def test_compare_clean_accuracy_zero_fails_a_fail_under(folder):
    (folder / "broken.json").write_text(json.dumps(broken_report()))
    result = invoke("compare", folder / "broken.json", folder / "broken.json", "--fail-under", "0.5")
    assert result.exit_code == 1 and "not above chance" in result.stdout


def test_compare_missing_midpoint_in_the_new_report_fails_a_max_drop(folder):
    new = make_report([make_degenerate_site("conv1", 10.0, index=0), make_site("conv2", 0.05, index=1),
                       make_site("fc", 1.0, index=2, op_type="Gemm")])
    (folder / "new.json").write_text(json.dumps(new))
    result = invoke("compare", folder / "good.json", folder / "new.json", "--max-drop", "20%")
    assert result.exit_code == 1
    assert "nan" not in result.stdout
    assert "FAIL: site conv1: no σ50 in this report" in " ".join(result.stdout.split())


def test_compare_fail_lines_name_the_site(folder):
    result = invoke("compare", folder / "good.json", folder / "good.json", "--fail-under", "0.08")
    assert result.exit_code == 1
    assert "FAIL: site conv2: σ50 0.05 < 0.08, 95% CI 0.0475–0.0525 (rule *:0.08)" in result.stdout


# --- hostile names on the terminal and in plots ---------------------------------------------------------------------

NAMES = ["\x1b[2J", "\x1b]0;pwned\x07", "a\rb", "c\nd", "\x9b31m", "[bold]markup[/]", "[/]"]


def _no_controls(text: str) -> bool:
    return not any((ord(c) < 32 and c != "\n") or 0x7F <= ord(c) <= 0x9F for c in text)


def test_compare_terminal_output_escapes_names(folder):
    sites = [make_site(name, 0.1 * (i + 1), index=i) for i, name in enumerate(NAMES)]
    (folder / "h.json").write_text(json.dumps(make_report(sites)))
    result = invoke("compare", folder / "h.json", folder / "h.json", "--fail-under", "10")
    assert result.exit_code == 1
    assert _no_controls(result.stdout) and _no_controls(result.stderr)
    assert "\\x1b[2J" in result.stdout and "[bold]markup[/]" in result.stdout


def test_render_escapes_names_in_the_site_table_and_summary():
    report = typed(make_report([make_site(name, 0.1 * (i + 1), index=i) for i, name in enumerate(NAMES)]))
    report.runtime.extra["notes"] = ["note \x1b[31m"]
    console = Console(record=True, width=200, force_terminal=False, color_system=None)
    console.print(render.site_table(report))
    for line in render.summary_lines(report):
        console.print(line, markup=False)
    text = console.export_text()
    assert _no_controls(text) and "\\x1b]0;pwned\\x07" in text and "note \\x1b[31m" in text


def test_plot_of_a_model_with_dollars_and_hostile_names(folder):
    pytest.importorskip("matplotlib")
    sites = [make_site(name, 0.1 * (i + 1), index=i) for i, name in enumerate([*NAMES, "$x_{1}$", "日本🙂"])]
    (folder / "r.json").write_text(json.dumps(make_report(sites, model_path="cost_$5_to_$10.onnx")))
    result = invoke("plot", folder / "r.json", "-o", folder / "out.png")
    assert result.exit_code == 0, result.stderr
    assert result.stderr == f"wrote {folder / 'out.png'}\n"
    assert (folder / "out.png").read_bytes()[:4] == b"\x89PNG"
