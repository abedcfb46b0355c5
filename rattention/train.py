"""The training loop: plain torch, one process or many under ``torch.distributed`` (DDP).

The loop composes small components: the data loader (``rattention.data``), the optimizer and LR
schedule (``rattention.optim``), checkpoints (``rattention.checkpoint``) and metrics sinks (callables
``sink(step, metrics)``: the run folder's JSON lines, MLflow in the Ray job). Without Ray::

    python -m rattention.train CONFIG.yaml [key=value ...]            # one process
    torchrun --nproc-per-node 2 -m rattention.train CONFIG.yaml ...   # DDP

writes a run folder (``rattention.rundir``) that ``rattention import-run`` logs into MLflow later.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from rattention import metrics as M
from rattention.checkpoint import FORMAT, Checkpointer, LocalCheckpointer, capture_rng, restore_rng
from rattention.errors import ConfigError, TrainingError
from rattention.model import LM
from rattention.optim import build_optimizer, build_scheduler
from rattention.run_config import RunConfig, TrainConfig

Sink = Callable[[int, dict[str, float]], None]


@dataclass
class Faults:
    """Fault injection for tests of the failure paths: a NaN loss at a step, or a process that dies once.

    ``crash_marker`` makes the crash happen once: the process creates the file, then exits; a
    restarted process sees the file and carries on.
    """

    nan_at_step: int | None = None
    crash_at_step: int | None = None
    crash_marker: str | None = None
    crash_rank: int = 0
    crash_delay_s: float = 0.0  # wait before dying, e.g. for a supervisor to collect the last report

    def maybe_crash(self, step: int, rank: int) -> None:
        if self.crash_at_step is None or step != self.crash_at_step or rank != self.crash_rank:
            return
        marker = Path(self.crash_marker or "")
        if self.crash_marker and marker.exists():
            return
        if self.crash_marker:
            marker.write_text(f"crashed at step {step}\n")
        time.sleep(self.crash_delay_s)
        os._exit(1)


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


# ----- environment ----------------------------------------------------------------------------------

def rank_world() -> tuple[int, int]:
    """(rank, world size) of torch.distributed, or (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: torch.device) -> None:
    """Join the process group torchrun describes (WORLD_SIZE > 1): NCCL bound to this rank's GPU, else gloo.

    Binding the device matters: without it every rank's first collective runs on GPU 0 and NCCL
    refuses ("Duplicate GPU detected").
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")


def pick_device(name: str) -> torch.device:
    """``auto``: this rank's GPU when CUDA is present, else the CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda requested but no CUDA device is available; use cpu or auto")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", "0")) % max(1, torch.cuda.device_count())
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def say(line: str) -> None:
    """A progress line on stdout, written directly: in a Ray Train worker ``print`` is patched to go to
    both stdout and Train's logger, and every line reached the driver twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def peak_memory_bytes(device: torch.device) -> int:
    """Peak CUDA memory allocated on GPU; this process's peak resident set on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


class SystemSampler:
    """System metrics for the process: CPU utilisation since the last sample, peak memory."""

    def __init__(self, device: torch.device):
        self.device = device
        self._wall, self._cpu = time.perf_counter(), _cpu_seconds()

    def sample(self) -> dict[str, float]:
        wall, cpu = time.perf_counter(), _cpu_seconds()
        out = {M.SYS_CPU_PERCENT: 100.0 * (cpu - self._cpu) / max(1e-9, wall - self._wall),
               M.SYS_RSS_BYTES: float(peak_memory_bytes(torch.device("cpu")))}
        if self.device.type == "cuda":
            out[M.SYS_GPU_MEMORY_BYTES] = float(torch.cuda.memory_allocated(self.device))
        self._wall, self._cpu = wall, cpu
        return out


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; nothing on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in nats, padding targets (-100) ignored."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)


def make_loader(cfg: RunConfig, split: str, rank: int, world: int, infinite: bool | None = None):
    """The packed-window loader of ``rattention.data`` for this rank."""
    from rattention.data import PackedLoader

    return PackedLoader(cfg.data.path, split=split, seq_len=cfg.seq_len, batch_size=cfg.data.batch_size,
                        seed=cfg.train.seed, rank=rank, world_size=world, infinite=infinite)


def dataset_vocab(cfg: RunConfig) -> int | None:
    """The dataset's vocab size from its manifest (None when it does not say)."""
    from rattention.data import read_manifest

    v = read_manifest(cfg.data.path).get("vocab_size")
    return int(v) if v is not None else None


def dataset_fingerprint(path: str | Path) -> str:
    """The dataset's manifest fingerprint, or 'unknown'."""
    from rattention.data import read_manifest

    try:
        return str(read_manifest(path).get("fingerprint", "unknown"))
    except Exception:  # noqa: BLE001 - a tag, never a reason to fail
        return "unknown"


