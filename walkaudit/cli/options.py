"""The command line's option groups, each defined once and composed onto the commands as a decorator (as
Polygraphy's argument groups): data, sites, noise, sweep, runtime, gate, output, resume.

A group adds its options to a command, takes their values out of the command's keyword arguments and hands the
command one typed value instead (a small frozen dataclass, under the group's `key`): `audit_command(model, data,
sites, noise, sweep, runtime, gate, output, resume)`. A command may take part of a group (`only=`, `skip=`); the
options it takes are still the group's definitions. Every option made by a group carries it (`walkaudit_group`),
so --help lists a command's options by group (`app.GroupedCommand`) and tests/test_cli_groups.py checks that no two
commands define the same flag apart. Choice lists come from their registries (noise models, providers, noise
sources, the gate's undecided policies, annotation formats), read when first needed: `walkaudit version` imports
none of them.

To add an option: add it to its group here (the option and the value's field, of the same name); every command that
composes the whole group gets it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import click

from walkaudit._noise.registry import TAKES_BITS, TAKES_TARGET  # numpy-free: the help texts
from walkaudit.errors import UsageError

# --- registries ------------------------------------------------------------------------------------------------------


class RegistryChoice(click.Choice):
    """A click.Choice whose choices come from a registry, read on first use (help, parsing), never repeated here."""

    def __init__(self, load: Callable[[], Any], case_sensitive: bool = True):
        self._load, self.case_sensitive = load, case_sensitive

    @functools.cached_property
    def choices(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(self._load())


def noise_models() -> tuple[str, ...]:
    from walkaudit._noise import NOISE_MODELS

    return NOISE_MODELS


def global_noise_models() -> tuple[str, ...]:
    """The noise models that can perturb every layer at once (global mode, `walkaudit plan`)."""
    from walkaudit._noise.registry import global_models

    return global_models()


def providers() -> tuple[str, ...]:
    from walkaudit._execution.runtime import PROVIDERS

    return PROVIDERS


def noise_sources() -> tuple[str, ...]:
    from walkaudit._execution.strategies import NOISE_SOURCES

    return NOISE_SOURCES


def undecided_policies() -> tuple[str, ...]:
    from walkaudit.report.gate import UNDECIDED_POLICIES

    return UNDECIDED_POLICIES


def terminal_formats() -> tuple[str, ...]:
    """--format: "text" (the table alone) and each format printed beside it (walkaudit.report.formats.ANNOTATIONS)."""
    from walkaudit.report.formats import ANNOTATIONS

    return ("text", *ANNOTATIONS)


# --- groups ----------------------------------------------------------------------------------------------------------


def deprecated(old: str, new: str, name: str, **kw) -> tuple[tuple[str, ...], dict]:
    """A hidden option kept for one release under its old spelling, with one `walkaudit: warning: OLD is deprecated;
    use NEW` line on stderr; the group's value reads it as the new option."""
    def callback(ctx, param, value):
        if value is not None and value is not False and value != ():
            click.echo(f"walkaudit: warning: {old} is deprecated; use {new}", err=True)
        return value
    return (old, name), {"hidden": True, "callback": callback, **kw}


