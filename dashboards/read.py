"""A finished sweep read back from MLflow: its parent run, its trial runs and its answer.

Only ``MlflowClient`` calls and ``rattention.metrics`` names: the parent run carries the spec as params,
the sweep tags and ``answer.json``; each trial is a child run (``mlflow.parentRunId``) tagged with its kind
and window, with ``train.seed`` among its params and its results as canonical metrics.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import statistics
import tempfile
from dataclasses import dataclass
from typing import Any

from rattention import metrics as M
from rattention.errors import ConfigError, RattentionError

# The report reads one small artifact; MLflow would draw a progress bar for it.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

BASELINE = "full"
ANSWER = "answer.json"
TRIALS = "trials.csv"
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class Trial:
    """One trial run: its point (kind, window, seed), its MLflow status and its canonical metrics."""

    run_id: str
    kind: str
    window: int | None  # None for the full baseline
    seed: int
    status: str
    metrics: dict[str, float]


@dataclass(frozen=True)
class Point:
    """One (kind, window) over its seeds' finished trials."""

    kind: str
    window: int | None
    trials: tuple[Trial, ...]

    def values(self, metric: str) -> list[float]:
        """The seeds' finite values of ``metric``, by seed."""
        return [t.metrics[metric] for t in self.trials if math.isfinite(t.metrics.get(metric, math.nan))]

    def mean(self, metric: str) -> float | None:
        xs = self.values(metric)
        return statistics.fmean(xs) if xs else None

    def spread(self, metric: str) -> float | None:
        """Sample standard deviation over seeds (ddof=1, as the sweep's bar), 0 for one seed."""
        xs = self.values(metric)
        return (statistics.stdev(xs) if len(xs) > 1 else 0.0) if xs else None

    @property
    def label(self) -> str:
        return self.kind if self.window is None else f"{self.kind} w={self.window}"


@dataclass(frozen=True)
class Sweep:
    """What the views need of one finished sweep."""

    run_id: str
    experiment: str
    name: str
    mode: str  # minimal-window or pareto
    metric: str  # the objective
    direction: str  # minimize or maximize
    kinds: tuple[str, ...]  # the local kinds searched
    seq_len: int | None  # the trials' training length
    context: int  # the context of the cache-bytes axis (the spec's pareto.context)
    bar: dict[str, Any] | None  # the answer's pass bar (minimal-window mode)
    rule: str | None
    minimal: dict[str, int | None]  # minimal window per kind (minimal-window mode)
    answer_line: str
    trials: tuple[Trial, ...]  # the finished trials, one per point and seed
    failed: tuple[Trial, ...]  # points whose trial never finished (FAILED or KILLED), by point and seed
    git_commit: str
    dataset: str

    def points(self, kind: str) -> list[Point]:
        """The kind's evaluated points, by window."""
        by: dict[int | None, list[Trial]] = {}
        for t in self.trials:
            if t.kind == kind:
                by.setdefault(t.window, []).append(t)
        return [Point(kind, w, tuple(sorted(ts, key=lambda t: t.seed))) for w, ts in
                sorted(by.items(), key=lambda kv: -1 if kv[0] is None else kv[0])]

    def baseline(self) -> Point | None:
        pts = self.points(BASELINE)
        return pts[0] if pts else None

    def all_kinds(self) -> list[str]:
        """The baseline (when evaluated) then the local kinds, in the spec's order."""
        return ([BASELINE] if self.baseline() is not None else []) + list(self.kinds)

    def metric_names(self) -> list[str]:
        """Every canonical metric some finished trial reports, sorted."""
        return sorted({m for t in self.trials for m in t.metrics})


# ----- finding the sweep --------------------------------------------------------------------------------

