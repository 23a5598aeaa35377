"""The Ray executor: the same report as in process (API and `--ray`), a killed worker changes nothing, requests the
cluster can never meet fail at once, progress adds up. One local Ray cluster (2 CPUs, no GPUs) serves the session;
the tests that need it are skipped where ray is not installed (the `test` extra installs it)."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import signal
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from walkaudit import api
from walkaudit._execution import ray_executor
from walkaudit._execution.ray_executor import _cut, check_workers, plan, slices
from walkaudit._units import BLOCK, UNSCORED
from walkaudit.cli import main
from walkaudit.cli.progress import RichProgress
from walkaudit.config import AuditConfig
from walkaudit.errors import RuntimeFailure, UsageError

from .models import mlp, resnet_block, teacher_labels

pytestmark = pytest.mark.slow  # the quick run (`python -m pytest -q`) leaves this module out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ray")
    model = mlp(seed=1)
    x = np.random.default_rng(2).normal(size=(700, 16)).astype(np.float32)
    onnx.save(model, folder / "mlp.onnx")
    np.savez(folder / "val.npz", x=x, y=teacher_labels(model, x))
    res = resnet_block(seed=3)
    xr = np.random.default_rng(4).normal(size=(1500, 1, 6, 6)).astype(np.float32)
    onnx.save(res, folder / "res.onnx")
    np.savez(folder / "res.npz", x=xr)
    return folder


def _stats(clean) -> tuple:
    """Everything CleanStats holds (moments per site and block: floats compared exactly)."""
    return clean.correct, clean.samples, clean.moments, clean.shapes, clean.width, clean.classes


def _plain(report) -> dict:
    body = report.to_dict()
    body.pop("runtime")  # timings and where it ran
    return body


class Recorder:
    """A progress display that adds up what it is told; `on_advance` runs at each advance (the kill test)."""

    def __init__(self, on_advance=None):
        self.grown = self.advanced = 0
        self.on_advance = on_advance

    def grow(self, amount):
        self.grown += amount

    def advance(self, amount):
        self.advanced += amount
        if self.on_advance:
            self.on_advance()

    def describe(self, text):
        pass

    def site_started(self, position, total, name):
        pass

    def site_finished(self, result):
        pass


def _factory(made: list, **options):
    def factory(audit, progress):
        made.append(ray_executor.connect(None, audit, **options)(audit, progress))
        return made[-1]

    return factory


# -- pure: no cluster --------------------------------------------------------------------------------------------------
def test_pieces_are_disjoint_cover_the_range_and_follow_the_batch_grid():
    for start, stop, pieces, align in [(0, 16, 4, 4), (3, 40, 5, 4), (0, 5, 9, 4), (7, 8, 3, 1), (0, 100, 7, 1)]:
        cut = _cut(start, stop, pieces, align)
        assert cut[0][0] == start and cut[-1][1] == stop
        assert all(a < b for a, b in cut) and all(b == c for (_, b), (c, _) in zip(cut, cut[1:]))
        assert len(cut) == min(pieces, stop - start)
    assert _cut(0, 16, 4, 4) == [(0, 4), (4, 8), (8, 12), (12, 16)]
    assert all(b % 4 == 0 for _, b in _cut(3, 40, 5, 4)[:-1])


def test_slices_are_whole_batches_on_block_bounds_and_cover_the_samples():
    for samples, batch, actors in [(1000, 256, 2), (700, 256, 2), (1500, 256, 4), (5000, 100, 3), (100, 256, 2),
                                   (64 * 7, 64, 8)]:
        cut = slices(samples, batch, actors)
        assert cut[0].start == 0 and cut[-1].stop == samples and len(cut) <= actors
        assert all(a.stop == b.start for a, b in zip(cut, cut[1:])) and all(len(s) > 0 for s in cut)
        assert all(s.start % batch == 0 and s.start % BLOCK == 0 for s in cut)
    assert slices(1000, 256, 2) == [range(0, 512), range(512, 1000)]
    assert slices(5000, 100, 3) == [range(0, 1600), range(1600, 3200), range(3200, 5000)]  # lcm(100, 64) rows
    assert slices(100, 256, 2) == [range(0, 100)]  # one batch: one actor


def test_clean_passes_over_slices_add_up_to_the_whole_pass(files):
    """What each Ray actor runs (`Worker.clean_pass(rows=...)` from a resolved audit without targets): the CleanStats of
    the slices, added, are the whole pass's bit for bit; each slice's targets are the whole pass's on its rows and
    UNSCORED elsewhere; each keeps the clean values of its own batches only."""
    run = api.iter_audit(str(files / "res.onnx"), data=str(files / "res.npz"), provider="cpu", threads=1,
                         batch_size=128)
    run.start()
    whole = run._executor.worker
    audit = dataclasses.replace(run.resolved.with_model_bytes(run.loaded.proto), targets=None)
    parts, total = slices(run.dataset.samples, 128, 3), None
    assert len(parts) == 3
    for rows in parts:
        worker = audit.build(threads=1)
        stats = worker.clean_pass(keep=True, rows=rows)
        total = stats if total is None else total + stats
        assert np.array_equal(worker.targets[rows.start : rows.stop], whole.targets[rows.start : rows.stop])
        assert (np.delete(worker.targets, np.s_[rows.start : rows.stop]) == UNSCORED).all()
        assert set(worker._kept) == {k for k, _ in worker.grid(rows)} and worker._kept_sites == whole._kept_sites
        worker.source.close()
    assert _stats(total) == _stats(run.clean)
    with pytest.raises(ValueError, match="whole batches"):
        audit.build(threads=1).clean_pass(rows=range(64, 700))
    run.close()


def test_progress_shows_samples_per_second_and_an_eta():
    """The driver's display: samples per second over the last RATE_WINDOW seconds, and the ETA from the sites done,
    in the plain line of each site (a fake clock: no timing)."""
    now, out = [0.0], io.StringIO()
    with RichProgress(stream=out, clock=lambda: now[0]) as p:
        p.describe("clean pass")
        p.grow(1000)
        now[0] = 2.0
        p.advance(1000)
        p.site_started(1, 2, "a")
        p.grow(4000)
        now[0] = 6.0
        p.advance(4000)
        p.site_finished(type("R", (), {"name": "a", "sigma50": 0.5, "censored": None})())
        now[0] = 30.0
        p.advance(100)  # 24 s later: the window has moved past the first 5000
        assert round(p.rate(), 2) == round(100 / 24, 2)
    lines = out.getvalue().splitlines()
    assert lines[0] == "walkaudit: clean pass done (2.0 s; 500 samples/s)"
    assert lines[1] == "walkaudit: site 1/2 a: σ50 0.5 (4.0 s; 833 samples/s, ETA 4 s)"
    now[0] = 0.0
    with RichProgress(stream=io.StringIO(), live=True, clock=lambda: now[0]) as live:  # a terminal: the bar
        live.grow(3000)
        now[0] = 2.0
        live.advance(3000)
        assert live._bar.tasks[0].fields["rate"] == "1.5k samples/s"


def test_plan_one_actor_per_gpu_else_per_group_of_cores():
    assert plan([{"CPU": 16, "GPU": 8}], "auto", None) == ray_executor.Plan(8, 2.0, 1, 2, "cuda")
    assert plan([{"CPU": 16, "GPU": 8}], "cpu", 4).actors == 4
    assert plan([{"CPU": 2}, {"CPU": 5}], "auto", None) == ray_executor.Plan(3, 2.0, 0, 2, "cpu")
    assert plan([{"CPU": 2}], "auto", 1, workers=2).actors == 2


@pytest.mark.parametrize("nodes, provider, threads, phrase", [
    ([{"CPU": 8}], "cuda", None, "has no GPUs"),
    ([{"CPU": 2}], "auto", 4, "no node of the Ray cluster has 4 CPUs"),
    ([{"CPU": 16, "GPU": 8}], "cuda", 4, "2 CPUs per GPU"),
])
def test_requests_the_cluster_can_never_meet_are_refused(nodes, provider, threads, phrase):
    with pytest.raises(UsageError, match=phrase):
        plan(nodes, provider, threads)


def test_workers_that_differ_are_refused():
    info = {"onnxruntime": "1.31.1", "walkaudit": "0.2.0", "provider": "CPUExecutionProvider", "error": None}
    check_workers([info, dict(info)], "1.31.1")
    for change in ({"onnxruntime": "1.30.0"}, {"provider": "CUDAExecutionProvider"}, {"walkaudit": "0.1.0"}):
        with pytest.raises(RuntimeFailure, match="different"):
            check_workers([info, {**info, **change}], "1.31.1")
    with pytest.raises(RuntimeFailure, match="this process runs 1.20.0"):
        check_workers([info], "1.20.0")
    with pytest.raises(RuntimeFailure, match="could not build the audit: no data"):
        check_workers([{**info, "error": "no data"}], None)


def test_without_ray_the_flag_says_how_to_install_it(files, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(UsageError, match=r'pip install "walkaudit\[ray\]".*pip install "\.\[ray\]"'):
        ray_executor.connect(None, AuditConfig())
    result = CliRunner().invoke(main, [str(files / "mlp.onnx"), "--data", str(files / "val.npz"), "-q", "--ray"])
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0 and "pip install" in result.stderr


# -- on the session's cluster ------------------------------------------------------------------------------------------
def test_api_report_equals_the_in_process_one_and_progress_adds_up(ray_cluster, files):
    """The actors run the clean pass, each over its slice: their CleanStats add up to the in-process pass's, and
    the driver runs none of its own."""
    options = dict(data=str(files / "val.npz"), provider="cpu", seed=5, threads=1)
    want_run = api.iter_audit(str(files / "mlp.onnx"), **options)
    list(want_run)
    want = want_run.report()
    made, progress = [], Recorder()
    got_run = api.iter_audit(str(files / "mlp.onnx"), executor=_factory(made, piece_seconds=0.002),
                             progress=progress, **options)
    list(got_run)
    got = got_run.report()
    assert _plain(got) == _plain(want)
    assert _stats(got_run.clean) == _stats(want_run.clean)
    assert got_run.resolved.targets is None  # no clean pass on the driver
    assert made[0].slices == [range(0, 256), range(256, 700)]
    assert progress.advanced == progress.grown > 0
    stats = made[0].stats()
    assert stats["actors"] == 2 and made[0].actors == []  # two actors of one thread; closed
    assert stats["pieces"] > len(want.sites)  # requests were cut
    assert all(i["threads"] == 1 for i in made[0].info)


def test_global_mode_on_ray_equals_in_process(ray_cluster, files):
    options = dict(data=str(files / "val.npz"), provider="cpu", mode="global", sigmas=(0.1, 0.5, 2.0), threads=1)
    want = api.audit(str(files / "mlp.onnx"), **options)
    out = io.StringIO()
    with RichProgress(stream=out) as progress:  # the display of a CI log, fed by the actors' work
        got = api.audit(str(files / "mlp.onnx"), executor=_factory([], piece_seconds=0.001), progress=progress,
                        **options)
    assert _plain(got) == _plain(want)
    assert re.fullmatch(r"walkaudit: site 1/1 global: σ50 \S+ \(\d+\.\d s; [\d.]+[kM]? samples/s, ETA 0 s\)",
                        out.getvalue().splitlines()[-1]), out.getvalue()


def test_cli_ray_report_equals_the_in_process_one(ray_cluster, files):
    def run(*extra):
        result = CliRunner().invoke(main, [str(files / "res.onnx"), "--data", str(files / "res.npz"), "--json", "-",
                                           "-q", "--provider", "cpu", "--threads", "1", "--repeats", "2", *extra])
        assert result.exit_code in (0, 1), result.stderr
        body = json.loads(result.stdout)
        body.pop("runtime")
        return body

    assert run("--ray") == run()
    assert ray_cluster.is_initialized()  # a cluster it did not start is left running


def test_a_killed_worker_changes_nothing(ray_cluster, files):
    options = dict(data=str(files / "res.npz"), provider="cpu", sigmas=tuple(np.geomspace(0.01, 10, 12)),
                   repeats=2, threads=1)
    want = api.audit(str(files / "res.onnx"), **options)
    made, killed = [], []

    def kill():
        ex = made[0] if made else None
        if killed or ex is None or ex.pieces < 2:
            return
        victim = max(ex.alive, key=lambda a: ex.queued[a])
        pid = ex.info[victim]["pid"]  # (asking the actor would wait behind its queued pieces)
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    got = api.audit(str(files / "res.onnx"), executor=_factory(made, workers=2, piece_seconds=0.002),
                    progress=Recorder(kill), **options)
    assert killed
    assert made[0].resent >= 1
    assert _plain(got) == _plain(want)


@pytest.mark.parametrize("flags, phrase", [
    (["--provider", "cuda"], "--provider cuda: the Ray cluster has no GPUs"),
    (["--threads", "64"], "no node of the Ray cluster has 64 CPUs"),
    (["--noise-source", "graph"], "--noise-source graph cannot run on Ray"),
])
def test_cli_refuses_at_once_in_one_line(ray_cluster, files, flags, phrase):
    result = CliRunner().invoke(main, [str(files / "mlp.onnx"), "--data", str(files / "val.npz"), "-q", *flags,
                                       "--ray"])
    assert result.exit_code == 2, result.output
    assert phrase in result.stderr and result.stderr.strip().count("\n") == 0


def test_workers_read_the_data_from_its_path_when_they_see_the_drivers_files(ray_cluster, files):
    """A local cluster shares the driver's files: the resolved audit carries the path (workers memory-map their own
    sample ranges), not the arrays; told otherwise, the arrays travel through the object store. Same report either
    way."""
    options = dict(data=str(files / "val.npz"), provider="cpu", seed=3, threads=1, sigmas=(0.1, 1.0), repeats=1)
    reports, audits = [], []
    for shared in (None, False):
        made, factory = [], _factory([], shared_files=shared)

        def keep(audit, progress, factory=factory, made=made):
            made.append(factory(audit, progress))
            audits.append(ray_cluster.get(made[-1].audit))  # while the executor holds it
            return made[-1]

        reports.append(api.audit(str(files / "mlp.onnx"), executor=keep, **options))
    via_path, via_arrays = audits
    assert via_path.data.path == str(files / "val.npz") and via_path.data.arrays is None
    assert via_arrays.data.path is None and set(via_arrays.data.arrays) == {"x"}
    assert _plain(reports[0]) == _plain(reports[1])


def test_workers_sent_the_arrays_count_against_the_labels_not_the_clean_predictions(ray_cluster, files):
    """Data that travels through the object store (in-memory arrays, or files the workers do not see) carries its
    labels: the workers, which run the clean pass themselves, score against them, as the in-process run does."""
    model = mlp(seed=1)
    x = np.random.default_rng(5).normal(size=(300, 16)).astype(np.float32)
    y = teacher_labels(model, x)
    y[::3] = (y[::3] + 1) % 4  # a third of the labels disagree with the model
    options = dict(provider="cpu", seed=3, threads=1, sigmas=(0.1, 1.0), repeats=1)
    alone = api.audit(model, x, y, **options)
    on_ray = api.audit(model, x, y, executor=_factory([], shared_files=False), **options)
    assert alone.clean_accuracy < 0.7  # the labels are not the clean predictions
    assert _plain(on_ray) == _plain(alone)


# --- joining a cluster that is not there ------------------------------------------------------------------------------

@pytest.mark.parametrize("address, port", [("127.0.0.1:{port}", "{port}"), ("ray://127.0.0.1:{port}", "{port}")])
def test_a_cluster_that_does_not_answer_is_one_line_and_exit_3(tmp_path, monkeypatch, address, port):
    """Nothing listens there: one line at once (no minutes of Ray's retries, no raw Ray logs, no Python warning)."""
    import socket
    import time

    monkeypatch.setattr(ray_executor, "_ray", lambda: pytest.fail("Ray was started"))
    with socket.socket() as closed:  # a port bound but not listening: the connection is refused
        closed.bind(("127.0.0.1", 0))
        free = closed.getsockname()[1]
        model = mlp()
        onnx.save(model, tmp_path / "m.onnx")
        x = np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32)
        np.savez(tmp_path / "d.npz", x=x, y=teacher_labels(model, x))
        started = time.monotonic()
        result = CliRunner().invoke(main, [str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d.npz"), "--ray",
                                           address.format(port=free), "--sigmas", "0.1", "--repeats", "1"])
    assert time.monotonic() - started < ray_executor.CONNECT_TIMEOUT_S
    assert result.exit_code == 3, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"walkaudit: error: cannot join the Ray cluster at {address.format(port=free)}: 127.0.0.1:{free} does not "
        "answer"), result.stderr


def test_actors_release_a_sites_sessions_when_its_search_is_done(ray_cluster, files):
    """As in process (tests/test_memory.py): every actor drops a finished site's evaluation, so an actor's memory is
    bounded by the sites in flight, not by the sites audited."""
    import ray

    made = []
    run = api.iter_audit(str(files / "mlp.onnx"), data=str(files / "val.npz"), provider="cpu", seed=5, threads=1,
                         sigmas=(0.1, 1.0), repeats=1, executor=_factory(made, piece_seconds=0.002))
    alive = []
    for _ in run:
        alive.append(ray.get(made[0].released))
    assert len(alive) >= 2 and all(len(counts) == 2 for counts in alive)
    assert alive[-1] == [0, 0]  # after the last site: nothing held on either actor
    assert all(max(counts) < made[0].sites_in_flight + 1 for counts in alive)
