"""Output files: refused before any work when they cannot be honoured, written atomically, one failure does not stop
the others."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import walkaudit.api
from walkaudit.cli import main, outputs
from walkaudit.errors import UsageError

from .models import mlp, teacher_labels

FAST = ["--sigmas", "0.1,1", "--repeats", "1", "--provider", "cpu", "-q"]


@pytest.fixture
def files(tmp_path, monkeypatch):
    """A model, data, a baseline report, a rules file and two compare reports in tmp_path (also the cwd)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    model = mlp(seed=1)
    onnx.save(model, tmp_path / "m.onnx")
    x = np.random.default_rng(2).normal(size=(40, 16)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=teacher_labels(model, x))
    (tmp_path / "rules.toml").write_text("fail_under = 0.0\n")
    for name in ("b.json", "old.json", "new.json"):
        (tmp_path / name).write_text('{"schema": "walkaudit.report/1"}\n')
    return tmp_path


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink()}


def no_audit(monkeypatch):
    def ran(*a, **k):
        pytest.fail("the audit ran")

    monkeypatch.setattr(walkaudit.api, "audit", ran)
    monkeypatch.setattr(walkaudit.api, "iter_audit", ran, raising=False)


def refused(result, phrase: str) -> str:
    lines = result.stderr.splitlines()
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("walkaudit: error: "), lines[0]
    assert phrase.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    return lines[0]


def audit(root, *flags, env=None):
    return CliRunner().invoke(main, [str(root / "m.onnx"), "--data", str(root / "d.npz"), *FAST, *flags], env=env)


def _symlink(root, name, target):
    os.symlink(root / target, root / name)
    return str(root / name)


def _hardlink(root, name, target):
    os.link(root / target, root / name)
    return str(root / name)


def _fifo(root, name):
    os.mkfifo(root / name)
    return str(root / name)


AUDIT_CASES = [
    ("json-is-model", lambda r: ["--json", str(r / "m.onnx")], "the model"),
    ("markdown-is-data", lambda r: ["--markdown", str(r / "d.npz")], "the data"),
    ("junit-is-model-relative", lambda r: ["--junit", "./sub/../m.onnx"], "the model"),
    ("symlink-to-model", lambda r: ["--json", _symlink(r, "link.json", "m.onnx")], "the model"),
    ("hardlink-to-data", lambda r: ["--junit", _hardlink(r, "hard.xml", "d.npz")], "the data"),
    ("json-and-junit-same", lambda r: ["--json", str(r / "x"), "--junit", str(r / "x")], "same file"),
    ("json-and-markdown-same-via-link", lambda r: ["--json", str(r / "out.json"), "--markdown",
                                                  _symlink(r, "out.md", "out.json")], "same file"),
    ("baseline-is-json", lambda r: ["--baseline", str(r / "b.json"), "--json", str(r / "b.json")], "the baseline"),
    ("rules-is-markdown", lambda r: ["--rules", str(r / "rules.toml"), "--markdown", str(r / "rules.toml")],
     "the rules file"),
    ("missing-folder", lambda r: ["--json", str(r / "nope" / "r.json")], "does not exist"),
    ("output-is-directory", lambda r: ["--json", str(r)], "is a directory"),
    ("dev-full", lambda r: ["--junit", "/dev/full"], "not a regular file"),
    ("fifo", lambda r: ["--json", _fifo(r, "pipe")], "not a regular file"),
    ("two-on-stdout", lambda r: ["--json", "-", "--markdown", "-"], "only one of"),
    ("three-on-stdout", lambda r: ["--json", "-", "--markdown", "-", "--junit", "-"], "only one of"),
    ("markdown-auto-without-env", lambda r: ["--markdown", "auto"], "GITHUB_STEP_SUMMARY"),
    ("checkpoint-is-model", lambda r: ["--checkpoint", str(r / "m.onnx")], "the model"),
    ("checkpoint-is-json", lambda r: ["--checkpoint", str(r / "r.json"), "--json", str(r / "r.json")], "same file"),
    ("checkpoint-stdout", lambda r: ["--checkpoint", "-"], "file path"),
]


