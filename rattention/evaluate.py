"""Evaluation of a trained model (no Ray): quality, long context and efficiency, under canonical names.

- Quality: validation loss in nats per token, and that loss by position bucket ([0,64), [64,256),
  [256,T) by default), which shows what a window loses.
- Copy at distance: a held-out text span A, filler, then A again, with A's second copy starting
  ``d`` tokens after its first; the loss on the second copy (its first token excluded, it cannot be
  known) at distances below and above the window.
- Synthetic tasks (``rattention.tasks``) at the training length and multiples of it: answer accuracy
  and the mean loss on the answer tokens, scored where the evidence lies outside the window (or on
  every answer, with fixed ``eval.task_params``).
- Efficiency: parameters, training and decoding tokens/s, peak memory, decoding-cache bytes at
  {T, 4T, 32768} from ``rattention.cache.cache_bytes``, and MFU on GPU.

``rattention eval RUN_OR_CHECKPOINT`` runs it on a run folder or a checkpoint file.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rattention import metrics as M
from rattention.cache import cache_bytes
from rattention.checkpoint import STATE_FILE, load_checkpoint
from rattention.data import loader_for, read_manifest
from rattention.errors import DataError
from rattention.model import LM, count_params
from rattention.run_config import RunConfig, parse_run_config
from rattention.rundir import RunDir
from rattention.runtime import autocast, peak_memory_bytes, pick_device

Model = Callable[[torch.Tensor], torch.Tensor]  # tokens (B, T) -> logits (B, T, V)

# Dense bf16 peak FLOP/s by GPU name fragment, for MFU.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


# ----- quality ----------------------------------------------------------------------------------------

@torch.no_grad()
def position_losses(model: Model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token loss and target count per input position t (predicting token t+1)."""
    total = count = None
    for inputs, targets in batches:
        inputs, targets = inputs.to(device), targets.to(device)
        logits = model(inputs).float()
        loss = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
        valid = (targets != -100).to(torch.float64)
        s, c = (loss.double() * valid).sum(0), valid.sum(0)
        total = s if total is None else total + s
        count = c if count is None else count + c
    if total is None:
        raise DataError("validation split: no batches to evaluate")
    return total.cpu(), count.cpu()


def bucket_losses(total: torch.Tensor, count: torch.Tensor, buckets: list[int]) -> dict[str, float]:
    """Mean loss overall and per position bucket [b_i, b_{i+1}); the last bucket runs to the end."""
    T = len(total)
    out = {M.VAL_LOSS: float(total.sum() / count.sum().clamp(min=1))}
    edges = [b for b in buckets if b < T]
    for i, lo in enumerate(edges):
        hi = edges[i + 1] if i + 1 < len(edges) else None
        sl = slice(lo, hi if hi is not None else T)
        out[M.val_loss_bucket(lo, hi)] = float(total[sl].sum() / count[sl].sum().clamp(min=1))
    return out


# ----- copy at distance -------------------------------------------------------------------------------

def copy_sequences(stream: torch.Tensor, distance: int, span: int, samples: int) -> torch.Tensor:
    """(samples, distance + span) sequences ``A F A``: span A, filler F of ``distance - span`` tokens, A.

    A and F come from disjoint stretches of a held-out token stream, so only the first copy tells the
    model what comes next.
    """
    span = min(span, distance)
    need = samples * distance
    if len(stream) < need:
        reps = need // max(1, len(stream)) + 1
        stream = stream.repeat(reps)
    rows = []
    for i in range(samples):
        base = i * distance
        a = stream[base : base + span]
        f = stream[base + span : base + distance]
        rows.append(torch.cat([a, f, a]))
    return torch.stack(rows)


@torch.no_grad()
def copy_loss(model: Model, seqs: torch.Tensor, distance: int, device: torch.device | str = "cpu") -> float:
    """Mean loss on the second copy's tokens 1.. of ``A F A`` sequences (first copy at 0, second at d)."""
    seqs = seqs.to(device)
    span = seqs.shape[1] - distance
    logits = model(seqs[:, :-1]).float()
    targets = seqs[:, 1:]
    pos = torch.arange(distance, distance + span - 1, device=seqs.device)  # predicts tokens d+1 .. d+span-1
    loss = F.cross_entropy(logits[:, pos].transpose(1, 2), targets[:, pos], reduction="mean")
    return float(loss)


