"""`walkaudit inspect MODEL`: the candidate sites, as a table or JSON."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from walkaudit.cli import options as opt
from walkaudit.cli.app import GroupedCommand, guarded, main

#: samples of the data the estimate's clean pass is timed on, in batches of PROBE_BATCH
PROBE_SAMPLES = 256
PROBE_BATCH = 64


@dataclass(frozen=True)
class Listing:
    output_format: str = "text"
    legacy_json: bool = False  # --json, deprecated for --format json

    @property
    def as_json(self) -> bool:
        return self.output_format == "json" or self.legacy_json


#: inspect prints a listing, not a report: its --format is text or json
LISTING = opt.Group(
    "Output", "listing", Listing,
    (("--format", "output_format"), dict(type=click.Choice(["text", "json"]), default="text", show_default=True,
                                         help="json: the sites as a JSON list.")),
    opt.deprecated("--json", "--format json", "legacy_json", is_flag=True),
)


@main.command(cls=GroupedCommand)
@guarded
@click.argument("model", type=click.Path(dir_okay=False))
@opt.SITES(only=("ops", "include", "exclude"))
@opt.DATA(only=("data_path",), optional=("data_path",))
@opt.NOISE(only=("noise", "target"))
@opt.SWEEP(only=("quick",))
@LISTING
def inspect(model: str, sites: opt.Sites, data: opt.Data, noise: opt.Noise, sweep: opt.Sweep, listing: Listing):
    """List the candidate sites of MODEL: index, module path (dynamo exports), tensor, node, op type, shape, MACs
    per sample. With --data, also the audit's estimated time and peak memory ("estimated: ~N min, peak ~M GiB"),
    from a clean pass over the data's first 256 samples, timed (with --quick: of a quick audit). With --noise and
    --target, the sites that audit would perturb (`--noise bitflip`: an INT8 model's stored int8 values;
    `--target weights`: the layers' weight initializers), the names `walkaudit bits --site` takes."""
    data_path, quick = data.data_path, sweep.quick
    from rich.console import Console

    from walkaudit._graph.cost import sites_macs
    from walkaudit._graph.sites import select
    from walkaudit._loading.model import load_model
    from walkaudit._noise import make_noise

    kind = make_noise(noise.noise, target=noise.target)
    loaded = load_model(model)
    found = select(loaded.proto, loaded.types, sites.selection(), loaded.class_output.name, target=kind.target,
                   stored=kind.stored)
    macs = sites_macs(loaded, found)
    estimate = None if data_path is None else _estimate(model, data_path, sites, quick)
    if listing.as_json and estimate is not None:
        click.echo(json.dumps({"sites": _site_dicts(found, macs), "estimate": {
            "seconds": round(estimate.seconds, 1), "peak_bytes": estimate.peak_bytes, "quick": quick}}, indent=2))
        return
    if listing.as_json:
        click.echo(json.dumps(_site_dicts(found, macs), indent=2))
        return
    from walkaudit.report import render
    from walkaudit.report.text import printable, shape_text

    out = loaded.class_output
    width = render.output_width(sys.stdout)  # None (a pipe, a log): the whole table
    console = Console(highlight=False, width=width or 100_000)
    modules = any(s.module for s in found)  # a dynamo export: the module path first
    columns = [render.Column("#", "right", "index"), *([render.Column("module", kind="name")] if modules else []),
               render.Column("tensor", kind="name"), render.Column("node", kind="name"), render.Column("op"),
               render.Column("shape"), render.Column("MACs", "right", "number")]
    rows = [[str(s.index), *([render.Name(printable(s.module or ""))] if modules else []),
             render.Name(printable(s.name)), render.Name(printable(s.node)), printable(s.op_type),
             shape_text(s.shape), _count_text(m)] for s, m in zip(found, macs)]
    # a line of its own, not the table's title: rich wraps a title to the table's width
    console.print(f"{len(found)} sites of {printable(Path(model).name)} (class output '{printable(out.name)}', "
                  f"{out.kind}{' per token' if out.per_token else ''})", markup=False, soft_wrap=True)
    # never cropped: names lose their common prefix (never their end) or the rows become records at narrow widths
    render.show(console, render.fit(columns, rows, width))
    if estimate is not None:
        console.print(f"{estimate.line()} ({'a --quick' if quick else 'a full'} audit of these sites, default options)",
                      markup=False, soft_wrap=True)


def _estimate(model: str, data_path: str, sites: opt.Sites, quick: bool):
    """The audit's estimate (`AuditRun.estimate`): the clean pass timed on the data's first PROBE_SAMPLES samples
    (after its first batch; in batches of PROBE_BATCH or fewer, within 1 GiB of site values), scaled to all of them
    (or to quick mode's share)."""
    from walkaudit import api
    from walkaudit._execution.sizing import DEFAULT_BATCH

    options = {"selection": sites.selection(), "quick": quick, "data_sha256": ""}  # not hashed: nothing is stored
    full = api.iter_audit(model, data=data_path, **options)
    samples, fitting = full.dataset.samples, full._bounded_batch()  # the batch whose site values fit 1 GiB
    probe = api.iter_audit(model, data=data_path, limit=min(samples, PROBE_SAMPLES),
                           batch_size=min(PROBE_BATCH, fitting), provider="cpu", **options)
    try:
        probe.start()
        return probe.estimate(samples=samples, batch=min(DEFAULT_BATCH, fitting))
    finally:
        probe.close()


def _site_dicts(found, macs) -> list[dict]:
    return [{"index": s.index, "name": s.name, "node": s.node, "op_type": s.op_type,
             "shape": None if s.shape is None else list(s.shape), "macs": m,
             **({"module": s.module} if s.module else {})} for s, m in zip(found, macs)]


def _count_text(value: int | None) -> str:
    """A count for a table: 840, 117.6k, 3.699G; '?' when unknown."""
    if value is None:
        return "?"
    for unit, scale in (("T", 10**12), ("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if value >= scale:
            return f"{value / scale:.4g}{unit}"
    return str(value)
