"""One run's lifecycle, the same for a local process, torchrun ranks, Ray Train workers and sweep trials.

::

    open      the run's identity: a hash of its resolved config, its dataset's fingerprint and the
              code; its folder (found again when the same run is submitted twice); its tracker run
    execute   train, then evaluate: in this process (``InProcess``) or on workers (a ``Backend``,
              e.g. Ray Train in ``pipelines.train``), through ``train_and_evaluate``
    close     results logged, the status set: FINISHED, FAILED or KILLED

A finished run submitted again returns its results without training. An interrupted one resumes
from its last checkpoint, and the tracker run its dead process left RUNNING is marked KILLED. The
tracker (MLflow, in ``pipelines.tracking``) is injected, so this module needs neither Ray nor MLflow.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from rattention import metrics as M
from rattention.checkpoint import Checkpointer, LocalCheckpointer
from rattention.data import dataset_fingerprint, read_manifest, verify_dataset
from rattention.errors import ConfigError, DataError
from rattention.faults import Faults
from rattention.logger import Sink
from rattention.run_config import RayConfig, RunConfig, parse_run_config
from rattention.rundir import RunDir
from rattention.runtime import barrier, broadcast, init_distributed, pick_device, rank_world, say

_ROOT = Path(__file__).resolve().parent.parent
# OSErrors that mean the disk refused a write (full, read-only, no permission): one line naming the path
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR,
               errno.EFBIG}
CODE_PACKAGES = ("kernels", "rattention")  # the code that decides what a run computes
# meta.json key: why the tracker holds only part of this run (its server stopped answering); import-run clears it
TRACKING_INCOMPLETE = "tracking_incomplete"

# Fields that do not change what a run computes: where it is kept, tracked, scheduled and logged.
_NOT_IDENTITY = {
    "data": ("path", "verify_checksums"),  # the dataset's fingerprint stands for the path
    "train": ("out_dir", "run_name", "log_every", "checkpoint_every", "keep_checkpoints"),
    "tracking": ("uri", "experiment", "server_dir", "system_metrics"),
    "ray": tuple(RayConfig.model_fields),  # how many processes train is the identity's ``world``
}


# ----- identity ---------------------------------------------------------------------------------------

@functools.cache
def code_version() -> str:
    """A hash of the model and kernel sources (not of docs, tests or orchestration code)."""
    h = hashlib.sha256()
    for pkg in CODE_PACKAGES:
        for f in sorted((_ROOT / pkg).rglob("*.py")):
            h.update(str(f.relative_to(_ROOT)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def identity_config(cfg: RunConfig) -> dict[str, Any]:
    """The part of the config that decides the run's result."""
    d = cfg.to_dict()
    for section, names in _NOT_IDENTITY.items():
        for name in names:
            d[section].pop(name, None)
    return d