class Group:
    """Options defined once: `Group(title, key, Value, (decls, kwargs), ...)`; each option's parameter name is a
    field of `Value` (a frozen dataclass with a default for every field). Used as a decorator: `@GROUP` (every
    option) or `@GROUP(only=(names), skip=(names), helps={name: text}, overrides={name: {click keyword: value}})`."""

    def __init__(self, title: str, key: str, value: type, *options: tuple[tuple[str, ...], dict]):
        self.title, self.key, self.value = title, key, value
        self.options = {_param_name(decls): (decls, kw) for decls, kw in options}
        missing = set(self.options) - {f.name for f in fields(value)}
        assert not missing, f"{title}: options without a field in {value.__name__}: {missing}"

    def __repr__(self) -> str:
        return f"<option group {self.title!r} -> {self.value.__name__}>"

    def __call__(self, fn=None, *, only: tuple[str, ...] | None = None, skip: tuple[str, ...] = (),
                 helps: dict[str, str] | None = None, optional: tuple[str, ...] = (),
                 overrides: dict[str, dict] | None = None):
        if fn is None:
            return functools.partial(self, only=only, skip=skip, helps=helps, optional=optional, overrides=overrides)
        names = [n for n in self.options if (only is None or n in only) and n not in skip]
        unknown = set(only or ()) | set(skip) | set(helps or {}) | set(overrides or {})
        assert unknown <= set(self.options), f"{self.title}: no options {unknown - set(self.options)}"

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            kwargs[self.key] = self.value(**{n: kwargs.pop(n) for n in names})
            return fn(*args, **kwargs)

        for name in reversed(names):
            decls, kw = self.options[name]
            if helps and name in helps:
                kw = {**kw, "help": helps[name]}
            if name in optional:  # a required option that this command can do without (inspect's --data)
                kw = {**kw, "required": False}
            if overrides and name in overrides:  # this command's own choices (plan's --noise: global-mode models)
                kw = {**kw, **overrides[name]}
            click.option(*decls, cls=GroupOption, group=self, **kw)(wrapper)
        return wrapper


class GroupOption(click.Option):
    """An option that knows the group that defined it."""

    def __init__(self, *args, group: Group, **kwargs):
        super().__init__(*args, **kwargs)
        self.walkaudit_group = group


def _param_name(decls: tuple[str, ...]) -> str:
    """The parameter name click gives these declarations: the one without dashes, else the longest flag's."""
    for d in decls:
        if d.isidentifier():
            return d
    longest = max((d for d in decls if d.startswith("--")), key=len)
    return longest[2:].replace("-", "_")


# --- data ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Data:
    data_path: str | None = None
    x_key: str | None = None
    y_key: str | None = None
    limit: int | None = None
    output: str | None = None
    chance: float | None = None
    ignore_label: int = -100
    mask: str | None = None
    allow_nonfinite: bool = False


DATA = Group(
    "Data", "data", Data,
    (("--data", "data_path"), dict(required=True, type=click.Path(), metavar="FILE|DIR",
                                   help="Validation data: .npz (inputs and optional labels), .npy (inputs only), or "
                                        "a folder of .npz shards or of one .npy per array (docs/data.md).")),
    (("--x-key",), dict(metavar="KEY", help="Array holding the inputs in the .npz [default: auto].")),
    (("--y-key",), dict(metavar="KEY", help="Array holding the labels in the .npz [default: auto].")),
    (("--limit",), dict(type=int, metavar="N", help="Use only the first N samples.")),
    (("--output",), dict(metavar="NAME", help="The class output to read [default: found automatically].")),
    (("--chance",), dict(type=float, help="Chance accuracy [default: 1/classes].")),
    (("--ignore-label",), dict(type=int, default=-100, show_default=True, metavar="ID",
                               help="Per-token outputs [N, T, C]: the label of a position that is not scored.")),
    (("--mask",), dict(metavar="INPUT", help="Per-token outputs: the model input read as the attention mask "
                                             "(positions where it is 0 are not scored) [default: attention_mask, if "
                                             "the model takes it].")),
    (("--allow-nonfinite",), dict(is_flag=True, help="Accept NaN/Inf in the inputs.")),
)


# --- sites -----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sites:
    ops: str | None = None
    include: str | None = None
    exclude: str | None = None
    site_names: tuple[str, ...] = ()

    def selection(self):
        """The walkaudit Selection these flags ask for (op types spelled as ONNX does: `conv` -> `Conv`)."""
        from walkaudit._graph.sites import LAYER_OPS, Selection

        op_list = tuple(_op_type(o.strip()) for o in self.ops.split(",") if o.strip()) if self.ops else LAYER_OPS
        return Selection(op_list, self.include, self.exclude, tuple(self.site_names))


