"""CPU training tokens/s of the demo model (4 layers, d_model 128, 4 heads, 2 kv heads, T=512, w=64)
for full / swa / rattention, in plain local mode and through Ray Train (1 worker), in one run.

    python benchmarks/bench_train.py [--steps 50] [--out benchmarks/results/train.json]

Writes the JSON (with device, versions, commit and date) and ``benchmarks/train.md``. Both modes train
on the same random-token dataset with the same config; the Ray path is the real ``rattention train``
job (``pipelines.train.fit``) with a local MLflow server, evaluation off. Tokens/s is the steady rate:
every logged interval but the first 10 steps (``RunDir.steady_tokens_per_s``), in both modes; the
whole-run rate (first step excluded) is recorded beside it. The Ray worker gets all the machine's
cores (``ray.cpus_per_worker``), since Ray sets a worker's torch threads from its CPU reservation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

KINDS = ("full", "swa", "rattention")
DEMO = ["model.vocab_size=8192", "model.d_model=128", "model.n_layers=4", "model.n_heads=4",
        "model.n_kv_heads=2", "model.head_dim=32", "model.layout=LLLG", "model.window=64", "model.seq_len=512"]


def random_dataset(folder: Path, vocab: int = 8192, docs: int = 120, length: int = 3000) -> Path:
    from tests.conftest import write_token_dataset

    rng = np.random.default_rng(0)
    data = {"train": [rng.integers(1, vocab, size=length) for _ in range(docs)],
            "val": [rng.integers(1, vocab, size=length) for _ in range(8)]}
    return write_token_dataset(folder, data, vocab, 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50, help="at least 30: the first 10 are the warm-up")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated, in the order to run")
    ap.add_argument("--repeats", type=int, default=2, help="alternating local/Ray runs per kind; best of each")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train.json"))
    args = ap.parse_args()

    from pipelines.ray_utils import init_ray
    from pipelines.tracking import local_server
    from pipelines.train import fit
    from rattention import lifecycle
    from rattention import metrics as M
    from rattention.provenance import provenance
    from rattention.run_config import load_run_config
    from rattention.rundir import RunDir

    cores = os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp, local_server(Path(tmp) / "mlflow") as uri:
        ds = random_dataset(Path(tmp) / "ds")
        init_ray(num_cpus=cores, dashboard=True)
        for kind in args.kinds.split(","):
            over = [f"data.path={ds}", *DEMO, f"model.kind={kind}", f"data.batch_size={args.batch}",
                    f"train.steps={args.steps}", "train.warmup_steps=2", "train.log_every=10",
                    "train.checkpoint_every=0", "eval.enabled=false", f"tracking.uri={uri}",
                    "tracking.experiment=bench-train", f"ray.cpus_per_worker={cores}"]
            cfg = load_run_config(None, over)
            best: dict[str, float] = {"local": 0.0, "ray": 0.0}
            whole: dict[str, float] = {"local": 0.0, "ray": 0.0}
            wall: dict[str, float] = {}
            for rep in range(args.repeats):  # alternate, so drift on a shared machine hits both paths
                for mode in ("local", "ray"):
                    run_dir = Path(tmp) / f"{mode}-{kind}-{rep}"
                    t0 = time.perf_counter()
                    res = lifecycle.run(cfg, run_dir, progress=False) if mode == "local" else fit(cfg, run_dir=run_dir)
                    wall[mode] = time.perf_counter() - t0
                    best[mode] = max(best[mode], RunDir(run_dir).steady_tokens_per_s())
                    whole[mode] = max(whole[mode], res[M.TRAIN_THROUGHPUT])
            a, b, t_local, t_ray = best["local"], best["ray"], wall["local"], wall["ray"]
            rows.append({"kind": kind, "local_tokens_per_s": a, "ray_tokens_per_s": b,
                         "ray_overhead": a / b - 1, "local_wall_s": t_local, "ray_wall_s": t_ray,
                         "whole_run_local_tokens_per_s": whole["local"], "whole_run_ray_tokens_per_s": whole["ray"],
                         "whole_run_ray_overhead": whole["local"] / whole["ray"] - 1})
            print(f"{kind:<11} local {a:8.0f} tok/s   ray train {b:8.0f} tok/s   overhead {100 * (a / b - 1):+.1f}%  "
                  f"(wall {t_local:.1f} s / {t_ray:.1f} s)", flush=True)
    import ray as ray_mod

    ray_mod.shutdown()
    record = {"benchmark": "train_cpu", **provenance(), "load_average_1m": os.getloadavg()[0],
              "setup": {"model": "demo: 4 layers, d_model 128, 4 heads, 2 kv heads, T=512, w=64, fp32",
                        "batch": args.batch, "steps": args.steps, "repeats": args.repeats, "ray_workers": 1,
                        "ray_cpus_per_worker": cores,
                        "timed": "steady: steps 11..N (the first logged interval is warm-up); whole run: steps 2..N"},
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    write_markdown(record, ROOT / "benchmarks" / "train.md", Path(args.out))


def write_markdown(rec: dict, path: Path, json_path: Path) -> None:
    lines = [
        "# CPU training throughput: plain torch against Ray Train",
        "",
        f"Command: `python benchmarks/bench_train.py --steps {rec['setup']['steps']} "
        f"--repeats {rec['setup'].get('repeats', 1)}` (best tokens/s of alternating runs; "
        f"demo model, batch {rec['setup']['batch']} x 512, fp32, AdamW; Ray Train with 1 worker holding "
        f"{rec['setup']['ray_cpus_per_worker']} CPUs, through the real `rattention train` job with MLflow "
        "logging every 10 steps; steady tokens/s over steps 11..N, where the first logged interval is "
        "the warm-up in both modes).",
        "",
        f"Recorded {rec['date']} at commit {rec['commit']} on {rec['device']}, torch {rec['torch']}; "
        f"1-minute load average at the end: {rec.get('load_average_1m', float('nan')):.1f} "
        f"(above the core count the figures are noise from other processes; re-run on an idle machine).",
        "",
        "| kind | local tokens/s | Ray Train tokens/s | Ray Train overhead | whole-run overhead (steps 2..N) "
        "| wall s local / Ray |",
        "|---|---|---|---|---|---|",
    ]
    for r in rec["rows"]:
        whole = f"{100 * r['whole_run_ray_overhead']:+.1f}%" if "whole_run_ray_overhead" in r else "-"
        lines.append(f"| {r['kind']} | {r['local_tokens_per_s']:.0f} | {r['ray_tokens_per_s']:.0f} | "
                     f"{100 * r['ray_overhead']:+.1f}% | {whole} | {r['local_wall_s']:.1f} / {r['ray_wall_s']:.1f} |")
    lines += ["", "Target: Ray Train's overhead on tokens/s under 10%. The wall-clock column includes Ray's "
              "start-up of the worker group (seconds, once per run), which the tokens/s figures exclude. The "
              "whole-run column also counts steps 2-10, while Ray Train's control actors are still starting "
              "beside the worker.",
              f"JSON: `{json_path.relative_to(ROOT) if json_path.is_relative_to(ROOT) else json_path}`.", ""]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
