"""``rattention sweep SPEC.yaml``: the minimal-window search and the Pareto study.

Every evaluated point is an Optuna trial in the study's storage (a journal file in the sweep folder,
or an RDB), driven through ask/tell: the point is enqueued, asked, run, and told its value (or FAIL
with the reason). Trials run as Ray tasks with the spec's resources, at most ``parallel`` at once, on
the local Ray or a cluster. Each trial is one run of ``rattention.lifecycle``: its folder is named by
the hash of its config, data and code, so a trial submitted again returns its finished results or
resumes from its checkpoint. That is what makes ``--resume`` after a killed driver re-run nothing
that finished. MLflow holds one experiment per study, a parent run per sweep and a child run per
trial.

Where there is no Ray (``--runner local``, ``sweeps.runner.LocalRunner``) the same search, study and run
folders come from trial subprocesses on this machine, one at a time or one per GPU, with no MLflow: the
sweep folder's record says it needs importing, and ``rattention import-sweep`` logs it as a parent run
with its child runs. The runner is all that differs: it starts a trial and waits for one to finish.

``minimal-window``: the full baseline over the seeds sets the bar (``sweeps.search.Bar``); then, for
each local kind side by side, a k-ary search on the grid (``sweeps.search.next_windows``) finds the
smallest window whose mean objective over the seeds passes it.
``pareto``: a multi-objective study (NSGA-II or TPE) over kind and window, against cache bytes or
training tokens/s; its answer is ``study.best_trials``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rattention import metrics as M
from rattention.errors import ConfigError, RattentionError
from rattention.lifecycle import first_line
from rattention.run_config import flatten
from rattention.rundir import write_csv
from sweeps.runner import LocalRunner, Outcome, RayRunner, Runner, run_trial  # noqa: F401 - run_trial: the trial
from sweeps.search import Bar, answer, next_windows, point_bound
from sweeps.spec import SweepSpec

BASELINE = "full"
RUNNERS = ("ray", "local")
SWEEP_FILE = "sweep.json"  # the sweep folder's record: runner, parent MLflow run (or needs_import), study
LOCK_FILE = "driver.lock"


def say(line: str) -> None:
    print(line, flush=True)


@dataclass
class Job:
    """One point to evaluate: a (kind, window, seed) trial."""

    kind: str
    window: int | None
    seed: int
    number: int | None = None  # its Optuna trial number, once asked
    skipped: bool = False  # not run: the trial budget ran out first
    value: float | None = None
    error: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        w = "" if self.window is None else f" w={self.window}"
        return f"{self.kind}{w} seed={self.seed}"


# ----- the study ---------------------------------------------------------------------------------------

class Study:
    """The Optuna study behind a sweep: points enqueued, asked, told; finished ones found again."""

    def __init__(self, spec: SweepSpec, resume: bool):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.spec = spec
        self.storage = _storage(spec)
        names = {s.study_name for s in optuna.get_all_study_summaries(self.storage)}
        exists = spec.name in names
        directions = [d for _, d in spec.objectives()]
        if exists and not resume and optuna.load_study(study_name=spec.name, storage=self.storage).trials:
            raise ConfigError(f"sweep {spec.name!r}: its study already has trials in {spec.storage_url()}; "
                              "pass --resume to continue it, or give the spec another name")
        sampler = self._sampler()
        self.study = optuna.create_study(study_name=spec.name, storage=self.storage, directions=directions,
                                         sampler=sampler, load_if_exists=True)
        if [d.name.lower() for d in self.study.directions] != directions:
            raise ConfigError(f"sweep {spec.name!r}: the stored study optimises "
                              f"{[d.name.lower() for d in self.study.directions]}, the spec {directions}")
        self.study.set_user_attr("mode", spec.mode)
        self.study.set_user_attr("objective", spec.objective.metric)

    def _sampler(self) -> Any:
        import optuna

        if self.spec.mode == "pareto":
            if self.spec.pareto.sampler == "tpe":
                return optuna.samplers.TPESampler(seed=0, multivariate=True)
            return optuna.samplers.NSGAIISampler(seed=0, population_size=max(2, self.spec.parallel))
        return optuna.samplers.RandomSampler(seed=0)  # every minimal-window point is enqueued: never sampled

    def distributions(self) -> dict[str, Any]:
        from optuna.distributions import CategoricalDistribution, IntDistribution

        grid = self.spec.windows()
        seeds = self.spec.seed_list()
        if self.spec.mode == "pareto":
            return {"kind": CategoricalDistribution(list(self.spec.kinds)), "window": CategoricalDistribution(grid)}
        return {"kind": CategoricalDistribution([BASELINE, *self.spec.kinds]),
                "window": IntDistribution(0, max(grid)),  # 0: the baseline, which has no window
                "seed": IntDistribution(min(seeds), max(seeds))}

    def trials(self) -> list[Any]:
        return self.study.get_trials(deepcopy=False)

    def count(self) -> int:
        return len(self.trials())

    def find(self, job: Job) -> Any | None:
        """The newest trial of this point, or None."""
        found = [t for t in self.trials() if t.user_attrs.get("kind") == job.kind
                 and t.user_attrs.get("window") == job.window and t.user_attrs.get("seed") == job.seed]
        return found[-1] if found else None

    def ask(self, job: Job) -> int:
        """Enqueue the point, ask for it, and label the trial with it; return the trial number."""
        params = {"kind": job.kind, "window": job.window or 0, "seed": job.seed}
        self.study.enqueue_trial(params, user_attrs={"kind": job.kind, "window": job.window, "seed": job.seed})
        trial = self.study.ask(self.distributions())
        return trial.number

    def ask_sampled(self, seed: int) -> Job:
        """Pareto mode: the sampler picks the kind and window."""
        trial = self.study.ask(self.distributions())
        job = Job(trial.params["kind"], int(trial.params["window"]), seed, number=trial.number)
        for k, v in (("kind", job.kind), ("window", job.window), ("seed", seed)):
            trial.set_user_attr(k, v)
        return job

    def _trial(self, number: int) -> Any:
        import optuna

        return optuna.trial.Trial(self.study, self.study._storage.get_trial_id_from_study_id_trial_number(
            self.study._study_id, number))

    def tell(self, job: Job, values: list[float] | None) -> None:
        import optuna

        assert job.number is not None
        trial = self._trial(job.number)
        for k in ("run_id", "mlflow_run_id", "run_dir"):
            if job.info.get(k):
                trial.set_user_attr(k, job.info[k])
        if values is None:
            trial.set_user_attr("fail_reason", job.error or "unknown")
            self.study.tell(job.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
        else:
            self.study.tell(job.number, values, skip_if_finished=True)


def _storage(spec: SweepSpec) -> Any:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    url = spec.storage_url()
    if "://" in url:
        return optuna.storages.RDBStorage(url)
    Path(url).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(url))


# ----- the sweep ---------------------------------------------------------------------------------------

@dataclass
class KindAnswer:
    kind: str
    minimal: int | None
    note: str
    points_used: int
    grid_size: int
    bound: int
    settled: bool
    non_monotone: list[tuple[int, int]]
    mean: float | None = None
    spread: float | None = None
    cache_bytes: float | None = None
    failures: list[str] = field(default_factory=list)


class Sweep:
    """One sweep: its study, its trials (through a runner), its MLflow parent run and its answer.

    ``uri`` None: no MLflow (the local runner); the sweep folder's record then says it needs importing."""

    def __init__(self, spec: SweepSpec, uri: str | None, data_path: str | None, resume: bool, progress: bool = True,
                 runner: Runner | None = None):
        self.spec, self.uri, self.data_path, self.progress = spec, uri, data_path, progress
        self.folder = spec.folder()
        self.runner: Runner = runner if runner is not None else RayRunner(spec, uri)
        self.study = Study(spec, resume)
        self.metric = spec.objective.metric
        self.t0 = time.perf_counter()
        self.done = 0
        self.trained = 0
        self.bound = spec.estimate()["trials"]  # trials at most, budget included
        self.untracked: list[str] = []  # trial folders MLflow holds only part of (its server stopped answering)
        self.parent = self._open_parent(resume)

    # ----- tracking ------------------------------------------------------------------------------------
    def _open_parent(self, resume: bool) -> str | None:
        record = self.folder / SWEEP_FILE
        if self.uri is None:  # no MLflow here: the record says so, and keeps an earlier import's parent run
            old = json.loads(record.read_text()) if resume and record.is_file() else {}
            keep = {k: old[k] for k in ("parent_run_id", "tracking_uri") if old.get(k)}
            _write_record(record, {"runner": self.runner.name, "needs_import": True, "study": self.spec.name,
                                   "storage": self.spec.storage_url(), "status": "RUNNING", **keep})
            return None
        from pipelines import tracking

        c = tracking.client(self.uri)
        if resume and record.is_file():
            old = json.loads(record.read_text()).get("parent_run_id")
            with contextlib.suppress(Exception):  # found only on the same store (a local server's port changes)
                c.get_run(old)
                c.update_run(old, status="RUNNING")
                return old
        tags = {M.TAG_STUDY: self.spec.name, M.TAG_SWEEP_MODE: self.spec.mode, M.TAG_SOURCE: "sweep"}
        parent = tracking.start_run(c, self.spec.name, f"sweep-{self.spec.name}", tags,
                                    flatten(self.spec.model_dump(mode="json")))
        _write_record(record, {"runner": self.runner.name, "parent_run_id": parent, "tracking_uri": self.uri,
                               "study": self.spec.name, "storage": self.spec.storage_url()})
        return parent

    def trial_tags(self, job: Job) -> dict[str, str]:
        """The trial run's sweep tags; without MLflow, the parent's is added by ``rattention import-sweep``."""
        parent = {M.TAG_PARENT: self.parent} if self.parent is not None else {}
        return {**parent, M.TAG_STUDY: self.spec.name, M.TAG_TRIAL: str(job.number), M.TAG_SOURCE: "sweep"}

    # ----- running trials ------------------------------------------------------------------------------
    def _same_run(self, job: Job, old: Any) -> bool:
        """Whether a recorded trial ran the run this point is now: the same content-addressed run folder (its
        name carries the hash of config, data and code). A spec, dataset or code that changed since makes it
        another run, never answered with the old record."""
        recorded = old.user_attrs.get("run_dir")
        if not recorded:
            return True  # nothing to compare (a trial whose worker died before its folder): the record stands
        from rattention.lifecycle import locate

        cfg = self.spec.trial_config(job.kind, job.window, job.seed, self.data_path, self.folder / "runs")
        same = Path(recorded).name == locate(cfg).path.name
        if not same and self.progress:
            say(f"trial {old.number} {job.label}: its config, data or code changed since it ran; training anew")
        return same

    def run_jobs(self, jobs: list[Job]) -> None:
        """Evaluate ``jobs`` through the runner, as many at once as it has slots; a point already told is not
        re-run."""
        queue: deque[Job] = deque()
        for job in jobs:
            old = self.study.find(job)
            if old is not None and not self._same_run(job, old):
                old = None  # the point's config, data or code changed since: a new trial, trained anew
            if old is not None and old.state.name in ("COMPLETE", "FAIL"):  # told before: its record stands
                job.number = old.number
                job.value = float(old.values[0]) if old.state.name == "COMPLETE" else None
                job.error = None if job.value is not None else old.user_attrs.get("fail_reason", "failed")
                job.info = {k: old.user_attrs.get(k) for k in ("run_id", "run_dir", "mlflow_run_id")}
                self._report(job, "recorded before")
                continue
            if old is not None and old.state.name == "RUNNING":
                job.number = old.number  # its driver died: run the same trial again (it resumes)
            queue.append(job)

        def next_job() -> Job | None:
            while queue:
                job = queue.popleft()
                if job.number is not None:
                    return job
                if self.over_budget():
                    job.skipped = True
                    continue
                job.number = self.study.ask(job)
                return job
            return None

        self._pump(next_job)

    def _pump(self, next_job: Callable[[], Job | None]) -> None:
        """Keep up to the runner's slots (``parallel`` on Ray) of trials in flight, taking each from
        ``next_job`` (None: no more), until all have finished; on Ctrl-C stop them and mark them KILLED."""
        in_flight: dict[Any, Job] = {}
        try:
            while True:
                while len(in_flight) < self.runner.slots and (job := next_job()) is not None:
                    cfg = self.spec.trial_config(job.kind, job.window, job.seed, self.data_path, self.folder / "runs")
                    in_flight[self.submit(job, cfg)] = job
                if not in_flight:
                    return
                for handle, outcome in self.runner.wait(list(in_flight)):
                    self._finish(in_flight.pop(handle), outcome)
        except KeyboardInterrupt:
            self._stop(in_flight)
            raise

    def _stop(self, in_flight: dict[Any, Job]) -> None:
        """Stop the running trials (the runner's way; Ray's workers end with this driver's job), then mark
        what they leave behind (run folder, MLflow run) KILLED."""
        self.runner.stop(list(in_flight))
        for job in in_flight.values():
            self._close_left_running(job, "KILLED", "interrupted")

    def _close_left_running(self, job: Job, status: str, error: str) -> Any:
        """The trial's run folder and MLflow run, when its process died and left them RUNNING: ``status``.
        Returns the run folder when there is one."""
        rd = None
        with contextlib.suppress(Exception):
            rd = self._trial_folder(job)
            if rd is None:
                return None
            if rd.status().get("status") == "RUNNING":
                rd.set_status(status, error=error)
            run = rd.meta().get("mlflow_run_id")
            if self.uri is not None and run:
                from pipelines import tracking

                if tracking.server_alive(self.uri):
                    c = tracking.client(self.uri)
                    with tracking.quick_retries():
                        if c.get_run(run).info.status == "RUNNING":
                            tracking.end_run(c, run, status)
        return rd if rd is not None and rd.exists() else None

    def _trial_folder(self, job: Job) -> Any:
        """The run folder of ``job``'s trial: where its config puts it, else the one tagged with its trial
        number (the name hashes the code, and a worker that started after a source edit hashed other code)."""
        from rattention import lifecycle
        from rattention.rundir import RunDir

        rd = lifecycle.locate(self.spec.trial_config(job.kind, job.window, job.seed, self.data_path,
                                                     self.folder / "runs"))
        if rd.exists() or job.number is None:
            return rd if rd.exists() else None
        tagged = [RunDir(p) for p in sorted((self.folder / "runs").glob("*")) if RunDir(p).exists()
                  and RunDir(p).meta().get("tags", {}).get(M.TAG_TRIAL) == str(job.number)
                  and RunDir(p).meta().get("tags", {}).get(M.TAG_STUDY) == self.spec.name]
        return max(tagged, key=lambda r: r.meta().get("created", 0)) if tagged else None

    def submit(self, job: Job, cfg: Any) -> Any:
        """Start the trial through the runner (on Ray: a task with the spec's resources, retried once if its
        worker dies; locally: a subprocess); return its handle."""
        label = f"trial-{job.number}-{job.kind}" + ("" if job.window is None else f"-w{job.window}") + f"-s{job.seed}"
        return self.runner.start(label, cfg.to_dict(), self.trial_tags(job))

    def over_budget(self) -> bool:
        return self.spec.budget is not None and self.study.count() >= self.spec.budget

    def _finish(self, job: Job, outcome: Outcome) -> None:
        out: dict[str, Any] = outcome.result or {}
        if outcome.result is None:
            job.error = outcome.error or "the trial returned nothing"
            rd = self._close_left_running(job, "FAILED", job.error) if outcome.died else None
            if rd is not None:  # its folder, for the record (and import-sweep)
                meta = rd.meta()
                job.info = {"run_id": meta.get("run_id"), "run_dir": str(rd.path.resolve()),
                            "mlflow_run_id": meta.get("mlflow_run_id")}
        else:
            job.info = {k: out[k] for k in ("run_id", "run_dir", "mlflow_run_id")}
            self.trained += int(out["trained"])
            if out.get("tracking_incomplete"):
                self.untracked.append(out["run_dir"])
            value = out["results"].get(self.metric)
            if out["error"]:
                job.error = out["error"]
            elif value is None or not math.isfinite(float(value)):
                job.error = f"{self.metric} is {value!r} in the trial's results"
            else:
                job.value = float(value)
        values = None
        if job.value is not None:
            values = [job.value]
            if self.spec.mode == "pareto":
                second = out["results"].get(self.spec.pareto.metric())
                if second is None or not math.isfinite(float(second)):
                    job.value, job.error, values = None, f"{self.spec.pareto.metric()} missing from results", None
                else:
                    values.append(float(second))
        self.study.tell(job, values)
        self._report(job, "trained" if out.get("trained") else ("finished before" if out else None))

    def _report(self, job: Job, how: str | None) -> None:
        self.done += 1
        if not self.progress:
            return
        what = f"{self.metric} = {job.value:.4f}" if job.value is not None else f"FAILED: {job.error}"
        extra = f" ({how})" if how in ("recorded before", "finished before") else ""
        say(f"[{time.perf_counter() - self.t0:6.0f} s] trial {job.number} {job.label}: {what}{extra}; "
            f"{self.done} done, at most {max(0, self.bound - self.done)} to go")

    # ----- minimal-window ------------------------------------------------------------------------------
    def baseline(self) -> Bar:
        jobs = [Job(BASELINE, None, s) for s in self.spec.seed_list()]
        self.run_jobs(jobs)
        failed = [j for j in jobs if j.value is None]
        if failed:
            raise RattentionError(f"baseline: {failed[0].label} failed ({failed[0].error}); the bar cannot be set, "
                                  "so no window is judged. Fix it and run again with --resume")
        return Bar.from_baseline([j.value for j in jobs], self.spec.tolerance.value, self.spec.tolerance.kind,
                                 self.spec.direction())

    def minimal_window(self) -> tuple[Bar, list[KindAnswer]]:
        bar = self.baseline()
        if self.progress:
            say(f"bar: {bar.rule(self.metric)}")
        grid = self.spec.windows()
        seeds = self.spec.seed_list()
        slots = max(1, self.spec.parallel // (len(seeds) * len(self.spec.kinds)))
        values: dict[str, dict[int, list[Job]]] = {k: {} for k in self.spec.kinds}
        observed: dict[str, dict[int, bool]] = {k: {} for k in self.spec.kinds}
        exhausted = False
        while True:
            rounds = {k: next_windows(grid, observed[k], slots) for k in self.spec.kinds}
            jobs = [Job(k, w, s) for k, ws in rounds.items() for w in ws for s in seeds]
            if not jobs or exhausted:
                break
            self.run_jobs(jobs)  # the kinds' rounds side by side
            for job in jobs:
                values[job.kind].setdefault(job.window, []).append(job)
            for k, ws in rounds.items():
                for w in ws:
                    point = values[k][w]
                    if any(j.skipped for j in point):
                        exhausted = True
                        continue
                    ok = all(j.value is not None for j in point) and bar.passes([j.value for j in point])
                    observed[k][w] = ok
        answers = [self._kind_answer(k, grid, observed[k], values[k]) for k in self.spec.kinds]
        return bar, answers

    def _kind_answer(self, kind: str, grid: list[int], observed: dict[int, bool],
                     values: dict[int, list[Job]]) -> KindAnswer:
        from rattention.cache import cache_bytes

        failures = [f"w={j.window} seed={j.seed}: {j.error} (counted as not passing)"
                    for jobs in values.values() for j in jobs if j.error]
        try:
            a = answer(grid, observed)
        except ValueError:
            return KindAnswer(kind, None, f"unsettled: trial budget ({self.spec.budget}) exhausted after "
                              f"{len(observed)} of {len(grid)} grid points", len(observed), len(grid),
                              point_bound(len(grid)), False, [], failures=failures)
        out = KindAnswer(kind, a.minimal, a.note, a.points_used, a.grid_size, a.bound, True, a.non_monotone,
                         failures=failures)
        if a.minimal is not None:
            vals = [j.value for j in values[a.minimal] if j.value is not None]
            out.mean, out.spread = statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)
            cfg = self.spec.trial_config(kind, a.minimal, self.spec.seed_list()[0], self.data_path)
            out.cache_bytes = float(cache_bytes(cfg.model, self.spec.pareto.context))
        return out

    # ----- pareto --------------------------------------------------------------------------------------
    def pareto(self) -> list[dict[str, Any]]:
        seed = self.spec.seed_list()[0]
        resumed = [t for t in self.study.trials() if t.state.name == "RUNNING"]
        queue = [Job(t.user_attrs["kind"], t.user_attrs["window"], seed, number=t.number) for t in resumed
                 if "kind" in t.user_attrs]
        finished = sum(1 for t in self.study.trials() if t.state.name in ("COMPLETE", "FAIL"))
        self.done = finished
        launched = self.done

        def next_job() -> Job | None:
            nonlocal launched
            if launched >= self.bound:
                return None
            launched += 1
            return queue.pop(0) if queue else self.study.ask_sampled(seed)

        self._pump(next_job)
        front = []
        for t in self.study.study.best_trials:
            front.append({"trial": t.number, "kind": t.user_attrs.get("kind"), "window": t.user_attrs.get("window"),
                          self.metric: t.values[0], self.spec.pareto.metric(): t.values[1],
                          "run_id": t.user_attrs.get("run_id")})
        return sorted(front, key=lambda r: (r["kind"], r["window"]))

    # ----- records -------------------------------------------------------------------------------------
    def trials_table(self) -> list[dict[str, Any]]:
        rows = []
        for t in sorted(self.study.trials(), key=lambda t: t.number):
            rows.append({"trial": t.number, "state": t.state.name, "kind": t.user_attrs.get("kind"),
                         "window": t.user_attrs.get("window"), "seed": t.user_attrs.get("seed"),
                         "value": t.values[0] if t.values else None,
                         "fail_reason": t.user_attrs.get("fail_reason"), "run_id": t.user_attrs.get("run_id"),
                         "mlflow_run_id": t.user_attrs.get("mlflow_run_id"), "run_dir": t.user_attrs.get("run_dir")})
        return rows

    def close(self, status: str, summary: dict[str, Any] | None) -> None:
        """Write the sweep's files (trials.csv, spec.yaml, answer.json, summary.md), then log them on the
        parent run and end it. A server that does not answer costs the MLflow side only: the files stay in
        the folder, one warning line says so, and ``--resume`` once it answers logs them (training
        nothing). Trial folders it holds only part of are imported then (``rattention import-run``).
        Without MLflow (the local runner) the folder's record keeps the status for ``rattention import-sweep``."""
        rows = self.trials_table()
        files = {"trials.csv": None, "spec.yaml": None}
        write_csv(self.folder / "trials.csv", rows)
        (self.folder / "spec.yaml").write_text(yaml.safe_dump(self.spec.model_dump(mode="json"), sort_keys=False))
        if summary is not None:
            (self.folder / "answer.json").write_text(json.dumps(summary, indent=2) + "\n")
            (self.folder / "summary.md").write_text(summary["table"] + "\n")
            files.update({"answer.json": None, "summary.md": None})
            if "pareto_front" in summary:
                (self.folder / "pareto_front.json").write_text(json.dumps(summary["pareto_front"], indent=2))
                files["pareto_front.json"] = None
        if self.uri is None:
            record = self.folder / SWEEP_FILE
            _write_record(record, {**json.loads(record.read_text()), "status": status, "needs_import": True})
            return
        from pipelines import tracking

        if not tracking.server_alive(self.uri):
            print(f"warning: MLflow at {self.uri} does not answer: the sweep's parent run {self.parent} is not "
                  f"updated; its files are in {self.folder}. Once the server answers, `rattention sweep SPEC "
                  "--resume` logs them and imports the trials' runs, training nothing", file=sys.stderr, flush=True)
            return
        c = tracking.client(self.uri)
        try:
            with tracking.quick_retries():  # /health answered: a server that dies now costs seconds
                self._import_untracked(rows)
                for name in files:
                    tracking.log_artifact(c, self.parent, self.folder / name)
                if summary is not None:
                    metrics = {M.SWEEP_TRIALS: float(len(rows)), M.SWEEP_WALL_S: time.perf_counter() - self.t0}
                    for k in summary.get("kinds", []):
                        if k["minimal"] is not None:
                            metrics[M.sweep_minimal_window(k["kind"])] = float(k["minimal"])
                    tracking.log_metrics(c, self.parent, 0, metrics)
                    c.set_tag(self.parent, M.TAG_SWEEP_ANSWER, summary["answer_line"][:5000])
                tracking.end_run(c, self.parent, status)
        except (*tracking.tracking_errors(), RattentionError) as err:
            print(f"warning: MLflow at {self.uri} stopped answering ({first_line(err)[:200]}): the sweep's parent "
                  f"run {self.parent} is not fully updated; its files are in {self.folder}", file=sys.stderr,
                  flush=True)

    def _import_untracked(self, rows: list[dict[str, Any]]) -> None:
        """Complete in MLflow the trial runs its server missed part of (``rattention import-run``)."""
        from pipelines.import_run import import_run
        from rattention import lifecycle
        from rattention.rundir import RunDir

        dirs = dict.fromkeys([*self.untracked, *(r["run_dir"] for r in rows if r.get("run_dir"))])
        for d in dirs:
            if RunDir(d).exists() and RunDir(d).meta().get(lifecycle.TRACKING_INCOMPLETE):
                import_run(d, self.uri, self.spec.name)


