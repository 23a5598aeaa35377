"""Hostile and broken inputs: every one ends in one clear line on stderr and the right exit code, never a traceback,
and the user's files are never changed.

The corpus is built in tmp_path by the test itself: broken model files, unsafe external data, broken data files,
bad flags. Runtime trouble (NaN outputs, out of memory, Ctrl-C) is provoked with small models and monkeypatching.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from walkaudit._execution import strategies
from walkaudit._execution.runtime import OutOfMemory
from walkaudit._execution.worker import Worker
from walkaudit.cli import main

try:
    from tests.models import IR, mlp, teacher_labels
except ImportError:  # tests/ on sys.path instead of the repository root
    from models import IR, mlp, teacher_labels

FAST = ["--sigmas", "0.1,1", "--repeats", "1", "--provider", "cpu", "-q"]
N, FEATURES, CLASSES = 32, 16, 4


# --- the corpus -----------------------------------------------------------------------------------------------------

class Corpus:
    """A valid model and data set in tmp_path plus builders for broken variants of both."""

    def __init__(self, root: Path):
        self.root = root
        self.model = mlp()
        self.good = root / "good.onnx"
        onnx.save(self.model, self.good)
        rng = np.random.default_rng(1)
        self.x = rng.normal(size=(N, FEATURES)).astype(np.float32)
        self.y = teacher_labels(self.model, self.x)
        self.data = root / "good.npz"
        np.savez(self.data, x=self.x, y=self.y)

    def path(self, name: str) -> Path:
        p = self.root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def write(self, name: str, content: bytes | str) -> str:
        p = self.path(name)
        p.write_bytes(content.encode() if isinstance(content, str) else content)
        return str(p)

    def save_model(self, name: str, model: onnx.ModelProto) -> str:
        return self.write(name, model.SerializeToString())

    def npz(self, name: str, **arrays) -> str:
        p = self.path(name)
        np.savez(p, **arrays)
        return str(p)

    def external(self, name: str, location: str | None = None) -> str:
        """The good model with its weights in an external file; optionally every location rewritten."""
        target = self.path(name)
        onnx.save_model(self.model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{target.stem}.bin", size_threshold=0)
        if location is not None:
            proto = onnx.load(str(target), load_external_data=False)
            for t in proto.graph.initializer:
                for entry in t.external_data:
                    if entry.key == "location":
                        entry.value = location
            # written as bytes: onnx.save would try to write the external data itself
            target.write_bytes(proto.SerializeToString())
        return str(target)


def _model(nodes, inputs, outputs, inits=(), opset=17, extra_opsets=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, ir_version=IR,
                             opset_imports=[helper.make_opsetid("", opset), *extra_opsets])


def _vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def regressor() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.ones((FEATURES, 1), np.float32), "w")
    return _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [_vi("x", TensorProto.FLOAT, ["N", FEATURES])],
                  [_vi("y", TensorProto.FLOAT, ["N", 1])], [w])


def flat_regressor() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.ones((FEATURES,), np.float32), "w")
    return _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [_vi("x", TensorProto.FLOAT, ["N", FEATURES])],
                  [_vi("y", TensorProto.FLOAT, ["N"])], [w])


def int_matrix_output() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.ones((FEATURES, 3), np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Cast", ["h"], ["codes"], to=TensorProto.INT64)]
    return _model(nodes, [_vi("x", TensorProto.FLOAT, ["N", FEATURES])], [_vi("codes", TensorProto.INT64, ["N", 3])],
                  [w])


def string_output() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.ones((FEATURES, 3), np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("ArgMax", ["h"], ["idx"], axis=1, keepdims=0),
             helper.make_node("Cast", ["idx"], ["name"], to=TensorProto.STRING)]
    return _model(nodes, [_vi("x", TensorProto.FLOAT, ["N", FEATURES])], [_vi("name", TensorProto.STRING, ["N"])],
                  [w])


def custom_op() -> onnx.ModelProto:
    m = mlp()
    relu = next(n for n in m.graph.node if n.op_type == "Relu")
    relu.op_type, relu.domain = "Frobnicate", "com.example"
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    return m


def unknown_standard_op() -> onnx.ModelProto:
    m = mlp()
    next(n for n in m.graph.node if n.op_type == "Relu").op_type = "Frobnicate"
    return m


def no_nodes() -> onnx.ModelProto:
    return _model([], [_vi("x", TensorProto.FLOAT, ["N", FEATURES])], [_vi("x", TensorProto.FLOAT, ["N", FEATURES])])


class Evil:
    """Unpickling this creates a marker file: proof that a loader ran pickle."""

    marker: Path

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def pickled_npz(c: Corpus, name: str) -> str:
    Evil.marker = c.root / "PWNED"
    obj = np.empty(N, dtype=object)
    obj[:] = [Evil() for _ in range(N)]
    p = c.path(name)
    np.savez(p, x=obj, y=c.y)
    return str(p)


def pickled_npy(c: Corpus, name: str) -> str:
    Evil.marker = c.root / "PWNED"
    obj = np.empty(N, dtype=object)
    obj[:] = [Evil() for _ in range(N)]
    p = c.path(name)
    np.save(p, obj, allow_pickle=True)
    return str(p)


def one_hot(y, classes=CLASSES):
    return np.eye(classes, dtype=np.float32)[y]


# Each case: (id, builder(corpus) -> argv, exit code, key phrase of the one stderr line).
M = "model"
def _torch_zip(c: Corpus) -> str:
    """What torch.save writes since PyTorch 1.6: a zip holding NAME/data.pkl (built without torch)."""
    import zipfile

    p = c.path("net.pt")
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("net/data.pkl", b"\x80\x02}q\x00.")
        z.writestr("net/version", "3\n")
    return str(p)


def _nhwc(c: Corpus) -> list[str]:
    """The LeNet sample (input [N, 1, 28, 28]) fed its images channels last: [N, 28, 28, 1]."""
    samples = Path(__file__).resolve().parents[1] / "samples"
    with np.load(samples / "mnist_val.npz") as f:
        x, y = f["x"][:8], f["y"][:8]
    return [str(samples / "mnist_lenet5.dynamo.onnx"), "--data", c.npz("nhwc.npz", x=x.transpose(0, 2, 3, 1), y=y)]


CASES = [
    # a file that is not ONNX: say what it is and what to do
    ("model-pytorch-zip", lambda c: [_torch_zip(c), "--data", str(c.data)], 2,
     "looks like a PyTorch file (torch.save): export it with torch.onnx.export"),
    ("model-pytorch-pickle", lambda c: [c.write("net.pth",
                                                b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19.\x80\x02M\xe9\x03"),
                                        "--data", str(c.data)], 2, "export it with torch.onnx.export"),
    ("model-is-a-report", lambda c: [c.write("report.json", '{"schema": "walkaudit.report/1.1"}'), "--data",
                                     str(c.data)], 2, "looks like a JSON document"),
    ("data-nhwc", _nhwc, 2, "looks channels-last (NHWC): transpose it to NCHW"),
    # model files
    ("model-missing", lambda c: [str(c.root / "nope.onnx"), "--data", str(c.data)], 2, "model file not found"),
    ("model-directory", lambda c: [str(c.path("adir/x").parent), "--data", str(c.data)], 2, "is a directory"),
    ("model-empty", lambda c: [c.write("empty.onnx", b""), "--data", str(c.data)], 2, "model file is empty"),
    ("model-truncated", lambda c: [c.write("trunc.onnx", c.good.read_bytes()[: c.good.stat().st_size // 2]),
                                   "--data", str(c.data)], 2, "not a valid ONNX model"),
    ("model-truncated-tiny", lambda c: [c.write("trunc3.onnx", c.good.read_bytes()[:3]), "--data", str(c.data)],
     2, "not"),
    ("model-corrupt-header", lambda c: [c.write("corrupt.onnx", b"\xff" * 16 + c.good.read_bytes()[16:]),
                                        "--data", str(c.data)], 2, "not a valid ONNX model"),
    ("model-random-bytes", lambda c: [c.write("random.onnx", np.random.default_rng(0).bytes(4096)),
                                      "--data", str(c.data)], 2, "not"),
    ("model-text-file", lambda c: [c.write("readme.onnx", "This is not a model.\nJust text.\n"),
                                   "--data", str(c.data)], 2, "not"),
    ("model-json", lambda c: [c.write("model.onnx.json", '{"graph": {"node": []}}'), "--data", str(c.data)],
     2, "not"),
    ("model-weights-damaged-small", lambda c: [c.save_model("dmg.onnx", _damaged(mlp())), "--data", str(c.data)],
     2, "raw_data size"),
    ("model-weights-damaged-large", lambda c: [c.save_model("dmg2.onnx", _damaged(_wide())), "--data",
                                               c.npz("wide.npz", x=np.ones((4, 512), np.float32))],
     2, "raw_data size"),
    ("model-dangling-input", lambda c: [c.save_model("dangle.onnx", _dangling()), "--data", str(c.data)],
     2, "fails the ONNX checker"),
    ("model-no-nodes", lambda c: [c.save_model("nonodes.onnx", no_nodes()), "--data", str(c.data)], 2, "no nodes"),
    ("model-custom-op", lambda c: [c.save_model("custom.onnx", custom_op()), "--data", str(c.data)],
     2, "Frobnicate"),
    ("model-unknown-op", lambda c: [c.save_model("unknown.onnx", unknown_standard_op()), "--data", str(c.data)],
     2, "Frobnicate"),
    ("model-opset-too-new", lambda c: [c.save_model("new.onnx", mlp(opset=30)), "--data", str(c.data)],
     2, "opset 30"),
    ("model-regressor", lambda c: [c.save_model("reg.onnx", regressor()), "--data", str(c.data)], 2, "regressor"),
    ("model-regressor-flat", lambda c: [c.save_model("reg1.onnx", flat_regressor()), "--data", str(c.data)],
     2, "regressor"),
    ("model-int-matrix-output", lambda c: [c.save_model("codes.onnx", int_matrix_output()), "--data", str(c.data)],
     2, "codes: int64 [N, 3]"),
    ("model-string-output", lambda c: [c.save_model("str.onnx", string_output()), "--data", str(c.data)],
     2, "name: string [N]"),
    ("model-output-override-missing", lambda c: [str(c.good), "--data", str(c.data), "--output", "probs"],
     2, "outputs: logits"),
    # external data
    ("external-parent", lambda c: [c.external("models/up.onnx", "../secret"), "--data", str(c.data)],
     2, "outside the model's folder"),
    ("external-nested-parent", lambda c: [c.external("models/up2.onnx", "sub/../../secret"), "--data", str(c.data)],
     2, "outside the model's folder"),
    ("external-absolute", lambda c: [c.external("models/abs.onnx", "/etc/passwd"), "--data", str(c.data)],
     2, "outside the model's folder"),
    ("external-symlink-out", lambda c: [_symlinked(c), "--data", str(c.data)], 2, "outside the model's folder"),
    ("external-missing", lambda c: [c.external("models/gone.onnx", "nothere.bin"), "--data", str(c.data)],
     2, "missing"),
    ("external-too-short", lambda c: [_short_external(c), "--data", str(c.data)], 2, "external data"),
    # data files
    ("data-missing", lambda c: [str(c.good), "--data", str(c.root / "nope.npz")], 2, "data file not found"),
    ("data-directory", lambda c: [str(c.good), "--data", str(c.path("dd/x").parent)], 2,
     "is a directory without .npz or .npy files"),
    ("data-csv", lambda c: [str(c.good), "--data", c.write("data.csv", "1,2,3\n")], 2, "must be .npz or .npy"),
    ("data-text-npz", lambda c: [str(c.good), "--data", c.write("text.npz", "hello\n")], 2, "not a .npz file"),
    ("data-text-npy", lambda c: [str(c.good), "--data", c.write("text.npy", "hello\n")], 2, "not a .npy file"),
    ("data-pickle-file", lambda c: [str(c.good), "--data", _pickle_file(c)], 2, "pickled"),
    ("data-npy-named-npz", lambda c: [str(c.good), "--data", _npy_as(c, "x_only.npz")], 2, "expected float [N, 16]"),
    ("data-zip-not-numpy", lambda c: [str(c.good), "--data", _zip_of_text(c)], 2, "not a numpy array"),
    ("data-truncated-npz", lambda c: [str(c.good), "--data",
                                      c.write("trunc.npz", c.data.read_bytes()[: c.data.stat().st_size // 2])],
     2, "not a readable"),
    ("data-truncated-npy", lambda c: [str(c.good), "--data", _truncated_npy(c)], 2, "not a readable"),
    ("data-pickled-npz", lambda c: [str(c.good), "--data", pickled_npz(c, "evil.npz")], 2, "pickled"),
    ("data-pickled-npy", lambda c: [str(c.good), "--data", pickled_npy(c, "evil.npy")], 2, "pickled"),
    ("data-wrong-keys", lambda c: [str(c.good), "--data", c.npz("keys.npz", a=c.x, b=c.x, c=c.y)],
     2, "keys: a, b, c"),
    ("data-x-key-missing", lambda c: [str(c.good), "--data", str(c.data), "--x-key", "images"], 2, "keys: x, y"),
    ("data-y-key-missing", lambda c: [str(c.good), "--data", str(c.data), "--y-key", "target"], 2, "keys: x, y"),
    ("data-wrong-width", lambda c: [str(c.good), "--data", c.npz("w.npz", x=c.x[:, :15], y=c.y)],
     2, "expected float [N, 16], found float32 [32, 15]"),
    ("data-wrong-rank", lambda c: [str(c.good), "--data", c.npz("r.npz", x=c.x[:, :, None], y=c.y)],
     2, "expected float [N, 16], found float32 [32, 16, 1]"),
    ("data-scalar", lambda c: [str(c.good), "--data", c.npz("s.npz", x=np.float32(1.0))], 2, "expected float"),
    ("data-strings", lambda c: [str(c.good), "--data", c.npz("str.npz", x=c.x.astype(str), y=c.y)],
     2, "expected float [N, 16], found <U"),
    ("data-complex", lambda c: [str(c.good), "--data", c.npz("cx.npz", x=c.x.astype(np.complex64), y=c.y)],
     2, "found complex64"),
    ("data-nan", lambda c: [str(c.good), "--data", c.npz("nan.npz", x=_with(c.x, np.nan), y=c.y)],
     2, "NaN/Inf"),
    ("data-inf", lambda c: [str(c.good), "--data", c.npz("inf.npz", x=_with(c.x, np.inf), y=c.y)],
     2, "--allow-nonfinite"),
    ("data-empty", lambda c: [str(c.good), "--data", c.npz("e.npz", x=c.x[:0], y=c.y[:0])], 2, "empty"),
    ("data-labels-out-of-range", lambda c: [str(c.good), "--data", c.npz("oor.npz", x=c.x, y=c.y + CLASSES)],
     2, "out of range"),
    ("data-labels-negative", lambda c: [str(c.good), "--data", c.npz("neg.npz", x=c.x, y=c.y - CLASSES)],
     2, "out of range"),
    ("data-labels-short", lambda c: [str(c.good), "--data", c.npz("short.npz", x=c.x, y=c.y[:-1])],
     2, "labels have 31 entries but the inputs have 32"),
    ("data-labels-empty", lambda c: [str(c.good), "--data", c.npz("ly.npz", x=c.x, y=c.y[:0])], 2, "labels"),
    ("data-labels-fractional", lambda c: [str(c.good), "--data", c.npz("frac.npz", x=c.x, y=c.y + 0.5)],
     2, "whole class ids"),
    ("data-labels-strings", lambda c: [str(c.good), "--data", c.npz("ls.npz", x=c.x, y=c.y.astype(str))],
     2, "integer class ids"),
    ("data-labels-3d", lambda c: [str(c.good), "--data", c.npz("l3.npz", x=c.x, y=c.y[:, None, None] + 0 * c.x[:, :2,
                                                                                                              None])],
     2, "one-hot [N, C]"),
    ("data-one-hot-two-ones", lambda c: [str(c.good), "--data",
                                         c.npz("oh2.npz", x=c.x, y=_two_ones(one_hot(c.y)))], 2, "one-hot"),
    ("data-one-hot-not-binary", lambda c: [str(c.good), "--data",
                                           c.npz("ohf.npz", x=c.x, y=one_hot(c.y) * 0.9)], 2, "one-hot"),
    ("data-one-hot-wrong-width", lambda c: [str(c.good), "--data",
                                            c.npz("oh5.npz", x=c.x, y=one_hot(c.y, CLASSES + 1))], 2, "5 columns"),
    ("data-npy-for-two-inputs", lambda c: [c.save_model("two.onnx", _two_inputs()), "--data",
                                           _npy(c, "x.npy", c.x)], 2, "use an .npz"),
    ("data-two-inputs-missing-key", lambda c: [c.save_model("two2.onnx", _two_inputs()), "--data",
                                               c.npz("ab.npz", a=c.x, y=c.y)], 2, "'b'"),
    ("data-two-inputs-different-n", lambda c: [c.save_model("two3.onnx", _two_inputs()), "--data",
                                               c.npz("abn.npz", a=c.x[:, :8], b=c.x[:-2, 8:], y=c.y)],
     2, "numbers of samples"),
    # flags
    ("flag-sigmas-empty-string", lambda c: [str(c.good), "--data", str(c.data), "--sigmas", ""], 2, "empty"),
    ("flag-sigmas-comma", lambda c: [str(c.good), "--data", str(c.data), "--sigmas", ","], 2, "empty"),
    ("flag-sigmas-negative", lambda c: [str(c.good), "--data", str(c.data), "--sigmas=-1,0.1"], 2,
     "--sigmas must be 0 or"),
    ("flag-sigmas-zero", lambda c: [str(c.good), "--data", str(c.data), "--sigmas", "0"], 2, "above 0"),
    ("flag-sigmas-nan", lambda c: [str(c.good), "--data", str(c.data), "--sigmas", "nan,1"], 2,
     "--sigmas must be 0 or"),
    ("flag-sigmas-overflow", lambda c: [str(c.good), "--data", str(c.data), "--sigmas", "1e300"], 2, "1e+30"),
    ("flag-sigmas-underflow", lambda c: [str(c.good), "--data", str(c.data), "--sigmas", "1e-300,1"], 2, "1e-30"),
    ("flag-sigmas-huge-range", lambda c: [str(c.good), "--data", str(c.data), "--sigmas", "1e-3:1e2:100000000"], 2,
     "at most 10000"),
    ("flag-seed-negative", lambda c: [str(c.good), "--data", str(c.data), "--seed", "-1"], 2, "--seed must be"),
    ("flag-seed-negative-graph", lambda c: [str(c.good), "--data", str(c.data), "--seed", "-1", "--noise-source",
                                            "graph"], 2, "--seed must be"),
    ("flag-repeats-huge", lambda c: [str(c.good), "--data", str(c.data), "--repeats", "1000000000"], 2,
     "--repeats must be between 1 and 1000"),
    ("flag-threads-huge", lambda c: [str(c.good), "--data", str(c.data), "--threads", "5000"], 2,
     "--threads must be between 1 and 1024"),
    ("flag-sigmas-text", lambda c: [str(c.good), "--data", str(c.data), "--sigmas", "small"], 2, "expected a list"),
    ("flag-sigmas-bad-range", lambda c: [str(c.good), "--data", str(c.data), "--sigmas", "1:0.1:5"], 2, "range"),
    ("flag-repeats-zero", lambda c: [str(c.good), "--data", str(c.data), "--repeats", "0"], 2, "--repeats"),
    ("flag-repeats-negative", lambda c: [str(c.good), "--data", str(c.data), "--repeats", "-3"], 2, "--repeats"),
    ("flag-batch-size-zero", lambda c: [str(c.good), "--data", str(c.data), "--batch-size", "0"], 2, "--batch-size"),
    ("flag-limit-zero", lambda c: [str(c.good), "--data", str(c.data), "--limit", "0"], 2, "--limit"),
    ("flag-threads-negative", lambda c: [str(c.good), "--data", str(c.data), "--threads", "-2"], 2, "--threads"),
    ("flag-chance", lambda c: [str(c.good), "--data", str(c.data), "--chance", "1.5"], 2, "--chance"),
    ("flag-ratio", lambda c: [str(c.good), "--data", str(c.data), "--noise", "combined", "--ratio", "2"],
     2, "--ratio"),
    ("flag-include-nothing", lambda c: [str(c.good), "--data", str(c.data), "--include", "zzz"],
     2, "no site matches the selection (sites include: h, logits)"),
    ("flag-exclude-everything", lambda c: [str(c.good), "--data", str(c.data), "--exclude", "."],
     2, "sites include: h, logits"),
    ("flag-include-bad-regex", lambda c: [str(c.good), "--data", str(c.data), "--include", "("],
     2, "not a valid regular expression"),
    ("flag-site-unknown", lambda c: [str(c.good), "--data", str(c.data), "--site", "nothere"], 2, "'nothere'"),
    ("flag-ops-none", lambda c: [str(c.good), "--data", str(c.data), "--ops", "LSTM"], 2, "--ops all"),
    ("flag-unknown-noise", lambda c: [str(c.good), "--data", str(c.data), "--noise", "pink"], 2, "pink"),
    ("flag-unknown-option", lambda c: [str(c.good), "--data", str(c.data), "--frobnicate"], 2, "--frobnicate"),
]


def _with(x: np.ndarray, value: float) -> np.ndarray:
    x = x.copy()
    x[3, 5] = value
    return x


def _damaged(model: onnx.ModelProto) -> onnx.ModelProto:
    """The first initializer loses its last 8 bytes (an edited or damaged file that still parses)."""
    t = model.graph.initializer[0]
    t.raw_data = t.raw_data[:-8]
    return model


def _wide() -> onnx.ModelProto:
    return mlp(features=512, hidden=1024)  # w1: 2 MiB, shared with onnxruntime rather than serialized


def _dangling() -> onnx.ModelProto:
    model = mlp()
    model.graph.node[1].input[1] = "nowhere"
    return model


def _two_ones(y: np.ndarray) -> np.ndarray:
    y = y.copy()
    y[0] = 1
    return y


def _npy(c: Corpus, name: str, a: np.ndarray) -> str:
    p = c.path(name)
    np.save(p, a)
    return str(p)


def _pickle_file(c: Corpus) -> str:
    import pickle

    Evil.marker = c.root / "PWNED"
    return c.write("evil_pickle.npz", pickle.dumps({"x": Evil()}))


def _npy_as(c: Corpus, name: str) -> str:
    """An .npy file under an .npz name, with the wrong width, so the loader must read it as what it is."""
    import io

    buf = io.BytesIO()
    np.save(buf, c.x[:, :3])
    return c.write(name, buf.getvalue())


def _zip_of_text(c: Corpus) -> str:
    import zipfile

    p = c.path("zipped.npz")
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("x.npy", "not an array")
        z.writestr("y.txt", "nor this")
    return str(p)


def _truncated_npy(c: Corpus) -> str:
    full = c.path("full.npy")
    np.save(full, c.x)
    return c.write("trunc.npy", full.read_bytes()[:200])


def _symlinked(c: Corpus) -> str:
    outside = c.root / "outside"
    outside.mkdir(exist_ok=True)
    path = c.external("models/link.onnx")
    weights = Path(path).with_suffix(".bin")
    target = outside / "weights.bin"
    target.write_bytes(weights.read_bytes())
    weights.unlink()
    weights.symlink_to(target)
    return path


def _short_external(c: Corpus) -> str:
    path = c.external("models/short.onnx")
    weights = Path(path).with_suffix(".bin")
    weights.write_bytes(weights.read_bytes()[:100])
    return path


def _two_inputs() -> onnx.ModelProto:
    half = FEATURES // 2
    base = mlp(features=FEATURES)
    nodes = [helper.make_node("Concat", ["a", "b"], ["x"], axis=1), *base.graph.node]
    graph = helper.make_graph(nodes, "two", [_vi("a", TensorProto.FLOAT, ["N", half]),
                                             _vi("b", TensorProto.FLOAT, ["N", half])],
                              list(base.graph.output), list(base.graph.initializer))
    return helper.make_model(graph, ir_version=IR, opset_imports=list(base.opset_import))


# --- helpers --------------------------------------------------------------------------------------------------------

def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink()}


def one_error_line(result, code: int, phrase: str) -> str:
    """The run ended with `code` and exactly one stderr line 'walkaudit: error: ...' containing `phrase`."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    err = result.stderr
    assert "Traceback" not in err and "Traceback" not in result.stdout
    lines = err.splitlines()
    assert result.exit_code == code, (result.exit_code, err)
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("walkaudit: error: "), line
    assert phrase.lower() in line.lower(), line
    assert len(line) < 400, line
    return line


