"""Terminal rendering of a typed report with rich (tables, bars, summary lines). Returns renderables; never prints
(:func:`show` prints one).

Everything taken from a report (tensor, node and file names, op types, notes, messages) goes through
:func:`walkaudit.report.text.printable` and into :class:`rich.text.Text`, so neither terminal escapes nor rich markup
in a name can reach the terminal.

No layout ever crops a number or the end of a name: a table is only used at a width it fits in whole (columns are
never shrunk by rich); narrower, names lose their common prefix and leading path segments (``…/features.3/Conv``),
and narrower still every site becomes a record of two lines that the terminal may wrap but nothing cuts.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from typing import Any

from rich.console import Console, JustifyMethod
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from walkaudit._noise.registry import SIGMA
from walkaudit.report.model import GateResult, Report, SiteResult
from walkaudit.report.text import (
    Level,
    format_bits,
    format_level,
    midpoint_text,
    printable,
    report_level,
    shape_text,
    site_label,
)

__all__ = ["Column", "Lines", "Name", "compare_table", "fit", "gate_lines", "legend", "midpoint_cells",
           "midpoint_columns", "output_width", "shorten", "short_names", "show", "site_table", "summary_lines",
           "tolerance_title"]

BAR_WIDTH = 10
#: marks after a site name: how its σ50 was found (the legend is printed under the table)
_FIT_MARK = {"logistic-free-floor": " ᶠ", "interpolation": " ⁱ"}


def _bar(value: float | None, lo: float, hi: float, censored: str | None) -> Text:
    """A bar whose length is the site's log σ50 within the report's range."""
    if value is None or value <= 0 or hi <= lo:
        return Text("")
    frac = (math.log10(value) - lo) / (hi - lo)
    n = max(1, round(frac * BAR_WIDTH))
    style = "green" if censored == "above" else ("red" if censored == "below" else "cyan")
    return Text("█" * n + ("▸" if censored == "above" else ""), style=style)


# --- layout -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Column:
    """A table column. ``kind``: ``name`` (may be shortened, never at its end), ``number`` (never cut), ``bar``
    (dropped first when space is short), ``index`` or ``text``."""

    header: str
    justify: JustifyMethod = "left"
    kind: str = "text"


@dataclass(frozen=True)
class Name:
    """A name cell: the printable name, a mark after it (kept when the name is shortened) and a style."""

    text: str
    mark: str = ""
    style: str = ""


class Lines(list[str | Text]):
    """A layout of plain lines (records); :func:`show` prints each with soft wrapping, so nothing is cropped."""


#: the shortest a shortened name may be before records are used instead
MIN_NAME = 16


def shorten(name: str, limit: int) -> str:
    """``name`` in at most ``limit`` characters, keeping its end: whole leading path segments go first
    (``…/features.3/Conv_output_0``), then characters (``…put_0``)."""
    if len(name) <= limit:
        return name
    parts = name.split("/")
    for k in range(1, len(parts)):
        tail = "…/" + "/".join(parts[k:])
        if len(tail) <= limit and parts[k:] != [""]:
            return tail
    return "…" + name[len(name) - max(limit - 1, 1):]


def _common_prefix(names: list[str]) -> str:
    """The longest common prefix of ``names`` that ends at a separator (``/``, ``.``, ``_``, ``:``) and leaves every
    name something after it."""
    if len(names) < 2:
        return ""
    prefix = os.path.commonprefix(names)
    cut = max(prefix.rfind(c) for c in "/._:") + 1
    prefix = prefix[:cut]
    return prefix if len(prefix) > 2 and all(len(n) > len(prefix) for n in names) else ""


def short_names(names: list[str], limit: int) -> list[str]:
    """Each name in at most ``limit`` characters where possible and all still distinct: the common prefix becomes
    ``…``, then :func:`shorten`; names that would collide keep more of their text (at worst all of it)."""
    prefix = _common_prefix([n for n in names if len(n) > limit]) if any(len(n) > limit for n in names) else ""
    out = []
    for n in names:
        if len(n) <= limit:
            out.append(n)
        elif prefix and n.startswith(prefix) and len(n) - len(prefix) + 1 <= limit:
            out.append("…" + n[len(prefix):])
        else:
            out.append(shorten(n, limit))
    # distinct: grow the colliding ones until they differ (at worst: whole)
    limits = [limit] * len(names)
    for _ in range(256):
        seen: dict[str, list[int]] = {}
        for i, short in enumerate(out):
            seen.setdefault(short, []).append(i)
        clashes = [i for idx in seen.values() if len({names[k] for k in idx}) > 1 for i in idx if out[i] != names[i]]
        if not clashes:
            break
        for i in clashes:
            limits[i] += 2
            out[i] = shorten(names[i], limits[i])
    return out


def _cell(value: object) -> Text:
    if isinstance(value, Name):
        return Text(value.text + value.mark, style=value.style)
    return value if isinstance(value, Text) else Text(str(value))


def _table(columns: list[Column], rows: list[list[Any]], title: str | None, caption: str | None) -> Table:
    """The table; a caption wider than it goes one entry (separated by two spaces) per line, never broken inside
    an entry."""
    table = Table(title=title, title_justify="left", header_style="bold", caption_justify="left")
    for col in columns:
        table.add_column(col.header, justify=col.justify, no_wrap=True)
    for row in rows:
        table.add_row(*(_cell(v) for v in row))
    if caption:
        lines = caption if len(caption) <= _natural_width(table) else caption.replace("  ", "\n")
        table.caption = Text(lines, no_wrap=True, overflow="ignore")
    return table


def _natural_width(table: Table) -> int:
    console = Console(width=100_000, file=io.StringIO(), color_system=None)
    return Measurement.get(console, console.options, table).maximum


def fit(columns: list[Column], rows: list[list[Any]], width: int | None, title: str | None = None,
        caption: str | None = None) -> Table | Lines:
    """The widest layout of ``rows`` that fits ``width`` (None: no limit) without cropping anything: the table;
    without ``bar`` columns; with ``name`` columns shortened (common prefix elided, the end kept, all distinct); else
    :class:`Lines`, one record per row: the index, names and texts, then ``header value`` for every number."""
    table = _table(columns, rows, title, caption)
    if width is None or _natural_width(table) <= width:
        return table
    keep = [i for i, c in enumerate(columns) if c.kind != "bar"]
    columns, rows = [columns[i] for i in keep], [[r[i] for i in keep] for r in rows]
    table = _table(columns, rows, title, caption)
    natural = _natural_width(table)
    if natural <= width:
        return table
    name_cols = [i for i, c in enumerate(columns) if c.kind == "name"]
    if name_cols and rows:
        longest = {i: max(len(r[i].text) + len(r[i].mark) if isinstance(r[i], Name) else len(str(r[i]))
                          for r in rows) for i in name_cols}
        excess = natural - width
        for limit in range(max(longest.values()), MIN_NAME - 1, -2):
            if sum(max(0, longest[i] - limit) for i in name_cols) < excess:
                continue
            short_rows = [list(r) for r in rows]
            for i in name_cols:
                cells = [r[i] for r in rows]
                marks = max((len(c.mark) for c in cells if isinstance(c, Name)), default=0)
                shortened = short_names([c.text if isinstance(c, Name) else str(c) for c in cells], limit - marks)
                for r, c, short in zip(short_rows, cells, shortened):
                    r[i] = Name(short, c.mark, c.style) if isinstance(c, Name) else short
            table = _table(columns, short_rows, title, caption)
            if _natural_width(table) <= width:
                return table
    return _records(columns, rows, title, caption)


def _records(columns: list[Column], rows: list[list[Any]], title: str | None, caption: str | None) -> Lines:
    lines = Lines()
    if title:
        lines.append(title)
    for row in rows:
        head, numbers = [], []
        for col, value in zip(columns, row):
            text = _cell(value).plain
            if not text:
                continue
            if col.kind == "number":
                numbers.append(f"{col.header} {text}")
            elif col.kind == "index":
                head.append(f"#{text}")
            else:
                head.append(text)
        lines.append("  ".join(head))
        if numbers:
            lines.append("    " + "  ".join(numbers))
    if caption:
        lines.append(caption)
    return lines


def output_width(stream: Any) -> int | None:
    """The width a table printed to ``stream`` may take: the terminal's when ``stream`` is one, ``$COLUMNS`` when
    set, else None (no limit: a CI log or a pipe gets the whole table)."""
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    if tty:
        try:
            return os.get_terminal_size(stream.fileno()).columns
        except (AttributeError, ValueError, OSError):
            return 80
    return None


def show(console: Console, item: object) -> None:
    """Print a layout: a table as it is (it fits), :class:`Lines` and strings one line each, never cropped."""
    if isinstance(item, (list, tuple)):
        for line in item:
            console.print(line, markup=False, soft_wrap=True, highlight=False)
    elif isinstance(item, str):
        console.print(item, markup=False, soft_wrap=True, highlight=False)
    else:
        console.print(item)


def _failing(gate: GateResult | None) -> set[str]:
    return {f.site for f in gate.failures if f.site is not None} if gate is not None else set()


def _undecided(gate: GateResult | None) -> set[str]:
    return {u.site for u in gate.undecided if u.site is not None} if gate is not None else set()


def _sigma(site: SiteResult, level: Level, relative: bool = False) -> str:
    if relative:
        return format_level(site.sigma50_relative, site.censored, level)
    return format_level(site.sigma50, site.censored, level)


def midpoint_columns(level: Level) -> list[Column]:
    """The midpoint's number columns for `level`: σ50 (its own symbol: BER50, t50, Δ50), σ50/std where the level
    is in the site's units, B50 where it stands for bits."""
    return [Column(level.midpoint, "right", "number"),
            *([Column(f"{level.midpoint}/std", "right", "number")] if level.per_std else []),
            *([Column("B50", "right", "number")] if level.bits else [])]