# ----- entry point -----------------------------------------------------------------------------------------

def sweep(spec: SweepSpec, address: str | None = None, resume: bool = False, dry_run: bool = False,
          progress: bool = True, runner: str = "ray", gpus: int | None = None,
          closing: bool = True) -> dict[str, Any]:
    """Run (or with ``dry_run`` only print) the sweep; return its summary (also ``answer.json``).
    ``closing``: end the progress output with the answer table and where the study and runs are (a caller
    that prints its own ending, the demo, turns it off).

    ``runner``: ``ray`` (trials as Ray tasks, everything in MLflow) or ``local`` (trial subprocesses on this
    machine, one at a time or one per GPU of ``gpus``; neither Ray nor MLflow is imported)."""
    check_flags(runner, address, gpus)
    if dry_run:
        text = plan(spec)
        print(text)
        return {"plan": text}
    if runner == "local":
        return _sweep_local(spec, resume, progress, gpus, closing)
    from pipelines.ray_utils import check_reachable, cluster_address, init_ray
    from pipelines.tracking import check_uri, tracking_uri
    from rattention.rundir import ensure_folder
    from sweeps.spec import check_cluster

    # Before anything is written or started: the server, the cluster, this machine's GPUs, the folder.
    base = spec.base_config()
    if address := cluster_address(address):
        check_reachable(address)
    elif spec.resources.gpus > 0:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"resources.gpus: trials ask for {spec.resources.gpus:g} GPU each; this machine has "
                              "no GPU (set resources.gpus=0, or --address to join a cluster with GPUs)")
    _check_out_dir(spec)
    if base.tracking.uri:
        check_uri(base.tracking.uri, "base config: tracking.uri")
    _check_runner(spec.folder(), "ray", resume)
    folder = ensure_folder(spec.folder(), "out_dir")
    with _driver_lock(folder), _study_lock(spec, folder), tracking_uri(base.tracking.uri, base.tracking.server_dir) \
            as uri:
        resources = init_ray(address, log_to_driver=False, logging_level="ERROR")
        check_cluster(spec, resources)
        data_path = build_data(spec, address)
        sw = Sweep(spec, uri, data_path, resume, progress)
        if progress:
            say(f"sweep {spec.name}: {spec.mode}, objective {sw.metric} ({spec.direction()}), "
                f"{len(spec.windows())} windows {spec.windows()}, seeds {spec.seed_list()}, {spec.parallel} "
                f"parallel on Ray ({resources.get('CPU', 0):.0f} CPUs); study {spec.storage_url()}; "
                f"MLflow {uri} experiment {spec.name!r}")
        return _drive(sw, closing)


