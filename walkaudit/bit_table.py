"""`bit_sensitivity`: which bit positions of one site matter. For every bit of the site's stored type (float32: 32,
float16: 16, int8/uint8: 8), the accuracy with only that bit flipping at one bit error rate, every other bit and
every other site clean (issue 23: the per-bit sensitivity table of bit-flip audits).

Each position is an audit of its own (`--noise bitflip --bits B --sigmas BER --site SITE`), so its draws are those of
that audit: keyed by the seed, the site, the position's term and the repeat, reproducible like every other audit.
"""

from __future__ import annotations

import math

import numpy as np
from onnx import helper

from walkaudit.api import audit
from walkaudit.errors import UsageError, option


def bit_sensitivity(model, x=None, y=None, *, data: str | None = None, site: str, ber: float,
                    target: str = "activations", **options) -> dict:
    """{site, target, dtype, ber, clean_accuracy, chance, bits: [{bit, group, accuracy, accuracy_std, drop}]} with
    the bits from the most significant down. `options`: AuditConfig fields (repeats, seed, limit, ...)."""
    from walkaudit._loading.model import load_model
    from walkaudit._noise.bitflip import LAYOUTS, positions

    if not (isinstance(ber, (int, float)) and math.isfinite(ber) and 0 < ber <= 1):
        raise UsageError(f"{option('ber')} must be a bit error rate in (0, 1], got {ber!r}")
    loaded = load_model(model)
    spec = loaded.types.get(site)
    if spec is None:
        raise UsageError(f"{site!r} is not a value or initializer of the model")
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(spec.elem_type))
    groups = {b: g for g, bits in LAYOUTS.get(dtype, {}).items() for b in bits}
    rows, clean, chance = [], None, None
    for bit in reversed(positions("all", dtype)):
        report = audit(loaded.proto, x, y, data=data, noise="bitflip", bits=str(bit), target=target,
                       sigmas=(float(ber),), sites=(site,), **options)
        (result,) = report.sites
        point = result.points[0]
        clean, chance = report.clean_accuracy, report.chance
        rows.append({"bit": bit, "group": groups.get(bit, "value"), "accuracy": point.accuracy,
                     "accuracy_std": point.accuracy_std, "drop": clean - point.accuracy})
    return {"site": site, "target": target, "dtype": str(dtype), "ber": float(ber), "clean_accuracy": clean,
            "chance": chance, "bits": rows}