@pytest.fixture
def corpus(tmp_path) -> Corpus:
    return Corpus(tmp_path)


CLICK_USAGE = ("--frobnicate", "pink", "is a directory")


def _click_usage(result, phrase: str) -> None:
    """click's own usage errors, as every error: one line `walkaudit: error: …`, exit 2, no traceback."""
    assert result.exit_code == 2
    assert "Traceback" not in result.stderr
    assert phrase in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("walkaudit: error: ")


@pytest.mark.parametrize("build, code, phrase", [pytest.param(b, c, p, id=i) for i, b, c, p in CASES])
def test_error_corpus(corpus, build, code, phrase):
    argv = [*FAST, *build(corpus)]  # the case's own flags come last and win
    before = snapshot(corpus.root)
    result = CliRunner().invoke(main, argv)
    if phrase in CLICK_USAGE:
        _click_usage(result, phrase)
    else:
        one_error_line(result, code, phrase)
    assert snapshot(corpus.root) == before, "a user's file was changed or a file was written"
    assert not (corpus.root / "PWNED").exists(), "a pickle payload ran"


def test_pickle_marker_works(tmp_path):
    """The Evil payload really runs when unpickled, so the corpus test above would notice a pickle load."""
    c = Corpus(tmp_path)
    p = pickled_npz(c, "evil.npz")
    with np.load(p, allow_pickle=True) as f:
        f["x"]
    assert (tmp_path / "PWNED").exists()


