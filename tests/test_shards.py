"""Shards: the split of the sites (LPT), `--shard I/N`, and `walkaudit merge` back into the unsharded report."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from walkaudit import api
from walkaudit._analysis.shards import assign, loads
from walkaudit._graph.cost import site_costs
from walkaudit._graph.sites import Selection, select
from walkaudit._loading.model import load_model
from walkaudit.cli import main
from walkaudit.errors import UsageError
from walkaudit.report import load_report
from walkaudit.report.merge import merge, shard_of
from walkaudit.report.model import Report
from walkaudit.report.schema import validate_report

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
MODEL, DATA = SAMPLES / "mnist_mlp.dynamo.onnx", SAMPLES / "mnist_val.npz"
OPTIONS = ("--sigmas", "0.01,0.1,1,10", "--repeats", "2", "--provider", "cpu")


# --- the split ----------------------------------------------------------------------------------------------------

def _check_partition(shares, count):
    flat = [p for share in shares for p in share]
    assert sorted(flat) == list(range(count))  # every site exactly once
    assert all(share == sorted(share) for share in shares)  # in site order


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 25])
def test_shards_partition_the_sites_deterministically(n):
    rng = np.random.default_rng(n)
    for count in (0, 1, 5, 20):
        costs = rng.lognormal(0, 2, count).tolist()
        shares = assign(costs, n)
        assert len(shares) == n
        _check_partition(shares, count)
        assert assign(list(costs), n) == shares


def test_more_shards_than_sites_leaves_some_empty():
    assert assign([3.0, 1.0], 4) == [[0], [1], [], []]
    assert assign([], 3) == [[], [], []]
    with pytest.raises(ValueError):
        assign([1.0], 0)


def _best(costs, n):
    """The smallest possible largest shard, by trying every assignment."""
    return min(max(loads(costs, [[p for p, k in enumerate(pick) if k == s] for s in range(n)]))
               for pick in itertools.product(range(n), repeat=len(costs)))


@pytest.mark.parametrize("seed", range(12))
def test_shards_are_balanced_within_the_lpt_bound(seed):
    rng = np.random.default_rng(seed)
    n, count = int(rng.integers(2, 4)), int(rng.integers(3, 9))
    costs = rng.integers(1, 50, count).astype(float).tolist()
    largest = max(loads(costs, assign(costs, n)))
    assert largest <= (4 / 3 - 1 / (3 * n)) * _best(costs, n) + 1e-9  # Graham's bound for LPT
    assert largest <= sum(costs) / n + max(costs) + 1e-9


def test_lpt_puts_the_costliest_first():
    # costs 5,4,3,3,2,2,1 on 3 shards: 5+2=7, 4+2+1=7, 3+3=6 (the best: the total is 20)
    shares = assign([5, 4, 3, 3, 2, 2, 1], 3)
    assert shares == [[0, 5], [1, 4, 6], [2, 3]]
    assert loads([5, 4, 3, 3, 2, 2, 1], shares) == [7.0, 7.0, 6.0]


@pytest.mark.parametrize("name", ["mnist_lenet5.dynamo.onnx", "mnist_mlp.dynamo.onnx"])
def test_api_shards_keep_the_site_indices_and_cover_the_selection(name):
    loaded = load_model(SAMPLES / name)
    sites = select(loaded.proto, loaded.types, Selection(), loaded.class_output.name)
    for n in (1, 2, 3, len(sites) + 2):
        shards = [api._shard(loaded, sites, i, n) for i in range(1, n + 1)]
        assert sorted((s for share in shards for s in share), key=lambda s: s.index) == sites
        assert [api._shard(loaded, sites, i, n) for i in range(1, n + 1)] == shards
    costs = site_costs(loaded, sites)
    two = [[s.index for s in api._shard(loaded, sites, i, 2)] for i in (1, 2)]
    assert max(loads(costs, two)) <= sum(costs) / 2 + max(costs)


# --- the CLI: --shard and merge -----------------------------------------------------------------------------------

def invoke(*args, **kwargs):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False, **kwargs)


def audit(path, *extra):
    result = invoke(MODEL, "--data", DATA, *OPTIONS, "--json", path, "-q", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    full = audit(folder / "full.json")
    for n in (2, 3):
        for i in range(1, n + 1):
            audit(folder / f"s{i}of{n}.json", "--shard", f"{i}/{n}")
    return folder, full


def _without_timing(report: dict) -> dict:
    report = copy.deepcopy(report)
    del report["runtime"]["elapsed_s"]
    del report["config"]["shard"]
    return report


@pytest.mark.parametrize("n", [2, 3])
def test_merge_of_the_shards_is_the_unsharded_report(runs, tmp_path, n):
    folder, full = runs
    paths = [folder / f"s{i}of{n}.json" for i in range(1, n + 1)]
    shards = [json.loads(p.read_text()) for p in paths]
    assert [s["config"]["shard"] for s in shards] == [[i, n] for i in range(1, n + 1)]
    assert sorted(site["index"] for s in shards for site in s["sites"]) == [0, 1, 2]
    out = tmp_path / "merged.json"
    result = invoke("merge", *reversed(paths), "-o", out, "-q")  # any order
    assert result.exit_code == 0, result.output
    merged = json.loads(out.read_text())
    assert validate_report(merged) == []
    assert _without_timing(merged) == _without_timing(full)
    assert merged["config"]["shard"] is None
    assert merged["runtime"]["elapsed_s"] == max(s["runtime"]["elapsed_s"] for s in shards)
    assert [s["macs"] for s in merged["sites"]] == [784 * 128, 128 * 64, 64 * 10]


def test_a_shard_without_sites_is_a_valid_report(tmp_path):
    report = audit(tmp_path / "empty.json", "--shard", "4/4")  # three sites, four shards
    assert validate_report(report) == []
    assert report["sites"] == [] and report["summary"]["sites"] == 0
    assert report["config"]["shard"] == [4, 4] and report["runtime"]["evaluations"] == 0
    assert load_report(tmp_path / "empty.json").sites == ()


def test_merge_with_an_empty_shard(runs, tmp_path):
    folder, full = runs
    for i in range(1, 5):
        audit(tmp_path / f"q{i}.json", "--shard", f"{i}/4")
    assert json.loads((tmp_path / "q4.json").read_text())["sites"] == []
    result = invoke("merge", *(tmp_path / f"q{i}.json" for i in range(1, 5)), "-o", tmp_path / "m.json", "-q")
    assert result.exit_code == 0, result.output
    assert _without_timing(json.loads((tmp_path / "m.json").read_text())) == _without_timing(full)


def test_merge_gates_like_the_audit(runs, tmp_path):
    folder, full = runs
    shards = [folder / "s1of2.json", folder / "s2of2.json"]
    result = invoke("merge", *shards, "--fail-under", "100", "-o", tmp_path / "gated.json",
                    "--markdown", tmp_path / "r.md", "--junit", tmp_path / "r.xml", "-q")
    assert result.exit_code == 1
    gated = json.loads((tmp_path / "gated.json").read_text())
    assert gated["gate"]["passed"] is False and gated["gate"]["failures"]
    assert gated["config"]["gate"]["thresholds"] == [{"pattern": None, "value": 100.0, "relative": False}]
    assert "walkaudit" in (tmp_path / "r.md").read_text() and "<testsuite" in (tmp_path / "r.xml").read_text()
    # the same rules on the unsharded run give the same verdict
    same = invoke(MODEL, "--data", DATA, *OPTIONS, "--fail-under", "100", "--json", tmp_path / "direct.json", "-q")
    assert same.exit_code == 1
    assert _without_timing(json.loads((tmp_path / "direct.json").read_text())) == _without_timing(gated)
    # against itself: sites censored at the grid's top (σ50 > 10) cannot rule out a fall: undecided
    undecided = invoke("merge", *shards, "--baseline", folder / "full.json", "--max-drop", "20%", "-q")
    assert undecided.exit_code == 1 and "gate: UNDECIDED" in undecided.output
    ok = invoke("merge", *shards, "--baseline", folder / "full.json", "--max-drop", "20%", "--undecided", "pass", "-q")
    assert ok.exit_code == 0, ok.output
    assert invoke("merge", *shards, "--max-drop", "20%", "-q").exit_code == 2  # needs --baseline
    table = invoke("merge", *shards)
    assert table.exit_code == 0 and "linear_1" in table.output


def test_merge_refuses_to_overwrite_a_shard(runs):
    folder, _ = runs
    before = (folder / "s1of2.json").read_bytes()
    result = invoke("merge", folder / "s1of2.json", folder / "s2of2.json", "-o", folder / "s1of2.json")
    assert result.exit_code == 2
    assert "would overwrite a shard report" in result.stderr and len(result.stderr.splitlines()) == 1
    assert (folder / "s1of2.json").read_bytes() == before


def test_shard_option_is_checked(tmp_path):
    for value, phrase in (("3/2", "--shard must be between 1 and 2"), ("0/2", "--shard must be between 1 and 2"),
                          ("two", "expected I/N")):
        result = invoke(MODEL, "--data", DATA, "--shard", value, "-q")
        assert result.exit_code == 2 and phrase in result.stderr, result.stderr
    result = invoke(MODEL, "--data", DATA, "--shard", "1/2", "--global", "-q")
    assert result.exit_code == 2 and "cannot be sharded" in result.stderr


# --- merge's refusals, on the typed reports -----------------------------------------------------------------------

@pytest.fixture()
def pair(runs):
    folder, _ = runs
    return [json.loads((folder / f"s{i}of2.json").read_text()) for i in (1, 2)]


def _merge(dicts):
    return merge([Report.from_dict(d) for d in dicts], names=[f"s{k + 1}.json" for k in range(len(dicts))])


def _refused(dicts, phrase):
    with pytest.raises(UsageError) as caught:
        _merge(dicts)
    message = str(caught.value)
    assert phrase in message and "\n" not in message, message
    return message


def test_merge_function_gives_the_full_report(runs, pair):
    _, full = runs
    merged = _merge(pair)
    assert shard_of(merged) is None and merged.gate is None and shard_of(Report.from_dict(pair[0])) == (1, 2)
    expected = _without_timing(full)
    del expected["gate"], expected["config"]["gate"]
    assert _without_timing(merged.to_dict()) == expected


def _unpaired(report: dict) -> dict:
    """The report without the points' pairing with the clean pass (as written before it existed)."""
    for site in report["sites"]:
        for point in site["points"]:
            point.pop("clean_correct", None)
            point["per_repeat"].pop("lost", None)
    return report


