"""Ray job: train one run on Ray Train, tracked in MLflow (``rattention train CONFIG.yaml [key=value ...]``).

The driver resolves the config, the tracking server (``pipelines.tracking``) and the run folder,
creates the MLflow run (params, tags, config artifact), and runs ``rattention.train.train`` in a
``TorchTrainer`` (gloo on CPU, NCCL on GPU). Checkpoints go through Ray Train at
``train.checkpoint_every``; with ``ray.max_failures`` a crashed worker group restarts from the last
one and the run ends at the same step. Rank 0 logs metrics to MLflow and the run folder, then
evaluates. ``ray.local_mode`` runs the loop in the driver process (Ray Train local mode), with
checkpoints in the run folder. The run ends FINISHED, FAILED (error, NaN loss) or KILLED (Ctrl-C).

Usable as ``ray job submit -- python -m pipelines.train CONFIG.yaml key=value ...``.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from rattention import metrics as M
from rattention.errors import RattentionError, TrainingError
from rattention.run_config import RunConfig, load_run_config, parse_run_config


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
    """One Ray Train worker: train, and on rank 0 log to MLflow and the run folder, then evaluate."""
    import ray.train

    from pipelines.tracking import MlflowSink, client, log_metrics
    from rattention.checkpoint import LocalCheckpointer
    from rattention.evaluate import evaluate
    from rattention.rundir import RunDir
    from rattention.train import Faults, train

    cfg = parse_run_config(config["run"])
    rank = ray.train.get_context().get_world_rank()
    rd = RunDir(config["run_dir"])
    uri, run_id = config["tracking_uri"], config["mlflow_run_id"]
    sinks = [rd.log_metrics, MlflowSink(uri, run_id)] if rank == 0 else []
    if config["local_mode"]:
        ckpt: Any = LocalCheckpointer(rd.checkpoints, keep=cfg.train.keep_checkpoints)
    else:
        ckpt = RayCheckpointer()
    try:
        model, result = train(cfg, ckpt, sinks=sinks, faults=Faults(**config.get("faults", {})))
    except TrainingError as err:  # every rank sees the same (all-reduced) loss: stop cleanly, no restart
        ray.train.report({"error": str(err)})
        return
    report: dict[str, Any] = {"step": result.step, "tokens": result.tokens, M.TRAIN_THROUGHPUT: result.tokens_per_s}
    if rank == 0:
        results: dict[str, Any] = dict(report)
        if cfg.eval.enabled:
            results.update(evaluate(model, cfg, train_tokens_per_s=result.tokens_per_s,
                                    train_peak_memory=result.peak_memory_bytes))
        rd.write_results(results)
        log_metrics(client(uri), run_id, result.step, results)
    ray.train.report(report)


def fit(cfg: RunConfig, config_path: str | Path | None = None, run_dir: str | Path | None = None,
        faults: dict[str, Any] | None = None, extra_tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cfg`` on Ray Train with MLflow tracking; return the results (raises on FAILED/KILLED).

    ``extra_tags`` go on the MLflow run, e.g. ``mlflow.parentRunId`` for a trial of a sweep.
    """
    from pipelines.tracking import tracking_uri

    with tracking_uri(cfg.tracking.uri, cfg.tracking.server_dir) as uri:
        return _fit(cfg, uri, config_path, run_dir, faults or {}, extra_tags or {})


def _fit(cfg: RunConfig, uri: str, config_path: str | Path | None, run_dir: str | Path | None,
         faults: dict[str, Any], extra_tags: dict[str, str]) -> dict[str, Any]:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines import tracking
    from pipelines.ray_utils import init_ray
    from rattention.rundir import RunDir
    from rattention.train import default_run_name, run_tags

    name = default_run_name(cfg)
    rd = RunDir(Path(run_dir or Path(cfg.train.out_dir) / name).resolve())
    tags = {**run_tags(cfg), M.TAG_SOURCE: "ray", M.TAG_RUN_DIR: str(rd.path), **extra_tags}
    rd.create(cfg, tags)
    tags[M.TAG_RUN_ID] = rd.meta()["run_id"]
    c = tracking.client(uri)
    run_id = tracking.start_run(c, cfg.tracking.experiment, name, tags, cfg.flat())
    rd.update_meta(mlflow_run_id=run_id, tracking_uri=uri)
    rd.set_status("RUNNING")
    tracking.log_artifact(c, run_id, rd.config_path)
    if config_path is not None:
        c.log_artifact(run_id, str(config_path), artifact_path="source")
    print(f"run {name}: folder {rd.path}, MLflow run {run_id} at {uri}", flush=True)
    status, error, step = "FAILED", None, None
    try:
        init_ray(cfg.ray.address, dashboard=True)
        gpu = cfg.ray.gpus_per_worker > 0
        resources = {"CPU": cfg.ray.cpus_per_worker, **({"GPU": cfg.ray.gpus_per_worker} if gpu else {})}
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"run": cfg.to_dict(), "run_dir": str(rd.path), "tracking_uri": uri,
                               "mlflow_run_id": run_id, "local_mode": cfg.ray.local_mode, "faults": faults},
            torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
            scaling_config=ray.train.ScalingConfig(
                num_workers=0 if cfg.ray.local_mode else cfg.ray.workers, use_gpu=gpu,
                resources_per_worker=None if cfg.ray.local_mode else resources),
            run_config=ray.train.RunConfig(
                name=name, storage_path=str(rd.ray_storage),
                failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints)),
        )
        try:
            result = _fit_interruptibly(trainer)
        except ray.train.TrainingFailedError as err:
            raise TrainingError(f"run {name}: Ray Train failed after {cfg.ray.max_failures} restarts: "
                                f"{_first_line(err)}") from None
        metrics = result.metrics or {}
        if metrics.get("error"):
            raise TrainingError(metrics["error"])
        step = metrics.get("step")
        results = rd.results()
        status = "FINISHED"
        tracking.log_artifact(c, run_id, rd.results_path)
        tracking.log_artifact(c, run_id, rd.metrics_path)
        return results
    except KeyboardInterrupt:
        status, error = "KILLED", "interrupted"
        raise
    except RattentionError as err:
        error = str(err)
        raise
    except Exception as err:
        error = _first_line(err)
        raise
    finally:
        rd.set_status(status, step=step, error=error)
        tracking.end_run(c, run_id, status)


def _fit_interruptibly(trainer: Any) -> Any:
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


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    # Ray wraps the worker's exception; its last line names the original error
    return (lines[-1] if lines else type(err).__name__)[:500]


def main(argv: list[str] | None = None) -> None:
    """``python -m pipelines.train CONFIG.yaml [key=value ...] [--run-dir DIR]``."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m pipelines.train", description=main.__doc__)
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--run-dir", default=None)
    args = ap.parse_args(argv)
    try:
        cfg = load_run_config(args.config, args.overrides)
        fit(cfg, args.config, args.run_dir)
    except RattentionError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: run marked KILLED", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
