"""The training loop: plain torch, one process or many under ``torch.distributed`` (DDP).

The loop is short because each concern is a component it calls: the packed loader
(``rattention.data``), the optimizer and LR schedule (``rattention.optim``), the checkpoint policy and
store (``rattention.checkpoint``), metric logging with lagged reads, the NaN check, sinks and progress
(``rattention.logger``), and fault injection (``rattention.faults``). Device and process-group set-up
live in ``rattention.runtime``. A whole run (its folder, tracking, evaluation and status) is
``rattention.lifecycle``'s; this module only trains.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from rattention import metrics as M
from rattention.checkpoint import FORMAT, Checkpointer, CheckpointPolicy, capture_rng, restore_rng
from rattention.data import dataset_vocab, loader_for
from rattention.errors import ConfigError, TrainingError
from rattention.faults import Faults
from rattention.logger import Sink, TrainLogger
from rattention.model import LM
from rattention.optim import build_optimizer, build_scheduler
from rattention.run_config import RunConfig, TrainConfig
from rattention.runtime import autocast, peak_memory_bytes, pick_device, rank_world, say


@dataclass
class TrainResult:
    """What a training session ended with (rank 0's view; loss is averaged over ranks)."""

    step: int
    tokens: int
    loss: float
    tokens_per_s: float
    resumed_from: int | None
    losses: dict[int, float] = field(default_factory=dict)  # every step of this session
    peak_memory_bytes: int = 0
    stopped_early: bool = False


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in nats, padding targets (-100) ignored."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)


def check_vocab(cfg: RunConfig) -> None:
    """The model's vocabulary must hold every id of the dataset."""
    vocab = dataset_vocab(cfg.data.path)
    if vocab is not None and vocab > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size: must be >= the dataset's vocab size ({vocab}), "
                          f"got {cfg.model.vocab_size}")


# ----- one step ---------------------------------------------------------------------------------------

def wrap_model(raw: nn.Module, tc: TrainConfig, device: torch.device, world: int) -> nn.Module:
    """The module the loop calls: ``raw`` compiled when ``train.compile``, in DDP when world > 1."""
    model: nn.Module = torch.compile(raw) if tc.compile else raw
    if world > 1:
        # gradients live in the all-reduce buckets: no copy into and out of them each step
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                    else None, gradient_as_bucket_view=True)
    return model


