#!/usr/bin/env python3
"""The regression check: the same walks with this tree and with the base commit, in alternating subprocesses.

    python benchmarks/compare_base.py                       # 7 runs a side, base tree /tmp/base (commit ab1eda2)
    python benchmarks/compare_base.py --runs 5 --base /path/to/checkout --json out.json
    python benchmarks/compare_base.py --profile             # also one cProfile of each walk on both trees
    python benchmarks/compare_base.py --patch NAME          # a third side: this tree with a monkeypatch (below)

The walks are run.py's walk figure (LeNet-5: 1000 samples, 3 repeats; ResNet-8: 1000 samples, 1 repeat; 8 σ levels
from 10^-0.5 to 10^1.5, additive, 2 threads, CPU) and the same audits in global mode. The models and data are built
once (torch) and written to a folder; every run is a fresh interpreter that imports walkaudit from one tree only
(PYTHONPATH, checked through `walkaudit.__file__`), makes one untimed warm-up audit, then times each audit with
`walkaudit.audit` as a user calls it (loading, sites, clean pass, sessions, walk, fit, the report). The sides
alternate (new, old, old, new, ...) so that the machine's drift falls on both.

Printed per audit: the median seconds of each side, the ratio of the medians new/old, and the spread: the ratio of
each run with its neighbour of the other side (min–max), and each side's own run-to-run range (max/min). Process CPU
seconds are given too: on a shared machine they move less than wall time.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
THREADS = 2
SIGMAS = (-0.5, 1.5, 8)  # log10 range and levels: run.py's walk figure
AUDITS = [  # (label, model file, repeats, mode)
    ("LeNet-5 walk", "lenet5", 3, "walk"),
    ("ResNet-8 walk", "resnet8", 1, "walk"),
    ("LeNet-5 global", "lenet5", 3, "global"),
    ("ResNet-8 global", "resnet8", 1, "global"),
]


# -- monkeypatches to try on the new tree (--patch NAME); each returns nothing and edits walkaudit in place ---------
def _patch_inexact_clean():
    """The clean model and the prefixes without exact=True (NCHWc on, as at the base commit)."""
    from walkaudit._execution import runtime

    old = runtime.Runtime.session

    def session(self, model, what="model", exact=False):
        return old(self, model, what, exact=False)

    runtime.Runtime.session = session


def _patch_no_validation():
    """The report typed without its JSON Schema validation (what the base commit did not have)."""
    from walkaudit.report import model

    model._check_document = lambda *args, **kwargs: None


PATCHES = {"inexact-clean": _patch_inexact_clean, "no-validation": _patch_no_validation}


def _apply(names: list[str]) -> None:
    for name in names:
        PATCHES[name]()


# -- one side's run, in its own interpreter ------------------------------------------------------------------------
def child(folder: Path, profile: str | None, patches: list[str], only: list[str] | None) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
    import numpy as np

    import walkaudit

    _apply(patches)
    sigmas = tuple(float(s) for s in np.logspace(*SIGMAS[:2], SIGMAS[2]))
    data = {name: (np.load(folder / f"{name}_x.npy"),
                   np.load(folder / f"{name}_y.npy") if (folder / f"{name}_y.npy").exists() else None)
            for name in ("lenet5", "resnet8")}

    def audit(name, repeats, mode, n=None):
        x, y = data[name]
        return walkaudit.audit(str(folder / f"{name}.onnx"), x[:n], None if y is None else y[:n],
                               sigmas=sigmas[:n and 2], repeats=repeats, threads=THREADS, provider="cpu",
                               noise="additive", mode=mode)

    audit("lenet5", 1, "walk", 256)  # untimed warm-up (first calls allocate and plan)
    audit("resnet8", 1, "walk", 256)
    out = {"walkaudit": walkaudit.__file__, "seconds": {}, "cpu": {}, "evaluations": {}}
    for label, name, repeats, mode in AUDITS:
        if only and label not in only:
            continue
        prof = cProfile.Profile() if profile else None
        c0, t0 = os.times(), time.perf_counter()
        if prof:
            prof.enable()
        report = audit(name, repeats, mode)
        if prof:
            prof.disable()
            prof.dump_stats(f"{profile}.{label.replace(' ', '_')}.pstats")
        t1, c1 = time.perf_counter(), os.times()
        out["seconds"][label] = t1 - t0
        out["cpu"][label] = (c1.user + c1.system) - (c0.user + c0.system)
        out["evaluations"][label] = report.runtime["evaluations"]
    print(json.dumps(out))


def run_side(tree: Path, folder: Path, profile: str | None = None, patches=(), only=None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(THREADS)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(folder)]
    if profile:
        cmd += ["--profile-to", profile]
    for p in patches:
        cmd += ["--patch", p]
    if only:
        cmd += ["--only", ",".join(only)]
    for attempt in range(3):  # a tree that others edit can be caught half-way through a change: try again
        proc = subprocess.run(cmd, env=env, cwd=str(tree), capture_output=True, text=True, check=False)
        if proc.returncode == 0:
            break
        print(f"run in {tree} failed (attempt {attempt + 1}):\n{proc.stderr[-1500:]}", file=sys.stderr)
        time.sleep(30)
    else:
        raise SystemExit(f"run in {tree} failed three times")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    if not Path(row["walkaudit"]).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"the run meant for {tree} imported walkaudit from {row['walkaudit']}")
    return row


# -- the parent: build once, alternate, summarise -------------------------------------------------------------------
def build(folder: Path) -> None:
    import numpy as np
    import torch

    sys.path.insert(0, str(HERE))
    import models

    torch.set_num_threads(THREADS)
    lenet = models.lenet5(folder, 1000)
    resnet = models.resnet8(folder, 1000)
    for name, bench in (("lenet5", lenet), ("resnet8", resnet)):
        np.save(folder / f"{name}_x.npy", bench.x)
        if bench.y is not None:
            np.save(folder / f"{name}_y.npy", bench.y)


def summary(rows: dict[str, list[dict]], key: str) -> dict:
    """Per audit: medians per side, ratio of medians, pairwise ratio range, each side's own range."""
    sides = list(rows)
    new, others = sides[0], sides[1:]
    result = {}
    for label, *_ in AUDITS:
        if label not in rows[new][0][key]:
            continue
        entry = {}
        for side in sides:
            values = [r[key][label] for r in rows[side]]
            entry[side] = {"median": statistics.median(values), "min": min(values), "max": max(values),
                           "spread": max(values) / min(values)}
        for other in others:
            pairs = [a[key][label] / b[key][label] for a, b in zip(rows[new], rows[other])]
            entry[f"{new}/{other}"] = {"ratio": entry[new]["median"] / entry[other]["median"],
                                       "pair_median": statistics.median(pairs), "pair_min": min(pairs),
                                       "pair_max": max(pairs)}
        result[label] = entry
    return result


