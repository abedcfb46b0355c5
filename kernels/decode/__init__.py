"""Decoding kernels: one new token per sequence against a local layer's ring (and RLA state).

``local_decode`` is the fused Triton step of a local layer (SWA or RAttention); ``local_decode_naive`` is
its torch reference, composed of the ``kernels`` decode ops, with the same signature and effects;
``fused_serves`` says where the fused step runs.
"""

from __future__ import annotations

import torch

from kernels.decode.naive import local_decode_naive


def local_decode(*args, **kwargs) -> torch.Tensor:
    """The fused Triton step (``kernels.decode.triton.local_decode``); Triton is imported on first use, so
    a machine without it still imports this package."""
    from kernels.decode.triton import local_decode as fused

    return fused(*args, **kwargs)


def fused_serves(x: torch.Tensor, head_dim: int) -> bool:
    """Whether ``local_decode`` serves a step whose activations are ``x``: the Triton path is on for x
    (``kernels.ops.use_triton``: CUDA, Triton importable, not forced off), x is 16- or 32-bit, and the
    head dim is a power of two >= 16."""
    from kernels.ops import use_triton

    pow2 = head_dim >= 16 and head_dim & (head_dim - 1) == 0
    return pow2 and x.dtype != torch.float64 and use_triton(x)


__all__ = ["fused_serves", "local_decode", "local_decode_naive"]
