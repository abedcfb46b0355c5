"""``rattention ui`` for real: the MLflow UI on a store holding a run with an artifact, and optuna-dashboard on a
sweep's journal, each started as the user starts it, queried over HTTP on 127.0.0.1, stopped with Ctrl-C, and
checked to leave nothing running or listening."""

from __future__ import annotations

import contextlib
import json
import os
import select
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from pipelines import ui

ROOT = Path(__file__).resolve().parent.parent
RATTENTION = Path(sys.executable).parent / "rattention"
ARTIFACT = "hello from the run\n"


def sigint_default() -> None:
    """A shell's background job starts with SIGINT ignored; the child would inherit it (tests/test_cli.py)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def psutil():
    """Ray's bundled psutil: ``import ray`` puts ray/thirdparty_files on sys.path."""
    import importlib

    import ray  # noqa: F401

    return importlib.import_module("psutil")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, str]:
    """A platform store (mlflow.db + artifacts/) holding one finished run with one artifact; its server stopped."""
    from pipelines import tracking

    folder = tmp_path_factory.mktemp("store")
    note = folder.parent / "notes.txt"
    note.write_text(ARTIFACT)
    with tracking.local_server(folder) as uri:
        c = tracking.client(uri)
        run = tracking.start_run(c, "ui-test", "one-run", {"kind": "swa"}, {"model.window": 16})
        tracking.log_metrics(c, run, 1, {"eval/val_loss": 3.5})
        tracking.log_artifact(c, run, note)
        tracking.end_run(c, run, "FINISHED")
    assert not (folder / tracking.SERVER_FILE).exists()
    return folder, run


