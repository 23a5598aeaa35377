"""The CLI's interrupt policy: SIGTERM and SIGHUP take the same path as Ctrl-C.

CI cancellation and `docker stop` send SIGTERM, a closed SSH session SIGHUP. Inside `Trap`, each of them (and
SIGINT) raises `Interrupted`, a KeyboardInterrupt that remembers the signal, in the main thread; the core stops after
the finished sites and the CLI writes a partial report. From the first signal on, further ones are ignored, so a
second Ctrl-C a few milliseconds later cannot cut the partial report short. The previous handlers come back when the
block ends. Exit code: 128 + the signal number (130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Interrupted(KeyboardInterrupt):
    """A KeyboardInterrupt raised by a signal; `signum` says which."""

    def __init__(self, signum: int):
        super().__init__(signal_name(signum))
        self.signum = signum


def signal_name(signum: int | None) -> str:
    try:
        return signal.Signals(signum if signum is not None else signal.SIGINT).name
    except ValueError:
        return f"signal {signum}"


def exit_code(signum: int | None) -> int:
    """128 + the signal number, as a shell reports a process that a signal ended; SIGINT (130) by default."""
    return 128 + int(signum if signum is not None else signal.SIGINT)


def signum_of(exc: BaseException) -> int:
    """The signal behind a KeyboardInterrupt (a plain one counts as SIGINT)."""
    return getattr(exc, "signum", None) or int(signal.SIGINT)


class Trap:
    """Context manager: SIGINT, SIGTERM and SIGHUP raise `Interrupted` once; then signals are ignored until exit.

    `signum` is the first signal received (None when none came). `hold()` ignores signals from now on, for an
    interrupt that did not come through the trap (a KeyboardInterrupt raised elsewhere). Outside the main thread
    (where Python cannot set handlers) the trap does nothing.
    """

    def __init__(self, signals=SIGNALS):
        self.signals = tuple(signals)
        self.signum: int | None = None
        self._saved: dict[int, Callable[[int, FrameType | None], Any] | int | signal.Handlers | None] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._saved[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, previous in self._saved.items():
            signal.signal(s, previous if previous is not None else signal.SIG_DFL)
        self._saved.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            return
        self.signum = signum
        self.hold()
        raise Interrupted(signum)

    def _ignore(self, signum, frame) -> None:
        pass

    def hold(self) -> None:
        """Ignore further signals until the block ends (the partial report is being written)."""
        for s in self._saved:
            signal.signal(s, self._ignore)
