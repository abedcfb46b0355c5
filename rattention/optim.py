"""The optimizer component: AdamW with weight decay on matrices only, linear warmup then cosine decay."""

from __future__ import annotations

import math

import torch
from torch import nn

from rattention.run_config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on projection and embedding matrices, none on norm scales (including
    RAttention's per-head (H, D) output-norm scales, which are 2-D but scales all the same)."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied embeddings appear once
            continue
        seen.add(id(p))
        is_scale = p.dim() < 2 or name.rsplit(".", 1)[-1].startswith("norm_")
        (no_decay if is_scale else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # on CUDA the fused kernel updates every tensor in a few launches; elsewhere torch's default
    fused = True if all(p.is_cuda for p in decay + no_decay) else None
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=fused)


class WarmupCosine:
    """LR multiplier at a step: (step+1)/warmup during warmup, then cosine from 1 down to ``min_ratio``.

    A plain callable object (ints and floats only), so a scheduler's state dict stays loadable with
    ``torch.load(weights_only=True)``.
    """

    def __init__(self, warmup: int, total: int, min_ratio: float):
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        span = max(1, self.total - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LambdaLR over ``WarmupCosine``; call ``.step()`` once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio))
