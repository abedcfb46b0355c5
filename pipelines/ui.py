"""``rattention ui``: browse results. The MLflow UI on the platform's store (runs, metrics, artifacts), or
optuna-dashboard on a sweep's Optuna study; on 127.0.0.1 unless asked, until Ctrl-C.

The store is the folder the platform's local MLflow server uses (``mlflow.db`` and ``artifacts/``,
``tracking.server_dir``); the UI is that same server (``tracking.local_server``), so the runs'
artifacts are served with them. ``browse_command`` is the one line a command prints to say how to
open its results.
"""

from __future__ import annotations

import contextlib
import errno
import json
import shlex
import shutil
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipelines import tracking
from pipelines.ray_utils import LOOPBACK, is_loopback
from rattention.errors import ConfigError, RattentionError
from rattention.run_config import TrackingConfig

DEFAULT_STORE = TrackingConfig.model_fields["server_dir"].default
# The sweep folder's layout, written by sweeps/ (which pipelines must not import; a test keeps them equal).
DEFAULT_SWEEPS = ".rattention/sweeps"  # SweepSpec.out_dir's default
JOURNAL_FILE = "optuna.journal"  # sweeps.spec.JOURNAL_FILE
SWEEP_FILE = "sweep.json"  # sweeps.driver.SWEEP_FILE: its "storage" names the study's storage


# ----- the command a user pastes ---------------------------------------------------------------------

def rattention_command() -> str:
    """How to call this install's ``rattention`` when pasted in this shell: ``rattention`` when this
    interpreter's script is on PATH, else ``<python> -m rattention``."""
    here = Path(sys.executable).parent / "rattention"
    found = shutil.which("rattention")
    if found is not None and Path(found).resolve() == here.resolve():
        return "rattention"
    return f"{shlex.quote(_shown(Path(sys.executable).absolute()))} -m rattention"


def browse_command(store: str | Path) -> str:
    """The one-line command that opens the MLflow UI on ``store``, as it works when pasted in this
    shell; paths relative to the current folder when they lie inside it."""
    return f"{rattention_command()} ui --store {shlex.quote(shown_path(store))}"


def shown_path(path: str | Path) -> str:
    """``path`` as a user would type it here: relative to the current folder when inside it."""
    return _shown(Path(path).resolve())


def _shown(path: Path) -> str:
    cwd = Path.cwd().resolve()
    if path.is_relative_to(cwd) and path != cwd:
        rel = str(path.relative_to(cwd))
        return rel if "/" in rel else f"./{rel}"  # `./python`, not a bare name PATH would look up
    return str(path)


# ----- MLflow ----------------------------------------------------------------------------------------

def store_folder(store: str | Path, flag: str = "--store") -> Path:
    """The store folder, checked: an existing folder holding ``mlflow.db`` (nothing is created)."""
    folder = Path(store).expanduser()
    if not folder.exists():
        raise ConfigError(f"{flag}: {folder} does not exist; give the folder of an MLflow store (the "
                          f"tracking.server_dir of the runs, holding mlflow.db), default {DEFAULT_STORE}")
    if not folder.is_dir():
        raise ConfigError(f"{flag}: {folder} is not a folder; give the folder that holds mlflow.db")
    if not (folder / "mlflow.db").is_file():
        raise ConfigError(f"{flag}: {folder} holds no mlflow.db: not an MLflow store of the platform "
                          "(the tracking.server_dir of the runs)")
    return folder.resolve()


def _store_of_uri(uri: str) -> Path | None:
    """The store folder of a tracking URI: ``sqlite:///FOLDER/mlflow.db``; None for a server's http(s) URI."""
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    if scheme in ("http", "https"):
        return None
    if scheme == "sqlite" and uri.startswith("sqlite:///") and uri.endswith("/mlflow.db"):
        return store_folder(Path(uri.removeprefix("sqlite://")).parent, "--tracking-uri")
    raise ConfigError(f"--tracking-uri: {uri!r} is not served by rattention ui; give http(s)://HOST:PORT of an "
                      "MLflow server, sqlite:///FOLDER/mlflow.db of a platform store, or --store FOLDER")


def serve_mlflow(store: str | Path | None = None, uri: str | None = None, host: str = LOOPBACK,
                 port: int | None = None) -> None:
    """Serve the MLflow UI on the store until Ctrl-C (or SIGTERM), then stop the server.

    ``uri`` of a running server (http/https) is checked and printed: that server already serves its UI.
    """
    if store is not None and uri is not None:
        raise ConfigError("--store and --tracking-uri: give one of them")
    if uri is not None:
        folder = _store_of_uri(uri)
        if folder is None:
            tracking.check_uri(uri, "--tracking-uri")
            print(f"MLflow UI: {uri.rstrip('/')}  (served by that server; nothing to start)", flush=True)
            return
    else:
        folder = store_folder(store if store is not None else DEFAULT_STORE)
    port = check_listen(host, port)
    with _stop_on_sigterm(), tracking.local_server(folder, host=host, port=port, reuse=False) as served:
        print(f"MLflow UI: {served}  (store {folder}; Ctrl-C stops it)", flush=True)
        while tracking.server_alive(served, timeout=5.0):
            time.sleep(1.0)
        raise RattentionError(f"{folder / 'server.log'}: the MLflow server stopped; see the log")


