"""Resumable audits: the checkpoint file, its fingerprint, --resume and --checkpoint, and kill -9 then --resume."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import walkaudit.api
from walkaudit.cli import checkpoint as ckpt
from walkaudit.cli import main
from walkaudit.config import AuditConfig
from walkaudit.errors import UsageError

from .models import mlp, teacher_labels
from .reports import make_site

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--sigmas", "0.1,1", "--repeats", "1", "--provider", "cpu", "-q"]
DEADLINE = 600


def cfg(**kw) -> AuditConfig:
    return AuditConfig(sigmas=(0.1, 1.0), repeats=1, **kw)


FP = ckpt.fingerprint("a" * 64, "b" * 64, cfg())


# --- the fingerprint and where the checkpoint lives -----------------------------------------------------------------

def test_fingerprint_ignores_batch_size_threads_and_provider():
    same = ckpt.fingerprint("a" * 64, "b" * 64, cfg(batch_size=7, threads=1, provider="cpu"))
    assert same == FP
    for change in ({"seed": 1}, {"repeats": 2}, {"noise": "multiplicative"}, {"mode": "global"},
                   {"sigmas": (0.1, 2.0)}, {"limit": 10}, {"chance": 0.5}, {"exact": True}, {"output": "p"},
                   {"noise_source": "host"}):
        base = {"sigmas": (0.1, 1.0), "repeats": 1}
        assert ckpt.fingerprint("a" * 64, "b" * 64, AuditConfig(**{**base, **change})) != FP, change


def test_default_path(tmp_path):
    assert ckpt.default_path("out/r.json", FP) == "out/r.json.checkpoint"
    for json_path in (None, "-"):
        path = ckpt.default_path(json_path, FP, cwd=str(tmp_path))
        assert path == str(tmp_path / ".walkaudit" / f"checkpoint-{ckpt.digest(FP)[:12]}.json")
    assert ckpt.default_path(None, ckpt.fingerprint("a" * 64, "b" * 64, cfg(seed=1)), str(tmp_path)) != path


# --- load -------------------------------------------------------------------------------------------------------------

def saved(tmp_path, fp=FP, sites=None) -> str:
    c = ckpt.Checkpoint(str(tmp_path / "c.json"), fp)
    for s in sites if sites is not None else [{"name": "h", "points": []}, {"name": "logits", "points": []}]:
        c.add(s)
    return c.path


def test_load_returns_the_finished_sites(tmp_path):
    sites = [make_site("h", 0.1, index=0), make_site("logits", 1.0, index=1)]
    assert [s["name"] for s in ckpt.load(saved(tmp_path, sites=sites), FP)] == ["h", "logits"]


def _tampered(change):
    site = make_site("h", 0.1, index=0)
    change(site)
    return site


@pytest.mark.parametrize("change, phrase", [
    (lambda s: s["points"][0]["per_repeat"].update(correct=[500] * 3), "correct gives 1 (1500 of 3 × 500)"),
    (lambda s: s["points"][0].update(samples=100), "a count is larger than samples"),
    (lambda s: s["points"][0].update(nonfinite=7), "nonfinite: 7, but"),
    (lambda s: s["points"][0]["per_repeat"].update(correct=[50] * 4), "4 entries, but repeats is 3"),
    (lambda s: s.update(index=-1), "below the minimum"),
])
def test_load_refuses_tampered_numbers(tmp_path, change, phrase):
    path = saved(tmp_path, sites=[_tampered(change)])
    with pytest.raises(UsageError) as info:
        ckpt.load(path, FP)
    assert "corrupt checkpoint" in str(info.value) and phrase in str(info.value), str(info.value)


@pytest.mark.parametrize("other, message", [
    (ckpt.fingerprint("a" * 64, "b" * 64, cfg(seed=1)),
     "--resume: the checkpoint was made with --seed 0, this run uses --seed 1"),
    (ckpt.fingerprint("c" * 64, "b" * 64, cfg()), "the model changed since the checkpoint (sha256 aaaaaaaaaaaa"),
    (ckpt.fingerprint("a" * 64, "d" * 64, cfg()), "the data changed since the checkpoint (sha256 bbbbbbbbbbbb"),
    (ckpt.fingerprint("a" * 64, "b" * 64, cfg(mode="global")), "made with no --global, this run uses --global"),
    (ckpt.fingerprint("a" * 64, "b" * 64, cfg(exact=True)), "made with no --exact, this run uses --exact"),
    (ckpt.fingerprint("a" * 64, "b" * 64, dataclasses.replace(cfg(), sigmas=None)),
     "made with --sigmas 0.1,1, this run uses the adaptive search"),
    (ckpt.fingerprint("a" * 64, "b" * 64, cfg(noise="combined")), "made with --noise additive"),
])
def test_load_names_what_differs(tmp_path, other, message):
    with pytest.raises(UsageError) as info:
        ckpt.load(saved(tmp_path), other)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("content, message", [
    (None, "no checkpoint at"),
    ("{not json", "corrupt JSON"),
    ('{"format": "walkaudit.report/1"}', "not a walkaudit checkpoint"),
    ('[1, 2]', "not a walkaudit checkpoint"),
    (json.dumps({"format": ckpt.FORMAT, "fingerprint": FP, "sites": [1]}), "corrupt checkpoint"),
    (json.dumps({"format": ckpt.FORMAT, "sites": []}), "corrupt checkpoint"),
    (json.dumps({"format": ckpt.FORMAT, "fingerprint": FP, "sites": [{"name": "h", "points": []}] * 2}),
     "appears twice"),
])
def test_load_refuses_what_is_not_a_checkpoint(tmp_path, content, message):
    path = tmp_path / "c.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UsageError) as info:
        ckpt.load(str(path), FP)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_checkpoint_is_rewritten_per_site_and_removed_with_its_folder(tmp_path):
    path = tmp_path / ".walkaudit" / "checkpoint-x.json"
    c = ckpt.Checkpoint(str(path), FP, make_folder=True)
    assert c.add({"name": "h", "points": []}) is None
    assert json.loads(path.read_text()) == {"format": ckpt.FORMAT, "fingerprint": FP,
                                            "sites": [{"name": "h", "points": []}]}
    c.add({"name": "logits", "points": []})
    c.add({"name": "h", "points": []})  # a resumed site coming back: not twice
    assert [s["name"] for s in json.loads(path.read_text())["sites"]] == ["h", "logits"]
    c.remove()
    assert not (tmp_path / ".walkaudit").exists()


def test_a_checkpoint_that_cannot_be_written_is_said_once(tmp_path):
    c = ckpt.Checkpoint(str(tmp_path / "missing" / "c.json"), FP)
    problem = c.add({"name": "h", "points": []})
    assert problem and "cannot write" in problem
    assert c.add({"name": "logits", "points": []}) is None
    assert len(c.sites) == 2


def test_a_checkpoint_never_outgrows_what_resume_reads(tmp_path, monkeypatch):
    """The checkpoint is checked against the reader's limit before it is written: past it, the one message says
    so and the last checkpoint --resume can read stays (before, a checkpoint larger than the limit was written and
    --resume refused it)."""
    from walkaudit.report import model

    sites = [make_site(f"s{i}", 0.1, index=i) for i in range(3)]
    c = ckpt.Checkpoint(str(tmp_path / "c.json"), FP)
    assert c.add(sites[0]) is None
    monkeypatch.setattr(model, "MAX_REPORT_BYTES", len(c.dumps().encode()) + 10)
    problem = c.add(sites[1])
    assert problem and "the checkpoint would be" in problem and "--resume would refuse it" in problem
    assert c.add(sites[2]) is None  # said once
    assert [s["name"] for s in ckpt.load(c.path, FP)] == ["s0"]  # readable, with what fitted


# --- the CLI ----------------------------------------------------------------------------------------------------------

@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = mlp(seed=1)
    onnx.save(model, tmp_path / "m.onnx")
    x = np.random.default_rng(2).normal(size=(40, 16)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=teacher_labels(model, x))
    return tmp_path


def audit(root, *flags):
    return CliRunner().invoke(main, [str(root / "m.onnx"), "--data", str(root / "d.npz"), *FAST, *flags])


def stop_after_first_site(monkeypatch):
    """iter_audit whose iteration is interrupted (as by Ctrl-C) after its first newly run site."""
    real = walkaudit.api.iter_audit

    class Stopping:
        def __init__(self, run):
            self.run, self.fingerprint, self.sites = run, run.fingerprint, run.sites

        def __iter__(self):
            it = iter(self.run)
            yield next(it)
            it.close()
            raise KeyboardInterrupt

        def report(self, partial=False):
            return self.run.report(partial=partial)

    monkeypatch.setattr(walkaudit.api, "iter_audit", lambda *a, **k: Stopping(real(*a, **k)))


def timeless(report: dict) -> dict:
    report = json.loads(json.dumps(report))
    report["runtime"].pop("elapsed_s", None)
    return report


def one_line(result, code, phrase):
    lines = result.stderr.splitlines()
    assert result.exit_code == code, result.stderr
    assert len(lines) == 1 and lines[0].startswith("walkaudit: error: "), result.stderr
    assert phrase in lines[0], lines[0]


def test_interrupted_then_resumed_equals_an_uninterrupted_run(files, monkeypatch):
    full = audit(files, "--json", str(files / "full.json"))
    assert full.exit_code == 0, full.stderr
    with monkeypatch.context() as m:
        stop_after_first_site(m)
        one_line(audit(files, "--json", str(files / "r.json")), 130, "partial report written to")
    cp = json.loads((files / "r.json.checkpoint").read_text())
    assert cp["format"] == ckpt.FORMAT and [s["name"] for s in cp["sites"]] == ["h"]
    partial = json.loads((files / "r.json").read_text())
    assert partial["partial"] is True  # a cancelled run never says passed
    assert partial["gate"]["passed"] is None and partial["gate"]["verdict"] == "incomplete"

    resumed = audit(files, "--json", str(files / "r.json"), "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    assert timeless(json.loads((files / "r.json").read_text())) == timeless(
        {**json.loads((files / "full.json").read_text()), "partial": False})
    assert not (files / "r.json.checkpoint").exists()  # deleted once the final report was written


def test_a_resumed_report_keeps_the_notes_of_the_sites_it_restored(tmp_path, monkeypatch):
    """The LSTM sample's first site holds its samples along axis 1, which a note says. That note was the worker's
    (runtime.notes only), so a site restored from the checkpoint lost it; now it is the site's own and resumes."""
    model, data = ROOT / "samples" / "digits_rows_lstm.dynamo.onnx", ROOT / "samples" / "digits_rows_val.npz"

    def run(out, *flags):
        return CliRunner().invoke(main, [str(model), "--data", str(data), "--limit", "64", *FAST, "--json", str(out),
                                         *flags])

    assert run(tmp_path / "full.json").exit_code == 0
    with monkeypatch.context() as m:
        stop_after_first_site(m)
        assert run(tmp_path / "r.json").exit_code == 130
    assert run(tmp_path / "r.json", "--resume").exit_code == 0
    full, resumed = (json.loads((tmp_path / f).read_text()) for f in ("full.json", "r.json"))
    note = "getitem_1: samples run along axis 1; the noise is drawn per sample along it"
    assert resumed["sites"][0]["name"] == "getitem_1" and note in resumed["sites"][0]["notes"]
    assert resumed["runtime"]["notes"] == full["runtime"]["notes"] == [note]
    assert timeless(resumed) == timeless(full)