def midpoint_cells(site: SiteResult, level: Level) -> list[str]:
    """The cells of :func:`midpoint_columns` for one site."""
    return [_sigma(site, level), *([_sigma(site, level, relative=True)] if level.per_std else []),
            *([format_bits(site.sigma50, site.censored)] if level.bits else [])]


def site_table(report: Report, bars: bool = True, width: int | None = None) -> Table | Lines:
    """One row per site: index, tensor, op, shape, σ50, σ50/std, 95% interval, mean |W| and (``bars``) a log bar;
    σ50 under the level's own symbol (BER50, t50, Δ50 and B50: :func:`midpoint_columns`).

    ``width`` None: the full table, as wide as it needs. A width: the widest layout that fits it without cropping a
    number or the end of a name (:func:`fit`): the full table, then without the bars, then with the names' common
    prefix elided, then one record of two lines per site.
    """
    failing, undecided = _failing(report.gate), _undecided(report.gate)
    logs = [math.log10(s.sigma50) for s in report.sites if s.sigma50 and s.sigma50 > 0]
    lo, hi = (min(logs) - 0.3, max(logs)) if logs else (0.0, 1.0)
    level = report_level(report.config)
    columns = [Column("#", "right", "index"), Column("site", kind="name"), Column("op"), Column("shape"),
               *midpoint_columns(level), Column("95% CI", "right", "number"), Column("|W|", "right", "number")]
    if bars:
        columns.append(Column("", kind="bar"))
    rows = []
    for s in report.sites:
        rows.append([
            "" if s.index is None else str(s.index),
            Name(site_label(s.name, s.module), _FIT_MARK.get(s.fit.method, ""),
                 "bold red" if s.name in failing else "yellow" if s.name in undecided else ""),
            printable(s.op_type),
            "" if s.shape is None else shape_text(s.shape),
            *midpoint_cells(s, level),
            f"{s.ci95[0]:.3g}–{s.ci95[1]:.3g}" if s.ci95 and s.sigma50 is not None else "",
            f"{s.weight.mean_abs:.3g}" if s.weight is not None else "",
            *([_bar(s.sigma50, lo, hi, s.censored)] if bars else []),
        ])
    return fit(columns, rows, width, title=f"Midpoint {level.name} {level.midpoint} per site", caption=legend(report))


