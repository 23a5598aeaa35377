#!/usr/bin/env python3
"""walkaudit performance benchmarks: every figure is a ratio measured within one run; medians over several runs.

    python benchmarks/run.py            # the full set (~10 min on 2 cores)
    python benchmarks/run.py --quick    # smoke run: small sizes, one run (~1-2 min)
    python benchmarks/run.py --only walk,clean --runs 5 --json results.json

Figures (see docs/performance.md):
  walk      whole walk, walkaudit vs the paper's method (torch forward hooks) and vs a naive onnxruntime loop; in the
            `extra_runs` runs (default: all) also walkaudit with exact=True (σ = 0 bit-identical sessions), and with
            --graph walkaudit with noise_source="graph"; then a time breakdown of one audit (default and exact)
  clean     per site: walkaudit's noisy evaluation of K σ levels vs onnxruntime running the same suffix clean on the
            same packed batch (plain session, and one with walkaudit's session options), and vs the whole model
  global    global mode (the same σ at every site at once): walkaudit mode="global" vs torch with every hook on, same
            grid and repeats as the walk, plus a time breakdown of one global audit
  adaptive  default adaptive search vs a fixed 8-points-a-decade grid over the same range: midpoints and evaluations
  memory    peak RSS of an audit at 1k, 10k and 20k samples, each in its own process

Not a test: nothing here asserts; targets are printed next to the measured medians.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

THREADS = 2
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import breakdown
import models
import naive_onnx
import onnxruntime as ort
import torch_reference

import walkaudit
from walkaudit._execution import worker as worker_mod
from walkaudit._execution.runtime import Runtime
from walkaudit._execution.worker import Worker
from walkaudit._graph.index import GraphIndex
from walkaudit._graph.sites import Selection, select
from walkaudit._loading import data as data_mod
from walkaudit._loading.model import load_model
from walkaudit._noise import NormalSource, make_noise
from walkaudit._units import WorkUnit, blocks_of


@dataclass
class Sizes:
    runs: int = 3
    lenet_samples: int = 1000
    resnet_samples: int = 1000
    levels: int = 8
    lenet_repeats: int = 3
    resnet_repeats: int = 1
    extra_runs: int = 3  # runs that also time the naive onnxruntime loop and walkaudit's variants (see above)
    graph: bool = False  # also time walkaudit with noise_source="graph" (--graph)
    ref_batch: int = 1000  # batch of the two references (their fastest here); walkaudit keeps its default 256
    clean_levels: int = 8
    clean_runs: int = 5
    adaptive_models: tuple = ("LeNet-5", "ResNet-8")
    adaptive_samples: int = 1000
    adaptive_resnet_samples: int = 500
    adaptive_repeats: int = 3
    memory_sizes: tuple = (1000, 10000, 20000)


FULL = Sizes()
QUICK = Sizes(runs=1, lenet_samples=300, resnet_samples=300, levels=4, lenet_repeats=1, resnet_repeats=1,
              extra_runs=1, clean_levels=4, clean_runs=1, adaptive_samples=300, adaptive_resnet_samples=200,
              adaptive_repeats=1, memory_sizes=(1000, 4000))

HAS_EXACT = "exact" in {f.name for f in dataclasses.fields(walkaudit.AuditConfig)}  # audit(..., exact=True)
WALK_SIGMAS = (-0.5, 1.5)  # log10 range of the fixed σ grid of the walk figure (both methods, every site)


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def median(values) -> float:
    return float(statistics.median(values))


# -- walk: walkaudit vs the paper's method (torch hooks) and vs a naive onnxruntime loop ------------------------------
def onnx_sites(bench: models.Bench) -> list[str]:
    """walkaudit's default sites of the exported model, matched one to one with the torch modules hooked."""
    loaded = load_model(str(bench.onnx_path))
    names = [s.name for s in select(loaded.proto, loaded.types, Selection())]
    matched = []
    for module in bench.sites:
        parts = module.split(".")  # the legacy exporter scopes Sequential children as "<parent>.<index>"
        scopes = [f"{parts[i - 1]}.{p}" if p.isdigit() and i else p for i, p in enumerate(parts)]
        prefix = "/" + "/".join(scopes) + "/"
        hit = [n for n in names if n.startswith(prefix)] or (["logits"] if module == bench.sites[-1] else [])
        if len(hit) != 1:
            raise SystemExit(f"{bench.name}: cannot match torch module {module} to an ONNX site among {names}")
        matched.append(hit[0])
    if sorted(matched) != sorted(names):
        raise SystemExit(f"{bench.name}: walkaudit sites {names} differ from the hooked modules {bench.sites}")
    return matched


