"""Figure of a report: accuracy-vs-σ curves and σ50 per site, written to .png, .svg or .pdf.

matplotlib is optional (``pip install 'walkaudit[plot]'``) and imported only when a plot is made. The figure is drawn
on a ``matplotlib.figure.Figure`` with the Agg canvas, never through pyplot, so no global backend state changes.

Panel 1: accuracy against σ (log axis) for the weakest sites (at most :data:`MAX_CURVES`, lowest σ50 first), points
with ±accuracy_std error bars, the fitted logistic where the report has its parameters, the chance and halfway
lines, and σ50 marked on the halfway line (``>``/``<`` triangles when censored).
Panel 2: σ50 per site as horizontal bars on a log axis in graph order (at most :data:`MAX_BARS` weakest sites when
there are more), 95% intervals as error bars, censored bars hatched and tipped with ``>``/``<``, sites with gate
failures in red.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from walkaudit.errors import UsageError

__all__ = ["FORMATS", "MAX_BARS", "MAX_CURVES", "plot_report"]

FORMATS = (".png", ".svg", ".pdf")
MAX_CURVES = 12
MAX_BARS = 80


def plot_report(report: dict, path: str | Path) -> None:
    """Draw ``report`` and save it to ``path``; the format follows the suffix (.png, .svg, .pdf).

    Raises UsageError for another suffix, a missing matplotlib, or a path that cannot be written.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise UsageError(f"cannot plot to {path.name!r}: use a .png, .svg or .pdf file name")
    try:
        import numpy as np
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError("matplotlib is not installed: pip install 'walkaudit[plot]'") from None

    sites = [s for s in report.get("sites") or [] if isinstance(s, dict)]
    failing = {str(f.get("site")) for f in (report.get("gate") or {}).get("failures") or []
               if f.get("site") is not None}
    clean, chance = _number(report.get("clean_accuracy")), _number(report.get("chance"))

    curves = sorted(sites, key=_weakness)[:MAX_CURVES]
    bars = sites if len(sites) <= MAX_BARS else sorted(sites, key=_weakness)[:MAX_BARS]
    bars = [s for s in sites if any(s is b for b in bars)]  # keep graph order
    height_bars = max(2.5, 0.25 * len(bars) + 1.0)
    fig = Figure(figsize=(9.0, 4.5 + height_bars), layout="constrained")
    FigureCanvasAgg(fig)
    ax_acc, ax_mid = fig.subplots(2, 1, gridspec_kw={"height_ratios": [4.5, height_bars]})
    model = Path(str((report.get("model") or {}).get("path") or "model")).name
    config = report.get("config") or {}
    fig.suptitle(f"walkaudit: {model} · {config.get('noise', '?')} noise · {config.get('mode', '?')}")

    # --- panel 1: accuracy vs σ --------------------------------------------------------------------------------
    colors = _colors(len(curves))
    half = None if clean is None or chance is None else chance + (clean - chance) / 2.0
    sigma_all: list[float] = []
    for color, site in zip(colors, curves, strict=True):
        points = [p for p in site.get("points") or []
                  if _number(p.get("sigma")) and p["sigma"] > 0 and _number(p.get("accuracy")) is not None]
        points.sort(key=lambda p: p["sigma"])
        label = _short(str(site.get("name")))
        if points:
            sig = [p["sigma"] for p in points]
            sigma_all += sig
            acc = [p["accuracy"] for p in points]
            err = [_number(p.get("accuracy_std")) or 0.0 for p in points]
            ax_acc.errorbar(sig, acc, yerr=err, fmt="o", ms=3, color=color, capsize=2, lw=0.8, label=label)
            label = None
            params = (site.get("fit") or {}).get("params") or {}
            curve = _logistic(params)
            if curve is not None:
                u = np.linspace(math.log10(min(sig)), math.log10(max(sig)), 200)
                ax_acc.plot(10.0 ** u, curve(u), "-", color=color, lw=1.2)
        mid = _number(site.get("midpoint"))
        if mid is not None and mid > 0 and half is not None:
            marker = {"above": ">", "below": "<"}.get(site.get("censored") or "", "D")
            ax_acc.plot([mid], [half], marker=marker, ms=7, color=color, mec="black", mew=0.6, ls="none",
                        label=label)
    if half is not None:
        ax_acc.axhline(half, color="0.3", ls="--", lw=0.9, label=f"halfway {half:.3f}")
    if chance is not None:
        ax_acc.axhline(chance, color="0.6", ls=":", lw=0.9, label=f"chance {chance:.3f}")
    if clean is not None:
        ax_acc.axhline(clean, color="0.6", ls="-.", lw=0.9, label=f"clean {clean:.3f}")
    if sigma_all or any(_number(s.get("midpoint")) for s in curves):
        ax_acc.set_xscale("log")
    ax_acc.set_xlabel("σ (noise level)")
    ax_acc.set_ylabel("accuracy")
    shown = f"{len(curves)} weakest of {len(sites)} sites" if len(sites) > len(curves) else f"{len(sites)} sites"
    ax_acc.set_title(f"accuracy vs σ ({shown}; ◆ σ50, ▶/◀ censored)", fontsize=10)
    if curves or half is not None:
        ax_acc.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)

    # --- panel 2: σ50 per site -----------------------------------------------------------------------------------
    values = [_number(s.get("midpoint")) for s in bars]
    positive = [v for v in values if v is not None and v > 0]
    if positive:
        left = min(positive + [_ci_low(s) for s in bars if _ci_low(s)]) / 3.0
        y = np.arange(len(bars))
        for row, (site, value) in enumerate(zip(bars, values, strict=True)):
            if value is None or value <= 0:
                ax_mid.text(left, row, "  no σ50", va="center", fontsize=7, color="0.4")
                continue
            censored = site.get("censored")
            color = "tab:red" if str(site.get("name")) in failing else "tab:blue"
            ax_mid.barh(row, value - left, left=left, height=0.6, color=color, alpha=0.45 if censored else 0.8,
                        hatch="//" if censored else None, edgecolor=color)
            if censored in ("above", "below"):
                ax_mid.plot([value], [row], marker=">" if censored == "above" else "<", color=color, ms=7)
            ci = site.get("ci95")
            if isinstance(ci, (list, tuple)) and len(ci) == 2 and _number(ci[0]) and _number(ci[1]):
                lo, hi = min(ci[0], value), max(ci[1], value)
                ax_mid.errorbar([value], [row], xerr=[[value - lo], [hi - value]], fmt="none", ecolor="black",
                                lw=0.8, capsize=2)
        ax_mid.set_xscale("log")
        ax_mid.set_yticks(y, [_short(str(s.get("name")), 40) for s in bars], fontsize=7 if len(bars) > 30 else 8)
        ax_mid.invert_yaxis()
    else:
        ax_mid.text(0.5, 0.5, "no σ50 measured", ha="center", va="center", transform=ax_mid.transAxes)
        ax_mid.set_yticks([])
    ax_mid.set_xlabel("σ50 (log)")
    more = f" ({len(bars)} weakest of {len(sites)})" if len(bars) < len(sites) else ""
    ax_mid.set_title(f"σ50 per site{more}; hatched = censored, red = gate failure", fontsize=10)

    try:
        fig.savefig(path, format=suffix[1:], dpi=120)
    except OSError as exc:
        raise UsageError(f"cannot write plot {path}: {exc.strerror or exc}") from None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _weakness(site: dict) -> tuple[float, int]:
    """Sort key: lowest σ50 first; at equal bounds 'below' < exact < 'above'; unmeasured sites last."""
    value = _number(site.get("midpoint"))
    order = {"below": 0, None: 1, "above": 2}.get(site.get("censored"), 1)
    return (math.inf if value is None else value, order)


def _ci_low(site: dict) -> float | None:
    ci = site.get("ci95")
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        low = _number(ci[0])
        return low if low is not None and low > 0 else None
    return None


def _logistic(params: dict):
    """acc(u) = lo + (hi - lo) / (1 + exp((u - m) / w)) as a numpy function of u = log10 σ, or None."""
    import numpy as np

    hi, lo, m, w = (_number(params.get(k)) for k in ("hi", "lo", "m", "w"))
    if None in (hi, lo, m, w) or w <= 0:
        return None

    def curve(u):
        z = np.clip((np.asarray(u, dtype=float) - m) / w, -500, 500)
        return lo + (hi - lo) / (1.0 + np.exp(z))

    return curve


def _colors(count: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["viridis" if count > 10 else "tab10"]
    if count > 10:
        return [cmap(i / max(count - 1, 1)) for i in range(count)]
    return [cmap(i) for i in range(count)]


def _short(name: str, limit: int = 32) -> str:
    """Tail of a long tensor name, with ``$`` escaped so matplotlib never reads it as mathtext."""
    name = name if len(name) <= limit else "…" + name[-(limit - 1):]
    return name.replace("$", r"\$")
