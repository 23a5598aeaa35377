"""The report as typed objects: validated on the way in (:meth:`Report.from_dict`, :func:`load_report`), exact JSON on
the way out (:meth:`Report.to_dict`, :func:`dumps`). Schema ``walkaudit.report/1.1`` (any 1.x is read).

Every object keeps the keys it does not know in ``extra`` (the schema lets a minor version add keys), so
``Report.from_dict(d).to_dict()`` gives ``d`` back, floats bit for bit, with two exceptions: ``schema`` says the
version written now and ``summary`` is derived from the sites.
"""

from __future__ import annotations

import copy
import json
import math
import os
import stat
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field, fields, replace
from functools import lru_cache
from pathlib import Path, PurePath
from typing import Any, NoReturn, TypeVar

from walkaudit.errors import UsageError
from walkaudit.report.schema import (
    SCHEMA_VERSION,
    check_report_version,
    schema_validator,
)
from walkaudit.report.text import format_sigma, midpoint_text, printable, report_level

__all__ = [
    "MAX_REPORT_BYTES", "SCHEMA", "CleanCounts", "ConfigInfo", "DataInfo", "Failure", "Fit", "GateResult",
    "ModelInfo", "PerRepeat", "Point", "Report", "RuntimeInfo", "SiteResult", "ToolInfo", "Weight", "dumps",
    "load_report",
]

SCHEMA = SCHEMA_VERSION
#: reports larger than this are refused before they are read
MAX_REPORT_BYTES = 64 * 1024 * 1024
#: objects and arrays nested deeper than this are refused (a report is five levels deep; extras get some room)
MAX_DEPTH = 64


def dumps(report: dict[str, Any]) -> str:
    """A report dict as the JSON text walkaudit writes (``Report.to_dict()``); the one JSON writer."""
    return json.dumps(report, indent=2, allow_nan=False) + "\n"


# --- header sections --------------------------------------------------------------------------------------------

_S = TypeVar("_S", bound="_Section")


@dataclass(frozen=True)
class _Section:
    """A JSON object whose required keys are fields; the other keys stay in ``extra`` (written back as they came)."""

    def __getitem__(self, key: str) -> Any:
        # compatibility with the dict-shaped report of 1.0 (report.model["path"]); new code reads the attributes
        if key != "extra" and key in self._keys():
            return getattr(self, key)
        return self.extra[key]  # type: ignore[attr-defined]

    @classmethod
    def _keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.name != "extra")

    @classmethod
    def from_dict(cls: type[_S], data: dict[str, Any]) -> _S:
        """From a schema-valid dict (no validation here: :meth:`Report.from_dict` validates the whole report)."""
        keys = cls._keys()
        # every section declares `extra` (a field with a default, so it cannot be declared here, before theirs)
        return cls(**{k: _frozen(data[k]) for k in keys}, extra=_extra(data, keys))  # type: ignore[call-arg]

    def to_dict(self) -> dict[str, Any]:
        return {**{k: _plain(getattr(self, k)) for k in self._keys()}, **copy.deepcopy(self.extra)}  # type: ignore[attr-defined]


@dataclass(frozen=True)
class ToolInfo(_Section):
    """``tool``: the program that wrote the report."""

    name: str
    version: str
    extra: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class ModelInfo(_Section):
    """``model``: the audited ONNX file (``path``/``sha256`` are None for a model given in memory)."""

    path: str | None
    sha256: str | None
    opset: int
    producer: str
    class_output: str
    output_kind: str
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def file_name(self) -> str:
        """The model's file name, ``model`` when the report has no path."""
        return PurePath(self.path).name if self.path else "model"

    @property
    def batch_size(self) -> int | None:
        """The model's fixed batch size (None when free or not recorded)."""
        return self.extra.get("batch_size")


@dataclass(frozen=True)
class DataInfo(_Section):
    """``data``: the evaluation data and where its labels came from (``given`` or ``clean-predictions``)."""

    path: str | None
    sha256: str | None
    samples: int
    labels: str
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def scored(self) -> str:
        """What accuracy counts: ``samples``, or ``tokens`` (the scored positions of a per-token class output)."""
        scored: str = self.extra.get("scored", "samples")
        return scored

    @property
    def counted(self) -> str:
        """What accuracy is measured over, in words: '1000 samples' or '5120 scored tokens in 1000 sequences'."""
        if self.scored == "tokens":
            return f"{self.extra.get('scored_tokens')} scored tokens in {self.samples} sequences"
        return f"{self.samples} samples"


@dataclass(frozen=True)
class ConfigInfo(_Section):
    """``config``: how the audit ran (noise model, mode, grid, repeats, seed, ...); ``gate_rules`` when gated."""

    noise: str
    ratio: float | None
    mode: str
    sigmas: tuple[float, ...] | None
    repeats: int
    seed: int
    batch_size: int
    provider_requested: str
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def quick(self) -> bool:
        """Was this a quick-mode audit (``--quick``: coarser search, fewer repeats and samples, wider intervals)?"""
        return self.extra.get("quick") is True

    @property
    def gate_rules(self) -> dict[str, Any] | None:
        """The gate rules recorded with the verdict (``config.gate``: thresholds, min_clean_accuracy, max_drop)."""
        return self.extra.get("gate")

    @property
    def has_rules(self) -> bool:
        rules = self.gate_rules or {}
        return bool(rules.get("thresholds") or rules.get("min_clean_accuracy") is not None
                    or rules.get("max_drop") is not None)


