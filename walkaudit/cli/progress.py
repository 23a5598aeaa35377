"""The progress display on stderr; implements the core's Progress protocol (`walkaudit.api.Progress`).

The core counts work in sample forward passes and only learns a site's total as its adaptive search plans
(`grow`), so a bar over passes would go backwards. This one counts **sites**: the clean pass is one step, each
site one more, and the sites in flight add the fraction of their planned work that is done (capped below one until
`site_finished`). What it shows never decreases.

- stderr a terminal (a real tty, whatever FORCE_COLOR says): one live line, "site k/N name", a bar, the percentage,
  samples per second, the elapsed time and an ETA; a long name loses its start (never the counts) to fit the line.
- stderr not a terminal (CI logs, pipes): no animation; one plain line when the clean pass ends and one per finished
  site: ``walkaudit: site 3/5 linear: σ50 18.7 (0.8 s; 41.2k samples/s, ETA 2 s)``.

Samples per second are sample forward passes (clean or noisy, on every worker: the driver is told of work done
wherever it ran) over the last `RATE_WINDOW` seconds; the ETA is the time so far over the steps done, times the
steps left.
"""

from __future__ import annotations

import sys
import time
from collections import deque

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from walkaudit._noise.registry import SIGMA, Level
from walkaudit.report.text import midpoint_text, printable

#: the fraction of a site's planned work shown at most before it finishes (its search may still plan more)
IN_FLIGHT_CAP = 0.95
#: seconds of recent work the samples-per-second figure is taken over
RATE_WINDOW = 10.0


def format_rate(rate: float | None) -> str:
    """Samples per second in a few characters: 870, 41.2k, 3.1M."""
    if rate is None:
        return "? samples/s"
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if rate >= scale:
            return f"{rate / scale:.1f}{suffix} samples/s"
    return f"{rate:.0f} samples/s"


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "ETA ?"
    seconds = round(seconds)
    return f"ETA {seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"ETA {seconds} s"


#: the columns of the live line besides the description (the bar at its narrowest, percentage, rate, elapsed, ETA)
#: and their gaps; the bar takes whatever is left
FIXED_COLUMNS = 10 + 5 + len("999.9k samples/s") + len("0:00:00") + len("ETA") + len("0:00:00") + 6
#: the narrowest a site name is cut to (its end: the op and output index tell sites apart)
MIN_NAME = 12


def shorten(name: str, width: int) -> str:
    """`name` in at most `width` characters, keeping its end ('…' + the last ones): the end of a tensor name
    (`MatMul_1_output_0`) tells sites apart, its start (`/encoder/layers.0/`) is shared by many."""
    if len(name) <= width:
        return name
    return "…" + name[len(name) - max(width, 2) + 1:]


