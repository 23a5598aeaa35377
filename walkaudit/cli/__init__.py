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
from walkaudit._noise.registry import NOISE_MODELS, TAKES_BITS, TAKES_TARGET
from walkaudit.errors import UsageError, WalkauditError

EXIT_OK, EXIT_GATE, EXIT_USAGE, EXIT_RUNTIME, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def _err(message: str) -> None:
    """The one error line: `walkaudit: error: …`, control characters escaped (a newline in a tensor name or a path
    never breaks the one-line contract)."""
    from walkaudit.report.text import printable

    click.echo(f"walkaudit: error: {printable(message)}", err=True)


#: exit code when stdout is closed before the output is written (128 + SIGPIPE, as a shell reports it)
EXIT_BROKEN_PIPE = 141


def _stdout_closed() -> None:
    """Say once that the output was cut, keep Python from failing again on the closed pipe at exit, exit 141."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    _err("output cut short: stdout was closed before everything was written (broken pipe)")
    sys.exit(EXIT_BROKEN_PIPE)


def _pipes_raise() -> None:
    """rich ends the process with exit 1 on a closed stdout (which means "gate failed" here); make it raise
    BrokenPipeError instead, which `guarded` turns into exit 141."""
    from rich.console import Console

    def on_broken_pipe(self) -> None:
        raise BrokenPipeError("stdout closed")

    Console.on_broken_pipe = on_broken_pipe


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
                _pipes_raise()
                result = fn(*args, **kwargs)
            except WalkauditError as exc:
                _err(_with_hint(exc.for_cli()))  # options named by their flags
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
            except BrokenPipeError:  # the reader closed stdout (`| head`): the output was cut short
                _stdout_closed()
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


def _with_hint(message: str) -> str:
    """An error line with what to do, where walkaudit knows it."""
    if "cannot run on CUDA" in message and "hint" not in message:
        return (message + "; for CUDA install onnxruntime-gpu with a matching CUDA and cuDNN (pip uninstall "
                "onnxruntime; pip install onnxruntime-gpu), or run on the CPU with --provider cpu (or auto)")
    return message


class DefaultGroup(click.Group):
    """`walkaudit MODEL ...` means `walkaudit audit MODEL ...`; a mistyped command (`audti`, `inspct`) is refused
    with a suggestion; click's own usage errors are one `walkaudit: error:` line (exit 2)."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            close = _command_typo(args[0], list(self.commands))
            if close:
                raise UsageError(f"unknown command {args[0]!r}: did you mean '{close}'? (no file of that name to "
                                 "audit either)")
            if _is_report(args[0]):
                raise UsageError(f"{args[0]} is a JSON report, not a model to audit: compare it with 'walkaudit "
                                 f"compare BASELINE.json {args[0]}', plot it with 'walkaudit plot {args[0]} -o "
                                 "curves.png', or audit a model with 'walkaudit MODEL.onnx --data DATA'")
            args = ["audit", *args]
        return super().parse_args(ctx, args)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:  # click's parsing: one line, and where to read more
            where = exc.ctx.command_path if exc.ctx is not None else "walkaudit"
            _err(f"{exc.format_message().rstrip('.')}; see '{where} --help'")
            sys.exit(EXIT_USAGE)
        except WalkauditError as exc:  # raised while parsing (a mistyped command)
            _err(exc.for_cli())
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            _err(exc.format_message())
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            _err("aborted")
            sys.exit(EXIT_INTERRUPTED)
        sys.exit(code if isinstance(code, int) else EXIT_OK)


def _is_report(word: str) -> bool:
    """Whether the file `word` (given where a model goes) is a JSON document: its first non-blank byte is '{'."""
    try:
        with open(word, "rb") as f:
            return f.read(64).lstrip()[:1] == b"{"
    except OSError:
        return False


def _command_typo(word: str, commands: list[str]) -> str | None:
    """The command `word` is a typo of, or None: only for a bare word (no path separator or suffix) that is no
    existing file and close to a command name."""
    import difflib

    if not word or word.startswith("-") or "/" in word or "\\" in word or "." in word or os.path.exists(word):
        return None
    close = difflib.get_close_matches(word.lower(), commands, n=1, cutoff=0.6)
    return close[0] if close else None


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


@main.command("version")
def version_command():
    """Print walkaudit's version."""
    click.echo(f"walkaudit, version {__version__}")


@main.command("help")
@click.argument("command", required=False)
@click.pass_context
def help_command(ctx, command):
    """Show the help of walkaudit, or of one COMMAND (the same as 'walkaudit COMMAND --help')."""
    group = ctx.parent.command
    if command is None:
        click.echo(group.get_help(ctx.parent))
        return
    cmd = group.get_command(ctx.parent, command)
    if cmd is None:
        raise click.UsageError(f"no command {command!r} (commands: {', '.join(group.list_commands(ctx.parent))})",
                               ctx=ctx)
    with click.Context(cmd, info_name=command, parent=ctx.parent) as sub:
        click.echo(cmd.get_help(sub))