@dataclass(frozen=True)
class RuntimeInfo(_Section):
    """``runtime``: the provider that really ran, onnxruntime's version, the time taken and notes."""

    provider: str
    onnxruntime_version: str
    elapsed_s: float
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def notes(self) -> tuple[str, ...]:
        return tuple(self.extra.get("notes", ()))


# --- sites ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Weight(_Section):
    """The weights of a site's layer: tensor name, mean |W| and L2 norm."""

    name: str
    mean_abs: float
    l2: float
    extra: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class PerRepeat(_Section):
    """Per noise draw of one σ level: samples classified correctly and passes with NaN/Inf scores (since 1.1)."""

    correct: tuple[int, ...]
    nonfinite: tuple[int, ...]
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def lost(self) -> tuple[int, ...] | None:
        """Per draw, the samples the clean model got right and the noisy one wrong (with ``Point.clean_correct``;
        None in reports without the pairing)."""
        lost = self.extra.get("lost")
        return None if lost is None else tuple(lost)


@dataclass(frozen=True)
class CleanCounts(_Section):
    """The clean pass as counts (since 1.1): ``clean_accuracy == correct / samples``."""

    correct: int
    samples: int
    extra: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class Fit(_Section):
    """How σ50 was found: ``method`` (logistic, logistic-free-floor, isotonic, interpolation, censored; ``estimator``
    says it in one word), whether the intended estimate was obtained (``ok``), the logistic ``params`` (hi, lo, m, w)
    and a ``message``."""

    method: str
    ok: bool
    params: dict[str, Any]
    ci_method: str | None
    message: str | None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def estimator(self) -> str:
        """What σ50 comes from: logistic, isotonic, interpolated, censored or none (``fit.estimator``; read from the
        method in reports that predate it)."""
        given: str | None = self.extra.get("estimator")
        if given is not None:
            return given
        return {"logistic-free-floor": "logistic", "interpolation": "interpolated"}.get(self.method, self.method)

    @property
    def found_midpoint(self) -> bool:
        """False when the fit says there is no σ50 at all (a censoring that is not ok: clean accuracy not above
        chance, or no finite accuracy); the midpoint is then only the grid's end and proves nothing."""
        return not (self.method == "censored" and not self.ok)

    @property
    def logistic(self) -> tuple[float, float, float, float] | None:
        """(hi, lo, m, w) of ``acc(u) = lo + (hi - lo) / (1 + exp((u - m) / w))``, u = log10 σ; None if not fitted."""
        hi, lo, m, w = (self.params.get(k) for k in ("hi", "lo", "m", "w"))
        if hi is None or lo is None or m is None or w is None or w <= 0:
            return None
        return hi, lo, m, w


@dataclass(frozen=True)
class Point(_Section):
    """Accuracy at one noise level σ: mean and std over ``repeats`` draws of ``samples`` samples each."""

    sigma: float
    accuracy: float
    accuracy_std: float
    repeats: int
    samples: int
    nonfinite: int = 0  # noisy passes whose class output held NaN/Inf (counted as misclassified)
    per_repeat: PerRepeat | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.per_repeat, dict):  # compatibility: built from dicts
            object.__setattr__(self, "per_repeat", PerRepeat.from_dict(self.per_repeat))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Point:
        per_repeat = data.get("per_repeat")
        return cls(float(data["sigma"]), float(data["accuracy"]), float(data["accuracy_std"]), int(data["repeats"]),
                   int(data["samples"]), int(data["nonfinite"]),
                   None if per_repeat is None else PerRepeat.from_dict(per_repeat),
                   _extra(data, (*cls._keys(),)))

    @property
    def clean_correct(self) -> int | None:
        """Of the samples behind this point, those the clean model classified correctly (None in reports without
        the pairing): ``accuracy`` is read relative to their clean accuracy (docs/method.md, "Paired accuracies")."""
        return self.extra.get("clean_correct")

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"sigma": self.sigma, "accuracy": self.accuracy, "accuracy_std": self.accuracy_std,
                "repeats": self.repeats, "samples": self.samples, "nonfinite": self.nonfinite}
        if self.per_repeat is not None:
            body["per_repeat"] = self.per_repeat.to_dict()
        return {**body, **copy.deepcopy(self.extra)}


