"""Log a run folder (``rattention.rundir``) into MLflow: ``rattention import-run DIR``.

Runs trained without Ray or a tracking server (air-gapped GPU machines) join the same experiments:
params are the flattened config, metrics keep their steps and wall-clock times, the config, metrics
and results files become artifacts, and the folder's status becomes the run's. Importing the same
folder twice is a no-op (the run is found by its ``rattention.run_id`` tag).

A run whose server stopped answering while it trained (its folder says so: ``tracking_incomplete`` in
``meta.json``), or whose MLflow run was left RUNNING, is completed in place: the metric rows the server
lacks are logged (none twice), then the results, the files and the folder's status.

``rattention import-sweep FOLDER`` does this for every trial folder of a sweep run without MLflow
(``rattention sweep --runner local``), under one parent run that carries what a sweep on Ray leaves on
its own: the spec as params, the sweep's tags and metrics, ``answer.json``, ``trials.csv`` and the rest.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

import yaml

from rattention import metrics as M
from rattention.errors import ConfigError, RattentionError
from rattention.lifecycle import TRACKING_INCOMPLETE
from rattention.run_config import flatten
from rattention.rundir import RunDir, write_csv


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


# ----- a sweep run without MLflow (``rattention sweep --runner local``) ---------------------------------------

SWEEP_FILE = "sweep.json"  # the sweep folder's record, as sweeps.driver writes it
SWEEP_FILES = ("trials.csv", "spec.yaml", "answer.json", "summary.md", "pareto_front.json")


def import_sweep(folder: str | Path, uri: str | None = None) -> dict[str, Any]:
    """Log the sweep folder ``folder`` into MLflow as one parent run (the spec as params, the sweep's tags,
    files and answer, as a sweep on Ray leaves it) with a child run per trial folder under ``runs/``
    (``import_run``: a folder imported before is not logged again). Importing again adds only what is new.
    Returns the parent run id, the experiment and the counts of trial runs."""
    from pipelines.tracking import check_uri, tracking_errors, tracking_uri

    folder = Path(folder)
    record = _sweep_record(folder)
    runs = sorted(p for p in (folder / "runs").glob("*") if RunDir(p).exists()) if (folder / "runs").is_dir() else []
    if not runs:
        raise ConfigError(f"SWEEP_FOLDER: {folder}: no trial run folders under runs/; the sweep trained nothing "
                          "to import")
    if uri:
        check_uri(uri, "--tracking-uri")
    server_dir = RunDir(runs[0]).config().tracking.server_dir
    with tracking_uri(uri, server_dir, check=not uri) as resolved:
        try:
            return _import_sweep(folder, record, runs, resolved)
        except tracking_errors() as err:
            first = next((ln for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
            raise RattentionError(f"{resolved}: the MLflow server stopped answering during the import of the sweep "
                                  f"{folder} ({first.strip()[:200]}); run the same command again to finish it") \
                from None


def _sweep_record(folder: Path) -> dict[str, Any]:
    """The sweep folder's record, checked: a sweep of the local runner with its files written."""
    if not folder.is_dir():
        raise ConfigError(f"SWEEP_FOLDER: {folder}: no such folder")
    path = folder / SWEEP_FILE
    if not path.is_file():
        raise ConfigError(f"SWEEP_FOLDER: {folder}: not a sweep folder (no {SWEEP_FILE}); give the folder "
                          "`rattention sweep` wrote, out_dir/NAME")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(f"SWEEP_FOLDER: {path}: not valid JSON") from None
    if record.get("runner", "ray") != "local":
        raise ConfigError(f"SWEEP_FOLDER: {folder}: a sweep run on Ray, tracked in MLflow as it ran (parent run "
                          f"{record.get('parent_run_id')} at {record.get('tracking_uri')}); nothing to import")
    for name in ("trials.csv", "spec.yaml"):
        if not (folder / name).is_file():
            raise ConfigError(f"SWEEP_FOLDER: {folder}: no {name} (a sweep writes it as it ends); run the sweep "
                              "again with --runner local --resume")
    return record


