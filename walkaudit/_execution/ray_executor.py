"""`RayExecutor`: the clean pass and the work units run by Ray actors (`--ray`, the `ray` extra).

- Each actor holds one `Worker`, built once from the driver's `ResolvedAudit` (`resolved.py`: the model's bytes,
  the class output, the data's path or its arrays with the resolved labels, the sites, the batch size, ...), never
  from the user's options. It is `ray.put` once; every actor gets the reference and reads its rows from the path
  (memory-mapped) or the arrays zero-copy from its node's object store. The driver keeps the reference for as long
  as the executor lives, so that a replacement actor can rebuild.
- One actor per GPU (`num_gpus=1`, provider cuda) when the cluster has GPUs and the provider allows them; otherwise
  one per group of CPU cores (`--threads`, default `CPUS_PER_WORKER`), with onnxruntime's and the noise's threads set
  to the cores it was given (Ray's OMP_NUM_THREADS=1 does not bind onnxruntime).
- Each actor owns a contiguous slice of the samples (`slices`: whole batches of the data grid, near-equal). It runs
  the clean pass over its slice (keeping the clean values the walk's sites read, as the in-process worker does for
  all the data) and serves the units of its slice only; the driver adds the actors' CleanStats (exact: per block)
  and runs the model on no sample itself. An actor's work is then what the in-process worker does for those rows.
- `split` cuts a request at the slices' bounds, then into pieces of about `PIECE_SECONDS` each, from the cost per
  sample × σ level × repeat measured on finished pieces (per site; other sites' median before a site's first piece),
  on the data grid's batch boundaries where it can; each piece goes to the actor that owns its rows.
- Faults: an actor that died is replaced (`MAX_RESTARTS` per slice): the new one runs the clean pass over the slice
  again, then gets the pieces the dead one held. A request the cluster can never meet fails at `connect`, before
  any work; actors that disagree on the onnxruntime or walkaudit version or on the provider are refused.
- Counts of disjoint block ranges add up exactly and ε depends on (seed, site, block, repeat) only, so the report
  equals the in-process one, timings and runtime fields aside. Graph-drawn ε (`--noise-source graph`) is drawn
  anew by each session, so it is refused here and `auto` draws on the host.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import os
import time
from typing import TYPE_CHECKING, Any

from walkaudit._units import BLOCK, CleanStats, Counts, WorkUnit, block_rows
from walkaudit.errors import RuntimeFailure, UsageError, WalkauditError

if TYPE_CHECKING:
    from walkaudit._execution.worker import Worker

INSTALL = 'Ray is not installed: pip install "walkaudit[ray]" (from a checkout: pip install ".[ray]")'

#: Seconds of work a piece aims at: long against the ~1-3 ms a call costs, short enough to balance the actors.
PIECE_SECONDS = 0.3
#: CPU cores per actor on a cluster without GPUs, when --threads does not say.
CPUS_PER_WORKER = 2
#: How often a dead actor is replaced, and how often a piece is sent before the audit gives up.
MAX_RESTARTS = 3
MAX_ATTEMPTS = 4
#: Seconds to wait for the actors to start and build their workers.
START_TIMEOUT = 300.0


def _ray():
    try:
        import ray
    except ImportError:
        raise UsageError(INSTALL) from None
    return ray


# -- the actor ---------------------------------------------------------------------------------------------------------
class _Host:
    """A Ray actor's body: one Worker built from the resolved audit; evaluates units and says how long they took.

    Started at `connect` (the imports take a second or more) while the driver loads the model and the data; `setup`
    then builds the worker from the resolved audit."""

    def __init__(self, threads: int, provider: str):
        began = time.perf_counter()
        import onnxruntime

        from walkaudit import __version__
        from walkaudit._execution import resolved, worker  # noqa: F401  (imported now, while the driver works)

        self.threads, self.provider = threads, provider
        self.error: str | None = "not set up"
        self.worker: Worker | None = None
        self.rows: range | None = None
        self.info = {"onnxruntime": onnxruntime.__version__, "walkaudit": __version__, "provider": None,
                     "threads": threads, "pid": os.getpid(), "error": None,
                     "import_s": time.perf_counter() - began, "build_s": None}

    def setup(self, audit: list) -> dict:
        """Build the worker from [a reference to the resolved audit] (nested: the actor reads it from the object
        store itself, zero-copy) and describe this actor."""
        import ray

        self.error, began = None, time.perf_counter()
        try:
            self.worker = ray.get(audit[0]).build(threads=self.threads, provider=self.provider)
            self.info["build_s"] = time.perf_counter() - began
            self.info["provider"] = self.worker.runtime.provider
        except WalkauditError as exc:
            self.error = str(exc)
        except Exception as exc:  # a worker that cannot be built is reported by the driver, in one line
            self.error = f"{type(exc).__name__}: {exc}"
        self.info["error"] = self.error
        return self.info

    def describe(self) -> dict:
        return self.info

    def usage(self) -> float:
        """CPU seconds this actor's process used, its start included."""
        return time.process_time()

    def clean(self, start: int, stop: int, keep: bool) -> tuple:
        """The clean pass over rows [start, stop) (whole batches of the grid), which this actor then serves:
        (CleanStats, the worker's notes, seconds)."""
        if self.worker is None:
            raise RuntimeFailure(f"a Ray worker could not be built: {self.error}")
        t = time.perf_counter()
        stats = self.worker.clean_pass(keep=keep, rows=range(start, stop))
        self.rows = range(start, stop)
        return stats, list(self.worker.notes), time.perf_counter() - t

    def evaluate(self, units: list[WorkUnit]) -> tuple[list[Counts], float, bool]:
        """(counts per unit, seconds, whether these sites' first units ran here: sessions built, prefixes run)."""
        if self.worker is None:
            raise RuntimeFailure(f"a Ray worker could not be built: {self.error}")
        if self.rows is None:
            raise RuntimeFailure("a Ray worker got work units before its clean pass")
        for unit in units:
            rows = block_rows(unit.block_range, self.worker.data.samples)
            if rows.start < self.rows.start or rows.stop > self.rows.stop:
                raise RuntimeFailure(f"a work unit for blocks {unit.blocks} reached the Ray worker of rows "
                                     f"{self.rows.start}-{self.rows.stop}")
        fresh = (units[0].mode, units[0].sites) not in self.worker._evaluations
        t = time.perf_counter()
        counts = [self.worker.evaluate(unit) for unit in units]
        return counts, time.perf_counter() - t, fresh

    def release(self, sites: tuple[str, ...]) -> int:
        """Drop what this actor holds for finished sites (`Worker.release`); its evaluations still alive."""
        if self.worker is not None:
            self.worker.release(tuple(sites))
        return 0 if self.worker is None else self.worker.live_evaluations


