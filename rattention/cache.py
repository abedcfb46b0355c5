"""Decoding cache. Global layers keep every key and value. Local layers keep a ring of their last
w+1 raw keys and values (RoPE and QK-norm are applied on read, so the key that leaves the window is
at hand without RoPE), plus, for RAttention, the fp32 RLA state S.

At step t the key at position t-w-1 leaves the ring and is folded into S, so S always holds the keys
i <= t-w-1 that the linear branch reads. ``cache_bytes`` gives the same number as ``nbytes`` from
the config alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kernels import rla_fold
from kernels.torch_ops import rla_state
from rattention.config import ModelConfig


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class GlobalCache:
    """Every key (QK-normed and RoPE'd as attention reads it) and value so far: (B, Hkv, L, D)."""

    def __init__(self, batch: int, n_kv: int, head_dim: int, dtype: torch.dtype, device):
        self.k = torch.empty(batch, n_kv, 0, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.length = 0

    def prefill(self, k: torch.Tensor, v: torch.Tensor, phi: str) -> None:
        self.k, self.v = k.detach().contiguous(), v.detach().contiguous()
        self.length = k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k = torch.cat([self.k, k.detach()], dim=2)
        self.v = torch.cat([self.v, v.detach()], dim=2)
        self.length += 1

    def tensors(self) -> list[torch.Tensor]:
        return [self.k, self.v]


class LocalCache:
    """A ring of w+1 raw keys and values; position p lives in slot p % (w+1). Optional RLA state."""

    def __init__(self, batch: int, n_kv: int, head_dim: int, window: int, dtype: torch.dtype, device,
                 with_state: bool):
        self.size = window + 1
        self.k = torch.zeros(batch, n_kv, self.size, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.state = (torch.zeros(batch, n_kv, 2 * head_dim, head_dim, dtype=_state_dtype(dtype), device=device)
                      if with_state else None)
        self.length = 0

    def slot_positions(self) -> torch.Tensor:
        """Absolute position held by each slot after ``length`` tokens (-1 for an empty slot)."""
        last = self.length - 1
        slots = torch.arange(self.size, device=self.k.device)
        return last - torch.remainder(last - slots, self.size)

    def prefill(self, k_raw: torch.Tensor, v: torch.Tensor, phi: str) -> None:
        """Take the last w+1 keys of a prompt of P tokens, and S over keys i <= P - w - 2."""
        p = k_raw.shape[2]
        start = max(0, p - self.size)
        pos = torch.arange(start, p, device=k_raw.device)
        self.k[:, :, pos % self.size] = k_raw[:, :, start:p].detach()
        self.v[:, :, pos % self.size] = v[:, :, start:p].detach()
        if self.state is not None:
            self.state = rla_state(k_raw.detach(), v.detach(), p - self.size, phi).to(self.state.dtype)
        self.length = p

    def append(self, k_raw: torch.Tensor, v: torch.Tensor, phi: str) -> None:
        """Write position ``length``; the key it overwrites (position length-w-1) folds into S."""
        slot = self.length % self.size
        if self.state is not None and self.length >= self.size:
            self.state = rla_fold(self.state, self.k[:, :, slot : slot + 1], self.v[:, :, slot : slot + 1], phi)
        self.k[:, :, slot] = k_raw[:, :, 0].detach()
        self.v[:, :, slot] = v[:, :, 0].detach()
        self.length += 1

    def tensors(self) -> list[torch.Tensor]:
        return [self.k, self.v] + ([self.state] if self.state is not None else [])


@dataclass
class ModelCache:
    """One cache per layer; ``length`` tokens seen so far."""

    layers: list[GlobalCache | LocalCache] = field(default_factory=list)
    length: int = 0

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, device=None) -> ModelCache:
        dt = cfg.torch_dtype
        layers: list[GlobalCache | LocalCache] = []
        for kind in cfg.layer_kinds():
            if kind == "global":
                layers.append(GlobalCache(batch, cfg.n_kv_heads, cfg.head_dim, dt, device))
            else:
                layers.append(LocalCache(batch, cfg.n_kv_heads, cfg.head_dim, cfg.window, dt, device,
                                         with_state=kind == "rattention"))
        return cls(layers)

    def nbytes(self) -> int:
        """Bytes held by the real cache tensors."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors())


def cache_bytes(cfg: ModelConfig, context: int, batch: int = 1) -> int:
    """Cache bytes after ``context`` tokens, from the config alone (equals ``ModelCache.nbytes``).

    Global layer: 2 * L * Hkv * D elements. Local layer: 2 * (w+1) * Hkv * D, flat in L, plus for
    RAttention the fp32 state Hkv * 2D * D.
    """
    item = torch.empty(0, dtype=cfg.torch_dtype).element_size()
    state_item = torch.empty(0, dtype=_state_dtype(cfg.torch_dtype)).element_size()
    kv = cfg.n_kv_heads * cfg.head_dim
    total = 0
    for kind in cfg.layer_kinds():
        if kind == "global":
            total += 2 * context * kv * item
        else:
            total += 2 * (cfg.window + 1) * kv * item
            if kind == "rattention":
                total += cfg.n_kv_heads * 2 * cfg.head_dim * cfg.head_dim * state_item
    return total * batch
