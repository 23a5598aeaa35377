"""Where the time of one walkaudit audit goes: wraps engine and API functions with timers for the length of one call.

Exclusive times (a function's time minus the wrapped functions it calls), so the parts add up to the whole:

    sessions      creating onnxruntime sessions (serialising the rewritten models, graph optimisation)
    clean pass    the clean model over the data once: "model" is onnxruntime running it (every site exposed as
                  an output), "statistics" the numpy work on its outputs (predictions, activation std per site)
    cache fill    per site, the prefix sessions computing the values its suffix reads (site + frontier), for the
                  sites whose values the clean pass could not keep
    noise draw    NormalSource.normal: ε ~ N(0, 1), one draw per (site, batch, repeat). The engine draws the next
                  job's ε on a background thread while the current one runs; that time is reported apart
                  ("noise draw (background)") and overlaps the rest, so it is not part of the total
    noise apply   SiteEvaluator._feeds: σ·ε for every level, y + σ·ε, tiling the frontier (numpy, host; only where
                  the host computes the noisy value: models before opset 10, and global mode)
    suffix runs   onnxruntime running the noisy suffixes. Since the noise is applied in the graph (σ·ε, y + σ·ε and
                  the frontier tiling run inside onnxruntime), they include the apply: "suffix runs (noise in the
                  graph)". With noise_source="graph" the suffix also draws ε, so "noise draw" folds in too.
    fit           the curve fits
    other         the rest (argmax and counting, the API, Python)

Monkeypatching is confined to the `profiled` context manager; walkaudit's files are not touched.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict

from walkaudit import _noise as noise
from walkaudit import api
from walkaudit._analysis import fit
from walkaudit._execution import engine as engine_mod
from walkaudit._execution import runtime


class Profiler:
    """Exclusive seconds per label. Each thread keeps its own call stack; time spent in threads other than the one
    that made the profiler (the draw ahead of the noise) is kept apart, under `background`, and is not part of the
    total: it overlaps the main thread's work."""

    def __init__(self):
        self.exclusive = defaultdict(float)
        self.background = defaultdict(float)
        self._main = threading.get_ident()
        self._local = threading.local()

    def _stack(self) -> list[list]:
        if not hasattr(self._local, "stack"):
            self._local.stack = []  # [label, child seconds]
        return self._local.stack

    def wrap(self, label, fn):
        prof = self

        def wrapper(*args, **kwargs):
            stack = prof._stack()
            name = label(stack) if callable(label) else label
            stack.append([name, 0.0])
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent = time.perf_counter() - t
                _, children = stack.pop()
                into = prof.exclusive if threading.get_ident() == prof._main else prof.background
                into[name] += spent - children
                if stack:
                    stack[-1][1] += spent

        return wrapper


def _run_label(stack) -> str:
    names = [s[0] for s in stack]
    if "clean pass: statistics" in names:
        return "clean pass: model"
    if "cache fill" in names:
        return "cache fill"
    return "suffix runs"


@contextlib.contextmanager
def profiled():
    """Yields a Profiler whose `exclusive` dict fills while walkaudit.audit runs inside the block."""
    prof = Profiler()
    cache_or_clean = lambda st: ("clean pass: model" if any(s[0] == "clean pass: statistics" for s in st)
                                 else "cache fill")
    wanted = [
        (runtime.Runtime, "session", "sessions"),
        (engine_mod.Engine, "clean_pass", "clean pass: statistics"),
        (engine_mod.Engine, "clean_values", cache_or_clean),
        (engine_mod, "run", _run_label),
        (noise.NormalSource, "normal", "noise draw"),
        (engine_mod.SiteEvaluator, "_feeds", "noise apply"),
        (engine_mod.SuffixEvaluator, "_run", "suffix runs (noise in the graph)"),
        (fit, "midpoint", "fit"),
    ]
    # whatever the engine no longer has is skipped (its time lands in "other")
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in wanted if obj is not None and hasattr(obj, name)]
    labels = {(id(obj), name): label for obj, name, label in wanted}
    for obj, name, old in saved:
        setattr(obj, name, prof.wrap(labels[(id(obj), name)], old))
    started = time.perf_counter()
    try:
        yield prof
    finally:
        for obj, name, old in saved:
            setattr(obj, name, old)
        total = time.perf_counter() - started
        prof.exclusive["other"] = total - sum(prof.exclusive.values())
        prof.exclusive["total"] = total


def audit_breakdown(*args, **kwargs) -> dict:
    """Run walkaudit.audit(*args, **kwargs) under the profiler; seconds per part (background parts suffixed)."""
    with profiled() as prof:
        api.audit(*args, **kwargs)
    return {**prof.exclusive, **{f"{k} (background)": v for k, v in prof.background.items()}}