def test_default_checkpoint_in_the_current_folder(files, monkeypatch):
    with monkeypatch.context() as m:
        stop_after_first_site(m)
        result = audit(files, "--json", "-")
        assert result.exit_code == 130
    (found,) = (files / ".walkaudit").iterdir()
    assert found.name.startswith("checkpoint-") and len(found.name) == len("checkpoint-") + 12 + len(".json")
    result = audit(files, "--json", "-", "--resume")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["partial"] is False
    assert not (files / ".walkaudit").exists()


def test_explicit_checkpoint_path(files, monkeypatch):
    with monkeypatch.context() as m:
        stop_after_first_site(m)
        assert audit(files, "--checkpoint", str(files / "my.ckpt")).exit_code == 130
    assert json.loads((files / "my.ckpt").read_text())["sites"]
    assert audit(files, "--checkpoint", str(files / "my.ckpt"), "--resume").exit_code == 0
    assert not (files / "my.ckpt").exists()


def no_audit(monkeypatch):
    def ran(*a, **k):
        pytest.fail("the audit ran")

    monkeypatch.setattr(walkaudit.api, "iter_audit", ran)
    monkeypatch.setattr(walkaudit.api, "audit", ran)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_resume_without_a_checkpoint_is_a_fresh_start_with_a_note(files):
    """Killed before the first site finished, nothing was saved: --resume starts from the beginning (docs/scale.md
    says to resubmit with --resume), with one warning line."""
    result = CliRunner().invoke(main, [str(files / "m.onnx"), "--data", str(files / "d.npz"), *FAST[:-1], "--json",
                                       str(files / "r.json"), "--resume"])
    assert result.exit_code == 0, result.stderr
    assert [ln for ln in result.stderr.splitlines() if "warning" in ln] == [
        f"walkaudit: warning: --resume: no checkpoint at {files / 'r.json.checkpoint'} yet; starting from the "
        "beginning"]
    assert json.loads((files / "r.json").read_text())["partial"] is False


