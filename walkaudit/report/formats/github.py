"""GitHub Actions workflow commands for a gated report: one ``::error`` annotation per gate failure, one
``::warning`` per gate warning (``--format github`` / ``--github``).

GitHub reads a line that starts with ``::`` as a command. Every text taken from the report is first made one
printable line (:func:`walkaudit.report.text.printable`), then escaped by GitHub's rules: in the message ``%``,
``\\r`` and ``\\n`` become ``%25``, ``%0D`` and ``%0A``; in a property (``title=``) also ``:`` and ``,`` become ``%3A``
and ``%2C``. So a tensor name can neither end the annotation early nor start a command of its own
(``::add-mask::``, ``::stop-commands::``).
"""

from __future__ import annotations

from walkaudit.report.model import Report
from walkaudit.report.text import printable

__all__ = ["escape_data", "escape_property", "to_github"]


def escape_data(text: object) -> str:
    """A workflow command's message, escaped (one line, ``%`` first)."""
    return printable(text).replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: object) -> str:
    """A workflow command's property value (``title=…``), escaped."""
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def to_github(report: Report, warnings: bool = True) -> str:
    """The annotations of ``report``'s gate (empty when no gate ran), one per line, ending with a newline when any:
    ``::error`` per failure, per undecided check that failed the gate (``::warning`` where ``--undecided pass``
    passed it) and for an incomplete (partial) report. ``warnings=False`` leaves the gate's ``::warning`` lines out
    (``-q``)."""
    gate = report.gate
    if gate is None:
        return ""
    model = report.model.file_name
    lines = []
    for failure in gate.failures:
        where = f"site {failure.site}" if failure.site is not None else model
        title = escape_property(f"walkaudit {failure.rule}: {where}")
        lines.append(f"::error title={title}::{escape_data(failure.message)}")
    undecided = "error" if not gate.passed else "warning"
    for entry in gate.undecided:
        where = f"site {entry.site}" if entry.site is not None else model
        title = escape_property(f"walkaudit {entry.rule} undecided: {where}")
        lines.append(f"::{undecided} title={title}::{escape_data(entry.message)}")
    if gate.decision == "incomplete":
        lines.append(f"::error title={escape_property(f'walkaudit: {model}')}::"
                     + escape_data("incomplete: the audit stopped before every site was measured; the gate did not "
                                   "decide"))
    if warnings:
        for warning in gate.warnings:
            lines.append(f"::warning title={escape_property(f'walkaudit: {model}')}::{escape_data(warning)}")
    return "".join(line + "\n" for line in lines)
