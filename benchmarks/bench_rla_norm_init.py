"""Settle ``model.rla_norm_init``, the starting scale of RAttention's linear-branch output norm, over seeds.

At 0 the branch's output is zero and its q and k get no gradient until the scale moves; at the paper's
1.0 it contributes from the first step. Two objectives, each over seeds:

- **Text** (``stdlib``): the demo model (4 layers ``LLLG``, d_model 128, T=512, w=64) trained by the
  project's own loop (``rattention.train.train``) and scored by ``rattention.evaluate``: validation loss,
  the loss at positions 256.. (beyond the window), and the loss on a text span repeated 128 tokens later
  (``eval/copy_loss_d128``, evidence outside the window). SWA at the same window is the reference.
- **Copy** (``rattention.tasks.copy``, only local layers: layout ``L``, 2 layers, vocab 256), the answer
  loss and accuracy by ``benchmarks/bench_copy_window.py``'s trainer, in three settings:
  span 64 right after itself (evidence 64 back) at w=16 (beyond two stacked windows) and w=32 (at their
  reach); span 8 after 24 filler tokens (evidence 32 back) at w=4 and 8; span 16 after 48 filler tokens
  (evidence 64 back) at w=8 and 16. SWA at the same window is the reference.

    python benchmarks/bench_rla_norm_init.py --data data/stdlib --device cuda --workers 10 --record
    python benchmarks/bench_rla_norm_init.py --render run1.json run2.json --record   # tables from saved rows

``--record`` writes ``benchmarks/results/rla_norm_init.json`` and ``benchmarks/rla_norm_init.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

RESULTS = ROOT / "benchmarks" / "results" / "rla_norm_init.json"
TABLE = ROOT / "benchmarks" / "rla_norm_init.md"
TEXT_METRICS = ("eval/val_loss", "eval/val_loss_pos_256_end", "eval/copy_loss_d128")
COPY_SETTINGS = ((64, 0, (16, 32)), (8, 24, (4, 8)), (16, 48, (8, 16)))  # span, gap, windows


def text_point(job: dict[str, Any]) -> dict[str, Any]:
    """One text run: the demo model on the dataset, trained and evaluated by the project's own code."""
    import torch

    from rattention.evaluate import evaluate
    from rattention.run_config import load_run_config
    from rattention.train import train

    if job["device"] == "cpu":
        torch.set_num_threads(1)
    over = [f"data.path={job['data']}", f"model.kind={job['kind']}", f"model.window={job['window']}",
            f"model.rla_norm_init={job['rla_norm_init']}", f"train.seed={job['seed']}", f"train.steps={job['steps']}",
            f"train.warmup_steps={job['steps'] // 10}", "train.checkpoint_every=0", f"train.device={job['device']}",
            f"data.batch_size={job['batch']}", "eval.val_batches=16", "eval.copy_distances=[128]",
            "eval.copy_samples=32", "eval.tasks=[]", "eval.decode_tokens=0", "eval.buckets=[0,64,256]",
            "tracking.system_metrics=false"]
    cfg = load_run_config(ROOT / "configs" / "demo.yaml", over)
    t0 = time.perf_counter()
    model, result = train(cfg, progress=False)
    out = evaluate(model, cfg)
    row = {k: job[k] for k in ("kind", "window", "seed", "rla_norm_init", "steps", "batch")}
    row.update({m: out[m] for m in TEXT_METRICS}, task="text", train_loss=result.loss,
               train_s=time.perf_counter() - t0, tokens=result.tokens)
    return row


def run(job: dict[str, Any]) -> dict[str, Any]:
    if job["task"] == "text":
        return text_point(job)
    from bench_copy_window import train_point

    return {**train_point(job), "task": "copy"}


