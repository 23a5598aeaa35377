"""GitHub-flavoured Markdown summary of a report, fit for ``$GITHUB_STEP_SUMMARY`` or a merge-request comment.

Layout: a heading with the model file name and the gate verdict (passed, failed, undecided, incomplete for a partial
report, or no gate when no rule was given), one line of context (clean accuracy, chance, noise, provider), a table
with one row per site (index, tensor name, op type, σ50 with ``>``/``<`` when censored, σ50 / activation std, 95%
interval, status; σ50 under the level's own symbol: BER50, t50, Δ50 with B50 in bits), then the gate failures, the
undecided checks and, folded away, its warnings.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Set as AbstractSet

from walkaudit.report.model import Failure, GateResult, Report, SiteResult
from walkaudit.report.render import midpoint_cells, midpoint_columns, quick_note, tolerance_cell
from walkaudit.report.text import midpoint_text, printable, report_level

__all__ = ["site_failures", "site_status", "to_markdown"]

PASS, FAIL, UNKNOWN, UNDECIDED, UNCHECKED = "✅", "❌", "⚠️", "❔", "—"


def to_markdown(report: Report) -> str:
    """Render ``report`` as Markdown; ends with a newline."""
    gate = report.gate
    by_site = site_failures(gate)
    open_sites = {u.site for u in gate.undecided} if gate is not None else set()
    gated = gate is not None and gate.decision != "no gate"
    lines = [_heading(report, gate), "", _context(report), ""]
    if report.partial:
        lines += ["> ⚠️ Partial report: the audit stopped before every site was measured.", ""]

    level = report_level(report.config)
    numbers = [c.header.replace("/", " / ") for c in midpoint_columns(level)]
    lines += [
        "| # | Site | Op | " + " | ".join(numbers) + " | 95% CI | Status |",
        "|--:|:-----|:---|" + "".join("-" * (len(h) + 1) + ":|" if "/" in h else "----:|" for h in numbers)
        + ":-------|:------:|",
    ]
    for site in report.sites:
        cells = [
            "—" if site.index is None else str(site.index),
            _site(site),
            _text(site.op_type),
            *midpoint_cells(site, level),
            _ci(site),
            site_status(site, by_site, open_sites, gated),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if not report.sites:
        lines.append("| — | *no sites* |" + " |" * (len(numbers) + 3))

    drops = list(dict.fromkeys(t["of"] for s in report.sites for t in s.tolerance))
    if drops:
        lines += ["", f"### Tolerated noise ({level.symbol} at which accuracy falls by each drop)", "",
                  "| Site | " + " | ".join(f"{level.symbol} @ {_text(d)}" for d in drops) + " |",
                  "|:-----|" + "----:|" * len(drops)]
        for site in report.sites:
            by = {t["of"]: t for t in site.tolerance}
            cells = [tolerance_cell({**by[d], "ci95": None}, level) if d in by else "—" for d in drops]
            lines.append("| " + _site(site) + " | " + " | ".join(cells) + " |")

    failures = gate.failures if gate is not None else []
    if failures:
        lines += ["", f"### Failures ({len(failures)})", "", *_checks(failures, FAIL)]
    undecided = gate.undecided if gate is not None else []
    if undecided:
        lines += ["", f"### Undecided ({len(undecided)}): the 95% interval straddles the threshold", "",
                  *_checks(undecided, UNDECIDED)]
    warnings = gate.warnings if gate is not None else []
    if warnings:
        lines += ["", "<details><summary>Warnings (" + str(len(warnings)) + ")</summary>", ""]
        lines += [f"- {_text(w)}" for w in warnings]
        lines += ["", "</details>"]
    return "\n".join(lines) + "\n"


def _checks(entries: list[Failure], mark: str) -> list[str]:
    """One list item per failed or undecided check: its mark, where (a site or the model), its rule and message."""
    return [f"- {mark} {'model' if e.site is None else _code(e.site)} · {_text(e.rule)}: {_text(e.message)}"
            for e in entries]


def site_status(site: SiteResult, by_site: dict[str | None, list[Failure]],
                undecided: AbstractSet[str | None] = frozenset(), gated: bool = True) -> str:
    """❌ a gate rule failed, ❔ a rule undecided, ⚠️ no midpoint (nothing measured, or the fit found none), — no
    gate rule was given, ✅ otherwise."""
    if by_site.get(site.name):
        return FAIL
    if site.name in undecided:
        return UNDECIDED
    if site.sigma50 is None:
        return UNKNOWN
    return PASS if gated else UNCHECKED


def site_failures(gate: GateResult | None, undecided: bool = False) -> dict[str | None, list[Failure]]:
    """Gate failures (``undecided``: the undecided checks instead) grouped by site name (None = model-level)."""
    grouped: dict[str | None, list[Failure]] = defaultdict(list)
    for failure in (gate.undecided if undecided else gate.failures) if gate is not None else []:
        grouped[failure.site].append(failure)
    return dict(grouped)


# --- pieces -------------------------------------------------------------------------------------------------------

def _heading(report: Report, gate: GateResult | None) -> str:
    name = _code(report.model.file_name)
    if gate is None:  # no gate ran (a report built without one)
        return f"## walkaudit: {name}"
    decision = gate.decision
    if decision == "incomplete":
        return f"## {UNKNOWN} walkaudit: {name} incomplete (partial report: the gate did not decide)"
    if decision == "no gate":
        return f"## walkaudit: {name} (no gate: no rules given)"
    if decision == "passed":
        return f"## {PASS} walkaudit: {name} passed"
    if decision == "undecided":
        count = len(gate.undecided)
        how = "passed by --undecided pass" if gate.passed else "not shown"
        return f"## {UNDECIDED} walkaudit: {name} undecided ({count} check{'s' if count != 1 else ''}, {how})"
    count = len(gate.failures)
    return f"## {FAIL} walkaudit: {name} failed ({count} failure{'s' if count != 1 else ''})"


def _context(report: Report) -> str:
    config, runtime = report.config, report.runtime
    what = "token accuracy" if report.data.scored == "tokens" else "accuracy"
    parts = [f"Clean {what} **{report.clean_accuracy * 100:.1f}%**", f"chance {report.chance * 100:.1f}%"]
    noise = config.noise
    if noise == "combined" and config.ratio is not None:
        noise += f" (ratio {config.ratio:g})"
    level = report_level(config)
    if level.key != "sigma":
        noise += f" (level: {level.name} {level.symbol})"
    parts.append(f"noise {_text(noise)}")
    parts.append(f"mode {_text(config.mode)}")
    parts.append(f"provider {_text(runtime.provider)}")
    parts.append(report.data.counted)
    weakest = report.weakest
    if weakest is not None:
        parts.append(f"weakest {_code(weakest.name)} ({midpoint_text(weakest.sigma50, weakest.censored, level)})")
    if not report.above_chance:
        parts.append("**clean accuracy not above chance**")
    if config.quick:
        parts.append(_text(quick_note(report)))
    return " · ".join(parts)


def _ci(site: SiteResult) -> str:
    if site.ci95 is None or site.sigma50 is None:
        return "—"
    return f"{site.ci95[0]:.3g} – {site.ci95[1]:.3g}"


_SPECIAL = re.compile(r"([\\`*_\[\]<>|~])")


def _text(text: str) -> str:
    """Plain text: control characters escaped (one line), Markdown/HTML specials backslash-escaped (``\\|`` is safe in
    and out of tables)."""
    return _SPECIAL.sub(r"\\\1", printable(text))


def _code(text: str, *, table: bool = False) -> str:
    """Inline code span that survives backticks in ``text``; inside a table ``|`` is escaped as GFM requires."""
    text = printable(text)
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or not text else ""
    if table:
        text = text.replace("|", "\\|")
    return f"{fence}{pad}{text}{pad}{fence}"


def _site(site: SiteResult) -> str:
    """A site's table cell: its module path (where the exporter recorded one), then its tensor name in code."""
    name = _code(site.name, table=True)
    return f"{_text(site.module)} ({name})" if site.module else name
