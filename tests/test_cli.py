"""The CLI end to end on small models built in code: outputs, exit codes, determinism, modes."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from walkaudit.cli import main
from walkaudit.report.schema import validate_report

from .models import mlp, resnet_block, teacher_labels


@pytest.fixture(scope="module")
def mlp_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlp")
    model = mlp(seed=1)
    x = np.random.default_rng(2).normal(size=(300, 16)).astype(np.float32)
    path = folder / "mlp.onnx"
    onnx.save(model, path)
    np.savez(folder / "val.npz", x=x, y=teacher_labels(model, x))
    np.savez(folder / "nolabels.npz", inputs=x)
    return folder


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


def audit_json(folder, *extra):
    result = invoke(folder / "mlp.onnx", "--data", folder / "val.npz", "--json", "-", "--provider", "cpu", *extra)
    assert result.exit_code in (0, 1), result.stderr
    report = json.loads(result.stdout)
    assert validate_report(report) == []
    return report, result


def test_report_has_the_contract_keys_and_a_midpoint_per_site(mlp_files):
    report, result = audit_json(mlp_files, "--quiet")
    assert result.exit_code == 0
    assert report["schema"] == "walkaudit.report/1.1"
    for key in ("tool", "model", "data", "config", "runtime", "clean_accuracy", "chance", "num_classes", "sites",
                "summary", "gate"):
        assert key in report
    assert report["clean_accuracy"] == 1.0  # labels are the model's own predictions
    assert report["num_classes"] == 4 and report["chance"] == pytest.approx(0.25)
    assert report["data"]["labels"] == "given"
    assert report["runtime"]["provider"] == "CPUExecutionProvider"
    names = [s["name"] for s in report["sites"]]
    assert names == ["h", "logits"]  # MatMul+Add folded into one site named after the Add
    assert [s["op_type"] for s in report["sites"]] == ["MatMul+Add", "Gemm"]
    for site in report["sites"]:
        assert site["midpoint"] is not None or site["censored"] is not None
        accs = [p["accuracy"] for p in site["points"]]
        sig = [p["sigma"] for p in site["points"]]
        assert sig == sorted(sig)
        assert accs[0] > 0.95 and accs[-1] < 0.5  # accuracy falls with σ
        assert site["midpoint_relative"] == pytest.approx(site["midpoint"] / site["activation_std"])
        lo, hi = site["ci95"]
        assert lo <= site["midpoint"] <= hi
        assert site["weight"]["mean_abs"] > 0


def test_json_to_stdout_leaves_stdout_pure_json(mlp_files):
    report, result = audit_json(mlp_files)  # not quiet: the table goes to stderr
    assert "Midpoint noise level" in result.stderr
    assert report["summary"]["weakest_site"] in ("h", "logits")


def test_same_seed_same_report_other_seed_other_noise(mlp_files):
    def run(seed):
        report, _ = audit_json(mlp_files, "--quiet", "--seed", seed)
        report["runtime"].pop("elapsed_s")
        return report

    a, b, c = run(5), run(5), run(6)
    assert a == b
    assert a["sites"][0]["points"] != c["sites"][0]["points"]


def test_without_labels_accuracy_is_agreement(mlp_files):
    result = invoke(mlp_files / "mlp.onnx", "--data", mlp_files / "nolabels.npz", "--json", "-", "--quiet",
                    "--provider", "cpu", "--sigmas", "0.01,1,100")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["data"]["labels"] == "clean-predictions"
    assert report["clean_accuracy"] == 1.0
    assert [p["sigma"] for p in report["sites"][0]["points"]] == [0.01, 1, 100]


@pytest.mark.parametrize("noise", ["multiplicative", "combined"])
def test_other_noise_models_run_and_fall(mlp_files, noise):
    report, _ = audit_json(mlp_files, "--quiet", "--noise", noise, "--sigmas", "1e-3:1e2:11")
    assert report["config"]["noise"] == noise
    for site in report["sites"]:
        assert site["points"][0]["accuracy"] > site["points"][-1]["accuracy"]


def test_global_mode_reports_one_curve(mlp_files):
    report, _ = audit_json(mlp_files, "--quiet", "--global")
    assert report["config"]["mode"] == "global"
    assert len(report["sites"]) == 1 and report["sites"][0]["name"] == "global"
    walk, _ = audit_json(mlp_files, "--quiet")
    # noise everywhere at once hurts at least as much as at the weakest single site
    assert report["sites"][0]["midpoint"] <= min(s["midpoint"] for s in walk["sites"]) * 1.1


def test_fail_under_gates_with_exit_code_1(mlp_files):
    report, _ = audit_json(mlp_files, "--quiet")
    lowest = report["summary"]["min_midpoint"]
    passed, result = audit_json(mlp_files, "--quiet", "--fail-under", lowest / 10)
    assert result.exit_code == 0 and passed["gate"]["passed"]
    failed, result = audit_json(mlp_files, "--quiet", "--fail-under", lowest * 10)
    assert result.exit_code == 1 and not failed["gate"]["passed"]
    assert {f["site"] for f in failed["gate"]["failures"]} >= {report["summary"]["weakest_site"]}


def test_residual_model_walks_every_site(tmp_path):
    model = resnet_block(seed=3)
    x = np.random.default_rng(4).normal(size=(200, 1, 6, 6)).astype(np.float32)
    onnx.save(model, tmp_path / "res.onnx")
    np.savez(tmp_path / "val.npz", x=x)
    result = invoke(tmp_path / "res.onnx", "--data", tmp_path / "val.npz", "--json", tmp_path / "r.json",
                    "--quiet", "--provider", "cpu")
    assert result.exit_code == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert [s["name"] for s in report["sites"]] == ["a", "b", "logits"]
    assert all(s["midpoint"] is not None for s in report["sites"])


def test_inspect_lists_sites(mlp_files):
    result = invoke("inspect", mlp_files / "mlp.onnx", "--ops", "all", "--json")
    assert result.exit_code == 0
    sites = json.loads(result.stdout)
    assert [s["name"] for s in sites] == ["h_mm", "h", "h_relu", "logits"]
    assert sites[0]["shape"] == ["N", 32]


def test_inspect_lists_the_sites_a_noise_model_perturbs_and_bits_takes_them():
    """--noise bitflip lists an INT8 model's stored int8 values, --target weights its weight initializers: the
    names `walkaudit bits --site` takes (plain inspect lists the float values, which bits refuses there)."""
    model, data = SAMPLES / "mnist_lenet5.qdq.onnx", SAMPLES / "mnist_val.npz"
    plain = [s["name"] for s in json.loads(invoke("inspect", model, "--format", "json").stdout)]
    stored = [s["name"] for s in json.loads(invoke("inspect", model, "--noise", "bitflip", "--format", "json").stdout)]
    weights = json.loads(invoke("inspect", model, "--noise", "bitflip", "--target", "weights", "--format",
                                "json").stdout)
    assert len(plain) == len(stored) == len(weights) == 5 and not set(plain) & set(stored)
    assert all(n.endswith(".requantized") for n in stored[:4]) and all("weight" in w["name"] for w in weights)
    assert weights[0]["shape"] == [6, 1, 5, 5]
    table = invoke("bits", model, "--data", data, "--limit", "64", "--site", stored[0], "--ber", "0.05",
                   "--repeats", "1", "--provider", "cpu")
    assert table.exit_code == 0, table.stderr
    assert invoke("inspect", model, "--target", "weights").exit_code == 2  # as the audit: weights need a model


def test_inspect_table_says_what_it_lists_on_one_line(mlp_files, monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")  # narrower than the summary line, which must not wrap
    result = invoke("inspect", mlp_files / "mlp.onnx")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0] == "2 sites of mlp.onnx (class output 'logits', scores)"
    assert any("logits" in line and "Gemm" in line for line in lines[1:])


def test_help_names_the_main_flags():
    result = invoke("audit", "--help")
    for flag in ("--data", "--noise", "--sigmas", "--repeats", "--global", "--fail-under", "--json", "--provider"):
        assert flag in result.stdout


def test_ci_outputs_markdown_junit_and_step_summary(mlp_files, tmp_path, monkeypatch):
    import xml.etree.ElementTree as ET

    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    result = invoke(mlp_files / "mlp.onnx", "--data", mlp_files / "val.npz", "--quiet", "--provider", "cpu",
                    "--markdown", "auto", "--junit", tmp_path / "junit.xml", "--fail-under", 1e6)
    assert result.exit_code == 1
    text = summary.read_text()
    assert text.startswith("earlier step\n")  # appended, not overwritten
    assert "| h " in text or "`h`" in text
    suite = ET.parse(tmp_path / "junit.xml").getroot()
    cases = suite.findall(".//testcase")
    assert {c.get("name") for c in cases} >= {"h", "logits"}
    assert len(suite.findall(".//failure")) >= 2


def test_compare_gates_a_regression(mlp_files, tmp_path):
    base, _ = audit_json(mlp_files, "--quiet")
    worse = json.loads(json.dumps(base))
    for site in worse["sites"]:
        site["midpoint"] /= 10
        site["ci95"] = [site["midpoint"] * 0.9, site["midpoint"] * 1.1]
    (tmp_path / "base.json").write_text(json.dumps(base))
    (tmp_path / "worse.json").write_text(json.dumps(worse))
    # 300 samples: the σ50 intervals allow up to ~26% at the end of the fall's interval, so 20% is undecided
    undecided = invoke("compare", tmp_path / "base.json", tmp_path / "base.json", "--max-drop", "20%")
    assert undecided.exit_code == 1 and "gate: UNDECIDED" in undecided.stdout
    same = invoke("compare", tmp_path / "base.json", tmp_path / "base.json", "--max-drop", "50%")
    assert same.exit_code == 0, same.stderr
    result = invoke("compare", tmp_path / "base.json", tmp_path / "worse.json", "--max-drop", "20%")
    assert result.exit_code == 1
    assert "FAIL" in result.stdout and "max_drop" not in result.stderr
    future = dict(base, schema="walkaudit.report/2")
    (tmp_path / "future.json").write_text(json.dumps(future))
    refused = invoke("compare", tmp_path / "base.json", tmp_path / "future.json")
    assert refused.exit_code == 2 and "newer" in refused.stderr and len(refused.stderr.splitlines()) == 1


def test_audit_against_a_baseline(mlp_files, tmp_path):
    base, _ = audit_json(mlp_files, "--quiet")
    (tmp_path / "base.json").write_text(json.dumps(base))
    again, result = audit_json(mlp_files, "--quiet", "--baseline", tmp_path / "base.json", "--max-drop", "50%")
    assert result.exit_code == 0 and again["gate"]["passed"]


def test_plot_writes_png_and_svg(mlp_files, tmp_path):
    pytest.importorskip("matplotlib")
    report, _ = audit_json(mlp_files, "--quiet")
    (tmp_path / "r.json").write_text(json.dumps(report))
    for suffix in ("png", "svg"):
        out = tmp_path / f"curves.{suffix}"
        result = invoke("plot", tmp_path / "r.json", "-o", out)
        assert result.exit_code == 0, result.stderr
        assert out.stat().st_size > 1000
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("flags, phrase", [
    (["--json", "-", "--junit", "-"], "only one of"),
    (["--markdown", "auto"], "GITHUB_STEP_SUMMARY"),
])
def test_conflicting_outputs_are_refused_before_any_work(mlp_files, monkeypatch, flags, phrase):
    import walkaudit.api

    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    monkeypatch.setattr(walkaudit.api, "audit", lambda *a, **k: pytest.fail("audit ran"))
    result = invoke(mlp_files / "mlp.onnx", "--data", mlp_files / "val.npz", *flags)
    assert result.exit_code == 2 and phrase in result.stderr


# --- inputs that look unnormalised ------------------------------------------------------------------------------------

SAMPLES = __import__("pathlib").Path(__file__).resolve().parents[1] / "samples"


def test_range_warning_does_not_fire_on_the_samples():
    from walkaudit._loading.data import Dataset, range_warning

    for path in sorted(SAMPLES.glob("*_val.npz")):
        with np.load(path) as f:
            assert range_warning(Dataset({k: f[k] for k in f.files}, None)) is None, path.name


def test_resized_images_on_a_0_to_255_scale_get_a_warning_and_tabular_data_does_not():
    """Resized images are not whole numbers: an image batch (rank 4) of values 0..255 is warned of all the same; a
    table of large non-negative floats (prices, counts) is not images and is left alone."""
    from walkaudit._loading.data import Dataset, range_warning

    with np.load(SAMPLES / "mnist_val.npz") as f:
        x = f["x"][:64]
    resized = ((x * 0.3081 + 0.1307) * 255 * 0.997 + 0.25).astype(np.float32)  # not whole numbers
    said = range_warning(Dataset({"x": resized}, None))
    assert said is not None and "0..255 scale" in said
    table = np.random.default_rng(0).uniform(0, 200, (64, 12)).astype(np.float32)
    assert range_warning(Dataset({"x": table}, None)) is None
    assert range_warning(Dataset({"x": x}, None)) is None


def test_images_as_0_to_255_floats_get_a_warning(tmp_path):
    with np.load(SAMPLES / "mnist_val.npz") as f:
        x, y = f["x"][:64], f["y"][:64]
    raw = np.round((x * 0.3081 + 0.1307) * 255).astype(np.float32)  # undo the normalisation: pixels 0..255
    np.savez(tmp_path / "raw.npz", x=raw, y=y)
    np.savez(tmp_path / "scaled.npz", x=x, y=y)
    fast = ["--sigmas", "0.1,1", "--repeats", "1", "--provider", "cpu"]
    for data, warned in (("raw.npz", True), ("scaled.npz", False)):
        result = invoke(SAMPLES / "mnist_mlp.dynamo.onnx", "--data", tmp_path / data, *fast)
        assert result.exit_code == 0, result.stderr
        lines = [ln for ln in result.stderr.splitlines() if "raw pixel values?" in ln]
        assert len(lines) == int(warned), result.stderr
        if warned:
            assert lines[0].startswith("walkaudit: warning: input 'x' holds whole numbers 0..255")


def test_a_rule_that_matches_no_site_is_refused_before_the_audit(mlp_files, monkeypatch):
    import walkaudit.api

    def audited(*a, **k):
        run = real(*a, **k)
        run.__class__ = Refused  # the audit must not start
        return run

    class Refused(walkaudit.api.AuditRun):
        def __iter__(self):
            raise AssertionError("the audit ran")

    real = walkaudit.api.iter_audit
    with monkeypatch.context() as m:
        m.setattr(walkaudit.api, "iter_audit", audited)
        result = invoke(mlp_files / "mlp.onnx", "--data", mlp_files / "val.npz", "--provider", "cpu", "-q",
                        "--rule", "conv9:0.1")
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1
    assert "rule conv9:0.1 matches no site" in result.stderr and "--allow-unmatched" in result.stderr
    report, result = audit_json(mlp_files, "--rule", "conv9:0.1", "--allow-unmatched")
    assert result.exit_code == 0 and "matches no site" in result.stderr
    assert report["gate"]["verdict"] == "passed"


def test_without_rules_the_report_says_no_gate(mlp_files):
    report, result = audit_json(mlp_files)
    assert result.exit_code == 0 and report["gate"] == {"passed": True, "verdict": "no gate", "failures": [],
                                                         "warnings": []}


def test_undecided_fails_the_gate_unless_passed_by_choice(mlp_files):
    report, _ = audit_json(mlp_files, "--quiet")
    site = next(s for s in report["sites"] if s["ci95"] and s["ci95"][0] < s["ci95"][1])
    inside = (site["ci95"][0] + site["midpoint"]) / 2  # within the interval, below the estimate
    undecided, result = audit_json(mlp_files, "--rule", f"^{site['name']}$:{inside}")
    assert result.exit_code == 1 and undecided["gate"]["verdict"] == "undecided"
    assert undecided["gate"]["passed"] is False and undecided["gate"]["undecided"][0]["site"] == site["name"]
    assert "UNDECIDED: site" in result.stderr and "gate: UNDECIDED" in result.stderr
    allowed, result = audit_json(mlp_files, "--rule", f"^{site['name']}$:{inside}", "--undecided", "pass")
    assert result.exit_code == 0 and allowed["gate"]["passed"] is True and allowed["gate"]["verdict"] == "undecided"
    shown, result = audit_json(mlp_files, "--rule", f"^{site['name']}$:{site['ci95'][0] * 0.99}")
    assert result.exit_code == 0 and shown["gate"]["verdict"] == "passed"


def test_a_bare_max_drop_still_means_decades_and_says_to_write_the_unit(mlp_files, tmp_path):
    base, _ = audit_json(mlp_files, "--quiet")
    (tmp_path / "base.json").write_text(json.dumps(base))
    bare = invoke("compare", tmp_path / "base.json", tmp_path / "base.json", "--max-drop", "0.5")
    warnings = [ln for ln in bare.stderr.splitlines() if "a bare number means decades" in ln]
    assert len(warnings) == 1 and warnings[0].startswith("walkaudit: warning: ") and "'0.5dec'" in warnings[0]
    written = invoke("compare", tmp_path / "base.json", tmp_path / "base.json", "--max-drop", "0.5dec")
    assert bare.exit_code == written.exit_code and "bare number" not in written.stderr


def test_a_baseline_without_max_drop_is_said_once_before_the_audit(mlp_files, tmp_path):
    base, _ = audit_json(mlp_files, "--quiet")
    (tmp_path / "base.json").write_text(json.dumps(base))
    report, result = audit_json(mlp_files, "--baseline", tmp_path / "base.json")
    lines = [ln for ln in result.stderr.splitlines() if "--baseline without --max-drop" in ln]
    assert len(lines) == 1 and lines[0].startswith("walkaudit: warning: ")
    assert not any("baseline" in w for w in report["gate"]["warnings"])
    compared = invoke("compare", tmp_path / "base.json", tmp_path / "base.json")
    assert "not compared" not in compared.stderr + compared.stdout
