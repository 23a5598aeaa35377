"""The driver: `iter_audit` yields each site's result as it finishes; `audit` drains it into a Report.

load model and data → select sites → a Worker (sessions, clean values) → the clean pass → per site: a search
(`sweep`) whose requests become WorkUnits the worker turns into Counts → the fit → a SiteResult. The report is
assembled as the schema's JSON and typed by `Report.from_dict`, so what the API returns is what `--json` writes.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, TypedDict

if TYPE_CHECKING:
    import os
    from collections.abc import Mapping

    import numpy.typing as npt
    import onnx
    from typing_extensions import (
        Unpack,  # typing.Unpack from Python 3.11; annotations only
    )

    from walkaudit._loading.model import LoadedModel
    from walkaudit.config import AuditOptions

    #: the model: a path or an onnx.ModelProto
    ModelSource: TypeAlias = str | os.PathLike[str] | onnx.ModelProto
    #: the inputs: an array, or a dict of arrays by input name for multi-input models
    Inputs: TypeAlias = npt.NDArray[Any] | Mapping[str, npt.NDArray[Any]]

import numpy as np

from walkaudit import __version__
from walkaudit._analysis import estimate as estimate_mod
from walkaudit._analysis import fit, sweep
from walkaudit._analysis.estimate import Estimate
from walkaudit._execution import resolved as resolved_mod
from walkaudit._execution.executors import Executor, InProcess
from walkaudit._execution.resolved import ResolvedAudit
from walkaudit._execution.runtime import Runtime
from walkaudit._execution.worker import CACHE_BYTES
from walkaudit._graph import weights
from walkaudit._graph.index import GraphIndex
from walkaudit._graph.sites import Site, left_out, select, untyped, weight_stats, weight_std
from walkaudit._loading import data as data_mod
from walkaudit._loading.evidence import choose_class_output, class_candidates
from walkaudit._loading.model import load_model
from walkaudit._noise.registry import Level
from walkaudit._units import CleanStats, Counts, WorkUnit, block_rows, blocks_of
from walkaudit.config import AuditConfig, quick_plan, with_options
from walkaudit.errors import UsageError, option
from walkaudit.report.model import Report, SiteResult
from walkaudit.report.schema import SCHEMA_ID


class Progress(Protocol):
    """What the core tells a progress display; the CLI implements it (`walkaudit.cli.progress`).

    Work is counted in sample forward passes. The total of a site is only known once its search ends (the
    adaptive search plans as it learns), so `grow` announces work as it is planned.
    """

    def grow(self, amount: int) -> None: ...  # more work is planned
    def advance(self, amount: int) -> None: ...  # work done
    def describe(self, text: str) -> None: ...  # what runs now ("clean pass", a site's name)
    def site_started(self, position: int, total: int, name: str) -> None: ...  # site `position` of `total`, 1-based
    def site_finished(self, result: SiteResult) -> None: ...  # its result (also for sites resumed from a checkpoint)
    # optional (`_call`): `estimated(text)`: the whole audit's expected time and memory, once the clean pass is done


class _NoProgress:
    def grow(self, amount: int) -> None:
        pass

    def advance(self, amount: int) -> None:
        pass

    def describe(self, text: str) -> None:
        pass

    def site_started(self, position: int, total: int, name: str) -> None:
        pass

    def site_finished(self, result: SiteResult) -> None:
        pass


class _Tokens(TypedDict):
    """How the data's labels are read for a per-token class output (`data_mod.load`, `data_mod.from_arrays`)."""

    per_token: bool
    ignore_label: int
    mask: str | None


