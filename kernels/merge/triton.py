"""The RAttention merge in Triton: RMSNorm_a(a) + RMSNorm_b(b) per head over D, fp32 math (naive.py).

With r = rsqrt(mean(x^2) + eps) and y = x r w, the backward is
dx = r (w dy) - x r^3 mean(x w dy) and dw = sum over rows of dy x r. Each program handles BT rows of
one (batch, head) and writes its partial dw; torch sums the partials. ``b=None`` normalizes a alone.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_utils import check_launch, interpreted, new_output


@triton.jit
def _merge_fwd_kernel(
    A, B, WA, WB, OUT, RA, RB,
    sab, sah, sat, sbb, sbh, sbt,
    T, H, eps,
    D: tl.constexpr, BT: tl.constexpr, HAS_B: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    bi = pid_bh // H
    h = pid_bh % H
    rows = pid_t * BT + tl.arange(0, BT)
    offs_d = tl.arange(0, D)
    ok = rows < T
    a = tl.load(A + bi * sab + h * sah + rows[:, None] * sat + offs_d[None, :], mask=ok[:, None], other=0.0)
    a = a.to(tl.float32)
    ra = 1.0 / tl.sqrt(tl.sum(a * a, 1) / D + eps)
    y = a * ra[:, None] * tl.load(WA + h * D + offs_d)[None, :]
    tl.store(RA + pid_bh * T + rows, ra, mask=ok)
    if HAS_B:
        x = tl.load(B + bi * sbb + h * sbh + rows[:, None] * sbt + offs_d[None, :], mask=ok[:, None], other=0.0)
        x = x.to(tl.float32)
        rb = 1.0 / tl.sqrt(tl.sum(x * x, 1) / D + eps)
        y += x * rb[:, None] * tl.load(WB + h * D + offs_d)[None, :]
        tl.store(RB + pid_bh * T + rows, rb, mask=ok)
    tl.store(OUT + pid_bh * T * D + rows[:, None] * D + offs_d[None, :], y.to(OUT.dtype.element_ty),
             mask=ok[:, None])


@triton.jit
def _merge_bwd_kernel(
    DY, X, W, R, DX, DW,
    sxb, sxh, sxt, sdb, sdh, sdt,
    T, H,
    D: tl.constexpr, BT: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    bi = pid_bh // H
    h = pid_bh % H
    rows = pid_t * BT + tl.arange(0, BT)
    offs_d = tl.arange(0, D)
    ok = rows < T
    dy = tl.load(DY + bi * sdb + h * sdh + rows[:, None] * sdt + offs_d[None, :], mask=ok[:, None], other=0.0)
    dy = dy.to(tl.float32)
    x = tl.load(X + bi * sxb + h * sxh + rows[:, None] * sxt + offs_d[None, :], mask=ok[:, None], other=0.0)
    x = x.to(tl.float32)
    r = tl.load(R + pid_bh * T + rows, mask=ok, other=0.0)
    w = tl.load(W + h * D + offs_d)
    wdy = dy * w[None, :]
    dx = r[:, None] * wdy - x * (r * r * r * tl.sum(x * wdy, 1) / D)[:, None]
    tl.store(DX + pid_bh * T * D + rows[:, None] * D + offs_d[None, :], dx.to(DX.dtype.element_ty),
             mask=ok[:, None])
    tl.store(DW + (pid_t * tl.num_programs(1) + pid_bh) * D + offs_d, tl.sum(dy * x * r[:, None], 0))


def _block_t(d: int) -> int:
    return 16 if interpreted() else max(1, 4096 // d)


def merge_fwd(
    a: torch.Tensor, b: torch.Tensor | None, w_a: torch.Tensor, w_b: torch.Tensor | None, eps: float = 1e-6,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(out, rstd_a, rstd_b): out = RMSNorm(a) w_a + RMSNorm(b) w_b in ``out_dtype`` (default a's dtype)."""
    check_launch(a)
    bs, h, t, d = a.shape
    if b is not None and b.shape != a.shape:
        raise ValueError(f"merge: branch shapes differ, {tuple(a.shape)} and {tuple(b.shape)}")
    for w in (w_a, w_b if b is not None else w_a):
        if w.shape != (h, d):
            raise ValueError(f"merge: norm scale must be (heads, head_dim) = {(h, d)}, got {tuple(w.shape)}")
    bt = _block_t(d)
    out = new_output((bs, h, t, d), out_dtype or a.dtype, a.device)
    ra = new_output((bs, h, t), torch.float32, a.device)
    rb = new_output((bs, h, t), torch.float32, a.device) if b is not None else None
    w_a = w_a.float().contiguous()
    w_b = w_b.float().contiguous() if b is not None else w_a
    bb = b if b is not None else a
    _merge_fwd_kernel[(triton.cdiv(t, bt), bs * h)](
        a, bb, w_a, w_b, out, ra, rb if rb is not None else ra,
        a.stride(0), a.stride(1), a.stride(2), bb.stride(0), bb.stride(1), bb.stride(2),
        t, h, eps, D=d, BT=bt, HAS_B=b is not None,
    )
    return out, ra, rb


def norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of one branch's RMSNorm: (dx in x's dtype, dw (H, D) in w's dtype)."""
    check_launch(x)
    bs, h, t, d = x.shape
    bt = _block_t(d)
    nt = triton.cdiv(t, bt)
    dx = new_output((bs, h, t, d), x.dtype, x.device)
    dw = new_output((nt, bs, h, d), torch.float32, x.device)
    _merge_bwd_kernel[(nt, bs * h)](
        dy, x, w.float().contiguous(), rstd, dx, dw,
        x.stride(0), x.stride(1), x.stride(2), dy.stride(0), dy.stride(1), dy.stride(2),
        t, h, D=d, BT=bt,
    )
    return dx, dw.sum(dim=(0, 1)).to(w.dtype)


class MergeFunction(torch.autograd.Function):
    """Autograd wrapper (direct use and CPU tests); ``b``/``w_b`` may be None for the norm alone."""

    @staticmethod
    def forward(ctx, a, b, w_a, w_b, eps, out_dtype):
        out, ra, rb = merge_fwd(a, b, w_a, w_b, eps, out_dtype)
        ctx.save_for_backward(a, b, w_a, w_b, ra, rb)
        return out

    @staticmethod
    def backward(ctx, dy):
        a, b, w_a, w_b, ra, rb = ctx.saved_tensors
        da, dwa = norm_bwd(dy, a, w_a, ra)
        db = dwb = None
        if b is not None:
            db, dwb = norm_bwd(dy, b, w_b, rb)
        return da, db, dwa, dwb, None, None


def merge(a: torch.Tensor, b: torch.Tensor | None, w_a: torch.Tensor, w_b: torch.Tensor | None,
          eps: float = 1e-6, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Differentiable Triton merge RMSNorm_a(a) + RMSNorm_b(b)."""
    return MergeFunction.apply(a, b, w_a, w_b, eps, out_dtype)
