"""The demo job: the whole pipeline on the embedded default corpus, small enough for a laptop CPU.

1. tokenize the interpreter's standard-library sources into WebDataset shards (a Ray Data job);
2. train the demo model three ways on Ray Train: full attention, SWA and RAttention at one window;
3. evaluate each (validation loss, loss by position, copy at distance, synthetic recall, cache bytes);
4. log everything to MLflow (one parent run, a child run per model) and print a comparison table.

Re-running is cheap: the dataset is reused by fingerprint.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rattention import metrics as M

ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"


def variants(window: int) -> list[tuple[str, list[str]]]:
    """(label, overrides): the three kinds the platform compares."""
    return [
        ("full", ["model.kind=full"]),
        (f"swa w={window}", ["model.kind=swa", f"model.window={window}"]),
        (f"rattention w={window}", ["model.kind=rattention", f"model.window={window}"]),
    ]


def run_demo(workdir: str | Path = ".rattention/demo", steps: int = 120, window: int = 32,
             num_cpus: int | None = None) -> list[dict[str, Any]]:
    """Run the demo; return one results dict per model (also printed as a table)."""
    import ray

    from pipelines import tracking
    from pipelines.tokenize import make_config, prepare
    from pipelines.train import fit
    from rattention.run_config import load_run_config

    work = Path(workdir).resolve()
    t0 = time.perf_counter()
    print(f"[1/3] tokenizing the standard-library sources into {work / 'data' / 'stdlib'}", flush=True)
    manifest = prepare(make_config(sources=["stdlib"], out=str(work / "data" / "stdlib"), vocab_size=8192,
                                   num_cpus=num_cpus))
    ray.shutdown()  # training starts its own local Ray, with the dashboard Ray Train needs
    rows: list[dict[str, Any]] = []
    with tracking.tracking_uri(None, work / "mlflow") as uri:
        c = tracking.client(uri)
        parent = tracking.start_run(c, "rattention-demo", f"demo-{time.strftime('%Y%m%d-%H%M%S')}",
                                    {M.TAG_WINDOW: str(window)},
                                    {"steps": steps, "window": window, "dataset": manifest["fingerprint"]})
        status = "FAILED"
        try:
            for i, (label, overrides) in enumerate(variants(window), start=1):
                print(f"[2/3] training {i}/3: {label} ({steps} steps)", flush=True)
                cfg = load_run_config(DEMO_CONFIG, [
                    *overrides, f"data.path={work / 'data' / 'stdlib'}", f"train.steps={steps}",
                    f"train.warmup_steps={max(1, steps // 10)}", f"train.checkpoint_every={max(1, steps // 2)}",
                    f"train.out_dir={work / 'runs'}", f"tracking.uri={uri}", "tracking.experiment=rattention-demo",
                    # the same distances for every model: below and above the local window
                    f"eval.copy_distances=[{window // 2},{window * 2}]",
                ])
                results = fit(cfg, DEMO_CONFIG, extra_tags={M.TAG_PARENT: parent})
                rows.append({"model": label, "window": cfg.model.window, **results})
            table = format_table(rows, window)
            (work / "comparison.md").write_text(table + "\n")
            c.log_artifact(parent, str(work / "comparison.md"))
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            tracking.end_run(c, parent, status)
    print(f"[3/3] done in {time.perf_counter() - t0:.0f} s\n")
    print(table)
    print(f"\nMLflow: experiment 'rattention-demo' in {work / 'mlflow'}; browse it with\n"
          f"  .venv/bin/mlflow ui --backend-store-uri sqlite:///{work / 'mlflow' / 'mlflow.db'}")
    return rows


def format_table(rows: list[dict[str, Any]], window: int) -> str:
    """The comparison as markdown: quality, long-range recall and efficiency, one row per model."""
    near, far = window // 2, window * 2
    cols = [
        ("val loss", M.VAL_LOSS, "{:.3f}"),
        (f"copy d={near}", M.copy_loss(near), "{:.3f}"),
        (f"copy d={far}", M.copy_loss(far), "{:.3f}"),
        ("cache@32K MB", M.cache_bytes_at(32768), "{:.2f}"),
        ("train tok/s", M.TRAIN_THROUGHPUT, "{:,.0f}"),
        ("decode tok/s", M.DECODE_THROUGHPUT, "{:,.0f}"),
    ]
    lines = ["| model | " + " | ".join(c[0] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in rows:
        cells = []
        for _, key, fmt in cols:
            v = r.get(key)
            if v is None:
                cells.append("-")
            else:
                cells.append(fmt.format(v / 2**20 if key == M.cache_bytes_at(32768) else v))
        lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
