"""Small text helpers shared by the gate, the renderers and the plot: the one float check, the one σ formatter and
the one escaper of names that come from a model or a report file (never trusted to be printable)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

__all__ = ["finite", "format_sigma", "printable"]

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


def dim_text(d: object) -> str:
    """One dimension of a shape as people read it: `?` for an unknown one, including the `unk__N` names that
    exporters and shape inference invent for them."""
    if d is None or (isinstance(d, str) and d.startswith("unk__")):
        return "?"
    return str(d)


def shape_text(shape: Iterable[object] | None) -> str:
    """A shape as `N×3×32×32` (printable), `?` when unknown."""
    return "?" if shape is None else printable("×".join(dim_text(d) for d in shape))

