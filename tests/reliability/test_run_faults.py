"""Fault injection in one run (issue 14, items 1 and 7), on a real local Ray and a real MLflow server.

1. A Ray Train worker process dies mid-run (``os._exit`` before step 9 of 16, once; ``rattention.faults``).
   Ray Train restarts the worker group from the step-5 checkpoint; the run ends at step 16 in the same MLflow
   run, whose loss curve has every step (no gap) and repeats only the replayed steps 6-8, with the same
   values; the loader neither repeats nor skips data: the replayed steps see the batches the first attempt
   saw (their losses are equal), and the final checkpoint's loader position is that of a loader that handed
   out exactly 16 batches.
7. A NaN (step 4, injected) or an inf loss: the run is FAILED, in its folder and in MLflow, with the reason
   naming the step; the check is the logger's, which stops on any non-finite loss before a checkpoint.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipelines.train import fit
from rattention import metrics as M
from rattention.checkpoint import load_checkpoint
from rattention.data import loader_for
from rattention.errors import TrainingError
from rattention.logger import TrainLogger
from rattention.rundir import RunDir
from tests.conftest import tiny_run_config
from tests.reliability.faultkit import record

STEPS, EVERY, CRASH = 16, 5, 9
# how long the worker waits before dying: Ray Train must have collected the step-5 checkpoint's report by then
# (it polls every 0.2 s here); 1 s once fell short on a loaded 2-core machine
DELAY_S = 3.0


def _cfg(ds: Path, uri: str, *over: str):
    return tiny_run_config(ds, f"tracking.uri={uri}", "tracking.experiment=run-faults", *over)


@pytest.mark.slow
def test_worker_dies_mid_run(train_dataset, mlflow_server, ray_local, tmp_path, monkeypatch):
    """Fault: the Ray Train worker exits (``os._exit(1)``) before step 9 of 16, once, with checkpoints every 5
    steps. Recovery: restart from step 5; the run FINISHED at step 16 in one MLflow run; the curve has steps
    1-16, only 6-8 twice and with equal values; the data stream is neither repeated nor skipped."""
    # Ray Train collects reports when it polls the workers (every 2 s by default); a real run has minutes
    # between checkpoints, this one a fraction of a second, so poll faster and die a little later.
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    marker = tmp_path / "crashed"
    run = tmp_path / "run"
    cfg = _cfg(train_dataset, mlflow_server, "ray.workers=1", "ray.max_failures=1", f"train.steps={STEPS}",
               f"train.checkpoint_every={EVERY}", "eval.enabled=false")
    fit(cfg, run_dir=run, progress=False,
        faults={"crash_at_step": CRASH, "crash_marker": str(marker), "crash_delay_s": DELAY_S})
    assert marker.read_text().startswith(f"crashed at step {CRASH}")
    rd = RunDir(run)
    c = MlflowClient(mlflow_server)
    mlrun = c.get_run(rd.meta()["mlflow_run_id"])
    assert mlrun.info.status == "FINISHED" and rd.status() == {**rd.status(), "status": "FINISHED", "step": STEPS}
    resumed = c.get_metric_history(mlrun.info.run_id, M.TRAIN_RESUMED_AT)
    assert [m.value for m in resumed] == [float(EVERY)]  # restarted once, from the step-5 checkpoint
    # the MLflow curve: no gap, ends at the planned step, repeats only what was replayed, with the same values
    curve: dict[int, list[float]] = defaultdict(list)
    for m in c.get_metric_history(mlrun.info.run_id, M.TRAIN_LOSS):
        curve[m.step].append(m.value)
    assert sorted(curve) == list(range(1, STEPS + 1))
    replayed = set(range(EVERY + 1, CRASH))
    assert {s for s, v in curve.items() if len(v) > 1} <= replayed and all(len(v) <= 2 for v in curve.values())
    # the folder logs synchronously, so it holds both attempts of each replayed step
    lines = [json.loads(ln) for ln in rd.metrics_path.read_text().splitlines() if ln.strip()]
    attempts: dict[int, list[float]] = defaultdict(list)
    for row in lines:
        if M.TRAIN_LOSS in row:
            attempts[row["step"]].append(row[M.TRAIN_LOSS])
    assert {s for s, v in attempts.items() if len(v) == 2} == replayed and sorted(attempts) == list(range(1, STEPS + 1))
    for step in replayed:  # the same batches after the restart: neither repeated nor skipped
        first, again = attempts[step]
        assert again == pytest.approx(first, rel=1e-6), step
        assert all(v == pytest.approx(first, rel=1e-6) for v in curve[step]), step
    state = load_checkpoint(rd.latest_checkpoint())
    assert state["step"] == STEPS
    fresh = loader_for(cfg, cfg.data.train_split, 0, 1)
    batches = iter(fresh)
    for _ in range(STEPS):
        next(batches)
    assert state["loader"][0]["positions"] == fresh.state_dict()["positions"]  # exactly 16 batches consumed
    crashed_at = marker.stat().st_mtime + DELAY_S  # it slept that long after writing the marker
    back_at = next(row["time"] for row in lines if M.TRAIN_RESUMED_AT in row)
    record("Ray Train worker dies mid-run (os._exit, once)", f"os._exit(1) in the worker before step {CRASH} of "
           f"{STEPS}; checkpoints every {EVERY}",
           "restart from the last checkpoint; ends at the planned step; MLflow curve continues; data neither "
           "repeated nor skipped", True,
           f"nothing: steps {EVERY + 1}-{CRASH - 1} recomputed (same losses), logged twice in MLflow",
           back_at - crashed_at,
           "seconds from the worker's death to the restarted worker resuming from the checkpoint",
           "test_worker_dies_mid_run")


def test_nan_loss_fails_the_run(train_dataset, mlflow_server, ray_local, tmp_path):
    """Fault: the loss of step 4 is multiplied by NaN (``rattention.faults``). Recovery: TrainingError naming the
    step; the folder and the MLflow run FAILED with that reason; no checkpoint of the poisoned step."""
    run = tmp_path / "run"
    cfg = _cfg(train_dataset, mlflow_server, "ray.local_mode=true", "train.steps=10", "train.checkpoint_every=4")
    with pytest.raises(TrainingError, match=r"^step 4: loss is nan"):
        fit(cfg, run_dir=run, faults={"nan_at_step": 4}, progress=False)
    rd = RunDir(run)
    assert MlflowClient(mlflow_server).get_run(rd.meta()["mlflow_run_id"]).info.status == "FAILED"
    status = rd.status()
    assert status["status"] == "FAILED" and status["error"].startswith("step 4: loss is nan"), status
    assert not [p for p in rd.checkpoints.glob("*.pt")]  # step 4 is never saved
    record("NaN loss in a run", "loss of step 4 multiplied by NaN", "run FAILED (folder, MLflow) with the step named",
           True, "nothing: the run recorded FAILED with its reason, before any checkpoint of the bad step", 0.0,
           "no recovery: the run stops at once", "test_nan_loss_fails_the_run")


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_loss_stops_the_logger(bad):
    """The component that decides: the training logger stops on any non-finite loss (inf as well as NaN),
    naming the step, when it reads it, and before the loop checkpoints (``read_all``)."""
    log = TrainLogger([], total_steps=10, log_every=5, batch_tokens=8, device=torch.device("cpu"), lr_hint=1e-3,
                      system_metrics=False, progress=False)
    log.record(1, torch.tensor(2.0), torch.tensor(1.0), 1e-3, 8)
    log.record(2, torch.tensor(1.9), torch.tensor(1.0), 1e-3, 16)
    with pytest.raises(TrainingError, match=rf"^step 3: loss is {bad}; training stopped \(lower train.lr=0.001"):
        log.record(3, torch.tensor(bad), torch.tensor(1.0), 1e-3, 24, read_all=True)


def test_died_after_finishing_before_mlflow_was_told(train_dataset, mlflow_server, tmp_path):
    """Fault: the run's process dies after its folder says FINISHED and before its MLflow run is ended (a sweep
    driver SIGKILLed at that moment takes its trial's worker with it), leaving the MLflow run RUNNING; the state
    is made by running the run and setting its MLflow run back to RUNNING. Recovery: submitted again, the run
    trains nothing, ends its MLflow run FINISHED and marks its folder for import-run, which completes it."""
    from pipelines.import_run import import_run
    from pipelines.tracking import MlflowTracker
    from rattention import lifecycle

    cfg = _cfg(train_dataset, mlflow_server, "train.steps=6", "eval.enabled=false")
    run = tmp_path / "run"
    tracker = MlflowTracker(mlflow_server, cfg.tracking.experiment)
    first = lifecycle.run(cfg, run, tracker=tracker, progress=False)
    c = MlflowClient(mlflow_server)
    run_id = RunDir(run).meta()["mlflow_run_id"]
    c.update_run(run_id, status="RUNNING")  # as the dead process left it
    again = lifecycle.run(cfg, run, tracker=MlflowTracker(mlflow_server, cfg.tracking.experiment), progress=False)
    assert again == first and RunDir(run).meta()["starts"] == 1  # nothing trained again
    assert c.get_run(run_id).info.status == "FINISHED"
    assert RunDir(run).meta()[lifecycle.TRACKING_INCOMPLETE]
    assert import_run(run, mlflow_server) == run_id
    assert lifecycle.TRACKING_INCOMPLETE not in RunDir(run).meta()
    assert sorted(m.step for m in c.get_metric_history(run_id, M.TRAIN_LOSS)) == list(range(1, 7))  # each once
    record("run process died after finishing, before MLflow was told", "a FINISHED run folder whose MLflow run "
           "is still RUNNING, submitted again", "no training; the MLflow run ended FINISHED; import-run completes it",
           True, "nothing", 0.0, "no recovery time: the finished results are returned at once",
           "test_died_after_finishing_before_mlflow_was_told")