#: the sections of `audit --help`, by parameter name; a parameter not named here is listed under "Other"
AUDIT_OPTION_GROUPS = {
    "Data": ("data_path", "x_key", "y_key", "limit", "output", "chance", "ignore_label", "mask", "allow_nonfinite"),
    "Sites": ("ops", "include", "exclude", "site_names"),
    "Noise & sweep": ("noise", "ratio", "bits", "target", "global_mode", "sigmas", "repeats", "drops", "seed"),
    "Runtime": ("provider", "threads", "batch_size", "noise_source", "exact", "shard", "ray_address"),
    "Gate": ("fail_under", "fail_under_relative", "rules", "rules_file", "min_clean_accuracy", "baseline",
             "max_drop", "undecided", "allow_unmatched"),
    "Output": ("json_path", "markdown_path", "junit_path", "html", "output_format", "github", "quiet", "silent"),
    "Resume": ("resume", "checkpoint_path"),
}


class GroupedCommand(click.Command):
    """A command whose --help lists its options in sections (`option_groups`: title -> parameter names)."""

    option_groups: dict[str, tuple[str, ...]] = AUDIT_OPTION_GROUPS

    def format_options(self, ctx, formatter):
        records = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                records[param.name] = record
        listed = set()
        for title, names in self.option_groups.items():
            rows = [records[n] for n in names if n in records]
            listed.update(names)
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)
        rest = [r for n, r in records.items() if n not in listed]
        if rest:
            with formatter.section("Other"):
                formatter.write_dl(rest)


def site_options(fn):
    fn = click.option("--exclude", metavar="REGEX", help="Drop sites whose tensor or node name matches.")(fn)
    fn = click.option("--include", metavar="REGEX", help="Keep only sites whose tensor or node name matches.")(fn)
    fn = click.option("--ops", metavar="OPS", default=None,
                      help="Comma-separated op types whose outputs are sites, or 'all' for every float node output "
                           "[default: Conv,ConvTranspose,Gemm,MatMul with their bias Add, and LSTM,GRU,RNN].")(fn)
    return fn


def gate_options(fn=None, *, baseline: bool = True):
    """The gate's flags; compare takes its baseline as an argument (`baseline=False`: no --baseline flag)."""
    if fn is None:
        return functools.partial(gate_options, baseline=baseline)
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
        click.option("--max-drop", metavar="DROP", help="Largest allowed σ50 drop vs --baseline: '20%' or '0.3dec' "
                                                        "(a bare number means decades)."),
        click.option("--undecided", type=click.Choice(["fail", "pass"]), default="fail", show_default=True,
                     expose_value=False, callback=_store("undecided"),
                     help="What a rule whose 95% interval straddles its threshold does to the verdict (docs/ci.md)."),
        click.option("--allow-unmatched", is_flag=True, expose_value=False, callback=_store("allow_unmatched"),
                     help="Accept a --rule that matches no site (a warning instead of an error)."),
    ]
    if not baseline:  # opts[5] is --baseline, opts[6] --max-drop
        opts[5:7] = [click.option("--max-drop", metavar="DROP",
                                  help="Largest allowed σ50 drop of NEW vs OLD: '20%' or '0.3dec' (a bare number "
                                       "means decades).")]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _gate_policy() -> dict:
    """The gate's --undecided and --allow-unmatched, as `gate.evaluate` takes them."""
    return {"undecided": _meta("undecided", "fail"), "allow_unmatched": bool(_meta("allow_unmatched"))}


def _store(key: str):
    """A click callback that keeps an option's value in the context (`_meta`) instead of passing it to the
    command: the output flags every command shares without every signature naming them."""
    def callback(ctx, param, value):
        if value is not None and (value is not False or f"walkaudit.{key}" not in ctx.meta):
            ctx.meta[f"walkaudit.{key}"] = value
        return value
    return callback


def _meta(key: str, default=None):
    ctx = click.get_current_context(silent=True)
    while ctx is not None:
        if f"walkaudit.{key}" in ctx.meta:
            return ctx.meta[f"walkaudit.{key}"]
        ctx = ctx.parent
    return default


def deprecated(old: str, new: str, key: str, **kw):
    """A hidden option kept for one release under its old spelling: its value goes to `_meta(key)` (read as the new
    option's), with one `walkaudit: warning: OLD is deprecated; use NEW` line on stderr."""
    def callback(ctx, param, value):
        if value is not None and value is not False and value != ():
            click.echo(f"walkaudit: warning: {old} is deprecated; use {new}", err=True)
            ctx.meta[f"walkaudit.{key}"] = value
        return value
    return click.option(old, f"deprecated_{key}", hidden=True, expose_value=False, callback=callback, **kw)