def _op_type(name: str) -> str:
    """An op type as ONNX spells it: `conv` -> `Conv`, `matmul` -> `MatMul` (op types are case-sensitive; users
    rarely type them so). `all` and names ONNX does not know (custom domains) stay as written."""
    if name.lower() == "all":
        return name
    try:
        import onnx.defs

        known = {schema.name.lower(): schema.name for schema in onnx.defs.get_all_schemas()}
    except Exception:  # an onnx without its schema registry: leave the name alone
        return name
    return known.get(name.lower(), name) if name not in known.values() else name


SITES = Group(
    "Sites", "sites", Sites,
    (("--ops",), dict(metavar="OPS", default=None,
                      help="Comma-separated op types whose outputs are sites, or 'all' for every float node output "
                           "[default: Conv,ConvTranspose,Gemm,MatMul with their bias Add, and LSTM,GRU,RNN].")),
    (("--include",), dict(metavar="REGEX", help="Keep only sites whose tensor or node name matches.")),
    (("--exclude",), dict(metavar="REGEX", help="Drop sites whose tensor or node name matches.")),
    (("--site", "site_names"), dict(multiple=True, metavar="TENSOR", help="An explicit site (repeatable).")),
)


# --- noise and sweep ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Noise:
    """The noise model (walkaudit._noise): its kind and parameters. Every field is the AuditConfig field of the same
    name: an option added to NOISE (and its field here) reaches the audit and the plan with no other change."""

    noise: str = "additive"
    ratio: float = 0.5
    bits: str | None = None
    target: str | None = None

    def config(self) -> dict:
        return asdict(self)


NOISE_AND_SWEEP = "Noise & sweep"

NOISE = Group(
    NOISE_AND_SWEEP, "noise", Noise,
    (("--noise",), dict(type=RegistryChoice(noise_models), default="additive", show_default=True,
                        help="Noise model.")),
    (("--ratio",), dict(type=float, default=0.5, show_default=True, help="combined: σa = σ·r, σm = σ·(1−r).")),
    (("--bits",), dict(metavar="SPEC", help="; ".join(f"{k}: {v}" for k, v in TAKES_BITS.items()) + ".")),
    (("--target",), dict(type=click.Choice(["activations", "weights"]),
                         help=f"{', '.join(TAKES_TARGET)}: perturb each layer's output (default) or its weights.")),
)


@dataclass(frozen=True)
class Sweep:
    """Which σ levels, how often, and what else is measured along the way."""

    global_mode: bool = False
    sigmas: str | None = None
    repeats: int | None = None  # None: 3, or 1 with --quick
    drops: tuple[str, ...] = ()
    seed: int = 0
    quick: bool = False

    def config(self) -> dict:
        from walkaudit.config import QUICK_REPEATS, parse_bound, parse_sigmas

        repeats = self.repeats if self.repeats is not None else QUICK_REPEATS if self.quick else 3
        return {"mode": "global" if self.global_mode else "walk",
                "sigmas": parse_sigmas(self.sigmas) if self.sigmas is not None else None,  # "": an empty grid
                "repeats": repeats, "seed": self.seed, **({"quick": True} if self.quick else {}),
                "drops": tuple(parse_bound(d, "drops") for d in self.drops)}


SWEEP = Group(
    NOISE_AND_SWEEP, "sweep", Sweep,
    (("--global", "global_mode"), dict(is_flag=True, help="The same σ at every site at once (default: one site at "
                                                          "a time).")),
    (("--sigmas",), dict(metavar="LIST|A:B:N",
                         help="Fixed σ grid: '0.01,0.1,1' or '1e-3:1e2:21' (log). Default: adaptive search per "
                              "site.")),
    (("--repeats",), dict(type=int,  # no click default: --quick picks its own where none is given
                          help="Noise draws per σ.  [default: 3; --quick: 1]")),
    (("--drop", "drops"), dict(multiple=True, metavar="DROP",
                               help="Also report per site the σ at which accuracy falls by DROP: '1%' (points) or "
                                    "'5%rel' (of clean − chance). Repeatable; gate it with --rule "
                                    "'REGEX:SIGMA@1%'.")),
    (("--seed",), dict(type=int, default=0, show_default=True, help="Noise seed (same seed, same report).")),
    (("--quick",), dict(is_flag=True, help="A first look: a coarser σ search, 1 repeat and the first 32-256 samples "
                                           "(fewer for larger models) unless --repeats/--limit are given; wider "
                                           "intervals (docs/usage.md).")),
)


