"""samples/mnist_lenet5.qdq.onnx (issue 23.6): the INT8 QDQ LeNet-5 that samples/make_quantized.py builds, torch-free
and byte for byte, and its bit-flip audit of the int8 values (onnxruntime runs them as uint8, int8 XOR 0x80)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

pytest.importorskip("onnxruntime.quantization")

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
QDQ = SAMPLES / "mnist_lenet5.qdq.onnx"
ENTRY = json.loads((SAMPLES / "manifest.json").read_text())["quantized_models"][0]


def _script():
    spec = importlib.util.spec_from_file_location("make_quantized", SAMPLES / "make_quantized.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_sample_rebuilds_byte_identically_and_matches_its_manifest_entry(tmp_path):
    make = _script()
    built = make.build(tmp_path)
    assert built.read_bytes() == QDQ.read_bytes()
    assert hashlib.sha256(QDQ.read_bytes()).hexdigest() == ENTRY["sha256"] and QDQ.stat().st_size == ENTRY["bytes"]
    model = onnx.load(str(QDQ))
    assert ENTRY["ops"] == sorted({n.op_type for n in model.graph.node})
    assert {"QuantizeLinear", "DequantizeLinear"} <= set(ENTRY["ops"])
    # int8 weights, per output channel (a scale per channel: conv1 has 6)
    weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) > 1]
    assert len(weights) == 5 and weights[0].dims[0] in (6, 16, 120, 84, 10)
    quantize_types = {model.graph.initializer[[t.name for t in model.graph.initializer].index(n.input[2])].data_type
                      for n in model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2}
    assert quantize_types == {onnx.TensorProto.INT8}  # int8 activations, as asked
    assert make.accuracy(QDQ) == ENTRY["clean_accuracy"] == pytest.approx(0.981, abs=0.01)


def test_bit_flips_audit_its_int8_sites(tmp_path):
    from walkaudit._graph.sites import Selection, select
    from walkaudit._loading.model import load_model
    from walkaudit.cli import main

    loaded = load_model(onnx.load(str(QDQ)))
    sites = select(loaded.proto, loaded.types, Selection(), loaded.class_output.name, stored=True)
    # every default site (2 Conv, 3 Gemm) runs as an integer kernel whose value is stored in 8 bits
    assert len(sites) == 5
    assert {loaded.types[s.name].elem_type for s in sites} <= {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}
    assert {s.op_type.split("+")[0] for s in sites} == {"QLinearConv", "QGemm"}

    result = CliRunner().invoke(main, [str(QDQ), "--data", str(SAMPLES / "mnist_val.npz"), "--noise", "bitflip",
                                       "--bits", "value", "--limit", "300", "--provider", "cpu",
                                       "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["config"]["bits"] == "value" and report["config"]["level"].startswith("ber")
    assert [s["name"] for s in report["sites"]] == [s.name for s in sites]
    assert report["clean_accuracy"] == pytest.approx(0.98, abs=0.01)
    for site in report["sites"]:
        accuracy = [p["accuracy"] for p in site["points"]]
        assert accuracy[0] > 0.9 and min(accuracy) < accuracy[0] - 0.05  # flips in the int8 value bits cost accuracy
        assert site["midpoint"] is not None and 1e-3 < site["midpoint"] <= 0.1  # the BER grid ends at 0.1
    assert sum(s["censored"] is None for s in report["sites"]) >= 3  # most sites halve their accuracy below 0.1
    assert "Midpoint bit error rate BER50 per site" in result.output and "σ50" not in result.output
    assert np.isclose(min(s["midpoint"] for s in report["sites"]), report["summary"]["min_midpoint"])
