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
- **above chance** (implied by any rule or a baseline): a report whose clean accuracy is not above chance fails,
  since none of its σ50 means anything; its site rules are then not checked.

A site whose fit found no σ50 at all (``fit.ok`` false with method ``censored``: the midpoint is only the grid's end)
never counts as robust: a threshold or a max drop on it fails. A site with nothing measured is warned about.
Messages name the site (with control characters escaped, see :func:`walkaudit.report.text.printable`).

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from walkaudit.errors import UsageError
from walkaudit.report.model import Failure, GateResult, Report, SiteResult
from walkaudit.report.text import format_sigma, printable

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
RULE_ABOVE_CHANCE = "above_chance"

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
    drop: str | None = None  # "1%", "5%rel": the rule is on the site's tolerance at that drop (--drop), not σ50

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
        at = f"@{self.drop}" if self.drop else ""
        return printable(f"{self.pattern or '*'}:{self.value:g}{'rel' if self.relative else ''}{at}")


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
            "thresholds": [{"pattern": t.pattern, "value": t.value, "relative": t.relative,
                            **({"drop": t.drop} if t.drop else {})} for t in self.thresholds],
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
    text, at, drop_text = str(text).rpartition("@") if "@" in str(text) else (str(text), "", "")
    drop = None
    if at:
        from walkaudit._analysis.drops import parse_bound

        drop = parse_bound(drop_text, "drops").describe()
    pattern, sep, value_text = text.rpartition(":")
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
        drop=drop,
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


# --- evaluation ---------------------------------------------------------------------------------------------------

def evaluate(report: Report, config: GateConfig, baseline: Report | None = None) -> GateResult:
    """Apply ``config`` to ``report`` (and, for ``max_drop``, compare with ``baseline``).

    Raises UsageError when the baseline was made with a different noise model, ratio or mode (see
    :func:`check_comparable`). Everything else becomes a Failure or a warning.
    """
    failures: list[Failure] = []
    warnings: list[str] = []
    if report.partial:
        warnings.append("the report is partial (the audit stopped early): sites not measured were not checked")
    if baseline is not None:
        warnings += check_comparable(baseline, report)

    gated = not config.empty or baseline is not None
    usable = report.above_chance
    if gated and not usable:
        failures.append(Failure(
            RULE_ABOVE_CHANCE, None, report.clean_accuracy, report.chance,
            f"clean accuracy {report.clean_accuracy:.4g} is not above chance {report.chance:.4g}: the model does "
            f"not classify these data, so no σ50 means anything"))
        if config.thresholds or config.max_drop is not None:
            warnings.append("site rules not checked: the clean accuracy is not above chance")

    for threshold in config.thresholds if usable else ():
        matched = [s for s in report.sites if threshold.matches(s.name)]
        if not matched:
            warnings.append(f"rule {threshold}: matches no site")
        for site in matched:
            _check_threshold(site, threshold, failures, warnings)

    if config.min_clean_accuracy is not None and report.clean_accuracy < config.min_clean_accuracy:
        failures.append(Failure(
            RULE_MIN_CLEAN_ACCURACY, None, report.clean_accuracy, config.min_clean_accuracy,
            f"clean accuracy {report.clean_accuracy:.4g} < {config.min_clean_accuracy:.4g}"))

    if baseline is not None:
        if config.max_drop is None:
            warnings.append("a baseline was given but no max drop: the baseline was not compared")
        elif usable:
            if not baseline.above_chance:
                warnings.append(f"the baseline's clean accuracy {baseline.clean_accuracy:.4g} is not above its "
                                f"chance {baseline.chance:.4g}: it has no σ50 to compare with")
            _check_drops(report, baseline, config.max_drop, failures, warnings)
    elif config.max_drop is not None:
        warnings.append(f"max drop {config.max_drop} set but no baseline given: not checked")

    return GateResult(passed=not failures, failures=failures, warnings=warnings)


def check_comparable(old: Report, new: Report) -> list[str]:
    """Refuse (UsageError) σ50 comparisons across noise models, combined-noise ratios, bits, targets or modes: those σ
    mean different things. Return warnings for softer mismatches (other data, other labels, partial reports)."""
    for key, what in (("noise", "noise model"), ("mode", "mode")):
        a, b = getattr(old.config, key), getattr(new.config, key)
        if a != b:
            raise UsageError(f"cannot compare with the baseline: it used {what} {a!r}, this report {b!r}")
    for key in ("bits", "target"):  # bit flips' positions and target, quantize's bit counts
        a, b = old.config.extra.get(key), new.config.extra.get(key)
        if a != b:
            raise UsageError(f"cannot compare with the baseline: it used {key} {a!r}, this report {b!r}")
    if old.config.noise == "combined":
        a, b = old.config.ratio, new.config.ratio
        if a is not None and b is not None and not math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12):
            raise UsageError(f"cannot compare with the baseline: it used combined noise ratio {a:g}, "
                             f"this report {b:g}")

    warnings = []
    old_data, new_data = old.data, new.data
    if old_data.sha256 and new_data.sha256 and old_data.sha256 != new_data.sha256:
        warnings.append("the baseline was measured on other data (data sha256 differs)")
    elif old_data.samples != new_data.samples:
        warnings.append(f"the baseline used {old_data.samples} samples, this report {new_data.samples}")
    if old_data.labels != new_data.labels:
        warnings.append(f"the baseline's labels were {old_data.labels!r}, this report's {new_data.labels!r}")
    if old.partial:
        warnings.append("the baseline report is partial: sites it lacks were not compared")
    return warnings


