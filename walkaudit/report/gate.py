"""CI gate: rules over a walkaudit report -> pass/fail with the site and the numbers behind every failure.

Pure: no I/O except :func:`load_rules`, which reads the TOML rules file it is given. Nothing here prints or exits;
:class:`GateResult` carries the verdict and its ``exit_code`` (0 passed, 1 failed, undecided or incomplete). Bad
rules raise :class:`walkaudit.errors.UsageError` (exit code 2 at the CLI).

Rules (combinable; every rule is checked and every failure is reported):

- **fail-under** (:class:`Threshold`): σ50 of every site whose tensor name matches ``pattern`` (``re.search``;
  ``None`` = all sites) must be at least ``value``. ``relative=True`` checks σ50 / activation std
  (``midpoint_relative``) instead of the absolute σ50.
- **min clean accuracy**: the model's clean accuracy must be at least this fraction.
- **max drop** (:class:`Drop`, needs a baseline report): no site's σ50 may fall by more than ``"20%"`` of the
  baseline's σ50, or by more than ``"0.3dec"`` decades (a bare number like ``"0.3"`` also means decades).
- **above chance** (implied by any rule or a baseline): a report whose clean accuracy is not above chance fails,
  since none of its σ50 means anything; its site rules are then not checked.

Every rule is decided on an interval (docs/method.md "Decisions"): it **passes** where the whole 95 % interval of
the number it is about meets the threshold, **fails** where the whole interval breaks it, and is **undecided** where
the interval straddles the threshold. The intervals: σ50's (censoring makes it (bound, ∞) for "above" and
(0, bound) for "below"), a tolerance's (`--drop`), the clean accuracy's Wilson interval over the samples, and for
a max drop the fall's interval from both reports' σ50 intervals (:func:`drop_interval`: failed where its lower end
falls by more than allowed, passed where its upper end stays within it). Undecided checks are listed in
``GateResult.undecided``; they fail the gate unless ``undecided="pass"`` (``--undecided pass``). A partial report's
verdict is ``incomplete`` (``passed`` None) and a gate without rules says ``no gate``.

A site whose fit found no σ50 at all (``fit.ok`` false with method ``censored``: the midpoint is only the grid's end)
never counts as robust: a threshold or a max drop on it fails. A site with nothing measured is warned about. A rule
whose pattern matches no site is an error (UsageError) unless ``allow_unmatched``.
Messages name the site (with control characters escaped, see :func:`walkaudit.report.text.printable`).
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from walkaudit._noise.registry import SIGMA, Level
from walkaudit.errors import UsageError
from walkaudit.report.model import Failure, GateResult, Report, SiteResult
from walkaudit.report.text import format_sigma, printable, report_level

__all__ = [
    "Drop",
    "Failure",
    "GateConfig",
    "GateResult",
    "Threshold",
    "UNDECIDED_POLICIES",
    "check_comparable",
    "check_matched",
    "clean_interval",
    "decide",
    "drop_interval",
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

    def to_dict(self) -> dict[str, Any]:
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
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10
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


def _thresholds_of(table: dict[str, Any], pattern: str | None, where: str) -> list[Threshold]:
    out = []
    for key, relative in (("fail_under", False), ("fail_under_relative", True)):
        if key in table:
            value = table[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UsageError(f"{where}: {key} must be a number")
            out.append(Threshold(pattern, float(value), relative))
    return out


def _compile(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"invalid site pattern {pattern!r}: {exc}") from None


# --- evaluation ---------------------------------------------------------------------------------------------------

#: what the gate does with a rule whose interval straddles its threshold (``--undecided``)
UNDECIDED_POLICIES = ("fail", "pass")


def evaluate(report: Report, config: GateConfig, baseline: Report | None = None, *, undecided: str = "fail",
             allow_unmatched: bool = False) -> GateResult:
    """Apply ``config`` to ``report`` (and, for ``max_drop``, compare with ``baseline``).

    Every rule is decided on an interval (docs/method.md "Decisions"): it passes where the whole 95 % interval
    meets it, fails where the whole interval breaks it, and is undecided where the interval straddles the threshold.
    ``undecided``: "fail" (the default) or "pass" — what an undecided rule does to the verdict. A partial report's
    verdict is "incomplete" (``passed`` None); a gate without rules says "no gate".

    Raises UsageError when the baseline was made with a different noise model, ratio or mode (see
    :func:`check_comparable`), and when a site rule matches no site of the report unless ``allow_unmatched`` (or the
    report is partial or one shard, which lack sites by design: then a warning). Everything else becomes a Failure,
    an undecided entry or a warning.
    """
    if undecided not in UNDECIDED_POLICIES:
        raise UsageError(f"--undecided must be one of {', '.join(UNDECIDED_POLICIES)}, got {undecided!r}")
    decisions = _Decisions()
    level = report_level(report.config)
    warnings = decisions.warnings
    if report.partial:
        warnings.append("the report is partial (the audit stopped early): sites not measured were not checked")
    if baseline is not None:
        warnings += check_comparable(baseline, report)

    gated = not config.empty  # a baseline alone is shown, not gated: without --max-drop no rule compares with it
    usable = distinguishable(report)
    if gated and not usable:
        decisions.fail(Failure(
            RULE_ABOVE_CHANCE, None, report.clean_accuracy, report.chance,
            f"clean accuracy {report.clean_accuracy:.4g} is "
            f"{'within its 95% interval of' if report.above_chance else 'not above'} chance {report.chance:.4g}: "
            f"the model does not classify these data, so no {level.midpoint} means anything"))
        if config.thresholds or config.max_drop is not None:
            warnings.append("site rules not checked: the clean accuracy is not above chance")

    lacks_sites = report.partial or report.config.extra.get("shard") is not None
    for threshold in config.thresholds if usable else ():
        matched = [s for s in report.sites if threshold.matches(s.name)]
        if not matched:
            if not (allow_unmatched or lacks_sites):
                check_matched(GateConfig((threshold,)), [s.name for s in report.sites])
            warnings.append(f"rule {threshold}: matches no site")
        for site in matched:
            _check_threshold(site, threshold, decisions, level)

    if config.min_clean_accuracy is not None:
        _check_clean_accuracy(report, config.min_clean_accuracy, decisions)

    if baseline is not None and config.max_drop is not None:  # without a max drop the caller says what it did
        if usable:
            if not distinguishable(baseline):
                warnings.append(f"the baseline's clean accuracy {baseline.clean_accuracy:.4g} is not above its "
                                f"chance {baseline.chance:.4g}: it has no {level.midpoint} to compare with")
            _check_drops(report, baseline, config.max_drop, decisions)
    elif config.max_drop is not None:
        warnings.append(f"max drop {config.max_drop} set but no baseline given: not checked")

    failures, open_ = decisions.failures, decisions.undecided
    if report.partial:
        passed, verdict = None, "incomplete"
    elif failures:
        passed, verdict = False, "failed"
    elif open_:
        passed, verdict = undecided == "pass", "undecided"
        if undecided == "pass":
            warnings.append(f"{len(open_)} rule check(s) undecided, passed by --undecided pass")
    elif not gated:
        passed, verdict = True, "no gate"
    else:
        passed, verdict = True, "passed"
    return GateResult(passed=passed, failures=failures, warnings=warnings, undecided=open_, verdict=verdict)


def distinguishable(report: Report) -> bool:
    """Whether the clean accuracy is above chance on its 95 % interval over the samples (the fit's rule: no σ50
    at chance, `fit.at_chance`); reports without clean counts compare the numbers."""
    if not report.above_chance:
        return False
    counts = report.clean_counts
    if counts is None:
        return True
    from walkaudit._analysis.fit import at_chance

    return not at_chance(report.clean_accuracy, report.chance, counts.samples)


def check_matched(config: GateConfig, names: list[str]) -> None:
    """Refuse (UsageError) a site rule whose pattern matches none of ``names``, as ruff refuses an unknown rule:
    a typo would otherwise gate nothing. The CLI checks the selected sites before the audit runs."""
    for threshold in config.thresholds:
        if not any(threshold.matches(n) for n in names):
            shown = ", ".join(printable(n) for n in names[:3]) + (", …" if len(names) > 3 else "")
            raise UsageError(f"rule {threshold} matches no site (the sites are {shown or 'none'}); fix the pattern, "
                             "or pass --allow-unmatched to accept it")


class _Decisions:
    """What the rules decided so far: failures (shown broken), undecided checks, warnings."""

    def __init__(self) -> None:
        self.failures: list[Failure] = []
        self.undecided: list[Failure] = []
        self.warnings: list[str] = []

    def fail(self, failure: Failure) -> None:
        self.failures.append(failure)

    def open(self, failure: Failure) -> None:
        self.undecided.append(failure)

    def record(self, verdict: str, failure: Failure) -> None:
        """A rule check that did not pass: broken where `verdict` is "fail", else undecided."""
        (self.fail if verdict == "fail" else self.open)(failure)


def decide(interval: tuple[float, float], limit: float) -> str:
    """"pass" where the whole interval is at least ``limit``, "fail" where it is wholly below, else "undecided"."""
    lo, hi = interval
    if lo >= limit:
        return "pass"
    if hi < limit:
        return "fail"
    return "undecided"


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


def _check_threshold(site: SiteResult, threshold: Threshold, decisions: _Decisions, level: Level = SIGMA) -> None:
    if threshold.drop is not None:
        _check_tolerance(site, threshold, decisions, level)
        return
    name = printable(site.name)
    what = f"{level.midpoint}/std" if threshold.relative else level.midpoint
    limit = threshold.value
    if site.sigma50 is None:
        if site.midpoint is None and not site.points:
            decisions.warnings.append(f"site {name}: no {level.midpoint} (nothing measured); rule {threshold} not "
                                      "checked")
        else:
            decisions.fail(Failure(threshold.rule, site.name, None, limit,
                                   f"site {name}: no {level.midpoint} ({_no_sigma50(site)}), so {what} >= {limit:g} "
                                   f"cannot be shown (rule {threshold})"))
        return
    value = site.sigma50_relative if threshold.relative else site.sigma50
    interval = _interval(site)
    if value is None or interval is None:
        decisions.warnings.append(f"site {name}: no activation std; rule {threshold} not checked")
        return
    scale = value / site.sigma50
    interval = (interval[0] * scale, interval[1] * scale)
    censored = site.censored
    shown = format_sigma(value, censored, digits=4)
    verdict = decide(interval, limit)
    if censored == "below" and value <= limit:  # σ50 < bound <= threshold: the open interval (0, bound) breaks it
        verdict = "fail"
    if verdict == "pass":
        return
    if censored == "above":  # (bound, ∞) with the bound under the threshold
        message = (f"site {name}: {what} {shown} never fell to halfway in the {level.symbol} grid, whose top is "
                   f"below the threshold {limit:g}: undecided (rule {threshold}; extend the grid up)")
    elif censored == "below" and verdict == "fail":
        message = (f"site {name}: {what} {shown} (already below halfway at the smallest {level.symbol} tested) is "
                   f"under {limit:g} (rule {threshold})")
    elif censored == "below":
        message = (f"site {name}: {what} {shown}: already below halfway at the smallest {level.symbol} tested, which "
                   f"is above the threshold {limit:g}: undecided (rule {threshold}; extend the grid down)")
    elif verdict == "fail":
        message = f"site {name}: {what} {value:.4g} < {limit:g}{_ci_text(interval, value)} (rule {threshold})"
    else:
        message = _straddles(name, what, value, interval, threshold)
    decisions.record(verdict, Failure(threshold.rule, site.name, value, limit, message))


def _ci_text(interval: tuple[float, float], value: float) -> str:
    lo, hi = interval
    return "" if lo == hi == value else f", 95% CI {lo:.4g}–{hi:.4g}"


def _check_clean_accuracy(report: Report, minimum: float, decisions: _Decisions) -> None:
    """The clean accuracy against ``minimum`` on its 95 % (Wilson) interval over the samples: the data are a sample
    of what the model will see, as for σ50's interval."""
    acc = report.clean_accuracy
    counts = report.clean_counts
    interval = clean_interval(counts.correct, counts.samples) if counts is not None else (acc, acc)
    verdict = decide(interval, minimum)
    if verdict == "pass":
        return
    text = f"clean accuracy {acc:.4g}{_ci_text(interval, acc)}"
    if verdict == "fail":
        decisions.fail(Failure(RULE_MIN_CLEAN_ACCURACY, None, acc, minimum, f"{text} < {minimum:.4g}"))
    else:
        decisions.open(Failure(RULE_MIN_CLEAN_ACCURACY, None, acc, minimum,
                               f"{text} straddles {minimum:.4g}: undecided (more samples narrow the interval)"))


