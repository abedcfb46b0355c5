"""Pieces every op shares: the tensor layout, the window mask, the feature maps phi, the per-head RMSNorm.

Layout: every tensor is (batch, heads, time, head_dim). Query heads Hq are a multiple of key/value
heads Hkv (GQA): query head h reads kv head h // (Hq // Hkv).

Window convention (DESIGN.md): with window ``w >= 0`` the sliding-window branch (SWA) lets query t
see keys j with ``0 <= t - j <= w`` (w+1 keys, FlashAttention's ``window_size=(w, 0)``). The
residual linear attention branch (RLA) sees exactly the complement, ``j <= t - w - 1`` (the math of
each op sits beside its reference: ``kernels/{swa,rla,merge}/naive.py``).

``phi`` is ``sm2(x) = [softmax(x), softmax(-x)]`` (default) or ``relu2(x) = [relu(x), relu(-x)]``,
over the head dim, in fp32. ``rms_norm_heads`` is the RMSNorm over D per head, with a learned (Hq, D)
scale, computed in fp32, that the merge applies to each branch.
"""

from __future__ import annotations

import torch

FEATURE_MAPS = ("sm2", "relu2")


def feature_map(x: torch.Tensor, kind: str = "sm2") -> torch.Tensor:
    """phi(x) over the last dim, doubling it: [f(x), f(-x)]. Computed in fp32 (fp64 stays fp64)."""
    xf = x if x.dtype == torch.float64 else x.float()
    if kind == "sm2":
        return torch.cat([torch.softmax(xf, dim=-1), torch.softmax(-xf, dim=-1)], dim=-1)
    if kind == "relu2":
        return torch.cat([torch.relu(xf), torch.relu(-xf)], dim=-1)
    raise ValueError(f"feature_map: unknown kind {kind!r}; allowed: {', '.join(FEATURE_MAPS)}")


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, T, D) -> (B, Hkv * n_rep, T, D), each kv head repeated for its query group."""
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def window_mask(t_q: int, t_k: int, window: int | None, device=None, q_offset: int = 0) -> torch.Tensor:
    """Boolean (t_q, t_k) mask, True where query (q_offset + i) may see key j under the SWA rule.

    ``window=None`` is full causal attention.
    """
    qi = torch.arange(t_q, device=device)[:, None] + q_offset
    kj = torch.arange(t_k, device=device)[None, :]
    diff = qi - kj
    mask = diff >= 0
    if window is not None:
        mask &= diff <= window
    return mask


def rms_norm_heads(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over D for each head of (B, H, T, D), scale of shape (H, D); fp32 (fp64 stays fp64)."""
    xf = x if x.dtype == torch.float64 else x.float()
    rms = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return xf * rms * weight[None, :, None, :].to(xf.dtype)


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v: expected 4-d tensors (batch, heads, time, head_dim)")
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, time or head_dim")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads {q.shape[1]} must be a multiple of kv heads {k.shape[1]}")
