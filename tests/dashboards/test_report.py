"""The report of a real sweep: trials on a local Ray, a real MLflow server, the files logged on the parent
run, report.html rendered in headless Chromium (plot elements counted, screenshot not blank), the same
bytes from two builds, and the command's one-line errors."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from dashboards import build_report, find_sweep, load_sweep
from rattention import metrics as M
from rattention.cli import main
from sweeps.driver import sweep
from sweeps.spec import load_spec
from tests.conftest import write_sweep_spec

FIGURES = ("paper", "pareto", "position", "length")


@pytest.fixture(scope="module")
def minimal_sweep(train_dataset: Path, mlflow_server: str, ray_local, tmp_path_factory) -> dict:
    """A finished minimal-window sweep (baseline, swa and rattention over 2 seeds) that also measures MQAR
    accuracy at 1x, 2x and 4x the training length."""
    tmp = tmp_path_factory.mktemp("report_sweep")
    path = write_sweep_spec(tmp, train_dataset, mlflow_server, "report-e2e",
                            overrides=["eval.tasks=[mqar]", "eval.task_samples=4"])
    summary = sweep(load_spec(path), progress=False)
    folder = tmp / "sweeps" / "report-e2e"
    parent = json.loads((folder / "sweep.json").read_text())["parent_run_id"]
    with (folder / "trials.csv").open() as f:
        trials = list(csv.DictReader(f))
    return {"parent": parent, "summary": summary, "trials": trials, "tmp": tmp}


@pytest.fixture(scope="module")
def pareto_sweep(train_dataset: Path, mlflow_server: str, ray_local, tmp_path_factory) -> dict:
    """A finished Pareto sweep of 4 trials, one seed, no task metrics and no full baseline."""
    tmp = tmp_path_factory.mktemp("report_pareto")
    path = write_sweep_spec(tmp, train_dataset, mlflow_server, "report-pareto", mode="pareto", seeds=1,
                            tolerance={"kind": "absolute", "value": 0.1},
                            pareto={"against": "cache_bytes", "context": 128, "sampler": "nsga2", "trials": 4})
    sweep(load_spec(path), progress=False)
    folder = tmp / "sweeps" / "report-pareto"
    with (folder / "trials.csv").open() as f:
        trials = list(csv.DictReader(f))
    return {"parent": json.loads((folder / "sweep.json").read_text())["parent_run_id"], "trials": trials}


def points(trials: list[dict]) -> dict[str, list[str]]:
    """The evaluated windows of each kind, from the sweep's own trials.csv ('' for the baseline)."""
    out: dict[str, set[str]] = {}
    for t in trials:
        if t["state"] == "COMPLETE":
            out.setdefault(t["kind"], set()).add(t["window"])
    return {k: sorted(v, key=lambda w: int(w or 0)) for k, v in out.items()}


def expected_traces(trials: list[dict], minimal: dict[str, int | None], with_tasks: bool, bar: bool) -> dict:
    """Plotly traces each figure must hold, by the figures' design: paper = band, baseline mean and bar, then
    per kind its mean line and its seeds, and a star per minimal window; pareto = per panel one trace per
    kind plus the front; position = per local kind the baseline plus one line per window; length = one line
    per evaluated point."""
    pts = points(trials)
    local = [k for k in pts if k != "full"]
    base = "full" in pts
    paper = (2 if base else 0) + (1 if bar else 0) + 2 * len(local) + sum(minimal.get(k) is not None for k in local)
    n_points = sum(len(v) for v in pts.values())
    out = {"paper": paper, "pareto": 2 * (len(pts) + 1),
           "position": sum(int(base) + len(pts[k]) for k in local)}
    if with_tasks:
        out["length"] = n_points
    return out


def test_report_files_table_and_artifacts(minimal_sweep: dict, mlflow_server: str, tmp_path: Path) -> None:
    parent, summary = minimal_sweep["parent"], minimal_sweep["summary"]
    report = build_report(mlflow_server, parent, tmp_path / "r")
    out = report.parent
    assert report.name == "report.html"
    names = {p.name for p in out.iterdir()}
    assert names == {f"{f}.{e}" for f in FIGURES for e in ("png", "html")} | {
        "plotly.min.js", "table.md", "table.html", "report.html"}
    c = MlflowClient(mlflow_server)
    assert {a.path for a in c.list_artifacts(parent, "report")} == {f"report/{n}" for n in names}
    # every PNG is a real image of a drawn figure
    from PIL import Image

    for f in FIGURES:
        img = np.asarray(Image.open(out / f"{f}.png").convert("L"), dtype=float)
        assert img.shape[0] > 300 and img.shape[1] > 400 and img.std() > 10, f
    # the table: one row per evaluated point, the minimal windows' means as the sweep reported them
    table = (out / "table.md").read_text()
    rows = [r for r in table.splitlines() if r.startswith("| ") and not r.startswith("| kind")]
    pts = points(minimal_sweep["trials"])
    assert len(rows) == sum(len(v) for v in pts.values())
    for k in summary["kinds"]:
        row = next(r for r in rows if r.startswith(f"| {k['kind']} | {k['minimal']} |"))
        assert f"{k['mean']:.4f} ± {k['spread']:.4f}" in row and "passes, minimal" in row
    bar = summary["bar"]
    assert f"| full | - | 2 | {bar['baseline_mean']:.4f} ± {bar['baseline_spread']:.4f} |" in table
    # standalone: plotly inlined, nothing loaded from a server or the network
    page = report.read_text()
    assert page.count("<script") == 1 + len(FIGURES)  # plotly.js once, then one call per figure
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=|@import", page)
    assert summary["answer_line"] in page and parent in page


