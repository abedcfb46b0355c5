"""How a sweep's trials run: a runner starts a trial and waits for one to finish; the driver does the rest.

``RayRunner``: each trial a Ray task with the spec's resources, ``parallel`` at once, tracked in MLflow.
``LocalRunner`` (``rattention sweep --runner local``): each trial a subprocess on this machine that runs
the in-process lifecycle with no tracker (a run folder only, as ``rattention train --no-ray`` without a
tracking URI), one after another, or one per GPU (``CUDA_VISIBLE_DEVICES``) with ``gpus`` > 1. It imports
neither Ray nor MLflow, so it runs on a GPU box that holds torch and triton and none of the orchestration
stack; ``rattention import-sweep`` logs the sweep's folder into MLflow afterwards.

Either way a trial is ``run_trial``: the same config gives the same run folder (its name is a hash of the
config, data and code), so a trial started again finds its results or resumes from its checkpoint.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

ROOT = Path(__file__).resolve().parent.parent
STOP_WAIT_S = 30.0  # on Ctrl-C, how long a trial subprocess gets to mark its run KILLED before SIGKILL
POLL_S = 0.1


def run_trial(config: dict[str, Any], uri: str | None, experiment: str, tags: dict[str, str]) -> dict[str, Any]:
    """One trial, in this process: the lifecycle, tracked in MLflow at ``uri`` (None: its run folder only).
    Returns its results with the run's id and folder (and MLflow run); a trial that fails returns its reason."""
    from rattention import lifecycle
    from rattention.run_config import parse_run_config

    tracker = None
    if uri is not None:
        from pipelines.tracking import MlflowTracker

        tracker = MlflowTracker(uri, experiment)
    cfg = parse_run_config(config)
    rd = lifecycle.locate(cfg)
    before = int(rd.meta().get("starts", 0)) if rd.exists() else 0
    results, error = {}, None
    try:
        results = lifecycle.run(cfg, tracker=tracker, tags=tags, progress=False)
    except Exception as err:  # noqa: BLE001 - the trial FAILs with its reason; its run is marked FAILED
        error = lifecycle.first_line(err) or type(err).__name__
    meta = rd.meta() if rd.exists() else {}
    return {"results": results, "error": error, "run_id": meta.get("run_id"), "run_dir": str(rd.path.resolve()),
            "mlflow_run_id": meta.get("mlflow_run_id"), "trained": int(meta.get("starts", 0)) > before,
            "tracking_incomplete": meta.get(lifecycle.TRACKING_INCOMPLETE)}


@dataclass
class Outcome:
    """What came back of a trial: ``run_trial``'s dict, or why nothing did. ``died``: its process died (the
    run folder it leaves may still say RUNNING)."""

    result: dict[str, Any] | None = None
    error: str | None = None
    died: bool = False


class Runner(Protocol):
    """Starts trials and waits for them; ``slots`` trials at most run at once."""

    name: str
    slots: int

    def start(self, label: str, config: dict[str, Any], tags: dict[str, str]) -> Any:
        """Start one trial; return its handle."""
        ...

    def wait(self, handles: list[Any]) -> list[tuple[Any, Outcome]]:
        """Block until at least one of ``handles`` has finished; return those with their outcomes."""
        ...

    def stop(self, handles: list[Any]) -> None:
        """Ctrl-C: stop the running trials (their folders are then marked KILLED by the driver)."""
        ...


# ----- Ray ------------------------------------------------------------------------------------------------

class RayRunner:
    """Trials as Ray tasks with the spec's resources; a worker that dies is retried once by Ray."""

    name = "ray"

    def __init__(self, spec: Any, uri: str):
        self.spec, self.uri = spec, uri
        self.slots = spec.parallel

    def start(self, label: str, config: dict[str, Any], tags: dict[str, str]) -> Any:
        import ray

        task = ray.remote(run_trial).options(
            num_cpus=self.spec.resources.cpus, num_gpus=self.spec.resources.gpus, max_retries=1,
            retry_exceptions=False, name=label)
        return task.remote(config, self.uri, self.spec.name, tags)

    def wait(self, handles: list[Any]) -> list[tuple[Any, Outcome]]:
        import ray

        ready, _ = ray.wait(list(handles), num_returns=1)
        return [(ref, self._outcome(ref)) for ref in ready]

    @staticmethod
    def _outcome(ref: Any) -> Outcome:
        import ray

        from rattention.lifecycle import first_line

        try:
            return Outcome(result=ray.get(ref))
        except ray.exceptions.RayTaskError as err:
            return Outcome(error=first_line(err.cause if isinstance(err.cause, BaseException) else err))
        except ray.exceptions.RayError as err:  # the worker died (after Ray's retry), ran out of memory, ...
            return Outcome(error=f"the trial's worker died ({type(err).__name__}: {first_line(err)})", died=True)

    def stop(self, handles: list[Any]) -> None:
        """Nothing to do: the workers end with this driver's job. Not ``ray.cancel``: with a reply in flight,
        Ray 2.60's core worker can abort the driver on a failed check ("Tried to complete task that was not
        pending"), seen twice under load."""