def _no_sigma50(site: SiteResult) -> str:
    """Why a site has no σ50, for a message."""
    if site.midpoint is None and not site.points:
        return "nothing was measured"
    return printable(site.fit.message or "the fit found no midpoint")


def _check_threshold(site: SiteResult, threshold: Threshold, failures: list[Failure], warnings: list[str]) -> None:
    if threshold.drop is not None:
        _check_tolerance(site, threshold, failures, warnings)
        return
    name = printable(site.name)
    what = "σ50/std" if threshold.relative else "σ50"
    limit = threshold.value
    if site.sigma50 is None:
        if site.midpoint is None and not site.points:
            warnings.append(f"site {name}: no σ50 (nothing measured); rule {threshold} not checked")
        else:
            failures.append(Failure(threshold.rule, site.name, None, limit,
                                    f"site {name}: no σ50 ({_no_sigma50(site)}), so {what} >= {limit:g} cannot be "
                                    f"shown (rule {threshold})"))
        return
    value = site.sigma50_relative if threshold.relative else site.sigma50
    if value is None:
        warnings.append(f"site {name}: no activation std; rule {threshold} not checked")
        return
    censored = site.censored
    shown = format_sigma(value, censored, digits=4)
    if censored == "above":
        if value < limit:
            warnings.append(f"site {name}: {what} {shown} never fell to halfway in the σ grid, whose top is below "
                            f"the threshold {limit:g}; passed without proof (extend the grid up)")
        return
    if censored == "below":
        if value <= limit:
            message = (f"site {name}: {what} {shown} (already below halfway at the smallest σ tested) is under "
                       f"{limit:g} (rule {threshold})")
        else:
            message = (f"site {name}: {what} {shown}: already below halfway at the smallest σ tested, which is above "
                       f"the threshold {limit:g}, so σ50 >= {limit:g} cannot be shown (rule {threshold}; "
                       f"extend the grid down)")
        failures.append(Failure(threshold.rule, site.name, value, limit, message))
        return
    if value < limit:
        failures.append(Failure(threshold.rule, site.name, value, limit,
                                f"site {name}: {what} {value:.4g} < {limit:g} (rule {threshold})"))


def _check_drops(report: Report, baseline: Report, drop: Drop, failures: list[Failure], warnings: list[str]) -> None:
    for old, new in _match_sites(baseline.sites, report.sites, warnings):
        name = printable(new.name)
        old_iv, new_iv = _interval(old), _interval(new)
        if old_iv is None:
            warnings.append(f"site {name}: no σ50 in the baseline; max drop not checked")
            continue
        old_v = old.sigma50
        shown_old = format_sigma(old_v, old.censored, digits=4)
        if new_iv is None:
            failures.append(Failure(RULE_MAX_DROP, new.name, None, drop.amount,
                                    f"site {name}: no σ50 in this report ({_no_sigma50(new)}); the baseline's was "
                                    f"{shown_old}, so a drop of more than {drop} cannot be ruled out"))
            continue
        new_v = new.sigma50
        face = drop.measure(old_v, new_v)  # bounds taken at face value
        least = drop.measure(old_iv[0], new_iv[1])  # the most favourable reading
        change = f"site {name}: σ50 fell from {shown_old} to {format_sigma(new_v, new.censored, digits=4)}"
        if least > drop.amount:
            amount = _format_drop(face, drop.unit)
            if old.censored == "above" or new.censored == "below":
                detail = f"more than {amount}"  # the bounds understate the fall
            elif least == face:
                detail = amount
            else:
                detail = f"{amount}, at least {_format_drop(least, drop.unit)} at the ends of the 95% intervals"
            failures.append(Failure(RULE_MAX_DROP, new.name, face, drop.amount,
                                    f"{change}: a drop of {detail} (max {drop})"))
        elif face > drop.amount:
            censored = old.censored or new.censored
            why = "a σ50 is only bounded (censored)" if censored else "within the 95% intervals"
            warnings.append(f"{change}, a drop of {_format_drop(face, drop.unit)} > {drop} at face value, but not "
                            f"shown: {why}")


