"""Sweep figures on this machine's CPUs: the integration sweep's wall time at P = 1 and P = 2, and the
overhead of one trial on Ray against the same training run in-process.

    python benchmarks/bench_sweep.py [--repeats-sweep 2] [--repeats-trial 3] [--trial-steps 30]
                                     [--out benchmarks/results/sweep.json] [--skip-sweep] [--skip-trial]

Set-up (untimed): a local MLflow server and a local Ray with all of the machine's CPUs, in a temp folder,
and random-token datasets written there (nothing is downloaded).

Part A runs the integration sweep of ``tests/sweeps/test_sweep.py`` (the 2-layer d_model 32 T=32 model,
windows 4, 8, 16, kinds swa and rattention, 2 seeds, objective ``eval/val_loss_pos_16_end``, absolute
tolerance 10) with ``parallel`` 1 and 2, alternating, each in a fresh sweep folder and study, and times
``sweeps.driver.sweep``; Ray and MLflow are already up, so their start-up is outside the timing.

Part B trains one demo-sized config (4 layers, d_model 128, T=512, batch 8, evaluation off, tracked to the
MLflow server) in alternating pairs: in this process through ``rattention.lifecycle.run`` with one torch
thread, then as one sweep trial, ``sweeps.driver.run_trial`` as a Ray task with 1 CPU (Ray gives such a
worker one thread). Each run gets a fresh ``train.out_dir``, so none is found finished. Overhead is
Ray wall / local wall - 1 per pair. Each run's phases come from its folder's timestamps (created, logged
rows, final status), to show where a difference goes.

Writes the JSON (with provenance) and the ``bench_sweep`` section of ``benchmarks/sweep.md``; prints the
tables last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_train import random_dataset  # noqa: E402

START, END = "<!-- bench_sweep:start -->", "<!-- bench_sweep:end -->"
GRID = [4, 8, 16]
TARGET = 0.10  # the bound on a trial's Ray overhead, for trials of 30 s or more
TRIAL_MODEL = ["model.vocab_size=8192", "model.d_model=128", "model.n_layers=4", "model.n_heads=4",
               "model.n_kv_heads=2", "model.head_dim=32", "model.layout=LLLG", "model.kind=rattention",
               "model.window=64", "model.seq_len=512"]


# ----- data and specs ------------------------------------------------------------------------------------

def phrase_dataset(folder: Path) -> Path:
    """The integration tests' dataset (``tests/conftest.py::train_dataset``): documents of phrases from a
    small fixed set over 64 ids, so the tiny model's loss drops within a few steps."""
    from tests.conftest import TRAIN_EOS, TRAIN_VOCAB, write_token_dataset

    rng = np.random.default_rng(0)
    phrases = [rng.integers(1, TRAIN_VOCAB, size=rng.integers(4, 9)) for _ in range(12)]

    def doc() -> np.ndarray:
        return np.concatenate([phrases[k] for k in rng.integers(0, len(phrases), size=rng.integers(8, 30))])

    docs = {"train": [doc() for _ in range(200)], "val": [doc() for _ in range(40)]}
    return write_token_dataset(folder, docs, TRAIN_VOCAB, TRAIN_EOS)


def write_sweep_spec(tmp: Path, dataset: Path, uri: str, name: str, parallel: int) -> Path:
    """The spec of ``tests/sweeps/test_sweep.py::write_spec`` (same base config and fields), at ``parallel``."""
    from tests.conftest import tiny_run_config

    base = tmp / f"{name}-base.yaml"
    cfg = tiny_run_config(dataset, "train.steps=12", "train.checkpoint_every=6", "eval.tasks=[]",
                          "eval.decode_tokens=0", f"tracking.uri={uri}").to_dict()
    del cfg["model"]["nope_global"]  # resolved by kind per trial, as in a hand-written config
    base.write_text(yaml.safe_dump(cfg))
    spec = {"name": name, "base": str(base), "kinds": ["swa", "rattention"],
            "grid": {"windows": GRID, "block": 4}, "objective": {"metric": "eval/val_loss_pos_16_end"},
            "tolerance": {"kind": "absolute", "value": 10.0}, "seeds": 2, "parallel": parallel,
            "out_dir": str(tmp / "sweeps" / name)}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


