"""`plan`: how many times to repeat each layer so that the network, with every layer noisy, stays within a bound.

If a layer's computation is repeated n times and averaged, its noise falls from σ to σ/√n (the Walking Noise paper's
tailored multi-execution). For hardware with noise σ at every layer:

1. **Per-layer curves.** For every site alone, the accuracy with noise σᵢ/√n for each candidate n
   (`plan.CANDIDATES`), on all the data (walk units, one per site).
2. **Proposal.** Integer nᵢ minimising Σ nᵢ·macsᵢ with Σ dropᵢ(nᵢ) ≤ budget (`_analysis.plan.choose`): the
   independent-layers model, where the drops of layers noisy at once add up.
3. **Verification.** The plan measured with every site noisy at once, each at its own σᵢ/√nᵢ (one global unit,
   `WorkUnit.site_scales`), over several repeats. A plan is **shown** to meet the bound only where the upper end of
   the measured drop's 95 % interval does (`_analysis.plan.drop_interval`). While the interval straddles the bound
   and the spread over draws is a real part of it, the plan is measured again with twice the draws (within
   `max_evaluations`); otherwise the budget is tightened in proportion (noise compounds across layers, so the
   model can be optimistic) and the plan proposed again. A plan never shown is "not shown".
4. **Uniform budget.** The largest σ at which every nᵢ = 1 stays within the bound, from one global unit over a
   grid of σ.

σ is absolute, or with `relative` in units of each site's clean activation std.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import numpy as np

from walkaudit._analysis import plan as planner
from walkaudit._graph.cost import sites_macs
from walkaudit._units import WorkUnit, blocks_of
from walkaudit.api import AuditRun, Progress, _NoProgress
from walkaudit.config import SIGMA_RANGE, AuditConfig, Bound, parse_bound
from walkaudit.errors import UsageError, option

if TYPE_CHECKING:
    from walkaudit._units import CleanStats

#: Rounds of verification and tightening before giving up.
ROUNDS = 4
#: Repeats of the verification (every site noisy at once).
VERIFY_REPEATS = 5
#: Levels the uniform budget's search adds inside the bracket of its coarse grid.
UNIFORM_REFINE = 5
#: Default budget of the verification, in noisy sample evaluations per sample of the data (`max_evaluations`).
EVALUATIONS_PER_SAMPLE = 100
#: More draws are measured only where the spread over draws makes up at least this share of the interval's variance.
NOISE_SHARE = 0.25
#: The σ a plan may take: the audit's range (`config.SIGMA_RANGE`), narrowed so that the levels the plan measures
#: (σ/1000/√16 … 10σ) stay inside it.
SIGMA_LIMITS = (SIGMA_RANGE[0] * 4e3, SIGMA_RANGE[1] / 10)


def plan(model, x=None, y=None, *, data: str | None = None, sigma: float, max_drop: Bound | str,
         relative: bool = False, max_repeats: int = 16, max_evaluations: int | None = None,
         config: AuditConfig | None = None, progress: Progress | None = None, executor=None, report: bool = False,
         **options) -> dict:
    """The multi-execution plan for noise `sigma` at every site (the report's `plan` object; with `report`, the
    whole report as JSON, validated, holding it). Raises UsageError for bad options; a plan not shown to meet the
    bound (the upper end of its measured drop's 95 % interval within it) within `max_repeats` and
    `max_evaluations` (noisy sample evaluations the verification may spend; default 100 per sample of the data)
    comes back with `"met": false` and `"decision"` "not shown" (the interval straddles the bound) or "exceeds"
    (even its lower end is above the bound)."""
    bound = parse_bound(max_drop) if isinstance(max_drop, str) else max_drop
    lo, hi = SIGMA_LIMITS
    if not (math.isfinite(sigma) and lo <= sigma <= hi):
        raise UsageError(f"{option('sigma')} must be between {lo:g} and {hi:g} (the audit's σ range, for the levels "
                         f"from σ/4000 to 10σ a plan measures), got {sigma:g}")
    if max_evaluations is not None and max_evaluations < 1:
        raise UsageError(f"{option('max_evaluations')} must be at least 1, got {max_evaluations}")
    candidates = tuple(n for n in planner.CANDIDATES if n <= max_repeats)
    if not candidates:
        raise UsageError(f"{option('max_repeats')} must be at least 1, got {max_repeats}")
    config = dataclasses.replace(config or AuditConfig(), mode="walk", sigmas=None, **options).check()
    run = AuditRun(model, x, y, data, config, progress or _NoProgress(), [])
    run.executor = executor
    run.start()
    try:
        result = _plan(run, sigma, bound, relative, candidates, max_evaluations)
    finally:
        run.close()
    return {**run.report().to_dict(), "plan": result} if report else result  # the run walked no site


def _plan(run: AuditRun, sigma: float, bound: Bound, relative: bool, candidates: tuple[int, ...],
          max_evaluations: int | None = None) -> dict:
    clean, config, names = _clean(run), run.config, [s.name for s in run.sites]
    key, blocks = run.key, (0, blocks_of(run.dataset.samples))
    scale = np.array([clean.std(n) if relative else 1.0 for n in names])
    macs = [m or 0 for m in sites_macs(run.loaded, run.sites)]
    if not any(macs):
        raise UsageError("no site's multiply-accumulates are known (shapes unknown): cannot weigh a plan")
    limit = bound.points(clean.accuracy, run.chance)
    allowance = max_evaluations or EVALUATIONS_PER_SAMPLE * clean.samples

    run.progress.describe("per-site curves")
    walks = [WorkUnit(key, (n,), tuple(float(sigma * c / math.sqrt(k)) for k in candidates), config.repeats, blocks,
                      config.seed) for n, c in zip(names, scale)]
    drops = np.array([clean.accuracy - counts.correct.mean(axis=1) / counts.samples
                      for counts in run.evaluate_all(walks)])

    budget, rounds, chosen, measured, spent = limit, [], None, None, 0
    for _ in range(ROUNDS):
        proposal = planner.choose(drops, macs, budget, candidates)
        if proposal is None:
            break
        run.progress.describe("verifying the plan")
        draws = VERIFY_REPEATS
        while True:
            measured = _measure(run, names, scale / np.sqrt(proposal), sigma, draws)
            spent += measured["evaluations"]
            decision = _decision(measured["ci95"], limit)
            if (decision != "not shown" or measured["noise_share"] < NOISE_SHARE
                    or spent + 2 * draws * clean.samples > allowance):
                break
            draws *= 2  # the spread over draws is a real part of the interval: more draws narrow it
        rounds.append({"budget": budget, "repeats": list(proposal), "measured_drop": measured["drop"],
                       "ci95": measured["ci95"], "draws": draws, "decision": decision})
        if decision == "shown":
            chosen = proposal
            break
        high = measured["ci95"][1]
        budget *= min(0.9, limit / high) if high > 0 else 0.9
        if spent + VERIFY_REPEATS * clean.samples > allowance:
            break
    run.progress.describe("uniform budget")
    uniform = _uniform(run, names, scale, sigma, limit)

    final = chosen or (rounds[-1]["repeats"] if rounds else [candidates[-1]] * len(names))
    sites = [{"name": n, "repeats": int(k), "sigma": float(sigma * c / math.sqrt(k)), "macs": int(m)}
             for n, k, c, m in zip(names, final, scale, macs)]
    return {
        "sigma": sigma, "relative": relative, "max_drop": bound.value, "max_drop_relative": bound.relative,
        "max_drop_points": limit, "max_repeats": candidates[-1], "met": chosen is not None,
        "decision": rounds[-1]["decision"] if rounds else "exceeds", "sites": sites,
        "cost_ratio": planner.cost_ratio(tuple(final), macs),
        "predicted_drop": planner.predicted_drop(drops, tuple(final), candidates),
        "measured_drop": measured["drop"] if measured else None, "ci95": measured["ci95"] if measured else None,
        "evaluations": spent, "max_evaluations": allowance,
        "rounds": rounds, "uniform_sigma": uniform, "clean_accuracy": clean.accuracy, "chance": run.chance,
        "site_drops": {n: dict(zip(map(str, candidates), map(float, planner.monotone(d))))
                       for n, d in zip(names, drops)},
    }


def _clean(run: AuditRun) -> CleanStats:
    """The clean pass's statistics of a started run."""
    if run.clean is None:
        raise RuntimeError("the run has not started")
    return run.clean


def _decision(ci95: list[float], limit: float) -> str:
    """"shown" where the drop's whole 95 % interval is within `limit`, "exceeds" where it is wholly above,
    else "not shown"."""
    low, high = ci95
    return "shown" if high <= limit else "exceeds" if low > limit else "not shown"


def _measure(run: AuditRun, names: list[str], scales: np.ndarray, sigma: float, draws: int) -> dict:
    """The accuracy drop with every site noisy at once at σ·scaleᵢ, over `draws` noise draws, and its 95 %
    interval (`_analysis.plan.drop_interval`: the spread over draws and the paired sampling of the data)."""
    counts = _global(run, names, scales, (float(sigma),), draws)
    discordant = counts.lost[0] + counts.gained[0] if counts.paired else None  # McNemar's changed pairs
    interval = planner.drop_interval(_clean(run).correct, counts.correct[0], counts.samples, discordant)
    return {"drop": interval[0], "ci95": [interval[1], interval[2]], "evaluations": counts.evaluations,
            "noise_share": planner.noise_share(counts.correct[0], counts.samples, interval)}


def _uniform(run: AuditRun, names: list[str], scale: np.ndarray, sigma: float, limit: float) -> float | None:
    """The largest σ with every site noisy at once, once, whose drop stays within `limit`: a coarse grid of 2 a
    decade from σ/1000 to 10σ (one repeat), then UNIFORM_REFINE levels inside the bracket (every repeat), then
    interpolation in log σ between the last level within and the first beyond. None: within the bound up to 10σ."""
    coarse = tuple(float(sigma * 10 ** (k / 2)) for k in range(-6, 3))
    levels = _global_drops(run, names, scale, coarse, 1)
    over = [s for s in coarse if levels[s] > limit]
    if not over:
        return None
    top = over[0]
    if top == coarse[0]:
        return 0.0
    bottom = coarse[coarse.index(top) - 1]
    inner = tuple(float(v) for v in np.geomspace(bottom, top, UNIFORM_REFINE + 2))
    levels = _global_drops(run, names, scale, inner, run.config.repeats)
    beyond = next((s for s in inner if levels[s] > limit), inner[-1])
    below = inner[max(inner.index(beyond) - 1, 0)]
    d0, d1 = levels[below], levels[beyond]
    if d1 <= d0 or below == beyond:
        return below
    lo, hi = math.log10(below), math.log10(beyond)
    return float(10 ** (lo + (hi - lo) * (limit - d0) / (d1 - d0)))


def _global_drops(run: AuditRun, names: list[str], scale: np.ndarray, sigmas: tuple[float, ...],
                  repeats: int) -> dict[float, float]:
    """The accuracy drop at each σ with every site noisy at once (site i at σ·scaleᵢ)."""
    counts = _global(run, names, scale, sigmas, repeats)
    drops = _clean(run).accuracy - counts.correct.mean(axis=1) / counts.samples
    return dict(zip(sigmas, map(float, drops)))


def _global(run: AuditRun, names: list[str], scales: np.ndarray, sigmas: tuple[float, ...], repeats: int):
    """The Counts of one global unit over all the data: every site noisy at once, site i at σ·scaleᵢ."""
    unit = WorkUnit(run.key, tuple(names), sigmas, repeats, (0, blocks_of(run.dataset.samples)),
                    run.config.seed, site_scales=tuple(map(float, scales)), mode="global")
    return run.evaluate_all([unit])[0]
