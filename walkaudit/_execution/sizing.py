"""How many rows one run takes: pure arithmetic on the model's value shapes and a memory budget.

- On the CPU, runs stay small (`CPU_RUN_ELEMENTS` per fed tensor, `CPU_RUN_BYTES` of values computed): the
  elementwise work of a suffix then stays in the caches, which measured faster than larger runs, and a suffix whose
  inner values dwarf what it is fed (attention maps) stays within memory (docs/performance.md). Levels are packed
  only where the frontier that each packed level copies is small (`CPU_TILE_ELEMENTS`).
- On a GPU, runs are as large as the device's free memory allows: the data batch and the number of σ levels packed
  into one run are sized from the bytes one row of the model (or of a suffix) occupies, counted over every value
  the graph computes. That count ignores onnxruntime's buffer reuse, so it overestimates, and only a share of the
  free memory (`DEVICE_SHARE`) is planned for; a run that still does not fit is retried with fewer levels.
"""

from __future__ import annotations

import numpy as np
import onnx

from walkaudit._loading.model import TensorSpec

#: Largest tensor (in elements) one packed run feeds on the CPU.
CPU_RUN_ELEMENTS = 1 << 22
#: Most bytes one packed run's values may take on the CPU, counted as `row_bytes` does (every value the suffix
#: computes, per row): a MobileViT's early sites fed few elements but computed attention maps 20x larger, and ten
#: packed levels peaked at 1.66 GiB; capped, 0.64 GiB, with the same counts and no slower (docs/performance.md).
CPU_RUN_BYTES = 256 << 20
#: Most clean values (in elements, per level) a suffix may copy per run to pack levels on the CPU: each packed
#: level costs a copy of the frontier (skip connections, keys and values of attention), which on a transformer
#: outweighs the runs saved (docs/performance.md, "Transformers").
CPU_TILE_ELEMENTS = 1 << 18
#: Share of the device's free memory that one run plans for (the rest: the clean-value cache, arena slack).
DEVICE_SHARE = 0.25
#: Data batch without a device budget (CPU), and the bounds of a batch sized to a device.
DEFAULT_BATCH = 256
MAX_DEVICE_BATCH = 8192


def row_bytes(graph: onnx.GraphProto, types: dict[str, TensorSpec]) -> int:
    """Bytes of every value the graph computes, per row (dimension 0 is the batch). Unknown dimensions count 1."""
    total = 0
    for node in graph.node:
        for name in node.output:
            spec = types.get(name)
            if spec is None or not spec.shape:
                continue
            per_row = int(np.prod([d if isinstance(d, int) and d > 0 else 1 for d in spec.shape[1:]], dtype=np.int64))
            total += per_row * spec.dtype.itemsize
    return max(total, 1)


def device_batch(free: int, row: int) -> int:
    """The data batch for a device with `free` bytes, given the clean model's bytes per row."""
    rows = int(free * DEVICE_SHARE) // max(row, 1)
    return int(max(1, min(rows, MAX_DEVICE_BATCH)))


def levels_per_run(levels: int, rows: int, per_level_elements: int, row: int, free: int | None,
                   tiled_elements: int = 0) -> int:
    """σ levels packed into one run of `rows` rows per level.

    per_level_elements: elements fed per level (site and frontier values of one batch), which bounds a CPU run.
    row: bytes per row of the suffix that runs; free: the device's free bytes (None on the CPU).
    tiled_elements: the elements of those that the graph copies for every level it packs (the frontier); on the CPU
    above CPU_TILE_ELEMENTS, levels run one at a time.
    """
    if free is None:
        if tiled_elements > CPU_TILE_ELEMENTS:
            return 1
        fit = min(CPU_RUN_ELEMENTS // max(per_level_elements, 1), CPU_RUN_BYTES // max(rows * row, 1))
    else:
        fit = int(free * DEVICE_SHARE) // max(rows * row, 1)
    return int(max(1, min(levels, fit)))
