"""A self-contained HTML report (``--html PATH``): the verdict, the context, one table row per site, an inline SVG of
the accuracy-vs-σ curves and the gate's failures and warnings, in one file that needs no network, no script and no
matplotlib (the curves are drawn here as SVG polylines).

Every text from the report goes through :func:`walkaudit.report.text.printable` and :func:`html.escape`, so a tensor
name can add neither markup nor a control character.
"""

from __future__ import annotations

import html
import math

from walkaudit.report.model import Report, SiteResult
from walkaudit.report.render import midpoint_cells, midpoint_columns, tolerance_cell, tolerance_title
from walkaudit.report.text import axis_label, format_level, midpoint_text, printable, report_level, shape_text

__all__ = ["curves_svg", "to_html"]

#: 20 distinguishable colours (tab20's dark and light hues interleaved), combined with dash patterns beyond them
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7",
           "#dbdb8d", "#9edae5")
DASHES = ("", "6 3", "2 2", "8 3 2 3")

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
td.name { font-family: monospace; overflow-wrap: break-word; min-width: 12ch; }
tr.fail td { background: #fde8e8; }
.passed { color: #1a7f37; } .failed { color: #cf222e; } .undecided, .incomplete { color: #9a6700; }
tr.undecided td { background: #fff8c5; }
svg text { font-size: 11px; font-family: sans-serif; }
"""


#: the headline's verdict per gate decision
_VERDICTS = {
    "passed": '<span class="passed">gate passed</span>',
    "failed": '<span class="failed">gate FAILED</span>',
    "undecided": '<span class="undecided">gate undecided</span>',
    "incomplete": '<span class="incomplete">incomplete (partial report: the gate did not decide)</span>',
    "no gate": "no gate (no rules given)",
}


def _e(text: object) -> str:
    return html.escape(printable(text), quote=True)


def to_html(report: Report, baseline: Report | None = None) -> str:
    """``report`` as one HTML document (a string ending with a newline). ``baseline``: a column of its σ50."""
    gate = report.gate
    failing = {f.site for f in gate.failures if f.site is not None} if gate is not None else set()
    open_sites = {u.site for u in gate.undecided if u.site is not None} if gate is not None else set()
    verdict = "" if gate is None else f" — {_VERDICTS[gate.decision]}"
    cfg = report.config
    labels = "labels" if report.data.labels == "given" else "agreement with the clean model (no labels)"
    out = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f"<title>walkaudit: {_e(report.model.file_name)}</title>", f"<style>{_STYLE}</style>", "</head>", "<body>",
        f"<h1>walkaudit: {_e(report.model.file_name)}{verdict}</h1>",
        f"<p>clean accuracy {report.clean_accuracy:.4f} ({_e(labels)}), chance {report.chance:.4f}, "
        f"{_e(report.data.counted)}; noise {_e(cfg.noise)}, mode {_e(cfg.mode)}, {cfg.repeats} repeats, seed "
        f"{cfg.seed}; {_e(report.runtime.provider)}, {report.runtime.elapsed_s:.1f} s"
        + ("; <strong>partial report</strong>" if report.partial else "") + "</p>",
    ]
    base = {s.name: s for s in baseline.sites} if baseline is not None else None
    level = report_level(cfg)
    numbers = midpoint_columns(level)
    head = ["#", "site", "op", "shape", *(c.header.replace("/", " / ") for c in numbers), "95% CI", "|W|"]
    if base is not None:
        head += [f"baseline {level.midpoint}", "change"]
    out += [f"<h2>{_e(level.midpoint)} per site</h2>", "<table>",
            "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
    for s in report.sites:
        cells = [
            f'<td class="n">{"" if s.index is None else s.index}</td>',
            f'<td class="name">{_site(s)}</td>',
            f"<td>{_e(s.op_type)}</td>",
            f"<td>{'' if s.shape is None else _e(shape_text(s.shape))}</td>",
            *(f'<td class="n">{_e(cell)}</td>' for cell in midpoint_cells(s, level)),
            f'<td class="n">{f"{s.ci95[0]:.3g}–{s.ci95[1]:.3g}" if s.ci95 and s.sigma50 is not None else ""}</td>',
            f'<td class="n">{"" if s.weight is None else f"{s.weight.mean_abs:.3g}"}</td>',
        ]
        if base is not None:
            o = base.get(s.name)
            change = ""
            if o is not None and o.sigma50 and s.sigma50:
                change = f"{(s.sigma50 - o.sigma50) / o.sigma50 * 100:+.1f}%"
            cells += [f'<td class="n">{_e(format_level(o.sigma50, o.censored, level)) if o else "—"}</td>',
                      f'<td class="n">{change}</td>']
        cls = ' class="fail"' if s.name in failing else ' class="undecided"' if s.name in open_sites else ""
        out.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
    out.append("</table>")
    drops = list(dict.fromkeys(t["of"] for s in report.sites for t in s.tolerance))
    if drops:
        out += [f"<h2>{_e(tolerance_title(report))}</h2>", "<table>",
                "<tr><th>site</th>" + "".join(f"<th>{_e(level.symbol)} @ {_e(d)}</th>" for d in drops) + "</tr>"]
        for s in report.sites:
            by = {t["of"]: t for t in s.tolerance}
            cells = [f'<td class="n">{_e(tolerance_cell(by[d], level))}</td>' if d in by else "<td></td>"
                     for d in drops]
            out.append(f'<tr><td class="name">{_site(s)}</td>' + "".join(cells) + "</tr>")
        out.append("</table>")
    out += [f"<h2>Accuracy against {_e(level.symbol)}</h2>", curves_svg(report)]
    if gate is not None and gate.failures:
        out += [f"<h2>Failures ({len(gate.failures)})</h2>", "<ul>"]
        out += [f"<li><b>{_e(f.rule)}</b> {_e(f.site) if f.site is not None else 'model'}: {_e(f.message)}</li>"
                for f in gate.failures]
        out.append("</ul>")
    if gate is not None and gate.undecided:
        out += [f"<h2>Undecided ({len(gate.undecided)}): the 95% interval straddles the threshold</h2>", "<ul>"]
        out += [f"<li><b>{_e(u.rule)}</b> {_e(u.site) if u.site is not None else 'model'}: {_e(u.message)}</li>"
                for u in gate.undecided]
        out.append("</ul>")
    if gate is not None and gate.warnings:
        out += [f"<h2>Warnings ({len(gate.warnings)})</h2>", "<ul>"]
        out += [f"<li>{_e(w)}</li>" for w in gate.warnings]
        out.append("</ul>")
    notes = report.runtime.notes
    if notes:
        out += ["<h2>Notes</h2>", "<ul>", *(f"<li>{_e(n)}</li>" for n in notes), "</ul>"]
    out += [f"<p><small>{_e(report.tool.name)} {_e(report.tool.version)}</small></p>", "</body>", "</html>"]
    return "\n".join(out) + "\n"


def curves_svg(report: Report, width: int = 760, height: int = 340) -> str:
    """An inline ``<svg>``: accuracy against log σ, one polyline per site (network order), the chance and halfway
    lines, a legend; each curve carries its site name as a ``<title>``."""
    sites = [s for s in report.sites if any(p.sigma > 0 for p in s.points)]
    level = report_level(report.config)
    left, right, top, bottom = 50, 230, 10, 40
    pw, ph = width - left - right, height - top - bottom
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="accuracy against noise level">',
             f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>']
    sigmas = [p.sigma for s in sites for p in s.points if p.sigma > 0]
    if not sigmas:
        parts.append(f'<text x="{left + pw / 2}" y="{top + ph / 2}" text-anchor="middle">no points measured</text>')
        return "\n".join(parts + ["</svg>"])
    lo, hi = math.floor(math.log10(min(sigmas))), math.ceil(math.log10(max(sigmas)))
    hi = hi if hi > lo else lo + 1

    def x(sigma: float) -> float:
        return left + (math.log10(sigma) - lo) / (hi - lo) * pw

    def y(acc: float) -> float:
        return top + (1.0 - min(max(acc, 0.0), 1.0)) * ph

    for k in range(lo, hi + 1):  # decade ticks with plain labels
        parts.append(f'<line x1="{x(10.0 ** k):.1f}" y1="{top + ph}" x2="{x(10.0 ** k):.1f}" y2="{top + ph + 4}" '
                     'stroke="#999"/>')
        parts.append(f'<text x="{x(10.0 ** k):.1f}" y="{top + ph + 16}" text-anchor="middle">{10.0 ** k:g}</text>')
    for acc in (0.0, 0.5, 1.0):
        parts.append(f'<text x="{left - 6}" y="{y(acc) + 4:.1f}" text-anchor="end">{acc:g}</text>')
    parts.append(f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle">'
                 f'{_e(axis_label(level, "log"))}</text>')
    lines = [(report.chance, "chance", "2 3")]
    if report.above_chance:
        lines.append((report.chance + (report.clean_accuracy - report.chance) / 2, "halfway", "6 3"))
    for value, label, dash in lines:
        parts.append(f'<line x1="{left}" y1="{y(value):.1f}" x2="{left + pw}" y2="{y(value):.1f}" stroke="#777" '
                     f'stroke-dasharray="{dash}"><title>{label} {value:.3f}</title></line>')
    for i, site in enumerate(sites):
        color, dash = PALETTE[i % len(PALETTE)], DASHES[(i // len(PALETTE)) % len(DASHES)]
        pts = sorted((p.sigma, p.accuracy) for p in site.points if p.sigma > 0)
        coords = " ".join(f"{x(sg):.1f},{y(a):.1f}" for sg, a in pts)
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        name = _e(site.name)
        parts.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="1.5"{dash_attr}>'
                     f"<title>{name}: {_e(midpoint_text(site.sigma50, site.censored, level))}</title></polyline>")
        if i < 24:  # the legend; the table lists every site
            ly = top + 6 + i * 13
            parts.append(f'<line x1="{left + pw + 10}" y1="{ly}" x2="{left + pw + 30}" y2="{ly}" stroke="{color}" '
                         f'stroke-width="2"{dash_attr}/>')
            parts.append(f'<text x="{left + pw + 34}" y="{ly + 4}">{_e(_tail(site.name))}</text>')
    if len(sites) > 24:
        parts.append(f'<text x="{left + pw + 10}" y="{top + 6 + 24 * 13 + 4}">… {len(sites) - 24} more</text>')
    parts.append("</svg>")
    return "\n".join(parts)


#: where a tensor name may break: after these (its path and word separators)
SEPARATORS = "/._:-"


def _breakable(name: str) -> str:
    """A name for a table cell: escaped, with a line-break opportunity (<wbr>) after each separator, so that a
    narrow window breaks it between its parts, never every few characters."""
    text = _e(name)
    for sep in SEPARATORS:
        text = text.replace(sep, sep + "<wbr>")
    return text


def _tail(name: str, limit: int = 30) -> str:
    """A legend label: the end of the name kept (it tells sites apart), cut after a separator (never inside a word)
    when one lies in the last `limit` characters."""
    name = printable(name)
    if len(name) <= limit:
        return name
    end = name[-(limit - 1):]
    cut = next((i + 1 for i, c in enumerate(end[:-1]) if c in SEPARATORS), 0)
    return "…" + end[cut:]


def _site(site: SiteResult) -> str:
    """A site's table cell: its module path (where the exporter recorded one), then its tensor name."""
    return f"{_breakable(site.module)} ({_breakable(site.name)})" if site.module else _breakable(site.name)
