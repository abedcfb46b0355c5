"""One lifecycle, three paths: ``train --no-ray`` in one process, the same under torchrun (2 ranks, gloo)
and on Ray Train give the same run folder layout and the same MLflow content."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from pipelines.train import fit
from rattention import metrics as M
from rattention.rundir import RunDir
from tests.conftest import tiny_run_config

ROOT = Path(__file__).resolve().parents[2]


def _content(c: MlflowClient, run_dir: Path) -> dict:
    run = c.get_run(RunDir(run_dir).meta()["mlflow_run_id"])
    files = {p.name for p in run_dir.iterdir()} - {"checkpoints", "ray"}  # where each path keeps checkpoints
    return {"status": run.info.status, "params": set(run.data.params), "metrics": set(run.data.metrics),
            "tags": {k for k in run.data.tags if k.startswith("rattention.")},
            "artifacts": {a.path for a in c.list_artifacts(run.info.run_id)}, "files": files}


def test_local_torchrun_and_ray_paths_agree(train_dataset: Path, mlflow_server: str, ray_local,
                                            tmp_path: Path) -> None:
    import ray

    cfg = tiny_run_config(train_dataset, "train.steps=6", "train.checkpoint_every=3", "eval.tasks=[]",
                          f"tracking.uri={mlflow_server}", "tracking.experiment=paths").to_dict()
    del cfg["model"]["nope_global"]
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg))
    # gloo on the loopback interface: the ranks find each other without the host's network
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "GLOO_SOCKET_IFNAME": "lo"}

    def ok(cmd: list[str]) -> None:
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, f"{' '.join(cmd[1:4])} exited {out.returncode}: {out.stderr[-3000:]}"

    ok([sys.executable, "-m", "rattention", "train", str(config), "--no-ray", "--run-dir", str(tmp_path / "local")])
    ok([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "rattention",
        "train", str(config), "--no-ray", "--run-dir", str(tmp_path / "torchrun")])
    from rattention.run_config import load_run_config

    fit(load_run_config(config), config, tmp_path / "ray", progress=False)
    c = MlflowClient(mlflow_server)
    local, torchrun, on_ray = (_content(c, tmp_path / p) for p in ("local", "torchrun", "ray"))
    assert local == torchrun == on_ray, (local, torchrun, on_ray)
    assert local["status"] == "FINISHED"
    assert {"config.yaml", "meta.json", "metrics.jsonl", "results.json", "status.json"} <= local["files"]
    assert {M.ARTIFACT_CONFIG, M.ARTIFACT_METRICS, M.ARTIFACT_RESULTS, "source"} <= local["artifacts"]
    assert {M.VAL_LOSS, M.TRAIN_LOSS} <= local["metrics"]
    sources = {c.get_run(RunDir(tmp_path / p).meta()["mlflow_run_id"]).data.tags[M.TAG_SOURCE]
               for p in ("local", "torchrun", "ray")}
    assert sources == {"local", "ray"}
    for p in ("local", "torchrun", "ray"):  # each kept a loadable final checkpoint
        assert RunDir(tmp_path / p).latest_checkpoint() is not None
    # two ranks saw twice the tokens per step; one process and Ray Train's one worker the same
    tokens = {p: RunDir(tmp_path / p).results()["tokens"] for p in ("local", "torchrun", "ray")}
    assert tokens["torchrun"] == 2 * tokens["local"] == 2 * tokens["ray"]
    # the Ray path submitted again finds its finished folder: no training, the same results
    again = fit(load_run_config(config), config, tmp_path / "ray", progress=False)
    assert again == RunDir(tmp_path / "ray").results() and RunDir(tmp_path / "ray").meta()["starts"] == 1
