"""`walkaudit merge SHARD.json...`: the shard reports of one audit combined into its unsharded report, gated."""

from __future__ import annotations

import sys

import click

from walkaudit.cli import options as opt
from walkaudit.cli.app import GroupedCommand, guarded, main
from walkaudit.cli.reports import check_outputs, emit, read_report


@main.command("merge", cls=GroupedCommand)
@guarded
@click.argument("shard_paths", metavar="SHARD.json...", nargs=-1, required=True, type=click.Path(dir_okay=False))
@opt.GATE
@opt.OUTPUT
def merge_command(shard_paths: tuple[str, ...], gate: opt.Gate, output: opt.Output):
    """Combine the N reports of 'walkaudit MODEL --data D --shard I/N' into the unsharded audit's report and gate it
    like an audit (exit 0 passed, 1 gate failed or undecided, 2 the reports are not the N shards of one audit).

    \b
      walkaudit merge shard-*.json -o report.json --fail-under 0.05
    """
    from walkaudit.report import gate as gates
    from walkaudit.report.merge import merge

    inputs: list[tuple[str, str | None]] = [("a shard report (SHARD)", p) for p in shard_paths]
    inputs += [("the baseline (--baseline)", gate.baseline), ("the rules file (--rules)", gate.rules_file)]
    check_outputs(output, inputs)
    gate_config = gate.config(gate.baseline)
    baseline_report = read_report(gate.baseline) if gate.baseline else None
    merged = merge([read_report(p) for p in shard_paths], names=list(shard_paths))
    verdict = gates.evaluate(merged, gate_config, baseline_report, **gate.policy)
    report = merged.with_gate(verdict, rules=gate_config.to_dict())
    emit(report, output)
    sys.exit(verdict.exit_code)
