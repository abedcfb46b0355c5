"""Decode speed through the cache: full, swa w=4096 and rattention w=512 on the ~125M model (bf16, one
GPU) at contexts 4K, 32K and 128K, batch 1 and 64; the eager static step and its CUDA-graph replay
side by side in the same run, with the real cache's bytes beside ``cache_bytes()``.

    python benchmarks/bench_decode.py                  # on a GPU: benchmarks/results/decode-<device>.json
    python benchmarks/bench_decode.py --quick          # tiny model, CPU is fine: proves the script end to end

A 4K prompt is prefilled for real (one parallel pass, last-position logits). For longer contexts the cache
is filled with random values of the right shapes instead: a decode step's time depends only on the cache's
shapes. Prints a table last.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rattention.cache import BLOCK, ModelCache, cache_bytes  # noqa: E402
from rattention.config import ModelConfig  # noqa: E402
from rattention.generate import EagerStep, GraphStep, stepwise_logits  # noqa: E402
from rattention.model import LM  # noqa: E402
from rattention.provenance import provenance  # noqa: E402

MODEL_125M = dict(vocab_size=32768, d_model=768, n_layers=12, n_heads=6, n_kv_heads=2, head_dim=128,
                  mlp_hidden=3072, layout="LLLG", dtype="bfloat16")
WINDOWS_125M = {"full": 512, "swa": 4096, "rattention": 512}  # full ignores its window
MODEL_QUICK = dict(vocab_size=256, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, mlp_hidden=128,
                   layout="LLLG", dtype="float32")
WINDOWS_QUICK = {"full": 8, "swa": 32, "rattention": 8}
GiB = 2**30


def build(kind: str, window: int, base: dict, device: torch.device) -> LM:
    """A randomly initialised model of ``kind`` (weights do not change the step's time)."""
    cfg = ModelConfig(**base, kind=kind, window=window)
    torch.manual_seed(0)
    with device:
        return LM(cfg).eval()


def needed_bytes(cfg: ModelConfig, capacity: int, batch: int, prefill: int) -> int:
    """Device memory a cell needs: the cache, the step's fp32 scores (a few copies), the prefill's
    activations and a margin."""
    scores = 4 * batch * cfg.n_heads * capacity * 4
    activations = batch * prefill * (3 * cfg.hidden + 8 * cfg.d_model) * 2
    return cache_bytes(cfg, capacity, batch) + scores + activations + GiB


def fill_random(cache: ModelCache, context: int) -> None:
    """A cache after ``context`` tokens, of the right shapes with random contents."""
    for layer in cache.layers:
        for t in layer.tensors():
            t.normal_()
    cache.length = context
    cache.pos.fill_(context)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step, token: torch.Tensor, n: int, device: torch.device) -> tuple[float, torch.Tensor]:
    """Seconds for n greedy decode steps (the argmax on device, no host sync between steps)."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        token = step(token).argmax(-1)
    sync(device)
    return time.perf_counter() - t0, token


def one_cell(model: LM, context: int, batch: int, args, device: torch.device) -> dict:
    """Prefill (real up to --real-prefill, else random fill), then eager steps, then CUDA-graph steps."""
    cfg = model.cfg
    capacity = context + 2 * (args.warmup + args.steps) + 1
    real = context <= args.real_prefill
    row: dict = {"context": context, "batch": batch, "capacity": capacity,
                 "prefill": "real" if real else "random fill"}
    if device.type == "cuda":
        need, free = needed_bytes(cfg, capacity, batch, context if real else 0), torch.cuda.mem_get_info()[0]
        if need > 0.92 * free:
            return {**row, "skipped": f"needs ~{need / GiB:.0f} GiB, {free / GiB:.0f} GiB free"}
    cache = model.new_cache(batch, capacity=capacity)
    gen = torch.Generator(device).manual_seed(0)
    token = torch.randint(0, cfg.vocab_size, (batch, 1), device=device, generator=gen)
    with torch.no_grad():
        if real:
            prompt = torch.randint(0, cfg.vocab_size, (batch, context), device=device, generator=gen)
            sync(device)
            t0 = time.perf_counter()
            token = model(prompt, cache, logits="last").argmax(-1)
            sync(device)
            row["prefill_s"] = time.perf_counter() - t0
            del prompt
        else:
            fill_random(cache, context)
        row["cache_nbytes"] = cache.nbytes()
        row["cache_bytes_formula"] = cache_bytes(cfg, cache.held_positions, batch)
        row["cache_bytes_at_context"] = cache_bytes(cfg, context, batch)
        eager = EagerStep(model, cache)
        _, token = timed(eager, token, args.warmup, device)
        secs, token = timed(eager, token, args.steps, device)
        row["eager_ms"], row["eager_tok_s"] = 1e3 * secs / args.steps, batch * args.steps / secs
        if device.type == "cuda":
            graph = GraphStep(model, cache, warmup=args.warmup)
            _, token = timed(graph, token, args.warmup + 1, device)  # eager warm-up, then capture + replay
            secs, token = timed(graph, token, args.steps, device)
            row["graph_ms"], row["graph_tok_s"] = 1e3 * secs / args.steps, batch * args.steps / secs
            row["eager_over_graph"] = row["eager_ms"] / row["graph_ms"]
            del graph
    del cache, eager
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def check(model: LM, device: torch.device) -> dict:
    """The static step (eager and CUDA graph) against the parallel forward on a short sequence that wraps
    the smallest ring: max abs logit difference (bf16 on GPU; the fp64 contract is in the tests)."""
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 48), device=device,
                           generator=torch.Generator(device).manual_seed(1))
    with torch.no_grad():
        ref = model(tokens).float()
        out = {"eager_vs_parallel": (stepwise_logits(model, tokens, prefill=16, static=True).float() - ref)
               .abs().max().item()}
        if device.type == "cuda":
            eager = stepwise_logits(model, tokens, prefill=16, static=True)
            graph = stepwise_logits(model, tokens, prefill=16, static=True, cuda_graph=True)
            out["graph_vs_eager"] = (graph.float() - eager.float()).abs().max().item()
    out["logit_scale"] = ref.abs().max().item()
    return out


def fmt_bytes(n: float) -> str:
    if n < 2**20:
        return f"{n / 2**10:,.1f} KiB"
    return f"{n / 2**20:,.1f} MiB" if n < GiB else f"{n / GiB:,.2f} GiB"


def table(rows: list[dict], kinds: dict[str, int]) -> str:
    """Markdown table, one row per cell; "vs full" is tokens/s over full's in the same cell."""
    full = {(r["context"], r["batch"]): r for r in rows if r["kind"] == "full" and "skipped" not in r}
    cols = ["kind", "w", "context", "batch", "prefill", "eager ms/step", "graph ms/step", "eager/graph",
            "tok/s", "vs full", "cache (real)", "cache_bytes()"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [r["kind"], "-" if r["kind"] == "full" else str(kinds[r["kind"]]), f"{r['context']:,}",
                 str(r["batch"]), r["prefill"]]
        if "skipped" in r:
            lines.append("| " + " | ".join(cells + [f"skipped: {r['skipped']}"] + [""] * 6) + " |")
            continue
        graph = "graph_ms" in r
        speed = "graph_tok_s" if graph else "eager_tok_s"
        base = full.get((r["context"], r["batch"]))
        cells += [f"{r['eager_ms']:.3f}", f"{r['graph_ms']:.3f}" if graph else "-",
                  f"{r['eager_over_graph']:.1f}x" if graph else "-", f"{r[speed]:,.0f}",
                  f"{r[speed] / base[speed]:.2f}x" if base else "-",
                  fmt_bytes(r["cache_nbytes"]), fmt_bytes(r["cache_bytes_formula"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, small contexts and batches (CPU is fine)")
    ap.add_argument("--kinds", default="full,swa,rattention")
    ap.add_argument("--contexts", default=None, help="comma-separated; default 4096,32768,131072 (quick: 64,256)")
    ap.add_argument("--batches", default=None, help="comma-separated; default 1,64 (quick: 1,4)")
    ap.add_argument("--steps", type=int, default=None, help="timed decode steps per cell (default 20, quick 5)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before each timing")
    ap.add_argument("--real-prefill", type=int, default=None,
                    help="prefill for real up to this context, fill randomly above (default 4096, quick 64)")
    ap.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (CPU runs only)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    quick = args.quick
    base, windows = (MODEL_QUICK, WINDOWS_QUICK) if quick else (MODEL_125M, WINDOWS_125M)
    contexts = [int(c) for c in (args.contexts or ("64,256" if quick else "4096,32768,131072")).split(",")]
    batches = [int(b) for b in (args.batches or ("1,4" if quick else "1,64")).split(",")]
    args.steps = args.steps or (5 if quick else 20)
    args.real_prefill = args.real_prefill if args.real_prefill is not None else (64 if quick else 4096)
    kinds = {k: windows[k] for k in args.kinds.split(",")}
    prov = provenance()
    slug = "cpu" if device.type == "cpu" else prov["device"].lower().replace("nvidia", "").split()[0]
    out = args.out or ROOT / "benchmarks" / "results" / f"decode-{'quick-' if quick else ''}{slug}.json"

    t_start = time.time()
    rows, checks = [], {}
    for kind, window in kinds.items():
        model = build(kind, window, base, device)
        checks[kind] = check(model, device)
        print(f"{kind}: check {checks[kind]}", flush=True)
        for batch in batches:
            for context in contexts:
                t0 = time.time()
                try:
                    row = one_cell(model, context, batch, args, device)
                except torch.cuda.OutOfMemoryError as err:
                    row = {"context": context, "batch": batch, "prefill": "-",
                           "skipped": f"out of memory ({str(err).splitlines()[0][:80]})"}
                    gc.collect()
                    torch.cuda.empty_cache()
                rows.append({"kind": kind, "window": window, **row})
                print(f"{kind} ctx {context} batch {batch}: {time.time() - t0:.1f}s "
                      f"{ {k: v for k, v in row.items() if k.endswith(('_ms', 'skipped'))} }", flush=True)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    mismatched = [r for r in rows if "cache_nbytes" in r and r["cache_nbytes"] != r["cache_bytes_formula"]]
    notes = [
        f"model: {'tiny (--quick)' if quick else '~125M'} {base}; windows {kinds}; greedy steps, argmax on device",
        f"ms/step: one decode step of the whole batch (= ms per token per sequence); tok/s = batch / step time; "
        f"{args.steps} timed steps after {args.warmup} warm-up steps per cell",
        f"prefill: contexts <= {args.real_prefill} prefilled for real (one parallel pass, last-position logits); "
        "longer ones random-filled caches of the same shapes",
        "graph: the static step captured once in a CUDA graph and replayed; eager: the same step called directly"
        + (" (CPU run: no graph column)" if device.type == "cpu" else ""),
        f"cache (real) = ModelCache.nbytes() of the reserved cache (capacity = context + "
        f"{2 * (args.warmup + args.steps) + 1} steps, rounded up to whole {BLOCK}-position blocks); "
        "cache_bytes() at that capacity: "
        + ("equal in every cell" if not mismatched else f"MISMATCH in {len(mismatched)} cells"),
        f"checks (max abs logit diff, static step vs parallel forward and graph vs eager): {checks}",
    ]
    record = {"benchmark": "decode", "provenance": prov, "args": {k: str(v) for k, v in vars(args).items()},
              "model": base, "windows": kinds, "rows": rows, "checks": checks, "notes": notes,
              "wall_s": round(time.time() - t_start, 1)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"\nwrote {out} ({record['wall_s']} s); device {prov['device']}, torch {prov['torch']}, "
          f"triton {prov['triton']}, commit {prov['commit']}, {prov['date']}\n")
    print(table(rows, kinds))
    print("\n" + "\n".join(f"- {n}" for n in notes))
    if mismatched:
        sys.exit("bench_decode: ModelCache.nbytes() differs from cache_bytes() (see the table)")


if __name__ == "__main__":
    main()
