"""Fault injection: Ctrl-C (SIGINT) on ``rattention train``, ``sweep`` and ``data prepare`` (issue 14, item 4).

Each command runs as a user runs it: the console script in its own session, starting its own local Ray and
(for train and sweep) its own MLflow server, with a tag in its environment that every process it starts
inherits. Once it is under way, SIGINT goes to its whole process group, as a terminal sends Ctrl-C. The
recovery expected: exit status 130 and the command's one ``interrupted`` line last on stderr, no
traceback; its runs marked KILLED (folder and MLflow); no process of its tree left (Ray's GCS, raylet,
workers and dashboard, the MLflow server), checked by the tag; no half-written dataset that looks complete.

The child gets SIGINT back to its default before exec (``faultkit.sigint_default``): a pytest started from a
shell's background job has SIGINT ignored, which its children would inherit, and the Ctrl-C would do nothing.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from rattention.rundir import RunDir
from tests.conftest import tiny_run_config, write_sweep_spec
from tests.reliability.faultkit import RAY_LINE, ROOT, TAG_ENV, record, sigint_default, tagged, wait_gone

RATTENTION = Path(sys.executable).parent / "rattention"  # the console script beside python


def ctrl_c(argv: list[str], cwd: Path, ready: Callable[[], bool], timeout: float = 240.0
           ) -> tuple[int, str, str, float, list[tuple[int, str]]]:
    """Run ``rattention ARGV`` in its own session with a fresh tag, SIGINT its process group once ``ready()``,
    and return (exit code, stderr, tag, seconds from the signal to its exit, its processes still alive once
    it has exited: 60 s allowed for them to go)."""
    tag = uuid.uuid4().hex
    env = {**os.environ, "RAY_ADDRESS": "", TAG_ENV: tag}
    env.pop("MLFLOW_TRACKING_URI", None)
    err_path = cwd / f"stderr-{tag[:8]}.txt"
    with open(err_path, "w") as err:
        proc = subprocess.Popen([str(RATTENTION), *argv], cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True, preexec_fn=sigint_default)
        try:
            deadline = time.monotonic() + timeout
            while not ready():
                assert proc.poll() is None and time.monotonic() < deadline, \
                    f"the command never got under way (exit {proc.poll()}): {err_path.read_text()[-3000:]}"
                time.sleep(0.05)
            os.killpg(proc.pid, signal.SIGINT)
            t0 = time.perf_counter()
            rc = proc.wait(timeout=180)
            secs = time.perf_counter() - t0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    left = wait_gone(tag)
    for pid, _ in tagged(tag):  # a failing test leaves nothing behind either
        os.kill(pid, signal.SIGKILL)
    return rc, err_path.read_text(), tag, secs, left


def assert_interrupted(rc: int, err: str, last: str) -> None:
    """Exit 130, no traceback of the command's, and its own line last and once. Ray's worker lines may come
    around it; they are Ray's (one seen here: Ray Train's PlacementGroupCleaner actor prints a traceback,
    "Found multiple active Ray instances", whenever another Ray runs on the machine, Ctrl-C or not)."""
    assert rc == 130, err[-3000:]
    ours = [ln for ln in err.splitlines() if not RAY_LINE.match(ln)]
    assert not [ln for ln in ours if "Traceback" in ln], err[-3000:]
    lines = [ln for ln in ours if ln.strip()]  # Ray forwards its workers' lines late: some follow ours
    assert lines[-1].startswith(last), err[-3000:]
    assert [ln for ln in lines if ln.startswith("interrupted")] == [lines[-1]], err[-3000:]  # one line of ours


def store_runs(store: Path, experiment: str) -> list:
    """The runs of ``experiment`` in the MLflow store the command's own server kept (read from its SQLite file,
    the server being gone with the command)."""
    c = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    return c.search_runs([c.get_experiment_by_name(experiment).experiment_id], max_results=100)


@pytest.mark.slow
def test_ctrl_c_on_train(train_dataset, tmp_path):
    """Fault: Ctrl-C on ``rattention train`` (Ray Train, its own Ray and MLflow server) at step 3 or later.
    Recovery: exit 130 with the 'run marked KILLED' line; the folder and the MLflow run KILLED at the step
    reached; no process of its tree left; the same command resumes from the last checkpoint."""
    run, store = tmp_path / "run", tmp_path / "mlflow"
    cfg = tiny_run_config(train_dataset, "train.steps=100000", "train.checkpoint_every=2", "eval.enabled=false",
                          f"tracking.server_dir={store}", "tracking.experiment=ctrl-c")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    rc, err, tag, secs, left = ctrl_c(["train", "run.yaml", "--run-dir", str(run)], tmp_path,
                                      lambda: any(r["step"] >= 3 for r in RunDir(run).metrics()))
    assert_interrupted(rc, err, "interrupted: run marked KILLED; the same command resumes it")
    status = RunDir(run).status()
    assert status["status"] == "KILLED" and status["step"] >= 3, status
    (mlrun,) = store_runs(store, "ctrl-c")
    assert mlrun.info.status == "KILLED", (RunDir(run).meta(), err[-3000:])
    assert not left, left
    record("Ctrl-C on `rattention train` (Ray Train)", "SIGINT to the command's process group at step >= 3",
           "exit 130, one line; folder and MLflow run KILLED; no Ray or MLflow process left", True,
           "nothing: the run resumes from its last checkpoint (every 2 steps here)", secs,
           "seconds from the SIGINT to the command's exit", "test_ctrl_c_on_train")


@pytest.mark.slow
def test_ctrl_c_on_sweep(train_dataset, tmp_path):
    """Fault: Ctrl-C on ``rattention sweep`` (its own Ray and MLflow server) while a trial trains. Recovery:
    exit 130 with the 'sweep stopped' line; the parent run and the running trial KILLED (folder and MLflow),
    no MLflow run left RUNNING; no process of its tree left; ``--resume`` continues it."""
    store = tmp_path / "mlflow"
    spec = write_sweep_spec(tmp_path, train_dataset, "null", "ctrlc", parallel=1,
                            overrides=[f"tracking.server_dir={store}", "train.steps=100000"])
    folder = tmp_path / "sweeps" / "ctrlc"

    def training() -> bool:
        runs = folder / "runs"
        return runs.is_dir() and any(RunDir(p).metrics() and RunDir(p).status()["status"] == "RUNNING"
                                     for p in runs.iterdir())

    rc, err, tag, secs, left = ctrl_c(["sweep", str(spec)], tmp_path, training)
    assert_interrupted(rc, err, "interrupted: sweep stopped")
    runs = store_runs(store, "ctrlc")
    assert {r.info.status for r in runs} == {"KILLED"}, {r.info.run_name: r.info.status for r in runs}
    assert {RunDir(p).status()["status"] for p in (folder / "runs").iterdir()} == {"KILLED"}
    assert not left, left
    record("Ctrl-C on `rattention sweep`", "SIGINT to the command's process group while a trial trains",
           "exit 130, one line; parent and trial runs KILLED; no Ray or MLflow process left", True,
           "nothing: --resume reuses the told trials and resumes the killed one", secs,
           "seconds from the SIGINT to the command's exit", "test_ctrl_c_on_sweep")


def test_ctrl_c_on_data_prepare(tmp_path):
    """Fault: Ctrl-C on ``rattention data prepare`` over a real corpus (800 stdlib sources) once its tokenizer
    is trained, in the temporary folder. Recovery: exit 130 with 'interrupted'; no dataset at the output path
    and the temporary folder removed (nothing half-written looks complete); no process of its tree left."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    # enough text that the job is still tokenizing when the Ctrl-C lands
    files = [f for f in sorted(stdlib.rglob("*.py")) if "test" not in f.parts and "site-packages" not in f.parts]
    for i, f in enumerate(files[:800]):
        shutil.copy(f, corpus / f"{i:04d}_{f.name}")
    out = tmp_path / "ds"
    rc, err, tag, secs, left = ctrl_c(["data", "prepare", str(corpus), "--out", str(out), "--vocab-size", "300",
                                       "--num-cpus", "1"], tmp_path,
                                      lambda: bool(list(tmp_path.glob(".ds.tmp-*/tokenizer.json"))))
    assert_interrupted(rc, err, "interrupted")
    assert not out.exists() and not list(tmp_path.glob(".ds.tmp-*"))  # not published, temp folder removed
    assert not left, left
    record("Ctrl-C on `rattention data prepare`", "SIGINT to the command's process group while it tokenizes",
           "exit 130, one line; no dataset published, temp folder removed; no Ray process left", True,
           "nothing: no dataset claims to be complete; the same command builds it", secs,
           "seconds from the SIGINT to the command's exit", "test_ctrl_c_on_data_prepare")


def test_sigint_restored_in_the_child(tmp_path):
    """The premise of these tests: with SIGINT ignored in pytest (as under a shell's background job), the child
    still gets a Ctrl-C handler, since ``sigint_default`` restores it before exec."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        probe = "import signal; h = signal.getsignal(signal.SIGINT); print(h is signal.default_int_handler)"
        plain = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=ROOT)
        fixed = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=ROOT,
                               preexec_fn=sigint_default)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert plain.stdout.strip() == "False"  # ignored, inherited: Ctrl-C would do nothing
    assert fixed.stdout.strip() == "True"  # Python's KeyboardInterrupt handler
