"""Sites of torch dynamo exports carry their module path (`Site.module`, the report's optional site `module`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from onnx import TensorProto, helper

from walkaudit._graph.sites import Selection, module_path, select, with_modules
from walkaudit._loading.model import load_model
from walkaudit.errors import UsageError
from walkaudit.report.model import Report, SiteResult

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def _sites(name: str, **selection):
    loaded = load_model(str(SAMPLES / name))
    return select(loaded.proto, loaded.types, Selection(**selection), loaded.class_output.name)


def test_lenet5_dynamo_sites_are_named_by_their_modules():
    sites = _sites("mnist_lenet5.dynamo.onnx")
    assert [(s.name, s.module) for s in sites] == [
        ("conv2d", "features.0"), ("conv2d_1", "features.3"), ("linear", "classifier.1"),
        ("linear_1", "classifier.3"), ("logits", "classifier.5")]


def test_batchnorm_getitem_sites_get_the_module_path():
    # the BatchNorm's output is the site (a `getitem`): its module is the BatchNorm layer
    assert [s.module for s in _sites("mnist_mlp_bn.dynamo.onnx")] == ["net.2", "net.5", "net.7"]


def test_sites_sharing_a_module_are_told_apart_and_unique():
    sites = _sites("digits_tokens_cls.dynamo.onnx")
    by_name = {s.name: s.module for s in sites}
    assert by_name["linear"] == "layers.0.att.q"
    assert by_name["matmul"] == "layers.0.att/matmul" and by_name["matmul_1"] == "layers.0.att/matmul_1"
    modules = [s.module for s in sites]
    assert None not in modules and len(set(modules)) == len(modules)
    transformer = [s.module for s in _sites("digits_tokens_transformer.dynamo.onnx")]
    assert len(set(transformer)) == len(transformer)


def test_graphs_without_module_metadata_have_none():
    assert {s.module for s in _sites("mnist_lenet5.legacy.onnx")} == {None}
    assert {s.module for s in _sites("digits_sklearn_mlp.onnx")} == {None}


def test_include_and_exclude_match_the_module_path():
    assert [s.name for s in _sites("mnist_lenet5.dynamo.onnx", include=r"^classifier\.[13]$")] == ["linear",
                                                                                                  "linear_1"]
    assert [s.name for s in _sites("mnist_lenet5.dynamo.onnx", exclude=r"^features")] == ["linear", "linear_1",
                                                                                          "logits"]
    # indices are renumbered in the selection, as before
    assert [s.index for s in _sites("mnist_lenet5.dynamo.onnx", exclude=r"^features")] == [0, 1, 2]


def test_namespace_is_read_when_name_scopes_are_missing():
    node = helper.make_node("Relu", ["x"], ["y"])
    helper.set_metadata_props(node, {"namespace": ": Net/layer3: torch.nn.Sequential/layer3.1: Bottleneck/"
                                                  "layer3.1.conv2: torch.nn.Conv2d/conv2d_5: aten.conv2d.default"})
    assert module_path(node) == ("layer3.1.conv2", "conv2d_5")
    top = helper.make_node("Relu", ["x"], ["y"])
    helper.set_metadata_props(top, {"pkg.torch.onnx.name_scopes": "['', 'add_4']"})
    assert module_path(top) is None  # an op of the top module: no module path


def test_with_modules_leaves_graphs_without_metadata_alone():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="r")], "g", [x], [y]))
    from walkaudit._graph.sites import Site
    site = Site(0, "y", "r", "Relu", (1, 2))
    assert with_modules(model, [site]) == [site]


def test_report_keeps_module_and_reads_old_reports(tmp_path):
    import walkaudit

    report = walkaudit.audit(str(SAMPLES / "mnist_mlp.dynamo.onnx"), data=str(SAMPLES / "mnist_val.npz"),
                             limit=64, repeats=1, sigmas=(0.5, 5.0, 50.0))
    assert [s.module for s in report.sites] == ["net.1", "net.3", "net.5"]
    body = report.to_dict()
    assert [s["module"] for s in body["sites"]] == ["net.1", "net.3", "net.5"]
    assert Report.from_dict(json.loads(json.dumps(body))).sites[0].module == "net.1"
    # a report written before the field: still read, no module
    old = json.loads(json.dumps(body))
    for s in old["sites"]:
        del s["module"]
    assert Report.from_dict(old).sites[0].module is None
    with pytest.raises(UsageError, match="module"):
        SiteResult.from_dict({**body["sites"][0], "module": 3})  # the schema says: a string


def test_renderers_show_the_module_path(capsys):
    from rich.console import Console

    import walkaudit
    from walkaudit.report.formats.html import to_html
    from walkaudit.report.formats.markdown import to_markdown
    from walkaudit.report.render import show, site_table

    report = walkaudit.audit(str(SAMPLES / "mnist_mlp.dynamo.onnx"), data=str(SAMPLES / "mnist_val.npz"),
                             limit=64, repeats=1, sigmas=(0.5, 5.0, 50.0))
    console = Console(record=True, width=200)
    show(console, site_table(report, width=200))
    assert "net.3 (linear_1)" in console.export_text() + capsys.readouterr().out
    assert "net.3 (`linear_1`)" in to_markdown(report)
    assert "net.<wbr>3 (linear_<wbr>1)" in to_html(report)