# --- runtime ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Runtime:
    provider: str = "auto"
    threads: int | None = None
    batch_size: int | None = None
    noise_source: str = "auto"
    exact: bool = False
    shard: str | None = None
    ray_address: str | None = None

    def config(self, global_mode: bool = False) -> dict:
        return {"provider": self.provider, "threads": self.threads, "batch_size": self.batch_size,
                "noise_source": self.noise_source, "exact": self.exact,
                "shard": _shard_option(self.shard, global_mode)}


def _shard_option(text: str | None, global_mode: bool) -> tuple[int, int] | None:
    """--shard I/N as (i, n); refused with --global (every site at once: nothing to split)."""
    if text is None:
        return None
    from walkaudit.config import parse_shard

    shard = parse_shard(text)
    if global_mode:
        raise UsageError("--shard splits the sites of a walk; --global puts noise at every site at once and cannot "
                         "be sharded")
    return shard


RUNTIME = Group(
    "Runtime", "runtime", Runtime,
    (("--provider",), dict(type=RegistryChoice(providers), default="auto", show_default=True,
                           help="onnxruntime provider; auto uses CUDA only where a session really runs on it.")),
    (("--threads",), dict(type=int, help="CPU threads for onnxruntime and noise [default: all].")),
    (("--batch-size",), dict(type=int, default=None, help="Samples per batch [default: 256 on the CPU; sized to the "
                                                          "free device memory on CUDA].")),
    (("--noise-source",), dict(type=RegistryChoice(noise_sources), default="auto", show_default=True,
                               help="Where ε is drawn: numpy on the host, or RandomNormalLike in the graph (opsets "
                                    "10-21); auto uses the graph on CUDA.")),
    (("--exact",), dict(is_flag=True, help="Keep σ = 0 bit-identical to the model in every session (turns off "
                                           "onnxruntime's NCHWc conv fusion, and running a [CLS] classifier's last "
                                           "layer on one position: slower on the CPU).")),
    (("--shard",), dict(metavar="I/N", help="Audit only shard I of N (1-based) of the selected sites, split by "
                                            "estimated cost; combine the N reports with 'walkaudit merge' (see "
                                            "docs/scale.md).")),
    (("--ray", "ray_address"), dict(is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
                                    help="Evaluate on Ray workers: alone, a local cluster on this machine's cores "
                                         "and GPUs; 'auto', 'ray://HOST:10001' or 'HOST:6379' joins a running cluster "
                                         "(the 'ray' extra; see docs/scale.md).")),
)


# --- gate ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gate:
    """The gate's flags; `config(baseline)` turns them into a walkaudit.report.gate.GateConfig."""

    fail_under: float | None = None
    fail_under_relative: float | None = None
    rules: tuple[str, ...] = ()
    rules_file: str | None = None
    min_clean_accuracy: float | None = None
    baseline: str | None = None
    max_drop: str | None = None
    undecided: str = "fail"
    allow_unmatched: bool = False

    @property
    def policy(self) -> dict:
        """--undecided and --allow-unmatched, as `gate.evaluate` takes them."""
        return {"undecided": self.undecided, "allow_unmatched": self.allow_unmatched}

    def config(self, baseline: str | None):
        """The GateConfig of the rules file and the flags; `baseline`: the report drops are measured against (the
        --baseline flag, or compare's OLD). Refuses a --max-drop without one, and a gate that cannot fail."""
        from walkaudit.report import gate

        config = gate.load_rules(self.rules_file) if self.rules_file else gate.GateConfig()
        thresholds = [gate.parse_rule(r) for r in self.rules]
        if self.fail_under is not None:
            thresholds.append(gate.Threshold(None, self.fail_under))
        if self.fail_under_relative is not None:
            thresholds.append(gate.Threshold(None, self.fail_under_relative, relative=True))
        flags = gate.GateConfig(tuple(thresholds), self.min_clean_accuracy,
                                gate.parse_drop(self.max_drop) if self.max_drop is not None else None)
        config = config.merge(flags)
        if config.max_drop is not None and baseline is None:
            raise UsageError("--max-drop needs --baseline")
        _check_plausible(config, self.max_drop)
        return config


