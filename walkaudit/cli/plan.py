"""`walkaudit plan`: a multi-execution plan for hardware noise σ at every layer (`walkaudit.planning`).

Exit codes: 0 a plan is shown to meet the bound (the upper end of its measured drop's 95 % interval is within it)
and --max-cost, 1 no plan within --max-repeats and --max-evaluations is shown to meet it ("not shown" where the
interval straddles the bound) or it costs more than --max-cost, 2 bad usage or input, 3 runtime failure.
"""

from __future__ import annotations

import click

from walkaudit.cli import (
    _check_outputs,
    _selection,
    _write,
    guarded,
    main,
    site_options,
)
from walkaudit._noise.registry import NOISE_MODELS
from walkaudit.errors import UsageError


def _cost(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text.strip().lower().removesuffix("x"))
    except ValueError:
        raise UsageError(f"--max-cost {text!r}: expected a multiple of one plain pass, e.g. 1.5x") from None
    if not value >= 1.0:
        raise UsageError(f"--max-cost {text!r}: a plan costs at least one plain pass (1x)")
    return value


@main.command("plan")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", "data_path", required=True, type=click.Path(), metavar="FILE",
              help="Validation data (as for the audit).")
@click.option("--sigma", type=float, required=True, metavar="S", help="The hardware's noise σ at every site.")
@click.option("--max-drop", "max_drop", required=True, metavar="DROP",
              help="Largest accuracy drop with every site noisy: '1%' (points) or '5%rel' (of clean − chance).")
@click.option("--relative", is_flag=True, help="S is in units of each site's clean activation std.")
@click.option("--noise", type=click.Choice(NOISE_MODELS), default="additive", show_default=True,
              help="Noise model (global: additive, multiplicative, combined or uniform).")
@click.option("--ratio", type=float, default=0.5, show_default=True, help="combined: σa = σ·r, σm = σ·(1−r).")
@click.option("--max-repeats", type=int, default=16, show_default=True, help="Most repetitions of one layer.")
@click.option("--max-cost", metavar="X", help="Fail when the plan costs more than X plain passes, e.g. 1.5x.")
@click.option("--max-evaluations", type=int, metavar="N",
              help="Most noisy sample evaluations the verification may spend showing the bound (more draws, more "
                   "rounds) [default: 100 per sample of the data].")
@site_options
@click.option("--repeats", type=int, default=3, show_default=True, help="Noise draws per σ of the per-site curves.")
@click.option("--seed", type=int, default=0, show_default=True, help="Noise seed.")
@click.option("--batch-size", type=int, default=None, help="Samples per batch [default: 256 on the CPU].")
@click.option("--provider", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
@click.option("--threads", type=int, help="CPU threads [default: all].")
@click.option("--limit", type=int, metavar="N", help="Use only the first N samples.")
@click.option("--json", "json_path", metavar="PATH", help="Write the report with its `plan` ('-' = stdout).")
@click.option("-q", "--quiet", is_flag=True, help="No table; the verdict only.")
@guarded
def plan_command(model, data_path, sigma, max_drop, relative, noise, ratio, max_repeats, max_cost, max_evaluations,
                 ops, include, exclude, repeats, seed, batch_size, provider, threads, limit, json_path, quiet):
    """How many times to repeat each layer (averaging its noise down to σ/√n) so that, with every layer noisy at
    σ, accuracy stays within --max-drop of clean, at the least extra compute.

    \b
      walkaudit plan model.onnx --data val.npz --sigma 0.5 --max-drop 1%
      walkaudit plan model.onnx --data val.npz --sigma 0.1 --relative --max-drop 5%rel --max-cost 2x
    """
    import sys

    from rich.console import Console
    from rich.table import Table

    from walkaudit.config import AuditConfig
    from walkaudit.planning import parse_bound, plan
    from walkaudit.report.model import dumps

    _check_outputs(json_path, None, None)
    bound, cost_limit = parse_bound(max_drop), _cost(max_cost)
    if max_evaluations is not None and max_evaluations < 1:
        raise UsageError(f"--max-evaluations must be at least 1, got {max_evaluations}")
    config = AuditConfig(noise=noise, ratio=ratio, repeats=repeats, seed=seed, batch_size=batch_size,
                         provider=provider, threads=threads, limit=limit,
                         selection=_selection(ops, include, exclude)).check()
    report = plan(model, data=data_path, sigma=sigma, max_drop=bound, relative=relative, max_repeats=max_repeats,
                  max_evaluations=max_evaluations, config=config, report=True)
    result = report["plan"]
    failures, open_ = [], []
    measured = ("" if result["measured_drop"] is None else
                " (measured drop {:.4f}, 95% CI {:.4f} to {:.4f}, with the last plan tried)".format(
                    result["measured_drop"], *result["ci95"]))
    if result["decision"] == "not shown":
        open_.append(f"no plan with at most {result['max_repeats']} repetitions per layer and "
                     f"{result['evaluations']:,} evaluations has its drop's 95% interval within {bound.describe()}"
                     f"{measured}; more data, --max-evaluations or --max-repeats may show it")
    elif not result["met"]:
        failures.append(f"no plan with at most {result['max_repeats']} repetitions per layer keeps the drop within "
                        f"{bound.describe()}{measured}")
    elif cost_limit is not None and result["cost_ratio"] > cost_limit:
        failures.append(f"the plan costs {result['cost_ratio']:.2f}x a plain pass, more than --max-cost "
                        f"{cost_limit:g}x")
    verdict = "failed" if failures else "undecided" if open_ else "passed"
    entries = [{"rule": "plan", "site": None, "value": result["cost_ratio"], "threshold": cost_limit, "message": f}
               for f in failures + open_]
    report["gate"] = {"passed": verdict == "passed", "verdict": verdict, "warnings": [],
                      "failures": entries[: len(failures)],
                      **({"undecided": entries[len(failures):]} if open_ else {})}
    if json_path:
        _write(json_path, dumps(report))
    console = Console(stderr=json_path == "-", highlight=False)
    if not quiet:
        table = Table(header_style="bold")
        for col in ("site", "MACs/sample", "repeats", "σ per run"):
            table.add_column(col, justify="left" if col == "site" else "right", overflow="fold")
        for s in result["sites"]:
            table.add_row(s["name"], f"{s['macs']:,}", str(s["repeats"]), f"{s['sigma']:.4g}")
        console.print(table)
        measured = ("not measured" if result["measured_drop"] is None else
                    "measured {:.4f} (95% CI {:.4f} to {:.4f})".format(result["measured_drop"], *result["ci95"]))
        console.print(f"cost {result['cost_ratio']:.2f}x a plain pass; drop predicted {result['predicted_drop']:.4f}, "
                      f"{measured} with every layer noisy (bound {result['max_drop_points']:.4f})", markup=False,
                      soft_wrap=True)
        uniform = result["uniform_sigma"]
        console.print("uniform budget: every layer once stays within the bound up to σ = "
                      + ("beyond the grid" if uniform is None else f"{uniform:.4g}"), markup=False, soft_wrap=True)
    for f in failures:
        console.print(f"FAIL: {f}", markup=False, soft_wrap=True)
    for f in open_:
        console.print(f"NOT SHOWN: {f}", markup=False, soft_wrap=True)
    console.print("plan: " + {"passed": "passed", "failed": "FAILED", "undecided": "not shown"}[verdict],
                  markup=False)
    sys.exit(0 if verdict == "passed" else 1)