def clean_interval(correct: int, samples: int) -> tuple[float, float]:
    """The 95 % Wilson interval of a clean accuracy of ``correct`` out of ``samples``."""
    if samples <= 0:
        return 0.0, 1.0
    from scipy.stats import binomtest

    ci = binomtest(int(correct), int(samples)).proportion_ci(confidence_level=0.95, method="wilson")
    return float(ci.low), float(ci.high)


def _check_drops(report: Report, baseline: Report, drop: Drop, decisions: _Decisions) -> None:
    """Each site's σ50 fall against the baseline, decided on the fall's 95 % interval (:func:`drop_interval`):
    failed where its lower end falls by more than allowed, passed where its upper end stays within it."""
    level = report_level(report.config)
    for old, new in _match_sites(baseline.sites, report.sites, decisions.warnings):
        name = printable(new.name)
        old_iv, new_iv = _interval(old), _interval(new)
        if old_iv is None:
            decisions.warnings.append(f"site {name}: no {level.midpoint} in the baseline; max drop not checked")
            continue
        old_v = old.sigma50
        assert old_v is not None  # _interval(old) is None without a σ50
        shown_old = format_sigma(old_v, old.censored, digits=4)
        if new_iv is None:
            decisions.fail(Failure(RULE_MAX_DROP, new.name, None, drop.amount,
                                   f"site {name}: no {level.midpoint} in this report ({_no_sigma50(new)}); the "
                                   f"baseline's was {shown_old}, so a drop of more than {drop} cannot be ruled out"))
            continue
        new_v = new.sigma50
        assert new_v is not None  # _interval(new) is None without a σ50
        face = drop.measure(old_v, new_v)  # bounds taken at face value
        least, most = (_in_unit(d, drop.unit) for d in drop_interval(old_v, old_iv, new_v, new_iv))
        change = (f"site {name}: {level.midpoint} fell from {shown_old} to "
                  f"{format_sigma(new_v, new.censored, digits=4)}")
        if least > drop.amount:
            amount = _format_drop(face, drop.unit)
            if old.censored == "above" or new.censored == "below":
                detail = f"more than {amount}"  # the bounds understate the fall
            elif math.isclose(least, face, rel_tol=1e-9, abs_tol=1e-12):
                detail = amount
            else:
                detail = f"{amount}, at least {_format_drop(least, drop.unit)} at the end of its 95% interval"
            decisions.fail(Failure(RULE_MAX_DROP, new.name, face, drop.amount,
                                   f"{change}: a drop of {detail} (max {drop})"))
        elif most > drop.amount:
            censored = old.censored or new.censored
            why = (f"a {level.midpoint} is only bounded (censored): extend the grid" if censored else
                   f"up to {_format_drop(most, drop.unit)} at the end of its 95% interval")
            change = change if face > 0 else (f"site {name}: {level.midpoint} {shown_old} → "
                                              f"{format_sigma(new_v, new.censored, 4)}")
            decisions.open(Failure(RULE_MAX_DROP, new.name, face, drop.amount,
                                   f"{change}, a drop of {_format_drop(face, drop.unit)} at face value; more than "
                                   f"{drop} not ruled out ({why}): undecided"))


