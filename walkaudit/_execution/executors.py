"""Executors: who runs the clean pass and evaluates the work units. The driver (`walkaudit.api`) resolves the audit
once (`resolved.ResolvedAudit`), builds the executor from that value and a progress display
(`factory(resolved, progress)`), then only asks for the clean pass's CleanStats, submits units and waits for Counts.
Every executor builds its workers from the resolved audit alone (`ResolvedAudit.build`), never from the user's
options, so no worker decides anything differently from the driver.

- `InProcess` (the default): one Worker in this process (built from the resolved audit, with the driver's loaded
  model and data handed over) runs the clean pass and evaluates each unit as it is submitted; one site at a time.
- `walkaudit._execution.ray_executor.RayExecutor` (`--ray`, the `ray` extra): Ray actors, each with its own Worker
  built from the resolved audit, each running the clean pass over its own slice of the data and serving that slice's
  units; several sites' searches in flight so that no actor waits for one site's next round.

An executor may cut a unit into several over smaller block ranges (`split`); counts of disjoint ranges add up
exactly, so the report does not depend on how units were cut or where they ran.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from walkaudit._execution.worker import Worker
from walkaudit._units import CleanStats, Counts, WorkUnit


class Executor(Protocol):
    """What the driver needs of an executor."""

    #: how many sites' searches the driver keeps going at once
    sites_in_flight: int
    #: what the workers' clean passes noted (the report's runtime notes)
    notes: list[str]

    @property
    def graph_draws(self) -> bool:
        """Whether the workers draw ε in the graph (the report's runtime `noise_source`)."""

    def clean_pass(self, progress: Callable[[int], None], keep: bool) -> CleanStats:
        """The clean pass over all the data (`Worker.clean_pass`), its samples told to `progress` as they are done;
        `keep`: the workers keep the clean values the walk's sites read."""

    def split(self, unit: WorkUnit) -> list[WorkUnit]:
        """The unit cut into pieces over disjoint block ranges (or the unit itself)."""

    def submit(self, unit: WorkUnit) -> object:
        """Start evaluating a unit; returns a handle."""

    def wait(self, handles: list) -> list:
        """Block until at least one of `handles` is done; return the done ones."""

    def result(self, handle) -> Counts:
        """The Counts of a done handle (raises what the evaluation raised)."""

    def close(self) -> None: ...

    # optional: `release(sites)`, told when the search at `sites` is done, so that the workers can free what its
    # units needed (`Worker.release`); the driver calls it where an executor has it


class _Done:
    """A handle whose counts are already there."""

    __slots__ = ("counts",)

    def __init__(self, counts: Counts):
        self.counts = counts


class InProcess:
    """Runs the clean pass and evaluates each unit at once, in this process, with one Worker."""

    sites_in_flight = 1

    def __init__(self, worker: Worker, progress: Callable[[int], None] | None = None):
        self.worker, self._progress = worker, progress
        self.notes = worker.notes

    @property
    def graph_draws(self) -> bool:
        return self.worker.graph_draws

    def release(self, sites: tuple[str, ...]) -> None:
        """Drop what the worker holds for finished sites (sessions, prefix, cached values)."""
        self.worker.release(sites)

    def clean_pass(self, progress: Callable[[int], None], keep: bool) -> CleanStats:
        return self.worker.clean_pass(progress, keep=keep)

    def split(self, unit: WorkUnit) -> list[WorkUnit]:
        return [unit]

    def submit(self, unit: WorkUnit) -> _Done:
        return _Done(self.worker.evaluate(unit, self._progress))

    def wait(self, handles: list) -> list:
        return list(handles)

    def result(self, handle: _Done) -> Counts:
        return handle.counts

    def close(self) -> None:
        self.worker.source.close()