def audit(model: ModelSource, x: Inputs | None = None, y: npt.NDArray[Any] | None = None, *,
          data: str | None = None, config: AuditConfig | None = None, progress: Progress | None = None,
          **options: Unpack[AuditOptions]) -> Report:
    """Audit a classifier: per site, accuracy under noise and the midpoint noise level σ50.

    model: a path or an onnx.ModelProto. Data: numpy arrays `x` (a dict by input name for multi-input models) and
    optional class ids or one-hot `y`, or `data=` a .npz/.npy path. Options override fields of AuditConfig.
    """
    run = iter_audit(model, x, y, data=data, config=config, progress=progress, **options)
    for _ in run:
        pass
    return run.report()


def iter_audit(model: ModelSource, x: Inputs | None = None, y: npt.NDArray[Any] | None = None, *,
               data: str | None = None, config: AuditConfig | None = None, progress: Progress | None = None,
               done: Iterable[dict[str, Any]] = (),
               executor: Callable[[ResolvedAudit, Progress], Executor] | None = None,
               data_sha256: str | None = None,
               **options: Unpack[AuditOptions]) -> AuditRun:
    """An audit to iterate: each iteration yields a finished SiteResult, in site order; `report()` then gives the
    Report. Sites in `done` (site dicts of an earlier run with the same fingerprint, e.g. from a checkpoint) are
    yielded as they are, not run again: the report equals an uninterrupted run's, timings aside.

    The model and the data are loaded and checked here, and every choice is resolved (`run.resolved`); the clean
    pass runs at the first iteration. `executor(resolved, progress)` builds who evaluates the work units from the
    resolved audit, the model's bytes attached (default: this process; see `walkaudit._execution.executors`).
    `data_sha256`: the data file's sha256 when the caller already has it (the CLI hashes it for the checkpoint
    before loading): it is then not read a second time to hash it.
    """
    if data is not None and (x is not None or y is not None):
        raise UsageError("give the data either as arrays (x, y) or as a file (data=...), not both")
    config = with_options(config or AuditConfig(), options)
    run = AuditRun(model, x, y, data, config, progress or _NoProgress(), list(done), data_sha256=data_sha256)
    run.executor = executor
    return run


def _call(listener: object, method: str, *args: object) -> None:
    """Tell the progress display, if it listens for this (displays written for walkaudit 0.1 do not), or the
    executor (`release` is optional)."""
    fn = getattr(listener, method, None)
    if fn is not None:
        fn(*args)


def _steady_seconds(began: float, ticks: list[tuple[float, int]], samples: int) -> tuple[float, float]:
    """(the clean pass's time for all `samples` at its steady rate, its set-up): the first batch pays for building
    the session (and growing memory arenas), so the rate is taken from the later batches and the set-up is what the
    first batch took beyond it. `ticks`: (time, samples) as each batch finished. One batch: (its time, 0)."""
    total = (ticks[-1][0] if ticks else time.perf_counter()) - began
    later = sum(n for _, n in ticks[1:])
    if len(ticks) < 2 or later <= 0:
        return total, 0.0
    per_sample = (ticks[-1][0] - ticks[0][0]) / later
    return per_sample * samples, max(0.0, ticks[0][0] - began - per_sample * ticks[0][1])


def _quick_limit(loaded: LoadedModel, config: AuditConfig) -> int:
    """Quick mode's samples where no limit is given (`estimate.quick_samples`), from the selected layers' costs."""
    from walkaudit._graph.cost import site_costs

    try:
        sites = select(loaded.proto, loaded.types, config.selection, loaded.class_output.name)
    except UsageError:  # said again, in full, where the audit selects its sites
        return estimate_mod.QUICK_LIMIT
    return estimate_mod.quick_samples(site_costs(loaded, sites), config.repeats, estimate_mod.QUICK_LIMIT)


def _shard(model: LoadedModel, sites: list[Site], i: int, n: int) -> list[Site]:
    """The sites of shard i of n (1-based), balanced by estimated cost; they keep their indices in the full
    selection, so shard reports merge into the unsharded one."""
    from walkaudit._analysis.shards import assign
    from walkaudit._graph.cost import site_costs

    return [sites[p] for p in assign(site_costs(model, sites), n)[i - 1]]


