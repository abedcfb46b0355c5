"""Reference math for the RAttention local layer: the ground truth every fast path is tested against.

Layout: every tensor is (batch, heads, time, head_dim). Query heads Hq are a multiple of key/value
heads Hkv (GQA): query head h reads kv head h // (Hq // Hkv).

Window convention (DESIGN.md): with window ``w >= 0`` the sliding-window branch (SWA) lets query t
see keys j with ``0 <= t - j <= w`` (w+1 keys, FlashAttention's ``window_size=(w, 0)``). The
residual linear attention branch (RLA) sees exactly the complement, ``j <= t - w - 1``:

    o_rla[t] = phi(q[t]) @ S[t - w - 1],   S[s] = sum_{i <= s} phi(k[i])^T v[i],   S[s] = 0 for s < 0

with raw (no RoPE, no norm, no scale) q and k, an fp32 state of shape (2D, D), no denominator, no
gate and no decay. ``phi`` is ``sm2(x) = [softmax(x), softmax(-x)]`` (default) or
``relu2(x) = [relu(x), relu(-x)]``, over the head dim, in fp32.

The two branches merge as ``RMSNorm_swa(o_swa) + RMSNorm_rla(o_rla)``: each an RMSNorm over D per
head with its own learned (Hq, D) scale, computed in fp32.

These functions are O(T^2) and meant for tests (run them in fp64).
"""

from __future__ import annotations

import math

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


def swa_naive(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None, scale: float | None = None
) -> torch.Tensor:
    """Causal softmax attention over the window (full causal when ``window is None``); GQA by repeat."""
    _check_qkv(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    scores = torch.einsum("bhtd,bhsd->bhts", q, k) * scale
    mask = window_mask(q.shape[2], k.shape[2], window, q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhts,bhsd->bhtd", torch.softmax(scores, dim=-1), v)


def rla_naive(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, phi: str = "sm2"
) -> torch.Tensor:
    """Residual linear attention, quadratic form: o[t] = sum_{j <= t-w-1} (phi(q_t).phi(k_j)) v_j.

    Returns fp32 (fp64 for fp64 inputs), the dtype of the state.
    """
    _check_qkv(q, k, v)
    if window < 0:
        raise ValueError(f"window: must be >= 0, got {window}")
    n_rep = q.shape[1] // k.shape[1]
    fq, fk = feature_map(q, phi), feature_map(k, phi)
    vv = v if v.dtype == torch.float64 else v.float()
    fk, vv = repeat_kv(fk, n_rep), repeat_kv(vv, n_rep)
    t = q.shape[2]
    mask = window_mask(t, t, None, q.device) & ~window_mask(t, t, window, q.device)  # j <= t - w - 1
    scores = torch.einsum("bhtf,bhsf->bhts", fq, fk).masked_fill(~mask, 0.0)
    return torch.einsum("bhts,bhsd->bhtd", scores, vv)


def rms_norm_heads(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over D for each head of (B, H, T, D), scale of shape (H, D); fp32 (fp64 stays fp64)."""
    xf = x if x.dtype == torch.float64 else x.float()
    rms = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return xf * rms * weight[None, :, None, :].to(xf.dtype)


def merge_naive(
    o_swa: torch.Tensor,
    o_rla: torch.Tensor | None,
    w_swa: torch.Tensor,
    w_rla: torch.Tensor | None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """RMSNorm_swa(o_swa) + RMSNorm_rla(o_rla); with ``o_rla=None`` only the normed SWA branch."""
    out = rms_norm_heads(o_swa, w_swa, eps)
    if o_rla is not None:
        out = out + rms_norm_heads(o_rla, w_rla, eps)
    return out


def rattention_naive(
    q_rope: torch.Tensor,
    k_rope: torch.Tensor,
    q_raw: torch.Tensor,
    k_raw: torch.Tensor,
    v: torch.Tensor,
    window: int,
    w_swa: torch.Tensor,
    w_rla: torch.Tensor,
    phi: str = "sm2",
    eps: float = 1e-6,
    scale: float | None = None,
) -> torch.Tensor:
    """The whole local layer (before the output projection), in fp32/fp64."""
    o_swa = swa_naive(q_rope, k_rope, v, window, scale)
    o_rla = rla_naive(q_raw, k_raw, v, window, phi)
    return merge_naive(o_swa, o_rla, w_swa, w_rla, eps)


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v: expected 4-d tensors (batch, heads, time, head_dim)")
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, time or head_dim")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads {q.shape[1]} must be a multiple of kv heads {k.shape[1]}")
