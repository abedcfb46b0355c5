"""Residual linear attention in Triton, chunked, forward and backward (the math: reference.py).

With shift s = w + 1, query chunk c = [cC, cC + C) reads the state of keys < cC - s and, inside the
chunk, key chunk c = [cC - s, cC - s + C) under the mask "key row <= query row": the window shift is
index arithmetic on the key pointers, with no padded copies. phi (sm2 or relu2) is computed on chip
from q and k tiles and never written to memory; phi's two halves [f(x), f(-x)] are kept as two
(rows, D) tiles, and so is the state (2D, D) as two (D, BV) tiles per value block of width BV.

Flexible state saving: the chunks are grouped into segments of m chunks. The forward stores the
fp32 state only at segment starts, (B, Hkv, NS, 2D, D); every kernel then walks one segment
sequentially, recomputing the states inside it, with segments, heads and value blocks in parallel.
The segment-start states are a prefix sum (torch.cumsum) of per-segment sums from a parallel kernel;
the backward gets its reverse states (sum over later queries of phi(q)^T do) the same way.

Gradients: dphi_q = do S^T + mask(do v^T) phi(k); dv = phi(k) dH + mask(phi(k) phi(q)^T) do;
dphi_k = v dH^T + mask(v do^T) phi(q), with dH the reverse state. The feature-map backward is
linear in dphi, so value blocks add their partial dq/dk with atomics into an fp32 buffer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_utils import check_launch, dot_precision, interpreted, mm, new_output

PHI_IDS = {"sm2": 0, "relu2": 1}


@triton.jit
def _phi(x, valid, PHI: tl.constexpr):
    """[f(x), f(-x)] of fp32 rows x (R, D) as two tiles; rows not ``valid`` give 0."""
    if PHI == 0:
        ep = tl.exp(x - tl.max(x, 1)[:, None])
        pos = ep / tl.sum(ep, 1)[:, None]
        en = tl.exp(tl.min(x, 1)[:, None] - x)
        neg = en / tl.sum(en, 1)[:, None]
    else:
        pos = tl.maximum(x, 0.0)
        neg = tl.maximum(-x, 0.0)
    pos = tl.where(valid[:, None], pos, 0.0)
    neg = tl.where(valid[:, None], neg, 0.0)
    return pos, neg


@triton.jit
def _phi_bwd(x, pos, neg, dpos, dneg, PHI: tl.constexpr):
    """dx from the gradients of the two halves (linear in dpos, dneg)."""
    if PHI == 0:
        dx = pos * (dpos - tl.sum(dpos * pos, 1)[:, None]) - neg * (dneg - tl.sum(dneg * neg, 1)[:, None])
    else:
        dx = tl.where(x > 0, dpos, 0.0) - tl.where(x < 0, dneg, 0.0)
    return dx


@triton.jit
def _seg_sum_kernel(
    X, Y, OUT, sxb, sxh, sxt, syb, syh, syt,
    T, HKV, G, OFF, NC, M,
    D: tl.constexpr, C: tl.constexpr, BV: tl.constexpr, PHI: tl.constexpr, PREC: tl.constexpr,
):
    """OUT[b, hk, seg] = sum over the segment's chunks c and the group's heads of phi(X_c)^T Y_c, where
    chunk c holds rows [cC + OFF, cC + OFF + C) (OFF = -s for keys, 0 for queries)."""
    seg = tl.program_id(0)
    pid_bh = tl.program_id(1)
    v0 = tl.program_id(2) * BV
    b = pid_bh // HKV
    hk = pid_bh % HKV
    offs_c = tl.arange(0, C)
    offs_d = tl.arange(0, D)
    offs_v = v0 + tl.arange(0, BV)
    acc_p = tl.zeros([D, BV], tl.float32)
    acc_n = tl.zeros([D, BV], tl.float32)
    n_chunks = NC - seg * M
    if n_chunks > M:
        n_chunks = M
    for ci in range(0, n_chunks):
        rows = (seg * M + ci) * C + OFF + offs_c
        ok = (rows >= 0) & (rows < T)
        for g in range(0, G):
            h = hk * G + g
            x = tl.load(X + b * sxb + h * sxh + rows[:, None] * sxt + offs_d[None, :], mask=ok[:, None],
                        other=0.0).to(tl.float32)
            y = tl.load(Y + b * syb + h * syh + rows[:, None] * syt + offs_v[None, :], mask=ok[:, None],
                        other=0.0).to(tl.float32)
            xp, xn = _phi(x, ok, PHI)
            acc_p += mm(tl.trans(xp), y, PREC, False)
            acc_n += mm(tl.trans(xn), y, PREC, False)
    base = OUT + (pid_bh * tl.num_programs(0) + seg) * 2 * D * D
    tl.store(base + offs_d[:, None] * D + offs_v[None, :], acc_p)
    tl.store(base + (D + offs_d)[:, None] * D + offs_v[None, :], acc_n)


@triton.jit
def _rla_fwd_kernel(
    Q, K, V, STATES, O,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
    T, H, G, SHIFT, NC, M, NS,
    D: tl.constexpr, C: tl.constexpr, BV: tl.constexpr, PHI: tl.constexpr, PREC: tl.constexpr,
):
    seg = tl.program_id(0)
    pid_bh = tl.program_id(1)
    v0 = tl.program_id(2) * BV
    b = pid_bh // H
    h = pid_bh % H
    hk = h // G
    offs_c = tl.arange(0, C)
    offs_d = tl.arange(0, D)
    offs_v = v0 + tl.arange(0, BV)
    st = STATES + ((b * (H // G) + hk) * NS + seg) * 2 * D * D
    s_p = tl.load(st + offs_d[:, None] * D + offs_v[None, :])
    s_n = tl.load(st + (D + offs_d)[:, None] * D + offs_v[None, :])
    causal = offs_c[None, :] <= offs_c[:, None]
    n_chunks = NC - seg * M
    if n_chunks > M:
        n_chunks = M
    for ci in range(0, n_chunks):
        t = (seg * M + ci) * C + offs_c
        q_ok = t < T
        j = t - SHIFT
        k_ok = (j >= 0) & (j < T)
        q = tl.load(Q + b * sqb + h * sqh + t[:, None] * sqt + offs_d[None, :], mask=q_ok[:, None],
                    other=0.0).to(tl.float32)
        k = tl.load(K + b * skb + hk * skh + j[:, None] * skt + offs_d[None, :], mask=k_ok[:, None],
                    other=0.0).to(tl.float32)
        v = tl.load(V + b * svb + hk * svh + j[:, None] * svt + offs_v[None, :], mask=k_ok[:, None],
                    other=0.0).to(tl.float32)
        qp, qn = _phi(q, q_ok, PHI)
        kp, kn = _phi(k, k_ok, PHI)
        a = mm(qp, tl.trans(kp), PREC, False) + mm(qn, tl.trans(kn), PREC, False)
        a = tl.where(causal, a, 0.0)
        o = mm(qp, s_p, PREC, False) + mm(qn, s_n, PREC, False) + mm(a, v, PREC, False)
        tl.store(O + b * sob + h * soh + t[:, None] * sot + offs_v[None, :], o.to(O.dtype.element_ty),
                 mask=q_ok[:, None])
        s_p += mm(tl.trans(kp), v, PREC, False)
        s_n += mm(tl.trans(kn), v, PREC, False)


@triton.jit
def _rla_bwd_dq_kernel(
    Q, K, V, DO, STATES, DQ,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt,
    T, H, G, SHIFT, NC, M, NS,
    D: tl.constexpr, C: tl.constexpr, BV: tl.constexpr, PHI: tl.constexpr, PREC: tl.constexpr,
):
    seg = tl.program_id(0)
    pid_bh = tl.program_id(1)
    v0 = tl.program_id(2) * BV
    b = pid_bh // H
    h = pid_bh % H
    hk = h // G
    offs_c = tl.arange(0, C)
    offs_d = tl.arange(0, D)
    offs_v = v0 + tl.arange(0, BV)
    st = STATES + ((b * (H // G) + hk) * NS + seg) * 2 * D * D
    s_p = tl.load(st + offs_d[:, None] * D + offs_v[None, :])
    s_n = tl.load(st + (D + offs_d)[:, None] * D + offs_v[None, :])
    causal = offs_c[None, :] <= offs_c[:, None]
    n_chunks = NC - seg * M
    if n_chunks > M:
        n_chunks = M
    for ci in range(0, n_chunks):
        t = (seg * M + ci) * C + offs_c
        q_ok = t < T
        j = t - SHIFT
        k_ok = (j >= 0) & (j < T)
        q = tl.load(Q + b * sqb + h * sqh + t[:, None] * sqt + offs_d[None, :], mask=q_ok[:, None],
                    other=0.0).to(tl.float32)
        do = tl.load(DO + b * sdb + h * sdh + t[:, None] * sdt + offs_v[None, :], mask=q_ok[:, None],
                     other=0.0).to(tl.float32)
        k = tl.load(K + b * skb + hk * skh + j[:, None] * skt + offs_d[None, :], mask=k_ok[:, None],
                    other=0.0).to(tl.float32)
        v = tl.load(V + b * svb + hk * svh + j[:, None] * svt + offs_v[None, :], mask=k_ok[:, None],
                    other=0.0).to(tl.float32)
        qp, qn = _phi(q, q_ok, PHI)
        kp, kn = _phi(k, k_ok, PHI)
        da = tl.where(causal, mm(do, tl.trans(v), PREC, False), 0.0)
        dqp = mm(do, tl.trans(s_p), PREC, False) + mm(da, kp, PREC, False)
        dqn = mm(do, tl.trans(s_n), PREC, False) + mm(da, kn, PREC, False)
        dq = _phi_bwd(q, qp, qn, dqp, dqn, PHI)
        tl.atomic_add(DQ + pid_bh * T * D + t[:, None] * D + offs_d[None, :], dq, mask=q_ok[:, None])
        s_p += mm(tl.trans(kp), v, PREC, False)
        s_n += mm(tl.trans(kn), v, PREC, False)


@triton.jit
def _rla_bwd_dkv_kernel(
    Q, K, V, DO, DSTATES, DK, DV,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt,
    T, HKV, G, SHIFT, NC, M, NS,
    D: tl.constexpr, C: tl.constexpr, BV: tl.constexpr, PHI: tl.constexpr, PREC: tl.constexpr,
):
    seg = tl.program_id(0)
    pid_bh = tl.program_id(1)
    v0 = tl.program_id(2) * BV
    b = pid_bh // HKV
    hk = pid_bh % HKV
    offs_c = tl.arange(0, C)
    offs_d = tl.arange(0, D)
    offs_v = v0 + tl.arange(0, BV)
    st = DSTATES + (pid_bh * NS + seg) * 2 * D * D
    dh_p = tl.load(st + offs_d[:, None] * D + offs_v[None, :])
    dh_n = tl.load(st + (D + offs_d)[:, None] * D + offs_v[None, :])
    causal_t = offs_c[:, None] <= offs_c[None, :]  # (key row, query row): key row <= query row
    n_chunks = NC - seg * M
    if n_chunks > M:
        n_chunks = M
    for ci in range(0, n_chunks):
        c = seg * M + n_chunks - 1 - ci
        t = c * C + offs_c
        q_ok = t < T
        j = t - SHIFT
        k_ok = (j >= 0) & (j < T)
        k = tl.load(K + b * skb + hk * skh + j[:, None] * skt + offs_d[None, :], mask=k_ok[:, None],
                    other=0.0).to(tl.float32)
        v = tl.load(V + b * svb + hk * svh + j[:, None] * svt + offs_v[None, :], mask=k_ok[:, None],
                    other=0.0).to(tl.float32)
        kp, kn = _phi(k, k_ok, PHI)
        dv = mm(kp, dh_p, PREC, False) + mm(kn, dh_n, PREC, False)
        dkp = mm(v, tl.trans(dh_p), PREC, False)
        dkn = mm(v, tl.trans(dh_n), PREC, False)
        for g in range(0, G):
            h = hk * G + g
            q = tl.load(Q + b * sqb + h * sqh + t[:, None] * sqt + offs_d[None, :], mask=q_ok[:, None],
                        other=0.0).to(tl.float32)
            do = tl.load(DO + b * sdb + h * sdh + t[:, None] * sdt + offs_v[None, :], mask=q_ok[:, None],
                         other=0.0).to(tl.float32)
            qp, qn = _phi(q, q_ok, PHI)
            at = mm(kp, tl.trans(qp), PREC, False) + mm(kn, tl.trans(qn), PREC, False)
            at = tl.where(causal_t, at, 0.0)
            dv += mm(at, do, PREC, False)
            dat = tl.where(causal_t, mm(v, tl.trans(do), PREC, False), 0.0)
            dkp += mm(dat, qp, PREC, False)
            dkn += mm(dat, qn, PREC, False)
            dh_p += mm(tl.trans(qp), do, PREC, False)
            dh_n += mm(tl.trans(qn), do, PREC, False)
        dk = _phi_bwd(k, kp, kn, dkp, dkn, PHI)
        tl.atomic_add(DK + pid_bh * T * D + j[:, None] * D + offs_d[None, :], dk, mask=k_ok[:, None])
        tl.store(DV + pid_bh * T * D + j[:, None] * D + offs_v[None, :], dv.to(DV.dtype.element_ty),
                 mask=k_ok[:, None])


def _sizes(d: int, chunk: int | None, seg_chunks: int | None, block_v: int | None) -> tuple[int, int, int, int]:
    """(C, m, BV, num_warps): small tiles under the interpreter. On sm_90 with D=128 and fp32 (tf32)
    operands, C=64 needs 245 KB of shared memory in the dK/dV kernel (limit 227 KB). Measured on the
    H200 at T=8192 (benchmarks/README.md), fwd+bwd: C=16, BV=64: 20.8 ms; C=16, BV=32: 30.0 (no spills,
    but twice the phi recomputation); C=32, BV=64: 32.3 (spills)."""
    if interpreted():
        c, m, bv, warps = 16, 2, min(32, d), 4
    else:
        c, m, bv = 16, 32, 64
    c, m, bv = chunk or c, seg_chunks or m, block_v or bv
    warps = 4 if interpreted() else 8
    return c, m, bv, warps


def _check(q: torch.Tensor, k: torch.Tensor, window: int, phi: str, c: int, bv: int) -> None:
    if window < 0:
        raise ValueError(f"window: must be >= 0, got {window}")
    if phi not in PHI_IDS:
        raise ValueError(f"phi: unknown feature map {phi!r}; allowed: {', '.join(PHI_IDS)}")
    d = q.shape[-1]
    if d & (d - 1) or d < 16:
        raise ValueError(f"head_dim: must be a power of two >= 16 for the Triton RLA, got {d}")
    if c & (c - 1) or c < 16 or bv & (bv - 1) or bv < 16 or d % bv:
        raise ValueError(f"chunk {c} and block_v {bv}: must be powers of two >= 16, block_v dividing D")


def _lastdim_contig(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _seg_sums(x: torch.Tensor, y: torch.Tensor, hkv: int, off: int, c: int, m: int, bv: int, phi: str,
              warps: int) -> torch.Tensor:
    """Per-segment sums of phi(x)^T y over chunks (and over each kv head's query group), fp32."""
    b, hx, t, d = x.shape
    nc = triton.cdiv(t, c)
    ns = triton.cdiv(nc, m)
    out = new_output((b, hkv, ns, 2 * d, d), torch.float32, x.device)
    _seg_sum_kernel[(ns, b * hkv, d // bv)](
        x, y, out, x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1), y.stride(2),
        t, hkv, hx // hkv, off, nc, m,
        D=d, C=c, BV=bv, PHI=PHI_IDS[phi], PREC=dot_precision(x.dtype), num_warps=warps, num_stages=2,
    )
    return out


def rla_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, phi: str = "sm2",
    chunk: int | None = None, seg_chunks: int | None = None, block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward launch: (o (B, Hq, T, D) fp32, segment-start states (B, Hkv, NS, 2D, D) fp32)."""
    check_launch(q)
    q, k, v = (_lastdim_contig(x) for x in (q, k, v))
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    c, m, bv, warps = _sizes(d, chunk, seg_chunks, block_v)
    _check(q, k, window, phi, c, bv)
    s = window + 1
    nc = triton.cdiv(t, c)
    ns = triton.cdiv(nc, m)
    local = _seg_sums(k, v, hkv, -s, c, m, bv, phi, warps)
    states = torch.zeros_like(local)
    if ns > 1:
        torch.cumsum(local[:, :, :-1], dim=2, out=states[:, :, 1:])
    o = new_output((b, hq, t, d), torch.float32, q.device)
    _rla_fwd_kernel[(ns, b * hq, d // bv)](
        q, k, v, states, o,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        t, hq, hq // hkv, s, nc, m, ns,
        D=d, C=c, BV=bv, PHI=PHI_IDS[phi], PREC=dot_precision(q.dtype), num_warps=warps, num_stages=2,
    )
    return o, states


def rla_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, states: torch.Tensor, window: int,
    phi: str = "sm2", chunk: int | None = None, seg_chunks: int | None = None, block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward launch from the saved segment states: (dq, dk, dv) in the dtypes of q, k, v."""
    check_launch(q)
    q, k, v, do = (_lastdim_contig(x) for x in (q, k, v, do))
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    c, m, bv, warps = _sizes(d, chunk, seg_chunks, block_v)
    _check(q, k, window, phi, c, bv)
    s = window + 1
    nc = triton.cdiv(t, c)
    ns = triton.cdiv(nc, m)
    prec = dot_precision(q.dtype)
    # reverse states: dH entering segment j from the right = sum over query chunks of later segments
    local = _seg_sums(q, do, hkv, 0, c, m, bv, phi, warps)
    dstates = torch.zeros_like(local)
    if ns > 1:
        dstates[:, :, :-1] = torch.cumsum(local[:, :, 1:].flip(2), dim=2).flip(2)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))
    dq = torch.zeros((b, hq, t, d), dtype=torch.float32, device=q.device)  # atomics accumulate here
    _rla_bwd_dq_kernel[(ns, b * hq, d // bv)](
        q, k, v, do, states, dq, *strides, t, hq, hq // hkv, s, nc, m, ns,
        D=d, C=c, BV=bv, PHI=PHI_IDS[phi], PREC=prec, num_warps=warps, num_stages=2,
    )
    dk = torch.zeros((b, hkv, t, d), dtype=torch.float32, device=q.device)
    dv = new_output((b, hkv, t, d), v.dtype, q.device)
    # keys never seen by any query (j >= NC*C - s) sit in no key chunk: their gradient is zero
    dv[:, :, max(0, nc * c - s):] = 0
    _rla_bwd_dkv_kernel[(ns, b * hkv, d // bv)](
        q, k, v, do, dstates, dk, dv, *strides, t, hkv, hq // hkv, s, nc, m, ns,
        D=d, C=c, BV=bv, PHI=PHI_IDS[phi], PREC=prec, num_warps=warps, num_stages=2,
    )
    return dq.to(q.dtype), dk.to(k.dtype), dv


class RLAFunction(torch.autograd.Function):
    """Autograd wrapper over the launchers, callable directly (tests run it on CPU under the interpreter)."""

    @staticmethod
    def forward(ctx, q, k, v, window, phi, chunk, seg_chunks):
        o, states = rla_fwd(q, k, v, window, phi, chunk, seg_chunks)
        ctx.save_for_backward(q, k, v, states)
        ctx.args = (window, phi, chunk, seg_chunks)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, states = ctx.saved_tensors
        window, phi, chunk, seg_chunks = ctx.args
        dq, dk, dv = rla_bwd(do, q, k, v, states, window, phi, chunk, seg_chunks)
        return dq, dk, dv, None, None, None, None


def rla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, phi: str = "sm2",
        chunk: int | None = None, seg_chunks: int | None = None) -> torch.Tensor:
    """Differentiable Triton residual linear attention, output fp32 (no torch.compile registration)."""
    return RLAFunction.apply(q, k, v, window, phi, chunk, seg_chunks)
