"""Output files: checked before any work is done, then written atomically.

`check(inputs, outputs)` refuses, with one line, every output that cannot be honoured: one that is an input or
another output (symlinks and hard links included), a missing or read-only folder, a directory or a non-regular file
(a device, a FIFO), more than one output on stdout, `--markdown auto` without a usable $GITHUB_STEP_SUMMARY.

`write_atomic(path, text)` writes a temporary file in the same folder, fsyncs it and renames it over the target, so a
full disk, kill -9 or a concurrent writer never leaves a truncated or interleaved report. `append_once` appends in
one write call (for $GITHUB_STEP_SUMMARY, which belongs to the runner). `write` picks one of them (or stdout for
'-'); inside `collecting()` a failed write is recorded instead of raised, so the other outputs are still written and
the command ends with exit 2 naming the one that failed.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from dataclasses import dataclass

import click

from walkaudit.errors import UsageError

STDOUT = "-"
SUMMARY_ENV = "GITHUB_STEP_SUMMARY"


@dataclass(frozen=True)
class Output:
    """A requested output: the flag that asked for it, the path as given, where it really goes, and how."""

    flag: str  # "--json", "--markdown", "--junit", "--checkpoint"
    given: str  # as the user wrote it ('-', 'auto', a path)
    path: str  # '-' or the file written (for 'auto': $GITHUB_STEP_SUMMARY)
    append: bool = False

    @property
    def label(self) -> str:
        if self.given == "auto":
            return f"{self.flag} auto (${SUMMARY_ENV}={self.path})"
        return f"{self.flag} {self.given}"


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def same_file(a: str, b: str) -> bool:
    """True when two paths name the same file: the same resolved path, or the same inode (hard links)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): only the resolved paths could tell
        return False


def _check_target(out: Output) -> None:
    """The file itself: not a directory, not a device or FIFO; its folder exists and is writable."""
    path = out.path
    try:
        st = os.stat(path)  # follows symlinks: what would really be written
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise UsageError(f"{out.label}: cannot use it as an output: {_reason(exc)}") from None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise UsageError(f"{out.label} is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{out.label} is not a regular file (a device, FIFO or socket); give a file path or '-'")
    folder = os.path.dirname(os.path.realpath(path)) or "."
    if not os.path.isdir(folder):
        where = f"the folder of ${SUMMARY_ENV} ({folder})" if out.given == "auto" else f"folder {folder}"
        raise UsageError(f"{out.label}: {where} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{out.label}: folder {folder} is not writable")
    if st is not None and out.append and not os.access(path, os.W_OK):
        raise UsageError(f"{out.label} is not writable")


def resolve(flag: str, given: str | None, environ=None) -> Output | None:
    """The Output for one flag value (None when the flag was not given)."""
    if not given:
        return None
    environ = os.environ if environ is None else environ
    if flag == "--markdown" and given == "auto":
        summary = environ.get(SUMMARY_ENV)
        if not summary:
            raise UsageError(f"--markdown auto needs the environment variable {SUMMARY_ENV}")
        return Output(flag, given, summary, append=True)
    return Output(flag, given, given)


def check(inputs, outputs, environ=None) -> list[Output]:
    """Refuse outputs that cannot all be honoured, before any work is done.

    inputs: (description, path) pairs, e.g. ("the model", "m.onnx"); None paths are skipped.
    outputs: (flag, value) pairs, e.g. ("--json", "r.json"); None values are skipped. Returns the resolved outputs.
    """
    resolved = [o for o in (resolve(flag, value, environ) for flag, value in outputs) if o is not None]
    to_stdout = [o.flag for o in resolved if o.path == STDOUT]
    if len(to_stdout) > 1:
        raise UsageError(f"only one of --json, --markdown and --junit can write to stdout ('-'); got "
                         f"{' and '.join(to_stdout)}")
    if "--checkpoint" in to_stdout:
        raise UsageError("--checkpoint needs a file path, not '-'")
    files = [o for o in resolved if o.path != STDOUT]
    for out in files:
        for what, path in inputs:
            if path and path != STDOUT and same_file(out.path, path):
                raise UsageError(f"{out.label} would overwrite {what} ({path}); write the output elsewhere")
    for i, out in enumerate(files):
        for other in files[i + 1:]:
            if same_file(out.path, other.path):
                raise UsageError(f"{out.label} and {other.label} are the same file; give each output its own path")
    for out in files:
        _check_target(out)
    return resolved


# --- writing ----------------------------------------------------------------------------------------------------------

def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _open_temp(folder: str, name: str) -> tuple[int, str]:
    """A new temporary file next to the target (tests replace this to simulate a full disk)."""
    return tempfile.mkstemp(prefix=f".{name}.", suffix=TEMP_SUFFIX, dir=folder)


TEMP_SUFFIX = ".tmp"


