"""Reference merge of the two branches, and the whole RAttention local layer built from the references.

The branches merge as ``RMSNorm_swa(o_swa) + RMSNorm_rla(o_rla)``: each an RMSNorm over D per head
with its own learned (Hq, D) scale, computed in fp32 (``kernels.common.rms_norm_heads``).

Meant for tests (run it in fp64).
"""

from __future__ import annotations

import torch

from kernels.common import rms_norm_heads
from kernels.rla.naive import rla_naive
from kernels.swa.naive import swa_naive


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
