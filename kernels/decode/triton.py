"""A local layer's decode step in one Triton launch (the math: kernels/decode/naive.py).

One program per (sequence, kv head) serves that head's group of query heads (GQA without repeats) and
owns its slice of the ring and of the RLA state, so programs never touch each other's memory:

1. RAttention: the key leaving the window (position pos-w-1, slot pos % (w+1)) is read raw (from the raw
   ring, or un-rotated from the RoPE'd ring with the angles at pos-w-1), and S += phi(k)^T v in place,
   in blocks of feature rows; each updated block of S is multiplied by phi(q_raw) in the same pass, so S is
   read once and written once. Before the window fills (pos <= w) no key leaves and S is unchanged.
2. Softmax attention over the valid ring slots (0..pos, in key blocks, online softmax in fp32), the slot
   being overwritten left out: the new key and value join from registers.
3. The per-head RMSNorms (fp32) of the two branches, summed; stored in q's dtype.
4. The new key and value (and raw key) are written to their slot, after a barrier, so no read of step 1
   races with the write.

The position is read from a device tensor and the grid, shapes and pointers are fixed: the launch replays
in a CUDA graph. No host sync.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.triton_utils import check_launch, dot_precision, interpreted, mm, new_output, upcast_dots

LOG2E = 1.4426950408889634
PHI_CODES = {"sm2": 0, "relu2": 1}


@triton.jit
def _leaving_key(base, idx, COS, SIN, D: tl.constexpr, UNROTATE: tl.constexpr):
    """The raw leaving key at dims ``idx``, fp32: as stored, or un-rotated (x cos - rotate_half(x) sin)."""
    x = tl.load(base + idx).to(tl.float32)
    if UNROTATE:
        partner = tl.load(base + (idx + D // 2) % D).to(tl.float32)
        rotated = tl.where(idx < D // 2, -partner, partner)
        x = x * tl.load(COS + idx) - rotated * tl.load(SIN + idx)
    return x


@triton.jit
def _local_decode_kernel(
    Q, K_NEW, V_NEW, K_RING, V_RING, POS, W_SWA, OUT,
    Q_RAW, K_RAW_NEW, K_RAW_RING, S, W_RLA, COS, SIN,
    sqb, sqh, sknb, sknh, svnb, svnh, skb, skh, skt, svb, svh, svt, sob, soh,
    sqrb, sqrh, skrnb, skrnh, skrb, skrh, skrt, ssb, ssh, ssf,
    HKV, GROUP, SIZE, qk_scale, eps,
    D: tl.constexpr, BG: tl.constexpr, BN: tl.constexpr, BF: tl.constexpr,
    NORM: tl.constexpr, RLA: tl.constexpr, PHI: tl.constexpr, RAW_RING: tl.constexpr, UNROTATE: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // HKV
    hk = pid % HKV
    pos = tl.load(POS)
    slot = pos % SIZE
    offs_d = tl.arange(0, D)
    offs_g = tl.arange(0, BG)
    g_ok = offs_g < GROUP
    heads = hk * GROUP + offs_g
    q = tl.load(Q + b * sqb + heads[:, None] * sqh + offs_d[None, :], mask=g_ok[:, None], other=0.0)
    k_new = tl.load(K_NEW + b * sknb + hk * sknh + offs_d)
    v_new = tl.load(V_NEW + b * svnb + hk * svnh + offs_d)
    k_base = K_RING + b * skb + hk * skh
    v_base = V_RING + b * svb + hk * svh

    # 1. RLA: fold the leaving key into S and read phi(q_raw) S in one pass over S's feature rows.
    o_rla = tl.zeros([BG, D], tl.float32)
    if RLA:
        if RAW_RING:  # noqa: SIM108 (a constexpr branch the JIT resolves at compile time)
            leave_base = K_RAW_RING + b * skrb + hk * skrh + slot * skrt
        else:
            leave_base = k_base + slot * skt
        k_old = _leaving_key(leave_base, offs_d, COS, SIN, D, UNROTATE)
        v_old = tl.load(v_base + slot * svt + offs_d).to(tl.float32)
        v_old = tl.where(pos >= SIZE, v_old, 0.0)  # before the window fills no key leaves
        qr_base = Q_RAW + b * sqrb + heads * sqrh  # (BG,) row pointers
        q_raw = tl.load(qr_base[:, None] + offs_d[None, :], mask=g_ok[:, None], other=0.0).to(tl.float32)
        s_base = S + b * ssb + hk * ssh
        for half in tl.static_range(2):
            sign = 1.0 - 2.0 * half  # phi(x) = [f(x), f(-x)]: feature rows half*D + d read sign * x[d]
            if PHI == 0:  # softmax over D: the row maxima and sums, from the whole rows
                mk = tl.max(sign * k_old, 0)
                zk = tl.sum(tl.exp(sign * k_old - mk), 0)
                mq = tl.max(sign * q_raw, 1)
                zq = tl.sum(tl.exp(sign * q_raw - mq[:, None]), 1)
            for d0 in range(0, D, BF):
                idx = d0 + tl.arange(0, BF)
                xk = sign * _leaving_key(leave_base, idx, COS, SIN, D, UNROTATE)
                xq = sign * tl.load(qr_base[:, None] + idx[None, :], mask=g_ok[:, None], other=0.0).to(tl.float32)
                if PHI == 0:
                    fk = tl.exp(xk - mk) / zk
                    fq = tl.exp(xq - mq[:, None]) / zq[:, None]
                else:
                    fk = tl.maximum(xk, 0.0)
                    fq = tl.maximum(xq, 0.0)
                s_ptr = s_base + (half * D + idx)[:, None] * ssf + offs_d[None, :]
                s_blk = tl.load(s_ptr) + fk[:, None] * v_old[None, :]
                tl.store(s_ptr, s_blk)
                o_rla += tl.dot(fq, s_blk, input_precision="ieee")

    # 2. Softmax attention over the ring's valid slots but the one being overwritten, then the new key.
    m_i = tl.full([BG], float("-inf"), tl.float32)
    l_i = tl.zeros([BG], tl.float32)
    acc = tl.zeros([BG, D], tl.float32)
    hi = tl.minimum(pos + 1, SIZE)
    for n0 in range(0, hi, BN):
        cols = n0 + tl.arange(0, BN)
        ok = (cols < hi) & (cols != slot)
        k = tl.load(k_base + cols[:, None] * skt + offs_d[None, :], mask=ok[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * svt + offs_d[None, :], mask=ok[:, None], other=0.0)
        s = tl.where(ok[None, :], mm(q, tl.trans(k), PREC, UPCAST) * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + mm(p.to(v.dtype), v, PREC, UPCAST)
        m_i = m_new
    s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * qk_scale
    m_new = tl.maximum(m_i, s_new)
    alpha = tl.exp2(m_i - m_new)
    p_new = tl.exp2(s_new - m_new)
    l_i = l_i * alpha + p_new
    o = (acc * alpha[:, None] + p_new[:, None] * v_new.to(tl.float32)[None, :]) / l_i[:, None]

    # 3. The per-head output norms, summed.
    w_rows = heads[:, None] * D + offs_d[None, :]
    if NORM:
        w = tl.load(W_SWA + w_rows, mask=g_ok[:, None], other=0.0).to(tl.float32)
        o = o * tl.rsqrt(tl.sum(o * o, 1) / D + eps)[:, None] * w
    if RLA:
        w = tl.load(W_RLA + w_rows, mask=g_ok[:, None], other=0.0).to(tl.float32)
        o += o_rla * tl.rsqrt(tl.sum(o_rla * o_rla, 1) / D + eps)[:, None] * w
    tl.store(OUT + b * sob + heads[:, None] * soh + offs_d[None, :], o.to(OUT.dtype.element_ty), mask=g_ok[:, None])

    # 4. The new key and value take the slot (every read of the old ones above is done).
    tl.debug_barrier()
    tl.store(k_base + slot * skt + offs_d, k_new.to(K_RING.dtype.element_ty))
    tl.store(v_base + slot * svt + offs_d, v_new.to(V_RING.dtype.element_ty))
    if RAW_RING:
        k_raw_new = tl.load(K_RAW_NEW + b * skrnb + hk * skrnh + offs_d)
        tl.store(K_RAW_RING + b * skrb + hk * skrh + slot * skrt + offs_d, k_raw_new.to(K_RAW_RING.dtype.element_ty))


def _blocks(d: int, size: int) -> tuple[int, int, int]:
    """(key block, feature block, warps): 64 keys by D on the GPU; small tiles under the interpreter."""
    if interpreted():
        return 16, min(d, 16), 1
    return 64, min(d, 32), 4 if d <= 64 else 8


def _check(name: str, x: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(x.shape) != shape or x.stride(-1) != 1:
        raise ValueError(f"{name}: expected shape {shape} with a contiguous last dim, got {tuple(x.shape)} "
                         f"strides {x.stride()}")


def local_decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_ring: torch.Tensor, v_ring: torch.Tensor,
    pos: torch.Tensor, w_swa: torch.Tensor | None = None, eps: float = 1e-6, *,
    q_raw: torch.Tensor | None = None, k_raw: torch.Tensor | None = None, state: torch.Tensor | None = None,
    w_rla: torch.Tensor | None = None, phi: str = "sm2", k_raw_ring: torch.Tensor | None = None,
    rope_leaving: tuple[torch.Tensor, torch.Tensor] | None = None, scale: float | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """The fused decode step of a local layer: ``kernels.decode.naive.local_decode_naive``'s signature and
    effects (output (B, Hq, D) in q's dtype; rings and state updated in place) in one launch.
    ``block_n``: the key block (default 64 on the GPU)."""
    check_launch(q)
    b, hq, d = q.shape
    hkv, size = k_ring.shape[1], k_ring.shape[2]
    if d & (d - 1) or d < 16:
        raise ValueError(f"head_dim: the fused decode kernel needs a power of two >= 16, got {d}")
    if hq % hkv:
        raise ValueError(f"heads: {hq} query heads are not a multiple of {hkv} kv heads")
    for name, x, shape in (("q", q, (b, hq, d)), ("k", k, (b, hkv, d)), ("v", v, (b, hkv, d)),
                           ("k_ring", k_ring, (b, hkv, size, d)), ("v_ring", v_ring, (b, hkv, size, d))):
        _check(name, x, shape)
    if pos.dim() != 0 or pos.dtype != torch.long:
        raise ValueError(f"pos: expected a 0-dim int64 tensor, got shape {tuple(pos.shape)} {pos.dtype}")
    rla = state is not None
    raw_ring = rla and k_raw_ring is not None
    if rla:
        _check("q_raw", q_raw, (b, hq, d))
        _check("state", state, (b, hkv, 2 * d, d))
        if state.dtype != torch.float32 or not state.is_contiguous():
            raise ValueError(f"state: expected a contiguous float32 tensor, got {state.dtype}")
        if w_swa is None or w_rla is None:
            raise ValueError("w_swa, w_rla: RAttention needs both output-norm scales")
        if phi not in PHI_CODES:
            raise ValueError(f"phi: unknown feature map {phi!r}; allowed: {', '.join(PHI_CODES)}")
        if raw_ring:
            _check("k_raw", k_raw, (b, hkv, d))
            _check("k_raw_ring", k_raw_ring, (b, hkv, size, d))
        elif rope_leaving is None:
            raise ValueError("rope_leaving: without a raw-key ring the leaving key is un-rotated; pass (cos, sin)")
    for name, w in (("w_swa", w_swa), ("w_rla", w_rla)):
        if w is not None and (tuple(w.shape) != (hq, d) or not w.is_contiguous()):
            raise ValueError(f"{name}: expected a contiguous ({hq}, {d}) scale, got {tuple(w.shape)}")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    bn, bf, warps = _blocks(d, size)
    bn = block_n or bn
    out = new_output((b, hq, d), q.dtype, q.device)
    cos, sin = rope_leaving if rla and not raw_ring else (q, q)
    if rla and not raw_ring:
        cos, sin = (x.reshape(d).float().contiguous() for x in (cos, sin))
    qr = q_raw if rla else q
    kr, krr = (k_raw, k_raw_ring) if raw_ring else (k, k_ring)
    st = state if rla else q  # absent tensors: q stands in for pointers the kernel never reads
    _local_decode_kernel[(b * hkv,)](
        q, k, v, k_ring, v_ring, pos, w_swa if w_swa is not None else q, out,
        qr, kr, krr, st, w_rla if rla else q, cos, sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_ring.stride(0), k_ring.stride(1), k_ring.stride(2), v_ring.stride(0), v_ring.stride(1), v_ring.stride(2),
        out.stride(0), out.stride(1),
        qr.stride(0), qr.stride(1), kr.stride(0), kr.stride(1), krr.stride(0), krr.stride(1), krr.stride(2),
        st.stride(0), st.stride(1), st.stride(2),
        hkv, hq // hkv, size, scale * LOG2E, eps,
        D=d, BG=max(16, triton.next_power_of_2(hq // hkv)), BN=bn, BF=bf,
        NORM=w_swa is not None, RLA=rla, PHI=PHI_CODES.get(phi, 0), RAW_RING=raw_ring,
        UNROTATE=rla and not raw_ring,
        PREC=dot_precision(q.dtype), UPCAST=upcast_dots(q.dtype), num_warps=warps,
    )
    return out
