"""The torch path of a local layer's decode step (the math: kernels/common.py and each op's naive.py;
DESIGN.md "Decoding"); kernels.ops.local_decode dispatches to it or to the fused Triton step.

One new token at position ``pos`` per sequence. The ring of w+1 slots holds position p in slot p % (w+1).
In order: the key at pos-w-1 leaves the window and is folded into the RLA state (S += phi(k)^T v, raw k),
when pos > w; the new key and value take its slot; the query attends to the valid slots (0..pos, at most
w+1 of them); RAttention adds phi(q_raw) S, and the two branches merge by their per-head RMSNorms.
"""

from __future__ import annotations

import torch

from kernels import attention_decode, rla_decode, rla_fold, rms_norm_heads


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE's inverse (rotation by minus the angle) in the angles' dtype: the raw key. cos/sin
    broadcast against x's last two dims ((T, D) or (1, D))."""
    x = x.to(cos.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos - rotated * sin


def local_decode_naive(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_ring: torch.Tensor, v_ring: torch.Tensor,
    pos: torch.Tensor, w_swa: torch.Tensor | None = None, eps: float = 1e-6, *,
    q_raw: torch.Tensor | None = None, k_raw: torch.Tensor | None = None, state: torch.Tensor | None = None,
    w_rla: torch.Tensor | None = None, phi: str = "sm2", k_raw_ring: torch.Tensor | None = None,
    rope_leaving: tuple[torch.Tensor, torch.Tensor] | None = None, scale: float | None = None,
) -> torch.Tensor:
    """One local-layer decode step; returns the merged output (B, Hq, D) in q's dtype, before the output
    projection, and updates ``k_ring``, ``v_ring`` (, ``k_raw_ring``) and ``state`` in place.

    q: (B, Hq, D) the RoPE'd (QK-normed) query; k, v: (B, Hkv, D) the new key (as the ring stores it) and
    value; rings (B, Hkv, w+1, D); pos: 0-dim int64 tensor. ``w_swa`` None: plain SWA (no output norm).
    RAttention (``state`` given, (B, Hkv, 2D, D) fp32): ``q_raw``/``k_raw`` the raw projections, ``w_rla``
    the RLA norm scale; the leaving key is read from ``k_raw_ring`` when kept, else un-rotated from
    ``k_ring`` with ``rope_leaving`` = (cos, sin) (1, D) at position pos-w-1.
    """
    size = k_ring.shape[2]
    slot = torch.remainder(pos, size).view(1)
    if state is not None:
        keys = k_raw_ring if k_raw_ring is not None else k_ring
        k_old, v_old = keys.index_select(2, slot), v_ring.index_select(2, slot)
        if k_raw_ring is None:
            k_old = unrotate(k_old, *rope_leaving)
        v_old = torch.where(pos >= size, v_old, torch.zeros_like(v_old))  # before the window fills: no key leaves
        state.copy_(rla_fold(state, k_old, v_old, phi))
    k_ring.index_copy_(2, slot, k[:, :, None].to(k_ring.dtype))
    v_ring.index_copy_(2, slot, v[:, :, None].to(v_ring.dtype))
    if k_raw_ring is not None:
        k_raw_ring.index_copy_(2, slot, k_raw[:, :, None].to(k_raw_ring.dtype))
    valid = torch.arange(size, device=k_ring.device) <= pos
    o = attention_decode(q[:, :, None], k_ring, v_ring, valid, scale)
    if state is not None:
        o = rms_norm_heads(o, w_swa, eps) + rms_norm_heads(rla_decode(q_raw[:, :, None], state, phi), w_rla, eps)
    elif w_swa is not None:
        o = rms_norm_heads(o, w_swa, eps)
    return o[:, :, 0].to(q.dtype)
