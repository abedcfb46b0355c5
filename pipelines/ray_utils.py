"""Shared Ray helpers for the pipeline jobs: connect to a cluster or start a local Ray once.

Every ``ray.init`` of the platform goes through ``init_ray``, which decides two things in one place:

- **Where a local Ray listens.** A local Ray the platform starts is private to this machine: its node
  address is 127.0.0.1, so the GCS, the raylet, the workers, the dashboard, its agents and the job
  server all listen on loopback only (Ray's default on Linux is the machine's outgoing address, with
  its gRPC servers on every interface). To run on more than one machine, start a cluster with
  ``ray start --head`` (Ray then listens on the node's address, as a cluster needs) and pass
  ``--address`` or ``RAY_ADDRESS``.
- **What Ray prints.** With ``quiet`` (the default) the user sees the platform's progress, trial
  results and answers, not Ray's own lines: the driver's ``ray`` loggers at ERROR (the token-auth
  warning, the start-up banner), Ray Data's console at WARNING (its per-operator progress blocks;
  ``ray_data_logging.yaml``), and no log-deduplication banners. Everything still goes to Ray's log
  files under its session folder. Not covered: the ``E ... core_worker.cc`` lines that Ray's C++ core
  prints to stderr; ``RAY_BACKEND_LOG_LEVEL`` would hide them only at the price of one
  ``Set ray log level ...`` line per Ray process, so the jobs avoid their causes instead.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rattention.errors import ConfigError

LOOPBACK = "127.0.0.1"
# Ray's switch between "a cluster: use the machine's reachable address" and "local only: use loopback"
# (documented for macOS and Windows, where local-only is its default). Off, Ray's Python side takes
# 127.0.0.1 as the node address instead of turning it into the outgoing interface's.
_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Set (when the user has not) before Ray is imported: read by Ray at import and by every process it starts.
QUIET_ENV = {
    "RAY_DEDUP_LOGS": "0",  # no "[repeated Nx across cluster]" and its banner
    "RAY_DATA_LOGGING_CONFIG": str(Path(__file__).with_name("ray_data_logging.yaml")),  # read at import of ray.data
}


def init_ray(address: str | None = None, num_cpus: int | None = None, dashboard: bool = False,
             log_to_driver: bool = True, quiet: bool = True, **kwargs: Any) -> dict[str, float]:
    """Connect to Ray once and return the cluster's resources.

    ``address`` (or ``RAY_ADDRESS``) joins an existing cluster; without either, a local Ray starts on
    127.0.0.1 with ``num_cpus`` logical CPUs (all of the machine's by default), and with its dashboard
    when ``dashboard`` (Ray Train needs it, see below; on 2 cores it costs the Ray Data jobs a few
    percent). ``log_to_driver`` forwards the workers' output (Ray Train's progress lines); ``quiet``
    keeps Ray's own lines out of the output (module docstring). A Ray that is already initialised in
    this process is reused as it is.
    """
    if quiet:
        for key, value in QUIET_ENV.items():
            os.environ.setdefault(key, value)
    import ray

    if not ray.is_initialized():
        if quiet:
            kwargs.setdefault("logging_level", logging.ERROR)
        address = cluster_address(address)
        if address:
            check_reachable(address)
            host = address.split("://", 1)[-1].rpartition(":")[0].strip("[]")
            # A Ray on loopback is joined as one: Ray would otherwise dial the machine's outgoing address.
            joined = loopback_node() if is_loopback(host) else contextlib.nullcontext()
            try:
                with joined:
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
            with loopback_node():
                ray.init(num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host=LOOPBACK,
                         log_to_driver=log_to_driver, **kwargs)
    return ray.cluster_resources()


@contextlib.contextmanager
def loopback_node() -> Iterator[None]:
    """Within the block, Ray takes 127.0.0.1 as this node's address, so a Ray started here listens on
    loopback only and a Ray on loopback can be joined.

    Ray's Python side maps 127.0.0.1 to the machine's outgoing address unless its cluster switch is off
    (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``); its C++ servers then bind to the node address. The switch
    is read at import (so the constant is set too, for a Ray already imported) and inherited by the
    processes ``ray.init`` starts; both are restored after, since a driver's node address is fixed once
    connected.
    """
    from ray._private import ray_constants

    env, constant = os.environ.get(_CLUSTER_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_CLUSTER_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = constant
        if env is None:
            os.environ.pop(_CLUSTER_ENV, None)
        else:
            os.environ[_CLUSTER_ENV] = env


def is_loopback(host: str) -> bool:
    """True for ``localhost``, 127.0.0.0/8 and ::1 (also as an IPv4-mapped IPv6 address)."""
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def cluster_address(address: str | None) -> str | None:
    """The Ray cluster to join: ``address``, else ``RAY_ADDRESS``, else None (start a local Ray)."""
    return address or os.environ.get("RAY_ADDRESS") or None


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """A one-line ConfigError when nothing listens at a ``[ray://]HOST:PORT`` address.

    Without this, ``ray.init`` retries a dead address for many minutes (measured: over 10) and then
    raises a long traceback. Other forms (``auto``, ``local``) are left to Ray.
    """
    from rattention.run_config import check_ray_address

    if address == "auto":
        return
    check_ray_address(address, "address")
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
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
