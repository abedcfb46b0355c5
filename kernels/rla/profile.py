"""One forward+backward of our RLA per state pass at the bench shapes, for Nsight Compute: where the time goes.

The shapes are those of ``kernels.bench`` (bf16, Hq=16, Hkv=4, D=128, B*T=65536, w=512, model-layout
views), at T=8192 by default. Each pass (kernels.rla.triton.STATE_PASSES) runs once, inside an NVTX range
named after it and after a one-program marker kernel whose grid size is the pass's number (1, 2, ...),
so that a kernel list can be cut into passes. Only that region is between cudaProfilerStart and Stop.
There is no warm-up: Triton compiles on the host, and ncu times every kernel on its own anyway. On an
H200 (ncu installed), from the repository root:

    ncu --profile-from-start off --clock-control none --print-units base --metrics gpu__time_duration.sum \
        --csv python kernels/rla/profile.py > ncu-rla.csv
    python kernels/rla/profile.py --summarize ncu-rla.csv

About 40 kernels are profiled (one pass each for this metric), well under a minute once the Triton
cache is warm (a kernels.bench run before fills it). ``--clock-control none`` keeps boost clocks, as in
kernels.bench; ncu still flushes the caches before each kernel, so per-kernel times are those of a cold
L2 and the sum is above the bench's fwd+bwd median. The summary lists each pass's kernels in launch order
with their times, and each pass's total. Without ``--profile-from-start off`` the input set-up kernels
are profiled too, and the summary skips them (everything before the first marker).
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root, not kernels/rla/, on the path (its
    sys.path[0] = str(Path(__file__).resolve().parents[2])  # triton.py and profile.py would shadow triton, profile)

import torch
import triton

from kernels.bench import HKV, HQ, TOKENS, D
from kernels.ops import rla_triton
from kernels.rla.triton import STATE_PASSES

MARKER = "_state_pass_marker"


@triton.jit
def _state_pass_marker(X):
    """Does nothing: its launch (grid size = the pass's number) marks where a pass's kernels begin."""
    pass


def profile(t: int = 8192, window: int = 512, state_passes: tuple[str, ...] = STATE_PASSES) -> None:
    """One forward + backward (``torch.autograd.grad`` of q, k, v) per state pass, between profiler start/stop."""
    b = TOKENS // t

    def view(h):
        return torch.randn(b, t, h, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()

    q, k, v = view(HQ), view(HKV), view(HKV)
    do = torch.randn(b, HQ, t, D, device="cuda", dtype=torch.float32)
    marker = torch.empty(1, device="cuda")
    torch.cuda.synchronize()
    print(f"profile_rla: T={t} B={b} Hq={HQ} Hkv={HKV} D={D} w={window} bf16; passes {', '.join(state_passes)}",
          flush=True)
    torch.cuda.profiler.start()
    for i, sp in enumerate(state_passes):
        torch.cuda.nvtx.range_push(f"rla {sp}")
        _state_pass_marker[(i + 1,)](marker)
        o = rla_triton(q, k, v, window, state_pass=sp)
        grads = torch.autograd.grad(o, [q, k, v], do)
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_pop()
        del o, grads
    torch.cuda.profiler.stop()
    print("profile_rla: done", flush=True)


_UNIT_US = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3, "second": 1e6,
            "s": 1e6}


def summarize(path: Path, state_passes: tuple[str, ...] = STATE_PASSES) -> str:
    """Per-pass kernel times (launch order, and the pass total) from ncu's --csv output of this script."""
    text = path.read_text()
    start = text.find('"ID",')
    if start < 0:
        raise SystemExit(f"{path}: no ncu CSV table (a line starting with \"ID\",) found")
    rows = [r for r in csv.DictReader(io.StringIO(text[start:])) if r.get("Metric Name") == "gpu__time_duration.sum"]
    passes: list[list[tuple[str, str, float]]] = []
    for r in rows:
        name = r.get("Kernel Name") or r.get("Function Name") or "?"
        grid = r.get("Grid Size", "")
        us = float(r["Metric Value"].replace(",", "")) * _UNIT_US.get(r.get("Metric Unit", "nsecond"), 1e-3)
        if name.startswith(MARKER):
            passes.append([])
        elif passes:
            passes[-1].append((name, grid, us))
    lines = []
    totals = []
    for sp, kernels in zip(state_passes, passes, strict=False):
        total = sum(us for _, _, us in kernels)
        totals.append((sp, total))
        lines.append(f"state pass {sp}: {len(kernels)} kernels, {total / 1e3:.3f} ms")
        for name, grid, us in kernels:
            lines.append(f"  {us / 1e3:8.3f} ms  {name[:70]:70s} grid {grid}")
    if totals:
        base = dict(totals).get("cumsum")
        lines.append("totals: " + "; ".join(f"{sp} {tot / 1e3:.3f} ms" + (f" ({tot / base:.2f}x cumsum)" if base
                                                                          else "") for sp, tot in totals))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, default=8192, help="sequence length (B = 65536 / T)")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--state-passes", nargs="*", default=list(STATE_PASSES), choices=STATE_PASSES)
    p.add_argument("--summarize", type=Path, default=None, help="print the per-pass summary of an ncu --csv file")
    a = p.parse_args(argv)
    if a.summarize is not None:
        print(summarize(a.summarize, tuple(a.state_passes)))
        return
    if not torch.cuda.is_available():
        sys.exit("profile_rla: needs a CUDA GPU")
    profile(a.T, a.window, tuple(a.state_passes))


if __name__ == "__main__":
    main()
