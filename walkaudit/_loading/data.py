"""Load validation data safely and check it against the model's inputs, in memory bounded by the batch.

.npz files hold inputs and (optionally) labels; .npy files hold the inputs of a single-input model; a folder holds
.npz shards (read as one data set, in name order) or one .npy file per array (x.npy, y.npy). Files are never
unpickled: object arrays are refused from their headers.

Inputs read from files are `Column`s, not arrays: only the headers are read when loading, and a slice
`column[start:stop]` reads just those rows (memory-mapped from an .npy file or an uncompressed .npz member, a window
at a time; a compressed member is decompressed once, when first used, to an anonymous temporary file). Every check
(finiteness, casts, integer ranges) and the sha256 stream over the data a few MB at a time. Labels are small and
are read into memory.
"""

from __future__ import annotations

import bisect
import hashlib
import mmap
import os
import struct
import tempfile
import threading
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.lib.format as npy_format

from walkaudit._loading.model import TensorSpec
from walkaudit._units import UNSCORED
from walkaudit.errors import DataError, UsageError, option

X_KEYS = ("x", "X", "inputs", "input", "images", "image", "data", "features", "x_val", "x_test")
Y_KEYS = ("y", "Y", "labels", "label", "targets", "target", "y_val", "y_test")
#: The model input read as the attention mask of a per-token output unless one is named.
MASK_INPUT = "attention_mask"
#: The label of a position that is not scored, unless another is named (Hugging Face's).
IGNORE_LABEL = -100

#: bytes per step when hashing, checking, decompressing and copying
CHUNK = 4 << 20


