"""audit(model, data, config) -> Report: the orchestration, nothing else."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from walkaudit import __version__
from walkaudit._analysis import fit, sweep
from walkaudit._analysis.sweep import Counts
from walkaudit._execution.engine import Engine
from walkaudit._execution.runtime import Runtime
from walkaudit._graph.sites import Selection, select, weight_stats
from walkaudit._loading import data as data_mod
from walkaudit._loading.model import load_model
from walkaudit._noise import Noise, NormalSource
from walkaudit.errors import UsageError
from walkaudit.report.model import Point, Report, SiteResult


@dataclass(frozen=True)
class AuditConfig:
    noise: str = "additive"
    ratio: float = 0.5
    mode: str = "walk"  # "walk": one site at a time; "global": every site at once
    sigmas: tuple[float, ...] | None = None  # None: adaptive search
    repeats: int = 3
    seed: int = 0
    batch_size: int | None = None  # None: 256 on the CPU, sized to the device's free memory on CUDA
    provider: str = "auto"
    chance: float | None = None
    output: str | None = None
    selection: Selection = field(default_factory=Selection)
    limit: int | None = None
    x_key: str | None = None
    y_key: str | None = None
    allow_nonfinite: bool = False
    threads: int | None = None
    noise_source: str = "auto"  # "host": numpy draws fed in; "graph": RandomNormalLike in the graph; auto: per provider
    exact: bool = False  # σ = 0 bit-identical to the model in every session (slower conv nets on the CPU)

    def check(self) -> AuditConfig:
        if self.mode not in ("walk", "global"):
            raise UsageError(f"mode must be walk or global, got {self.mode!r}")
        if self.repeats < 1:
            raise UsageError(f"--repeats must be at least 1, got {self.repeats}")
        if self.batch_size is not None and self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.chance is not None and not 0.0 <= self.chance < 1.0:
            raise UsageError(f"--chance must be in [0, 1), got {self.chance}")
        if self.sigmas is not None:
            sweep.check_sigmas(self.sigmas)
        if self.noise_source not in ("auto", "host", "graph"):
            raise UsageError(f"--noise-source must be auto, host or graph, got {self.noise_source!r}")
        Noise(self.noise, self.ratio)
        return self


class Progress(Protocol):
    """What the core tells a progress display; the CLI implements it with rich."""

    def grow(self, amount: int) -> None: ...  # more work is planned (sample forward passes)
    def advance(self, amount: int) -> None: ...  # work done
    def describe(self, text: str) -> None: ...


class _NoProgress:
    def grow(self, amount: int) -> None:
        pass

    def advance(self, amount: int) -> None:
        pass

    def describe(self, text: str) -> None:
        pass


def audit(model, x=None, y=None, *, data: str | None = None, config: AuditConfig | None = None,
          progress: Progress | None = None, **options) -> Report:
    """Audit a classifier: per site, accuracy under noise and the midpoint noise level σ50.

    model: a path or an onnx.ModelProto. Data: numpy arrays `x` (a dict by input name for multi-input models) and
    optional class ids or one-hot `y`, or `data=` a .npz/.npy path. Options override fields of AuditConfig.
    """
    config = dataclasses.replace(config or AuditConfig(), **options).check()
    progress = progress or _NoProgress()
    started = time.perf_counter()
    loaded = load_model(model, config.output)
    out = loaded.class_output
    num_classes = out.num_classes if out.kind == "scores" else None
    if data is not None:
        dataset = data_mod.load(data, loaded.inputs, x_key=config.x_key, y_key=config.y_key, limit=config.limit,
                                num_classes=num_classes, allow_nonfinite=config.allow_nonfinite)
    elif x is not None:
        dataset = data_mod.from_arrays(x, y, loaded.inputs, limit=config.limit, num_classes=num_classes,
                                       allow_nonfinite=config.allow_nonfinite)
    else:
        raise UsageError("no data: pass arrays (x, y) or a data file")
    sites = select(loaded.proto, loaded.types, config.selection, out.name)
    noise = Noise(config.noise, config.ratio)
    runtime = Runtime(config.provider, config.threads, config.exact)
    source = NormalSource(config.seed, config.threads)
    engine = Engine(loaded, runtime, noise, source, sites, config.batch_size, config.noise_source)

    progress.describe("clean pass")
    progress.grow(dataset.samples)
    clean = engine.clean_pass(dataset, dataset.labels, progress.advance, keep=config.mode == "walk")
    classes = clean.num_classes or _count_classes(clean, dataset.labels)
    chance = config.chance if config.chance is not None else 1.0 / max(classes, 1)
    half = fit.halfway(clean.accuracy, chance)

    results, partial = [], False
    units = [None] if config.mode == "global" else sites
    try:
        for site in units:
            results.append(_audit_unit(engine, site, sites, dataset, clean, config, noise, half, chance, loaded,
                                       progress))
    except KeyboardInterrupt:
        partial = True
    finally:
        source.close()

    return Report(
        tool={"name": "walkaudit", "version": __version__},
        model={"path": loaded.path, "sha256": loaded.sha256, "opset": loaded.opset, "producer": loaded.producer,
               "class_output": out.name, "output_kind": out.kind, "batch_size": loaded.batch_size},
        data={"path": dataset.path, "sha256": dataset.sha256, "samples": dataset.samples,
              "labels": "given" if dataset.labels is not None else "clean-predictions"},
        config={"noise": config.noise, "ratio": config.ratio if config.noise == "combined" else None,
                "mode": config.mode, "sigmas": list(config.sigmas) if config.sigmas else None,
                "search": "fixed" if config.sigmas else "adaptive", "repeats": config.repeats, "seed": config.seed,
                "batch_size": engine.batch_size, "provider_requested": config.provider,
                "chance": config.chance, "limit": config.limit, "noise_source": config.noise_source,
                "exact": config.exact,
                "sites": {"ops": list(config.selection.ops), "include": config.selection.include,
                          "exclude": config.selection.exclude, "names": list(config.selection.names)}},
        runtime={"provider": runtime.provider, "onnxruntime_version": runtime.version,
                 "elapsed_s": round(time.perf_counter() - started, 3), "evaluations": engine.evaluations,
                 "noise_source": "graph" if config.mode == "walk" and engine.uses_graph_noise() else "host",
                 "notes": runtime.notes + engine.notes},
        clean_accuracy=clean.accuracy, chance=chance, num_classes=classes, sites=results, partial=partial,
    )


def _count_classes(clean, labels) -> int:
    values = clean.predictions if labels is None else np.concatenate([labels, clean.predictions])
    return int(len(np.unique(values[values >= 0])))


def _audit_unit(engine: Engine, site, sites, dataset, clean, config: AuditConfig, noise: Noise, half: float,
                chance: float, loaded, progress: Progress) -> SiteResult:
    """Sweep and fit one site (or, with site None, every site at once)."""
    if site is None:
        evaluator = engine.global_()
        stds = [clean.activation_std[s.name] for s in sites]
        scale = float(np.median(stds)) if stds else 1.0
        progress.describe("global")
    else:
        evaluator = engine.walk(site)
        scale = clean.activation_std[site.name]
        progress.describe(site.name)
    if noise.kind == "multiplicative":
        scale = 1.0

    n_batches = engine.n_batches(dataset)

    def evaluate(sigmas, batches: range):
        rows = min(batches.stop * engine.batch_size, dataset.samples) - batches.start * engine.batch_size
        progress.grow(len(sigmas) * config.repeats * rows)
        counts: Counts = evaluator.evaluate(dataset, clean.targets, sigmas, config.repeats, progress.advance,
                                            batches)
        return counts.correct, counts.nonfinite, counts.samples

    if config.sigmas:
        curve = sweep.fixed(evaluate, config.sigmas, n_batches)
    else:
        curve = sweep.adaptive(evaluate, half, sweep.default_plan(noise.kind), scale, n_batches, clean.accuracy)
    sig, levels = curve.sorted()
    acc = np.stack([lv.accuracy for lv in levels])
    mid = fit.midpoint(sig, acc, clean=clean.accuracy, chance=chance,
                       samples=int(np.median([lv.samples for lv in levels])))
    points = [Point(float(s), float(lv.accuracy.mean()), float(lv.accuracy.std()), len(lv.correct), lv.samples,
                    int(lv.nonfinite.sum())) for s, lv in zip(sig, levels)]
    bad = sum(p.nonfinite for p in points)
    if bad:
        engine.notes.append(f"{site.name if site else 'global'}: {bad} noisy passes gave NaN/Inf class scores; "
                            "counted as misclassified")
    std = None if site is None else clean.activation_std[site.name]
    value = mid.value if mid.value is not None and np.isfinite(mid.value) else None
    if noise.kind == "multiplicative":  # σ already scales the signal: it is its own relative value
        relative = value
    else:
        relative = value / std if value is not None and std else None
    common = dict(points=points, midpoint=value, midpoint_relative=relative,
                  ci95=list(mid.ci95) if mid.ci95 else None, censored=mid.censored, fit=_fit_entry(mid))
    if site is None:
        return SiteResult(None, "global", None, "global", None, None, None, **common)
    shape = site.shape if site.shape is not None else ("N", *clean.shapes[site.name][1:])
    return SiteResult(site.index, site.name, site.node, site.op_type, list(shape), std,
                      weight_stats(loaded.proto, site), **common)


def _fit_entry(mid: fit.Midpoint) -> dict:
    """The report's `fit` object: how σ50 was found (its value, interval and censoring are site keys)."""
    return {k: v for k, v in mid.to_dict().items() if k not in ("value", "ci95", "censored")}