@pytest.mark.parametrize("build, phrase", [pytest.param(b, p, id=i) for i, b, p in AUDIT_CASES])
def test_audit_refuses_outputs_before_any_work(files, monkeypatch, build, phrase):
    flags = build(files)
    before = snapshot(files)
    no_audit(monkeypatch)
    refused(audit(files, *flags), phrase)
    assert snapshot(files) == before, "a file was changed or written"
    assert not (files / ".walkaudit").exists()


@pytest.mark.parametrize("summary, phrase", [
    ("nope/summary.md", "does not exist"),
    ("m.onnx", "the model"),
    ("out.json", "same file"),
    (".", "is a directory"),
])
def test_markdown_auto_checks_the_step_summary(files, monkeypatch, summary, phrase):
    before = snapshot(files)
    no_audit(monkeypatch)
    env = {"GITHUB_STEP_SUMMARY": str(files / summary)}
    refused(audit(files, "--markdown", "auto", "--json", str(files / "out.json"), env=env), phrase)
    assert snapshot(files) == before


def test_folder_not_writable_is_refused(files, monkeypatch):
    (files / "ro").mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if str(p).endswith("ro") else real(p, mode, **k))
    no_audit(monkeypatch)
    refused(audit(files, "--json", str(files / "ro" / "r.json")), "not writable")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_folder_not_writable_for_real(files, monkeypatch):
    (files / "ro").mkdir(mode=0o555)
    no_audit(monkeypatch)
    refused(audit(files, "--json", str(files / "ro" / "r.json")), "not writable")


COMPARE_CASES = [
    ("json-is-old", lambda r: ["--json", str(r / "old.json")], "the old report"),
    ("junit-is-new-via-link", lambda r: ["--junit", _symlink(r, "j.xml", "new.json")], "the new report"),
    ("markdown-is-rules", lambda r: ["--rules", str(r / "rules.toml"), "--markdown", str(r / "rules.toml")],
     "the rules file"),
    ("two-on-stdout", lambda r: ["--json", "-", "--junit", "-"], "only one of"),
    ("dev-full", lambda r: ["--json", "/dev/full"], "not a regular file"),
]


@pytest.mark.parametrize("build, phrase", [pytest.param(b, p, id=i) for i, b, p in COMPARE_CASES])
def test_compare_refuses_outputs_before_reading_reports(files, monkeypatch, build, phrase):
    from walkaudit.cli import reports

    flags = build(files)
    before = snapshot(files)
    monkeypatch.setattr(reports, "read_report", lambda *a, **k: pytest.fail("a report was read"))
    result = CliRunner().invoke(main, ["compare", str(files / "old.json"), str(files / "new.json"), *flags])
    refused(result, phrase)
    assert snapshot(files) == before


def test_distinct_outputs_and_stdout_pass_the_check(files):
    got = outputs.check([("the model", str(files / "m.onnx"))],
                        [("--json", "-"), ("--markdown", str(files / "r.md")), ("--junit", None)])
    assert [(o.flag, o.path) for o in got] == [("--json", "-"), ("--markdown", str(files / "r.md"))]


# --- write_atomic -----------------------------------------------------------------------------------------------------