def walkaudit_walk(bench: models.Bench, sigmas, repeats: int, noise_source: str = "auto", exact: bool = False):
    options = {"exact": True} if exact else {}
    started = time.perf_counter()
    report = walkaudit.audit(str(bench.onnx_path), bench.x, bench.y, sigmas=tuple(sigmas), repeats=repeats,
                             threads=THREADS, provider="cpu", noise="additive", noise_source=noise_source, **options)
    seconds = time.perf_counter() - started
    by_name = {s.name: s for s in report.sites}
    return by_name, seconds, report.runtime


def bench_walk(bench: models.Bench, sizes: Sizes, repeats: int) -> dict:
    sigmas = np.logspace(*WALK_SIGMAS, sizes.levels)
    sites = onnx_sites(bench)
    modules = bench.site_modules()
    with torch.inference_mode():  # untimed warm-up of both libraries (first calls allocate and plan)
        bench.torch_model(torch.from_numpy(bench.x[: sizes.ref_batch]))
    walkaudit_walk(models.Bench(bench.name, bench.torch_model, bench.onnx_path, bench.x[:256],
                                None if bench.y is None else bench.y[:256], bench.sites), sigmas[:2], 1)
    rows = []
    for run in range(sizes.runs):
        with_naive = run < sizes.extra_runs
        methods = ["walkaudit", "torch"] + (["naive"] if with_naive else [])
        if with_naive and sizes.graph:
            methods.append("walkaudit-graph")
        if with_naive and HAS_EXACT:
            methods.append("walkaudit-exact")
        k = run % len(methods)
        order = methods[k:] + methods[:k]  # rotate who goes first: the machine is shared and drifts
        t, acc, cpu = {}, {}, {}
        for method in order:
            c0 = os.times()
            if method.startswith("walkaudit"):
                source = "graph" if method == "walkaudit-graph" else "auto"
                by_name, t[method], runtime = walkaudit_walk(bench, sigmas, repeats, source,
                                                             exact=method == "walkaudit-exact")
                acc[method] = np.array([[p.accuracy for p in by_name[s].points] for s in sites])
                if method == "walkaudit":
                    evaluations, noise_source = runtime["evaluations"], getattr(runtime, "noise_source", None)
            elif method == "torch":
                a, _, t[method] = torch_reference.walk(bench.torch_model, modules, bench.x, bench.y, sigmas, repeats,
                                                       batch=sizes.ref_batch, seed=run)
                acc[method] = a.mean(axis=2)
            else:
                a, t[method] = naive_onnx.walk(bench.onnx_path, sites, bench.x, bench.y, sigmas, repeats,
                                               batch=sizes.ref_batch, threads=THREADS)
                acc[method] = a.mean(axis=2)
            c1 = os.times()
            cpu[method] = (c1.user + c1.system) - (c0.user + c0.system)
        wa = t["walkaudit"]
        row = {"order": order, "seconds": t, "cpu_seconds": cpu, "torch_ratio": t["torch"] / wa,
               "torch_cpu_ratio": cpu["torch"] / cpu["walkaudit"], "load_average": os.getloadavg()[0],
               "acc_gap_torch": float(np.abs(acc["torch"] - acc["walkaudit"]).mean()),
               "evaluations": evaluations, "noise_source": noise_source}
        if with_naive:
            if "walkaudit-graph" in t:
                row["graph_ratio"] = t["torch"] / t["walkaudit-graph"]
            if "walkaudit-exact" in t:
                row["exact_ratio"] = t["torch"] / t["walkaudit-exact"]
            row["naive_ratio"] = t["naive"] / wa
            row["acc_gap_naive"] = float(np.abs(acc["naive"] - acc["walkaudit"]).mean())
        log(f"  walk {bench.name} run {run + 1}: " + ", ".join(f"{m} {t[m]:.1f}s" for m in order) +
            f"  torch/walkaudit {row['torch_ratio']:.2f}x" +
            (f"  naive/walkaudit {row['naive_ratio']:.2f}x" if with_naive else "") +
            (f"  torch/walkaudit-graph {row['graph_ratio']:.2f}x" if "graph_ratio" in row else "") +
            (f"  torch/walkaudit-exact {row['exact_ratio']:.2f}x" if "exact_ratio" in row else "") +
            f"  mean |Δacc| vs torch {row['acc_gap_torch']:.3f}")
        rows.append(row)
    parts = breakdown.audit_breakdown(str(bench.onnx_path), bench.x, bench.y, sigmas=tuple(sigmas), repeats=repeats,
                                      threads=THREADS, provider="cpu", noise="additive")
    log(f"  walk {bench.name} breakdown: " + ", ".join(f"{k} {v:.2f}s" for k, v in
                                                       sorted(parts.items(), key=lambda kv: -kv[1])))
    parts_exact = None
    if HAS_EXACT:
        parts_exact = breakdown.audit_breakdown(str(bench.onnx_path), bench.x, bench.y, sigmas=tuple(sigmas),
                                                repeats=repeats, threads=THREADS, provider="cpu", noise="additive",
                                                exact=True)
        log(f"  walk {bench.name} breakdown, exact=True: " +
            ", ".join(f"{k} {v:.2f}s" for k, v in sorted(parts_exact.items(), key=lambda kv: -kv[1])))
    return {"model": bench.name, "samples": len(bench.x), "sites": len(sites), "levels": len(sigmas),
            "repeats": repeats, "points": len(sites) * len(sigmas) * repeats, "runs": rows, "breakdown": parts,
            "breakdown_exact": parts_exact,
            "exact_ratio": median(r["exact_ratio"] for r in rows if "exact_ratio" in r) if HAS_EXACT else None,
            "torch_ratio": median(r["torch_ratio"] for r in rows),
            "graph_ratio": median(r["graph_ratio"] for r in rows if "graph_ratio" in r) if sizes.graph else None,
            "naive_ratio": median(r["naive_ratio"] for r in rows if "naive_ratio" in r),
            "seconds": {m: median(r["seconds"][m] for r in rows if m in r["seconds"])
                        for m in ("walkaudit", "walkaudit-graph", "walkaudit-exact", "torch", "naive")
                        if any(m in r["seconds"] for r in rows)}}


