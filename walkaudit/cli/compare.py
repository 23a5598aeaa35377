"""`walkaudit compare OLD NEW`: two reports side by side, NEW gated against OLD."""

from __future__ import annotations

import sys

import click

from walkaudit.cli import options as opt
from walkaudit.cli import reports
from walkaudit.cli.app import GroupedCommand, guarded, main, warn


@main.command(cls=GroupedCommand)
@guarded
@click.argument("old", type=click.Path(dir_okay=False))
@click.argument("new", type=click.Path(dir_okay=False))
@opt.GATE(**opt.COMPARE_GATE)
@opt.OUTPUT(**opt.REPORT_OUTPUT)
def compare(old: str, new: str, gate: opt.Gate, output: opt.Output):
    """Compare two reports side by side and gate NEW against OLD with the same rules as the audit.

    \b
      walkaudit compare baseline.json report.json --max-drop 20%
      walkaudit compare baseline.json report.json --max-drop 20% --markdown auto --format github

    The change column is in percent (as --max-drop '20%'), the decades column in decades (as '0.3dec').
    Exit codes: 0 passed, 1 gate failed or undecided, 2 bad usage or input (e.g. reports that cannot be compared).
    """
    from walkaudit.report import gate as gates
    from walkaudit.report.text import report_level

    reports.check_outputs(output, [("the rules file (--rules)", gate.rules_file), ("the old report (OLD)", old),
                                   ("the new report (NEW)", new)])
    old_report, new_report = reports.read_report(old), reports.read_report(new)
    config = gate.config(old)
    verdict = gates.evaluate(new_report, config, old_report, **gate.policy)
    new_report = new_report.with_gate(verdict, rules=config.to_dict())
    if config.max_drop is None:
        drops = _drops(old_report, new_report)
        if drops:
            name, percent = max(drops, key=lambda d: d[1])
            midpoint = report_level(new_report.config).midpoint  # σ50, BER50, t50, ...
            warn(f"no --max-drop: {midpoint} drops are shown, not gated ({len(drops)} site(s) lower, at most "
                 f"{percent:.0f}% at {name}); add e.g. --max-drop 20%")
    reports.emit(new_report, output, compare_with=old_report)
    sys.exit(verdict.exit_code)


def _drops(old, new) -> list[tuple[str, float]]:
    """(site, drop in %) of every site whose σ50 is lower in `new` than in `old` (matched by name)."""
    before = {s.name: s.sigma50 for s in old.sites}
    return [(s.name, (before[s.name] - s.sigma50) / before[s.name] * 100) for s in new.sites
            if before.get(s.name) and s.sigma50 and s.sigma50 < before[s.name]]
