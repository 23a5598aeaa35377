"""CI gate: rules over a walkaudit report -> pass/fail with the site and the numbers behind every failure.

Pure: no I/O except :func:`load_rules`, which reads the TOML rules file it is given. Nothing here prints or exits;
:class:`GateResult` carries the verdict and its ``exit_code`` (0 pass, 1 gate failed). Bad rules raise
:class:`walkaudit.errors.UsageError` (exit code 2 at the CLI).

Rules (combinable; every rule is checked and every failure is reported):

- **fail-under** (:class:`Threshold`): σ50 of every site whose tensor name matches ``pattern`` (``re.search``;
  ``None`` = all sites) must be at least ``value``. ``relative=True`` checks σ50 / activation std
  (``midpoint_relative``) instead of the absolute σ50.
- **min clean accuracy**: the model's clean accuracy must be at least this fraction.
- **max drop** (:class:`Drop`, needs a baseline report): no site's σ50 may fall by more than ``"20%"`` of the
  baseline's σ50, or by more than ``"0.3dec"`` decades (a bare number like ``"0.3"`` also means decades).

Censoring (a σ50 reported as a bound, see docs/ci.md "Censoring") is handled as intervals: "above" means σ50 lies in
(bound, ∞), "below" means (0, bound). A rule fails when the interval proves it broken, passes when the interval
proves it holds, and otherwise follows the evidence: a site that never fell to halfway inside the grid passes with a
warning; a site that was already below halfway at the smallest σ fails. A regression against the baseline is
reported only when even the most favourable reading (the baseline's lower end, the new report's upper end,
95% intervals included) drops by more than allowed; a drop that only the point estimates show is a warning.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from walkaudit.errors import UsageError
from walkaudit.report.schema import check_report_version

__all__ = [
    "Drop",
    "Failure",
    "GateConfig",
    "GateResult",
    "Threshold",
    "check_comparable",
    "evaluate",
    "load_rules",
    "parse_drop",
    "parse_rule",
]

# rule names as they appear in report["gate"]["failures"][*]["rule"]
RULE_FAIL_UNDER = "fail_under"
RULE_FAIL_UNDER_RELATIVE = "fail_under_relative"
RULE_MIN_CLEAN_ACCURACY = "min_clean_accuracy"
RULE_MAX_DROP = "max_drop"

_INF = math.inf


# --- configuration ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Threshold:
    """σ50 (or σ50 / activation std when ``relative``) of the sites matching ``pattern`` must be >= ``value``.

    ``pattern`` is a regular expression searched (``re.search``) in the site's tensor name; anchor it with ``^...$``
    for an exact match. ``None`` means every site.
    """

    pattern: str | None
    value: float
    relative: bool = False

    def __post_init__(self) -> None:
        if self.pattern is not None:
            _compile(self.pattern)
        if not (isinstance(self.value, (int, float)) and math.isfinite(self.value) and self.value >= 0):
            raise UsageError(f"threshold must be a finite number >= 0, got {self.value!r}")

    @property
    def rule(self) -> str:
        return RULE_FAIL_UNDER_RELATIVE if self.relative else RULE_FAIL_UNDER

    def matches(self, site_name: str) -> bool:
        return self.pattern is None or _compile(self.pattern).search(site_name) is not None

    def __str__(self) -> str:
        return f"{self.pattern or '*'}:{self.value:g}{'rel' if self.relative else ''}"


@dataclass(frozen=True)
class Drop:
    """The largest allowed fall of a site's σ50 relative to the baseline.

    ``unit="%"``: drop = (old - new) / old * 100, e.g. ``Drop(20, "%")`` allows new >= 0.8 * old.
    ``unit="dec"``: drop = log10(old / new) in decades, e.g. ``Drop(0.3, "dec")`` allows new >= old / 10**0.3
    (about half). A drop <= 0 is an improvement.
    """

    amount: float
    unit: Literal["%", "dec"]

    def __post_init__(self) -> None:
        if self.unit not in ("%", "dec"):
            raise UsageError(f"max drop unit must be '%' or 'dec', got {self.unit!r}")
        if not (math.isfinite(self.amount) and self.amount >= 0):
            raise UsageError(f"max drop must be a finite number >= 0, got {self.amount!r}")
        if self.unit == "%" and self.amount > 100:
            raise UsageError(f"max drop {self.amount:g}% is more than 100%")

    def measure(self, old: float, new: float) -> float:
        """Drop from ``old`` to ``new`` σ50 in this unit; bounds may be 0 or inf (an unknown end of an interval)."""
        if old <= 0 or new == _INF:
            return -_INF  # nothing to fall from / no upper end: no drop can be shown
        if old == _INF:
            return 100.0 if self.unit == "%" else _INF
        if self.unit == "%":
            return (old - new) / old * 100.0
        return _INF if new <= 0 else math.log10(old / new)

    def __str__(self) -> str:
        return f"{self.amount:g}%" if self.unit == "%" else f"{self.amount:g}dec"


@dataclass(frozen=True)
class GateConfig:
    """All gate rules of one run. Empty config = always passes."""

    thresholds: tuple[Threshold, ...] = ()
    min_clean_accuracy: float | None = None
    max_drop: Drop | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "thresholds", tuple(self.thresholds))
        mca = self.min_clean_accuracy
        if mca is not None and not (isinstance(mca, (int, float)) and 0.0 <= mca <= 1.0):
            raise UsageError(f"min clean accuracy must be a fraction in [0, 1] (e.g. 0.9), got {mca!r}")

    def merge(self, override: GateConfig) -> GateConfig:
        """Thresholds of both; scalar rules of ``override`` where set (the CLI flags override the rules file)."""
        return GateConfig(
            thresholds=self.thresholds + override.thresholds,
            min_clean_accuracy=(override.min_clean_accuracy if override.min_clean_accuracy is not None
                                else self.min_clean_accuracy),
            max_drop=override.max_drop if override.max_drop is not None else self.max_drop,
        )

    @property
    def empty(self) -> bool:
        return not self.thresholds and self.min_clean_accuracy is None and self.max_drop is None

    def to_dict(self) -> dict:
        """JSON-ready description (e.g. for report["config"]["gate"])."""
        return {
            "thresholds": [{"pattern": t.pattern, "value": t.value, "relative": t.relative} for t in self.thresholds],
            "min_clean_accuracy": self.min_clean_accuracy,
            "max_drop": None if self.max_drop is None else str(self.max_drop),
        }


_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_DROP_RE = re.compile(rf"^\s*({_NUMBER})\s*(%|dec|decades?)?\s*$")
_VALUE_RE = re.compile(rf"^\s*({_NUMBER})\s*(rel)?\s*$")


def parse_drop(text: str | float) -> Drop:
    """``"20%"`` -> 20 percent; ``"0.3dec"``, ``"0.3decades"`` or ``"0.3"`` (or the number 0.3) -> 0.3 decades."""
    if isinstance(text, bool):
        raise UsageError(f"invalid max drop {text!r}")
    if isinstance(text, (int, float)):
        return Drop(float(text), "dec")
    match = _DROP_RE.match(str(text))
    if match is None:
        raise UsageError(f"invalid max drop {text!r}: use a percentage like '20%' or decades like '0.3dec'")
    return Drop(float(match.group(1)), "%" if match.group(2) == "%" else "dec")


def parse_rule(text: str, *, relative: bool = False) -> Threshold:
    """``"PATTERN:VALUE"`` -> Threshold. Split at the last ``:`` (tensor names like ``dense/BiasAdd:0`` keep theirs).

    ``"0.05"``, ``":0.05"`` and ``"*:0.05"`` apply to every site. A value suffix ``rel`` (``"conv.*:0.5rel"``) or
    ``relative=True`` makes it a relative threshold (σ50 / activation std).
    """
    pattern, sep, value_text = str(text).rpartition(":")
    if not sep:
        pattern = ""
    match = _VALUE_RE.match(value_text)
    if match is None:
        raise UsageError(f"invalid rule {text!r}: expected PATTERN:VALUE, e.g. 'conv.*:0.05' or 'fc.*:0.5rel'")
    pattern = pattern.strip()
    return Threshold(
        pattern=None if pattern in ("", "*") else pattern,
        value=float(match.group(1)),
        relative=relative or match.group(2) == "rel",
    )


_RULE_KEYS = {"pattern", "fail_under", "fail_under_relative"}
_TOP_KEYS = {"rule", "min_clean_accuracy", "max_drop", "fail_under", "fail_under_relative"}


def load_rules(path: str | Path) -> GateConfig:
    """Read a TOML rules file (format in docs/ci.md) into a GateConfig; any problem is a UsageError naming the file.

    ```toml
    min_clean_accuracy = 0.9
    max_drop = "20%"            # or "0.3dec"; a bare number means decades
    fail_under = 0.001          # every site (optional)

    [[rule]]
    pattern = "conv"            # regex searched in the tensor name; omitted or "*" = every site
    fail_under = 0.05           # absolute σ50
    fail_under_relative = 0.5   # σ50 / activation std (either or both)
    ```
    """
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise UsageError("reading a rules file needs Python 3.11+ or 'pip install tomli'") from None
    path = Path(path)
    try:
        with path.open("rb") as fh:
            doc = tomllib.load(fh)
    except FileNotFoundError:
        raise UsageError(f"rules file {path}: not found") from None
    except OSError as exc:
        raise UsageError(f"rules file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"rules file {path}: invalid TOML: {exc}") from None
    try:
        return _config_from_doc(doc)
    except UsageError as exc:
        raise UsageError(f"rules file {path}: {exc}") from None


def _config_from_doc(doc: dict[str, Any]) -> GateConfig:
    unknown = set(doc) - _TOP_KEYS
    if unknown:
        raise UsageError(f"unknown key(s) {', '.join(sorted(unknown))} (allowed: {', '.join(sorted(_TOP_KEYS))})")
    thresholds: list[Threshold] = []
    thresholds += _thresholds_of(doc, None, "top level")
    rules = doc.get("rule", [])
    if not isinstance(rules, list):
        raise UsageError("'rule' must be an array of tables: write [[rule]]")
    for number, entry in enumerate(rules, 1):
        where = f"rule #{number}"
        if not isinstance(entry, dict):
            raise UsageError(f"{where}: must be a table")
        unknown = set(entry) - _RULE_KEYS
        if unknown:
            raise UsageError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} "
                             f"(allowed: {', '.join(sorted(_RULE_KEYS))})")
        pattern = entry.get("pattern")
        if pattern is not None and not isinstance(pattern, str):
            raise UsageError(f"{where}: pattern must be a string")
        if pattern in ("", "*"):
            pattern = None
        found = _thresholds_of(entry, pattern, where)
        if not found:
            raise UsageError(f"{where}: needs fail_under or fail_under_relative")
        thresholds += found
    mca = doc.get("min_clean_accuracy")
    if mca is not None and (isinstance(mca, bool) or not isinstance(mca, (int, float))):
        raise UsageError("min_clean_accuracy must be a number")
    drop = doc.get("max_drop")
    return GateConfig(
        thresholds=tuple(thresholds),
        min_clean_accuracy=None if mca is None else float(mca),
        max_drop=None if drop is None else parse_drop(drop),
    )


def _thresholds_of(table: dict, pattern: str | None, where: str) -> list[Threshold]:
    out = []
    for key, relative in (("fail_under", False), ("fail_under_relative", True)):
        if key in table:
            value = table[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UsageError(f"{where}: {key} must be a number")
            out.append(Threshold(pattern, float(value), relative))
    return out


def _compile(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"invalid site pattern {pattern!r}: {exc}") from None


# --- results ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Failure:
    """One broken rule. ``site`` is None for model-level rules; ``value``/``threshold`` are in the rule's unit
    (σ, σ/std, accuracy fraction, or the drop in % or decades)."""

    rule: str
    site: str | None
    value: float | None
    threshold: float | None
    message: str

    def to_dict(self) -> dict:
        return {k: _json_number(v) if k in ("value", "threshold") else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class GateResult:
    """Verdict of :func:`evaluate`; ``to_dict()`` is report["gate"], ``exit_code`` is 0 (pass) or 1 (fail)."""

    passed: bool
    failures: list[Failure] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.passed

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "failures": [f.to_dict() for f in self.failures],
            "warnings": list(self.warnings),
        }


# --- evaluation ---------------------------------------------------------------------------------------------------

def evaluate(report: dict, config: GateConfig, baseline: dict | None = None) -> GateResult:
    """Apply ``config`` to ``report`` (and, for ``max_drop``, compare with ``baseline``).

    Raises UsageError when a report's schema version is not understood, or when the baseline was made with a
    different noise model, ratio or mode (see :func:`check_comparable`). Everything else becomes a Failure or a
    warning.
    """
    check_report_version(report)
    failures: list[Failure] = []
    warnings: list[str] = []
    if report.get("partial"):
        warnings.append("the report is partial (the audit stopped early): sites not measured were not checked")

    sites = list(report.get("sites") or [])
    for threshold in config.thresholds:
        matched = [s for s in sites if threshold.matches(str(s.get("name")))]
        if not matched:
            warnings.append(f"rule {threshold}: matches no site")
        for site in matched:
            _check_threshold(site, threshold, failures, warnings)

    if config.min_clean_accuracy is not None:
        clean = _number(report.get("clean_accuracy"))
        if clean is None:
            warnings.append("min clean accuracy: the report has no clean accuracy; not checked")
        elif clean < config.min_clean_accuracy:
            failures.append(Failure(
                RULE_MIN_CLEAN_ACCURACY, None, clean, config.min_clean_accuracy,
                f"clean accuracy {clean:.4g} < {config.min_clean_accuracy:.4g}"))

    if baseline is not None:
        check_report_version(baseline)
        warnings += check_comparable(baseline, report)
        if config.max_drop is None:
            warnings.append("a baseline was given but no max drop: the baseline was not compared")
        else:
            _check_drops(report, baseline, config.max_drop, failures, warnings)
    elif config.max_drop is not None:
        warnings.append(f"max drop {config.max_drop} set but no baseline given: not checked")

    return GateResult(passed=not failures, failures=failures, warnings=warnings)


def check_comparable(old: dict, new: dict) -> list[str]:
    """Refuse (UsageError) σ50 comparisons across noise models, combined-noise ratios or modes: those σ mean different
    things. Return warnings for softer mismatches (other data, other labels, partial reports).

    Only ``config``, ``data`` and ``partial`` are read, so it also works on ``{"config": {...}}`` stubs, e.g. to
    check a baseline before running the audit.
    """
    old_cfg, new_cfg = old.get("config") or {}, new.get("config") or {}
    for key, what in (("noise", "noise model"), ("mode", "mode")):
        a, b = old_cfg.get(key), new_cfg.get(key)
        if a is not None and b is not None and a != b:
            raise UsageError(f"cannot compare with the baseline: it used {what} {a!r}, this report {b!r}")
    if old_cfg.get("noise") == "combined" and new_cfg.get("noise") == "combined":
        a, b = _number(old_cfg.get("ratio")), _number(new_cfg.get("ratio"))
        if a is not None and b is not None and not math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12):
            raise UsageError(f"cannot compare with the baseline: it used combined noise ratio {a:g}, "
                             f"this report {b:g}")

    warnings = []
    old_data, new_data = old.get("data") or {}, new.get("data") or {}
    a, b = old_data.get("sha256"), new_data.get("sha256")
    if a and b and a != b:
        warnings.append("the baseline was measured on other data (data sha256 differs)")
    elif old_data.get("samples") is not None and new_data.get("samples") is not None \
            and old_data["samples"] != new_data["samples"]:
        warnings.append(f"the baseline used {old_data['samples']} samples, this report {new_data['samples']}")
    a, b = old_data.get("labels"), new_data.get("labels")
    if a and b and a != b:
        warnings.append(f"the baseline's labels were {a!r}, this report's {b!r}")
    if old.get("partial"):
        warnings.append("the baseline report is partial: sites it lacks were not compared")
    return warnings


def _check_threshold(site: dict, threshold: Threshold, failures: list[Failure], warnings: list[str]) -> None:
    name = str(site.get("name"))
    value = _site_value(site, threshold.relative)
    what = "σ50/std" if threshold.relative else "σ50"
    if value is None:
        reason = "no activation std" if threshold.relative and _number(site.get("midpoint")) is not None \
            else "no σ50"
        warnings.append(f"site {name}: {reason}; rule {threshold} not checked")
        return
    limit = threshold.value
    censored = site.get("censored")
    shown = _shown(value, censored)
    if censored == "above":
        if value < limit:
            warnings.append(f"site {name}: {what} {shown} never fell to halfway in the σ grid, whose top is below "
                            f"the threshold {limit:g}; passed without proof (extend the grid up)")
        return
    if censored == "below":
        if value <= limit:
            message = (f"{what} {shown} (already below halfway at the smallest σ tested) is under {limit:g} "
                       f"(rule {threshold})")
        else:
            message = (f"{what} {shown}: already below halfway at the smallest σ tested, which is above the "
                       f"threshold {limit:g}, so σ50 >= {limit:g} cannot be shown (rule {threshold}; "
                       f"extend the grid down)")
        failures.append(Failure(threshold.rule, name, value, limit, message))
        return
    if value < limit:
        failures.append(Failure(threshold.rule, name, value, limit, f"{what} {value:.4g} < {limit:g} "
                                                                    f"(rule {threshold})"))


def _check_drops(report: dict, baseline: dict, drop: Drop, failures: list[Failure], warnings: list[str]) -> None:
    for old, new in _match_sites(baseline.get("sites") or [], report.get("sites") or [], warnings):
        name = str(new.get("name"))
        old_iv, new_iv = _interval(old), _interval(new)
        if old_iv is None or new_iv is None:
            which = "baseline" if old_iv is None else "new report"
            warnings.append(f"site {name}: no σ50 in the {which}; max drop not checked")
            continue
        old_v, new_v = _number(old["midpoint"]), _number(new["midpoint"])
        face = drop.measure(old_v, new_v)  # bounds taken at face value
        least = drop.measure(old_iv[0], new_iv[1])  # the most favourable reading
        shown_old, shown_new = _shown(old_v, old.get("censored")), _shown(new_v, new.get("censored"))
        change = f"σ50 fell from {shown_old} to {shown_new}"
        if least > drop.amount:
            amount = _format_drop(face, drop.unit)
            if old.get("censored") == "above" or new.get("censored") == "below":
                detail = f"more than {amount}"  # the bounds understate the fall
            elif least == face:
                detail = amount
            else:
                detail = f"{amount}, at least {_format_drop(least, drop.unit)} at the ends of the 95% intervals"
            failures.append(Failure(RULE_MAX_DROP, name, face, drop.amount,
                                    f"{change}: a drop of {detail} (max {drop})"))
        elif face > drop.amount:
            censored = old.get("censored") or new.get("censored")
            why = "a σ50 is only bounded (censored)" if censored else "within the 95% intervals"
            warnings.append(f"site {name}: {change}, a drop of {_format_drop(face, drop.unit)} > {drop} at face "
                            f"value, but not shown: {why}")


def _match_sites(old_sites: list[dict], new_sites: list[dict], warnings: list[str]) -> list[tuple[dict, dict]]:
    """Pair sites by tensor name; pair the rest by index (same op type) with a warning; warn about the leftovers."""
    old_by_name: dict[str, dict] = {}
    for site in old_sites:
        old_by_name.setdefault(str(site.get("name")), site)
    pairs: list[tuple[dict, dict]] = []
    used: set[int] = set()
    unmatched_new = []
    for site in new_sites:
        old = old_by_name.get(str(site.get("name")))
        if old is not None and id(old) not in used:
            pairs.append((old, site))
            used.add(id(old))
        else:
            unmatched_new.append(site)
    old_left = [s for s in old_sites if id(s) not in used]
    old_by_index = {s.get("index"): s for s in reversed(old_left) if s.get("index") is not None}
    for site in unmatched_new:
        old = old_by_index.get(site.get("index")) if site.get("index") is not None else None
        if old is not None and id(old) not in used and old.get("op_type") == site.get("op_type"):
            pairs.append((old, site))
            used.add(id(old))
            warnings.append(f"site {site.get('name')}: not in the baseline by name; compared with baseline site "
                            f"{old.get('name')} by index {site.get('index')} ({site.get('op_type')})")
        else:
            warnings.append(f"site {site.get('name')}: not in the baseline; not compared")
    for site in old_sites:
        if id(site) not in used:
            warnings.append(f"baseline site {site.get('name')}: missing from this report")
    order = {id(site): position for position, site in enumerate(new_sites)}
    return sorted(pairs, key=lambda pair: order[id(pair[1])])


# --- helpers ------------------------------------------------------------------------------------------------------

def _number(value: Any) -> float | None:
    """A finite float, or None (missing, null, NaN, inf, non-numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _json_number(value: Any) -> float | None:
    return _number(value)


def _site_value(site: dict, relative: bool) -> float | None:
    midpoint = _number(site.get("midpoint"))
    if not relative:
        return midpoint
    rel = _number(site.get("midpoint_relative"))
    if rel is None and midpoint is not None:
        std = _number(site.get("activation_std"))
        if std is not None and std > 0:
            rel = midpoint / std
    return rel


def _interval(site: dict) -> tuple[float, float] | None:
    """Where the site's σ50 lies: censoring bounds, else the 95% interval (always containing the estimate)."""
    value = _number(site.get("midpoint"))
    if value is None or value <= 0:
        return None
    censored = site.get("censored")
    if censored == "above":
        return value, _INF
    if censored == "below":
        return 0.0, value
    ci = site.get("ci95")
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        lo, hi = _number(ci[0]), _number(ci[1])
        if lo is not None and hi is not None and 0 < lo <= hi:
            return min(lo, value), max(hi, value)
    return value, value


def _shown(value: float, censored: str | None) -> str:
    prefix = {"above": "> ", "below": "< "}.get(censored or "", "")
    return f"{prefix}{value:.4g}"


def _format_drop(value: float, unit: str) -> str:
    if value == _INF:
        return "∞ decades" if unit == "dec" else "100%"
    return f"{value:.3g}%" if unit == "%" else f"{value:.3g} decades"
