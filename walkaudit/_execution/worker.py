"""A worker evaluates work units for one model and one data set, fast.

- `Worker.clean_pass` runs the clean model once over the data: the targets, and `CleanStats` (correct predictions,
  per-block activation moments). In walk mode it also keeps the clean values the sites read, as far as they fit a
  memory budget (later sites first), so those sites need no prefix.
- `Worker.evaluate(unit)` returns the unit's `Counts`. Walk units run only the suffix that the noise reaches, fed
  the site's clean value and the other clean values it reads (kept by the clean pass, or from the site's prefix,
  once per batch, cached between σ rounds). Global units run the whole model with noise at every site. How the
  noisy graph runs is a strategy (`strategies.choose`).
- Several σ levels go into one run: G copies of the batch, one σ each, where the graph allows it (checked once per
  site with σ = 0); `sizing` says how many fit. One draw of ε per (batch, repeat) serves every level, drawn in the
  background while the previous run goes on.

Batches follow a fixed grid of `batch_size` rows (batch k holds rows [k·B, (k+1)·B)); a unit's sample range is cut
at the grid lines, and ε comes block by block from `NormalSource.rows`, so counts never depend on the batch size.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from walkaudit._execution import sizing
from walkaudit._execution.runtime import OutOfMemory, Runtime, run, trim_heap
from walkaudit._execution.strategies import (
    DrawnSuffix,
    FedGlobal,
    FedSuffix,
    HostApplied,
    Strategy,
    TermsGlobal,
    WeightSuffix,
    choose,
    graph_draws,
)
from walkaudit._graph import dependence, passes, positions
from walkaudit._graph.index import GraphIndex
from walkaudit._graph.sites import Site
from walkaudit._loading.data import Dataset
from walkaudit._loading.model import BINARY_THRESHOLDS, ClassOutput, LoadedModel
from walkaudit._noise import NoiseModel, NormalSource
from walkaudit._units import (
    BLOCK,
    UNSCORED,
    CleanStats,
    Counts,
    WorkUnit,
    block_rows,
    moments,
)
from walkaudit.errors import DataError, RuntimeFailure, UsageError

#: The one budget (bytes) for clean values: what the clean pass keeps for later sites and what the evaluations alive
#: cache between σ rounds, counted together (`Worker.cached_bytes`); stated in the report (runtime.cache_budget_bytes).
CACHE_BYTES = 256 << 20
#: Samples the σ = 0 packing check runs on (`_Evaluation._probe`): two, so that the check (a run of two tiled copies
#: and one of the rows alone) costs less than one row-pass of a batch of 8 (it cost 3 on the zoo's 8-image audits).
PROBE_ROWS = 2

Progress = Callable[[int], None]


def predictions(out: np.ndarray, kind: str, per_token: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class [N], non-finite mask [N]). A row with NaN/Inf scores predicts no class (-1).

    kind: "scores" (argmax of [N, C, ...]), "label" (class ids [N]), "binary-logit" / "binary-probability" (one
    number per sample, [N] or [N, 1, ...]: class 1 when above 0, resp. 0.5, else class 0). `per_token`: scores
    [N, T, C], a class per position: both come back [N, T]."""
    if per_token:
        bad = ~np.isfinite(out).all(axis=-1)
        return np.where(bad, -1, np.argmax(np.nan_to_num(out, nan=-np.inf), axis=-1)), bad
    if kind == "label":
        pred = out.reshape(-1).astype(np.int64)
        return pred, np.zeros(pred.shape, dtype=bool)
    scores = out.reshape(out.shape[0], -1)
    bad = ~np.isfinite(scores).all(axis=1)
    if kind in BINARY_THRESHOLDS:
        return np.where(bad, -1, (scores[:, 0] > BINARY_THRESHOLDS[kind]).astype(np.int64)), bad
    pred = np.where(bad, -1, np.argmax(np.nan_to_num(scores, nan=-np.inf), axis=1))
    return pred, bad


def site_axes(model: LoadedModel, sites) -> tuple[tuple[str, int | None], ...]:
    """Each site's batch axis by its inferred shape (where it carries the inputs' batch symbol; None: told by size
    when the values are seen, `Worker.batch_axis`)."""
    return tuple((s, passes.symbol_axis(model.types.get(s), model.batch_names)) for s in sites)


def graph_seeds(seed: int, model: LoadedModel, site: str) -> tuple[int, int]:
    """The integer seeds of a site's RandomNormalLike nodes (multiplicative, additive term): unique per site and
    term within an audit, independent of the selection, and exact in the float attribute (below 2²⁴)."""
    values = [o for node in model.proto.graph.node for o in node.output if o]
    position = values.index(site) if site in values else len(values)
    base = (seed * (len(values) + 1) + position) % (1 << 23)
    return 2 * base, 2 * base + 1


