"""Evaluate accuracy under noise, fast.

- One clean pass over the data gives the targets, the clean accuracy and each site's activation statistics.
- Walk mode reuses the clean prefix: per site, only the suffix that the noise reaches runs, fed the site's clean
  value and the clean values it also reads. Those come from the clean pass (kept while they fit a memory budget,
  later sites first) or from the site's prefix, the part of the graph before it, once per batch, and are cached.
  The suffix applies the noise itself (`rewrite.graph_noise`); models before opset 10 get y' from the host.
- Several σ levels go into one run: G copies of the batch along dimension 0, one σ each. Whether a graph allows
  that is checked once per site with σ = 0; where it does not (fixed batch, folded batch) levels run one by one.
  `sizing` says how many levels fit a run.
- One draw of ε per (site, batch, repeat) serves every σ level (common random numbers), drawn in the background
  while the previous job runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx

from walkaudit import _noise as noise_mod
from walkaudit._analysis.sweep import Counts
from walkaudit._execution import sizing
from walkaudit._execution.runtime import OutOfMemory, Runtime, failure, run, run_options
from walkaudit._graph import passes as rewrite
from walkaudit._graph.sites import Site
from walkaudit._loading.data import Dataset
from walkaudit._loading.model import LoadedModel
from walkaudit._noise import Noise, NormalSource
from walkaudit.errors import UsageError

#: Clean values kept per site between σ rounds (bytes).
CACHE_BYTES = 256 << 20

Progress = Callable[[int], None]


def predictions(out: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class [N], non-finite mask [N]). A row with NaN/Inf scores predicts no class (-1)."""
    if kind == "label":
        pred = out.reshape(-1).astype(np.int64)
        return pred, np.zeros(pred.shape, dtype=bool)
    scores = out.reshape(out.shape[0], -1)
    bad = ~np.isfinite(scores).all(axis=1)
    pred = np.where(bad, -1, np.argmax(np.nan_to_num(scores, nan=-np.inf), axis=1))
    return pred, bad


@dataclass
class Clean:
    """What the clean pass learnt."""

    targets: np.ndarray  # class id per sample: the labels, or the clean model's own predictions
    predictions: np.ndarray
    accuracy: float
    num_classes: int | None
    activation_std: dict[str, float]
    shapes: dict[str, tuple]  # each site's shape as run (dimension 0 is the batch)


