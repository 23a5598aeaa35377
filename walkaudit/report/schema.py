"""The report's JSON Schema and its version check.

The canonical schema is ``walkaudit/report/report.schema.json`` (shipped in the package); ``docs/report.schema.json``
is an identical copy for readers (a test keeps them equal). Reports written now carry
``"schema": "walkaudit.report/1.1"`` (:data:`SCHEMA_VERSION`); a minor version only adds keys, so any ``1.x`` is
accepted by this walkaudit.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from walkaudit.errors import UsageError

__all__ = ["SCHEMA_ID", "SCHEMA_MAJOR", "SCHEMA_VERSION", "check_report_version", "load_schema", "schema_path",
           "schema_validator", "validate_report"]

SCHEMA_ID = "walkaudit.report/1"  # the family this walkaudit reads: any 1.x
SCHEMA_MAJOR = 1
SCHEMA_VERSION = "walkaudit.report/1.1"  # what this walkaudit writes

_VERSION_RE = re.compile(r"^walkaudit\.report/(\d+)(?:\.(\d+))?$")


def schema_path() -> Path:
    """Location of the canonical schema file inside the package."""
    return Path(__file__).with_name("report.schema.json")


@lru_cache(maxsize=1)
def _schema_text() -> str:
    return schema_path().read_text(encoding="utf-8")


def load_schema() -> dict[str, Any]:
    """The report JSON Schema (draft 2020-12) as a fresh dict."""
    schema: dict[str, Any] = json.loads(_schema_text())
    return schema


@lru_cache(maxsize=1)
def schema_validator() -> Any:  # a jsonschema.Draft202012Validator (jsonschema ships no types)
    """A ``jsonschema`` Draft 2020-12 validator of the report schema (built once; jsonschema is imported lazily)."""
    try:
        import jsonschema
    except ImportError:
        raise UsageError("jsonschema is not installed: pip install 'jsonschema>=4'") from None
    return jsonschema.Draft202012Validator(load_schema())


def check_report_version(report: object) -> None:
    """Raise UsageError (one line) unless ``report`` is a walkaudit report of schema major version 1."""
    if not isinstance(report, dict):
        raise UsageError(f"not a walkaudit report: expected a JSON object, got {type(report).__name__}")
    if "schema" not in report:
        raise UsageError(f"not a walkaudit report: no 'schema' key (expected {SCHEMA_ID!r})")
    schema = report["schema"]
    match = _VERSION_RE.match(schema) if isinstance(schema, str) else None
    if match is None:
        raise UsageError(f"not a walkaudit report: schema {schema!r} (expected {SCHEMA_ID!r})")
    major = int(match.group(1))
    if major > SCHEMA_MAJOR:
        raise UsageError(f"{schema} is newer than this walkaudit understands ({SCHEMA_ID}): upgrade walkaudit")
    if major < SCHEMA_MAJOR:
        raise UsageError(f"{schema} is older than this walkaudit understands ({SCHEMA_ID}): re-run the audit")


def validate_report(report: object) -> list[str]:
    """Check ``report`` against the schema; returns one line per problem (empty = valid).

    The version is checked first, so a report of another major version raises instead of listing a hundred
    differences.
    """
    check_report_version(report)
    validator = schema_validator()
    problems = []
    for error in sorted(validator.iter_errors(report), key=lambda e: list(map(str, e.absolute_path))):
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        problems.append(f"{where}: {error.message}")
    return problems
