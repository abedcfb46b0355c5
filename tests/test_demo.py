"""``rattention demo --profile smoke``, as a user runs it: the whole pipeline (tokenize on Ray, the
minimal-window sweep, the report) ends with a minimal window for each kind and a report file; a second
run reuses the dataset and every trial and says so; and the command it prints to browse MLflow works
when pasted: the UI answers on 127.0.0.1 and lists the demo's experiment with the report among its
parent run's artifacts."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

RATTENTION = Path(sys.executable).parent / "rattention"


def _demo(workdir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": "", "PATH": f"{RATTENTION.parent}:{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([str(RATTENTION), "demo", "--profile", "smoke"], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=900)


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, subprocess.CompletedProcess]:
    work = tmp_path_factory.mktemp("demo")
    first = _demo(work)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = _demo(work)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return work, first, second


def _answer(work: Path) -> dict:
    found = list((work / ".rattention" / "sweeps").glob("*/answer.json"))
    assert len(found) == 1, found
    return json.loads(found[0].read_text())


def test_smoke_demo_finds_a_minimal_window_per_kind_and_writes_the_report(demo_run):
    work, first, _ = demo_run
    answer = _answer(work)
    kinds = {k["kind"]: k for k in answer["kinds"]}
    assert set(kinds) == {"swa", "rattention"}
    for k in kinds.values():
        assert k["minimal"] is not None, k
        assert f"| {k['kind']} | {k['minimal']} |" in first.stdout
    report = re.search(r"^report: (\S+)", first.stdout, re.M)
    assert report, first.stdout[-2000:]
    page = Path(report.group(1))
    assert page.is_file() and page.name == "report.html" and page.stat().st_size > 100_000
    assert (work / "data" / "stdlib" / "manifest.json").is_file()  # where configs/demo.yaml looks
    # Ray's own noise stays out: no core-worker lines, no token-auth warning
    assert "core_worker.cc" not in first.stdout + first.stderr
    assert "Token authentication" not in first.stdout + first.stderr


def test_second_demo_reuses_the_dataset_and_every_trial(demo_run):
    work, first, second = demo_run
    assert "up to date" in second.stdout
    assert "0 trained now" in second.stdout, second.stdout[-2000:]
    assert "(recorded before)" in second.stdout
    a = _answer(work)
    assert a["trained"] == 0


def test_the_printed_browse_command_serves_the_demo_on_loopback(demo_run):
    work, first, _ = demo_run
    line = re.search(r"browse the runs and their artifacts in MLflow: (.+)$", first.stdout, re.M)
    assert line, first.stdout[-2000:]
    argv = shlex.split(line.group(1))
    assert argv[argv.index("--store") + 1]
    env = {**os.environ, "PATH": f"{RATTENTION.parent}:{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(argv, cwd=work, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        address = None
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and address is None:
            out = proc.stdout.readline()
            if not out and proc.poll() is not None:
                break
            m = re.search(r"MLflow UI: (http://\S+)", out)
            address = m.group(1) if m else None
        assert address and address.startswith("http://127.0.0.1:"), address
        experiments = _get(f"{address}/api/2.0/mlflow/experiments/search?max_results=100")["experiments"]
        names = {e["name"]: e["experiment_id"] for e in experiments}
        answer = _answer(work)
        assert answer["experiment"] in names
        runs = _get(f"{address}/api/2.0/mlflow/runs/get?run_id={answer['parent_run_id']}")["run"]
        assert runs["info"]["status"] == "FINISHED"
        q = urllib.parse.urlencode({"run_id": answer["parent_run_id"], "path": "report"})
        files = {f["path"] for f in _get(f"{address}/api/2.0/mlflow/artifacts/list?{q}").get("files", [])}
        assert "report/report.html" in files, files
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    assert proc.returncode == 0
