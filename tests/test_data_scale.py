"""Data at scale: memory-mapped .npy and stored .npz members, compressed members read only when used, folders of
shards read as one data set, streamed hashing and checks. Every form reads the same batches as the arrays."""

from __future__ import annotations

import hashlib
import pickle
import shutil
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto

import walkaudit
from walkaudit._loading.data import Column, load, sha256_of
from walkaudit._loading.model import TensorSpec
from walkaudit.errors import DataError

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
X = TensorSpec("x", TensorProto.FLOAT, ("N", 3, 5))
N = 103
SIZES = (40, 1, 0, 33, 29)  # shards of different sizes, one of them empty


@pytest.fixture(scope="module")
def arrays():
    rng = np.random.default_rng(7)
    return rng.normal(size=(N, 3, 5)).astype(np.float32), rng.integers(0, 10, N)


def shard(folder: Path, x, y, sizes=SIZES, save=np.savez, name="part-{:04d}.npz") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    bounds = np.cumsum([0, *sizes])
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        save(folder / name.format(i), x=x[a:b], y=y[a:b])
    return folder


def forms(root: Path, x, y) -> dict[str, Path]:
    """The same data in every form the loader reads."""
    root.mkdir(parents=True, exist_ok=True)
    np.savez(root / "stored.npz", x=x, y=y)
    np.savez_compressed(root / "deflated.npz", x=x, y=y)
    np.save(root / "inputs.npy", x)
    (root / "per-array").mkdir()
    np.save(root / "per-array" / "x.npy", x)
    np.save(root / "per-array" / "y.npy", y)
    return {"stored.npz": root / "stored.npz", "deflated.npz": root / "deflated.npz", "inputs.npy": root / "inputs.npy",
            "per-array": root / "per-array", "shards": shard(root / "shards", x, y),
            "compressed-shards": shard(root / "zshards", x, y, save=np.savez_compressed)}


@pytest.fixture(scope="module")
def every_form(tmp_path_factory, arrays):
    return forms(tmp_path_factory.mktemp("forms"), *arrays)


FORMS = ["stored.npz", "deflated.npz", "inputs.npy", "per-array", "shards", "compressed-shards"]


# --- the same batches ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("size", [1, 7, 40, 64, 200])
def test_batches_equal_the_arrays(every_form, arrays, form, size):
    x, y = arrays
    ds = load(every_form[form], [X])
    assert isinstance(ds.inputs["x"], Column) and ds.samples == N
    assert ds.inputs["x"].shape == x.shape and ds.inputs["x"].dtype == np.float32
    got = list(ds.batches(size))
    assert [s for s, _ in got] == list(range(0, N, size))
    for start, batch in got:
        b = batch["x"]
        assert type(b) is np.ndarray and b.flags.c_contiguous
        np.testing.assert_array_equal(b, x[start : start + size])
    if form == "inputs.npy":
        assert ds.labels is None
    else:
        np.testing.assert_array_equal(ds.labels, y)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(st.sampled_from(FORMS), st.integers(-N - 5, N + 5) | st.none(), st.integers(-N - 5, N + 5) | st.none(),
       st.sampled_from([None, 1, 2, 5, -1, -3]))
def test_any_slice_equals_numpy(every_form, arrays, form, start, stop, step):
    x, _ = arrays
    column = load(every_form[form], [X]).inputs["x"]
    np.testing.assert_array_equal(column[start:stop:step], x[start:stop:step])
    if start is not None and -N <= start < N:
        np.testing.assert_array_equal(column[start], x[start])
        np.testing.assert_array_equal(column[start, 1:, ::2], x[start, 1:, ::2])


@pytest.mark.parametrize("form", ["shards", "compressed-shards", "stored.npz"])
def test_limit_takes_the_first_samples(every_form, arrays, form):
    x, y = arrays
    ds = load(every_form[form], [X], limit=45)  # past the first two shards
    assert ds.samples == 45 and len(ds.labels) == 45
    np.testing.assert_array_equal(np.asarray(ds.inputs["x"]), x[:45])
    np.testing.assert_array_equal(ds.inputs["x"][40:100], x[40:45])
    np.testing.assert_array_equal(ds.labels, y[:45])


def test_float64_shards_are_cast_when_read(tmp_path, arrays):
    x, y = arrays
    folder = shard(tmp_path / "f64", x.astype(np.float64) * 1.5, y)
    column = load(folder, [X]).inputs["x"]
    assert column.dtype == np.float32 and column[:10].dtype == np.float32
    np.testing.assert_array_equal(column[30:80], (x.astype(np.float64) * 1.5).astype(np.float32)[30:80])


def test_fortran_order_npy(tmp_path, arrays):
    x, _ = arrays
    np.save(tmp_path / "f.npy", np.asfortranarray(x))
    column = load(tmp_path / "f.npy", [X]).inputs["x"]
    np.testing.assert_array_equal(column[5:50], x[5:50])
    assert column[5:50].flags.c_contiguous