def mean_sd(xs: list[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.fmean(xs):.3f} ± {sd:.3f}"


def tables(rows: list[dict[str, Any]]) -> str:
    """The text table and the copy table (mean ± sample sd over seeds)."""
    out = []
    text = [r for r in rows if r.get("task") == "text"]
    if text:
        out += ["Text (stdlib), the demo model, by the project's training loop and evaluation:", "",
                "| kind | rla_norm_init | window | steps | val loss | loss pos 256.. | copy loss d=128 | seeds |",
                "|---|---|---|---|---|---|---|---|"]

        def key(r: dict[str, Any]) -> tuple:
            return r["kind"], r["rla_norm_init"] if r["kind"] == "rattention" else -1, r["window"], r["steps"]

        for k in sorted({key(r) for r in text}):
            g = [r for r in text if key(r) == k]
            init = f"{k[1]:g}" if k[0] == "rattention" else "-"
            out.append(f"| {k[0]} | {init} | {k[2]} | {k[3]} | " + " | ".join(mean_sd([r[m] for r in g])
                       for m in TEXT_METRICS) + f" | {len(g)} |")
    copy = [r for r in rows if r.get("task", "copy") == "copy"]
    if copy:
        from bench_copy_window import summarise

        out += ["", "Copy (layout L, 2 layers), answer loss and accuracy on 64-128 held-out samples:", "",
                summarise(copy)]
    return "\n".join(out)


def record(records: list[dict[str, Any]], rows: list[dict[str, Any]]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"benchmark": "rla_norm_init", "sources": records, "rows": rows}, indent=1) + "\n")
    sources = "\n".join(f"- {r['provenance']['device']}, torch {r['provenance']['torch']}, commit "
                        f"{r['provenance']['commit']}, {r['provenance']['date']}: {r.get('what', '')}" for r in records)
    from rattention.provenance import write_section

    write_section(TABLE, "rla_norm_init", f"Sources:\n{sources}\n\n{tables(rows)}",
                  title="# rla_norm_init: the linear branch's starting output scale")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT / "data" / "stdlib")
    p.add_argument("--device", default="cuda")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--inits", default="0,0.1,1.0", type=lambda s: [float(x) for x in s.split(",")])
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--text-steps", type=int, default=1500)
    p.add_argument("--text-batch", type=int, default=16)
    p.add_argument("--copy-steps", type=int, default=1500)
    p.add_argument("--no-text", action="store_true", help="only the copy settings (no dataset needed)")
    p.add_argument("--out", type=Path, default=None, help="also write the rows (JSON) here, after every run")
    p.add_argument("--render", type=Path, nargs="+", default=None,
                   help="no runs: print (and with --record, write) the tables of these saved JSON files")
    p.add_argument("--record", action="store_true")
    args = p.parse_args(argv)
    if args.render:
        records, rows = [], []
        for path in args.render:
            rec = json.loads(path.read_text())
            records.append({"file": path.name, "provenance": rec["provenance"], "args": rec.get("args"),
                            "what": rec.get("benchmark", "")})
            dev = "cpu" if rec["provenance"]["device"].startswith("cpu") else "cuda"
            rows += [{**r, "task": r.get("task") or ("text" if "eval/val_loss" in r else "copy"),
                      "device": r.get("device", dev)} for r in rec["rows"]]
        print(tables(rows))
        if args.record:
            record(records, rows)
        return
    jobs: list[dict[str, Any]] = []
    for seed in range(args.seeds):
        if not args.no_text:
            base = dict(task="text", data=str(args.data.resolve()), window=64, seed=seed, steps=args.text_steps,
                        batch=args.text_batch, device=args.device)
            jobs.append({**base, "kind": "swa", "rla_norm_init": 0.0})
            jobs += [{**base, "kind": "rattention", "rla_norm_init": v} for v in args.inits]
        for span, gap, windows in COPY_SETTINGS:
            cbase = dict(task="copy", span=span, gap=gap, seq_len=2 * span + gap + 2, vocab=256, n_layers=2,
                         layout="L", d_model=128, steps=args.copy_steps, batch=16, lr=3e-3,
                         warmup=min(30, args.copy_steps // 10), device=args.device, eval_every=250,
                         eval_samples=128, seed=seed)
            for w in windows:
                jobs.append({**cbase, "kind": "swa", "window": w, "rla_norm_init": 0.0})
                jobs += [{**cbase, "kind": "rattention", "window": w, "rla_norm_init": v} for v in args.inits]
    print(f"{len(jobs)} runs on {args.device}, {args.workers} workers", flush=True)
    t0 = time.perf_counter()
    import multiprocessing as mp

    from rattention.provenance import provenance

    rows: list[dict[str, Any]] = []
    rec = {"benchmark": "rla_norm_init", "provenance": provenance(),
           "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "rows": rows}
    with ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn")) as pool:
        for fut in as_completed([pool.submit(run, j) for j in jobs]):
            r = fut.result()
            rows.append(r)
            print("  " + json.dumps({k: v for k, v in r.items() if k != "curve"}), flush=True)
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(rec, indent=1))
    print(tables(rows))
    print(f"wall {time.perf_counter() - t0:.0f} s")
    if args.record:
        record([{"file": RESULTS.name, "provenance": rec["provenance"], "args": rec["args"], "what": "this run"}],
               rows)


if __name__ == "__main__":
    main()
