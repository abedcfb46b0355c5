"""Generation with the decoding cache: one parallel prefill pass, then one token per step."""

from __future__ import annotations

import torch

from rattention.model import LM


@torch.no_grad()
def stepwise_logits(model: LM, tokens: torch.Tensor, prefill: int = 0) -> torch.Tensor:
    """Logits (B, T, V) for ``tokens`` computed through the cache: the first ``prefill`` tokens in
    one parallel pass, the rest one step at a time. Equals ``model(tokens)`` (the tests check it)."""
    cache = model.new_cache(tokens.shape[0])
    out = []
    if prefill > 0:
        out.append(model(tokens[:, :prefill], cache))
    for t in range(prefill, tokens.shape[1]):
        out.append(model(tokens[:, t : t + 1], cache))
    return torch.cat(out, dim=1)


@torch.no_grad()
def generate(
    model: LM,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Continue ``prompt`` (B, P) by ``max_new_tokens``; greedy at temperature 0, else sampled."""
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt: expected a non-empty (batch, length) tensor, got shape {tuple(prompt.shape)}")
    cache = model.new_cache(prompt.shape[0])
    logits = model(prompt, cache)[:, -1]
    out = [prompt]
    for _ in range(max_new_tokens):
        nxt = _sample(logits.float(), temperature, top_k, generator)
        out.append(nxt)
        logits = model(nxt, cache)[:, -1]
    return torch.cat(out, dim=1)


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
