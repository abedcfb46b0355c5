"""The decoder LM: attention (global, sliding-window or RAttention), SwiGLU MLP, pre-norm blocks.

A module per concept, names from the math. The attention math itself lives in ``kernels``; this
file wires projections, RoPE, QK-norm and the decoding cache around it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from rattention.cache import GlobalCache, LocalCache, ModelCache
from rattention.config import ModelConfig


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, computed in fp32, with a learned scale."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float() if x.dtype != torch.float64 else x
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.to(xf.dtype)).to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin of shape (len(positions), head_dim) for rotate-half RoPE."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float64) / head_dim))
    ang = positions.to(torch.float64)[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (..., T, D) by per-position angles; cos/sin are (T, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


@dataclass
class StepAngles:
    """What every layer of one decode step shares: the position ``pos`` (0-dim tensor), RoPE's cos and
    sin at ``pos`` and at ``pos - w - 1``, the position whose key leaves a local window (None where no
    layer needs them)."""

    pos: torch.Tensor
    rope: tuple[torch.Tensor, torch.Tensor] | None
    rope_leaving: tuple[torch.Tensor, torch.Tensor] | None


class Attention(nn.Module):
    """One attention layer. ``kind`` is 'global' (full causal), 'swa' or 'rattention'.

    RAttention reuses the q/k/v projections: the window branch gets RoPE'd (and optionally
    QK-normed) q/k, the linear branch the raw projections. Its only extra parameters are the two
    per-head output-norm scales ``norm_swa`` (starts at 1) and ``norm_rla`` (starts at
    ``rla_norm_init``).

    ``fused_decode`` picks a local layer's decode step (``kernels.local_decode``): None (default) leaves it
    to ``kernels.ops.FUSED_DECODE`` (the torch path until the fused Triton step is measured on a GPU), True
    forces the one-launch Triton step (on CPU under TRITON_INTERPRET=1), False the torch path.
    """

    fused_decode: bool | None = None

    def __init__(self, cfg: ModelConfig, kind: str):
        super().__init__()
        self.cfg, self.kind = cfg, kind
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.window = None if kind == "global" else cfg.window
        self.use_rope = kind != "global" or not cfg.nope_global
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.output_norm = kind == "rattention" or (kind == "swa" and cfg.swa_output_norm)
        if self.output_norm:
            self.norm_swa = nn.Parameter(torch.ones(cfg.n_heads, cfg.head_dim))
        if kind == "rattention":
            self.norm_rla = nn.Parameter(torch.full((cfg.n_heads, cfg.head_dim), cfg.rla_norm_init))

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.use_rope:
            return None
        dtype = torch.float64 if self.cfg.dtype == "float64" else torch.float32  # cast to q/k's dtype on use
        return rope_cos_sin(positions, self.head_dim, self.cfg.rope_theta, dtype)

    # q/k for the softmax branch: QK-norm, then RoPE (cos, sin at the absolute positions of x's rows).
    def _softmax_qk(self, x: torch.Tensor, norm: RMSNorm | None,
                    rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        if norm is not None:
            x = norm(x)
        if self.use_rope:
            cos, sin = rope
            x = apply_rope(x, cos.to(x.dtype), sin.to(x.dtype))
        return x

    def _project(self, x: torch.Tensor):
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        return q, k, v

    def forward(self, x: torch.Tensor, cache: GlobalCache | LocalCache | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The parallel pass over positions 0..T-1, filling an empty ``cache`` when given. ``rope``: cos,
        sin for positions 0..T-1 (the model computes them once for all layers)."""
        b, t, _ = x.shape
        q_raw, k_raw, v = self._project(x)
        if self.use_rope and rope is None:
            rope = self._rope(torch.arange(t, device=x.device))
        q = self._softmax_qk(q_raw, self.q_norm, rope)
        k = self._softmax_qk(k_raw, self.k_norm, rope)
        if self.kind == "rattention":
            o = kernels.rattention(q, k, q_raw, k_raw, v, self.window, self.norm_swa, self.norm_rla,
                                   self.cfg.feature_map, self.cfg.norm_eps, chunk=self.cfg.rla_chunk)
        elif self.output_norm:
            o = kernels.normed_attention(q, k, v, self.window, self.norm_swa, self.cfg.norm_eps)
        else:
            o = kernels.attention(q, k, v, self.window)
        if isinstance(cache, GlobalCache):
            cache.prefill(k, v)
        elif cache is not None:
            cache.prefill(k, k_raw, v, self.cfg.feature_map)
        return self.wo(o.transpose(1, 2).reshape(b, t, -1))

    def decode_step(self, x: torch.Tensor, cache: GlobalCache | LocalCache, at: StepAngles) -> torch.Tensor:
        """One token (B, 1, d) at position ``at.pos`` against the cache, which it extends in place.
        Fixed shapes, no host sync: it can be captured in a CUDA graph."""
        b = x.shape[0]
        q_raw, k_raw, v = self._project(x)
        q = self._softmax_qk(q_raw, self.q_norm, at.rope)
        k = self._softmax_qk(k_raw, self.k_norm, at.rope)
        if isinstance(cache, GlobalCache):
            cache.write(at.pos, k, v)
            o = kernels.attention_decode(q, cache.k, cache.v, cache.valid(at.pos))
            return self.wo(o.transpose(1, 2).reshape(b, 1, -1))
        rla = self.kind == "rattention"
        o = kernels.local_decode(
            q[:, :, 0], k[:, :, 0], v[:, :, 0], cache.k, cache.v, at.pos,
            self.norm_swa if self.output_norm else None, self.cfg.norm_eps, fused=self.fused_decode,
            q_raw=q_raw[:, :, 0] if rla else None, k_raw=k_raw[:, :, 0] if rla else None,
            state=cache.state, w_rla=self.norm_rla if rla else None, phi=self.cfg.feature_map,
            k_raw_ring=cache.k_raw, rope_leaving=at.rope_leaving)
        return self.wo(o.reshape(b, 1, -1))


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.hidden, bias=False)
        self.w3 = nn.Linear(cfg.d_model, cfg.hidden, bias=False)
        self.w2 = nn.Linear(cfg.hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, kind: str):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, kind)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cache=None, rope=None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cache, rope)
        return x + self.mlp(self.mlp_norm(x))

    def decode_step(self, x: torch.Tensor, cache: GlobalCache | LocalCache, at: StepAngles) -> torch.Tensor:
        x = x + self.attn.decode_step(self.attn_norm(x), cache, at)
        return x + self.mlp(self.mlp_norm(x))


