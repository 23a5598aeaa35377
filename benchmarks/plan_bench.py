#!/usr/bin/env python3
"""Time of `walkaudit plan` relative to a walk (`walkaudit audit`) of the same model and data, medians of runs
alternating the two. Not a test: prints the figures.

    python benchmarks/plan_bench.py [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import walkaudit
from walkaudit.planning import plan

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
CASES = [("mnist_mlp.dynamo.onnx", 4.0), ("mnist_lenet5.dynamo.onnx", 2.0)]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    data = str(SAMPLES / "mnist_val.npz")
    print(f"{'model':28} {'walk s':>8} {'plan s':>8} {'plan/walk':>10}  (medians of {args.runs})")
    for name, sigma in CASES:
        model = SAMPLES / name
        walks, plans = [], []
        for _ in range(args.runs):
            walks.append(timed(lambda: walkaudit.audit(model, data=data, provider="cpu")))  # noqa: B023 (called at once)
            plans.append(timed(lambda: plan(model, data=data, sigma=sigma, max_drop="1%", provider="cpu")))  # noqa: B023
        w, p = statistics.median(walks), statistics.median(plans)
        print(f"{name:28} {w:8.2f} {p:8.2f} {p / w:10.2f}")


if __name__ == "__main__":
    main()