# ----- Optuna ----------------------------------------------------------------------------------------

def study_storage(target: str | Path | None) -> tuple[str, Any]:
    """(where, storage) of the Optuna study behind ``target``: a sweep folder (its ``sweep.json`` or
    ``optuna.journal``), a folder of sweeps holding one, a journal file, or an RDB URL; default the one
    sweep under ``.rattention/sweeps``. Nothing is created."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    flag = "--optuna" if target is not None else f"--optuna (default {DEFAULT_SWEEPS})"
    text = str(target) if target is not None else DEFAULT_SWEEPS
    if "://" in text:
        url = text
    else:
        path = _journal(Path(text).expanduser(), flag)
        url = str(path) if isinstance(path, Path) else path
    if "://" in url:
        if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite://")).is_file():
            raise ConfigError(f"{flag}: {url} names no database file")
        try:
            storage: Any = optuna.storages.RDBStorage(url, skip_table_creation=True)
        except Exception as err:  # noqa: BLE001 - a bad URL or a server that does not answer: one line
            raise ConfigError(f"{flag}: cannot open the Optuna storage {url} ({type(err).__name__})") from None
    else:
        storage = JournalStorage(JournalFileBackend(url))
    try:
        studies = optuna.get_all_study_summaries(storage, include_best_trial=False)
    except Exception as err:  # noqa: BLE001 - not a journal / not an Optuna database
        raise ConfigError(f"{flag}: {url} is not an Optuna storage ({type(err).__name__}: {err})") from None
    if not studies:
        raise ConfigError(f"{flag}: {url} holds no Optuna study yet")
    return url, storage


def _journal(path: Path, flag: str) -> Path | str:
    """The journal file (or the RDB URL a sweep record names) for a folder or file argument."""
    if path.is_file():
        return path.resolve()
    if not path.exists():
        raise ConfigError(f"{flag}: {path} does not exist; give a sweep folder (<out_dir>/<name>), its "
                          f"{JOURNAL_FILE}, or an RDB URL")
    record = path / SWEEP_FILE
    if record.is_file():
        with contextlib.suppress(json.JSONDecodeError, KeyError, TypeError):
            storage = str(json.loads(record.read_text())["storage"])
            if "://" in storage or Path(storage).is_file():  # else the folder was moved: its own journal
                return storage if "://" in storage else Path(storage).resolve()
    if (path / JOURNAL_FILE).is_file():
        return (path / JOURNAL_FILE).resolve()
    sweeps = sorted(p.name for p in path.iterdir() if p.is_dir() and ((p / SWEEP_FILE).is_file()
                                                                     or (p / JOURNAL_FILE).is_file()))
    if len(sweeps) == 1:
        return _journal(path / sweeps[0], flag)
    if sweeps:
        raise ConfigError(f"{flag}: {path} holds {len(sweeps)} sweeps ({', '.join(sweeps)}); name one, e.g. "
                          f"{path / sweeps[0]}")
    raise ConfigError(f"{flag}: {path} holds no sweep ({SWEEP_FILE} or {JOURNAL_FILE}); give a sweep folder, a "
                      "journal file or an RDB URL")


def serve_optuna(target: str | Path | None = None, host: str = LOOPBACK, port: int | None = None) -> None:
    """Serve optuna-dashboard on the study's storage until Ctrl-C (or SIGTERM), in this process."""
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    import optuna_dashboard

    where, storage = study_storage(target)
    port = check_listen(host, port)

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True  # a request in flight does not hold up Ctrl-C
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - no access line per request
            pass

    httpd = make_server(host, port, optuna_dashboard.wsgi(storage), server_class=Server, handler_class=Quiet)
    try:
        with _stop_on_sigterm():
            shown = f"[{host}]" if ":" in host else host
            print(f"Optuna dashboard: http://{shown}:{httpd.server_port}  (study storage {where}; "
                  "Ctrl-C stops it)", flush=True)
            httpd.serve_forever(poll_interval=0.5)
    finally:
        httpd.server_close()


# ----- helpers ---------------------------------------------------------------------------------------

def check_listen(host: str, port: int | None) -> int:
    """The port to serve on (a free one when None), after checking ``host:port`` can be listened on;
    a one-line error naming --host or --port otherwise. Warns when the UI is reachable from elsewhere."""
    if port is not None and not 1 <= port <= 65535:
        raise ConfigError(f"--port: must be 1..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        raise ConfigError(f"--host: {host!r} is not an address of this machine; use 127.0.0.1 (the default), "
                          "or an address to reach the UI from other machines") from None
    family = socket.AF_INET6 if ":" in host else infos[0][0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port or 0))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise ConfigError(f"--port: {host}:{port} is in use; pick another, or leave --port out") from None
            if err.errno == errno.EADDRNOTAVAIL:
                raise ConfigError(f"--host: {host} is not an address of this machine; use 127.0.0.1 (the "
                                  "default), or one of its own addresses") from None
            raise ConfigError(f"--host/--port: cannot listen on {host}:{port or 'any port'} "
                              f"({err.strerror or err})") from None
        chosen = s.getsockname()[1]
    if not is_loopback(host):
        print(f"warning: --host {host}: the UI is reachable from other machines, and it has no login",
              file=sys.stderr, flush=True)
    return chosen


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """SIGTERM ends the block like Ctrl-C does, so the server is stopped instead of left running."""
    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