def check_flags(runner: str, address: str | None, gpus: int | None) -> None:
    """Flags that contradict each other, refused in one line before anything is read or started."""
    if runner not in RUNNERS:
        raise ConfigError(f"--runner: must be one of {', '.join(RUNNERS)}, got {runner!r}")
    if runner == "local" and address is not None:
        raise ConfigError("--address: joins a Ray cluster, and --runner local runs the trials on this machine "
                          "without Ray; give one of the two")
    if runner == "ray" and gpus is not None:
        raise ConfigError("--gpus: goes with --runner local (one trial per GPU); on Ray each trial asks for the "
                          "spec's resources.gpus")
    if gpus is not None and gpus < 0:
        raise ConfigError(f"--gpus: must be >= 0, got {gpus}")


def _sweep_local(spec: SweepSpec, resume: bool, progress: bool, gpus: int | None,
                 closing: bool = True) -> dict[str, Any]:
    """``--runner local``: the sweep with trial subprocesses on this machine, no Ray and no MLflow."""
    from rattention.rundir import ensure_folder

    if spec.data is not None and spec.data.builder is not None:
        raise ConfigError(f"data.{spec.data.builder}: --runner local builds no dataset (that is a Ray job); build "
                          f"it where Ray runs (rattention data {spec.data.builder} ... --out DIR), bring it here and "
                          "give data={path: DIR}")
    n_gpus = _local_gpus(spec, gpus)
    _check_out_dir(spec)
    _check_runner(spec.folder(), "local", resume)
    folder = ensure_folder(spec.folder(), "out_dir")
    with _driver_lock(folder), _study_lock(spec, folder):
        sw = Sweep(spec, None, build_data(spec, None), resume, progress, runner=LocalRunner(folder, n_gpus))
        if progress:
            where = (f"one per GPU on {n_gpus} GPU{'s' if n_gpus > 1 else ''}" if n_gpus else "one at a time")
            say(f"sweep {spec.name}: {spec.mode}, objective {sw.metric} ({spec.direction()}), "
                f"{len(spec.windows())} windows {spec.windows()}, seeds {spec.seed_list()}; trials {where} in "
                f"subprocesses here (--runner local, no MLflow); study {spec.storage_url()}")
        return _drive(sw, closing)