def test_write_atomic_replaces_and_keeps_the_permission_bits(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("old\n")
    os.chmod(path, 0o640)
    outputs.write_atomic(str(path), "new ✓\n")
    assert path.read_text(encoding="utf-8") == "new ✓\n"
    assert path.stat().st_mode & 0o7777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no temporary left


def test_write_atomic_new_file_gets_the_usual_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        outputs.write_atomic(str(tmp_path / "n.json"), "{}\n")
    finally:
        os.umask(mask)
    assert (tmp_path / "n.json").stat().st_mode & 0o777 == 0o644


def test_write_atomic_writes_through_a_symlink(tmp_path):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "r.json"
    target.write_text("old")
    (tmp_path / "link.json").symlink_to(target)
    outputs.write_atomic(str(tmp_path / "link.json"), "new")
    assert (tmp_path / "link.json").is_symlink() and target.read_text() == "new"


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, error):
    path = tmp_path / "r.json"
    path.write_text("old report\n")

    def fail(fd, data):
        os.write(fd, data[: len(data) // 2])  # half written, then the disk is full (or Ctrl-C)
        raise error

    monkeypatch.setattr(outputs, "_write_all", fail)
    expected = UsageError if isinstance(error, OSError) else KeyboardInterrupt
    with pytest.raises(expected) as info:
        outputs.write_atomic(str(path), "x" * 100_000)
    if expected is UsageError:
        assert str(info.value) == f"cannot write {path}: No space left on device"
    assert path.read_text() == "old report\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_concurrent_writers_never_interleave(tmp_path):
    path = tmp_path / "r.json"
    texts = [c * 300_000 for c in "ab"]
    outputs.write_atomic(str(path), texts[0])
    stop, seen = threading.Event(), []

    def writer(text):
        for _ in range(30):
            outputs.write_atomic(str(path), text)

    def reader():
        while not stop.is_set():
            seen.append(path.read_text())

    threads = [threading.Thread(target=writer, args=(t,)) for t in texts]
    r = threading.Thread(target=reader)
    r.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    r.join()
    assert seen and all(s in texts for s in seen)
    assert path.read_text() in texts


def test_kill_9_during_writes_leaves_a_whole_file(tmp_path):
    path = tmp_path / "r.json"
    code = ("import sys; from walkaudit.cli.outputs import write_atomic\n"
            "p = sys.argv[1]; texts = ['a' * 2_000_000, 'b' * 2_000_000]\n"
            "write_atomic(p, texts[0]); print('ready', flush=True)\n"
            "i = 0\n"
            "while True:\n"
            "    i += 1; write_atomic(p, texts[i % 2])\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    text = path.read_text()
    assert text in ("a" * 2_000_000, "b" * 2_000_000)


def test_append_once_appends(tmp_path):
    path = tmp_path / "summary.md"
    path.write_text("earlier step\n")
    calls = []
    real = os.write

    def counting(fd, data):
        calls.append(len(data))
        return real(fd, data)

    os_write = os.write
    os.write = counting
    try:
        outputs.append_once(str(path), "## walkaudit\n| a | b |\n")
    finally:
        os.write = os_write
    assert path.read_text() == "earlier step\n## walkaudit\n| a | b |\n"
    assert calls == [len("## walkaudit\n| a | b |\n")]


# --- several outputs, one fails ---------------------------------------------------------------------------------------

def _fail_for(monkeypatch, suffix):
    real = outputs._open_temp

    def open_temp(folder, name):
        if name.endswith(suffix):
            raise OSError(28, "No space left on device")
        return real(folder, name)

    monkeypatch.setattr(outputs, "_open_temp", open_temp)


def test_one_failed_output_does_not_stop_the_others(files, monkeypatch):
    _fail_for(monkeypatch, ".md")
    result = audit(files, "--json", str(files / "r.json"), "--markdown", str(files / "r.md"), "--junit",
                   str(files / "r.xml"))
    line = refused(result, f"cannot write {files / 'r.md'}: No space left on device")
    assert "r.json" not in line and "r.xml" not in line
    assert json.loads((files / "r.json").read_text())["sites"]
    assert (files / "r.xml").read_text().startswith("<?xml")
    assert not (files / "r.md").exists()
    assert (files / "r.json.checkpoint").exists()  # kept: the report was not fully written


def test_a_failed_output_beats_a_failed_gate(files, monkeypatch):
    _fail_for(monkeypatch, ".xml")
    result = audit(files, "--json", str(files / "r.json"), "--junit", str(files / "r.xml"), "--fail-under", "1e6")
    refused(result, "cannot write")
    assert json.loads((files / "r.json").read_text())["gate"]["passed"] is False


def test_compare_writes_the_other_outputs_when_one_fails(files, monkeypatch):
    ok = audit(files, "--json", str(files / "base.json"))
    assert ok.exit_code == 0, ok.stderr
    assert not (files / "base.json.checkpoint").exists()  # deleted once the report was written
    _fail_for(monkeypatch, ".xml")
    result = CliRunner().invoke(main, ["compare", str(files / "base.json"), str(files / "base.json"), "-q",
                                       "--markdown", str(files / "c.md"), "--junit", str(files / "c.xml")])
    refused(result, "c.xml")
    assert "| " in (files / "c.md").read_text()
