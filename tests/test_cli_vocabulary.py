"""One vocabulary across commands: -o/--out names the file a command writes, --format how it prints; the old
spellings still work for one release with one `walkaudit: warning: … is deprecated; use …` line; `walkaudit version`,
`walkaudit help` and a report given where a model goes say something useful."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from walkaudit import __version__
from walkaudit.cli import main

from .models import mlp, teacher_labels
from .reports import make_report

FAST = ["--sigmas", "0.1,1", "--repeats", "1", "--provider", "cpu", "-q"]


def invoke(*args, **kwargs):
    return CliRunner().invoke(main, [str(a) for a in args], **kwargs)


@pytest.fixture
def files(tmp_path):
    model = mlp(seed=1)
    onnx.save(model, tmp_path / "m.onnx")
    x = np.random.default_rng(2).normal(size=(24, 16)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=teacher_labels(model, x))
    (tmp_path / "r.json").write_text(json.dumps(make_report()))
    return tmp_path


def test_version_and_help_are_commands(files):
    version = invoke("version")
    assert version.exit_code == 0 and version.stdout.strip() == f"walkaudit, version {__version__}"
    assert invoke("--version").stdout == version.stdout
    top = invoke("help")
    assert top.exit_code == 0 and top.stdout == invoke("--help").stdout
    for command in ("audit", "plot", "merge", "inspect", "compare"):
        one = invoke("help", command)
        assert one.exit_code == 0 and one.stdout == invoke(command, "--help").stdout, command
    unknown = invoke("help", "nope")
    assert unknown.exit_code == 2 and unknown.stderr.startswith("walkaudit: error: no command 'nope'")


def test_a_report_where_a_model_goes_is_a_useful_error(files):
    for extra in ([], ["--data", str(files / "d.npz")]):
        result = invoke(files / "r.json", *extra)
        assert result.exit_code == 2
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and "is a JSON report, not a model to audit" in lines[0], result.stderr
        assert "walkaudit plot" in lines[0] and "Missing option" not in result.stderr


def test_output_given_a_file_name_points_to_out(files):
    """audit's --output names the class output (plot's and merge's old --output was their file): given a file name,
    the one line says which option writes the report."""
    result = invoke(files / "m.onnx", "--data", files / "d.npz", *FAST, "--output", files / "report.json")
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1
    assert "is not an output of the model" in result.stderr and "-o/--out the report's file" in result.stderr
    plain = invoke(files / "m.onnx", "--data", files / "d.npz", *FAST, "--output", "probs")
    assert plain.exit_code == 2 and "-o/--out" not in plain.stderr  # a tensor name: no hint


def test_out_names_the_json_report_in_audit_compare_and_merge(files):
    audit = invoke(files / "m.onnx", "--data", files / "d.npz", *FAST, "-o", files / "a.json")
    assert audit.exit_code == 0, audit.stderr
    assert json.loads((files / "a.json").read_text())["schema"].startswith("walkaudit.report/")
    compared = invoke("compare", files / "a.json", files / "a.json", "--out", files / "c.json", "-q")
    assert compared.exit_code == 0 and json.loads((files / "c.json").read_text())["gate"]["passed"]
    both = invoke(files / "m.onnx", "--data", files / "d.npz", *FAST, "-o", files / "x.json", "--json",
                  files / "y.json")
    assert both.exit_code == 2 and "-o/--out and --json both name the JSON report" in both.stderr


@pytest.mark.parametrize("args, old, new", [
    (["inspect", "{m}", "--json"], "--json", "--format json"),
    (["merge", "{r}", "--output", "{o}"], "--output", "-o/--out"),
    (["plot", "{r}", "--output", "{o}"], "--output", "-o/--out"),
])
def test_old_spellings_still_work_with_a_deprecation_warning(files, args, old, new):
    argv = [a.format(m=files / "m.onnx", r=files / "r.json", o=files / "o.png") for a in args]
    result = invoke(*argv)
    first = result.stderr.splitlines()[0]
    assert first == f"walkaudit: warning: {old} is deprecated; use {new}", result.stderr
    if args[0] == "inspect":
        assert result.exit_code == 0
        assert [s["name"] for s in json.loads(result.stdout)] == \
            [s["name"] for s in json.loads(invoke("inspect", files / "m.onnx", "--format", "json").stdout)]
    if args[0] == "merge":  # the value reached the command: the report is refused as no shard, not for a missing -o
        assert result.exit_code == 2 and "is not a shard report" in result.stderr


def test_plot_needs_its_file(files):
    result = invoke("plot", files / "r.json")
    assert result.exit_code == 2 and "plot needs the image file: -o/--out FILE" in result.stderr


def test_the_new_spellings_print_no_warning(files):
    result = invoke("inspect", files / "m.onnx", "--format", "json")
    assert result.exit_code == 0 and result.stderr == ""