# ----- part A: the integration sweep ----------------------------------------------------------------------

def part_sweep(tmp: Path, uri: str, repeats: int) -> dict[str, Any]:
    from sweeps.driver import sweep
    from sweeps.spec import load_spec

    ds = phrase_dataset(tmp / "phrases")
    runs = []
    for rep in range(repeats):
        for parallel in (1, 2):  # alternate, so drift on the machine hits both
            name = f"bench-p{parallel}-r{rep}"
            spec = load_spec(write_sweep_spec(tmp, ds, uri, name, parallel))
            t0 = time.perf_counter()
            summary = sweep(spec, progress=False)
            wall = time.perf_counter() - t0
            row = {"parallel": parallel, "repeat": rep, "wall_s": wall, "trials": summary["trials"],
                   "trained": summary["trained"], "driver_wall_s": summary["wall_s"],
                   "minimal": {k["kind"]: k["minimal"] for k in summary["kinds"]},
                   "load_average_1m": os.getloadavg()[0]}
            runs.append(row)
            print(f"sweep P={parallel} repeat {rep}: {wall:.1f} s, {row['trials']} trials "
                  f"({row['trained']} trained), minimal {row['minimal']}", flush=True)
    by = {p: [r["wall_s"] for r in runs if r["parallel"] == p] for p in (1, 2)}
    med = {p: statistics.median(v) for p, v in by.items()}
    return {"spec": "tests/sweeps/test_sweep.py::write_spec: 2 layers, d_model 32, T=32, 12 steps, windows "
                    f"{GRID}, kinds swa+rattention, 2 seeds, objective eval/val_loss_pos_16_end, "
                    "absolute tolerance 10, 1 CPU per trial",
            "runs": runs, "median_wall_s": {str(p): v for p, v in med.items()},
            "min_wall_s": {str(p): min(v) for p, v in by.items()},
            "max_wall_s": {str(p): max(v) for p, v in by.items()},
            "speedup_p1_over_p2": med[1] / med[2]}


# ----- part B: one trial on Ray against the same run in-process ------------------------------------------

def phases(run_dir: Path, t_submit: float, t_return: float) -> dict[str, float]:
    """Where a run's wall time went, from its folder's wall-clock stamps (``time.time()``)."""
    from rattention.rundir import RunDir

    rd = RunDir(run_dir)
    created = float(rd.meta()["created"])
    rows = [r for r in rd.metrics() if "train/tokens" in r]
    first, last = float(rows[0]["time"]), float(rows[-1]["time"])
    end = float(rd.status()["time"])
    return {"to_open_s": created - t_submit,  # task start (Ray), imports, config, dataset fingerprint, code hash
            "open_to_first_row_s": first - created,  # MLflow run + config upload, model, loader, first logged steps
            "first_to_last_row_s": last - first,  # training
            "last_row_to_status_s": end - last,  # results written and logged
            "status_to_return_s": t_return - end}  # files logged, MLflow run ended, result back


