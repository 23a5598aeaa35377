"""Every choice list of the noise models comes from the registry, and bad combinations of noise options are one
clear error (exit 2), never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from walkaudit._execution import strategies
from walkaudit._loading.model import value_types
from walkaudit._noise import NOISE_MODELS, REGISTRY, make_noise, model_class
from walkaudit.cli import main
from walkaudit.config import AuditConfig, OptionError

from .models import mlp, resnet_block, teacher_labels

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = (ROOT / "walkaudit" / "report" / "report.schema.json", ROOT / "docs" / "report.schema.json")


def test_both_schema_copies_are_identical_and_their_noise_enum_is_the_registry():
    texts = [p.read_text() for p in SCHEMAS]
    assert texts[0] == texts[1]
    enum = json.loads(texts[0])["properties"]["config"]["properties"]["noise"]["enum"]
    assert enum == list(NOISE_MODELS)


def test_every_command_offers_the_registered_models():
    import walkaudit.cli.plan  # noqa: F401  (registers `walkaudit plan`)
    from walkaudit._noise.registry import global_models

    offered = {name: list(p.type.choices) for name, cmd in main.commands.items() for p in cmd.params
               if p.name == "noise"}
    assert offered.pop("plan") == list(global_models())  # every layer noisy at once: what global mode takes
    assert len(offered) >= 1 and all(choices == list(NOISE_MODELS) for choices in offered.values())
    assert set(global_models()) < set(NOISE_MODELS) and "bitflip" not in global_models()


def test_every_registered_model_is_its_kind_and_describes_itself():
    assert set(NOISE_MODELS) >= {"additive", "multiplicative", "combined", "uniform", "quantize", "bitflip",
                                 "weight-additive", "weight-multiplicative"}
    for kind in NOISE_MODELS:
        noise = make_noise(kind)
        assert type(noise) is model_class(kind) and noise.kind == kind
        assert noise.describe()["noise"] == kind
        assert noise.target in ("activations", "weights")
        assert REGISTRY[kind].summary
        lo, hi = noise.plan().lowest, noise.plan().highest
        assert lo < hi  # a search range on the noise axis


def test_listing_the_models_needs_no_numpy():
    code = ("import sys, walkaudit.cli, walkaudit._noise; "
            "print([m for m in ('numpy', 'onnx', 'scipy') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("options, field", [
    (dict(noise="additive", bits="8"), "bits"),
    (dict(noise="quantize", bits="0"), "bits"),
    (dict(noise="bitflip", bits="exponent,99"), "bits"),
    (dict(noise="bitflip", bits="sideways"), "bits"),
    (dict(noise="bitflip", bits=""), "bits"),
    (dict(noise="quantize", mode="global"), "noise"),
    (dict(noise="bitflip", mode="global"), "noise"),
    (dict(noise="quantize", noise_source="graph"), "noise_source"),
    (dict(noise="gaussian"), "noise"),
    (dict(noise="additive", target="weights"), "target"),
    (dict(noise="bitflip", target="chip"), "target"),
    (dict(noise="weight-additive", mode="global"), "noise"),
])
def test_noise_options_that_cannot_work_name_their_field(options, field):
    with pytest.raises(OptionError) as e:
        AuditConfig(**options).check()
    assert e.value.field == field


def test_noise_options_that_work_pass():
    for options in (dict(noise="quantize", bits="8,4"), dict(noise="bitflip", bits="sign"),
                    dict(noise="bitflip", bits="0-7,31"), dict(noise="uniform", mode="global"),
                    dict(noise="uniform", noise_source="graph"), dict(noise="bitflip", target="weights"),
                    dict(noise="weight-multiplicative")):
        assert AuditConfig(**options).check().noise_model().kind == options["noise"]


def test_a_bad_bits_spec_is_one_line_and_exit_2(tmp_path):
    model = mlp(seed=1)
    onnx.save(model, tmp_path / "m.onnx")
    x = np.random.default_rng(2).normal(size=(64, 16)).astype(np.float32)
    np.savez(tmp_path / "val.npz", x=x, y=teacher_labels(model, x))
    result = CliRunner().invoke(main, [str(tmp_path / "m.onnx"), "--data", str(tmp_path / "val.npz"),
                                       "--noise", "additive", "--bits", "8"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == ["walkaudit: error: --bits only applies to quantize and bitflip noise"]


def test_models_without_graph_nodes_take_the_host_path_and_never_draw_in_the_graph():
    spec = value_types(resnet_block())["b"]
    cpu, cuda = "CPUExecutionProvider", "CUDAExecutionProvider"
    for kind in ("quantize", "bitflip"):
        noise = make_noise(kind)
        for provider, source in ((cpu, "auto"), (cuda, "auto"), (cpu, "host")):
            assert strategies.choose("walk", 17, [spec], provider, source, noise) is strategies.HostApplied
        assert not strategies.graph_draws(17, cuda, "auto", noise)
    uniform = make_noise("uniform")
    assert strategies.choose("walk", 17, [spec], cuda, "auto", uniform) is strategies.DrawnSuffix
    assert strategies.choose("walk", 17, [spec], cpu, "auto", uniform) is strategies.FedSuffix
    assert strategies.choose("global", 17, [spec], cpu, "auto", uniform) is strategies.FedGlobal


@pytest.mark.parametrize("kind", NOISE_MODELS)
def test_every_registered_model_audits_end_to_end_and_accuracy_falls_along_its_axis(kind):
    """The adaptive search on each model's own axis: the report validates (it is built through the schema), names
    the model, and the accuracy at the noisiest level is below the accuracy at the least noisy one."""
    import walkaudit

    model = mlp(seed=4)
    x = np.random.default_rng(4).normal(size=(192, 16)).astype(np.float32)
    report = walkaudit.audit(model, x, teacher_labels(model, x), noise=kind, repeats=1, provider="cpu")
    assert report.config.noise == kind
    assert [s.name for s in report.sites] == (["w1", "w2"] if kind.startswith("weight-") else ["h", "logits"])
    for site in report.sites:
        points = sorted(site.points, key=lambda p: p.sigma)
        if kind == "weight-pcm":  # programming noise from the start; ageing may not halve a small MLP
            assert points[-1].sigma / points[0].sigma >= 1e6  # the search walks decades of t
            continue
        assert points[-1].accuracy < points[0].accuracy


def test_the_docs_tables_list_every_registered_model():
    """method.md's table of noise models and usage.md's table of their levels name every model of the registry
    (they are written by hand: a model added to the registry must be added there)."""
    import re
    from pathlib import Path

    docs = Path(__file__).resolve().parent.parent / "docs"
    method = docs.joinpath("method.md").read_text()
    listed = set(re.findall(r"^\| `([a-z][a-z-]*)` \|", method, flags=re.M))
    assert listed == set(NOISE_MODELS), listed ^ set(NOISE_MODELS)
    usage = docs.joinpath("usage.md").read_text()
    table = usage[usage.index("| `--noise` | level | midpoint columns |"):]
    table = table[:table.index("\n\n")]
    rows = {kind.strip() for line in table.splitlines()[2:] for kind in line.split("|")[1].split(",")}
    assert rows == set(NOISE_MODELS), rows ^ set(NOISE_MODELS)