def _drive(sw: Sweep, closing: bool = True) -> dict[str, Any]:
    """Run the sweep's search through its runner, then write (and log) its files; return its summary."""
    spec, folder = sw.spec, sw.folder
    status, summary = "FAILED", None
    try:
        if spec.mode == "pareto":
            front = sw.pareto()
            summary = summarise_pareto(sw, front)
        else:
            bar, answers = sw.minimal_window()
            summary = summarise(sw, bar, answers)
        summary.update(parent_run_id=sw.parent, experiment=spec.name, folder=str(folder),
                       untracked_runs=sw.untracked,  # trial folders MLflow missed part of
                       runner=sw.runner.name)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        sw.close(status, summary)
    if sw.progress and closing:
        say("\n" + summary["table"])
        if sw.uri is None:
            say(f"\nstudy {spec.storage_url()}; no MLflow here (--runner local): `rattention import-sweep "
                f"{folder}` logs the sweep into MLflow as one parent run with its trials' runs")
        else:
            say(f"\nstudy {spec.storage_url()}; MLflow parent run {sw.parent} in experiment {spec.name!r} at "
                f"{sw.uri}")
    return summary


def _check_out_dir(spec: SweepSpec) -> None:
    for parent in (Path(spec.out_dir), *Path(spec.out_dir).parents):
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"out_dir: {parent} is a file, not a folder; choose another")


