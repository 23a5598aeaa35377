"""walkaudit: how robust is each layer of an ONNX classifier to noisy computation? (Walking Noise)"""

__version__ = "0.1.0"

from .api import AuditConfig, audit  # noqa: E402
from .errors import WalkauditError  # noqa: E402
from .report import Report  # noqa: E402

__all__ = ["audit", "AuditConfig", "Report", "WalkauditError", "__version__"]
