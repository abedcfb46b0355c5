"""Kernel benchmark: ``python -m kernels.bench`` on one GPU (torch + triton only; fla when importable).

First checks our Triton ops at full size against the fp32 torch paths (outputs and every input
gradient, ||x - ref|| / ||ref||) and refuses to time an op that fails. Then times, side by side,
forward and forward+backward medians (``triton.testing.do_bench``) of our SWA, RLA and RAttention
ops, SDPA full causal, FlexAttention sliding window and the unfused composite (FlexAttention SWA +
torch sm2 + torch chunked linear attention on padded k/v + two RMSNorms), with the bf16 matmul
ceiling of the same run and peak extra memory of the forward+backward. Writes the JSON record and
a markdown table, and prints the table last. ``--tune`` first searches the RLA tile axes (RLA_AXES,
coordinate-wise, each variant checked) and SWA blocks, and applies the picks. ``--ptxas`` (no GPU):
registers, spills and shared memory of every RLA kernel launch on sm_90a for each tuning variant.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels.common import rms_norm_heads
from kernels.ops import attention_triton, rattention_triton, rla_triton
from kernels.rla.chunked import rla_chunked
from kernels.rla.triton import STATE_PASS, STATE_PASSES
from kernels.swa.blockwise import swa_blockwise

HQ, HKV, D, TOKENS = 16, 4, 128, 65536
T_GRID = (4096, 8192, 16384, 32768)
TOL_BF16 = 1e-2
RLA_CHUNK = 64  # the torch chunked path (reference and composite)


def _git_commit() -> str:
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(x).all():
        return float("inf")
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _bench(fn: Callable[[], object]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


# ---------------------------------------------------------------------------------------------
# FLOP counts (useful work; backward counted as 2.5x forward for softmax attention, 2x for RLA)


def swa_flops(b: int, t: int, window: int | None) -> float:
    w = t - 1 if window is None else min(window, t - 1)
    pairs = (w + 1) * t - w * (w + 1) / 2
    return 4.0 * b * HQ * D * pairs


def rla_flops(b: int, t: int, chunk: int = 16) -> float:
    read = 2 * (2 * D) * D * HQ  # phi(q) S per query
    update = 2 * (2 * D) * D * HKV  # phi(k)^T v per key
    intra = HQ * (chunk / 2) * (2 * 2 * D + 2 * D)  # causal half of the chunk's scores and values
    return float(b * t * (read + update + intra))


def matmul_ceiling() -> float:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = _bench(lambda: a @ b)
    return 2 * n**3 / ms / 1e9


# ---------------------------------------------------------------------------------------------
# Implementations under test: each takes the input dict and returns the output tensor.


_FLEX_WINDOW: torch.Tensor | None = None  # one global tensor: a new window needs no recompile


def _flex_mask(b, h, qi, kj):
    return (qi >= kj) & (qi - kj <= _FLEX_WINDOW)


def _flex():
    """FlexAttention sliding window, compiled once per shape; the window is a tensor the mask reads."""
    global _FLEX_WINDOW
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    for knob in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    _FLEX_WINDOW = torch.zeros((), dtype=torch.int64, device="cuda")
    compiled = torch.compile(flex_attention, dynamic=False)
    masks: dict[tuple[int, int], object] = {}

    def run(q, k, v, window: int):
        t = q.shape[2]
        _FLEX_WINDOW.fill_(window)
        if (t, window) not in masks:
            masks[(t, window)] = create_block_mask(_flex_mask, None, None, t, t, device="cuda")
        return compiled(q, k, v, block_mask=masks[(t, window)], enable_gqa=True)

    return run


def composite(flex, x: dict, window: int, w_swa: torch.Tensor, w_rla: torch.Tensor) -> torch.Tensor:
    """What a user can assemble today: FlexAttention SWA + torch chunked LA (sm2, padded k/v) + 2 norms."""
    o_swa = flex(x["q"], x["k"], x["v"], window)
    o_rla = rla_chunked(x["q_raw"], x["k_raw"], x["v"], window, "sm2", RLA_CHUNK)
    return (rms_norm_heads(o_swa, w_swa) + rms_norm_heads(o_rla, w_rla)).to(x["q"].dtype)


def make_inputs(b: int, t: int, dtype=torch.bfloat16) -> dict:
    """Model-layout views: (B, T, H, D) storage seen as (B, H, T, D), as the attention module passes them."""
    def view(h):
        return torch.randn(b, t, h, D, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_()

    x = {"q": view(HQ), "k": view(HKV), "v": view(HKV), "q_raw": view(HQ), "k_raw": view(HKV)}
    x["w_swa"] = (1 + 0.1 * torch.randn(HQ, D, device="cuda")).requires_grad_()
    x["w_rla"] = (1 + 0.1 * torch.randn(HQ, D, device="cuda")).requires_grad_()
    return x


def _grads(out: torch.Tensor, inputs: list[torch.Tensor], do: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out, inputs, do))


def reference(ref: Callable, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """ref (fp32) on fp32 copies of inputs: (output, input gradients, the upstream gradient used)."""
    ref_in = [x.detach().float().requires_grad_() for x in inputs]
    r = ref(*ref_in)
    do = torch.randn_like(r).bfloat16().float()  # bf16 values: the same upstream gradient for a bf16 output
    return r.detach(), _grads(r, ref_in, do), do


def check(name: str, ours: Callable, ref: Callable | tuple, inputs: list[torch.Tensor], tol: float) -> dict:
    """Compare output and every input gradient of ours (bf16) vs ref (same function in fp32, or its
    ``reference`` result, shared by several checks). An op that raises fails its check."""
    r, gr, do = reference(ref, inputs) if callable(ref) else ref
    try:
        out = ours(*inputs)
        g = _grads(out, inputs, do.to(out.dtype))
    except Exception as e:  # reported, and the op is not timed; the other checks still run
        print(f"check {name:28s} FAIL: {type(e).__name__}: {e}", flush=True)
        return {"name": name, "ok": False, "errors": {"exception": f"{type(e).__name__}: {str(e)[:300]}"}}
    errs = {"out": _rel(out, r)}
    for i, (a, b_) in enumerate(zip(g, gr, strict=True)):
        errs[f"grad{i}"] = _rel(a, b_)
    worst = max(errs.values())
    ok = worst < tol
    print(f"check {name:28s} worst rel err {worst:.2e} {'ok' if ok else 'FAIL'} {errs}", flush=True)
    del out, g
    return {"name": name, "ok": ok, "errors": errs}


def fwd_bwd_timer(fn: Callable[[], torch.Tensor], inputs: list[torch.Tensor]) -> tuple[Callable, Callable]:
    out = fn()
    do = torch.randn_like(out)
    del out

    def fwd():
        with torch.no_grad():
            return fn()

    def fwd_bwd():
        o = fn()
        return torch.autograd.grad(o, inputs, do)

    return fwd, fwd_bwd


def peak_extra_mb(fn: Callable[[], torch.Tensor], inputs: list[torch.Tensor]) -> float:
    out = fn()
    do = torch.randn_like(out)
    del out
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    o = fn()
    g = torch.autograd.grad(o, inputs, do)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del o, g
    return (peak - base) / 2**20


def _label(state_pass: str, chunk: int = 0) -> str:
    """Row label of an RLA state pass (kernels.rla.triton.STATE_PASSES), the code default marked."""
    mark = ", default" if state_pass == STATE_PASS else ""
    return f"[{state_pass}{mark}{f', C={chunk}' if chunk else ''}]"


def rla_variants(state_passes: tuple[str, ...]) -> list[tuple[str, int]]:
    """(state pass, chunk) of the RLA rows: every pass at the tuned chunk (0), and the default pass at
    chunk 64 (half the chunk states to make and read, twice the in-chunk work: the scans move that trade)."""
    return [(sp, 0) for sp in state_passes] + ([(STATE_PASS, 64)] if STATE_PASS in state_passes else [])


def one_length(t: int, flex, has_fla: bool, ceiling: float, rows: list[dict], checks: list[dict],
               state_passes: tuple[str, ...] = STATE_PASSES) -> None:
    """Check, then time, every implementation at sequence length t (B = TOKENS / t); append rows."""
    b = TOKENS // t
    x = make_inputs(b, t)
    q, k, v, qr, kr, ws, wr = (x[n] for n in ("q", "k", "v", "q_raw", "k_raw", "w_swa", "w_rla"))
    t0 = time.time()
    # correctness at full size, ours (bf16) against the fp32 torch paths
    ok: dict[object, bool] = {}
    for w in (512, 1024, 4096):
        c = check(f"swa w={w} T={t}", lambda q_, k_, v_, w=w: attention_triton(q_, k_, v_, w),
                  lambda q_, k_, v_, w=w: swa_blockwise(q_, k_, v_, w), [q, k, v], TOL_BF16)
        checks.append(c)
        ok[f"swa{w}"] = c["ok"]
    # RLA and RAttention under every state pass (kernels.rla.triton.STATE_PASSES), one fp32 reference each
    ref_rla = reference(lambda q_, k_, v_: rla_chunked(q_, k_, v_, 512, "sm2", RLA_CHUNK), [qr, kr, v])
    for sp, chunk in rla_variants(state_passes):
        c = check(f"rla w=512 T={t} {_label(sp, chunk)}",
                  lambda q_, k_, v_, sp=sp, chunk=chunk: rla_triton(q_, k_, v_, 512, chunk=chunk, state_pass=sp),
                  ref_rla, [qr, kr, v], TOL_BF16)
        checks.append(c)
        ok[("rla512", sp, chunk)] = c["ok"]
    del ref_rla
    for w in (512, 1024):
        def ref(*a, w=w):
            o_swa = swa_blockwise(a[0], a[1], a[4], w)
            o_rla = rla_chunked(a[2], a[3], a[4], w, "sm2", RLA_CHUNK)
            return rms_norm_heads(o_swa, a[5]) + rms_norm_heads(o_rla, a[6])

        ref_ratt = reference(ref, [q, k, qr, kr, v, ws, wr])
        for sp in state_passes if w == 512 else (STATE_PASS,):
            def ours(*a, w=w, sp=sp):
                return rattention_triton(*a[:5], w, a[5], a[6], state_pass=sp)

            c = check(f"rattention w={w} T={t} {_label(sp)}", ours, ref_ratt, [q, k, qr, kr, v, ws, wr], TOL_BF16)
            checks.append(c)
            ok[(f"ratt{w}", sp)] = c["ok"]
        del ref_ratt
    print(f"checks at T={t} took {time.time() - t0:.1f}s", flush=True)

    all_in = [q, k, qr, kr, v, ws, wr]
    impls: list[tuple[str, int | None, Callable, list, float, str | None]] = []
    for w in (512, 1024, 4096):
        impls.append((f"ours SWA w={w}", w, lambda w=w: attention_triton(q, k, v, w), [q, k, v],
                      swa_flops(b, t, w), None if ok[f"swa{w}"] else "failed check"))
    for sp, chunk in rla_variants(state_passes):
        impls.append((f"ours RLA w=512 {_label(sp, chunk)}", 512,
                      lambda sp=sp, chunk=chunk: rla_triton(qr, kr, v, 512, chunk=chunk, state_pass=sp), [qr, kr, v],
                      rla_flops(b, t), None if ok[("rla512", sp, chunk)] else "failed check"))
    for w in (512, 1024):
        for sp in state_passes if w == 512 else (STATE_PASS,):
            impls.append((f"ours RAttention w={w} {_label(sp)}", w,
                          lambda w=w, sp=sp: rattention_triton(q, k, qr, kr, v, w, ws, wr, state_pass=sp), all_in,
                          swa_flops(b, t, w) + rla_flops(b, t), None if ok[(f"ratt{w}", sp)] else "failed check"))
    # SDPA on kv heads repeated beforehand, so that the flash backend serves it
    ke, ve = (z.detach().repeat_interleave(HQ // HKV, dim=1).requires_grad_() for z in (k, v))
    impls.append(("SDPA full causal", None,
                  lambda: F.scaled_dot_product_attention(q, ke, ve, is_causal=True),
                  [q, ke, ve], swa_flops(b, t, None), None))
    for w in (512, 1024, 4096):
        impls.append((f"FlexAttention SWA w={w}", w, lambda w=w: flex(q, k, v, w), [q, k, v],
                      swa_flops(b, t, w), None))
    # the anchor for RLA: fla's chunked linear attention (no normalizer), feature dim 2D = 256, Hq heads
    fla_row: tuple = ("fla chunk_linear_attn dk=256", None, None, [], 0.0, "unavailable (fla not importable)")
    if has_fla:
        try:
            from fla.ops.linear_attn import chunk_linear_attn

            fq, fk = (torch.randn(b, t, HQ, 2 * D, device="cuda", dtype=torch.bfloat16).requires_grad_()
                      for _ in range(2))
            fv = torch.randn(b, t, HQ, D, device="cuda", dtype=torch.bfloat16).requires_grad_()
            fla_row = (fla_row[0], None, lambda: chunk_linear_attn(fq, fk, fv, normalize=False)[0], [fq, fk, fv],
                       0.0, None)
        except Exception as e:
            fla_row = fla_row[:5] + (f"unavailable ({type(e).__name__}: {str(e)[:120]})",)
    impls.append(fla_row)
    impls.append(("unfused composite w=512", 512, lambda: composite(flex, x, 512, ws, wr), all_in,
                  swa_flops(b, t, 512) + rla_flops(b, t), None))
    for name, w, fn, ins, flops, skip in impls:
        row = {"impl": name, "T": t, "B": b, "window": w, "fwd_ms": None, "fwd_bwd_ms": None,
               "fwd_tflops": None, "fwd_bwd_tflops": None, "peak_extra_mb": None, "status": skip or "ok"}
        if skip is None and fn is not None:
            try:
                f, fb = fwd_bwd_timer(fn, ins)
                row["fwd_ms"] = _bench(f)
                row["fwd_bwd_ms"] = _bench(fb)
                row["peak_extra_mb"] = peak_extra_mb(fn, ins)
                if flops:
                    row["fwd_tflops"] = flops / row["fwd_ms"] / 1e9
                    bwd_factor = 3.5 if "RLA" not in name else 3.0
                    if "RAttention" in name or "composite" in name:
                        bwd_factor = (3.5 * swa_flops(b, t, w) + 3.0 * rla_flops(b, t)) / flops
                    row["fwd_bwd_tflops"] = bwd_factor * flops / row["fwd_bwd_ms"] / 1e9
                    row["fwd_bwd_frac_ceiling"] = row["fwd_bwd_tflops"] / ceiling
            except Exception as e:  # a baseline that cannot run here is reported, not fatal
                row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
            torch.cuda.empty_cache()
        rows.append(row)
        fmt = lambda z: "-" if z is None else f"{z:.2f}"
        print(f"T={t:6d} {name:44s} fwd {fmt(row['fwd_ms'])} ms  fwd+bwd {fmt(row['fwd_bwd_ms'])} ms  "
              f"{fmt(row['fwd_bwd_tflops'])} TFLOP/s  peak {fmt(row['peak_extra_mb'])} MB  {row['status']}",
              flush=True)


def run(t_grid: tuple[int, ...], out_json: Path, out_md: Path | None, tuned: dict | None = None,
        state_passes: tuple[str, ...] = STATE_PASSES) -> list[dict]:
    torch.manual_seed(0)
    import triton

    t_start = time.time()

    dev = torch.cuda.get_device_name()
    ceiling = matmul_ceiling()
    print(f"device {dev}; bf16 matmul ceiling {ceiling:.0f} TFLOP/s", flush=True)
    flex = _flex()
    try:
        import fla  # noqa: F401

        has_fla = True
    except ImportError:
        has_fla = False
    rows: list[dict] = []
    checks: list[dict] = []
    for t in t_grid:
        t0 = time.time()
        one_length(t, flex, has_fla, ceiling, rows, checks, state_passes)
        torch.cuda.empty_cache()
        print(f"T={t} took {time.time() - t0:.1f}s (checks, compiles and timings)", flush=True)

    record = {
        "device": dev, "torch": torch.__version__, "triton": triton.__version__, "commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m kernels.bench", "shapes": {"dtype": "bfloat16", "Hq": HQ, "Hkv": HKV, "D": D,
                                                        "tokens": TOKENS, "T": list(t_grid)},
        "matmul_ceiling_tflops": ceiling, "state_pass_default": STATE_PASS, "checks": checks, "rows": rows,
        "tune": tuned, "wall_s": round(time.time() - t_start, 1),
        "notes": "fwd_bwd TFLOP/s count the backward as 2.5x the forward for softmax attention and 2x for RLA; "
                 "RLA FLOPs are the chunk form's useful work (chunk 16, as in earlier records). The composite "
                 "uses the torch chunked RLA (fp32) in place of fla. The fla row (when fla imports) is "
                 "chunk_linear_attn(normalize=False) on (B, T, Hq, 256) q, k and (B, T, Hq, 128) v.",
    }
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(record, indent=1))
    md = markdown(record)
    if out_md is not None:
        out_md.write_text(md)
    print(md)
    return rows


def markdown(record: dict) -> str:
    """The fwd+bwd (and fwd) table of a record, one row per implementation, one column per T."""
    ts = record["shapes"]["T"]
    names = list(dict.fromkeys(r["impl"] for r in record["rows"]))
    by = {(r["impl"], r["T"]): r for r in record["rows"]}
    head = "| implementation | " + " | ".join(f"T={t} fwd / fwd+bwd ms" for t in ts) + " | TFLOP/s f+b @8192 |"
    lines = [
        f"{record['device']}, torch {record['torch']}, triton {record['triton']}, commit {record['commit'][:10]}, "
        f"{record['date']}; bf16, Hq={HQ}, Hkv={HKV}, D={D}, B*T={TOKENS}; "
        f"bf16 matmul ceiling {record['matmul_ceiling_tflops']:.0f} TFLOP/s",
        "",
        head,
        "|" + "---|" * (len(ts) + 2),
    ]
    for n in names:
        cells = []
        for t in ts:
            r = by.get((n, t))
            if r is None or r["fwd_bwd_ms"] is None:
                cells.append(r["status"] if r else "-")
            else:
                cells.append(f"{r['fwd_ms']:.2f} / **{r['fwd_bwd_ms']:.2f}**")
        r8 = by.get((n, 8192))
        tf = f"{r8['fwd_bwd_tflops']:.0f}" if r8 and r8.get("fwd_bwd_tflops") else "-"
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {tf} |")
    lines += ["", "RLA state passes (kernels.rla.triton.STATE_PASSES; [..., default] is the code default): "
              "cumsum = chunk contributions written by one kernel, then a torch prefix sum; scan = one program "
              "per (batch, kv head, state tile) walks every chunk, state in registers; segscan = segment sums, "
              "a prefix sum over segments, then one program per segment."]
    default = record.get("state_pass_default", STATE_PASS)
    for t in ts:  # the state passes side by side, against the cumsum pass and fla
        ms = {n: by[(n, t)]["fwd_bwd_ms"] for n in names if (n, t) in by and by[(n, t)]["fwd_bwd_ms"]}
        fla = ms.get("fla chunk_linear_attn dk=256")
        for what in ("ours RLA w=512", "ours RAttention w=512"):
            base = next((v for n, v in ms.items() if n.startswith(f"{what} [cumsum")), None)
            cells = [f"{n[len(what) + 1:]} {v:.2f} ms" + (f" ({v / base:.2f}x cumsum)" if base else "")
                     + (f" ({v / fla:.2f}x fla)" if fla and "RLA" in what else "")
                     for n, v in ms.items() if n.startswith(f"{what} [")]
            if cells:
                lines += ["", f"T={t} {what} fwd+bwd: " + "; ".join(cells)]
    mem = [r for r in record["rows"] if r["impl"] == f"ours RAttention w=512 {_label(default)}"
           and r["peak_extra_mb"] is not None]
    if mem:
        lines += ["", f"Peak extra memory of ours RAttention w=512 [{default}], fwd+bwd (B*T fixed, so per-token "
                  "cost): "
                  + ", ".join(f"T={r['T']}: {r['peak_extra_mb']:.0f} MB "
                              f"({r['peak_extra_mb'] * 2**20 / TOKENS:.0f} B/token)" for r in mem)]
    return "\n".join(lines) + "\n"


# RLA tuning, coordinate-wise: each axis is tried in order on top of the best found so far (its first
# entry keeps that best), so one run combines the gains of different axes. Overrides of
# kernels.rla.triton.GPU_CFG, whose values are the last run's picks.
RLA_AXES = (
    ("chunk-sum warps", ({}, {"sum_warps": 4})),
    ("chunk-sum value block (phi(k) once)", ({}, {"sum_bv": 128, "sum_warps": 8})),
    ("output value block (phi once)", ({}, {"out_bv": 128}, {"out_bv": 128, "out_bk": 64},
                                       {"out_bv": 128, "out_warps": 8})),
    ("output/dV bf16 operands", ({}, {"out_lowp": True})),
    ("dq/dk value block", ({}, {"grad_bv": 64})),
    ("stages", ({}, {"out_stages": 3, "grad_stages": 3})),
    ("state scan tile (BK, BV), warps, stages", ({}, {"scan_bv": 32}, {"scan_bk": 64, "scan_warps": 4},
                                                 {"scan_warps": 4}, {"scan_stages": 3})),
)
SWA_VARIANTS = (  # overrides of kernels.swa.triton.GPU_BLOCKS; the first is the default
    {},
    {"dq": (128, 64, 8, 3)},
)


def _tune_rla(qr, kr, v, window: int, do: torch.Tensor, log: dict) -> None:
    """Time the RLA axes (fwd+bwd through the op), each variant checked first against the fp32 torch
    path; leave triton_rla.GPU_CFG at the fastest passing combination."""
    from kernels.rla import triton as triton_rla

    ref_in = [z.detach().float().requires_grad_() for z in (qr, kr, v)]
    ref = rla_chunked(*ref_in, window, "sm2", RLA_CHUNK)
    ref_g = [ref.detach()] + list(torch.autograd.grad(ref, ref_in, do))
    del ref, ref_in
    base = dict(triton_rla.GPU_CFG)
    chosen: dict = {}
    best_ms = float("inf")

    def measure(over: dict, axis: str) -> dict:
        triton_rla.GPU_CFG.clear()
        triton_rla.GPU_CFG.update(base, **over)
        row: dict = {"axis": axis, "cfg": dict(over)}
        try:
            out = rla_triton(qr, kr, v, window)
            g = [out.detach()] + list(torch.autograd.grad(out, [qr, kr, v], do))
            row["err"] = max(_rel(a, b_) for a, b_ in zip(g, ref_g, strict=True))
            del out, g
            f, fb = fwd_bwd_timer(lambda: rla_triton(qr, kr, v, window), [qr, kr, v])
            row["fwd_ms"], row["fwd_bwd_ms"] = _bench(f), _bench(fb)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
        row["ok"] = row.get("err", float("inf")) < TOL_BF16 and "error" not in row
        print(f"tune rla {over}: {row}", flush=True)
        log["rla"].append(row)
        return row

    row = measure({}, "defaults")
    if row["ok"]:
        best_ms = row["fwd_bwd_ms"]
    for axis, alternatives in RLA_AXES:
        pick = chosen
        for var in alternatives[1:]:
            over = {**chosen, **var}
            row = measure(over, axis)
            if row["ok"] and row["fwd_bwd_ms"] < best_ms:
                best_ms, pick = row["fwd_bwd_ms"], over
        chosen = pick
    triton_rla.GPU_CFG.clear()
    triton_rla.GPU_CFG.update(base, **chosen)
    log["rla_best"] = chosen
    log["rla_best_ms"] = best_ms


def tune(t: int = 8192, window: int = 512) -> dict:
    """Time RLA and SWA tile variants (fwd+bwd through the ops) at one length, each RLA variant checked
    against the fp32 torch path first; apply the fastest passing variant of each and return the log."""
    from kernels.swa import triton as triton_swa

    x = make_inputs(TOKENS // t, t)
    q, k, v, qr, kr = (x[n] for n in ("q", "k", "v", "q_raw", "k_raw"))
    log: dict = {"T": t, "window": window, "rla": [], "swa": []}
    do = torch.randn(q.shape, device=q.device, dtype=torch.float32)
    _tune_rla(qr, kr, v, window, do, log)
    base_swa = dict(triton_swa.GPU_BLOCKS)
    best = (float("inf"), {})
    for var in SWA_VARIANTS:
        triton_swa.GPU_BLOCKS.clear()
        triton_swa.GPU_BLOCKS.update(base_swa, **var)
        row = {"cfg": {kk: list(vv) for kk, vv in var.items()}}
        try:
            f, fb = fwd_bwd_timer(lambda: attention_triton(q, k, v, window), [q, k, v])
            row["fwd_ms"], row["fwd_bwd_ms"] = _bench(f), _bench(fb)
            if row["fwd_bwd_ms"] < best[0]:
                best = (row["fwd_bwd_ms"], var)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
        log["swa"].append(row)
        print(f"tune swa {var}: {row}", flush=True)
    triton_swa.GPU_BLOCKS.clear()
    triton_swa.GPU_BLOCKS.update(base_swa, **best[1])
    log["swa_best"] = {kk: list(vv) for kk, vv in best[1].items()}
    print(f"tune: applied rla {log['rla_best']} ({log['rla_best_ms']:.2f} ms), swa {log['swa_best']}", flush=True)
    torch.cuda.empty_cache()
    return log


_TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _sm90_resources(fn, args: tuple, kwargs: dict) -> dict:
    """Compile one recorded launch for sm_90a as the JIT would specialize it (ints equal to 1 become
    constants, pointers and multiples of 16 get divisibility 16) and read ptxas -v: registers and
    spill bytes per thread, shared memory per program. Needs triton's ptxas only, no GPU."""
    import re
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    opts = {"num_warps": kwargs.pop("num_warps"), "num_stages": kwargs.pop("num_stages")}
    consts = dict(kwargs)
    sig, attrs = {}, {}
    for i, (name, val) in enumerate(zip(fn.arg_names, args, strict=False)):
        if isinstance(val, torch.Tensor):
            sig[name] = "*" + _TRITON_TYPES[val.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif val == 1:
            sig[name] = "constexpr"
            consts[name] = 1
        else:
            sig[name] = "i32"
            if val % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    for name in consts:
        sig[name] = "constexpr"
    k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32), options=opts)
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(k.asm["ptx"])
        f.flush()
        res = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True)
    txt = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", txt)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", txt)
    return {"regs": int(regs.group(1)), "spill_st": int(spill.group(1)), "spill_ld": int(spill.group(2)),
            "smem": k.metadata.shared, **opts}


