"""The sweep for real: trials as Ray tasks on a local Ray, a real MLflow server, an Optuna journal; the
driver SIGKILLed mid-sweep and resumed; a failing trial recorded as FAIL while the sweep goes on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from rattention import metrics as M
from rattention.rundir import RunDir
from sweeps.driver import sweep
from sweeps.spec import load_spec
from tests.conftest import write_sweep_spec as write_spec

ROOT = Path(__file__).resolve().parents[2]
def starts(folder: Path) -> dict[str, int]:
    """Training sessions begun in each trial's run folder."""
    return {p.name: int(RunDir(p).meta().get("starts", 0)) for p in sorted((folder / "runs").iterdir())}


def study(spec_path: Path) -> optuna.Study:
    spec = load_spec(spec_path)
    from sweeps.driver import _storage

    return optuna.load_study(study_name=spec.name, storage=_storage(spec))


def test_sweep_end_to_end(train_dataset: Path, mlflow_server: str, ray_local, tmp_path: Path) -> None:
    path = write_spec(tmp_path, train_dataset, mlflow_server, "e2e")
    summary = sweep(load_spec(path), progress=False)
    kinds = {k["kind"]: k for k in summary["kinds"]}
    # every window passes a 10-nat tolerance, so the minimum is the smallest grid point, found by bisection
    assert kinds["swa"]["minimal"] == 4 and kinds["rattention"]["minimal"] == 4
    assert all(k["settled"] and k["points_used"] <= k["bound"] for k in kinds.values())
    trials = study(path).trials
    assert len(trials) == summary["trials"] == 2 + 2 * 2 * 2  # baseline seeds + 2 points x 2 seeds per kind
    assert all(t.state.name == "COMPLETE" for t in trials)
    for t in trials:
        assert {"kind", "window", "seed", "run_id", "mlflow_run_id", "run_dir"} <= set(t.user_attrs)
        assert t.values[0] == pytest.approx(RunDir(t.user_attrs["run_dir"]).results()["eval/val_loss_pos_16_end"])
    # MLflow: one experiment, one parent, a child per trial linked to it and tagged with the study and trial
    c = MlflowClient(mlflow_server)
    exp = c.get_experiment_by_name("e2e")
    runs = c.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if M.TAG_PARENT not in r.data.tags]
    children = [r for r in runs if r.data.tags.get(M.TAG_PARENT) == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == len(trials)
    assert {r.info.run_id for r in children} == {t.user_attrs["mlflow_run_id"] for t in trials}
    assert all(r.info.status == "FINISHED" for r in runs)
    assert {r.data.tags[M.TAG_TRIAL] for r in children} == {str(t.number) for t in trials}
    assert all(r.data.tags[M.TAG_STUDY] == "e2e" for r in children)
    parent = parents[0]
    assert parent.data.metrics[M.sweep_minimal_window("swa")] == 4
    arts = {a.path for a in c.list_artifacts(parent.info.run_id)}
    assert {"answer.json", "trials.csv", "spec.yaml", "summary.md"} <= arts
    # the full baseline is a standard Transformer: RoPE on every layer
    full = [t for t in trials if t.user_attrs["kind"] == "full"][0]
    assert RunDir(full.user_attrs["run_dir"]).config().model.nope_global is False


def test_resume_after_sigkill(train_dataset: Path, mlflow_server: str, ray_local, tmp_path: Path) -> None:
    import ray

    path = write_spec(tmp_path, train_dataset, mlflow_server, "killed", parallel=1)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "rattention", "sweep", str(path)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = tmp_path / "sweeps" / "killed"
    try:
        deadline = time.monotonic() + 240
        while True:  # kill it once 4 trials are told and a fifth is training
            told = (sum(t.state.name == "COMPLETE" for t in study(path).trials)
                    if (folder / "optuna.journal").is_file() else 0)
            if told >= 4 and any(RunDir(p).status()["status"] == "RUNNING" and RunDir(p).metrics()
                                 for p in (folder / "runs").iterdir()):
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
    assert len(finished) >= 4 and len(finished) < 10
    time.sleep(2)  # Ray ends the dead driver's tasks
    resumed = sweep(load_spec(path), resume=True, progress=False)
    after = starts(folder)
    assert all(after[name] == before[name] == 1 for name in finished)  # no finished trial trained again
    assert sum(after.values()) <= len(after) + (len(before) - len(finished))  # the interrupted ones once more
    # the same answer as an uninterrupted sweep of the same spec
    straight = sweep(load_spec(write_spec(tmp_path, train_dataset, mlflow_server, "straight", parallel=1)),
                     progress=False)
    assert [(k["kind"], k["minimal"], k["points_used"]) for k in resumed["kinds"]] == \
        [(k["kind"], k["minimal"], k["points_used"]) for k in straight["kinds"]]
    c = MlflowClient(mlflow_server)
    exp = c.get_experiment_by_name("killed")
    runs = c.search_runs([exp.experiment_id], max_results=200)
    assert not [r for r in runs if r.info.status == "RUNNING"]  # the killed driver's runs are closed
    assert len([r for r in runs if M.TAG_PARENT not in r.data.tags]) == 1  # the resumed sweep kept its parent
    assert json.loads((folder / "answer.json").read_text())["trials"] == 10


def test_failed_trial_is_recorded_and_the_sweep_goes_on(train_dataset: Path, mlflow_server: str, ray_local,
                                                         tmp_path: Path) -> None:
    # lr 1e6 drives every local-kind trial at the smallest window to a NaN loss; the baseline trains
    path = write_spec(tmp_path, train_dataset, mlflow_server, "nan", kinds=["swa"], seeds=1,
                      tolerance={"kind": "absolute", "value": 10.0})
    spec = load_spec(path)
    from sweeps import driver

    real = driver.Sweep.submit

    def poisoned(self, job, cfg):  # the trial at window 4 gets a learning rate that blows it up
        if job.window == 4:
            cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"lr": 1e9, "grad_clip": 0.0})})
        return real(self, job, cfg)

    driver.Sweep.submit = poisoned
    try:
        summary = sweep(spec, progress=False)
    finally:
        driver.Sweep.submit = real
    swa = summary["kinds"][0]
    assert swa["minimal"] == 8  # window 4 failed, so it cannot be the minimum; 8 passed
    assert any("loss is" in f and "w=4" in f for f in swa["failures"])
    fails = [t for t in study(path).trials if t.state.name == "FAIL"]
    assert len(fails) == 1 and "loss is" in fails[0].user_attrs["fail_reason"]
    run = MlflowClient(mlflow_server).get_run(fails[0].user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED"


def test_second_driver_on_the_same_sweep_is_refused(train_dataset: Path, mlflow_server: str, tmp_path: Path) -> None:
    import fcntl

    from rattention.errors import ConfigError

    path = write_spec(tmp_path, train_dataset, mlflow_server, "locked")
    folder = tmp_path / "sweeps" / "locked"
    folder.mkdir(parents=True)
    with (folder / "driver.lock").open("w") as f:  # as a running driver holds it
        fcntl.flock(f, fcntl.LOCK_EX)
        with pytest.raises(ConfigError, match="another sweep driver"):
            sweep(load_spec(path), progress=False)


def test_dry_run_prints_the_plan(train_dataset: Path, mlflow_server: str, tmp_path: Path) -> None:
    path = write_spec(tmp_path, train_dataset, mlflow_server, "plan")
    out = subprocess.run([sys.executable, "-m", "rattention", "sweep", str(path), "--dry-run"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "baseline: full x seeds [0, 1] = 2 trials" in out.stdout
    assert "at most 4 points x 2 seeds = 8 trials" in out.stdout and "1 CPU / 0 GPU" in out.stdout
    assert not (tmp_path / "sweeps" / "plan").exists()  # nothing run, nothing written


def test_pareto_mode_reports_the_front(train_dataset: Path, mlflow_server: str, ray_local, tmp_path: Path) -> None:
    path = write_spec(tmp_path, train_dataset, mlflow_server, "front", mode="pareto", seeds=1,
                      tolerance={"kind": "absolute", "value": 0.1},
                      pareto={"against": "cache_bytes", "context": 32768, "sampler": "nsga2", "trials": 4})
    summary = sweep(load_spec(path), progress=False)
    trials = [t for t in study(path).trials if t.state.name == "COMPLETE"]
    assert len(trials) == summary["trials"] == 4
    assert all(len(t.values) == 2 for t in trials)  # the objective and the cache bytes at 32768
    best = {t.number for t in study(path).best_trials}
    assert {r["trial"] for r in summary["pareto_front"]} == best
    for r in summary["pareto_front"]:  # nothing on the front is dominated by another evaluated trial
        assert not any(t.values[0] < r["eval/val_loss_pos_16_end"] and t.values[1] < r["eff/cache_bytes_ctx32768"]
                       for t in trials)
    c = MlflowClient(mlflow_server)
    parent = [r for r in c.search_runs([c.get_experiment_by_name("front").experiment_id])
              if M.TAG_PARENT not in r.data.tags][0]
    assert "pareto_front.json" in {a.path for a in c.list_artifacts(parent.info.run_id)}


def test_ctrl_c_stops_the_sweep_and_leaves_nothing_running(train_dataset: Path, mlflow_server: str, ray_local,
                                                          tmp_path: Path) -> None:
    import ray

    path = write_spec(tmp_path, train_dataset, mlflow_server, "ctrlc", parallel=1)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    folder = tmp_path / "sweeps" / "ctrlc"
    proc = subprocess.Popen([sys.executable, "-m", "rattention", "sweep", str(path)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 240
        while not ((folder / "runs").is_dir() and any(RunDir(p).metrics() and RunDir(p).status()["status"] ==
                                                      "RUNNING" for p in (folder / "runs").iterdir())):
            assert proc.poll() is None and time.monotonic() < deadline, "no trial started training"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[:3000]
    assert err.strip().splitlines()[-1].startswith("interrupted: sweep stopped") and "Traceback" not in err
    c = MlflowClient(mlflow_server)
    runs = c.search_runs([c.get_experiment_by_name("ctrlc").experiment_id], max_results=50)
    deadline = time.monotonic() + 30  # the driver marks the running trial KILLED as it stops
    while any(r.info.status == "RUNNING" for r in runs) and time.monotonic() < deadline:
        time.sleep(0.5)
        runs = c.search_runs([c.get_experiment_by_name("ctrlc").experiment_id], max_results=50)
    assert {r.info.status for r in runs if M.TAG_PARENT not in r.data.tags} == {"KILLED"}
    assert "RUNNING" not in {r.info.status for r in runs}


def test_trial_budget_stops_the_search_unsettled(train_dataset: Path, mlflow_server: str, ray_local,
                                                 tmp_path: Path) -> None:
    path = write_spec(tmp_path, train_dataset, mlflow_server, "budget", budget=4)
    summary = sweep(load_spec(path), progress=False)
    assert len(study(path).trials) == 4  # the baseline's 2 seeds, then one point of one kind
    assert all(not k["settled"] and k["minimal"] is None for k in summary["kinds"])
    assert all("budget (4) exhausted" in k["note"] for k in summary["kinds"])
    assert "unsettled" in summary["table"]