def run_tags(cfg: RunConfig) -> dict[str, str]:
    """Tags every run carries: local kind, window, git commit, dataset fingerprint."""
    from rattention.provenance import git_commit

    return {M.TAG_KIND: cfg.model.kind, M.TAG_WINDOW: str(cfg.model.window), M.TAG_GIT_COMMIT: git_commit(),
            M.TAG_DATASET: dataset_fingerprint(cfg.data.path)}


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


class LaggedReadings:
    """Device values read on the host a step late: each is copied to pinned host memory as soon as it is
    queued, with an event, so reading one waits for that point of the stream only, not for the work
    queued after it."""

    def __init__(self) -> None:
        self._queue: list[tuple[int, torch.Tensor, torch.cuda.Event | None]] = []

    def push(self, step: int, values: torch.Tensor) -> None:
        if values.is_cuda:
            host = values.to("cpu", non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._queue.append((step, host, event))
        else:
            self._queue.append((step, values, None))

    def pop(self, keep: int) -> list[tuple[int, list[float]]]:
        """The oldest readings, leaving the newest ``keep`` queued."""
        out = []
        while len(self._queue) > keep:
            step, host, event = self._queue.pop(0)
            if event is not None:
                event.synchronize()
            out.append((step, host.tolist()))
        return out


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
    sinks = list(sinks or []) if rank == 0 else []
    faults = faults or Faults()
    vocab = dataset_vocab(cfg)
    if vocab is not None and vocab > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size: must be >= the dataset's vocab size ({vocab}), "
                          f"got {cfg.model.vocab_size}")

    torch.manual_seed(tc.seed)  # the same initial weights on every rank
    raw = LM(cfg.model).to(device)
    opt = build_optimizer(raw, tc)
    sched = build_scheduler(opt, tc)
    loader = make_loader(cfg, cfg.data.train_split, rank, world)
    step, tokens, resumed_from = 0, 0, None
    state = checkpointer.load_latest() if checkpointer is not None else None
    if state is not None:
        if state.get("world_size") != world:
            raise TrainingError(f"checkpoint at step {state['step']}: saved with {state.get('world_size')} "
                                f"ranks, resuming with {world}; the data positions would not line up")
        raw.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        loader.load_state_dict(state["loader"][rank])
        restore_rng(state["rng"][rank])
        step, tokens, resumed_from = int(state["step"]), int(state["tokens"]), int(state["step"])
        for s in sinks:
            s(step, {M.TRAIN_RESUMED_AT: float(step)})
        if rank == 0 and progress:
            say(f"resumed from step {step}")
    model = wrap_model(raw, tc, device, world)

    batch_tokens = cfg.data.batch_size * cfg.seq_len * tc.grad_accum * world
    data: Iterator = iter(loader)
    sampler = SystemSampler(device)
    losses: dict[int, float] = {}
    readings = LaggedReadings()
    interval_loss, interval_steps, interval_t0 = 0.0, 0, time.perf_counter()
    session_t0, session_steps = None, 0
    stopped_early = False
    model.train()
    while step < tc.steps:
        faults.maybe_crash(step + 1, rank)
        lr = opt.param_groups[0]["lr"]
        loss_sum, grad_norm = train_step(model, raw, opt, sched, data, tc, device,
                                         poison=faults.nan_at_step == step + 1)
        step += 1
        tokens += batch_tokens
        stop_now = stop_after is not None and step >= stop_after and step < tc.steps
        log_now = step % tc.log_every == 0 or step == tc.steps
        save_now = checkpointer is not None and (step == tc.steps or stop_now
                                                 or (tc.checkpoint_every and step % tc.checkpoint_every == 0))
        # The loss is read one step late, so the host queues step s+1 while the GPU runs step s; all
        # is read before a log row, a checkpoint and the first timed step. A non-finite loss ends the
        # run naming its step, before any checkpoint is written after it.
        readings.push(step, torch.stack([loss_sum, grad_norm.float()]))
        read_all = log_now or save_now or session_t0 is None
        for s_read, (loss_val, grad_norm_read) in readings.pop(keep=0 if read_all else 1):
            last_grad_norm = grad_norm_read
            if not math.isfinite(loss_val):
                raise TrainingError(f"step {s_read}: loss is {loss_val}; training stopped "
                                    f"(lower train.lr={tc.lr:g} or check the data)")
            losses[s_read] = loss_val
            interval_loss += loss_val
            interval_steps += 1
        if session_t0 is None:  # the first step warms up (allocations, compilation): not timed
            session_t0 = time.perf_counter()
        else:
            session_steps += 1
        if log_now:
            now = time.perf_counter()
            tps = interval_steps * batch_tokens / max(1e-9, now - interval_t0)
            row = {M.TRAIN_LOSS: interval_loss / interval_steps, M.TRAIN_LR: lr, M.TRAIN_GRAD_NORM: last_grad_norm,
                   M.TRAIN_TOKENS: float(tokens), M.TRAIN_TOKENS_PER_S: tps,
                   **(sampler.sample() if cfg.tracking.system_metrics else {})}
            for s in sinks:
                s(step, row)
            if rank == 0 and progress:
                say(f"step {step:>6}/{tc.steps}  loss {row[M.TRAIN_LOSS]:.4f}  lr {lr:.2e}  "
                    f"grad_norm {last_grad_norm:.3f}  {tps:,.0f} tok/s")
            interval_loss, interval_steps, interval_t0 = 0.0, 0, time.perf_counter()
        if save_now:
            state = training_state(cfg, raw, opt, sched, loader, step, tokens)
            checkpointer.save(step, state if rank == 0 else None, {M.TRAIN_LOSS: loss_val, "step": float(step)})
        if stop_now:
            stopped_early = True
            break
    elapsed = time.perf_counter() - session_t0 if session_t0 is not None else 0.0
    tps = session_steps * batch_tokens / elapsed if session_steps and elapsed > 0 else 0.0
    last = losses[max(losses)] if losses else float("nan")
    return raw, TrainResult(step=step, tokens=tokens, loss=last, tokens_per_s=tps, resumed_from=resumed_from,
                            losses=losses, peak_memory_bytes=peak_memory_bytes(device),
                            stopped_early=stopped_early)


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


