"""Shared Ray helpers for the pipeline jobs: connect to a cluster or start a local Ray once."""

from __future__ import annotations

import os
from typing import Any


def init_ray(address: str | None = None, num_cpus: int | None = None, dashboard: bool = False,
             **kwargs: Any) -> dict[str, float]:
    """Connect to Ray once and return the cluster's resources.

    ``address`` (or ``RAY_ADDRESS``) joins an existing cluster; without either, a local Ray starts
    with ``num_cpus`` logical CPUs (all of the machine's by default), and with its dashboard on
    127.0.0.1 when ``dashboard`` (Ray Train needs it, see below; on 2 cores it costs the Ray Data
    jobs a few percent). A Ray that is already initialised in this process is reused as it is.
    """
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        if address:
            ray.init(address=address, log_to_driver=True, **kwargs)
        else:
            # Ray starts its workers at niceness 15, behind its own services; on a small machine the
            # workers are the job (measured on 2 cores: Ray Train's overhead on training tokens/s was
            # +15-30% at 15, within noise of 0% at 0), so a local Ray runs them at normal priority.
            os.environ.setdefault("RAY_worker_niceness", "0")
            # The dashboard (on 127.0.0.1) serves Ray's state API, which Ray Train's placement-group
            # cleaner polls; without it the cleaner warns every few seconds and never exits.
            ray.init(num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1",
                     log_to_driver=True, **kwargs)
    return ray.cluster_resources()


def cluster_cpus() -> int:
    """Logical CPUs of the connected Ray cluster (at least 1)."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))