def _import_sweep(folder: Path, record: dict[str, Any], runs: list[Path], uri: str) -> dict[str, Any]:
    from pipelines import tracking

    spec = yaml.safe_load((folder / "spec.yaml").read_text())
    name = spec["name"]
    answer = json.loads((folder / "answer.json").read_text()) if (folder / "answer.json").is_file() else None
    # a sweep that did not finish is imported as it ended (a driver that died without a word: KILLED)
    status = "FINISHED" if answer is not None else record.get("status", "KILLED")
    status = status if status in ("FINISHED", "FAILED", "KILLED") else "KILLED"
    c = tracking.client(uri)
    exp_id = tracking.experiment_id(c, name)
    parent = _existing_parent(c, record.get("parent_run_id"), exp_id)
    metas = [RunDir(p).meta() for p in runs]
    if parent is None:
        tags = {M.TAG_STUDY: name, M.TAG_SWEEP_MODE: spec.get("mode", "minimal-window"), M.TAG_SOURCE: "import",
                M.TAG_RUN_DIR: str(folder.resolve())}
        created = [m["created"] for m in metas if m.get("created")]
        parent = c.create_run(exp_id, run_name=f"sweep-{name}", tags=tags,
                              start_time=int(1000 * min(created)) if created else None).info.run_id
        tracking.log_params(c, parent, flatten(spec))
    linked = {r.info.run_id for r in c.search_runs([exp_id], filter_string=f"tags.`{M.TAG_PARENT}` = '{parent}'",
                                                   max_results=50000)}
    by_folder_id: dict[str, tuple[str, Path]] = {}
    for path, meta in zip(runs, metas, strict=True):
        child = import_run(path, uri, name)
        c.set_tag(child, M.TAG_PARENT, parent)
        by_folder_id[meta.get("run_id", "")] = (child, path.resolve())
    # the sweep's files, now naming the MLflow runs (and the run folders where they are now)
    rows = _read_csv(folder / "trials.csv")
    for row in rows:
        if row.get("run_id") in by_folder_id:
            row["mlflow_run_id"], row["run_dir"] = by_folder_id[row["run_id"]][0], str(by_folder_id[row["run_id"]][1])
    write_csv(folder / "trials.csv", rows)
    if answer is not None:
        answer.update(parent_run_id=parent, experiment=name)
        (folder / "answer.json").write_text(json.dumps(answer, indent=2) + "\n")
    for f in SWEEP_FILES:
        tracking.log_artifact(c, parent, folder / f)
    if answer is not None:
        metrics = {M.SWEEP_TRIALS: float(len(rows)), M.SWEEP_WALL_S: float(answer.get("wall_s", 0.0))}
        for k in answer.get("kinds", []):
            if k.get("minimal") is not None:
                metrics[M.sweep_minimal_window(k["kind"])] = float(k["minimal"])
        tracking.log_metrics(c, parent, 0, metrics)
        c.set_tag(parent, M.TAG_SWEEP_ANSWER, str(answer.get("answer_line", ""))[:5000])
    ended = [RunDir(p).status().get("time") for p in runs]
    ended = [t for t in ended if t]
    c.set_terminated(parent, status=status, end_time=int(1000 * max(ended)) if ended else None)
    (folder / SWEEP_FILE).write_text(json.dumps({**record, "parent_run_id": parent, "tracking_uri": uri,
                                                 "needs_import": False, "imported": time.time()}, indent=2) + "\n")
    children = {child for child, _ in by_folder_id.values()}
    return {"parent_run_id": parent, "experiment": name, "status": status, "children": len(children),
            "imported": len(children - linked), "tracking_uri": uri}


def _existing_parent(c: Any, run_id: str | None, exp_id: str) -> str | None:
    """The parent run an earlier import made, when it is on this store (a local server's port may change)."""
    if not run_id:
        return None
    try:
        run = c.get_run(run_id)
    except Exception:  # noqa: BLE001 - not on this store (MLflow raises several kinds for that)
        return None
    ok = run.info.experiment_id == exp_id and run.info.lifecycle_stage == "active"
    return run.info.run_id if ok else None


def _read_csv(path: Path) -> list[dict[str, Any]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))