def part_trial(tmp: Path, uri: str, repeats: int, steps: int, log_every: int) -> dict[str, Any]:
    import ray
    import torch

    from pipelines.tracking import MlflowTracker
    from rattention import lifecycle
    from rattention import metrics as M
    from rattention.run_config import load_run_config
    from rattention.rundir import RunDir
    from sweeps.driver import run_trial

    ds = random_dataset(tmp / "random")
    exp = "bench-sweep-trial"
    tags = {M.TAG_SOURCE: "bench_sweep"}
    task = ray.remote(run_trial).options(num_cpus=1)
    pairs = []
    for rep in range(repeats):
        pair: dict[str, Any] = {"repeat": rep}
        for mode in ("local", "ray"):
            over = [f"data.path={ds}", *TRIAL_MODEL, "data.batch_size=8", f"train.steps={steps}",
                    "train.warmup_steps=2", f"train.log_every={log_every}", "train.checkpoint_every=0",
                    "eval.enabled=false", f"tracking.uri={uri}", f"tracking.experiment={exp}",
                    f"train.out_dir={tmp / 'trial-runs' / f'{mode}-{rep}'}"]
            cfg = load_run_config(None, over)
            if mode == "local":
                threads = torch.get_num_threads()
                torch.set_num_threads(1)  # what a 1-CPU Ray task gets
                try:
                    t0, w0 = time.perf_counter(), time.time()
                    lifecycle.run(cfg, None, tracker=MlflowTracker(uri, exp), tags=tags, progress=False)
                    wall, w1 = time.perf_counter() - t0, time.time()
                finally:
                    torch.set_num_threads(threads)
                rd = lifecycle.locate(cfg)
                trained = int(rd.meta().get("starts", 0)) == 1
            else:
                t0, w0 = time.perf_counter(), time.time()
                out = ray.get(task.remote(cfg.to_dict(), uri, exp, tags))
                wall, w1 = time.perf_counter() - t0, time.time()
                if out["error"]:
                    raise RuntimeError(f"the Ray trial failed: {out['error']}")
                rd, trained = RunDir(out["run_dir"]), bool(out["trained"])
            if not trained:
                raise RuntimeError(f"{mode} run {rd.path} did not train (found finished?)")
            pair[mode] = {"wall_s": wall, "steady_tokens_per_s": rd.steady_tokens_per_s(),
                          "whole_run_tokens_per_s": rd.results()[M.TRAIN_THROUGHPUT], "trained": trained,
                          "phases": phases(rd.path, w0, w1)}
        pair["overhead"] = pair["ray"]["wall_s"] / pair["local"]["wall_s"] - 1
        lo_tps, ra_tps = pair["local"]["steady_tokens_per_s"], pair["ray"]["steady_tokens_per_s"]
        pair["steady_tokens_per_s_overhead"] = lo_tps / ra_tps - 1
        pair["load_average_1m"] = os.getloadavg()[0]
        pairs.append(pair)
        print(f"trial pair {rep}: local {pair['local']['wall_s']:.1f} s, Ray {pair['ray']['wall_s']:.1f} s, "
              f"overhead {100 * pair['overhead']:+.1f}%", flush=True)
    threads = ray.get(ray.remote(lambda: __import__("torch").get_num_threads()).options(num_cpus=1).remote())
    over = [p["overhead"] for p in pairs]
    med = statistics.median(over)
    return {"config": f"demo-sized: rattention w=64, 4 layers, d_model 128, 4 heads, 2 kv heads, T=512, batch 8, "
                      f"fp32, {steps} steps, log every {log_every}, no checkpoints, evaluation off, MLflow tracking",
            "steps": steps, "log_every": log_every, "ray_task_torch_threads": threads, "pairs": pairs,
            "median_overhead": med, "min_overhead": min(over), "max_overhead": max(over),
            "median_local_wall_s": statistics.median(p["local"]["wall_s"] for p in pairs),
            "median_ray_wall_s": statistics.median(p["ray"]["wall_s"] for p in pairs),
            "target": TARGET, "met": med < TARGET}


# ----- output --------------------------------------------------------------------------------------------

def sweep_table(a: dict[str, Any]) -> list[str]:
    lines = ["| parallel | trials | wall s (median) | wall s (min-max) | speed-up vs P=1 |", "|---|---|---|---|---|"]
    for p in ("1", "2"):
        trials = sorted({r["trials"] for r in a["runs"] if str(r["parallel"]) == p})
        sp = a["median_wall_s"]["1"] / a["median_wall_s"][p]
        lines.append(f"| {p} | {', '.join(map(str, trials))} | {a['median_wall_s'][p]:.1f} | "
                     f"{a['min_wall_s'][p]:.1f}-{a['max_wall_s'][p]:.1f} | {sp:.2f}x |")
    return [*lines, ""]