def test_report_renders_in_headless_chromium(minimal_sweep: dict, mlflow_server: str, tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed and could not be: `make test` installs Debian's chromium package "
                    "with apt-get, which needs root")
    report = build_report(mlflow_server, minimal_sweep["parent"], tmp_path / "r", log=False)
    s = load_sweep(MlflowClient(mlflow_server), minimal_sweep["parent"])
    want = expected_traces(minimal_sweep["trials"], s.minimal, with_tasks=True, bar=True)
    dom = render(chromium, report, tmp_path, dump_dom=True)
    for name, traces in want.items():
        part = figure_dom(dom, name)
        assert part.count('class="main-svg"') >= 1, f"{name}: plotly drew nothing"
        assert count_traces(part) == traces, name
    shot = tmp_path / "shot.png"
    render(chromium, report, tmp_path, screenshot=shot)
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=float)
    assert pixels.shape[:2] == (4200, 1280)
    assert pixels.std() > 15  # not a blank page
    assert (pixels.min(axis=2) < 200).mean() > 0.01  # ink: text, axes and lines on more than 1% of it
    # a figure's own page loads plotly.js from beside it, with no network
    alone = render(chromium, report.parent / "paper.html", tmp_path, dump_dom=True)
    assert count_traces(alone) == want["paper"]


def test_missing_metrics_are_one_line_each(pareto_sweep: dict, mlflow_server: str, tmp_path: Path) -> None:
    report = build_report(mlflow_server, pareto_sweep["parent"], tmp_path / "r", log=False)
    page = report.read_text()
    assert not (report.parent / "length.png").exists() and not (report.parent / "length.html").exists()
    missing = re.findall(r'<p class="missing">(.*?)</p>', page)
    assert len(missing) == 1 and "no task accuracy" in missing[0] and "eval.tasks" in missing[0]
    assert "no full-baseline trials in this sweep" in page and "no tolerance bar" in page
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is not None:
        dom = render(chromium, report, tmp_path, dump_dom=True)
        want = expected_traces(pareto_sweep["trials"], {}, with_tasks=False, bar=False)
        for name, traces in want.items():
            assert count_traces(figure_dom(dom, name)) == traces, name


def test_two_builds_give_the_same_bytes(minimal_sweep: dict, mlflow_server: str, tmp_path: Path) -> None:
    import os
    import sys

    a = build_report(mlflow_server, minimal_sweep["parent"], tmp_path / "a", log=False).parent
    b = build_report(MlflowClient(mlflow_server), minimal_sweep["parent"], tmp_path / "b", log=False).parent
    # and one by the command in another process, with another hash seed (set and dict orders differ)
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-m", "rattention", "report", minimal_sweep["parent"], "--tracking-uri",
                          mlflow_server, "--out", str(tmp_path / "c"), "--no-log"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == str(tmp_path / "c" / "report.html"), out.stderr
    files = sorted(p.name for p in a.iterdir())
    for other in (b, tmp_path / "c"):
        assert files == sorted(p.name for p in other.iterdir())
        for name in files:
            assert (a / name).read_bytes() == (other / name).read_bytes(), name
    assert b"Software" not in (a / "paper.png").read_bytes()


def test_report_command(minimal_sweep: dict, mlflow_server: str, tmp_path: Path, capsys) -> None:
    parent = minimal_sweep["parent"]
    pages = []
    for ref in (parent, "report-e2e"):  # the parent run id, or the experiment (its latest finished sweep)
        out = tmp_path / f"by-{len(pages)}"
        assert cli(["report", ref, "--tracking-uri", mlflow_server, "--out", str(out)]) == 0
        printed = capsys.readouterr().out.strip()
        assert printed == str(out / "report.html") and Path(printed).is_file()
        pages.append(Path(printed).read_bytes())
    assert pages[0] == pages[1]


