"""Fault injection in a sweep (issue 14, items 2, 3, 7 and 10), on a real local Ray, a real MLflow server on
127.0.0.1 and an Optuna journal, with the tiny sweep of ``tests.conftest.write_sweep_spec``.

2. The driver is SIGKILLed mid-sweep, then resumed with ``--resume``: no finished trial trains again, the
   answer (and every trial's value) equals an uninterrupted sweep's, and no MLflow run is left RUNNING.
3. A trial's Ray worker process is SIGKILLed while the trial trains: Ray retries the task once, the retry
   resumes from the trial's checkpoint and the trial completes; killed again, the trial is recorded FAIL
   with the reason, its folder and MLflow run FAILED, and the sweep still finishes with an answer.
7. A trial whose loss turns NaN/inf (a learning rate of 1e9): its run FAILED, its trial FAIL with the
   reason, and the sweep goes on to an answer that does not count the failed window as passing.
10. Two drivers of one sweep at once, as two real processes: the second is refused with one line naming
   the first's pid, whether it names the same folder (``--resume`` or not) or the same study's storage from
   another folder; the first goes on, no trial asked or run twice.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from rattention import metrics as M
from rattention.rundir import RunDir
from sweeps.driver import _storage, sweep
from sweeps.spec import load_spec
from tests.conftest import write_sweep_spec
from tests.reliability.faultkit import ROOT, record, sigint_default, titled

METRIC = "eval/val_loss_pos_16_end"


def study(spec_path: Path) -> optuna.Study:
    spec = load_spec(spec_path)
    return optuna.load_study(study_name=spec.name, storage=_storage(spec))


def starts(folder: Path) -> dict[str, int]:
    """Training sessions begun in each trial's run folder."""
    return {p.name: int(RunDir(p).meta().get("starts", 0)) for p in sorted((folder / "runs").iterdir())}


def values(spec_path: Path) -> dict[tuple, float]:
    """Each (kind, window, seed) told to the study, with its value."""
    return {(t.user_attrs["kind"], t.user_attrs["window"], t.user_attrs["seed"]): t.values[0]
            for t in study(spec_path).trials if t.state.name == "COMPLETE"}


def mlflow_runs(uri: str, experiment: str) -> list:
    c = MlflowClient(uri)
    return c.search_runs([c.get_experiment_by_name(experiment).experiment_id], max_results=500)


def ray_env() -> dict[str, str]:
    """The environment of a ``rattention sweep`` subprocess that joins this session's Ray."""
    import ray

    return {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}


def running_trial(folder: Path) -> bool:
    """A trial of the sweep in ``folder`` is training: its run folder RUNNING with a logged step."""
    runs = folder / "runs"
    return runs.is_dir() and any(RunDir(p).status()["status"] == "RUNNING" and RunDir(p).metrics()
                                 for p in runs.iterdir())


@pytest.fixture(scope="module")
def straight(train_dataset, mlflow_server, ray_local, tmp_path_factory) -> tuple[dict, dict]:
    """An uninterrupted sweep of the spec the driver-kill test runs: its summary and its trials' values."""
    tmp = tmp_path_factory.mktemp("straight")
    path = write_sweep_spec(tmp, train_dataset, mlflow_server, "straight", parallel=1)
    return sweep(load_spec(path), progress=False), values(path)


# ----- 2. the driver SIGKILLed, then resumed ----------------------------------------------------------------