def test_multi_input_folder_of_arrays(tmp_path, arrays):
    x, y = arrays
    a, b = TensorSpec("a", TensorProto.FLOAT, ("N", 5)), TensorSpec("b", TensorProto.INT64, ("N",))
    np.save(tmp_path / "a.npy", x[:, 0])
    np.save(tmp_path / "b.npy", y.astype(np.int32))
    np.save(tmp_path / "labels.npy", y)
    ds = load(tmp_path, [a, b])
    assert ds.inputs["b"].dtype == np.int64 and ds.inputs["b"][:3].dtype == np.int64
    np.testing.assert_array_equal(ds.inputs["b"][:], y)
    np.testing.assert_array_equal(ds.labels, y)


def test_a_column_pickles_as_its_array(every_form, arrays):
    column = load(every_form["compressed-shards"], [X], limit=50).inputs["x"]
    back = pickle.loads(pickle.dumps(column))
    assert type(back) is np.ndarray
    np.testing.assert_array_equal(back, arrays[0][:50])


# --- checks, chunk by chunk ------------------------------------------------------------------------------------------

def test_nonfinite_values_in_a_later_shard(tmp_path, arrays):
    x, y = arrays
    x = x.copy()
    x[80, 1, 2], x[90, 0, 0] = np.nan, np.inf
    folder = shard(tmp_path / "nan", x, y)
    with pytest.raises(DataError, match="holds 2 NaN/Inf values"):
        load(folder, [X])
    assert load(folder, [X], limit=70).samples == 70  # only the samples used are checked
    assert np.isnan(load(folder, [X], allow_nonfinite=True).inputs["x"][80, 1, 2])


def test_overflow_when_cast_is_counted_over_all_shards(tmp_path, arrays):
    x, y = arrays
    x = x.astype(np.float64)
    x[3, 0, 0], x[100, 2, 4] = 1e39, -1e40
    overflow = r"2 values overflow float32 when cast from float64 \(largest \|value\| 1e\+40\)"
    with pytest.raises(DataError, match=overflow):
        load(shard(tmp_path / "big", x, y), [X])


def test_int_inputs_that_do_not_fit(tmp_path):
    spec = TensorSpec("ids", TensorProto.INT32, ("N",))
    ids = np.arange(10, dtype=np.int64)
    ids[9] = 2**40
    np.save(tmp_path / "ids.npy", ids)
    with pytest.raises(DataError, match="do not fit int32"):
        load(tmp_path / "ids.npy", [spec])
    assert load(tmp_path / "ids.npy", [spec], limit=9).inputs["ids"][:].dtype == np.int32


# --- refusals: one line naming the file ------------------------------------------------------------------------------

def _refused(path, phrase: str, *names: str):
    with pytest.raises(DataError) as info:
        load(path, [X])
    msg = str(info.value)
    assert "\n" not in msg and phrase in msg, msg
    for name in names:
        assert name in msg, msg


def test_mismatched_keys_across_shards(tmp_path, arrays):
    x, y = arrays
    folder = shard(tmp_path / "keys", x, y)
    np.savez(folder / "part-0002.npz", x=x[:3], labels=y[:3])
    _refused(folder, "same keys", "keys/part-0002.npz", "x, labels", "part-0000.npz")


def test_mismatched_shapes_across_shards(tmp_path, arrays):
    x, y = arrays
    folder = shard(tmp_path / "shapes", x, y)
    np.savez(folder / "part-0003.npz", x=x[:4, :, :4], y=y[:4])
    _refused(folder, "float32 [4, 3, 4], but", "shapes/part-0003.npz", "part-0000.npz has float32 [40, 3, 5]")


def test_mismatched_dtypes_across_shards(tmp_path, arrays):
    x, y = arrays
    folder = shard(tmp_path / "dtypes", x, y)
    np.savez(folder / "part-0001.npz", x=x[:1].astype(np.float64), y=y[:1])
    _refused(folder, "float64 [1, 3, 5], but", "dtypes/part-0001.npz")


def test_object_arrays_in_a_shard_are_never_unpickled(tmp_path, arrays):
    x, y = arrays
    folder = shard(tmp_path / "objects", x, y)
    obj = np.empty(3, dtype=object)
    obj[:] = [{"a": 1}, None, "x"]
    np.savez(folder / "part-0004.npz", x=obj, y=y[:3])
    _refused(folder, "pickled object arrays", "objects/part-0004.npz")
    np.save(folder.parent / "obj.npy", obj, allow_pickle=True)
    _refused(folder.parent / "obj.npy", "pickled object arrays", "obj.npy")


def test_a_pickle_among_the_shards(tmp_path, arrays):
    x, y = arrays
    folder = shard(tmp_path / "pickles", x, y)
    (folder / "part-0002.npz").write_bytes(pickle.dumps({"x": x}))
    _refused(folder, "pickled data", "pickles/part-0002.npz")


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.txt").write_text("no data here")
    _refused(tmp_path / "empty", "is a directory without .npz or .npy files", str(tmp_path / "empty"))


