"""Training on Ray Train, tracked in MLflow: the lifecycle's Ray backend (``rattention train CONFIG``).

``fit`` runs ``rattention.lifecycle.run`` with an MLflow tracker and ``RayTrain``: a ``TorchTrainer``
(gloo on CPU, NCCL on GPU) whose workers run the lifecycle's body, ``train_and_evaluate``.
Checkpoints go through Ray Train at ``train.checkpoint_every``; with ``ray.max_failures`` a crashed
worker group restarts from the last one and the run ends at the same step, in the same MLflow run. A
driver that was killed and starts again resumes from the newest checkpoint in the run folder. Results
reach the driver through Ray Train's reported metrics. ``ray.local_mode`` runs the loop in the
driver process (Ray Train local mode), with checkpoints in the run folder.

As a Ray job: ``ray job submit --working-dir . -- rattention train CONFIG.yaml key=value ...``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from rattention import metrics as M
from rattention.errors import RattentionError, TrainingError
from rattention.faults import Faults
from rattention.lifecycle import RunHandle, first_line, run, train_and_evaluate
from rattention.run_config import RunConfig
from rattention.rundir import RunDir

STOPPED = "lifecycle/stopped_early"  # a key of the final report, beside the results
ERROR = "lifecycle/error"


class RayCheckpointer:
    """Checkpoints through Ray Train: rank 0 writes ``state.pt`` into a folder and reports it."""

    def load_latest(self) -> dict[str, Any] | None:
        import ray.train

        from rattention.checkpoint import STATE_FILE, load_checkpoint

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as d:
            return load_checkpoint(Path(d) / STATE_FILE)

    def save(self, step: int, state: dict[str, Any] | None, metrics: dict[str, float]) -> None:
        import ray.train

        from rattention.checkpoint import STATE_FILE, save_checkpoint

        if state is None:
            ray.train.report(metrics)
            return
        folder = Path(tempfile.mkdtemp(prefix=f"rattention-step{step}-"))
        save_checkpoint(state, folder / STATE_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)))
        shutil.rmtree(folder, ignore_errors=True)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: the lifecycle's body, then its results as the final report.

    A user error (NaN loss, a bad value met in training) is reported, not raised: every rank sees the
    same error, and a restart would only repeat it.
    """
    import ray.train

    from rattention.checkpoint import LocalCheckpointer

    handle: RunHandle = config["handle"]
    if config["local_mode"]:
        ckpt: Any = LocalCheckpointer(RunDir(handle.run_dir).checkpoints,
                                      keep=handle.config["train"]["keep_checkpoints"])
    else:
        ckpt = RayCheckpointer()
    try:
        results, stopped = train_and_evaluate(handle, ckpt)
    except RattentionError as err:
        ray.train.report({ERROR: str(err)})
        return
    ray.train.report({**results, STOPPED: float(stopped)})


class RayTrain:
    """The lifecycle backend that trains on Ray Train workers (``ray`` section of the config)."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg

    def prepare(self, cfg: RunConfig) -> None:
        from pipelines.ray_utils import init_ray

        init_ray(cfg.ray.address, dashboard=True)  # a dead address is one line here, before the run opens

    def world_size(self, cfg: RunConfig) -> int:
        return 1 if cfg.ray.local_mode else cfg.ray.workers

    def execute(self, handle: RunHandle) -> tuple[dict[str, Any], bool]:
        import ray.train
        from ray.train.torch import TorchConfig, TorchTrainer

        cfg = self.cfg
        rd = RunDir(handle.run_dir)
        gpu = cfg.ray.gpus_per_worker > 0
        resources = {"CPU": cfg.ray.cpus_per_worker, **({"GPU": cfg.ray.gpus_per_worker} if gpu else {})}
        latest = rd.latest_checkpoint() if not cfg.ray.local_mode else None
        resume = ray.train.Checkpoint.from_directory(str(latest.parent)) \
            if latest is not None and latest.parent.parent.parent == rd.ray_storage else None
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"handle": handle, "local_mode": cfg.ray.local_mode},
            torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
            scaling_config=ray.train.ScalingConfig(
                num_workers=0 if cfg.ray.local_mode else cfg.ray.workers, use_gpu=gpu,
                resources_per_worker=None if cfg.ray.local_mode else resources),
            run_config=ray.train.RunConfig(
                name=rd.path.name, storage_path=str(rd.ray_storage.resolve()),
                failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints)),
            resume_from_checkpoint=resume,
        )
        try:
            result = fit_interruptibly(trainer)
        except ray.train.TrainingFailedError as err:
            raise TrainingError(f"run {rd.path.name}: Ray Train failed after {cfg.ray.max_failures} restarts: "
                                f"{first_line(err)}") from None
        metrics = dict(result.metrics or {})
        if metrics.get(ERROR):
            raise TrainingError(metrics[ERROR])
        stopped = bool(metrics.pop(STOPPED, 0.0))
        return {k: v for k, v in metrics.items() if not k.startswith("lifecycle/")}, stopped


def fit(cfg: RunConfig, config_path: str | Path | None = None, run_dir: str | Path | None = None,
        faults: dict[str, Any] | None = None, extra_tags: dict[str, str] | None = None,
        progress: bool = True) -> dict[str, Any]:
    """Run ``cfg`` on Ray Train with MLflow tracking; return the results (raises on FAILED/KILLED).

    ``extra_tags`` go on the MLflow run, e.g. ``mlflow.parentRunId`` for a child of a parent run.
    ``config_path`` is logged under ``source/`` beside the resolved config.
    """
    from pipelines.tracking import MlflowTracker, tracking_uri

    with tracking_uri(cfg.tracking.uri, cfg.tracking.server_dir) as uri:
        tracker = MlflowTracker(uri, cfg.tracking.experiment, source=config_path)
        return run(cfg, run_dir, tracker=tracker, backend=RayTrain(cfg),
                   tags={M.TAG_SOURCE: "ray", **(extra_tags or {})}, faults=Faults(**(faults or {})), progress=progress)


def fit_interruptibly(trainer: Any) -> Any:
    """``trainer.fit()``, with Ctrl-C raising KeyboardInterrupt here so the run is marked KILLED.

    Called from the main thread, Ray Train replaces the SIGINT handler with its own, which aborts the
    run and then exits the process (status 1, nothing marked). From another thread it leaves SIGINT
    alone; the main thread waits, and on Ctrl-C the job's driver exits, which ends its Ray Train actors.
    """
    import threading

    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["result"] = trainer.fit()
        except BaseException as err:  # handed to the main thread as it is
            out["error"] = err

    t = threading.Thread(target=target, name="ray-train-fit", daemon=True)
    t.start()
    while t.is_alive():
        t.join(0.2)
    if "error" in out:
        raise out["error"]
    return out["result"]
