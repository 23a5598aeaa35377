"""Bit flips change exactly the intended bits of the stored type, at the bit error rate asked for.

Bit-exact: the flipped bits are read back as `noisy XOR clean` on the unsigned view of the value and compared with
the bits whose words (`bit_word` of the element's drawn word) fall below the level's threshold. Rates are measured on
seeded draws (deterministic); the tolerances are 6 binomial standard errors.
"""

from __future__ import annotations

import numpy as np
import pytest

from walkaudit._noise import NormalSource, make_noise
from walkaudit._noise.bitflip import LAYOUTS, WORD, bit_word, positions, threshold
from walkaudit.errors import UsageError

UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32}
SHAPE = (64, 256)


def values(dtype) -> np.ndarray:
    rng = np.random.default_rng(3)
    if np.dtype(dtype).kind == "f":
        return rng.normal(size=SHAPE).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max + 1, SHAPE).astype(dtype)


def words(noise, seed: int = 1) -> np.ndarray:
    """The engine's draw: [draws, 1, *SHAPE] words, keyed like the worker keys them."""
    src = NormalSource(seed, threads=1)
    eps = np.zeros((noise.draws, 1, *SHAPE), np.float32)
    for term in range(noise.draws):
        noise.draw(src, "site", term, 0, range(SHAPE[0]), SHAPE[1:], out=eps[term, 0])
    src.close()
    return eps


def flipped(clean: np.ndarray, noisy: np.ndarray) -> np.ndarray:
    uint = UINT[clean.dtype.itemsize]
    return noisy.view(uint) ^ clean.view(uint)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int8, np.uint8])
@pytest.mark.parametrize("spec", ["all", "sign", "exponent", "mantissa", "value", "0-2,5"])
def test_exactly_the_drawn_bits_flip_and_no_other(dtype, spec):
    try:
        where = positions(spec, dtype)
    except UsageError:  # e.g. an int8 has no exponent: the model says so instead of flipping something else
        with pytest.raises(UsageError):
            make_noise("bitflip", bits=spec).host(values(dtype), [0.1], np.zeros((1, 1, *SHAPE), np.float32))
        return
    noise = make_noise("bitflip", bits=spec)
    y, eps = values(dtype), words(noise)
    sigmas = [0.0, 1e-3, 0.05, 0.5]
    out = noise.host(y, sigmas, eps)
    assert out.dtype == y.dtype and out.shape == (len(sigmas), *SHAPE)
    uint = UINT[y.dtype.itemsize]
    u = eps.view(np.uint32)
    for level, p in enumerate(sigmas):
        want = np.zeros(SHAPE, uint)
        for bit in where:
            want |= (bit_word(u[0, 0], bit) < threshold(p)).astype(uint) << uint(bit)
        assert np.array_equal(flipped(y, out[level]), want)
        assert not np.any(flipped(y, out[level]) & ~uint(sum(1 << b for b in where)))  # never outside the positions
    assert out[0].tobytes() == y.tobytes()  # BER 0: the value itself, bit for bit


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int8])
def test_each_bit_flips_at_the_bit_error_rate_independently(dtype):
    noise = make_noise("bitflip")
    y, eps = values(dtype), words(noise, seed=4)
    width = y.dtype.itemsize * 8
    p = 0.02
    x = flipped(y, noise.host(y, [p], eps)[0])
    n = y.size
    se = np.sqrt(p * (1 - p) / n)
    rates = [np.mean((x >> b) & 1) for b in range(width)]
    assert all(abs(r - p) < 6 * se for r in rates)  # every position at p
    both = np.mean(((x >> 0) & 1) & ((x >> (width - 1)) & 1))  # two positions flip together at p², not p
    assert abs(both - p * p) < 6 * np.sqrt(p * p / n)


def test_flips_of_a_lower_rate_are_a_subset_of_a_higher_ones():
    noise = make_noise("bitflip")
    y = values(np.float32)
    out = noise.host(y, [1e-3, 1e-2, 1e-1], words(noise))
    a, b, c = (flipped(y, o) for o in out)
    assert np.array_equal(a & b, a) and np.array_equal(b & c, b)
    assert a.any() and (b != a).any()


def test_the_rate_resolves_to_multiples_of_2_to_the_minus_32():
    assert threshold(0) == 0 and threshold(1e-9) == 4 and threshold(1) == WORD and threshold(2) == WORD
    y = values(np.float32)
    noise = make_noise("bitflip", bits="sign")
    everything = noise.host(y, [1.0], words(noise))[0]
    assert np.array_equal(everything, -y)  # the sign bit at BER 1: every value negated, exactly


