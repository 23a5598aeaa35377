"""Every snippet in the docs holds: YAML blocks parse, shell blocks are valid shell, and every `walkaudit ...` command
line (in a shell block or an inline code span) parses with the real CLI (click's own parser, nothing run)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import warnings
from pathlib import Path

import click
import pytest
import yaml

from walkaudit.cli import main

try:
    import tomllib
except ImportError:  # Python 3.10: the tomli walkaudit depends on there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([*ROOT.glob("docs/*.md"), ROOT / "README.md"])
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
SHELL = ("sh", "bash", "shell", "console")
#: what ends one command in a line of shell (a pipe, a list, a redirection of the command's output)
ENDS = {"|", "||", "&&", ";", ">", ">>", "2>", "2>&1", "&"}


def blocks(kind: tuple[str, ...]) -> list[tuple[str, int, str]]:
    """(doc, line, text) of every fenced block whose language is one of `kind`."""
    found = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for m in FENCE.finditer(text):
            if m.group(1) in kind:
                found.append((doc.name, text[:m.start()].count("\n") + 1, m.group(2)))
    return found


def ids(items) -> list[str]:
    return [f"{doc}:{line}" for doc, line, *_ in items]


YAML = blocks(("yaml", "yml"))


@pytest.mark.parametrize("doc, line, text", YAML, ids=ids(YAML))
def test_yaml_blocks_parse(doc, line, text):
    assert yaml.safe_load(text) is not None


def test_the_ci_examples_are_real_ci_files():
    """docs/ci.md: the GitHub workflow's steps and GitLab's script are where the runners look for them, and neither
    installs from a tag that does not exist (walkaudit has no release tags; pin a commit instead)."""
    github, gitlab = [yaml.safe_load(t) for doc, _, t in YAML if doc == "ci.md"][:2]
    steps = github["jobs"]["walkaudit"]["steps"]
    assert [s.get("uses", "").split("@")[0] for s in steps if "uses" in s] == [
        "actions/checkout", "actions/setup-python", "actions/upload-artifact"]
    upload = next(s for s in steps if s.get("uses", "").startswith("actions/upload-artifact"))
    assert upload["with"]["path"].split() == ["report.json", "junit.xml", "report.html"]
    script = gitlab["walkaudit"]["script"]
    assert all(isinstance(s, str) for s in script) and script[1].startswith("walkaudit model.onnx")
    for doc, _, text in YAML:
        assert not re.search(r"@v\d+\.\d+\.\d+\b", text.replace("actions/", "")), f"{doc}: a pinned release tag"


TOML = blocks(("toml",))


@pytest.mark.parametrize("doc, line, text", TOML, ids=ids(TOML))
def test_toml_blocks_parse(doc, line, text):
    assert tomllib.loads(text)


SH = blocks(SHELL)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("doc, line, text", SH, ids=ids(SH))
def test_shell_blocks_are_valid_shell(doc, line, text):
    result = subprocess.run(["bash", "-n"], input=text, text=True, capture_output=True, check=False)
    assert result.returncode == 0, result.stderr


def commands(text: str) -> list[str]:
    """The `walkaudit ...` command lines of a shell block: continuations joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    found = []
    for line in joined.splitlines():
        line = line.strip()
        if line.startswith("$ "):
            line = line[2:]
        if re.match(r"(\w+=\S+\s+)*(python -m )?walkaudit\s", line):
            found.append(line)
    return found


def inline_commands(text: str) -> list[str]:
    """The inline code spans that are walkaudit commands (`walkaudit plot report.json -o x.png`)."""
    return [m for m in re.findall(r"`((?:python -m )?walkaudit [^`]+)`", text)]


def is_example(span: str) -> bool:
    """An inline span that is a whole command: more than a command's name, no placeholder (MODEL, S, …)."""
    words = span.split()
    return len(words) > 2 and "…" not in span and not re.search(r"(?<![$\w])[A-Z][A-Z0-9_]*\b", span)


def cli_lines() -> list[tuple[str, int, str]]:
    found = []
    for doc, line, text in [*SH, *blocks(("",))]:  # shell blocks and blocks without a language (transcripts)
        found += [(doc, line, c) for c in commands(text)]
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        outside = FENCE.sub("", text)
        found += [(doc.name, 0, c) for c in inline_commands(outside) if is_example(c)]
    return found


def argv(command: str) -> list[str]:
    """The arguments walkaudit gets: up to the first shell operator, comments and synopsis brackets dropped."""
    command = re.sub(r"\s\[[^\]]*\]", " ", command)  # [--fail-under …]: optional parts of a synopsis
    words = shlex.split(command, comments=True)
    while words and re.fullmatch(r"\w+=\S*", words[0]):
        words.pop(0)
    if words[:2] == ["python", "-m"]:
        words = words[2:]
    assert words[0] == "walkaudit", command
    args = []
    for word in words[1:]:
        if word in ENDS or word.startswith((">", "2>")):
            break
        args.append(word)
    return args


def parse(args: list[str]) -> None:
    """Parse like `walkaudit ARGS` without running: the group, then the command (UsageError when refused)."""
    with main.make_context("walkaudit", list(args)) as ctx:
        with warnings.catch_warnings():  # click 8.2 deprecates protected_args (9.0 puts every token in args)
            warnings.simplefilter("ignore", DeprecationWarning)
            tokens = [*ctx.protected_args, *ctx.args]
        if not tokens:
            return
        name, rest = tokens[0], tokens[1:]
        cmd = main.get_command(ctx, name)
        assert cmd is not None, f"no command {name!r}"
        cmd.make_context(name, rest, parent=ctx)


LINES = cli_lines()


def test_the_docs_have_commands_to_check():
    assert len(LINES) > 30 and len({doc for doc, *_ in LINES}) >= 5


@pytest.mark.parametrize("doc, line, command", LINES, ids=[f"{d}:{n}:{c[:40]}" for d, n, c in LINES])
def test_every_walkaudit_command_in_the_docs_parses(doc, line, command, monkeypatch):
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", "summary.md")
    args = argv(command)
    if args and args[0] in ("--help", "-h", "--version", "help", "version"):
        return  # these print and exit
    try:
        parse(args)
    except click.exceptions.Exit:
        pass
    except click.UsageError as exc:
        pytest.fail(f"{doc}: {command!r}: {exc.format_message()}")
