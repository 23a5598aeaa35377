"""The data loader: safe reading, key choice, casting, label forms; property tests over shapes and dtypes."""

from __future__ import annotations

import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto

from walkaudit._loading.data import from_arrays, load, to_class_ids
from walkaudit._loading.model import TensorSpec
from walkaudit.errors import DataError

PROPERTY = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

X = TensorSpec("x", TensorProto.FLOAT, ("N", 4))
IMG = TensorSpec("image", TensorProto.FLOAT, ("batch", 3, "h", "w"))


def rng(seed=0):
    return np.random.default_rng(seed)


def save(tmp_path: Path, name: str = "d.npz", **arrays) -> Path:
    p = tmp_path / name
    np.savez(p, **arrays)
    return p


# --- key choice ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("xk, yk", [("x", "y"), ("X", "Y"), ("images", "labels"), ("inputs", "targets"),
                                    ("x_test", "y_test"), ("features", "label")])
def test_usual_key_names(tmp_path, xk, yk):
    x, y = rng().normal(size=(5, 4)), np.arange(5) % 3
    ds = load(save(tmp_path, **{xk: x, yk: y}), [X])
    assert ds.samples == 5 and ds.inputs["x"].dtype == np.float32
    np.testing.assert_array_equal(ds.labels, y)


def test_input_named_like_the_model_input(tmp_path):
    spec = TensorSpec("input_1", TensorProto.FLOAT, ("N", 4))
    x = rng().normal(size=(6, 4)).astype(np.float32)
    ds = load(save(tmp_path, input_1=x, other=x[:, :2], labels=np.zeros(6, int)), [spec])
    np.testing.assert_array_equal(ds.inputs["input_1"], x)


def test_single_other_array_is_the_input(tmp_path):
    x = rng().normal(size=(6, 4)).astype(np.float32)
    ds = load(save(tmp_path, pixels=x, y=np.zeros(6, int)), [X])
    np.testing.assert_array_equal(ds.inputs["x"], x)


def test_explicit_keys(tmp_path):
    x = rng().normal(size=(6, 4)).astype(np.float32)
    p = save(tmp_path, a=x, b=x + 1, c=np.ones(6, int), d=np.zeros(6, int))
    ds = load(p, [X], x_key="b", y_key="c")
    np.testing.assert_array_equal(ds.inputs["x"], x + 1)
    assert (ds.labels == 1).all()


def test_ambiguous_keys_are_listed(tmp_path):
    x = rng().normal(size=(6, 4))
    with pytest.raises(DataError, match=r"keys: a, b, c"):
        load(save(tmp_path, a=x, b=x, c=x), [X])


def test_input_named_y_is_not_also_the_labels(tmp_path):
    spec = TensorSpec("y", TensorProto.FLOAT, ("N", 4))
    x = rng().normal(size=(6, 4)).astype(np.float32)
    ds = load(save(tmp_path, y=x), [spec])
    assert ds.labels is None
    ds = load(save(tmp_path, "l.npz", y=x, labels=np.ones(6, int)), [spec])
    assert (ds.labels == 1).all()


def test_y_key_naming_the_inputs_is_refused(tmp_path):
    x = rng().normal(size=(6, 4))
    with pytest.raises(DataError, match="names the array that holds the inputs"):
        load(save(tmp_path, x=x, y=np.zeros(6)), [X], y_key="x")


def test_no_labels_means_agreement(tmp_path):
    ds = load(save(tmp_path, x=rng().normal(size=(3, 4))), [X])
    assert ds.labels is None


def test_npy_inputs_only(tmp_path):
    p = tmp_path / "x.npy"
    np.save(p, rng().normal(size=(7, 4)))
    ds = load(p, [X])
    assert ds.samples == 7 and ds.labels is None and ds.sha256 and ds.path == str(p)


def test_multi_input_by_name(tmp_path):
    a = TensorSpec("a", TensorProto.FLOAT, ("N", 2))
    b = TensorSpec("b", TensorProto.INT64, ("N",))
    ds = load(save(tmp_path, a=np.ones((4, 2)), b=np.arange(4, dtype=np.int32), y=np.zeros(4, int)), [a, b])
    assert ds.inputs["a"].dtype == np.float32 and ds.inputs["b"].dtype == np.int64
    with pytest.raises(DataError, match=r"'b'.*keys: a, y.*inputs: a, b"):
        load(save(tmp_path, "m.npz", a=np.ones((4, 2)), y=np.zeros(4, int)), [a, b])


# --- what is refused ------------------------------------------------------------------------------------------------

def test_object_arrays_never_unpickled(tmp_path):
    obj = np.empty(3, dtype=object)
    obj[:] = [{"a": 1}, None, "x"]
    with pytest.raises(DataError, match="pickled"):
        load(save(tmp_path, x=obj), [X])


def test_int_data_for_float_input_is_refused_with_a_hint():
    with pytest.raises(DataError, match=r"expected float \[N, 4\], found uint8 \[2, 4\].*scale"):
        from_arrays(np.zeros((2, 4), np.uint8), None, [X])


