"""The `walkaudit` command group and what every command shares: the error line, exit codes, `guarded`, warnings,
and the grouped --help (walkaudit.cli.options)."""

from __future__ import annotations

import functools
import os
import sys

import click

from walkaudit import __version__
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

    Console.on_broken_pipe = on_broken_pipe  # type: ignore[method-assign]  # rich's hook, replaced on purpose


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

    Exit codes: 0 passed, 1 gate failed or undecided, 2 bad usage or input, 3 runtime failure, 130 interrupted.
    """



def warn(message: str) -> None:
    """A `walkaudit: warning:` line on stderr, unless the running command was given -q or -s."""
    from walkaudit.report.text import printable

    ctx = click.get_current_context(silent=True)
    params = ctx.params if ctx is not None else {}
    if params.get("quiet") or params.get("silent"):
        return
    click.echo(f"walkaudit: warning: {printable(message)}", err=True)


class GroupedCommand(click.Command):
    """A command whose --help lists its options in sections: one per option group (walkaudit.cli.options), in the
    order the command composes them; arguments and --help under "Other"."""

    def format_options(self, ctx, formatter):
        sections: dict[str, list] = {}
        rest = []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            group = getattr(param, "walkaudit_group", None)
            if group is None:
                rest.append(record)
            else:
                sections.setdefault(group.title, []).append(record)
        if rest:
            sections.setdefault("Other", []).extend(rest)
        for title, rows in sections.items():
            with formatter.section(title):
                formatter.write_dl(rows)