def test_stale_temporaries_of_a_killed_write_are_removed(files):
    stale = files / ".r.json.checkpoint.abcd_123.tmp"
    stale.write_text('{"format": "walkaudit.checkpoint/1", "si')
    other = files / ".other.json.abcd_123.tmp"  # another file's: left alone
    other.write_text("x")
    assert audit(files, "--json", str(files / "r.json")).exit_code == 0
    assert not stale.exists() and other.exists()


def _user_files(root: Path) -> dict[str, bytes]:
    return {name: (root / name).read_bytes() for name in ("m.onnx", "d.npz")}


@pytest.mark.parametrize("setup, flags, phrase", [
    # a symlink at the default checkpoint path, to the user's model
    (lambda r: (r / "out.json.checkpoint").symlink_to(r / "m.onnx"), ["--json", "out.json"], "is a symbolic link"),
    (lambda r: (r / "c.json").symlink_to(r / "m.onnx"), ["--checkpoint", "c.json"], "would overwrite the model"),
    (lambda r: (r / "notes.txt").write_text("my notes\n"), ["--checkpoint", "notes.txt"],
     "notes.txt is not a walkaudit checkpoint"),
    (lambda r: (r / "notes.txt").write_text("my notes\n"), ["--checkpoint", "notes.txt", "--resume"],
     "notes.txt is not a walkaudit checkpoint"),
    (lambda r: None, ["--json", "a.json", "--markdown", "a.json.checkpoint"],
     "--markdown a.json.checkpoint is the checkpoint of this audit"),
    (lambda r: os.mkfifo(r / "fifo"), ["--checkpoint", "fifo", "--resume"], "is not a regular file"),
    (lambda r: (r / "z.json").symlink_to("/dev/zero"), ["--checkpoint", "z.json", "--resume"],
     "is not a regular file"),
    (lambda r: None, ["--checkpoint", "/dev/zero", "--resume"], "is not a regular file"),
    # at the default path (<--json>.checkpoint), where no output check looks: a FIFO hung --resume, /dev/zero
    # was read until memory ran out
    (lambda r: os.mkfifo(r / "out.json.checkpoint"), ["--json", "out.json", "--resume"], "is not a regular file"),
    (lambda r: (r / "out.json.checkpoint").symlink_to("/dev/zero"), ["--json", "out.json", "--resume"],
     "is a symbolic link"),
])
def test_a_checkpoint_path_that_is_not_walkaudits_is_refused(files, monkeypatch, setup, flags, phrase):
    setup(files)
    before, links = _user_files(files), {p.name: os.readlink(p) for p in files.iterdir() if p.is_symlink()}
    no_audit(monkeypatch)
    one_line(audit(files, *flags), 2, phrase)
    assert _user_files(files) == before
    assert {p.name: os.readlink(p) for p in files.iterdir() if p.is_symlink()} == links
    if (files / "notes.txt").exists():
        assert (files / "notes.txt").read_text() == "my notes\n"


