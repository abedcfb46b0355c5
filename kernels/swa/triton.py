"""Sliding-window causal softmax attention in Triton: tiled forward and backward (the math: naive.py).

Query t sees keys j with ``0 <= t - j <= w``; ``window=None`` is full causal. Each query block only
visits the key blocks that intersect its window (and each key block only the query blocks that can
see it), so the cost grows with T * w. GQA: query head h reads kv head h // (Hq // Hkv); the dK/dV
program of a kv head loops over its query heads, so no atomics are needed. Inputs bf16/fp16/fp32,
accumulation fp32; the forward saves the log-sum-exp (base 2) per query for the backward. The
backward's delta = rowsum(o * dO) is computed by the dQ kernel (which reads those rows anyway) and
stored for the dK/dV kernel, which runs after it: no separate pass.
Tensors are (B, H, T, D) and may be strided views; only the last dim must be contiguous.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.triton_utils import check_launch, dot_precision, interpreted, mm, new_output, upcast_dots

LOG2E = 1.4426950408889634


@triton.jit
def _swa_fwd_kernel(
    Q, K, V, O, LSE,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
    T, H, GROUP, WINDOW, qk_scale,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < T
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh

    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    lo = pid_m * BM - WINDOW
    if lo < 0:
        lo = 0
    lo = lo // BN * BN
    hi = (pid_m + 1) * BM
    if hi > T:
        hi = T
    for start_n in range(lo, hi, BN):
        cols = start_n + offs_n
        col_ok = cols < T
        k = tl.load(k_base + cols[:, None] * skt + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * svt + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        s = mm(q, tl.trans(k), PREC, UPCAST) * qk_scale
        # only blocks on the diagonal, the window's edge or the end of the sequence need a mask
        if (start_n + BN > pid_m * BM + 1) | ((pid_m + 1) * BM - 1 - start_n > WINDOW) | (start_n + BN > T):
            diff = offs_m[:, None] - cols[None, :]
            visible = (diff >= 0) & (diff <= WINDOW) & col_ok[None, :]
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + mm(p.to(v.dtype), v, PREC, UPCAST)
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_safe[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :], o.to(O.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(LSE + pid_bh * T + offs_m, m_i + tl.log2(l_safe), mask=row_ok)


@triton.jit
def _swa_bwd_dq_kernel(
    Q, K, V, DO, O, LSE, DELTA, DQ,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt, sob, soh, sot,
    T, H, GROUP, WINDOW, qk_scale, sm_scale,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < T
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + pid_bh * T + offs_m, mask=row_ok, other=0.0)
    # delta = rowsum(o * do), fused here (it is this program's rows) and stored for the dK/dV kernel
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh * T + offs_m, delta, mask=row_ok)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    dq = tl.zeros([BM, D], tl.float32)
    lo = pid_m * BM - WINDOW
    if lo < 0:
        lo = 0
    lo = lo // BN * BN
    hi = (pid_m + 1) * BM
    if hi > T:
        hi = T
    for start_n in range(lo, hi, BN):
        cols = start_n + offs_n
        col_ok = cols < T
        k = tl.load(k_base + cols[:, None] * skt + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * svt + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        s = mm(q, tl.trans(k), PREC, UPCAST) * qk_scale
        p = tl.exp2(s - lse[:, None])
        if (start_n + BN > pid_m * BM + 1) | ((pid_m + 1) * BM - 1 - start_n > WINDOW) | (start_n + BN > T):
            diff = offs_m[:, None] - cols[None, :]
            visible = (diff >= 0) & (diff <= WINDOW) & col_ok[None, :] & row_ok[:, None]
            p = tl.where(visible, p, 0.0)
        dp = mm(do, tl.trans(v), PREC, UPCAST)
        ds = p * (dp - delta[:, None])
        dq += mm(ds.to(k.dtype), k, PREC, UPCAST)
    tl.store(DQ + pid_bh * T * D + offs_m[:, None] * D + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None])


@triton.jit
def _swa_bwd_dkv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt,
    T, HKV, GROUP, WINDOW, qk_scale, sm_scale,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_m = tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    col_ok = offs_n < T
    k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skt + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svt + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    dk = tl.zeros([BN, D], tl.float32)
    dv = tl.zeros([BN, D], tl.float32)
    lo = pid_n * BN // BM * BM
    hi = (pid_n + 1) * BN + WINDOW
    if hi > T:
        hi = T
    for g in range(GROUP):
        h = hk * GROUP + g
        bh = b * HKV * GROUP + h
        for start_m in range(lo, hi, BM):
            rows = start_m + offs_m
            row_ok = rows < T
            q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqt + offs_d[None, :], mask=row_ok[:, None],
                        other=0.0)
            do = tl.load(DO + b * sdb + h * sdh + rows[:, None] * sdt + offs_d[None, :], mask=row_ok[:, None],
                         other=0.0)
            lse = tl.load(LSE + bh * T + rows, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + bh * T + rows, mask=row_ok, other=0.0)
            st = mm(k, tl.trans(q), PREC, UPCAST) * qk_scale  # (BN keys, BM queries)
            pt = tl.exp2(st - lse[None, :])
            n0 = pid_n * BN
            if (n0 + BN > start_m + 1) | (start_m + BM - 1 - n0 > WINDOW) | (start_m + BM > T) | (n0 + BN > T):
                diff = rows[None, :] - offs_n[:, None]
                visible = (diff >= 0) & (diff <= WINDOW) & row_ok[None, :] & col_ok[:, None]
                pt = tl.where(visible, pt, 0.0)
            dv += mm(pt.to(do.dtype), do, PREC, UPCAST)
            dpt = mm(v, tl.trans(do), PREC, UPCAST)
            dst = pt * (dpt - delta[None, :])
            dk += mm(dst.to(q.dtype), q, PREC, UPCAST)
    out = pid_bh * T * D + offs_n[:, None] * D + offs_d[None, :]
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


# (BM, BN, num_warps, num_stages) per kernel on the GPU at D >= 128 (4 warps below); tuning overrides these.
GPU_BLOCKS = {"fwd": (128, 64, 8, 3), "dq": (128, 64, 8, 3), "dkv": (32, 128, 8, 3)}


def _blocks(d: int, kind: str) -> tuple[int, int, int, int]:
    """(BM, BN, num_warps, num_stages) for a head dim; small tiles under the interpreter. The backward
    blocks: dK/dV 32 queries by 128 keys (ptxas: no spills at D=128 on sm_90, where 64x64 spilled); dQ
    128 queries by 64 keys (H200 tune, w=512 fwd+bwd: 3.94 ms against 4.14 for 128x32 and 5.47 for 64x64)."""
    if interpreted():
        return 16, 16, 4, 1
    bm, bn, warps, stages = GPU_BLOCKS[kind]
    return bm, bn, (warps if d >= 128 else 4), stages


def _window_arg(window: int | None, t: int) -> int:
    if window is None:
        return t
    if window < 0:
        raise ValueError(f"window: must be >= 0 or None, got {window}")
    return min(window, t)


def _lastdim_contig(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def swa_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None, scale: float | None = None,
    block_m: int | None = None, block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward launch: returns (o in q's dtype, lse (B, Hq, T) fp32, base 2, of the scaled scores)."""
    check_launch(q)
    q, k, v = (_lastdim_contig(x) for x in (q, k, v))
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    bm, bn, warps, stages = _blocks(d, "fwd")
    bm, bn = block_m or bm, block_n or bn
    o = new_output((b, hq, t, d), q.dtype, q.device)
    lse = new_output((b, hq, t), torch.float32, q.device)
    grid = (triton.cdiv(t, bm), b * hq)
    _swa_fwd_kernel[grid](
        q, k, v, o, lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        t, hq, hq // hkv, _window_arg(window, t), scale * LOG2E,
        D=d, BM=bm, BN=bn, PREC=dot_precision(q.dtype), UPCAST=upcast_dots(q.dtype), num_warps=warps, num_stages=stages,
    )
    return o, lse


