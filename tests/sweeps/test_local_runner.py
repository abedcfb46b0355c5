"""The sweep's Ray-free runner for real (``rattention sweep --runner local``): trial subprocesses on this
machine, the same Optuna study and run folders as the Ray path, no Ray and no MLflow imported anywhere;
a trial subprocess killed mid-training is a FAIL with its reason; Ctrl-C stops the trials and marks them
KILLED; ``--resume`` reruns nothing; ``rattention import-sweep`` then ``rattention report`` on the folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from rattention import metrics as M
from rattention.rundir import RunDir
from sweeps.driver import sweep
from sweeps.spec import load_spec
from tests.conftest import write_sweep_spec

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
# Trials long enough (a few seconds on CI's two cores) to be caught while they train.
LONG = {"overrides": ["train.steps=300", "train.checkpoint_every=100"], "kinds": ["swa"], "seeds": 1,
        "grid": {"windows": [4, 8, 16], "block": 4}}


def study(spec_path: Path) -> optuna.Study:
    from sweeps.driver import _storage

    spec = load_spec(spec_path)
    return optuna.load_study(study_name=spec.name, storage=_storage(spec))


def starts(folder: Path) -> dict[str, int]:
    return {p.name: int(RunDir(p).meta().get("starts", 0)) for p in sorted((folder / "runs").iterdir())}


def children(pid: int, marker: str) -> list[int]:
    """Live child processes of ``pid`` whose command line holds ``marker``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z" and marker in cmd:
            found.append(int(proc.name))
    return found


# ----- one local sweep, where ray and mlflow cannot be imported ----------------------------------------------

BLOCKER = """import os
with open(os.environ["RATTENTION_IMPORT_LOG"], "a") as f:
    f.write(f"{__name__} imported by pid {os.getpid()}\\n")
raise ImportError(f"{__name__} is not installed on this machine")
"""


