"""Figure of a report: accuracy-vs-σ curves and σ50 per site; :func:`save_figure` writes it to .png, .svg or .pdf.

matplotlib is optional (``pip install matplotlib``, or ``pip install ".[plot]"`` in a checkout) and imported only
when a plot is made. The figure is drawn on a ``matplotlib.figure.Figure`` with the Agg canvas, never through pyplot,
so no global backend state changes.
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
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from walkaudit.errors import UsageError
from walkaudit.report.model import Report, SiteResult
from walkaudit.report.text import axis_label, printable, report_level

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["FORMATS", "MAX_BARS", "MAX_CURVES", "plot_report", "save_figure"]

FORMATS = (".png", ".svg", ".pdf")
MAX_CURVES = 12
MAX_BARS = 80


def _matplotlib() -> tuple[Any, Any, Any]:
    try:
        import numpy as np
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError("matplotlib is not installed: pip install matplotlib (or install walkaudit with its plot "
                         "extra: pip install \".[plot]\" in a checkout)") from None
    return np, Figure, FigureCanvasAgg


def check_path(path: str | Path) -> str:
    """The image format of ``path`` (png, svg, pdf); UsageError for another suffix."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise UsageError(f"cannot plot to {printable(Path(path).name)!r}: use a .png, .svg or .pdf file name")
    return suffix[1:]


def plot_report(report: Report, baseline: Report | None = None, relative: bool = False) -> Figure:
    """Draw ``report``: returns a ``matplotlib.figure.Figure`` (Agg canvas). UsageError when matplotlib is missing.

    ``baseline``: another report whose curves (dashed) and σ50 (black ticks on the bars) are drawn over this one's,
    matched by site name. ``relative``: σ / activation std on the x axes instead of σ (sites without an activation
    std are left out of that view).
    """
    np, figure_class, canvas_class = _matplotlib()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        figure: Figure = _draw(report, np, figure_class, canvas_class, baseline=baseline, relative=relative)
        return figure


def save_figure(figure: Figure, path: str | Path) -> None:
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


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _scale(site: SiteResult, relative: bool) -> float | None:
    """What σ is divided by on the x axis: 1, or in the relative view σ50 / (σ50 / std) as the report has them (the
    activation std; 1 for multiplicative noise, whose σ is already relative). None: the site is not drawn."""
    if not relative:
        return 1.0
    if site.sigma50 and site.sigma50_relative:
        return site.sigma50 / site.sigma50_relative
    return site.activation_std or None


def _thresholds(report: Report, relative: bool) -> list[float]:
    """The values of the gate's rules that hold for every site (``--fail-under`` / ``--fail-under-relative``)."""
    rules = report.config.gate_rules or {}
    return sorted({float(t["value"]) for t in rules.get("thresholds") or []
                   if t.get("pattern") in (None, "", "*") and bool(t.get("relative")) == relative
                   and t.get("value") is not None and float(t["value"]) > 0})


