"""CPU figures for the demo model: training and decode tokens/s of full, swa and rattention,
measured side by side in one run (interleaved rounds, medians), as ratios to SWA.

    python benchmarks/bench_cpu.py            # writes benchmarks/results/cpu.json and benchmarks/cpu.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import kernels.ops
from kernels.merge.naive import merge_naive
from kernels.rla.naive import rla_naive
from kernels.swa.blockwise import swa_blockwise
from rattention.config import ModelConfig
from rattention.generate import generate
from rattention.model import LM
from rattention.provenance import provenance

OUT = Path(__file__).resolve().parent


def quadratic_rattention(q_rope, k_rope, q_raw, k_raw, v, window, w_swa, w_rla, phi="sm2", eps=1e-6,
                         scale=None, chunk=64):
    """The straightforward O(T^2) RAttention (naive RLA), for comparison only."""
    o = merge_naive(swa_blockwise(q_rope, k_rope, v, window, scale), rla_naive(q_raw, k_raw, v, window, phi),
                    w_swa, w_rla, eps)
    return o.to(q_rope.dtype)


def train_step_time(m: LM, opt, tokens: torch.Tensor) -> float:
    t0 = time.perf_counter()
    logits = m(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4, help="timed train steps per kind per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = dict(vocab_size=4096, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32,
                seq_len=args.seq_len, window=args.window)
    variants = {"full": dict(kind="full"), "swa": dict(kind="swa"), "rattention": dict(kind="rattention"),
                "rattention (quadratic RLA)": dict(kind="rattention")}
    models, opts = {}, {}
    for name, kw in variants.items():
        torch.manual_seed(0)
        models[name] = LM(ModelConfig(**base, **kw))
        opts[name] = torch.optim.AdamW(models[name].parameters(), lr=1e-3)
    tokens = torch.randint(0, 4096, (args.batch, args.seq_len + 1), generator=torch.Generator().manual_seed(0))
    fast = kernels.ops.rattention

    def step(name: str) -> float:
        kernels.rattention = quadratic_rattention if "quadratic" in name else fast  # the model calls kernels.*
        try:
            return train_step_time(models[name], opts[name], tokens)
        finally:
            kernels.rattention = fast

    times: dict[str, list[float]] = {n: [] for n in variants}
    for name in variants:  # warm-up
        step(name)
    for r in range(args.rounds):
        for name in variants:
            times[name] += [step(name) for _ in range(args.steps)]
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {statistics.median(t) * 1e3:.0f} ms"
                                                            for n, t in times.items()), flush=True)
    decode: dict[str, float] = {}
    prompt = tokens[:, : args.seq_len // 2]
    for name in ("full", "swa", "rattention"):
        m = models[name].eval()
        t0 = time.perf_counter()
        generate(m, prompt, args.decode_tokens)
        prefill_t0 = time.perf_counter()
        with torch.no_grad():
            m(prompt, m.new_cache(args.batch))
        prefill = time.perf_counter() - prefill_t0
        decode[name] = args.batch * args.decode_tokens / max(prefill_t0 - t0 - prefill, 1e-9)
    ntok = args.batch * args.seq_len
    rows = []
    swa_t = statistics.median(times["swa"])
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({"model": name, "train_step_ms": med * 1e3, "train_tokens_per_s": ntok / med,
                     "step_vs_swa": med / swa_t, "decode_tokens_per_s": decode.get(name)})
    record = {"benchmark": "cpu demo model", "provenance": provenance(), "args": vars(args),
              "model": base, "rows": rows,
              "target": "rattention train step <= 1.5x swa at the same window"}
    (OUT / "results").mkdir(exist_ok=True)
    (OUT / "results" / "cpu.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = ["| model | train step ms | train tokens/s | step vs swa | decode tokens/s |", "|---|---|---|---|---|"]
    for r in rows:
        dec = f"{r['decode_tokens_per_s']:.0f}" if r["decode_tokens_per_s"] else "-"
        lines.append(f"| {r['model']} | {r['train_step_ms']:.0f} | {r['train_tokens_per_s']:.0f} | "
                     f"{r['step_vs_swa']:.2f}x | {dec} |")
    table = "\n".join(lines)
    p = record["provenance"]
    md = (f"# CPU figures: the demo model\n\nCommand: `python benchmarks/bench_cpu.py` (defaults: batch "
          f"{args.batch} x {args.seq_len}, window {args.window}, fp32, {args.threads} threads, AdamW step "
          f"included; decode: {args.decode_tokens} new tokens after a {args.seq_len // 2}-token prompt, batch "
          f"{args.batch}, prefill time excluded).\n\nRecorded {p['date']} at commit {p['commit']} on "
          f"{p['device']}, torch {p['torch']}.\n\n{table}\n\nTarget: RAttention's training step at most 1.5x "
          f"SWA's at the same window. JSON: `benchmarks/results/cpu.json`.\n")
    (OUT / "cpu.md").write_text(md)
    print(table)


if __name__ == "__main__":
    main()