def batch_size_for(model: LoadedModel, requested: int | None, runtime: Runtime) -> tuple[int, str | None]:
    """Rows per batch of the data grid, and a note when the model's fixed batch overrides the request: the
    request, else on a device a batch sized to its free memory, else `sizing.DEFAULT_BATCH`."""
    if requested is None:
        free = None
        if runtime.requested != "cpu" and model.batch_size is None:
            learn_provider(runtime)
            free = runtime.device_memory()
        requested = (sizing.DEFAULT_BATCH if free is None else
                     sizing.device_batch(free, sizing.row_bytes(model.proto.graph, model.types)))
    fixed = model.batch_size
    if fixed is not None and fixed != requested:
        return fixed, f"the model has a fixed batch size of {fixed}; evaluating {fixed} samples per run"
    return requested, None


def learn_provider(runtime: Runtime) -> None:
    """Make the runtime find out which provider its sessions run on (a one-node session), where it does not know."""
    if runtime.provider is not None:
        return
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    runtime.session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), "probe")


class Worker:
    """Serves work units of one model and data set; keeps the sessions, the clean values and the caches."""

    def __init__(self, model: LoadedModel, data: Dataset, *, runtime: Runtime, noise: NoiseModel,
                 source: NormalSource, sites: list[Site], mode: str = "walk", batch_size: int | None = None,
                 noise_source: str = "auto", key: str | None = None, strategy: type[Strategy] | None = None,
                 pack: bool = True, cache_bytes: int = CACHE_BYTES, index: GraphIndex | None = None,
                 targets: np.ndarray | None = None, clean_ok: np.ndarray | None = None,
                 exposed: tuple[str, ...] | None = None, axes: dict[str, int | None] | None = None):
        """`targets`, `clean_ok`: a driver's clean pass (`ResolvedAudit`); `strategy` forces one evaluation path for
        every unit (tests compare paths with it); `pack` False runs σ levels one at a time; `cache_bytes` bounds the
        clean values kept and cached. `exposed`: the sites whose values (and, walking, their suffixes' reads) the
        clean model exposes (default: `sites`); a shard exposes the whole selection's, so that its clean values are
        the unsharded run's bit for bit (onnxruntime's fusions depend on which values are graph outputs, even in
        exact sessions). `axes`: the sites' batch axes as the driver resolved them (`site_axes`)."""
        self.forced, self.pack, self.cache_bytes = strategy, pack, cache_bytes
        self.model, self.data, self.runtime, self.noise, self.source = model, data, runtime, noise, source
        self.sites, self.mode, self.noise_source = sites, mode, noise_source
        self.key = key or model.sha256 or "in-memory model"
        runtime.share(model.proto)  # the derived graphs name the large weights; the runtime holds them once
        out = model.class_output.name
        # the clean pass reads every site (statistics) and, in walk mode, what each site's suffix reads besides it
        # (its frontier), so that it can keep those values for the walk
        self.index = index or GraphIndex(model.proto.graph)  # built once: every plan, prefix and suffix use it
        self._plans = {site: self._per_sample(site, plan) for site, plan in
                       self.index.suffix_plans([s.name for s in sites], out).items()} if mode == "walk" else {}
        self.on_weights = noise.target == "weights"  # the sites are initializers: nothing to expose, a frontier to read
        self._reads = {site: (*(() if self.on_weights else (site,)), *frontier)
                       for site, (_, frontier) in self._plans.items()}
        shown = self._reads
        if exposed is not None and mode == "walk" and set(exposed) != set(self._reads):  # a shard: the selection's
            shown = {site: (*(() if self.on_weights else (site,)), *self._per_sample(site, plan)[1])
                     for site, plan in self.index.suffix_plans(exposed, out).items()}
        values = self.values if exposed is None or self.on_weights else list(exposed)
        # the clean model and the prefixes feed other graphs: exact, so that a value never depends on which others
        # are exposed with it (a site's curve is then the same audited alone or among others)
        self._exposed = [*values, *(n for names in shown.values() for n in names)]
        self._clean_session = runtime.session(passes.expose(model.proto, self._exposed, model.types), exact=True)
        self._inputs = {s.name for s in model.inputs}
        self.device_free = runtime.device_memory()  # None on the CPU
        self.notes: list[str] = []
        self.batch_size, note = batch_size_for(model, batch_size, runtime)
        self.notes.extend([note] if note else [])
        if noise_source == "graph" and model.opset not in passes.GRAPH_NOISE_OPSETS:
            raise UsageError(f"noise_source graph needs opset 10 to 21 (onnxruntime has no random ops at 22+); "
                             f"the model has opset {model.opset}")
        self._kept: dict[int, dict[str, np.ndarray]] = {}  # grid batch -> clean values kept by the clean pass
        self._kept_sites: set[str] = set()  # sites whose values are kept and that no evaluation has taken yet
        self._targets: np.ndarray | None = targets  # from the clean pass, or handed over by a driver (`ResolvedAudit`)
        self._clean_ok: np.ndarray | None = clean_ok  # per sample (token): the clean model got it right (pairing)
        self._evaluations: dict[tuple[str, tuple[str, ...]], _Evaluation] = {}  # (mode, sites) -> its evaluation
        self.cache_peak = 0  # the most bytes of clean values held at once (`cached_bytes`), never above cache_bytes
        #: value -> its batch axis from the inferred shape, or "size" (told by size when seen)
        self._axes: dict[str, int | str] = {n: "size" if a is None else a for n, a in (axes or {}).items()}
        self._folds: dict[str, str | None] = {}  # site -> how its first axis folds the samples (`fold`)

    # -- the clean model -----------------------------------------------------------------------------------------
    @property
    def graph_draws(self) -> bool:
        return self.mode == "walk" and graph_draws(self.model.opset, self.runtime.provider, self.noise_source,
                                                   self.noise)

    def grid(self, rows: range) -> Iterator[tuple[int, range]]:
        """(grid batch k, the rows of `rows` inside it) in order."""
        b = self.batch_size
        for k in range(rows.start // b, -(-rows.stop // b)):
            yield k, range(max(rows.start, k * b), min(rows.stop, (k + 1) * b))

    def feeds(self, k: int) -> tuple[int, dict[str, np.ndarray]]:
        """(valid rows, model inputs) of grid batch k, padded to the model's fixed batch size when it has one."""
        start = k * self.batch_size
        feeds = {name: v[start : start + self.batch_size] for name, v in self.data.inputs.items()}
        n = len(next(iter(feeds.values())))
        fixed = self.model.batch_size
        if fixed is not None and n < fixed:
            feeds = {name: _pad(v, fixed) for name, v in feeds.items()}
        return n, feeds

    @property
    def _clean(self):
        """The clean model's session (sites exposed): made with the worker, dropped after a walk's clean pass (its
        weights and its arena, which held every exposed value of a batch: ~0.5-1 GB on ViT-B/16 at batch 8), and
        made again only if a walk unit needs it (a value to compute anew for part of a batch)."""
        if self._clean_session is None:
            self._clean_session = self.runtime.session(passes.expose(self.model.proto, self._exposed,
                                                                     self.model.types), exact=True)
        return self._clean_session

    def clean_values(self, feeds: dict[str, np.ndarray], names, session=None) -> dict[str, np.ndarray]:
        """Clean values by name for one batch, from `session` (default: the clean model, sites exposed)."""
        wanted = [n for n in dict.fromkeys(names) if n not in self._inputs]
        values = dict(zip(wanted, run(session or self._clean, wanted, feeds)))
        values.update({n: feeds[n] for n in names if n in self._inputs})
        return values

    def clean_pass(self, progress: Progress | None = None, keep: bool = False,
                   rows: range | None = None) -> CleanStats:
        """The clean model over all the data: targets (kept for the units), counts and per-block moments. With
        `keep`, also keep what the walk's sites read, as far as it fits in CACHE_BYTES (`_fitting`). `rows`: only
        these (whole batches of the grid; a worker that serves only their units): the targets of the other rows
        are UNSCORED, and the CleanStats of workers over disjoint rows add up to the whole pass's."""
        out = self.model.class_output
        names = self.values
        reads = [n for r in self._reads.values() for n in r] if keep else []
        whole = range(self.data.samples)
        rows = whole if rows is None else rows
        if rows.start % self.batch_size or (rows.stop % self.batch_size and rows.stop != whole.stop):
            raise ValueError(f"clean_pass: rows {rows} are not whole batches of {self.batch_size}")
        n_batches = -(-len(rows) // self.batch_size)
        stats, preds, kept = CleanStats(), [], set()
        for k, part in self.grid(rows):
            n, feeds = self.feeds(k)
            values = self.clean_values(feeds, [out.name, *names, *reads])
            if keep and part.start == rows.start:
                self._kept_sites = set(_fitting(self._reads, values, n_batches, self.cache_bytes))
                kept = {r for site in self._kept_sites for r in self._reads[site]}
            if kept:
                self._kept[k] = {r: values[r] for r in kept}
                self.cache_peak = max(self.cache_peak, self.kept_bytes)
            pred, _ = predictions(values[out.name], out.kind, out.per_token)
            preds.append(pred[:n])
            for name in names:
                v = values[name]
                stats.shapes[name] = v.shape
                per_block = stats.moments.setdefault(name, {})
                for b in range(part.start // BLOCK, -(-part.stop // BLOCK)):
                    lo, hi = max(part.start, b * BLOCK) - part.start, min(part.stop, (b + 1) * BLOCK) - part.start
                    m = moments(v[lo:hi])
                    old = per_block.get(b)  # a block cut by the grid: its parts add in row order
                    per_block[b] = m if old is None else (old[0] + m[0], old[1] + m[1], old[2] + m[2])
            if out.kind == "scores":
                stats.width = values[out.name].shape[-1]
            if progress:
                progress(n)
        if self.mode == "walk":  # the walk runs suffixes, fed what was kept or what prefixes compute
            self._clean_session = None
            trim_heap()
        pred = np.concatenate(preds)
        self._targets = targets_of(pred, _rows_of(self.data, rows), out)
        scored = self._targets != UNSCORED
        decided = pred[scored]
        if len(decided) > 1 and (decided == decided[0]).all():
            every = "scored token" if out.per_token else "sample"
            self.notes.append(f"the clean model gives class {decided[0]} for every {every}: its accuracy, and how "
                              "noise changes it, say little about the model (a constant or untrained model?)")
        seen = np.concatenate([decided, self._targets[scored]])
        self._clean_ok = pred == self._targets
        stats.correct, stats.samples = int(self._clean_ok.sum()), int(scored.sum())
        stats.classes = frozenset(int(c) for c in np.unique(seen[seen >= 0]))
        if rows != whole:  # targets by absolute row; the other rows are other workers'
            placed = np.full((len(whole), *self._targets.shape[1:]), UNSCORED, np.int64)
            placed[rows.start : rows.stop] = self._targets
            self._targets = placed
            ok = np.zeros(placed.shape, bool)
            ok[rows.start : rows.stop] = self._clean_ok
            self._clean_ok = ok
        return stats

    @property
    def values(self) -> list[str]:
        """The sites' values the clean pass exposes and takes the moments of (none for weight sites)."""
        return [] if self.on_weights else [s.name for s in self.sites]

    def batch_axis(self, site: str, shape: tuple, rows: int) -> int | None:
        """The axis of a site's value that holds the samples: where its inferred shape carries the inputs' batch
        dimension (LSTM outputs are [T, D, N, H]), else the first axis of `rows` entries, else None (a value shared
        by all samples, such as a positional embedding [1, T, D])."""
        if site not in self._axes:
            found = passes.symbol_axis(self.model.types.get(site), self.model.batch_names)
            self._axes[site] = "size" if found is None else found
        axis = self._axes[site]
        if isinstance(axis, int):  # else "size"
            return axis if axis < len(shape) and shape[axis] == rows else self._by_size(site, shape, rows)
        return self._by_size(site, shape, rows)

    def axis_note(self, site: str) -> str | None:
        """The note for a site whose samples run along another axis than the first (after `batch_axis`): a fact of
        the site, so it goes with the site's own notes (its Counts) and a resumed or distributed audit keeps it."""
        axis = self._axes.get(site, "size")
        if axis in (0, "size"):
            return None
        return f"{site}: samples run along axis {axis}; the noise is drawn per sample along it"

    def _by_size(self, site: str, shape: tuple, rows: int) -> int | None:
        return 0 if shape and shape[0] == rows else next((a for a, d in enumerate(shape) if d == rows), None)

    def fold(self, site: str, shape: tuple, rows: int, session=None) -> str | None:
        """How a value without a batch axis holds the samples when its first axis folds them with another axis
        ([T·N, D] after a sequence-first attention flattens its tokens, [N·T, D] after a batch-first one):
        "sample-major" (row n·T + t) or "sample-minor" (row t·N + n). Told apart once per site from the clean
        values of sample 0 alone and of samples 0 and 1; None when neither layout matches (a value shared by all
        samples, such as a positional embedding) or both do. `session`: one that computes the site (its prefix;
        default: the clean model)."""
        if (not shape or shape[0] <= rows or shape[0] % rows or self.model.batch_size is not None
                or self.data.samples < 2):
            return None
        if site not in self._folds:
            _, feeds = self.feeds(0)
            one, two = ({n: v[:k] for n, v in feeds.items()} for k in (1, 2))
            try:
                a, b = (self.clean_values(feeds, [site], session)[site] for feeds in (one, two))
            except RuntimeFailure:
                a = b = np.zeros(0)
            layouts = []
            if b.shape == (2 * a.shape[0], *a.shape[1:]) and a.size:
                same = lambda x: np.allclose(x, a, rtol=1e-5, atol=1e-6, equal_nan=True)  # noqa: E731
                layouts = [name for name, rows_of_0 in (("sample-major", b[: len(a)]), ("sample-minor", b[::2]))
                           if same(rows_of_0)]
            self._folds[site] = layouts[0] if len(layouts) == 1 else None
        return self._folds[site]

    @property
    def targets(self) -> np.ndarray:
        """The class id per sample that counts as correct: the labels, or the clean model's predictions ([N, T]
        for a per-token output, UNSCORED where a position is not scored; `targets_of`)."""
        if self._targets is None:
            self.clean_pass()
        assert self._targets is not None  # the clean pass sets them
        return self._targets

    # -- noisy evaluation ----------------------------------------------------------------------------------------
    def evaluate(self, unit: WorkUnit, progress: Progress | None = None) -> Counts:
        """The unit's counts: correct predictions and non-finite outputs per (σ, repeat) over its samples."""
        if unit.model != self.key:
            raise RuntimeFailure(f"a work unit for model {unit.model[:12]} reached a worker of {self.key[:12]}")
        if unit.seed != self.source.seed:
            raise RuntimeFailure(f"a work unit with seed {unit.seed} reached a worker drawing with {self.source.seed}")
        targets = self.targets
        evaluation = self._evaluations.get((unit.mode, unit.sites))
        if evaluation is None:
            evaluation = self._evaluations[unit.mode, unit.sites] = self._evaluation(unit)
        return evaluation.evaluate(unit, targets, progress, self._clean_ok)

    def release(self, sites: tuple[str, ...]) -> None:
        """Forget what units at `sites` needed: their sessions, prefix, cached and kept clean values. Called when
        their search is done, so that memory is bounded by one site's evaluation and not by the sites audited; a
        later unit at these sites would build them again (from the prefix: the same counts)."""
        for key in [k for k in self._evaluations if k[1] == tuple(sites)]:
            del self._evaluations[key]
        if len(sites) == 1 and sites[0] in self._kept_sites:
            self._take(sites[0])
        trim_heap()

    @property
    def live_evaluations(self) -> int:
        """Evaluations held (each with its sessions and caches): at most the sites in flight."""
        return len(self._evaluations)

    def strategy(self, sites: tuple[str, ...], mode: str = "walk") -> type[Strategy]:
        """The evaluation path units at these sites take (`strategies.choose`)."""
        return self.forced or choose(mode, self.model.opset, [self.model.types[s] for s in sites],
                                     self.runtime.provider, self.noise_source, self.noise)

    def _evaluation(self, unit: WorkUnit) -> _Evaluation:
        kind, model = self.strategy(unit.sites, unit.mode), self.model
        if unit.mode == "global":
            if not issubclass(kind, (FedGlobal, TermsGlobal)):
                raise TypeError(f"{kind.__name__} does not run global mode")
            return _Evaluation(self, kind(self.runtime, model, self.noise, list(unit.sites)), None, {})
        (site,) = unit.sites
        if site not in self._plans:  # a walk unit on a worker built for global mode
            self._plans[site] = self._per_sample(site, self.index.suffix_plan(site, model.class_output.name))
        suffix = passes.suffix(model.proto, site, model.class_output.name, model.types, self._plans[site],
                               index=self.index)
        if not self.runtime.exact:  # the tail on the positions the output reads: equal up to rounding
            suffix = dataclasses.replace(suffix, model=positions.keep_read_positions(
                suffix.model, model.types, passes.batch_dimension(model.inputs)))
        strategy: Strategy
        if issubclass(kind, DrawnSuffix):
            strategy = kind(self.runtime, model, self.noise, suffix, seeds=graph_seeds(unit.seed, model, site))
        elif issubclass(kind, (HostApplied, WeightSuffix)):
            strategy = kind(self.runtime, model, self.noise, suffix, self.source.map)
        elif issubclass(kind, FedSuffix):
            strategy = kind(self.runtime, model, self.noise, suffix)
        else:
            raise TypeError(f"{kind.__name__} does not run walk mode")
        # the part of the model before the site, made when first needed: for batches not kept, or for rows of a
        # kept batch that cannot be sliced out (before, those came from the whole clean model, made again: +0.7 GB
        # at GPT-2's first site); weight sites read the clean model's values
        prefix = None if self.on_weights else functools.partial(self._prefix, site, suffix.frontier)
        return _Evaluation(self, strategy, prefix, self._take(site))

    def _prefix(self, site: str, frontier: tuple[str, ...]):
        """A session computing `site` and `frontier` from the inputs: the part of the model before the site."""
        graph = passes.prefix(self.model.proto, [site, *frontier], self.model.types, index=self.index)
        return self.runtime.session(graph, f"part of the model before {site}", exact=True)

    def _per_sample(self, site: str, plan):
        """The suffix plan fed by rows: values that describe the batch as a whole (shape vectors) are recomputed in
        the suffix (`passes.per_sample`), so that it takes G tiled copies of a batch, or part of one."""
        return passes.per_sample(plan, site, self.index, self.model.types, passes.batch_dimension(self.model.inputs),
                                 kinds=self._kinds)

    @functools.cached_property
    def _kinds(self) -> dict[str, str]:
        """What every value depends on (per sample, the batch's shape, constant; `dependence.classify`), once."""
        return dependence.classify(self.index, self.model.types, passes.batch_dimension(self.model.inputs))

    def _take(self, site: str) -> dict[int, dict[str, np.ndarray]]:
        """Hand over what the clean pass kept for `site` (grid batch -> values), and forget what no later site
        reads. Empty when it was not kept."""
        if site not in self._kept_sites:
            return {}
        self._kept_sites.remove(site)
        taken = {k: {n: values[n] for n in self._reads[site]} for k, values in self._kept.items()}
        still = {r for s in self._kept_sites for r in self._reads[s]}
        for values in self._kept.values():
            for name in [n for n in values if n not in still]:
                del values[name]
        return taken

    @property
    def kept_bytes(self) -> int:
        return sum(v.nbytes for values in self._kept.values() for v in values.values())

    @property
    def cached_bytes(self) -> int:
        """Clean values held now: kept by the clean pass for sites still to come, and cached by the evaluations
        alive (one per site in flight). All of it counts against one budget, `cache_bytes`."""
        return self.kept_bytes + sum(e.cached for e in self._evaluations.values())


class _Evaluation:
    """One site's (or global mode's) noisy graph with its clean-value cache, its device copies and what it learnt
    about packing: the loop over batches, repeats and σ groups that every strategy shares."""

    def __init__(self, worker: Worker, strategy: Strategy, prefix: Callable[[], Any] | None,
                 kept: dict[int, dict[str, np.ndarray]]):
        self.worker, self.strategy, self._make_prefix = worker, strategy, prefix
        self.cache = dict(kept)  # grid batch -> clean values
        self.cached = sum(v.nbytes for values in kept.values() for v in values.values())
        self.on_device: dict[int, dict] = {}
        self.packable: bool | None = None
        self.single: Strategy | None = None  # the strategy for one level per run, once needed
        self.notes: list[str] = []
        self.scales: dict[str, float] = {}
        self.row_bytes = sizing.row_bytes(strategy.graph.graph, worker.model.types)

    @functools.cached_property
    def prefix(self):
        """The site's prefix session (made at the first batch that needs it), or None: the clean model's."""
        return None if self._make_prefix is None else self._make_prefix()

    def _grid_values(self, k: int) -> dict[str, np.ndarray]:
        """The clean values of grid batch k (all its rows), from the cache or the prefix."""
        values = self.cache.get(k)
        if values is None:
            _, feeds = self.worker.feeds(k)
            values = self.worker.clean_values(feeds, self.strategy.reads, self.prefix)
            size = sum(v.nbytes for v in values.values())
            if self.worker.cached_bytes + size <= self.worker.cache_bytes:
                self.cache[k] = values
                self.cached += size
                self.worker.cache_peak = max(self.worker.cache_peak, self.worker.cached_bytes)
        return values

    def _device(self, k: int, whole: bool, values: dict[str, np.ndarray]) -> dict:
        """Device copies of the values the strategy binds: kept per grid batch while it is cached (plus the batch
        before, still running), fresh for a part of a batch."""
        names = self.strategy.on_device
        if not names:
            return {}
        if not whole:
            return {n: self.worker.runtime.to_device(values[n]) for n in names}
        if k not in self.on_device:
            for old in [j for j in self.on_device if j not in self.cache and j != k - 1]:
                del self.on_device[old]
            self.on_device[k] = {n: self.worker.runtime.to_device(values[n]) for n in names}
        return self.on_device[k]

    def _part(self, k: int, values: dict[str, np.ndarray], lo: int, hi: int) -> dict[str, np.ndarray]:
        """The clean values of rows [lo, hi) of grid batch k: sliced along each value's batch axis (LSTM and
        sequence-first attention values hold the samples along axis 1); a value whose samples cannot be sliced out
        ([T·N, D] after a sequence-first attention's flattening) is computed anew for those rows by the prefix.
        Padded to the batch size of a model that fixes it."""
        worker, fixed = self.worker, self.worker.model.batch_size
        if fixed is not None:
            return {n: _pad(v[lo:hi], fixed) for n, v in values.items()}
        fed = min(worker.batch_size, worker.data.samples - k * worker.batch_size)  # rows of the whole batch
        axes = {n: worker.batch_axis(n, v.shape, fed) for n, v in values.items()}
        part = {n: _rows(v, lo, hi, axis) for n, v in values.items() if (axis := axes[n]) is not None}
        again = [n for n in values if axes[n] is None]
        if again:
            _, feeds = worker.feeds(k)
            part.update(worker.clean_values({n: v[lo:hi] for n, v in feeds.items()}, again, self.prefix))
        return part

    def _batches(self, rows: range):
        """(rows, clean values fed, device copies) per piece of the grid inside `rows`."""
        worker = self.worker
        for k, part in worker.grid(rows):
            values = self._grid_values(k)
            first = k * worker.batch_size
            whole = part.start == first and part.stop == min(first + worker.batch_size, worker.data.samples)
            if not whole:
                values = self._part(k, values, part.start - first, part.stop - first)
            yield part, values, (lambda k=k, whole=whole, values=values: self._device(k, whole, values))

    def _draw(self, values: dict, rows: range, repeat: int) -> dict[str, np.ndarray]:
        """ε for each noisy site of a batch and repeat: [draws, 1, *site shape], shared by every σ level, drawn
        per sample along the site's batch axis (`Worker.batch_axis`), or per sample's rows of a first axis that
        folds the samples with another (`Worker.fold`); rows padded to a fixed batch get zeros. A site with neither
        gets one draw for the whole batch, keyed by the batch's first block, and a note."""
        source, noise = self.worker.source, self.worker.noise
        eps = {}
        for site in self.strategy.noisy:
            if site in self.strategy.weights:  # a weight: one draw per repeat for every sample
                e = np.zeros((noise.draws, 1, *self.strategy.weights[site]), np.float32)
                for term in range(noise.draws):
                    noise.draw_weight(source, site, term, repeat, out=e[term, 0])
                eps[site] = e
                continue
            shape = values[site].shape
            fed = self.worker.model.batch_size or len(rows)  # rows in the run (a fixed batch is padded)
            axis = self.worker.batch_axis(site, shape, fed)
            fold = self.worker.fold(site, shape, fed, self.prefix) if axis is None else None
            notes = [self.worker.axis_note(site),
                     f"{site}: no batch axis; one noise draw is shared by every sample of a batch"
                     if axis is None and fold is None else None]
            self.notes.extend(n for n in notes if n is not None and n not in self.notes)
            e = np.zeros((noise.draws, 1, *shape), np.float32)
            for term in range(noise.draws):
                if axis == 0:  # the common case: straight into place
                    noise.draw(source, site, term, repeat, rows, shape[1:], out=e[term, 0, : len(rows)])
                elif fold:  # each sample's rows [shape[0] / N, ...], laid out as the value folds them
                    per = np.zeros((fed, shape[0] // fed, *shape[1:]), np.float32)
                    noise.draw(source, site, term, repeat, rows, per.shape[1:], out=per[: len(rows)])
                    e[term, 0] = (per if fold == "sample-major" else per.swapaxes(0, 1)).reshape(shape)
                elif axis is None:
                    noise.draw(source, site, term, repeat, range(rows.start, rows.start + 1), shape,
                               out=e[term, :1])
                else:
                    moved = np.zeros((shape[axis], *shape[:axis], *shape[axis + 1 :]), np.float32)
                    noise.draw(source, site, term, repeat, rows, moved.shape[1:], out=moved[: len(rows)])
                    e[term, 0] = np.moveaxis(moved, 0, axis)
            scale = self.scales.get(site, 1.0)
            if scale != 1.0:  # σ·(c·ε) = (σ·c)·ε: a site's own σ without a graph input of its own
                e *= np.float32(scale)
            eps[site] = e
        return eps

    def _jobs(self, rows: range, repeats: int):
        """(rows, values, device, repeat, ε as a future) per batch and repeat; each job's ε is drawn in the
        background while the job before it runs."""
        source, pending = self.worker.source, None
        for part, values, device in self._batches(rows):
            for r in range(repeats):
                job = (part, values, device, r, source.later(self._draw, values, part, r))
                if pending:
                    yield pending
                pending = job
        if pending:
            yield pending

    def _probe(self, values: dict, device) -> tuple[dict, Callable[[], dict]]:
        """The rows the σ = 0 packing check runs on: the first PROBE_ROWS samples where every value read holds the
        samples along axis 0 (by its inferred shape), with device copies of their own; else the whole batch. Whether
        a graph takes G tiled copies does not depend on how many rows a copy has, and the check then costs a few
        rows instead of three runs of a batch (a quarter of a short transformer walk)."""
        model = self.worker.model
        if any(passes.symbol_axis(model.types.get(n), model.batch_names) != 0 for n in self.strategy.reads):
            return values, device
        small = {n: v[:PROBE_ROWS] for n, v in values.items()}
        return small, lambda: {n: self.worker.runtime.to_device(small[n]) for n in self.strategy.on_device}

    def _one_level(self) -> Strategy:
        """The strategy for runs of one σ level (`FedSuffix.one_level`: the frontier not copied per run), made
        the first time a unit runs its levels one at a time."""
        if self.single is None:
            self.single = self.strategy.one_level()
        return self.single

    def _group(self, values: dict, device, levels: int) -> int:
        """How many σ levels one run takes: as many as `sizing` allows, where a tiled batch reproduces the clean
        outputs at σ = 0 (checked once, and only where more than one level would fit)."""
        strategy = self.strategy
        per_level = sum(values[n].size for n in strategy.reads)
        tiled = sum(values[n].size for n in strategy.frontier)
        rows = len(next(iter(values.values())))
        fit = sizing.levels_per_run(levels, rows, per_level, self.row_bytes, self.worker.device_free, tiled)
        return fit if fit > 1 and self._packs(values, device) else 1

    def _packs(self, values: dict, device) -> bool:
        """Whether the graph takes G tiled copies of a batch: the σ = 0 check, run once."""
        strategy = self.strategy
        if self.packable is None and not (self.worker.pack and strategy.packs):
            self.packable = False
        if self.packable is None:
            rows, on_device = self._probe(values, device)
            zeros = {n: np.zeros((self.worker.noise.draws, 1, *rows[n].shape), np.float32) for n in strategy.noisy}
            try:
                got = strategy.run(rows, np.zeros(2), zeros, on_device())
                want = np.concatenate([strategy.run(rows, np.zeros(1), zeros, on_device())] * 2)
                ok = got.shape == want.shape and np.allclose(got, want, rtol=1e-4, atol=1e-5, equal_nan=True)
            except OutOfMemory:
                ok = True  # it does take a tiled batch; the run loop halves the levels until one fits
            except RuntimeFailure:  # onnxruntime refused the tiled shapes
                ok = False
            self.packable = ok
            if not ok:
                self.notes.append(f"{', '.join(strategy.noisy) or 'site'}: the graph does not take a tiled batch; "
                                  "σ levels run one at a time")
        return self.packable

    def evaluate(self, unit: WorkUnit, targets: np.ndarray, progress: Progress | None,
                 clean_ok: np.ndarray | None = None) -> Counts:
        """The unit's Counts; with `clean_ok` (the clean model right, per sample) also paired with the clean pass:
        the clean-correct samples among those evaluated and, per (σ, repeat), how many of them the noise lost."""
        self.scales = dict(zip(unit.sites, unit.site_scales)) if unit.site_scales else {}
        sigmas = np.asarray(unit.sigmas, dtype=np.float64)
        levels, out = len(sigmas), self.worker.model.class_output
        counts = Counts.zeros(unit.sigmas, unit.repeats)
        rows = block_rows(unit.block_range, self.worker.data.samples)
        samples, group, paired = 0, None, clean_ok is not None
        lost, clean_correct = np.zeros_like(counts.correct), 0
        for part, values, device, r, drawn in self._jobs(rows, unit.repeats):
            n = len(part)
            target = targets[part.start : part.stop]
            scored = target != UNSCORED  # every sample, or a per-token output's scored positions
            samples += int(scored.sum()) if r == 0 else 0
            was_ok = clean_ok[part.start : part.stop] if clean_ok is not None else None  # None: not paired
            clean_correct += int(was_ok.sum()) if was_ok is not None and r == 0 else 0
            group = group or self._group(values, device, levels)
            eps = drawn.result()
            g0 = 0
            while g0 < levels:
                chunk = sigmas[g0 : g0 + group]
                try:
                    scores = (self._one_level() if group == 1 else self.strategy).run(values, chunk, eps, device())
                except OutOfMemory:
                    if group == 1:
                        raise
                    group = max(1, group // 2)
                    self.notes.append(f"out of memory: fewer σ levels per run ({group})")
                    continue
                pred, bad = predictions(scores, out.kind, out.per_token)
                pred = pred.reshape(len(chunk), -1, *pred.shape[1:])[:, :n]  # [levels, n] or [levels, n, T]
                bad = bad.reshape(len(chunk), -1, *bad.shape[1:])[:, :n]
                axes = tuple(range(1, pred.ndim))
                counts.correct[g0 : g0 + len(chunk), r] += (pred == target).sum(axis=axes)
                counts.nonfinite[g0 : g0 + len(chunk), r] += (bad & scored).sum(axis=axes)
                if paired:
                    lost[g0 : g0 + len(chunk), r] += (was_ok & (pred != target)).sum(axis=axes)
                if progress:
                    progress(len(chunk) * n)
                g0 += len(chunk)
        return Counts(unit.sigmas, counts.correct, counts.nonfinite, samples, tuple(self.notes),
                      clean_correct if paired else None, lost if paired else None)


def targets_of(pred: np.ndarray, data: Dataset, out: ClassOutput) -> np.ndarray:
    """What counts as correct per sample: the labels, or the clean predictions `pred`. For a per-token output, per
    position [N, T], UNSCORED where the label is the ignore label or the mask is 0 (`Dataset.scored`); DataError
    when the labels or the mask cover another number of positions than the output."""
    labels, scored = data.labels, data.scored
    if not out.per_token:
        return pred if labels is None else labels
    for what, a in (("labels", labels), (f"mask {data.mask!r}", scored)):
        if a is not None and a.shape[1:] != pred.shape[1:]:
            raise DataError(f"the class output {out.name!r} gives {pred.shape[1]} positions per sample but the {what} "
                            f"{'have' if what == 'labels' else 'has'} {a.shape[1]} ([N, {a.shape[1]}]): they must "
                            "have the same length")
    if labels is not None:
        return labels
    return pred if scored is None else np.where(scored, pred, UNSCORED)


def _rows_of(data: Dataset, rows: range) -> Dataset:
    """The data's labels and scored positions of `rows` only (for `targets_of`; the inputs are not sliced)."""
    if rows == range(data.samples):
        return data
    return dataclasses.replace(data, labels=None if data.labels is None else data.labels[rows.start : rows.stop],
                               scored=None if data.scored is None else data.scored[rows.start : rows.stop])


def _rows(v: np.ndarray, lo: int, hi: int, axis: int) -> np.ndarray:
    """Rows [lo, hi) of a clean value along its batch axis."""
    return v[(slice(None),) * axis + (slice(lo, hi),)]


def _pad(v: np.ndarray, rows: int) -> np.ndarray:
    """v with its last row repeated up to `rows` rows (a model with a fixed batch size)."""
    return v if len(v) >= rows else np.concatenate([v, np.repeat(v[-1:], rows - len(v), axis=0)])


def _fitting(reads: dict[str, tuple[str, ...]], batch: dict[str, np.ndarray], batches: int, budget: int) -> list[str]:
    """The sites whose reads (site and frontier) over all batches fit in `budget` together, estimated from the first
    batch; a value read by several sites counts once. Later sites are taken first: their prefixes cost the most to
    run again, and their values are usually the smallest. Returned in walk order."""
    chosen: set[str] = set()
    held: set[str] = set()
    total = 0
    for site, names in reversed(reads.items()):
        extra = sum(batch[n].nbytes for n in set(names) - held) * batches
        if total + extra <= budget:
            chosen.add(site)
            held |= set(names)
            total += extra
    return [site for site in reads if site in chosen]