def ptxas_report(variants: list[tuple[str, dict]] | None = None, t: int = 8192, window: int = 512) -> list[dict]:
    """ptxas resources of every RLA kernel launch of one forward+backward at the bench shapes (bf16, B*T =
    65536) for the GPU defaults under each state pass, and each tuning alternative under the default pass:
    the launchers run on meta tensors and a recorder stands in for each kernel."""
    from kernels.rla import triton as R

    if variants is None:
        variants = [(sp, {}) for sp in R.STATE_PASSES]
        variants += [(R.STATE_PASS, var) for _, alts in RLA_AXES for var in alts[1:]]
    rows: list[dict] = []
    kernels = {"_chunk_sum_kernel": R._chunk_sum_kernel, "_state_scan_kernel": R._state_scan_kernel,
               "_rla_out_kernel": R._rla_out_kernel, "_rla_grad_kernel": R._rla_grad_kernel}
    launches: list[tuple[str, str, tuple, dict]] = []
    phase = ["fwd"]
    seen: dict[tuple, dict] = {}  # one compile per distinct specialization

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((phase[0], self.name, args, kwargs))

    b = TOKENS // t

    def view(h):
        return torch.empty(b, t, h, D, device="meta", dtype=torch.bfloat16).transpose(1, 2)

    saved = (dict(R.GPU_CFG), R.interpreted, R.check_launch)
    try:
        R.interpreted, R.check_launch = (lambda: False), (lambda x: None)
        for name in kernels:
            setattr(R, name, Recorder(name))
        for sp, var in variants:
            R.GPU_CFG.clear()
            R.GPU_CFG.update(saved[0], **var)
            launches.clear()
            q, k, v = view(HQ), view(HKV), view(HKV)
            phase[0] = "fwd"
            _, states = R.rla_fwd(q, k, v, window, state_pass=sp)
            do = torch.empty(q.shape, device="meta", dtype=torch.float32)
            phase[0] = "bwd"
            R.rla_bwd(do, q, k, v, states, window, state_pass=sp)
            for i, (ph, name, args, kwargs) in enumerate(launches):
                what = f"{ph} " + name.strip("_").replace("_kernel", "")
                key = (name, tuple(str(a.dtype) if isinstance(a, torch.Tensor) else a == 1 for a in args),
                       tuple(sorted(kwargs.items())))
                if key not in seen:
                    seen[key] = _sm90_resources(kernels[name], args, dict(kwargs))
                row = {"state_pass": sp, "cfg": var, "launch": f"{i}: {what}", **seen[key]}
                rows.append(row)
                print(f"ptxas sm_90a {sp:8s} {str(var):48s} {row['launch']:22s} regs {row['regs']:3d}  spill st/ld "
                      f"{row['spill_st']}/{row['spill_ld']} B  smem {row['smem']} B  warps {row['num_warps']}",
                      flush=True)
    finally:
        for name, fn in kernels.items():
            setattr(R, name, fn)
        R.GPU_CFG.clear()
        R.GPU_CFG.update(saved[0])
        R.interpreted, R.check_launch = saved[1], saved[2]
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, nargs="*", default=list(T_GRID), help="sequence lengths (B = 65536 / T)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/kernels-h200.json"))
    p.add_argument("--md", type=Path, default=None, help="also write the markdown table here")
    p.add_argument("--tune", action="store_true",
                   help="first time RLA/SWA tile variants at T=8192 and apply the fastest (checked) ones")
    p.add_argument("--tune-only", action="store_true", help="only the tuning pass")
    p.add_argument("--state-passes", nargs="*", default=list(STATE_PASSES), choices=STATE_PASSES,
                   help="RLA state passes to check and time side by side (default: all)")
    p.add_argument("--ptxas", action="store_true",
                   help="no GPU needed: registers/spills of the RLA kernels on sm_90a for each tuning variant")
    a = p.parse_args(argv)
    if a.ptxas:
        ptxas_report()
        return
    if not torch.cuda.is_available():
        sys.exit("kernels.bench: needs a CUDA GPU (the CPU benchmark is benchmarks/bench_cpu.py)")
    tuned = None
    if a.tune or a.tune_only:
        torch.manual_seed(1)
        tuned = tune()
        if a.tune_only:
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps({"tune": tuned}, indent=1))
            return
    run(tuple(a.T), a.out, a.md, tuned, tuple(a.state_passes))


if __name__ == "__main__":
    main()