def test_float_data_for_int_input_is_refused():
    spec = TensorSpec("ids", TensorProto.INT64, ("N", 5))
    with pytest.raises(DataError, match=r"expected int64 \[N, 5\], found float32 \[2, 5\]"):
        from_arrays(np.zeros((2, 5), np.float32), None, [spec])


def test_int_overflow_is_refused():
    spec = TensorSpec("ids", TensorProto.INT32, ("N",))
    with pytest.raises(DataError, match="do not fit int32"):
        from_arrays(np.array([1, 2**40]), None, [spec])


def test_float16_overflow_is_refused():
    spec = TensorSpec("x", TensorProto.FLOAT16, ("N", 4))
    x = np.ones((2, 4), np.float32)
    x[1, 1] = 1e6
    with pytest.raises(DataError, match="overflow float16"):
        from_arrays(x, None, [spec])


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nonfinite_inputs(value):
    x = np.ones((3, 4), np.float64)
    x[1, 2] = value
    with pytest.raises(DataError, match="1 NaN/Inf values"):
        from_arrays(x, None, [X])
    ds = from_arrays(x, None, [X], allow_nonfinite=True)
    assert not np.isfinite(ds.inputs["x"]).all()


def test_limit():
    ds = from_arrays(np.ones((10, 4)), np.arange(10) % 2, [X], limit=3)
    assert ds.samples == 3 and len(ds.labels) == 3
    with pytest.raises(DataError, match="--limit"):
        from_arrays(np.ones((10, 4)), None, [X], limit=0)


def test_labels_checked_after_limit_and_length():
    with pytest.raises(DataError, match="labels have 9 entries but the inputs have 10 samples"):
        from_arrays(np.ones((10, 4)), np.zeros(9, int), [X])


def test_multi_input_needs_a_dict():
    a, b = TensorSpec("a", TensorProto.FLOAT, ("N", 2)), TensorSpec("b", TensorProto.FLOAT, ("N", 2))
    with pytest.raises(DataError, match=r"2 inputs \(a, b\)"):
        from_arrays(np.ones((2, 2)), None, [a, b])


def test_batches_are_views():
    ds = from_arrays(np.arange(40, dtype=np.float32).reshape(10, 4), None, [X])
    got = list(ds.batches(4))
    assert [s for s, _ in got] == [0, 4, 8] and [len(b["x"]) for _, b in got] == [4, 4, 2]
    assert np.shares_memory(got[0][1]["x"], ds.inputs["x"])


# --- labels ---------------------------------------------------------------------------------------------------------

def test_label_forms():
    ids = np.array([0, 2, 1, 2])
    np.testing.assert_array_equal(to_class_ids(ids.astype(np.float32), 3), ids)
    np.testing.assert_array_equal(to_class_ids(ids[:, None], 3), ids)
    np.testing.assert_array_equal(to_class_ids(np.eye(3)[ids], 3), ids)
    np.testing.assert_array_equal(to_class_ids(np.eye(3, dtype=bool)[ids], 3), ids)
    np.testing.assert_array_equal(to_class_ids(np.array([True, False]), 2), [1, 0])
    assert to_class_ids(ids, None).dtype == np.int64


@pytest.mark.parametrize("labels, phrase", [
    (np.array([0, 3]), "out of range: found 0..3, the model has 3 classes"),
    (np.array([-1, 0]), "out of range"),
    (np.array([0.5, 1]), "whole class ids"),
    (np.array([np.nan, 1]), "whole class ids"),
    (np.array(["a", "b"]), "integer class ids"),
    (np.zeros((2, 3, 1)), "one-hot [N, C]"),
    (np.array([[1, 1, 0], [0, 1, 0]]), "not a single 1"),
    (np.array([[0, 0, 0], [0, 1, 0]]), "not a single 1"),
    (np.array([[0.9, 0.1, 0], [0, 1, 0]]), "not a single 1"),
    (np.eye(4)[[0, 1]], "4 columns, the model has 3 classes"),
    (np.zeros(0, int), "empty"),
])
def test_bad_labels(labels, phrase):
    with pytest.raises(DataError) as info:
        to_class_ids(labels, 3)
    assert phrase in str(info.value)


# --- property tests -------------------------------------------------------------------------------------------------

FLOAT_DTYPES = [np.float16, np.float32, np.float64]
INT_DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]


