"""Executors: who runs the clean pass and evaluates the work units. The driver (`walkaudit.api`) only asks for the
clean pass's CleanStats, submits units and waits for Counts.

- `InProcess` (the default): the driver's own Worker runs the clean pass and evaluates each unit as it is
  submitted; one site at a time, nothing to start or configure.
- `walkaudit._execution.ray_executor.RayExecutor` (`--ray`, the `ray` extra): Ray actors, each with its own Worker
  built from a `Recipe`, each running the clean pass over its own slice of the data and serving that slice's units;
  several sites' searches in flight so that no actor waits for one site's next round.

An executor may cut a unit into several over smaller block ranges (`split`); counts of disjoint ranges add up
exactly, so the report does not depend on how units were cut or where they ran.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from walkaudit._units import CleanStats, Counts, WorkUnit


class Executor(Protocol):
    """What the driver needs of an executor."""

    #: how many sites' searches the driver keeps going at once
    sites_in_flight: int

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
    """Runs the clean pass and evaluates each unit at once, in this process, with the driver's Worker."""

    sites_in_flight = 1

    def __init__(self, evaluate: Callable[[WorkUnit], Counts],
                 clean_pass: Callable[..., CleanStats] | None = None,
                 release: Callable[[tuple[str, ...]], None] | None = None):
        self._evaluate, self._clean_pass, self._release = evaluate, clean_pass, release

    def release(self, sites: tuple[str, ...]) -> None:
        if self._release is not None:
            self._release(sites)

    def clean_pass(self, progress: Callable[[int], None], keep: bool) -> CleanStats:
        return self._clean_pass(progress, keep=keep)

    def split(self, unit: WorkUnit) -> list[WorkUnit]:
        return [unit]

    def submit(self, unit: WorkUnit) -> _Done:
        return _Done(self._evaluate(unit))

    def wait(self, handles: list) -> list:
        return list(handles)

    def result(self, handle: _Done) -> Counts:
        return handle.counts

    def close(self) -> None:
        pass
