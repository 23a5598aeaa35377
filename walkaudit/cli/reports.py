"""Reports in and out of the commands: read and validated, output flags checked before any work, the requested
files written (atomically, walkaudit.cli.outputs) and the summary printed."""

from __future__ import annotations

import os
import sys

import click

from walkaudit.cli.app import warn


def read_report(path: str):
    """A report file as a validated walkaudit.report.Report; any problem is one UsageError line (exit 2)."""
    from walkaudit.report import load_report

    return load_report(path)


def check_outputs(output, inputs, extra=()) -> None:
    """Refuse output flags that cannot all be honoured, before any work is done.

    output: the command's Output (walkaudit.cli.options); inputs: (description, path) pairs of the files the command
    reads (None paths are skipped); extra: more (flag, path) outputs, such as --checkpoint. See
    walkaudit.cli.outputs.check for what is refused.
    """
    from walkaudit.cli import outputs

    outputs.check([(what, path) for what, path in inputs if path], [*output.files, *extra])


def _no_warnings(lines: list[str]) -> list[str]:
    """The rendered lines without the gate's `warning: ` lines, which go to stderr as `walkaudit: warning: …`."""
    return [ln for ln in lines if not (isinstance(ln, str) and ln.startswith("warning: "))]


def emit(report, output, compare_with=None) -> None:
    """Write the requested files of a typed Report and print the summary (to stderr when stdout carries a document).

    Default: the table (at a width that crops nothing) and the summary lines. -q: only the gate's failures (and the
    verdict) when it failed. -s: nothing. `--format github`: GitHub annotations as well (-q: the failures' only).
    `compare_with`: the baseline report of `compare`, whose table is then the side-by-side one. Inside a `guarded`
    command a file that cannot be written is recorded, the others are still written, and the command exits 2.
    """
    from rich.console import Console

    from walkaudit.cli.outputs import readable, write
    from walkaudit.report import render
    from walkaudit.report.formats import ANNOTATIONS, to_html, to_junit, to_markdown
    from walkaudit.report.model import dumps

    json_path, markdown_path, junit_path, html_path = (path for _, path in output.files)
    quiet = output.quiet or output.silent
    if json_path:
        write(json_path, readable(dumps(report.to_dict())))
    if markdown_path:
        if markdown_path == "auto":
            write(os.environ["GITHUB_STEP_SUMMARY"], to_markdown(report) + "\n", append=True)
        else:
            write(markdown_path, to_markdown(report))
    if junit_path:
        write(junit_path, to_junit(report))
    if html_path:
        write(html_path, to_html(report, baseline=compare_with))
    if output.silent:
        return
    to_stderr = "-" in (json_path, markdown_path, junit_path, html_path)
    width = render.output_width(sys.stderr if to_stderr else sys.stdout)  # None: a pipe or a log, no limit
    console = Console(stderr=to_stderr, highlight=False, width=width or 100_000)
    gate = report.gate
    if quiet:
        if gate is not None and not gate.passed:
            render.show(console, _no_warnings(render.gate_lines(gate)))
    else:
        if compare_with is not None:
            render.show(console, render.compare_table(compare_with, report, width=width))
            render.show(console, _no_warnings(render.gate_lines(gate)) if gate is not None else [])
        else:
            render.show(console, render.site_table(report, bars=width is None or width >= 100, width=width))
            tolerances = render.tolerance_table(report, width=width)
            if tolerances is not None:
                render.show(console, [render.tolerance_title(report)])
                render.show(console, tolerances)
            render.show(console, _no_warnings(render.summary_lines(report)))
        for message in gate.warnings if gate is not None else ():
            warn(message)  # every warning: stderr, one prefix (the table and verdict stay on stdout)
    if output.annotations:
        lines = ANNOTATIONS[output.annotations](report, warnings=not quiet).splitlines()
        if lines:
            click.echo("\n".join(lines), err=to_stderr)
