"""Noise: the perturbation interface (`base.NoiseModel`), one module per model, the registry every choice list
comes from (`registry`, importable without numpy), and the reproducible source of the draws (`source`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from walkaudit._noise.registry import NOISE_MODELS, REGISTRY, TAKES_BITS, TAKES_TARGET, make_noise, model_class

if TYPE_CHECKING:
    from walkaudit._noise.base import Affine, NoiseModel
    from walkaudit._noise.source import CHUNK, NormalSource, box_muller, name_key

__all__ = ["CHUNK", "NOISE_MODELS", "REGISTRY", "TAKES_BITS", "TAKES_TARGET", "Affine", "NoiseModel", "NormalSource",
           "box_muller", "make_noise", "model_class", "name_key"]

_LAZY = {"Affine": "base", "NoiseModel": "base", "CHUNK": "source", "NormalSource": "source",
         "box_muller": "source", "name_key": "source"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f"walkaudit._noise.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