def _json_target(json_path: str | None) -> str | None:
    """The JSON report's path from --json or -o/--out (the same file under two names); refused when both differ."""
    out = _meta("out")
    if out is not None and json_path is not None and out != json_path:
        raise UsageError("-o/--out and --json both name the JSON report; give one of them")
    return json_path if json_path is not None else out


def output_options(fn):
    opts = [
        click.option("-o", "--out", metavar="PATH", expose_value=False, callback=_store("out"),
                     help="Write the JSON report ('-' = stdout); the same as --json."),
        click.option("--json", "json_path", metavar="PATH", help="Write the JSON report ('-' = stdout)."),
        click.option("--markdown", "markdown_path", metavar="PATH",
                     help="Write a Markdown summary ('auto' = append to $GITHUB_STEP_SUMMARY)."),
        click.option("--junit", "junit_path", metavar="PATH", help="Write JUnit XML (one test case per site)."),
        click.option("--html", metavar="PATH", expose_value=False, callback=_store("html"),
                     help="Write a self-contained HTML report: table, curves and failures in one file."),
        click.option("--format", "output_format", type=click.Choice(["text", "github"]), default="text",
                     show_default=True, expose_value=False, callback=_store("format"),
                     help="github: also GitHub workflow annotations (::error per gate failure, ::warning per "
                          "warning)."),
        click.option("--github", is_flag=True, expose_value=False, callback=_store("github"),
                     help="The same as --format github."),
        click.option("-q", "--quiet", is_flag=True, help="Print only gate failures: no progress, no table, no "
                                                          "warnings."),
        click.option("-s", "--silent", is_flag=True, expose_value=False, callback=_store("silent"),
                     help="Print nothing; the exit code tells (an error that stops the run still gets its line)."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _selection(ops, include, exclude, names=()):
    from walkaudit._graph.sites import LAYER_OPS, Selection

    op_list = tuple(_op_type(o.strip()) for o in ops.split(",") if o.strip()) if ops else LAYER_OPS
    return Selection(op_list, include, exclude, tuple(names))


def _op_type(name: str) -> str:
    """An op type as ONNX spells it: `conv` -> `Conv`, `matmul` -> `MatMul` (op types are case-sensitive; users
    rarely type them so). `all` and names ONNX does not know (custom domains) stay as written."""
    if name.lower() == "all":
        return name
    try:
        import onnx.defs

        known = {schema.name.lower(): schema.name for schema in onnx.defs.get_all_schemas()}
    except Exception:  # an onnx without its schema registry: leave the name alone
        return name
    return known.get(name.lower(), name) if name not in known.values() else name


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
    _check_plausible(config, max_drop)
    return config


#: a σ50 that may fall by more than this many decades (a factor of 1000) is hardly gated at all
_DECADES_IMPLAUSIBLE = 3.0


def _check_plausible(config, max_drop_flag: str | None) -> None:
    """Refuse a gate that can never fail because of a missing unit (`--max-drop 20`: 20 decades, not 20%); warn
    about other values under which nothing can fail."""
    import re

    drop = config.max_drop
    bare = max_drop_flag is not None and re.fullmatch(r"\s*[-+0-9.eE]+\s*", str(max_drop_flag))
    if bare and drop.amount < _DECADES_IMPLAUSIBLE:  # every drop names its unit (an accuracy drop's bare is refused)
        _warn(f"--max-drop {max_drop_flag.strip()}: a bare number means decades here, but a drop names its unit: "
              f"write '{drop.amount:g}dec' (or a percentage like '20%'); a bare number will be refused in a later "
              "release")
    if drop is not None and drop.unit == "dec" and drop.amount >= _DECADES_IMPLAUSIBLE:
        if bare:
            raise UsageError(f"--max-drop {max_drop_flag.strip()} means {drop.amount:g} decades (σ50 may fall by a "
                             f"factor of 10^{drop.amount:g}): a gate that cannot fail; write '{drop.amount:g}%' for "
                             f"percent, or '{drop.amount:g}dec' if you mean decades")
        _warn(f"max drop {drop.amount:g} decades lets σ50 fall by a factor of 10^{drop.amount:g}: the drop rule can "
              "hardly fail (did you mean percent, e.g. '20%'?)")
    for t in config.thresholds:
        if t.value == 0:
            _warn(f"threshold {t} is 0: every σ50 is ≥ 0, so it can never fail")
    if config.min_clean_accuracy == 0:
        _warn("--min-clean-accuracy 0 can never fail (it is a fraction: 0.9 means 90%)")


def _warn(message: str) -> None:
    """A `walkaudit: warning:` line on stderr, unless -q or -s."""
    from walkaudit.report.text import printable

    ctx = click.get_current_context(silent=True)
    if (ctx is not None and ctx.params.get("quiet")) or _meta("silent"):
        return
    click.echo(f"walkaudit: warning: {printable(message)}", err=True)


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
                           ("--html", _meta("html")), *extra])