@dataclass(frozen=True, repr=False)
class SiteResult(_Section):
    """One noise site (a tensor of the graph; in global mode one site named ``global``): its accuracy-vs-σ points,
    σ50 (``midpoint``; the grid bound when ``censored`` is ``above`` or ``below``), σ50 / activation std, the 95%
    interval and the fit behind them.

    ``SiteResult.from_dict(d)`` validates ``d`` against the schema's site definition; ``to_dict()`` gives it back.
    """

    index: int | None
    name: str
    node: str | None
    op_type: str
    shape: tuple[int | str | None, ...] | None
    activation_std: float | None
    weight: Weight | None
    points: tuple[Point, ...]
    midpoint: float | None
    midpoint_relative: float | None
    ci95: tuple[float, float] | None
    censored: str | None
    fit: Fit
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:  # compatibility: built from lists and dicts (the 1.0 constructor)
        if isinstance(self.weight, dict):
            object.__setattr__(self, "weight", Weight.from_dict(self.weight))
        if isinstance(self.fit, dict):
            object.__setattr__(self, "fit", Fit.from_dict(self.fit))
        for name in ("shape", "ci95"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "points", tuple(p if isinstance(p, Point) else Point.from_dict(p)
                                                 for p in self.points))

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, validate: bool = True) -> SiteResult:
        """A site from its JSON form; UsageError (one line, with the JSON path) when it breaks the schema."""
        if validate:
            _check_document(data, "site", schema=_site_schema())
        return cls(
            _int(data["index"]), data["name"], data["node"], data["op_type"],
            None if data["shape"] is None else tuple(_int(d) for d in data["shape"]),
            data["activation_std"], None if data["weight"] is None else Weight.from_dict(data["weight"]),
            tuple(Point.from_dict(p) for p in data["points"]), data["midpoint"], data["midpoint_relative"],
            None if data["ci95"] is None else tuple(data["ci95"]), data["censored"], Fit.from_dict(data["fit"]),
            _extra(data, cls._keys()),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index, "name": self.name, "node": self.node, "op_type": self.op_type,
            "shape": None if self.shape is None else list(self.shape), "activation_std": self.activation_std,
            "weight": None if self.weight is None else self.weight.to_dict(),
            "points": [p.to_dict() for p in self.points], "midpoint": self.midpoint,
            "midpoint_relative": self.midpoint_relative, "ci95": None if self.ci95 is None else list(self.ci95),
            "censored": self.censored, "fit": self.fit.to_dict(), **copy.deepcopy(self.extra),
        }

    @property
    def module(self) -> str | None:
        """The module path the exporter recorded for the site (torch dynamo: ``layer3.1.conv2``); None where the
        graph has none (and in reports before walkaudit 0.3)."""
        value = self.extra.get("module")
        return value if isinstance(value, str) and value else None

    @property
    def tolerance(self) -> list[dict[str, Any]]:
        """Per requested drop (`--drop`): ``{drop, of, sigma, ci95, censored}``; empty when none was asked for."""
        return list(self.extra.get("tolerance") or [])

    @property
    def sigma50(self) -> float | None:
        """σ50 (or its censoring bound) when there is one; None when nothing was measured or the fit found no
        midpoint (then ``midpoint`` is at most the grid's end and proves nothing)."""
        if self.midpoint is None or not self.fit.found_midpoint:
            return None
        return self.midpoint

    @property
    def sigma50_relative(self) -> float | None:
        """σ50 / activation std (``midpoint_relative``, or computed from the std), None when either is missing."""
        if self.sigma50 is None:
            return None
        if self.midpoint_relative is not None:
            return self.midpoint_relative
        if self.activation_std:
            return self.sigma50 / self.activation_std
        return None

    def __repr__(self) -> str:
        midpoint = format_sigma(self.midpoint, self.censored)  # its level's unit is the report's (`report_level`)
        return f"SiteResult({printable(self.name)!s}, {self.op_type}, midpoint {midpoint})"


# --- gate -------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Failure:
    """One broken gate rule. ``site`` is None for model-level rules; ``value``/``threshold`` are in the rule's unit
    (σ, σ/std, accuracy fraction, or the drop in % or decades; None or non-finite when there is no number)."""

    rule: str
    site: str | None
    value: float | None
    threshold: float | None
    message: str
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Failure:
        return cls(data["rule"], data["site"], data["value"], data["threshold"], data["message"],
                   _extra(data, ("rule", "site", "value", "threshold", "message")))

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "site": self.site, "value": _json_number(self.value),
                "threshold": _json_number(self.threshold), "message": self.message, **copy.deepcopy(self.extra)}