def trial_tables(b: dict[str, Any]) -> list[str]:
    lines = ["| pair | local wall s | Ray wall s | overhead | local / Ray steady tok/s | Ray start-up s "
             "(submit to run open; local) |", "|---|---|---|---|---|---|"]
    for p in b["pairs"]:
        lo, ra = p["local"], p["ray"]
        lines.append(f"| {p['repeat']} | {lo['wall_s']:.1f} | {ra['wall_s']:.1f} | {100 * p['overhead']:+.1f}% | "
                     f"{lo['steady_tokens_per_s']:.0f} / {ra['steady_tokens_per_s']:.0f} | "
                     f"{ra['phases']['to_open_s']:.2f} ({lo['phases']['to_open_s']:.2f}) |")
    verdict = "met" if b["met"] else "not met"
    lines += [f"| **median** | {b['median_local_wall_s']:.1f} | {b['median_ray_wall_s']:.1f} | "
              f"**{100 * b['median_overhead']:+.1f}%** (range {100 * b['min_overhead']:+.1f}% to "
              f"{100 * b['max_overhead']:+.1f}%) | | target < {100 * TARGET:.0f}%: **{verdict}** |", ""]
    names = list(b["pairs"][0]["local"]["phases"])
    lines += ["Phases of each run (median s, local / Ray), from the run folder's timestamps:", "",
              "| " + " | ".join(n.removesuffix("_s").replace("_", " ") for n in names) + " |",
              "|" + "---|" * len(names)]
    cells = []
    for n in names:
        lo = statistics.median(p["local"]["phases"][n] for p in b["pairs"])
        ra = statistics.median(p["ray"]["phases"][n] for p in b["pairs"])
        cells.append(f"{lo:.2f} / {ra:.2f}")
    return [*lines, "| " + " | ".join(cells) + " |", ""]


def tables(rec: dict[str, Any]) -> list[str]:
    a, b = rec["parts"].get("sweep"), rec["parts"].get("trial")
    return (sweep_table(a) if a else []) + (trial_tables(b) if b else [])


def command(rec: dict[str, Any]) -> str:
    s = rec["setup"]
    parts = ["python benchmarks/bench_sweep.py", f"--repeats-sweep {s['repeats_sweep']}",
             f"--repeats-trial {s['repeats_trial']}", f"--trial-steps {s['trial_steps']}"]
    parts += [f for f in ("--skip-sweep", "--skip-trial") if s.get(f.strip("-").replace("-", "_"))]
    return " ".join(parts)


def section(rec: dict[str, Any], json_path: Path) -> str:
    p, s = rec["provenance"], rec["setup"]
    a, b = rec["parts"].get("sweep"), rec["parts"].get("trial")
    jp = json_path.relative_to(ROOT) if json_path.is_relative_to(ROOT) else json_path
    lines = [START, "## Sweep wall time and a trial's Ray overhead: `python benchmarks/bench_sweep.py`", "",
             f"Command: `{command(rec)}` (`{jp}`). Recorded {p['date']} at commit {p['commit']} on {p['device']}, "
             f"{p['cpu_count']} cores, torch {p['torch']}; local Ray with {s['ray_cpus']:.0f} CPUs and a local "
             f"MLflow server, both started before any timing (Ray {s['ray_start_s']:.1f} s, MLflow "
             f"{s['mlflow_start_s']:.1f} s); 1-minute load average at the end {s['load_average_1m_end']:.1f}.", ""]
    if a:
        lines += [f"### Integration sweep ({a['spec']}), {s['repeats_sweep']} runs per P, alternating", ""]
        lines += sweep_table(a)
    if b:
        lines += [f"### One trial on Ray against the same run in-process ({b['config']})", "",
                  f"Local: `rattention.lifecycle.run` in the benchmark's process, `torch.set_num_threads(1)`. Ray: "
                  f"`sweeps.driver.run_trial` as a task with `num_cpus=1` (torch threads in such a task: "
                  f"{b['ray_task_torch_threads']}). Alternating pairs, a fresh run folder each; whole wall time.", ""]
        lines += trial_tables(b)
    lines += notes(rec) + [END]
    return "\n".join(lines) + "\n"