def _local_gpus(spec: SweepSpec, gpus: int | None) -> int:
    """How many of this machine's GPUs the local runner spreads trials over (0: none asked for)."""
    asked = spec.resources.gpus
    if asked > 1:
        raise ConfigError(f"resources.gpus: --runner local gives each trial one GPU; the spec asks for {asked:g} "
                          "per trial (set resources.gpus=1)")
    if gpus == 0 and asked > 0:
        raise ConfigError(f"--gpus: 0 given, but the spec's trials ask for a GPU each (resources.gpus={asked:g}); "
                          "give --gpus N >= 1 or set resources.gpus=0")
    n = gpus if gpus is not None else (1 if asked > 0 else 0)
    if n > 0:
        import torch

        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n > have:
            seen = f" (CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']})" \
                if "CUDA_VISIBLE_DEVICES" in os.environ else ""
            field_name = "--gpus" if gpus is not None else "resources.gpus"
            raise ConfigError(f"{field_name}: {n} GPU{'s' if n > 1 else ''} asked for; this machine has {have}{seen}")
    return n


def _check_runner(folder: Path, runner: str, resume: bool) -> None:
    """``--resume`` continues a sweep with the runner it began with (a local sweep has no MLflow runs to join)."""
    record = folder / SWEEP_FILE
    if not (resume and record.is_file()):
        return
    held = json.loads(record.read_text()).get("runner", "ray")
    if held != runner:
        raise ConfigError(f"--runner: sweep {folder} ran with --runner {held}; resume it with --runner {held}")