#: what each mark of the site table means, in the order the legend lists them
_LEGEND = (("ᶠ", "curve levels off above chance (free floor fit)"), ("ⁱ", "interpolated"),
           (">/<", "censored at the grid"))


def legend(report: Report) -> str | None:
    """The marks the site table uses, explained (entries separated by two spaces); None when it uses none."""
    methods = {s.fit.method for s in report.sites}
    used = {"ᶠ": "logistic-free-floor" in methods, "ⁱ": "interpolation" in methods,
            ">/<": any(s.censored for s in report.sites)}
    return "  ".join(f"{mark} {text}" for mark, text in _LEGEND if used[mark]) or None


#: the line above the `--drop` table of a σ report (printed on its own: rich wraps a table's title to the table's
#: width)
TOLERANCE_TITLE = "Tolerated noise: σ at which accuracy falls by each drop (95% interval)"


def tolerance_title(report: Report) -> str:
    """The line above the `--drop` table, in the report's level (:data:`TOLERANCE_TITLE` for σ)."""
    return f"Tolerated noise: {report_level(report.config).symbol} at which accuracy falls by each drop (95% interval)"


def tolerance_cell(entry: dict[str, Any], level: Level = SIGMA) -> str:
    """One `--drop` result as the JSON has it: σ (or its censoring bound, in the level's unit) and its 95% interval
    when there is one; the bits a relative step stands for after it."""
    text = format_level(entry["sigma"], entry["censored"], level)
    ci = entry.get("ci95")
    text = f"{text} ({ci[0]:.3g}–{ci[1]:.3g})" if ci and entry["sigma"] is not None else text
    return f"{text}, {format_bits(entry['sigma'], entry['censored'])}" if level.bits else text


