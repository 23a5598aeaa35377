"""Command line: parse, build the config, call the API, render, gate, exit code.

Exit codes: 0 passed, 1 gate failed or undecided, 2 bad usage or input, 3 runtime failure, 130 interrupted.

One module per command (audit, inspect, compare, merge, plot, plan, meta: version and help), each registered on the
group `main` (app); their options come from the groups in `options`, defined once; `reports` reads, checks and
writes reports; `outputs`, `signals`, `checkpoint` and `progress` serve the audit.
"""

from __future__ import annotations

# every command registers itself on `main` when imported
from walkaudit.cli import audit, bits, compare, inspect, merge, meta, plan, plot  # noqa: E402,F401,I001
from walkaudit.cli.app import (  # noqa: F401  (the entry point and what tests use)
    EXIT_BROKEN_PIPE,
    EXIT_GATE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_RUNTIME,
    EXIT_USAGE,
    _err,
    guarded,
    main,
)

__all__ = ["main"]
