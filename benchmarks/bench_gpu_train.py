"""GPU training figures, in one script run on a CUDA machine (torch + triton; no Ray needed):

1. ``kernels``: the same short RAttention training on one GPU through the Triton kernels and through
   the torch path (``RATTENTION_KERNELS=torch``), same seed and data: the loss curves must match.
2. ``ddp``: the ~125M model of ``configs/gpu-125m-ddp.yaml`` (T=8192, w=512, bf16) on 1 GPU against
   2 GPUs (torchrun, NCCL) at the same global batch, for ``rattention`` and ``full``: tokens/s,
   scaling efficiency, and the validation loss after N steps, with a second 1-GPU seed as the noise
   reference for "the same loss".

    python benchmarks/bench_gpu_train.py --data data/stdlib-32k --parts kernels,ddp --out results-dir

Writes ``gpu-train.json`` (and per-run folders) under ``--out`` and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import rattention.metrics as M  # noqa: E402
from rattention.provenance import provenance  # noqa: E402
from rattention.rundir import RunDir  # noqa: E402

# NVLink multicast stays off on shared hosts (device README).
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def read_losses(run_dir: Path) -> dict[int, float]:
    """Logged training loss by step, from the run folder."""
    return {int(r["step"]): float(r[M.TRAIN_LOSS]) for r in RunDir(run_dir).metrics() if M.TRAIN_LOSS in r}


def run_training(name: str, config: str, overrides: list[str], out: Path, nproc: int,
                 env_extra: dict[str, str] | None = None) -> dict:
    """One training run (torchrun when nproc > 1); returns its results, losses and wall time."""
    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)  # a benchmark run starts fresh, never resumes an old folder
    cmd = [sys.executable, "-m", "rattention", "train", config, *overrides, "--no-ray", "--run-dir", str(run_dir)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "rattention", "train", config, *overrides, "--no-ray", "--run-dir", str(run_dir)]
    env = {**os.environ, **SAFE_ENV, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    print(f"\n=== {name}: {' '.join(cmd[2:])}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"name": name, "error": f"exit {proc.returncode}", "wall_s": wall}
    results = RunDir(run_dir).results()
    return {"name": name, "results": results, "losses": read_losses(run_dir), "wall_s": wall,
            "steady_tokens_per_s": RunDir(run_dir).steady_tokens_per_s()}


def part_kernels(args, out: Path) -> dict:
    cfg = "configs/gpu-125m-ddp.yaml"
    common = [f"data.path={args.data}", f"train.steps={args.kernel_steps}", "train.log_every=5",
              "model.n_layers=4", "model.seq_len=4096", "train.warmup_steps=5", "data.batch_size=2"]
    runs = {
        "triton": run_training("kernels-triton", cfg, common, out, 1),
        "torch": run_training("kernels-torch", cfg, common, out, 1, {"RATTENTION_KERNELS": "torch"}),
    }
    rec = {"runs": runs}
    if all("losses" in r for r in runs.values()):
        a, b = runs["triton"]["losses"], runs["torch"]["losses"]
        steps = sorted(set(a) & set(b))
        rec["max_abs_loss_diff"] = max(abs(a[s] - b[s]) for s in steps)
        rec["final_loss"] = {"triton": a[steps[-1]], "torch": b[steps[-1]]}
        rec["tokens_per_s"] = {k: r["results"][M.TRAIN_THROUGHPUT] for k, r in runs.items()}
    return rec


def part_ddp(args, out: Path) -> dict:
    """1 GPU against 2 at the same global batch; a second 1-GPU seed gives the loss noise to compare with."""
    cfg = "configs/gpu-125m-ddp.yaml"
    rec: dict = {"runs": {}}
    two = torch.cuda.device_count() >= 2  # one GPU: the 1-GPU rows only
    # validation loss on the fixed val split is the quality figure: less noisy than the last training batches
    ev = ["eval.enabled=true", f"eval.val_batches={args.val_batches}", "eval.decode_tokens=0", "eval.copy_samples=4"]
    for kind in args.kinds.split(","):
        # the same global batch: 1 GPU accumulates two micro-batches where 2 GPUs take one each
        base = [f"data.path={args.data}", f"model.kind={kind}", f"train.steps={args.ddp_steps}",
                f"data.batch_size={args.batch}", *ev]
        plan = {"1gpu": (1, ["train.grad_accum=2"]), "1gpu-seed1": (1, ["train.grad_accum=2", "train.seed=1"])}
        if two:
            plan["2gpu"] = (2, ["train.grad_accum=1"])
        runs = {k: run_training(f"ddp-{kind}-{k}", cfg, base + ov, out, n) for k, (n, ov) in plan.items()}
        rec["runs"].update({f"{kind}-{k}": r for k, r in runs.items()})
        if not all("results" in r for r in runs.values()):
            continue
        r1 = runs["1gpu"]
        row = {"tokens_per_s_1gpu": r1["steady_tokens_per_s"],
               "tokens_per_s_1gpu_seed1": runs["1gpu-seed1"]["steady_tokens_per_s"],
               "whole_run_tokens_per_s_1gpu": r1["results"][M.TRAIN_THROUGHPUT],
               "train_loss_1gpu": r1["losses"][max(r1["losses"])],
               "val_loss_1gpu": r1["results"][M.VAL_LOSS],
               "val_loss_1gpu_seed1": runs["1gpu-seed1"]["results"][M.VAL_LOSS]}
        row["seed_noise"] = abs(row["val_loss_1gpu"] - row["val_loss_1gpu_seed1"])
        if two:
            r2 = runs["2gpu"]
            t1, t2 = row["tokens_per_s_1gpu"], r2["steady_tokens_per_s"]
            whole = r2["results"][M.TRAIN_THROUGHPUT]
            row.update({"tokens_per_s_2gpu": t2, "speedup": t2 / t1, "scaling_efficiency": t2 / (2 * t1),
                        "whole_run_tokens_per_s_2gpu": whole,
                        "whole_run_speedup": whole / row["whole_run_tokens_per_s_1gpu"],
                        "train_loss_2gpu": r2["losses"][max(r2["losses"])], "val_loss_2gpu": r2["results"][M.VAL_LOSS]})
            row["val_loss_gap_2gpu"] = abs(row["val_loss_2gpu"] - row["val_loss_1gpu"])
        rec[kind] = row
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/stdlib-32k")
    ap.add_argument("--parts", default="kernels,ddp")
    ap.add_argument("--kinds", default="rattention,full")
    ap.add_argument("--kernel-steps", type=int, default=40)
    ap.add_argument("--ddp-steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=2, help="sequences per micro-batch per GPU")
    ap.add_argument("--val-batches", type=int, default=16, help="validation batches for the loss comparison")
    ap.add_argument("--out", default="benchmarks/results/gpu-train")
    ap.add_argument("--runs-dir", default=None, help="run folders (checkpoints included); default: --out")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu_train: needs a CUDA GPU")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = Path(args.runs_dir) if args.runs_dir else out
    record = {"benchmark": "gpu training", "provenance": provenance(), "gpus": torch.cuda.device_count(),
              "args": vars(args)}
    parts = args.parts.split(",")
    if "kernels" in parts:
        record["kernels"] = part_kernels(args, runs)
    if "ddp" in parts:
        record["ddp"] = part_ddp(args, runs)
    (out / "gpu-train.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    print("\n| part | what | value |\n|---|---|---|")
    k = record.get("kernels", {})
    if "max_abs_loss_diff" in k:
        print(f"| kernels | final loss triton / torch | {k['final_loss']['triton']:.4f} / "
              f"{k['final_loss']['torch']:.4f} |")
        print(f"| kernels | max abs loss diff over logged steps | {k['max_abs_loss_diff']:.4f} |")
        print(f"| kernels | tokens/s triton / torch | {k['tokens_per_s']['triton']:,.0f} / "
              f"{k['tokens_per_s']['torch']:,.0f} |")
    for kind, r in record.get("ddp", {}).items():
        if kind == "runs":
            continue
        print(f"| ddp {kind} | val loss 1 GPU, seed 0 / seed 1 (seed noise) | {r['val_loss_1gpu']:.4f} / "
              f"{r['val_loss_1gpu_seed1']:.4f} ({r['seed_noise']:.4f}) |")
        if "tokens_per_s_2gpu" not in r:
            print(f"| ddp {kind} | tokens/s 1 GPU (2 GPUs not present) | {r['tokens_per_s_1gpu']:,.0f} |")
            continue
        t1, t2 = r["tokens_per_s_1gpu"], r["tokens_per_s_2gpu"]
        print(f"| ddp {kind} | steady tokens/s 1 GPU (seed 1) / 2 GPUs | {t1:,.0f} "
              f"({r['tokens_per_s_1gpu_seed1']:,.0f}) / {t2:,.0f} |")
        print(f"| ddp {kind} | speedup (efficiency) | {r['speedup']:.2f}x ({r['scaling_efficiency']:.0%}) |")
        print(f"| ddp {kind} | whole-run speedup, warm-up included | {r['whole_run_speedup']:.2f}x |")
        print(f"| ddp {kind} | val loss 1 GPU / 2 GPUs (gap) | {r['val_loss_1gpu']:.4f} / {r['val_loss_2gpu']:.4f} "
              f"({r['val_loss_gap_2gpu']:.4f}) |")
        print(f"| ddp {kind} | train loss, last 10 steps, 1 GPU / 2 GPUs | {r['train_loss_1gpu']:.4f} / "
              f"{r['train_loss_2gpu']:.4f} |")
    for part in ("kernels", "ddp"):
        for name, r in record.get(part, {}).get("runs", {}).items():
            if "error" in r:
                print(f"| {part} | {name} FAILED | {r['error']} |")


if __name__ == "__main__":
    main()
