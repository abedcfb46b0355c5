"""Decoding cache. Keys are stored as the softmax branch reads them (QK-normed, then RoPE'd), so a
decode step rotates only the one new key.

- Global layers keep every key and value in a buffer of ``capacity`` positions: reserved up front for a
  static decode step, or, unreserved, grown to exactly the length.
- Local layers keep a ring of their last w+1 keys and values; position p lives in slot p % (w+1).
- RAttention adds the fp32 RLA state S. At step t the key at position t-w-1 leaves the ring and is folded
  into S, so S holds the keys i <= t-w-1 that the linear branch reads. That branch reads the *raw*
  projection (no RoPE, no QK-norm): without QK-norm the leaving key is un-rotated (RoPE's inverse, exact
  up to rounding); with QK-norm, which cannot be undone, a second ring keeps the raw keys.

The cache's position counter is a tensor (``ModelCache.pos``) so that the decode step has fixed shapes
and no host sync. ``cache_bytes`` gives the same number as ``nbytes`` from the config alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kernels import rla_state
from kernels.ops import DECODE_KEY_BLOCK
from rattention.config import ModelConfig

BLOCK = DECODE_KEY_BLOCK  # a reserved global buffer holds a multiple of this many positions (its key blocks)


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class GlobalCache:
    """Every key (QK-normed and RoPE'd as attention reads it) and value so far: (B, Hkv, C, D), C the
    capacity. ``reserved`` fixes C (the static step writes in place); unreserved, C grows to the length."""

    def __init__(self, batch: int, n_kv: int, head_dim: int, dtype: torch.dtype, device,
                 capacity: int | None = None):
        self.reserved = capacity is not None
        self.k = torch.zeros(batch, n_kv, capacity or 0, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def ensure(self, n: int) -> None:
        """Make room for positions 0..n-1: an unreserved buffer grows to n; a reserved one must hold n."""
        if n <= self.capacity:
            return
        if self.reserved:
            raise ValueError(f"capacity: the cache holds {self.capacity} positions, decoding needs {n}; "
                             f"reserve at least {n} (new_cache(batch, capacity=...))")
        pad = self.k.new_zeros(*self.k.shape[:2], n - self.capacity, self.k.shape[3])
        self.k, self.v = torch.cat([self.k, pad], dim=2), torch.cat([self.v, pad], dim=2)

    def prefill(self, k: torch.Tensor, v: torch.Tensor) -> None:
        p = k.shape[2]
        self.ensure(p)
        self.k[:, :, :p] = k.detach()
        self.v[:, :, :p] = v.detach()

    def write(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the key and value (B, Hkv, 1, D) of position ``pos`` (a 0-dim tensor)."""
        self.k.index_copy_(2, pos.view(1), k.to(self.k.dtype))
        self.v.index_copy_(2, pos.view(1), v.to(self.v.dtype))

    def valid(self, pos: torch.Tensor) -> torch.Tensor:
        """Which buffer positions a query at ``pos`` sees: 0..pos. Shape (C,)."""
        return torch.arange(self.capacity, device=self.k.device) <= pos

    def tensors(self) -> list[torch.Tensor]:
        return [self.k, self.v]


class LocalCache:
    """A ring of the last w+1 keys (QK-normed, RoPE'd) and values; position p in slot p % (w+1).
    RAttention adds the RLA state S (B, Hkv, 2D, D) and, with ``raw_keys`` (QK-norm on), a ring of the raw
    keys that S is built from."""

    def __init__(self, batch: int, n_kv: int, head_dim: int, window: int, dtype: torch.dtype, device,
                 with_state: bool, raw_keys: bool = False):
        self.size = window + 1
        self.k = torch.zeros(batch, n_kv, self.size, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.k_raw = torch.zeros_like(self.k) if with_state and raw_keys else None
        self.state = (torch.zeros(batch, n_kv, 2 * head_dim, head_dim, dtype=_state_dtype(dtype), device=device)
                      if with_state else None)

    def prefill(self, k: torch.Tensor, k_raw: torch.Tensor, v: torch.Tensor, phi: str) -> None:
        """Take the last w+1 keys of a prompt of P tokens, and S over keys i <= P - w - 2."""
        p = k.shape[2]
        start = max(0, p - self.size)
        slots = torch.arange(start, p, device=k.device) % self.size
        self.k[:, :, slots] = k[:, :, start:p].detach()
        self.v[:, :, slots] = v[:, :, start:p].detach()
        if self.k_raw is not None:
            self.k_raw[:, :, slots] = k_raw[:, :, start:p].detach()
        if self.state is not None:
            self.state.copy_(rla_state(k_raw.detach(), v.detach(), p - self.size, phi))

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.k, self.v, self.k_raw, self.state) if t is not None]


@dataclass
class ModelCache:
    """One cache per layer. ``length``: tokens seen (host side); ``pos``: the same count as a 0-dim
    int64 tensor on the cache's device, which the static decode step reads and advances without a host
    sync. ``capacity``: positions reserved for the global layers, a multiple of ``BLOCK`` (None: they grow
    to the length)."""

    layers: list[GlobalCache | LocalCache] = field(default_factory=list)
    pos: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.long))
    capacity: int | None = None
    length: int = 0

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, device=None, capacity: int | None = None) -> ModelCache:
        """An empty cache; a reserved ``capacity`` is rounded up to a multiple of ``BLOCK`` positions."""
        if capacity is not None and capacity <= 0:
            raise ValueError(f"capacity: must be > 0 or None, got {capacity}")
        if capacity is not None:
            capacity = -(-capacity // BLOCK) * BLOCK
        dt = cfg.torch_dtype
        layers: list[GlobalCache | LocalCache] = []
        for kind in cfg.layer_kinds():
            if kind == "global":
                layers.append(GlobalCache(batch, cfg.n_kv_heads, cfg.head_dim, dt, device, capacity))
            else:
                layers.append(LocalCache(batch, cfg.n_kv_heads, cfg.head_dim, cfg.window, dt, device,
                                         with_state=kind == "rattention", raw_keys=cfg.qk_norm))
        return cls(layers, torch.zeros((), dtype=torch.long, device=device), capacity)

    @property
    def held_positions(self) -> int:
        """Positions the global buffers hold: the reserved capacity, else the length."""
        return self.capacity if self.capacity is not None else self.length

    def ensure(self, n: int) -> None:
        """Room for n positions in every global layer (grows an unreserved cache, checks a reserved one)."""
        for layer in self.layers:
            if isinstance(layer, GlobalCache):
                layer.ensure(n)
        if self.capacity is not None and n > self.capacity:
            raise ValueError(f"capacity: the cache holds {self.capacity} positions, decoding needs {n}")

    def nbytes(self) -> int:
        """Bytes held by the real cache tensors (equals ``cache_bytes(cfg, held_positions, batch)``)."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors())


def cache_bytes(cfg: ModelConfig, context: int, batch: int = 1) -> int:
    """Cache bytes after ``context`` tokens, from the config alone (equals ``ModelCache.nbytes``).

    Global layer: 2 * L * Hkv * D elements. Local layer: 2 * (w+1) * Hkv * D, flat in L, plus for
    RAttention the fp32 state Hkv * 2D * D, and with QK-norm the raw-key ring (w+1) * Hkv * D.
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
                if cfg.qk_norm:
                    total += (cfg.window + 1) * kv * item
    return total * batch