def test_a_checkpoint_is_never_written_through_a_symlink(tmp_path):
    target = tmp_path / "mine.txt"
    target.write_text("mine\n")
    (tmp_path / "c.json").symlink_to(target)
    c = ckpt.Checkpoint(str(tmp_path / "c.json"), FP)
    problem = c.add({"name": "h", "points": []})
    assert problem and "symbolic link" in problem
    assert target.read_text() == "mine\n"


def test_resumed_sites_are_checked_against_the_audit(files, monkeypatch):
    with monkeypatch.context() as m:
        stop_after_first_site(m)
        assert audit(files, "--json", str(files / "r.json")).exit_code == 130
    path = files / "r.json.checkpoint"
    body = json.loads(path.read_text())
    body["sites"][0]["index"] = 99
    path.write_text(json.dumps(body))
    one_line(audit(files, "--json", str(files / "r.json"), "--resume"), 2, "index 99; it is 0 in this audit")
    body["sites"][0]["index"] = 0
    for point in body["sites"][0]["points"]:  # 100x the samples, the counts scaled alike: consistent, but not this data
        point["samples"] *= 100
        point["per_repeat"]["correct"] = [c * 100 for c in point["per_repeat"]["correct"]]
    path.write_text(json.dumps(body))
    one_line(audit(files, "--json", str(files / "r.json"), "--resume"), 2, "counts 4000 samples; the data has 40")