def test_bit_groups_follow_the_stored_type():
    assert positions("sign", np.float32) == (31,) and positions("exponent", np.float32) == tuple(range(23, 31))
    assert positions("mantissa", np.float16) == tuple(range(10)) and positions("exponent", np.float16) == (10, 11, 12,
                                                                                                          13, 14)
    assert positions("sign,value", np.int8) == tuple(range(8)) and positions("all", np.uint8) == tuple(range(8))
    assert positions("31,0-1", np.float32) == (0, 1, 31)
    for spec, dtype in (("exponent", np.int8), ("sign", np.uint8), ("16", np.float16), ("8", np.int8)):
        with pytest.raises(UsageError):
            positions(spec, dtype)
    assert set(LAYOUTS) == {np.dtype(t) for t in (np.float32, np.float16, np.int8, np.uint8, np.int16, np.uint16)}
    # one drawn word per element, whatever the positions: each position's word is derived from it
    assert [make_noise("bitflip", bits=s).draws for s in ("all", "exponent", "sign", "value")] == [1, 1, 1, 1]


def test_the_words_of_the_positions_are_independent_uniforms():
    """bit_word(w, b) over 2¹⁸ drawn words (seed 0): each position's words uniform (KS at α = 0.001), two positions
    uncorrelated (5 standard errors), and distinct positions never share a word sequence."""
    from scipy import stats

    src = NormalSource(0, threads=1)
    w = src.normal((1 << 18,), (9,), dist="bits").view(np.uint32)
    src.close()
    words_ = [bit_word(w, b).astype(np.float64) / WORD for b in (0, 1, 31)]
    n = w.size
    for u in words_:
        assert stats.kstest(u, "uniform").statistic < 1.95 / np.sqrt(n)
    assert abs(np.corrcoef(words_[0], words_[1])[0, 1]) < 5 / np.sqrt(n)
    assert abs(np.corrcoef(words_[0], w.astype(np.float64))[0, 1]) < 5 / np.sqrt(n)
    assert not np.any(words_[0] == words_[2])


# -- quantized models: flips in the int8 values and weights they store -------------------------------------------------
def quantized(fmt: str) -> bytes:
    """tests.models.mlp quantized to int8 by onnxruntime's static quantizer (QDQ or QOperator)."""
    import os
    import tempfile

    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from .models import mlp

    x = np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"x": x[i : i + 16]} for i in range(0, 64, 16)])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as folder:
        plain, out = os.path.join(folder, "f.onnx"), os.path.join(folder, "q.onnx")
        onnx.save(mlp(seed=1), plain)
        quantize_static(plain, out, Reader(), quant_format=getattr(QuantFormat, fmt),
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
        with open(out, "rb") as f:
            return f.read()


# a QDQ model is audited as onnxruntime runs it: its DQ → MatMul → Q group fused into QLinearMatMul
@pytest.mark.parametrize("fmt, layer", [("QDQ", "QLinearMatMul"), ("QOperator", "QLinearMatMul")])
def test_bit_flips_of_a_quantized_model_hit_its_int8_values_and_weights(fmt, layer):
    import onnx

    from walkaudit._execution.runtime import Runtime
    from walkaudit._execution.worker import Worker
    from walkaudit._graph.sites import Selection, select
    from walkaudit._loading.data import from_arrays
    from walkaudit._loading.model import load_model
    from walkaudit._units import WorkUnit

    loaded = load_model(onnx.load_from_string(quantized(fmt)))
    x = np.random.default_rng(5).normal(size=(128, 16)).astype(np.float32)
    ops = Selection(ops=("MatMul", "QLinearMatMul"))
    for target in ("activations", "weights"):
        noise = make_noise("bitflip", bits="value", target=target)
        sites = select(loaded.proto, loaded.types, ops, loaded.class_output.name, target=target, stored=True)
        # onnxruntime runs a QDQ model's int8 activations as uint8 (zero point + 128): u = i XOR 0x80, so a bit flip
        # in one is the same flip in the other
        assert len(sites) == 1 and loaded.types[sites[0].name].elem_type in (onnx.TensorProto.INT8,
                                                                              onnx.TensorProto.UINT8)
        assert all(s.op_type.startswith(layer) for s in sites)
        worker = Worker(loaded, from_arrays(x, None, loaded.inputs), runtime=Runtime("cpu"), noise=noise,
                        source=NormalSource(1, threads=1), sites=sites, batch_size=64)
        for site in sites:
            got = worker.evaluate(WorkUnit(worker.key, (site.name,), (0.0, 0.5), 2, (0, 2), 1))
            assert got.correct[0].tolist() == [128, 128]  # BER 0: the quantized model's own predictions
            assert got.correct[1].max() < 128  # half of its int8 bits flipped: it errs
        worker.source.close()


# -- the per-bit table -------------------------------------------------------------------------------------------------
def test_the_per_bit_table_has_a_row_per_stored_bit_and_the_exponent_matters(tmp_path):
    import json

    import onnx
    from click.testing import CliRunner

    from walkaudit.cli import main

    from .models import mlp, teacher_labels

    model = mlp(seed=3)
    onnx.save(model, tmp_path / "m.onnx")
    x = np.random.default_rng(3).normal(size=(128, 16)).astype(np.float32)
    np.savez(tmp_path / "val.npz", x=x, y=teacher_labels(model, x))
    result = CliRunner().invoke(main, ["bits", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "val.npz"),
                                       "--site", "h", "--ber", "0.05", "--json", str(tmp_path / "bits.json"),
                                       "--provider", "cpu", "--repeats", "2"])
    assert result.exit_code == 0, result.output
    table = json.loads((tmp_path / "bits.json").read_text())
    assert [r["bit"] for r in table["bits"]] == list(range(31, -1, -1)) and table["dtype"] == "float32"
    groups = {r["bit"]: r["group"] for r in table["bits"]}
    assert groups[31] == "sign" and groups[30] == groups[23] == "exponent" and groups[0] == "mantissa"
    drops = {r["bit"]: r["drop"] for r in table["bits"]}
    assert drops[0] == 0.0  # the last mantissa bit changes no prediction
    assert max(drops[b] for b in range(23, 31)) > 0.05  # an exponent bit does
    assert table["clean_accuracy"] == 1.0  # labels are the model's own predictions


