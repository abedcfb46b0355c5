"""Residual linear attention in Triton, chunk-parallel, forward and backward (the math: naive.py).

With shift s = w + 1, query chunk c = [cC, cC + C) reads the state S_c of keys < cC - s and, inside the
chunk, key chunk c = [cC - s, cC - s + C) under the mask "key row <= query row": the window shift is
index arithmetic on the key pointers, with no padded copies. phi (sm2 or relu2) is computed on chip
from q and k tiles and never written to memory; phi's two halves [f(x), f(-x)] are handled as two
(rows, D) tiles, and a state (2D, D) as its two (D, D) halves.

Chunk-parallel: the chunk states S_c (B, Hkv, NC, 2D, D) are made first (the state pass), then every
(chunk, head) program of the output and gradient kernels is independent: phi of a tile is computed
once per program instead of once per value block of a sequential scan. The softmax statistics (row
max/min and 1/sum) of a tile are computed once; feature blocks of phi are recomputed from them where a
product contracts over features (K-loop), so states stream through shared memory in (BK, BV) tiles.

The state pass (STATE_PASSES): "cumsum" writes every chunk's contribution phi(k_c)^T v_c (fp32) into
slot c + 1 of the buffer and an in-place torch prefix sum over slots turns it into the states (the
buffer is written, read, written and read again); "scan" and "segscan" accumulate the prefix sum on
chip (_state_scan_kernel: one program per state tile walks chunks in order, the fp32 state in
registers, and stores each S_c once), over the whole sequence ("scan") or within segments of m chunks
seeded by a prefix sum of segment sums ("segscan", m times the programs).

Flexible state saving: the forward returns (and autograd saves) the fp32 state only at segment
starts, every m chunks, (B, Hkv, NS, 2D, D). The backward recomputes the chunk states inside each
segment from them (segment start + prefix sum of the chunk contributions within the segment, or a
scan of the segment from its start).

Gradients (dH_c = sum over query chunks c' > c of the group's phi(q)^T do, a reverse prefix sum):
  dphi_q = do S^T + mask(do v^T) phi(k)                      (_rla_grad_kernel, rows = queries)
  dphi_k = v dH^T + sum_g mask^T(v do_g^T) phi(q_g)          (_rla_grad_kernel, rows = keys)
  dv     = phi(k) dH + sum_g mask^T(phi(k) phi(q_g)^T) do_g  (_rla_out_kernel, reversed)
and the feature-map backward row by row. Each gradient row is owned by one program: no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_utils import check_launch, dot_precision, interpreted, mm, new_output

PHI_IDS = {"sm2": 0, "relu2": 1}
# How the chunk states S_c (forward) and dH_c (backward) are made, all exact to the same sums:
#   "cumsum":  one kernel writes every chunk's contribution (fp32), a torch prefix sum over chunks turns
#              the buffer into states in place (written, read, written, read again);
#   "scan":    one program per (batch, kv head, state tile) walks every chunk in order, the state in
#              registers, and stores each S_c once (the forward: and the segment starts, for the backward);
#   "segscan": segment sums on chip, a prefix sum over the m-times-fewer segments, then one program per
#              (batch, kv head, state tile, segment) walks its m chunks (m times the parallelism of "scan").
# The backward's forward states always start from the saved segment starts, one program per segment,
# under both scans. The forward's S_c is stored in bf16 under both scans when the output kernel rounds
# it to bf16 anyway (out_lowp).
STATE_PASSES = ("cumsum", "scan", "segscan")
# The default stays the pass measured on the H200 (kernels-h200.json): the scans pass the interpreter tests
# and compile for sm_90a without spills, but have not yet run on a GPU. `python -m kernels.bench` times all
# three side by side; switch this to the fastest once that run has checked them at full size.
STATE_PASS = "cumsum"


@triton.jit
def _stats(x, PHI: tl.constexpr):
    """Row statistics of fp32 rows x (R, D) for phi: (max, 1/sum exp(x - max), min, 1/sum exp(min - x))."""
    if PHI == 0:
        mp = tl.max(x, 1)
        ip = 1.0 / tl.sum(tl.exp(x - mp[:, None]), 1)
        mn = tl.min(x, 1)
        inn = 1.0 / tl.sum(tl.exp(mn[:, None] - x), 1)
    else:
        mp = tl.max(x, 1) * 0.0
        ip = mp
        mn = mp
        inn = mp
    return mp, ip, mn, inn


@triton.jit
def _stats_blocked(ptr, ok, R: tl.constexpr, D: tl.constexpr, BK: tl.constexpr, PHI: tl.constexpr):
    """_stats of the rows at ptr (R, 1) + column, read in (R, BK) column blocks (online max and sum)."""
    offs_k = tl.arange(0, BK)
    mp = tl.full([R], float("-inf"), tl.float32)
    sp = tl.zeros([R], tl.float32)
    mn = tl.full([R], float("inf"), tl.float32)
    sn = tl.zeros([R], tl.float32)
    if PHI == 0:
        for kb in range(0, D, BK):
            x = tl.load(ptr + (kb + offs_k)[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
            mp_new = tl.maximum(mp, tl.max(x, 1))
            sp = sp * tl.exp(mp - mp_new) + tl.sum(tl.exp(x - mp_new[:, None]), 1)
            mp = mp_new
            mn_new = tl.minimum(mn, tl.min(x, 1))
            sn = sn * tl.exp(mn_new - mn) + tl.sum(tl.exp(mn_new[:, None] - x), 1)
            mn = mn_new
    sp = tl.where(sp > 0, sp, 1.0)  # relu2 (no statistics): avoid 1/0
    sn = tl.where(sn > 0, sn, 1.0)
    return mp, 1.0 / sp, mn, 1.0 / sn


@triton.jit
def _half(x, m, iz, valid, NEG: tl.constexpr, PHI: tl.constexpr):
    """One half of phi on columns x (R, BK) of rows with statistics (m, iz): softmax(+-x) or relu(+-x)."""
    if PHI == 0:
        y = tl.exp(m[:, None] - x) * iz[:, None] if NEG else tl.exp(x - m[:, None]) * iz[:, None]
    else:
        y = tl.maximum(-x, 0.0) if NEG else tl.maximum(x, 0.0)
    return tl.where(valid[:, None], y, 0.0)


@triton.jit
def _phi_rows(x, valid, PHI: tl.constexpr):
    """Both halves of phi on whole fp32 rows x (R, D), each exponential computed once (the statistics'
    exponentials are phi's numerators): (f(x), f(-x)), rows not valid set to zero."""
    if PHI == 0:
        ep = tl.exp(x - tl.max(x, 1)[:, None])
        en = tl.exp(tl.min(x, 1)[:, None] - x)
        fp = ep * (1.0 / tl.sum(ep, 1))[:, None]
        fn = en * (1.0 / tl.sum(en, 1))[:, None]
    else:
        fp = tl.maximum(x, 0.0)
        fn = tl.maximum(-x, 0.0)
    return tl.where(valid[:, None], fp, 0.0), tl.where(valid[:, None], fn, 0.0)


@triton.jit
def _half_bwd(x, y, dy, NEG: tl.constexpr, PHI: tl.constexpr):
    """dx contribution of one half y = f(+-x) with upstream dy (rows)."""
    if PHI == 0:
        g = y * (dy - tl.sum(dy * y, 1)[:, None])
    else:
        g = tl.where(x < 0, dy, 0.0) if NEG else tl.where(x > 0, dy, 0.0)
    if NEG:
        g = -g
    return g


@triton.jit
def _round_bf16(x):
    """fp32 x rounded to the nearest bf16 value (ties to even), kept in fp32: the GPU's bf16 cast, for the
    interpreter, whose cast truncates (finite values only)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _mm_out(a, b, PREC: tl.constexpr, LOWP: tl.constexpr, UPCAST: tl.constexpr):
    """A product of the output/dV kernel: fp32 operands at PREC, or (LOWP) operands rounded to bf16, with
    fp32 accumulation either way (UPCAST, the interpreter: the rounded values multiplied in fp32)."""
    if LOWP:
        if UPCAST:
            return mm(_round_bf16(a.to(tl.float32)), _round_bf16(b.to(tl.float32)), PREC, True)
        return mm(a.to(tl.bfloat16), b.to(tl.bfloat16), PREC, False)
    return mm(a.to(tl.float32), b.to(tl.float32), PREC, False)


@triton.jit
def _chunk_sum_kernel(
    X, Y, INIT, OUT, sxb, sxh, sxt, syb, syh, syt,
    T, HKV, G, OFF, NSLOT, MRESET,
    D: tl.constexpr, C: tl.constexpr, CB: tl.constexpr, BV: tl.constexpr, PHI: tl.constexpr,
    PREC: tl.constexpr, REV: tl.constexpr, HAS_INIT: tl.constexpr,
):
    """Slot p of OUT[b, hk] (2D, BV block) gets the chunk contribution sum_g phi(X_c)^T Y_c with chunk
    c = p - 1 (REV: c = NSLOT - p), rows [cC + OFF, cC + OFF + C) in blocks of CB; slot p = 0 mod MRESET
    instead gets INIT[p / MRESET] (zeros without INIT; REV: only slot 0). A prefix sum over slots then
    gives the states."""
    p = tl.program_id(0)
    pid_bh = tl.program_id(1)
    v0 = tl.program_id(2) * BV
    b = pid_bh // HKV
    hk = pid_bh % HKV
    offs_c = tl.arange(0, CB)
    offs_d = tl.arange(0, D)
    offs_v = v0 + tl.arange(0, BV)
    acc_p = tl.zeros([D, BV], tl.float32)
    acc_n = tl.zeros([D, BV], tl.float32)
    if REV:
        c = NSLOT - p
        reset = p == 0
    else:
        c = p - 1
        reset = (p % MRESET) == 0
    if reset:
        if HAS_INIT:
            src = INIT + (pid_bh * (NSLOT // MRESET) + p // MRESET) * 2 * D * D
            acc_p += tl.load(src + offs_d[:, None] * D + offs_v[None, :])
            acc_n += tl.load(src + (D + offs_d)[:, None] * D + offs_v[None, :])
    else:
        for g in range(0, G):
            h = hk * G + g
            for rb in range(0, C, CB):
                rows = c * C + OFF + rb + offs_c
                ok = (rows >= 0) & (rows < T)
                x = tl.load(X + b * sxb + h * sxh + rows[:, None] * sxt + offs_d[None, :], mask=ok[:, None],
                            other=0.0).to(tl.float32)
                y = tl.load(Y + b * syb + h * syh + rows[:, None] * syt + offs_v[None, :], mask=ok[:, None],
                            other=0.0).to(tl.float32)
                mp, ip, mn, inn = _stats(x, PHI)
                acc_p += mm(tl.trans(_half(x, mp, ip, ok, False, PHI)), y, PREC, False)
                acc_n += mm(tl.trans(_half(x, mn, inn, ok, True, PHI)), y, PREC, False)
    base = OUT + (pid_bh * NSLOT + p) * 2 * D * D
    tl.store(base + offs_d[:, None] * D + offs_v[None, :], acc_p)
    tl.store(base + (D + offs_d)[:, None] * D + offs_v[None, :], acc_n)


@triton.jit
def _store_state(ptr, tile, acc_p, acc_n, D: tl.constexpr, ROUND: tl.constexpr):
    """Store one state tile (both halves) at ptr + tile, cast to the buffer's dtype (ROUND: rounded to
    bf16 first, as the GPU's cast rounds, for the interpreter's truncating cast)."""
    if ROUND:
        acc_p = _round_bf16(acc_p)
        acc_n = _round_bf16(acc_n)
    tl.store(ptr + tile, acc_p.to(ptr.dtype.element_ty))
    tl.store(ptr + D * D + tile, acc_n.to(ptr.dtype.element_ty))


@triton.jit
def _state_scan_kernel(
    X, Y, INIT, OUT, SEG, sxb, sxh, sxt, syb, syh, syt,
    T, HKV, G, OFF, NC, L, MSAVE,
    D: tl.constexpr, C: tl.constexpr, CB: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PHI: tl.constexpr, PREC: tl.constexpr, REV: tl.constexpr, TOTAL: tl.constexpr, HAS_INIT: tl.constexpr,
    SAVE_SEG: tl.constexpr, ROUND: tl.constexpr,
):
    """The states of one (BK features of each half, BV values) tile, accumulated on chip in fp32.

    Slot p stands for chunk c = p (REV: c = NC - 1 - p); its contribution is sum_g phi(X_c)^T Y_c over
    rows [cC + OFF, cC + OFF + C), read in blocks of CB. Program (tile, j, batch x kv head) walks the
    slots [jL, jL + L) in order from INIT[j] (zero without INIT), and stores at each slot the state
    before its chunk: OUT[p] = INIT[j] + the contributions of slots jL .. p - 1; SAVE_SEG also stores
    it to SEG[p / MSAVE] where p = 0 mod MSAVE. TOTAL instead stores only the sum of the contributions
    of the slots [(j - 1)L, jL) to OUT[j] (zero at j = 0): a prefix sum over j then gives INIT."""
    pid_t = tl.program_id(0)
    j = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    offs_c = tl.arange(0, CB)
    offs_k = (pid_t // (D // BV)) * BK + tl.arange(0, BK)
    offs_v = (pid_t % (D // BV)) * BV + tl.arange(0, BV)
    tile = offs_k[:, None] * D + offs_v[None, :]  # within one half; the other half is D rows further
    acc_p = tl.zeros([BK, BV], tl.float32)
    acc_n = tl.zeros([BK, BV], tl.float32)
    if TOTAL:
        p0 = (j - 1) * L
        n = tl.where(j == 0, 0, tl.minimum(L, NC - p0))
    else:
        p0 = j * L
        n = tl.minimum(L, NC - p0)
        if HAS_INIT:
            src = INIT + (pid_bh * tl.num_programs(1) + j) * 2 * D * D
            acc_p += tl.load(src + tile)
            acc_n += tl.load(src + D * D + tile)
    for i in range(0, n):
        p = p0 + i
        if not TOTAL:
            _store_state(OUT + (pid_bh * NC + p) * 2 * D * D, tile, acc_p, acc_n, D, ROUND)
            if SAVE_SEG:  # noqa: SIM102 (a compile-time branch around a run-time one)
                if p % MSAVE == 0:
                    nsave = (NC + MSAVE - 1) // MSAVE
                    _store_state(SEG + (pid_bh * nsave + p // MSAVE) * 2 * D * D, tile, acc_p, acc_n, D, False)
        c = NC - 1 - p if REV else p
        for g in range(0, G):
            h = hk * G + g
            for rb in range(0, C, CB):
                rows = c * C + OFF + rb + offs_c
                ok = (rows >= 0) & (rows < T)
                x_ptr = X + b * sxb + h * sxh + rows[:, None] * sxt
                if BK == D:  # whole rows: phi from the tile itself, each exponential once
                    x = tl.load(x_ptr + offs_k[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
                    fp, fn = _phi_rows(x, ok, PHI)
                else:  # BK columns of each half, the rows' statistics read in BK blocks first
                    mp, ip, mn, inn = _stats_blocked(x_ptr, ok, CB, D, BK, PHI)
                    x = tl.load(x_ptr + offs_k[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
                    fp = _half(x, mp, ip, ok, False, PHI)
                    fn = _half(x, mn, inn, ok, True, PHI)
                y = tl.load(Y + b * syb + h * syh + rows[:, None] * syt + offs_v[None, :], mask=ok[:, None],
                            other=0.0).to(tl.float32)
                acc_p += mm(tl.trans(fp), y, PREC, False)
                acc_n += mm(tl.trans(fn), y, PREC, False)
    if TOTAL:
        _store_state(OUT + (pid_bh * tl.num_programs(1) + j) * 2 * D * D, tile, acc_p, acc_n, D, False)


@triton.jit
def _rows(pid_r, pid_bh, T, HA, GDIV, SHIFT, NSLOT, C: tl.constexpr, BM: tl.constexpr, CB: tl.constexpr,
          REV: tl.constexpr):
    """The rows a (row block, batch x head) program owns, shared by the output and gradient kernels.

    Returns chunk c, batch bi, head ha, state head hs, the row offsets, the rows' positions (queries;
    keys, shifted, when REV) and validity, the state slot (counted from the end when REV), and the range
    [lo, hi) of in-chunk partner blocks the causal mask can reach."""
    c = pid_r // (C // BM)
    r0 = (pid_r % (C // BM)) * BM
    bi = pid_bh // HA
    ha = pid_bh % HA
    hs = ha // GDIV
    offs_r = r0 + tl.arange(0, BM)
    if REV:
        a_rows = c * C - SHIFT + offs_r
        slot = NSLOT - 1 - c
        lo = r0 // CB * CB
        hi = C
    else:
        a_rows = c * C + offs_r
        slot = c
        lo = 0
        hi = r0 + BM
    a_ok = (a_rows >= 0) & (a_rows < T)
    return c, bi, ha, hs, offs_r, a_rows, a_ok, slot, lo, hi


@triton.jit
def _partners(c, ib, offs_r, T, SHIFT, C: tl.constexpr, CB: tl.constexpr, REV: tl.constexpr):
    """Partner block ib of chunk c for the rows offs_r: the partners' positions (keys, shifted; queries
    when REV), their validity, and the causal mask "key row <= query row" as (rows, partners)."""
    offs_i = ib + tl.arange(0, CB)
    if REV:
        b_rows = c * C + offs_i
        vis = offs_r[:, None] <= offs_i[None, :]
    else:
        b_rows = c * C - SHIFT + offs_i
        vis = offs_i[None, :] <= offs_r[:, None]
    return b_rows, (b_rows >= 0) & (b_rows < T), vis


@triton.jit
def _rla_out_kernel(
    A, B, V, ST, OUT,
    sab, sah, sat, sbb, sbh, sbt, svb, svh, svt, sob, soh, sot,
    T, HA, HS, GDIV, NG, SHIFT, NSLOT,
    D: tl.constexpr, C: tl.constexpr, BM: tl.constexpr, CB: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, PHI: tl.constexpr, PREC: tl.constexpr, REV: tl.constexpr, LOWP: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """OUT rows (value block) = phi(A) ST + sum_g mask(phi(A) phi(B_g)^T) V_g over one chunk.
    Forward (REV=0): A = q (queries of chunk c), B = k, V = v (keys of chunk c), ST = S_c, one g.
    dV (REV=1): A = k (keys of chunk c), B = q_g, V = do_g (queries of chunk c), ST = dH_c, g in group.
    The chunk's other side is visited in blocks of CB columns, only those the mask can reach. With BV = D
    one program computes phi(A), its statistics and the scores once for every value column. LOWP: every
    product on bf16-rounded operands (phi, states, scores, V), fp32 accumulation."""
    pid_r = tl.program_id(0)
    pid_bh = tl.program_id(1)
    v0 = tl.program_id(2) * BV
    c, bi, ha, hs, offs_r, a_rows, a_ok, slot, lo, hi = _rows(pid_r, pid_bh, T, HA, GDIV, SHIFT, NSLOT, C, BM,
                                                              CB, REV)
    offs_k = tl.arange(0, BK)
    offs_v = v0 + tl.arange(0, BV)
    a_ptr = A + bi * sab + ha * sah + a_rows[:, None] * sat
    amp, aip, amn, ain = _stats_blocked(a_ptr, a_ok, BM, D, BK, PHI)
    st = ST + ((bi * HS + hs) * NSLOT + slot) * 2 * D * D
    acc = tl.zeros([BM, BV], tl.float32)
    for kb in range(0, D, BK):
        xs = tl.load(a_ptr + (kb + offs_k)[None, :], mask=a_ok[:, None], other=0.0).to(tl.float32)
        sp = tl.load(st + (kb + offs_k)[:, None] * D + offs_v[None, :])
        acc += _mm_out(_half(xs, amp, aip, a_ok, False, PHI), sp, PREC, LOWP, UPCAST)
        sn = tl.load(st + (D + kb + offs_k)[:, None] * D + offs_v[None, :])
        acc += _mm_out(_half(xs, amn, ain, a_ok, True, PHI), sn, PREC, LOWP, UPCAST)
    for g in range(0, NG):
        hb = hs * NG + g
        for ib in range(lo, hi, CB):
            b_rows, b_ok, vis = _partners(c, ib, offs_r, T, SHIFT, C, CB, REV)
            b_ptr = B + bi * sbb + hb * sbh + b_rows[:, None] * sbt
            bmp, bip, bmn, bin_ = _stats_blocked(b_ptr, b_ok, CB, D, BK, PHI)
            a = tl.zeros([BM, CB], tl.float32)
            for kb in range(0, D, BK):
                xs = tl.load(a_ptr + (kb + offs_k)[None, :], mask=a_ok[:, None], other=0.0).to(tl.float32)
                ys = tl.load(b_ptr + (kb + offs_k)[None, :], mask=b_ok[:, None], other=0.0).to(tl.float32)
                a += _mm_out(_half(xs, amp, aip, a_ok, False, PHI), tl.trans(_half(ys, bmp, bip, b_ok, False, PHI)),
                             PREC, LOWP, UPCAST)
                a += _mm_out(_half(xs, amn, ain, a_ok, True, PHI), tl.trans(_half(ys, bmn, bin_, b_ok, True, PHI)),
                             PREC, LOWP, UPCAST)
            a = tl.where(vis, a, 0.0)
            vv = tl.load(V + bi * svb + hb * svh + b_rows[:, None] * svt + offs_v[None, :], mask=b_ok[:, None],
                         other=0.0)
            acc += _mm_out(a, vv, PREC, LOWP, UPCAST)
    tl.store(OUT + bi * sob + ha * soh + a_rows[:, None] * sot + offs_v[None, :], acc.to(OUT.dtype.element_ty),
             mask=a_ok[:, None])


@triton.jit
def _rla_grad_kernel(
    X, XA, Y, Z, ST, OUT,
    sxb, sxh, sxt, sab, sah, sat, syb, syh, syt, szb, szh, szt, sob, soh, sot,
    T, HA, HS, GDIV, NG, SHIFT, NSLOT,
    D: tl.constexpr, C: tl.constexpr, BM: tl.constexpr, CB: tl.constexpr, BV: tl.constexpr,
    PHI: tl.constexpr, PREC: tl.constexpr, REV: tl.constexpr,
):
    """OUT rows = phi'(XA)^T [X ST^T + sum_g mask(X Y_g^T) phi(Z_g)] (the gradient through phi).
    dq (REV=0): X = do, XA = q (queries of chunk c), Y = v, Z = k (keys of chunk c), ST = S_c.
    dk (REV=1): X = v, XA = k (keys of chunk c), Y = do_g, Z = q_g (queries of chunk c), ST = dH_c."""
    pid_r = tl.program_id(0)
    pid_bh = tl.program_id(1)
    c, bi, ha, hs, offs_r, a_rows, a_ok, slot, lo, hi = _rows(pid_r, pid_bh, T, HA, GDIV, SHIFT, NSLOT, C, BM,
                                                              CB, REV)
    offs_d = tl.arange(0, D)
    offs_v = tl.arange(0, BV)
    x_ptr = X + bi * sxb + ha * sxh + a_rows[:, None] * sxt
    st = ST + ((bi * HS + hs) * NSLOT + slot) * 2 * D * D
    dp = tl.zeros([BM, D], tl.float32)
    dn = tl.zeros([BM, D], tl.float32)
    for vb in range(0, D, BV):
        xv = tl.load(x_ptr + (vb + offs_v)[None, :], mask=a_ok[:, None], other=0.0).to(tl.float32)
        sp = tl.load(st + offs_d[:, None] * D + (vb + offs_v)[None, :])
        dp += mm(xv, tl.trans(sp), PREC, False)
        sn = tl.load(st + (D + offs_d)[:, None] * D + (vb + offs_v)[None, :])
        dn += mm(xv, tl.trans(sn), PREC, False)
    for g in range(0, NG):
        hb = hs * NG + g
        for ib in range(lo, hi, CB):
            b_rows, b_ok, vis = _partners(c, ib, offs_r, T, SHIFT, C, CB, REV)
            y_ptr = Y + bi * syb + hb * syh + b_rows[:, None] * syt
            da = tl.zeros([BM, CB], tl.float32)
            for vb in range(0, D, BV):
                xv = tl.load(x_ptr + (vb + offs_v)[None, :], mask=a_ok[:, None], other=0.0).to(tl.float32)
                yv = tl.load(y_ptr + (vb + offs_v)[None, :], mask=b_ok[:, None], other=0.0).to(tl.float32)
                da += mm(xv, tl.trans(yv), PREC, False)
            da = tl.where(vis, da, 0.0)
            z = tl.load(Z + bi * szb + hb * szh + b_rows[:, None] * szt + offs_d[None, :], mask=b_ok[:, None],
                        other=0.0).to(tl.float32)
            zmp, zip_, zmn, zin = _stats(z, PHI)
            dp += mm(da, _half(z, zmp, zip_, b_ok, False, PHI), PREC, False)
            dn += mm(da, _half(z, zmn, zin, b_ok, True, PHI), PREC, False)
    xa = tl.load(XA + bi * sab + ha * sah + a_rows[:, None] * sat + offs_d[None, :], mask=a_ok[:, None],
                 other=0.0).to(tl.float32)
    amp, aip, amn, ain = _stats(xa, PHI)
    dx = _half_bwd(xa, _half(xa, amp, aip, a_ok, False, PHI), dp, False, PHI)
    dx += _half_bwd(xa, _half(xa, amn, ain, a_ok, True, PHI), dn, True, PHI)
    tl.store(OUT + bi * sob + ha * soh + a_rows[:, None] * sot + offs_d[None, :], dx.to(OUT.dtype.element_ty),
             mask=a_ok[:, None])


# Tile sizes on the GPU (D = 128, sm_90): chunk C and segment m are the algorithm's; the rest are
# per kernel: "sum" value block of the chunk-sum kernel; "out_*" row block, feature block and value
# block of the output/dV kernel ("out_bv" = D: phi and the scores once per row block, not once per value
# block) and "out_lowp" (bf16 operands in the output/dV products, for 16-bit inputs only; dq/dk keep
# tf32, where sm2's backward cancels); "grad_*" row block and value block of the dq/dk kernel; warps and
# stages. Overridable for tuning (kernels.bench --tune). Measured on the H200 at T=8192, w=512, fwd+bwd:
# 8 warps 18.6 ms, 4 warps 13.3 ms; chunk 32 12.5 ms vs 64 13.2 ms; then, axis by axis (kernels.bench
# --tune): chunk-sum 4 warps, out_bv 128, bf16 output/dV operands, grad_bv 64: 10.1 ms (benchmarks/README.md).
# "scan_*": the state scans' tile (BK features of each half, BV values), row block, warps, stages; not yet
# measured, chosen from sm_90a ptxas (kernels.bench --ptxas): BK = D computes phi of a row once per tile
# (each exponential once) and leaves one loop per chunk, which Triton pipelines (cp.async); BV = 64 gives
# 2 tiles per head (phi twice per row, as the chunk-sum kernel) at 151-210 registers, 8 warps, no spills.
GPU_CFG = {
    "C": 32, "m": 16,
    "sum_cb": 32, "sum_bv": 64, "sum_warps": 4,
    "out_bm": 32, "out_cb": 32, "out_bk": 32, "out_bv": 128, "out_warps": 4, "out_stages": 2, "out_lowp": True,
    "grad_bm": 32, "grad_cb": 32, "grad_bv": 64, "grad_warps": 4, "grad_stages": 2,
    "scan_bk": 128, "scan_cb": 32, "scan_bv": 64, "scan_warps": 8, "scan_stages": 2,
}
INTERP_CFG = {
    "C": 16, "m": 2,
    "sum_cb": 16, "sum_bv": 64, "sum_warps": 4,
    "out_bm": 16, "out_cb": 16, "out_bk": 64, "out_bv": 64, "out_warps": 4, "out_stages": 1, "out_lowp": False,
    "grad_bm": 16, "grad_cb": 16, "grad_bv": 64, "grad_warps": 4, "grad_stages": 1,
    "scan_bk": 64, "scan_cb": 16, "scan_bv": 64, "scan_warps": 4, "scan_stages": 1,
}


def _cfg(d: int, chunk: int | None, seg_chunks: int | None) -> dict:
    cfg = dict(INTERP_CFG if interpreted() else GPU_CFG)
    cfg["C"] = chunk or cfg["C"]
    cfg["m"] = seg_chunks or cfg["m"]
    c = cfg["C"]
    for key in ("sum_bv", "out_bk", "out_bv", "grad_bv", "scan_bk", "scan_bv"):
        cfg[key] = min(cfg[key], d)
    for key in ("out_bm", "grad_bm", "sum_cb", "out_cb", "grad_cb", "scan_cb"):
        cfg[key] = min(cfg[key], c)
    return cfg


def _sizes(d: int, chunk: int | None, seg_chunks: int | None, block_v: int | None) -> tuple[int, int, int, int]:
    """(C, m, output value block, warps) as used by the launchers (ops.py reads C and m)."""
    cfg = _cfg(d, chunk, seg_chunks)
    return cfg["C"], cfg["m"], block_v or cfg["out_bv"], cfg["out_warps"]


def _check(q: torch.Tensor, window: int, phi: str, c: int) -> None:
    if window < 0:
        raise ValueError(f"window: must be >= 0, got {window}")
    if phi not in PHI_IDS:
        raise ValueError(f"phi: unknown feature map {phi!r}; allowed: {', '.join(PHI_IDS)}")
    d = q.shape[-1]
    if d & (d - 1) or d < 16:
        raise ValueError(f"head_dim: must be a power of two >= 16 for the Triton RLA, got {d}")
    if c & (c - 1) or c < 16:
        raise ValueError(f"chunk {c}: must be a power of two >= 16")


def _lastdim_contig(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _chunk_sums(x: torch.Tensor, y: torch.Tensor, hkv: int, off: int, nslot: int, mreset: int, rev: bool,
                init: torch.Tensor | None, cfg: dict, phi: str) -> torch.Tensor:
    """(B, Hkv, nslot, 2D, D) fp32 buffer of chunk contributions by slot (see _chunk_sum_kernel)."""
    b, hx, t, d = x.shape
    bv = cfg["sum_bv"]
    out = torch.empty((b, hkv, nslot, 2 * d, d), dtype=torch.float32, device=x.device)
    _chunk_sum_kernel[(nslot, b * hkv, d // bv)](
        x, y, init if init is not None else out, out,
        x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1), y.stride(2),
        t, hkv, hx // hkv, off, nslot, mreset,
        D=d, C=cfg["C"], CB=cfg["sum_cb"], BV=bv, PHI=PHI_IDS[phi], PREC=dot_precision(x.dtype), REV=rev,
        HAS_INIT=init is not None, num_warps=cfg["sum_warps"], num_stages=1,
    )
    return out


def _scan_states(x: torch.Tensor, y: torch.Tensor, hkv: int, off: int, nc: int, seg: int, rev: bool, cfg: dict,
                 phi: str, init: torch.Tensor | None = None, total: bool = False, save_every: int = 0,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor | None]:
    """_state_scan_kernel over segments of ``seg`` slots: (states by slot (B, Hkv, nc, 2D, D) in ``dtype``,
    or with ``total`` the segment sums (B, Hkv, ceil(nc / seg), 2D, D) fp32; the fp32 states at every
    ``save_every``-th slot, or None)."""
    b, hx, t, d = x.shape
    bk, bv = cfg["scan_bk"], cfg["scan_bv"]
    nseg = triton.cdiv(nc, seg)
    out = new_output((b, hkv, nseg if total else nc, 2 * d, d), torch.float32 if total else dtype, x.device)
    saved = new_output((b, hkv, triton.cdiv(nc, save_every), 2 * d, d), torch.float32, x.device) \
        if save_every else None
    lowp = out.dtype in (torch.bfloat16, torch.float16)
    _state_scan_kernel[((d // bk) * (d // bv), nseg, b * hkv)](
        x, y, init if init is not None else out, out, saved if saved is not None else out,
        x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1), y.stride(2),
        t, hkv, hx // hkv, off, nc, seg, save_every or 1,
        D=d, C=cfg["C"], CB=cfg["scan_cb"], BK=bk, BV=bv, PHI=PHI_IDS[phi], PREC=dot_precision(x.dtype), REV=rev,
        TOTAL=total, HAS_INIT=init is not None, SAVE_SEG=bool(save_every), ROUND=lowp and interpreted(),
        num_warps=cfg["scan_warps"], num_stages=cfg["scan_stages"],
    )
    return out, saved


def _segment_starts(x: torch.Tensor, y: torch.Tensor, hkv: int, off: int, nc: int, m: int, rev: bool, cfg: dict,
                    phi: str) -> torch.Tensor:
    """The fp32 states at slots 0, m, 2m, ... (B, Hkv, ceil(nc / m), 2D, D): segment sums on chip, then
    a prefix sum over the (m times fewer) segments."""
    starts, _ = _scan_states(x, y, hkv, off, nc, m, rev, cfg, phi, total=True)
    if starts.shape[2] > 1:
        starts.cumsum_(dim=2)
    return starts


def _state_pass(state_pass: str | None) -> str:
    state_pass = state_pass or STATE_PASS
    if state_pass not in STATE_PASSES:
        raise ValueError(f"state_pass: unknown {state_pass!r}; allowed: {', '.join(STATE_PASSES)}")
    return state_pass


def _launch_out(a, bt, vt, st, out, t, ha, hs, gdiv, ng, shift, nslot, rev, cfg, phi, prec):
    b, _, _, d = a.shape
    c, bm, bv = cfg["C"], cfg["out_bm"], cfg["out_bv"]
    lowp = bool(cfg["out_lowp"]) and a.dtype in (torch.bfloat16, torch.float16)
    nc = triton.cdiv(t, c)  # query chunk c and key chunk c pair up, in either direction
    _rla_out_kernel[(nc * (c // bm), b * ha, d // bv)](
        a, bt, vt, st, out,
        a.stride(0), a.stride(1), a.stride(2), bt.stride(0), bt.stride(1), bt.stride(2),
        vt.stride(0), vt.stride(1), vt.stride(2), out.stride(0), out.stride(1), out.stride(2),
        t, ha, hs, gdiv, ng, shift, nslot,
        D=d, C=c, BM=bm, CB=cfg["out_cb"], BK=cfg["out_bk"], BV=bv, PHI=PHI_IDS[phi], PREC=prec, REV=rev,
        LOWP=lowp, UPCAST=lowp and interpreted(), num_warps=cfg["out_warps"], num_stages=cfg["out_stages"],
    )


def _launch_grad(x, xa, y, z, st, out, t, ha, hs, gdiv, ng, shift, nslot, nc, rev, cfg, phi, prec):
    b, _, _, d = x.shape
    c, bm = cfg["C"], cfg["grad_bm"]
    _rla_grad_kernel[(nc * (c // bm), b * ha)](
        x, xa, y, z, st, out,
        x.stride(0), x.stride(1), x.stride(2), xa.stride(0), xa.stride(1), xa.stride(2),
        y.stride(0), y.stride(1), y.stride(2), z.stride(0), z.stride(1), z.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        t, ha, hs, gdiv, ng, shift, nslot,
        D=d, C=c, BM=bm, CB=cfg["grad_cb"], BV=cfg["grad_bv"], PHI=PHI_IDS[phi], PREC=prec, REV=rev,
        num_warps=cfg["grad_warps"], num_stages=cfg["grad_stages"],
    )


def rla_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, phi: str = "sm2",
    chunk: int | None = None, seg_chunks: int | None = None, block_v: int | None = None,
    state_pass: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward launch: (o (B, Hq, T, D) fp32, segment-start states (B, Hkv, NS, 2D, D) fp32).
    ``state_pass`` picks how the chunk states are made (STATE_PASSES; None: STATE_PASS)."""
    check_launch(q)
    q, k, v = (_lastdim_contig(x) for x in (q, k, v))
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    cfg = _cfg(d, chunk, seg_chunks)
    if block_v:
        cfg["out_bv"] = block_v
    c, m = cfg["C"], cfg["m"]
    _check(q, window, phi, c)
    s = window + 1
    nc = triton.cdiv(t, c)
    state_pass = _state_pass(state_pass)
    if state_pass == "cumsum":
        # slot p holds phi(k_{p-1})^T v_{p-1}, slot 0 zero; the prefix sum over slots is S_p
        states = _chunk_sums(k, v, hkv, -s, nc, nc + 1, False, None, cfg, phi)
        if nc > 1:
            states.cumsum_(dim=2)
        seg = states[:, :, ::m].clone()
    else:
        # with bf16 output products the output kernel reads S_c rounded to bf16: store it so (half the bytes)
        lowp = bool(cfg["out_lowp"]) and q.dtype in (torch.bfloat16, torch.float16)
        dtype = torch.bfloat16 if lowp else torch.float32
        if state_pass == "scan":
            states, seg = _scan_states(k, v, hkv, -s, nc, nc, False, cfg, phi, save_every=m, dtype=dtype)
        else:
            seg = _segment_starts(k, v, hkv, -s, nc, m, False, cfg, phi)
            states, _ = _scan_states(k, v, hkv, -s, nc, m, False, cfg, phi, init=seg, dtype=dtype)
    o = new_output((b, hq, t, d), torch.float32, q.device)
    _launch_out(q, k, v, states, o, t, hq, hkv, hq // hkv, 1, s, nc, False, cfg, phi, dot_precision(q.dtype))
    return o, seg


def rla_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, states: torch.Tensor, window: int,
    phi: str = "sm2", chunk: int | None = None, seg_chunks: int | None = None, block_v: int | None = None,
    state_pass: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward launch from the saved segment states: (dq, dk, dv) in the dtypes of q, k, v."""
    check_launch(q)
    q, k, v, do = (_lastdim_contig(x) for x in (q, k, v, do))
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    cfg = _cfg(d, chunk, seg_chunks)
    if block_v:
        cfg["out_bv"] = block_v
    c, m = cfg["C"], cfg["m"]
    _check(q, window, phi, c)
    s = window + 1
    nc = triton.cdiv(t, c)
    ns = triton.cdiv(nc, m)
    prec = dot_precision(q.dtype)
    state_pass = _state_pass(state_pass)
    if state_pass == "cumsum":
        # chunk states inside each segment: slot p = segment start (p = 0 mod m) or phi(k_{p-1})^T v_{p-1},
        # then a prefix sum within each segment
        st = _chunk_sums(k, v, hkv, -s, ns * m, m, False, states.contiguous(), cfg, phi)
        if m > 1:
            st.view(b, hkv, ns, m, 2 * d, d).cumsum_(dim=3)
        nst = ns * m
        # reverse states: dH_c = sum over query chunks c' > c of the group's phi(q)^T do, at slot nc - 1 - c
        dst = _chunk_sums(q, do, hkv, 0, nc, nc + 1, True, None, cfg, phi)
        if nc > 1:
            dst.cumsum_(dim=2)
    else:
        # chunk states: one program per segment walks it from its saved start
        st, _ = _scan_states(k, v, hkv, -s, nc, m, False, cfg, phi, init=states.contiguous())
        nst = nc
        # reverse states dH (as above), walked from the end: the whole sequence per program, or segment
        # sums, their prefix sum, then one program per segment
        if state_pass == "scan":
            dst, _ = _scan_states(q, do, hkv, 0, nc, nc, True, cfg, phi)
        else:
            dst, _ = _scan_states(q, do, hkv, 0, nc, m, True, cfg, phi,
                                  init=_segment_starts(q, do, hkv, 0, nc, m, True, cfg, phi))
    dq = new_output((b, hq, t, d), q.dtype, q.device)
    _launch_grad(do, q, v, k, st, dq, t, hq, hkv, g, 1, s, nst, nc, False, cfg, phi, prec)
    # keys never seen by any query (j >= NC*C - s) sit in no key chunk: their gradient is zero
    dk = new_output((b, hkv, t, d), k.dtype, q.device)
    dv = new_output((b, hkv, t, d), v.dtype, q.device)
    dk[:, :, max(0, nc * c - s):] = 0
    dv[:, :, max(0, nc * c - s):] = 0
    _launch_grad(v, k, do, q, dst, dk, t, hkv, hkv, 1, g, s, nc, nc, True, cfg, phi, prec)
    _launch_out(k, q, do, dst, dv, t, hkv, hkv, 1, g, s, nc, True, cfg, phi, prec)
    return dq, dk, dv


class RLAFunction(torch.autograd.Function):
    """Autograd wrapper over the launchers, callable directly (tests run it on CPU under the interpreter)."""

    @staticmethod
    def forward(ctx, q, k, v, window, phi, chunk, seg_chunks, state_pass):
        o, states = rla_fwd(q, k, v, window, phi, chunk, seg_chunks, state_pass=state_pass)
        ctx.save_for_backward(q, k, v, states)
        ctx.args = (window, phi, chunk, seg_chunks)
        ctx.state_pass = state_pass
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, states = ctx.saved_tensors
        dq, dk, dv = rla_bwd(do, q, k, v, states, *ctx.args, state_pass=ctx.state_pass)
        return dq, dk, dv, None, None, None, None, None


def rla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, phi: str = "sm2",
        chunk: int | None = None, seg_chunks: int | None = None, state_pass: str | None = None) -> torch.Tensor:
    """Differentiable Triton residual linear attention, output fp32 (no torch.compile registration)."""
    return RLAFunction.apply(q, k, v, window, phi, chunk, seg_chunks, state_pass)
