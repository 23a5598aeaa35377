"""The one place that talks to onnxruntime: providers, sessions, and its errors wrapped as ours."""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass, field

import numpy as np
import onnx

from .errors import RuntimeFailure, UsageError

PROVIDERS = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}


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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = next((t for t in text if t.strip()), type(exc).__name__)
    return line.split(" : ")[-1][:300] if " : " in line else line[:300]


@dataclass
class Runtime:
    """Creates sessions on the provider the user asked for and records the one actually used."""

    requested: str = "auto"
    threads: int | None = None
    provider: str | None = None  # the provider sessions really run on, once one was made
    notes: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.requested not in ("auto", "cuda", "cpu"):
            raise UsageError(f"--provider must be auto, cuda or cpu, got {self.requested!r}")
        import onnxruntime as ort

        self._ort = ort
        ort.set_default_logger_severity(3)
        self.version = ort.__version__

    def _wanted(self) -> list[str]:
        if self.requested == "cpu" or self.provider == "CPUExecutionProvider":
            return ["CPUExecutionProvider"]
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def session(self, model: onnx.ModelProto, what: str = "model"):
        """An InferenceSession for `model`. Raises RuntimeFailure with onnxruntime's reason in one line."""
        ort = self._ort
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if self.threads:
            options.intra_op_num_threads = self.threads
        wanted = self._wanted()
        try:
            with _quiet_stderr() as err:
                session = ort.InferenceSession(model.SerializeToString(), options, providers=wanted)
        except Exception as exc:
            raise RuntimeFailure(f"onnxruntime cannot load the {what}: {_first_line(exc)}") from None
        used = session.get_providers()[0]
        if self.provider is None:
            self.provider = used
            if "CUDAExecutionProvider" in wanted and used != "CUDAExecutionProvider":
                err.seek(0)
                reason = next((ln for ln in err.read().decode(errors="replace").splitlines() if "CUDA" in ln), "")
                if self.requested == "cuda":
                    raise RuntimeFailure("--provider cuda: onnxruntime cannot run on CUDA here" +
                                         (f" ({reason.strip()[:200]})" if reason else ""))
                self.notes.append("CUDA not available; ran on the CPU")
        return session


def run(session, outputs: list[str], feeds: dict[str, np.ndarray], what: str = "model") -> list[np.ndarray]:
    """session.run with onnxruntime's failures turned into RuntimeFailure."""
    try:
        return session.run(outputs, feeds)
    except Exception as exc:
        text = str(exc)
        if "Failed to allocate memory" in text or "bad_alloc" in text or isinstance(exc, MemoryError):
            raise OutOfMemory(_first_line(exc)) from None
        raise RuntimeFailure(f"onnxruntime failed running the {what}: {_first_line(exc)}") from None


class OutOfMemory(RuntimeFailure):
    """A run did not fit in memory; the caller may retry with a smaller batch."""
