"""The one place that talks to onnxruntime: providers, sessions, and its errors wrapped as ours."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from dataclasses import dataclass, field

import numpy as np
import onnx

from walkaudit._graph import weights
from walkaudit._loading.model import copy_fields
from walkaudit.errors import ModelError, RuntimeFailure, option

#: Graph fusions whose result depends on which values are graph outputs: exposing a site (or cutting the graph
#: there) blocks them and changes the last bit of the outputs. MatMul+Add→Gemm and Conv+BN fusion cost nothing
#: measurable and are always off; the NCHWc layout transform (Conv+Add fused with the residual) makes conv nets
#: 1.6–2x faster on the CPU, so it is only off in exact mode (`--exact`), where σ = 0 reproduces the model bit for
#: bit whatever is exposed (docs/performance.md).
#: what `--provider` / `AuditConfig.provider` may ask for: auto (CUDA where a session really runs on it), cuda, cpu
PROVIDERS = ("auto", "cuda", "cpu")

FUSIONS_OFF = ["MatMulAddFusion", "ConvBNFusion"]
EXACT = [*FUSIONS_OFF, "NchwcTransformer"]


@contextlib.contextmanager
def _quiet_stderr():
    """Silence what onnxruntime's native loaders print on fd 2 (a missing CUDA library, say) and keep it."""
    captured = tempfile.TemporaryFile(mode="w+b")
    try:
        saved = os.dup(2)
    except OSError:  # no real fd 2 (some embedded interpreters)
        yield captured
        return
    try:
        os.dup2(captured.fileno(), 2)
        yield captured
    finally:
        os.dup2(saved, 2)
        os.close(saved)


_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*([A-Z_]+)\s*:\s*")
_SOURCE = re.compile(r"(?:(?<=\s)|^)/?[\w./+-]+\.(?:h|hpp|cc|cpp|cu):\d+\s+")
#: onnxruntime status codes that mean "this model cannot be loaded or run here", as opposed to a failure of ours
_MODEL_CODES = {"FAIL", "INVALID_ARGUMENT", "NO_SUCHFILE", "NO_MODEL", "INVALID_PROTOBUF", "MODEL_LOADED",
                "NOT_IMPLEMENTED", "INVALID_GRAPH", "MODEL_REQUIRES_COMPILATION"}


def _skip_signature(text: str) -> str:
    """Drop a leading C++ function signature ('void ns::f(const T&, int) ') that onnxruntime prints."""
    head = text.split("(", 1)[0]
    if "::" not in head or "(" not in text:
        return text
    depth = 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                rest = text[i + 1 :].lstrip()
                rest = rest.removeprefix("const ")
                return rest.strip() or text
    return text


_CAMEL = re.compile(r"^[A-Z][a-z0-9]+(?:[A-Z][a-z0-9]*)+\s+(?=\S)")


def _skip_function(text: str) -> str:
    """Drop a bare function name after a source location ('ValidateEmbeddedTensorProtoDataSizeAndShape ...')."""
    return _CAMEL.sub("", text, count=1)


def _parse(exc: BaseException) -> tuple[str | None, str]:
    """(onnxruntime status code or None, the message in one readable line without source locations)."""
    text = " ".join(t.strip() for t in str(exc).strip().splitlines() if t.strip()) or type(exc).__name__
    code = None
    m = _ORT_PREFIX.match(text)
    if m:
        code, text = m.group(1), text[m.end() :]
    for _ in range(5):  # source locations and C++ signatures anywhere in the text (also after "Status Message:")
        m = _SOURCE.search(text)
        if m is None:
            break
        text = text[: m.start()] + _skip_function(_skip_signature(text[m.end() :]))
    text = re.sub(r"^(?:Fatal error|Load model from \S+ failed|Exception during initialization):\s*", "", text)
    return code, text


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = _parse(exc)[1]
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _load_reason(exc: BaseException) -> str:
    """Why onnxruntime refused a model, said the way a user can act on it."""
    _, text = _parse(exc)
    m = re.search(r"Opset (\d+) is under development", text)
    if m:
        return f"the model's opset {m.group(1)} is newer than onnxruntime supports"
    m = re.search(r"[Uu]nsupported model IR version:?\s*(\d+)", text)
    if m:
        return f"the model's IR version {m.group(1)} is newer than onnxruntime supports"
    m = re.search(r"(\S+)\(-?\d+\) is not a registered function/op", text)
    if m:
        return f"operator {m.group(1)} is not known to onnxruntime (a custom op needs its library)"
    m = re.search(r"Could not find an implementation for (\S+)\((\d+)\) node with name '([^']*)'", text)
    if m:
        node = f" (node '{m.group(3)}')" if m.group(3) else ""
        return f"onnxruntime has no kernel for {m.group(1)} (opset {m.group(2)}) with these input types{node}"
    return _first_line(exc)


