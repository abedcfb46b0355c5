"""MLflow for the pipeline jobs: which server, and how a run is created, fed and ended.

The tracking URI comes from the config, else ``MLFLOW_TRACKING_URI``. When neither is set the command
starts a local MLflow server (SQLite backend, artifacts folder, bound to 127.0.0.1) for its lifetime,
or reuses one it finds running in the same folder (``server.json``), so Ray workers log over HTTP and
never open one SQLite file together.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rattention.errors import ConfigError, RattentionError

SERVER_FILE = "server.json"
STARTUP_TIMEOUT_S = 120.0


def server_alive(uri: str, timeout: float = 2.0) -> bool:
    """True when an MLflow server answers ``/health`` at ``uri``."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
            return resp.status == 200
    except (OSError, ValueError):
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def running_server(folder: str | Path) -> str | None:
    """The URI of a live server recorded in ``folder/server.json``, or None."""
    f = Path(folder) / SERVER_FILE
    if not f.is_file():
        return None
    try:
        uri = json.loads(f.read_text())["uri"]
    except (json.JSONDecodeError, KeyError):
        return None
    return uri if server_alive(uri) else None


@contextlib.contextmanager
def local_server(folder: str | Path) -> Iterator[str]:
    """Yield the URI of a local MLflow server over ``folder`` (``mlflow.db``, ``artifacts/``).

    A live server recorded in ``folder/server.json`` is reused and left running; otherwise one is
    started on a free 127.0.0.1 port and stopped on exit.
    """
    folder = Path(folder).resolve()
    uri = running_server(folder)
    if uri is not None:
        yield uri
        return
    folder.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    log = (folder / "server.log").open("ab")
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
           "--artifacts-destination", str(folder / "artifacts")]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not server_alive(uri, timeout=1.0):
            if proc.poll() is not None:
                raise RattentionError(f"{folder / 'server.log'}: local MLflow server exited "
                                      f"(code {proc.returncode}); see the log")
            if time.monotonic() > deadline:
                raise RattentionError(f"{folder / 'server.log'}: local MLflow server not up after "
                                      f"{STARTUP_TIMEOUT_S:.0f} s")
            time.sleep(0.25)
        (folder / SERVER_FILE).write_text(json.dumps({"uri": uri, "pid": proc.pid}))
        print(f"MLflow: started a local server at {uri} ({folder})", file=sys.stderr, flush=True)
        yield uri
    finally:
        with contextlib.suppress(FileNotFoundError):
            if json.loads((folder / SERVER_FILE).read_text()).get("pid") == proc.pid:
                (folder / SERVER_FILE).unlink()
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@contextlib.contextmanager
def tracking_uri(uri: str | None, server_dir: str | Path) -> Iterator[str]:
    """The config's URI, else ``MLFLOW_TRACKING_URI``, else a local server for the block's lifetime."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    if uri:
        yield uri
        return
    with local_server(server_dir) as local:
        yield local


# ----- runs -------------------------------------------------------------------------------------------

def client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(c: Any, name: str) -> str:
    """The id of experiment ``name``, created when missing."""
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage != "active":
            raise ConfigError(f"tracking.experiment: {name!r} is deleted in MLflow; restore it or pick another name")
        return exp.experiment_id
    return c.create_experiment(name)


def start_run(c: Any, experiment: str, run_name: str, tags: dict[str, str], params: dict[str, Any]) -> str:
    """Create a RUNNING run with tags and the flattened config as params; return its id."""
    run = c.create_run(experiment_id(c, experiment), run_name=run_name, tags=tags)
    log_params(c, run.info.run_id, params)
    return run.info.run_id


def log_params(c: Any, run_id: str, params: dict[str, Any]) -> None:
    """Log params in batches of 100 (MLflow's limit per request); lists and dicts as JSON."""
    from mlflow.entities import Param

    items = [Param(k, json.dumps(v) if isinstance(v, list | dict) else str(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i : i + 100])


class MlflowSink:
    """A metrics sink for the training loop: ``sink(step, {name: value})`` logs one batch over HTTP."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id
        self._client = client(uri)

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        log_metrics(self._client, self.run_id, step, metrics)


def log_metrics(c: Any, run_id: str, step: int, metrics: dict[str, Any], timestamp_ms: int | None = None) -> None:
    """Log the numeric entries of ``metrics`` at ``step`` (NaN/inf included, as MLflow allows)."""
    from mlflow.entities import Metric

    ts = timestamp_ms if timestamp_ms is not None else int(time.time() * 1000)
    rows = [Metric(k, float(v), ts, step) for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and k != "step"]
    for i in range(0, len(rows), 1000):
        c.log_batch(run_id, metrics=rows[i : i + 1000])


def end_run(c: Any, run_id: str, status: str) -> None:
    """Mark a run FINISHED, FAILED or KILLED."""
    assert status in ("FINISHED", "FAILED", "KILLED"), status
    c.set_terminated(run_id, status=status)


def log_artifact(c: Any, run_id: str, path: str | Path) -> None:
    if Path(path).is_file():
        c.log_artifact(run_id, str(path))