def train_step(model: nn.Module, raw: nn.Module, opt: torch.optim.Optimizer, sched: Any, data: Iterator,
               tc: TrainConfig, device: torch.device, poison: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over ``tc.grad_accum`` micro-batches from ``data``; gradients all-reduced once.

    Queues everything and returns the (rank-averaged) loss and the gradient norm as device tensors,
    with no host sync: the caller reads them. ``poison`` multiplies the loss by NaN (fault injection).
    """
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    loss_sum = torch.zeros((), device=device)
    for micro in range(tc.grad_accum):
        inputs, targets = next(data)
        if device.type == "cuda":  # a copy from pageable memory would first wait for the GPU to drain
            inputs, targets = inputs.pin_memory(), targets.pin_memory()
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        sync = world == 1 or micro == tc.grad_accum - 1
        ctx = contextlib.nullcontext() if sync else model.no_sync()
        with ctx, autocast(device):
            loss = lm_loss(model(inputs), targets) / tc.grad_accum
            if poison:
                loss = loss * float("nan")
            loss.backward()
        loss_sum += loss.detach()
    if world > 1:
        dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
    max_norm = tc.grad_clip if tc.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), max_norm)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return loss_sum, grad_norm


# ----- the loop ---------------------------------------------------------------------------------------

def train(
    cfg: RunConfig,
    checkpointer: Checkpointer | None = None,
    sinks: list[Sink] | None = None,
    stop_after: int | None = None,
    faults: Faults | None = None,
    progress: bool = True,
) -> tuple[nn.Module, TrainResult]:
    """Train ``cfg`` to ``train.steps`` optimizer steps, resuming from ``checkpointer``'s latest state.

    ``stop_after`` ends the session early after that step (with a checkpoint), as a preemption would.
    NaN or inf loss raises TrainingError naming the step. Returns the (unwrapped) model and the result.
    """
    tc = cfg.train
    rank, world = rank_world()
    device = pick_device(tc.device)
    faults = faults or Faults()
    check_vocab(cfg)

    torch.manual_seed(tc.seed)  # the same initial weights on every rank
    raw = LM(cfg.model).to(device)
    opt = build_optimizer(raw, tc)
    sched = build_scheduler(opt, tc)
    loader = loader_for(cfg, cfg.data.train_split, rank, world)
    batch_tokens = cfg.data.batch_size * cfg.seq_len * tc.grad_accum * world
    log = TrainLogger(list(sinks or []) if rank == 0 else [], tc.steps, tc.log_every, batch_tokens, device,
                      lr_hint=tc.lr, system_metrics=cfg.tracking.system_metrics, progress=progress and rank == 0)
    step, tokens = restore(checkpointer, raw, opt, sched, loader, world)
    resumed_from = step if step else None
    if resumed_from is not None:
        log.emit(step, {M.TRAIN_RESUMED_AT: float(step)})
        if progress and rank == 0:
            say(f"resumed from step {step}")
    model = wrap_model(raw, tc, device, world)
    policy = CheckpointPolicy(tc.checkpoint_every, tc.steps)
    data: Iterator = iter(loader)
    stopped_early = False
    model.train()
    while step < tc.steps:
        faults.maybe_crash(step + 1, rank)
        lr = opt.param_groups[0]["lr"]
        loss, grad_norm = train_step(model, raw, opt, sched, data, tc, device, poison=faults.poison(step + 1))
        step += 1
        tokens += batch_tokens
        stopping = stop_after is not None and stop_after <= step < tc.steps
        save = checkpointer is not None and policy.due(step, stopping)
        log.record(step, loss, grad_norm, lr, tokens, read_all=save)  # raises on NaN, before any save
        if save:
            state = training_state(cfg, raw, opt, sched, loader, step, tokens)  # a collective: every rank
            checkpointer.save(step, state if rank == 0 else None, {M.TRAIN_LOSS: log.last_loss, "step": float(step)})
        if stopping:
            stopped_early = True
            break
    return raw, TrainResult(step=step, tokens=tokens, loss=log.last_loss, tokens_per_s=log.tokens_per_s(),
                            resumed_from=resumed_from, losses=log.losses,
                            peak_memory_bytes=peak_memory_bytes(device), stopped_early=stopped_early)


def restore(checkpointer: Checkpointer | None, model: nn.Module, opt: torch.optim.Optimizer, sched: Any,
            loader: Any, world: int) -> tuple[int, int]:
    """Load the newest checkpoint into the components; return (step, tokens), (0, 0) when there is none."""
    state = checkpointer.load_latest() if checkpointer is not None else None
    if state is None:
        return 0, 0
    if state.get("world_size") != world:
        raise TrainingError(f"checkpoint at step {state['step']}: saved with {state.get('world_size')} "
                            f"ranks, resuming with {world}; the data positions would not line up")
    rank, _ = rank_world()
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    loader.load_state_dict(state["loader"][rank])
    restore_rng(state["rng"][rank])
    return int(state["step"]), int(state["tokens"])


def training_state(cfg: RunConfig, model: nn.Module, opt: torch.optim.Optimizer, sched: Any, loader: Any,
                   step: int, tokens: int) -> dict[str, Any]:
    """The checkpoint dict; every rank's loader position and RNG state are gathered to rank 0."""
    rank, world = rank_world()
    mine = {"loader": loader.state_dict(), "rng": capture_rng()}
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, mine)
    else:
        gathered = [mine]
    return {
        "format": FORMAT,
        "step": step,
        "tokens": tokens,
        "world_size": world,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "loader": [g["loader"] for g in gathered],
        "rng": [g["rng"] for g in gathered],
        "config": cfg.to_dict(),
    }