@dataclass
class Runtime:
    """Creates sessions on the provider the user asked for and records the one actually used."""

    requested: str = "auto"
    threads: int | None = None
    exact: bool = False  # disable every fusion that can change the last bit at σ = 0 (slower on conv nets)
    provider: str | None = None  # the provider sessions really run on, once one was made
    notes: list[str] = field(default_factory=list)
    #: large initializers by `weights.key` as (array, OrtValue), shared by every session of this runtime. A Runtime
    #: serves the graphs of one model (api.audit makes one per audit), whose derived graphs name its weights
    #: (`_graph/weights.py`).
    _shared: dict = field(default_factory=dict, repr=False)
    #: the loaded models' large initializers by (name, type, shape): what stubs in derived graphs stand for
    _sources: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.requested not in PROVIDERS:  # AuditConfig.check says so first, for users
            raise ValueError(f"provider must be auto, cuda or cpu, got {self.requested!r}")
        import onnxruntime as ort

        self._ort = ort
        ort.set_default_logger_severity(3)
        self.version = ort.__version__

    def _wanted(self) -> list[str]:
        if self.requested == "cpu" or self.provider == "CPUExecutionProvider":
            return ["CPUExecutionProvider"]
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def share(self, proto: onnx.ModelProto) -> None:
        """Serve the stubs of derived graphs (`weights.stub`) from `proto`'s own initializers: the loaded model's.
        Nothing is copied until a session needs a weight."""
        self._sources.update((weights.key(t), t) for t in proto.graph.initializer if weights.shareable(t))

    def _serialized(self, model: onnx.ModelProto) -> tuple[bytes, list[str], list]:
        """The model's bytes with its large initializers left out, and those initializers as shared OrtValues."""
        big = [t for t in model.graph.initializer if weights.shareable(t) or weights.is_stub(t)]
        if not big:
            return model.SerializeToString(), [], []
        from onnx import numpy_helper

        slim = onnx.ModelProto()
        copy_fields(model, slim, skip="graph")
        copy_fields(model.graph, slim.graph, skip="initializer")
        names, values = [], []
        for t in model.graph.initializer:
            if not (weights.shareable(t) or weights.is_stub(t)):
                slim.graph.initializer.append(t)
                continue
            key = weights.key(t)
            if key not in self._shared:
                source = self._sources.get(key, t)
                if weights.is_stub(source):
                    raise RuntimeFailure(f"walkaudit lost the values of weight '{t.name}' (a graph names it, but no "
                                         "model shared with this runtime holds it)")
                try:
                    array = np.ascontiguousarray(numpy_helper.to_array(source))
                except Exception:  # data that does not fit its shape: left in place for onnxruntime to refuse
                    slim.graph.initializer.append(source)
                    continue
                self._shared[key] = (array, self._ort.OrtValue.ortvalue_from_numpy(array))
            slim.graph.initializer.append(weights.stub(t))
            names.append(t.name)
            values.append(self._shared[key][1])
        return slim.SerializeToString(), names, values

    def session(self, model: onnx.ModelProto, what: str = "model", exact: bool = False):
        """An InferenceSession for `model`, raising onnxruntime's reason in one line.

        `exact` turns off the fusions whose result depends on which values are graph outputs, for this session
        (the runtime's `exact` does it for all of them).

        When the user's own model (`what == "model"`) cannot be loaded (unknown op, opset or IR version too new,
        no kernel for its types, invalid graph) that is a bad input: ModelError, exit 2. When a graph walkaudit
        derived from it fails, that is a runtime failure (exit 3).
        """
        ort = self._ort
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if self.threads:
            options.intra_op_num_threads = self.threads
        # onnxruntime's idle threads spin by default; the engine draws the next ε on other threads meanwhile, and
        # spinning threads starve them: off, the benchmark walks run 11-15 % faster (docs/performance.md)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        wanted = self._wanted()
        try:
            data, names, values = self._serialized(model)
            if names:
                options.add_external_initializers(names, values)
            with _quiet_stderr() as err:
                session = ort.InferenceSession(data, options, providers=wanted,
                                               disabled_optimizers=EXACT if self.exact or exact else FUSIONS_OFF)
        except Exception as exc:
            code, _ = _parse(exc)
            if what == "model" and code in _MODEL_CODES:
                raise ModelError(f"onnxruntime {self.version} cannot run this model: {_load_reason(exc)}") from None
            raise RuntimeFailure(f"onnxruntime cannot load the {what}: {_first_line(exc)}") from None
        used = session.get_providers()[0]
        if self.provider is None:
            self.provider = used
            if "CUDAExecutionProvider" in wanted and used != "CUDAExecutionProvider":
                err.seek(0)
                reason = next((ln for ln in err.read().decode(errors="replace").splitlines() if "CUDA" in ln), "")
                if self.requested == "cuda":
                    raise RuntimeFailure(f"{option('provider')} cuda: onnxruntime cannot run on CUDA here" +
                                         (f" ({reason.strip()[:200]})" if reason else ""))
                self.notes.append("CUDA not available; ran on the CPU")
        return session

    @property
    def device(self) -> str:
        """Where sessions keep their values: "cuda" or "cpu"."""
        return "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"

    def to_device(self, array: np.ndarray):
        """An OrtValue holding `array` on the sessions' device (a reference to the array itself on the CPU)."""
        return self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, 0)

    def device_memory(self) -> int | None:
        """Free bytes on the CUDA device sessions run on; None on the CPU or where the driver cannot be asked."""
        if self.provider != "CUDAExecutionProvider":
            return None
        return cuda_free_bytes()


