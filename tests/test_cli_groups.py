"""The command line's options are defined once, in groups (walkaudit.cli.options), and composed onto the commands:
no command defines a flag another command also has on its own, --help lists every command's options by group, each
group hands the command one typed value, and choice lists are their registries'."""

from __future__ import annotations

import dataclasses
import inspect

import click
import pytest
from click.testing import CliRunner

from walkaudit.cli import main
from walkaudit.cli import options as opt
from walkaudit.cli.inspect import LISTING
from walkaudit.cli.plan import BUDGET
from walkaudit.cli.plot import FIGURE

#: flags that two groups spell alike because they mean a command's own thing (issue 13's vocabulary: -o/--out is the
#: file a command writes, --format how it prints): each group defines its flag once
SAME_SPELLING = {
    "--format": {opt.OUTPUT, LISTING},  # report: text|github; inspect's listing: text|json
    "-o": {opt.OUTPUT, FIGURE},  # the JSON report; plot's image
    "--out": {opt.OUTPUT, FIGURE},
    "--json": {opt.OUTPUT, LISTING},  # the JSON report's path; inspect's deprecated switch for --format json
    "--output": {opt.DATA, opt.OUTPUT, FIGURE},  # audit: the model's class output; merge/plot: deprecated -o/--out
    "--baseline": {opt.GATE, FIGURE},  # gated against; drawn beside
    "--max-drop": {opt.GATE, BUDGET},  # σ50 drop vs a baseline; plan: accuracy drop with every site noisy
    "--relative": {FIGURE, BUDGET},  # plot's x axes; plan's σ
}


def commands() -> dict[str, click.Command]:
    return dict(main.commands)


def options(command: click.Command) -> list[click.Option]:
    return [p for p in command.params if isinstance(p, click.Option)]


def test_every_option_of_every_command_comes_from_a_group():
    loose = [(name, o.opts) for name, cmd in commands().items() for o in options(cmd)
             if not isinstance(getattr(o, "walkaudit_group", None), opt.Group)]
    assert loose == []


def test_no_two_commands_define_the_same_flag_apart():
    defined: dict[str, set] = {}
    users: dict[str, set] = {}
    for name, cmd in commands().items():
        for o in options(cmd):
            for flag in o.opts + o.secondary_opts:
                defined.setdefault(flag, set()).add(o.walkaudit_group)
                users.setdefault(flag, set()).add(name)
    apart = {flag: groups for flag, groups in defined.items() if len(groups) > 1}
    assert apart == SAME_SPELLING
    shared = {flag for flag, names in users.items() if len(names) > 1 and flag not in SAME_SPELLING}
    assert {"--data", "--noise", "--ratio", "--ops", "--include", "--exclude", "--repeats", "--seed", "--provider",
            "--threads", "--batch-size", "--limit", "--fail-under", "--rule", "--undecided", "--markdown",
            "-q", "--quiet"} <= shared  # one definition each, used by several commands


def test_a_group_gives_every_command_the_same_option_objects_definition():
    """What a group defines (type, default, help) is what every command composing it gets."""
    for name, cmd in commands().items():
        for o in options(cmd):
            group = o.walkaudit_group
            decls, kw = group.options[o.name]
            assert o.default == kw.get("default", o.default) and o.metavar == kw.get("metavar")
            if (name, o.name) in (("compare", "max_drop"), ("plan", "noise")):
                continue  # compare's NEW vs OLD (options.COMPARE_GATE); plan's global-mode noise models
            assert o.help == kw.get("help"), (name, o.name)


def sections(help_text: str) -> dict[str, str]:
    """--help's sections: title -> its lines."""
    found, title = {}, None
    for line in help_text.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            title = line[:-1]
            found[title] = ""
        elif title is not None:
            found[title] += line + "\n"
    return found


