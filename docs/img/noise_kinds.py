"""Draw docs/img/noise_kinds.png: LeNet-5's second convolution under every noise model (docs/tutorial.md §6).

One panel per registered model, each along its own level (σ, w, Δ, BER, t): the measured accuracy per level (mean of the
repeats), the clean and the halfway lines, and the midpoint with its 95 % interval. Rebuild with

    python docs/img/noise_kinds.py        # about two minutes on 2 cores

It audits with the API on the first 500 samples (seed 0), so the numbers match the tutorial's in kind, not digit for
digit (the tutorial uses all 1000).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

import walkaudit  # noqa: E402
from walkaudit.report.text import axis_label, midpoint_text, report_level  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MODEL, DATA = ROOT / "samples" / "mnist_lenet5.dynamo.onnx", ROOT / "samples" / "mnist_val.npz"
SITE = "conv2d_1"
KINDS = [("additive", {}), ("multiplicative", {}), ("combined", {}), ("uniform", {}), ("quantize", {}),
         ("bitflip", {"bits": "exponent"}), ("weight-additive", {}), ("weight-multiplicative", {}),
         ("weight-pcm", {})]


def main() -> None:
    figure, axes = plt.subplots(3, 3, figsize=(12, 9.5), constrained_layout=True)
    for ax, (kind, extra) in zip(axes.flat, KINDS):
        weights = kind.startswith("weight")
        report = walkaudit.audit(str(MODEL), data=str(DATA), noise=kind, limit=500, seed=0, provider="cpu",
                                 **({} if weights else {"sites": (SITE,)}), **extra)
        site = report.sites[1] if weights else report.sites[0]  # conv2d_1's weight is the second weight site
        level = report_level(report.config)
        sigma = [p.sigma for p in site.points]
        ax.plot(sigma, [p.accuracy for p in site.points], "o-", ms=3)
        ax.axhline(report.clean_accuracy, color="0.6", lw=0.8)
        ax.axhline((report.clean_accuracy + report.chance) / 2, color="0.6", lw=0.8, ls="--")
        if site.midpoint is not None:
            ax.axvline(site.midpoint, color="C3", lw=1)
            if site.ci95:
                ax.axvspan(*site.ci95, color="C3", alpha=0.15)
        ax.set_xscale("log")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel(axis_label(level), fontsize=8)
        ax.set_title(f"{kind}{' (' + ', '.join(f'{k} {v}' for k, v in extra.items()) + ')' if extra else ''}: "
                     f"{midpoint_text(site.midpoint, site.censored, level)}", fontsize=9)
    for row in axes:
        row[0].set_ylabel("accuracy")
    figure.suptitle(f"LeNet-5, {SITE} (its weight for weight noise), 500 MNIST digits", fontsize=10)
    figure.savefig(Path(__file__).with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main()