def _write_record(path: Path, record: dict[str, Any]) -> None:
    """The sweep folder's record (``sweep.json``), whole or not at all."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


def build_data(spec: SweepSpec, address: str | None) -> str | None:
    """The trials' dataset: built into ``<sweep>/data`` when the spec says how (a no-op when up to date)."""
    if spec.data is None:
        return None
    if spec.data.path is not None:
        return spec.data.path
    out = spec.folder() / "data"
    import logging

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its per-operator progress lines, not ours
    if spec.data.prepare is not None:
        from pipelines.tokenize import make_config, prepare

        prepare(make_config(out=out, address=address, **spec.data.prepare))
    else:
        from pipelines.synth import make_config, synth

        synth(make_config(out=out, address=address, **spec.data.synth))
    return str(out.resolve())


def plan(spec: SweepSpec) -> str:
    """What a sweep would run: trials, their resources, and the cost, without running anything."""
    est = spec.estimate()
    grid = spec.windows()
    lines = [f"sweep {spec.name} ({spec.mode}): objective {spec.objective.metric} ({spec.direction()}), "
             f"tolerance {spec.tolerance.value:g} {spec.tolerance.kind}",
             f"  study: {spec.storage_url()}; folder {spec.folder()}"]
    seeds = spec.seed_list()
    if spec.mode == "minimal-window":
        lines.append(f"  baseline: full x seeds {seeds} = {len(seeds)} trials")
        for k in spec.kinds:
            lines.append(f"  {k}: grid {grid} ({len(grid)} points); k-ary search, at most "
                         f"{point_bound(len(grid))} points x {len(seeds)} seeds = "
                         f"{point_bound(len(grid)) * len(seeds)} trials")
    else:
        lines.append(f"  pareto: {spec.pareto.trials} trials ({spec.pareto.sampler}) over kinds {list(spec.kinds)} x "
                     f"windows {grid}, against {spec.pareto.metric()}")
    lines.append(f"  trials: at most {est['trials']}" + (f" (budget {spec.budget})" if spec.budget else "")
                 + f", {spec.parallel} at once, each {spec.resources.cpus:g} CPU / {spec.resources.gpus:g} GPU")
    lines.append(f"  cost: {est['train_tokens_per_trial']:,} training tokens per trial, "
                 f"{est['train_flops_per_trial']:.3g} FLOPs; at most {est['train_tokens_total']:,} tokens, "
                 f"{est['train_flops_total']:.3g} FLOPs in all")
    return "\n".join(lines)


