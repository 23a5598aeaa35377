"""walkaudit: how robust is each layer of an ONNX classifier to noisy computation? (Walking Noise)"""

__version__ = "0.1.0"

from walkaudit.api import AuditConfig, audit  # noqa: E402
from walkaudit.errors import WalkauditError  # noqa: E402
from walkaudit.report.model import Report  # noqa: E402

__all__ = ["audit", "AuditConfig", "Report", "WalkauditError", "__version__"]