def swa_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    window: int | None, scale: float | None = None, block_m: int | None = None, block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward launch: (dq, dk, dv) in the dtypes of q, k, v, contiguous (B, H, T, D)."""
    check_launch(q)
    q, k, v, do = (_lastdim_contig(x) for x in (q, k, v, do))
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    o = _lastdim_contig(o)
    delta = new_output((b, hq, t), torch.float32, q.device)  # written by the dq kernel
    w = _window_arg(window, t)
    prec = dot_precision(q.dtype)
    dq = new_output((b, hq, t, d), q.dtype, q.device)
    dk = new_output((b, hkv, t, d), k.dtype, q.device)
    dv = new_output((b, hkv, t, d), v.dtype, q.device)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))
    bm, bn, warps, stages = _blocks(d, "dq")
    bm, bn = block_m or bm, block_n or bn
    _swa_bwd_dq_kernel[(triton.cdiv(t, bm), b * hq)](
        q, k, v, do, o, lse, delta, dq, *strides, o.stride(0), o.stride(1), o.stride(2),
        t, hq, hq // hkv, w, scale * LOG2E, scale,
        D=d, BM=bm, BN=bn, PREC=prec, UPCAST=upcast_dots(q.dtype), num_warps=warps, num_stages=stages,
    )
    bm, bn, warps, stages = _blocks(d, "dkv")
    bm, bn = block_m or bm, block_n or bn
    _swa_bwd_dkv_kernel[(triton.cdiv(t, bn), b * hkv)](
        q, k, v, do, lse, delta, dk, dv, *strides, t, hkv, hq // hkv, w, scale * LOG2E, scale,
        D=d, BM=bm, BN=bn, PREC=prec, UPCAST=upcast_dots(q.dtype), num_warps=warps, num_stages=stages,
    )
    return dq, dk, dv


class SWAFunction(torch.autograd.Function):
    """Autograd wrapper over the launchers, callable directly (tests run it on CPU under the interpreter)."""

    @staticmethod
    def forward(ctx, q, k, v, window, scale):
        o, lse = swa_fwd(q, k, v, window, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.window, ctx.scale = window, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = swa_bwd(do, q, k, v, o, lse, ctx.window, ctx.scale)
        return dq, dk, dv, None, None


def swa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None,
        scale: float | None = None) -> torch.Tensor:
    """Differentiable Triton sliding-window attention (no torch.compile registration; see ops.py)."""
    return SWAFunction.apply(q, k, v, window, scale)