@pytest.mark.parametrize(("change", "phrase"), [
    (lambda r: r["model"].update(sha256="0" * 64), "shards are of different models: sha256"),
    (lambda r: r["data"].update(sha256="f" * 64), "shards are of different data"),
    (lambda r: r["config"].update(repeats=3), "shards used different settings (config.repeats): 2 in s1.json, 3 in"),
    (lambda r: r["config"].update(noise="multiplicative"), "different settings (config.noise)"),
    (lambda r: r["config"]["sites"].update(exclude="x"), "different settings (config.sites)"),
    (lambda r: r["config"].update(seed=7), "shards used different seeds: 0 in s1.json, 7 in s2.json"),
    (lambda r: r["tool"].update(version="0.0.1"), "different walkaudit versions"),
    (lambda r: r["runtime"].update(provider="CUDAExecutionProvider"), "ran on different providers"),
    (lambda r: r["config"].update(shard=[2, 3]), "shards of different N: s1.json is shard 1/2, s2.json is shard 2/3"),
    (lambda r: r["config"].update(shard=[1, 2]), "shard 1/2 is given twice (s1.json and s2.json)"),
    (lambda r: _unpaired(r).update(clean_accuracy=0.5, clean_counts={"correct": 500, "samples": 1000}),
     "disagree on the clean pass (clean accuracy)"),
    (lambda r: r.update(clean_accuracy=0.5, clean_counts={"correct": 500, "samples": 1000}),
     "but its counts give"),  # paired points read against the clean accuracy: the report contradicts itself
    (lambda r: r.update(partial=True), "s2.json is a partial report"),
    (lambda r: r["config"].update(shard=None), "s2.json is not a shard report"),
])
def test_merge_refuses_shards_of_different_audits(pair, change, phrase):
    change(pair[1])
    _refused(pair, phrase)