def stale_temporaries(path: str) -> list[str]:
    """The temporaries `write_atomic(path, ...)` leaves when it is killed (kill -9) between creating and renaming
    one: regular files `.NAME.XXXXXXXX.tmp` (mkstemp's 8 characters) next to `path`."""
    import re

    folder, name = os.path.split(os.path.abspath(path))
    pattern = re.compile(rf"\.{re.escape(name)}\.[A-Za-z0-9_]{{8}}{re.escape(TEMP_SUFFIX)}")
    try:
        entries = os.listdir(folder)
    except OSError:
        return []
    found = []
    for entry in sorted(entries):
        full = os.path.join(folder, entry)
        if pattern.fullmatch(entry) and stat.S_ISREG(os.lstat(full).st_mode):
            found.append(full)
    return found


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(28, "short write")  # ENOSPC in all but name
        view = view[n:]


def readable(text: str, what: str = "the JSON report",
             then: str = "nothing written (fewer sites per report: --include/--exclude, or a coarser --sigmas grid)"
             ) -> str:
    """`text`, a JSON document walkaudit can read back: refused (UsageError, one line) when it is larger than the
    reader's limit (walkaudit.report.model.MAX_REPORT_BYTES); `then` says what happens instead."""
    from walkaudit.report import model

    size = len(text.encode("utf-8"))
    if size > model.MAX_REPORT_BYTES:
        raise UsageError(f"{what} would be {size / 2**20:.0f} MiB, more than the {model.MAX_REPORT_BYTES // 2**20} MiB "
                         f"walkaudit reads back; {then}")
    return text


def write_atomic(path: str, text: str, *, through_links: bool = True) -> None:
    """Replace `path` with `text` (UTF-8) in one step: a reader sees the old file or the new one, never a mix.

    A symlink is written through (its target is replaced) unless `through_links` is False: then a symlink at `path`
    is refused (UsageError) and nothing is written (checkpoints: a file walkaudit owns, never a link to the user's).
    The existing file's permission bits are kept, a new file gets the usual ones (0666 less the umask). On failure
    the temporary is removed and a one-line UsageError says `cannot write PATH: reason`.
    """
    if not through_links and os.path.islink(path):
        raise UsageError(f"cannot write {path}: it is a symbolic link (walkaudit never writes its own files through "
                         "one)")
    target = os.path.realpath(path) if through_links else os.path.abspath(path)
    folder, name = os.path.split(target)
    data = text.encode("utf-8")
    fd, tmp = -1, None
    try:
        try:
            mode = stat.S_IMODE(os.stat(target).st_mode)
        except FileNotFoundError:
            mode = 0o666 & ~_umask()
        fd, tmp = _open_temp(folder, name)
        _write_all(fd, data)
        os.fchmod(fd, mode)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, target)
        tmp = None
        _fsync_folder(folder)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {_reason(exc)}") from None
    finally:  # also on KeyboardInterrupt: never leave a temporary behind
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _fsync_folder(folder: str) -> None:
    """Make the rename itself durable (best effort: not every file system lets a folder be opened)."""
    try:
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def append_once(path: str, text: str) -> None:
    """Append `text` in a single write call (O_APPEND): concurrent appenders never interleave inside it."""
    data = text.encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            n = os.write(fd, data)
            if n != len(data):
                raise OSError(28, f"short write ({n} of {len(data)} bytes)")
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {_reason(exc)}") from None


# --- several outputs: one failure does not stop the others ------------------------------------------------------------

class WriteLog:
    """What `write` did inside one `collecting()` block: the paths written and the one-line failures."""

    def __init__(self):
        self.written: list[str] = []  # as given to write(); '-' for stdout
        self.failed: list[str] = []


_logs: list[WriteLog] = []  # a stack: one per active `collecting()` block


@contextlib.contextmanager
def collecting():
    """Inside this block `write` records a failure instead of raising it; yields the block's WriteLog."""
    log = WriteLog()
    _logs.append(log)
    try:
        yield log
    finally:
        _logs.remove(log)


def current_log() -> WriteLog:
    """The innermost `collecting()` block's log (an empty, detached one outside any block)."""
    return _logs[-1] if _logs else WriteLog()


def write(path: str, text: str, append: bool = False) -> bool:
    """Write one output: '-' is stdout, `append` appends in one call, anything else is replaced atomically.

    Returns True when written. A failure raises UsageError, or inside `collecting()` is recorded and returns False.
    """
    try:
        if path == STDOUT:
            click.echo(text, nl=False)
        elif append:
            append_once(path, text)
        else:
            write_atomic(path, text)
    except UsageError as exc:
        if not _logs:
            raise
        _logs[-1].failed.append(str(exc))
        return False
    if _logs:
        _logs[-1].written.append(path)
    return True


def failure_message(failed: list[str]) -> str:
    """One line for one or more failed writes."""
    return "; ".join(failed)
