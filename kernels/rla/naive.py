"""Reference residual linear attention (RLA): the ground truth the fast RLA paths are tested against.

RLA sees exactly the keys outside the SWA window, ``j <= t - w - 1``:

    o_rla[t] = phi(q[t]) @ S[t - w - 1],   S[s] = sum_{i <= s} phi(k[i])^T v[i],   S[s] = 0 for s < 0

with raw (no RoPE, no norm, no scale) q and k, an fp32 state of shape (2D, D), no denominator, no
gate and no decay; phi is ``kernels.common.feature_map``.

O(T^2) and meant for tests (run it in fp64).
"""

from __future__ import annotations

import torch

from kernels.common import _check_qkv, feature_map, repeat_kv, window_mask


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
