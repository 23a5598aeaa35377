"""Data larger than the memory cap: `python benchmarks/data_scale.py [--gb 4] [--form npz|npy|shards] [--cap-gib 2]`.

Writes a data set of about --gb GB (float32 [N, 3, 224, 224], uncompressed: one .npz with stored members, one .npy,
or a folder of stored .npz shards) into a temporary folder, builds a small MLP with onnx.helper whose input matches,
and audits it in a child process whose address space is capped with RLIMIT_AS (`ulimit -v`): the whole data set
could not even be mapped, let alone read. A file is audited through the command line (`python -m walkaudit`), a folder
through `walkaudit.audit` (the command's --data takes files until the CLI is wired for folders). A few σ levels,
one repeat, no --limit. Prints one JSON line: the data's size, the cap, the child's exit status, its wall time and its
peak resident set (VmHWM, read by the child itself at exit). Not part of the test suite: it takes a few minutes.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SHAPE = (3, 224, 224)
FEATURES = int(np.prod(SHAPE))
HIDDEN, CLASSES = 16, 10
ROWS_PER_WRITE = 64  # ~38 MB of samples at a time: the writer stays small too

CHILD = r"""
import atexit, json, sys, time
out, mode, *args = sys.argv[1:]
start = time.perf_counter()

def report():
    status = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM:", "VmPeak:")):
                status[line.split(":")[0]] = int(line.split()[1]) / 1024
    with open(out, "w") as f:
        json.dump({"wall_s": time.perf_counter() - start, "peak_rss_mib": status.get("VmHWM"),
                   "peak_virtual_mib": status.get("VmPeak")}, f)

atexit.register(report)
if mode == "cli":
    sys.argv = ["walkaudit", *args]
    from walkaudit.cli import main
    main()
else:
    import walkaudit
    model, data, report_path = args
    r = walkaudit.audit(model, data=data, sigmas=(0.1, 1.0, 10.0), repeats=1, provider="cpu")
    with open(report_path, "w") as f:
        json.dump(r.to_dict(), f)
