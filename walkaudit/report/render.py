"""Terminal rendering of a typed report with rich (tables, bars, summary lines). Returns renderables; never prints.

Everything taken from a report (tensor, node and file names, op types, notes, messages) goes through
:func:`walkaudit.report.text.printable` and into :class:`rich.text.Text`, so neither terminal escapes nor rich markup
in a name can reach the terminal.
"""

from __future__ import annotations

import math

from rich.table import Table
from rich.text import Text

from walkaudit.report.model import GateResult, Report, SiteResult
from walkaudit.report.text import format_sigma, printable

__all__ = ["compare_table", "gate_lines", "site_table", "summary_lines"]

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


def _failing(gate: GateResult | None) -> set[str]:
    return {f.site for f in gate.failures if f.site is not None} if gate is not None else set()


def _sigma(site: SiteResult, relative: bool = False) -> str:
    return format_sigma(site.sigma50_relative if relative else site.sigma50, site.censored)


def site_table(report: Report, bars: bool = True) -> Table:
    """One row per site: index, tensor, op, shape, σ50, σ50/std, 95% interval, mean |W| and (``bars``) a log bar."""
    failing = _failing(report.gate)
    logs = [math.log10(s.sigma50) for s in report.sites if s.sigma50 and s.sigma50 > 0]
    lo, hi = (min(logs) - 0.3, max(logs)) if logs else (0.0, 1.0)
    table = Table(title="Midpoint noise level σ50 per site", title_justify="left", header_style="bold",
                  caption="ᶠ curve levels off above chance (free floor fit)  ⁱ interpolated  >/< censored at the grid",
                  caption_justify="left")
    for col, just in (("#", "right"), ("site", "left"), ("op", "left"), ("shape", "left"), ("σ50", "right"),
                      ("σ50/std", "right"), ("95% CI", "right"), ("|W|", "right"), ("", "left"))[: 9 if bars else 8]:
        if col == "site":
            table.add_column(col, justify=just, min_width=14, overflow="fold")
        else:
            table.add_column(col, justify=just, no_wrap=True)
    for s in report.sites:
        name = Text(printable(s.name) + _FIT_MARK.get(s.fit.method, ""),
                    style="bold red" if s.name in failing else "")
        table.add_row(
            "" if s.index is None else str(s.index),
            name,
            Text(printable(s.op_type)),
            "" if s.shape is None else Text(printable("×".join("?" if d is None else str(d) for d in s.shape))),
            _sigma(s),
            _sigma(s, relative=True),
            f"{s.ci95[0]:.3g}–{s.ci95[1]:.3g}" if s.ci95 and s.sigma50 is not None else "",
            f"{s.weight.mean_abs:.3g}" if s.weight is not None else "",
            *([_bar(s.sigma50, lo, hi, s.censored)] if bars else []),
        )
    return table


def summary_lines(report: Report) -> list[str]:
    """The lines under the table (plain text, printable; print them with ``markup=False``)."""
    cfg, rt = report.config, report.runtime
    labels = "labels" if report.data.labels == "given" else "agreement with clean predictions (no labels)"
    noise = cfg.noise + (f" (ratio {cfg.ratio})" if cfg.ratio is not None else "")
    lines = [
        (f"clean accuracy {report.clean_accuracy:.4f} ({labels}), chance {report.chance:.4f}, "
         f"{report.data.samples} samples"),
        (f"noise {noise}, mode {cfg.mode}, {cfg.repeats} repeats, seed {cfg.seed}; "
         f"{printable(rt.provider)}, {rt.elapsed_s:.1f} s"),
    ]
    if not report.above_chance:
        lines.append("the clean accuracy is not above chance: no σ50 means anything")
    weakest = report.weakest
    if weakest is not None:
        lines.append(f"weakest site: {printable(weakest.name)} (σ50 {_sigma(weakest)})")
    lines += [f"note: {printable(note)}" for note in rt.notes]
    if report.partial:
        lines.append("PARTIAL: the run was interrupted; only finished sites are reported")
    if report.gate is not None and (report.gate.failures or cfg.has_rules):
        lines += gate_lines(report.gate)
    elif report.gate is not None:
        lines += [f"warning: {printable(w)}" for w in report.gate.warnings]
    return lines


def gate_lines(gate: GateResult) -> list[str]:
    """Warnings, one ``FAIL:`` line per failure, then ``gate: passed`` or ``gate: FAILED``."""
    lines = [f"warning: {printable(w)}" for w in gate.warnings]
    lines += [f"FAIL: {printable(f.message)}" for f in gate.failures]
    lines.append("gate: " + ("passed" if gate.passed else "FAILED"))
    return lines


def compare_table(old: Report, new: Report) -> Table:
    """Two reports side by side, matched by site name; the change in decades where both have a σ50."""
    table = Table(title="σ50: baseline vs new", title_justify="left", header_style="bold")
    for col in ("site", "op", "baseline σ50", "new σ50", "change"):
        table.add_column(col, justify="left" if col in ("site", "op") else "right")
    old_by_name: dict[str, SiteResult] = {}
    for s in old.sites:
        old_by_name.setdefault(s.name, s)
    failing = _failing(new.gate)
    for s in new.sites:
        o = old_by_name.get(s.name)
        change = ""
        if o is not None and o.sigma50 and s.sigma50:
            change = f"{math.log10(s.sigma50 / o.sigma50):+.2f} dec"
        elif o is not None and (o.sigma50 is None or s.sigma50 is None):
            change = "n/a"
        table.add_row(Text(printable(s.name), style="bold red" if s.name in failing else ""),
                      Text(printable(s.op_type)), _sigma(o) if o else "—", _sigma(s), change)
    table.caption = f"clean accuracy {old.clean_accuracy:.4f} → {new.clean_accuracy:.4f}"
    return table