#: a σ50 that may fall by more than this many decades (a factor of 1000) is hardly gated at all
_DECADES_IMPLAUSIBLE = 3.0


def _check_plausible(config, max_drop_flag: str | None) -> None:
    """Refuse a gate that can never fail because of a missing unit (`--max-drop 20`: 20 decades, not 20%); warn
    about other values under which nothing can fail."""
    import re

    from walkaudit.cli.app import warn

    drop = config.max_drop
    flag = (max_drop_flag or "").strip()
    bare = max_drop_flag is not None and re.fullmatch(r"\s*[-+0-9.eE]+\s*", str(max_drop_flag))
    if bare and drop.amount < _DECADES_IMPLAUSIBLE:  # every drop names its unit (an accuracy drop's bare is refused)
        warn(f"--max-drop {flag}: a bare number means decades here, but a drop names its unit: "
             f"write '{drop.amount:g}dec' (or a percentage like '20%'); a bare number will be refused in a later "
             "release")
    if drop is not None and drop.unit == "dec" and drop.amount >= _DECADES_IMPLAUSIBLE:
        if bare:
            raise UsageError(f"--max-drop {flag} means {drop.amount:g} decades (σ50 may fall by a "
                             f"factor of 10^{drop.amount:g}): a gate that cannot fail; write '{drop.amount:g}%' for "
                             f"percent, or '{drop.amount:g}dec' if you mean decades")
        warn(f"max drop {drop.amount:g} decades lets σ50 fall by a factor of 10^{drop.amount:g}: the drop rule can "
             "hardly fail (did you mean percent, e.g. '20%'?)")
    for t in config.thresholds:
        if t.value == 0:
            warn(f"threshold {t} is 0: every σ50 is ≥ 0, so it can never fail")
    if config.min_clean_accuracy == 0:
        warn("--min-clean-accuracy 0 can never fail (it is a fraction: 0.9 means 90%)")


GATE = Group(
    "Gate", "gate", Gate,
    (("--fail-under",), dict(type=float, metavar="SIGMA", help="Fail when a site's σ50 is below SIGMA.")),
    (("--fail-under-relative",), dict(type=float, metavar="X",
                                      help="Fail when a site's σ50 / activation std is below X.")),
    (("--rule", "rules"), dict(multiple=True, metavar="REGEX:SIGMA",
                               help="Per-site threshold, e.g. 'conv.*:0.05' (append 'rel' for relative). "
                                    "Repeatable.")),
    (("--rules", "rules_file"), dict(type=click.Path(dir_okay=False), metavar="FILE",
                                     help="Gate rules in a TOML file (see docs/ci.md).")),
    (("--min-clean-accuracy",), dict(type=float, metavar="A", help="Fail when clean accuracy is below A.")),
    (("--baseline",), dict(type=click.Path(dir_okay=False), metavar="REPORT",
                           help="A previous JSON report to compare against.")),
    (("--max-drop",), dict(metavar="DROP", help="Largest allowed σ50 drop vs --baseline: '20%' or '0.3dec' (a bare "
                                                "number means decades).")),
    (("--undecided",), dict(type=RegistryChoice(undecided_policies), default="fail", show_default=True,
                            help="What a rule whose 95% interval straddles its threshold does to the verdict "
                                 "(docs/ci.md).")),
    (("--allow-unmatched",), dict(is_flag=True, help="Accept a --rule that matches no site (a warning instead of an "
                                                     "error).")),
)

