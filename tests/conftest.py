"""Fixtures shared by test files."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster (2 CPUs, no GPUs) for the whole test session, started on first use and stopped at the
    end; tests that use it are skipped where ray is not installed (the `test` extra installs it)."""
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()
