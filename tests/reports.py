"""Builders of crafted walkaudit report dicts (schema walkaudit.report/1.1) for the gate, format, schema and plot tests.

Each builder returns a fresh dict that validates against walkaudit/report/report.schema.json; tests then change the
one thing they are about, and :func:`typed` turns it into a :class:`walkaudit.report.Report`.
"""

from __future__ import annotations

import math

from walkaudit.report.model import Report

CLEAN = 0.9
CHANCE = 0.1


def make_points(midpoint: float, *, clean: float = CLEAN, chance: float = CHANCE, width: float = 0.3,
                sigmas: list[float] | None = None) -> list[dict]:
    """Points of a logistic curve in log10 σ falling from ``clean`` to ``chance`` around ``midpoint``."""
    sigmas = sigmas or [10.0 ** (k / 2) for k in range(-6, 3)]  # 1e-3 ... 10
    points = []
    for sigma in sigmas:
        u = math.log10(sigma)
        acc = chance + (clean - chance) / (1.0 + math.exp((u - math.log10(midpoint)) / width))
        correct = round(acc * 500)
        points.append({"sigma": sigma, "accuracy": correct / 500, "accuracy_std": 0.01, "repeats": 3, "samples": 500,
                       "nonfinite": 0, "per_repeat": {"correct": [correct] * 3, "nonfinite": [0, 0, 0]}})
    return points


def make_site(name: str, midpoint: float | None, *, index: int | None = 0, censored: str | None = None,
              op_type: str = "Conv", activation_std: float | None = 1.0, ci95: list[float] | None = None,
              with_weight: bool = True) -> dict:
    """One site. Uncensored sites get a logistic fit and, unless ``ci95`` is given, a ±5% interval."""
    if censored is None and midpoint is not None:
        fit = {"method": "logistic", "ok": True,
               "params": {"hi": CLEAN, "lo": CHANCE, "m": math.log10(midpoint), "w": 0.3},
               "ci_method": "fit-covariance", "message": None}
        if ci95 is None:
            ci95 = [midpoint * 0.95, midpoint * 1.05]
        points = make_points(midpoint)
    elif censored is not None:
        fit = {"method": "censored", "ok": True, "params": {}, "ci_method": None, "message": "censored"}
        # a curve that stays high ("above") or starts low ("below") inside the grid
        points = make_points(1e3 if censored == "above" else 1e-6)
    else:
        fit = {"method": "interpolation", "ok": False, "params": {}, "ci_method": None, "message": "no data"}
        points = []
    return {
        "index": index,
        "name": name,
        "node": None if index is None else f"node_{name}",
        "op_type": op_type,
        "shape": ["N", 8, 4, 4],
        "activation_std": activation_std,
        "weight": {"mean_abs": 0.1, "l2": 2.0, "name": f"{name}.weight"} if with_weight else None,
        "points": points,
        "midpoint": midpoint,
        "midpoint_relative": None if (midpoint is None or not activation_std) else midpoint / activation_std,
        "ci95": ci95 if censored is None else None,
        "censored": censored,
        "fit": fit,
    }


def make_report(sites: list[dict] | None = None, *, clean_accuracy: float = CLEAN, chance: float = CHANCE,
                noise: str = "additive", mode: str = "walk", ratio: float | None = None,
                model_path: str = "models/net.onnx", data_sha256: str | None = "ab" * 32, samples: int = 500,
                partial: bool = False, gate: dict | None = None) -> dict:
    """A whole report; default sites: conv1 (σ50 0.1), conv2 (0.05), fc (1.0). No ``gate`` unless one is given."""
    if sites is None:
        sites = [make_site("conv1", 0.1, index=0), make_site("conv2", 0.05, index=1),
                 make_site("fc", 1.0, index=2, op_type="Gemm")]
    measured = [s for s in sites if s["midpoint"] is not None]
    weakest = min(measured, key=lambda s: s["midpoint"]) if measured else None
    report = {
        "schema": "walkaudit.report/1.1",
        "tool": {"name": "walkaudit", "version": "0.1.0"},
        "model": {"path": model_path, "sha256": "0" * 64, "opset": 17, "producer": "pytorch",
                  "class_output": "logits", "output_kind": "scores"},
        "data": {"path": "val.npz", "sha256": data_sha256, "samples": samples, "labels": "given"},
        "config": {"noise": noise, "ratio": ratio, "mode": mode, "sigmas": None, "repeats": 3, "seed": 0,
                   "batch_size": 256, "provider_requested": "auto"},
        "runtime": {"provider": "CPUExecutionProvider", "onnxruntime_version": "1.20.0", "elapsed_s": 1.5},
        "clean_accuracy": clean_accuracy,
        # the counts when clean_accuracy is a whole number of samples (a report's numbers agree with each other)
        **({"clean_counts": {"correct": round(clean_accuracy * samples), "samples": samples}}
           if round(clean_accuracy * samples) == clean_accuracy * samples else {}),
        "chance": chance,
        "num_classes": 10,
        "sites": sites,
        "summary": {"weakest_site": None if weakest is None else weakest["name"],
                    "min_midpoint": None if weakest is None else weakest["midpoint"], "sites": len(sites)},
        "partial": partial,
    }
    if gate is not None:
        report["gate"] = gate
    return report


def make_global_report(midpoint: float = 0.2) -> dict:
    """A global-mode report: one site named 'global'."""
    site = make_site("global", midpoint, index=None, op_type="global", activation_std=None, with_weight=False)
    return make_report([site], mode="global")


def make_degenerate_site(name: str, sigma_max: float = 10.0, *, index: int | None = 0) -> dict:
    """A site of a model at chance: the fit found no midpoint (censored "above" at the grid's end, ``ok`` false)."""
    site = make_site(name, sigma_max, index=index, censored="above")
    site["fit"] = {"method": "censored", "ok": False, "params": {}, "ci_method": None,
                   "message": "clean accuracy 0.1 is not above chance 0.1: no midpoint"}
    return site


def typed(report: dict) -> Report:
    """The typed, validated report of a crafted dict."""
    return Report.from_dict(report)
