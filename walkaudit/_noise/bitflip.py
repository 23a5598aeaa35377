"""Bit flips at a bit error rate (BER), in the tensor's stored type: each allowed bit of each element flips
independently with probability p, as soft errors and low-voltage SRAM flip stored bits (PyTorchFI, TensorFI2 and
MRFI inject the same way). Activations get fresh flips per sample and pass; weights (`target="weights"`) once per
repeat, as a chip's stored weights are read by every inference.

The draw is one uniform 32-bit word per element (keyed like every other draw); each bit position b gets its own
word u_b = `bit_word(word, b)`, a SplitMix64 finalizer of (word, b), so the draw costs one word per element whatever
the number of positions, and the words of different positions are independent uniforms. The bit flips at level p
where u_b < round(p·2³²), so the flips of a lower p are a subset of those of a higher one (common random numbers) and
p resolves down to 2.3e-10. The host XORs the value's bits (viewed as an unsigned integer of its width) with the
mask: nothing else changes, bit for bit.

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
                hint = ("; onnxruntime runs int8 activations as uint8 (u = i XOR 0x80): bit 7 is their int8 sign, "
                        "--bits 7" if dtype == np.uint8 and part == "sign" else "")
                raise UsageError(f"bits {part!r}: a {dtype} value has no {part} bits (it has: "
                                 f"{', '.join(layout)}){hint}")
            chosen.update(layout[part])
        else:
            numbers = parse_ints(part, "bits")
            if any(not 0 <= b < width for b in numbers):
                raise UsageError(f"bits {part!r}: a {dtype} value has bits 0 to {width - 1}")
            chosen.update(numbers)
    if not chosen:
        raise UsageError(f"bits {spec!r} names no bit position")
    return tuple(sorted(chosen))


def bit_word(word: np.ndarray, bit: int) -> np.ndarray:
    """The uniform 32-bit word of bit position `bit` for elements drawn `word` (uint32): the upper half of SplitMix64's
    finalizer of word·64 + bit (a bijection of 64-bit integers, so no two (word, bit) pairs share an input)."""
    x = (word.astype(np.uint64) << np.uint64(6)) | np.uint64(bit)
    x += np.uint64(0x9E3779B97F4A7C15)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return (x >> np.uint64(32)).astype(np.uint32)


def threshold(p: float) -> int:
    """The words u below which a bit flips at BER p: round(p·2³²), clipped to [0, 2³²]."""
    return int(min(max(round(float(p) * WORD), 0), WORD))


@dataclass(frozen=True)
class BitFlip(NoiseModel):
    """Flip each allowed bit with probability p (the level, a BER searched in decades from 1e-9 to 1e-1)."""

    bits: str = "all"
    # or "weights": each layer's weight initializer, flipped once per repeat; a field here (chosen per instance), a
    # ClassVar in the models whose target is fixed
    target: str = "activations"  # type: ignore[misc]
    kind: ClassVar[str] = "bitflip"
    stored: ClassVar[bool] = True
    terms: ClassVar[tuple[str, ...]] = ("words",)  # one word per element; each position's comes from it
    relative: ClassVar[bool] = True
    distribution: ClassVar[str] = "bits"

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
        indices, values, bits = [np.zeros(0, np.int64)], [np.zeros(0, np.uint32)], [np.zeros(0, uint)]
        for b in where if top else ():
            u = bit_word(words[0, 0].reshape(-1), b)
            hit = np.flatnonzero(u < top) if top < WORD else np.arange(y.size)
            indices.append(hit)
            values.append(u[hit])
            bits.append(np.full(len(hit), b, uint))
        index, value, bit = np.concatenate(indices), np.concatenate(values), np.concatenate(bits)
        flips = np.left_shift(np.ones(1, uint), bit)

        def level(i: int) -> None:
            t = threshold(sigmas[i])
            mask = np.zeros(y.size, uint)
            chosen = slice(None) if t >= WORD else value < t
            np.bitwise_or.at(mask, index[chosen], flips[chosen])
            np.bitwise_xor(stored, mask, out=out[i].reshape(-1).view(uint))

        list(map_(level, range(len(sigmas))))
        return out