def copy_distances(cfg: RunConfig) -> list[int]:
    """The configured distances, or half the window and twice it (below and above the window)."""
    if cfg.eval.copy_distances is not None:
        return list(cfg.eval.copy_distances)
    w = cfg.model.window
    return sorted({max(2, w // 2), max(4, 2 * w)})


# ----- synthetic tasks --------------------------------------------------------------------------------

def _task_params(task: str, window: int) -> dict[str, Any]:
    """Place evidence far back: MQAR gap past the window, the copy's span + gap past it, needles/chains in the
    first half."""
    return {"mqar": {"gap": window + 1, "num_pairs": 4}, "copy": {"span": 16, "gap": max(0, window + 1 - 16)},
            "niah": {"depth": 0.1}, "passkey": {"depth": 0.1}, "vt": {"depth": (0.0, 0.3)}}.get(task, {})


@torch.no_grad()
def task_scores(model: Model, tokens: torch.Tensor, answer_pos: list[np.ndarray],
                device: torch.device | str = "cpu", batch_size: int = 16) -> tuple[float, float]:
    """Accuracy (greedy, teacher forced) and mean loss in nats over the answer tokens of ``tokens``'s rows;
    row b's answers sit at ``answer_pos[b]``, each predicted from the tokens before it."""
    hit = n = 0
    loss = 0.0
    for lo in range(0, len(tokens), batch_size):
        chunk = tokens[lo : lo + batch_size].to(device)
        logits = model(chunk[:, :-1]).float()
        for b, pos in enumerate(answer_pos[lo : lo + batch_size]):
            p = torch.as_tensor(pos, device=chunk.device) - 1
            at, want = logits[b, p], chunk[b, p + 1]
            hit += int((at.argmax(-1) == want).sum())
            loss += float(F.cross_entropy(at, want, reduction="sum"))
            n += len(pos)
    return hit / max(1, n), loss / max(1, n)


def task_accuracy(model: Model, tokens: torch.Tensor, answer_pos: list[np.ndarray],
                  device: torch.device | str = "cpu") -> float:
    """Fraction of answer tokens the model predicts exactly (greedy, teacher forced)."""
    return task_scores(model, tokens, answer_pos, device)[0]


def task_metrics(model: Model, cfg: RunConfig, eos_id: int, device: torch.device | str = "cpu",
                 vocab_size: int | None = None) -> dict[str, float]:
    """Accuracy and answer loss on each configured task at each configured multiple of the training length,
    with token ids from ``vocab_size`` (the dataset's, so that a model trained on a task sees its ids;
    default the model's vocabulary)."""
    from rattention import tasks

    out: dict[str, float] = {}
    vocab = tasks.TaskVocab(vocab_size or cfg.model.vocab_size, reserved=(eos_id,))
    w = cfg.model.window
    for task in cfg.eval.tasks:
        fixed = cfg.eval.task_params.get(task)
        for mult in cfg.eval.task_lengths:
            length = mult * cfg.seq_len
            samples = list(tasks.generate(task, vocab, length, seed=1234, start=0, stop=cfg.eval.task_samples,
                                          **(fixed if fixed is not None else _task_params(task, w))))
            scored = []
            for s in samples:
                far = s.answer_pos[(s.answer_pos - 1 - s.source_pos) > w]
                scored.append(s.answer_pos if fixed is not None or not len(far) else far)
            toks = torch.from_numpy(np.stack([s.tokens for s in samples])).long()
            acc, loss = task_scores(model, toks, scored, device)
            out[M.task_accuracy(task, length)], out[M.task_loss(task, length)] = acc, loss
    return out


# ----- efficiency -------------------------------------------------------------------------------------

@torch.no_grad()
def decode_tokens_per_s(model: LM, prompt: torch.Tensor, new_tokens: int) -> float:
    """Greedy decoding speed with the cache, prefill excluded (batch of ``prompt``'s rows)."""
    cache = model.new_cache(prompt.shape[0])
    nxt = model(prompt, cache)[:, -1:].argmax(-1)
    if prompt.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        nxt = model(nxt, cache)[:, -1:].argmax(-1)
    if prompt.device.type == "cuda":
        torch.cuda.synchronize()
    return prompt.shape[0] * new_tokens / max(1e-9, time.perf_counter() - t0)


def train_flops_per_token(cfg: RunConfig) -> float:
    """6 N (non-embedding matmuls) plus attention scores and values: 12 L d_head*H * context seen."""
    n = count_params(cfg.model, exclude_embedding=True) + cfg.model.vocab_size * cfg.model.d_model
    attn = 0.0
    T = cfg.seq_len
    for kind in cfg.model.layer_kinds():
        ctx = (T + 1) / 2 if kind == "global" else min(cfg.model.window + 1, (T + 1) / 2)
        attn += 12 * cfg.model.n_heads * cfg.model.head_dim * ctx
    return 6.0 * n + attn


def mfu(cfg: RunConfig, tokens_per_s: float, device: torch.device) -> float | None:
    """Model FLOP utilisation against the GPU's dense bf16 peak (None off GPU or for an unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    return None if peak is None else tokens_per_s * train_flops_per_token(cfg) / peak


def efficiency(cfg: RunConfig, model: LM | None = None, device: torch.device | str = "cpu",
               train_tokens_per_s: float | None = None, train_peak_memory: int | None = None) -> dict[str, float]:
    """Params, cache bytes at {T, 4T, 32768}, and (when given a model) decode tokens/s."""
    device = torch.device(device)
    out = {M.PARAMS: float(count_params(cfg.model)),
           M.PARAMS_NON_EMBEDDING: float(count_params(cfg.model, exclude_embedding=True))}
    for ctx in sorted({cfg.seq_len, 4 * cfg.seq_len, 32768}):
        out[M.cache_bytes_at(ctx)] = float(cache_bytes(cfg.model, ctx))
    if train_tokens_per_s:
        out[M.TRAIN_THROUGHPUT] = float(train_tokens_per_s)
        m = mfu(cfg, train_tokens_per_s, device)
        if m is not None:
            out[M.MFU] = m
    if model is not None and cfg.eval.decode_tokens > 0:
        prompt = torch.randint(0, cfg.model.vocab_size, (1, min(64, cfg.seq_len)), device=device,
                               generator=torch.Generator(device=device).manual_seed(0))
        out[M.DECODE_THROUGHPUT] = decode_tokens_per_s(model, prompt, cfg.eval.decode_tokens)
    out[M.PEAK_MEMORY] = float(max(train_peak_memory or 0, peak_memory_bytes(device)))
    return out


# ----- everything --------------------------------------------------------------------------------------

def _val_batches(cfg: RunConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader = loader_for(cfg, cfg.data.val_split, rank=0, world=1, infinite=False)
    out = []
    for i, batch in enumerate(loader):
        if i >= cfg.eval.val_batches:
            break
        out.append(batch)
    return out


def evaluate(model: LM, cfg: RunConfig, train_tokens_per_s: float | None = None,
             train_peak_memory: int | None = None) -> dict[str, float]:
    """Every evaluation metric of ``model`` on ``cfg``'s validation split, by canonical name."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()

    def fwd(x: torch.Tensor) -> torch.Tensor:
        with autocast(device):
            return model(x)

    try:
        batches = _val_batches(cfg)
        total, count = position_losses(fwd, batches, device)
        out = bucket_losses(total, count, cfg.eval.buckets)
        stream = torch.cat([x[0].flatten() for x in batches]) if batches else torch.zeros(0, dtype=torch.long)
        for d in copy_distances(cfg):
            seqs = copy_sequences(stream, d, cfg.eval.copy_span, cfg.eval.copy_samples)
            out[M.copy_loss(d)] = copy_loss(fwd, seqs, d, device)
        if cfg.eval.tasks:
            manifest = read_manifest(cfg.data.path)
            out.update(task_metrics(fwd, cfg, int(manifest["eos_id"]), device, manifest.get("vocab_size")))
        out.update(efficiency(cfg, model, device, train_tokens_per_s, train_peak_memory))
    finally:
        model.train(was_training)
    return out


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[RunConfig, LM, dict[str, Any]]:
    """A model from a run folder (its newest checkpoint), a checkpoint file, or a Ray checkpoint folder."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such run folder or checkpoint")
    if p.is_dir() and (p / STATE_FILE).is_file():
        p = p / STATE_FILE
    elif p.is_dir() and RunDir(p).exists():
        latest = RunDir(p).latest_checkpoint()
        if latest is None:
            raise DataError(f"{p}: run folder has no checkpoints (checkpoints/ or Ray Train's ray/)")
        p = latest
    elif p.is_dir():
        raise DataError(f"{p}: neither a run folder (config.yaml) nor a checkpoint folder ({STATE_FILE})")
    state = load_checkpoint(p, map_location="cpu")
    cfg = parse_run_config(state["config"])
    model = LM(cfg.model)
    model.load_state_dict(state["model"])
    return cfg, model.to(device), state


def evaluate_path(path: str | Path, overrides: list[str] | None = None,
                  device: str = "auto") -> tuple[RunConfig, dict[str, float], dict[str, Any]]:
    """Evaluate a run folder or checkpoint; ``overrides`` (e.g. ``data.path=...``) adjust its config."""
    from rattention.run_config import apply_overrides
    dev = pick_device(device)
    cfg, model, state = load_model(path, dev)
    if overrides:
        cfg = parse_run_config(apply_overrides(cfg.to_dict(), overrides))
    results = evaluate(model, cfg)
    results["step"] = float(state["step"])
    return cfg, results, state