def find_sweep(client: Any, ref: str) -> str:
    """The parent run id of a finished sweep named by ``ref``: its parent run id, or an experiment name or
    id (its latest finished sweep). A one-line ``ConfigError`` when there is none."""
    where = f"on {client.tracking_uri}" if getattr(client, "tracking_uri", None) else ""
    if _RUN_ID.match(ref):
        run = _get_run(client, ref)
        if run is not None:
            check_sweep_run(run)
            return run.info.run_id
    exp = _get_experiment(client, ref)
    if exp is None:
        raise ConfigError(f"SWEEP_RUN_OR_EXPERIMENT: {ref!r} is neither a run id nor an experiment {where} "
                          "(give a sweep's parent run id, or the experiment name a sweep logged into)")
    sweeps = [r for r in _search(client, exp.experiment_id, None) if M.TAG_SWEEP_MODE in r.data.tags
              and M.TAG_PARENT not in r.data.tags]
    if not sweeps:
        raise ConfigError(f"SWEEP_RUN_OR_EXPERIMENT: experiment {exp.name!r} holds no sweep (no run tagged "
                          f"{M.TAG_SWEEP_MODE}); run `rattention sweep SPEC` into it first")
    finished = [r for r in sweeps if r.info.status == "FINISHED"]
    if not finished:
        counts = ", ".join(f"{sum(r.info.status == s for r in sweeps)} {s}"
                           for s in sorted({r.info.status for r in sweeps}))
        raise ConfigError(f"SWEEP_RUN_OR_EXPERIMENT: experiment {exp.name!r} has no finished sweep ({counts}); "
                          "finish one (rattention sweep SPEC --resume) and report again")
    latest = max(finished, key=lambda r: (r.info.start_time or 0, r.info.run_id))
    return latest.info.run_id


def check_sweep_run(run: Any) -> None:
    """A one-line ``ConfigError`` unless ``run`` is a finished sweep's parent run."""
    tags, rid = run.data.tags, run.info.run_id
    if M.TAG_PARENT in tags and M.TAG_SWEEP_MODE not in tags:
        raise ConfigError(f"SWEEP_RUN_OR_EXPERIMENT: run {rid} is a trial of the sweep run {tags[M.TAG_PARENT]}; "
                          "pass that run id (the sweep's parent run)")
    if M.TAG_SWEEP_MODE not in tags:
        raise ConfigError(f"SWEEP_RUN_OR_EXPERIMENT: run {rid} is not a sweep's parent run (no {M.TAG_SWEEP_MODE} "
                          "tag); pass the run id `rattention sweep` printed, or the sweep's experiment")
    status = run.info.status
    if status != "FINISHED":
        how = ("wait for it to finish" if status in ("RUNNING", "SCHEDULED")
               else "finish it with `rattention sweep SPEC --resume`")
        raise ConfigError(f"SWEEP_RUN_OR_EXPERIMENT: sweep run {rid} ({tags.get(M.TAG_STUDY, '?')}) is {status}, "
                          f"not FINISHED; {how}, then report")


# ----- loading it -------------------------------------------------------------------------------------------

def load_sweep(client: Any, run_id: str) -> Sweep:
    """Read the finished sweep whose parent run is ``run_id``."""
    parent = _get_run(client, run_id)
    if parent is None:
        raise ConfigError(f"SWEEP_RUN_OR_EXPERIMENT: no run {run_id!r} on {client.tracking_uri}")
    check_sweep_run(parent)
    params, tags = parent.data.params, parent.data.tags
    answer = _answer(client, run_id)
    metric = params.get("objective.metric") or answer.get("metric")
    if not metric or not M.is_canonical(metric):
        raise RattentionError(f"sweep run {run_id}: objective.metric param {metric!r} is not a canonical metric")
    direction = params.get("objective.direction")
    if direction not in ("minimize", "maximize"):
        direction = M.default_direction(metric)
    kinds = tuple(json.loads(params.get("kinds", "[]")) or [k["kind"] for k in answer.get("kinds", [])])
    children = _trial_runs(client, parent)
    trials, failed = _trials(children)
    if not trials:
        raise RattentionError(f"sweep run {run_id}: none of its trials has a finished run in this MLflow store "
                              f"({len(children)} trial runs found); report on the store the sweep logged into")
    seq_len = _common(children, "model.seq_len", params=True)
    minimal = {k["kind"]: k["minimal"] for k in answer.get("kinds", [])}
    return Sweep(
        run_id=run_id, experiment=client.get_experiment(parent.info.experiment_id).name,
        name=params.get("name") or tags.get(M.TAG_STUDY, run_id), mode=tags[M.TAG_SWEEP_MODE], metric=metric,
        direction=direction, kinds=kinds, seq_len=int(seq_len) if seq_len.isdigit() else None,
        context=int(params.get("pareto.context") or answer.get("cache_context") or 32768),
        bar=answer.get("bar"), rule=answer.get("rule"), minimal=minimal,
        answer_line=tags.get(M.TAG_SWEEP_ANSWER, answer.get("answer_line", "")), trials=trials, failed=failed,
        git_commit=_common(children, M.TAG_GIT_COMMIT), dataset=_common(children, M.TAG_DATASET))


