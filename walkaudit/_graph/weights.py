"""Large initializers as stubs: a derived graph names its weights, the runtime holds their values once.

A suffix, prefix or exposed copy of a 500 MB model would copy every weight it reads into a new protobuf, and an
evaluation holds several (the suffix, its noisy program, the program's one-level twin, the prefix): on GPT-2's
first site 0.3–0.6 GB each. Instead the passes write a stub in each large weight's place — its name, type and shape,
data EXTERNAL at `LOCATION` — and `Runtime` hands onnxruntime the values of each weight once, as a shared OrtValue
(`SessionOptions.add_external_initializers`), resolved from the loaded model's own initializers (`Runtime.share`).
A pass that changed a weight's values would have to rename it: the name (with type and shape) is the key."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx

#: weights of at least this many bytes are stubs in derived graphs and handed to onnxruntime as shared OrtValues
#: instead of inside the serialized model: one host copy serves the clean model and every site's suffix, and no
#: session pays for serializing and parsing the weights again (1.3 s per session for VGG-19's 570 MB on two cores)
SHARE_BYTES = 1 << 20
LOCATION = "walkaudit-shared-initializer"
_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8,
          onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16, onnx.TensorProto.INT32,
          onnx.TensorProto.UINT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT64}


def shareable(t: onnx.TensorProto) -> bool:
    """A weight with its values in place, large enough to share, judged by its declared shape (reading raw_data's
    length would copy it)."""
    if t.data_location == onnx.TensorProto.EXTERNAL or t.data_type not in _TYPES:
        return False
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return int(np.prod(t.dims, dtype=np.int64)) * itemsize >= SHARE_BYTES


def nbytes(proto: onnx.ModelProto) -> int:
    """The bytes of a model's initializers by their declared shapes (`ModelProto.ByteSize` encodes the whole model
    to count it: +0.4 GB for a moment on GPT-2)."""
    return sum(int(np.prod(t.dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
               for t in proto.graph.initializer if t.data_type != onnx.TensorProto.STRING)


def is_stub(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL and any(
        e.key == "location" and e.value == LOCATION for e in t.external_data)


def key(t: onnx.TensorProto) -> tuple:
    """What identifies a weight's values: its name, type and shape."""
    return t.name, t.data_type, tuple(t.dims)


def stub(t: onnx.TensorProto) -> onnx.TensorProto:
    """`t`'s name, type and shape, its values left to the runtime."""
    out = onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims,
                           data_location=onnx.TensorProto.EXTERNAL)
    entry = out.external_data.add()
    entry.key, entry.value = "location", LOCATION
    return out


def stubbed(tensors: Iterable[onnx.TensorProto]) -> list[onnx.TensorProto]:
    """The tensors, the large ones as stubs."""
    return [stub(t) if shareable(t) else t for t in tensors]