def test_merge_accepts_what_may_differ_between_shards(runs, pair):
    pair[1]["config"]["gate"] = {"thresholds": [{"pattern": None, "value": 1.0, "relative": False}]}
    pair[1]["model"]["path"] = "/elsewhere/model.onnx"
    pair[1]["runtime"]["elapsed_s"] = 1234.5
    merged = _merge(pair)
    assert merged.runtime.elapsed_s == 1234.5 and merged.model.path == pair[0]["model"]["path"]
    assert "gate" not in merged.config.extra


def test_merge_refuses_missing_and_overlapping_shards(runs, pair):
    folder, _ = runs
    _refused(pair[:1], "shard 2/2 is missing")
    quarter = [json.loads((folder / f"s{i}of3.json").read_text()) for i in (1, 2, 3)]
    _refused(quarter[:1], "shards 2/3, 3/3 are missing (2 of 3)")
    _refused([pair[0], pair[0]], "shard 1/2 is given twice")
    pair[1]["sites"].append(copy.deepcopy(pair[0]["sites"][0]))  # a site in two shards
    pair[1]["runtime"].pop("evaluations")  # (a count the reader checks against the points)
    _refused(pair, "shards overlap: s1.json and s2.json both hold site 0")
    pair[1]["sites"] = [s for s in pair[1]["sites"] if s["index"] == 2]  # site 1 in no shard: the indices jump
    message = _refused(pair, "is in none of the shards")
    assert message.startswith("site 1 is in none of the shards (the indices jump from 0 to 2)")
    with pytest.raises(UsageError, match="no shard reports"):
        merge([])