def test_the_per_bit_table_of_a_weight_follows_its_stored_type():
    import onnx

    from walkaudit.bit_table import bit_sensitivity

    model = onnx.load_from_string(quantized("QDQ"))
    weight = next(t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2)
    x = np.random.default_rng(5).normal(size=(64, 16)).astype(np.float32)
    table = bit_sensitivity(model, x, site=weight, ber=0.2, target="weights", repeats=1, provider="cpu")
    assert table["dtype"] == "int8" and [r["bit"] for r in table["bits"]] == list(range(7, -1, -1))
    assert [r["group"] for r in table["bits"]] == ["sign"] + ["value"] * 7
    with pytest.raises(UsageError):
        bit_sensitivity(model, x, site=weight, ber=0.0, target="weights")


def test_a_baseline_with_other_bit_positions_is_refused(tmp_path):
    import onnx
    from click.testing import CliRunner

    from walkaudit.cli import main

    from .models import mlp, teacher_labels

    model = mlp(seed=3)
    onnx.save(model, tmp_path / "m.onnx")
    x = np.random.default_rng(3).normal(size=(64, 16)).astype(np.float32)
    np.savez(tmp_path / "val.npz", x=x, y=teacher_labels(model, x))
    common = [str(tmp_path / "m.onnx"), "--data", str(tmp_path / "val.npz"), "--noise", "bitflip", "--quiet",
              "--provider", "cpu", "--repeats", "1", "--sigmas", "1e-3,1e-1"]
    first = CliRunner().invoke(main, [*common, "--bits", "sign", "--json", str(tmp_path / "base.json")])
    assert first.exit_code == 0, first.output
    same = CliRunner().invoke(main, [*common, "--bits", "sign", "--baseline", str(tmp_path / "base.json")])
    assert same.exit_code == 0, same.output
    other = CliRunner().invoke(main, [*common, "--bits", "exponent", "--baseline", str(tmp_path / "base.json")])
    assert other.exit_code == 2
    assert "it used bits 'sign', this report 'exponent'" in other.stderr


def test_asking_a_uint8_activation_for_its_sign_says_which_bit_is_the_int8_sign():
    with pytest.raises(UsageError, match=r"uint8 value has no sign bits.*bit 7 is their int8 sign, --bits 7"):
        positions("sign", np.uint8)
    assert positions("7", np.uint8) == (7,) and positions("sign", np.int8) == (7,)