def run_identity(cfg: RunConfig, dataset: str, code: str | None = None, world: int = 1) -> str:
    """The run's id: a hash of what it computes. The same config, data, code and number of training
    processes give the same id, whether the run trains locally, under torchrun or on Ray Train."""
    blob = json.dumps({"config": identity_config(cfg), "dataset": dataset, "code": code or code_version(),
                       "world": world}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_name(cfg: RunConfig, run_id: str) -> str:
    """``train.run_name``, else ``<kind>[-w<window>]-s<seed>-<id[:8]>``."""
    if cfg.train.run_name:
        return cfg.train.run_name
    window = "" if cfg.model.kind == "full" else f"-w{cfg.model.window}"
    return f"{cfg.model.kind}{window}-s{cfg.train.seed}-{run_id[:8]}"


def locate(cfg: RunConfig, world: int = 1) -> RunDir:
    """The folder the run of ``cfg`` has (or will have) under ``train.out_dir``."""
    run_id = run_identity(cfg, dataset_fingerprint(cfg.data.path), world=world)
    return RunDir(Path(cfg.train.out_dir) / run_name(cfg, run_id))


def run_tags(cfg: RunConfig, dataset: str) -> dict[str, str]:
    """Tags every run carries: local kind, window, git commit, dataset fingerprint, code version."""
    from rattention.provenance import git_commit

    return {M.TAG_KIND: cfg.model.kind, M.TAG_WINDOW: str(cfg.model.window), M.TAG_GIT_COMMIT: git_commit(),
            M.TAG_DATASET: dataset, M.TAG_CODE: code_version()}


# ----- the parts that vary ------------------------------------------------------------------------------

class Tracker(Protocol):
    """Where a run is tracked besides its folder (MLflow, ``pipelines.tracking.MlflowTracker``).

    It travels to workers, so it holds only what pickles (a URI, an experiment name). A tracker whose
    server stops answering does not raise: it sets ``lost`` to the reason (``start`` returns None), and
    the lifecycle records in the run folder that the run is to be imported (``TRACKING_INCOMPLETE``).
    """

    uri: str
    lost: str | None

    def start(self, name: str, tags: dict[str, str], params: dict[str, Any]) -> str | None: ...

    def sink(self, run: str) -> Sink: ...

    def log_results(self, run: str, step: int, results: dict[str, Any]) -> None: ...

    def log_files(self, run: str, paths: list[Path]) -> None: ...

    def end(self, run: str, status: str) -> None: ...

    def close_stale(self, run: str, status: str = "KILLED") -> bool: ...


@dataclass
class RunHandle:
    """What the training side needs of an opened run; plain data, so it crosses to Ray workers."""

    config: dict[str, Any]
    run_dir: str
    run_id: str
    tracker: Tracker | None = None
    tracker_run: str | None = None
    faults: dict[str, Any] = field(default_factory=dict)
    stop_after: int | None = None
    progress: bool = True


class Backend(Protocol):
    """Runs ``train_and_evaluate`` somewhere and hands back (results, stopped_early)."""

    def prepare(self, cfg: RunConfig) -> None: ...

    def world_size(self, cfg: RunConfig) -> int: ...

    def execute(self, handle: RunHandle) -> tuple[dict[str, Any], bool]: ...


class InProcess:
    """Train in this process: alone, or as one rank of a torchrun group."""

    def prepare(self, cfg: RunConfig) -> None:
        init_distributed(pick_device(cfg.train.device))

    def world_size(self, cfg: RunConfig) -> int:
        return rank_world()[1]

    def execute(self, handle: RunHandle) -> tuple[dict[str, Any], bool]:
        return train_and_evaluate(handle)


# ----- the lifecycle ------------------------------------------------------------------------------------

def train_and_evaluate(handle: RunHandle, checkpointer: Checkpointer | None = None) -> tuple[dict[str, Any], bool]:
    """The body of a run, on every rank: train, then rank 0 evaluates, writes and logs the results.

    Returns (results, stopped_early); results are rank 0's (other ranks return the training figures).
    """
    from rattention.evaluate import evaluate
    from rattention.train import train

    cfg = parse_run_config(handle.config)
    rd = RunDir(handle.run_dir)
    rank, _ = rank_world()
    sinks: list[Sink] = []
    tracked: Any = None  # the tracker's sink
    if rank == 0:
        rd.record_start()
        sinks = [rd.log_metrics]
        if handle.tracker is not None and handle.tracker_run:
            tracked = handle.tracker.sink(handle.tracker_run)
            sinks.append(tracked)
    ckpt = checkpointer or LocalCheckpointer(rd.checkpoints, keep=cfg.train.keep_checkpoints)
    try:
        model, result = train(cfg, ckpt, sinks=sinks, stop_after=handle.stop_after, faults=Faults(**handle.faults),
                              progress=handle.progress)
    finally:
        if tracked is not None:
            if hasattr(tracked, "close"):
                tracked.close()  # the rows still queued for the server
            mark_untracked(rd, getattr(tracked, "lost", None))
    results: dict[str, Any] = {"step": result.step, "tokens": result.tokens, M.TRAIN_THROUGHPUT: result.tokens_per_s}
    if rank == 0 and not result.stopped_early:
        if cfg.eval.enabled:
            if handle.progress:
                say(f"evaluating at step {result.step}")
            results.update(evaluate(model, cfg, train_tokens_per_s=result.tokens_per_s,
                                    train_peak_memory=result.peak_memory_bytes))
        rd.write_results(results)
        if handle.tracker is not None and handle.tracker_run:
            handle.tracker.log_results(handle.tracker_run, result.step, results)
            mark_untracked(rd, handle.tracker.lost)
    return results, result.stopped_early


def mark_untracked(rd: RunDir, reason: str | None) -> None:
    """Record in the run folder that its tracker holds only part of it (``reason``: why), for import-run."""
    if reason is not None and not rd.meta().get(TRACKING_INCOMPLETE):
        rd.update_meta(**{TRACKING_INCOMPLETE: reason})


def check_data(cfg: RunConfig) -> None:
    """The run's dataset, checked before any compute (``rattention.data.verify_dataset``): the splits it
    trains and evaluates on hold documents, its tokenizer matches its manifest, and every shard is whole
    (read once against its sha256, token ids checked, unless ``data.verify_checksums`` is false)."""
    splits = [cfg.data.train_split]
    if cfg.eval.enabled and cfg.data.val_split != cfg.data.train_split:
        held = read_manifest(cfg.data.path).get("splits", {}).get(cfg.data.val_split) or {}
        if not held.get("shards"):
            raise ConfigError(f"eval.enabled: the run evaluates on split {cfg.data.val_split!r} of {cfg.data.path}, "
                              f"which has no documents; set eval.enabled=false or another data.val_split, or "
                              f"rebuild the dataset with more documents or a larger --val-fraction")
        splits.append(cfg.data.val_split)
    verify_dataset(cfg.data.path, splits, checksums=cfg.data.verify_checksums)


def preflight(cfg: RunConfig, run_dir: str | Path | None = None, local: bool = True) -> None:
    """What can be known wrong about a run before any tracking server, cluster or compute starts: one
    ConfigError line naming the field. ``local``: the run trains on this machine (no ``ray.address``), so
    its GPU asks are checked against this machine's GPUs."""
    import torch

    from rattention.train import check_vocab

    try:
        read_manifest(cfg.data.path)
    except DataError as err:
        raise ConfigError(f"data.path: {err}") from None
    check_vocab(cfg)
    for name, path in (("--run-dir", run_dir), ("train.out_dir", None if run_dir else cfg.train.out_dir)):
        if path is not None and Path(path).exists() and not Path(path).is_dir():
            raise ConfigError(f"{name}: {path} is a file, not a folder; choose another")
    if local and (cfg.train.device == "cuda" or cfg.ray.gpus_per_worker > 0) and not torch.cuda.is_available():
        name, asked = (("train.device", "cuda asked") if cfg.train.device == "cuda" else
                       ("ray.gpus_per_worker", f"{cfg.ray.gpus_per_worker:g} GPU per worker asked"))
        raise ConfigError(f"{name}: {asked}; this machine has no GPU (ask for none, or set ray.address "
                          "to join a cluster with GPUs)")


@dataclass
class Opened:
    handle: RunHandle
    finished: bool
    results: dict[str, Any]


def open_run(cfg: RunConfig, run_dir: str | Path | None, tracker: Tracker | None,
             tags: dict[str, str] | None = None, world: int = 1) -> Opened:
    """Identity, folder, tracker run (rank 0). A finished run comes back with its results."""
    dataset = dataset_fingerprint(cfg.data.path)  # a missing dataset stops here, before any compute
    run_id = run_identity(cfg, dataset, world=world)
    rd = RunDir(Path(run_dir) if run_dir is not None else Path(cfg.train.out_dir) / run_name(cfg, run_id))
    handle = RunHandle(config=cfg.to_dict(), run_dir=str(rd.path), run_id=run_id, tracker=tracker)
    if rd.exists():
        held = rd.meta().get("run_id")
        if held and held != run_id:
            raise ConfigError(f"{rd.path}: holds another run (id {held}; this config, data and code give "
                              f"{run_id}); choose another run folder or train.run_name")
        if rd.finished(run_id):
            stale = rd.meta().get("mlflow_run_id")
            # its process died after the folder said FINISHED and before MLflow was told: end the MLflow run
            # (its id is a UUID: on another server it is not found) and leave the rest to import-run
            if tracker is not None and stale and tracker.close_stale(stale, "FINISHED"):
                mark_untracked(rd, "its process ended before MLflow was told the run finished")
            return Opened(handle, True, rd.results())
        stale = rd.meta().get("mlflow_run_id")
        if tracker is not None and stale and rd.meta().get("tracking_uri") == tracker.uri:
            tracker.close_stale(stale)  # the process that owned it died, or was interrupted
    check_data(cfg)  # before the folder and the tracker run: a bad shard or tokenizer is one line, no run
    all_tags = {**run_tags(cfg, dataset), M.TAG_RUN_ID: run_id, M.TAG_RUN_DIR: str(rd.path.resolve()),
                **(tags or {})}
    rd.create(cfg, all_tags, run_id)
    if tracker is not None:
        handle.tracker_run = tracker.start(rd.path.name, all_tags, cfg.flat())
        if handle.tracker_run is not None:
            rd.update_meta(mlflow_run_id=handle.tracker_run, tracking_uri=tracker.uri)
            tracker.log_files(handle.tracker_run, [rd.config_path])
        mark_untracked(rd, tracker.lost)
    rd.set_status("RUNNING")
    return Opened(handle, False, {})


def close_run(handle: RunHandle, status: str, error: str | None = None, step: int | None = None) -> None:
    """Set the folder's status and end the tracker run (a preempted run stays RUNNING in its folder)."""
    rd = RunDir(handle.run_dir)
    try:
        rd.set_status(status, step=step, error=error)
    except OSError as err:  # a full or read-only disk: the folder keeps its last status, which claims nothing
        say(f"warning: {rd.path}: cannot record the status {status} ({err.strerror or err})")
    if handle.tracker is not None and handle.tracker_run:
        handle.tracker.log_files(handle.tracker_run, [rd.metrics_path, rd.results_path])
        handle.tracker.end(handle.tracker_run, status if status != "RUNNING" else "KILLED")
    if handle.tracker is not None:
        with contextlib.suppress(OSError):  # a full disk keeps the folder as it is
            mark_untracked(rd, handle.tracker.lost)
        if rd.meta().get(TRACKING_INCOMPLETE):
            say(f"warning: run {rd.path.name}: MLflow at {handle.tracker.uri} holds only part of it "
                f"({rd.meta()[TRACKING_INCOMPLETE]}); its folder has everything: `rattention import-run "
                f"{rd.path}` completes it once the server answers")


def run(cfg: RunConfig, run_dir: str | Path | None = None, tracker: Tracker | None = None,
        backend: Backend | None = None, tags: dict[str, str] | None = None, faults: Faults | None = None,
        stop_after: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Open, execute and close one run; return its results (those recorded, when it had finished).

    Raises what stopped it (TrainingError for a NaN loss, KeyboardInterrupt for Ctrl-C) after the
    status is set. Under torchrun every rank calls this; rank 0 alone writes and tracks.
    """
    backend = backend or InProcess()
    cfg = cfg.with_absolute_paths()  # the handle travels to workers that may run in another folder
    run_dir = None if run_dir is None else Path(run_dir).absolute()
    backend.prepare(cfg)  # e.g. join the Ray cluster: a dead address fails before anything is created
    rank, _ = rank_world()
    try:
        opened = open_run(cfg, run_dir, tracker, tags, backend.world_size(cfg)) if rank == 0 else None
    except OSError as err:
        failure = disk_error(err, run_dir or cfg.train.out_dir)
        if failure is err:
            raise
        raise failure from None
    opened = broadcast(opened)
    assert isinstance(opened, Opened)
    handle = opened.handle
    if opened.finished:
        if progress and rank == 0:
            say(f"run {Path(handle.run_dir).name}: finished before (id {handle.run_id}); its results, no training")
        return opened.results
    if progress and rank == 0:
        where = f", tracked as {handle.tracker_run} at {tracker.uri}" if tracker is not None else ""
        say(f"run {Path(handle.run_dir).name}: folder {handle.run_dir}{where}")
    barrier()
    handle.faults = (faults or Faults()).to_dict()
    handle.stop_after, handle.progress = stop_after, progress
    status, error, step = "FAILED", None, None
    try:
        results, stopped = backend.execute(handle)
        step = int(results["step"]) if "step" in results else None
        status = "RUNNING" if stopped else "FINISHED"
        return results
    except KeyboardInterrupt:
        status, error = "KILLED", "interrupted"
        raise
    except OSError as err:
        failure = disk_error(err, handle.run_dir)
        error = first_line(failure)
        if failure is err:
            raise
        raise failure from None
    except Exception as err:
        error = first_line(err)
        raise
    finally:
        if rank == 0:
            close_run(handle, status, error, step)


def disk_error(err: OSError, where: str | Path) -> Exception:
    """A disk that refused a write (full, read-only, not writable) as one DataError line naming the path;
    any other OSError (a network error, say) as it is."""
    if err.errno in DISK_ERRNOS:
        return DataError(f"{err.filename or where}: {err.strerror}")
    return err


def first_line(err: BaseException) -> str:
    """The line that names an error; Ray wraps a worker's exception, whose last line names the original."""
    lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
    if not lines:
        return type(err).__name__
    return (lines[-1] if "Traceback" in str(err) else lines[0])[:500]
