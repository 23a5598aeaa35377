"""A rich progress bar on stderr that implements the core's Progress protocol."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)


class RichProgress:
    """Counts sample forward passes; the total grows as the adaptive search plans more σ levels."""

    def __init__(self, disable: bool = False):
        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn(), console=Console(stderr=True), transient=True, disable=disable)
        self._task = self._bar.add_task("walkaudit", total=0)

    def __enter__(self):
        self._bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self._bar.__exit__(*exc)

    def grow(self, amount: int) -> None:
        self._bar.update(self._task, total=self._bar.tasks[0].total + amount)

    def advance(self, amount: int) -> None:
        self._bar.advance(self._task, amount)

    def describe(self, text: str) -> None:
        self._bar.update(self._task, description=text[:40])
