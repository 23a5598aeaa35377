"""`walkaudit plot REPORT -o FILE`: accuracy vs σ per site and σ50 per site, as an image."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click

from walkaudit.cli import options as opt
from walkaudit.cli.app import GroupedCommand, guarded, main
from walkaudit.cli.reports import read_report
from walkaudit.errors import UsageError


@dataclass(frozen=True)
class Figure:
    out: str | None = None
    legacy_output: str | None = None  # --output, deprecated for -o/--out
    baseline: str | None = None
    relative: bool = False

    @property
    def path(self) -> str | None:
        return self.out if self.out is not None else self.legacy_output


#: what plot draws and where: its -o/--out is an image, its --baseline an overlay (not a gate's baseline)
FIGURE = opt.Group(
    "Plot", "figure", Figure,
    (("-o", "--out"), dict(metavar="FILE", help="Image file: .png, .svg or .pdf (required).")),
    opt.deprecated("--output", "-o/--out", "legacy_output", metavar="FILE"),
    (("--baseline",), dict(metavar="REPORT", type=click.Path(dir_okay=False),
                           help="Overlay a baseline report: its curves dotted, its σ50 as black ticks on the bars.")),
    (("--relative",), dict(is_flag=True, help="σ / activation std on the x axes instead of σ.")),
)


@main.command(cls=GroupedCommand)
@guarded
@click.argument("report_path", metavar="REPORT", type=click.Path(dir_okay=False))
@FIGURE
def plot(report_path: str, figure: Figure):
    """Plot accuracy vs σ per site and σ50 per site from a JSON report (needs matplotlib).

    \b
      walkaudit plot report.json -o curves.png
      walkaudit plot report.json -o curves.svg --baseline baseline.json --relative
    """
    from walkaudit.report.plot import FORMATS, plot_report, save_figure
    from walkaudit.report.text import printable

    out = figure.path
    if out is None:
        raise UsageError("plot needs the image file: -o/--out FILE (.png, .svg or .pdf)")
    if Path(out).suffix.lower() not in FORMATS:
        raise UsageError(f"plot output must end in .png, .svg or .pdf, got {printable(out)}")
    drawn = plot_report(read_report(report_path),
                        baseline=read_report(figure.baseline) if figure.baseline else None, relative=figure.relative)
    save_figure(drawn, out)
    click.echo(f"wrote {printable(out)}", err=True)
