"""Log a run folder (``rattention.rundir``) into MLflow: ``rattention import-run DIR``.

Runs trained without Ray or a tracking server (air-gapped GPU machines) join the same experiments:
params are the flattened config, metrics keep their steps and wall-clock times, the config, metrics
and results files become artifacts, and the folder's status becomes the run's. Importing the same
folder twice is a no-op (the run is found by its ``rattention.run_id`` tag).

A run whose server stopped answering while it trained (its folder says so: ``tracking_incomplete`` in
``meta.json``), or whose MLflow run was left RUNNING, is completed in place: the metric rows the server
lacks are logged (none twice), then the results, the files and the folder's status.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rattention import metrics as M
from rattention.errors import RattentionError
from rattention.lifecycle import TRACKING_INCOMPLETE
from rattention.rundir import RunDir


def import_run(run_dir: str | Path, uri: str | None = None, experiment: str | None = None) -> str:
    """Import ``run_dir``; return the MLflow run id (the existing one when already imported).

    A server that does not answer is one line naming it, before anything is sent; one that stops
    answering during the import is one line too, and the same command again finishes the import.
    """
    from pipelines.tracking import check_uri, quick_retries, tracking_errors, tracking_uri

    rd = RunDir(run_dir)
    cfg = rd.config()
    if uri:
        check_uri(uri, "--tracking-uri")
    elif cfg.tracking.uri:
        check_uri(cfg.tracking.uri, f"tracking.uri (of {rd.config_path}; or pass --tracking-uri)")
    with tracking_uri(uri or cfg.tracking.uri, cfg.tracking.server_dir, check=not (uri or cfg.tracking.uri)) \
            as resolved, quick_retries():
        try:
            return _import(rd, resolved, experiment or cfg.tracking.experiment)
        except tracking_errors() as err:
            first = next((ln for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
            raise RattentionError(f"{resolved}: the MLflow server stopped answering during the import of "
                                  f"{rd.path} ({first.strip()[:200]}); run the same command again to finish "
                                  "it") from None


def _import(rd: RunDir, uri: str, experiment: str) -> str:
    from pipelines import tracking

    meta = rd.meta()
    c = tracking.client(uri)
    exp_id = tracking.experiment_id(c, experiment)
    folder_id = meta.get("run_id", "")
    found = c.search_runs([exp_id], filter_string=f"tags.`{M.TAG_RUN_ID}` = '{folder_id}'", max_results=1) \
        if folder_id else []
    if found:
        run = found[0]
        if not meta.get(TRACKING_INCOMPLETE) and run.info.status != "RUNNING":
            return run.info.run_id  # imported (or tracked) whole before
        run_id = run.info.run_id
        if not run.data.params:
            tracking.log_params(c, run_id, rd.config().flat())
    else:
        tags = {**meta.get("tags", {}), M.TAG_RUN_ID: folder_id, M.TAG_SOURCE: "import",
                M.TAG_RUN_DIR: str(rd.path.resolve())}
        rows = rd.metrics()
        start_ms = int(1000 * meta.get("created", rows[0]["time"] if rows else 0)) or None
        run_id = c.create_run(exp_id, run_name=rd.path.name, tags=tags, start_time=start_ms).info.run_id
        tracking.log_params(c, run_id, rd.config().flat())
    _log_missing(c, run_id, rd, have_some=bool(found))
    status = rd.status()
    state = status.get("status", "RUNNING")
    end_ms = int(1000 * status["time"]) if status.get("time") else None
    # A folder still marked RUNNING was left by a process that died without a word: KILLED.
    c.set_terminated(run_id, status=state if state in ("FINISHED", "FAILED", "KILLED") else "KILLED",
                     end_time=end_ms)
    if meta.get(TRACKING_INCOMPLETE):
        fresh = rd.meta()
        fresh.pop(TRACKING_INCOMPLETE, None)
        rd.write_meta(fresh)
    return run_id


def _log_missing(c: Any, run_id: str, rd: RunDir, have_some: bool) -> None:
    """The folder's metric rows, results and files on ``run_id``; with ``have_some``, only the (metric,
    step) points the server does not hold yet, so a run completed after an outage has each step once."""
    from pipelines import tracking

    rows, results = rd.metrics(), rd.results()
    res_step = int(results.get("step", rows[-1]["step"] if rows else 0)) if results else 0
    keys = {k for r in rows for k in r if k not in ("step", "time")} | {k for k in results if k != "step"}
    held: dict[str, set[int]] = {}
    if have_some:
        held = {k: {m.step for m in c.get_metric_history(run_id, k)} for k in sorted(keys)}
    for row in rows:
        step = int(row["step"])
        todo = {k: v for k, v in row.items() if k not in ("step", "time") and step not in held.get(k, ())}
        if todo:
            tracking.log_metrics(c, run_id, step, todo, timestamp_ms=int(1000 * row["time"]))
    if results:
        tracking.log_metrics(c, run_id, res_step, {k: v for k, v in results.items()
                                                   if res_step not in held.get(k, ())})
    for path in (rd.config_path, rd.metrics_path, rd.results_path):
        tracking.log_artifact(c, run_id, path)

