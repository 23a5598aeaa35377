"""GitHub-flavoured Markdown summary of a report, fit for ``$GITHUB_STEP_SUMMARY`` or a merge-request comment.

Layout: a heading with the model file name and the gate verdict, one line of context (clean accuracy, chance,
noise, provider), a table with one row per site (index, tensor name, op type, σ50 with ``>``/``<`` when censored,
σ50 / activation std, 95% interval, status), then the gate failures and, folded away, its warnings.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import PurePath
from typing import Any

__all__ = ["format_sigma", "model_name", "site_failures", "to_markdown"]

PASS, FAIL, UNKNOWN = "✅", "❌", "⚠️"


def to_markdown(report: dict) -> str:
    """Render ``report`` (a walkaudit.report/1 dict) as Markdown; ends with a newline."""
    gate = report.get("gate") or {}
    failures = list(gate.get("failures") or [])
    by_site = site_failures(report)
    lines = [_heading(report, gate), "", _context(report), ""]
    if report.get("partial"):
        lines += ["> ⚠️ Partial report: the audit stopped before every site was measured.", ""]

    sites = list(report.get("sites") or [])
    lines += [
        "| # | Site | Op | σ50 | σ50 / std | 95% CI | Status |",
        "|--:|:-----|:---|----:|----------:|:-------|:------:|",
    ]
    for site in sites:
        name = str(site.get("name"))
        index = site.get("index")
        if by_site.get(name):
            status = FAIL
        elif _finite(site.get("midpoint")) is None:
            status = UNKNOWN
        else:
            status = PASS
        cells = [
            "—" if index is None else str(index),
            _code(name, table=True),
            _text(str(site.get("op_type", ""))),
            format_sigma(site.get("midpoint"), site.get("censored")),
            format_sigma(site.get("midpoint_relative"), site.get("censored")),
            _ci(site.get("ci95")),
            status,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if not sites:
        lines.append("| — | *no sites* | | | | | |")

    if failures:
        lines += ["", f"### Failures ({len(failures)})", ""]
        for failure in failures:
            where = "model" if failure.get("site") is None else _code(str(failure["site"]))
            lines.append(f"- {FAIL} {where} · {_text(str(failure.get('rule', '')))}: "
                         f"{_text(str(failure.get('message', '')))}")
    warnings = list(gate.get("warnings") or [])
    if warnings:
        lines += ["", "<details><summary>Warnings (" + str(len(warnings)) + ")</summary>", ""]
        lines += [f"- {_text(str(w))}" for w in warnings]
        lines += ["", "</details>"]
    return "\n".join(lines) + "\n"


def model_name(report: dict) -> str:
    """File name of the audited model (``model`` when the report has no path)."""
    path = (report.get("model") or {}).get("path")
    return PurePath(str(path)).name if path else "model"


def format_sigma(value: Any, censored: str | None = None) -> str:
    """``0.0512``, ``> 10`` (censored above), ``< 0.001`` (censored below), ``—`` when missing."""
    number = _finite(value)
    if number is None:
        return "—"
    prefix = {"above": "> ", "below": "< "}.get(censored or "", "")
    return f"{prefix}{number:.3g}"


def site_failures(report: dict) -> dict[str | None, list[dict]]:
    """Gate failures grouped by site name (None = model-level)."""
    grouped: dict[str | None, list[dict]] = defaultdict(list)
    for failure in (report.get("gate") or {}).get("failures") or []:
        site = failure.get("site")
        grouped[None if site is None else str(site)].append(failure)
    return dict(grouped)


# --- pieces -------------------------------------------------------------------------------------------------------

def _heading(report: dict, gate: dict) -> str:
    name = _code(model_name(report))
    if "passed" not in gate:
        return f"## walkaudit: {name}"
    if gate["passed"]:
        return f"## {PASS} walkaudit: {name} passed"
    count = len(gate.get("failures") or [])
    return f"## {FAIL} walkaudit: {name} failed ({count} failure{'s' if count != 1 else ''})"


def _context(report: dict) -> str:
    config = report.get("config") or {}
    runtime = report.get("runtime") or {}
    data = report.get("data") or {}
    parts = [f"Clean accuracy **{_percent(report.get('clean_accuracy'))}**",
             f"chance {_percent(report.get('chance'))}"]
    noise = str(config.get("noise", "?"))
    if noise == "combined" and _finite(config.get("ratio")) is not None:
        noise += f" (ratio {config['ratio']:g})"
    parts.append(f"noise {_text(noise)}")
    if config.get("mode"):
        parts.append(f"mode {_text(str(config['mode']))}")
    if runtime.get("provider"):
        parts.append(f"provider {_text(str(runtime['provider']))}")
    if data.get("samples") is not None:
        parts.append(f"{data['samples']} samples")
    summary = report.get("summary") or {}
    if summary.get("weakest_site") is not None:
        weakest = next((s for s in report.get("sites") or [] if s.get("name") == summary["weakest_site"]), {})
        sigma = format_sigma(summary.get("min_midpoint"), weakest.get("censored"))
        parts.append(f"weakest {_code(str(summary['weakest_site']))} (σ50 {sigma})")
    return " · ".join(parts)


def _percent(value: Any) -> str:
    number = _finite(value)
    return "—" if number is None else f"{number * 100:.1f}%"


def _ci(value: Any) -> str:
    if isinstance(value, (list, tuple)) and len(value) == 2:
        lo, hi = _finite(value[0]), _finite(value[1])
        if lo is not None and hi is not None:
            return f"{lo:.3g} – {hi:.3g}"
    return "—"


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


_SPECIAL = re.compile(r"([\\`*_\[\]<>|~])")


def _text(text: str) -> str:
    """Plain text: Markdown/HTML specials backslash-escaped (``\\|`` is safe in and out of tables), one line."""
    return _SPECIAL.sub(r"\\\1", " ".join(text.split("\n")))


def _code(text: str, *, table: bool = False) -> str:
    """Inline code span that survives backticks in ``text``; inside a table ``|`` is escaped as GFM requires."""
    text = " ".join(text.split("\n"))
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or not text else ""
    if table:
        text = text.replace("|", "\\|")
    return f"{fence}{pad}{text}{pad}{fence}"