def _plain_ticks(axis: Any) -> None:
    """Tick labels as plain numbers (``2``, ``0.01``), not ``2×10⁰``."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _draw(report: Report, np: Any, Figure: Any, FigureCanvasAgg: Any, baseline: Report | None = None,
          relative: bool = False) -> Any:
    from walkaudit.report.render import short_names

    level = report_level(report.config)
    relative = relative and level.per_std  # a BER, a time or a step is never divided by the activation std
    sites = [s for s in report.sites if _scale(s, relative) is not None]
    failing = {f.site for f in report.gate.failures if f.site is not None} if report.gate is not None else set()
    clean, chance = report.clean_accuracy, report.chance
    base = {s.name: s for s in baseline.sites} if baseline is not None else {}
    unit = f"{level.symbol} / activation std" if relative else level.symbol
    mid_label = f"{level.midpoint} / activation std" if relative else level.midpoint

    weakest = sorted(sites, key=_weakness)[:MAX_CURVES]
    curves = [s for s in sites if any(s is w for w in weakest)]  # network order: the legend reads like the graph
    bars = sites if len(sites) <= MAX_BARS else sorted(sites, key=_weakness)[:MAX_BARS]
    bars = [s for s in sites if any(s is b for b in bars)]  # keep graph order
    labels = dict(zip((id(s) for s in sites), short_names([printable(s.name) for s in sites], 36)))
    height_bars = max(2.5, 0.25 * len(bars) + 1.0)
    fig = Figure(figsize=(9.0, 4.5 + height_bars), layout="constrained")
    FigureCanvasAgg(fig)
    ax_acc, ax_mid = fig.subplots(2, 1, gridspec_kw={"height_ratios": [4.5, height_bars]})
    config = report.config
    title = f"walkaudit: {report.model.file_name} · {config.noise} noise · {config.mode}"
    if baseline is not None:
        title += f" · vs {baseline.model.file_name}"
    fig.suptitle(_label(title, 200))
    thresholds = _thresholds(report, relative)

    # --- panel 1: accuracy vs σ --------------------------------------------------------------------------------
    styles = _styles(len(curves))
    half = chance + (clean - chance) / 2.0 if report.above_chance else None
    sigma_all: list[float] = []
    for (color, dash), site in zip(styles, curves, strict=True):
        scale = _scale(site, relative)
        assert scale is not None  # the sites without one were left out above
        points = sorted((p for p in site.points if p.sigma > 0), key=lambda p: p.sigma)
        label: str | None = _label(labels[id(site)], 40)
        if points:
            sig = [p.sigma / scale for p in points]
            sigma_all += sig
            ax_acc.errorbar(sig, [p.accuracy for p in points], yerr=[p.accuracy_std for p in points], fmt="o",
                            ms=3, color=color, capsize=2, lw=0.8, label=label)
            label = None
            curve = _logistic(site, np)
            if curve is not None:
                u = np.linspace(math.log10(min(p.sigma for p in points)), math.log10(max(p.sigma for p in points)),
                                200)
                ax_acc.plot(10.0 ** u / scale, curve(u), ls=dash, color=color, lw=1.2)
        old = base.get(site.name)
        if old is not None:
            old_points = sorted((p for p in old.points if p.sigma > 0), key=lambda p: p.sigma)
            old_scale = _scale(old, relative) or scale
            if old_points:
                ax_acc.plot([p.sigma / old_scale for p in old_points], [p.accuracy for p in old_points], ls=":",
                            color=color, lw=1.0, alpha=0.7)
        mid = site.sigma50
        if mid is not None and mid > 0 and half is not None:
            marker = {"above": ">", "below": "<"}.get(site.censored or "", "D")
            ax_acc.plot([mid / scale], [half], marker=marker, ms=7, color=color, mec="black", mew=0.6, ls="none",
                        label=label)
    if half is not None:
        ax_acc.axhline(half, color="0.3", ls="--", lw=0.9, label=f"halfway {half:.3f}")
    ax_acc.axhline(chance, color="0.6", ls=":", lw=0.9, label=f"chance {chance:.3f}")
    ax_acc.axhline(clean, color="0.6", ls="-.", lw=0.9, label=f"clean {clean:.3f}")
    for limit in thresholds:
        ax_acc.axvline(limit, color="tab:red", ls="--", lw=1.0, label=f"fail under {limit:g}")
    if baseline is not None:
        ax_acc.plot([], [], ls=":", color="0.3", label=f"baseline ({_label(baseline.model.file_name, 40)})")
    if sigma_all or any(s.sigma50 for s in curves):
        ax_acc.set_xscale("log")
        _plain_ticks(ax_acc.xaxis)
    ax_acc.set_xlabel(f"{unit} ({level.name})" if relative else axis_label(level))
    if level.bits and ax_acc.get_xscale() == "log":
        _bits_axis(ax_acc, np)
    ax_acc.set_ylabel("accuracy")
    shown = (f"{len(curves)} weakest of {len(sites)} sites" if len(sites) > len(curves)
             else _plural(len(sites), "site"))
    title = f"accuracy vs {unit} ({shown}; ◆ {level.midpoint}, ▶/◀ censored)"
    if not report.above_chance:
        title += f"; clean accuracy not above chance: no {level.midpoint}"
    ax_acc.set_title(title, fontsize=10)
    ax_acc.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)

    # --- panel 2: σ50 per site -----------------------------------------------------------------------------------
    values = [None if s.sigma50 is None else (s.sigma50_relative if relative else s.sigma50) for s in bars]
    positive = [v for v in values if v is not None and v > 0]
    if positive:
        lows = [lo / (_scale(s, relative) or 1.0) for s in bars if (lo := _ci_low(s))]
        olds = [o for o in (_old_value(base.get(s.name), relative) for s in bars) if o]
        # the floor: the decade at or below everything drawn, so bar lengths compare on a log axis
        left = 10.0 ** math.floor(math.log10(min(positive + lows + olds + thresholds)))
        y = np.arange(len(bars))
        for row, (site, value) in enumerate(zip(bars, values, strict=True)):
            old_value = _old_value(base.get(site.name), relative)
            if old_value:
                ax_mid.plot([old_value], [row], marker="|", ms=14, mew=2, color="black", ls="none",
                            gid="baseline")
            if value is None or value <= 0:
                ax_mid.text(left, row, f"  no {level.midpoint}", va="center", fontsize=7, color="0.4")
                continue
            censored = site.censored
            color = "tab:red" if site.name in failing else "tab:blue"
            ax_mid.barh(row, value - left, left=left, height=0.6, color=color, alpha=0.45 if censored else 0.8,
                        hatch="//" if censored else None, edgecolor=color)
            if censored in ("above", "below"):
                ax_mid.plot([value], [row], marker=">" if censored == "above" else "<", color=color, ms=7)
            if site.ci95 is not None and censored is None:
                scale = _scale(site, relative) if relative else 1.0
                assert scale is not None  # the sites without one were left out above
                lo, hi = min(site.ci95[0] / scale, value), max(site.ci95[1] / scale, value)
                ax_mid.errorbar([value], [row], xerr=[[value - lo], [hi - value]], fmt="none", ecolor="black",
                                lw=0.8, capsize=2)
        for limit in thresholds:
            ax_mid.axvline(limit, color="tab:red", ls="--", lw=1.0)
        ax_mid.set_xscale("log")
        ax_mid.set_xlim(left=left)
        _plain_ticks(ax_mid.xaxis)
        ax_mid.set_yticks(y, [_label(labels[id(s)], 40) for s in bars], fontsize=7 if len(bars) > 30 else 8)
        ax_mid.invert_yaxis()
    else:
        ax_mid.text(0.5, 0.5, f"no {level.midpoint} measured", ha="center", va="center", transform=ax_mid.transAxes)
        ax_mid.set_yticks([])
    ax_mid.set_xlabel(f"{mid_label} (log)" if relative or not (level.unit or level.bits) else
                      f"{level.midpoint} ({', '.join([*([level.unit] if level.unit else []), 'log'])}"
                      f"{'; B50 = log2(1 + 1/Δ50) bits' if level.bits else ''})")
    more = f" ({len(bars)} weakest of {len(sites)})" if len(bars) < len(sites) else ""
    extra = "; | baseline" if baseline is not None else ""
    extra += "; dashed red = --fail-under" if thresholds else ""
    ax_mid.set_title(f"{level.midpoint} per site{more}; hatched = censored, red = gate failure{extra}", fontsize=10)
    return fig


def _bits_axis(ax: Any, np: Any) -> None:
    """A top axis in bits over a relative-step axis: B = log2(1 + 1/Δ), ticked at whole bit counts."""
    from walkaudit._noise.quantize import bits_of, step

    with np.errstate(divide="ignore", invalid="ignore"):  # matplotlib probes the axis' ends, 0 included
        top = ax.secondary_xaxis("top", functions=(lambda d: bits_of(np.maximum(d, 1e-300)),
                                                   lambda b: step(np.maximum(b, 1e-12))))
    top.set_xticks([1, 2, 3, 4, 6, 8, 12, 16, 24])
    _plain_ticks(top.xaxis)
    top.set_xlabel("B (bits)")


def _old_value(site: SiteResult | None, relative: bool) -> float | None:
    if site is None or site.sigma50 is None:
        return None
    value = site.sigma50_relative if relative else site.sigma50
    return value if value and value > 0 else None


def _weakness(site: SiteResult) -> tuple[float, int]:
    """Sort key: lowest σ50 first; at equal bounds 'below' < exact < 'above'; sites without σ50 last."""
    value = site.sigma50
    order = {"below": 0, None: 1, "above": 2}.get(site.censored, 1)
    return (math.inf if value is None else value, order)


def _ci_low(site: SiteResult) -> float | None:
    if site.ci95 is None or site.censored is not None or site.sigma50 is None:
        return None
    return site.ci95[0] if site.ci95[0] > 0 else None


def _logistic(site: SiteResult, np: Any) -> Callable[[Any], Any] | None:
    """acc(u) = lo + (hi - lo) / (1 + exp((u - m) / w)) as a numpy function of u = log10 σ, or None."""
    params = site.fit.logistic
    if params is None:
        return None
    hi, lo, m, w = params

    def curve(u: Any) -> Any:
        z = np.clip((np.asarray(u, dtype=float) - m) / w, -500, 500)
        return lo + (hi - lo) / (1.0 + np.exp(z))

    return curve


#: 20 hues (tab20's dark and light shades, darks first) and, past them, line styles: 80 distinct curves
_LINESTYLES = ("-", "--", "-.", ":")


def _styles(count: int) -> list[tuple[Any, str]]:
    """(colour, line style) for ``count`` curves: tab10's hues first, then tab20's light ones, then the same hues
    with other line styles; neighbours in network order never share a colour."""
    from matplotlib import colormaps

    tab20 = colormaps["tab20"]
    hues = [tab20(2 * i) for i in range(10)] + [tab20(2 * i + 1) for i in range(10)]
    return [(hues[i % len(hues)], _LINESTYLES[(i // len(hues)) % len(_LINESTYLES)]) for i in range(count)]


def _colors(count: int) -> list[Any]:
    """The colours of :func:`_styles`."""
    return [color for color, _ in _styles(count)]


def _label(name: str, limit: int = 32) -> str:
    """A name for matplotlib: control characters escaped, the tail kept when long, ``$`` escaped (never mathtext)."""
    name = printable(name)
    name = name if len(name) <= limit else "…" + name[-(limit - 1):]
    return name.replace("$", r"\$")