class LM(nn.Module):
    """Decoder-only language model over token ids."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, kind) for kind in cfg.layer_kinds())
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()
        self.to(cfg.torch_dtype)

    def reset_parameters(self) -> None:
        """Llama-style init: N(0, std) weights, residual output projections scaled by 1/sqrt(2 n_layers)."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, 0.0, out_std)
            elif p.dim() == 2 and not name.endswith(("norm_swa", "norm_rla")):
                nn.init.normal_(p, 0.0, std)

    def forward(self, tokens: torch.Tensor, cache: ModelCache | None = None,
                logits: Literal["all", "last"] = "all") -> torch.Tensor:
        """Logits (B, T, V) for tokens (B, T), or with ``logits="last"`` only the last position's (B, 1, V).
        With a cache: an empty one is filled in one parallel pass; a filled one is extended one
        ``decode_step`` per token."""
        if logits not in ("all", "last"):
            raise ValueError(f"logits: expected 'all' or 'last', got {logits!r}")
        if cache is not None and cache.length > 0:
            return self._extend(tokens, cache, logits)
        x = self.embed(tokens)
        rope = None
        attn = next((blk.attn for blk in self.blocks if blk.attn.use_rope), None)
        if attn is not None:  # one parallel pass: the same angles serve every layer
            rope = attn._rope(torch.arange(tokens.shape[1], device=tokens.device))
        if cache is not None:
            cache.ensure(tokens.shape[1])
        for i, block in enumerate(self.blocks):
            x = block(x, None if cache is None else cache.layers[i], rope)
        if cache is not None:
            cache.length = tokens.shape[1]
            cache.pos.fill_(tokens.shape[1])
        if logits == "last":
            x = x[:, -1:]
        return self.lm_head(self.norm(x))

    def _extend(self, tokens: torch.Tensor, cache: ModelCache, logits: str) -> torch.Tensor:
        """Step a filled cache through ``tokens`` one static decode step at a time."""
        cache.ensure(cache.length + tokens.shape[1])
        out = []
        for i in range(tokens.shape[1]):
            out.append(self.decode_step(tokens[:, i : i + 1], cache))
            cache.length += 1
        return out[-1] if logits == "last" else torch.cat(out, dim=1)

    def step_angles(self, pos: torch.Tensor) -> StepAngles:
        """RoPE angles one decode step shares across layers: at ``pos``, and at pos-w-1 for the key that
        leaves a local window when it must be un-rotated (RAttention without QK-norm)."""
        attn = next((blk.attn for blk in self.blocks if blk.attn.use_rope), None)
        rope = rope_leaving = None
        if attn is not None:  # q and k rotate in the model's dtype (as in the parallel pass), cast once here
            rope = tuple(x.to(self.cfg.torch_dtype) for x in attn._rope(pos.view(1)))
            if any(blk.attn.kind == "rattention" for blk in self.blocks) and not self.cfg.qk_norm:
                rope_leaving = attn._rope(pos.view(1) - (self.cfg.window + 1))
        return StepAngles(pos, rope, rope_leaving)

    @torch.no_grad()
    def decode_step(self, token: torch.Tensor, cache: ModelCache) -> torch.Tensor:
        """The static decode step: logits (B, 1, V) for ``token`` (B, 1) at position ``cache.pos``, then
        ``cache.pos`` advances by one. Fixed shapes and no host sync, so it can be captured in a CUDA graph;
        the host counter ``cache.length`` is the caller's to advance (``forward`` and
        ``rattention.generate``'s steppers do). The global buffers must have room (``cache.ensure``)."""
        at = self.step_angles(cache.pos)
        x = self.embed(token)
        for block, layer in zip(self.blocks, cache.layers, strict=True):
            x = block.decode_step(x, layer, at)
        cache.pos.add_(1)
        return self.lm_head(self.norm(x))

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if exclude_embedding else n

    def new_cache(self, batch: int, capacity: int | None = None) -> ModelCache:
        """An empty decoding cache: global layers hold ``capacity`` positions (None: grow to the length),
        local layers keep w+1 keys (+ RLA state)."""
        return ModelCache.empty(self.cfg, batch, device=self.embed.weight.device, capacity=capacity)


def count_params(cfg: ModelConfig, exclude_embedding: bool = False) -> int:
    """Parameter count from the config alone (equals ``LM(cfg).num_params()``)."""
    d, hd = cfg.d_model, cfg.head_dim
    attn = d * cfg.n_heads * hd * 2 + d * cfg.n_kv_heads * hd * 2 + (2 * hd if cfg.qk_norm else 0)
    total = 0
    for kind in cfg.layer_kinds():
        extra = 0
        if kind == "rattention":
            extra = 2 * cfg.n_heads * hd
        elif kind == "swa" and cfg.swa_output_norm:
            extra = cfg.n_heads * hd
        total += attn + extra + 3 * d * cfg.hidden + 2 * d
    emb = cfg.vocab_size * d
    total += d + (0 if cfg.tie_embeddings else emb)
    return total if exclude_embedding else total + emb