@pytest.mark.parametrize("name", ["audit", "inspect", "compare", "merge", "plot", "plan"])
def test_help_lists_each_commands_options_under_their_groups(name):
    result = CliRunner().invoke(main, [name, "--help"], terminal_width=200)
    assert result.exit_code == 0
    listed = sections(result.stdout)
    cmd = commands()[name]
    for o in options(cmd):
        if o.hidden:
            continue
        assert o.walkaudit_group.title in listed, (name, o.walkaudit_group.title)
        assert o.opts[-1] in listed[o.walkaudit_group.title], (name, o.opts)
    titles = [o.walkaudit_group.title for o in options(cmd) if not o.hidden]
    assert [t for t in listed if t in titles] == list(dict.fromkeys(titles))  # in the order the command composes


def test_audit_takes_one_value_per_group():
    fn = inspect.unwrap(commands()["audit"].callback)
    params = list(inspect.signature(fn).parameters)
    assert params == ["model", "data", "sites", "noise", "sweep", "runtime", "gate", "output", "resume"]
    assert [g.key for g in opt.GROUPS] == params[1:]
    for group in opt.GROUPS:
        assert dataclasses.is_dataclass(group.value) and group.value.__dataclass_params__.frozen


def test_commands_that_compose_the_noise_group_get_all_of_it():
    """An option added to NOISE (the noise kinds' flags) reaches the audit and the plan with no other change."""
    for name in ("audit", "plan"):
        got = [o.name for o in options(commands()[name]) if o.walkaudit_group is opt.NOISE]
        assert got == list(opt.NOISE.options), name
    assert set(opt.Noise().config()) == {f.name for f in dataclasses.fields(opt.Noise)}


def test_choice_lists_are_their_registries():
    from walkaudit._execution.runtime import PROVIDERS
    from walkaudit._execution.strategies import NOISE_SOURCES
    from walkaudit._noise import NOISE_MODELS
    from walkaudit.report.formats import ANNOTATIONS
    from walkaudit.report.gate import UNDECIDED_POLICIES

    by_flag = {o.opts[-1]: o for name, cmd in commands().items() for o in options(cmd)
               if o.walkaudit_group is not LISTING and name != "plan"}
    assert tuple(by_flag["--noise"].type.choices) == NOISE_MODELS
    assert tuple(by_flag["--provider"].type.choices) == PROVIDERS
    assert tuple(by_flag["--noise-source"].type.choices) == NOISE_SOURCES
    assert tuple(by_flag["--format"].type.choices) == ("text", *ANNOTATIONS)
    assert tuple(by_flag["--undecided"].type.choices) == UNDECIDED_POLICIES


def test_a_group_value_keeps_defaults_for_the_options_a_command_leaves_out():
    """plan takes --repeats and --seed of the sweep: its Sweep still says walk mode, adaptive σ, no drops."""
    sweep = opt.Sweep(repeats=2, seed=5)
    assert sweep.config() == {"mode": "walk", "sigmas": None, "repeats": 2, "seed": 5, "drops": ()}
    assert [o.name for o in options(commands()["plan"]) if o.walkaudit_group is opt.SWEEP] == ["repeats", "seed"]


def test_output_value_resolves_the_json_report_and_refuses_two_names():
    from walkaudit.errors import UsageError

    assert opt.Output(out="a.json").json == "a.json"
    assert opt.Output(legacy_output="b.json").json == "b.json"
    assert opt.Output(out="a.json", json_path="a.json").json == "a.json"
    with pytest.raises(UsageError, match="both name the JSON report"):
        opt.Output(out="a.json", json_path="b.json")
    assert opt.Output(github=True).annotations == "github" and opt.Output().annotations is None


def test_the_registries_are_read_only_when_a_choice_is_needed():
    """`walkaudit version` and `import walkaudit.cli` import neither onnxruntime nor onnx (choices are lazy); --help
    of audit reads them."""
    import subprocess
    import sys

    code = ("import sys; import walkaudit.cli; from click.testing import CliRunner; "
            "r = CliRunner().invoke(walkaudit.cli.main, ['version']); assert r.exit_code == 0; "
            "print(sorted(m for m in ('onnx', 'onnxruntime', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    from walkaudit._execution.runtime import PROVIDERS
    from walkaudit._noise import NOISE_MODELS

    text = CliRunner().invoke(main, ["audit", "--help"], terminal_width=200).stdout
    assert f"[{'|'.join(NOISE_MODELS)}]" in text and f"[{'|'.join(PROVIDERS)}]" in text
