"""Executors: who evaluates the work units. The driver (`walkaudit.api`) only submits units and waits for Counts.

- `InProcess` (the default): the driver's own Worker evaluates each unit as it is submitted; one site at a time,
  nothing to start or configure.
- `walkaudit._execution.ray_executor.RayExecutor` (`--ray`, the `ray` extra): Ray actors, each with its own Worker
  built from a `Recipe`; several sites' searches in flight so that no actor waits for one site's next round.

An executor may cut a unit into several over smaller block ranges (`split`); counts of disjoint ranges add up
exactly, so the report does not depend on how units were cut or where they ran.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from walkaudit._units import Counts, WorkUnit


class Executor(Protocol):
    """What the driver needs of an executor."""

    #: how many sites' searches the driver keeps going at once
    sites_in_flight: int

    def split(self, unit: WorkUnit) -> list[WorkUnit]:
        """The unit cut into pieces over disjoint block ranges (or the unit itself)."""

    def submit(self, unit: WorkUnit) -> object:
        """Start evaluating a unit; returns a handle."""

    def wait(self, handles: list) -> list:
        """Block until at least one of `handles` is done; return the done ones."""

    def result(self, handle) -> Counts:
        """The Counts of a done handle (raises what the evaluation raised)."""

    def close(self) -> None: ...


class _Done:
    """A handle whose counts are already there."""

    __slots__ = ("counts",)

    def __init__(self, counts: Counts):
        self.counts = counts


class InProcess:
    """Evaluates each unit at once, in this process, with the driver's Worker."""

    sites_in_flight = 1

    def __init__(self, evaluate: Callable[[WorkUnit], Counts]):
        self._evaluate = evaluate

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
