"""The sweep for real: trials as Ray tasks on a local Ray, a real MLflow server, an Optuna journal. (Its faults,
the driver SIGKILLed and resumed, a trial's worker killed, a NaN trial, Ctrl-C, two drivers: tests/reliability.)"""

from __future__ import annotations

import subprocess
import sys
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


def test_trial_budget_stops_the_search_unsettled(train_dataset: Path, mlflow_server: str, ray_local,
                                                 tmp_path: Path) -> None:
    path = write_spec(tmp_path, train_dataset, mlflow_server, "budget", budget=4)
    summary = sweep(load_spec(path), progress=False)
    assert len(study(path).trials) == 4  # the baseline's 2 seeds, then one point of one kind
    assert all(not k["settled"] and k["minimal"] is None for k in summary["kinds"])
    assert all("budget (4) exhausted" in k["note"] for k in summary["kinds"])
    assert "unsettled" in summary["table"]


def test_resume_after_the_spec_changed_trains_the_changed_points(train_dataset: Path, mlflow_server: str, ray_local,
                                                                 tmp_path: Path) -> None:
    """A trial's record answers a point only while it is the same run (config, data and code): a spec edited
    between two runs under the same name retrains, rather than reusing values of another config."""
    path = write_spec(tmp_path, train_dataset, mlflow_server, "changed", kinds=["swa"], seeds=1,
                      grid={"windows": [4, 8], "block": 4})
    first = sweep(load_spec(path), progress=False)
    assert first["trained"] == first["trials"] == 3
    again = sweep(load_spec(path), resume=True, progress=False)
    assert again["trained"] == 0  # nothing changed: every record stands
    changed = sweep(load_spec(path, ["overrides=[train.steps=6]"]), resume=True, progress=False)
    assert changed["trained"] == changed["trials"] == 3
    runs = {t.user_attrs["run_dir"] for t in study(path).trials}
    assert len(runs) == 6 and all(RunDir(r).config().train.steps in (6, 12) for r in runs)