def summarise(sw: Sweep, bar: Bar, answers: list[KindAnswer]) -> dict[str, Any]:
    """The answer of a minimal-window sweep, as a dict and a printed table."""
    from rattention.cache import cache_bytes

    spec = sw.spec
    ctx = spec.pareto.context
    full_cfg = spec.trial_config(BASELINE, None, spec.seed_list()[0], sw.data_path)
    full_cache = float(cache_bytes(full_cfg.model, ctx))
    wall = time.perf_counter() - sw.t0
    lines = [f"rule: {bar.rule(sw.metric)}", "",
             f"| kind | minimal window | {sw.metric} (mean ± spread) | cache@{ctx} vs full | grid points used |",
             "|---|---|---|---|---|",
             f"| full (baseline) | - | {bar.baseline_mean:.4f} ± {bar.baseline_spread:.4f} | 1.00x "
             f"({_size(full_cache)}) | {len(spec.seed_list())} seeds |"]
    for a in answers:
        win = str(a.minimal) if a.minimal is not None else ("none on the grid" if a.settled else "unsettled")
        val = f"{a.mean:.4f} ± {a.spread:.4f}" if a.mean is not None else "-"
        cache = f"{a.cache_bytes / full_cache:.3g}x ({_size(a.cache_bytes)})" if a.cache_bytes else "-"
        lines.append(f"| {a.kind} | {win} | {val} | {cache} | {a.points_used} of {a.grid_size} "
                     f"(bound {a.bound}) |")
    lines.append("")
    for a in answers:
        lines.append(f"{a.kind}: {a.note}")
        lines.extend(f"  {f}" for f in a.failures)
    lines.append(f"wall time {wall:.0f} s; {sw.done} trials, {sw.trained} trained now "
                 f"(the rest were finished before)")
    answer_line = "; ".join(f"{a.kind}: {a.minimal if a.minimal is not None else 'none'}" for a in answers)
    return {"mode": "minimal-window", "metric": sw.metric, "rule": bar.rule(sw.metric), "bar": asdict(bar),
            "kinds": [asdict(a) for a in answers], "wall_s": wall, "trials": sw.done, "trained": sw.trained,
            "cache_context": ctx, "full_cache_bytes": full_cache, "table": "\n".join(lines),
            "answer_line": answer_line}