def drop_interval(old: float, old_iv: tuple[float, float], new: float,
                  new_iv: tuple[float, float]) -> tuple[float, float]:
    """The 95 % interval of the fall log10(old / new) in decades, from the two σ50 and their (independent) 95 %
    intervals: each side's half-widths in log σ added in quadrature, as for the difference of two independent
    estimates. An end that one interval leaves open (a censored σ50) is ±∞."""
    face = math.log10(old / new)

    def half(a: float, b: float) -> float:  # log10 distance; ∞ where an end is open
        return _INF if a <= 0 or b == _INF else math.log10(b / a)

    low = math.hypot(half(old_iv[0], old), half(new, new_iv[1]))  # old lower, new higher: a smaller fall
    high = math.hypot(half(old, old_iv[1]), half(new_iv[0], new))  # old higher, new lower: a larger fall
    return face - low, face + high


def _in_unit(decades: float, unit: str) -> float:
    """A fall in decades in the rule's unit: decades, or percent of the old σ50."""
    if unit == "dec":
        return decades
    if decades == -_INF:
        return -_INF
    return 100.0 if decades == _INF else (1.0 - 10.0 ** -decades) * 100.0


def _match_sites(old_sites: Sequence[SiteResult], new_sites: Sequence[SiteResult],
                 warnings: list[str]) -> list[tuple[SiteResult, SiteResult]]:
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


