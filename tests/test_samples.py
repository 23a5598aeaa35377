"""The shipped samples: real models from real exporters on real data (samples/make.py rebuilds them)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from walkaudit.cli import main
from walkaudit.report.schema import validate_report

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
MANIFEST = json.loads((SAMPLES / "manifest.json").read_text())
MODELS = {m["file"]: m for m in MANIFEST["models"]}


def audit(model: str, *args) -> dict:
    entry = MODELS[model]
    result = CliRunner().invoke(main, [str(SAMPLES / model), "--data", str(SAMPLES / entry["data"]), "--json", "-",
                                       "--quiet", "--provider", "cpu", *args])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def reports():
    cache: dict = {}

    def get(model: str, noise: str = "additive") -> dict:
        if (model, noise) not in cache:
            cache[model, noise] = audit(model, "--noise", noise)
        return cache[model, noise]

    return get


@pytest.mark.parametrize("model", sorted(MODELS))
def test_every_sample_audits_with_a_complete_report(model, reports):
    report = reports(model)
    entry = MODELS[model]
    assert validate_report(report) == []
    assert report["clean_accuracy"] == pytest.approx(entry["clean_accuracy"], abs=5e-4)
    assert report["num_classes"] == entry["num_classes"] == 10
    assert report["model"]["class_output"] in entry["outputs"]
    assert len(report["sites"]) >= 3  # every sample has at least three linear layers
    for site in report["sites"]:
        assert site["midpoint"] is not None
        assert site["censored"] in (None, "above", "below")
        if site["censored"] is None:
            assert site["ci95"] is not None or site["fit"]["method"] == "interpolation"
        first, last = site["points"][0]["accuracy"], site["points"][-1]["accuracy"]
        assert first > last  # accuracy falls with σ
    assert report["summary"]["weakest_site"] in {s["name"] for s in report["sites"]}


def test_zipmap_model_is_read_through_its_label_output(reports):
    report = reports("digits_sklearn_mlp_zipmap.onnx")
    assert report["model"]["class_output"] == "output_label" and report["model"]["output_kind"] == "label"
    plain = reports("digits_sklearn_mlp.onnx")
    assert plain["model"]["output_kind"] == "scores"
    assert report["clean_accuracy"] == plain["clean_accuracy"]


def test_both_torch_exporters_agree_on_the_same_network(reports):
    """Same weights, two exporters: same sites in the same order and midpoints within 0.05 decades."""
    dynamo, legacy = reports("mnist_lenet5.dynamo.onnx"), reports("mnist_lenet5.legacy.onnx")
    assert [s["op_type"] for s in dynamo["sites"]] == [s["op_type"] for s in legacy["sites"]]
    for d, lg in zip(dynamo["sites"], legacy["sites"]):
        assert abs(np.log10(d["midpoint"] / lg["midpoint"])) < 0.05, (d["name"], lg["name"])


def test_additive_twin_is_more_robust_at_every_site_and_has_larger_weights(reports):
    clean, twin = reports("mnist_mlp.dynamo.onnx"), reports("mnist_mlp_additive.dynamo.onnx")
    assert len(clean["sites"]) == len(twin["sites"]) == 3
    for c, t in zip(clean["sites"], twin["sites"]):
        assert c["censored"] is None and t["censored"] is None
        assert t["midpoint"] > c["midpoint"] * 1.5, c["name"]
        assert t["weight"]["mean_abs"] > c["weight"]["mean_abs"], c["name"]


def test_multiplicative_twin_is_more_robust_at_every_site(reports):
    """Under multiplicative noise a ReLU network keeps the sign pattern, so accuracy levels off above chance.

    Where the clean model crosses the halfway line, the twin must cross later or never (censored above). Where
    neither crosses inside the grid (both censored above at the same bound), σ50 cannot rank them; the twin must then
    hold a higher plateau: its accuracy at the largest σ is higher.
    """
    clean = reports("mnist_mlp.dynamo.onnx", "multiplicative")
    twin = reports("mnist_mlp_multiplicative.dynamo.onnx", "multiplicative")
    for c, t in zip(clean["sites"], twin["sites"]):
        if c["censored"] == "above" and t["censored"] == "above":
            assert t["points"][-1]["accuracy"] > c["points"][-1]["accuracy"], c["name"]
        else:
            assert c["censored"] is None, c["name"]
            assert t["censored"] == "above" or t["midpoint"] > c["midpoint"], c["name"]


def test_the_manifest_matches_the_files():
    for name, entry in MODELS.items():
        path = SAMPLES / name
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"], name
        with np.load(SAMPLES / entry["data"], allow_pickle=False) as data:
            x, y = data["x"], data["y"]
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        out = session.run([entry["class_output"]], {entry["input_name"]: x})[0]
        if isinstance(out, list):  # ZipMap: one {class: probability} map per sample
            pred = np.array([max(row, key=row.get) for row in out])
        else:
            pred = out.argmax(axis=1) if out.ndim == 2 else out
        assert float((pred == y).mean()) == pytest.approx(entry["clean_accuracy"], abs=5e-5), name
