"""walkaudit: how robust is each layer of an ONNX classifier to noisy computation? (Walking Noise)

    import walkaudit
    report = walkaudit.audit("model.onnx", data="val.npz")        # or audit(model, x, y)
    for site in walkaudit.iter_audit("model.onnx", data="val.npz"):  # each site as it finishes
        print(site.name, site.midpoint)

Imports are lazy: `import walkaudit` loads neither onnx, onnxruntime nor scipy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from walkaudit.errors import WalkauditError

__version__ = "0.2.0"

__all__ = ["AuditConfig", "Report", "Selection", "SiteResult", "WalkauditError", "__version__", "audit",
           "iter_audit", "load_report"]

_LAZY = {"audit": "walkaudit.api", "iter_audit": "walkaudit.api", "AuditConfig": "walkaudit.config",
         "Selection": "walkaudit._graph.sites", "Report": "walkaudit.report.model",
         "SiteResult": "walkaudit.report.model", "load_report": "walkaudit.report"}

if TYPE_CHECKING:
    from walkaudit._graph.sites import Selection
    from walkaudit.api import audit, iter_audit
    from walkaudit.config import AuditConfig
    from walkaudit.report import load_report
    from walkaudit.report.model import Report, SiteResult


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'walkaudit' has no attribute {name!r}")