def _answer(client: Any, run_id: str) -> dict[str, Any]:
    """The sweep's ``answer.json`` artifact (its bar, minimal windows and table)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, ANSWER, tmp)
        except Exception as err:  # noqa: BLE001 - MLflow raises several kinds for a missing artifact
            raise RattentionError(f"sweep run {run_id}: no {ANSWER} artifact ({_first(err)}); the sweep did not "
                                  "record its answer, run it again with --resume") from None
        with open(path) as f:
            return json.load(f)


def _trial_runs(client: Any, parent: Any) -> list[Any]:
    """The trial runs of a sweep: its child runs, and any run its ``trials.csv`` names that is another
    parent's child (a trial finished before, under an earlier parent run, is not trained or logged again)."""
    runs = _search(client, parent.info.experiment_id, f"tags.`{M.TAG_PARENT}` = '{parent.info.run_id}'")
    known = {r.info.run_id for r in runs}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(parent.info.run_id, TRIALS, tmp)
        except Exception:  # noqa: BLE001 - no trials.csv: the child runs are all there is
            return runs
        with open(path, newline="") as f:
            listed = sorted({row["mlflow_run_id"] for row in csv.DictReader(io.StringIO(f.read()))
                             if row.get("mlflow_run_id")} - known)
    for rid in listed:
        run = _get_run(client, rid)
        if run is not None:
            runs.append(run)
    return runs


def _trials(children: list[Any]) -> tuple[tuple[Trial, ...], tuple[Trial, ...]]:
    """The newest finished trial run of each (kind, window, seed), and the points that never finished."""
    newest: dict[tuple[str, int | None, int], tuple[tuple[int, str], Trial]] = {}
    unfinished: dict[tuple[str, int | None, int], tuple[tuple[int, str], Trial]] = {}
    for r in children:
        kind = r.data.tags.get(M.TAG_KIND)
        seed = r.data.params.get("train.seed")
        if kind is None or seed is None:
            continue
        window = None if kind == BASELINE else int(r.data.tags[M.TAG_WINDOW])
        metrics = {k: float(v) for k, v in r.data.metrics.items() if M.is_canonical(k)
                   and not k.startswith(("train/", "system/"))}
        t = Trial(r.info.run_id, kind, window, int(seed), r.info.status, metrics)
        key = (kind, window, int(seed))
        order = (r.info.start_time or 0, r.info.run_id)
        pick = newest if r.info.status == "FINISHED" else unfinished
        if key not in pick or order > pick[key][0]:
            pick[key] = (order, t)

    def sort_key(k: tuple[str, int | None, int]) -> tuple[str, int, int]:
        return (k[0], -1 if k[1] is None else k[1], k[2])

    finished = tuple(newest[k][1] for k in sorted(newest, key=sort_key))
    failed = tuple(unfinished[k][1] for k in sorted(unfinished, key=sort_key) if k not in newest)
    return finished, failed


def _common(children: list[Any], name: str, params: bool = False) -> str:
    """The one value of a tag (or param) over the finished trial runs; several are listed, sorted."""
    values = sorted({(r.data.params if params else r.data.tags).get(name, "") for r in children
                     if r.info.status == "FINISHED"} - {""})
    return ", ".join(values)


def _search(client: Any, experiment_id: str, filter_string: str | None) -> list[Any]:
    """Every active run of an experiment matching the filter, following MLflow's pages."""
    out, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string or "", max_results=1000,
                                  page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def _get_run(client: Any, run_id: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as err:
        if "RESOURCE_DOES_NOT_EXIST" in str(getattr(err, "error_code", "")) or "not found" in str(err).lower():
            return None
        raise RattentionError(f"MLflow at {client.tracking_uri}: {_first(err)}") from None


def _get_experiment(client: Any, ref: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(ref)
    if exp is None and ref.isdigit():
        try:
            exp = client.get_experiment(ref)
        except MlflowException:
            exp = None
    if exp is not None and exp.lifecycle_stage != "active":
        raise ConfigError(f"SWEEP_RUN_OR_EXPERIMENT: experiment {exp.name!r} is deleted in MLflow; restore it first")
    return exp


def _first(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