_CUDART = ("libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0")


def cuda_free_bytes(device: int = 0) -> int | None:
    """Free memory of a CUDA device: cudaMemGetInfo from the CUDA runtime onnxruntime has loaded (found by its
    soname), else nvidia-smi; None when neither answers."""
    import ctypes
    import subprocess

    for name in _CUDART:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        if lib.cudaSetDevice(device) == 0 and lib.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)) == 0:
            return int(free.value)
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits", "-i",
                              str(device)], capture_output=True, text=True, timeout=10, check=True).stdout
        return int(float(out.split()[0])) << 20  # MiB
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


_RUN_OPTIONS = None


def run_options():
    """Run options that keep onnxruntime's own error log off stderr: the exception carries the message."""
    global _RUN_OPTIONS
    if _RUN_OPTIONS is None:
        import onnxruntime as ort

        _RUN_OPTIONS = ort.RunOptions()
        _RUN_OPTIONS.log_severity_level = 4
    return _RUN_OPTIONS


def run(session, outputs: list[str], feeds: dict[str, np.ndarray], what: str = "model") -> list[np.ndarray]:
    """session.run with onnxruntime's failures turned into RuntimeFailure (OutOfMemory when memory ran out)."""
    try:
        return session.run(outputs, feeds, run_options())
    except Exception as exc:
        raise failure(exc, what) from None


def run_bound(session, device_inputs: dict, host_inputs: dict[str, np.ndarray], output: str,
              what: str = "model") -> np.ndarray:
    """Run through IOBinding: `device_inputs` are OrtValues already on the device (kept there between runs), the
    small `host_inputs` cross once, and only `output` comes back to the host."""
    io = session.io_binding()
    for name, value in device_inputs.items():
        io.bind_ortvalue_input(name, value)
    for name, array in host_inputs.items():
        io.bind_cpu_input(name, np.ascontiguousarray(array))
    io.bind_output(output, "cpu")
    try:
        session.run_with_iobinding(io, run_options())
    except Exception as exc:
        raise failure(exc, what) from None
    return io.copy_outputs_to_cpu()[0]


def trim_heap() -> None:
    """Hand the C heap's free memory back to the system (glibc's malloc_trim): after a site's sessions are freed,
    glibc keeps their arenas' pages otherwise, and the next site's peak comes on top (ViT-B/16: 3.4 -> 2.1 GB
    resident between sites). Nothing where the C library has no such call."""
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def failure(exc: Exception, what: str = "model") -> RuntimeFailure:
    """onnxruntime's exception as ours: OutOfMemory (the caller may retry smaller) or RuntimeFailure."""
    text = str(exc)
    if "Failed to allocate memory" in text or "bad_alloc" in text or isinstance(exc, MemoryError):
        return OutOfMemory(f"out of memory running the {what} ({_first_line(exc)}); if the memory grows with the "
                           f"batch, a smaller {option('batch_size')} helps; a tensor the model makes at a fixed size "
                           "(ConstantOfShape, Expand) needs that much whatever the batch")
    return RuntimeFailure(f"onnxruntime failed running the {what}: {_first_line(exc)}")


class OutOfMemory(RuntimeFailure):
    """A run did not fit in memory; the caller may retry with a smaller batch."""