def test_secret_outside_is_never_read(corpus):
    """A model whose external data points at ../secret: refused before anything is read from there."""
    secret = corpus.root / "secret"
    secret.write_bytes(b"\x00" * 10_000)
    os.chmod(secret, 0)  # any attempt to open it would fail differently
    try:
        path = corpus.external("models/up.onnx", "../secret")
        result = CliRunner().invoke(main, [path, "--data", str(corpus.data), *FAST])
        one_error_line(result, 2, "outside the model's folder")
    finally:
        os.chmod(secret, 0o600)


def test_api_refuses_a_proto_with_unloaded_external_data(corpus):
    """A ModelProto loaded without its external data: onnxruntime would look for the files relative to the working
    directory, wherever the locations point. Refused; the same model loaded with its data works."""
    import walkaudit
    from walkaudit.errors import ModelError

    path = corpus.external("models/ext.onnx")
    bare = onnx.load(path, load_external_data=False)
    with pytest.raises(ModelError, match="refers to external data"):
        walkaudit.audit(bare, corpus.x, provider="cpu", sigmas=(0.1,), repeats=1)
    report = walkaudit.audit(onnx.load(path), corpus.x, provider="cpu", sigmas=(0.1,), repeats=1)
    assert report.clean_accuracy == 1.0