def live_description(label: str, name: str, width: int) -> str:
    """The live line's description in a terminal `width` wide: 'site k/N' whole, then the name cut at its start
    to what is left after the counts (the bar, percentage, rate, elapsed time and ETA are never cut)."""
    room = width - FIXED_COLUMNS - (len(label) + 1 if label else 0)
    if room < MIN_NAME and label:  # too narrow for a useful piece of the name: 'site k/N' and the counts
        return label
    room = max(room, MIN_NAME)
    return f"{label} {shorten(name, room)}" if label else shorten(name, room)


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class RichProgress:
    """Progress in sites (see the module): a live bar on a terminal, one line per finished site elsewhere.

    `stream`: where it writes (default: sys.stderr at entry). `live`: force the bar (True) or the lines (False);
    default: the bar only when the stream is a real terminal. `clock`: seconds (tests pass a fake one).
    """

    def __init__(self, disable: bool = False, stream=None, live: bool | None = None, clock=time.perf_counter,
                 level: Level = SIGMA):
        self.disable = disable
        self._level = level  # what the midpoint is called (σ50, BER50, t50, ...)
        self._stream = stream
        self._live = live
        self._bar: Progress | None = None
        self._task: TaskID | None = None
        self.total: int | None = None  # sites; known at the first site_started
        self.finished = 0
        self._clean_planned = self._clean_done = 0
        self._clean_over = False
        self._planned = self._done = 0  # passes of the sites in flight (since the clean pass)
        self._started: dict[int, float] = {}
        self._positions: dict[str, int] = {}
        self._shown = 0.0
        self._clock = clock
        self._t0 = clock()
        self._walk_t0: float | None = None  # when the clean pass ended
        self._samples = 0  # sample forward passes done, in all
        self._recent: deque[tuple[float, int]] = deque([(self._t0, 0)])  # (time, samples) over the last RATE_WINDOW
        self.current = ""
        self._label = ""  # "site k/N" of the site the live line shows

    # -- context -----------------------------------------------------------------------------------------------
    def __enter__(self):
        if self.disable:
            return self
        stream = self._stream if self._stream is not None else sys.stderr
        self._stream = stream
        live = _is_tty(stream) if self._live is None else self._live
        if live:
            self._bar = Progress(TextColumn("{task.description}"), BarColumn(bar_width=None), TaskProgressColumn(),
                                 TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                 TimeRemainingColumn(), console=Console(file=stream), transient=True)
            self._bar.__enter__()
            self._task = self._bar.add_task("clean pass", total=None, rate="")
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            return self._bar.__exit__(*exc)
        return False

    # -- the protocol ------------------------------------------------------------------------------------------
    def grow(self, amount: int) -> None:
        if self._clean_over or self.total is not None:
            self._planned += amount
        else:
            self._clean_planned += amount
        self._refresh()

    def advance(self, amount: int) -> None:
        now = self._clock()
        self._samples += amount
        self._recent.append((now, self._samples))
        while len(self._recent) > 2 and now - self._recent[1][0] >= RATE_WINDOW:
            self._recent.popleft()
        if self._clean_over or self.total is not None:
            self._done += amount
        else:
            self._clean_done += amount
        self._refresh()

    def describe(self, text: str) -> None:
        if text != "clean pass" and not self._clean_over:
            self._end_clean()
        if printable(text) != self.current:  # the core names the site it just started: keep its "site k/N"
            self.current, self._label = printable(text), ""
        self._refresh()

    def site_started(self, position: int, total: int, name: str) -> None:
        if not self._clean_over:
            self._end_clean()
        self.total = total
        self._started[position] = self._clock()
        self._positions[name] = position
        self.current, self._label = printable(name), f"site {position}/{total}"
        self._refresh()

    def site_finished(self, result) -> None:
        self.finished += 1
        position = self._positions.pop(result.name, None)
        began = self._started.pop(position, None) if position is not None else None
        if not self._started:  # nothing in flight: the fraction starts again from the next site
            self._planned = self._done = 0
        if self._bar is None and not self.disable:
            took = "" if began is None else f"{self._clock() - began:.1f} s; "
            where = f"site {position}/{self.total}" if position is not None and self.total else "site"
            midpoint = midpoint_text(result.sigma50, result.censored, self._level)
            self._line(f"{where} {printable(result.name)}: {midpoint} "
                       f"({took}{format_rate(self.rate())}, {format_eta(self.eta())})")
        self._refresh()

    def estimated(self, text: str) -> None:
        """The audit's expected time and memory, one line after the clean pass (hidden by -q)."""
        if not self._clean_over:
            self._end_clean()
        if self.disable:
            return
        if self._bar is not None:
            self._bar.console.print(f"walkaudit: {text}", markup=False, highlight=False)
        else:
            self._line(text)

    # -- display -----------------------------------------------------------------------------------------------
    def _end_clean(self) -> None:
        self._clean_over = True
        self._walk_t0 = self._clock()
        if self._bar is None and not self.disable:
            self._line(f"clean pass done ({self._walk_t0 - self._t0:.1f} s; {format_rate(self.rate())})")

    def rate(self) -> float | None:
        """Sample forward passes per second over the last RATE_WINDOW seconds (None before any time passed)."""
        (t0, s0), (t1, s1) = self._recent[0], (self._clock(), self._samples)
        return (s1 - s0) / (t1 - t0) if t1 > t0 else None

    def eta(self) -> float | None:
        """Seconds left: the time since the clean pass over the sites done (in steps, `fraction`), times the
        sites left. None before any site's work was done."""
        if self._walk_t0 is None or self.total is None:
            return None
        done = self.fraction() - 1.0
        if done <= 0:
            return None
        return (self._clock() - self._walk_t0) / done * max(self.total - done, 0.0)

    def fraction(self) -> float:
        """Done so far, in steps (clean pass + sites); never decreases."""
        if not self._clean_over:
            value = min(self._clean_done / self._clean_planned, 1.0) if self._clean_planned else 0.0
        else:
            in_flight = min(self._done / self._planned, IN_FLIGHT_CAP) if self._planned else 0.0
            value = 1.0 + self.finished + (in_flight if self._started else 0.0)
        self._shown = max(self._shown, value)
        return self._shown

    def _refresh(self) -> None:
        if self._bar is None:
            self.fraction()
            return
        task = self._task
        assert task is not None  # added with the bar
        done = self.fraction()
        rate = format_rate(self.rate()) if self._samples else ""
        description = live_description(self._label, self.current or "clean pass", self._bar.console.width)
        if self.total is None:  # the clean pass: the number of sites is not known yet, so no percentage
            self._bar.update(task, description=description, rate=rate)
            return
        total = self.total + 1
        self._bar.update(task, completed=min(done, float(total)), total=total, description=description,
                         rate=rate)

    def _line(self, text: str) -> None:
        try:
            self._stream.write(f"walkaudit: {text}\n")
            self._stream.flush()
        except (OSError, ValueError):
            pass