def _all_correct(report):
    point = report["sites"][0]["points"][0]
    point["per_repeat"]["correct"] = [point["samples"]] * point["repeats"]


def _hundredfold(report):
    """Every count of the first site's points 100x, consistent with itself, not with the data."""
    for point in report["sites"][0]["points"]:
        point["samples"] *= 100
        point["per_repeat"]["correct"] = [c * 100 for c in point["per_repeat"]["correct"]]
    report["runtime"].pop("evaluations")


@pytest.mark.parametrize(("change", "phrase"), [
    (lambda r: r["config"].update(shard=[4, 3]), "config.shard: [4, 3] is not a shard I/N with 1 ≤ I ≤ N"),
    (lambda r: r["config"].update(shard=[0, 2]), "config.shard[0]: 0 is below the minimum 1"),
    (_all_correct, "sites[0].points[0].accuracy:"),
    (lambda r: r["sites"][0]["points"][0].update(samples=100), "a count is larger than samples"),
    (_hundredfold, "sites[0].points[0].samples: 100000, more than the 1000 the clean pass counted"),
    (lambda r: r["runtime"].update(evaluations=3473712), "runtime.evaluations: 3473712, but the points add up to"),
    (lambda r: r["sites"][1].update(index=r["sites"][0]["index"]), "sites[1].index:"),
])
def test_merge_refuses_tampered_numbers(runs, tmp_path, pair, change, phrase):
    change(pair[1])
    (tmp_path / "s2.json").write_text(json.dumps(pair[1]))
    result = invoke("merge", runs[0] / "s1of2.json", tmp_path / "s2.json", "-o", tmp_path / "out.json")
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert phrase in result.stderr, result.stderr
    assert not (tmp_path / "out.json").exists()


