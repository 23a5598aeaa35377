"""Build samples/mnist_lenet5.qdq.onnx: the LeNet-5 sample quantized to INT8 in QDQ form, for bit flips in integers.

Torch-free and deterministic: onnxruntime.quantization's `quantize_static` on `mnist_lenet5.dynamo.onnx` with QDQ
nodes, per-channel int8 weights, int8 activations, MinMax calibration on the first 200 digits of `mnist_val.npz`
(4 batches of 50, in order), every option that changes the bytes given explicitly. The result is written through
onnx with a fixed graph name and producer, and its manifest entry (ops, sha256, clean accuracy with onnxruntime) is
set in `manifest.json` under "quantized_models".

    python samples/make_quantized.py            # rebuild the file and its manifest entry
    python samples/make_quantized.py --check    # rebuild into a temporary folder; exit 1 unless byte-identical

onnxruntime runs a QDQ model's int8 activations as uint8 (its QDQ transformer moves zero points by 128), so an int8
value i is stored as u = i XOR 0x80 at run time: a flip of bit b of u is the same flip of bit b of i, and
`walkaudit --noise bitflip --bits value` flips any of the 8 bits of these uint8 sites.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime import quantization

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # make.py's helpers, also when imported from a test
SOURCE = "mnist_lenet5.dynamo.onnx"
TARGET = "mnist_lenet5.qdq.onnx"
DATA = "mnist_val.npz"
CALIBRATION = 200  # the first digits of the validation file
BATCH = 50
#: every quantize_static option that affects the bytes, given explicitly (the defaults may change between versions)
OPTIONS = dict(quant_format="QDQ", per_channel=True, activation_type="QInt8", weight_type="QInt8",
               calibrate_method="MinMax", reduce_range=False, op_types_to_quantize=["Conv", "Gemm", "MaxPool", "Relu",
                                                                                     "Reshape"],
               extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})


class _Digits(quantization.CalibrationDataReader):
    def __init__(self, x: np.ndarray):
        self._batches = iter([{"x": x[i:i + BATCH]} for i in range(0, CALIBRATION, BATCH)])

    def get_next(self):
        return next(self._batches, None)


def build(folder: Path, samples: Path = HERE) -> Path:
    """Quantize the float LeNet-5 into `folder`/TARGET and return its path."""
    x = np.load(samples / DATA)["x"]
    logging.getLogger().setLevel(logging.ERROR)  # quantize_static's "consider pre-processing" advice
    options = dict(OPTIONS, quant_format=quantization.QuantFormat.QDQ,
                   activation_type=quantization.QuantType.QInt8, weight_type=quantization.QuantType.QInt8,
                   calibrate_method=quantization.CalibrationMethod.MinMax)
    with tempfile.TemporaryDirectory() as tmp:  # the quantizer writes helper files next to its output
        raw = Path(tmp) / TARGET
        quantization.quantize_static(str(samples / SOURCE), str(raw), _Digits(x), **options)
        model = onnx.load(str(raw))
    model.graph.name = "mnist_lenet5_qdq"
    model.producer_name, model.producer_version = "onnxruntime.quantization", ort.__version__
    onnx.checker.check_model(model, full_check=True)
    out = folder / TARGET
    out.write_bytes(model.SerializeToString(deterministic=True))
    return out


def accuracy(path: Path, samples: Path = HERE) -> float:
    """Clean accuracy on the whole validation file with onnxruntime's CPU provider, to 4 decimals."""
    data = np.load(samples / DATA)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = sess.run(["logits"], {"x": data["x"]})[0]
    return round(float((logits.argmax(1) == data["y"]).mean()), 4)


def entry(path: Path, samples: Path = HERE) -> dict:
    """The manifest entry of the built file."""
    model = onnx.load(str(path))
    return {
        "file": TARGET, "framework": "onnxruntime.quantization", "framework_version": ort.__version__,
        "exporter": "quantize_static (QDQ)", "source": SOURCE, "data": DATA, "input_name": "x",
        "class_output": "logits", "outputs": ["logits"], "num_classes": 10,
        "clean_accuracy": accuracy(path, samples), "ir_version": model.ir_version,
        "opset": {d.domain or "ai.onnx": d.version for d in model.opset_import},
        "ops": sorted({n.op_type for n in model.graph.node}),
        "bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "quantization": {**OPTIONS, "calibration": f"the first {CALIBRATION} digits of {DATA}, batches of {BATCH}",
                         "onnx": onnx.__version__},
        "notes": "int8 weights per output channel and int8 activations (QuantizeLinear/DequantizeLinear pairs); "
                 "onnxruntime runs the int8 activations as uint8 (= int8 XOR 0x80)",
        "rebuild": "python samples/make_quantized.py",
    }


def rebuild(out_dir: Path = HERE) -> dict:
    """Build TARGET in `out_dir` from its float LeNet-5 and data, and set its entry in `out_dir`/manifest.json
    (make.py's full build calls this after writing the manifest)."""
    from make import compact_json  # samples/make.py: the manifest's one JSON layout (imports no torch)

    path = build(out_dir, out_dir)
    manifest_path = out_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["quantized_models"] = [entry(path, out_dir)]
    manifest_path.write_text(compact_json(manifest) + "\n")
    return manifest["quantized_models"][0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="rebuild into a temporary folder and compare bytes")
    args = parser.parse_args(argv)
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            same = build(Path(tmp)).read_bytes() == (HERE / TARGET).read_bytes()
        print(f"{TARGET}: {'byte-identical' if same else 'DIFFERS'}")
        return 0 if same else 1
    made = rebuild()
    print(f"{TARGET}: sha256 {made['sha256']}, clean accuracy {made['clean_accuracy']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
