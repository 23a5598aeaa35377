"""Load validation data safely and check it against the model's inputs.

.npz files hold inputs and (optionally) labels; .npy files hold the inputs of a single-input model. Files are read
with allow_pickle=False: object arrays are refused, never unpickled.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from walkaudit._loading.model import TensorSpec
from walkaudit.errors import DataError

X_KEYS = ("x", "X", "inputs", "input", "images", "image", "data", "features", "x_val", "x_test")
Y_KEYS = ("y", "Y", "labels", "label", "targets", "target", "y_val", "y_test")


@dataclass
class Dataset:
    """Model inputs by name ([N, ...] each) and class ids (or None: agreement with the clean model)."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    path: str | None = None
    sha256: str | None = None

    @property
    def samples(self) -> int:
        return len(next(iter(self.inputs.values())))

    def batches(self, size: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """(start, inputs) for consecutive slices of at most `size` samples (views, no copies)."""
        for start in range(0, self.samples, size):
            yield start, {k: v[start : start + size] for k, v in self.inputs.items()}


_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip with members, an empty zip


def _kind_of(path: Path) -> str:
    """What the file really holds, by its first bytes: 'npy', 'npz', 'pickle' or 'other'. Names can lie."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(_NPY_MAGIC):
        return "npy"
    if head.startswith(_ZIP_MAGIC):
        return "npz"
    if head[:1] == b"\x80" and 2 <= (head[1:2] or b"\0")[0] <= 5:  # pickle protocols 2..5
        return "pickle"
    return "other"


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    """Arrays by key ('' for an .npy file). Never unpickles: allow_pickle=False everywhere."""
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if not path.is_file():
        raise DataError(f"data path is not a file: {path}")
    suffix = path.suffix.lower()
    if suffix not in (".npz", ".npy"):
        raise DataError(f"data file must be .npz or .npy, got {path.name}")
    try:
        kind = _kind_of(path)
    except OSError as exc:
        raise DataError(f"cannot read {path.name}: {exc.strerror}") from None
    if kind == "pickle":
        raise DataError(f"{path.name} holds pickled data; walkaudit refuses to load it (save arrays with "
                        "numpy.savez instead)")
    if kind == "other":
        raise DataError(f"{path.name} is not a {suffix} file: it starts with neither the .npy nor the .npz "
                        "(zip) signature")
    try:
        if kind == "npy":
            return {"": np.load(path, allow_pickle=False)}
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except ValueError as exc:
        if "pickle" in str(exc).lower() or "object" in str(exc).lower():
            raise DataError(f"{path.name} holds pickled object arrays; walkaudit refuses to load them") from None
        raise DataError(f"{path.name} is not a readable {suffix} file: {_line(exc)}") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError, RuntimeError, MemoryError) as exc:
        raise DataError(f"{path.name} is not a readable {suffix} file: {type(exc).__name__}: {_line(exc)}") from None
    odd = [k for k, v in arrays.items() if not isinstance(v, np.ndarray)]
    if odd:
        raise DataError(f"{path.name}: member {odd[0]!r} of the archive is not a numpy array")
    return arrays


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def _pick(arrays: dict[str, np.ndarray], wanted: str | None, choices: tuple[str, ...], what: str,
          all_keys: str | None = None) -> str | None:
    if wanted is not None:
        if wanted not in arrays:
            keys = all_keys if all_keys is not None else ", ".join(arrays) or "none"
            raise DataError(f"{what} key {wanted!r} not in the data file (keys: {keys})")
        return wanted
    return next((k for k in choices if k in arrays), None)


def load(
    path,
    model_inputs: list[TensorSpec],
    *,
    x_key: str | None = None,
    y_key: str | None = None,
    limit: int | None = None,
    num_classes: int | None = None,
    allow_nonfinite: bool = False,
) -> Dataset:
    """Read a .npz/.npy file into a checked Dataset.

    Inputs: a single-input model reads --x-key, else the array named like its input, else a usual name (x, images,
    ...), else the one array that is not the labels. A multi-input model reads one array per input, named like the
    input. Labels: --y-key, else a usual name (y, labels, ...) among the arrays not used as inputs; none means
    agreement with the clean model's predictions.
    """
    path = Path(path)
    arrays = _read_arrays(path)
    keys = ", ".join(arrays) or "none"
    if "" in arrays:  # .npy: inputs only
        if len(model_inputs) != 1:
            names = ", ".join(s.name for s in model_inputs)
            raise DataError(f"a .npy file feeds one input, but the model has {len(model_inputs)} ({names}); "
                            "use an .npz with one array per input")
        if y_key is not None:
            raise DataError(f"--y-key {y_key!r}: a .npy file holds inputs only; use an .npz for labels")
        inputs, used = {model_inputs[0].name: arrays[""]}, {""}
    elif len(model_inputs) == 1 and (x_key is not None or model_inputs[0].name not in arrays):
        x_name = _pick(arrays, x_key, X_KEYS, "input")
        if x_name is None:
            y_guess = _pick(arrays, y_key, Y_KEYS, "label")
            rest = [k for k in arrays if k != y_guess]
            if len(rest) != 1:
                raise DataError(f"cannot tell which array holds the inputs (keys: {keys}); use --x-key "
                                f"(the model's input is {model_inputs[0].name!r})")
            x_name = rest[0]
        inputs, used = {model_inputs[0].name: arrays[x_name]}, {x_name}
    else:
        missing = [s.name for s in model_inputs if s.name not in arrays]
        if missing:
            want = ", ".join(s.name for s in model_inputs)
            raise DataError(f"no array named like model input {missing[0]!r} in the data file (keys: {keys}; "
                            f"the model's inputs: {want})")
        inputs, used = {s.name: arrays[s.name] for s in model_inputs}, {s.name for s in model_inputs}
    if y_key is not None and y_key in used:
        raise DataError(f"--y-key {y_key!r} names the array that holds the inputs")
    rest = {k: v for k, v in arrays.items() if k not in used}
    y_name = None if "" in arrays else _pick(rest, y_key, Y_KEYS, "label", all_keys=keys)
    labels = arrays[y_name] if y_name is not None else None
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return from_arrays(inputs, labels, model_inputs, limit=limit, num_classes=num_classes,
                       allow_nonfinite=allow_nonfinite, path=str(path), sha256=sha)


def from_arrays(
    inputs,
    labels,
    model_inputs: list[TensorSpec],
    *,
    limit: int | None = None,
    num_classes: int | None = None,
    allow_nonfinite: bool = False,
    path: str | None = None,
    sha256: str | None = None,
) -> Dataset:
    """Check arrays against the model's inputs (shape, dtype, finiteness) and the labels against the classes."""
    if not isinstance(inputs, dict):
        if len(model_inputs) != 1:
            names = ", ".join(s.name for s in model_inputs)
            raise DataError(f"the model has {len(model_inputs)} inputs ({names}): pass a dict of arrays by name")
        inputs = {model_inputs[0].name: inputs}
    checked = {}
    for spec in model_inputs:
        if spec.name not in inputs:
            raise DataError(f"no data for model input {spec.name!r}")
        checked[spec.name] = _check_input(np.asarray(inputs[spec.name]), spec, allow_nonfinite)
    counts = {len(a) for a in checked.values()}
    if len(counts) != 1:
        raise DataError(f"inputs have different numbers of samples: {sorted(counts)}")
    n = counts.pop()
    if limit is not None:
        if limit < 1:
            raise DataError(f"--limit must be at least 1, got {limit}")
        checked = {k: v[:limit] for k, v in checked.items()}
        n = min(n, limit)
    if labels is not None:
        labels = to_class_ids(np.asarray(labels), num_classes)
        if limit is not None:
            labels = labels[:limit]
        if len(labels) != n:
            raise DataError(f"labels have {len(labels)} entries but the inputs have {n} samples")
    return Dataset(checked, labels, path, sha256)


def _describe(a: np.ndarray) -> str:
    return f"{a.dtype} [{', '.join(map(str, a.shape))}]"


def _is_float(dtype: np.dtype) -> bool:
    """numpy floats and the ml_dtypes ones onnx uses (bfloat16, float8 ...), whose numpy kind is 'V'."""
    return dtype.kind == "f" or dtype.name.startswith(("bfloat16", "float8", "float4"))


def _check_input(a: np.ndarray, spec: TensorSpec, allow_nonfinite: bool) -> np.ndarray:
    want = spec.describe()
    if a.dtype == object:
        raise DataError(f"input {spec.name!r}: object arrays are not accepted (expected {want})")
    if a.size == 0 or a.ndim == 0:
        raise DataError(f"input {spec.name!r} is empty: expected {want}, found {_describe(a)}")
    if spec.shape is not None:
        dims = spec.shape[1:]
        if a.ndim != len(spec.shape) or any(isinstance(d, int) and d != s for d, s in zip(dims, a.shape[1:])):
            raise DataError(f"input {spec.name!r}: expected {want}, found {_describe(a)}")
    try:
        target = spec.dtype
    except Exception:  # an element type numpy cannot hold
        raise DataError(f"input {spec.name!r}: walkaudit cannot feed {want} inputs") from None
    if a.dtype != target:
        if _is_float(target):
            same_kind = _is_float(a.dtype)
        else:
            same_kind = a.dtype.kind == target.kind or (a.dtype.kind in "iub" and target.kind in "iu")
        if not same_kind:
            hint = " (convert and scale it to float yourself)" if _is_float(target) and a.dtype.kind in "iub" else ""
            raise DataError(f"input {spec.name!r}: expected {want}, found {_describe(a)}{hint}")
        if not allow_nonfinite and _is_float(a.dtype) and not np.isfinite(a).all():
            bad = int((~np.isfinite(a)).sum())
            raise DataError(f"input {spec.name!r} holds {bad} NaN/Inf values (use --allow-nonfinite to accept them)")
        with np.errstate(over="ignore", invalid="ignore"):
            cast = a.astype(target)
        if _is_float(target) and not allow_nonfinite and not np.isfinite(cast).all():
            bad = int((~np.isfinite(cast)).sum())
            raise DataError(f"input {spec.name!r}: {bad} values overflow {target.name} when cast from {a.dtype} "
                            f"(largest |value| {float(np.abs(a).max()):.3g})")
        if target.kind in "iu" and not np.array_equal(cast, a):
            raise DataError(f"input {spec.name!r}: values do not fit {target.name} (found {a.dtype})")
        a = cast
    if _is_float(a.dtype) and not allow_nonfinite and not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).sum())
        raise DataError(f"input {spec.name!r} holds {bad} NaN/Inf values (use --allow-nonfinite to accept them)")
    return np.ascontiguousarray(a)