def test_merge_never_writes_a_report_its_reader_refuses(runs, tmp_path, monkeypatch):
    from walkaudit.report import model

    folder, _ = runs
    size = max(len((folder / f"s{i}of2.json").read_bytes()) for i in (1, 2))
    monkeypatch.setattr(model, "MAX_REPORT_BYTES", size)  # the shards fit, the merged report (all their sites) does not
    result = invoke("merge", folder / "s1of2.json", folder / "s2of2.json", "-o", tmp_path / "out.json")
    assert result.exit_code == 2, result.output
    assert "more than the" in result.stderr and "walkaudit reads back; nothing written" in result.stderr
    assert len(result.stderr.splitlines()) == 1 and not (tmp_path / "out.json").exists()


def test_merge_cli_refusals_are_one_line_with_exit_2(runs, tmp_path):
    folder, full = runs
    other = json.loads((folder / "s2of2.json").read_text())
    other["config"]["seed"] = 3
    (tmp_path / "other.json").write_text(json.dumps(other))
    cases = [((folder / "s1of2.json", tmp_path / "other.json"), "shards used different seeds"),
             ((folder / "s1of2.json",), "shard 2/2 is missing"),
             ((folder / "full.json", folder / "s1of2.json"), "full.json is not a shard report"),
             ((folder / "s1of2.json", folder / "s1of3.json"), "shards of different N"),
             ((folder / "s1of2.json", tmp_path / "absent.json"), "report not found")]
    for paths, phrase in cases:
        result = invoke("merge", *paths, "-o", tmp_path / "out.json")
        assert result.exit_code == 2, result.output
        assert phrase in result.stderr and len(result.stderr.splitlines()) == 1, result.stderr
        assert not (tmp_path / "out.json").exists()


def test_merged_notes_are_the_runs_then_each_sites(runs, pair):
    for shard in pair:
        for site in shard["sites"]:
            site["notes"] = []
    pair[0]["runtime"]["notes"] = ["run note"]
    pair[1]["sites"][0]["notes"] = ["site note"]
    pair[1]["runtime"]["notes"] = ["run note", "another run note", "site note"]
    merged = _merge(pair)
    assert list(merged.runtime.notes) == ["run note", "another run note", "site note"]


@pytest.mark.parametrize("noise", [("--noise", "weight-additive", "--sigmas", "0.1,1,10"),
                                   ("--noise", "bitflip", "--target", "weights", "--sigmas", "1e-4,1e-2,1e-1"),
                                   ("--noise", "bitflip", "--sigmas", "1e-4,1e-2,1e-1")],
                         ids=["weight-additive", "bitflip-weights", "bitflip-activations"])
def test_shards_of_the_other_noise_models_merge_into_the_unsharded_report(tmp_path, noise):
    """Weight noise (one draw per repeat) and bit flips (words keyed by site, block and repeat) split over shards
    and merged give the unsharded report, as the Gaussian models do."""
    options = ("--limit", "300", "--repeats", "2", "--provider", "cpu", *noise)

    def run(path, *extra):
        result = invoke(MODEL, "--data", DATA, *options, "--json", path, "-q", *extra)
        assert result.exit_code == 0, result.output
        return json.loads(Path(path).read_text())

    full = run(tmp_path / "full.json")
    for i in (1, 2):
        run(tmp_path / f"s{i}.json", "--shard", f"{i}/2")
    merged = tmp_path / "merged.json"
    assert invoke("merge", tmp_path / "s1.json", tmp_path / "s2.json", "-o", merged, "-q").exit_code == 0
    assert _without_timing(json.loads(merged.read_text())) == _without_timing(full)
    assert len(full["sites"]) == 3 and any(p["accuracy"] < full["clean_accuracy"] for s in full["sites"]
                                           for p in s["points"])