@pytest.mark.parametrize("change, phrase", [
    (["--seed", "1"], "--resume: the checkpoint was made with --seed 0, this run uses --seed 1"),
    (["--repeats", "2"], "the checkpoint was made with --repeats 1, this run uses --repeats 2"),
    ("model", "the model changed since the checkpoint (sha256"),
    ("corrupt", "corrupt JSON"),
])
def test_resume_of_another_audit_is_refused(files, monkeypatch, change, phrase):
    with monkeypatch.context() as m:
        stop_after_first_site(m)
        assert audit(files, "--json", str(files / "r.json")).exit_code == 130
    flags = change if isinstance(change, list) else []
    if change == "model":
        onnx.save(mlp(seed=5), files / "m.onnx")
    if change == "corrupt":
        (files / "r.json.checkpoint").write_text('{"format": "walkaudit.checkpoint/1", "sites": [')
    before = snapshot(files)
    no_audit(monkeypatch)
    one_line(audit(files, "--json", str(files / "r.json"), "--resume", *flags), 2, phrase)
    assert snapshot(files) == before


def test_the_data_is_hashed_once_and_the_report_has_its_sha256(files, monkeypatch):
    """The CLI hashes the data for the checkpoint's fingerprint before loading it, and hands the hash to the audit:
    the file is not read a second time to hash it."""
    import hashlib

    from walkaudit._loading import data

    real, hashed = data.sha256_of, []
    monkeypatch.setattr(data, "sha256_of", lambda path: hashed.append(str(path)) or real(path))
    result = audit(files, "--json", "-")
    assert result.exit_code == 0, result.stderr
    assert hashed == [str(files / "d.npz")]
    want = hashlib.sha256((files / "d.npz").read_bytes()).hexdigest()
    assert json.loads(result.stdout)["data"]["sha256"] == want


def test_batch_size_and_threads_may_change_on_resume(files, monkeypatch):
    with monkeypatch.context() as m:
        stop_after_first_site(m)
        assert audit(files, "--json", str(files / "r.json")).exit_code == 130
    result = audit(files, "--json", str(files / "r.json"), "--resume", "--batch-size", "7", "--threads", "1")
    assert result.exit_code == 0, result.stderr


# --- kill -9, then --resume, on a real model --------------------------------------------------------------------------

@pytest.mark.slow
def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path):
    model, data = ROOT / "samples" / "mnist_lenet5.dynamo.onnx", ROOT / "samples" / "mnist_val.npz"
    env = {k: v for k, v in os.environ.items() if k not in ("WALKAUDIT_DEBUG", "GITHUB_STEP_SUMMARY")}

    def argv(out, *extra):
        return [sys.executable, "-m", "walkaudit", str(model), "--data", str(data), "--json", str(out),
                "--sigmas", "1e-3:1e2:12", "--repeats", "2", "--provider", "cpu", "-q", *extra]

    full = subprocess.run(argv(tmp_path / "full.json"), cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=DEADLINE, check=False)
    assert full.returncode == 0, full.stderr

    out, checkpoint = tmp_path / "r.json", tmp_path / "r.json.checkpoint"
    proc = subprocess.Popen(argv(out), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if json.loads(checkpoint.read_text())["sites"]:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.05)
        assert proc.poll() is None, f"the audit ended before it was killed: {proc.stderr.read()}"
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
        proc.stderr.close()
    done = json.loads(checkpoint.read_text())["sites"]
    assert 1 <= len(done) < 5
    assert not out.exists()

    resumed = subprocess.run(argv(out, "--resume"), cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=DEADLINE, check=False)
    assert resumed.returncode == 0, resumed.stderr
    a, b = json.loads((tmp_path / "full.json").read_text()), json.loads(out.read_text())
    assert timeless(b) == timeless(a)
    assert not checkpoint.exists()