def notes(rec: dict[str, Any]) -> list[str]:
    """The lines on what the figures show, from the figures."""
    a, b = rec["parts"].get("sweep"), rec["parts"].get("trial")
    out = []
    if a:
        med = a["median_wall_s"]
        out.append(f"- The integration sweep takes {med['1']:.0f} s at P = 1 and {med['2']:.0f} s at P = 2 on "
                   f"{rec['provenance']['cpu_count']} cores: {a['speedup_p1_over_p2']:.2f}x. Both run the same "
                   "trials (the search has one slot per kind at either P), so the difference is concurrency alone.")
    if b:
        lo, ra = b["median_local_wall_s"], b["median_ray_wall_s"]
        ph = {n: statistics.median(p["ray"]["phases"][n] - p["local"]["phases"][n] for p in b["pairs"])
              for n in b["pairs"][0]["local"]["phases"]}
        top = max(ph, key=lambda n: abs(ph[n]))
        out.append(f"- A {lo:.0f} s trial costs {ra:.0f} s on Ray: {100 * b['median_overhead']:+.1f}% (median of "
                   f"{len(b['pairs'])} pairs), {'within' if b['met'] else 'above'} the {100 * TARGET:.0f}% target. "
                   f"The largest per-phase difference (Ray - local, median) is {ph[top]:+.2f} s in "
                   f"`{top.removesuffix('_s')}`.")
    return [*out, ""] if out else []


def write_markdown(path: Path, text: str) -> None:
    """Replace this script's section of ``path`` (between its markers), keeping everything else."""
    old = path.read_text() if path.is_file() else "# Sweep benchmarks\n\n"
    if START in old and END in old:
        head, rest = old.split(START, 1)
        tail = rest.split(END, 1)[1]
        new = head + text.rstrip("\n") + tail
    else:
        new = old.rstrip("\n") + "\n\n" + text
    path.write_text(new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats-sweep", type=int, default=2, help="runs of the sweep per P (alternating P=1, P=2)")
    ap.add_argument("--repeats-trial", type=int, default=3, help="local/Ray pairs of the trial")
    ap.add_argument("--trial-steps", type=int, default=30, help="training steps of the trial config")
    ap.add_argument("--trial-log-every", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sweep.json"))
    ap.add_argument("--md", default=str(ROOT / "benchmarks" / "sweep.md"), help="markdown file for the section")
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--skip-trial", action="store_true")
    args = ap.parse_args()

    import ray

    from pipelines.ray_utils import init_ray
    from pipelines.tracking import local_server
    from rattention.provenance import provenance

    cores = os.cpu_count() or 1
    parts: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp_name:
        tmp = Path(tmp_name)
        t0 = time.perf_counter()
        with local_server(tmp / "mlflow") as uri:
            mlflow_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            resources = init_ray(num_cpus=cores, log_to_driver=False, logging_level="ERROR")
            ray_s = time.perf_counter() - t0
            try:
                if not args.skip_sweep:
                    parts["sweep"] = part_sweep(tmp, uri, args.repeats_sweep)
                if not args.skip_trial:
                    parts["trial"] = part_trial(tmp, uri, args.repeats_trial, args.trial_steps, args.trial_log_every)
            finally:
                ray.shutdown()
    rec = {"benchmark": "sweep", "provenance": provenance(),
           "setup": {"ray_cpus": resources.get("CPU", 0), "ray_start_s": ray_s, "mlflow_start_s": mlflow_s,
                     "repeats_sweep": args.repeats_sweep, "repeats_trial": args.repeats_trial,
                     "trial_steps": args.trial_steps, "trial_log_every": args.trial_log_every,
                     "skip_sweep": args.skip_sweep, "skip_trial": args.skip_trial,
                     "load_average_1m_end": os.getloadavg()[0],
                     "timed": "Part A: sweeps.driver.sweep(spec, progress=False), Ray and MLflow already up; "
                              "Part B: the whole run, lifecycle.run in-process vs ray.get of run_trial as a task"},
           "parts": parts}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=2) + "\n")
    write_markdown(Path(args.md), section(rec, out))
    print("\n" + "\n".join(tables(rec) + notes(rec)))


if __name__ == "__main__":
    main()
