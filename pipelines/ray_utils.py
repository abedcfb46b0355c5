"""Shared Ray helpers for the pipeline jobs: connect to a cluster or start a local Ray once."""

from __future__ import annotations

import os
import socket
from typing import Any

from rattention.errors import ConfigError


def init_ray(address: str | None = None, num_cpus: int | None = None, dashboard: bool = False,
             log_to_driver: bool = True, **kwargs: Any) -> dict[str, float]:
    """Connect to Ray once and return the cluster's resources.

    ``address`` (or ``RAY_ADDRESS``) joins an existing cluster; without either, a local Ray starts
    with ``num_cpus`` logical CPUs (all of the machine's by default), and with its dashboard on
    127.0.0.1 when ``dashboard`` (Ray Train needs it, see below; on 2 cores it costs the Ray Data
    jobs a few percent). A Ray that is already initialised in this process is reused as it is.
    """
    import ray

    if not ray.is_initialized():
        address = cluster_address(address)
        if address:
            check_reachable(address)
            try:
                ray.init(address=address, log_to_driver=log_to_driver, **kwargs)
            except ConnectionError as err:  # Ray's own message is a long traceback
                raise ConfigError(f"address: cannot join the Ray cluster at {address!r} ({err})") from None
        else:
            # Ray starts its workers at niceness 15, behind its own services; on a small machine the
            # workers are the job (measured on 2 cores: Ray Train's overhead on training tokens/s was
            # +15-30% at 15, within noise of 0% at 0), so a local Ray runs them at normal priority.
            os.environ.setdefault("RAY_worker_niceness", "0")
            # The dashboard (on 127.0.0.1) serves Ray's state API, which Ray Train's placement-group
            # cleaner polls; without it the cleaner warns every few seconds and never exits.
            ray.init(num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1",
                     log_to_driver=log_to_driver, **kwargs)
    return ray.cluster_resources()


def cluster_address(address: str | None) -> str | None:
    """The Ray cluster to join: ``address``, else ``RAY_ADDRESS``, else None (start a local Ray)."""
    return address or os.environ.get("RAY_ADDRESS") or None


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """A one-line ConfigError when nothing listens at a ``[ray://]HOST:PORT`` address.

    Without this, ``ray.init`` retries a dead address for many minutes (measured: over 10) and then
    raises a long traceback. Other forms (``auto``, ``local``) are left to Ray.
    """
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()  # [IPv6]:port too
    except OSError as err:
        raise ConfigError(
            f"address: nothing answers at {address!r} ({err.strerror or err}); start a cluster with "
            "`ray start --head`, or leave --address and RAY_ADDRESS unset for a local Ray"
        ) from None


def cluster_cpus() -> int:
    """Logical CPUs of the connected Ray cluster (at least 1)."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))
