"""`walkaudit bits`: the per-bit sensitivity table of one site under bit flips (`walkaudit.bit_table`).

Exit codes: 0 done, 2 bad usage or input, 3 runtime failure.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import click

from walkaudit.cli import options as opt
from walkaudit.cli import outputs
from walkaudit.cli.app import GroupedCommand, guarded, main
from walkaudit.errors import UsageError


@dataclass(frozen=True)
class Rate:
    """The bit error rate each bit position flips at."""

    ber: float = 1e-3


RATE = opt.Group("Bit flips", "rate", Rate,
                 (("--ber",), dict(type=float, default=1e-3, show_default=True, metavar="P",
                                   help="The bit error rate.")))


@main.command("bits", cls=GroupedCommand)
@guarded
@click.argument("model", type=click.Path(dir_okay=False))
@opt.DATA(only=("data_path", "limit"))
@opt.SITES(only=("site_names",))
@RATE
@opt.NOISE(only=("target",))
@opt.SWEEP(only=("repeats", "seed"))
@opt.RUNTIME(only=("provider",))
@opt.OUTPUT(only=("json_path",))
def bits_command(model: str, data: opt.Data, sites: opt.Sites, rate: Rate, noise: opt.Noise, sweep: opt.Sweep,
                 runtime: opt.Runtime, output: opt.Output):
    """Accuracy with only one bit position of the --site (a value, or with --target weights a weight initializer)
    flipping at rate --ber, for every bit of its stored type (float32: 32 rows, int8: 8), the other bits and sites
    clean.

    \b
      walkaudit bits model.onnx --data val.npz --site conv1 --ber 1e-3
      walkaudit bits model.onnx --data val.npz --site fc1.weight --target weights --ber 1e-4
    """
    if len(sites.site_names) != 1:
        raise UsageError("bits: give exactly one --site (the value or weight whose bits to flip)")
    site, ber, target, json_path = sites.site_names[0], rate.ber, noise.target or "activations", output.json_path
    data_path, limit, seed, provider = data.data_path, data.limit, sweep.seed, runtime.provider
    repeats = sweep.config()["repeats"]
    from rich.console import Console
    from rich.table import Table

    from walkaudit.bit_table import bit_sensitivity

    outputs.check([("the model", model), ("the data (--data)", data_path)], [("--json", json_path)])
    table_data = bit_sensitivity(model, data=data_path, site=site, ber=ber, target=target, repeats=repeats,
                                 seed=seed, limit=limit, provider=provider)
    if json_path:
        outputs.write(json_path, json.dumps(table_data, indent=1) + "\n")
    console = Console(stderr=json_path == "-", highlight=False)
    table = Table(header_style="bold", title=f"{site} ({table_data['dtype']}, {target}) at BER {ber:g}")
    for col in ("bit", "group", "accuracy", "± std", "drop"):
        table.add_column(col, justify="left" if col == "group" else "right")
    for row in table_data["bits"]:
        table.add_row(str(row["bit"]), row["group"], f"{row['accuracy']:.4f}", f"{row['accuracy_std']:.4f}",
                      f"{row['drop']:+.4f}")
    console.print(table)
    console.print(f"clean accuracy {table_data['clean_accuracy']:.4f}, chance {table_data['chance']:.4f}",
                  markup=False)