@pytest.mark.slow
def test_driver_sigkilled_then_resumed(train_dataset, mlflow_server, ray_local, tmp_path, straight):
    """Fault: ``rattention sweep`` SIGKILLed once 4 trials are told and a fifth trains. Recovery: ``--resume``
    trains no finished trial again (only the interrupted one, from its checkpoint), gives the uninterrupted
    sweep's answer and values, keeps the parent run, and leaves no MLflow run RUNNING."""
    path = write_sweep_spec(tmp_path, train_dataset, mlflow_server, "killed", parallel=1)
    proc = subprocess.Popen([sys.executable, "-m", "rattention", "sweep", str(path)], cwd=ROOT, env=ray_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = tmp_path / "sweeps" / "killed"
    try:
        deadline = time.monotonic() + 240
        while True:  # kill it once 4 trials are told and a fifth is training
            told = (sum(t.state.name == "COMPLETE" for t in study(path).trials)
                    if (folder / "optuna.journal").is_file() else 0)
            if told >= 4 and running_trial(folder):
                break
            assert proc.poll() is None and time.monotonic() < deadline, f"sweep ended early ({proc.poll()})"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = starts(folder)
    finished = [p.name for p in (folder / "runs").iterdir() if RunDir(p).status()["status"] == "FINISHED"]
    assert 4 <= len(finished) < 10
    time.sleep(2)  # Ray ends the dead driver's tasks
    t0 = time.perf_counter()
    resumed = sweep(load_spec(path), resume=True, progress=False)
    secs = time.perf_counter() - t0
    after = starts(folder)
    assert all(after[name] == before[name] == 1 for name in finished)  # no finished trial trained again
    assert sum(after.values()) <= len(after) + (len(before) - len(finished))  # the interrupted ones once more
    summary, straight_values = straight
    assert [(k["kind"], k["minimal"], k["points_used"]) for k in resumed["kinds"]] == \
        [(k["kind"], k["minimal"], k["points_used"]) for k in summary["kinds"]]
    assert values(path) == pytest.approx(straight_values, rel=1e-5)  # every trial's value, too
    runs = mlflow_runs(mlflow_server, "killed")
    assert not [r for r in runs if r.info.status == "RUNNING"]  # the killed driver's runs are closed
    assert len([r for r in runs if M.TAG_PARENT not in r.data.tags]) == 1  # the resumed sweep kept its parent
    assert json.loads((folder / "answer.json").read_text())["trials"] == 10
    record("sweep driver SIGKILLed mid-sweep, then --resume", "SIGKILL to `rattention sweep` with 4 of 10 trials "
           "told and a fifth training",
           "--resume re-runs no finished trial; the uninterrupted sweep's answer and values; nothing left RUNNING",
           True, f"nothing: {len(finished)} finished trials reused, {len(before) - len(finished)} interrupted one "
           "resumed from its checkpoint", secs, "seconds of `sweep --resume` to the answer (the 5-6 trials left)",
           "test_driver_sigkilled_then_resumed")


# ----- 3. a trial's worker killed --------------------------------------------------------------------------

def _kill_trial_worker(folder: Path, kind: str, kills: int, done: dict) -> None:
    """SIGKILL the Ray worker running the first ``kind`` trial: once it has logged step 8 (a checkpoint at 6
    behind it), and with ``kills`` 2 its retry too, once it has begun training. Records the kill times."""
    pids: list[int] = []
    target: Path | None = None  # the first trial folder of the kind to appear
    deadline = time.monotonic() + 240
    while len(pids) < kills and time.monotonic() < deadline:
        if target is None and (folder / "runs").is_dir():
            target = next(iter(sorted((folder / "runs").glob(f"{kind}-w*"))), None)
        if target is not None:
            rd = RunDir(target)
            label = f"ray::trial-{rd.meta().get('tags', {}).get(M.TAG_TRIAL, '?')}-{kind}-"
            live = [p for p in titled(label) if p not in pids]
            ready = (any(r["step"] >= 8 for r in rd.metrics()) if not pids
                     else int(rd.meta().get("starts", 0)) >= 2)
            if live and ready and rd.status()["status"] == "RUNNING":
                os.kill(live[0], signal.SIGKILL)
                pids.append(live[0])
                done.setdefault("times", []).append(time.time())
                done["run_dir"] = target
        time.sleep(0.01)
    done["pids"] = pids


@pytest.mark.parametrize("kills", [1, 2])
def test_trial_worker_killed(train_dataset, mlflow_server, ray_local, tmp_path, kills):
    """Fault: the Ray worker process of the first SWA trial is SIGKILLed at step 8 of 12 (and, with 2 kills,
    its retry as well). Recovery, 1 kill: Ray retries the task, the retry resumes from the step-6 checkpoint and
    the trial completes with the value an unkilled run gets; the answer is the usual one. 2 kills: the trial is
    FAIL with 'the trial's worker died', its folder and MLflow run FAILED, and the sweep finishes with an answer
    that does not count it. Either way no MLflow run is left RUNNING."""
    name = f"worker{kills}"
    path = write_sweep_spec(tmp_path, train_dataset, mlflow_server, name, kinds=["swa"], seeds=1, parallel=1)
    folder = tmp_path / "sweeps" / name
    done: dict = {}
    killer = threading.Thread(target=_kill_trial_worker, args=(folder, "swa", kills, done), daemon=True)
    killer.start()
    summary = sweep(load_spec(path), progress=False)
    killer.join(timeout=10)
    assert len(done.get("pids", [])) == kills, f"the worker was killed {len(done.get('pids', []))} times"
    rd = RunDir(done["run_dir"])
    trial = next(t for t in study(path).trials if t.user_attrs.get("run_dir") == str(rd.path.resolve()))
    swa = summary["kinds"][0]
    assert swa["settled"]  # the sweep finished with an answer
    if kills == 1:
        assert trial.state.name == "COMPLETE" and rd.status()["status"] == "FINISHED"
        assert rd.meta()["starts"] == 2
        rows = rd.metrics()
        resumed = [r for r in rows if M.TRAIN_RESUMED_AT in r]
        assert [r[M.TRAIN_RESUMED_AT] for r in resumed] == [6.0]  # the retry resumed from the checkpoint
        assert [r["step"] for r in rows] == list(range(1, 13))
        assert swa["minimal"] == 4 and not swa["failures"]
        recovery = resumed[0]["time"] - done["times"][0]
        lost = "nothing: steps 7-8 recomputed from the step-6 checkpoint"
    else:
        assert trial.state.name == "FAIL" and "the trial's worker died" in trial.user_attrs["fail_reason"]
        assert rd.status()["status"] == "FAILED" and "worker died" in rd.status()["error"]
        window = RunDir(rd.path).config().model.window
        assert swa["minimal"] != window and any(f"w={window}" in f and "worker died" in f for f in swa["failures"])
        recovery = summary["wall_s"]
        lost = "nothing: the trial recorded FAIL with its reason, its folder and checkpoints kept"
    runs = mlflow_runs(mlflow_server, name)
    assert "RUNNING" not in {r.info.status for r in runs}
    mine = [r for r in runs if r.data.tags.get(M.TAG_RUN_ID) == rd.meta()["run_id"]]
    assert {r.info.status for r in mine} == ({"KILLED", "FINISHED"} if kills == 1 else {"KILLED", "FAILED"})
    record(f"trial's Ray worker SIGKILLed {'once' if kills == 1 else 'twice (retry too)'}",
           "SIGKILL to the Ray worker process running the trial, at step 8 of 12" + (" and again in its retry"
                                                                                      if kills == 2 else ""),
           "Ray retries; the retry resumes from the checkpoint and completes" if kills == 1 else
           "trial FAIL with the reason, its run FAILED; the sweep finishes", True, lost, recovery,
           "seconds from the kill to the retry resuming at step 6" if kills == 1 else
           "seconds of the whole sweep, which finished", f"test_trial_worker_killed[{kills}]")


# ----- 7. a NaN or inf loss in a trial ------------------------------------------------------------------------

def test_nan_trial_is_fail_and_the_sweep_goes_on(train_dataset, mlflow_server, ray_local, tmp_path, monkeypatch):
    """Fault: the SWA trial at window 4 trains at lr 1e9 without clipping, so its loss turns NaN or inf.
    Recovery: its run FAILED, its trial FAIL with 'loss is nan/inf' and the step, and the sweep goes on: the
    minimal window is 8 (window 4 counts as not passing), with the failure listed."""
    from sweeps import driver

    path = write_sweep_spec(tmp_path, train_dataset, mlflow_server, "nan", kinds=["swa"], seeds=1)
    real = driver.Sweep.submit

    def poisoned(self, job, cfg):  # the trial at window 4 gets a learning rate that blows it up
        if job.window == 4:
            cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"lr": 1e9, "grad_clip": 0.0})})
        return real(self, job, cfg)

    monkeypatch.setattr(driver.Sweep, "submit", poisoned)
    t0 = time.perf_counter()
    summary = sweep(load_spec(path), progress=False)
    secs = time.perf_counter() - t0
    swa = summary["kinds"][0]
    assert swa["minimal"] == 8  # window 4 failed, so it cannot be the minimum; 8 passed
    assert any("loss is" in f and "w=4" in f for f in swa["failures"])
    fails = [t for t in study(path).trials if t.state.name == "FAIL"]
    assert len(fails) == 1 and "loss is" in fails[0].user_attrs["fail_reason"]
    assert fails[0].user_attrs["fail_reason"].startswith("step ")  # names the step
    run = MlflowClient(mlflow_server).get_run(fails[0].user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED"
    assert RunDir(fails[0].user_attrs["run_dir"]).status()["status"] == "FAILED"
    record("NaN/inf loss in a sweep trial", "lr 1e9, no clipping, for the trial at window 4",
           "run FAILED, trial FAIL with the reason, the sweep goes on to an answer", True,
           "nothing: the trial recorded FAIL with its reason, its folder kept; the answer counts it as not passing",
           secs,
           "seconds of the whole sweep, which finished", "test_nan_trial_is_fail_and_the_sweep_goes_on")


# ----- 10. two drivers at once ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_drivers_at_once(train_dataset, mlflow_server, ray_local, tmp_path):
    """Fault: while ``rattention sweep SPEC`` runs (a real process; its first trial trains for as long as the
    test needs), the same command is started again, with and without --resume, and a second spec with another
    out_dir names the first's study storage. Recovery: each second driver is refused at once with one line
    naming the running driver's pid, exit 2, touching nothing: the first goes on undisturbed (one trial asked,
    training once) until it is stopped."""
    path = write_sweep_spec(tmp_path, train_dataset, mlflow_server, "twice", parallel=1,
                            overrides=["train.steps=100000"])
    folder = tmp_path / "sweeps" / "twice"
    (tmp_path / "elsewhere").mkdir()
    other = write_sweep_spec(tmp_path / "elsewhere", train_dataset, mlflow_server, "twice", parallel=1,
                             storage=str(folder / "optuna.journal"))
    env = ray_env()
    first = subprocess.Popen([sys.executable, "-m", "rattention", "sweep", str(path)], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_default)
    try:
        deadline = time.monotonic() + 240
        while not running_trial(folder):
            assert first.poll() is None and time.monotonic() < deadline, "the first sweep never started a trial"
            time.sleep(0.05)
        worst = 0.0
        for argv, line in (
                ([str(path)], f"error: {folder}: another sweep driver (pid {first.pid}) is running this sweep; "
                              "wait for it, or stop it and pass --resume"),
                ([str(path), "--resume"], f"error: {folder}: another sweep driver (pid {first.pid})"),
                ([str(other), "--resume"], f"error: storage: study 'twice' in {folder / 'optuna.journal'} is being "
                                           f"run by another sweep driver (pid {first.pid}, folder "
                                           f"{folder.resolve()})")):
            t0 = time.perf_counter()
            second = subprocess.run([sys.executable, "-m", "rattention", "sweep", *argv], cwd=ROOT, env=env,
                                    capture_output=True, text=True, timeout=120)
            worst = max(worst, time.perf_counter() - t0)
            assert second.returncode == 2, second.stdout[-2000:] + second.stderr
            assert len(second.stderr.splitlines()) == 1 and second.stderr.startswith(line), second.stderr
        assert first.poll() is None and running_trial(folder)  # the first goes on, undisturbed
        assert len(study(path).trials) == 1 and set(starts(folder).values()) == {1}  # nothing asked or run twice
        assert not (tmp_path / "elsewhere" / "sweeps" / "twice" / "runs").exists()
        first.send_signal(signal.SIGINT)  # done with it: Ctrl-C
        _, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130, err[-3000:]
    assert set(starts(folder).values()) == {1}
    record("two sweep drivers at once (same folder, or same study storage)",
           "`rattention sweep` started again while the first runs: same spec, with --resume, and another out_dir "
           "on the same journal", "the second refused with one line naming the first's pid; the first goes on",
           True, "nothing: no trial asked or trained twice", worst,
           "seconds of the slowest refused command (a Python start-up)", "test_two_drivers_at_once")