def _no_warnings(lines: list[str]) -> list[str]:
    """The rendered lines without the gate's `warning: ` lines, which go to stderr as `walkaudit: warning: …`."""
    return [ln for ln in lines if not (isinstance(ln, str) and ln.startswith("warning: "))]


def _readable(text: str) -> str:
    """A JSON report walkaudit can read back: refused (one line, nothing written) when it is larger than the
    reader's limit (walkaudit.report.model.MAX_REPORT_BYTES)."""
    from walkaudit.report import model

    size = len(text.encode("utf-8"))
    if size > model.MAX_REPORT_BYTES:
        raise UsageError(f"the JSON report would be {size / 2**20:.0f} MiB, more than the "
                         f"{model.MAX_REPORT_BYTES // 2**20} MiB walkaudit reads back; nothing written (fewer sites "
                         "per report: --include/--exclude, or a coarser --sigmas grid)")
    return text


def _emit(report, json_path, markdown_path, junit_path, quiet: bool, compare_with=None) -> None:
    """Write the requested files of a typed Report and print the summary (to stderr when stdout carries a document).

    Default: the table (at a width that crops nothing) and the summary lines. -q: only the gate's failures (and the
    verdict) when it failed. -s: nothing. `--format github`: GitHub annotations as well (-q: the failures' only).
    `compare_with`: the baseline report of `compare`, whose table is then the side-by-side one.
    """
    from rich.console import Console

    from walkaudit.report import render
    from walkaudit.report.formats import to_github, to_html, to_junit, to_markdown
    from walkaudit.report.model import dumps

    if json_path:
        _write(json_path, _readable(dumps(report.to_dict())))
    if markdown_path:
        if markdown_path == "auto":
            _write(os.environ["GITHUB_STEP_SUMMARY"], to_markdown(report) + "\n", append=True)
        else:
            _write(markdown_path, to_markdown(report))
    if junit_path:
        _write(junit_path, to_junit(report))
    html_path = _meta("html")
    if html_path:
        _write(html_path, to_html(report, baseline=compare_with))
    if _meta("silent"):
        return
    to_stderr = "-" in (json_path, markdown_path, junit_path, html_path)
    width = render.output_width(sys.stderr if to_stderr else sys.stdout)  # None: a pipe or a log, no limit
    console = Console(stderr=to_stderr, highlight=False, width=width or 100_000)
    github = _meta("format") == "github" or _meta("github")
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
                render.show(console, [render.TOLERANCE_TITLE])
                render.show(console, tolerances)
            render.show(console, _no_warnings(render.summary_lines(report)))
        for warning in gate.warnings if gate is not None else ():
            _warn(warning)  # every warning: stderr, one prefix (the table and verdict stay on stdout)
    if github:
        lines = to_github(report, warnings=not quiet).splitlines()
        if lines:
            click.echo("\n".join(lines), err=to_stderr)


@main.command("audit", cls=GroupedCommand, context_settings={"show_default": True})
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", "data_path", required=True, type=click.Path(), metavar="FILE|DIR",
              help="Validation data: .npz (inputs and optional labels), .npy (inputs only), or a folder of .npz "
                   "shards or of one .npy per array (docs/data.md).")
@click.option("--x-key", metavar="KEY", help="Array holding the inputs in the .npz [default: auto].")
@click.option("--y-key", metavar="KEY", help="Array holding the labels in the .npz [default: auto].")
@click.option("--limit", type=int, metavar="N", help="Use only the first N samples.")
@click.option("--output", metavar="NAME", help="The class output to read [default: found automatically].")
@site_options
@click.option("--site", "site_names", multiple=True, metavar="TENSOR", help="An explicit site (repeatable).")
@click.option("--noise", type=click.Choice(NOISE_MODELS), default="additive", show_default=True,
              help="Noise model (docs/method.md): " + ", ".join(NOISE_MODELS) + ".")
@click.option("--ratio", type=float, default=0.5, show_default=True,
              help="combined: σa = σ·r, σm = σ·(1−r).")
@click.option("--bits", metavar="SPEC", help="; ".join(f"{k}: {v}" for k, v in TAKES_BITS.items()) + ".")
@click.option("--target", type=click.Choice(["activations", "weights"]),
              help=f"{', '.join(TAKES_TARGET)}: perturb each layer's output (default) or its weights.")
