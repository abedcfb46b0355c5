"""Fault injection: the MLflow server unreachable (issue 14, item 5).

Before any compute: a tracking URI where nothing answers, or where a server accepts connections and
never replies (a hung server), stops ``train``, ``sweep`` and ``import-run`` with one line naming the
URI, within seconds (MLflow's own retries would wait about four minutes).

Mid-run: a real MLflow server, in its own process group, is SIGKILLed (or SIGSTOPped: it hangs) while a
run trains (on Ray Train, and with ``--no-ray``) or while a sweep runs. The recovery expected: training
goes on to its planned step without stalling; every metric stays in the run folder, which records that
MLflow holds only part of the run; one warning line says so; the sweep's answer is still computed and
written. Once the server is back (on the same store), ``rattention import-run`` (or ``rattention sweep
--resume``) completes the MLflow runs: every step once, the results, the final status; nothing is lost.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipelines.tracking import SERVER_FILE, local_server
from rattention import lifecycle
from rattention import metrics as M
from rattention.rundir import RunDir
from tests.conftest import tiny_run_config, write_sweep_spec
from tests.reliability.faultkit import cli, one_error_line, record

DEAD = "http://127.0.0.1:9"  # the discard port: nothing listens


@contextlib.contextmanager
def hung_server() -> Iterator[str]:
    """A URI where connections are accepted (by the kernel's backlog) and nothing is ever answered."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def kill_server(store: Path, sig: int = signal.SIGKILL) -> None:
    """Signal the MLflow server recorded in ``store/server.json`` and every process of its group."""
    pid = json.loads((store / SERVER_FILE).read_text())["pid"]
    os.killpg(pid, sig)


def kill_when(condition, store: Path, timeout: float = 240.0, poll: float = 0.02,
              sig: int = signal.SIGKILL) -> threading.Thread:
    """A thread that signals ``store``'s server once ``condition()`` holds; it records when in ``.killed_at``."""
    def watch() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if condition():
                    kill_server(store, sig)
                    t.killed_at = time.time()  # type: ignore[attr-defined]
                    return
            time.sleep(poll)

    t = threading.Thread(target=watch, daemon=True)
    t.killed_at = None  # type: ignore[attr-defined]
    t.start()
    return t


def logged_step(run: Path, step: int):
    return lambda: any(r["step"] >= step for r in RunDir(run).metrics())


def max_step_gap(run: Path) -> float:
    """The longest wall-clock gap between consecutive logged steps: how long training stood still."""
    times = [r["time"] for r in RunDir(run).metrics()]
    return max(b - a for a, b in zip(times, times[1:], strict=False))


# ----- before any compute --------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["dead", "hung"])
def test_unreachable_server_is_one_line_before_compute(train_dataset, tmp_path, capsys, monkeypatch, how):
    """Fault: the tracking URI of ``train`` (Ray and --no-ray), of MLFLOW_TRACKING_URI, and of a sweep's base
    config has no server, or a server that never answers. Recovery: one line naming the URI and its field,
    exit 2, within seconds, and nothing created (no run or sweep folder, no Ray started)."""
    monkeypatch.chdir(tmp_path)
    with contextlib.ExitStack() as stack:
        uri = DEAD if how == "dead" else stack.enter_context(hung_server())
        cfg = tiny_run_config(train_dataset, "eval.enabled=false", f"train.out_dir={tmp_path / 'runs'}")
        (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
        worst = 0.0
        # a hung server costs the check's 5 s wait per command: the Ray path alone stands for train there
        for args in [["train", "run.yaml"], ["train", "run.yaml", "--no-ray"]][: 2 if how == "dead" else 1]:
            code, err, secs = cli(capsys, *args, f"tracking.uri={uri}")
            assert code == 2 and one_error_line(err).startswith(f"tracking.uri: no MLflow server answers at {uri}"), err
            worst = max(worst, secs)
            if how == "dead":
                monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
                code, err, secs = cli(capsys, *args)
                monkeypatch.delenv("MLFLOW_TRACKING_URI")
                assert code == 2 and one_error_line(err).startswith(f"MLFLOW_TRACKING_URI: no MLflow server answers "
                                                                    f"at {uri}"), err
                worst = max(worst, secs)
        spec = write_sweep_spec(tmp_path, train_dataset, uri, "gone")
        code, err, secs = cli(capsys, "sweep", str(spec))
        assert code == 2 and one_error_line(err) == (f"base config: tracking.uri: no MLflow server answers at {uri}; "
                                                     "start one or leave it unset for a local one"), err
        worst = max(worst, secs)
        assert not (tmp_path / "runs").exists() and not (tmp_path / "sweeps").exists()
        assert not (tmp_path / ".mlflow").exists()
    assert worst < 30, worst  # the check waits 5 s for /health at most, per command
    record(f"MLflow server {'down' if how == 'dead' else 'hung (accepts, never answers)'} before the run",
           "tracking.uri / MLFLOW_TRACKING_URI / a sweep's base config at "
           + ("a closed port" if how == "dead" else "a socket that never replies"),
           "one line naming the URI and field, exit 2, nothing created", True,
           "nothing: refused before any compute", worst,
           "seconds of the slowest command to its one-line error",
           f"test_unreachable_server_is_one_line_before_compute[{how}]")


@pytest.mark.parametrize("how", ["dead", "hung"])
def test_import_run_against_an_unreachable_server(train_dataset, tmp_path, capsys, how):
    """Fault: ``import-run`` pointed at a server that is down or never answers (was: silent for 251 s, then
    about 300 lines). Recovery: one line naming the URI within seconds; the folder is unchanged."""
    run = tmp_path / "run"
    lifecycle.run(tiny_run_config(train_dataset, "train.steps=4", "eval.enabled=false"), run, progress=False)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with contextlib.ExitStack() as stack:
        uri = DEAD if how == "dead" else stack.enter_context(hung_server())
        code, err, secs = cli(capsys, "import-run", str(run), "--tracking-uri", uri)
    assert code == 2 and one_error_line(err) == (f"--tracking-uri: no MLflow server answers at {uri}; start one or "
                                                 "leave it unset for a local one"), err
    assert secs < 15, secs
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    record(f"import-run against a {'down' if how == 'dead' else 'hung'} MLflow server",
           f"--tracking-uri at {'a closed port' if how == 'dead' else 'a socket that never replies'}",
           "one line naming the URI, exit 2; the run folder unchanged", True, "nothing", secs,
           "seconds to the one-line error", f"test_import_run_against_an_unreachable_server[{how}]")


# ----- the server goes away mid-run -------------------------------------------------------------------

def _assert_completed_by_import(c: MlflowClient, run_id: str, run: Path) -> None:
    """The MLflow run holds the whole folder: every logged step once, with the folder's values; the results;
    the folder's status."""
    rows = RunDir(run).metrics()
    history = c.get_metric_history(run_id, M.TRAIN_LOSS)
    assert sorted(m.step for m in history) == [r["step"] for r in rows]  # every step, once
    assert {m.step: m.value for m in history} == {r["step"]: pytest.approx(r[M.TRAIN_LOSS]) for r in rows}
    mlrun = c.get_run(run_id)
    assert mlrun.info.status == RunDir(run).status()["status"] == "FINISHED"
    assert mlrun.data.metrics[M.TRAIN_THROUGHPUT] == pytest.approx(RunDir(run).results()[M.TRAIN_THROUGHPUT])
    assert {M.ARTIFACT_CONFIG, M.ARTIFACT_METRICS, M.ARTIFACT_RESULTS} <= {a.path for a in c.list_artifacts(run_id)}
    assert lifecycle.TRACKING_INCOMPLETE not in RunDir(run).meta()


STEPS = 30
OUTAGES = {"ray": "SIGKILL", "no-ray": "SIGSTOP"}  # Ray Train: the server dies; --no-ray: it hangs


@pytest.mark.slow
@pytest.mark.parametrize("path", ["ray", "no-ray"])
def test_server_lost_mid_run(train_dataset, ray_local, tmp_path, capfd, path):
    """Fault: the MLflow server (a real one, in its own process group) goes away once the run has logged step
    3 of 30: SIGKILLed under a run on Ray Train (the tracker's sink in the worker, the tracker in the driver),
    SIGSTOPped (it hangs: connections accepted, nothing answered) under a ``--no-ray`` run in this process.
    Recovery: training goes on to step 30 without stalling (the sink sends from a thread and gives the server
    up when a request hangs and ``/health`` gets no answer); the run folder holds every step and records that
    MLflow holds only part of the run; one warning line. With the server back (restarted on the same store,
    or SIGCONT), ``rattention import-run`` completes the MLflow run: every step once, results, FINISHED."""
    store = tmp_path / "mlflow"
    run = tmp_path / "run"
    outage = OUTAGES[path]
    with local_server(store, reuse=False) as uri:
        cfg = tiny_run_config(train_dataset, f"train.steps={STEPS}", "train.checkpoint_every=10", "eval.enabled=false",
                              "ray.workers=1", f"tracking.uri={uri}", "tracking.experiment=lost-mid-run")
        pid = json.loads((store / SERVER_FILE).read_text())["pid"]
        killer = kill_when(logged_step(run, 3), store, sig=getattr(signal, outage))
        capfd.readouterr()
        try:
            if path == "ray":
                from pipelines.train import fit

                results = fit(cfg, run_dir=run, progress=False)
            else:
                from pipelines.tracking import MlflowTracker

                results = lifecycle.run(cfg, run, tracker=MlflowTracker(uri, cfg.tracking.experiment),
                                        progress=False)
            out, err = capfd.readouterr()
            killer.join(timeout=5)
            assert killer.killed_at is not None, "the outage never came: training ended before step 3"
            rd = RunDir(run)
            assert results["step"] == STEPS and rd.status()["status"] == "FINISHED"
            assert [r["step"] for r in rd.metrics()] == list(range(1, STEPS + 1))  # the folder has every step
            assert rd.meta()[lifecycle.TRACKING_INCOMPLETE]  # and knows that MLflow holds only part of it
            gap = max_step_gap(run)
            assert gap < 8.0, gap  # no step waited on the server (MLflow's own retries would wait minutes)
            assert f"{rd.path}` completes it once the server answers" in out + err
            if path == "no-ray":  # the sink's warning, once in this process, and the run's at its end
                assert (out + err).count("warning: MLflow at ") == 1, out + err
        finally:
            if outage == "SIGSTOP":
                os.killpg(pid, signal.SIGCONT)
        run_id = rd.meta()["mlflow_run_id"]
        with contextlib.ExitStack() as stack:  # the server back: the same one, or one on the same store
            back = uri if outage == "SIGSTOP" else stack.enter_context(local_server(store, reuse=False))
            c = MlflowClient(back)
            partial = c.get_metric_history(run_id, M.TRAIN_LOSS)
            assert c.get_run(run_id).info.status == "RUNNING" and len(partial) < STEPS  # MLflow holds a part
            code, err, secs = cli(capfd, "import-run", str(run), "--tracking-uri", back)
            assert code == 0, err
            _assert_completed_by_import(c, run_id, run)
            code, _, _ = cli(capfd, "import-run", str(run), "--tracking-uri", back)  # again: a no-op
            assert code == 0 and len(c.get_metric_history(run_id, M.TRAIN_LOSS)) == STEPS
    how = "Ray Train" if path == "ray" else "--no-ray"
    record(f"MLflow server {'killed' if outage == 'SIGKILL' else 'hung'} mid-run ({how})",
           f"{outage} to the server's process group after step 3 of {STEPS}",
           f"training goes on to step {STEPS}; the folder keeps every metric; import-run completes the MLflow run",
           True, f"nothing: {STEPS - len(partial)} steps missing from MLflow until import-run logged them; "
           f"training stood still at most {gap:.2f} s between steps", secs,
           "seconds of `rattention import-run` completing the MLflow run, once the server is back",
           f"test_server_lost_mid_run[{path}]")


@pytest.mark.slow
def test_server_killed_mid_sweep(train_dataset, ray_local, tmp_path, capfd):
    """Fault: the sweep's MLflow server is SIGKILLed once the baseline trial is told. Recovery: the sweep goes
    on and computes its answer (the same as with MLflow up: window 4, every window passing a 10-nat bar),
    written to answer.json, with one warning line; the trials trained after the kill keep everything in their
    folders. Once a server is back on the store, ``sweep --resume`` trains nothing, imports those trials'
    runs and ends the parent run: no MLflow run is left RUNNING."""
    from sweeps.driver import _storage, sweep
    from sweeps.spec import load_spec

    store = tmp_path / "mlflow"
    with local_server(store, reuse=False) as uri:
        path = write_sweep_spec(tmp_path, train_dataset, uri, "lost", kinds=["swa"], seeds=1, parallel=1)
        spec = load_spec(path)
        storage = _storage(spec)

        def baseline_told() -> bool:
            study = optuna.load_study(study_name="lost", storage=storage)
            return any(t.state.name == "COMPLETE" for t in study.trials)

        killer = kill_when(baseline_told, store, poll=0.1)
        capfd.readouterr()
        summary = sweep(spec, progress=False)
        _, err = capfd.readouterr()
        killer.join(timeout=5)
    assert killer.killed_at is not None
    folder = tmp_path / "sweeps" / "lost"
    assert summary["kinds"][0]["minimal"] == 4 and summary["kinds"][0]["settled"]
    assert json.loads((folder / "answer.json").read_text())["kinds"][0]["minimal"] == 4
    assert f"warning: MLflow at {uri} does not answer" in err, err
    untracked = summary["untracked_runs"]
    assert untracked and all(RunDir(d).meta()[lifecycle.TRACKING_INCOMPLETE] for d in untracked)
    assert all(RunDir(d).status()["status"] == "FINISHED" for d in untracked)
    starts = {p.name: RunDir(p).meta()["starts"] for p in (folder / "runs").iterdir()}
    with local_server(store, reuse=False) as back:
        t0 = time.perf_counter()
        resumed = sweep(load_spec(path, [f'overrides=["tracking.uri={back}"]']), resume=True, progress=False)
        secs = time.perf_counter() - t0
        assert resumed["trained"] == 0 and resumed["kinds"][0]["minimal"] == 4
        assert {p.name: RunDir(p).meta()["starts"] for p in (folder / "runs").iterdir()} == starts
        c = MlflowClient(back)
        runs = c.search_runs([c.get_experiment_by_name("lost").experiment_id], max_results=100)
        assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
        parents = [r for r in runs if M.TAG_PARENT not in r.data.tags]
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        assert "answer.json" in {a.path for a in c.list_artifacts(parents[0].info.run_id)}
        children = Counter(r.data.tags[M.TAG_RUN_ID] for r in runs if M.TAG_PARENT in r.data.tags)
        assert len(children) == len(starts) and set(children.values()) == {1}  # one MLflow run per trial
        for d in untracked:
            rid = next(r.info.run_id for r in runs if r.data.tags.get(M.TAG_RUN_ID) == RunDir(d).meta()["run_id"])
            _assert_completed_by_import(c, rid, Path(d))
    record("MLflow server SIGKILLed mid-sweep", "SIGKILL to the server's process group once the baseline is told",
           "the sweep computes and writes its answer; --resume with a server back imports the trials' runs and "
           "ends the parent, training nothing", True,
           f"nothing: {len(untracked)} trial runs completed in MLflow by the resume; no trial trained twice", secs,
           "seconds of `sweep --resume` syncing MLflow, once a server is back", "test_server_killed_mid_sweep")