@pytest.fixture(scope="module")
def local_sweep(train_dataset: Path, mlflow_server: str, tmp_path_factory) -> dict:
    """The tiny spec swept with --runner local through the CLI in a subprocess whose ``ray`` and ``mlflow``
    (and its trials' too) are packages that log the attempt and raise ImportError, as on a GPU box."""
    tmp = tmp_path_factory.mktemp("local")
    blocked = tmp / "blocked"
    for name in ("ray", "mlflow"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(BLOCKER)
    log = tmp / "imports.log"
    path = write_sweep_spec(tmp, train_dataset, mlflow_server, "local-e2e")
    code = textwrap.dedent(f"""
        import json, sys
        from rattention.cli import main
        try:
            main(["sweep", {str(path)!r}, "--runner", "local"])
        finally:
            print("MODULES " + json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "mlflow"))))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocked), str(ROOT)]), "RATTENTION_IMPORT_LOG": str(log)}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    folder = tmp / "sweeps" / "local-e2e"
    return {"proc": out, "path": path, "folder": folder, "log": log, "wall_s": time.perf_counter() - t0, "tmp": tmp}


@pytest.fixture(scope="module")
def ray_twin(train_dataset: Path, mlflow_server: str, ray_local, tmp_path_factory) -> dict:
    """The same spec and seeds swept on Ray, tracked in MLflow."""
    tmp = tmp_path_factory.mktemp("ray")
    path = write_sweep_spec(tmp, train_dataset, mlflow_server, "ray-twin")
    summary = sweep(load_spec(path), progress=False)
    return {"path": path, "summary": summary, "folder": tmp / "sweeps" / "ray-twin"}


def test_local_sweep_imports_neither_ray_nor_mlflow(local_sweep: dict) -> None:
    out = local_sweep["proc"]
    assert out.returncode == 0, out.stderr[-3000:]
    assert not local_sweep["log"].exists(), local_sweep["log"].read_text()  # no process tried, trials included
    assert out.stdout.strip().splitlines()[-1] == "MODULES []"
    folder = local_sweep["folder"]
    record = json.loads((folder / "sweep.json").read_text())
    assert record["runner"] == "local" and record["needs_import"] is True and record["status"] == "FINISHED"
    assert "parent_run_id" not in record
    assert {"answer.json", "trials.csv", "summary.md", "spec.yaml", "optuna.journal"} <= {p.name for p in
                                                                                          folder.iterdir()}
    assert f"rattention import-sweep {folder}" in out.stdout
    assert len(list((folder / "local").glob("*.result.json"))) == 10  # one subprocess per trial


def test_same_study_runs_and_answer_as_the_ray_path(local_sweep: dict, ray_twin: dict) -> None:
    assert local_sweep["proc"].returncode == 0, local_sweep["proc"].stderr[-3000:]
    local = json.loads((local_sweep["folder"] / "answer.json").read_text())
    ray = ray_twin["summary"]
    keys = ("kind", "minimal", "points_used", "settled", "non_monotone")
    assert [{k: a[k] for k in keys} for a in local["kinds"]] == [{k: a[k] for k in keys} for a in ray["kinds"]]
    assert local["bar"]["baseline_mean"] == pytest.approx(ray["bar"]["baseline_mean"], rel=1e-5)

    def points(path: Path) -> dict:
        return {(t.user_attrs["kind"], t.user_attrs["window"], t.user_attrs["seed"]): (t.state.name, t.values[0])
                for t in study(path).trials}

    a, b = points(local_sweep["path"]), points(ray_twin["path"])
    assert a.keys() == b.keys() and len(a) == 10
    for point in a:
        assert a[point][0] == b[point][0] == "COMPLETE"
        assert a[point][1] == pytest.approx(b[point][1], rel=1e-5), point
    # the same run folders: a trial's folder is named by its config, data and code, whichever runner ran it
    assert sorted(p.name for p in (local_sweep["folder"] / "runs").iterdir()) == \
        sorted(p.name for p in (ray_twin["folder"] / "runs").iterdir())
    for p in (local_sweep["folder"] / "runs").iterdir():
        meta = RunDir(p).meta()
        assert RunDir(p).status()["status"] == "FINISHED" and "mlflow_run_id" not in meta
        assert meta["tags"][M.TAG_STUDY] == "local-e2e" and M.TAG_PARENT not in meta["tags"]


def test_resume_reruns_nothing(local_sweep: dict) -> None:
    assert local_sweep["proc"].returncode == 0, local_sweep["proc"].stderr[-3000:]
    folder = local_sweep["folder"]
    before, trials = starts(folder), len(study(local_sweep["path"]).trials)
    results = {p: p.stat().st_mtime_ns for p in (folder / "local").glob("*.result.json")}
    summary = sweep(load_spec(local_sweep["path"]), resume=True, progress=False, runner="local")
    assert summary["trained"] == 0 and summary["trials"] == 10
    assert starts(folder) == before and len(study(local_sweep["path"]).trials) == trials
    assert {p: p.stat().st_mtime_ns for p in (folder / "local").glob("*.result.json")} == results  # none started
    # and a local sweep is resumed by the local runner only: on Ray it has no MLflow runs to join
    out = subprocess.run([sys.executable, "-m", "rattention", "sweep", str(local_sweep["path"]), "--resume"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip() == (f"error: --runner: sweep {folder} ran with --runner local; resume it with "
                                  "--runner local")


def test_import_sweep_then_report(local_sweep: dict, ray_twin: dict, mlflow_server: str, tmp_path: Path) -> None:
    assert local_sweep["proc"].returncode == 0, local_sweep["proc"].stderr[-3000:]
    folder = local_sweep["folder"]
    cmd = [sys.executable, "-m", "rattention", "import-sweep", str(folder), "--tracking-uri", mlflow_server]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "10 trial runs (10 imported now)" in first.stdout
    c = MlflowClient(mlflow_server)
    exp = c.get_experiment_by_name("local-e2e")
    runs = c.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if M.TAG_PARENT not in r.data.tags]
    assert len(parents) == 1 and len(runs) == 11
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.info.run_id in first.stdout
    kids = [r for r in runs if r.data.tags.get(M.TAG_PARENT) == parent.info.run_id]
    assert len(kids) == 10 and all(r.info.status == "FINISHED" for r in kids)
    trials = study(local_sweep["path"]).trials
    assert {r.data.tags[M.TAG_TRIAL] for r in kids} == {str(t.number) for t in trials}
    for r in kids:  # each child holds its trial's value, as on Ray
        t = next(t for t in trials if str(t.number) == r.data.tags[M.TAG_TRIAL])
        assert r.data.metrics["eval/val_loss_pos_16_end"] == pytest.approx(t.values[0])
    # the parent carries what the Ray path's parent carries: tags, the spec as params, metrics, files
    twin = c.get_run(ray_twin["summary"]["parent_run_id"])
    assert set(twin.data.tags) - {"mlflow.user", "mlflow.source.name", "mlflow.source.type",
                                  "mlflow.source.git.commit"} <= set(parent.data.tags)
    assert parent.data.tags[M.TAG_SWEEP_ANSWER] == twin.data.tags[M.TAG_SWEEP_ANSWER]
    assert parent.data.tags[M.TAG_SWEEP_MODE] == "minimal-window"
    assert set(parent.data.params) == set(twin.data.params)
    assert set(twin.data.metrics) <= set(parent.data.metrics)
    assert parent.data.metrics[M.sweep_minimal_window("swa")] == twin.data.metrics[M.sweep_minimal_window("swa")]
    arts = {a.path for a in c.list_artifacts(parent.info.run_id)}
    assert {a.path for a in c.list_artifacts(twin.info.run_id)} <= arts
    record = json.loads((folder / "sweep.json").read_text())
    assert record["parent_run_id"] == parent.info.run_id and record["needs_import"] is False

    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"MLflow parent run {parent.info.run_id}" in again.stdout and "(0 imported now)" in again.stdout
    assert len(c.search_runs([exp.experiment_id], max_results=100)) == 11  # nothing logged twice

    out = tmp_path / "report"
    rep = subprocess.run([sys.executable, "-m", "rattention", "report", parent.info.run_id, "--tracking-uri",
                          mlflow_server, "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr[-3000:]
    assert rep.stdout.strip() == str(out / "report.html") and (out / "report.html").stat().st_size > 10_000
    table = (out / "table.md").read_text()
    assert "| swa | 4 |" in table and "passes, minimal" in table
    from dashboards.read import load_sweep

    s = load_sweep(c, parent.info.run_id)
    assert len(s.trials) == 10 and s.minimal == {"swa": 4, "rattention": 4}


# ----- failures and interruptions -----------------------------------------------------------------------------

def test_killed_trial_subprocess_is_a_fail_with_its_reason(train_dataset: Path, mlflow_server: str,
                                                           tmp_path: Path) -> None:
    path = write_sweep_spec(tmp_path, train_dataset, mlflow_server, "killed-local",
                            tolerance={"kind": "absolute", "value": 10.0}, **LONG)
    runs = tmp_path / "sweeps" / "killed-local" / "runs"
    killed: list[str] = []

    def killer() -> None:  # SIGKILL the first swa trial's subprocess once it is training
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            for p in (runs.iterdir() if runs.is_dir() else []):
                if p.name.startswith("swa-") and RunDir(p).metrics() and RunDir(p).status()["status"] == "RUNNING":
                    for pid in children(os.getpid(), "-swa-"):
                        os.kill(pid, signal.SIGKILL)
                        killed.append(p.name)
                    break
            time.sleep(0.01)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    summary = sweep(load_spec(path), progress=False, runner="local")
    thread.join(5)
    assert killed, "no swa trial was caught training"
    fails = [t for t in study(path).trials if t.state.name == "FAIL"]
    assert len(fails) == 1
    reason = fails[0].user_attrs["fail_reason"]
    assert reason.startswith("the trial's process died (killed by SIGKILL)"), reason
    assert RunDir(runs / killed[0]).status()["status"] == "FAILED"  # not left RUNNING
    assert RunDir(runs / killed[0]).status()["error"] == reason
    swa = summary["kinds"][0]
    assert any("killed by SIGKILL" in f for f in swa["failures"])  # counted as not passing; the sweep went on
    assert swa["settled"] and swa["minimal"] is not None
    assert len(study(path).trials) == summary["trials"] >= 3


def test_trial_process_that_dies_gives_its_stderr_last_line(tmp_path: Path) -> None:
    from sweeps.runner import LocalRunner

    runner = LocalRunner(tmp_path)
    handle = runner.start("trial-0-bad", {"model": {"d_model": "wide"}}, {})  # no run config: the child raises
    [(h, outcome)] = runner.wait([handle])
    assert h is handle and outcome.died and outcome.result is None
    assert outcome.error.startswith("the trial's process died (exit code 1): ")
    last = (tmp_path / "local" / "trial-0-bad.stderr").read_text().strip().splitlines()[-1]
    assert outcome.error.endswith(last) and "d_model" in last


def test_ctrl_c_stops_the_trials_marks_them_killed_and_resume_finishes(train_dataset: Path, mlflow_server: str,
                                                                       tmp_path: Path) -> None:
    path = write_sweep_spec(tmp_path, train_dataset, mlflow_server, "ctrlc-local", **LONG)
    folder = tmp_path / "sweeps" / "ctrlc-local"
    proc = subprocess.Popen([sys.executable, "-m", "rattention", "sweep", str(path), "--runner", "local"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 300
        while True:  # a trial past its first steps
            live = [p for p in (folder / "runs").iterdir()] if (folder / "runs").is_dir() else []
            training = [p for p in live if RunDir(p).metrics() and RunDir(p).status()["status"] == "RUNNING"]
            if training:
                break
            assert proc.poll() is None and time.monotonic() < deadline, "no trial started training"
            time.sleep(0.02)
        trial_pids = children(proc.pid, "sweeps.runner")
        assert len(trial_pids) == 1
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == (f"interrupted: sweep stopped, its running trials stopped and their run "
                                            f"folders marked KILLED; `rattention sweep {path} --runner local "
                                            "--resume` continues it")
    assert "Traceback" not in err
    assert not Path(f"/proc/{trial_pids[0]}").exists() or \
        Path(f"/proc/{trial_pids[0]}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    stopped = training[0]
    assert RunDir(stopped).status()["status"] == "KILLED"
    assert json.loads((folder / "sweep.json").read_text())["status"] == "KILLED"
    assert not any(RunDir(p).status()["status"] == "RUNNING" for p in (folder / "runs").iterdir())

    before = starts(folder)
    summary = sweep(load_spec(path), resume=True, progress=False, runner="local")
    after = starts(folder)
    assert after[stopped.name] == before[stopped.name] + 1  # the interrupted trial resumed, once
    assert all(after[n] == before[n] for n in before if n != stopped.name)  # the finished ones not again
    assert RunDir(stopped).status()["status"] == "FINISHED"
    assert summary["kinds"][0]["settled"] and all(t.state.name == "COMPLETE" for t in study(path).trials)


# ----- flags ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "line"), [
    (["--runner", "local", "--address", "auto"], "error: --address: joins a Ray cluster, and --runner local runs "
     "the trials on this machine without Ray; give one of the two"),
    (["--gpus", "1"], "error: --gpus: goes with --runner local (one trial per GPU); on Ray each trial asks for the "
     "spec's resources.gpus"),
    (["--runner", "local", "--gpus", "-1"], "error: --gpus: must be >= 0, got -1"),
])
def test_contradicting_flags_are_refused_in_one_line(args: list[str], line: str, tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "rattention", "sweep", str(tmp_path / "absent.yaml"), *args],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip() == line  # before the spec is even read


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks a machine without a GPU")
def test_local_runner_refuses_gpus_this_machine_lacks(train_dataset: Path, mlflow_server: str, tmp_path: Path) -> None:
    path = write_sweep_spec(tmp_path, train_dataset, mlflow_server, "nogpu")
    out = subprocess.run([sys.executable, "-m", "rattention", "sweep", str(path), "--runner", "local", "--gpus", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip() == "error: --gpus: 2 GPUs asked for; this machine has 0"
    assert not (tmp_path / "sweeps" / "nogpu").exists()