@dataclass
class Engine:
    model: LoadedModel
    runtime: Runtime
    noise: Noise
    source: NormalSource
    sites: list[Site]
    batch_size: int | None = None  # None: sizing.DEFAULT_BATCH on the CPU, sized to the device's memory on CUDA
    noise_source: str = "auto"  # "host" | "graph" | "auto"
    notes: list[str] = field(default_factory=list)

    def __post_init__(self):
        # the clean pass reads every site (statistics, global mode) and what each site's suffix reads besides it
        # (its frontier), so that it can keep those values for the walk (`clean_pass(keep=True)`)
        out = self.model.class_output.name
        self._plans = {s.name: rewrite.suffix_plan(self.model.proto, s.name, out) for s in self.sites}
        self._reads = {site: (site, *frontier) for site, (_, frontier) in self._plans.items()}
        exposed = [n for names in self._reads.values() for n in names]
        self._clean = self.runtime.session(rewrite.expose(self.model.proto, exposed, self.model.types))
        self._kept: dict[int, dict[str, np.ndarray]] = {}  # batch index -> clean values kept by the clean pass
        self._kept_sites: set[str] = set()  # sites whose values the clean pass keeps and no walk has taken yet
        self.device_free = self.runtime.device_memory()  # None on the CPU
        if self.batch_size is None:
            self.batch_size = (sizing.DEFAULT_BATCH if self.device_free is None else
                               sizing.device_batch(self.device_free, sizing.row_bytes(self.model.proto.graph,
                                                                                      self.model.types)))
        self._input_names = {s.name for s in self.model.inputs}
        fixed = self.model.batch_size
        if fixed is not None and fixed != self.batch_size:
            self.notes.append(f"the model has a fixed batch size of {fixed}; evaluating {fixed} samples per run")
            self.batch_size = fixed
        self.evaluations = 0  # sample forward passes under noise, for the report
        if self.noise_source == "graph" and self.model.opset not in rewrite.GRAPH_NOISE_OPSETS:
            raise UsageError(f"--noise-source graph needs opset 10 to 21 (onnxruntime has no random ops at 22+); "
                             f"the model has opset {self.model.opset}")

    # -- the clean model ---------------------------------------------------------------------------------------
    def _batches(self, data: Dataset):
        """(start, valid rows, feeds) with the last batch padded to a fixed batch size when the model has one."""
        fixed = self.model.batch_size
        for start, feeds in data.batches(self.batch_size):
            n = len(next(iter(feeds.values())))
            if fixed is not None and n < fixed:
                feeds = {k: np.concatenate([v, np.repeat(v[-1:], fixed - n, axis=0)]) for k, v in feeds.items()}
            yield start, n, feeds

    def n_batches(self, data: Dataset) -> int:
        return -(-data.samples // self.batch_size)

    def clean_values(self, feeds: dict[str, np.ndarray], names: list[str], session=None) -> dict[str, np.ndarray]:
        """Clean values by name for one batch, from `session` (default: the clean model, sites exposed)."""
        wanted = [n for n in dict.fromkeys(names) if n not in self._input_names]
        values = dict(zip(wanted, run(session or self._clean, wanted, feeds)))
        values.update({n: feeds[n] for n in names if n in self._input_names})
        return values

    def clean_pass(self, data: Dataset, labels: np.ndarray | None, progress: Progress | None = None,
                   keep: bool = False) -> Clean:
        """Targets, clean accuracy and activation statistics. With `keep`, also keep what the walk's sites read
        (`Engine.walk`), as far as it fits in CACHE_BYTES (`_fitting`): their prefixes then need not run."""
        out = self.model.class_output
        stats = {s.name: np.zeros(3) for s in self.sites}  # count, sum, sum of squares
        preds, width, shapes = [], None, {}
        reads = [n for names in self._reads.values() for n in names] if keep else []
        kept: set[str] = set()
        for i, (_, n, feeds) in enumerate(self._batches(data)):
            values = self.clean_values(feeds, [out.name, *stats, *reads])
            if keep and i == 0:
                self._kept_sites = set(_fitting(self._reads, values, self.n_batches(data), CACHE_BYTES))
                kept = {r for site in self._kept_sites for r in self._reads[site]}
            if kept:
                self._kept[i] = {r: values[r] for r in kept}
            pred, _ = predictions(values[out.name], out.kind)
            preds.append(pred[:n])
            if out.kind == "scores":
                width = values[out.name].shape[-1]
            for name, acc in stats.items():
                shapes[name] = values[name].shape
                acc += _moments(values[name][:n])
            if progress:
                progress(n)
        pred = np.concatenate(preds)
        targets = pred if labels is None else labels
        std = {}
        for name, (count, total, squares) in stats.items():
            mean = total / max(count, 1)
            std[name] = float(np.sqrt(max(squares / max(count, 1) - mean * mean, 0.0)))
        num_classes = out.num_classes or width
        return Clean(targets, pred, float((pred == targets).mean()), num_classes, std, shapes)

    # -- noisy evaluation ------------------------------------------------------------------------------------------
    def walk(self, site: Site) -> SiteEvaluator:
        """The part of the model after the site, fed the site's clean value and the other clean values it reads.

        The noise is applied inside that graph (`rewrite.graph_noise`), with ε drawn by the host and fed in, or
        drawn in the graph (`uses_graph_noise`). Models before opset 10, or a site of unknown rank, get the noisy
        value computed on the host instead.
        """
        types = self.model.types
        suffix = rewrite.suffix(self.model.proto, site.name, self.model.class_output.name, types,
                                self._plans[site.name])
        kept = self._take(site.name)
        # the clean pass kept every batch of what this site reads: no prefix needed
        prefix = self._clean if kept else self._prefix(site, suffix)
        row = sizing.row_bytes(suffix.model.graph, types)
        in_graph = self.uses_graph_noise()
        if not in_graph and (self.model.opset < rewrite.FED_NOISE_MIN_OPSET or types[site.name].shape is None):
            session = self.runtime.session(suffix.model, f"part of the model after {site.name}")
            return SiteEvaluator(self, session, key=site.index, host=[site.name], passthrough=list(suffix.frontier),
                                 terms=[], prefix=prefix, row_bytes=row).holding(kept)
        sm, sa = self.noise.scales(np.ones(1))
        program = rewrite.graph_noise(suffix, types, sm is not None, sa is not None,
                                      seed=self.source.seed * 10007 + site.index, fed=not in_graph)
        session = self.runtime.session(program.model, f"part of the model after {site.name}")
        device = "cuda" if self.runtime.provider == "CUDAExecutionProvider" else "cpu"
        return SuffixEvaluator(self, session, key=site.index, host=[site.name], passthrough=list(suffix.frontier),
                               terms=[], prefix=prefix, program=program, device=device,
                               row_bytes=row).holding(kept)

    def _take(self, site: str) -> dict[int, dict[str, np.ndarray]]:
        """Hand over what the clean pass kept for `site` (batch index -> values), and forget what no later site
        reads. Empty when it was not kept."""
        if site not in self._kept_sites:
            return {}
        self._kept_sites.remove(site)
        taken = {i: {n: values[n] for n in self._reads[site]} for i, values in self._kept.items()}
        still = {r for s in self._kept_sites for r in self._reads[s]}
        for values in self._kept.values():
            for name in [n for n in values if n not in still]:
                del values[name]
        return taken

    @property
    def kept_bytes(self) -> int:
        return sum(v.nbytes for values in self._kept.values() for v in values.values())

    def _prefix(self, site: Site, suffix: rewrite.Suffix):
        proto = rewrite.prefix(self.model.proto, [site.name, *suffix.frontier], self.model.types)
        return self.runtime.session(proto, f"part of the model before {site.name}")

    def uses_graph_noise(self) -> bool:
        """ε drawn in the graph where it pays: on CUDA (noise stays on the device) and where the opset has random
        ops; or where asked for."""
        if self.noise_source == "auto":
            return self.runtime.provider == "CUDAExecutionProvider" and self.model.opset in rewrite.GRAPH_NOISE_OPSETS
        return self.noise_source == "graph"

    def global_(self) -> SiteEvaluator:
        """The whole model with noise after every site: applied in the graph from fed ε (`rewrite.inject_fed`)
        where every site is float32 of known rank and the opset is 10 or later, else from terms the host computes
        (`rewrite.inject`)."""
        sm, sa = self.noise.scales(np.ones(1))
        names = [s.name for s in self.sites]
        types = self.model.types
        key, row = len(self.sites) + 1, sizing.row_bytes(self.model.proto.graph, types)
        if self.model.opset >= rewrite.FED_NOISE_MIN_OPSET and all(
                types[n].elem_type == onnx.TensorProto.FLOAT and types[n].shape is not None for n in names):
            program = rewrite.inject_fed(self.model.proto, names, types, sm is not None, sa is not None)
            session = self.runtime.session(program.model, "model with noise at every site")
            return FedGlobalEvaluator(self, session, key=key, host=[], passthrough=[],
                                      terms=[rewrite.Injection(n, None, None) for n in names], feed_inputs=True,
                                      row_bytes=row, program=program)
        proto, injections = rewrite.inject(self.model.proto, names, types, sm is not None, sa is not None)
        session = self.runtime.session(proto, "model with noise at every site")
        return SiteEvaluator(self, session, key=key, host=[], passthrough=[], terms=injections, feed_inputs=True,
                             row_bytes=row)


@dataclass
class SiteEvaluator:
    """Runs one noisy program (a site's suffix, or the whole model with noise everywhere) over the data."""

    engine: Engine
    session: object
    key: int
    host: list[str]  # sites whose noisy value the host computes and feeds
    passthrough: list[str]  # clean values fed unchanged
    terms: list[rewrite.Injection]  # sites whose noise terms are fed as graph inputs
    feed_inputs: bool = False  # also feed the model's data inputs (global mode)
    prefix: object = None  # session computing the clean values this program reads (default: the clean model)
    packable: bool | None = None  # does the graph take a tiled batch (several σ levels in one run)?
    row_bytes: int = 1  # bytes per row of the values the program computes (sizes runs on a device)
    _cache: dict = field(default_factory=dict)  # batch index -> clean values, within CACHE_BYTES
    _cached: int = 0

    def holding(self, values: dict[int, dict[str, np.ndarray]]) -> SiteEvaluator:
        """Start with these clean values (batch index -> values) in the cache."""
        self._cache.update(values)
        self._cached += sum(v.nbytes for batch in values.values() for v in batch.values())
        return self

    def _values(self, data: Dataset, batches: range):
        """(start, valid rows, clean values) for the batches in range, from the cache when it holds them. The
        cache and what the engine still keeps for later sites share CACHE_BYTES."""
        engine = self.engine
        names = [*self.host, *self.passthrough, *(t.site for t in self.terms)]
        for i, (start, n, feeds) in enumerate(engine._batches(data)):
            if i < batches.start:
                continue
            if i >= batches.stop:
                break
            values = self._cache.get(i)
            if values is None:
                values = engine.clean_values(feeds, names, self.prefix)
                if self.feed_inputs:
                    values.update(feeds)
                size = sum(v.nbytes for v in values.values())
                if self._cached + size + engine.kept_bytes <= CACHE_BYTES:
                    self._cache[i] = values
                    self._cached += size
            yield start, n, values

    def _jobs(self, data: Dataset, batches: range, repeats: int, names: list[str]):
        """(start, valid rows, clean values, repeat, ε as a future) per batch and repeat, in order. Each job's ε is
        drawn in the background while the job before it runs."""
        source, pending = self.engine.source, None
        for start, n, values in self._values(data, batches):
            for r in range(repeats):
                job = (start, n, values, r, source.later(self._draw, values, names, start, r))
                if pending:
                    yield pending
                pending = job
        if pending:
            yield pending

    def _draw(self, values: dict, names: list[str], start: int, repeat: int) -> dict[str, np.ndarray]:
        """ε for each noisy site of a batch and repeat: [draws, 1, N, ...], shared by every σ level."""
        draws = self.engine.noise.draws
        return {name: self.engine.source.normal((draws, 1, *values[name].shape), (self.key, j, start, repeat))
                for j, name in enumerate(names)}

    def _feeds(self, values: dict, sigmas: np.ndarray, eps: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        g = len(sigmas)
        tiled_names = [*self.passthrough, *(self.engine._input_names if self.feed_inputs else ())]
        feeds = {n: _tile(values[n], g) for n in tiled_names}
        for name in self.host:
            y = values[name]
            noisy = noise_mod.noisy_levels(self.engine.noise, y, sigmas, eps[name], self.engine.source.map)
            feeds[name] = noisy.astype(y.dtype, copy=False).reshape(g * y.shape[0], *y.shape[1:])
        for inj in self.terms:
            y = values[inj.site]
            mul, add = self.engine.noise.terms(sigmas, eps[inj.site], dtype=y.dtype)
            for term, arr in ((inj.mul, mul), (inj.add, add)):
                if term:
                    feeds[term] = arr.reshape(g * y.shape[0], *y.shape[1:])
        return feeds

    def _run(self, start: int, values, sigmas, eps) -> np.ndarray:
        out = self.engine.model.class_output
        return run(self.session, [out.name], self._feeds(values, sigmas, eps), "noisy model")[0]

    def _choose_group(self, start: int, values: dict, levels: int) -> int:
        """How many σ levels one run takes: 1 unless a tiled batch reproduces the clean outputs at σ = 0."""
        if self.packable is None:
            zeros = {n: np.zeros((self.engine.noise.draws, 1, *values[n].shape), np.float32)
                     for n in [*self.host, *(t.site for t in self.terms)]}
            try:
                got = self._run(start, values, np.zeros(2), zeros)
                want = np.concatenate([self._run(start, values, np.zeros(1), zeros)] * 2)
                ok = got.shape == want.shape and np.allclose(got, want, rtol=1e-4, atol=1e-5, equal_nan=True)
            except Exception:
                ok = False
            self.packable = ok
            if not ok:
                self.engine.notes.append(f"site key {self.key}: the graph does not take a tiled batch; "
                                         "σ levels run one at a time")
        if not self.packable:
            return 1
        per_level = sum(values[n].size for n in [*self.host, *self.passthrough, *(t.site for t in self.terms)])
        rows = len(values[[*self.host, *(t.site for t in self.terms)][0]])
        return sizing.levels_per_run(levels, rows, per_level, self.row_bytes, self.engine.device_free)

    def evaluate(self, data: Dataset, targets: np.ndarray, sigmas, repeats: int,
                 progress: Progress | None = None, batches: range | None = None) -> Counts:
        """Correct predictions per (σ, repeat) over the data set's batches in range (default: all)."""
        batches = batches if batches is not None else range(self.engine.n_batches(data))
        sigmas = np.asarray(sigmas, dtype=np.float64)
        levels = len(sigmas)
        correct = np.zeros((levels, repeats), dtype=np.int64)
        nonfinite = np.zeros((levels, repeats), dtype=np.int64)
        kind = self.engine.model.class_output.kind
        noisy_sites = [*self.host, *(t.site for t in self.terms)]
        samples, group = 0, None
        for start, n, values, r, drawn in self._jobs(data, batches, repeats, noisy_sites):
            samples += n if r == 0 else 0
            target = targets[start : start + n]
            group = group or self._choose_group(start, values, levels)
            eps = drawn.result()
            g0 = 0
            while g0 < levels:
                chunk = sigmas[g0 : g0 + group]
                try:
                    out = self._run(start, values, chunk, eps)
                except OutOfMemory:
                    if group == 1:
                        raise
                    group = max(1, group // 2)
                    self.engine.notes.append(f"out of memory: fewer σ levels per run ({group})")
                    continue
                pred, bad = predictions(out, kind)
                pred = pred.reshape(len(chunk), -1)[:, :n]
                bad = bad.reshape(len(chunk), -1)[:, :n]
                correct[g0 : g0 + len(chunk), r] += (pred == target).sum(axis=1)
                nonfinite[g0 : g0 + len(chunk), r] += bad.sum(axis=1)
                self.engine.evaluations += len(chunk) * n
                if progress:
                    progress(len(chunk) * n)
                g0 += len(chunk)
        return Counts(correct, nonfinite, samples)


@dataclass
class SuffixEvaluator(SiteEvaluator):
    """A site's suffix that applies the noise itself and tiles the σ levels itself (`rewrite.graph_noise`).

    Runs through IOBinding: on CUDA the clean values of a batch are copied to the device once and kept there with
    the rest of the cache; ε drawn in the graph never leaves the device, and ε from the host crosses once per
    (batch, repeat) whatever the number of levels. Only σ, ε and the class output cross the bus.
    """

    program: rewrite.GraphNoise | None = None
    device: str = "cpu"
    _on_device: dict = field(default_factory=dict)  # batch index -> clean values as OrtValues on the device
    _last: int | None = None  # the batch most recently put on the device

    def _values(self, data: Dataset, batches: range):
        ort = self.engine.runtime._ort
        for start, n, values in super()._values(data, batches):
            i = start // self.engine.batch_size
            if i not in self._on_device:
                # device copies live as long as their batch is cached, plus the batch before (its ε was drawn ahead
                # and it may still be running): never one per batch of the data set
                for old in [k for k in self._on_device if k not in self._cache and k != self._last]:
                    del self._on_device[old]
                self._on_device[i] = {k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(values[k]),
                                                                           self.device, 0)
                                      for k in (*self.host, *self.passthrough)}
                self._last = i
            yield start, n, values

    def _draw(self, values, names, start, repeat):
        if self.program.eps_mul is None and self.program.eps_add is None:
            return {}  # drawn inside the graph
        return super()._draw(values, names, start, repeat)

    def _run(self, start: int, values, sigmas, eps) -> np.ndarray:
        program, out = self.program, self.engine.model.class_output.name
        site = self.host[0]
        rank = values[site].ndim
        dtype = values[site].dtype
        io = self.session.io_binding()
        device = self._on_device[start // self.engine.batch_size]
        io.bind_ortvalue_input(program.site, device[site])
        for f, name in zip(self.passthrough, program.frontier):
            io.bind_ortvalue_input(name, device[f])
        sm, sa = self.engine.noise.scales(sigmas)
        for name, scale in ((program.sigma_mul, sm), (program.sigma_add, sa)):
            if name:
                io.bind_cpu_input(name, scale.astype(dtype).reshape(-1, *([1] * (rank + 1))))
        for name, term in ((program.eps_mul, 0), (program.eps_add, -1)):  # as in noise.noisy_levels
            if name:
                io.bind_cpu_input(name, np.ascontiguousarray(eps[site][term], dtype=dtype))
        io.bind_output(out, "cpu")
        try:
            self.session.run_with_iobinding(io, run_options())
        except Exception as exc:
            raise failure(exc, "noisy model") from None
        return io.copy_outputs_to_cpu()[0]


@dataclass
class FedGlobalEvaluator(SiteEvaluator):
    """The model with noise after every site (`rewrite.inject_fed`): fed the tiled inputs, σ per level and one ε
    per site and term; the graph applies the noise."""

    program: rewrite.FedNoise | None = None

    def _feeds(self, values: dict, sigmas: np.ndarray, eps: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {n: _tile(values[n], len(sigmas)) for n in self.engine._input_names}
        sm, sa = self.engine.noise.scales(sigmas)
        for name, scale in ((self.program.sigma_mul, sm), (self.program.sigma_add, sa)):
            if name:
                feeds[name] = scale.astype(np.float32)
        for site, eps_mul, eps_add in self.program.eps:  # as in noise.noisy_levels: ε[0] multiplies, ε[-1] adds
            for name, term in ((eps_mul, 0), (eps_add, -1)):
                if name:
                    feeds[name] = eps[site][term]
        return feeds


def _moments(v: np.ndarray) -> tuple[int, float, float]:
    """(count, sum, sum of squares) of the finite values, accumulated in float64 without a float64 copy."""
    total = float(v.sum(dtype=np.float64))
    squares = float(np.square(v).sum(dtype=np.float64))
    if not (np.isfinite(total) and np.isfinite(squares)):
        v = v[np.isfinite(v)]
        return v.size, float(v.sum(dtype=np.float64)), float(np.square(v.astype(np.float64)).sum())
    return v.size, total, squares


def _fitting(reads: dict[str, tuple[str, ...]], batch: dict[str, np.ndarray], batches: int, budget: int) -> list[str]:
    """The sites whose reads (site and frontier) over all batches fit in `budget` together, estimated from the first
    batch; a value read by several sites counts once. Later sites are taken first: their prefixes cost the most to
    run again, and their values are usually the smallest. Returned in walk order."""
    chosen, held, total = set(), set(), 0
    for site, names in reversed(reads.items()):
        extra = sum(batch[n].nbytes for n in set(names) - held) * batches
        if total + extra <= budget:
            chosen.add(site)
            held |= set(names)
            total += extra
    return [site for site in reads if site in chosen]


def _tile(a: np.ndarray, times: int) -> np.ndarray:
    return a if times == 1 else np.concatenate([a] * times)
