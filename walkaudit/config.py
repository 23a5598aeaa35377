"""The audit's options (`AuditConfig`) and their validation, in one place.

Errors name the API field (`repeats must be at least 1`); the CLI says the same with its flag
(`--repeats must be at least 1`) through `OptionError.field` and `FLAGS`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, TypedDict

from walkaudit._analysis.drops import Bound as Bound  # re-exported
from walkaudit._analysis.drops import parse_bound as parse_bound  # re-exported
from walkaudit._analysis.sweep import Plan
from walkaudit._graph.sites import LAYER_OPS, Selection
from walkaudit._noise.registry import NOISE_MODELS, global_models, make_noise
from walkaudit.errors import UsageError, option

if TYPE_CHECKING:
    from walkaudit._noise.base import NoiseModel

#: Bounds that keep a run finite in time and memory. σ beyond SIGMA_RANGE over- or underflows float32 noise.
MAX_REPEATS = 1000
MAX_LEVELS = 10_000
MAX_THREADS = 1024
MAX_BATCH = 1 << 20
SIGMA_RANGE = (1e-30, 1e30)
MAX_SEED = (1 << 63) - 1
MAX_LABEL = 1 << 61
#: quick mode (`AuditConfig.quick`): noise draws where none are given (its samples: `estimate.quick_samples`)
QUICK_REPEATS = 1  # |ignore_label|: far from the internal mark of unscored positions (`_units.UNSCORED`)


class OptionError(UsageError):
    """An option with a value that cannot work: `field` names it, the message says why."""

    def __init__(self, field_name: str, problem: str):
        super().__init__(f"{option(field_name)} {problem}")
        self.field, self.problem = field_name, problem


@dataclass(frozen=True)
class AuditConfig:
    """How to audit: the noise, the σ levels, the sites and the runtime. Every field has a working default."""

    noise: str = "additive"  # a registered noise model (`walkaudit._noise.registry.NOISE_MODELS`)
    ratio: float = 0.5  # combined: σa = σ·r, σm = σ·(1−r)
    #: quantize: the bit counts to walk ("8,6,4"); bitflip: the bit positions that may flip ("exponent", "0-7,31")
    bits: str | None = None
    target: str | None = None  # bitflip: "activations" (default) or "weights"
    mode: str = "walk"  # "walk": one site at a time; "global": every site at once
    sigmas: tuple[float, ...] | None = None  # None: adaptive search per site
    repeats: int = 3  # noise draws per σ
    seed: int = 0
    batch_size: int | None = None  # None: 256 on the CPU, sized to the device's free memory on CUDA
    provider: str = "auto"  # auto | cuda | cpu
    chance: float | None = None  # None: 1 / classes
    output: str | None = None  # the class output; None: found automatically
    selection: Selection = field(default_factory=Selection)
    limit: int | None = None  # use only the first `limit` samples
    x_key: str | None = None
    y_key: str | None = None
    allow_nonfinite: bool = False
    threads: int | None = None
    noise_source: str = "auto"  # "host": numpy draws fed in; "graph": RandomNormalLike in the graph; auto: per provider
    exact: bool = False  # σ = 0 bit-identical to the model in every session (slower conv nets on the CPU)
    shard: tuple[int, int] | None = None  # (i, n): audit only the i-th of n cost-balanced shares of the sites (1-based)
    #: global mode: σ of a site is σ × its scale (sites not named: 1), so any assignment of noise levels to sites is
    #: measured at once (the paper's global mode generalised)
    site_scales: tuple[tuple[str, float], ...] = ()
    #: tolerances: per site, the σ at which accuracy falls by each of these drops (`parse_bound`: "1%", "5%rel")
    drops: tuple[Bound, ...] = ()
    #: per-token class outputs ([N, T, C]): the label of a position that is not scored (Hugging Face's -100), and
    #: the model input read as the attention mask (None: `attention_mask` if the model takes one)
    ignore_label: int = -100
    mask: str | None = None
    #: a first look: a coarser adaptive search (`quick_plan`), and, where not given, 1 repeat (`with_options`, the
    #: CLI) and the first samples that fit the quick walk's budget (`estimate.quick_samples`: at most 256): wider
    #: intervals, stated in the report
    quick: bool = False

    def check(self) -> AuditConfig:
        """This config, or OptionError naming the first field that cannot work."""
        _choice("noise", self.noise, NOISE_MODELS)
        _choice("mode", self.mode, ("walk", "global"))
        _choice("provider", self.provider, ("auto", "cuda", "cpu"))
        _choice("noise_source", self.noise_source, ("auto", "host", "graph"))
        _number("ratio", self.ratio, 0.0, 1.0)
        self.noise_model()
        _integer("repeats", self.repeats, 1, MAX_REPEATS)
        _integer("seed", self.seed, 0, MAX_SEED)
        for name, top in (("batch_size", MAX_BATCH), ("limit", None), ("threads", MAX_THREADS)):
            if getattr(self, name) is not None:
                _integer(name, getattr(self, name), 1, top)
        if self.chance is not None:
            _number("chance", self.chance, 0.0, 1.0, top_open=True)
        if self.sigmas is not None:
            check_sigmas(self.sigmas)
        if self.shard is not None:
            if not (isinstance(self.shard, tuple) and len(self.shard) == 2):
                raise OptionError("shard", f"must be (i, n), got {self.shard!r}")
            _integer("shard", self.shard[1], 1, 10_000)
            _integer("shard", self.shard[0], 1, self.shard[1])
            if self.mode == "global":
                raise OptionError("shard", "splits the sites of a walk; global mode puts noise at every site at once")
        for name, scale in self.site_scales:
            if not isinstance(name, str):
                raise OptionError("site_scales", f"names a site by its tensor name, got {name!r}")
            _number("site_scales", scale, 0.0, SIGMA_RANGE[1])
        if self.site_scales and self.mode != "global":
            raise OptionError("site_scales", "only applies in global mode (every site noisy at once)")
        if not all(isinstance(d, Bound) for d in self.drops):
            raise OptionError("drops", "must be drops parsed by walkaudit.config.parse_bound, e.g. parse_bound('1%')")
        if not isinstance(self.selection, Selection):
            raise OptionError("selection", f"must be a walkaudit Selection, got {type(self.selection).__name__}")
        _integer("ignore_label", self.ignore_label, -MAX_LABEL, MAX_LABEL)
        if not isinstance(self.quick, bool):
            raise OptionError("quick", f"must be True or False, got {self.quick!r}")
        if self.mask is not None and (not isinstance(self.mask, str) or not self.mask):
            raise OptionError("mask", f"must name a model input, got {self.mask!r}")
        return self

    def noise_model(self) -> NoiseModel:
        """The noise model these options ask for (OptionError where the noise options cannot work together)."""
        if self.bits is not None and (not isinstance(self.bits, str) or not self.bits.strip()):
            raise OptionError("bits", f"must be a text such as '8,6,4' or 'exponent', got {self.bits!r}")
        if self.target is not None:
            _choice("target", self.target, ("activations", "weights"))
        try:
            model = make_noise(self.noise, self.ratio, self.bits, self.target)
        except UsageError as e:
            field_ = next((f for f in ("bits", "target") if str(e).startswith(f"{f} ")), "noise")
            raise OptionError(field_, str(e).removeprefix(f"{field_} ")) from None
        if self.mode == "global" and model.walk_only:
            raise OptionError("noise", f"{self.noise} walks one site at a time; global mode takes "
                                       f"{', '.join(global_models())} noise")
        if self.noise_source == "graph" and model.graph_draw is None:
            raise OptionError("noise_source", f"graph: the graph cannot draw {self.noise} noise; use host or auto")
        return model

    def fingerprint(self) -> dict[str, Any]:
        """The options that change results (not the batch size, threads or provider): equal fingerprints and equal
        inputs give equal reports, timings aside."""
        # the shard stays: each shard has a checkpoint of its own; quick only when set (0.2 checkpoints resume)
        skip = {"batch_size", "threads", "provider", *(() if self.quick else ("quick",))}
        body = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        body["sigmas"] = list(self.sigmas) if self.sigmas is not None else None
        body["site_scales"] = [list(pair) for pair in self.site_scales]
        body["drops"] = [d.describe() for d in self.drops]
        s = self.selection
        body["selection"] = {"ops": list(s.ops), "include": s.include, "exclude": s.exclude, "names": list(s.names)}
        return body


def _choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise OptionError(name, f"must be one of {', '.join(choices)}, got {value!r}")


def _integer(name: str, value: object, low: int, high: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionError(name, f"must be a whole number, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"at least {low}" if high is None else f"between {low} and {high}"
        raise OptionError(name, f"must be {bound}, got {value}")


def _number(name: str, value: object, low: float, high: float, top_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise OptionError(name, f"must be a finite number, got {value!r}")
    if value < low or value > high or (top_open and value == high):
        raise OptionError(name, f"must be in [{low:g}, {high:g}{')' if top_open else ']'}, got {value}")


def check_sigmas(values: Iterable[Any]) -> tuple[float, ...]:
    """The σ grid sorted and without duplicates, or OptionError: finite, 0 or within SIGMA_RANGE, at most
    MAX_LEVELS levels, at least one above 0."""
    try:
        values = tuple(sorted(set(float(v) for v in values)))
    except (TypeError, ValueError):
        raise OptionError("sigmas", "must be numbers") from None
    if not values:
        raise OptionError("sigmas", "is empty")
    if len(values) > MAX_LEVELS:
        raise OptionError("sigmas", f"has {len(values)} levels; at most {MAX_LEVELS}")
    lo, hi = SIGMA_RANGE
    bad = [v for v in values if not math.isfinite(v) or v < 0 or (v != 0 and not lo <= v <= hi)]
    if bad:
        raise OptionError("sigmas", f"must be 0 or between {lo:g} and {hi:g}, got {bad[0]:g}")
    if not any(v > 0 for v in values):
        raise OptionError("sigmas", "needs at least one σ above 0")
    return values


_RANGE = re.compile(r"^\s*([^:]+):([^:]+):(\d+)\s*$")


def parse_sigmas(text: str) -> tuple[float, ...]:
    """`0.01,0.1,1` (a list) or `1e-3:1e2:21` (21 log-spaced levels from 1e-3 to 1e2)."""
    import numpy as np

    m = _RANGE.match(text)
    try:
        if m:
            lo, hi, n = float(m.group(1)), float(m.group(2)), int(m.group(3))
            if not (0 < lo < hi) or n < 2:
                raise OptionError("sigmas", f"range {text!r} needs 0 < start < stop and at least 2 levels")
            if n > MAX_LEVELS:
                raise OptionError("sigmas", f"range {text!r} has {n} levels; at most {MAX_LEVELS}")
            values = tuple(float(v) for v in np.logspace(np.log10(lo), np.log10(hi), n))
        else:
            values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise OptionError("sigmas", f"{text!r}: expected a list like 0.01,0.1,1 or a range like 1e-3:1e2:21") from None
    return check_sigmas(values)


def parse_shard(text: str) -> tuple[int, int]:
    """`I/N` (1-based, as Playwright's `--shard`), e.g. `2/4`."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if m is None:
        raise OptionError("shard", f"{text!r}: expected I/N, e.g. 2/4")
    shard = (int(m.group(1)), int(m.group(2)))
    _integer("shard", shard[1], 1, 10_000)
    _integer("shard", shard[0], 1, shard[1])
    return shard


def selection(ops: str | tuple[str, ...] | None = None, include: str | None = None, exclude: str | None = None,
              names: Iterable[str] = ()) -> Selection:
    """A Selection from the CLI's or the API's spelling: ops as "Conv,Gemm", a tuple, or "all"."""
    if isinstance(ops, str):
        ops = tuple(o.strip() for o in ops.split(",") if o.strip())
    return Selection(tuple(ops) if ops else LAYER_OPS, include, exclude, tuple(names))


class AuditOptions(TypedDict, total=False):
    """The keyword options of `walkaudit.audit` / `iter_audit`: AuditConfig's fields, and `ops`, `include`,
    `exclude`, `sites` as a shorthand for `selection` (ops="all" or ("Conv", "Gemm"); sites: tensor names)."""

    noise: str
    ratio: float
    bits: str | None
    target: str | None
    mode: str
    sigmas: tuple[float, ...] | None
    repeats: int
    seed: int
    batch_size: int | None
    provider: str
    chance: float | None
    output: str | None
    selection: Selection
    limit: int | None
    x_key: str | None
    y_key: str | None
    allow_nonfinite: bool
    threads: int | None
    noise_source: str
    exact: bool
    shard: tuple[int, int] | None
    site_scales: tuple[tuple[str, float], ...]
    drops: tuple[Bound, ...]
    ignore_label: int
    mask: str | None
    quick: bool
    ops: str | tuple[str, ...]
    include: str | None
    exclude: str | None
    sites: tuple[str, ...]


#: the AuditOptions that are not AuditConfig fields but build its `selection`
SELECTION_KEYS = ("ops", "include", "exclude", "sites")


def with_options(config: AuditConfig, options: Mapping[str, Any]) -> AuditConfig:
    """`config` with keyword options applied (the selection shorthand included), checked; TypeError for an unknown
    keyword, as Python gives for any function."""
    names = {f.name for f in fields(AuditConfig)}
    unknown = sorted(set(options) - names - set(SELECTION_KEYS))
    if unknown:
        raise TypeError(f"audit() got an unexpected keyword argument {unknown[0]!r}")
    picked = {k: options[k] for k in SELECTION_KEYS if k in options}
    rest = {k: v for k, v in options.items() if k not in SELECTION_KEYS}
    if picked:
        if "selection" in rest:
            raise OptionError("selection", "is given twice: as selection= and as ops/include/exclude/sites")
        base = config.selection
        rest["selection"] = selection(picked.get("ops", base.ops), picked.get("include", base.include),
                                      picked.get("exclude", base.exclude), picked.get("sites", base.names))
    if rest.get("quick") is True and "repeats" not in rest:
        rest["repeats"] = QUICK_REPEATS  # the quick preset, where the caller did not ask for repeats
    import dataclasses

    return dataclasses.replace(config, **rest).check()


def quick_plan(plan: Plan) -> Plan:
    """Quick mode's adaptive search: the same range, one coarse level a decade instead of two, one refining level
    inside the crossing bracket instead of three. The curve is still followed until it crosses the halfway line and
    settles (the search's own rules); the fit's interval says how well the fewer levels and samples place σ50."""
    import dataclasses

    return dataclasses.replace(plan, per_decade=1, refine=1)