# -- global: every site noisy at once ------------------------------------------------------------------------------
def bench_global(bench: models.Bench, sizes: Sizes, repeats: int) -> dict:
    sigmas = np.logspace(*WALK_SIGMAS, sizes.levels)
    onnx_sites(bench)  # the same sites on both sides
    modules = bench.site_modules()
    rows = []
    for run in range(sizes.runs):
        order = ["walkaudit", "torch"] if run % 2 == 0 else ["torch", "walkaudit"]
        t, acc = {}, {}
        for method in order:
            if method == "walkaudit":
                started = time.perf_counter()
                report = walkaudit.audit(str(bench.onnx_path), bench.x, bench.y, sigmas=tuple(sigmas),
                                         repeats=repeats, threads=THREADS, provider="cpu", noise="additive",
                                         mode="global")
                t[method] = time.perf_counter() - started
                acc[method] = np.array([p.accuracy for p in report.sites[0].points])
            else:
                a, t[method] = torch_reference.global_walk(bench.torch_model, modules, bench.x, bench.y, sigmas,
                                                           repeats, batch=sizes.ref_batch, seed=run)
                acc[method] = a.mean(axis=1)
        row = {"order": order, "seconds": t, "torch_ratio": t["torch"] / t["walkaudit"],
               "acc_gap_torch": float(np.abs(acc["torch"] - acc["walkaudit"]).mean()),
               "load_average": os.getloadavg()[0]}
        rows.append(row)
        log(f"  global {bench.name} run {run + 1}: " + ", ".join(f"{m} {t[m]:.2f}s" for m in order) +
            f"  torch/walkaudit {row['torch_ratio']:.2f}x  mean |Δacc| vs torch {row['acc_gap_torch']:.3f}")
    parts = breakdown.audit_breakdown(str(bench.onnx_path), bench.x, bench.y, sigmas=tuple(sigmas), repeats=repeats,
                                      threads=THREADS, provider="cpu", noise="additive", mode="global")
    log(f"  global {bench.name} breakdown: " + ", ".join(f"{k} {v:.2f}s" for k, v in
                                                         sorted(parts.items(), key=lambda kv: -kv[1])))
    return {"model": bench.name, "samples": len(bench.x), "levels": len(sigmas), "repeats": repeats, "runs": rows,
            "breakdown": parts, "torch_ratio": median(r["torch_ratio"] for r in rows),
            "seconds": {m: median(r["seconds"][m] for r in rows) for m in ("walkaudit", "torch")},
            "acc_gap_torch": median(r["acc_gap_torch"] for r in rows)}