"""


def mlp(seed: int = 0) -> tuple[onnx.ModelProto, tuple[np.ndarray, ...]]:
    """x [N, 3, 224, 224] -> Flatten -> MatMul+Add -> Relu -> MatMul+Add -> logits [N, 10]; and its weights."""
    rng = np.random.default_rng(seed)
    w1 = (rng.normal(0, 1, (FEATURES, HIDDEN)) / np.sqrt(FEATURES)).astype(np.float32)
    b1 = rng.normal(0, 0.1, HIDDEN).astype(np.float32)
    w2 = (rng.normal(0, 1, (HIDDEN, CLASSES)) / np.sqrt(HIDDEN)).astype(np.float32)
    b2 = np.zeros(CLASSES, np.float32)
    nodes = [helper.make_node("Flatten", ["x"], ["flat"], name="flatten", axis=1),
             helper.make_node("MatMul", ["flat", "w1"], ["h_mm"], name="fc1"),
             helper.make_node("Add", ["h_mm", "b1"], ["h"], name="fc1_bias"),
             helper.make_node("Relu", ["h"], ["h_relu"], name="relu1"),
             helper.make_node("MatMul", ["h_relu", "w2"], ["l_mm"], name="fc2"),
             helper.make_node("Add", ["l_mm", "b2"], ["logits"], name="fc2_bias")]
    graph = helper.make_graph(
        nodes, "big_input_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *SHAPE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model, (w1, b1, w2, b2)


def samples(n: int, weights, seed: int = 1):
    """(x chunk, labels chunk) pairs: normal noise inputs, labelled by the model itself."""
    w1, b1, w2, b2 = weights
    rng = np.random.default_rng(seed)
    for start in range(0, n, ROWS_PER_WRITE):
        k = min(ROWS_PER_WRITE, n - start)
        x = rng.standard_normal((k, *SHAPE), dtype=np.float32)
        logits = np.maximum(x.reshape(k, -1) @ w1 + b1, 0) @ w2 + b2
        yield x, logits.argmax(axis=1).astype(np.int64)


def _write_npy(f, n: int, chunks, labels: list) -> None:
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
              "shape": (n, *SHAPE)}
    np.lib.format.write_array_header_2_0(f, header)
    for x, y in chunks:
        f.write(x.tobytes())
        labels.append(y)


def _write_npz(path: Path, n: int, chunks) -> None:
    labels: list[np.ndarray] = []
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
        with z.open("x.npy", "w", force_zip64=True) as f:
            _write_npy(f, n, chunks, labels)
        with z.open("y.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, np.concatenate(labels))


def write_data(folder: Path, form: str, n: int, weights) -> Path:
    chunks = samples(n, weights)
    if form == "npz":
        path = folder / "val.npz"
        _write_npz(path, n, chunks)
    elif form == "npy":
        path = folder / "val.npy"
        with open(path, "wb") as f:
            _write_npy(f, n, chunks, [])
    else:
        path = folder / "val"
        path.mkdir()
        per = -(-n // (8 * ROWS_PER_WRITE)) * ROWS_PER_WRITE  # 8 shards, whole chunks each
        for i, start in enumerate(range(0, n, per)):
            k = min(per, n - start)
            _write_npz(path / f"part-{i:04d}.npz", k, (next(chunks) for _ in range(-(-k // ROWS_PER_WRITE))))
    return path


def capped(cap: int):
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    return limit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=4.0, help="data size in GB (default 4)")
    ap.add_argument("--form", choices=["npz", "npy", "shards"], default="npz")
    ap.add_argument("--cap-gib", type=float, default=2.0, help="RLIMIT_AS of the audit, GiB (default 2)")
    ap.add_argument("--dir", default=None, help="where to write the data (default: a new temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the data folder")
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="walkaudit-scale-", dir=args.dir))
    try:
        n = int(args.gb * 1e9 // (FEATURES * 4))
        n -= n % ROWS_PER_WRITE
        model, weights = mlp()
        model_path = root / "mlp.onnx"
        onnx.save(model, model_path)
        t = time.perf_counter()
        data = write_data(root, args.form, n, weights)
        write_s = time.perf_counter() - t
        size = sum(p.stat().st_size for p in ([data] if data.is_file() else data.iterdir()))
        cap = int(args.cap_gib * (1 << 30))
        stats, report = root / "child.json", root / "report.json"
        if data.is_file():
            argv = ["cli", str(model_path), "--data", str(data), "--sigmas", "0.1,1,10", "--repeats", "1",
                    "--provider", "cpu", "--json", str(report), "-q"]
        else:
            argv = ["api", str(model_path), str(data), str(report)]
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", CHILD, str(stats), *argv], preexec_fn=capped(cap),
                              capture_output=True, text=True, cwd=root, check=False)
        wall = time.perf_counter() - t
        child = json.loads(stats.read_text()) if stats.exists() else {}
        result = {"form": args.form, "samples": n, "data_bytes": size, "data_gib": round(size / (1 << 30), 2),
                  "cap_gib": args.cap_gib, "write_s": round(write_s, 1), "returncode": proc.returncode,
                  "wall_s": round(wall, 1), "audit_s": round(child.get("wall_s", float("nan")), 1),
                  "peak_rss_mib": child.get("peak_rss_mib"), "peak_virtual_mib": child.get("peak_virtual_mib")}
        if report.exists():
            r = json.loads(report.read_text())
            result.update(clean_accuracy=r["clean_accuracy"], audited_samples=r["data"]["samples"],
                          sites=len(r["sites"]), evaluations=r["runtime"]["evaluations"])
        if proc.returncode != 0:
            result["stderr"] = proc.stderr.strip().splitlines()[-5:]
        print(json.dumps(result))
        sys.exit(0 if proc.returncode == 0 else 1)
    finally:
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
