"""The report: a typed model, its JSON Schema, the gate and the formats."""

from walkaudit.report.model import Point, Report, SiteResult, dumps

__all__ = ["Point", "Report", "SiteResult", "dumps"]
