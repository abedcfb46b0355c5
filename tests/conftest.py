"""Shared pytest fixtures."""

from __future__ import annotations

import pytest


# ----- Ray (data pipeline tests) ---------------------------------------------------------------


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session, with 2 CPUs as on CI; pipelines reuse it via init_ray."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