# -- connecting ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Plan:
    """What each actor asks of the cluster, and how many there are."""

    actors: int
    cpus: float  # num_cpus per actor
    gpus: int  # num_gpus per actor (0 or 1)
    threads: int  # onnxruntime and noise threads per actor
    provider: str  # "cuda" or "cpu"


def _local(ray) -> bool:
    """Whether every alive node of the cluster is this machine."""
    try:
        here = ray.util.get_node_ip_address()
        return all(n.get("NodeManagerAddress") == here for n in ray.nodes() if n.get("Alive"))
    except Exception:  # an older or remote client API: assume the files are not shared
        return False


def _nodes(ray) -> list[dict]:
    return [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]


def plan(nodes: list[dict], provider: str, threads: int | None, workers: int | None = None) -> Plan:
    """The actors for a cluster whose nodes have these resources (pure: tested without Ray).

    GPUs, when the provider allows them: one actor per GPU, with the node's CPUs shared among its GPUs. Else one
    actor per `threads` (default CPUS_PER_WORKER, at most a node's CPUs) cores. UsageError when it can never be met.
    """
    gpus = [(int(n.get("GPU", 0)), int(n.get("CPU", 0))) for n in nodes]
    cpus = [int(n.get("CPU", 0)) for n in nodes]
    if provider == "cuda" and not any(g for g, _ in gpus):
        raise UsageError("--provider cuda: the Ray cluster has no GPUs")
    if provider != "cpu" and any(g for g, _ in gpus):
        share = min(c // g for g, c in gpus if g)
        actors = sum(g for g, _ in gpus)
        if threads is not None and threads > share:
            raise UsageError(f"--threads {threads}: the Ray cluster has {share} CPUs per GPU")
        use = threads or max(share, 1)
        actors = min(actors, workers) if workers else actors
        return Plan(actors, float(use if share >= 1 else 0), 1, use, "cuda")
    biggest = max(cpus, default=0)
    if biggest < 1:
        raise UsageError("the Ray cluster has no CPUs to run workers on")
    if threads is not None and threads > biggest:
        raise UsageError(f"--threads {threads}: no node of the Ray cluster has {threads} CPUs (the largest has "
                         f"{biggest})")
    use = threads or min(CPUS_PER_WORKER, biggest)
    actors = sum(c // use for c in cpus)
    if workers is not None:
        if workers > actors:
            raise UsageError(f"{workers} Ray workers of {use} CPUs do not fit the cluster's CPUs ({sum(cpus)})")
        actors = workers
    return Plan(actors, float(use), 0, use, "cpu")


class Ray:
    """A connection to a Ray cluster, made at once so that a request it can never meet fails before any work;
    called with a resolved audit and a progress display it gives the audit's RayExecutor (`iter_audit(executor=...)`).

    address None: the cluster this process already joined, else a new local one (shut down at `close`);
    "auto", "ray://host:10001" or "host:6379": an existing cluster (left running).
    """

    def __init__(self, address: str | None = None, config=None, *, workers: int | None = None,
                 threads: int | None = None, piece_seconds: float = PIECE_SECONDS, init: dict | None = None,
                 shared_files: bool | None = None):
        """`workers`: how many actors (default: as many as fit); `threads`: CPU cores per actor (default: the
        config's threads, else CPUS_PER_WORKER, or a GPU's share of its node); `init`: more ray.init options."""
        ray = _ray()
        provider = getattr(config, "provider", "auto")
        threads = threads or getattr(config, "threads", None)
        if getattr(config, "noise_source", "auto") == "graph":
            raise UsageError("--noise-source graph cannot run on Ray: RandomNormalLike draws anew in each worker's "
                             "session, so the report would depend on where units ran; use host draws")
        self.owner = False
        if not ray.is_initialized():
            options = {"include_dashboard": False, "logging_level": "ERROR", "log_to_driver": False,
                       **(init or {})}
            try:
                if address is None:
                    ray.init(**options)
                    self.owner = True
                else:
                    ray.init(address=address, **{k: v for k, v in options.items() if k != "include_dashboard"})
            except WalkauditError:
                raise
            except Exception as exc:
                where = "a local Ray cluster" if address is None else f"the Ray cluster at {address}"
                raise RuntimeFailure(f"cannot start or join {where}: {_first_line(exc)}") from None
        self.ray, self.warm = ray, []
        try:
            self.plan = plan(_nodes(ray), provider, threads, workers)
        except UsageError:
            self.close()
            raise
        self.piece_seconds = piece_seconds
        #: do the workers see the driver's files? (a local cluster does; a multi-node one when told so): then they
        #: read the data from its path, each its own sample ranges, instead of receiving the arrays
        self.shared_files = shared_files if shared_files is not None else _local(ray)
        p = self.plan
        # a dead actor is replaced by the driver (`RayExecutor._settle`), not restarted by Ray: Ray would run the
        # pieces it held again out of order, and pieces are sent again from the driver anyway
        self.remote = ray.remote(num_cpus=p.cpus, num_gpus=p.gpus, max_restarts=0)(_Host)
        self.warm = [self.start() for _ in range(p.actors)]  # they import while the driver loads the model and data

    def start(self):
        """A new actor (it sets up when its `setup` call arrives; calls sent meanwhile wait)."""
        return self.remote.remote(self.plan.threads, self.plan.provider)

    def __call__(self, audit, progress) -> RayExecutor:
        return RayExecutor(audit, progress, self)

    def close(self) -> None:
        for actor in self.warm:  # never handed to an executor
            _kill(self.ray, actor)
        self.warm = []
        if self.owner and self.ray.is_initialized():
            self.ray.shutdown()
        self.owner = False


#: how long `connect` waits for a cluster's address to answer before it gives up (Ray itself retries for minutes)
CONNECT_TIMEOUT_S = 10.0


def connect(address: str | None = None, config=None, *, timeout: float = CONNECT_TIMEOUT_S, **options) -> Ray:
    """`Ray(address, config)`: the executor factory for `iter_audit(executor=...)`.

    An address of a cluster ('HOST:PORT', 'ray://HOST[:PORT]') is first reached with a plain TCP connection of at
    most `timeout` seconds: nothing there is one RuntimeFailure line (exit 3) at once, instead of Ray's minutes of
    retries and raw log lines. Python warnings Ray gives while connecting (the Ray Client's) are not shown."""
    import socket
    import warnings

    if address is not None and address != "auto":
        client = address.startswith("ray://")
        host, _, port = address.removeprefix("ray://").rpartition(":")
        if not host or not port.isdigit():
            host, port = address.removeprefix("ray://"), "10001" if client else "6379"
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
                pass
        except OSError as exc:
            why = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc) or type(exc).__name__)
            kind = "Ray Client" if client else "GCS"
            raise RuntimeFailure(f"cannot join the Ray cluster at {address}: {host}:{port} does not answer "
                                 f"({why}); is the cluster running, and is that its {kind} port?") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Ray(address, config, **options)


