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
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rattention.errors import ConfigError, RattentionError

# The platform prints its own links; MLflow would add two emoji lines per ended run.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

SERVER_FILE = "server.json"
STARTUP_TIMEOUT_S = 120.0


# How long the tracker (driver side, between steps) waits on ``/health`` before calling a server lost. A dead
# server refuses at once whatever this is; a live one on a loaded machine (2 cores, Ray's processes shutting
# down after a Ctrl-C) has been seen taking more than 2 s. The sink, whose checks sit between training steps,
# keeps the short default.
TRACKER_HEALTH_S = 10.0


def server_alive(uri: str, timeout: float = 2.0) -> bool:
    """True when an MLflow server answers ``/health`` at ``uri``."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
            return resp.status == 200
    except (OSError, ValueError):
        return False


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
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
def local_server(folder: str | Path, host: str = "127.0.0.1", port: int | None = None,
                 reuse: bool = True) -> Iterator[str]:
    """Yield the URI of a local MLflow server over ``folder`` (``mlflow.db``, ``artifacts/``).

    With ``reuse``, a live server recorded in ``folder/server.json`` is reused and left running.
    Otherwise one is started on ``host`` (127.0.0.1 unless asked) and ``port`` (a free one when None),
    recorded in ``server.json`` unless a live one is recorded there, and stopped on exit.
    """
    folder = Path(folder).resolve()
    live = running_server(folder)
    if live is not None and reuse:
        yield live
        return
    folder.mkdir(parents=True, exist_ok=True)
    port = port or _free_port(host)
    reach = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # a wildcard bind is reached on loopback
    uri = f"http://{f'[{reach}]' if ':' in reach else reach}:{port}"
    log = (folder / "server.log").open("ab")
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port),
           "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
           "--artifacts-destination", str(folder / "artifacts")]
    # No job runner: MLflow 3 would start 8 more processes (huey consumers) that the platform never uses.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
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
        if live is None:
            (folder / SERVER_FILE).write_text(json.dumps({"uri": uri, "pid": proc.pid}))
        print(f"MLflow: started a local server at {uri} ({folder})", file=sys.stderr, flush=True)
        yield uri
    finally:
        with contextlib.suppress(FileNotFoundError):
            if json.loads((folder / SERVER_FILE).read_text()).get("pid") == proc.pid:
                (folder / SERVER_FILE).unlink()
        _stop_group(proc)
        log.close()


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop the server and what it started (uvicorn): its own session's process group, TERM then KILL."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def check_uri(uri: str, field: str = "tracking.uri") -> None:
    """A one-line ConfigError, before any compute, when ``uri`` is not a tracking URI or nothing answers."""
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    if scheme not in ("http", "https", "sqlite", "file", "postgresql", "mysql", "databricks"):
        raise ConfigError(f"{field}: {uri!r} is not a tracking URI; use http://HOST:PORT of an MLflow server "
                          "(or leave it unset for a local one)")
    if scheme in ("http", "https") and not server_alive(uri, timeout=5.0):
        raise ConfigError(f"{field}: no MLflow server answers at {uri}; start one or leave it unset for a "
                          "local one")


@contextlib.contextmanager
def tracking_uri(uri: str | None, server_dir: str | Path, check: bool = True) -> Iterator[str]:
    """The config's URI, else ``MLFLOW_TRACKING_URI``, else a local server for the block's lifetime.

    A given URI is checked first (``check_uri``), so a dead server is a one-line error before training.
    """
    field = "tracking.uri" if uri else "MLFLOW_TRACKING_URI"
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    if uri:
        if check:
            check_uri(uri, field)
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


# ----- a server that goes away -------------------------------------------------------------------------

STALL_S = 10.0  # a request pending this long makes the sink ask the server's /health (at most this often)
FLUSH_S = 120.0  # how long the end of training waits for the rows still queued, while the server answers
_warned: set[str] = set()


def tracking_errors() -> tuple[type[BaseException], ...]:
    """What an MLflow call raises when its server fails: MlflowException (retries exhausted, an error
    answer), and OSError (``requests``' connection errors are OSErrors)."""
    from mlflow.exceptions import MlflowException

    return (MlflowException, OSError)


def warn_lost(uri: str, reason: str) -> None:
    """One warning line per server and process: the run goes on, its folder keeps everything."""
    if uri in _warned:
        return
    _warned.add(uri)
    print(f"warning: MLflow at {uri} stopped answering ({' '.join(reason.split())[:200]}); training goes on and "
          "the run folder keeps every metric: `rattention import-run RUN_DIR` completes the MLflow run once the "
          "server is back", file=sys.stderr, flush=True)


class MlflowSink:
    """A metrics sink for the training loop: ``sink(step, {name: value})`` queues a row, which a thread logs
    over HTTP, so a slow or dead server never stalls a step. When the server stops answering (a request
    fails after MLflow's retries, or hangs while ``/health`` gets no answer) the sink warns once, drops the
    rows after it (the run folder keeps them) and says why in ``lost``. ``close()`` waits for the queue."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id
        self.lost: str | None = None
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._sending_since: float | None = None  # when the request in flight began
        self._checked = 0.0

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        if self.lost is not None:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._send, name="mlflow-sink", daemon=True)
            self._thread.start()
        self._queue.put((step, dict(metrics), int(time.time() * 1000)))
        self._check_stall()

    def _send(self) -> None:
        c = client(self.uri)
        while (item := self._queue.get()) is not None:
            if self.lost is None:
                self._sending_since = time.monotonic()
                try:
                    log_metrics(c, self.run_id, *item)
                except tracking_errors() as err:
                    self._lose(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
                finally:
                    self._sending_since = None

    def _check_stall(self, after: float = STALL_S) -> None:
        """A request pending for ``after`` s: ask ``/health`` (once per ``after`` s); no answer means lost."""
        since, now = self._sending_since, time.monotonic()
        if since is not None and now - since > after and now - self._checked > after:
            self._checked = now
            if not server_alive(self.uri):
                self._lose(f"a request pending for {now - since:.0f} s and no answer at /health")

    def _lose(self, reason: str) -> None:
        if self.lost is None:
            self.lost = reason
            warn_lost(self.uri, reason)

    def close(self) -> None:
        """Wait until the queued rows are logged: while the server answers, for at most FLUSH_S."""
        if self._thread is None:
            return
        self._queue.put(None)
        deadline = time.monotonic() + FLUSH_S
        while self._thread.is_alive() and self.lost is None:
            self._thread.join(0.5)
            self._check_stall(after=1.0)  # training is over: waiting on a dead server costs a second, not ten
            if time.monotonic() > deadline:
                self._lose(f"rows still queued after {FLUSH_S:.0f} s")


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


def log_artifact(c: Any, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    """Upload a file to the run's artifacts through ``c``'s server. Not ``c.log_artifact``: MLflow caches
    one artifact store per run id for the process, bound to the first server that logged it, so a run
    logged again through a server restarted on another port would be sent to the dead one."""
    if Path(path).is_file():
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        repo = get_artifact_repository(c.get_run(run_id).info.artifact_uri, tracking_uri=c.tracking_uri)
        repo.log_artifact(str(path), artifact_path)


@contextlib.contextmanager
def quick_retries(retries: int = 3, backoff: int = 1) -> Iterator[None]:
    """MLflow's HTTP retries cut, for the block, to ``retries`` with backoff ``backoff`` s (1, 2, 4 s: about
    10 s in all, where the defaults wait about four minutes), unless the user set them: a command whose
    server was just seen answering fails in seconds when it goes away. (MLflow reads them per request.)"""
    names = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries), "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(backoff)}
    mine = {k: v for k, v in names.items() if k not in os.environ}
    os.environ.update(mine)
    try:
        yield
    finally:
        for k in mine:
            os.environ.pop(k, None)


class MlflowTracker:
    """The lifecycle's tracker (``rattention.lifecycle.Tracker``) on an MLflow server.

    Holds only the URI and the experiment, so it pickles to Ray workers; each process makes its client.
    A server that does not answer never stops a run: each call first asks ``/health`` (a refused
    connection answers at once, where MLflow's own retries would wait minutes) and then runs with
    ``quick_retries``; a call that fails warns once and sets ``lost`` to the reason, after which the
    tracker does nothing more; the lifecycle then marks the run folder for ``rattention import-run``.
    """

    def __init__(self, uri: str, experiment: str, source: str | Path | None = None):
        self.uri, self.experiment = uri, experiment
        self.source = str(source) if source is not None else None  # the YAML the user wrote: under source/
        self._client: Any = None
        self.lost: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"uri": self.uri, "experiment": self.experiment, "source": self.source}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["uri"], state["experiment"], state["source"])

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = client(self.uri)
        return self._client

    def _call(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` when the server answers; None, with ``lost`` set, when it does not."""
        if self.lost is not None:
            return None
        if not server_alive(self.uri, timeout=TRACKER_HEALTH_S):
            self.lost = f"no answer at /health within {TRACKER_HEALTH_S:.0f} s"
        else:
            try:
                with quick_retries():  # a server that dies after /health answered costs seconds, not minutes
                    return fn(*args)
            except ConfigError:
                raise  # the experiment is deleted: the user's to fix, before any compute
            except tracking_errors() as err:
                self.lost = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        warn_lost(self.uri, self.lost)
        return None

    def start(self, name: str, tags: dict[str, str], params: dict[str, Any]) -> str | None:
        """The new run's id; None when the server does not answer (the run trains untracked)."""
        def create() -> str:
            run_id = start_run(self.client, self.experiment, name, tags, params)
            if self.source is not None:
                log_artifact(self.client, run_id, self.source, artifact_path="source")
            return run_id

        return self._call(create)

    def sink(self, run: str) -> MlflowSink:
        return MlflowSink(self.uri, run)

    def log_results(self, run: str, step: int, results: dict[str, Any]) -> None:
        self._call(log_metrics, self.client, run, step, results)

    def log_files(self, run: str, paths: list[Path]) -> None:
        for path in paths:
            self._call(log_artifact, self.client, run, path)

    def end(self, run: str, status: str) -> None:
        self._call(end_run, self.client, run, status)

    def close_stale(self, run: str, status: str = "KILLED") -> bool:
        """End an earlier attempt's run with ``status`` (KILLED: its process died or was interrupted; FINISHED:
        it died after finishing) when it was left RUNNING; whether it was."""
        if not server_alive(self.uri, timeout=TRACKER_HEALTH_S):
            return False  # nothing to close where nothing answers; import-run ends it later
        try:
            with quick_retries():
                if self.client.get_run(run).info.status == "RUNNING":
                    end_run(self.client, run, status)
                    return True
        except Exception:  # noqa: BLE001 - a run deleted or on another server: nothing to close
            pass
        return False