@click.option("--global", "global_mode", is_flag=True, help="The same σ at every site at once (default: one site at "
                                                              "a time).")
@click.option("--sigmas", metavar="LIST|A:B:N",
              help="Fixed σ grid: '0.01,0.1,1' or '1e-3:1e2:21' (log). Default: adaptive search per site.")
@click.option("--repeats", type=int, default=3, show_default=True, help="Noise draws per σ.")
@click.option("--drop", "drops", multiple=True, metavar="DROP",
              help="Also report per site the σ at which accuracy falls by DROP: '1%' (points) or '5%rel' (of clean "
                   "− chance). Repeatable; gate it with --rule 'REGEX:SIGMA@1%'.")
@click.option("--batch-size", type=int, default=None,
              help="Samples per batch [default: 256 on the CPU; sized to the free device memory on CUDA].")
@click.option("--seed", type=int, default=0, show_default=True, help="Noise seed (same seed, same report).")
@click.option("--chance", type=float, help="Chance accuracy [default: 1/classes].")
@click.option("--ignore-label", type=int, default=-100, show_default=True, metavar="ID",
              help="Per-token outputs [N, T, C]: the label of a position that is not scored.")
@click.option("--mask", metavar="INPUT", help="Per-token outputs: the model input read as the attention mask "
                                              "(positions where it is 0 are not scored) [default: attention_mask, "
                                              "if the model takes it].")
@click.option("--provider", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True,
              help="onnxruntime provider; auto uses CUDA only where a session really runs on it.")
@click.option("--threads", type=int, help="CPU threads for onnxruntime and noise [default: all].")
@click.option("--noise-source", type=click.Choice(["auto", "host", "graph"]), default="auto", show_default=True,
              help="Where ε is drawn: numpy on the host, or RandomNormalLike in the graph (opsets 10-21); auto "
                   "uses the graph on CUDA.")
@click.option("--allow-nonfinite", is_flag=True, help="Accept NaN/Inf in the inputs.")
@click.option("--exact", is_flag=True, help="Keep σ = 0 bit-identical to the model in every session (turns off "
                                            "onnxruntime's NCHWc conv fusion, and running a [CLS] classifier's last "
                                            "layer on one position: slower on the CPU).")
@click.option("--shard", metavar="I/N", help="Audit only shard I of N (1-based) of the selected sites, split by "
                                             "estimated cost; combine the N reports with 'walkaudit merge' (see "
                                             "docs/scale.md).")
@gate_options
@output_options
@click.option("--resume", is_flag=True, help="Continue an interrupted or crashed audit from its checkpoint (the same "
                                             "model, data and settings; refused otherwise).")
@click.option("--checkpoint", "checkpoint_path", metavar="PATH",
              help="Where the finished sites are saved while the audit runs [default: <--json PATH>.checkpoint, "
                   "else .walkaudit/checkpoint-<hash>.json]; deleted once the report is written.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Evaluate on Ray workers: alone, a local cluster on this machine's cores and GPUs; 'auto', "
                   "'ray://HOST:10001' or 'HOST:6379' joins a running cluster (the 'ray' extra; see docs/scale.md).")
