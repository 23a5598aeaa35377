"""Paired accuracies (issue 21, item 3): every noisy evaluation is compared with the clean predictions on the same
samples, so that a point measured on part of the data is read relative to that part's clean accuracy, and the
pairing (McNemar's discordant counts) narrows a point's noise where the noise changes few predictions.

Worker tests run the real MNIST MLP sample (samples/mnist_mlp.dynamo.onnx, 1000 labelled samples of
samples/mnist_val.npz); the statistical test draws with numpy's default_rng(5) and states its tolerance.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

import walkaudit
from walkaudit._analysis import sweep
from walkaudit._execution.runtime import Runtime
from walkaudit._execution.worker import Worker
from walkaudit._graph.sites import Selection, select
from walkaudit._loading import data as data_mod
from walkaudit._loading.model import load_model
from walkaudit._noise import NormalSource, make_noise
from walkaudit._units import BLOCK, Counts, WorkUnit

ROOT = Path(__file__).resolve().parent.parent
MLP, DATA = ROOT / "samples/mnist_mlp.dynamo.onnx", ROOT / "samples/mnist_val.npz"


@pytest.fixture(scope="module")
def worker():
    pytest.importorskip("onnxruntime")
    loaded = load_model(str(MLP))
    data = data_mod.load(str(DATA), loaded.inputs)
    sites = select(loaded.proto, loaded.types, Selection(), loaded.class_output.name)
    w = Worker(loaded, data, runtime=Runtime("cpu"), noise=make_noise("additive", 0.3),
               source=NormalSource(4, threads=1), sites=sites, batch_size=100)
    w.stats = w.clean_pass()
    yield w
    w.source.close()


def _unit(worker, blocks, sigmas=(0.3, 1.0, 3.0), repeats=2):
    return WorkUnit(worker.key, (worker.sites[0].name,), sigmas, repeats, blocks, worker.source.seed)


def test_counts_pair_each_noisy_pass_with_the_clean_one_on_the_same_samples(worker):
    """clean_correct is the clean pass's score on exactly the unit's rows, and lost/gained are the discordant
    pairs: clean_correct - lost + gained = correct, at every (σ, repeat)."""
    counts = worker.evaluate(_unit(worker, (2, 6)))
    rows = slice(2 * BLOCK, 6 * BLOCK)
    assert counts.paired and counts.samples == 4 * BLOCK
    import onnxruntime as ort

    session = ort.InferenceSession(str(MLP), providers=["CPUExecutionProvider"])
    with np.load(DATA) as d:
        x, y = d["x"][rows], d["y"][rows]
    logits = session.run(None, {session.get_inputs()[0].name: x})[0]
    assert counts.clean_correct == int((logits.argmax(axis=1) == y).sum())  # the plain model on those rows
    assert np.all(counts.lost >= 0) and np.all(counts.gained >= 0)
    assert np.array_equal(counts.clean_correct - counts.lost + counts.gained, counts.correct)
    assert np.all(counts.lost[0] < counts.lost[-1])  # σ 3 loses more than σ 0.3
    full = worker.evaluate(_unit(worker, (0, 16)))
    assert full.clean_correct == worker.stats.correct  # all the data: the clean pass's own count


def test_paired_counts_add_exactly_over_disjoint_blocks_and_travel_by_pickle(worker):
    whole = worker.evaluate(_unit(worker, (0, 16)))
    parts = [worker.evaluate(_unit(worker, b)) for b in ((0, 5), (5, 6), (6, 16))]
    assert parts[2] + parts[0] + parts[1] == whole
    assert np.array_equal((parts[0] + parts[1] + parts[2]).lost, whole.lost)
    assert pickle.loads(pickle.dumps(whole)) == whole
    unpaired = Counts(whole.sigmas, whole.correct, whole.nonfinite, whole.samples)
    assert unpaired != whole and not (unpaired + whole).paired  # pairing is kept only where both halves have it


def test_a_subset_is_read_relative_to_its_own_clean_accuracy():
    """A head of blocks that scores 0.89 clean on data whose clean accuracy is 0.822 (the token transformer of the
    issue): a level where the noise changed nothing reads 0.822, not 0.89; over all the data nothing changes."""
    clean, chance = 370 / 450, 0.1
    head = Counts((0.01,), np.array([[114, 114]]), np.zeros((1, 2), np.int64), 128, (), 114, np.zeros((1, 2), np.int64))
    assert sweep.accuracy(head).tolist() == [114 / 128] * 2  # unpaired reading: above clean
    assert sweep.accuracy(head, clean, chance) == pytest.approx([clean, clean], abs=1e-12)
    lower = Counts((1.0,), np.array([[64, 70]]), np.zeros((1, 2), np.int64), 128, (), 114, np.array([[50, 44]]))
    rel = (np.array([64, 70]) / 128 - chance) / (114 / 128 - chance)
    assert sweep.accuracy(lower, clean, chance) == pytest.approx(chance + (clean - chance) * rel)
    whole = Counts((1.0,), np.array([[300, 301]]), np.zeros((1, 2), np.int64), 450, (), 370, np.array([[80, 79]]))
    assert sweep.accuracy(whole, clean, chance).tolist() == (np.array([300, 301]) / 450).tolist()  # bit for bit


def test_effective_samples_match_the_paired_variance():
    """Binomial noise on the paired counts of 1000 samples (900 clean-correct, 5 % of them lost, 2 % of the others
    gained): the accuracy's variance over 4000 draws (default_rng(5)) is a(1-a)/n_eff within 10 %; n_eff is far
    above the 1000 samples (the pairing narrows), and equals them for subsets and unpaired counts."""
    rng = np.random.default_rng(5)
    n, right, draws = 1000, 900, 4000
    lost = rng.binomial(right, 0.05, draws)
    gained = rng.binomial(n - right, 0.02, draws)
    acc = (right - lost + gained) / n
    level = Counts((1.0,), np.array([[right - 45 + 2]]), np.zeros((1, 1), np.int64), n, (), right, np.array([[45]]))
    eff = sweep.effective_samples(level, right / n, 0.1)
    a = level.correct[0, 0] / n
    assert a * (1 - a) / eff == pytest.approx(acc.var(), rel=0.1)
    assert eff > 1.5 * n
    assert sweep.effective_samples(level, 0.85, 0.1) == n  # a subset (its clean accuracy is not the whole's)
    assert sweep.effective_samples(Counts((1.0,), level.correct, level.nonfinite, n), right / n, 0.1) == n
    none = np.zeros((1, 1), np.int64)
    untouched = Counts((1.0,), np.array([[right]]), none, n, (), right, none)
    assert sweep.effective_samples(untouched, right / n, 0.1) == sweep.MAX_PAIRED_GAIN * n


def test_no_point_of_a_real_audit_starts_above_its_clean_accuracy():
    """MNIST MLP (multiplicative noise, seed 0): the adaptive search measures its first levels on a quarter of the
    blocks, whose clean accuracy differs from the whole's; every point reads at most clean + the share of samples
    the noise got right that the clean model got wrong, and the report carries the pairing."""
    report = walkaudit.audit(str(MLP), data=str(DATA), noise="multiplicative", provider="cpu", seed=0)
    clean = report.clean_accuracy
    subsets = 0
    for site in report.sites:
        for p in site.points:
            assert p.clean_correct is not None and len(p.per_repeat.lost) == p.repeats
            gained = (np.array(p.per_repeat.correct) - p.clean_correct + np.array(p.per_repeat.lost)).max()
            assert p.accuracy <= clean + gained / p.samples + 1e-12
            subsets += p.clean_correct / p.samples != clean
        low = site.points[0]
        assert abs(low.accuracy - clean) <= 0.005  # no noise effect yet: at clean, whatever part it was measured on
    assert subsets > 0  # the search did measure subsets whose clean accuracy differs from the whole's
