"""Command line: parse, build the config, call the API, render, gate, exit code.

Exit codes: 0 passed, 1 gate failed, 2 bad usage or input, 3 runtime failure, 130 interrupted.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import click

from walkaudit import __version__
from walkaudit.errors import UsageError, WalkauditError

EXIT_OK, EXIT_GATE, EXIT_USAGE, EXIT_RUNTIME, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def _err(message: str) -> None:
    click.echo(f"walkaudit: error: {message}", err=True)


def guarded(fn):
    """Turn our errors into one line and an exit code; unexpected ones into exit 3 without a traceback.

    Output files are written with `outputs.collecting()` active: one that fails does not stop the others, and the
    command then ends with exit 2 and one line naming it (instead of its gate verdict). An interrupt that reaches
    here (no partial report) exits 128 + the signal number: 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP.
    """
    from walkaudit.cli import outputs, signals

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with outputs.collecting() as log:
            failed = log.failed
            try:
                result = fn(*args, **kwargs)
            except WalkauditError as exc:
                _err(exc.for_cli() if hasattr(exc, "for_cli") else str(exc))  # options: named by their flag
                sys.exit(exc.exit_code)
            except KeyboardInterrupt as exc:
                signum = signals.signum_of(exc)
                _err(f"interrupted ({signals.signal_name(signum)})"
                     + (f"; {outputs.failure_message(failed)}" if failed else ""))
                sys.exit(signals.exit_code(signum))
            except SystemExit as exc:
                if failed and exc.code in (None, EXIT_OK, EXIT_GATE):
                    _err(outputs.failure_message(failed))
                    sys.exit(EXIT_USAGE)
                raise
            except (click.exceptions.Exit, click.ClickException):
                raise
            except Exception as exc:  # a bug or an unexpected library failure: still one line
                if os.environ.get("WALKAUDIT_DEBUG"):
                    raise
                _err(f"unexpected {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                     "(set WALKAUDIT_DEBUG=1 for a traceback)")
                sys.exit(EXIT_RUNTIME)
            if failed:
                _err(outputs.failure_message(failed))
                sys.exit(EXIT_USAGE)
            return result

    return wrapper


class DefaultGroup(click.Group):
    """`walkaudit MODEL ...` means `walkaudit audit MODEL ...`."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["audit", *args]
        return super().parse_args(ctx, args)


@click.group(cls=DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="walkaudit")
def main():
    """Layer-wise noise robustness (Walking Noise) of an ONNX classifier.

    \b
      walkaudit model.onnx --data val.npz --json report.json
      walkaudit inspect model.onnx
      walkaudit compare baseline.json report.json --max-drop 20%
      walkaudit plot report.json -o curves.png

    Exit codes: 0 passed, 1 gate failed, 2 bad usage or input, 3 runtime failure, 130 interrupted.
    """


def site_options(fn):
    fn = click.option("--exclude", metavar="REGEX", help="Drop sites whose tensor or node name matches.")(fn)
    fn = click.option("--include", metavar="REGEX", help="Keep only sites whose tensor or node name matches.")(fn)
    fn = click.option("--ops", metavar="OPS", default=None,
                      help="Comma-separated op types whose outputs are sites, or 'all' for every float node output "
                           "[default: Conv,ConvTranspose,Gemm,MatMul with their bias Add].")(fn)
    return fn


