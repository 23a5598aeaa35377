"""Bit flips at a bit error rate (BER), in the tensor's stored type: each allowed bit of each element flips
independently with probability p, as soft errors and low-voltage SRAM flip stored bits (PyTorchFI, TensorFI2 and
MRFI inject the same way). Activations get fresh flips per sample and pass; weights (`target="weights"`) once per
repeat, as a chip's stored weights are read by every inference.

The draw is one uniform 32-bit word u per element and allowed bit position (a term per position, keyed like every
other draw); the bit flips at level p where u < round(p·2³²), so the flips of a lower p are a subset of those of a
higher one (common random numbers) and p resolves down to 2.3e-10. The host XORs the value's bits (viewed as an
unsigned integer of its width) with the mask: nothing else changes, bit for bit.

Positions (`--bits`): "all" (default), "sign", "exponent", "mantissa" (floats), "value" (an integer's bits below
the sign), bit numbers and ranges ("0-7,31", bit 0 the least significant), or several of these, comma separated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from walkaudit._analysis.sweep import Plan
from walkaudit._noise.base import TARGETS, NoiseModel, parse_ints
from walkaudit.errors import UsageError

#: The stored types a flip understands, and how their bits split.
LAYOUTS: dict[np.dtype, dict[str, tuple[int, ...]]] = {
    np.dtype(np.float32): {"sign": (31,), "exponent": tuple(range(23, 31)), "mantissa": tuple(range(23))},
    np.dtype(np.float16): {"sign": (15,), "exponent": tuple(range(10, 15)), "mantissa": tuple(range(10))},
    np.dtype(np.int8): {"sign": (7,), "value": tuple(range(7))},
    np.dtype(np.uint8): {"value": tuple(range(8))},
    np.dtype(np.int16): {"sign": (15,), "value": tuple(range(15))},
    np.dtype(np.uint16): {"value": tuple(range(16))},
}
GROUPS = ("all", "sign", "exponent", "mantissa", "value")
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32}
#: A BER resolves to the nearest multiple of 2⁻³² (`threshold`).
WORD = 1 << 32


def positions(spec: str, dtype) -> tuple[int, ...]:
    """The bit positions `spec` allows in `dtype`, ascending (UsageError where it names none, or bits the type
    does not have)."""
    dtype = np.dtype(dtype)
    layout = LAYOUTS.get(dtype)
    if layout is None:
        raise UsageError(f"bit flips need a float32, float16, int8, uint8, int16 or uint16 value, not {dtype}")
    width = dtype.itemsize * 8
    chosen: set[int] = set()
    for part in str(spec).split(","):
        part = part.strip().lower()
        if part == "all":
            chosen.update(range(width))
        elif part in GROUPS:
            if part not in layout:
                raise UsageError(f"bits {part!r}: a {dtype} value has no {part} bits (it has: "
                                 f"{', '.join(layout)})")
            chosen.update(layout[part])
        else:
            numbers = parse_ints(part, "bits")
            if any(not 0 <= b < width for b in numbers):
                raise UsageError(f"bits {part!r}: a {dtype} value has bits 0 to {width - 1}")
            chosen.update(numbers)
    if not chosen:
        raise UsageError(f"bits {spec!r} names no bit position")
    return tuple(sorted(chosen))


def threshold(p: float) -> int:
    """The words u below which a bit flips at BER p: round(p·2³²), clipped to [0, 2³²]."""
    return int(min(max(round(float(p) * WORD), 0), WORD))


@dataclass(frozen=True)
class BitFlip(NoiseModel):
    """Flip each allowed bit with probability p (the level, a BER searched in decades from 1e-9 to 1e-1)."""

    bits: str = "all"
    target: str = "activations"  # or "weights": each layer's weight initializer, flipped once per repeat
    kind: ClassVar[str] = "bitflip"
    stored: ClassVar[bool] = True
    relative: ClassVar[bool] = True
    distribution: ClassVar[str] = "bits"
    level: ClassVar[str] = "ber"

    def __post_init__(self):
        object.__setattr__(self, "bits", "all" if self.bits is None else str(self.bits))
        if self.target not in TARGETS:
            raise UsageError(f"target must be activations or weights, got {self.target!r}")
        if not any(self._usable(dt) for dt in LAYOUTS):
            positions(self.bits, np.float32)  # no type has these bits: say why, for float32

    def _usable(self, dtype) -> tuple[int, ...]:
        try:
            return positions(self.bits, dtype)
        except UsageError:
            return ()

    @property
    def terms(self) -> tuple[str, ...]:
        """One word per allowed position: as many as the widest type allows (a narrower one uses the first)."""
        return tuple(f"bit{i}" for i in range(max(len(self._usable(dt)) for dt in LAYOUTS)))

    def plan(self) -> Plan:
        return Plan(start=-6.0, stop=-2.0, lowest=-9.0, highest=-1.0)

    def describe(self) -> dict:
        return {"noise": self.kind, "ratio": None, "bits": self.bits, "target": self.target,
                "level": "ber: each allowed bit flips with this probability"}

    def host(self, y, sigmas, eps, map_=map, axis: int = 0):
        """y XOR the mask of each level. The bits that flip at the highest level are found once per run (one compare
        per word); a lower level keeps those whose word is below its own threshold, so a level costs in proportion
        to its flips, not to the size of the draw."""
        sigmas = np.atleast_1d(np.asarray(sigmas, dtype=np.float64))
        y = np.ascontiguousarray(y)
        where = positions(self.bits, y.dtype)
        uint = _UINT[y.dtype.itemsize]
        words = np.asarray(eps).view(np.uint32)
        out = np.empty((len(sigmas), *y.shape), dtype=y.dtype)
        stored = y.view(uint).reshape(-1)
        top = max(threshold(p) for p in sigmas)
        hits = [(np.flatnonzero(words[term, 0] < top) if top < WORD else np.arange(y.size), term, bit)
                for term, bit in enumerate(where)] if top else []
        index = np.concatenate([h for h, _, _ in hits]) if hits else np.zeros(0, np.int64)
        value = np.concatenate([words[term, 0].reshape(-1)[h] for h, term, _ in hits]) if hits else np.zeros(0)
        bit = np.concatenate([np.full(len(h), b, uint) for h, _, b in hits]) if hits else np.zeros(0, uint)
        flips = np.left_shift(np.ones(1, uint), bit)

        def level(i: int) -> None:
            t = threshold(sigmas[i])
            mask = np.zeros(y.size, uint)
            chosen = slice(None) if t >= WORD else value < t
            np.bitwise_or.at(mask, index[chosen], flips[chosen])
            np.bitwise_xor(stored, mask, out=out[i].reshape(-1).view(uint))

        list(map_(level, range(len(sigmas))))
        return out