def summarise_pareto(sw: Sweep, front: list[dict[str, Any]]) -> dict[str, Any]:
    other = sw.spec.pareto.metric()
    lines = [f"Pareto front of {sw.metric} against {other} ({len(front)} of {sw.done} trials):", "",
             f"| kind | window | {sw.metric} | {other} |", "|---|---|---|---|"]
    lines += [f"| {r['kind']} | {r['window']} | {r[sw.metric]:.4f} | {r[other]:,.0f} |" for r in front]
    wall = time.perf_counter() - sw.t0
    lines.append(f"\nwall time {wall:.0f} s; {sw.done} trials, {sw.trained} trained now")
    return {"mode": "pareto", "metric": sw.metric, "against": other, "pareto_front": front, "wall_s": wall,
            "trials": sw.done, "trained": sw.trained, "table": "\n".join(lines),
            "answer_line": "; ".join(f"{r['kind']} w={r['window']}" for r in front)}


def _size(n: float) -> str:
    """Bytes in the unit that keeps a small cache readable: 64.0 MiB, 12.5 KiB."""
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


# ----- helpers -----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _driver_lock(folder: Path) -> Iterator[None]:
    """One driver per sweep folder: a second one is refused at once (an OS lock, freed if the driver dies)."""
    with _os_lock(folder / LOCK_FILE, f"{folder}: another sweep driver (pid {{pid}}) is running this sweep; "
                  "wait for it, or stop it and pass --resume"):
        yield


@contextlib.contextmanager
def _study_lock(spec: SweepSpec, folder: Path) -> Iterator[None]:
    """One driver per study where its storage is a file (a journal, the default one in the sweep folder
    included, or a SQLite file), which another spec with another ``out_dir`` may name too: a second driver
    of the study, from any folder, is refused. A server RDB (PostgreSQL, MySQL) has no file to lock: two
    sweeps of one study there are the user's to keep apart."""
    url = spec.storage_url()
    path = Path(url.split(":///", 1)[1]) if url.startswith("sqlite:///") else spec.journal_path()
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with _os_lock(path.with_name(f"{path.name}.{spec.name}.{LOCK_FILE}"),
                  f"storage: study {spec.name!r} in {url} is being run by another sweep driver (pid {{pid}}, "
                  f"folder {{folder}}); wait for it, or stop it and pass --resume", folder):
        yield


@contextlib.contextmanager
def _os_lock(path: Path, refusal: str, folder: Path | None = None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` for the block (freed by the OS if the process dies); when
    another process holds it, a ConfigError of ``refusal`` with its pid (and folder) filled in."""
    f = path.open("a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid, _, held_by = f.read().strip().partition(" ")
        f.close()
        raise ConfigError(refusal.replace("{pid}", pid or "?").replace("{folder}", held_by or "?")) from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()} {folder.resolve() if folder is not None else ''}".strip())
    f.flush()
    try:
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()