def _check_tolerance(site: SiteResult, threshold: Threshold, decisions: _Decisions, level: Level = SIGMA) -> None:
    """A rule on the σ at which the site's accuracy falls by `threshold.drop` (the site's `tolerance` entries),
    decided on that σ's 95 % interval as σ50 rules are."""
    name, limit = printable(site.name), threshold.value
    entry = next((t for t in site.extra.get("tolerance") or [] if t.get("of") == threshold.drop), None)
    if entry is None:
        decisions.warnings.append(f"site {name}: no tolerance at a {threshold.drop} drop (audit with --drop "
                                  f"{threshold.drop}); rule {threshold} not checked")
        return
    value = entry.get("sigma")
    scale = 1.0
    if threshold.relative:
        std = site.activation_std
        scale = 1.0 / std if std else 0.0
        value = value * scale if value is not None and std else None
    what = f"{level.symbol} at a {threshold.drop} drop" + ("/std" if threshold.relative else "")
    if value is None:
        decisions.fail(Failure(threshold.rule, site.name, None, limit,
                               f"site {name}: no {what}, so >= {limit:g} cannot be shown (rule {threshold})"))
        return
    censored = entry.get("censored")
    if censored == "above":
        interval = (value, _INF)
    elif censored == "below":
        interval = (0.0, value)
    elif entry.get("ci95"):
        lo, hi = entry["ci95"]
        interval = (min(lo * scale, value), max(hi * scale, value))
    else:
        interval = (value, value)
    verdict = decide(interval, limit)
    if censored == "below" and value <= limit:  # fallen that far below the smallest σ tested, itself <= limit
        verdict = "fail"
    if verdict == "pass":
        return
    if verdict == "fail":
        message = (f"site {name}: {what} {value:.4g} < {limit:g}{'' if censored else _ci_text(interval, value)} "
                   f"(rule {threshold})")
    elif censored == "above":
        message = (f"site {name}: accuracy never fell by {threshold.drop} in the {level.symbol} grid, whose top is "
                   f"below {limit:g}: undecided (rule {threshold}; extend the grid up)")
    elif censored == "below":
        message = (f"site {name}: accuracy had already fallen by {threshold.drop} at the smallest {level.symbol} "
                   f"tested, which is above {limit:g}: undecided (rule {threshold}; extend the grid down)")
    else:
        message = _straddles(name, what, value, interval, threshold)
    decisions.record(verdict, Failure(threshold.rule, site.name, value, limit, message))


def _straddles(name: str, what: str, value: float, interval: tuple[float, float], threshold: Threshold) -> str:
    """An undecided site rule: the value's interval holds the threshold."""
    return (f"site {name}: {what} {value:.4g}{_ci_text(interval, value)} straddles {threshold.value:g}: undecided "
            f"(rule {threshold}; more samples or --repeats narrow the interval)")
