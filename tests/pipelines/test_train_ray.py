"""Training on real Ray Train with a real MLflow server on 127.0.0.1: local mode, 2 DDP workers on gloo,
and import-run of a run folder. (A worker that dies, a NaN loss and Ctrl-C: tests/reliability.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines.import_run import import_run
from pipelines.tracking import SERVER_FILE, tracking_uri
from pipelines.train import fit
from rattention import lifecycle
from rattention import metrics as M
from rattention.errors import ConfigError
from rattention.evaluate import load_model
from rattention.rundir import RunDir
from tests.conftest import tiny_run_config


def _cfg(ds: Path, uri: str, *over: str):
    return tiny_run_config(ds, f"tracking.uri={uri}", "tracking.experiment=test-train", *over)


def _run(uri: str, run_dir: Path):
    c = MlflowClient(uri)
    run_id = RunDir(run_dir).meta()["mlflow_run_id"]
    return c, c.get_run(run_id)


def _losses(c: MlflowClient, run_id: str) -> list[float]:
    return [m.value for m in sorted(c.get_metric_history(run_id, M.TRAIN_LOSS), key=lambda m: m.step)]


def test_local_mode_run_is_tracked(train_dataset: Path, mlflow_server: str, ray_local, tmp_path: Path) -> None:
    cfg = _cfg(train_dataset, mlflow_server, "ray.local_mode=true", "train.steps=30")
    results = fit(cfg, run_dir=tmp_path / "run")
    c, run = _run(mlflow_server, tmp_path / "run")
    assert run.info.status == "FINISHED"
    assert run.data.params["model.window"] == "8" and run.data.params["train.steps"] == "30"
    assert run.data.tags[M.TAG_KIND] == "rattention" and run.data.tags[M.TAG_WINDOW] == "8"
    assert run.data.tags[M.TAG_DATASET].startswith("test-") and run.data.tags[M.TAG_GIT_COMMIT]
    losses = _losses(c, run.info.run_id)
    assert len(losses) == 30 and sum(losses[-5:]) < sum(losses[:5]) - 2.5
    for key in (M.VAL_LOSS, M.copy_loss(16), M.task_accuracy("mqar", 64), M.cache_bytes_at(32768),
                M.TRAIN_THROUGHPUT, M.SYS_CPU_PERCENT, M.SYS_RSS_BYTES):
        assert key in run.data.metrics, key
    assert run.data.metrics[M.VAL_LOSS] == pytest.approx(results[M.VAL_LOSS])
    artifacts = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {M.ARTIFACT_CONFIG, M.ARTIFACT_RESULTS, M.ARTIFACT_METRICS} <= artifacts
    assert RunDir(tmp_path / "run").status()["status"] == "FINISHED"


def test_two_ddp_workers_on_gloo(train_dataset: Path, mlflow_server: str, ray_local, tmp_path: Path) -> None:
    cfg = _cfg(train_dataset, mlflow_server, "ray.workers=2", "train.steps=16", "eval.tasks=[]")
    fit(cfg, run_dir=tmp_path / "run")
    c, run = _run(mlflow_server, tmp_path / "run")
    assert run.info.status == "FINISHED"
    losses = _losses(c, run.info.run_id)
    assert len(losses) == 16 and sum(losses[-4:]) < sum(losses[:4]) - 1.0
    tokens = c.get_metric_history(run.info.run_id, M.TRAIN_TOKENS)
    assert max(m.value for m in tokens) == 16 * 2 * 4 * 32  # two ranks' batches per step
    assert M.VAL_LOSS in run.data.metrics
    # `rattention eval RUN` finds the final checkpoint in Ray Train's storage inside the run folder
    cfg_back, _, state = load_model(tmp_path / "run")
    assert state["step"] == 16 and cfg_back.model == cfg.model


def test_import_run_reproduces_run_folder(train_dataset: Path, mlflow_server: str, tmp_path: Path) -> None:
    cfg = _cfg(train_dataset, mlflow_server, "train.steps=6", "eval.tasks=[]")
    lifecycle.run(cfg, tmp_path / "run", progress=False)
    run_id = import_run(tmp_path / "run", mlflow_server, "test-import")
    c = MlflowClient(mlflow_server)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags[M.TAG_SOURCE] == "import"
    assert run.data.params["train.steps"] == "6"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    history = {m.step: m.value for m in c.get_metric_history(run_id, M.TRAIN_LOSS)}
    assert history == {r["step"]: pytest.approx(r[M.TRAIN_LOSS]) for r in rows}
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert run.data.metrics[M.VAL_LOSS] == pytest.approx(results[M.VAL_LOSS])
    assert M.ARTIFACT_RESULTS in {a.path for a in c.list_artifacts(run_id)}
    assert import_run(tmp_path / "run", mlflow_server, "test-import") == run_id  # a second import is a no-op


def test_tracking_uri_resolution(mlflow_server: str, tmp_path: Path, monkeypatch) -> None:
    with tracking_uri(mlflow_server, tmp_path / "unused") as uri:
        assert uri == mlflow_server  # the config wins
    with pytest.raises(ConfigError, match=r"^tracking.uri: no MLflow server answers at http://127.0.0.1:9"), \
            tracking_uri("http://127.0.0.1:9", tmp_path):
        pass  # a dead server is refused before any compute
    with pytest.raises(ConfigError, match=r"^tracking.uri: 'not a uri' is not a tracking URI"), \
            tracking_uri("not a uri", tmp_path):
        pass
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    with tracking_uri(None, tmp_path / "unused") as uri:
        assert uri == mlflow_server
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    (tmp_path / SERVER_FILE).write_text(json.dumps({"uri": mlflow_server, "pid": -1}))
    with tracking_uri(None, tmp_path) as uri:
        assert uri == mlflow_server  # a live server found in the folder is reused, not restarted
    assert (tmp_path / SERVER_FILE).is_file()


