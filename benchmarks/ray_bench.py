#!/usr/bin/env python3
"""Ray against in-process on the same cores: whole audits, the per-piece overhead and the piece size it implies.

    python benchmarks/ray_bench.py                      # LeNet-5 and ResNet-8, 5 runs each (~6 min on 2 cores)
    python benchmarks/ray_bench.py --runs 3 --json ray.json
    python benchmarks/ray_bench.py --only overhead

Figures (docs/scale.md, "Ray"):
  audit     median wall time of the same audit (same seed, same report) in process and on a local Ray cluster started
            once (`ray.init(num_cpus=2)`; its start is timed apart). Each audit starts its own actors (`connect`, as
            --ray does): "ray AxT" is the audit once they are up (imports done: a connected, running cluster with
            its workers started), "ray AxT +start" adds their start. The actors run the clean pass, each over its
            slice of the data; the driver only waits. Ray layouts: one actor of 2 threads, two actors of 1 thread.
  overhead  what one piece costs beyond its evaluation: the smallest unit (one block, one σ, one repeat) in process
            against the same unit sent to an actor, one at a time (round trip) and 200 at once (pipelined); and the
            piece size that keeps the overhead under 1 % of the work.

LeNet-5: samples/mnist_lenet5.dynamo.onnx on samples/mnist_val.npz (1000 MNIST digits, labels). ResNet-8: built by
benchmarks/models.py when torch is installed (trained, BN folded), else the same architecture in onnx.helper with
seeded He-normal weights and BN already folded (random weights cost the same to run), on seeded synthetic 3x32x32
images in agreement mode. Not a test: nothing here asserts; the 1.15x target is printed next to the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CPUS = 2
TARGET = 1.15


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- models ------------------------------------------------------------------------------------------------------------
def resnet8_helper(path: Path, width: int = 16, classes: int = 10, seed: int = 0) -> Path:
    """ResNet-8 (benchmarks/models.py's ResNet8 after BN folding) in onnx.helper: stem conv, three basic blocks of
    widths w, 2w, 4w (1x1 shortcut convs where the shape changes), global average pool, Linear. Opset 17."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def conv(x, cin, cout, k, stride, name):
        w = (rng.normal(0, np.sqrt(2.0 / (cin * k * k)), (cout, cin, k, k))).astype(np.float32)
        b = rng.normal(0, 0.05, cout).astype(np.float32)
        inits.extend([numpy_helper.from_array(w, f"{name}.weight"), numpy_helper.from_array(b, f"{name}.bias")])
        nodes.append(helper.make_node("Conv", [x, f"{name}.weight", f"{name}.bias"], [name], kernel_shape=[k, k],
                                      strides=[stride, stride], pads=[k // 2] * 4))
        return name

    def relu(x, name):
        nodes.append(helper.make_node("Relu", [x], [name]))
        return name

    def block(x, cin, cout, stride, name):
        y = relu(conv(x, cin, cout, 3, stride, f"{name}.conv1"), f"{name}.relu1")
        y = conv(y, cout, cout, 3, 1, f"{name}.conv2")
        short = x if stride == 1 and cin == cout else conv(x, cin, cout, 1, stride, f"{name}.short")
        nodes.append(helper.make_node("Add", [y, short], [f"{name}.add"]))
        return relu(f"{name}.add", f"{name}.out")

    w = width
    x = relu(conv("x", 3, w, 3, 1, "stem"), "stem.relu")
    x = block(x, w, w, 1, "layer1")
    x = block(x, w, 2 * w, 2, "layer2")
    x = block(x, 2 * w, 4 * w, 2, "layer3")
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["pool"]))
    nodes.append(helper.make_node("Flatten", ["pool"], ["flat"], axis=1))
    fc = rng.normal(0, np.sqrt(1.0 / (4 * w)), (classes, 4 * w)).astype(np.float32)
    inits.extend([numpy_helper.from_array(fc, "fc.weight"),
                  numpy_helper.from_array(np.zeros(classes, np.float32), "fc.bias")])
    nodes.append(helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], transB=1))
    graph = helper.make_graph(nodes, "resnet8", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                ["batch", 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="ray_bench")
    model.ir_version = 10
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def resnet8(folder: Path, samples: int) -> tuple[Path, Path, str]:
    """(model, data, how it was built)."""
    data = folder / "resnet8_val.npz"
    try:
        sys.path.insert(0, str(HERE))
        import models  # needs torch

        bench = models.resnet8(folder, samples)
        np.savez(data, x=bench.x)
        return bench.onnx_path, data, "benchmarks/models.py (torch, trained)"
    except ImportError:
        path = resnet8_helper(folder / "resnet8.onnx")
        x = np.random.default_rng(2).normal(size=(samples, 3, 32, 32)).astype(np.float32)
        np.savez(data, x=x)
        return path, data, "onnx.helper, seeded He-normal weights (torch not installed)"


# -- measurements ------------------------------------------------------------------------------------------------------
def same(a, b) -> bool:
    x, y = a.to_dict(), b.to_dict()
    for r in (x, y):
        r.pop("runtime", None)
    return x == y


def bench_audit(name: str, model: Path, data: Path, runs: int, layouts: list[dict], **options) -> dict:
    from walkaudit import api
    from walkaudit._execution import ray_executor

    opts = {"provider": "cpu", "threads": CPUS, **options}
    from walkaudit.config import AuditConfig

    config = AuditConfig(**opts)
    times, cpu = {"in-process": []}, {"in-process": []}
    stats = {}
    reference = None
    for i in range(runs):
        t, c = time.perf_counter(), time.process_time()
        report = api.audit(str(model), data=str(data), **opts)
        times["in-process"].append(time.perf_counter() - t)
        cpu["in-process"].append(time.process_time() - c)
        reference = reference or report
        for layout in layouts:
            key = f"ray {layout['workers']}x{layout['threads']}"
            made = {}

            t, c = time.perf_counter(), time.process_time()
            cluster = ray_executor.connect(None, config, **layout)  # as --ray does: the actors start at once
            cluster.ray.get([actor.describe.remote() for actor in cluster.warm])  # started: imports done
            up = time.perf_counter()

            def factory(audit, progress, cluster=cluster, made=made):
                made["ex"] = cluster(audit, progress)
                return made["ex"]

            got = api.audit(str(model), data=str(data), executor=factory, **opts)
            end = time.perf_counter()
            times.setdefault(key, []).append(end - up)
            times.setdefault(f"{key} +start", []).append(end - t)
            cpu.setdefault(key, []).append(time.process_time() - c + (made["ex"].cpu_s or 0.0))
            if not same(reference, got):
                raise SystemExit(f"{name} {key}: the Ray report differs from the in-process one")
            stats[key] = made["ex"].stats()
        log(f"  {name} run {i + 1} (load {os.getloadavg()[0]:.1f}): " +
            ", ".join(f"{k} {v[-1]:.2f}s" + (f" (CPU {cpu[k][-1]:.2f}s)" if k in cpu else "")
                      for k, v in times.items()))
    medians = {k: statistics.median(v) for k, v in times.items()}
    cpu_medians = {k: statistics.median(v) for k, v in cpu.items()}
    base, cbase = medians["in-process"], cpu_medians["in-process"]
    for k, v in medians.items():
        if k != "in-process":
            log(f"{name}: {k} {v:.2f}s vs in-process {base:.2f}s = {v / base:.2f}x (target ≤ {TARGET}x)")
        if k in stats:
            s = stats[k]
            log(f"    CPU {cpu_medians[k]:.2f}s vs {cbase:.2f}s = {cpu_medians[k] / cbase:.2f}x; "
                f"{s['pieces']} pieces in {s['calls']} calls, clean pass {s['clean_s']:.2f}s, "
                f"actors busy {s['busy_s']:.2f}s, set up in "
                f"{s['start_s']:.2f}s")
    return {"model": name, "options": options, "runs": runs, "times_s": times, "medians_s": medians,
            "cpu_s": cpu, "cpu_medians_s": cpu_medians,
            "ratios": {k: v / base for k, v in medians.items()}, "ray_stats": stats,
            "sites": len(reference.sites)}


def bench_overhead(model: Path, data: Path, calls: int = 200) -> dict:
    """The smallest unit in process and on one actor: round trip (one at a time) and pipelined (all at once)."""
    from walkaudit import api
    from walkaudit._execution import ray_executor
    from walkaudit._units import WorkUnit

    run = api.iter_audit(str(model), data=str(data), provider="cpu", threads=1)
    it = iter(run)
    holder = {}

    def factory(audit, progress):
        holder["ex"] = ray_executor.connect(None, audit, workers=1, threads=1)(audit, progress)
        return holder["ex"]

    run.executor = factory
    next(it)  # the clean pass, the executor, the first site
    ex = holder["ex"]
    worker = run.resolved.build(model=run.loaded, dataset=run.dataset)  # the same audit in this process
    worker.clean_pass(keep=True)
    site = run.sites[-1].name
    unit = WorkUnit(worker.key, (site,), (0.5,), 1, (0, 1), run.config.seed)
    for _ in range(20):  # warm: sessions, cache, the actor's evaluation of this site
        worker.evaluate(unit)
        ex.result(ex.wait([ex.submit(unit)])[0])

    def per_call(fn, n):
        t = time.perf_counter()
        fn(n)
        return (time.perf_counter() - t) / n

    local = statistics.median(per_call(lambda n: [worker.evaluate(unit) for _ in range(n)], calls) for _ in range(3))

    def trips(n):
        for _ in range(n):
            ex.result(ex.wait([ex.submit(unit)])[0])

    def piped(n):
        handles = [ex.submit(unit) for _ in range(n)]
        while handles:
            for h in ex.wait(handles):
                handles.remove(h)

    trip = statistics.median(per_call(trips, calls) for _ in range(3))
    pipe = statistics.median(per_call(piped, calls) for _ in range(3))
    del it
    ex.close()
    worker.source.close()
    overhead = max(trip - local, 0.0)
    piped_over = max(pipe - local, 0.0)
    piece = 100 * overhead  # the overhead ≤ 1 % of a piece
    log(f"overhead: smallest unit {1e3 * local:.2f} ms in process, {1e3 * trip:.2f} ms round trip "
        f"(+{1e3 * overhead:.2f} ms), {1e3 * pipe:.2f} ms pipelined (+{1e3 * piped_over:.2f} ms); "
        f"≤ 1 % overhead from {piece:.2f} s a piece (PIECE_SECONDS = {ray_executor.PIECE_SECONDS})")
    return {"unit_ms_in_process": 1e3 * local, "unit_ms_round_trip": 1e3 * trip, "unit_ms_pipelined": 1e3 * pipe,
            "overhead_ms_round_trip": 1e3 * overhead, "overhead_ms_pipelined": 1e3 * piped_over,
            "piece_s_for_1pct": piece, "piece_seconds": ray_executor.PIECE_SECONDS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="runs per audit (median over them)")
    parser.add_argument("--only", default="overhead,lenet,resnet", help="comma-separated figures to run")
    parser.add_argument("--lenet-repeats", type=int, default=10)
    parser.add_argument("--resnet-samples", type=int, default=1000)
    parser.add_argument("--resnet-repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    args = parser.parse_args()
    only = set(args.only.split(","))

    import ray

    t = time.perf_counter()
    ray.init(num_cpus=CPUS, num_gpus=0, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    started = time.perf_counter() - t
    log(f"ray {ray.__version__}: local cluster of {CPUS} CPUs started in {started:.2f}s")
    results = {"ray": ray.__version__, "cluster_start_s": started, "cpus": CPUS}
    layouts = [{"workers": 1, "threads": 2}, {"workers": 2, "threads": 1}]
    lenet = (ROOT / "samples/mnist_lenet5.dynamo.onnx", ROOT / "samples/mnist_val.npz")
    try:
        with tempfile.TemporaryDirectory(prefix="walkaudit-ray-") as tmp:
            if "overhead" in only:
                results["overhead"] = bench_overhead(*lenet)
            if "lenet" in only:
                results["lenet"] = bench_audit("LeNet-5", *lenet, args.runs, layouts, repeats=args.lenet_repeats)
            if "resnet" in only:
                model, data, how = resnet8(Path(tmp), args.resnet_samples)
                log(f"ResNet-8: {how}")
                results["resnet"] = bench_audit("ResNet-8", model, data, args.runs, layouts,
                                                repeats=args.resnet_repeats)
                results["resnet"]["built_by"] = how
    finally:
        t = time.perf_counter()
        ray.shutdown()
        results["cluster_stop_s"] = time.perf_counter() - t
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