def test_allow_nonfinite_accepts_nan_inputs(corpus):
    data = corpus.npz("nan.npz", x=_with(corpus.x, np.nan), y=corpus.y)
    result = CliRunner().invoke(main, [str(corpus.good), "--data", data, "--allow-nonfinite", *FAST,
                                       "--json", str(corpus.root / "r.json")])
    assert result.exit_code == 0, result.stderr
    report = json.loads((corpus.root / "r.json").read_text())
    assert report["clean_accuracy"] == pytest.approx((N - 1) / N)  # the NaN row predicts no class


def test_external_data_inside_folder_works(corpus):
    """The same machinery accepts an honest external-data model (and leaves its files alone)."""
    path = corpus.external("models/ok.onnx")
    before = snapshot(corpus.root)
    result = CliRunner().invoke(main, [path, "--data", str(corpus.data), *FAST])
    assert result.exit_code == 0, result.stderr
    assert snapshot(corpus.root) == before


# --- real processes: nothing native leaks onto stderr -----------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("case", ["model-truncated", "model-custom-op", "model-opset-too-new", "external-parent",
                                  "data-pickled-npz"])
def test_real_process_prints_one_line(corpus, case):
    build, code, phrase = next((b, c, p) for i, b, c, p in CASES if i == case)
    argv = [sys.executable, "-m", "walkaudit", *build(corpus), *FAST]
    env = {k: v for k, v in os.environ.items() if k != "WALKAUDIT_DEBUG"}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120, check=False)
    lines = proc.stderr.splitlines()
    assert proc.returncode == code, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("walkaudit: error: ") and phrase.lower() in lines[0].lower(), \
        proc.stderr


