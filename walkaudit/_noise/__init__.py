"""Noise: the models (one interface, `models.NoiseModel`) and the reproducible source of normal numbers."""

from walkaudit._noise.models import NOISE_MODELS, NoiseModel, make_noise
from walkaudit._noise.source import CHUNK, NormalSource, box_muller, name_key

__all__ = ["CHUNK", "NOISE_MODELS", "NoiseModel", "NormalSource", "box_muller", "make_noise", "name_key"]