def test_mixed_folder(tmp_path, arrays):
    x, y = arrays
    folder = shard(tmp_path / "mixed", x, y)
    np.save(folder / "z.npy", x)
    _refused(folder, "mixes .npz and .npy files", "mixed")


def test_truncated_npy_and_member(tmp_path, arrays):
    x, y = arrays
    np.save(tmp_path / "full.npy", x)
    (tmp_path / "cut.npy").write_bytes((tmp_path / "full.npy").read_bytes()[:300])
    _refused(tmp_path / "cut.npy", "not a readable .npy file", "cut.npy")
    data = tmp_path / "d.npz"
    np.savez_compressed(data, x=x, y=y)
    with zipfile.ZipFile(data) as z:  # a compressed member whose stream is damaged (the zip itself is intact)
        info = z.getinfo("x.npy")
    raw = bytearray(data.read_bytes())
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    raw[start + 3000 : start + 3040] = bytes(40)
    (tmp_path / "bad.npz").write_bytes(bytes(raw))
    _refused(tmp_path / "bad.npz", "not a readable .npz file", "bad.npz")


# --- what is never read -----------------------------------------------------------------------------------------------

def _zip_bomb(path: Path, x, y, megabytes: int) -> None:
    """x and y stored, plus an unused member of `megabytes` MB of zeros, deflated to almost nothing."""
    np.savez(path, x=x, y=y)
    header = np.lib.format.header_data_from_array_1_0(np.zeros(1, np.float32))
    header["shape"] = (megabytes << 18,)
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as z, \
            z.open("unused.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array_header_1_0(f, header)
        zeros = bytes(1 << 20)
        for _ in range(megabytes):
            f.write(zeros)


def test_unused_members_are_never_decompressed(tmp_path, arrays):
    x, y = arrays
    path = tmp_path / "bomb.npz"
    _zip_bomb(path, x, y, 256)
    assert path.stat().st_size < 2 << 20
    tracemalloc.start()
    try:
        ds = load(path, [X])
        np.testing.assert_array_equal(ds.inputs["x"][:], x)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak


@pytest.mark.parametrize("save", [np.save, np.savez, np.savez_compressed], ids=["npy", "stored", "deflated"])
def test_memory_is_bounded_by_the_batch(tmp_path, save):
    """~100 MB of inputs: loading, checking, hashing and reading every batch stay within a few chunks."""
    rows, width = 12_800, 2_000
    x = (np.arange(rows * width, dtype=np.float32) % 997).reshape(rows, width)  # compresses quickly
    spec = TensorSpec("x", TensorProto.FLOAT, ("N", width))
    path = tmp_path / ("d.npy" if save is np.save else "d.npz")
    save(path, x) if save is np.save else save(path, x=x)
    del x
    tracemalloc.start()
    try:
        ds = load(path, [spec])
        total = 0.0
        for _, batch in ds.batches(256):  # 2 MB a batch
            total += float(batch["x"][:, 0].sum())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert ds.samples == rows
    assert peak < 32 << 20, peak


# --- the hash ---------------------------------------------------------------------------------------------------------

def test_hashes(tmp_path, every_form, arrays):
    x, y = arrays
    one = every_form["stored.npz"]
    assert load(one, [X]).sha256 == hashlib.sha256(one.read_bytes()).hexdigest() == sha256_of(one)
    a = every_form["shards"]
    b = tmp_path / "elsewhere" / "copy"
    shutil.copytree(a, b)
    (b / "notes.txt").write_text("not data")
    assert load(a, [X]).sha256 == load(b, [X]).sha256 == sha256_of(b)
    (b / "part-0004.npz").rename(b / "part-0005.npz")  # names count
    assert sha256_of(b) != sha256_of(a)


# --- an audit over shards ---------------------------------------------------------------------------------------------

def _comparable(report) -> dict:
    d = report.to_dict()
    d["runtime"].pop("elapsed_s")
    d.pop("data")  # path and sha256 differ: the samples, labels and everything else must not
    return d


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed], ids=["stored", "deflated"])
def test_audit_on_shards_equals_the_audit_on_the_file(tmp_path, save):
    model, data = SAMPLES / "mnist_lenet5.dynamo.onnx", SAMPLES / "mnist_val.npz"
    with np.load(data) as f:
        x, y = f["x"], f["y"]
    folder = shard(tmp_path / "mnist", x, y, sizes=(300, 1, 250, 449), save=save)
    options = dict(sigmas=(0.05, 0.3, 2.0), repeats=1, provider="cpu", batch_size=100)
    whole = walkaudit.audit(str(model), data=str(data), **options)
    sharded = walkaudit.audit(str(model), data=str(folder), **options)
    assert sharded.to_dict()["data"]["samples"] == 1000
    assert _comparable(sharded) == _comparable(whole)
