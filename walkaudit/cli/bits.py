"""`walkaudit bits`: the per-bit sensitivity table of one site under bit flips (`walkaudit.bit_table`).

Exit codes: 0 done, 2 bad usage or input, 3 runtime failure.
"""

from __future__ import annotations

import json

import click

from walkaudit.cli import _check_outputs, _write, guarded, main


@main.command("bits")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", "data_path", required=True, type=click.Path(), metavar="FILE",
              help="Validation data (as for the audit).")
@click.option("--site", required=True, metavar="NAME", help="The value (or, with --target weights, the weight "
                                                            "initializer) whose bits to flip.")
@click.option("--ber", type=float, default=1e-3, show_default=True, metavar="P", help="The bit error rate.")
@click.option("--target", type=click.Choice(["activations", "weights"]), default="activations", show_default=True)
@click.option("--repeats", type=int, default=3, show_default=True, help="Draws per bit.")
@click.option("--seed", type=int, default=0, show_default=True, help="Noise seed.")
@click.option("--limit", type=int, metavar="N", help="Use only the first N samples.")
@click.option("--provider", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
@click.option("--json", "json_path", metavar="PATH", help="Write the table as JSON ('-' = stdout).")
@guarded
def bits_command(model, data_path, site, ber, target, repeats, seed, limit, provider, json_path):
    """Accuracy with only one bit position of SITE flipping at rate --ber, for every bit of its stored type (float32:
    32 rows, int8: 8), the other bits and sites clean.

    \b
      walkaudit bits model.onnx --data val.npz --site conv1 --ber 1e-3
      walkaudit bits model.onnx --data val.npz --site fc1.weight --target weights --ber 1e-4
    """
    from rich.console import Console
    from rich.table import Table

    from walkaudit.bit_table import bit_sensitivity

    _check_outputs(json_path, None, None)
    table_data = bit_sensitivity(model, data=data_path, site=site, ber=ber, target=target, repeats=repeats,
                                 seed=seed, limit=limit, provider=provider)
    if json_path:
        _write(json_path, json.dumps(table_data, indent=1) + "\n")
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
