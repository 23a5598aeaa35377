"""The models people deploy, audited on a laptop-size machine: sites, wall time, peak memory, cost ratio.

Two steps, in two environments (the suite and walkaudit stay torch-free):

    # 1. build: torch + torchvision in a venv of their own; random weights (nothing downloads), BatchNorm statistics
    #    from the data (train mode, momentum=None) so that the models do not predict one class; ONNX + data to --out
    /work/tvenv/bin/python benchmarks/zoo.py build --out /work/zoo
    # 2. run: walkaudit's venv; each model audited in a child process of its own, beside a plain onnxruntime session
    python benchmarks/zoo.py run --zoo /work/zoo --json zoo.json

Per model, `run` reports: the sites, the audit's wall time and peak RSS (the child's VmHWM, with a parent watchdog that
kills an audit above --cap-gib), evaluations (sample forward passes under noise, `runtime.evaluations`), the cost
ratio = wall time / (evaluations x one clean pass of one image by a plain session), and the plain session's peak
RSS and time per pass of the same images. The naive method that reruns the whole model per evaluation has ratio
1.0 (plus its own overheads); running only the suffixes averages about 0.5 on a chain of equal layers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: name -> (torchvision constructor, exporter, input size)
MODELS = {
    "resnet18": ("resnet18", "legacy", 224),
    "resnet50": ("resnet50", "legacy", 224),
    "vit_b_16": ("vit_b_16", "legacy", 224),
    "mobilenet_v3_large": ("mobilenet_v3_large", "legacy", 224),
    "efficientnet_b0": ("efficientnet_b0", "legacy", 224),
    "resnet18_dynamo": ("resnet18", "dynamo", 224),
}
#: every k-th site is audited (evenly spread, so the cost ratio stays representative) where a full audit takes hours on
#: two shared cores; 1: all sites
EVERY = {"resnet18": 1, "resnet50": 3, "vit_b_16": 12, "mobilenet_v3_large": 4, "efficientnet_b0": 5,
         "resnet18_dynamo": 1}
OPSET, DYNAMO_OPSET, MAX_IR_VERSION = 17, 18, 10


# -- build (torch) ---------------------------------------------------------------------------------------------------
def images(n: int, size: int, seed: int):
    """Smooth random images (low-frequency fields plus a little pixel noise), roughly ImageNet-normalised."""
    import numpy as np

    rng = np.random.default_rng(seed)
    coarse = rng.normal(size=(n, 3, 7, 7)).astype(np.float32)
    up = np.kron(coarse, np.ones((1, 1, size // 7 + 1, size // 7 + 1), np.float32))[:, :, :size, :size]
    return (up + 0.3 * rng.normal(size=up.shape)).astype(np.float32)


def build(out: Path, names: list[str], samples: int, stats_samples: int) -> None:
    import warnings

    import numpy as np
    import onnx
    import torch
    import torchvision

    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        ctor, exporter, size = MODELS[name]
        path = out / f"{name}.onnx"
        x = images(samples, size, seed=1)
        np.save(out / f"{name}_x.npy", x)
        if path.exists():
            print(f"{name}: {path} exists", flush=True)
            continue
        t = time.perf_counter()
        torch.manual_seed(0)
        model = getattr(torchvision.models, ctor)(weights=None)
        for m in model.modules():  # ViT's head starts at zero: every image would score alike
            if isinstance(m, torch.nn.Linear) and not m.weight.detach().any():
                torch.nn.init.normal_(m.weight, std=0.02)
        # BatchNorm statistics of the data (cumulative average over the batches): with random weights and the
        # default running statistics every image lands in the same class
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None
        model.train()
        calib = images(stats_samples, size, seed=2)
        with torch.no_grad():
            for i in range(0, len(calib), 8):
                model(torch.from_numpy(calib[i : i + 8]))
        model.eval()
        example = (torch.from_numpy(x[:2]),)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                torch.onnx.export(model, example, str(path), dynamo=True, external_data=False,
                                  opset_version=DYNAMO_OPSET, input_names=["x"], output_names=["logits"],
                                  dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
            else:
                torch.onnx.export(model, example, str(path), dynamo=False, opset_version=OPSET, input_names=["x"],
                                  output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
        proto = onnx.load(str(path))
        proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
        onnx.save(proto, str(path))
        with torch.no_grad():
            classes = model(torch.from_numpy(x)).argmax(1).tolist()
        print(f"{name}: {path.stat().st_size / 2**20:.0f} MB, {time.perf_counter() - t:.0f} s, "
              f"classes of the {samples} images: {classes}", flush=True)


# -- measure (onnxruntime, walkaudit) ---------------------------------------------------------------------------------
def _status(pid: int | str, key: str) -> float:
    """A /proc/PID/status field in MiB (VmRSS, VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def plain(model: str, data: str, threads: int, passes: int) -> dict:
    """A plain onnxruntime session of the model (default options) over the images: its peak and time per pass."""
    import numpy as np
    import onnxruntime as ort

    x = np.load(data)
    before = _status("self", "VmRSS")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    t = time.perf_counter()
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    created = time.perf_counter() - t
    name = session.get_inputs()[0].name
    times, cpu = [], []
    for _ in range(passes):
        t, c = time.perf_counter(), time.process_time()
        session.run(None, {name: x})
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return {"rss_before_mib": before, "peak_mib": _status("self", "VmHWM"), "session_s": created,
            "pass_s": float(np.median(times)), "pass_cpu_s": float(np.median(cpu)), "passes": passes,
            "images": len(x)}


def audit(model: str, data: str, threads: int, every: int) -> dict:
    """One walkaudit audit (library call, batch = the images; every `every`-th site), its peak and what it did."""
    import numpy as np

    sys.path.insert(0, str(ROOT))
    import walkaudit
    from walkaudit._graph.sites import Selection, select
    from walkaudit._loading.model import load_model

    x = np.load(data)
    before = _status("self", "VmRSS")
    t, c = time.perf_counter(), time.process_time()
    options = {}
    if every > 1:
        loaded = load_model(model, None)
        names = [s.name for s in select(loaded.proto, loaded.types, Selection(), loaded.class_output.name)]
        options["selection"] = Selection(names=tuple(names[::every]))
        del loaded
    report = walkaudit.audit(model, x, None, threads=threads, provider="cpu", batch_size=len(x), **options)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    runtime = report.to_dict()["runtime"]
    return {"rss_before_mib": before, "peak_mib": _status("self", "VmHWM"), "wall_s": wall, "cpu_s": cpu,
            "sites": len(report.sites), "every": every, "evaluations": runtime.get("evaluations"),
            "clean_accuracy": report.clean_accuracy, "cache_budget_bytes": runtime.get("cache_budget_bytes"),
            "censored": sum(1 for s in report.sites if s.censored)}


def child(kind: str, model: Path, data: Path, threads: int, cap_mib: float, extra: list[str]) -> dict:
    """Run `kind` (plain or audit) in a child process; poll its RSS and kill it above `cap_mib`."""
    cmd = [sys.executable, __file__, kind, str(model), str(data), "--threads", str(threads), *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak, t = 0.0, time.perf_counter()
    while proc.poll() is None:
        try:
            rss = _status(proc.pid, "VmRSS")
        except (FileNotFoundError, ProcessLookupError):
            break
        peak = max(peak, rss)
        if rss > cap_mib:
            proc.kill()
            proc.wait()
            return {"killed": f"RSS {rss:.0f} MiB above the cap after {time.perf_counter() - t:.0f} s"}
        time.sleep(0.2)
    out, err = proc.communicate()
    if proc.returncode:
        return {"failed": (err.strip().splitlines() or ["?"])[-1][:300]}
    result = json.loads(out.strip().splitlines()[-1])
    result["polled_peak_mib"] = peak
    return result


def run(zoo: Path, names: list[str], threads: int, cap_gib: float, passes: int, every: int | None, out: str | None):
    rows = []
    for name in names:
        model, data = zoo / f"{name}.onnx", zoo / f"{name}_x.npy"
        if not model.exists():
            print(f"{name}: not built", flush=True)
            continue
        base = child("plain", model, data, threads, cap_gib * 1024, ["--passes", str(passes)])
        stride = EVERY.get(name, 1) if every is None else every
        result = child("audit", model, data, threads, cap_gib * 1024, ["--every", str(stride)])
        row = {"model": name, "size_mb": model.stat().st_size / 2**20, "plain": base, "audit": result}
        after = child("plain", model, data, threads, cap_gib * 1024, ["--passes", str(passes)])
        row["plain_after"] = after
        if "wall_s" in result and "pass_s" in base and "pass_s" in after:
            # the load of a shared machine moves from minute to minute: the plain pass before and after the audit
            per_image = (base["pass_s"] + after["pass_s"]) / 2 / base["images"]
            row["ratio"] = result["wall_s"] / (result["evaluations"] * per_image)
            per_image_cpu = (base["pass_cpu_s"] + after["pass_cpu_s"]) / 2 / base["images"]
            row["cpu_ratio"] = result["cpu_s"] / (result["evaluations"] * per_image_cpu)
            row["clean_passes"] = result["evaluations"] / base["images"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    print()
    print("| model | MB | sites audited | wall s | evaluations | ratio (wall) | ratio (CPU) | audit peak MiB | "
          "plain peak MiB | plain pass s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        a, p = r["audit"], r["plain"]
        what = a.get("killed") or a.get("failed")
        if what:
            print(f"| {r['model']} | {r['size_mb']:.0f} | | {what} | | | | | {p.get('peak_mib', 0):.0f} | |")
            continue
        nan = float("nan")
        print(f"| {r['model']} | {r['size_mb']:.0f} | {a['sites']} (every {a['every']}) | {a['wall_s']:.0f} | "
              f"{a['evaluations']} | {r.get('ratio', nan):.2f} | {r.get('cpu_ratio', nan):.2f} | {a['peak_mib']:.0f} | "
              f"{p['peak_mib']:.0f} | {p['pass_s']:.3f} |")
    if out:
        Path(out).write_text(json.dumps(rows, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="export the models (needs torch and torchvision)")
    b.add_argument("--out", type=Path, default=Path("/work/zoo"))
    b.add_argument("--models", nargs="*", default=list(MODELS))
    b.add_argument("--images", type=int, default=8)
    b.add_argument("--stats-images", type=int, default=64)
    r = sub.add_parser("run", help="audit each model in a child process, beside a plain session")
    r.add_argument("--zoo", type=Path, default=Path("/work/zoo"))
    r.add_argument("--models", nargs="*", default=list(MODELS))
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--cap-gib", type=float, default=10.0)
    r.add_argument("--passes", type=int, default=7)
    r.add_argument("--every", type=int, help="audit every k-th site (default: per model, EVERY)")
    r.add_argument("--json")
    for kind in ("plain", "audit"):
        c = sub.add_parser(kind, help="(internal) one measurement, one JSON line")
        c.add_argument("model")
        c.add_argument("data")
        c.add_argument("--threads", type=int, default=2)
        c.add_argument("--passes", type=int, default=7)
        c.add_argument("--every", type=int, default=1)
    args = parser.parse_args()
    if args.command == "build":
        build(args.out, args.models, args.images, args.stats_images)
    elif args.command == "run":
        run(args.zoo, args.models, args.threads, args.cap_gib, args.passes, args.every, args.json)
    elif args.command == "plain":
        print(json.dumps(plain(args.model, args.data, args.threads, args.passes)))
    else:
        print(json.dumps(audit(args.model, args.data, args.threads, args.every)))


if __name__ == "__main__":
    main()
