"""Torch fast path of sliding-window attention for machines without a GPU: blockwise SWA.

Computes exactly ``kernels.swa.naive.swa_naive`` (the math is there), with memory linear in T: each
query block touches only the w+1 keys it can see. Gradients come from autograd.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernels.common import _check_qkv, window_mask


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