# -- clean: noisy evaluation of K levels vs the same suffix run clean on the same packed batch ---------------------
class Timer:
    """Wraps a callable and adds up the seconds spent in it."""

    def __init__(self, fn):
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t


def ort_session(proto):
    """A plain onnxruntime session: default graph optimisations, THREADS intra-op threads, CPU."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def bench_clean(bench: models.Bench, sizes: Sizes) -> dict:
    """Per site: walkaudit's noisy evaluation of K levels (repeats = 1) against three clean runs over the very same
    packed rows: the suffix in a plain onnxruntime session (the figure), the suffix in a session made by walkaudit's
    Runtime (same options as the noisy run: isolates the cost of the noise), and the whole model (plain session)."""
    loaded = load_model(str(bench.onnx_path))
    index = GraphIndex(loaded.proto.graph)
    out = loaded.class_output.name
    sites = select(loaded.proto, loaded.types, Selection(), out, index=index)
    runtime = Runtime("cpu", THREADS)
    source = NormalSource(0, THREADS)
    dataset = data_mod.from_arrays(bench.x, bench.y, loaded.inputs)
    worker = Worker(loaded, dataset, runtime=runtime, noise=make_noise("additive"), source=source, sites=sites,
                    index=index)
    worker.clean_pass(keep=True)
    full = ort_session(loaded.proto)
    k = sizes.clean_levels
    sigmas = tuple(float(s) for s in np.logspace(-1, 1, k))
    kinds = ("noisy", "suffix", "suffix_wa", "full")
    per_site = []
    try:
        for site in sites:
            unit = WorkUnit(worker.key, (site.name,), sigmas, 1, (0, blocks_of(dataset.samples)), source.seed)
            worker.evaluate(unit)  # warm-up: fills the clean-value cache, picks the packing
            ev = next(e for key, e in worker._evaluations.items() if key in (unit.sites, (unit.mode, unit.sites)))
            grid = list(worker.grid(range(dataset.samples)))
            uncached = len(grid) - len(ev.cache)
            if uncached:  # the noisy side then also runs the site's prefix for those batches, every pass
                log(f"  clean {bench.name} {site.name}: {uncached} of {len(grid)} batches not cached (cache budget "
                    "shared with the values kept for later sites); its noisy time includes their prefix runs")
            strategy = ev.strategy
            suffix_model = strategy.graph  # the clean suffix (FedSuffix: passes.suffix(...).model)
            sessions = {"suffix": ort_session(suffix_model), "suffix_wa": runtime.session(suffix_model, "suffix"),
                        "full": full}
            packs, full_packs, rows = [], [], 0
            names = list(strategy.reads)
            for kb, _part in grid:
                values = ev._grid_values(kb)
                _, feeds = worker.feeds(kb)
                # the worker's own packing of σ levels into one run
                group = ev._group(values, lambda kb=kb, values=values, ev=ev: ev._device(kb, True, values), k)
                for g0 in range(0, k, group):
                    g = min(group, k - g0)
                    packs.append({n: np.concatenate([values[n]] * g) for n in names})
                    full_packs.append({n: np.concatenate([v] * g) for n, v in feeds.items()})
                    rows += g * len(values[site.name])
            inputs = {"suffix": packs, "suffix_wa": packs, "full": full_packs}
            for kind, sess in sessions.items():
                sess.run([out], inputs[kind][0])
            times = {kind: [] for kind in kinds}
            for rep in range(sizes.clean_runs):
                for kind in kinds[rep % 4:] + kinds[: rep % 4]:
                    t = time.perf_counter()
                    if kind == "noisy":
                        worker.evaluate(unit)
                    else:
                        for feeds in inputs[kind]:
                            sessions[kind].run([out], feeds)
                    times[kind].append(time.perf_counter() - t)
            # one more noisy pass, instrumented, to say where the time goes
            draw, run_t = Timer(source.rows), Timer(strategy.run)  # run: applying the noise and the suffix run
            source.rows, strategy.run = draw, run_t
            t = time.perf_counter()
            try:
                worker.evaluate(unit)
            finally:
                del source.rows, strategy.run
            total = time.perf_counter() - t
            # ε is drawn in the background while the previous run goes on: "draw" overlaps the others and is not
            # part of the sum; "rest" is waiting for ε plus argmax and counting
            split = {"apply+run": run_t.seconds, "rest": total - run_t.seconds, "draw (background)": draw.seconds}
            med = {kind: median(v) for kind, v in times.items()}
            row = {"site": site.name, "rows": rows, "uncached_batches": uncached, "runs_per_pass": len(packs),
                   "seconds": med,
                   "ratio": median(n / c for n, c in zip(times["noisy"], times["suffix"])),
                   "ratio_same_options": median(n / c for n, c in zip(times["noisy"], times["suffix_wa"])),
                   "full_over_suffix": median(f / c for f, c in zip(times["full"], times["suffix"])),
                   "split": {kk: v / total for kk, v in split.items()}}
            per_site.append(row)
            log(f"  clean {bench.name} {site.name}: noisy {med['noisy'] * 1e3:.0f} ms; clean suffix "
                f"{med['suffix'] * 1e3:.0f} ms ({row['ratio']:.2f}x), with walkaudit's session options "
                f"{med['suffix_wa'] * 1e3:.0f} ms ({row['ratio_same_options']:.2f}x); whole model "
                f"{med['full'] * 1e3:.0f} ms  (noisy: " +
                ", ".join(f"{kk} {v / total:.0%}" for kk, v in split.items()) + ")")
    finally:
        source.close()

    def total(kind):
        return sum(r["seconds"][kind] for r in per_site)

    return {"model": bench.name, "samples": len(bench.x), "levels": k, "sites": per_site,
            "ratio_total": total("noisy") / total("suffix"),
            "ratio_same_options": total("noisy") / total("suffix_wa"),
            "options_cost": total("suffix_wa") / total("suffix"),
            "noisy_over_full": total("noisy") / total("full"),
            "full_over_suffix": total("full") / total("suffix"),
            "ratio_median": median(r["ratio"] for r in per_site),
            "ratio_max": max(r["ratio"] for r in per_site),
            "seconds": {kind: total(kind) for kind in kinds}}


# -- adaptive: default search vs a fixed fine grid over the same range -------------------------------------------
def bench_adaptive(bench: models.Bench, sizes: Sizes, samples: int) -> dict:
    loaded = load_model(str(bench.onnx_path))
    names = [s.name for s in select(loaded.proto, loaded.types, Selection())]
    x = bench.x[:samples]
    y = None if bench.y is None else bench.y[:samples]
    rows = []
    for name in names:
        common = {"repeats": sizes.adaptive_repeats, "threads": THREADS, "provider": "cpu",
                  "selection": Selection(names=(name,))}
        t = time.perf_counter()
        ad = walkaudit.audit(str(bench.onnx_path), x, y, **common)
        t_ad = time.perf_counter() - t
        sig = np.array([p.sigma for p in ad.sites[0].points])
        lo, hi = np.log10(sig.min()), np.log10(sig.max())
        grid = np.logspace(lo, hi, round(float(hi - lo) * 8) + 1)  # 8 points a decade
        t = time.perf_counter()
        fine = walkaudit.audit(str(bench.onnx_path), x, y, sigmas=tuple(grid), **common)
        t_fine = time.perf_counter() - t
        a, f = ad.sites[0], fine.sites[0]
        if a.censored is None and f.censored is None and a.midpoint and f.midpoint:
            gap, agree = abs(np.log10(a.midpoint) - np.log10(f.midpoint)), None
        else:
            gap, agree = None, a.censored == f.censored
        rows.append({"site": name, "adaptive_points": len(sig), "fine_points": len(grid),
                     "decades": [float(lo), float(hi)], "adaptive_midpoint": a.midpoint, "fine_midpoint": f.midpoint,
                     "adaptive_censored": a.censored, "fine_censored": f.censored,
                     "adaptive_method": a.fit.method, "fine_method": f.fit.method,
                     "gap_decades": gap, "censoring_agrees": agree,
                     "evaluations": [ad.runtime["evaluations"], fine.runtime["evaluations"]],
                     "seconds": [t_ad, t_fine]})
        log(f"  adaptive {bench.name} {name}: {len(sig)} vs {len(grid)} points over 10^[{lo:.2f}, {hi:.2f}]; "
            f"midpoint {a.midpoint!s:.6} ({a.censored}) vs {f.midpoint!s:.6} ({f.censored})" +
            (f", gap {gap:.3f} decades" if gap is not None else ""))
    ev_a = sum(r["evaluations"][0] for r in rows)
    ev_f = sum(r["evaluations"][1] for r in rows)
    gaps = [r["gap_decades"] for r in rows if r["gap_decades"] is not None]
    return {"model": bench.name, "samples": len(x), "repeats": sizes.adaptive_repeats, "sites": rows,
            "evaluation_share": ev_a / ev_f, "time_share": sum(r["seconds"][0] for r in rows) /
            sum(r["seconds"][1] for r in rows),
            "max_gap": max(gaps) if gaps else None, "median_gap": median(gaps) if gaps else None,
            "within_0.05": sum(g <= 0.05 for g in gaps), "compared": len(gaps),
            "censored_pairs": sum(r["gap_decades"] is None for r in rows),
            "censoring_disagreements": sum(r["censoring_agrees"] is False for r in rows)}


# -- memory: peak RSS at two data sizes, each audit in its own process ---------------------------------------------
def bench_memory(folder: Path, sizes: Sizes, bench_path: Path) -> dict:
    loaded = load_model(str(bench_path))
    names = [s.name for s in select(loaded.proto, loaded.types, Selection())]
    chosen = [names[0], names[-1]]  # the largest activation (the stem's output) and the logits
    rows = []
    for n in sizes.memory_sizes:
        x, _ = models.synthetic_images(n, seed=3)
        path = folder / f"memory_{n}.npy"
        np.save(path, x)
        del x
        proc = subprocess.run([sys.executable, str(HERE / "memory_probe.py"), str(bench_path), str(path), *chosen],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"memory probe failed:\n{proc.stderr[-2000:]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["overhead_mib"] = row["peak_mib"] - row["rss_before_mib"]
        rows.append(row)
        path.unlink()
        log(f"  memory {n} samples: data {row['data_mib']:.0f} MiB, RSS before {row['rss_before_mib']:.0f} MiB, "
            f"peak (VmHWM) {row['peak_mib']:.0f} MiB, audit overhead {row['overhead_mib']:.0f} MiB "
            f"(ru_maxrss {row['ru_maxrss_mib']:.0f} MiB, inherited from this parent); {row['seconds']:.0f}s")
    return {"model": "ResNet-8", "sites": chosen, "rows": rows,
            "overhead_ratio": rows[-1]["overhead_mib"] / rows[0]["overhead_mib"],
            "data_ratio": rows[-1]["samples"] / rows[0]["samples"],
            "cache_bytes_mib": worker_mod.CACHE_BYTES / 2**20}


# -- table ---------------------------------------------------------------------------------------------------------
def machine() -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": ort.__version__, "numpy": np.__version__, "walkaudit": walkaudit.__version__,
            "load_average_start": os.getloadavg()}


def table(results: dict) -> str:
    lines = []

    def row(figure, model, target, value, detail, ok):
        lines.append(f"| {figure} | {model} | {target} | {value} | {detail} | {ok} |")

    lines.append("| figure | model | target | measured (median) | detail | met |")
    lines.append("|---|---|---|---|---|---|")
    for w in results.get("walk", []):
        runs = [r["torch_ratio"] for r in w["runs"]]
        row("walk: torch hooks / walkaudit", w["model"], "≥ 4x", f"{w['torch_ratio']:.2f}x",
            f"{w['sites']} sites × {w['levels']} σ × {w['repeats']} rep, {w['samples']} samples; runs "
            f"{min(runs):.2f}–{max(runs):.2f}x; {w['seconds']['torch']:.1f}s vs {w['seconds']['walkaudit']:.1f}s",
            "yes" if w["torch_ratio"] >= 4 else "NO")
        if w.get("graph_ratio"):
            graph = [r["graph_ratio"] for r in w["runs"] if "graph_ratio" in r]
            row("walk: torch hooks / walkaudit noise_source=graph", w["model"], "(option)",
                f"{w['graph_ratio']:.2f}x",
                f"runs {min(graph):.2f}–{max(graph):.2f}x; {w['seconds']['walkaudit-graph']:.1f}s", "")
        if w.get("exact_ratio"):
            exact = [r["exact_ratio"] for r in w["runs"] if "exact_ratio" in r]
            row("walk: torch hooks / walkaudit exact=True", w["model"], "(option)",
                f"{w['exact_ratio']:.2f}x", f"runs {min(exact):.2f}–{max(exact):.2f}x; "
                f"{w['seconds']['walkaudit-exact']:.1f}s (σ = 0 bit-identical mode: NCHWc off)", "")
        naive = [r["naive_ratio"] for r in w["runs"] if "naive_ratio" in r]
        row("walk: naive ORT loop / walkaudit", w["model"], "(reference)", f"{w['naive_ratio']:.2f}x",
            f"runs {min(naive):.2f}–{max(naive):.2f}x; {w['seconds']['naive']:.1f}s", "")
    for g in results.get("global", []):
        runs = [r["torch_ratio"] for r in g["runs"]]
        row("global mode: torch hooks / walkaudit", g["model"], "(reference)", f"{g['torch_ratio']:.2f}x",
            f"every site noisy at once, {g['levels']} σ × {g['repeats']} rep, {g['samples']} samples; runs "
            f"{min(runs):.2f}–{max(runs):.2f}x; {g['seconds']['torch']:.2f}s vs {g['seconds']['walkaudit']:.2f}s; "
            f"mean |Δacc| {g['acc_gap_torch']:.3f}", "")
    for c in results.get("clean", []):
        worst = max(c["sites"], key=lambda s: s["ratio"])
        row("noisy eval / clean suffix (plain onnxruntime session)", c["model"], "≤ 1.3x",
            f"{c['ratio_total']:.2f}x (all sites)",
            f"per site median {c['ratio_median']:.2f}x, worst {worst['ratio']:.2f}x ({worst['site']}); "
            f"K={c['levels']}, {c['samples']} samples", "yes" if c["ratio_total"] <= 1.3 else "NO")
        row("noisy eval / clean suffix (walkaudit's session options)", c["model"], "(noise cost alone)",
            f"{c['ratio_same_options']:.2f}x", f"walkaudit's options alone cost {c['options_cost']:.2f}x on the "
            "clean suffix", "")
        row("clean whole model / clean suffix (same rows)", c["model"], "(prefix reuse)",
            f"{c['full_over_suffix']:.2f}x", f"noisy suffix / clean whole model {c['noisy_over_full']:.2f}x", "")
    for a in results.get("adaptive", []):
        ok = (a["evaluation_share"] <= 0.4 and (a["max_gap"] is None or a["max_gap"] <= 0.05)
              and a["censoring_disagreements"] == 0)
        gap = "n/a" if a["max_gap"] is None else f"{a['max_gap']:.3f}"
        row("adaptive: evaluations vs 8/decade grid", a["model"], "≤ 40 %", f"{a['evaluation_share']:.0%}",
            f"time {a['time_share']:.0%}; {a['samples']} samples × {a['repeats']} rep", "")
        row("adaptive: |Δ midpoint| (decades)", a["model"], "≤ 0.05", f"max {gap}",
            f"median {a['median_gap'] if a['median_gap'] is None else round(a['median_gap'], 3)}; "
            f"{a['within_0.05']}/{a['compared']} within 0.05; {a['censored_pairs']} censored, "
            f"{a['censoring_disagreements']} censoring disagreements", "yes" if ok else "NO")
    m = results.get("memory")
    if m:
        rs = m["rows"]
        row("memory: audit overhead (peak − before)", m["model"], "bounded, not ∝ data",
            " → ".join(f"{r['overhead_mib']:.0f}" for r in rs) + " MiB",
            " → ".join(f"{r['samples'] // 1000}k" for r in rs) + " samples (data " +
            " → ".join(f"{r['data_mib']:.0f}" for r in rs) + " MiB); peak RSS (VmHWM) " +
            " → ".join(f"{r['peak_mib']:.0f}" for r in rs) + f" MiB; clean-value cache cap "
            f"{m['cache_bytes_mib']:.0f} MiB", "")
    return "\n".join(lines)


def cached_bench(folder: Path, name: str, make) -> models.Bench:
    """A network built once into `folder` (--models) and loaded from there afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.bench.pt"
    if path.exists() and models.Bench.__dataclass_fields__.keys() == vars(bench := torch.load(
            path, weights_only=False)).keys() and Path(bench.onnx_path).exists():
        return bench
    bench = make()
    torch.save(bench, path)
    return bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, one run: a smoke test")
    parser.add_argument("--only", default="walk,global,clean,adaptive,memory", help="comma-separated figures to run")
    parser.add_argument("--runs", type=int, help="runs per walk figure (median over them)")
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    parser.add_argument("--graph", action="store_true", help='also time walkaudit with noise_source="graph"')
    parser.add_argument("--models", type=Path, help="keep the built networks here and reuse them on the next run "
                        "(built at the full sizes; --quick slices them)")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    sizes.graph = args.graph
    if args.runs:
        sizes.runs = sizes.extra_runs = args.runs
    only = set(args.only.split(","))
    torch.set_num_threads(THREADS)
    torch.set_num_interop_threads(1)
    started = time.perf_counter()
    results = {"machine": machine(), "quick": args.quick, "sizes": sizes.__dict__}
    log(f"machine: {results['machine']}")
    with tempfile.TemporaryDirectory(prefix="walkaudit-bench-") as tmp:
        folder = Path(tmp)
        t = time.perf_counter()
        samples = max(sizes.lenet_samples, sizes.adaptive_samples)
        resnet_samples = max(sizes.resnet_samples, sizes.adaptive_resnet_samples)
        if args.models:
            samples = resnet_samples = max(FULL.lenet_samples, FULL.adaptive_samples, FULL.resnet_samples)
            lenet = cached_bench(args.models, "lenet5", lambda: models.lenet5(args.models, samples))
            resnet = cached_bench(args.models, "resnet8", lambda: models.resnet8(args.models, resnet_samples))
        else:
            lenet = models.lenet5(folder, samples)
            resnet = models.resnet8(folder, resnet_samples)
        for b in (lenet, resnet):
            log(f"built {b.name}: training accuracy {b.train_accuracy:.3f}, "
                f"max |torch − onnxruntime| logits {models.check_same(b):.1e}")
        log(f"models built in {time.perf_counter() - t:.0f}s")

        def sized(b, n):
            return models.Bench(b.name, b.torch_model, b.onnx_path, b.x[:n], None if b.y is None else b.y[:n],
                                b.sites)

        walk_set = [(sized(lenet, sizes.lenet_samples), sizes.lenet_repeats),
                    (sized(resnet, sizes.resnet_samples), sizes.resnet_repeats)]
        if "walk" in only:
            results["walk"] = [bench_walk(b, sizes, r) for b, r in walk_set]
        if "global" in only:
            results["global"] = [bench_global(b, sizes, r) for b, r in walk_set]
        if "clean" in only:
            results["clean"] = [bench_clean(b, sizes) for b, _ in walk_set]
        if "adaptive" in only:
            results["adaptive"] = []
            for b in (lenet, resnet):
                if b.name in sizes.adaptive_models:
                    n = sizes.adaptive_samples if b is lenet else sizes.adaptive_resnet_samples
                    results["adaptive"].append(bench_adaptive(b, sizes, n))
        if "memory" in only:
            results["memory"] = bench_memory(folder, sizes, Path(resnet.onnx_path))
    results["seconds"] = time.perf_counter() - started
    results["machine"]["load_average_end"] = os.getloadavg()
    print(table(results))
    print(f"\n{'quick' if args.quick else 'full'} run, {results['seconds']:.0f}s; load average at start "
          f"{results['machine']['load_average_start'][0]:.1f}, at end {results['machine']['load_average_end'][0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
