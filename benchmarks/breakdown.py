"""Where the time of one walkaudit audit goes: wraps worker, strategy and API functions with timers for the length of
one call.

Exclusive times (a function's time minus the wrapped functions it calls), so the parts add up to the whole:

    loading       load_model (checker, shape inference) and the data
    graph index   GraphIndex, built once per audit (site selection, suffix plans, prefixes, suffixes)
    sessions      creating onnxruntime sessions (serialising the rewritten models, graph optimisation)
    clean pass    Worker.clean_pass: "model" is onnxruntime running the clean model (Worker.clean_values, every site
                  exposed, an exact session), "statistics" the numpy work on its outputs (predictions, per-block
                  moments per site) and keeping the values the walk reads
    cache fill    Worker.clean_values called from a site's evaluation: its prefix session computing the values its
                  suffix reads (site + frontier), for the sites whose values the clean pass could not keep
    packing check _Evaluation._group: the σ = 0 run that checks once per site that a tiled batch gives the same
                  outputs (its strategy runs count here)
    noise draw    NormalSource.rows: ε ~ N(0, 1) block by block, keyed by (site, term, block, repeat). The worker
                  draws the next job's ε on a background thread while the current one runs; that time is reported
                  apart ("noise draw (background)") and overlaps the rest, so it is not part of the total
    noise apply   NoiseModel.host / NoiseModel.factors: y + σ·ε on the host (HostApplied: models before opset 10;
                  TermsGlobal) -- zero where the graph applies the noise
    suffix runs   FedSuffix.run / DrawnSuffix.run / HostApplied.run: onnxruntime running the noisy suffixes. With
                  the noise applied in the graph (σ·ε, y + σ·ε and the frontier tiling run inside onnxruntime) they
                  include the apply: "suffix runs (noise in the graph)"
    global runs   FedGlobal.run / TermsGlobal.run: the whole model with noise at every site (global mode)
    fit           the curve fits (fit.midpoint)
    report        the report's JSON Schema validation (report.model._check_document)
    other         the rest (argmax and counting, the sweep, the API, Python)

Monkeypatching is confined to the `profiled` context manager; walkaudit's files are not touched.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict

from walkaudit import api
from walkaudit._analysis import fit
from walkaudit._execution import runtime, strategies, worker
from walkaudit._graph import index as index_mod
from walkaudit._noise import NoiseModel, NormalSource
from walkaudit.report import model as report_model


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


def _in(stack, label) -> bool:
    return any(s[0] == label for s in stack)


def _values_label(stack) -> str:
    return "clean pass: model" if _in(stack, "clean pass: statistics") else "cache fill"


def _suffix_label(stack) -> str:
    return "packing check" if _in(stack, "packing check") else "suffix runs (noise in the graph)"


def _host_label(stack) -> str:
    return "packing check" if _in(stack, "packing check") else "suffix runs (noise applied on the host)"


def _global_label(stack) -> str:
    return "packing check" if _in(stack, "packing check") else "global runs"


WANTED = [  # (owner, attribute, label or label(stack))
    (api, "load_model", "loading"),
    (index_mod.GraphIndex, "__init__", "graph index"),
    (runtime.Runtime, "session", "sessions"),
    (worker.Worker, "clean_pass", "clean pass: statistics"),
    (worker.Worker, "clean_values", _values_label),
    (worker._Evaluation, "_group", "packing check"),
    (NormalSource, "rows", "noise draw"),
    (NoiseModel, "host", "noise apply"),
    (NoiseModel, "factors", "noise apply"),
    (strategies.FedSuffix, "run", _suffix_label),  # DrawnSuffix inherits it
    (strategies.HostApplied, "run", _host_label),
    (strategies.FedGlobal, "run", _global_label),
    (strategies.TermsGlobal, "run", _global_label),
    (fit, "midpoint", "fit"),
    (report_model, "_check_document", "report"),
]


@contextlib.contextmanager
def profiled():
    """Yields a Profiler whose `exclusive` dict fills while walkaudit.audit runs inside the block."""
    prof = Profiler()
    # whatever walkaudit no longer has is skipped (its time lands in "other"); on classes only attributes the class
    # itself defines are wrapped (a subclass that inherits a method is timed through its base's)
    saved = []
    for obj, name, label in WANTED:
        own = vars(obj) if isinstance(obj, type) else None
        if (own is not None and name not in own) or not hasattr(obj, name):
            continue
        old = own[name] if own is not None else getattr(obj, name)
        saved.append((obj, name, old))
        setattr(obj, name, prof.wrap(label, old))
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