def gate_options(fn):
    opts = [
        click.option("--fail-under", type=float, metavar="SIGMA", help="Fail when a site's σ50 is below SIGMA."),
        click.option("--fail-under-relative", type=float, metavar="X",
                     help="Fail when a site's σ50 / activation std is below X."),
        click.option("--rule", "rules", multiple=True, metavar="REGEX:SIGMA",
                     help="Per-site threshold, e.g. 'conv.*:0.05' (append 'rel' for relative). Repeatable."),
        click.option("--rules", "rules_file", type=click.Path(dir_okay=False), metavar="FILE",
                     help="Gate rules in a TOML file (see docs/ci.md)."),
        click.option("--min-clean-accuracy", type=float, metavar="A", help="Fail when clean accuracy is below A."),
        click.option("--baseline", type=click.Path(dir_okay=False), metavar="REPORT",
                     help="A previous JSON report to compare against."),
        click.option("--max-drop", metavar="DROP", help="Largest allowed σ50 drop vs --baseline: '20%' or '0.3dec'."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def output_options(fn):
    opts = [
        click.option("--json", "json_path", metavar="PATH", help="Write the JSON report ('-' = stdout)."),
        click.option("--markdown", "markdown_path", metavar="PATH",
                     help="Write a Markdown summary ('auto' = append to $GITHUB_STEP_SUMMARY)."),
        click.option("--junit", "junit_path", metavar="PATH", help="Write JUnit XML (one test case per site)."),
        click.option("-q", "--quiet", is_flag=True, help="No progress bar and no table."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _selection(ops, include, exclude, names=()):
    from walkaudit._graph.sites import LAYER_OPS, Selection

    op_list = tuple(o.strip() for o in ops.split(",") if o.strip()) if ops else LAYER_OPS
    return Selection(op_list, include, exclude, tuple(names))


def _gate_config(fail_under, fail_under_relative, rules, rules_file, min_clean_accuracy, max_drop, baseline):
    from walkaudit.report import gate
    config = gate.load_rules(rules_file) if rules_file else gate.GateConfig()
    thresholds = [gate.parse_rule(r) for r in rules]
    if fail_under is not None:
        thresholds.append(gate.Threshold(None, fail_under))
    if fail_under_relative is not None:
        thresholds.append(gate.Threshold(None, fail_under_relative, relative=True))
    flags = gate.GateConfig(tuple(thresholds), min_clean_accuracy,
                            gate.parse_drop(max_drop) if max_drop is not None else None)
    config = config.merge(flags)
    if config.max_drop is not None and baseline is None:
        raise UsageError("--max-drop needs --baseline")
    return config


def _read_report(path: str):
    """A report file as a validated walkaudit.report.Report; any problem is one UsageError line (exit 2)."""
    from walkaudit.report import load_report

    return load_report(path)


def _write(path: str, text: str, append: bool = False) -> None:
    """One output: '-' is stdout, `append` appends in one write call, a file is replaced atomically.

    Inside a `guarded` command a failure is recorded, the other outputs are still written, and the command exits 2
    naming it; elsewhere it raises a one-line UsageError.
    """
    from walkaudit.cli import outputs

    outputs.write(path, text, append=append)


# the parameters of a command that name files it reads, and how a refusal calls them
_INPUT_PARAMS = (("model", "the model"), ("data_path", "the data (--data)"), ("baseline", "the baseline (--baseline)"),
                 ("rules_file", "the rules file (--rules)"), ("old", "the old report (OLD)"),
                 ("new", "the new report (NEW)"), ("report_path", "the report (REPORT)"))


def _check_outputs(json_path, markdown_path, junit_path, inputs=None, extra=()) -> None:
    """Refuse output flags that cannot all be honoured, before any work is done.

    inputs: (description, path) pairs of the files the command reads; by default taken from the running command's
    parameters (model, --data, --baseline, --rules, compare's OLD and NEW). extra: more (flag, path) outputs, such
    as --checkpoint. See walkaudit.cli.outputs.check for what is refused.
    """
    from walkaudit.cli import outputs

    if inputs is None:
        ctx = click.get_current_context(silent=True)
        params = ctx.params if ctx is not None else {}
        inputs = [(what, params.get(name)) for name, what in _INPUT_PARAMS if params.get(name)]
    outputs.check(inputs, [("--json", json_path), ("--markdown", markdown_path), ("--junit", junit_path),
                           *extra])


def _emit(report, json_path, markdown_path, junit_path, quiet: bool) -> None:
    """Write the requested files of a typed Report and render the summary (to stderr when stdout carries a document)."""
    from rich.console import Console

    from walkaudit.report import render
    from walkaudit.report.formats import to_junit, to_markdown
    from walkaudit.report.model import dumps

    if json_path:
        _write(json_path, dumps(report.to_dict()))
    if markdown_path:
        if markdown_path == "auto":
            _write(os.environ["GITHUB_STEP_SUMMARY"], to_markdown(report) + "\n", append=True)
        else:
            _write(markdown_path, to_markdown(report))
    if junit_path:
        _write(junit_path, to_junit(report))
    if quiet:
        return
    console = Console(stderr=json_path == "-" or markdown_path == "-" or junit_path == "-", highlight=False)
    console.print(render.site_table(report, bars=console.width >= 100))
    for line in render.summary_lines(report):
        console.print(line, markup=False)


@main.command("audit")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", "data_path", required=True, type=click.Path(dir_okay=False), metavar="FILE",
              help="Validation data: .npz (inputs and optional labels) or .npy (inputs only).")
@click.option("--x-key", metavar="KEY", help="Array holding the inputs in the .npz [default: auto].")
@click.option("--y-key", metavar="KEY", help="Array holding the labels in the .npz [default: auto].")
@click.option("--limit", type=int, metavar="N", help="Use only the first N samples.")
@click.option("--output", metavar="NAME", help="The class output to read [default: found automatically].")
@site_options
@click.option("--site", "site_names", multiple=True, metavar="TENSOR", help="An explicit site (repeatable).")
@click.option("--noise", type=click.Choice(["additive", "multiplicative", "combined"]), default="additive",
              show_default=True, help="Noise model.")
@click.option("--ratio", type=float, default=0.5, show_default=True,
              help="combined: σa = σ·r, σm = σ·(1−r).")
@click.option("--global", "global_mode", is_flag=True, help="The same σ at every site at once (default: one site at "
                                                              "a time).")
@click.option("--sigmas", metavar="LIST|A:B:N",
              help="Fixed σ grid: '0.01,0.1,1' or '1e-3:1e2:21' (log). Default: adaptive search per site.")
@click.option("--repeats", type=int, default=3, show_default=True, help="Noise draws per σ.")
@click.option("--batch-size", type=int, default=None,
              help="Samples per batch [default: 256 on the CPU; sized to the free device memory on CUDA].")
@click.option("--seed", type=int, default=0, show_default=True, help="Noise seed (same seed, same report).")
@click.option("--chance", type=float, help="Chance accuracy [default: 1/classes].")
@click.option("--provider", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True,
              help="onnxruntime provider; auto uses CUDA only where a session really runs on it.")
@click.option("--threads", type=int, help="CPU threads for onnxruntime and noise [default: all].")
@click.option("--noise-source", type=click.Choice(["auto", "host", "graph"]), default="auto", show_default=True,
              help="Where ε is drawn: numpy on the host, or RandomNormalLike in the graph (opsets 10-21); auto "
                   "uses the graph on CUDA.")
@click.option("--allow-nonfinite", is_flag=True, help="Accept NaN/Inf in the inputs.")
@click.option("--exact", is_flag=True, help="Keep σ = 0 bit-identical to the model in every session (turns off "
                                            "onnxruntime's NCHWc conv fusion: slower conv nets on the CPU).")
@gate_options
@output_options
@click.option("--resume", is_flag=True, help="Continue an interrupted or crashed audit from its checkpoint (the same "
                                             "model, data and settings; refused otherwise).")
@click.option("--checkpoint", "checkpoint_path", metavar="PATH",
              help="Where the finished sites are saved while the audit runs [default: <--json PATH>.checkpoint, "
                   "else .walkaudit/checkpoint-<hash>.json]; deleted once the report is written.")
@guarded
def audit_command(model, data_path, x_key, y_key, limit, output, ops, include, exclude, site_names, noise, ratio,
                  global_mode, sigmas, repeats, batch_size, seed, chance, provider, threads, noise_source,
                  allow_nonfinite, exact,
                  fail_under, fail_under_relative, rules, rules_file, min_clean_accuracy, baseline, max_drop,
                  json_path, markdown_path, junit_path, quiet, resume, checkpoint_path):
    """Audit MODEL: σ50 of every site, a table, a JSON report and a gate verdict."""
    from walkaudit import api
    from walkaudit.cli import checkpoint as ckpt
    from walkaudit.cli import outputs, signals
    from walkaudit.cli.progress import RichProgress
    from walkaudit.config import AuditConfig, parse_sigmas
    from walkaudit.report import gate

    _check_outputs(json_path, markdown_path, junit_path, extra=[("--checkpoint", checkpoint_path)])
    gate_config = _gate_config(fail_under, fail_under_relative, rules, rules_file, min_clean_accuracy, max_drop,
                               baseline)
    baseline_report = _read_report(baseline) if baseline else None
    config = AuditConfig(
        noise=noise, ratio=ratio, mode="global" if global_mode else "walk",
        sigmas=parse_sigmas(sigmas) if sigmas is not None else None,  # "" is an empty grid, not "adaptive"
        repeats=repeats, seed=seed, batch_size=batch_size,
        provider=provider, chance=chance, output=output, selection=_selection(ops, include, exclude, site_names),
        limit=limit, x_key=x_key, y_key=y_key, allow_nonfinite=allow_nonfinite, threads=threads,
        noise_source=noise_source, exact=exact,
    ).check()

    def warn(message: str) -> None:
        if not quiet:
            click.echo(f"walkaudit: warning: {message}", err=True)

    # The checkpoint: found (and, with --resume, read and checked) before any audit work.
    cp = None
    try:
        fp = ckpt.fingerprint_files(model, data_path, config)
    except OSError:
        fp = None  # a model or data file that cannot be read: the audit itself says so, in its own words
    if fp is not None:
        path = checkpoint_path or ckpt.default_path(json_path, fp)
        done = ckpt.load(path, fp) if resume else []
        if not resume and os.path.isfile(path):
            warn(f"starting over: the checkpoint {path} of an earlier run is replaced (--resume continues it)")
        cp = ckpt.Checkpoint(path, fp, done, make_folder=checkpoint_path is None and json_path in (None, "-"))

    partial, signum = False, None
    with signals.Trap() as trap:
        with RichProgress(disable=quiet) as progress:
            run = api.iter_audit(model, data=data_path, config=config, progress=progress,
                                 done=cp.sites if cp else ())
            if cp is not None and json.dumps(run.fingerprint, sort_keys=True) != json.dumps(fp, sort_keys=True):
                raise UsageError("the model or data file changed while the audit started; run it again")
            try:
                for site in run:
                    problem = cp.add(site.to_dict()) if cp else None
                    if problem:
                        warn(f"{problem}; the audit goes on without a checkpoint")
            except KeyboardInterrupt as exc:
                trap.hold()  # a second Ctrl-C must not cut the partial report short
                try:
                    result = run.report(partial=True)
                except WalkauditError:
                    raise exc from None  # stopped before the clean pass ended: nothing to report
                partial, signum = True, signals.signum_of(exc)
            else:
                result = run.report(partial=False)
        verdict = gate.evaluate(result, gate_config, baseline_report)
        report = result.with_gate(verdict, rules=gate_config.to_dict())
        _emit(report, json_path, markdown_path, junit_path, quiet)
    log = outputs.current_log()
    failed, written = list(log.failed), list(log.written)
    log.failed.clear()  # said here, not again by guarded
    if partial:
        where = ", ".join("stdout" if p == "-" else p for p in written)
        message = f"interrupted ({signals.signal_name(signum)}); " + (
            f"partial report written to {where}" if where else
            "no report written (no --json, --markdown or --junit)" if quiet else "partial results above")
        if failed:
            message += f"; {outputs.failure_message(failed)}"
        if cp is not None and cp.sites and not cp.broken:
            message += "; rerun with --resume to continue"
        _err(message)
        sys.exit(signals.exit_code(signum))
    if failed:
        _err(outputs.failure_message(failed))  # the checkpoint stays: --resume writes the report again at once
        sys.exit(EXIT_USAGE)
    if cp is not None:
        cp.remove()
    sys.exit(verdict.exit_code)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@site_options
@click.option("--json", "as_json", is_flag=True, help="Print the sites as JSON.")
@guarded
def inspect(model, ops, include, exclude, as_json):
    """List the candidate sites of MODEL: index, tensor, node, op type, shape."""
    from rich.console import Console
    from rich.table import Table

    from walkaudit._graph.sites import select
    from walkaudit._loading.model import load_model

    loaded = load_model(model)
    sites = select(loaded.proto, loaded.types, _selection(ops, include, exclude), loaded.class_output.name)
    if as_json:
        click.echo(json.dumps([{"index": s.index, "name": s.name, "node": s.node, "op_type": s.op_type,
                                "shape": None if s.shape is None else list(s.shape)} for s in sites], indent=2))
        return
    out = loaded.class_output
    table = Table(header_style="bold")
    for col in ("#", "tensor", "node", "op", "shape"):
        table.add_column(col, justify="right" if col == "#" else "left")
    for s in sites:
        shape = "?" if s.shape is None else "×".join("?" if d is None else str(d) for d in s.shape)
        table.add_row(str(s.index), s.name, s.node, s.op_type, shape)
    console = Console(highlight=False)
    # a line of its own, not the table's title: rich wraps a title to the table's width
    console.print(f"{len(sites)} sites of {Path(model).name} (class output '{out.name}', {out.kind})", markup=False,
                  soft_wrap=True)
    console.print(table)


@main.command()
@click.argument("old", type=click.Path(dir_okay=False))
@click.argument("new", type=click.Path(dir_okay=False))
@gate_options
@output_options
@guarded
def compare(old, new, fail_under, fail_under_relative, rules, rules_file, min_clean_accuracy, baseline, max_drop,
            json_path, markdown_path, junit_path, quiet):
    """Compare two reports side by side and gate NEW against OLD with the same rules as the audit."""
    from rich.console import Console

    from walkaudit.report import gate, render
    if baseline:
        raise UsageError("compare takes the baseline as its first argument; drop --baseline")
    _check_outputs(json_path, markdown_path, junit_path)
    old_report, new_report = _read_report(old), _read_report(new)
    config = _gate_config(fail_under, fail_under_relative, rules, rules_file, min_clean_accuracy, max_drop, old)
    verdict = gate.evaluate(new_report, config, old_report)
    new_report = new_report.with_gate(verdict, rules=config.to_dict())
    if json_path or markdown_path or junit_path:
        _emit(new_report, json_path, markdown_path, junit_path, quiet=True)
    if not quiet:
        # stdout carries only the document when one goes there; the table and the verdict then go to stderr
        console = Console(stderr="-" in (json_path, markdown_path, junit_path), highlight=False)
        console.print(render.compare_table(old_report, new_report))
        for line in render.gate_lines(verdict):
            console.print(line, markup=False)
    sys.exit(verdict.exit_code)


@main.command()
@click.argument("report_path", metavar="REPORT", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "out", required=True, metavar="FILE", help="Image file: .png, .svg or .pdf.")
@guarded
def plot(report_path, out):
    """Plot accuracy vs σ per site and σ50 per site from a JSON report."""
    from walkaudit.report.plot import FORMATS, plot_report, save_figure
    from walkaudit.report.text import printable

    if Path(out).suffix.lower() not in FORMATS:
        raise UsageError(f"plot output must end in .png, .svg or .pdf, got {printable(out)}")
    figure = plot_report(_read_report(report_path))
    save_figure(figure, out)
    click.echo(f"wrote {printable(out)}", err=True)
