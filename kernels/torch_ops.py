"""Torch fast paths for machines without a GPU: blockwise sliding-window attention and chunked RLA.

Both compute exactly the functions in ``kernels.reference`` (see its docstring for the math), with
memory linear in T: SWA touches only the w+1 keys each query block can see, and RLA carries an fp32
state between chunks of C queries. Gradients come from autograd.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernels.reference import _check_qkv, feature_map, window_mask


def swa_blockwise(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | None,
    scale: float | None = None,
    block: int = 128,
) -> torch.Tensor:
    """Sliding-window (or, with ``window=None``, full) causal attention, O(T * (block + w)) memory."""
    _check_qkv(q, k, v)
    t = q.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    gqa = q.shape[1] != k.shape[1]
    if window is None or window >= t - 1:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if window < 0:
        raise ValueError(f"window: must be >= 0 or None, got {window}")
    outs = []
    for q0 in range(0, t, block):
        q1 = min(q0 + block, t)
        k0 = max(0, q0 - window)
        mask = window_mask(q1 - q0, q1 - k0, window, q.device, q_offset=q0 - k0)
        outs.append(
            F.scaled_dot_product_attention(
                q[:, :, q0:q1], k[:, :, k0:q1], v[:, :, k0:q1], attn_mask=mask, scale=scale, enable_gqa=gqa
            )
        )
    return torch.cat(outs, dim=2)


def rla_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    phi: str = "sm2",
    chunk: int = 64,
    return_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Residual linear attention in chunks of ``chunk`` queries, fp32 state, O(T*C + state) memory.

    With shift s = w + 1, query t sees keys i <= t - s: the query chunk [a, a+C) reads the state of
    all keys < a - s, plus the keys [a - s, a + C - s) under the causal mask i <= t - s. The key
    range is found by index arithmetic; nothing is padded. Returns the output (fp32, fp64 for fp64
    inputs), and with ``return_state`` also the final state over keys i <= T - w - 2 (what decoding
    continues from), shaped (B, Hkv, 2D, D).
    """
    _check_qkv(q, k, v)
    if window < 0:
        raise ValueError(f"window: must be >= 0, got {window}")
    if chunk <= 0:
        raise ValueError(f"chunk: must be > 0, got {chunk}")
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = window + 1
    qg = q.reshape(b, hkv, g, t, d)
    state = q.new_zeros(b, hkv, 2 * d, d, dtype=acc)
    outs = []
    for q0 in range(0, t, chunk):
        q1 = min(q0 + chunk, t)
        fq = feature_map(qg[:, :, :, q0:q1], phi)  # (b, hkv, g, c, 2d)
        o = torch.einsum("bhgtf,bhfd->bhgtd", fq, state)
        k0, k1 = max(q0 - s, 0), q1 - s
        if k1 > k0:
            fk = feature_map(k[:, :, k0:k1], phi)  # (b, hkv, n, 2d)
            vb = v[:, :, k0:k1].to(acc)
            # key i is visible to query t iff i <= t - s
            mask = (torch.arange(k0, k1, device=q.device)[None, :]
                    <= torch.arange(q0, q1, device=q.device)[:, None] - s)
            scores = torch.einsum("bhgtf,bhsf->bhgts", fq, fk) * mask
            o = o + torch.einsum("bhgts,bhsd->bhgtd", scores, vb)
            state = state + torch.einsum("bhsf,bhsd->bhfd", fk, vb)
        outs.append(o)
    out = torch.cat(outs, dim=3).reshape(b, hq, t, d)
    return (out, state) if return_state else out


def rla_state(k: torch.Tensor, v: torch.Tensor, upto: int, phi: str = "sm2") -> torch.Tensor:
    """S over keys i < upto: sum phi(k_i)^T v_i, fp32 (fp64 for fp64), shaped (B, Hkv, 2D, D)."""
    acc = torch.float64 if k.dtype == torch.float64 else torch.float32
    b, h, _, d = k.shape
    if upto <= 0:
        return k.new_zeros(b, h, 2 * d, d, dtype=acc)
    return torch.einsum("bhsf,bhsd->bhfd", feature_map(k[:, :, :upto], phi), v[:, :, :upto].to(acc))
