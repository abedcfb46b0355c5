"""Log a run folder (``rattention.rundir``) into MLflow: ``rattention import-run DIR``.

Runs trained without Ray or a tracking server (air-gapped GPU machines) join the same experiments:
params are the flattened config, metrics keep their steps and wall-clock times, the config, metrics
and results files become artifacts, and the folder's status becomes the run's. Importing the same
folder twice is a no-op (the run is found by its ``rattention.run_id`` tag).
"""

from __future__ import annotations

from pathlib import Path

from rattention import metrics as M
from rattention.rundir import RunDir


def import_run(run_dir: str | Path, uri: str | None = None, experiment: str | None = None) -> str:
    """Import ``run_dir``; return the MLflow run id (the existing one when already imported)."""
    from pipelines.tracking import tracking_uri

    rd = RunDir(run_dir)
    cfg = rd.config()
    with tracking_uri(uri or cfg.tracking.uri, cfg.tracking.server_dir) as resolved:
        return _import(rd, resolved, experiment or cfg.tracking.experiment)


def _import(rd: RunDir, uri: str, experiment: str) -> str:
    from pipelines import tracking

    cfg, meta, status = rd.config(), rd.meta(), rd.status()
    c = tracking.client(uri)
    exp_id = tracking.experiment_id(c, experiment)
    folder_id = meta.get("run_id", "")
    found = c.search_runs([exp_id], filter_string=f"tags.`{M.TAG_RUN_ID}` = '{folder_id}'", max_results=1)
    if folder_id and found:
        return found[0].info.run_id
    tags = {**meta.get("tags", {}), M.TAG_RUN_ID: folder_id, M.TAG_SOURCE: "import",
            M.TAG_RUN_DIR: str(rd.path.resolve())}
    rows = rd.metrics()
    start_ms = int(1000 * meta.get("created", rows[0]["time"] if rows else 0)) or None
    run = c.create_run(exp_id, run_name=rd.path.name, tags=tags, start_time=start_ms)
    run_id = run.info.run_id
    tracking.log_params(c, run_id, cfg.flat())
    for row in rows:
        tracking.log_metrics(c, run_id, int(row["step"]), {k: v for k, v in row.items() if k != "time"},
                             timestamp_ms=int(1000 * row["time"]))
    results = rd.results()
    if results:
        tracking.log_metrics(c, run_id, int(results.get("step", rows[-1]["step"] if rows else 0)), results)
    for path in (rd.config_path, rd.metrics_path, rd.results_path):
        tracking.log_artifact(c, run_id, path)
    state = status.get("status", "RUNNING")
    end_ms = int(1000 * status["time"]) if status.get("time") else None
    # A folder still marked RUNNING was left by a process that died without a word: KILLED.
    c.set_terminated(run_id, status=state if state in ("FINISHED", "FAILED", "KILLED") else "KILLED",
                     end_time=end_ms)
    return run_id
