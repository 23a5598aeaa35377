"""Every noise model, registered once: the CLI's `--noise` choices, the API's validation, the report schema's enum
and the docs' list all come from `REGISTRY` (tests/test_registry.py checks the schema against it).

A new model is one module under walkaudit/_noise/ and one entry here. The entries name their class by module, so
that the CLI can list the models without importing numpy (`walkaudit --help` stays fast).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from walkaudit.errors import UsageError

if TYPE_CHECKING:
    from walkaudit._noise.base import NoiseModel


@dataclass(frozen=True)
class Level:
    """What a model's level is, for people: every output (tables, summaries, formats, plots) labels the level and
    its midpoint with these, the midpoint as `symbol` + "50" (σ50, BER50, t50)."""

    key: str  # the report's name for it (the start of `config.level`; "sigma" for the Gaussian models)
    symbol: str  # σ, w, BER, t, Δ
    name: str  # "noise level", "bit error rate", ...
    unit: str = ""  # written after a value ("s"); "" for a pure number or the activation's own units
    #: the level is in the units of the site's value, so the midpoint over the activation std means something
    per_std: bool = True
    #: the level is the step 1/(2^B − 1) of B bits: outputs also show B = log2(1 + 1/level) ("B50 5.3 bits")
    bits: bool = False

    @property
    def midpoint(self) -> str:
        return f"{self.symbol}50"


SIGMA = Level("sigma", "σ", "noise level")
WIDTH = Level("width", "w", "uniform noise width")
BER = Level("ber", "BER", "bit error rate", per_std=False)
TIME = Level("t", "t", "time since programming", "s", per_std=False)
STEP = Level("bits", "Δ", "relative step 1/(2^B − 1)", per_std=False, bits=True)


class Entry(NamedTuple):
    module: str  # under walkaudit._noise
    cls: str
    summary: str  # one line for the docs and the CLI's help
    bits: str | None = None  # what `--bits` means to it; None: it takes no bits
    targets: bool = False  # it takes `--target activations|weights`
    level: Level = SIGMA  # what its level is (the model's `level`, the report's labels)


REGISTRY: dict[str, Entry] = {
    "additive": Entry("gaussian", "Additive", "y + σ·N(0,1)"),
    "multiplicative": Entry("gaussian", "Multiplicative", "y·(1 + σ·N(0,1))"),
    "combined": Entry("gaussian", "Combined", "y·(1 + σ(1−r)·N(0,1)) + σr·N(0,1)"),
    "weight-additive": Entry("gaussian", "WeightAdditive", "W + σ·N(0,1) on a layer's weights, once per repeat"),
    "weight-multiplicative": Entry("gaussian", "WeightMultiplicative",
                                   "W·(1 + σ·N(0,1)) on a layer's weights, once per repeat"),
    "weight-pcm": Entry("pcm", "PCM", "aihwkit's PCM programming noise, drift and read noise on the weights; "
                        "the level is t, seconds since programming", level=TIME),
    "uniform": Entry("uniform", "Uniform", "y + w·U(−½,½), one rounding step of width w", level=WIDTH),
    "quantize": Entry("quantize", "Quantize", "y rounded to B bits over each sample's range, walked over B",
                      "the bit counts to walk, e.g. 8,6,4 or 2-12", level=STEP),
    "bitflip": Entry("bitflip", "BitFlip", "each stored bit flips at a bit error rate",
                     "the bit positions that may flip: all, sign, exponent, mantissa, value, or 0-7,31", True, BER),
}
NOISE_MODELS = tuple(REGISTRY)
#: the models that read `--bits`, and what it means to each
TAKES_BITS = {kind: e.bits for kind, e in REGISTRY.items() if e.bits}
#: the models that read `--target`
TAKES_TARGET = tuple(kind for kind, e in REGISTRY.items() if e.targets)


def model_class(kind: str) -> type[NoiseModel]:
    """The class registered as `kind` (UsageError for an unknown kind)."""
    entry = REGISTRY.get(kind)
    if entry is None:
        raise UsageError(f"unknown noise model {kind!r} (choose from {', '.join(NOISE_MODELS)})")
    return getattr(importlib.import_module(f"walkaudit._noise.{entry.module}"), entry.cls)


def make_noise(kind: str = "additive", ratio: float = 0.5, bits: str | None = None,
               target: str | None = None) -> NoiseModel:
    """The noise model called `kind` (the ratio only matters for combined noise, `bits` and `target` for the models
    that take them). UsageError for an unknown kind, options it does not take, or options that cannot work."""
    cls: Callable[..., NoiseModel] = model_class(kind)  # the models' constructors take different options
    if bits is not None and kind not in TAKES_BITS:
        raise UsageError(f"bits only applies to {' and '.join(TAKES_BITS)} noise")
    if target is not None and kind not in TAKES_TARGET:
        raise UsageError(f"target only applies to {' and '.join(TAKES_TARGET)} noise (weights: --noise "
                         "weight-additive or weight-multiplicative)")
    if kind == "combined":
        return cls(ratio)
    options = {"bits": bits} if kind in TAKES_BITS else {}
    if target is not None:
        options["target"] = target
    return cls(**options)


def global_models() -> tuple[str, ...]:
    """The models global mode takes: graph nodes on activations (`NoiseModel.walk_only` False)."""
    return tuple(k for k in NOISE_MODELS if not make_noise(k).walk_only)
