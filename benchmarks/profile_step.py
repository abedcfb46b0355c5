"""Where a training step's time goes, on each rank: wall time per step, the GPU's busy fraction, and the
kernels that take the most GPU time (torch.profiler over steps after a warm-up). It runs the training
loop's own step (``rattention.train.train_step``) on random tokens, so it needs no dataset:

    python benchmarks/profile_step.py configs/gpu-125m-ddp.yaml train.grad_accum=2           # 1 GPU
    torchrun --nproc-per-node 2 benchmarks/profile_step.py configs/gpu-125m-ddp.yaml         # DDP

Rank 0 prints a table last; ``--trace DIR`` also writes each rank's Chrome trace there.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rattention.logger import LaggedReadings  # noqa: E402
from rattention.model import LM  # noqa: E402
from rattention.optim import build_optimizer, build_scheduler  # noqa: E402
from rattention.run_config import load_run_config  # noqa: E402
from rattention.runtime import init_distributed, pick_device, rank_world  # noqa: E402
from rattention.train import train_step, wrap_model  # noqa: E402


def random_batches(vocab: int, batch: int, seq_len: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randint(0, vocab, (batch, seq_len + 1), generator=g)
        yield x[:, :-1], x[:, 1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    ap.add_argument("--warmup", type=int, default=8, help="steps before timing")
    ap.add_argument("--steps", type=int, default=6, help="timed and profiled steps")
    ap.add_argument("--top", type=int, default=15, help="kernels listed")
    ap.add_argument("--trace", default=None, help="folder for Chrome traces, one per rank")
    args = ap.parse_args()
    cfg = load_run_config(args.config, [*args.overrides, "data.path=."])  # random tokens: no dataset read
    tc = cfg.train
    device = pick_device(tc.device)
    init_distributed(device)
    rank, world = rank_world()
    torch.manual_seed(tc.seed)
    raw = LM(cfg.model).to(device)
    opt = build_optimizer(raw, tc)
    sched = build_scheduler(opt, tc)
    model = wrap_model(raw, tc, device, world)
    data = random_batches(cfg.model.vocab_size, cfg.data.batch_size, cfg.seq_len, tc.seed + rank)
    model.train()
    readings = LaggedReadings()

    def step(keep: int = 1) -> None:
        loss, _ = train_step(model, raw, opt, sched, data, tc, device)
        readings.push(0, loss)
        readings.pop(keep)  # as the loop does: the loss is read a step late

    for _ in range(args.warmup):
        step(keep=0)
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for i in range(args.steps):
            step(keep=0 if i == args.steps - 1 else 1)
        wall = (time.perf_counter() - t0) / args.steps
    if args.trace:
        Path(args.trace).mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(Path(args.trace) / f"rank{rank}.json"))
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = merged_busy_us(kernels) / 1e6 / args.steps
    totals: dict[str, float] = {}
    for e in kernels:
        totals[e.name] = totals.get(e.name, 0.0) + e.device_time / 1e6 / args.steps
    tokens = cfg.data.batch_size * cfg.seq_len * tc.grad_accum * world
    stats = torch.tensor([wall, busy], dtype=torch.float64, device=device)
    gathered = [torch.zeros_like(stats) for _ in range(world)] if world > 1 else [stats]
    if world > 1:
        dist.all_gather(gathered, stats)
    if rank != 0:
        return
    print(f"\n{cfg.model.kind}, world {world}, grad_accum {tc.grad_accum}, micro-batch {cfg.data.batch_size}x"
          f"{cfg.seq_len}, {os.environ.get('CUDA_VISIBLE_DEVICES', 'all')} devices")
    print("| rank | step ms | GPU busy ms | busy | tokens/s |\n|---|---|---|---|---|")
    for r, g in enumerate(gathered):
        w, b = g.tolist()
        print(f"| {r} | {w * 1e3:.1f} | {b * 1e3:.1f} | {b / w:.0%} | {tokens / w:,.0f} |")
    print("\n| kernel (rank 0) | ms per step |\n|---|---|")
    for name, t in sorted(totals.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"| {name[:90]} | {t * 1e3:.2f} |")


def merged_busy_us(kernels) -> float:
    """Time at least one kernel ran (overlapping kernels on several streams counted once), in us."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    busy, cur_s, cur_e = 0.0, None, None
    for s, e in spans:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    return busy + ((cur_e - cur_s) if cur_e is not None else 0.0)


if __name__ == "__main__":
    main()