@dataclass
class Dataset:
    """Model inputs by name ([N, ...] each: numpy arrays or `Column`s, both sliced as `a[start:stop]`) and class ids
    (or None: agreement with the clean model).

    For a per-token class output the labels are [N, T], UNSCORED where a position is not scored (the ignore label,
    or a zero of the attention mask), and `scored` [N, T] marks the scored positions (None: every position, when
    there are neither labels nor a mask)."""

    inputs: dict[str, np.ndarray | Column]
    labels: np.ndarray | None
    path: str | None = None
    sha256: str | None = None
    scored: np.ndarray | None = None
    mask: str | None = None  # the model input read as the attention mask

    @property
    def samples(self) -> int:
        return len(next(iter(self.inputs.values())))

    def batches(self, size: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """(start, inputs) for consecutive slices of at most `size` samples (views of in-memory arrays)."""
        for start in range(0, self.samples, size):
            yield start, {k: v[start : start + size] for k, v in self.inputs.items()}


#: `range_warning` looks at this many samples (the first ones) of each input
RANGE_SAMPLES = 1024
#: whole-number float inputs above this look like raw pixel values (0..255) instead of normalised ones
RAW_PIXELS_ABOVE = 50


def range_warning(dataset: Dataset) -> str | None:
    """A warning when a float input looks unnormalised, else None.

    The heuristic (docs/data.md): among the first RANGE_SAMPLES samples, a float input whose finite values are all
    whole numbers with a maximum above RAW_PIXELS_ABOVE looks like images stored as 0–255 floats, while almost every
    model is trained on scaled input (0–1, or mean/std normalised: values of a few units). Integer inputs (token ids)
    and small whole numbers (the 0..16 pixels of the digits sample, whose scaler is inside the model) are left alone.
    An image batch (rank 4) of non-negative values up to 255 with a maximum above RAW_PIXELS_ABOVE is warned of
    too, whole numbers or not (resized images are not).
    """
    for name, values in dataset.inputs.items():
        head = np.asarray(values[:RANGE_SAMPLES])
        if not _is_float(head.dtype) or head.size == 0:
            continue
        images = head.ndim == 4
        head = head.astype(np.float64)[np.isfinite(head.astype(np.float64))]
        if head.size == 0:
            continue
        low, high = float(head.min()), float(head.max())
        if high <= RAW_PIXELS_ABOVE:
            continue
        if np.all(head == np.round(head)):
            return (f"input {name!r} holds whole numbers {low:g}..{high:g}: raw pixel values? Most models expect "
                    "scaled input (0..1 or mean/std normalised); scale it as the model was trained, or the σ50 "
                    "values mean little")
        if images and low >= 0 and high <= 255.5:
            return (f"input {name!r} holds images with values {low:.3g}..{high:.3g}: pixels on a 0..255 scale? "
                    "Most models expect scaled input (0..1 or mean/std normalised); scale it as the model was "
                    "trained, or the σ50 values mean little")
    return None


# --- where the bytes are ---------------------------------------------------------------------------------------------

def _map(fd: int, offset: int, dtype: np.dtype, count: int) -> np.ndarray:
    """`count` items of `dtype` at `offset` of an open file, memory-mapped read-only (only that window)."""
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    m = mmap.mmap(fd, offset - start + count * dtype.itemsize, access=mmap.ACCESS_READ, offset=start)
    return np.frombuffer(m, dtype, count, offset=offset - start)  # the array keeps the map alive


class _Spill:
    """An anonymous temporary file that compressed members are decompressed into, each at its own offset."""

    def __init__(self):
        self._file = None
        self._end = 0
        self._lock = threading.Lock()

    def reserve(self, nbytes: int) -> int:
        with self._lock:
            if self._file is None:
                self._file = tempfile.TemporaryFile(prefix="walkaudit-")
            offset, self._end = self._end, self._end + nbytes
            os.ftruncate(self._file.fileno(), self._end)
            return offset

    @property
    def fd(self) -> int:
        if self._file is None:
            raise RuntimeError("the spill file holds nothing yet (reserve() first)")
        return self._file.fileno()


class _Raw:
    """An array stored raw at `offset` of a file (an .npy file, a stored .npz member) or of a spill."""

    def __init__(self, name: str, source: Path | _Spill, offset: int, shape: tuple, dtype: np.dtype, fortran: bool):
        self.name, self.source, self.offset = name, source, offset
        self.shape, self.dtype, self.fortran = shape, dtype, fortran
        self.row_items = int(np.prod(shape[1:], dtype=np.int64)) if shape else 1
        self.nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        self._whole: np.ndarray | None = None

    def _mapped(self, offset: int, count: int) -> np.ndarray:
        if isinstance(self.source, _Spill):
            return _map(self.source.fd, offset, self.dtype, count)
        try:
            with open(self.source, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < self.offset + self.nbytes:  # a map past the end would die of SIGBUS on first touch
                    raise DataError(f"{self.name} changed while walkaudit read it (now {size} bytes)")
                return _map(f.fileno(), offset, self.dtype, count)
        except OSError as exc:
            raise DataError(f"cannot read {self.name}: {exc.strerror or exc}") from None

    def rows(self, a: int, b: int) -> np.ndarray:
        tail = self.shape[1:]
        if b <= a or self.row_items == 0:
            return np.empty((max(b - a, 0), *tail), self.dtype)
        if self.fortran:  # rows are not contiguous: map the whole array once
            if self._whole is None:
                flat = self._mapped(self.offset, self.nbytes // self.dtype.itemsize)
                self._whole = flat.reshape(self.shape, order="F")
            return np.ascontiguousarray(self._whole[a:b])
        offset = self.offset + a * self.row_items * self.dtype.itemsize
        return self._mapped(offset, (b - a) * self.row_items).reshape((b - a, *tail))


class _Deflated:
    """A compressed .npz member: decompressed once, when first read, into the spill file (and mapped from there)."""

    def __init__(self, name: str, zpath: Path, member: str, header: int, shape: tuple, dtype: np.dtype,
                 fortran: bool, spill: _Spill):
        self.name, self.zpath, self.member, self.header = name, zpath, member, header
        self.shape, self.dtype, self.fortran, self.spill = shape, dtype, fortran, spill
        self.nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        self._raw: _Raw | None = None
        self._lock = threading.Lock()

    def _stream(self, write) -> None:
        """Decompress the member's array bytes through `write(done, chunk)`; the CRC is checked at the end."""
        try:
            with zipfile.ZipFile(self.zpath) as z, z.open(self.member) as s:
                skip = self.header
                while skip:
                    got = s.read(min(skip, CHUNK))
                    if not got:
                        break
                    skip -= len(got)
                done = 0
                while done < self.nbytes:
                    chunk = s.read(min(CHUNK, self.nbytes - done))
                    if not chunk:
                        raise DataError(f"{self.name} is not a readable .npz file: the member ends after {done} of "
                                        f"its {self.nbytes} bytes of array data")
                    write(done, chunk)
                    done += len(chunk)
                if s.read(1):
                    raise DataError(f"{self.name} is not a readable .npz file: the member holds more bytes than "
                                    "its header says")
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError, RuntimeError) as exc:
            raise DataError(f"{self.name} is not a readable .npz file: {type(exc).__name__}: {_line(exc)}") from None

    def prepare(self) -> None:
        with self._lock:
            if self._raw is None:
                offset = self.spill.reserve(self.nbytes)
                self._stream(lambda done, chunk: os.pwrite(self.spill.fd, chunk, offset + done))
                self._raw = _Raw(self.name, self.spill, offset, self.shape, self.dtype, self.fortran)

    def rows(self, a: int, b: int) -> np.ndarray:
        if self._raw is None and a == 0 and (not self.shape or b >= self.shape[0]) and self.nbytes <= 16 * CHUNK:
            out = np.empty(self.nbytes, np.uint8)  # read whole (labels): no spill
            self._stream(lambda done, chunk: out.__setitem__(slice(done, done + len(chunk)),
                                                             np.frombuffer(chunk, np.uint8)))
            order: Literal["C", "F"] = "F" if self.fortran else "C"
            return np.ascontiguousarray(out.view(self.dtype).reshape(self.shape, order=order))
        self.prepare()
        assert self._raw is not None  # prepare() sets it
        return self._raw.rows(a, b)


class _InMemory:
    """An array already in memory (a 0-d archive member, for one)."""

    def __init__(self, name: str, array: np.ndarray):
        self.name, self.array, self.shape, self.dtype = name, array, array.shape, array.dtype

    def rows(self, a: int, b: int) -> np.ndarray:
        return self.array[a:b]


#: one array of a data file, read when used
_Part = _Raw | _Deflated | _InMemory


def _as_array(a: np.ndarray) -> np.ndarray:
    return a


class Column:
    """One input's samples [N, ...] over one or more parts (files, archive members), read a slice at a time.

    Behaves like a read-only array for what walkaudit needs: `len`, `shape`, `dtype`, `ndim`, `size`, `nbytes`,
    `column[start:stop]` (a C-contiguous numpy array of `dtype`: the stored values, cast when the model takes another
    type) and `np.asarray(column)` (everything, in memory). Pickled, it travels as the array it holds.
    """

    def __init__(self, parts, dtype: np.dtype | None = None, stop: int | None = None):
        self._parts = tuple(parts)
        first = self._parts[0]
        self.raw_dtype = first.dtype
        self.dtype = np.dtype(dtype) if dtype is not None else first.dtype
        if not first.shape:  # a 0-d member: no samples (refused by the checks)
            self._starts, self.shape = [0, 0], ()
            return
        self._starts = [0]
        for p in self._parts:
            self._starts.append(self._starts[-1] + p.shape[0])
        n = self._starts[-1] if stop is None else min(stop, self._starts[-1])
        self.shape = (n, *first.shape[1:])

    @property
    def files(self) -> list[str]:
        return [p.name for p in self._parts]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d column")
        return self.shape[0]

    def __repr__(self) -> str:
        return f"Column({_describe(self)} from {len(self._parts)} part(s))"

    def head(self, n: int) -> Column:
        return Column(self._parts, self.dtype, min(n, len(self)))

    def cast(self, dtype: np.dtype) -> Column:
        return Column(self._parts, dtype, len(self))

    def prepare(self) -> None:
        """Decompress what is compressed now (to the spill file), so that reading errors come up front."""
        for p in self._parts:
            if isinstance(p, _Deflated):
                p.prepare()

    def rows(self, a: int, b: int, cast: bool = True) -> np.ndarray:
        """Rows [a, b) (0 <= a <= b <= len), as stored (cast=False) or as `dtype`."""
        tail = self.shape[1:]
        if b <= a:
            return np.empty((0, *tail), self.dtype if cast else self.raw_dtype)
        i = bisect.bisect_right(self._starts, a) - 1
        pieces = []
        while a < b:
            lo, hi = self._starts[i], self._starts[i + 1]
            pieces.append(self._parts[i].rows(a - lo, min(b, hi) - lo))
            a = max(a, min(b, hi))
            i += 1
        out = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        if cast and out.dtype != self.dtype:
            with np.errstate(over="ignore", invalid="ignore"):
                out = out.astype(self.dtype)
        return out

    def chunks(self, cast: bool = False) -> Iterator[np.ndarray]:
        """The rows a few MB at a time, as stored (default) or cast."""
        yield from _row_chunks(len(self), self.raw_dtype.itemsize * int(np.prod(self.shape[1:], dtype=np.int64)),
                               lambda a, b: self.rows(a, b, cast))

    def __getitem__(self, key):
        if isinstance(key, tuple):
            head, rest = (key[0], key[1:]) if key else (slice(None), ())
            out = self[head]
            return out[(slice(None),) + rest] if isinstance(head, slice) else out[rest]
        if isinstance(key, slice):
            r = range(len(self))[key]
            if not r:
                return self.rows(0, 0)
            lo, hi = min(r[0], r[-1]), max(r[0], r[-1]) + 1
            out = self.rows(lo, hi)
            return out if r.step == 1 else out[r.start - lo :: r.step]
        if isinstance(key, (int, np.integer)):
            i = range(len(self))[key]
            return self.rows(i, i + 1)[0]
        raise TypeError(f"a data column is read by slices or single indices, not {type(key).__name__}")

    def __array__(self, dtype=None, copy=None):
        out = self.rows(0, len(self)) if self.shape else np.empty((), self.dtype)
        return out if dtype is None else out.astype(dtype, copy=False)

    def __reduce__(self):
        return _as_array, (np.asarray(self),)


def _row_chunks(n: int, row_bytes: int, read) -> Iterator[np.ndarray]:
    step = max(1, CHUNK // max(1, row_bytes))
    for a in range(0, n, step):
        yield read(a, min(n, a + step))


# --- reading files and folders ---------------------------------------------------------------------------------------

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


def _header(f) -> tuple[tuple, bool, np.dtype]:
    """(shape, fortran order, dtype) from an .npy header (ValueError when it is not one). Never unpickles."""
    version = npy_format.read_magic(f)
    if version == (1, 0):
        return npy_format.read_array_header_1_0(f)
    if version == (2, 0):
        return npy_format.read_array_header_2_0(f)
    try:  # 3.0: utf-8 field names
        from numpy.lib._format_impl import _read_array_header  # type: ignore[attr-defined]  # private, no stub
    except ImportError:  # numpy < 2
        from numpy.lib.format import _read_array_header  # type: ignore[attr-defined]
    return _read_array_header(f, version)


def _refuse_objects(name: str, dtype: np.dtype) -> None:
    if dtype.hasobject:
        raise DataError(f"{name} holds pickled object arrays; walkaudit refuses to load them")


def _npy_part(path: Path, name: str) -> _Raw:
    try:
        with open(path, "rb") as f:
            shape, fortran, dtype = _header(f)
            offset = f.tell()
            size = os.fstat(f.fileno()).st_size
    except ValueError as exc:
        raise DataError(f"{name} is not a readable .npy file: {_line(exc)}") from None
    except (OSError, EOFError) as exc:
        raise DataError(f"{name} is not a readable .npy file: {type(exc).__name__}: {_line(exc)}") from None
    _refuse_objects(name, dtype)
    part = _Raw(name, path, offset, tuple(shape), dtype, fortran)
    if size - offset < part.nbytes:
        raise DataError(f"{name} is not a readable .npy file: it holds {size - offset} bytes of array data, its "
                        f"header promises {part.nbytes}")
    return part


def _npz_parts(path: Path, name: str, spill: _Spill) -> dict[str, _Part]:
    """Every member's header (its array is read only when used): stored members are mapped in place."""
    parts: dict[str, _Part] = {}
    try:
        with zipfile.ZipFile(path) as z, open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            for info in z.infolist():
                key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                if info.is_dir():
                    continue
                if not info.filename.endswith(".npy"):
                    raise DataError(f"{name}: member {key!r} of the archive is not a numpy array")
                if info.flag_bits & 0x1:
                    raise DataError(f"{name}: member {key!r} of the archive is encrypted")
                try:
                    if info.compress_type == zipfile.ZIP_STORED:
                        f.seek(info.header_offset)
                        local = f.read(30)
                        if len(local) < 30 or local[:4] != b"PK\x03\x04":
                            raise zipfile.BadZipFile(f"bad local header for member {key!r}")
                        start = info.header_offset + 30 + sum(struct.unpack("<HH", local[26:30]))
                        f.seek(start)
                        shape, fortran, dtype = _header(f)
                        header = f.tell() - start
                    else:
                        with z.open(info) as s:
                            shape, fortran, dtype = _header(s)
                            header = s.tell()
                except ValueError:  # not the .npy magic or header: numpy's own reader gives such members as bytes
                    raise DataError(f"{name}: member {key!r} of the archive is not a numpy array") from None
                member = f"{name}:{key}"
                _refuse_objects(name, dtype)
                shape = tuple(shape)
                nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                if header + nbytes > info.file_size:
                    raise DataError(f"{name} is not a readable .npz file: member {key!r} holds "
                                    f"{info.file_size - header} bytes of array data, its header promises {nbytes}")
                part: _Raw | _Deflated
                if info.compress_type == zipfile.ZIP_STORED:
                    if start + header + nbytes > size:
                        raise DataError(f"{name} is not a readable .npz file: member {key!r} is truncated")
                    part = _Raw(member, path, start + header, shape, dtype, fortran)
                else:
                    part = _Deflated(member, path, info.filename, header, shape, dtype, fortran, spill)
                parts[key] = part if shape else _InMemory(member, np.array(part.rows(0, 1).reshape(())))
    except DataError:
        raise
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError, RuntimeError, NotImplementedError) as exc:
        raise DataError(f"{name} is not a readable .npz file: {type(exc).__name__}: {_line(exc)}") from None
    return parts


def _file_parts(path: Path, name: str, spill: _Spill, suffix: str | None = None) -> dict[str, _Part]:
    """The parts of one file by key ('' for an .npy file), from headers only. Never unpickles."""
    suffix = suffix or path.suffix.lower()
    try:
        kind = _kind_of(path)
    except OSError as exc:
        raise DataError(f"cannot read {name}: {exc.strerror}") from None
    if kind == "pickle":
        raise DataError(f"{name} holds pickled data; walkaudit refuses to load it (save arrays with "
                        "numpy.savez instead)")
    if kind == "other":
        raise DataError(f"{name} is not a {suffix} file: it starts with neither the .npy nor the .npz "
                        "(zip) signature")
    if kind == "npy":
        part = _npy_part(path, name)
        if not part.shape:
            return {"": _InMemory(name, np.array(part.rows(0, 1).reshape(())))}
        return {"": part}
    return _npz_parts(path, name, spill)


def data_files(folder: Path) -> list[Path]:
    """The data files of a folder, in the order they are read and hashed: its .npz and .npy files, by name (hidden
    files, other files and subfolders are ignored)."""
    return sorted((p for p in folder.iterdir()
                   if p.suffix.lower() in (".npz", ".npy") and not p.name.startswith(".") and p.is_file()),
                  key=lambda p: p.name)


def _folder_columns(folder: Path, spill: _Spill) -> dict[str, Column]:
    try:
        files = data_files(folder)
    except OSError as exc:
        raise DataError(f"cannot read the data folder {folder}: {exc.strerror or exc}") from None
    if not files:
        raise DataError(f"data path {folder} is a directory without .npz or .npy files (a data folder holds .npz "
                        "shards such as part-0000.npz, or one .npy file per array such as x.npy and y.npy)")
    here = folder.name or str(folder)
    npz = [p for p in files if p.suffix.lower() == ".npz"]
    if npz and len(npz) != len(files):
        raise DataError(f"data folder {here} mixes .npz and .npy files: use .npz shards (part-0000.npz, ...) or "
                        "one .npy file per array (x.npy, y.npy)")
    if not npz:  # one array per file, named by the file
        columns = {}
        for p in files:
            part = _file_parts(p, f"{here}/{p.name}", spill)
            if "" not in part:
                raise DataError(f"{here}/{p.name} is not a .npy file: it is an .npz archive (a data folder holds "
                                ".npz shards or .npy arrays, not both)")
            columns[p.stem] = Column([part[""]])
        return columns
    shards = [(f"{here}/{p.name}", _file_parts(p, f"{here}/{p.name}", spill, ".npz")) for p in npz]
    first_name, first = shards[0]
    if "" in first:
        raise DataError(f"{first_name} is not a .npz file: it holds a single .npy array")
    keys = list(first)
    for name, parts in shards[1:]:
        if "" in parts:
            raise DataError(f"{name} is not a .npz file: it holds a single .npy array")
        if set(parts) != set(keys):
            raise DataError(f"{name} holds keys {', '.join(parts) or 'none'}; {first_name} holds "
                            f"{', '.join(keys) or 'none'} (every shard needs the same keys)")
    columns = {}
    for key in keys:
        ref = first[key]
        for name, parts in shards[1:]:
            other = parts[key]
            if not ref.shape or not other.shape:
                raise DataError(f"{name if not other.shape else first_name}: {key!r} is a scalar; shards hold arrays "
                                "[N, ...]")
            if other.dtype != ref.dtype or other.shape[1:] != ref.shape[1:]:
                raise DataError(f"{name}: {key!r} is {_describe(other)}, but {first_name} has {_describe(ref)} (shards "
                                "must agree in dtype and in every dimension but the first)")
        columns[key] = Column([parts[key] for _, parts in shards])
    return columns


def _read_columns(path: Path, spill: _Spill) -> dict[str, Column]:
    """Columns by key ('' for an .npy file), from headers only."""
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.is_dir():
        return _folder_columns(path, spill)
    if not path.is_file():
        raise DataError(f"data path is not a file: {path}")
    suffix = path.suffix.lower()
    if suffix not in (".npz", ".npy"):
        raise DataError(f"data file must be .npz or .npy, got {path.name}")
    return {k: Column([p]) for k, p in _file_parts(path, path.name, spill).items()}


def sha256_of(path) -> str:
    """The data's sha256, streamed: a file's bytes; for a folder, each data file's name, size and bytes in name order
    (so two copies of the same data hash alike, wherever they are). OSError when unreadable."""
    path = Path(path)
    h = hashlib.sha256()
    files = data_files(path) if path.is_dir() else [path]
    for p in files:
        with open(p, "rb") as f:
            if path.is_dir():
                h.update(f"{p.name}\0{os.fstat(f.fileno()).st_size}\0".encode())
            for chunk in iter(lambda: f.read(CHUNK), b""):
                h.update(chunk)
    return h.hexdigest()


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def _pick(arrays: dict, wanted: str | None, choices: tuple[str, ...], what: str,
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
    digest: bool = True,
    per_token: bool = False,
    ignore_label: int = IGNORE_LABEL,
    mask: str | None = None,
) -> Dataset:
    """Read a .npz/.npy file or a folder of them into a checked Dataset (inputs as `Column`s, read when sliced).

    Inputs: a single-input model reads --x-key, else the array named like its input, else a usual name (x, images,
    ...), else the one array that is not the labels. A multi-input model reads one array per input, named like the
    input. Labels: --y-key, else a usual name (y, labels, ...) among the arrays not used as inputs; none means
    agreement with the clean model's predictions. `per_token`, `ignore_label`, `mask`: see `from_arrays`.
    """
    path = Path(path)
    arrays = _read_columns(path, _Spill())
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
            others = [k for k in arrays if k != y_guess]
            if len(others) != 1:
                raise DataError(f"cannot tell which array holds the inputs (keys: {keys}); use --x-key "
                                f"(the model's input is {model_inputs[0].name!r})")
            x_name = others[0]
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
    dataset = from_arrays(inputs, labels, model_inputs, limit=limit, num_classes=num_classes,
                          allow_nonfinite=allow_nonfinite, path=str(path), per_token=per_token,
                          ignore_label=ignore_label, mask=mask)
    try:
        dataset.sha256 = sha256_of(path) if digest else None  # workers built from a resolved audit know it already
    except OSError as exc:
        raise DataError(f"cannot read {path.name}: {exc.strerror or exc}") from None
    return dataset


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
    per_token: bool = False,
    ignore_label: int = IGNORE_LABEL,
    mask: str | None = None,
) -> Dataset:
    """Check arrays (or `Column`s) against the model's inputs (shape, dtype, finiteness) and the labels against the
    classes. Arrays come back cast to the model's types; Columns come back as Columns that cast when sliced. With
    `limit`, only the first `limit` samples are used (and checked).

    `per_token`: the class output gives a class per position ([N, T, C]); labels are then class ids [N, T] where
    `ignore_label` marks a position that is not scored, and the model input `mask` (default: an input named
    `attention_mask`, if the model has one) leaves out the positions where it is 0."""
    if not isinstance(inputs, dict):
        if len(model_inputs) != 1:
            names = ", ".join(s.name for s in model_inputs)
            raise DataError(f"the model has {len(model_inputs)} inputs ({names}): pass a dict of arrays by name")
        inputs = {model_inputs[0].name: inputs}
    formed = {}
    for spec in model_inputs:
        if spec.name not in inputs:
            raise DataError(f"no data for model input {spec.name!r}")
        a = inputs[spec.name]
        a = a if isinstance(a, Column) else np.asarray(a)
        formed[spec.name] = (a, _check_form(a, spec))
    counts = {len(a) for a, _ in formed.values()}
    if len(counts) != 1:
        raise DataError(f"inputs have different numbers of samples: {sorted(counts)}")
    n = counts.pop()
    if limit is not None:
        if limit < 1:
            raise DataError(f"--limit must be at least 1, got {limit}")
        n = min(n, limit)
    checked = {}
    for spec in model_inputs:
        a, target = formed[spec.name]
        if len(a) > n:
            a = a.head(n) if isinstance(a, Column) else a[:n]
        checked[spec.name] = _convert(a, spec, target, allow_nonfinite)
    mask = mask_input(model_inputs, mask, per_token)
    if labels is not None:
        labels = np.asarray(labels)
        labels = to_token_ids(labels, num_classes, ignore_label) if per_token else to_class_ids(labels, num_classes)
        if limit is not None:
            labels = labels[:limit]
        if len(labels) != n:
            raise DataError(f"labels have {len(labels)} entries but the inputs have {n} samples")
    scored = None if mask is None else scored_positions(checked[mask], mask, labels)
    if per_token and labels is not None:
        if scored is not None:
            labels = np.where(scored, labels, UNSCORED)
        scored = labels != UNSCORED
    if scored is not None and not scored.any():
        why = [*([f"every label is the ignore label {ignore_label}"] if labels is not None else []),
               *([f"the mask {mask!r} is 0 everywhere"] if mask is not None else [])]
        raise DataError(f"no position is scored ({' or '.join(why)})")
    return Dataset(checked, labels, path, sha256, scored, mask)


def mask_input(model_inputs: list[TensorSpec], name: str | None, per_token: bool) -> str | None:
    """The model input read as the attention mask of a per-token output: `name`, else `attention_mask` if the model
    takes one, else none. A mask means nothing to a class output per sample."""
    names = [s.name for s in model_inputs]
    if name is None:
        return MASK_INPUT if per_token and MASK_INPUT in names else None
    if not per_token:
        raise UsageError(f"{option('mask')} {name!r}: a mask applies to a class output per token ([N, T, C]); the "
                         "class output gives one class per sample")
    if name not in names:
        raise UsageError(f"{option('mask')} {name!r} is not an input of the model (inputs: {', '.join(names)})")
    return name


def scored_positions(column, name: str, labels: np.ndarray | None) -> np.ndarray:
    """The positions [N, T] where the mask input is non-zero; its shape must match the labels'."""
    values = np.asarray(column)
    if values.ndim != 2:
        raise DataError(f"mask {name!r} must be [N, T] (one entry per position), found {_describe(values)}")
    if labels is not None and labels.shape != values.shape:
        raise DataError(f"mask {name!r} is [{', '.join(map(str, values.shape))}] but the labels are "
                        f"[{', '.join(map(str, labels.shape))}]: they must have the same shape")
    return values != 0


def _describe(a) -> str:
    return f"{a.dtype} [{', '.join(map(str, a.shape))}]"


def _is_float(dtype: np.dtype) -> bool:
    """numpy floats and the ml_dtypes ones onnx uses (bfloat16, float8 ...), whose numpy kind is 'V'."""
    return dtype.kind == "f" or dtype.name.startswith(("bfloat16", "float8", "float4"))


def _layout_hint(a, spec: TensorSpec) -> str:
    """'; transpose to NCHW' when the data is the model's image shape with the channels last (NHWC), else ''."""
    want = spec.shape
    if want is None or a.ndim != 4 or len(want) != 4:
        return ""
    c, h, w = want[1:]
    nhwc = tuple(a.shape[1:])
    fits = all(not isinstance(d, int) or d == s for d, s in zip((h, w, c), nhwc))
    if fits and nhwc[2] != nhwc[0]:  # the last axis holds what the model wants first: channels last
        return "; the data looks channels-last (NHWC): transpose it to NCHW, e.g. x.transpose(0, 3, 1, 2)"
    return ""


def _check_form(a, spec: TensorSpec) -> np.dtype:
    """The type the model takes, after checking the data's shape and dtype kind against it (values aside)."""
    want = spec.describe()
    if a.dtype == object:
        raise DataError(f"input {spec.name!r}: object arrays are not accepted (expected {want})")
    if a.ndim == 0 or a.size == 0:
        raise DataError(f"input {spec.name!r} is empty: expected {want}, found {_describe(a)}")
    if spec.shape is not None:
        dims = spec.shape[1:]
        if a.ndim != len(spec.shape) or any(isinstance(d, int) and d != s for d, s in zip(dims, a.shape[1:])):
            raise DataError(f"input {spec.name!r}: expected {want}, found {_describe(a)}{_layout_hint(a, spec)}")
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
    return target


def _nonfinite(c: np.ndarray) -> int:
    return int(c.size - np.count_nonzero(np.isfinite(c)))


def _convert(a, spec: TensorSpec, target: np.dtype, allow_nonfinite: bool):
    """Check the values a few MB at a time (NaN/Inf, overflow when cast, integers that do not fit); then the array
    cast to `target` (C-contiguous), or the Column that casts when sliced."""
    source = a.dtype
    if isinstance(a, Column):
        chunks = a.chunks()
    else:
        chunks = _row_chunks(len(a), a[:1].nbytes, lambda lo, hi: a[lo:hi])
    bad, overflow, top, misfit = 0, 0, 0.0, False
    check_float = _is_float(target) and not allow_nonfinite
    if check_float or (source != target and target.kind in "iu"):
        for c in chunks:
            if source == target:
                bad += _nonfinite(c)
            elif _is_float(target):
                if _is_float(source):
                    bad += _nonfinite(c)
                if not bad:
                    with np.errstate(over="ignore", invalid="ignore"):
                        overflow += _nonfinite(c.astype(target))
                    top = max(top, float(np.abs(c).max()))
            elif not np.array_equal(c.astype(target), c):
                misfit = True
                break
    if bad:
        raise DataError(f"input {spec.name!r} holds {bad} NaN/Inf values (use --allow-nonfinite to accept them)")
    if overflow:
        raise DataError(f"input {spec.name!r}: {overflow} values overflow {target.name} when cast from {source} "
                        f"(largest |value| {top:.3g})")
    if misfit:
        raise DataError(f"input {spec.name!r}: values do not fit {target.name} (found {source})")
    if isinstance(a, Column):
        a.prepare()
        return a if source == target else a.cast(target)
    if source != target:
        with np.errstate(over="ignore", invalid="ignore"):
            a = a.astype(target)
    return np.ascontiguousarray(a)


def _whole_ids(labels: np.ndarray) -> np.ndarray:
    """Non-empty labels of whole numbers as int64 (floats holding whole numbers are accepted)."""
    if labels.size == 0:
        raise DataError("labels are empty")
    if labels.dtype.kind == "f":
        if not np.isfinite(labels).all() or not (labels == np.round(labels)).all():
            raise DataError("labels must be whole class ids; found fractional or NaN values")
    elif labels.dtype.kind not in "iub":
        raise DataError(f"labels must be integer class ids, found dtype {labels.dtype}")
    return labels.astype(np.int64)


def to_token_ids(labels: np.ndarray, num_classes: int | None, ignore_label: int = IGNORE_LABEL) -> np.ndarray:
    """Class ids per position [N, T], UNSCORED where the label is `ignore_label`; checks range and wholeness."""
    if labels.dtype == object:
        raise DataError("labels: object arrays are not accepted")
    if labels.ndim != 2:
        found = f"[{', '.join(map(str, labels.shape))}]"
        raise DataError(f"the class output gives a class per position ([N, T, C]): labels must be class ids per "
                        f"position [N, T] ({ignore_label} where not scored), found {found}")
    ids = _whole_ids(labels)
    ignored = ids == ignore_label
    kept = ids[~ignored]
    top = num_classes - 1 if num_classes else None
    if kept.size and (kept.min() < 0 or (top is not None and kept.max() > top)):
        classes = f"the model has {num_classes} classes" if num_classes else "class ids start at 0"
        raise DataError(f"labels out of range: found {kept.min()}..{kept.max()} besides the ignore label "
                        f"{ignore_label}; {classes}")
    return np.where(ignored, UNSCORED, ids)


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
    ids = _whole_ids(labels)
    top = num_classes - 1 if num_classes else None
    if ids.min() < 0 or (top is not None and ids.max() > top):
        raise DataError(f"labels out of range: found {ids.min()}..{ids.max()}, the model has {num_classes} classes")
    return ids
