"""One entry point per op, used by ``rattention``'s attention module and by decoding.

On CUDA with Triton these dispatch to the Triton kernels; elsewhere they run the torch paths in
``kernels.torch_ops``, with the same signature and semantics (``kernels.reference``).
"""

from __future__ import annotations

import math

import torch

from kernels.reference import feature_map, merge_naive
from kernels.torch_ops import rla_chunked, swa_blockwise


def use_triton(x: torch.Tensor) -> bool:
    """Whether the Triton kernels serve this tensor (CUDA device and Triton importable)."""
    if not x.is_cuda:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None, scale: float | None = None
) -> torch.Tensor:
    """Causal softmax attention, sliding-window when ``window`` is an int, full when None.

    (B, Hq, T, D) queries against (B, Hkv, T, D) keys and values; output in the dtype of q.
    """
    return swa_blockwise(q, k, v, window, scale)


def rattention(
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
    chunk: int = 64,
) -> torch.Tensor:
    """The RAttention local layer: RMSNorm_swa(SWA(q_rope, k_rope, v)) + RMSNorm_rla(RLA(q_raw, k_raw, v)).

    Output (B, Hq, T, D) in the dtype of q, before the output projection.
    """
    o_swa = swa_blockwise(q_rope, k_rope, v, window, scale)
    o_rla = rla_chunked(q_raw, k_raw, v, window, phi, chunk)
    return merge_naive(o_swa, o_rla, w_swa, w_rla, eps).to(q_rope.dtype)


def normed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None, w_swa: torch.Tensor,
    eps: float = 1e-6, scale: float | None = None,
) -> torch.Tensor:
    """SWA with RAttention's per-head output norm and no linear branch (the ablation switch)."""
    return merge_naive(attention(q, k, v, window, scale), None, w_swa, None, eps).to(q.dtype)


# ---------------------------------------------------------------------------------------------
# Decoding: one new token against a cache.


def attention_decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """One query step: q (B, Hq, 1, D) against cached k, v (B, Hkv, S, D); ``valid`` masks slots (S,)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    n_rep = q.shape[1] // k.shape[1]
    b, hkv, s, d = k.shape
    qg = q.reshape(b, hkv, n_rep, d)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = torch.einsum("bhgd,bhsd->bhgs", qg, k).to(acc) * scale
    if valid is not None:
        scores = scores.masked_fill(~valid, float("-inf"))
    p = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.einsum("bhgs,bhsd->bhgd", p, v).reshape(b, hkv * n_rep, 1, d)


def rla_decode(q_raw: torch.Tensor, state: torch.Tensor, phi: str = "sm2") -> torch.Tensor:
    """One query step of RLA: phi(q) @ S, q (B, Hq, 1, D), S (B, Hkv, 2D, D) -> (B, Hq, 1, D) fp32."""
    b, hq, _, d = q_raw.shape
    hkv = state.shape[1]
    fq = feature_map(q_raw, phi).reshape(b, hkv, hq // hkv, 2 * d).to(state.dtype)
    return torch.einsum("bhgf,bhfd->bhgd", fq, state).reshape(b, hq, 1, d)


def rla_fold(state: torch.Tensor, k_raw: torch.Tensor, v: torch.Tensor, phi: str = "sm2") -> torch.Tensor:
    """Fold keys leaving the window into the state: S + phi(k)^T v, k and v (B, Hkv, n, D)."""
    return state + torch.einsum("bhsf,bhsd->bhfd", feature_map(k_raw, phi).to(state.dtype), v.to(state.dtype))
