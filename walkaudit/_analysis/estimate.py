"""How long an audit will take and how much memory it will hold, before it runs (pure: numbers in, numbers out).

Time. A walk evaluates, per site, about `levels` σ levels over all the data, `repeats` times each, and each such
evaluation runs the site's suffix: `relative` (`cost.site_costs / cost.pass_cost`) of a whole forward pass. So

    seconds ≈ clean · (1 + SUFFIX_SPEED · repeats · Σ_sites levels · relative) + set-up · (1 + SUFFIX_SETUP · sites)

with the clean pass measured (it runs first, on the same data and the same machine). SUFFIX_SPEED: a clean pass
reads out every site's value and its statistics, so a suffix run may cost less than its share of it (measured:
0.4–0.6 on samples/mnist_lenet5, about 1 on a torchvision ResNet-50; 0.75 sits between).
`levels` of the adaptive search (`sweep.adaptive`, the default `Plan`): 7 coarse levels (−2…1 decades, 2 a decade)
on a quarter of the data, about half of them then on the rest, one extension, and 3 refining levels on all of it:
about 5.5 levels of all the data (5.3 measured on every site of samples/mnist_lenet5 and mnist_mlp); ADAPTIVE_LEVELS
rounds it up. A fixed grid: its length. Set-up: what the clean pass's first batch took beyond its steady rate
(building the session: seconds on a 100 MB model); each site builds a suffix session. What it leaves out: extra
decades where a curve has not settled. The tests hold it within a factor of 4 of the measured time.

Memory. The process (Python, numpy, onnxruntime: PROCESS_BYTES), the model held MODEL_COPIES times (the proto, the
clean session, a site's suffix session while it runs, with their pre-packed weights), a batch of the values the
clean pass reads out (the sites) and of the largest value twice (an operator's input and output), and the clean
values kept for the sites (`runtime.cache_budget_bytes`, never more). The data is read in slices (memory-mapped), so
it does not count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: a suffix evaluation's time over its share (`relative`) of the clean pass's (see the module docstring)
SUFFIX_SPEED = 0.75
#: a site's suffix session's set-up over the clean session's (a suffix is on average about half the model; measured
#: on a quick ResNet-50 audit: 54 sites spent about 130 s of its 272 s outside the estimated walk, its clean session
#: about 5 s in set-up)
SUFFIX_SETUP = 0.5
#: σ levels of all the data the adaptive search evaluates per site (default plan; see the module docstring)
ADAPTIVE_LEVELS = 6.0
#: the same for quick mode's coarser search (`config.quick_plan`: 4 coarse levels, 1 refining): measured 2.4 on
#: samples/mnist_lenet5 (256 samples), 5.3 on a random-weight ResNet-50 (32 samples: its curves needed more decades)
QUICK_LEVELS = 4.0
#: copies of a batch of the sites' values held at once: the clean session's outputs, onnxruntime's arena that
#: keeps their memory, the values kept (measured: a quick ResNet-50 audit, batch 16, peaked at 3.8 GiB)
ACTIVATION_COPIES = 3
#: what a walkaudit process holds before any model: the interpreter, numpy, scipy, onnxruntime
PROCESS_BYTES = 200 << 20
#: copies of the model's bytes held at once: the ModelProto, the one shared copy of its large weights, the clean
#: session's or the running site's prefix and suffix sessions with onnxruntime's pre-packed weights. With 4, the zoo's
#: estimates (docs/performance.md) are 1.1-2.1x its measured peaks at batch 8, never under: GPT-2 2.1 GiB (measured
#: 1.9), BERT 2.2 (1.6), ViT-B/16 3.3 (1.6), ResNet-50 1.9 (1.3). (8 before derived graphs stopped copying weights.)
MODEL_COPIES = 4


@dataclass(frozen=True)
class Estimate:
    """An audit's expected wall time and peak resident memory."""

    seconds: float
    peak_bytes: int

    def line(self) -> str:
        """`estimated: ~12 min, peak ~1.6 GiB`"""
        return f"estimated: ~{duration_text(self.seconds)}, peak ~{self.peak_bytes / (1 << 30):.1f} GiB"


def duration_text(seconds: float) -> str:
    """`40 s`, `12 min`, `3.5 h`: rounded up to what a person plans with."""
    if seconds < 60:
        return f"{max(1, math.ceil(seconds))} s"
    if seconds < 5400:
        return f"{math.ceil(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


def audit_seconds(clean_seconds: float, relative: list[float], levels: float, repeats: int,
                  setup: float = 0.0) -> float:
    """Wall seconds of an audit whose clean pass took `clean_seconds` (and whose session took `setup` to build):
    per site `levels` σ levels × `repeats` draws of its suffix (`relative`: the suffix's cost over a whole pass')
    and the set-up of its suffix session (SUFFIX_SETUP of the clean session's), plus the clean pass itself."""
    walk = clean_seconds * SUFFIX_SPEED * repeats * levels * sum(relative)
    return clean_seconds + setup + walk + SUFFIX_SETUP * setup * len(relative)


def peak_bytes(model_bytes: int, site_bytes: int, largest_bytes: int, batch: int, cache_bytes: int) -> int:
    """Peak resident bytes: the process, MODEL_COPIES of the model, a batch of the sites' values (`site_bytes` per
    sample) and of the largest value twice (`largest_bytes` per sample), and the clean-value cache budget (at most
    what the sites' values of all the data would take, which the caller passes when it is less)."""
    return (PROCESS_BYTES + MODEL_COPIES * model_bytes + batch * (ACTIVATION_COPIES * site_bytes + 2 * largest_bytes)
            + cache_bytes)


#: quick mode's samples (where no limit is given): at most QUICK_LIMIT, at least QUICK_MIN, and no more than keep the
#: walk within QUICK_MACS multiply-accumulates (about 10 minutes on 2 CPU cores: a torchvision ResNet-50 gets 32)
QUICK_LIMIT = 256
QUICK_MIN = 32
QUICK_MACS = 1e13
#: the batch where none is given: a batch of the sites' values within this many bytes (ResNet-50: 16, a sample
#: model: the default 256), so that an audit needs about the memory inference does, whatever the model
BATCH_VALUE_BYTES = 1 << 30


def quick_samples(site_costs: list[float], repeats: int, available: int) -> int:
    """How many of the `available` samples a quick audit uses: as many as keep QUICK_LEVELS levels × `repeats` draws
    of every site's suffix (`site_costs`: `cost.site_costs`, MACs per sample) within QUICK_MACS, between QUICK_MIN
    and QUICK_LIMIT."""
    per_sample = QUICK_LEVELS * repeats * sum(site_costs)
    fits = int(QUICK_MACS // per_sample) if per_sample > 0 else QUICK_LIMIT
    return min(available, QUICK_LIMIT, max(QUICK_MIN, fits))


def bounded_batch(row_bytes: int, default: int) -> int:
    """The batch where none is given: `default`, halved until a batch of `row_bytes` per sample (the sites' values
    and the largest value twice) fits BATCH_VALUE_BYTES; at least 1. Counts never depend on the batch size."""
    batch = default
    while batch > 1 and batch * row_bytes > BATCH_VALUE_BYTES:
        batch //= 2
    return batch