@dataclass
class GateResult:
    """The gate's verdict (``report.gate``): passed, every failure, the warnings, the rules it could not decide.

    ``verdict`` says what happened in one word (docs/method.md "Decisions"): ``passed`` (every rule shown to hold),
    ``failed`` (a rule shown broken), ``undecided`` (no rule broken, but a 95 % interval straddles a threshold:
    ``undecided`` lists them; ``passed`` then follows the ``--undecided`` policy), ``incomplete`` (a partial
    report: ``passed`` is None, whatever was found so far is listed) or ``no gate`` (no rule was given: nothing
    was checked, ``passed`` stays true so that the exit code is 0). ``exit_code`` is 0 only when ``passed``.
    """

    passed: bool | None
    failures: list[Failure] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    undecided: list[Failure] = field(default_factory=list)
    verdict: str | None = None  # None in a report of walkaudit before 0.3: `decision` derives it from `passed`

    @property
    def decision(self) -> str:
        """The verdict: ``verdict`` where the gate recorded it, else derived from ``passed`` (older reports)."""
        if self.verdict is not None:
            return self.verdict
        return ("incomplete" if self.passed is None else "failed" if self.failures else
                "undecided" if self.undecided else "passed" if self.passed else "failed")

    def __bool__(self) -> bool:
        return bool(self.passed)

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GateResult:
        return cls(data["passed"], [Failure.from_dict(f) for f in data["failures"]], list(data["warnings"]),
                   _extra(data, ("passed", "failures", "warnings", "undecided", "verdict")),
                   [Failure.from_dict(f) for f in data.get("undecided") or []], data.get("verdict"))

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, **({"verdict": self.verdict} if self.verdict is not None else {}),
                "failures": [f.to_dict() for f in self.failures],
                **({"undecided": [f.to_dict() for f in self.undecided]} if self.undecided else {}),
                "warnings": list(self.warnings), **copy.deepcopy(self.extra)}


# --- the report -------------------------------------------------------------------------------------------------

_HEADERS: dict[str, type[_Section]] = {"tool": ToolInfo, "model": ModelInfo,
                                        "data": DataInfo, "config": ConfigInfo, "runtime": RuntimeInfo}
_TOP_KEYS = ("schema", "tool", "model", "data", "config", "runtime", "clean_accuracy", "clean_counts", "chance",
             "num_classes", "sites", "summary", "gate", "partial")


