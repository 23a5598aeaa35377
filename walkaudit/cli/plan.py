"""`walkaudit plan`: a multi-execution plan for hardware noise σ at every layer (`walkaudit.planning`).

Exit codes: 0 a plan is shown to meet the bound (the upper end of its measured drop's 95 % interval is within it)
and --max-cost, 1 no plan within --max-repeats and --max-evaluations is shown to meet it ("not shown" where the
interval straddles the bound) or it costs more than --max-cost, 2 bad usage or input, 3 runtime failure.
"""

from __future__ import annotations

from dataclasses import dataclass

import click

from walkaudit.cli import options as opt
from walkaudit.cli.app import GroupedCommand, guarded, main
from walkaudit.cli.reports import check_outputs
from walkaudit.errors import UsageError


@dataclass(frozen=True)
class Budget:
    """The hardware's σ, the accuracy bound a plan must keep and what it may spend."""

    sigma: float = 0.0
    max_drop: str = ""
    relative: bool = False
    max_repeats: int = 16
    max_cost: str | None = None
    max_evaluations: int | None = None


#: plan's own options: its --max-drop bounds accuracy with every site noisy (points or %rel), not a σ50 drop against a
#: baseline as the gate's --max-drop
BUDGET = opt.Group(
    "Plan", "budget", Budget,
    (("--sigma",), dict(type=float, required=True, metavar="S", help="The hardware's noise σ at every site.")),
    (("--max-drop", "max_drop"), dict(required=True, metavar="DROP",
                                      help="Largest accuracy drop with every site noisy: '1%' (points) or '5%rel' "
                                           "(of clean − chance).")),
    (("--relative",), dict(is_flag=True, help="S is in units of each site's clean activation std.")),
    (("--max-repeats",), dict(type=int, default=16, show_default=True, help="Most repetitions of one layer.")),
    (("--max-cost",), dict(metavar="X", help="Fail when the plan costs more than X plain passes, e.g. 1.5x.")),
    (("--max-evaluations",), dict(type=int, metavar="N",
                                  help="Most noisy sample evaluations the verification may spend showing the bound "
                                       "(more draws, more rounds) [default: 100 per sample of the data].")),
)


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


@main.command("plan", cls=GroupedCommand)
@guarded
@click.argument("model", type=click.Path(dir_okay=False))
@opt.DATA(only=("data_path", "limit"))
@BUDGET
@opt.SITES(only=("ops", "include", "exclude"))
@opt.NOISE(overrides={"noise": {"type": opt.RegistryChoice(opt.global_noise_models),
                                  "help": "Noise model (those that can be at every layer at once)."}})
@opt.SWEEP(only=("repeats", "seed"))
@opt.RUNTIME(only=("provider", "threads", "batch_size"))
@opt.OUTPUT(only=("json_path", "quiet"))
def plan_command(model: str, data: opt.Data, budget: Budget, sites: opt.Sites, noise: opt.Noise, sweep: opt.Sweep,
                 runtime: opt.Runtime, output: opt.Output):
    """How many times to repeat each layer (averaging its noise down to σ/√n) so that, with every layer noisy at
    σ, accuracy stays within --max-drop of clean, at the least extra compute.

    \b
      walkaudit plan model.onnx --data val.npz --sigma 0.5 --max-drop 1%
      walkaudit plan model.onnx --data val.npz --sigma 0.1 --relative --max-drop 5%rel --max-cost 2x
    """
    import sys

    from rich.console import Console
    from rich.table import Table

    from walkaudit.cli.outputs import readable, write
    from walkaudit.config import AuditConfig
    from walkaudit.planning import parse_bound, plan
    from walkaudit.report.model import dumps

    json_path, quiet = output.json, output.quiet
    check_outputs(output, [("the model", model), ("the data (--data)", data.data_path)])
    bound, cost_limit = parse_bound(budget.max_drop), _cost(budget.max_cost)
    if budget.max_evaluations is not None and budget.max_evaluations < 1:
        raise UsageError(f"--max-evaluations must be at least 1, got {budget.max_evaluations}")
    config = AuditConfig(**noise.config(), **sweep.config(), **runtime.config(), limit=data.limit,
                         selection=sites.selection()).check()
    report = plan(model, data=data.data_path, sigma=budget.sigma, max_drop=bound, relative=budget.relative,
                  max_repeats=budget.max_repeats, max_evaluations=budget.max_evaluations, config=config, report=True)
    result = report["plan"]
    failures, open_ = [], []
    measured = ("" if result["measured_drop"] is None else
                " (measured drop {:.4f}, 95% CI {:.4f} to {:.4f}, with the last plan tried)".format(
                    result["measured_drop"], *result["ci95"]))
    if result["decision"] == "not shown":
        open_.append(f"no plan with at most {result['max_repeats']} repetitions per layer has its drop's 95% interval "
                     f"within {bound.describe()}{measured}, after {result['evaluations']:,} of the "
                     f"{result['max_evaluations']:,} evaluations allowed; more data or --max-repeats may show it")
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
        write(json_path, readable(dumps(report)))
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
