"""SIGTERM, SIGHUP and Ctrl-C: a partial report, exit 128 + signal, one stderr line; a second signal is ignored."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from walkaudit.cli import signals

pytestmark = pytest.mark.slow  # the quick run (`python -m pytest -q`) leaves this module out

ROOT = Path(__file__).resolve().parents[1]
MODEL, DATA = ROOT / "samples" / "mnist_lenet5.dynamo.onnx", ROOT / "samples" / "mnist_val.npz"
DEADLINE = 600  # seconds: a slow, shared machine


def test_exit_codes_and_names():
    assert signals.exit_code(signal.SIGINT) == 130
    assert signals.exit_code(signal.SIGTERM) == 143
    assert signals.exit_code(signal.SIGHUP) == 129
    assert signals.exit_code(None) == 130
    assert signals.signal_name(signal.SIGTERM) == "SIGTERM"
    assert signals.signum_of(KeyboardInterrupt()) == signal.SIGINT
    assert signals.signum_of(signals.Interrupted(signal.SIGHUP)) == signal.SIGHUP


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_trap_raises_once_ignores_the_rest_and_restores(signum):
    def previous(s, f):
        raise AssertionError("the previous handler ran inside the trap")

    saved = signal.signal(signum, previous)
    try:
        with signals.Trap() as trap:
            with pytest.raises(KeyboardInterrupt) as info:
                os.kill(os.getpid(), signum)
                time.sleep(5)  # the handler runs at the next bytecode; never reached
            assert info.value.signum == signum and trap.signum == signum
            os.kill(os.getpid(), signum)  # a second signal while the partial report is written: ignored
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
        assert signal.getsignal(signum) is previous
    finally:
        signal.signal(signum, saved)


def test_hold_ignores_signals_after_a_plain_keyboard_interrupt():
    with signals.Trap() as trap:
        trap.hold()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert trap.signum is None


# --- the real CLI in a subprocess -------------------------------------------------------------------------------------

def _wait_until_working(proc, checkpoint: Path) -> None:
    """Until the audit has finished a site (its checkpoint holds one): the handlers are in place, the clean pass is
    done, so an interrupt now must give a partial report."""
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the audit ended before it was interrupted: {proc.returncode} {proc.stderr.read()}")
        try:
            if json.loads(checkpoint.read_text())["sites"]:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    pytest.fail("the audit never finished a site")


@pytest.mark.parametrize("how, code, name", [
    ("SIGTERM", 143, "SIGTERM"),
    ("SIGHUP", 129, "SIGHUP"),
    ("double-SIGINT", 130, "SIGINT"),
])
def test_a_signal_writes_a_partial_report(tmp_path, how, code, name):
    out = tmp_path / "out.json"
    env = {k: v for k, v in os.environ.items() if k not in ("WALKAUDIT_DEBUG", "GITHUB_STEP_SUMMARY")}
    proc = subprocess.Popen([sys.executable, "-m", "walkaudit", str(MODEL), "--data", str(DATA), "--json", str(out),
                             "--sigmas", "1e-3:1e2:40", "--repeats", "5", "--provider", "cpu", "-q"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)
        _wait_until_working(proc, tmp_path / "out.json.checkpoint")
        if how == "double-SIGINT":
            proc.send_signal(signal.SIGINT)
            time.sleep(0.01)  # the second Ctrl-C lands while the partial report is being made
            proc.send_signal(signal.SIGINT)
        else:
            proc.send_signal(getattr(signal, how))
        _, stderr = proc.communicate(timeout=DEADLINE)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = stderr.splitlines()
    assert proc.returncode == code, stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"walkaudit: error: interrupted ({name}); partial report written to {out}"), lines[0]
    report = json.loads(out.read_text())
    assert report["partial"] is True
    assert 1 <= len(report["sites"]) <= 5
    assert (tmp_path / "out.json.checkpoint").exists()  # kept for --resume
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