@guarded
def audit_command(model, data_path, x_key, y_key, limit, output, ops, include, exclude, site_names, noise, ratio, bits,
                  target,
                  global_mode, sigmas, repeats, drops, batch_size, seed, chance, ignore_label, mask, provider, threads,
                  noise_source,
                  allow_nonfinite, exact, shard,
                  fail_under, fail_under_relative, rules, rules_file, min_clean_accuracy, baseline, max_drop,
                  json_path, markdown_path, junit_path, quiet, resume, checkpoint_path, ray_address):
    """Audit MODEL: σ50 of every site, a table, a JSON report and a gate verdict.

    \b
    Examples:
      walkaudit model.onnx --data val.npz --json out/report.json
      walkaudit model.onnx --data val.npz --fail-under 0.05 --baseline base.json --max-drop 20%
      walkaudit model.onnx --data val.npz --ops Conv,Gemm --noise multiplicative --sigmas 1e-3:1e1:21
      walkaudit model.onnx --data val.npz --json report.json --markdown auto --format github -q
      walkaudit model.onnx --data val.npz --json report.json --resume      # after Ctrl-C or a crash

    Exit codes: 0 passed, 1 gate failed, 2 bad usage or input, 3 runtime failure, 130/143/129 interrupted by
    SIGINT/SIGTERM/SIGHUP (a partial report is written; --resume continues).
    """
    quiet = quiet or bool(_meta("silent"))
    json_path = _json_target(json_path)
    from walkaudit import api
    from walkaudit.cli import checkpoint as ckpt
    from walkaudit.cli import outputs, signals
    from walkaudit.cli.progress import RichProgress
    from walkaudit.config import AuditConfig, parse_bound, parse_sigmas
    from walkaudit.report import gate

    _check_outputs(json_path, markdown_path, junit_path, extra=[("--checkpoint", checkpoint_path)])
    gate_config = _gate_config(fail_under, fail_under_relative, rules, rules_file, min_clean_accuracy, max_drop,
                               baseline)
    baseline_report = _read_report(baseline) if baseline else None
    config = AuditConfig(
        noise=noise, ratio=ratio, bits=bits, target=target, mode="global" if global_mode else "walk",
        sigmas=parse_sigmas(sigmas) if sigmas is not None else None,  # "" is an empty grid, not "adaptive"
        repeats=repeats, seed=seed, batch_size=batch_size,
        provider=provider, chance=chance, output=output, selection=_selection(ops, include, exclude, site_names),
        limit=limit, x_key=x_key, y_key=y_key, allow_nonfinite=allow_nonfinite, threads=threads,
        noise_source=noise_source, exact=exact, shard=_shard_option(shard, global_mode),
        drops=tuple(parse_bound(d, "drops") for d in drops), ignore_label=ignore_label, mask=mask,
    ).check()

    def warn(message: str) -> None:
        if not quiet:
            click.echo(f"walkaudit: warning: {message}", err=True)

    _check_npz_labels(data_path, x_key, y_key)

    # The checkpoint: found (and, with --resume, read and checked) before any audit work.
    cp = None
    try:
        fp = ckpt.fingerprint_files(model, data_path, config)
    except OSError:
        fp = None  # a model or data file that cannot be read: the audit itself says so, in its own words
    if fp is not None:
        path = checkpoint_path or ckpt.default_path(json_path, fp)
        written = [(flag, o.path) for flag, value in (("--json", json_path), ("--markdown", markdown_path),
                                                      ("--junit", junit_path), ("--html", _meta("html")))
                   for o in [outputs.resolve(flag, value)] if o is not None]
        exists = ckpt.check_path(path, written, inputs=[("the model", model), ("the data (--data)", data_path)])
        ckpt.clean_stale(path)  # the temporary of a write killed with -9
        if resume and not exists:  # e.g. killed before the first site finished: nothing saved yet
            warn(f"--resume: no checkpoint at {path} yet; starting from the beginning")
        done = ckpt.load(path, fp) if resume and exists else []
        if not resume and exists:
            warn(f"starting over: the checkpoint {path} of an earlier run is replaced (--resume continues it)")
        cp = ckpt.Checkpoint(path, fp, done, make_folder=checkpoint_path is None and json_path in (None, "-"))

    executor = None
    if ray_address is not None:  # connected before any audit work: a request the cluster cannot meet fails here
        from walkaudit._execution import ray_executor

        executor = ray_executor.connect(None if ray_address == "local" else ray_address, config)
    partial, signum = False, None
    with signals.Trap() as trap:
        with RichProgress(disable=quiet) as progress:
            run = api.iter_audit(model, data=data_path, config=config, progress=progress,
                                 done=cp.sites if cp else (), executor=executor,
                                 data_sha256=fp["data_sha256"] if fp else None)  # hashed once, above
            if cp is not None and json.dumps(run.fingerprint, sort_keys=True) != json.dumps(fp, sort_keys=True):
                raise UsageError("the model or data file changed while the audit started; run it again")
            _warn_range(run, warn)
            if cp is not None and cp.sites:
                ckpt.check_against(cp.sites, run.sites, None if run.loaded.class_output.per_token
                                   else run.dataset.samples)
            if gate_config.thresholds and not _meta("allow_unmatched") and config.shard is None:  # before any work
                gate.check_matched(gate_config, ["global"] if global_mode else [s.name for s in run.sites])
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
        verdict = gate.evaluate(result, gate_config, baseline_report, **_gate_policy())
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
@click.option("--format", "output_format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="json: the sites as a JSON list.")
@deprecated("--json", "--format json", "inspect_json", is_flag=True)
@guarded
def inspect(model, ops, include, exclude, output_format):
    """List the candidate sites of MODEL: index, tensor, node, op type, shape, MACs per sample."""
    as_json = output_format == "json" or bool(_meta("inspect_json"))
    from rich.console import Console

    from walkaudit._graph.cost import sites_macs
    from walkaudit._graph.sites import select
    from walkaudit._loading.model import load_model

    loaded = load_model(model)
    sites = select(loaded.proto, loaded.types, _selection(ops, include, exclude), loaded.class_output.name)
    macs = sites_macs(loaded, sites)
    if as_json:
        click.echo(json.dumps([{"index": s.index, "name": s.name, "node": s.node, "op_type": s.op_type,
                                "shape": None if s.shape is None else list(s.shape), "macs": m}
                               for s, m in zip(sites, macs)], indent=2))
        return
    from walkaudit.report import render
    from walkaudit.report.text import printable, shape_text

    out = loaded.class_output
    width = render.output_width(sys.stdout)  # None (a pipe, a log): the whole table
    console = Console(highlight=False, width=width or 100_000)
    columns = [render.Column("#", "right", "index"), render.Column("tensor", kind="name"),
               render.Column("node", kind="name"), render.Column("op"), render.Column("shape"),
               render.Column("MACs", "right", "number")]
    rows = [[str(s.index), render.Name(printable(s.name)), render.Name(printable(s.node)), printable(s.op_type),
             shape_text(s.shape),
             _count_text(m)] for s, m in zip(sites, macs)]
    # a line of its own, not the table's title: rich wraps a title to the table's width
    console.print(f"{len(sites)} sites of {printable(Path(model).name)} (class output '{printable(out.name)}', "
                  f"{out.kind}{' per token' if out.per_token else ''})", markup=False, soft_wrap=True)
    # never cropped: names lose their common prefix (never their end) or the rows become records at narrow widths
    render.show(console, render.fit(columns, rows, width))


@main.command()
@click.argument("old", type=click.Path(dir_okay=False))
@click.argument("new", type=click.Path(dir_okay=False))
@gate_options(baseline=False)
@output_options
@guarded
def compare(old, new, fail_under, fail_under_relative, rules, rules_file, min_clean_accuracy, max_drop,
            json_path, markdown_path, junit_path, quiet):
    """Compare two reports side by side and gate NEW against OLD with the same rules as the audit.

    \b
      walkaudit compare baseline.json report.json --max-drop 20%
      walkaudit compare baseline.json report.json --max-drop 20% --markdown auto --format github

    The change column is in percent (as --max-drop '20%'), the decades column in decades (as '0.3dec').
    Exit codes: 0 passed, 1 gate failed, 2 bad usage or input (e.g. reports that cannot be compared).
    """
    from walkaudit.report import gate

    json_path = _json_target(json_path)
    _check_outputs(json_path, markdown_path, junit_path)
    old_report, new_report = _read_report(old), _read_report(new)
    config = _gate_config(fail_under, fail_under_relative, rules, rules_file, min_clean_accuracy, max_drop, old)
    verdict = gate.evaluate(new_report, config, old_report, **_gate_policy())
    if config.max_drop is None:  # compare shows OLD beside NEW: it was compared, only drops are not gated (said below)
        verdict.warnings = [w for w in verdict.warnings if "the baseline was not compared" not in w]
    new_report = new_report.with_gate(verdict, rules=config.to_dict())
    if config.max_drop is None:
        drops = _drops(old_report, new_report)
        if drops:
            name, percent = max(drops, key=lambda d: d[1])
            _warn(f"no --max-drop: σ50 drops are shown, not gated ({len(drops)} site(s) lower, at most "
                  f"{percent:.0f}% at {name}); add e.g. --max-drop 20%")
    _emit(new_report, json_path, markdown_path, junit_path, quiet, compare_with=old_report)
    sys.exit(verdict.exit_code)


@main.command()
@click.argument("report_path", metavar="REPORT", type=click.Path(dir_okay=False))
@click.option("-o", "--out", metavar="FILE", help="Image file: .png, .svg or .pdf (required).")
@deprecated("--output", "-o/--out", "plot_out", metavar="FILE")
@click.option("--baseline", metavar="REPORT", type=click.Path(dir_okay=False),
              help="Overlay a baseline report: its curves dotted, its σ50 as black ticks on the bars.")
@click.option("--relative", is_flag=True, help="σ / activation std on the x axes instead of σ.")
@guarded
def plot(report_path, out, baseline, relative):
    """Plot accuracy vs σ per site and σ50 per site from a JSON report (needs matplotlib).

    \b
      walkaudit plot report.json -o curves.png
      walkaudit plot report.json -o curves.svg --baseline baseline.json --relative
    """
    from walkaudit.report.plot import FORMATS, plot_report, save_figure
    from walkaudit.report.text import printable

    out = out if out is not None else _meta("plot_out")
    if out is None:
        raise UsageError("plot needs the image file: -o/--out FILE (.png, .svg or .pdf)")
    if Path(out).suffix.lower() not in FORMATS:
        raise UsageError(f"plot output must end in .png, .svg or .pdf, got {printable(out)}")
    figure = plot_report(_read_report(report_path), baseline=_read_report(baseline) if baseline else None,
                         relative=relative)
    save_figure(figure, out)
    click.echo(f"wrote {printable(out)}", err=True)


#: where the data loader looks for labels without --y-key (walkaudit._loading.data)
_LABEL_KEYS = ("y", "Y", "labels", "label", "targets", "target")
_LABEL_LIKE = ("lab", "lbl", "target", "class", "truth", "gt", "ann")


def _warn_range(run, warn) -> None:
    """Warn when the data looks unnormalised (walkaudit._loading.data.range_warning: whole-number floats above 50)."""
    from walkaudit._loading.data import range_warning

    dataset = getattr(run, "dataset", None)
    message = range_warning(dataset) if dataset is not None else None
    if message:
        warn(message)


def _check_npz_labels(data_path: str, x_key: str | None, y_key: str | None) -> None:
    """Warn when an .npz holds an array that looks like labels but will not be used as such (no --y-key and none of
    the names the loader knows): the audit would silently measure agreement with the clean model. Only the member
    names are read (zipfile), never an array."""
    import zipfile

    if y_key is not None or not str(data_path).lower().endswith(".npz"):
        return
    try:
        with zipfile.ZipFile(data_path) as archive:
            keys = [n[:-4] for n in archive.namelist() if n.endswith(".npy")]
    except (OSError, zipfile.BadZipFile, ValueError):
        return  # the loader says what is wrong with the file
    if any(k in _LABEL_KEYS for k in keys):
        return
    unused = [k for k in keys if k != x_key]
    likely = [k for k in unused if k.lower() in ("y", "t") or any(w in k.lower() for w in _LABEL_LIKE)]
    if likely:
        names = ", ".join(repr(k) for k in likely)
        _warn(f"{data_path} has no labels under {', '.join(_LABEL_KEYS)}, so accuracy means agreement with the clean "
              f"model; {names} look{'s' if len(likely) == 1 else ''} like labels: pass --y-key {likely[0]} to use "
              "them")


def _drops(old, new) -> list[tuple[str, float]]:
    """(site, drop in %) of every site whose σ50 is lower in `new` than in `old` (matched by name)."""
    before = {s.name: s.sigma50 for s in old.sites}
    return [(s.name, (before[s.name] - s.sigma50) / before[s.name] * 100) for s in new.sites
            if before.get(s.name) and s.sigma50 and s.sigma50 < before[s.name]]


def _shard_option(text: str | None, global_mode: bool) -> tuple[int, int] | None:
    """--shard I/N as (i, n); refused with --global (every site at once: nothing to split)."""
    if text is None:
        return None
    from walkaudit.config import parse_shard

    shard = parse_shard(text)
    if global_mode:
        raise UsageError("--shard splits the sites of a walk; --global puts noise at every site at once and cannot "
                         "be sharded")
    return shard


def _count_text(value: int | None) -> str:
    """A count for a table: 840, 117.6k, 3.699G; '?' when unknown."""
    if value is None:
        return "?"
    for unit, scale in (("T", 10**12), ("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if value >= scale:
            return f"{value / scale:.4g}{unit}"
    return str(value)


@main.command("merge")
@click.argument("shard_paths", metavar="SHARD.json...", nargs=-1, required=True, type=click.Path(dir_okay=False))
@deprecated("--output", "-o/--out", "out", metavar="PATH")
@gate_options
@output_options
@guarded
def merge_command(shard_paths, fail_under, fail_under_relative, rules, rules_file, min_clean_accuracy, baseline,
                  max_drop, json_path, markdown_path, junit_path, quiet):
    """Combine the N reports of 'walkaudit MODEL --data D --shard I/N' into the unsharded audit's report and gate it
    like an audit (exit 0 passed, 1 gate failed, 2 the reports are not the N shards of one audit).

    \b
      walkaudit merge shard-*.json -o report.json --fail-under 0.05
    """
    from walkaudit.report import gate
    from walkaudit.report.merge import merge

    json_path = _json_target(json_path)
    inputs = [("a shard report (SHARD)", p) for p in shard_paths]
    inputs += [(what, p) for what, p in (("the baseline (--baseline)", baseline), ("the rules file (--rules)",
                                                                                   rules_file)) if p]
    _check_outputs(json_path, markdown_path, junit_path, inputs=inputs)
    gate_config = _gate_config(fail_under, fail_under_relative, rules, rules_file, min_clean_accuracy, max_drop,
                               baseline)
    baseline_report = _read_report(baseline) if baseline else None
    merged = merge([_read_report(p) for p in shard_paths], names=list(shard_paths))
    verdict = gate.evaluate(merged, gate_config, baseline_report, **_gate_policy())
    report = merged.with_gate(verdict, rules=gate_config.to_dict())
    _emit(report, json_path, markdown_path, junit_path, quiet)
    sys.exit(verdict.exit_code)


from walkaudit.cli import plan as _plan  # noqa: E402,F401  (registers `walkaudit plan`)
from walkaudit.cli import bits as _bits  # noqa: E402,F401  (registers `walkaudit bits`)