def tolerance_table(report: Report, width: int | None = None) -> Table | Lines | None:
    """Per site, the σ at which accuracy falls by each requested drop (`--drop`) with its 95% interval; None when
    none was asked for. Print :func:`tolerance_title` above it."""
    drops = list(dict.fromkeys(t["of"] for s in report.sites for t in s.tolerance))
    if not drops:
        return None
    level = report_level(report.config)
    columns = [Column("site", kind="name"), *(Column(f"{level.symbol} @ {d} drop", "right", "number") for d in drops)]
    rows = []
    for s in report.sites:
        by = {t["of"]: t for t in s.tolerance}
        rows.append([Name(site_label(s.name, s.module), "", ""),
                     *(tolerance_cell(by[d], level) if d in by else "" for d in drops)])
    return fit(columns, rows, width)


def quick_note(report: Report) -> str:
    """What a quick-mode report can and cannot say (the summary's line; Markdown's too)."""
    return (f"quick mode: a first look ({_count(report.config.repeats, 'repeat')}, {report.data.samples} samples, a "
            f"coarser σ search): intervals are wider than a full audit's; run without --quick for the audit of record")


def summary_lines(report: Report) -> list[str]:
    """The lines under the table (plain text, printable; print them with ``markup=False``)."""
    cfg, rt = report.config, report.runtime
    labels = "labels" if report.data.labels == "given" else "agreement with clean predictions (no labels)"
    level = report_level(cfg)
    noise = cfg.noise + (f" (ratio {cfg.ratio})" if cfg.ratio is not None else "")
    if level != SIGMA:
        noise += f" (level: {level.name} {level.symbol}{f' in {level.unit}' if level.unit else ''})"
    lines = [
        (f"clean {'token ' if report.data.scored == 'tokens' else ''}accuracy {report.clean_accuracy:.4f} "
         f"({labels}), chance {report.chance:.4f}, {report.data.counted}"),
        (f"noise {noise}, mode {cfg.mode}, {_count(cfg.repeats, 'repeat')}, seed {cfg.seed}; "
         f"{printable(rt.provider)}, {rt.elapsed_s:.1f} s"),
    ]
    if not report.above_chance:
        lines.append(f"the clean accuracy is not above chance: no {level.midpoint} means anything")
    if cfg.quick:
        lines.append(quick_note(report))
    weakest = report.weakest
    if weakest is not None:
        lines.append(f"weakest site: {printable(weakest.name)} "
                     f"({midpoint_text(weakest.sigma50, weakest.censored, level)})")
    lines += [f"note: {printable(note)}" for note in rt.notes]
    if report.partial:
        lines.append("PARTIAL: the run was interrupted; only finished sites are reported")
    if report.gate is not None and (report.gate.failures or report.gate.undecided or cfg.has_rules
                                    or report.gate.decision == "incomplete"):
        lines += gate_lines(report.gate)
    elif report.gate is not None:
        lines += [f"warning: {printable(w)}" for w in report.gate.warnings]
    return lines