def check_workers(infos: list[dict], version: str | None) -> None:
    """Refuse actors that could not build their worker, or that differ in onnxruntime or walkaudit version or in
    provider (among themselves, or in onnxruntime version from this process's `version`): RuntimeFailure."""
    errors = [i["error"] for i in infos if i.get("error")]
    if errors:
        raise RuntimeFailure(f"a Ray worker could not build the audit: {errors[0]}")
    for key, what in (("onnxruntime", "onnxruntime versions"), ("walkaudit", "walkaudit versions"),
                      ("provider", "providers")):
        seen = sorted({str(i[key]) for i in infos})
        if len(seen) > 1:
            raise RuntimeFailure(f"the Ray workers run different {what} ({', '.join(seen)}); the report would "
                                 "depend on where units ran")
    if version is not None and infos and infos[0]["onnxruntime"] != version:
        raise RuntimeFailure(f"the Ray workers run onnxruntime {infos[0]['onnxruntime']} but this process runs "
                             f"{version}; install the same version everywhere")


def slices(samples: int, batch: int, actors: int) -> list[range]:
    """The rows of each actor: at most `actors` contiguous, near-equal slices of whole batches of the data grid that
    start on a block (multiples of lcm(batch, BLOCK) rows), covering every sample (pure)."""
    grain = math.lcm(batch, BLOCK)
    grains = max(1, -(-samples // grain))
    n = max(1, min(actors, grains))
    bounds = [min(samples, grain * (i * grains // n)) for i in range(n)] + [samples]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def _cause(exc) -> BaseException:
    """What to raise for a call that raised on an actor: its walkaudit error as it is, else a RuntimeFailure."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, WalkauditError):
        return cause
    return RuntimeFailure(f"a Ray worker failed: {_first_line(cause or exc)}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


# -- the executor ----------------------------------------------------------------------------------------------------
class _Piece:
    """A handle: one unit, evaluated in a call (alone or with other small units of the same site and σ levels)."""

    __slots__ = ("unit", "call", "counts")
    unit: WorkUnit
    call: _Call | None  # set when the call that evaluates it is made
    counts: Counts | None  # set when that call finished

    def __init__(self, unit: WorkUnit):
        self.unit, self.call, self.counts = unit, None, None


class _Call:
    """One actor call: its units' pieces, where it runs now, how often it was sent, its estimated cost."""

    __slots__ = ("pieces", "cost", "ref", "actor", "handle", "attempts", "sent")
    pieces: list[_Piece]
    cost: float
    ref: Any  # the ray.ObjectRef of the call's result, while it runs
    actor: int | None  # the slice (and actor) it was last sent to
    handle: Any  # that actor (a ray.actor.ActorHandle)
    attempts: int
    sent: float

    def __init__(self, pieces: list[_Piece], cost: float):
        self.pieces, self.cost = pieces, cost
        for piece in pieces:
            piece.call = self
        self.ref = self.actor = self.handle = None
        self.attempts, self.sent = 0, 0.0

    @property
    def sites(self) -> tuple[str, ...]:
        return self.pieces[0].unit.sites


class RayExecutor:
    """Runs the clean pass and evaluates work units on Ray actors, each with its own Worker and its own slice of the
    samples (see the module's docstring)."""

    def __init__(self, audit, progress, cluster: Ray | None = None):
        """`audit`: the driver's `ResolvedAudit`, the model's bytes attached; `progress`: the display."""
        import onnxruntime

        self.cluster = cluster or Ray(None, audit)
        ray = self.ray = self.cluster.ray
        self._dead = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                      ray.exceptions.ObjectLostError, ray.exceptions.OutOfMemoryError)  # what an actor's death raises
        self.progress = progress
        self.samples = audit.data.samples
        batch = audit.batch_size
        self.align = batch // BLOCK if batch % BLOCK == 0 else 1  # blocks per batch of the data grid
        self.piece_seconds = self.cluster.piece_seconds
        self.notes: list[str] = []  # the notes every actor's clean pass gave
        self.graph_draws = False  # graph-drawn ε would differ per worker: drawn on the host (below)
        p = self.cluster.plan
        #: each actor's rows: whole batches of the grid (so its clean values are the in-process run's, bit for bit)
        self.slices = slices(self.samples, batch, p.actors)
        self.starts = [s.start // BLOCK for s in self.slices]  # each slice's first block
        if audit.noise_source == "auto":
            audit = dataclasses.replace(audit, noise_source="host")
        # workers read their own sample ranges from the data's path (memory-mapped, never the whole set through the
        # driver) when it is visible to them; otherwise the arrays travel through the object store (zero-copy per
        # node)
        if not self.cluster.shared_files:
            audit = audit.with_arrays()
        self.audit = ray.put(audit)  # kept: an actor that replaces a dead one is built from it
        self.version = onnxruntime.__version__
        self._setups: list = []
        self.keep: bool | None = None  # the clean pass's `keep`, once it was asked for
        self.cleaning: list = []  # per slice: the reference to its actor's clean pass
        warm, self.cluster.warm = self.cluster.warm, []
        for actor in warm[len(self.slices):]:  # more actors than slices (little data): not needed
            _kill(ray, actor)
        warm = warm[: len(self.slices)]
        self.actors = [self._new(actor) for actor in warm + [None] * (len(self.slices) - len(warm))]
        self.alive = list(range(len(self.actors)))
        self.failures = [0] * len(self.actors)
        self.load = [0.0] * len(self.actors)  # estimated seconds queued per actor
        self.queued = [0] * len(self.actors)  # calls queued per actor
        self.rates: dict[tuple[str, ...], float] = {}  # seconds per sample × level × repeat, per site
        self.cold: set[tuple[str, ...]] = set()  # sites whose rate comes from a first piece only
        self.resent = 0  # calls sent again
        self.pieces = self.calls = 0
        self.buffer: list[_Piece] = []  # submitted, not sent yet
        self.busy = 0.0  # seconds the actors spent evaluating
        self.clean_s = 0.0  # seconds the actors spent on the clean pass (the slowest one's)
        self.latency: list[float] = []  # seconds from send to result, minus the actor's own (queueing included)
        self.sites_in_flight = 2 * len(self.actors)
        started = time.perf_counter()
        self.info = self._start()
        self.start_s = time.perf_counter() - started  # the actors' start, after `ray.put` and their creation
        self.cpu_s: float | None = None  # CPU seconds of the actors, measured at `close`

    @property
    def note(self) -> str:
        """For the report: where the units ran (the report's runtime fields describe the driver)."""
        providers = sorted({info.get("provider", "?") for info in self.info})
        return f"work units evaluated on {len(self.actors)} Ray workers ({', '.join(providers)})"

    def _new(self, actor=None, slot: int | None = None):
        """An actor (new unless given) set up with the resolved audit: its worker builds while calls sent to it wait.
        One that replaces the actor of `slot` after the clean pass also runs the clean pass over that slice again."""
        actor = actor or self.cluster.start()
        self._setups.append(actor.setup.remote([self.audit]))
        if slot is not None and self.keep is not None:
            rows = self.slices[slot]
            self.cleaning[slot] = actor.clean.remote(rows.start, rows.stop, self.keep)
        return actor

    def _start(self) -> list[dict]:
        """Wait for every actor to build its worker; refuse failures and mixed versions or providers."""
        ray = self.ray
        try:
            infos = ray.get(self._setups, timeout=START_TIMEOUT)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise RuntimeFailure(f"the Ray workers did not start within {START_TIMEOUT:.0f} s (are the cluster's "
                                 "resources taken by other jobs?)") from None
        except Exception as exc:
            self.close()
            raise RuntimeFailure(f"a Ray worker failed to start: {_first_line(exc)}") from None
        try:
            check_workers(infos, self.version)
        except RuntimeFailure:
            self.close()
            raise
        return infos

    # -- the clean pass ----------------------------------------------------------------------------------------------
    def clean_pass(self, progress, keep: bool) -> CleanStats:
        """Each actor's clean pass over its slice, at once; their CleanStats added in slice order (the in-process
        pass's, bit for bit). The notes every slice gave (a constant model's) are the executor's."""
        ray = self.ray
        self.keep = keep
        self.cleaning = [actor.clean.remote(rows.start, rows.stop, keep)
                         for actor, rows in zip(self.actors, self.slices)]
        results: list = [None] * len(self.slices)
        while any(r is None for r in results):
            pending = {self.cleaning[a]: a for a, r in enumerate(results) if r is None}
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                a = pending[ref]
                try:
                    results[a] = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:
                    raise _cause(exc) from None
                except self._dead as exc:
                    self._died(a, exc)  # a new actor runs this slice's clean pass again
                    continue
                progress(len(self.slices[a]))
        self.clean_s = max(seconds for _, _, seconds in results)
        stats = results[0][0]
        for other, _, _ in results[1:]:
            stats = stats + other
        common = [n for n in results[0][1] if all(n in notes for _, notes, _ in results[1:])]
        self.notes.extend(n for n in common if n not in self.notes)
        return stats

    # -- cutting -------------------------------------------------------------------------------------------------
    def _rate(self, names: tuple[str, ...]) -> float | None:
        rate = self.rates.get(names)
        if rate is None and self.rates:
            known = sorted(self.rates.values())
            rate = known[len(known) // 2]
        return rate

    def _work(self, unit: WorkUnit) -> int:
        """Sample forward passes under noise the unit stands for."""
        return len(unit.sigmas) * unit.repeats * len(block_rows(unit.block_range, self.samples))

    def owner(self, blocks: tuple[int, int]) -> int:
        """The slice (and actor) that holds a block range cut at the slices' bounds."""
        return bisect.bisect_right(self.starts, blocks[0]) - 1

    def split(self, unit: WorkUnit) -> list[WorkUnit]:
        """The unit cut at the slices' bounds, each part into pieces of about `piece_seconds` (once measured)."""
        start, stop = unit.blocks
        rate = self._rate(unit.sites)
        bounds = [*self.starts[1:], stop]  # the last slice ends at the data's end, so the unit's stop bounds it
        out = []
        for first, end in zip(self.starts, bounds):
            lo, hi = max(start, first), min(stop, end)
            if lo >= hi:
                continue
            part = dataclasses.replace(unit, blocks=(lo, hi))
            pieces = 1 if rate is None else math.ceil(rate * self._work(part) / self.piece_seconds)
            pieces = max(1, min(pieces, hi - lo))
            out += [dataclasses.replace(unit, blocks=b) for b in _cut(lo, hi, pieces, self.align)]
        return out or [unit]

    # -- sending -------------------------------------------------------------------------------------------------
    def _send(self, call: _Call) -> None:
        a = self.owner(call.pieces[0].unit.blocks)
        call.actor, call.attempts, call.sent = a, call.attempts + 1, time.perf_counter()
        self.load[a] += call.cost
        self.queued[a] += 1
        call.handle = self.actors[a]
        call.ref = call.handle.evaluate.remote([p.unit for p in call.pieces])

    def submit(self, unit: WorkUnit) -> _Piece:
        """Queue the unit; `wait` sends the queued units, small ones of a site, σ levels and actor together."""
        piece = _Piece(unit)
        self.buffer.append(piece)
        return piece

    def _flush(self) -> None:
        """Send the queued units: each group of one site, σ levels and actor in calls of about `piece_seconds`
        (one call before anything was measured), in block order."""
        groups: dict[tuple, list[_Piece]] = {}
        for piece in self.buffer:
            key = (dataclasses.replace(piece.unit, blocks=(0, 0)), self.owner(piece.unit.blocks))
            groups.setdefault(key, []).append(piece)
        self.buffer = []
        for pieces in groups.values():
            pieces.sort(key=lambda p: p.unit.blocks)
            rate = self._rate(pieces[0].unit.sites)
            costs = [rate * self._work(p.unit) if rate is not None else 0.0 for p in pieces]
            call: list[_Piece] = []
            spent = 0.0
            for piece, cost in zip(pieces, costs):
                if call and rate is not None and spent + cost > self.piece_seconds:
                    self._send(_Call(call, spent))
                    call, spent = [], 0.0
                call.append(piece)
                spent += cost
            if call:
                self._send(_Call(call, spent))

    def _died(self, a: int, exc: BaseException) -> None:
        """The actor of slice `a` died (as a call of `self.actors[a]` told): replace it, its clean pass again."""
        self.failures[a] += 1
        if self.failures[a] > MAX_RESTARTS:
            raise RuntimeFailure(f"the Ray worker of samples {self.slices[a].start}-{self.slices[a].stop} died "
                                 f"{self.failures[a]} times: {_first_line(exc)}")
        self.actors[a] = self._new(slot=a)

    def _settle(self, call: _Call) -> bool:
        """Collect a finished call's counts (True), or send it again when its actor died (False)."""
        ray, a = self.ray, call.actor
        assert a is not None  # only a call that was sent (`_send` sets its actor) is settled
        self.load[a] = max(0.0, self.load[a] - call.cost)
        self.queued[a] -= 1
        try:
            counts, seconds, fresh = ray.get(call.ref)
        except ray.exceptions.RayTaskError as exc:  # the evaluation raised: the same error here
            raise _cause(exc) from None
        except self._dead as exc:
            if self.actors[a] is call.handle and not isinstance(exc, ray.exceptions.ActorUnavailableError):
                self._died(a, exc)  # the first of its calls to tell: replace it (once per death)
            if call.attempts >= MAX_ATTEMPTS:
                raise RuntimeFailure(f"a work unit failed on {call.attempts} Ray workers in turn: "
                                     f"{_first_line(exc)}") from None
            self.resent += 1
            self._send(call)  # to the actor of its slice: the new one
            return False
        self.pieces += len(call.pieces)
        self.calls += 1
        self.busy += seconds
        self.latency.append(time.perf_counter() - call.sent - seconds)
        work, names = sum(c.evaluations for c in counts), call.sites
        if work:  # a first call (sessions built) only stands in until a warm one is measured
            rate, old = seconds / work, self.rates.get(names)
            if old is None or (names in self.cold and not fresh):
                self.rates[names] = rate
                (self.cold.add if fresh else self.cold.discard)(names)
            elif not fresh:
                self.rates[names] = 0.5 * (old + rate)
        for piece, c in zip(call.pieces, counts):
            piece.counts = c
        call.ref = None
        self.progress.advance(work)
        return True

    def wait(self, handles: list) -> list:
        ray = self.ray
        if self.buffer:
            self._flush()
        done = [h for h in handles if h.counts is not None]
        while not done:
            calls = {h.call.ref: h.call for h in handles if h.counts is None}
            ready, _ = ray.wait(list(calls), num_returns=1)
            more, _ = ray.wait(list(calls), num_returns=len(calls), timeout=0)
            for ref in dict.fromkeys([*ready, *more]):
                self._settle(calls[ref])
            done = [h for h in handles if h.counts is not None]
        return done

    def result(self, handle: _Piece) -> Counts:
        if handle.counts is None:
            raise RuntimeError("RayExecutor.result: a unit's counts asked for before `wait` returned it as done")
        return handle.counts

    def release(self, sites: tuple[str, ...]) -> None:
        """Tell every actor that these sites' searches are done (actors run calls in order: after their units)."""
        self.released = [actor.release.remote(tuple(sites)) for actor in self.actors]

    def stats(self) -> dict:
        """What the run cost: pieces, pieces sent again, seconds the actors worked, the wait per piece beyond it."""
        trips = sorted(self.latency)
        return {"actors": len(self.failures), "threads": self.cluster.plan.threads, "pieces": self.pieces,
                "calls": self.calls, "resent": self.resent, "busy_s": self.busy, "start_s": self.start_s,
                "clean_s": self.clean_s, "cpu_s": self.cpu_s, "slices": [(s.start, s.stop) for s in self.slices],
                "latency_ms_median": 1e3 * trips[len(trips) // 2] if trips else None,
                "rates": {",".join(k): v for k, v in self.rates.items()}}

    def close(self) -> None:
        ray = self.ray
        try:
            if self.actors:
                self.cpu_s = sum(ray.get([a.usage.remote() for a in self.actors], timeout=5))
        except Exception:  # a dead actor, a cluster gone: the figure is only for benchmarks
            pass
        for actor in getattr(self, "actors", []):
            _kill(ray, actor)
        self.actors, self.alive = [], []
        self.audit = None
        self.cluster.close()


def _kill(ray, actor) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # gone already
        pass


def _cut(start: int, stop: int, pieces: int, align: int) -> list[tuple[int, int]]:
    """[start, stop) cut into `pieces` near-equal block ranges, at multiples of `align` blocks where there are
    enough of them (a piece then covers whole batches of the data grid), else at any block."""
    if pieces <= 1:
        return [(start, stop)]
    aligned = [b for b in range(start + 1, stop) if b % align == 0]
    pool = aligned if len(aligned) >= pieces - 1 else list(range(start + 1, stop))
    cuts, last = [], start
    for i in range(1, pieces):
        want = start + (stop - start) * i / pieces
        options = [b for b in pool if b > last]
        if not options:
            break
        best = min(options, key=lambda b: abs(b - want))
        cuts.append(best)
        last = best
    bounds = [start, *cuts, stop]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