def _match_sites(old_sites, new_sites, warnings: list[str]) -> list[tuple[SiteResult, SiteResult]]:
    """Pair sites by tensor name; pair the rest by index (same op type) with a warning; warn about the leftovers."""
    old_by_name: dict[str, SiteResult] = {}
    for site in old_sites:
        old_by_name.setdefault(site.name, site)
    pairs: list[tuple[SiteResult, SiteResult]] = []
    used: set[int] = set()
    unmatched_new = []
    for site in new_sites:
        old = old_by_name.get(site.name)
        if old is not None and id(old) not in used:
            pairs.append((old, site))
            used.add(id(old))
        else:
            unmatched_new.append(site)
    old_left = [s for s in old_sites if id(s) not in used]
    old_by_index = {s.index: s for s in reversed(old_left) if s.index is not None}
    for site in unmatched_new:
        old = old_by_index.get(site.index) if site.index is not None else None
        if old is not None and id(old) not in used and old.op_type == site.op_type:
            pairs.append((old, site))
            used.add(id(old))
            warnings.append(f"site {printable(site.name)}: not in the baseline by name; compared with baseline site "
                            f"{printable(old.name)} by index {site.index} ({printable(site.op_type)})")
        else:
            warnings.append(f"site {printable(site.name)}: not in the baseline; not compared")
    for site in old_sites:
        if id(site) not in used:
            warnings.append(f"baseline site {printable(site.name)}: missing from this report")
    order = {id(site): position for position, site in enumerate(new_sites)}
    return sorted(pairs, key=lambda pair: order[id(pair[1])])


# --- helpers ------------------------------------------------------------------------------------------------------

def _interval(site: SiteResult) -> tuple[float, float] | None:
    """Where the site's σ50 lies: censoring bounds, else the 95% interval (always containing the estimate)."""
    value = site.sigma50
    if value is None or value <= 0:
        return None
    if site.censored == "above":
        return value, _INF
    if site.censored == "below":
        return 0.0, value
    if site.ci95 is not None:
        lo, hi = site.ci95
        if 0 < lo <= hi:
            return min(lo, value), max(hi, value)
    return value, value


def _format_drop(value: float, unit: str) -> str:
    if value == _INF:
        return "∞ decades" if unit == "dec" else "100%"
    return f"{value:.3g}%" if unit == "%" else f"{value:.3g} decades"


def _check_tolerance(site: SiteResult, threshold: Threshold, failures: list[Failure], warnings: list[str]) -> None:
    """A rule on the σ at which the site's accuracy falls by `threshold.drop` (the site's `tolerance` entries)."""
    name, limit = printable(site.name), threshold.value
    entry = next((t for t in site.extra.get("tolerance") or [] if t.get("of") == threshold.drop), None)
    if entry is None:
        warnings.append(f"site {name}: no tolerance at a {threshold.drop} drop (audit with --drop "
                        f"{threshold.drop}); rule {threshold} not checked")
        return
    value = entry.get("sigma")
    if threshold.relative:
        std = site.activation_std
        value = value / std if value is not None and std else None
    what = f"σ at a {threshold.drop} drop" + ("/std" if threshold.relative else "")
    if value is None:
        failures.append(Failure(threshold.rule, site.name, None, limit,
                                f"site {name}: no {what}, so >= {limit:g} cannot be shown (rule {threshold})"))
        return
    if entry.get("censored") == "above":
        if value < limit:
            warnings.append(f"site {name}: accuracy never fell by {threshold.drop} in the σ grid, whose top is below "
                            f"{limit:g}; passed without proof (rule {threshold})")
        return
    if entry.get("censored") == "below" or value < limit:
        failures.append(Failure(threshold.rule, site.name, value, limit,
                                f"site {name}: {what} {value:.4g} < {limit:g} (rule {threshold})"))