# ----- a whole run without Ray: run folder, training, evaluation ----------------------------------------

def default_run_name(cfg: RunConfig) -> str:
    return cfg.train.run_name or f"{cfg.model.kind}-w{cfg.model.window}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_local(cfg: RunConfig, run_dir: str | Path | None = None, stop_after: int | None = None,
              faults: Faults | None = None, progress: bool = True) -> dict[str, Any]:
    """Train (resuming from the run folder's checkpoints) and evaluate, writing everything to the run folder.

    Returns the results dict (also ``results.json``). Status ends FINISHED, FAILED or KILLED.
    """
    from rattention.evaluate import evaluate
    from rattention.rundir import RunDir

    init_distributed(pick_device(cfg.train.device))
    rank, _ = rank_world()
    path = [str(run_dir or Path(cfg.train.out_dir) / default_run_name(cfg))]
    if dist.is_initialized():
        dist.broadcast_object_list(path, src=0)  # one folder, named by rank 0
    rd = RunDir(path[0])
    if rank == 0:
        rd.create(cfg, run_tags(cfg))
        rd.set_status("RUNNING")
    if dist.is_initialized():
        dist.barrier()
    ckpt = LocalCheckpointer(rd.checkpoints, keep=cfg.train.keep_checkpoints)
    step = None
    try:
        model, result = train(cfg, ckpt, sinks=[rd.log_metrics], stop_after=stop_after, faults=faults,
                              progress=progress)
        step = result.step
        results: dict[str, Any] = {"step": result.step, "tokens": result.tokens,
                                   M.TRAIN_THROUGHPUT: result.tokens_per_s}
        if rank == 0 and cfg.eval.enabled and not result.stopped_early:
            results.update(evaluate(model, cfg, train_tokens_per_s=result.tokens_per_s,
                                    train_peak_memory=result.peak_memory_bytes))
        if rank == 0:
            rd.write_results(results)
            rd.set_status("RUNNING" if result.stopped_early else "FINISHED", step=result.step)
        return results
    except KeyboardInterrupt:
        if rank == 0:
            rd.set_status("KILLED", step=step, error="interrupted")
        raise
    except Exception as err:
        if rank == 0:
            rd.set_status("FAILED", step=step,
                          error=str(err).splitlines()[0] if str(err) else type(err).__name__)
        raise


def main(argv: list[str] | None = None) -> None:
    """``python -m rattention.train CONFIG.yaml [key=value ...] [--run-dir DIR]``: a run without Ray."""
    import argparse

    from rattention.errors import RattentionError
    from rattention.run_config import load_run_config

    ap = argparse.ArgumentParser(prog="python -m rattention.train", description=main.__doc__)
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", help="dotted key=value, e.g. train.lr=3e-4")
    ap.add_argument("--run-dir", default=None, help="run folder (default: train.out_dir/<run name>)")
    args = ap.parse_args(argv)
    try:
        cfg = load_run_config(args.config, args.overrides)
        run_local(cfg, args.run_dir)
    except RattentionError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: run marked KILLED; the same command resumes it from its last checkpoint",
              file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