def start(cmd: list[str], cwd: Path, banner: str, timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
    """Start the command; return it and the address it prints on the line starting with ``banner``."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=sigint_default, env={**os.environ, "MLFLOW_TRACKING_URI": ""})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            line = proc.stdout.readline()
            if line.startswith(banner):
                return proc, line.split()[len(banner.split())]
            if not line and proc.poll() is not None:
                break
        elif proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"{cmd} printed no address (exit {proc.wait()}): {proc.stderr.read()[-2000:]}")


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.status == 200
        return r.read()


def tree(pid: int) -> list:
    ps = psutil()
    root = ps.Process(pid)
    return [root, *root.children(recursive=True)]


def listening(procs: list) -> list[tuple[str, int]]:
    ps = psutil()
    out = []
    for p in procs:
        with contextlib.suppress(ps.NoSuchProcess):
            out += [(c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="inet") if c.status == ps.CONN_LISTEN]
    return out


def interrupt_and_check_gone(proc: subprocess.Popen, procs: list, port: int) -> str:
    """Ctrl-C; the command exits 0 within 60 s, every process it started is gone, the port is closed."""
    ps = psutil()
    proc.send_signal(signal.SIGINT)
    try:
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read()
    assert rc == 0, err
    assert "Traceback" not in err, err
    deadline = time.monotonic() + 30
    while True:
        alive = [p for p in procs if p.is_running() and p.status() != ps.STATUS_ZOMBIE]
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not alive, f"left running: {[' '.join(p.cmdline())[:120] for p in alive]}"
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still answers"
    return err


def test_mlflow_ui_serves_runs_and_artifacts_and_stops_clean(store, tmp_path) -> None:
    folder, run = store
    command = ui.browse_command(folder)  # what the demo prints: it must work pasted in this shell
    assert command.endswith(f"ui --store {shlex.quote(str(folder))}")
    proc, uri = start(shlex.split(command), Path.cwd(), "MLflow UI:")
    try:
        assert uri.startswith("http://127.0.0.1:")
        port = int(uri.rsplit(":", 1)[1])
        base = uri + "/api/2.0/mlflow"
        exps = json.loads(get(f"{base}/experiments/search?max_results=100"))["experiments"]
        exp = [e for e in exps if e["name"] == "ui-test"]
        assert exp, exps
        runs = json.loads(urllib.request.urlopen(urllib.request.Request(
            f"{base}/runs/search", data=json.dumps({"experiment_ids": [exp[0]["experiment_id"]]}).encode(),
            headers={"Content-Type": "application/json"}), timeout=30).read())["runs"]
        assert [r["info"]["run_id"] for r in runs] == [run]
        files = json.loads(get(f"{base}/artifacts/list?run_id={run}"))["files"]
        assert [f["path"] for f in files] == ["notes.txt"]
        # the UI's own download route, as its artifact browser fetches a file
        q = urllib.parse.urlencode({"path": "notes.txt", "run_uuid": run})
        assert get(f"{uri}/get-artifact?{q}").decode() == ARTIFACT
        procs = tree(proc.pid)
        addrs = listening(procs)
        assert (("127.0.0.1", port) in addrs) and all(ip == "127.0.0.1" for ip, _ in addrs), addrs
    except BaseException:
        proc.kill()
        raise
    interrupt_and_check_gone(proc, procs, port)
    assert not (folder / "server.json").exists()


def test_optuna_dashboard_serves_the_study_and_stops_clean(tmp_path) -> None:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    sweep = tmp_path / ".rattention" / "sweeps" / "tiny"  # the default sweeps folder, seen from tmp_path
    sweep.mkdir(parents=True)
    journal = sweep / ui.JOURNAL_FILE
    study = optuna.create_study(study_name="tiny", storage=JournalStorage(JournalFileBackend(str(journal))))
    study.add_trial(optuna.trial.create_trial(params={"window": 16},
                                              distributions={"window": optuna.distributions.IntDistribution(0, 64)},
                                              value=3.25))
    (sweep / ui.SWEEP_FILE).write_text(json.dumps({"storage": str(journal), "study": "tiny"}))
    # --optuna alone finds the one sweep under .rattention/sweeps
    proc, uri = start([str(RATTENTION), "ui", "--optuna"], tmp_path, "Optuna dashboard:")
    try:
        assert uri.startswith("http://127.0.0.1:")
        port = int(uri.rsplit(":", 1)[1])
        studies = json.loads(get(f"{uri}/api/studies"))["study_summaries"]
        assert [s["study_name"] for s in studies] == ["tiny"]
        trials = json.loads(get(f"{uri}/api/studies/{studies[0]['study_id']}"))["trials"]
        assert [t["values"] for t in trials] == [[3.25]]
        assert b"<html" in get(f"{uri}/dashboard").lower()
        procs = tree(proc.pid)
        addrs = listening(procs)
        assert addrs == [("127.0.0.1", port)], addrs
    except BaseException:
        proc.kill()
        raise
    interrupt_and_check_gone(proc, procs, port)


@pytest.mark.parametrize("args, line", [
    (["ui", "--store", "nowhere"], "error: --store: nowhere does not exist"),
    (["ui", "--store", "afile"], "error: --store: afile is not a folder"),
    (["ui", "--store", "."], "error: --store: . holds no mlflow.db"),
    (["ui", "--port", "70000", "--store", "{store}"], "error: --port: must be 1..65535, got 70000"),
    (["ui", "--host", "203.0.113.7", "--store", "{store}"], "error: --host: 203.0.113.7 is not an address of this"),
    (["ui", "--tracking-uri", "postgresql://x/y"], "error: --tracking-uri: 'postgresql://x/y' is not served"),
    (["ui", "--tracking-uri", "http://127.0.0.1:9"], "error: --tracking-uri: no MLflow server answers"),
    (["ui", "--store", "{store}", "--tracking-uri", "http://127.0.0.1:9"], "error: --store and --tracking-uri"),
    (["ui", "--optuna", "--store", "{store}"], "error: --optuna: shows a sweep's Optuna study"),
    (["ui", "somewhere"], "error: 'somewhere': a sweep folder or journal goes with --optuna"),
    (["ui", "--optuna"], "error: --optuna (default .rattention/sweeps): .rattention/sweeps does not exist"),
    (["ui", "--optuna", "afile"], "error: --optuna: "),
    (["ui", "--optuna", "sqlite:///nope.db"], "error: --optuna: sqlite:///nope.db names no database file"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(store, tmp_path, args, line) -> None:
    (tmp_path / "afile").write_text("not a store\n")
    args = [a.replace("{store}", str(store[0])) for a in args]
    before = sorted(tmp_path.iterdir())
    r = subprocess.run([str(RATTENTION), *args], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "MLFLOW_TRACKING_URI": ""})
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(line), r.stderr
    assert sorted(tmp_path.iterdir()) == before and (tmp_path / "afile").read_text() == "not a store\n"


def test_port_in_use_is_refused(store, tmp_path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run([str(RATTENTION), "ui", "--store", str(store[0]), "--port", str(port)], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith(f"error: --port: 127.0.0.1:{port} is in use;"), r.stderr


def test_browse_command_forms(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo" / ".mlflow").mkdir(parents=True)
    line = ui.browse_command(tmp_path / "demo" / ".mlflow")
    assert line.endswith(" ui --store demo/.mlflow")
    prefix = line.removesuffix(" ui --store demo/.mlflow")
    assert prefix in ("rattention", f"{sys.executable} -m rattention")  # the interpreter is outside tmp_path
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # the venv not on PATH: name the interpreter
    assert ui.browse_command(Path("/data/my store")) == f"{sys.executable} -m rattention ui --store '/data/my store'"


def test_sweep_layout_names_match_the_sweeps_package() -> None:
    """pipelines cannot import sweeps; the names it reads a sweep folder by are the ones sweeps writes."""
    from sweeps.driver import SWEEP_FILE
    from sweeps.spec import JOURNAL_FILE, SweepSpec

    assert (ui.SWEEP_FILE, ui.JOURNAL_FILE) == (SWEEP_FILE, JOURNAL_FILE)
    assert SweepSpec.model_fields["out_dir"].default == ui.DEFAULT_SWEEPS
