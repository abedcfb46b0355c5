"""Torch fast path of residual linear attention for machines without a GPU: chunked RLA, and the state S.

``rla_chunked`` computes exactly ``kernels.rla.naive.rla_naive`` (the math is there), with memory
linear in T: it carries an fp32 state between chunks of C queries. Gradients come from autograd.
``rla_state`` is S over a prefix of keys, where decoding continues after a prefill.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.common import _check_qkv, feature_map


def rla_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    phi: str = "sm2",
    chunk: int = 64,
    return_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Residual linear attention in chunks of ``chunk`` queries with an fp32 state, all chunks at once.

    With shift s = w + 1, query t sees keys i <= t - s: this is causal linear attention (diagonal
    included) of q against the key sequence shifted right by s, whose first s rows are empty. The
    shifted sequence is cut into chunks of C; each chunk's state contribution phi(k)^T v is summed
    by an exclusive prefix over chunks (inter-chunk part) and the C x C causal block is done
    directly (intra-chunk part). Memory is O(T*C + (T/C)*2D*D): linear in T, never O(T^2) (a loop
    over chunks under autograd keeps those per-chunk states too). Returns the output (fp32, fp64
    for fp64 inputs) and, with ``return_state``, the state over keys i <= T - w - 2 (where decoding
    continues), shaped (B, Hkv, 2D, D).
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
    if s >= t:  # no query has a key outside its window (q * 0 keeps the autograd graph connected)
        out = q.to(acc) * 0
        return (out, q.new_zeros(b, hkv, 2 * d, d, dtype=acc)) if return_state else out
    n = -(-t // chunk)
    pad = n * chunk - t
    fq = F.pad(feature_map(q, phi), (0, 0, 0, pad)).reshape(b, hkv, g, n, chunk, 2 * d)
    # keys 0 .. t-s-1, placed at shifted positions s .. t-1
    fk = F.pad(feature_map(k[:, :, : t - s], phi), (0, 0, s, pad)).reshape(b, hkv, n, chunk, 2 * d)
    vs = F.pad(v[:, :, : t - s].to(acc), (0, 0, s, pad)).reshape(b, hkv, n, chunk, d)
    d_state = torch.einsum("bhncf,bhncd->bhnfd", fk, vs)
    total = d_state.sum(dim=2)
    before = torch.cumsum(d_state, dim=2) - d_state  # state over all earlier chunks
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    scores = torch.einsum("bhgncf,bhnsf->bhgncs", fq, fk) * causal
    out = torch.einsum("bhgncf,bhnfd->bhgncd", fq, before) + torch.einsum("bhgncs,bhnsd->bhgncd", scores, vs)
    out = out.reshape(b, hq, n * chunk, d)[:, :, :t]
    return (out, total) if return_state else out


def rla_state(k: torch.Tensor, v: torch.Tensor, upto: int, phi: str = "sm2") -> torch.Tensor:
    """S over keys i < upto: sum phi(k_i)^T v_i, fp32 (fp64 for fp64), shaped (B, Hkv, 2D, D)."""
    acc = torch.float64 if k.dtype == torch.float64 else torch.float32
    b, h, _, d = k.shape
    if upto <= 0:
        return k.new_zeros(b, h, 2 * d, d, dtype=acc)
    return torch.einsum("bhsf,bhsd->bhfd", feature_map(k[:, :, :upto], phi), v[:, :, :upto].to(acc))
