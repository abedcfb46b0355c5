"""Generation with the decoding cache: one parallel prefill pass (last position's logits only), then one
static decode step per token, run eagerly or replayed from a CUDA graph."""

from __future__ import annotations

import torch

from rattention.cache import ModelCache
from rattention.model import LM


class EagerStep:
    """``model.decode_step`` called directly: logits (B, 1, V) for a token (B, 1); advances the cache."""

    def __init__(self, model: LM, cache: ModelCache):
        self.model, self.cache = model, cache

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        logits = self.model.decode_step(token, self.cache)
        self.cache.length += 1
        return logits


class GraphStep:
    """``model.decode_step`` captured once in a CUDA graph over a reserved cache and replayed per token.

    The first ``warmup`` calls are real steps run eagerly on a side stream (the warm-up CUDA graphs need
    before capture); the next call captures the step and every call from then on replays it. A call
    returns the graph's static logits (B, 1, V), overwritten by the next call.
    """

    def __init__(self, model: LM, cache: ModelCache, warmup: int = 2):
        if not cache.pos.is_cuda:
            raise ValueError("cuda_graph: needs the model and cache on a CUDA device")
        if cache.capacity is None:
            raise ValueError("cuda_graph: needs a reserved cache (new_cache(batch, capacity=...))")
        self.model, self.cache, self.warmup = model, cache, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.token = self.logits = None
        self.stream = torch.cuda.Stream()

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        self.cache.ensure(self.cache.length + 1)
        if self.graph is None and self.warmup > 0:
            self.warmup -= 1
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                logits = self.model.decode_step(token, self.cache)
            torch.cuda.current_stream().wait_stream(self.stream)
        else:
            if self.graph is None:
                self._capture(token)
            self.token.copy_(token)
            self.graph.replay()
            logits = self.logits
        self.cache.length += 1
        return logits

    def _capture(self, token: torch.Tensor) -> None:
        """Record one step; capture runs nothing, so the cache is untouched until the first replay."""
        self.token = token.clone()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.model.decode_step(self.token, self.cache)


def make_step(model: LM, cache: ModelCache, cuda_graph: bool | None = None) -> EagerStep | GraphStep:
    """The decode stepper: a CUDA graph on CUDA by default (``cuda_graph=None``), else eager."""
    if cuda_graph is None:
        cuda_graph = cache.pos.is_cuda and cache.capacity is not None
    return GraphStep(model, cache) if cuda_graph else EagerStep(model, cache)


@torch.no_grad()
def stepwise_logits(model: LM, tokens: torch.Tensor, prefill: int = 0, static: bool = False,
                    cuda_graph: bool = False) -> torch.Tensor:
    """Logits (B, T, V) for ``tokens`` computed through the cache: the first ``prefill`` tokens in
    one parallel pass, the rest one step at a time. Equals ``model(tokens)`` (the tests check it).

    ``static=False`` steps through ``model(token, cache)`` over an unreserved cache; ``static=True``
    reserves T positions and calls the static step (``cuda_graph``: replayed from a CUDA graph)."""
    t = tokens.shape[1]
    cache = model.new_cache(tokens.shape[0], capacity=t if static else None)
    step = make_step(model, cache, cuda_graph) if static else None
    out = []
    if prefill > 0:
        out.append(model(tokens[:, :prefill], cache))
    for i in range(prefill, t):
        token = tokens[:, i : i + 1]
        out.append(step(token).clone() if static else model(token, cache))
    return torch.cat(out, dim=1)


@torch.no_grad()
def generate(
    model: LM,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    cuda_graph: bool | None = None,
) -> torch.Tensor:
    """Continue ``prompt`` (B, P) by ``max_new_tokens``; greedy at temperature 0, else sampled.

    The cache is reserved for P + max_new_tokens positions; prefill computes only the last position's
    logits; each new token is one static decode step (a CUDA graph on CUDA unless ``cuda_graph=False``)."""
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt: expected a non-empty (batch, length) tensor, got shape {tuple(prompt.shape)}")
    cache = model.new_cache(prompt.shape[0], capacity=prompt.shape[1] + max(max_new_tokens, 1))
    logits = model(prompt, cache, logits="last")[:, -1]
    step = make_step(model, cache, cuda_graph)
    out = [prompt]
    for i in range(max_new_tokens):
        nxt = _sample(logits.float(), temperature, top_k, generator)
        out.append(nxt)
        if i + 1 < max_new_tokens:
            logits = step(nxt)[:, -1]
    return torch.cat(out, dim=1)


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
