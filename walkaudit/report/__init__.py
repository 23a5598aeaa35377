"""The report: a typed model (validated against its JSON Schema), the gate and the formats.

``load_report(path)`` reads a JSON report file into a :class:`Report`; ``Report.from_dict`` validates a parsed one;
``Report.to_dict`` / ``dumps`` write it.
"""

from walkaudit.report.model import (
    CleanCounts,
    ConfigInfo,
    DataInfo,
    Failure,
    Fit,
    GateResult,
    ModelInfo,
    PerRepeat,
    Point,
    Report,
    RuntimeInfo,
    SiteResult,
    ToolInfo,
    Weight,
    dumps,
    load_report,
)

__all__ = ["CleanCounts", "ConfigInfo", "DataInfo", "Failure", "Fit", "GateResult", "ModelInfo", "PerRepeat", "Point",
           "Report", "RuntimeInfo", "SiteResult", "ToolInfo", "Weight", "dumps", "load_report"]