# --- runtime trouble --------------------------------------------------------------------------------------------------

def exploding() -> onnx.ModelProto:
    """x -> MatMul+Add (site h) -> Exp -> Gemm -> logits: large noise at h overflows Exp to Inf, then NaN."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.normal(0, 0.25, (FEATURES, 8)).astype(np.float32), "w1"),
             numpy_helper.from_array(np.zeros(8, np.float32), "b1"),
             numpy_helper.from_array(rng.normal(0, 1, (8, CLASSES)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.zeros(CLASSES, np.float32), "b2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h_mm"], name="fc1"),
             helper.make_node("Add", ["h_mm", "b1"], ["h"], name="fc1_bias"),
             helper.make_node("Exp", ["h"], ["e"], name="exp"),
             helper.make_node("Gemm", ["e", "w2", "b2"], ["logits"], name="fc2")]
    return _model(nodes, [_vi("x", TensorProto.FLOAT, ["N", FEATURES])], [_vi("logits", TensorProto.FLOAT,
                                                                                ["N", CLASSES])], inits)


def test_nonfinite_outputs_count_as_misclassified(corpus):
    model = corpus.save_model("exp.onnx", exploding())
    y = teacher_labels(exploding(), corpus.x)
    data = corpus.npz("exp.npz", x=corpus.x, y=y)
    out = corpus.root / "r.json"
    result = CliRunner().invoke(main, [model, "--data", data, "--include", "^h$", "--sigmas", "0.01,1000",
                                       "--repeats", "2", "--provider", "cpu", "--json", str(out)])
    assert result.exit_code == 0, result.stderr
    report = json.loads(out.read_text())
    (site,) = report["sites"]
    low, high = site["points"]
    assert low["nonfinite"] == 0
    assert high["nonfinite"] > 0  # said in the report, per point
    assert high["accuracy"] <= 1 - high["nonfinite"] / (high["repeats"] * high["samples"]) + 1e-9


def test_nonfinite_outputs_are_said_in_the_summary(corpus):
    model = corpus.save_model("exp.onnx", exploding())
    data = corpus.npz("exp.npz", x=corpus.x, y=teacher_labels(exploding(), corpus.x))
    result = CliRunner().invoke(main, [model, "--data", data, "--include", "^h$", "--sigmas", "0.01,1000",
                                       "--repeats", "1", "--provider", "cpu"])
    assert result.exit_code == 0, result.stderr
    text = result.stdout.lower()
    assert "nan" in text or "non-finite" in text or "nonfinite" in text


def test_out_of_memory_retries_with_fewer_levels(corpus, monkeypatch):
    argv = [str(corpus.good), "--data", str(corpus.data), "--sigmas", "0.1,0.3,1,3", "--repeats", "2",
            "--provider", "cpu", "-q", "--json"]
    clean = corpus.root / "clean.json"
    assert CliRunner().invoke(main, [*argv, str(clean)]).exit_code == 0

    calls = {"raised": 0}

    def flaky(real):
        def _run(self, values, sigmas, eps, device=None):
            if len(sigmas) > 1 and np.any(sigmas) and calls["raised"] == 0:  # a packed run, not the σ = 0 probe
                calls["raised"] += 1
                raise OutOfMemory("Failed to allocate memory for requested buffer of size 123456789")
            return real(self, values, sigmas, eps, device)
        return _run

    for cls in (strategies.HostApplied, strategies.FedSuffix):
        monkeypatch.setattr(cls, "run", flaky(cls.run))
    retried = corpus.root / "retried.json"
    result = CliRunner().invoke(main, [*argv, str(retried)])
    assert result.exit_code == 0, result.stderr
    assert calls["raised"] == 1
    a, b = json.loads(clean.read_text()), json.loads(retried.read_text())
    assert any("out of memory" in n for n in b["runtime"]["notes"])
    assert [s["points"] for s in a["sites"]] == [s["points"] for s in b["sites"]]  # same numbers after the retry


def test_out_of_memory_at_one_level_is_a_runtime_failure(corpus, monkeypatch):
    def oom(self, values, sigmas, eps, device=None):
        raise OutOfMemory("out of memory running the noisy model: Failed to allocate memory")

    for cls in (strategies.HostApplied, strategies.FedSuffix):
        monkeypatch.setattr(cls, "run", oom)
    result = CliRunner().invoke(main, [str(corpus.good), "--data", str(corpus.data), *FAST])
    one_error_line(result, 3, "out of memory")


def test_interrupt_writes_partial_report(corpus, monkeypatch):
    real_evaluate = Worker.evaluate
    calls = []

    def evaluate(self, unit, progress=None):
        if unit.sites[0] not in calls:
            calls.append(unit.sites[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_evaluate(self, unit, progress)

    monkeypatch.setattr(Worker, "evaluate", evaluate)
    out = corpus.root / "partial.json"
    result = CliRunner().invoke(main, [str(corpus.good), "--data", str(corpus.data), "--sigmas", "0.1,1",
                                       "--repeats", "1", "--provider", "cpu", "--json", str(out)])
    assert result.exit_code == 130, result.stderr
    assert "Traceback" not in result.stderr
    report = json.loads(out.read_text())
    assert report["partial"] is True
    assert [s["name"] for s in report["sites"]] == ["h"]
    assert "PARTIAL" in result.stdout


def test_interrupt_during_clean_pass(corpus, monkeypatch):
    def boom(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(Worker, "clean_pass", boom)
    out = corpus.root / "none.json"
    result = CliRunner().invoke(main, [str(corpus.good), "--data", str(corpus.data), *FAST, "--json", str(out)])
    one_error_line(result, 130, "interrupted")
    assert not out.exists()