#: compare gates NEW against its OLD argument: no --baseline flag, and --max-drop says so
COMPARE_GATE: dict[str, Any] = dict(skip=("baseline",), helps={
    "max_drop": "Largest allowed σ50 drop of NEW vs OLD: '20%' or '0.3dec' (a bare number means decades)."})


# --- output ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Output:
    """What a command writes and prints. `json` is the JSON report's path, from --json or -o/--out (the same file
    under two names; refused when both are given and differ)."""

    out: str | None = None
    json_path: str | None = None
    markdown_path: str | None = None
    junit_path: str | None = None
    html: str | None = None
    output_format: str = "text"
    github: bool = False
    quiet: bool = False
    silent: bool = False
    legacy_output: str | None = None  # merge's --output, deprecated for -o/--out

    def __post_init__(self):
        out = self.out if self.out is not None else self.legacy_output
        if out is not None and self.json_path is not None and out != self.json_path:
            raise UsageError("-o/--out and --json both name the JSON report; give one of them")

    @property
    def json(self) -> str | None:
        if self.json_path is not None:
            return self.json_path
        return self.out if self.out is not None else self.legacy_output

    @property
    def annotations(self) -> str | None:
        """The format printed beside the table (`--format github`, `--github`), or None."""
        return "github" if self.github else None if self.output_format == "text" else self.output_format

    @property
    def files(self) -> list[tuple[str, str | None]]:
        """(flag, path) of every file output asked for: what `outputs.check` checks before any work."""
        return [("--json", self.json), ("--markdown", self.markdown_path), ("--junit", self.junit_path),
                ("--html", self.html)]


OUTPUT = Group(
    "Output", "output", Output,
    (("-o", "--out"), dict(metavar="PATH", help="Write the JSON report ('-' = stdout); the same as --json.")),
    (("--json", "json_path"), dict(metavar="PATH", help="Write the JSON report ('-' = stdout).")),
    (("--markdown", "markdown_path"), dict(metavar="PATH", help="Write a Markdown summary ('auto' = append to "
                                                                "$GITHUB_STEP_SUMMARY).")),
    (("--junit", "junit_path"), dict(metavar="PATH", help="Write JUnit XML (one test case per site).")),
    (("--html",), dict(metavar="PATH", help="Write a self-contained HTML report: table, curves and failures in one "
                                            "file.")),
    (("--format", "output_format"), dict(type=RegistryChoice(terminal_formats), default="text", show_default=True,
                                         help="github: also GitHub workflow annotations (::error per gate failure, "
                                              "::warning per warning).")),
    (("--github",), dict(is_flag=True, help="The same as --format github.")),
    (("-q", "--quiet"), dict(is_flag=True, help="Print only gate failures: no progress, no table, no warnings.")),
    (("-s", "--silent"), dict(is_flag=True, help="Print nothing; the exit code tells (an error that stops the run "
                                                 "still gets its line).")),
    deprecated("--output", "-o/--out", "legacy_output", metavar="PATH"),
)

#: the output flags of a command that writes a report: all but merge's old --output (in audit, --output is the
#: model's class output, a data option)
REPORT_OUTPUT: dict[str, Any] = dict(skip=("legacy_output",))


# --- resume ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resume:
    resume: bool = False
    checkpoint_path: str | None = None


RESUME = Group(
    "Resume", "resume", Resume,
    (("--resume",), dict(is_flag=True, help="Continue an interrupted or crashed audit from its checkpoint (the same "
                                            "model, data and settings; refused otherwise).")),
    (("--checkpoint", "checkpoint_path"), dict(metavar="PATH",
                                               help="Where the finished sites are saved while the audit runs "
                                                    "[default: <--json PATH>.checkpoint, else "
                                                    ".walkaudit/checkpoint-<hash>.json]; deleted once the report is "
                                                    "written.")),
)

#: every group, in the order audit composes them (and --help lists them)
GROUPS = (DATA, SITES, NOISE, SWEEP, RUNTIME, GATE, OUTPUT, RESUME)