@dataclass
class _Search:
    """One site's search in flight: its generator, the units of its current request still out, their counts."""

    position: int
    site: Site | None
    names: tuple[str, ...]
    search: sweep.Search
    notes: list[str] = field(default_factory=list)
    total: Counts | None = None
    outstanding: int = 0
    curve: sweep.Curve | None = None


class AuditRun:
    """One audit in progress (see `iter_audit`)."""

    #: builds the executor from the resolved audit and the progress display (default None: in-process); `--ray`
    #: sets a Ray one
    executor: Callable[[ResolvedAudit, Progress], Executor] | None = None

    def __init__(self, model: ModelSource, x: Inputs | None, y: npt.NDArray[Any] | None, data: str | None,
                 config: AuditConfig, progress: Progress, done: list[dict[str, Any]], data_sha256: str | None = None):
        self.config, self.progress, self.started = config, progress, time.perf_counter()
        self.loaded = load_model(model, config.output)
        rivals = [] if config.output is not None else class_candidates(self.loaded)
        out = self.loaded.class_output
        num_classes = out.num_classes if out.kind != "label" and len(rivals) < 2 else None
        tokens = _Tokens(per_token=out.per_token, ignore_label=config.ignore_label, mask=config.mask)
        #: the samples used: --limit, or quick mode's share (`estimate.quick_samples`)
        self.limit = config.limit if config.limit is not None or not config.quick else _quick_limit(self.loaded, config)
        if data is not None:
            self.dataset = data_mod.load(data, self.loaded.inputs, x_key=config.x_key, y_key=config.y_key,
                                         limit=self.limit, num_classes=num_classes,
                                         allow_nonfinite=config.allow_nonfinite, **tokens,
                                         digest=data_sha256 is None)
            if data_sha256 is not None:  # hashed by the caller already
                self.dataset.sha256 = data_sha256
        elif x is not None:
            self.dataset = data_mod.from_arrays(x, y, self.loaded.inputs, limit=self.limit, num_classes=num_classes,
                                                allow_nonfinite=config.allow_nonfinite, **tokens)
        else:
            raise UsageError("no data: pass arrays (x, y) or a data file")
        if len(rivals) >= 2:
            self.loaded.class_output = choose_class_output(self.loaded, rivals, self.dataset, config.provider)
        out = self.loaded.class_output
        self.index = GraphIndex(self.loaded.proto.graph)
        self.noise = config.noise_model()
        self.sites: list[Site] = select(self.loaded.proto, self.loaded.types, config.selection, out.name,
                                        index=self.index, target=self.noise.target, stored=self.noise.stored)
        self.notes = [*self.loaded.notes, *(n for n in [left_out(self.loaded.proto, config.selection),
                                                         untyped(self.loaded.proto, self.loaded.types,
                                                                 config.selection)] if n)]
        self.selected = self.sites  # the whole selection: a shard's clean pass exposes it all
        if config.shard is not None:
            self.sites = _shard(self.loaded, self.sites, *config.shard)
        unknown = [n for n, _ in config.site_scales if n not in {s.name for s in self.sites}]
        if unknown:
            raise UsageError(f"{option('site_scales')}: {unknown[0]!r} is not a selected site")
        self.done = {d["name"]: d for d in done}
        self.results: list[SiteResult] = []
        self.clean: CleanStats | None = None
        self.clean_seconds = 0.0  # the clean pass's wall time at its steady rate (`start`)
        self.setup_seconds = 0.0  # what building its session took (`start`)
        self._runtime: Runtime | None = None
        self._num_classes = num_classes  # the classes the data was read against
        #: every choice made here, once (`start` adds the batch size): what every executor's workers are built from
        self.resolved: ResolvedAudit | None = None
        self._executor: Executor | None = None  # from `start` until `close`

    @property
    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must match to be resumed: the model, the data and the options that change results."""
        return {"model_sha256": self.loaded.sha256, "data_sha256": self.dataset.sha256,
                "config": self.config.fingerprint()}

    # -- running ---------------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[SiteResult]:
        executor = self.start()
        try:
            units: list[tuple[Site | None, tuple[str, ...]]] = [
                (None, tuple(s.name for s in self.sites))] if self.config.mode == "global" else [
                (s, (s.name,)) for s in self.sites]
            for result in self._schedule(executor, units):
                self.results.append(result)
                _call(self.progress, "site_finished", result)
                yield result
        finally:
            self.close()

    def start(self) -> Executor:
        """The runtime, the resolved audit, the executor that will evaluate the units (its workers built from the
        resolved audit), and the clean pass (by the executor: in this process, or over its workers, each its own
        slice of the data)."""
        config, progress = self.config, self.progress
        self._runtime = runtime = Runtime(config.provider, config.threads, config.exact)
        batch, note = resolved_mod.batch_size_for(self.loaded, config.batch_size, runtime)
        if config.batch_size is None and note is None:  # not a fixed-batch model: site values within 1 GiB
            batch = min(batch, self._bounded_batch())
        resolved_mod.learn_provider(runtime)  # the report's provider, also where no session runs here
        self.notes.extend([note] if note else [])
        used = dataclasses.replace(config, limit=self.limit)  # workers that read the data read quick mode's share
        self.resolved = resolved = resolved_mod.resolve(self.loaded, self.dataset, self.sites, self.selected, used,
                                                        self.noise, batch, self._num_classes)
        progress.describe("clean pass")
        progress.grow(self.dataset.samples)
        # a walk keeps the clean values its sites read (where the units run: each worker those of its own rows)
        keep = config.mode == "walk" and len(self.done) < len(self.sites)
        executor: Executor
        if self.executor is not None:
            executor = self.executor(resolved.with_model_bytes(self.loaded.proto), progress)
        else:  # the driver's loaded model, data, runtime and graph index handed over: nothing loaded twice
            executor = InProcess(resolved.build(model=self.loaded, dataset=self.dataset, runtime=runtime,
                                                index=self.index), progress.advance)
        self._executor = executor
        began, ticks = time.perf_counter(), []

        def advance(amount: int) -> None:  # the clean pass's batches, timed for the estimate
            ticks.append((time.perf_counter(), amount))
            progress.advance(amount)

        try:
            self.clean = executor.clean_pass(advance, keep)
        except BaseException:
            self.close()
            raise
        self.clean_seconds, self.setup_seconds = _steady_seconds(began, ticks, self.dataset.samples)
        if len(self.done) < len(self.sites):
            _call(progress, "estimated", self.estimate().line())
        return executor

    def _bounded_batch(self) -> int:
        """The batch where none is given (`estimate.bounded_batch`): a batch of the sites' values within 1 GiB."""
        from walkaudit._execution.sizing import DEFAULT_BATCH
        from walkaudit._graph.cost import value_bytes

        site_bytes, largest = value_bytes(self.loaded, [s.name for s in self.selected if s.name in self.loaded.types])
        return estimate_mod.bounded_batch(site_bytes + 2 * largest, DEFAULT_BATCH)

    def estimate(self, samples: int | None = None, batch: int | None = None) -> Estimate:
        """The whole audit's wall time and peak memory (`walkaudit._analysis.estimate`), from the clean pass just
        measured (after `start`); `samples`, `batch`: for that many samples and that batch size instead of the
        run's own (the clean pass's time scaled: `walkaudit inspect --data` measures on a slice)."""
        from walkaudit._graph.cost import pass_cost, site_costs, value_bytes

        config, loaded = self.config, self.loaded
        scale = 1.0 if samples is None else samples / max(self.dataset.samples, 1)
        samples = self.dataset.samples if samples is None else samples
        if config.mode == "global":
            relative = [1.0]
        else:
            whole = pass_cost(loaded)
            relative = [c / whole for c in site_costs(loaded, self.sites)] if whole > 0 else [1.0] * len(self.sites)
        grid = config.sigmas or self.noise.grid()
        levels = len(grid) if grid else estimate_mod.QUICK_LEVELS if config.quick else estimate_mod.ADAPTIVE_LEVELS
        seconds = estimate_mod.audit_seconds(self.clean_seconds * scale, relative, levels, config.repeats,
                                             setup=self.setup_seconds)
        site_bytes, largest = value_bytes(loaded, [s.name for s in self.selected if s.name in loaded.types])
        ran = [4 * math.prod(shape[1:]) for shape in self._clean_stats().shapes.values()]  # as run: dims known
        site_bytes, largest = max(site_bytes, sum(ran)), max([largest, *ran])
        if self.resolved is None:
            raise UsageError("the audit has not started: no estimate before its clean pass")
        batch = min(batch or self.resolved.batch_size, samples)
        cache = min(CACHE_BYTES, samples * site_bytes) if config.mode == "walk" else 0
        peak = estimate_mod.peak_bytes(weights.nbytes(loaded.proto), site_bytes, largest, batch, cache)
        return Estimate(seconds, peak)

    @property
    def key(self) -> str:
        """The model's key in work units (its sha256)."""
        return self.loaded.sha256 or "in-memory model"

    def close(self) -> None:
        """Stop the executor and its noise threads (the run's results stay)."""
        if self._executor is not None:
            self._executor_note = getattr(self._executor, "note", None)
            self._executor_notes = self._executor.notes
            self._graph_draws = self._executor.graph_draws
            self._executor.close()
            self._executor = None

    def evaluate_all(self, units: list[WorkUnit]) -> list[Counts]:
        """Evaluate units through the run's executor (after `start`), each cut as the executor likes; their
        Counts in the order given."""
        executor = self._executor
        if executor is None:
            raise UsageError("evaluate_all: the audit has no executor (call start() first)")
        handles: dict[object, int] = {}
        totals: list[Counts | None] = [None] * len(units)
        for i, unit in enumerate(units):
            self.progress.grow(len(unit.sigmas) * unit.repeats * len(block_rows(unit.block_range,
                                                                               self.dataset.samples)))
            for piece in executor.split(unit):
                handles[executor.submit(piece)] = i
        while handles:
            for handle in executor.wait(list(handles)):
                i = handles.pop(handle)
                counts = executor.result(handle)
                total = totals[i]
                totals[i] = counts if total is None else total + counts
        done = [t for t in totals if t is not None]
        assert len(done) == len(units)  # an executor cuts every unit into one piece or more
        return done

    def _schedule(self, executor: Executor, units: list[tuple[Site | None, tuple[str, ...]]]
                  ) -> Iterator[SiteResult]:
        """Run every site's search, `executor.sites_in_flight` at a time, each request cut into units by the
        executor; yield the sites' results in site order."""
        queue = deque(enumerate(units, 1))
        active: dict[int, _Search] = {}  # position -> its search in flight
        handles: dict[object, int] = {}  # a unit's handle -> the position of its search
        finished: dict[int, SiteResult] = {}  # position -> result, until the sites before it are yielded
        turn = 1
        while queue or active or finished:
            while turn in finished:
                yield finished.pop(turn)
                turn += 1
            while queue and len(active) < executor.sites_in_flight:
                position, (site, names) = queue.popleft()
                name = site.name if site else "global"
                _call(self.progress, "site_started", position, len(units), name)
                if name in self.done:
                    finished[position] = SiteResult.from_dict(self.done[name])
                    _call(executor, "release", names)  # what the clean pass kept for it
                    continue
                self.progress.describe(name)
                state = active[position] = _Search(position, site, names, self._search(names))
                self._step(state, None, executor, handles)
                if state.curve is not None:
                    finished[position] = self._result(active.pop(position))
            if not handles:
                continue
            for handle in executor.wait(list(handles)):
                state = active[handles.pop(handle)]
                counts = executor.result(handle)
                state.total = counts if state.total is None else state.total + counts
                state.outstanding -= 1
                if state.outstanding == 0:
                    self._step(state, state.total, executor, handles)
                    if state.curve is not None:
                        finished[state.position] = self._result(active.pop(state.position))

    def _search(self, names: tuple[str, ...]) -> sweep.Search:
        """A site's σ search: the fixed grid, or the adaptive search around its halfway line."""
        config, clean = self.config, self._clean_stats()
        n_blocks = blocks_of(self.dataset.samples)
        grid = config.sigmas or self.noise.grid()  # the model's own grid: quantize's --bits
        if grid:
            return sweep.fixed(grid, n_blocks)
        stds = [self._std(n) for n in names]
        scale = self.noise.search_scale(float(np.median(stds)) if stds else 1.0)
        half = fit.halfway(clean.accuracy, self.chance)
        targets = tuple(clean.accuracy - d.points(clean.accuracy, self.chance) for d in config.drops)
        plan = quick_plan(self.noise.plan()) if config.quick else self.noise.plan()
        return sweep.adaptive(half, plan, scale, n_blocks, clean.accuracy, targets)

    def _step(self, state: _Search, counts: Counts | None, executor: Executor, handles: dict[object, int]) -> None:
        """Send a search the counts of its last request (None: start it) and submit its next request's units, or
        keep its curve when it is done."""
        if counts is not None:
            state.notes.extend(n for n in counts.notes if n not in state.notes)
        try:
            request = next(state.search) if counts is None else state.search.send(counts)
        except StopIteration as done:
            state.curve = done.value
            _call(executor, "release", state.names)  # its sessions and caches are no longer needed
            return
        config = self.config
        scales = dict(config.site_scales)
        units = [WorkUnit(self.key, state.names, request.sigmas, config.repeats, (r.start, r.stop),
                          config.seed, mode=config.mode,
                          site_scales=tuple(float(scales.get(n, 1.0)) for n in state.names) if scales else None)
                 for r in request.blocks]  # one unit per contiguous range of the request's blocks
        rows = sum(len(block_rows(r, self.dataset.samples)) for r in request.blocks)
        self.progress.grow(len(request.sigmas) * config.repeats * rows)
        pieces = [piece for unit in units for piece in executor.split(unit)]
        state.total, state.outstanding = None, len(pieces)
        for piece in pieces:
            handles[executor.submit(piece)] = state.position

    def _result(self, state: _Search) -> SiteResult:
        assert state.curve is not None  # a result only for a search that ended (`_step` kept its curve)
        return SiteResult.from_dict(self._site_dict(state.site, state.curve, state.notes),
                                    validate=False)  # report() validates the whole report

    @property
    def chance(self) -> float:
        classes = self.num_classes
        return self.config.chance if self.config.chance is not None else 1.0 / max(classes, 1)

    @property
    def num_classes(self) -> int:
        if self.loaded.class_output.num_classes:
            return self.loaded.class_output.num_classes
        clean = self._clean_stats()
        return clean.width or len(clean.classes)

    def _clean_stats(self) -> CleanStats:
        """The clean pass's statistics, which everything after it reads."""
        if self.clean is None:
            raise UsageError("the audit has not run its clean pass yet: iterate it (or call start()) first")
        return self.clean

    def _std(self, name: str) -> float:
        """The std of a site's clean value: its activation's, or for a weight site the weight's own."""
        if self.noise.target == "weights":
            return weight_std(self.loaded.proto, name)
        return self._clean_stats().std(name)

    def _site_dict(self, site: Site | None, curve: sweep.Curve, notes: list[str]) -> dict[str, Any]:
        clean, noise = self._clean_stats(), self.noise
        sig, levels = curve.sorted()
        # paired with the clean pass: each level's accuracy relative to the clean accuracy of its own samples
        acc = np.stack([sweep.accuracy(lv, clean.accuracy, self.chance) for lv in levels])
        effective = np.array([sweep.effective_samples(lv, clean.accuracy, self.chance) for lv in levels])
        mid = fit.midpoint(sig, acc, clean=clean.accuracy, chance=self.chance, samples=effective,
                           clean_samples=clean.samples)
        # the fit writes its sentences in σ; a bit-flip, drift, quantize or uniform audit reads them in its level
        mid = dataclasses.replace(mid, message=_in_level(mid.message, noise.label),
                                  note=_in_level(mid.note, noise.label))
        points = [_point(s, a, lv) for s, a, lv in zip(sig, acc, levels)]
        name = site.name if site else "global"
        if mid.estimator == "none":  # nothing to measure: the site is flagged with the fit's one line
            notes = [*notes, f"{name}: {mid.message}"]
        bad = sum(p["nonfinite"] for p in points)
        if bad:
            notes = [*notes, f"{name}: {bad} noisy passes gave NaN/Inf class scores; counted as misclassified"]
        if mid.note:  # the curve had not settled at the largest σ
            notes = [*notes, f"{name}: {mid.note}"]
        std = None if site is None else self._std(site.name)
        value = mid.value if mid.value is not None and np.isfinite(mid.value) else None
        if noise.relative:  # σ already scales the signal: it is its own relative value
            relative = value
        else:
            relative = value / std if value is not None and std else None
        tolerances = [{**fit.tolerance(sig, acc, clean=clean.accuracy, drop=d.points(clean.accuracy, self.chance),
                                       samples=effective).to_dict(), "of": d.describe()}
                      for d in self.config.drops]
        body = {"points": points, "midpoint": value, "midpoint_relative": relative,
                "ci95": list(mid.ci95) if mid.ci95 else None, "censored": mid.censored,
                "fit": {k: v for k, v in mid.to_dict().items() if k not in ("value", "ci95", "censored")},
                "notes": notes, **({"tolerance": tolerances} if tolerances else {})}
        if site is None:
            return {"index": None, "name": "global", "node": None, "op_type": "global", "shape": None,
                    "activation_std": None, "weight": None, "macs": None, **body}
        from walkaudit._graph.cost import site_macs

        shape = site.shape if site.shape is not None else ("N", *clean.shapes[site.name][1:])
        ran = clean.shapes.get(site.name)  # the shape as run fills in what shape inference left unknown
        macs = site_macs(self.loaded, site, {site.name: ("N", *ran[1:])} if ran else None)
        return {"index": site.index, "name": site.name, "node": site.node, "op_type": site.op_type,
                "shape": list(shape), "activation_std": std, "weight": weight_stats(self.loaded.proto, site),
                "macs": macs, **({"module": site.module} if site.module else {}), **body}

    # -- the report --------------------------------------------------------------------------------------------------
    def report(self, partial: bool = False) -> Report:
        """The report of the sites finished so far (all of them unless the iteration was cut short: `partial`)."""
        if self.clean is None:
            raise UsageError("the audit was stopped before its clean pass finished: no report")
        body = self.report_dict(partial)
        draft = Report(**{k: body[k] for k in ("tool", "model", "data", "config", "runtime", "clean_accuracy",
                                                 "chance", "num_classes", "partial", "clean_counts")},
                       sites=tuple(self.results))
        return Report.from_dict(draft.to_dict())  # validated against the schema, as any report read back

    def report_dict(self, partial: bool = False) -> dict[str, Any]:
        config, loaded, dataset, out = self.config, self.loaded, self.dataset, self.loaded.class_output
        clean, runtime, resolved = self._clean_stats(), self._runtime, self.resolved
        assert runtime is not None and resolved is not None  # `start` makes both before the clean pass
        grid = config.sigmas or self.noise.grid()
        sites = [r.to_dict() for r in self.results]  # the typed sites' JSON
        executor = self._executor
        executor_note = getattr(executor, "note", None) or getattr(self, "_executor_note", None)
        worker_notes = executor.notes if executor is not None else self._executor_notes
        graph_draws = executor.graph_draws if executor is not None else self._graph_draws
        notes = [*self.notes, *runtime.notes, *worker_notes, *([executor_note] if executor_note else []),
                 *(n for s in sites for n in s.get("notes") or [])]
        evaluations = sum(p["repeats"] * p["samples"] for s in sites for p in s["points"])
        return {
            "schema": SCHEMA_ID,
            "tool": {"name": "walkaudit", "version": __version__},
            "model": {"path": loaded.path, "sha256": loaded.sha256, "opset": loaded.opset,
                      "producer": loaded.producer, "class_output": out.name, "output_kind": out.kind,
                      "batch_size": loaded.batch_size},
            "data": {"path": dataset.path, "sha256": dataset.sha256, "samples": dataset.samples,
                     "labels": "given" if dataset.labels is not None else "clean-predictions",
                     # a per-token output: accuracy, the clean counts and each point's samples count scored tokens
                     **({"scored": "tokens", "scored_tokens": clean.samples, "ignore_label": config.ignore_label,
                         "mask": dataset.mask} if out.per_token else {})},
            "config": {**self.noise.describe(), "mode": config.mode,
                       "sigmas": list(grid) if grid else None,
                       "search": "fixed" if grid else "adaptive", "repeats": config.repeats,
                       "seed": config.seed, "batch_size": resolved.batch_size,
                       "provider_requested": config.provider,
                       "chance": config.chance, "limit": self.limit, "noise_source": config.noise_source,
                       "exact": config.exact, **({"quick": True} if config.quick else {}),
                       "shard": list(config.shard) if config.shard else None,
                       "site_scales": dict(config.site_scales) or None,
                       "sites": {"ops": list(config.selection.ops), "include": config.selection.include,
                                 "exclude": config.selection.exclude, "names": list(config.selection.names)}},
            "runtime": {"provider": runtime.provider, "onnxruntime_version": runtime.version,
                        "elapsed_s": round(time.perf_counter() - self.started, 3), "evaluations": evaluations,
                        "noise_source": "graph" if graph_draws else "host",
                        "cache_budget_bytes": CACHE_BYTES, "notes": notes},
            "clean_accuracy": clean.accuracy,
            "clean_counts": {"correct": clean.correct, "samples": clean.samples},
            "chance": self.chance, "num_classes": self.num_classes, "sites": sites, "partial": partial,
        }


def _in_level(text: str | None, level: Level) -> str | None:
    """A sentence the fit wrote in σ, in the level's own symbol (BER, t, Δ, w; σ50 becomes BER50)."""
    return text if text is None or level.symbol == "σ" else text.replace("σ", level.symbol)


def _point(sigma: float, accuracy: npt.NDArray[np.floating[Any]], level: Counts) -> dict[str, Any]:
    """One point of a site's curve as the report writes it: `accuracy` per repeat, and the counts (paired with the
    clean pass where they carry the pairing)."""
    pairing = level.pairing
    return {"sigma": float(sigma), "accuracy": float(accuracy.mean()), "accuracy_std": float(accuracy.std()),
            "repeats": int(level.correct.size), "samples": int(level.samples),
            "nonfinite": int(level.nonfinite.sum()),
            **({"clean_correct": int(pairing[0])} if pairing is not None else {}),
            "per_repeat": {"correct": level.correct[0].tolist(), "nonfinite": level.nonfinite[0].tolist(),
                           **({"lost": pairing[1][0].tolist()} if pairing is not None else {})}}
