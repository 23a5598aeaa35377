"""Combine the shard reports of one audit into the report of the unsharded run (pure: Reports in, a Report out).

`walkaudit MODEL --data D --shard I/N` audits only shard I's sites; each site keeps its index in the full selection
and its noise depends only on the seed, the site and the sample block, so the shards' sites are the unsharded
run's. `merge` checks that the reports are the N shards of one audit — the same model and data (sha256), the same
walkaudit, onnxruntime and provider, the same settings (everything in ``config`` but ``shard`` and the gate rules),
every shard 1..N exactly once, the same clean pass — and returns the report that run would have written: the sites
in index order, ``config.shard`` null, ``runtime.evaluations`` summed, ``runtime.elapsed_s`` the slowest shard's,
``runtime.notes`` the run's notes then each site's notes in site order, no gate verdict (gate it like an audit).
Anything else is refused with one UsageError line.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from walkaudit.errors import UsageError
from walkaudit.report.model import Report
from walkaudit.report.text import printable

__all__ = ["merge", "shard_of"]

#: config keys that may differ between shards: the shard itself, the gate rules each shard was checked with, and
#: the batch size (on CUDA it follows each device's free memory; it never changes a number): the merge keeps shard 1's
_PER_SHARD = frozenset({"shard", "gate", "batch_size"})


def shard_of(report: Report) -> tuple[int, int] | None:
    """(i, n) of a shard report, None for a report of every site."""
    shard = report.config.extra.get("shard")
    if shard is None:
        return None
    i, n = int(shard[0]), int(shard[1])
    if not 1 <= i <= n:
        raise UsageError(f"config.shard [{i}, {n}] is not a shard I/N with 1 ≤ I ≤ N")
    return i, n


def merge(reports: Sequence[Report], names: Sequence[str] | None = None) -> Report:
    """The unsharded report from its N shard reports (in any order); UsageError (one line) when they are not the
    N shards of one audit. `names`: what the messages call each report (file names; default "report 1", ...)."""
    reports = list(reports)
    if not reports:
        raise UsageError("no shard reports to merge")
    names = [printable(n) for n in names] if names is not None else [f"report {k + 1}" for k in range(len(reports))]
    if len(names) != len(reports):
        raise ValueError("one name per report")
    shards = []
    for report, name in zip(reports, names):
        shard = shard_of(report)
        if shard is None:
            raise UsageError(f"{name} is not a shard report (config.shard is null); make shards with "
                             "'walkaudit MODEL --data D --shard I/N'")
        if report.config.mode == "global":
            raise UsageError(f"{name} is a --global audit: global mode puts noise at every site at once and cannot "
                             "be sharded")
        if report.partial:
            raise UsageError(f"{name} is a partial report (shard {shard[0]}/{shard[1]} was interrupted); finish it "
                             "with --resume before merging")
        shards.append(shard)
    first, first_name = reports[0], names[0]
    for report, name in zip(reports[1:], names[1:]):
        _same_audit(first, first_name, report, name)
    _complete(shards, names)
    for report, name in zip(reports[1:], names[1:]):
        _same_clean_pass(first, first_name, report, name)
    return _combined(reports, shards, names)


# --- checks -----------------------------------------------------------------------------------------------------

def _differ(what: str, a: object, a_name: str, b: object, b_name: str, hint: str = "") -> UsageError:
    return UsageError(f"shards {what}: {_show(a)} in {a_name}, {_show(b)} in {b_name}{hint}")


def _show(value: object) -> str:
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return f"sha256 {value[:12]}…"  # a digest: its start is enough to tell two apart
    text = "null" if value is None else str(value)
    return printable(text if len(text) <= 60 else text[:57] + "…")


def _same_audit(a: Report, a_name: str, b: Report, b_name: str) -> None:
    """The same program, model, data, settings and runtime: otherwise the shards are not of one audit."""
    if (a.tool.name, a.tool.version) != (b.tool.name, b.tool.version):
        raise _differ("were written by different walkaudit versions", a.tool.version, a_name, b.tool.version, b_name)
    if a.model.sha256 != b.model.sha256:
        raise _differ("are of different models", a.model.sha256, a_name, b.model.sha256, b_name)
    if a.data.sha256 != b.data.sha256:
        raise _differ("are of different data", a.data.sha256, a_name, b.data.sha256, b_name)
    if a.config.seed != b.config.seed:
        raise _differ("used different seeds", a.config.seed, a_name, b.config.seed, b_name,
                      "; run every shard with the same --seed")
    ca, cb = _settings(a), _settings(b)
    for key in [*ca, *(k for k in cb if k not in ca)]:
        if ca.get(key) != cb.get(key):
            raise _differ(f"used different settings (config.{key})", ca.get(key), a_name, cb.get(key), b_name,
                          "; run every shard with the same options")
    ra, rb = a.runtime, b.runtime
    if ra.provider != rb.provider:
        raise _differ("ran on different providers", ra.provider, a_name, rb.provider, b_name,
                      " (the numbers differ between providers); run every shard on the same kind of machine")
    if ra.onnxruntime_version != rb.onnxruntime_version:
        raise _differ("ran on different onnxruntime versions", ra.onnxruntime_version, a_name,
                      rb.onnxruntime_version, b_name)
    if ra.extra.get("noise_source") != rb.extra.get("noise_source"):
        raise _differ("drew the noise in different places (runtime.noise_source)", ra.extra.get("noise_source"),
                      a_name, rb.extra.get("noise_source"), b_name)


def _settings(report: Report) -> dict[str, Any]:
    """``config`` without what may differ between the shards of one audit."""
    return {k: v for k, v in report.config.to_dict().items() if k not in _PER_SHARD}


def _complete(shards: list[tuple[int, int]], names: list[str]) -> None:
    """One N; every shard 1..N, each once."""
    n = shards[0][1]
    for (i, m), name in zip(shards, names):
        if m != n:
            raise UsageError(f"shards of different N: {names[0]} is shard {shards[0][0]}/{n}, {name} is shard {i}/{m}")
    seen: dict[int, str] = {}
    for (i, _), name in zip(shards, names):
        if i in seen:
            raise UsageError(f"shard {i}/{n} is given twice ({seen[i]} and {name})")
        seen[i] = name
    missing = [i for i in range(1, n + 1) if i not in seen]
    if len(missing) == 1:
        raise UsageError(f"shard {missing[0]}/{n} is missing")
    if missing:
        shown = ", ".join(f"{i}/{n}" for i in missing[:5]) + (", …" if len(missing) > 5 else "")
        raise UsageError(f"shards {shown} are missing ({len(missing)} of {n})")


def _same_clean_pass(a: Report, a_name: str, b: Report, b_name: str) -> None:
    """Every shard repeats the clean pass; over the same model, data and settings it must give the same."""
    facts = (("clean accuracy", lambda r: r.clean_accuracy),
             ("clean counts", lambda r: None if r.clean_counts is None else r.clean_counts.to_dict()),
             ("number of classes", lambda r: r.num_classes), ("chance", lambda r: r.chance),
             ("samples", lambda r: r.data.samples), ("labels", lambda r: r.data.labels),
             ("class output", lambda r: (r.model.class_output, r.model.output_kind)))
    for what, get in facts:
        if get(a) != get(b):
            raise _differ(f"disagree on the clean pass ({what})", get(a), a_name, get(b), b_name)


# --- the merged report ------------------------------------------------------------------------------------------

def _run_notes(report: Report) -> list[str]:
    """The report's own notes (runtime and worker), without the sites' notes that follow them."""
    notes = list(report.runtime.notes)
    of_sites = [n for s in report.sites for n in s.extra.get("notes") or ()]
    if of_sites and notes[-len(of_sites):] == of_sites:
        return notes[:-len(of_sites)]
    if not of_sites:
        return notes
    return [n for n in notes if n not in of_sites]


def _combined(reports: list[Report], shards: list[tuple[int, int]], names: list[str]) -> Report:
    holder: dict[int, str] = {}
    by_name: dict[str, str] = {}
    sites = []
    for report, _shard, name in zip(reports, shards, names):
        for site in report.sites:
            if site.index is None:
                raise UsageError(f"{name}: site {printable(site.name)!r} has no index; not a shard of a site walk")
            if site.index in holder:
                raise UsageError(f"shards overlap: {holder[site.index]} and {name} both hold site {site.index} "
                                 f"({printable(site.name)!r})")
            if site.name in by_name:
                raise UsageError(f"shards overlap: {by_name[site.name]} and {name} both hold site "
                                 f"{printable(site.name)!r}")
            holder[site.index], by_name[site.name] = name, name
            sites.append(site)
    sites.sort(key=lambda s: s.index or 0)  # every index is set (checked above)
    for k, site in enumerate(sites):
        if site.index != k:
            raise UsageError(f"site {k} is in none of the shards (the indices jump from {k - 1} to {site.index}): "
                             "the shards are not of one audit")
    first = reports[0]
    notes = _run_notes(first)  # the runtime's and the worker's notes: every shard has them, some only one
    for report in reports[1:]:
        for note in _run_notes(report):
            if note not in notes:
                notes.append(note)
    notes.extend(n for s in sites for n in s.extra.get("notes") or ())
    runtime_extra = {**copy.deepcopy(first.runtime.extra), "notes": notes,
                     "evaluations": sum(p.repeats * p.samples for s in sites for p in s.points)}
    runtime = replace(first.runtime, elapsed_s=max(r.runtime.elapsed_s for r in reports), extra=runtime_extra)
    config_extra = {k: copy.deepcopy(v) for k, v in first.config.extra.items() if k != "gate"}
    config_extra["shard"] = None
    config = replace(first.config, extra=config_extra)
    return replace(first, config=config, runtime=runtime, sites=tuple(sites), gate=None, partial=False)
