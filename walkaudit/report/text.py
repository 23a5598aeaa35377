"""Small text helpers shared by the gate, the renderers and the plot: the one float check, the one σ formatter, the
labels of a report's level (σ, BER, t, Δ with its bits) and the one escaper of names that come from a model or a
report file (never trusted to be printable)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

from walkaudit._noise.registry import REGISTRY, SIGMA, Level

__all__ = ["Level", "axis_label", "finite", "format_bits", "format_level", "format_sigma", "midpoint_text", "printable",
           "report_level", "site_label"]

# C0 and DEL, C1 (0x80-0x9f: 0x9b is a one-byte CSI), lone surrogates, line/paragraph separators and the bidi
# embedding/override/isolate controls ("trojan source"), U+FFFE/U+FFFF (not XML): none of them may reach a terminal,
# a table or an XML file.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069"
                          "\ud800-\udfff\ufffe\uffff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def printable(text: object) -> str:
    """``text`` as one printable line: control characters become visible escapes (``\\x1b``, ``\\r``, ``\\x9b``).

    Idempotent (an escaped string holds no control character). Used for every tensor, node, file name and message
    shown in the terminal, in Markdown, in JUnit, in plots and in the gate's messages.
    """
    return _UNPRINTABLE.sub(_escape, str(text))


def site_label(name: str, module: str | None) -> str:
    """A site as a person reads it: ``layer3.1.conv2 (conv2d_5)`` (module path, then the tensor that is the site's
    identity) where the exporter recorded a module path, else the tensor name; printable."""
    return printable(f"{module} ({name})" if module else name)


def finite(value: Any) -> float | None:
    """A finite float, or None (missing, null, NaN, ±inf, booleans and non-numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:  # an integer beyond float range
        return None
    return value if math.isfinite(value) else None


def format_sigma(value: Any, censored: str | None = None, digits: int = 3) -> str:
    """``0.0512``, ``> 10`` (censored above: σ50 lies above the bound), ``< 0.001`` (below), ``—`` when unknown."""
    number = finite(value)
    if number is None:
        return "—"
    prefix = {"above": "> ", "below": "< "}.get(censored or "", "")
    return f"{prefix}{number:.{digits}g}"


def report_level(config: Any) -> Level:
    """What a report's level is (`config`: its ConfigInfo): its noise model's, declared in the registry. Reports
    without `config.level` (the Gaussian models', and every report written before the other models existed) keep
    σ."""
    entry = REGISTRY.get(config.noise) if "level" in config.extra else None
    return entry.level if entry is not None else SIGMA


def bits_of_step(step: float) -> float:
    """B for the relative step 1/(2^B − 1) of B bits: log2(1 + 1/step)."""
    return math.log2(1.0 + 1.0 / step)


def format_bits(step: Any, censored: str | None = None) -> str:
    """The bits a relative step stands for: ``5.3 bits``; a censored step bounds B the other way (a step above the
    grid's largest is fewer bits than its own): ``< 1.0 bits``; ``—`` when unknown."""
    number = finite(step)
    if number is None or number <= 0:
        return "—"
    prefix = {"above": "< ", "below": "> "}.get(censored or "", "")
    return f"{prefix}{bits_of_step(number):.1f} bits"


def format_level(value: Any, censored: str | None, level: Level, digits: int = 3) -> str:
    """A value of `level` with its unit: ``0.0512``, ``> 10``, ``3.2e+05 s``; ``—`` when unknown."""
    text = format_sigma(value, censored, digits)
    return f"{text} {level.unit}" if level.unit and text != "—" else text


def midpoint_text(value: Any, censored: str | None, level: Level) -> str:
    """A midpoint in a sentence: ``σ50 0.0512``, ``BER50 0.073``, ``t50 3.2e+05 s``, ``Δ50 0.0256, B50 5.3 bits``."""
    text = f"{level.midpoint} {format_level(value, censored, level)}"
    return f"{text}, B50 {format_bits(value, censored)}" if level.bits else text


def axis_label(level: Level, *notes: str) -> str:
    """An axis along the level: ``σ (noise level)``, ``t (time since programming, s, log)``, ``Δ (relative step
    1/(2^B − 1); B = log2(1 + 1/Δ) bits)``; `notes` go inside the parentheses."""
    inside = ", ".join([level.name, *([level.unit] if level.unit else []), *notes])
    bits = f"; B = log2(1 + 1/{level.symbol}) bits" if level.bits else ""
    return f"{level.symbol} ({inside}{bits})"


def dim_text(d: object) -> str:
    """One dimension of a shape as people read it: `?` for an unknown one, including the `unk__N` names that
    exporters and shape inference invent for them."""
    if d is None or (isinstance(d, str) and d.startswith("unk__")):
        return "?"
    return str(d)


def shape_text(shape: Iterable[object] | None) -> str:
    """A shape as `N×3×32×32` (printable), `?` when unknown."""
    return "?" if shape is None else printable("×".join(dim_text(d) for d in shape))

