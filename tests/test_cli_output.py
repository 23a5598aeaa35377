"""What people see around the numbers: tables that never crop, -q/-s, progress, help and one-line errors,
warnings, GitHub annotations and the HTML report."""

from __future__ import annotations

import io
import json
import re
import zipfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from walkaudit.cli import _err, main
from walkaudit.cli.progress import RichProgress
from walkaudit.report import render
from walkaudit.report.formats import to_github, to_html
from walkaudit.report.text import format_sigma

from .reports import make_report, make_site, typed

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
LEGACY = SAMPLES / "mnist_lenet5.legacy.onnx"
DATA = SAMPLES / "mnist_val.npz"
FAST = ["--limit", "200", "--sigmas", "0.01,0.1,1,10,100", "--repeats", "1", "--provider", "cpu"]


def invoke(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


@pytest.fixture(scope="module")
def legacy_report(tmp_path_factory):
    """An audit of every Conv/Gemm/Relu of the legacy LeNet export: names like /features/features.3/Conv_output_0."""
    if not LEGACY.exists():
        pytest.skip("samples missing")
    out = tmp_path_factory.mktemp("legacy") / "r.json"
    result = invoke(LEGACY, "--data", DATA, *FAST, "--ops", "Conv,Gemm,Relu", "--json", out, "-q")
    assert result.exit_code == 0, result.stderr
    return json.loads(out.read_text())


def name_cells(text: str) -> list[str]:
    """The site-name cell of every row of a site table or record layout."""
    cells = []
    for line in text.splitlines():
        if line.startswith("│"):
            cells.append(line.split("│")[2].strip())
        elif re.match(r"^#\d+  ", line):
            cells.append(line.split("  ")[1])
    return [re.sub(r" [ᶠⁱ]$", "", c) for c in cells]


def numbers_of(site: dict) -> list[str]:
    nums = [format_sigma(site["midpoint"], site["censored"])]
    if site["midpoint_relative"] is not None:
        nums.append(format_sigma(site["midpoint_relative"], site["censored"]))
    if site["ci95"] and site["midpoint"] is not None:
        nums.append(f"{site['ci95'][0]:.3g}–{site['ci95'][1]:.3g}")
    if site["weight"]:
        nums.append(f"{site['weight']['mean_abs']:.3g}")
    return nums


@pytest.mark.parametrize("width", ["60", "80", "200", None])
def test_the_table_crops_nothing_at_any_width(legacy_report, tmp_path, width):
    env = {"COLUMNS": width} if width else {"COLUMNS": ""}
    result = invoke(LEGACY, "--data", DATA, *FAST, "--ops", "Conv,Gemm,Relu", env=env)
    assert result.exit_code == 0, result.stderr
    text = result.stdout
    if width:
        assert max(len(line) for line in text.splitlines()) <= int(width) or "#0" in text  # records may run long
    sites = legacy_report["sites"]
    for site in sites:
        for number in numbers_of(site):
            assert number in text, (number, text)
    assert "…│" not in text and "… │" not in text  # no cell cut by rich
    cells = name_cells(text)
    assert len(cells) == len(sites), text
    assert len(set(cells)) == len(cells), cells  # distinguishable
    for cell, site in zip(cells, sites):
        assert site["name"].endswith(cell.lstrip("…")), (cell, site["name"])  # the end is never elided


def test_piped_output_is_the_whole_table(legacy_report):
    result = invoke(LEGACY, "--data", DATA, *FAST, "--ops", "Conv,Gemm,Relu", env={"COLUMNS": ""})
    assert "/features/features.3/Conv_output_0" in result.stdout  # full names: not a terminal, no width limit


@pytest.mark.parametrize("width", ["60", "80", "200"])
def test_inspect_names_stay_distinguishable(width):
    if not LEGACY.exists():
        pytest.skip("samples missing")
    result = invoke("inspect", LEGACY, "--ops", "all", env={"COLUMNS": width})
    assert result.exit_code == 0, result.stderr
    names = [s["name"] for s in json.loads(invoke("inspect", LEGACY, "--ops", "all", "--json").stdout)]
    rows = [ln for ln in result.stdout.splitlines() if ln.startswith("│") or re.match(r"^#\d+  ", ln)]
    cells = [ln.split("│")[2].strip() if ln.startswith("│") else ln.split("  ")[1] for ln in rows]
    assert len(cells) == len(names) and len(set(cells)) == len(cells), result.stdout
    for cell, name in zip(cells, names):
        assert name.endswith(cell.lstrip("…"))


def test_short_names_keep_ends_and_stay_distinct():
    names = [f"/model/encoder/layer.{i}/attention/MatMul_output_0" for i in range(12)] + ["logits"]
    short = render.short_names(names, 20)
    assert len(set(short)) == len(names)
    assert all(n.endswith(s.lstrip("…")) for n, s in zip(names, short))
    assert render.shorten("/a/b/c/Conv_output_0", 16) == "…/Conv_output_0"


def test_records_are_never_cut_by_rich():
    sites = [make_site("/very/long/prefix/" + "x" * 80 + f"/site{i}", 0.156, index=i) for i in range(3)]
    layout = render.site_table(typed(make_report(sites)), width=60)
    assert isinstance(layout, render.Lines)
    out = io.StringIO()
    from rich.console import Console

    render.show(Console(file=out, width=60), layout)
    assert all(s["name"] in out.getvalue() for s in sites) and "0.156" in out.getvalue()


# --- -q and -s -------------------------------------------------------------------------------------------------------

def test_quiet_still_prints_a_failing_gate_and_silent_prints_nothing(tmp_path):
    quiet = invoke(LEGACY, "--data", DATA, *FAST, "--fail-under", "1e3", "-q")
    assert quiet.exit_code == 1
    assert "FAIL:" in quiet.stdout and "gate: FAILED" in quiet.stdout
    assert "Midpoint" not in quiet.stdout and quiet.stderr == ""
    silent = invoke(LEGACY, "--data", DATA, *FAST, "--fail-under", "1e3", "-s")
    assert silent.exit_code == 1 and silent.stdout == "" and silent.stderr == ""
    passing = invoke(LEGACY, "--data", DATA, *FAST, "-q")
    assert passing.exit_code == 0 and passing.stdout == "" and passing.stderr == ""


# --- progress --------------------------------------------------------------------------------------------------------

class _Site:
    def __init__(self, name, sigma50):
        self.name, self.sigma50, self.censored = name, sigma50, None


def test_progress_off_a_terminal_prints_one_line_per_site_and_only_moves_forward():
    out = io.StringIO()
    seen = []
    with RichProgress(stream=out) as p:
        p.describe("clean pass")
        p.grow(100)
        p.advance(100)
        for k, name in enumerate(["a", "b"], 1):
            p.site_started(k, 2, name)
            p.describe(name)
            for _ in range(3):  # the search keeps planning more: the total grows
                p.grow(50)
                p.advance(40)
                seen.append(p.fraction())
            p.site_finished(_Site(name, 0.156))
            seen.append(p.fraction())
    assert seen == sorted(seen) and seen[-1] == 3.0
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("walkaudit: clean pass done")
    assert re.match(r"walkaudit: site 1/2 a: σ50 0\.156 \(\d+\.\d s; [\d.]+[kM]? samples/s, ETA \d+ s\)$",
                    lines[1]), lines
    assert lines[2].startswith("walkaudit: site 2/2 b: σ50 0.156") and len(lines) == 3
    assert "\x1b" not in out.getvalue() and "\r" not in out.getvalue()


def test_progress_on_a_terminal_shows_site_k_of_n():
    out = io.StringIO()
    with RichProgress(stream=out, live=True) as p:
        p.describe("clean pass")
        p.grow(10)
        p.advance(10)
        p.site_started(1, 3, "conv")
        p.describe("conv")  # the core names the site it starts: "site k/N" stays
        assert p._bar.tasks[0].description == "site 1/3 conv"
        p.grow(10)
        p.advance(5)
        task = p._bar.tasks[0]
        assert task.total == 4 and 1.0 <= task.completed < 2.0
        p.site_finished(_Site("conv", 0.1))
    assert "walkaudit: site" not in out.getvalue()  # no plain lines under the live bar


@pytest.mark.parametrize("width", [80, 100, 60])
def test_the_live_line_cuts_a_long_name_at_its_start_never_the_counts(width):
    """`/encoder/layers.0/self_attn/MatMul_1_output_0 ━━ 18% 3.1k samples/s 0… ETA 0:0…` was the line at 80
    columns: now 'site k/N', the name's end and every count fit."""
    from rich.console import Console

    from walkaudit.cli.progress import live_description

    name = "/encoder/layers.0/self_attn/MatMul_1_output_0"
    clock = iter(range(0, 10_000)).__next__
    out = io.StringIO()
    with RichProgress(stream=out, live=True, clock=lambda: float(clock())) as p:
        p._bar.console.width = width
        p.describe("clean pass")
        p.grow(10)
        p.advance(10)
        p.site_started(7, 12, name)
        p.describe(name)
        p.grow(1000)
        p.advance(300_000 // 1000)
        description = p._bar.tasks[0].description
        shown = io.StringIO()
        Console(file=shown, width=width, color_system=None).print(p._bar.make_tasks_table(p._bar.tasks))
    line = shown.getvalue().rstrip("\n")
    kept = description.removeprefix("site 7/12").removeprefix(" …")
    assert description.startswith("site 7/12") and name.endswith(kept), description
    assert len(kept) >= 11 or width < 70, description  # narrower: 'site k/N' and the counts only
    assert description == live_description("site 7/12", name, width)
    assert len(line) <= width and "…" not in line.replace(description, ""), line
    assert "samples/s" in line and "ETA" in line and line.count(":") >= 4, line  # elapsed and remaining whole


def test_quiet_has_no_progress_lines():
    result = invoke(LEGACY, "--data", DATA, *FAST, "-q", "--json", "-")
    assert result.exit_code == 0 and result.stderr == ""


# --- help and errors -------------------------------------------------------------------------------------------------

def test_audit_help_is_grouped_with_defaults_and_examples():
    text = invoke("audit", "--help").stdout
    for section in ("Data:", "Sites:", "Noise & sweep:", "Runtime:", "Gate:", "Output:", "Resume:", "Examples:"):
        assert section in text
    assert "[default: 3; --quick: 1]" in text and "[default: additive]" in text
    assert "--silent" in text and "--html" in text


def test_compare_help_has_no_baseline_and_an_honest_quiet():
    text = invoke("compare", "--help").stdout
    assert "--baseline" not in text and "progress bar" not in text


@pytest.mark.parametrize("argv, suggestion", [(["audti", "m.onnx", "--data", "d.npz"], "audit"),
                                              (["inspct", "m.onnx"], "inspect"), (["compre", "a", "b"], "compare")])
def test_a_mistyped_command_gets_a_suggestion(argv, suggestion, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke(*argv)
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("walkaudit: error: ") and f"did you mean '{suggestion}'" in line


def test_an_existing_file_named_like_a_command_is_audited(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("audti").write_bytes(b"not onnx")
    result = invoke("audti", "--data", "d.npz")
    assert "did you mean" not in result.stderr and result.exit_code == 2


@pytest.mark.parametrize("argv", [["audit", "--frobnicate"], ["audit", "m.onnx", "--data", "d", "--noise", "pink"],
                                  ["plot"], ["compare", "a.json", "b.json", "--baseline", "x.json"]])
def test_click_usage_errors_are_one_line(argv):
    result = invoke(*argv)
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("walkaudit: error: ") and "--help" in line


def test_the_error_line_escapes_control_characters(capsys):
    _err("no site 'a\nb\x1b[2J'")
    err = capsys.readouterr().err
    assert err == "walkaudit: error: no site 'a\\nb\\x1b[2J'\n"


def test_op_types_match_case_insensitively():
    if not LEGACY.exists():
        pytest.skip("samples missing")
    lower = json.loads(invoke("inspect", LEGACY, "--ops", "conv,GEMM", "--json").stdout)
    exact = json.loads(invoke("inspect", LEGACY, "--ops", "Conv,Gemm", "--json").stdout)
    assert lower == exact and lower


# --- warnings --------------------------------------------------------------------------------------------------------

def test_labels_under_an_unknown_key_are_pointed_out(tmp_path):
    with np.load(DATA) as d:
        np.savez(tmp_path / "odd.npz", images_x=d["x"][:50], lbl=d["y"][:50])
    with zipfile.ZipFile(tmp_path / "odd.npz") as z:
        assert sorted(z.namelist()) == ["images_x.npy", "lbl.npy"]
    result = invoke(LEGACY, "--data", tmp_path / "odd.npz", "--x-key", "images_x", "--ops", "Gemm",
                    "--sigmas", "0.1,10", "--repeats", "1", "--provider", "cpu")
    assert result.exit_code == 0, result.stderr
    assert "'lbl' looks like labels: pass --y-key lbl" in result.stderr


def test_a_max_drop_without_unit_that_cannot_fail_is_refused(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps(make_report()))
    result = invoke("compare", tmp_path / "r.json", tmp_path / "r.json", "--max-drop", "20")
    assert result.exit_code == 2 and "'20%'" in result.stderr and len(result.stderr.splitlines()) == 1
    warned = invoke("compare", tmp_path / "r.json", tmp_path / "r.json", "--max-drop", "5dec")
    assert warned.exit_code == 0 and "hardly fail" in warned.stderr


def test_compare_shows_percent_and_warns_without_max_drop(tmp_path):
    base = make_report()
    halved = make_report([make_site("conv1", 0.05, index=0), make_site("conv2", 0.05, index=1),
                          make_site("fc", 1.0, index=2, op_type="Gemm")])
    (tmp_path / "a.json").write_text(json.dumps(base))
    (tmp_path / "b.json").write_text(json.dumps(halved))
    result = invoke("compare", tmp_path / "a.json", tmp_path / "b.json", env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "-50.0%" in result.stdout and "-0.30" in result.stdout
    assert "no --max-drop" in result.stderr and "50% at conv1" in result.stderr
    gated = invoke("compare", tmp_path / "a.json", tmp_path / "b.json", "--max-drop", "20%")
    assert gated.exit_code == 1 and "no --max-drop" not in gated.stderr


def test_every_warning_goes_to_stderr_with_the_one_prefix(tmp_path):
    base = make_report(data_sha256="cd" * 32)  # other data: the gate warns
    (tmp_path / "a.json").write_text(json.dumps(base))
    (tmp_path / "b.json").write_text(json.dumps(make_report()))
    for flags in ([], ["--max-drop", "20%"], ["--fail-under", "0.001"]):
        result = invoke("compare", tmp_path / "a.json", tmp_path / "b.json", *flags, env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.stderr
        assert "warning" not in result.stdout.lower(), result.stdout
        # no rule compares the reports without --max-drop: shown, not gated (it said "passed" with nothing decided)
        assert ("gate: passed" if flags else "gate: no gate") in result.stdout
        warnings = result.stderr.splitlines()
        assert warnings and all(ln.startswith("walkaudit: warning: ") for ln in warnings), result.stderr
        assert any("data" in ln for ln in warnings), result.stderr
        # the table compared OLD with NEW: no line may say the baseline was not compared
        assert "not compared" not in result.stderr
    quiet = invoke("compare", tmp_path / "a.json", tmp_path / "b.json", "-q")
    assert quiet.exit_code == 0 and quiet.stderr == "" and quiet.stdout == ""


# --- GitHub annotations and HTML -------------------------------------------------------------------------------------

HOSTILE = ["conv\n::add-mask::secret", "a%0Ab", "x,y:z", "\x1b[2Jname", "<script>alert(1)</script>"]


def gated_report():
    from walkaudit.report.gate import GateConfig, Threshold, evaluate

    sites = [make_site(name, 0.01 * (i + 1), index=i) for i, name in enumerate(HOSTILE)]
    sites.append(make_site("fine", 1.0, index=len(sites)))
    report = typed(make_report(sites))
    return report.with_gate(evaluate(report, GateConfig(thresholds=(Threshold(None, 0.5),
                                                                    Threshold("^nomatch$", 0.1))),
                                     allow_unmatched=True))


def test_github_annotations_cannot_be_injected():
    text = to_github(gated_report())
    lines = text.splitlines()
    errors = [ln for ln in lines if ln.startswith("::error ")]
    assert len(errors) == len(HOSTILE)
    assert any(ln.startswith("::warning ") for ln in lines)  # the rule that matches no site
    assert all(ln.startswith(("::error title=", "::warning title=")) for ln in lines)
    for line in lines:
        props, _, message = line.partition("::")[2].partition("::")
        assert "::" not in props and "," not in props.partition("title=")[2].replace("%2C", "")
        assert "\n" not in message and "\r" not in message and "\x1b" not in line
    assert "%250Ab" in text  # a literal %0A in a name is not decoded into a newline
    assert to_github(gated_report(), warnings=False).count("::warning") == 0


def test_cli_github_format(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps(make_report()))
    result = invoke("compare", tmp_path / "r.json", tmp_path / "r.json", "--fail-under", "0.5", "--github", "-q")
    assert result.exit_code == 1
    assert result.stdout.count("::error title=walkaudit fail_under%3A site ") == 2


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.text, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)

    def handle_data(self, data):
        self.text.append(data)


def test_html_report_parses_and_names_every_site(tmp_path):
    report = gated_report()
    page = to_html(report)
    parser = _Collect()
    parser.feed(page)
    parser.close()
    text = "".join(parser.text)
    assert "script" not in parser.tags and "svg" in parser.tags and "polyline" in parser.tags
    for site in report.sites:
        from walkaudit.report.text import printable

        assert printable(site.name) in text
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in page


def test_html_shows_unknown_dims_as_question_marks_and_names_break_only_between_parts():
    import re

    long = "/encoder/layers.0/self_attention_block/MatMul_1_output_0"
    site = make_site(long, 0.5, index=0)
    site["shape"] = ["batch", "unk__16", 64]
    page = to_html(typed(make_report([site, make_site("fc", 1.0, index=1)])))
    assert "unk__16" not in page and "batch×?×64" in page
    assert "break-all" not in page  # a narrow window broke names every few characters
    cell = re.search(r'<td class="name">(.*?)</td>', page).group(1)
    assert cell.replace("<wbr>", "") == long
    pieces = cell.split("<wbr>")
    assert all(p[-1] in "/._:-" for p in pieces[:-1]) and max(map(len, pieces)) > 4
    legend = [t for t in re.findall(r"<text [^>]*>([^<]*)</text>", page) if t.startswith("…")]
    assert legend and all(long.endswith(t[1:]) and long[-len(t[1:]) - 1] in "/._:-" for t in legend), legend


def test_cli_writes_the_html_report(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps(make_report()))
    result = invoke("compare", tmp_path / "r.json", tmp_path / "r.json", "--html", tmp_path / "r.html", "-s")
    assert result.exit_code == 0 and result.stdout == "" and result.stderr == ""
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "conv2" in page and "baseline σ50" in page


def test_a_reader_that_closes_stdout_early_gives_exit_141_and_one_line():
    """`walkaudit inspect … | head -1`: not exit 1 (which means "gate failed") but 141, as a shell reports SIGPIPE."""
    import subprocess
    import sys
    from pathlib import Path

    model = Path(__file__).resolve().parent.parent / "samples" / "mnist_lenet5.legacy.onnx"
    proc = subprocess.Popen([sys.executable, "-m", "walkaudit", "inspect", str(model), "--ops", "all"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # closed before the first line: every write fails, whatever the timing
    assert proc.wait(timeout=60) == 141
    assert proc.stderr.read().decode().splitlines() == [
        "walkaudit: error: output cut short: stdout was closed before everything was written (broken pipe)"]


def test_shapes_show_unknown_dimensions_as_a_question_mark():
    from walkaudit.report.text import shape_text

    assert shape_text(("batch", "unk__1", 32)) == "batch×?×32" and shape_text((None, 4)) == "?×4"
    assert shape_text(None) == "?"


def _rendered(report, width: int, bars: bool = True) -> list[str]:
    from rich.console import Console

    out = io.StringIO()
    Console(file=out, width=width, color_system=None).print(render.site_table(report, bars=bars, width=width))
    return [line.rstrip() for line in out.getvalue().splitlines()]


def test_the_legend_explains_only_the_marks_the_table_uses():
    plain = typed(make_report([make_site("a", 0.5), make_site("b", 1.2, index=1)]))
    assert render.legend(plain) is None
    assert not any("censored" in line or "free floor" in line for line in _rendered(plain, 120))
    censored = typed(make_report([make_site("a", 0.5), make_site("b", None, index=1, censored="above")]))
    assert render.legend(censored) == ">/< censored at the grid"
    floor = make_site("c", 0.8, index=2)
    floor["fit"]["method"] = "logistic-free-floor"
    both = typed(make_report([make_site("a", 0.5), make_site("b", None, index=1, censored="above"), floor]))
    assert render.legend(both) == "ᶠ curve levels off above chance (free floor fit)  >/< censored at the grid"


def test_a_legend_wider_than_the_table_goes_one_entry_per_line_unbroken():
    floor = make_site("c", 0.8, index=2)
    floor["fit"]["method"] = "logistic-free-floor"
    report = typed(make_report([make_site("a", 0.5, with_weight=False), make_site("b", None, index=1,
                                                                              censored="above"), floor]))
    lines = _rendered(report, 200, bars=False)
    table_width = max(len(line) for line in lines if line.startswith(("┏", "└")))
    assert table_width < len(render.legend(report))  # the case: the legend does not fit under the table
    assert "ᶠ curve levels off above chance (free floor fit)" in lines
    assert ">/< censored at the grid" in lines