def print_summary(result: dict, sides: list[str], key: str) -> None:
    new = sides[0]
    print(f"\n{key} (median over runs; pairs: each run / its neighbour of the other side; range: max/min of a side)")
    head = "| audit | " + " | ".join(f"{s} median (range)" for s in sides) + " | " + \
        " | ".join(f"{new}/{o} (pairs min–max)" for o in sides[1:]) + " |"
    print(head)
    print("|" + "---|" * (1 + len(sides) + len(sides) - 1))
    for label, e in result.items():
        cells = [f"{e[s]['median']:.3f} s ({e[s]['min']:.3f}–{e[s]['max']:.3f}, ×{e[s]['spread']:.2f})"
                 for s in sides]
        cells += [f"{e[f'{new}/{o}']['ratio']:.3f} ({e[f'{new}/{o}']['pair_min']:.2f}–"
                  f"{e[f'{new}/{o}']['pair_max']:.2f})" for o in sides[1:]]
        print(f"| {label} | " + " | ".join(cells) + " |")


def top_functions(path: str, n: int = 25) -> list[str]:
    stats = pstats.Stats(path)
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:n]  # by own (exclusive) time
    out = []
    for (file, line, fn), (_cc, nc, tt, ct, _) in rows:
        short = "/".join(Path(file).parts[-2:]) if file != "~" else ""
        out.append(f"    {tt:7.3f} s own  {ct:7.3f} s cum  {nc:6d} calls  {short}:{line} {fn}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=Path("/tmp/base"), help="checkout of the base commit")
    parser.add_argument("--runs", type=int, default=7, help="runs per side (≥ 5)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--profile", action="store_true", help="then one cProfiled run per side")
    parser.add_argument("--patch", action="append", default=[], choices=sorted(PATCHES),
                        help="also a side with this tree monkeypatched (repeatable: all patches together)")
    parser.add_argument("--only", help="comma-separated audit labels (default: all)")
    parser.add_argument("--models", type=Path, help="reuse models and data written by an earlier run here")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--profile-to", help=argparse.SUPPRESS)
    args = parser.parse_args()
    only = args.only.split(",") if args.only else None
    if args.child:
        child(args.child, args.profile_to, args.patch, only)
        return
    base = args.base.resolve()
    if not (base / "walkaudit" / "__init__.py").exists():
        raise SystemExit(f"no walkaudit checkout at {base}")
    commit = subprocess.run(["git", "-C", str(base), "rev-parse", "--short", "HEAD"], check=False, capture_output=True,
                            text=True).stdout.strip() or "?"
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], check=False, capture_output=True,
                          text=True).stdout.strip() or "?"
    folder = args.models or Path(tempfile.mkdtemp(prefix="walkaudit-compare-"))
    if not (folder / "resnet8.onnx").exists():
        t = time.perf_counter()
        build(folder)
        print(f"models built in {time.perf_counter() - t:.0f}s in {folder}", file=sys.stderr)
    sides = {"new": (ROOT, []), "old": (base, [])}
    if args.patch:
        sides["patched"] = (ROOT, args.patch)
    names = list(sides)
    rows: dict[str, list[dict]] = {s: [] for s in names}
    load = [os.getloadavg()[0]]
    started = time.perf_counter()
    for i in range(args.runs):
        order = names if i % 2 == 0 else names[::-1]
        for side in order:
            tree, patches = sides[side]
            row = run_side(tree, folder, patches=patches, only=only)
            rows[side].append(row)
            print(f"run {i + 1} {side}: " + ", ".join(f"{k} {v:.3f}s" for k, v in row["seconds"].items()) +
                  f"  (load {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
        load.append(os.getloadavg()[0])
    print(f"this tree: HEAD {head} + working tree ({ROOT}); base: {commit} ({base}); {args.runs} runs a side, "
          f"alternating; {time.perf_counter() - started:.0f}s; load average {min(load):.2f}–{max(load):.2f}")
    result = {"wall": summary(rows, "seconds"), "cpu": summary(rows, "cpu")}
    print_summary(result["wall"], names, "seconds")
    print_summary(result["cpu"], names, "cpu")
    evals = {s: rows[s][0]["evaluations"] for s in names}
    if len({json.dumps(v, sort_keys=True) for v in evals.values()}) != 1:
        print(f"\nnote: evaluations differ between sides: {evals}")
    if args.profile:
        prof_dir = Path(tempfile.mkdtemp(prefix="walkaudit-profile-"))
        for side in names:
            tree, patches = sides[side]
            prefix = str(prof_dir / side)
            run_side(tree, folder, profile=prefix, patches=patches, only=only)
            for label, *_ in AUDITS:
                path = f"{prefix}.{label.replace(' ', '_')}.pstats"
                if Path(path).exists():
                    print(f"\ncProfile, {side}, {label} (top by own time; {path}):")
                    print("\n".join(top_functions(path)))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "summary": result, "base": commit, "head": head,
                                         "load": load}, indent=2) + "\n")


if __name__ == "__main__":
    main()
