"""Sizing runs to memory: the pure arithmetic, and an audit on a (pretend) device with little free memory."""

from __future__ import annotations

import numpy as np

import walkaudit
from walkaudit._execution import sizing
from walkaudit._execution import worker as worker_mod
from walkaudit._loading.model import value_types

from .models import mlp, resnet_block


def test_row_bytes_counts_every_computed_value_per_row():
    model = mlp(hidden=32, classes=4)
    # h_mm, h, h_relu: 32 floats each; logits: 4 floats
    assert sizing.row_bytes(model.graph, value_types(model)) == (3 * 32 + 4) * 4
    block = resnet_block(channels=4, classes=3)
    # a, a_relu, b, res, res_relu: 4×6×6 each; pooled and flat: 4; logits: 3
    assert sizing.row_bytes(block.graph, value_types(block)) == (5 * 144 + 4 + 4 + 3) * 4


def test_on_the_cpu_levels_are_packed_only_where_the_copied_frontier_is_small():
    small, large = sizing.CPU_TILE_ELEMENTS, sizing.CPU_TILE_ELEMENTS + 1
    assert sizing.levels_per_run(8, 256, 1000, 999, None, tiled_elements=small) == 8
    assert sizing.levels_per_run(8, 256, 1000, 999, None, tiled_elements=large) == 1
    assert sizing.levels_per_run(8, 256, 1000, 10, 1 << 30, tiled_elements=large) == 8  # a device packs anyway


def test_device_batch_takes_a_share_of_the_free_memory_within_bounds():
    mib = 1 << 20
    assert sizing.device_batch(1024 * mib, mib) == int(1024 * sizing.DEVICE_SHARE)
    assert sizing.device_batch(1 << 40, 100) == sizing.MAX_DEVICE_BATCH
    assert sizing.device_batch(10, 1000) == 1


def test_levels_per_run_on_the_cpu_bounds_the_fed_elements_and_on_a_device_the_memory():
    assert sizing.levels_per_run(8, 256, sizing.CPU_RUN_ELEMENTS // 3, 999, None) == 3
    assert sizing.levels_per_run(8, 256, 10, 999, None) == 8
    assert sizing.levels_per_run(8, 256, 1 << 30, 1, None) == 1
    # few elements fed, but a suffix computing large values (attention maps): the values' bytes bound the run
    row = sizing.CPU_RUN_BYTES // (256 * 3)
    assert sizing.levels_per_run(8, 256, 10, row, None) == 3
    free = 100 << 20
    row = 4096
    fit = int(free * sizing.DEVICE_SHARE) // (256 * row)  # 25
    assert sizing.levels_per_run(64, 256, 10, row, free) == fit
    assert sizing.levels_per_run(8, 256, 1 << 30, row, free) == 8  # the CPU bound does not apply on a device
    assert sizing.levels_per_run(8, 256, 10, row, 1000) == 1


def test_an_audit_on_a_device_with_little_memory_sizes_its_batches_and_runs_and_gives_the_same_points(monkeypatch):
    model = resnet_block(seed=9)
    x = np.random.default_rng(9).normal(size=(300, 1, 6, 6)).astype(np.float32)
    args = dict(provider="cpu", repeats=1, seed=3, sigmas=(0.1, 0.3, 1.0, 3.0, 10.0))
    row = sizing.row_bytes(model.graph, value_types(model))
    free = int(40 * row / sizing.DEVICE_SHARE)  # room for 40 rows of the whole model

    groups = []
    real = worker_mod._Evaluation._group

    def choose(self, values, device, levels):  # records the levels per run each site chose
        groups.append(real(self, values, device, levels))
        return groups[-1]

    monkeypatch.setattr(worker_mod._Evaluation, "_group", choose)
    cpu = walkaudit.audit(model, x, batch_size=40, **args)
    cpu_groups, groups[:] = list(groups), []
    monkeypatch.setattr(walkaudit._execution.runtime.Runtime, "device_memory", lambda self: free)
    device = walkaudit.audit(model, x, **{**args, "provider": "auto"})  # "cpu" asks no device for its memory

    assert device.config.batch_size == 40  # sized to the memory
    assert cpu_groups == [5, 5, 5]
    # the device holds 40 rows of the whole model: a's suffix (587 values a row) takes one level of 40 rows, b's
    # (299 values a row) two, and the logits' suffix computes nothing
    assert groups == [1, 2, 5]
    assert [[(p.sigma, p.accuracy) for p in s.points] for s in device.sites] == \
        [[(p.sigma, p.accuracy) for p in s.points] for s in cpu.sites]  # packing never changes the numbers


def test_the_cli_batch_size_default_is_sized_per_provider(tmp_path):
    from click.testing import CliRunner

    from walkaudit.cli import main

    result = CliRunner().invoke(main, ["audit", "--help"])
    assert "--batch-size" in result.stdout and "sized to the free device memory" in result.stdout


def test_the_cpu_provider_has_no_device_memory_budget():
    runtime = walkaudit._execution.runtime.Runtime("cpu")
    runtime.session(mlp())
    assert runtime.provider == "CPUExecutionProvider" and runtime.device_memory() is None


def test_global_mode_still_packs_levels_when_its_inputs_are_large(monkeypatch):
    """The frontier rule is about suffixes: global mode tiles the model's inputs, whatever their size, as before."""
    from walkaudit._execution import strategies

    model, rng = mlp(seed=1, features=4096), np.random.default_rng(0)
    x = rng.normal(size=(128, 4096)).astype(np.float32)  # 524,288 input values per level > CPU_TILE_ELEMENTS
    assert x.size > sizing.CPU_TILE_ELEMENTS
    levels = []
    real = strategies.FedGlobal.run
    monkeypatch.setattr(strategies.FedGlobal, "run", lambda self, v, s, *a, **k: levels.append(len(s)) or real(
        self, v, s, *a, **k))
    walkaudit.audit(model, x, sigmas=(0.1, 0.3, 1.0, 3.0), repeats=1, mode="global", provider="cpu")
    assert max(levels) == 4
