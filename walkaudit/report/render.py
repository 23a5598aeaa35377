"""Terminal rendering of report dicts with rich (tables, bars, summaries). Returns renderables; never prints."""

from __future__ import annotations

import math

from rich.table import Table
from rich.text import Text

BAR_WIDTH = 10
#: marks after a site name: how its σ50 was found (the legend is printed under the table)
_FIT_MARK = {"logistic-free-floor": " ᶠ", "interpolation": " ⁱ"}


def fmt_sigma(value, censored: str | None = None) -> str:
    if value is None:
        return "—"
    prefix = {"above": ">", "below": "<"}.get(censored or "", "")
    return f"{prefix}{value:.3g}"


def _bar(value: float | None, lo: float, hi: float, censored: str | None) -> Text:
    """A bar whose length is the site's log σ50 within the report's range."""
    if value is None or value <= 0 or hi <= lo:
        return Text("")
    frac = (math.log10(value) - lo) / (hi - lo) if hi > lo else 1.0
    n = max(1, round(frac * BAR_WIDTH))
    style = "green" if censored == "above" else ("red" if censored == "below" else "cyan")
    return Text("█" * n + ("▸" if censored == "above" else ""), style=style)


def site_table(report: dict, bars: bool = True) -> Table:
    sites = report["sites"]
    failing = {f.get("site") for f in report.get("gate", {}).get("failures", [])}
    logs = [math.log10(s["midpoint"]) for s in sites if s.get("midpoint")]
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
    for s in sites:
        ci = s.get("ci95")
        weight = s.get("weight") or {}
        shape = s.get("shape")
        name = Text(s["name"] + _FIT_MARK.get((s.get("fit") or {}).get("method"), ""),
                    style="bold red" if s["name"] in failing else "")
        table.add_row(
            "" if s.get("index") is None else str(s["index"]),
            name,
            s["op_type"],
            "" if shape is None else "×".join("?" if d is None else str(d) for d in shape),
            fmt_sigma(s.get("midpoint"), s.get("censored")),
            fmt_sigma(s.get("midpoint_relative"), s.get("censored")),
            f"{ci[0]:.3g}–{ci[1]:.3g}" if ci else "",
            f"{weight['mean_abs']:.3g}" if weight.get("mean_abs") is not None else "",
            *([_bar(s.get("midpoint"), lo, hi, s.get("censored"))] if bars else []),
        )
    return table


def summary_lines(report: dict) -> list[str]:
    cfg, rt, summary = report["config"], report["runtime"], report["summary"]
    labels = "labels" if report["data"]["labels"] == "given" else "agreement with clean predictions (no labels)"
    noise = cfg["noise"] + (f" (ratio {cfg['ratio']})" if cfg.get("ratio") is not None else "")
    lines = [
        f"clean accuracy {report['clean_accuracy']:.4f} ({labels}), chance {report['chance']:.4f}, "
        f"{report['data']['samples']} samples",
        f"noise {noise}, mode {cfg['mode']}, {cfg['repeats']} repeats, seed {cfg['seed']}; "
        f"{rt['provider']}, {rt['elapsed_s']:.1f} s",
    ]
    weakest = next((s for s in report["sites"] if s["name"] == summary.get("weakest_site")), None)
    if weakest is not None:
        lines.append(f"weakest site: {weakest['name']} (σ50 {fmt_sigma(weakest['midpoint'], weakest['censored'])})")
    for note in rt.get("notes", []):
        lines.append(f"note: {note}")
    if report.get("partial"):
        lines.append("PARTIAL: the run was interrupted; only finished sites are reported")
    gate = report.get("gate") or {}
    for w in gate.get("warnings", []):
        lines.append(f"warning: {w}")
    for f in gate.get("failures", []):
        lines.append(f"FAIL: {f['message']}")
    rules = cfg.get("gate") or {}
    if gate.get("failures") or any(rules.get(k) for k in ("thresholds", "min_clean_accuracy", "max_drop")):
        lines.append("gate: " + ("passed" if gate.get("passed") else "FAILED"))
    return lines


def compare_table(old: dict, new: dict) -> Table:
    """Two reports side by side, matched by site name."""
    table = Table(title="σ50: baseline vs new", title_justify="left", header_style="bold")
    for col in ("site", "op", "baseline σ50", "new σ50", "change"):
        table.add_column(col, justify="left" if col in ("site", "op") else "right")
    old_by_name = {s["name"]: s for s in old["sites"]}
    failing = {f.get("site") for f in new.get("gate", {}).get("failures", [])}
    for s in new["sites"]:
        o = old_by_name.get(s["name"])
        change = ""
        if o and o.get("midpoint") and s.get("midpoint"):
            change = f"{math.log10(s['midpoint'] / o['midpoint']):+.2f} dec"
        table.add_row(Text(s["name"], style="bold red" if s["name"] in failing else ""), s["op_type"],
                      fmt_sigma(o.get("midpoint"), o.get("censored")) if o else "—",
                      fmt_sigma(s.get("midpoint"), s.get("censored")), change)
    table.caption = (f"clean accuracy {old['clean_accuracy']:.4f} → {new['clean_accuracy']:.4f}")
    return table