@dataclass(frozen=True, repr=False)
class Report:
    """A walkaudit report: the audited model and data, how the audit ran, the clean accuracy, one
    :class:`SiteResult` per site, and the gate's verdict once a gate has run (``gate`` is None before).

    Build one with :meth:`from_dict` (validates against the JSON Schema) or :func:`load_report` (a file); write it with
    :meth:`to_dict` / :meth:`to_json`. Immutable: :meth:`with_gate` returns a gated copy.
    """

    tool: ToolInfo
    model: ModelInfo
    data: DataInfo
    config: ConfigInfo
    runtime: RuntimeInfo
    clean_accuracy: float
    chance: float
    num_classes: int
    sites: tuple[SiteResult, ...]
    gate: GateResult | None = None
    partial: bool = False
    clean_counts: CleanCounts | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:  # compatibility: the 1.0 constructor took dicts and lists
        for name, cls in _HEADERS.items():
            if isinstance(getattr(self, name), dict):
                object.__setattr__(self, name, cls.from_dict(getattr(self, name)))
        if isinstance(self.gate, dict):
            object.__setattr__(self, "gate", GateResult.from_dict(self.gate))
        if isinstance(self.clean_counts, dict):
            object.__setattr__(self, "clean_counts", CleanCounts.from_dict(self.clean_counts))
        object.__setattr__(self, "sites", tuple(self.sites))

    # --- JSON ---------------------------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Any) -> Report:
        """Validate ``data`` (a parsed JSON report of schema 1.x) and build the typed report.

        Raises UsageError with one line naming the JSON path and the problem: another major version, a wrong type
        anywhere, a missing key, a non-finite number, nesting deeper than :data:`MAX_DEPTH`, numbers that disagree
        with each other (per-repeat counts not one per repeat or above ``samples``, an ``accuracy`` or
        ``clean_accuracy`` its counts do not give, a point with more samples than the clean pass, ``evaluations``
        other than the points' repeats × samples, a shard outside 1..N, a site index or name twice).
        """
        check_report_version(data)
        _check_document(data, "")
        counts = data.get("clean_counts")
        gate = data.get("gate")
        headers: dict[str, Any] = {name: section.from_dict(data[name]) for name, section in _HEADERS.items()}
        return cls(
            **headers,
            clean_accuracy=data["clean_accuracy"], chance=data["chance"], num_classes=_int(data["num_classes"]),
            sites=tuple(SiteResult.from_dict(s, validate=False) for s in data["sites"]),
            gate=None if gate is None else GateResult.from_dict(gate), partial=data["partial"],
            clean_counts=None if counts is None else CleanCounts.from_dict(counts),
            extra=_extra(data, _TOP_KEYS),
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON report (schema ``walkaudit.report/1.1``) as a fresh dict; ``summary`` is derived from the sites."""
        body: dict[str, Any] = {"schema": SCHEMA}
        body.update({name: getattr(self, name).to_dict() for name in _HEADERS})
        body["clean_accuracy"] = self.clean_accuracy
        if self.clean_counts is not None:
            body["clean_counts"] = self.clean_counts.to_dict()
        body.update(chance=self.chance, num_classes=self.num_classes, sites=[s.to_dict() for s in self.sites],
                    summary=self.summary())
        if self.gate is not None:
            body["gate"] = self.gate.to_dict()
        body["partial"] = self.partial
        body.update(copy.deepcopy(self.extra))
        clean: dict[str, Any] = _clean_floats(body)
        return clean

    def to_json(self) -> str:
        return dumps(self.to_dict())

    # --- derived ------------------------------------------------------------------------------------------------

    @property
    def weakest(self) -> SiteResult | None:
        """The site with the lowest σ50 (censored-above sites only count by their bound; sites without σ50 never)."""
        ranked = [s for s in self.sites if s.sigma50 is not None]
        return min(ranked, key=lambda s: (s.censored == "above", s.sigma50), default=None)

    def summary(self) -> dict[str, Any]:
        """``summary``: the weakest site, its σ50 and the number of sites."""
        w = self.weakest
        return {"weakest_site": w.name if w else None, "min_midpoint": w.midpoint if w else None,
                "sites": len(self.sites)}

    @property
    def above_chance(self) -> bool:
        """Whether the clean accuracy is above chance: otherwise no σ50 means anything."""
        return self.clean_accuracy > self.chance

    def site(self, name: str) -> SiteResult | None:
        """The first site of that tensor name."""
        return next((s for s in self.sites if s.name == name), None)

    def with_gate(self, gate: GateResult, rules: dict[str, Any] | None = None) -> Report:
        """A copy carrying ``gate`` as its verdict and, when given, ``rules`` as ``config.gate``."""
        config = self.config
        if rules is not None:
            config = replace(config, extra={**config.extra, "gate": copy.deepcopy(rules)})
        return replace(self, gate=gate, config=config)

    def __repr__(self) -> str:
        weakest = self.weakest
        level = report_level(self.config)  # σ50, BER50, t50, Δ50 ... by the report's noise model
        where = "none" if weakest is None else \
            f"{printable(weakest.name)} ({midpoint_text(weakest.sigma50, weakest.censored, level)})"
        gate = "" if self.gate is None else f", gate {self.gate.decision}"
        partial = ", partial" if self.partial else ""
        return (f"<walkaudit Report {printable(self.model.file_name)}: clean accuracy {self.clean_accuracy:.4f}, "
                f"{len(self.sites)} sites, weakest {where}{gate}{partial}>")

    __str__ = __repr__


def load_report(path: str | Path) -> Report:
    """Read and validate a JSON report file. Every problem is a UsageError of one line naming the file: missing,
    not a regular file, larger than :data:`MAX_REPORT_BYTES`, not UTF-8, not JSON, ``NaN``/``Infinity`` literals or
    numbers out of float range, nesting too deep, another major version, anything the schema refuses."""
    shown = printable(path)
    try:
        raw = read_limited(path, "report")
    except FileNotFoundError:
        raise UsageError(f"report not found: {shown}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{shown} is not a JSON report: not UTF-8 text (byte {exc.start})") from None
    try:
        data = json.loads(text, parse_constant=_refuse_constant, parse_float=_parse_float)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{shown} is not a JSON report: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise UsageError(f"{shown} is not a walkaudit report: JSON nested too deeply") from None
    except ValueError as exc:  # NaN/Infinity, 1e999, integers of thousands of digits
        raise UsageError(f"{shown} is not a valid report: {printable(str(exc).splitlines()[0])}") from None
    try:
        return Report.from_dict(data)
    except UsageError as exc:
        raise UsageError(f"{shown}: {exc}") from None
    except RecursionError:
        raise UsageError(f"{shown} is not a walkaudit report: JSON nested too deeply") from None


def read_limited(path: str | Path, what: str, *, links: bool = True) -> bytes:
    """The bytes of a file walkaudit reads back (a report, a checkpoint), refused with one UsageError line naming
    it as `what` when it is not a regular file (a FIFO would block, /dev/zero never ends) or larger than
    :data:`MAX_REPORT_BYTES`; `links=False` also refuses a symlink. FileNotFoundError passes through."""
    shown = printable(path)
    try:
        info = os.stat(path) if links else os.lstat(path)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise UsageError(f"cannot read {what} {shown}: {printable(exc.strerror or exc)}") from None
    if stat.S_ISLNK(info.st_mode):
        raise UsageError(f"{what} {shown} is a symbolic link: walkaudit never reads or writes a {what} through one")
    if stat.S_ISDIR(info.st_mode):
        raise UsageError(f"{what} {shown} is not a regular file (a directory)")
    if not stat.S_ISREG(info.st_mode):
        raise UsageError(f"{what} {shown} is not a regular file (a device, FIFO or socket)")
    if info.st_size > MAX_REPORT_BYTES:
        raise UsageError(f"{what} {shown} is {info.st_size / 2**20:.0f} MiB, more than the "
                         f"{MAX_REPORT_BYTES // 2**20} MiB a walkaudit {what} can be")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | (0 if links else getattr(os, "O_NOFOLLOW", 0))
    try:  # O_NONBLOCK (and O_NOFOLLOW): a file swapped for a FIFO (or a link) since the stat neither blocks nor follows
        with os.fdopen(os.open(path, flags), "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise UsageError(f"{what} {shown} is not a regular file (a device, FIFO or socket)")
            raw = fh.read(MAX_REPORT_BYTES + 1)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise UsageError(f"cannot read {what} {shown}: {printable(exc.strerror or exc)}") from None
    if len(raw) > MAX_REPORT_BYTES:
        raise UsageError(f"{what} {shown} is more than the {MAX_REPORT_BYTES // 2**20} MiB a walkaudit {what} can be")
    return raw


# --- validation -------------------------------------------------------------------------------------------------

def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"non-finite number {name} (JSON has no NaN or Infinity)")


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


@lru_cache(maxsize=1)
def _site_schema() -> dict[str, Any]:
    from walkaudit.report.schema import load_schema

    schema = load_schema()
    return {"$schema": schema["$schema"], "$defs": schema["$defs"], "$ref": "#/$defs/site"}


@lru_cache(maxsize=1)
def _site_validator() -> Any:
    return type(schema_validator())(_site_schema())


def _check_document(data: Any, prefix: str, schema: dict[str, Any] | None = None) -> None:
    """Nesting, finiteness, the JSON Schema, then what the schema cannot say (per-repeat lengths, counts)."""
    _check_values(data, prefix)
    validator = schema_validator() if schema is None else _site_validator()
    from jsonschema.exceptions import best_match

    error = best_match(validator.iter_errors(_points_checked(data, prefix, top=schema is None)))
    if error is not None:
        path = list(error.absolute_path)
        if error.validator == "required":  # name the missing key itself
            path.append(next(k for k in error.validator_value if k not in error.instance))
            raise UsageError(f"{_where(prefix, path)}: missing (a required key)")
        raise UsageError(f"{_where(prefix, path)}: {_problem(error)}")
    sites = data["sites"] if schema is None else [data]
    for i, site in enumerate(sites):
        where = f"sites[{i}]" if schema is None else prefix
        for j, point in enumerate(site["points"]):
            _check_counts(point, f"{where}.points[{j}]")
    if schema is None:
        _check_report_numbers(data)


#: the per-repeat count lists of a point (``per_repeat.KEY``), each entry at most ``samples``: one line per count
#: field. ``correct`` gives ``accuracy``; a key named in :data:`_POINT_TOTALS` is summed into a field of the point.
_PER_REPEAT_COUNTS = ("correct", "nonfinite", "lost")
#: per-repeat counts whose sum over the repeats is a field of the point: per_repeat key -> point key
_POINT_TOTALS = {"nonfinite": "nonfinite"}
#: how far a stored accuracy may be from its counts (float rounding of mean(correct / samples), nothing more)
ACCURACY_TOLERANCE = 1e-9


def _check_counts(point: dict[str, Any], where: str) -> None:
    """What the schema cannot say about one point's numbers: one count per repeat, each at most ``samples``;
    ``accuracy`` is the counts' mean over ``samples`` and ``nonfinite`` their sum; without per-repeat counts (1.0)
    ``nonfinite`` is at most repeats × samples."""
    repeats, samples = point["repeats"], point["samples"]
    per_repeat = point.get("per_repeat")
    if per_repeat is None:
        if point["nonfinite"] > repeats * samples:
            raise UsageError(f"{where}.nonfinite: {point['nonfinite']} is more than repeats × samples "
                             f"({repeats} × {samples})")
        return
    here = f"{where}.per_repeat"
    for key in _PER_REPEAT_COUNTS:
        values = per_repeat.get(key)
        if values is None:
            continue  # a count added in a later minor version, absent from older reports
        if len(values) != repeats:
            raise UsageError(f"{here}.{key}: {len(values)} entries, but repeats is {repeats}")
        if any(v > samples for v in values):
            raise UsageError(f"{here}.{key}: a count is larger than samples ({samples})")
    for key, total in _POINT_TOTALS.items():
        if sum(per_repeat[key]) != point[total]:
            raise UsageError(f"{where}.{total}: {point[total]}, but {here}.{key} adds up to {sum(per_repeat[key])}")
    clean_correct = point.get("clean_correct")
    if clean_correct is not None:
        if clean_correct > samples:
            raise UsageError(f"{where}.clean_correct: {clean_correct} is more than samples ({samples})")
        if any(v > clean_correct for v in per_repeat.get("lost") or ()):
            raise UsageError(f"{here}.lost: a count is larger than clean_correct ({clean_correct})")
    if repeats and samples and clean_correct is None:  # a paired point is checked with the report's clean accuracy
        counted = sum(per_repeat["correct"]) / (repeats * samples)
        if abs(counted - point["accuracy"]) > ACCURACY_TOLERANCE:
            raise UsageError(f"{where}.accuracy: {_short(point['accuracy'])}, but {here}.correct gives "
                             f"{counted:.6g} ({sum(per_repeat['correct'])} of {repeats} × {samples})")


def _check_report_numbers(data: dict[str, Any]) -> None:
    """The report's numbers against each other: the clean counts give the clean accuracy, no point counts more
    samples than the clean pass, the evaluations are the points' repeats × samples, a shard is one of 1..N, no site
    index or name twice."""
    counts = data.get("clean_counts")
    if counts is not None:
        if counts["correct"] > counts["samples"]:
            raise UsageError(f"clean_counts: correct {counts['correct']} is more than samples {counts['samples']}")
        if counts["samples"] and abs(counts["correct"] / counts["samples"] - data["clean_accuracy"]) > \
                ACCURACY_TOLERANCE:
            raise UsageError(f"clean_accuracy: {_short(data['clean_accuracy'])}, but clean_counts gives "
                             f"{counts['correct'] / counts['samples']:.6g} "
                             f"({counts['correct']} of {counts['samples']})")
    scored_tokens = data["data"].get("scored") == "tokens"
    most = counts["samples"] if counts is not None else None if scored_tokens else data["data"]["samples"]
    evaluations = 0
    indices: dict[Any, int] = {}
    names: dict[Any, int] = {}
    for i, site in enumerate(data["sites"]):
        for j, point in enumerate(site["points"]):
            if most is not None and point["samples"] > most:
                raise UsageError(f"sites[{i}].points[{j}].samples: {point['samples']}, more than the "
                                 f"{most} the clean pass counted")
            evaluations += point["repeats"] * point["samples"]
            _check_paired_accuracy(point, data, f"sites[{i}].points[{j}]")
        for key, seen in (("index", indices), ("name", names)):
            value = site[key]
            if value is not None and value in seen:
                raise UsageError(f"sites[{i}].{key}: {_short(value)} is also sites[{seen[value]}]'s")
            seen[value] = i
    claimed = data["runtime"].get("evaluations")
    if isinstance(claimed, (int, float)) and not isinstance(claimed, bool) and claimed != evaluations:
        raise UsageError(f"runtime.evaluations: {_short(claimed)}, but the points add up to {evaluations} "
                         "(repeats × samples)")
    shard = data["config"].get("shard")
    if shard is not None:
        if not (isinstance(shard, list) and len(shard) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                   for v in shard) and 1 <= shard[0] <= shard[1]):
            raise UsageError(f"config.shard: {_short(shard) if not isinstance(shard, list) else shard} is not a "
                             "shard I/N with 1 ≤ I ≤ N")


def _check_paired_accuracy(point: dict[str, Any], data: dict[str, Any], where: str) -> None:
    """A point paired with the clean pass states its counts read against the clean accuracy of the samples it
    evaluated (`sweep.accuracy`): its accuracy must be what its counts give that way."""
    per_repeat = point.get("per_repeat")
    if point.get("clean_correct") is None or not per_repeat or not point["repeats"] or not point["samples"]:
        return
    import numpy as np

    from walkaudit._analysis.sweep import accuracy
    from walkaudit._units import Counts

    correct = np.array([per_repeat["correct"]], np.int64)
    lost = np.array([per_repeat.get("lost") or [0] * point["repeats"]], np.int64)
    level = Counts((point["sigma"],), correct, np.zeros_like(correct), point["samples"],
                   clean_correct=point["clean_correct"], lost=lost)
    counted = float(np.mean(accuracy(level, data["clean_accuracy"], data["chance"])))
    if abs(counted - point["accuracy"]) > ACCURACY_TOLERANCE:
        raise UsageError(f"{where}.accuracy: {_short(point['accuracy'])}, but its counts give {counted:.6g} "
                         f"({sum(per_repeat['correct'])} of {point['repeats']} × {point['samples']}, "
                         f"{point['clean_correct']} right without noise)")


def _points_checked(data: Any, prefix: str, top: bool) -> Any:
    """Check every point by hand (jsonschema takes ~0.6 ms a point, too slow for reports of thousands) and return
    the document with the checked point lists emptied, for jsonschema to check the rest. :func:`_check_point` is the
    schema's ``$defs/point`` written out; tests/test_report_model.py holds the two to the same verdicts."""
    sites = data.get("sites") if top and isinstance(data, dict) else [data]
    if not isinstance(sites, list):
        return data
    stripped = []
    for i, site in enumerate(sites):
        if isinstance(site, dict) and isinstance(site.get("points"), list):
            where = f"sites[{i}]" if top else prefix
            for j, point in enumerate(site["points"]):
                _check_point(point, f"{where}.points[{j}]")
            site = {**site, "points": []}
        stripped.append(site)
    return {**data, "sites": stripped} if top else stripped[0]


_POINT_KEYS = ("sigma", "accuracy", "accuracy_std", "repeats", "samples", "nonfinite")


def _check_point(point: Any, where: str) -> None:
    if not isinstance(point, dict):
        got = _short(point) if isinstance(point, list) else f"{_json_type(point)} {_short(point)}"
        raise UsageError(f"{where}: expected object, got {got}")
    for key in _POINT_KEYS:
        if key not in point:
            raise UsageError(f"{where}.{key}: missing (a required key)")
    for key in _POINT_KEYS:
        value, integer = point[key], key in ("repeats", "samples", "nonfinite")
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and integer and isinstance(value, float):
            ok = value.is_integer()
        if not ok:
            got = _short(value) if isinstance(value, (dict, list)) else f"{_json_type(value)} {_short(value)}"
            raise UsageError(f"{where}.{key}: expected {'integer' if integer else 'number'}, got {got}")
        if value < 0:
            raise UsageError(f"{where}.{key}: {_short(value)} is below the minimum 0")
        if key == "accuracy" and value > 1:
            raise UsageError(f"{where}.{key}: {_short(value)} is above the maximum 1")
    if "clean_correct" in point:
        _check_count(point["clean_correct"], f"{where}.clean_correct")
    per_repeat = point.get("per_repeat")
    if "per_repeat" not in point:
        return
    here = f"{where}.per_repeat"
    if not isinstance(per_repeat, dict):
        got = _short(per_repeat) if isinstance(per_repeat, list) else f"{_json_type(per_repeat)} {_short(per_repeat)}"
        raise UsageError(f"{here}: expected object, got {got}")
    for key in ("correct", "nonfinite", "lost"):
        if key not in per_repeat:
            if key == "lost":  # optional: the pairing with the clean pass
                continue
            raise UsageError(f"{here}.{key}: missing (a required key)")
        values = per_repeat[key]
        if not isinstance(values, list):
            got = _short(values) if isinstance(values, dict) else f"{_json_type(values)} {_short(values)}"
            raise UsageError(f"{here}.{key}: expected array, got {got}")
        for k, value in enumerate(values):
            _check_count(value, f"{here}.{key}[{k}]")


def _check_count(value: Any, where: str) -> None:
    """A non-negative integer (a float with an integer value passes, as JSON Schema's integer allows)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (isinstance(value, float) and not value.is_integer()):
        got = _short(value) if isinstance(value, (dict, list)) else f"{_json_type(value)} {_short(value)}"
        raise UsageError(f"{where}: expected integer, got {got}")
    if value < 0:
        raise UsageError(f"{where}: {_short(value)} is below the minimum 0")


def _check_values(data: Any, prefix: str) -> None:
    """Refuse NaN/±inf, integers beyond float range and nesting deeper than MAX_DEPTH (iteratively: no recursion)."""
    stack: list[tuple[Any, tuple[Any, ...], int]] = [(data, (), 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth >= MAX_DEPTH:
                raise UsageError(f"{_where(prefix, path)}: nested more than {MAX_DEPTH} levels deep")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            stack.extend((v, (*path, k), depth + 1) for k, v in items)
        elif isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"{_where(prefix, path)}: non-finite number {value} (JSON has no NaN or Infinity)")
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**1023:
            raise UsageError(f"{_where(prefix, path)}: integer out of range")


def _where(prefix: str, path: Iterable[Any]) -> str:
    text = prefix
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    if len(text) > 100:
        text = text[:60] + "…" + text[-30:]
    return printable(text) if text else "(top level)"


_JSON_TYPES = ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"), (list, "array"),
               (dict, "object"), (type(None), "null"))


def _json_type(value: Any) -> str:
    return next(name for kind, name in _JSON_TYPES if isinstance(value, kind))


def _short(value: Any) -> str:
    """A value for a message: scalars as JSON (cut at 60 characters), containers by their kind."""
    if isinstance(value, (dict, list)):
        return f"an {_json_type(value)}"
    text = json.dumps(value, ensure_ascii=False)
    return printable(text if len(text) <= 60 else text[:57] + "…")


def _problem(error: Any) -> str:  # a jsonschema ValidationError
    kind, expected, value = error.validator, error.validator_value, error.instance
    if kind == "type":
        wanted = " or ".join(expected) if isinstance(expected, list) else expected
        got = _short(value) if isinstance(value, (dict, list)) else f"{_json_type(value)} {_short(value)}"
        return f"expected {wanted}, got {got}"
    if kind in ("enum", "const"):
        options = expected if kind == "enum" else [expected]
        return f"{_short(value)} is not one of {', '.join(json.dumps(o) for o in options)}"
    if kind in ("minimum", "maximum"):
        return f"{_short(value)} is {'below the minimum' if kind == 'minimum' else 'above the maximum'} {expected}"
    if kind == "pattern":
        return f"{_short(value)} does not match {expected!r}"
    if kind in ("minItems", "maxItems"):
        return f"expected {'at least' if kind == 'minItems' else 'at most'} {expected} items, got {len(value)}"
    if kind == "oneOf":
        return f"{_short(value)} is none of the allowed forms"
    message = printable(error.message)
    return message if len(message) <= 160 else message[:157] + "…"


# --- helpers ----------------------------------------------------------------------------------------------------

def _extra(data: dict[str, Any], known: Collection[str]) -> dict[str, Any]:
    return {k: copy.deepcopy(v) for k, v in data.items() if k not in known}


def _frozen(value: Any) -> Any:
    """Lists become tuples (the typed objects are immutable); dicts are copied."""
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return copy.deepcopy(value)
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return copy.deepcopy(value)
    return value


def _int(value: Any) -> Any:
    """JSON Schema counts 3.0 as an integer; the typed report holds 3."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _json_number(value: Any) -> float | None:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def _clean_floats(value: Any) -> Any:
    """NaN/Inf are not JSON: they become null (reports built in memory; validated ones hold none)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean_floats(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean_floats(v) for v in value]
    return value
