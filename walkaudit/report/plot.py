"""Figure of a report: accuracy-vs-σ curves and σ50 per site; :func:`save_figure` writes it to .png, .svg or .pdf.

matplotlib is optional (``pip install 'walkaudit[plot]'``) and imported only when a plot is made. The figure is drawn
on a ``matplotlib.figure.Figure`` with the Agg canvas, never through pyplot, so no global backend state changes.
Every text taken from the report is escaped (control characters, and ``$`` so matplotlib never reads mathtext), and
matplotlib's warnings (a glyph missing from the font) stay inside.

Panel 1: accuracy against σ (log axis) for the weakest sites (at most :data:`MAX_CURVES`, lowest σ50 first), points
with ±accuracy_std error bars, the fitted logistic where the report has its parameters, the chance and halfway
lines, and σ50 marked on the halfway line (``>``/``<`` triangles when censored).
Panel 2: σ50 per site as horizontal bars on a log axis in graph order (at most :data:`MAX_BARS` weakest sites when
there are more), 95% intervals as error bars, censored bars hatched and tipped with ``>``/``<``, sites with gate
failures in red.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

from walkaudit.errors import UsageError
from walkaudit.report.model import Report, SiteResult
from walkaudit.report.text import printable

__all__ = ["FORMATS", "MAX_BARS", "MAX_CURVES", "plot_report", "save_figure"]

FORMATS = (".png", ".svg", ".pdf")
MAX_CURVES = 12
MAX_BARS = 80


def _matplotlib():
    try:
        import numpy as np
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError("matplotlib is not installed: pip install 'walkaudit[plot]'") from None
    return np, Figure, FigureCanvasAgg


def check_path(path: str | Path) -> str:
    """The image format of ``path`` (png, svg, pdf); UsageError for another suffix."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise UsageError(f"cannot plot to {printable(Path(path).name)!r}: use a .png, .svg or .pdf file name")
    return suffix[1:]


def plot_report(report: Report):
    """Draw ``report``: returns a ``matplotlib.figure.Figure`` (Agg canvas). UsageError when matplotlib is missing."""
    np, Figure, FigureCanvasAgg = _matplotlib()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _draw(report, np, Figure, FigureCanvasAgg)