# ----- subprocesses on this machine ------------------------------------------------------------------------

@dataclass(eq=False)  # a handle: hashed by identity
class _Proc:
    """One trial subprocess: its files under ``<sweep>/local/`` and the GPU it was given."""

    label: str
    proc: subprocess.Popen
    result: Path
    stderr: Path
    gpu: int | None
    files: list[Any] = field(default_factory=list)


class LocalRunner:
    """Trials as subprocesses of this process (``python -m sweeps.runner TRIAL.json``), each running the
    in-process lifecycle with no tracker: one at a time, or with ``gpus`` >= 1 one per GPU, each seeing only
    its own (``CUDA_VISIBLE_DEVICES``). A subprocess that dies is a FAIL with the last line of its stderr;
    a subprocess outlives this one by nothing (it is killed when this process dies)."""

    name = "local"

    def __init__(self, folder: str | Path, gpus: int = 0):
        self.folder = Path(folder) / "local"  # each trial's input, result and stdout/stderr
        self.gpus = gpus
        self.slots = max(1, gpus)
        self._busy: set[int] = set()

    def start(self, label: str, config: dict[str, Any], tags: dict[str, str]) -> _Proc:
        self.folder.mkdir(parents=True, exist_ok=True)
        base = self.folder / label
        trial, result = base.with_suffix(".json"), base.with_suffix(".result.json")
        result.unlink(missing_ok=True)  # a trial started again (its driver died) leaves none from before
        trial.write_text(json.dumps({"config": config, "tags": tags, "result": str(result.resolve())}))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p), "PYTHONUNBUFFERED": "1"}
        gpu = None
        if self.gpus >= 1:
            gpu = min(set(range(self.gpus)) - self._busy)
            self._busy.add(gpu)
            env["CUDA_VISIBLE_DEVICES"] = _visible(gpu)
        out = base.with_suffix(".stdout").open("wb")
        err_path = base.with_suffix(".stderr")
        err = err_path.open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "sweeps.runner", str(trial)], env=env, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=err, start_new_session=True, preexec_fn=_child_setup)
        return _Proc(label, proc, result, err_path, gpu, [out, err])

    def wait(self, handles: list[_Proc]) -> list[tuple[_Proc, Outcome]]:
        while True:
            done = [h for h in handles if h.proc.poll() is not None]
            if done:
                return [(h, self._outcome(h)) for h in done]
            time.sleep(POLL_S)

    def _outcome(self, h: _Proc) -> Outcome:
        self._release(h)
        if h.result.is_file():
            with contextlib.suppress(json.JSONDecodeError, OSError):
                return Outcome(result=json.loads(h.result.read_text()))
        code = h.proc.returncode
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        last = _last_line(h.stderr)
        return Outcome(error=f"the trial's process died ({how})" + (f": {last}" if last else ""), died=True)

    def _release(self, h: _Proc) -> None:
        for f in h.files:
            f.close()
        h.files.clear()
        if h.gpu is not None:
            self._busy.discard(h.gpu)

    def stop(self, handles: list[_Proc]) -> None:
        """Ctrl-C to each trial (its lifecycle marks the run KILLED), then SIGKILL for any still running
        after ``STOP_WAIT_S``."""
        for h in handles:
            with contextlib.suppress(ProcessLookupError):
                h.proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + STOP_WAIT_S
        for h in handles:
            try:
                h.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                h.proc.kill()
                h.proc.wait()
            self._release(h)


def _visible(gpu: int) -> str:
    """The device this trial sees: the ``gpu``-th of those this process was given, if it was given some."""
    given = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return given[gpu] if "CUDA_VISIBLE_DEVICES" in os.environ and gpu < len(given) else str(gpu)


_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None


def _child_setup() -> None:
    """In the trial subprocess before it starts (after fork: no imports here): Ctrl-C handled (a background
    shell ignores SIGINT, which a child would inherit), and on Linux killed when its driver dies, as Ray
    ends a dead driver's tasks."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _last_line(path: Path) -> str:
    """The last non-empty line of a text file (a subprocess's stderr), or ''."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - 8192))
            lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:500] if lines else ""


def main(argv: list[str] | None = None) -> int:
    """The trial subprocess: ``python -m sweeps.runner TRIAL.json`` runs the trial and writes its result."""
    args = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(args[0]).read_text())
    out = run_trial(spec["config"], None, "", spec["tags"])
    result = Path(spec["result"])
    tmp = result.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, default=str))
    os.replace(tmp, result)  # whole or absent: a driver never reads half a result
    return 0


if __name__ == "__main__":
    sys.exit(main())