def to_class_ids(labels: np.ndarray, num_classes: int | None) -> np.ndarray:
    """Class ids [N] from ids or one-hot [N, C]; checks range and one-hotness."""
    if labels.dtype == object:
        raise DataError("labels: object arrays are not accepted")
    if labels.ndim == 2 and labels.shape[1] > 1:
        hot = labels == 1
        if not ((labels == 0) | hot).all() or not (hot.sum(axis=1) == 1).all():
            raise DataError("labels look one-hot ([N, C]) but some rows are not a single 1 among 0s")
        if num_classes is not None and labels.shape[1] != num_classes:
            raise DataError(f"one-hot labels have {labels.shape[1]} columns, the model has {num_classes} classes")
        return hot.argmax(axis=1).astype(np.int64)
    if labels.ndim == 2:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise DataError(f"labels must be class ids [N] or one-hot [N, C], found shape {list(labels.shape)}")
    if labels.size == 0:
        raise DataError("labels are empty")
    if labels.dtype.kind == "f":
        if not np.isfinite(labels).all() or not (labels == np.round(labels)).all():
            raise DataError("labels must be whole class ids; found fractional or NaN values")
    elif labels.dtype.kind not in "iub":
        raise DataError(f"labels must be integer class ids, found dtype {labels.dtype}")
    ids = labels.astype(np.int64)
    top = num_classes - 1 if num_classes else None
    if ids.min() < 0 or (top is not None and ids.max() > top):
        raise DataError(f"labels out of range: found {ids.min()}..{ids.max()}, the model has {num_classes} classes")
    return ids
