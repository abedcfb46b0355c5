"""The copy task's window signal: answer loss and accuracy by kind, window and seed (the demo's settings).

A random span of ``span`` tokens, ``gap`` filler tokens, then the span again (``rattention.tasks.copy``);
the loss is on the copy only (as ``data.answer_only`` trains a synthetic dataset). With only local
layers (layout ``L``) each answer's evidence lies ``span + gap`` tokens before the position predicting
it, so plain SWA copies only where a window, or windows stacked over the layers, reaches that far: the
minimal window is known by construction. The full baseline (RoPE on every layer) sees everything;
RAttention's linear branch covers what lies outside its window.

Each point trains in-process on the configured device with the project's model, optimizer and schedule
(``rattention.model``, ``rattention.optim``), on fresh task samples (as a synthetic dataset of
steps x batch samples would give), and is scored like ``rattention.evaluate.task_metrics`` (seed 1234
samples, every answer). Points run in parallel worker processes (several per GPU).

    python benchmarks/bench_copy_window.py --device cuda --workers 12 --span 64 --windows 16,32,48,64,96
    python benchmarks/bench_copy_window.py --render a.json b.json --record   # tables of saved runs, recorded

``--record`` writes ``benchmarks/results/copy_window.json`` and ``benchmarks/copy_window.md``.

Timings taken on a GPU say nothing about the CPU; the table is about the signal.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "copy_window.json"
TABLE = ROOT / "benchmarks" / "copy_window.md"


def copy_batches(vocab_size: int, seq_len: int, span: int, gap: int, seed: int, start: int, stop: int):
    """Tokens (n, T) and answer masks (n, T) of copy samples ``start..stop-1`` (sample i depends on (seed, i))."""
    import numpy as np

    from rattention.tasks import TaskVocab, generate

    samples = list(generate("copy", TaskVocab(vocab_size, (0,)), seq_len, seed, start, stop, span=span, gap=gap))
    return np.stack([s.tokens for s in samples]), np.stack([s.mask for s in samples])


def train_point(job: dict[str, Any]) -> dict[str, Any]:
    """Train one (kind, window, seed, ...) point on the copy task; return its answer loss/acc curve."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from rattention.config import ModelConfig
    from rattention.evaluate import task_scores
    from rattention.model import LM
    from rattention.optim import build_optimizer, build_scheduler
    from rattention.run_config import TrainConfig

    dev = torch.device(job["device"])
    if dev.type == "cpu":
        torch.set_num_threads(job.get("threads", 1))
    T, V, B, S = job["seq_len"], job["vocab"], job["batch"], job["steps"]
    torch.manual_seed(job["seed"])
    mc = ModelConfig(vocab_size=V, d_model=job["d_model"], n_layers=job["n_layers"], n_heads=job["d_model"] // 32,
                     n_kv_heads=max(1, job["d_model"] // 64), head_dim=32, layout=job["layout"], kind=job["kind"],
                     window=job["window"] if job["kind"] != "full" else 64, seq_len=T,
                     rla_norm_init=job["rla_norm_init"])
    model = LM(mc).to(dev)
    tc = TrainConfig(steps=S, lr=job["lr"], warmup_steps=job["warmup"], seed=job["seed"])
    opt = build_optimizer(model, tc)
    sched = build_scheduler(opt, tc)
    # the training samples: data seed 0, as `rattention data synth` writes them; each run sees them in its own order
    toks, masks = copy_batches(V, T, job["span"], job["gap"], 0, 0, S * B)
    order = np.random.default_rng(job["seed"]).permutation(S * B)
    toks, masks = torch.from_numpy(toks[order]).long(), torch.from_numpy(masks[order])
    inputs = toks
    targets = torch.cat([toks[:, 1:], torch.zeros(len(toks), 1, dtype=torch.long)], 1)  # the EOS that ends a window
    keep = torch.cat([masks[:, 1:], torch.zeros(len(toks), 1, dtype=torch.bool)], 1)
    targets[~keep] = -100
    evals = {}
    for mult in job.get("eval_lengths", [1]):  # the same samples at multiples of T, as task_metrics makes them
        ev_toks, ev_masks = copy_batches(V, mult * T, job["span"], job["gap"], 1234, 0, job["eval_samples"])
        evals[mult] = (torch.from_numpy(ev_toks).long(), [np.flatnonzero(m) for m in ev_masks])

    def score(mult: int = 1) -> tuple[float, float]:
        model.eval()
        acc, loss = task_scores(model, *evals[mult], dev, batch_size=64)
        model.train()
        return acc, loss

    curve = []
    t0 = time.perf_counter()
    losses = []
    for step in range(1, S + 1):
        x = inputs[(step - 1) * B : step * B].to(dev, non_blocking=True)
        y = targets[(step - 1) * B : step * B].to(dev, non_blocking=True)
        loss = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        if step % job["eval_every"] == 0 or step == S:
            acc, ev_loss = score()
            tr = float(torch.stack(losses[-job["eval_every"]:]).mean())
            curve.append({"step": step, "train_loss": tr, "answer_loss": ev_loss, "answer_acc": acc})
    secs = time.perf_counter() - t0
    lengths = {f"acc_len{m}x": score(m)[0] for m in evals if m != 1}
    out = {k: job[k] for k in KEYS}
    out.update(lengths, device=job["device"])
    out.update(curve=curve, answer_loss=curve[-1]["answer_loss"], answer_acc=curve[-1]["answer_acc"],
               train_s=secs, s_per_step=secs / S, chance=math.log(V - 5))
    if not math.isfinite(out["answer_loss"]):
        out["answer_loss"] = float("nan")
    return out


KEYS = ("kind", "window", "seed", "rla_norm_init", "span", "gap", "seq_len", "vocab", "n_layers", "layout",
        "d_model", "steps", "batch", "lr", "warmup")


def jobs_from(args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for span, gap, steps, batch, init in itertools.product(args.span, args.gap, args.steps, args.batch,
                                                            args.rla_norm_init):
        T = args.seq_len or 2 * span + gap + 2
        base = dict(span=span, gap=gap, seq_len=T, vocab=args.vocab, n_layers=args.n_layers, layout=args.layout,
                    d_model=args.d_model, steps=steps, batch=batch, lr=args.lr, warmup=args.warmup,
                    device=args.device, eval_every=args.eval_every, eval_samples=args.eval_samples,
                    eval_lengths=args.eval_lengths,
                    rla_norm_init=init)
        kinds = list(args.kinds)
        for seed in range(args.seeds):
            if "full" in kinds and init == args.rla_norm_init[0]:
                out.append({**base, "kind": "full", "window": None, "seed": seed})
            for kind in kinds:
                if kind == "full" or (kind == "swa" and init != args.rla_norm_init[0]):
                    continue
                for w in args.windows:
                    if w < T:
                        out.append({**base, "kind": kind, "window": w, "seed": seed})
    return out


def summarise(rows: list[dict[str, Any]]) -> str:
    """Mean ± spread over seeds of the final answer loss and accuracy, one line per point (and ``device``,
    where rows from several machines are mixed), ordered by task, steps, kind, start and window."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((*(r[k] for k in KEYS if k != "seed"), r.get("device", "")), []).append(r)
    kinds = {"full": 0, "swa": 1, "rattention": 2}
    names = [k for k in KEYS if k != "seed"] + ["device"]
    mixed = len({r.get("device", "") for r in rows}) > 1
    lines = ["| span | gap | T | steps | batch | kind | rla_norm_init | window | answer loss (mean ± sd) | "
             "answer acc | acc at 2T, 4T | seeds | s/step |" + (" device |" if mixed else ""),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if mixed else "")]

    def order(key: tuple) -> tuple:
        d = dict(zip(names, key, strict=True))
        return (d["span"], d["gap"], d["steps"], kinds.get(d["kind"], 9), d["rla_norm_init"] if d["kind"] ==
                "rattention" else -1, d["window"] or 0, d["device"])

    for key in sorted(groups, key=order):
        g = groups[key]
        d = dict(zip(names, key, strict=True))
        ls = [r["answer_loss"] for r in g]
        acc = [r["answer_acc"] for r in g]
        sd = statistics.stdev(ls) if len(ls) > 1 else 0.0
        init = "-" if d["kind"] != "rattention" else f"{d['rla_norm_init']:g}"
        lines.append(f"| {d['span']} | {d['gap']} | {d['seq_len']} | {d['steps']} | {d['batch']} | {d['kind']} | "
                     f"{init} | {d['window'] if d['window'] is not None else '-'} | "
                     f"{statistics.fmean(ls):.3f} ± {sd:.3f} | "
                     f"{statistics.fmean(acc):.3f} ({', '.join(f'{a:.2f}' for a in acc)}) | "
                     + (", ".join(f"{statistics.fmean(r[k] for r in g):.2f}" for k in ("acc_len2x", "acc_len4x")
                                  if k in g[0]) or "-") + f" | {len(g)} | "
                     f"{statistics.fmean(r['s_per_step'] for r in g):.4f} |" + (f" {d['device']} |" if mixed else ""))
    return "\n".join(lines)


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--workers", type=int, default=8, help="parallel worker processes")
    p.add_argument("--kinds", default="full,swa,rattention", type=lambda s: s.split(","))
    p.add_argument("--windows", default="16,32,48,64,96", type=ints)
    p.add_argument("--span", default="64", type=ints)
    p.add_argument("--gap", default="0", type=ints)
    p.add_argument("--seq-len", type=int, default=None, help="default: 2 * span + gap + 2")
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--layout", default="L")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--steps", default="600", type=ints)
    p.add_argument("--batch", default="16", type=ints)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--rla-norm-init", default="1.0", type=floats)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-samples", type=int, default=128)
    p.add_argument("--eval-lengths", default="1", type=ints, help="also score at these multiples of T")
    p.add_argument("--out", type=Path, default=None, help="write the rows (JSON) here")
    p.add_argument("--render", type=Path, nargs="+", default=None,
                   help="no runs: print (and with --record, write) the tables of these saved JSON files")
    p.add_argument("--record", action="store_true", help=f"write {RESULTS.relative_to(ROOT)} and {TABLE.name}")
    args = p.parse_args(argv)
    if args.render:
        render(args.render, args.record)
        return
    jobs = jobs_from(args)
    print(f"{len(jobs)} points on {args.device}, {args.workers} workers", flush=True)
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    import multiprocessing as mp

    from rattention.provenance import provenance

    record = {"benchmark": "copy window signal", "provenance": provenance(), "args": {k: (str(v) if isinstance(v, Path)
              else v) for k, v in vars(args).items()}, "rows": rows}
    with ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn")) as pool:
        for fut in as_completed([pool.submit(train_point, j) for j in jobs]):
            r = fut.result()
            rows.append(r)
            print(f"  {r['kind']:10s} w={r['window']} init={r['rla_norm_init']:g} span={r['span']} steps={r['steps']} "
                  f"seed={r['seed']}: answer loss {r['answer_loss']:.3f} acc {r['answer_acc']:.3f} "
                  + "".join(f"{k} {v:.3f} " for k, v in r.items() if k.startswith("acc_len")) +
                  f"({r['s_per_step'] * 1000:.1f} ms/step)", flush=True)
            if args.out:  # after every point, so a run cut short keeps what finished
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(record, indent=1))
    table = summarise(rows)
    print(table)
    print(f"wall {time.perf_counter() - t0:.0f} s")
    if args.record:
        record["command"] = f"python benchmarks/bench_copy_window.py {' '.join(argv or sys.argv[1:])}"
        write_record([record])


def write_record(records: list[dict[str, Any]]) -> None:
    """``results/copy_window.json`` (every run's rows and provenance) and ``copy_window.md`` (a table per run)."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"benchmark": "copy window signal", "runs": records}) + "\n")
    parts = ["Answer loss (nats) and accuracy on held-out copy samples, mean ± sample sd over seeds; chance is "
             "ln 251 = 5.53 nats. Written by `benchmarks/bench_copy_window.py`.", ""]
    for rec in records:
        pv = rec["provenance"]
        parts += [f"## {rec.get('title', rec.get('command', ''))}", "",
                  f"{pv['device']}, torch {pv['torch']}, commit {pv['commit']}, {pv['date']}. "
                  f"`{rec.get('command', '')}`", "", summarise(rec["rows"]), ""]
    from rattention.provenance import write_section

    write_section(TABLE, "copy_window", "\n".join(parts), title="# Copy task: the window signal")


def render(paths: list[Path], write: bool) -> None:
    """Tables of saved runs (``--out`` files); each file's ``title`` (optional) heads its table."""
    records = []
    for path in paths:
        rec = json.loads(path.read_text())
        if "command" not in rec and rec.get("args"):
            a = rec["args"]
            rec["command"] = ("python benchmarks/bench_copy_window.py " + " ".join(
                f"--{k.replace('_', '-')} {','.join(map(str, v)) if isinstance(v, list) else v}"
                for k, v in a.items() if k not in ("out", "record", "render") and v is not None))
        records.append(rec)
        print(f"{path.name}:\n{summarise(rec['rows'])}\n")
    if write:
        write_record(records)


if __name__ == "__main__":
    main()
