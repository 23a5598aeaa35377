"""Peak memory of one audit, run in its own process: `python benchmarks/memory_probe.py MODEL DATA.npy SITES...`.

Prints one JSON line, in MiB: the resident set before the audit (interpreter, onnxruntime, the data array), the peak
after it as /proc/self/status VmHWM (this process's own high-water mark) and as getrusage's ru_maxrss.

ru_maxrss is not this process's alone on Linux: exec() folds the parent's high-water mark into it (the child starts as
a copy of the parent's address space), so under a parent bigger than the audit (run.py holds torch and the models,
~2 GB) it reads the parent's size. VmHWM belongs to the new address space, so it is the figure used.
"""

from __future__ import annotations

import json
import resource
import sys
import time


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    model, data, *names = sys.argv[1:]
    import numpy as np
    import onnxruntime  # noqa: F401  (loaded before the baseline, like the data)

    import walkaudit
    from walkaudit._graph.sites import Selection

    x = np.load(data)
    before = rss_mib()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    hwm_before = hwm_mib()
    started = time.perf_counter()
    report = walkaudit.audit(model, x, None, sigmas=(1.0, 4.0), repeats=1, threads=2, provider="cpu",
                             selection=Selection(names=tuple(names)))
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"samples": len(x), "data_mib": x.nbytes / 2**20, "rss_before_mib": before,
                      "hwm_before_mib": hwm_before, "peak_mib": hwm_mib(), "ru_maxrss_mib": maxrss,
                      "ru_maxrss_before_mib": peak_before, "seconds": time.perf_counter() - started,
                      "evaluations": report.runtime["evaluations"]}))


if __name__ == "__main__":
    main()