#: the last line of the gate's output per decision
_GATE_LINE = {"passed": "gate: passed", "failed": "gate: FAILED", "undecided": "gate: UNDECIDED (not shown)",
              "incomplete": "gate: incomplete (partial report: the gate did not decide)",
              "no gate": "gate: no gate (no rules given)"}


def gate_lines(gate: GateResult) -> list[str]:
    """Warnings, one ``FAIL:`` line per failure, one ``UNDECIDED:`` line per check whose interval straddles its
    threshold, then the verdict: ``gate: passed``, ``gate: FAILED``, ``gate: UNDECIDED``, ``gate: incomplete`` or
    ``gate: no gate``."""
    lines = [f"warning: {printable(w)}" for w in gate.warnings]
    lines += [f"FAIL: {printable(f.message)}" for f in gate.failures]
    lines += [f"UNDECIDED: {printable(u.message)}" for u in gate.undecided]
    decision = gate.decision
    last = _GATE_LINE[decision]
    if decision == "undecided" and gate.passed:
        last = "gate: undecided, passed by --undecided pass"
    lines.append(last)
    return lines


def compare_table(old: Report, new: Report, width: int | None = None) -> Table | Lines:
    """Two reports side by side, matched by site name; the change in percent and in decades where both have a σ50
    (the gate's --max-drop speaks either: '20%' or '0.3dec'), labelled in the new report's level (BER50, t50, ...;
    reports of different noise models are never compared)."""
    old_by_name: dict[str, SiteResult] = {}
    for s in old.sites:
        old_by_name.setdefault(s.name, s)
    failing = _failing(new.gate)
    level = report_level(new.config)
    columns = [Column("site", kind="name"), Column("op"), Column(f"baseline {level.midpoint}", "right", "number"),
               Column(f"new {level.midpoint}", "right", "number"), Column("change", "right", "number"),
               Column("decades", "right", "number")]
    rows = []
    for s in new.sites:
        o = old_by_name.get(s.name)
        percent = decades = ""
        if o is not None and o.sigma50 and s.sigma50:
            percent = f"{(s.sigma50 - o.sigma50) / o.sigma50 * 100:+.1f}%"
            decades = f"{math.log10(s.sigma50 / o.sigma50):+.2f}"
        elif o is not None and (o.sigma50 is None or s.sigma50 is None):
            percent = "n/a"
        rows.append([Name(printable(s.name), "", "bold red" if s.name in failing else ""), printable(s.op_type),
                     _sigma(o, level) if o else "—", _sigma(s, level), percent, decades])
    return fit(columns, rows, width, title=f"{level.midpoint}: baseline vs new",
               caption=f"clean accuracy {old.clean_accuracy:.4f} → {new.clean_accuracy:.4f}")


def _count(n: int, noun: str) -> str:
    """``1 repeat``, ``3 repeats``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"
