"""Renderers of a typed walkaudit report (:class:`walkaudit.report.Report`) into other formats. Each returns a string;
the CLI decides where it goes."""

from __future__ import annotations

from walkaudit.report.formats.github import to_github
from walkaudit.report.formats.html import to_html
from walkaudit.report.formats.junit import to_junit
from walkaudit.report.formats.markdown import to_markdown

#: formats printed beside the terminal's table (`--format NAME`; "text" is the table alone), by name
ANNOTATIONS = {"github": to_github}

__all__ = ["ANNOTATIONS", "to_github", "to_html", "to_junit", "to_markdown"]