@st.composite
def model_and_data(draw):
    """A model input spec (rank 1-4, fixed or symbolic dims) and data that fits it."""
    rank = draw(st.integers(1, 4))
    batch_dim = draw(st.sampled_from(["N", None, 1]))
    dims, data_shape = [batch_dim], [draw(st.integers(1, 9))]
    for i in range(rank - 1):
        size = draw(st.integers(1, 5))
        kind = draw(st.sampled_from(["fixed", "symbolic", "unknown"]))
        dims.append(size if kind == "fixed" else (f"d{i}" if kind == "symbolic" else None))
        data_shape.append(size)
    elem = draw(st.sampled_from([TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16]))
    spec = TensorSpec(draw(st.sampled_from(["x", "input", "data_0", "gpu_0/data_0"])), elem, tuple(dims))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    seed = draw(st.integers(0, 2**16))
    x = np.random.default_rng(seed).normal(size=data_shape).astype(dtype)
    classes = draw(st.integers(2, 12))
    form = draw(st.sampled_from(["ids", "column", "one-hot", "float-ids", "none"]))
    ids = np.random.default_rng(seed + 1).integers(0, classes, data_shape[0])
    if form == "ids":
        labels = ids.astype(draw(st.sampled_from(INT_DTYPES)))
    elif form == "column":
        labels = ids[:, None].astype(draw(st.sampled_from(INT_DTYPES)))
    elif form == "one-hot":
        labels = np.eye(classes, dtype=draw(st.sampled_from([np.float32, np.int64, np.uint8, bool])))[ids]
    elif form == "float-ids":
        labels = ids.astype(np.float64)
    else:
        labels = None
    return spec, x, labels, ids, classes


@PROPERTY
@given(model_and_data(), st.sampled_from(["arrays", "npz", "npz-compressed", "npy-folder"]))
def test_anything_the_model_accepts_loads(case, form):
    spec, x, labels, ids, classes = case
    if form == "arrays":
        check_loaded(from_arrays({spec.name: x}, labels, [spec], num_classes=classes), spec, x, labels, ids)
        return
    with tempfile.TemporaryDirectory() as tmp:  # file-backed columns read the files when sliced
        arrays = {"x" if spec.name != "x" else "inputs": x}
        if labels is not None:
            arrays["labels"] = labels
        if form == "npy-folder":
            for key, a in arrays.items():
                np.save(Path(tmp) / f"{key}.npy", a)
            p = Path(tmp)
        else:
            p = Path(tmp) / "d.npz"
            (np.savez_compressed if form == "npz-compressed" else np.savez)(p, **arrays)
        check_loaded(load(p, [spec], num_classes=classes), spec, x, labels, ids)


def check_loaded(ds, spec, x, labels, ids):
    column = ds.inputs[spec.name]
    assert column.shape == x.shape and column.dtype == spec.dtype  # cast to what the model takes
    got = column[:]
    assert isinstance(got, np.ndarray) and got.flags.c_contiguous and got.dtype == spec.dtype
    tol = 1e-2 if spec.elem_type == TensorProto.BFLOAT16 or x.dtype == np.float16 or \
        spec.elem_type == TensorProto.FLOAT16 else 1e-6
    np.testing.assert_allclose(got.astype(np.float64), x.astype(np.float64), rtol=tol, atol=tol)
    if labels is None:
        assert ds.labels is None
    else:
        assert ds.labels.dtype == np.int64
        np.testing.assert_array_equal(ds.labels, ids)


@st.composite
def mismatch(draw):
    """A spec and data that differ in exactly one way: a fixed dim, the rank or the dtype kind."""
    rank = draw(st.integers(2, 4))
    shape = tuple(draw(st.integers(1, 5)) for _ in range(rank - 1))
    spec = TensorSpec("x", TensorProto.FLOAT, ("N", *shape))
    n = draw(st.integers(1, 6))
    how = draw(st.sampled_from(["dim", "rank+", "rank-", "dtype"]))
    data_shape = [n, *shape]
    dtype = np.float32
    if how == "dim":
        i = draw(st.integers(1, rank - 1))
        data_shape[i] += draw(st.integers(1, 3))
    elif how == "rank+":
        data_shape.append(1)
    elif how == "rank-":
        data_shape.pop()
    else:
        dtype = draw(st.sampled_from([np.int32, np.uint8, np.complex64, np.str_, np.bool_]))
    x = np.zeros(data_shape, dtype=dtype)
    return spec, x


@PROPERTY
@given(mismatch())
def test_mismatches_are_refused_naming_expected_and_found(case):
    spec, x = case
    with pytest.raises(DataError) as info:
        from_arrays(x, None, [spec])
    msg = str(info.value)
    assert f"expected {spec.describe()}" in msg, msg
    assert f"found {x.dtype} [{', '.join(map(str, x.shape))}]" in msg, msg


@PROPERTY
@given(st.integers(2, 10), st.integers(1, 20), st.sampled_from(INT_DTYPES))
def test_labels_in_range_load_and_out_of_range_are_refused(classes, n, dtype):
    ids = np.arange(n) % classes
    np.testing.assert_array_equal(to_class_ids(ids.astype(dtype), classes), ids)
    bad = ids.copy()
    bad[-1] = classes + (n % 3)
    if np.iinfo(dtype).max >= bad.max():
        with pytest.raises(DataError, match="out of range"):
            to_class_ids(bad.astype(dtype), classes)


def test_bfloat16_target_dtype():
    spec = TensorSpec("x", TensorProto.BFLOAT16, ("N", 2))
    ds = from_arrays(np.array([[1.0, 2.5], [3.0, -1.0]], np.float32), None, [spec])
    assert ds.inputs["x"].dtype == np.dtype(ml_dtypes.bfloat16)