def test_report_command_errors(minimal_sweep: dict, mlflow_server: str, tmp_path: Path, capsys) -> None:
    from pipelines import tracking

    c = MlflowClient(mlflow_server)
    exp = c.get_experiment_by_name("report-e2e").experiment_id
    trial = c.search_runs([exp], filter_string=f"tags.`{M.TAG_PARENT}` = '{minimal_sweep['parent']}'")[0]
    plain = c.create_run(exp, run_name="not-a-sweep").info.run_id  # a training run, say
    # a sweep still running: its parent run as the driver opens it (RUNNING until the driver closes it)
    running = tracking.start_run(c, "report-running", "sweep-report-running",
                                 {M.TAG_STUDY: "report-running", M.TAG_SWEEP_MODE: "minimal-window",
                                  M.TAG_SOURCE: "sweep"}, {"name": "report-running"})
    cases = [
        ("nosuch-experiment", "is neither a run id nor an experiment"),
        ("0123456789abcdef" * 2, "is neither a run id nor an experiment"),  # a run id no run has
        (trial.info.run_id, f"is a trial of the sweep run {minimal_sweep['parent']}; pass that run id"),
        (plain, "is not a sweep's parent run"),
        (running, "is RUNNING, not FINISHED; wait for it to finish"),
        ("report-running", "experiment 'report-running' has no finished sweep (1 RUNNING)"),
        ("Default", "holds no sweep"),
    ]
    for ref, message in cases:
        assert cli(["report", ref, "--tracking-uri", mlflow_server, "--out", str(tmp_path / "x")]) == 2, ref
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: SWEEP_RUN_OR_EXPERIMENT: ") and message in err, err
    tracking.end_run(c, running, "KILLED")
    tracking.end_run(c, plain, "FINISHED")
    assert cli(["report", running, "--tracking-uri", mlflow_server]) == 2
    assert "is KILLED, not FINISHED; finish it with `rattention sweep SPEC --resume`" in capsys.readouterr().err
    # no server: one line before anything else, naming the flag
    from pipelines.tracking import _free_port

    dead = f"http://127.0.0.1:{_free_port()}"
    assert cli(["report", "report-e2e", "--tracking-uri", dead]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --tracking-uri: no MLflow server answers at {dead}; start one or leave it unset for a " \
                  "local one\n"
    assert not (tmp_path / "x").exists()
    assert find_sweep(c, "report-e2e") == minimal_sweep["parent"]


def test_report_command_without_a_store(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)  # no .mlflow here, no URI given: one line, and no empty store is made
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert cli(["report", "some-sweep"]) == 2
    assert capsys.readouterr().err.startswith("error: --tracking-uri: not given, MLFLOW_TRACKING_URI is unset, "
                                              "and there is no local store .mlflow/mlflow.db here")
    assert not (tmp_path / ".mlflow").exists()


# ----- helpers -------------------------------------------------------------------------------------------

def cli(args: list[str]) -> int:
    """``rattention ARGS`` in this process (the console entry point); its exit code."""
    try:
        main(args)
    except SystemExit as err:
        return int(err.code or 0)
    return 0


def render(chromium: str, page: Path, tmp: Path, dump_dom: bool = False, screenshot: Path | None = None) -> str:
    """Load ``page`` in headless Chromium with its scripts run; the DOM after them, or a screenshot."""
    cmd = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", "--hide-scrollbars", f"--user-data-dir={tmp / 'chromium-profile'}",
           "--window-size=1280,4200", "--virtual-time-budget=20000"]
    cmd += ["--dump-dom"] if dump_dom else [f"--screenshot={screenshot}"]
    out = subprocess.run([*cmd, page.resolve().as_uri()], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    if screenshot is not None:
        assert screenshot.is_file(), out.stderr[-2000:]
    return out.stdout


def figure_dom(dom: str, name: str) -> str:
    """The part of the rendered page that holds one figure's div."""
    start = dom.index(f'data-view="{name}"')
    end = dom.find('<div class="figure"', start)
    return dom[start:] if end < 0 else dom[start:end]


def count_traces(dom: str) -> int:
    """Plotly's rendered scatter traces (one ``<g class="trace scatter ...">`` each)."""
    return len(re.findall(r'<g class="trace scatter[ "]', dom))


def test_trials_finished_under_an_earlier_parent_are_found(train_dataset: Path, mlflow_server: str, ray_local,
                                                           tmp_path: Path) -> None:
    # The same sweep again after its study and record were deleted: a new parent run, whose trials all come
    # back "finished before" from their run folders, so MLflow holds them under the first parent only.
    path = write_sweep_spec(tmp_path, train_dataset, mlflow_server, "report-again", kinds=["swa"], seeds=1)
    first = sweep(load_spec(path), progress=False)
    folder = tmp_path / "sweeps" / "report-again"
    (folder / "optuna.journal").unlink()
    (folder / "sweep.json").unlink()
    second = sweep(load_spec(path), progress=False)
    assert second["trained"] == 0 and second["trials"] == first["trials"]
    c = MlflowClient(mlflow_server)
    parent = find_sweep(c, "report-again")
    assert parent == json.loads((folder / "sweep.json").read_text())["parent_run_id"]
    assert not c.search_runs([c.get_run(parent).info.experiment_id],
                             filter_string=f"tags.`{M.TAG_PARENT}` = '{parent}'")
    s = load_sweep(c, parent)
    assert len(s.trials) == first["trials"] and {t.kind for t in s.trials} == {"full", "swa"}