def save_figure(figure, path: str | Path) -> None:
    """Write ``figure`` to ``path`` (format from the suffix) through a temporary file in the same folder, so a failed
    write never leaves a half-written image in place of the user's file. UsageError when it cannot be written."""
    path = Path(path)
    fmt = check_path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as to a plain open
    except OSError as exc:
        raise UsageError(f"cannot write plot {printable(path)}: {printable(exc.strerror or exc)}") from None
    try:
        with os.fdopen(fd, "wb") as fh, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            figure.savefig(fh, format=fmt, dpi=120)
        os.replace(tmp, path)
    except OSError as exc:
        raise UsageError(f"cannot write plot {printable(path)}: {printable(exc.strerror or exc)}") from None
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def _draw(report: Report, np, Figure, FigureCanvasAgg):
    sites = list(report.sites)
    failing = {f.site for f in report.gate.failures if f.site is not None} if report.gate is not None else set()
    clean, chance = report.clean_accuracy, report.chance

    curves = sorted(sites, key=_weakness)[:MAX_CURVES]
    bars = sites if len(sites) <= MAX_BARS else sorted(sites, key=_weakness)[:MAX_BARS]
    bars = [s for s in sites if any(s is b for b in bars)]  # keep graph order
    height_bars = max(2.5, 0.25 * len(bars) + 1.0)
    fig = Figure(figsize=(9.0, 4.5 + height_bars), layout="constrained")
    FigureCanvasAgg(fig)
    ax_acc, ax_mid = fig.subplots(2, 1, gridspec_kw={"height_ratios": [4.5, height_bars]})
    config = report.config
    fig.suptitle(_label(f"walkaudit: {report.model.file_name} · {config.noise} noise · {config.mode}", 200))

    # --- panel 1: accuracy vs σ --------------------------------------------------------------------------------
    colors = _colors(len(curves))
    half = chance + (clean - chance) / 2.0 if report.above_chance else None
    sigma_all: list[float] = []
    for color, site in zip(colors, curves, strict=True):
        points = sorted((p for p in site.points if p.sigma > 0), key=lambda p: p.sigma)
        label = _label(site.name)
        if points:
            sig = [p.sigma for p in points]
            sigma_all += sig
            ax_acc.errorbar(sig, [p.accuracy for p in points], yerr=[p.accuracy_std for p in points], fmt="o",
                            ms=3, color=color, capsize=2, lw=0.8, label=label)
            label = None
            curve = _logistic(site, np)
            if curve is not None:
                u = np.linspace(math.log10(min(sig)), math.log10(max(sig)), 200)
                ax_acc.plot(10.0 ** u, curve(u), "-", color=color, lw=1.2)
        mid = site.sigma50
        if mid is not None and mid > 0 and half is not None:
            marker = {"above": ">", "below": "<"}.get(site.censored or "", "D")
            ax_acc.plot([mid], [half], marker=marker, ms=7, color=color, mec="black", mew=0.6, ls="none",
                        label=label)
    if half is not None:
        ax_acc.axhline(half, color="0.3", ls="--", lw=0.9, label=f"halfway {half:.3f}")
    ax_acc.axhline(chance, color="0.6", ls=":", lw=0.9, label=f"chance {chance:.3f}")
    ax_acc.axhline(clean, color="0.6", ls="-.", lw=0.9, label=f"clean {clean:.3f}")
    if sigma_all or any(s.sigma50 for s in curves):
        ax_acc.set_xscale("log")
    ax_acc.set_xlabel("σ (noise level)")
    ax_acc.set_ylabel("accuracy")
    shown = f"{len(curves)} weakest of {len(sites)} sites" if len(sites) > len(curves) else f"{len(sites)} sites"
    title = f"accuracy vs σ ({shown}; ◆ σ50, ▶/◀ censored)"
    if not report.above_chance:
        title += "; clean accuracy not above chance: no σ50"
    ax_acc.set_title(title, fontsize=10)
    ax_acc.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)

    # --- panel 2: σ50 per site -----------------------------------------------------------------------------------
    values = [s.sigma50 for s in bars]
    positive = [v for v in values if v is not None and v > 0]
    if positive:
        left = min(positive + [lo for lo in (_ci_low(s) for s in bars) if lo]) / 3.0
        y = np.arange(len(bars))
        for row, (site, value) in enumerate(zip(bars, values, strict=True)):
            if value is None or value <= 0:
                ax_mid.text(left, row, "  no σ50", va="center", fontsize=7, color="0.4")
                continue
            censored = site.censored
            color = "tab:red" if site.name in failing else "tab:blue"
            ax_mid.barh(row, value - left, left=left, height=0.6, color=color, alpha=0.45 if censored else 0.8,
                        hatch="//" if censored else None, edgecolor=color)
            if censored in ("above", "below"):
                ax_mid.plot([value], [row], marker=">" if censored == "above" else "<", color=color, ms=7)
            if site.ci95 is not None and censored is None:
                lo, hi = min(site.ci95[0], value), max(site.ci95[1], value)
                ax_mid.errorbar([value], [row], xerr=[[value - lo], [hi - value]], fmt="none", ecolor="black",
                                lw=0.8, capsize=2)
        ax_mid.set_xscale("log")
        ax_mid.set_yticks(y, [_label(s.name, 40) for s in bars], fontsize=7 if len(bars) > 30 else 8)
        ax_mid.invert_yaxis()
    else:
        ax_mid.text(0.5, 0.5, "no σ50 measured", ha="center", va="center", transform=ax_mid.transAxes)
        ax_mid.set_yticks([])
    ax_mid.set_xlabel("σ50 (log)")
    more = f" ({len(bars)} weakest of {len(sites)})" if len(bars) < len(sites) else ""
    ax_mid.set_title(f"σ50 per site{more}; hatched = censored, red = gate failure", fontsize=10)
    return fig


def _weakness(site: SiteResult) -> tuple[float, int]:
    """Sort key: lowest σ50 first; at equal bounds 'below' < exact < 'above'; sites without σ50 last."""
    value = site.sigma50
    order = {"below": 0, None: 1, "above": 2}.get(site.censored, 1)
    return (math.inf if value is None else value, order)


def _ci_low(site: SiteResult) -> float | None:
    if site.ci95 is None or site.censored is not None or site.sigma50 is None:
        return None
    return site.ci95[0] if site.ci95[0] > 0 else None


def _logistic(site: SiteResult, np):
    """acc(u) = lo + (hi - lo) / (1 + exp((u - m) / w)) as a numpy function of u = log10 σ, or None."""
    params = site.fit.logistic
    if params is None:
        return None
    hi, lo, m, w = params

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


def _label(name: str, limit: int = 32) -> str:
    """A name for matplotlib: control characters escaped, the tail kept when long, ``$`` escaped (never mathtext)."""
    name = printable(name)
    name = name if len(name) <= limit else "…" + name[-(limit - 1):]
    return name.replace("$", r"\$")
