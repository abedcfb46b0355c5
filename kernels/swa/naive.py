"""Reference sliding-window attention (SWA): the ground truth the fast SWA paths are tested against.

Query t sees keys j with ``0 <= t - j <= w`` (w+1 keys; ``window=None`` is full causal): causal
softmax attention over the window, on RoPE'd q and k, scaled by 1/sqrt(D) unless told otherwise.

O(T^2) and meant for tests (run it in fp64).
"""

from __future__ import annotations

import math

import torch

from kernels.common import _check_qkv, repeat_kv, window_mask


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
