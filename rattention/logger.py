"""The metric-logging component of the training loop: lagged reads, the NaN check, sinks and progress.

The loop hands it each step's loss and gradient norm as device tensors and says when everything must
be read (before a checkpoint). The logger reads them one step late, so the host queues step s+1 while
the GPU runs step s; stops the run on a non-finite loss, naming its step; sends a row to every sink
each ``train.log_every`` steps; and prints a progress line.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from rattention import metrics as M
from rattention.errors import TrainingError
from rattention.runtime import cpu_seconds, peak_memory_bytes, say

Sink = Callable[[int, dict[str, float]], None]


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


class SystemSampler:
    """System metrics for the process: CPU utilisation since the last sample, peak memory."""

    def __init__(self, device: torch.device):
        self.device = device
        self._wall, self._cpu = time.perf_counter(), cpu_seconds()

    def sample(self) -> dict[str, float]:
        wall, cpu = time.perf_counter(), cpu_seconds()
        out = {M.SYS_CPU_PERCENT: 100.0 * (cpu - self._cpu) / max(1e-9, wall - self._wall),
               M.SYS_RSS_BYTES: float(peak_memory_bytes(torch.device("cpu")))}
        if self.device.type == "cuda":
            out[M.SYS_GPU_MEMORY_BYTES] = float(torch.cuda.memory_allocated(self.device))
        self._wall, self._cpu = wall, cpu
        return out


class TrainLogger:
    """Reads, checks, aggregates and emits the training metrics of one session (rank 0 emits)."""

    def __init__(self, sinks: list[Sink], total_steps: int, log_every: int, batch_tokens: int,
                 device: torch.device, lr_hint: float, system_metrics: bool = True, progress: bool = True):
        self.sinks, self.total, self.every, self.batch_tokens = sinks, total_steps, log_every, batch_tokens
        self.progress, self.lr_hint = progress, lr_hint
        self.sampler = SystemSampler(device) if system_metrics else None
        self.readings = LaggedReadings()
        self.losses: dict[int, float] = {}
        self._sum, self._n, self._t0 = 0.0, 0, time.perf_counter()
        self._grad_norm = float("nan")
        self._session_t0: float | None = None
        self._session_steps = 0

    def emit(self, step: int, row: dict[str, float]) -> None:
        """Send one row to every sink (e.g. ``train/resumed_at_step`` at a restart)."""
        for sink in self.sinks:
            sink(step, row)

    def record(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float, tokens: int,
               read_all: bool = False) -> None:
        """Queue step ``step``'s readings; read what is due; log a row when the step calls for one.

        Raises TrainingError on a non-finite loss, naming its step, before the caller checkpoints.
        """
        log_now = step % self.every == 0 or step == self.total
        self.readings.push(step, torch.stack([loss, grad_norm.float()]))
        first = self._session_t0 is None
        for s, (loss_val, norm_val) in self.readings.pop(keep=0 if (read_all or log_now or first) else 1):
            if not math.isfinite(loss_val):
                raise TrainingError(f"step {s}: loss is {loss_val}; training stopped "
                                    f"(lower train.lr={self.lr_hint:g} or check the data)")
            self.losses[s] = loss_val
            self._sum, self._n, self._grad_norm = self._sum + loss_val, self._n + 1, norm_val
        if first:  # the first step warms up (allocations, compilation): not timed
            self._session_t0 = time.perf_counter()
        else:
            self._session_steps += 1
        if log_now:
            self._log_row(step, lr, tokens)

    def _log_row(self, step: int, lr: float, tokens: int) -> None:
        now = time.perf_counter()
        tps = self._n * self.batch_tokens / max(1e-9, now - self._t0)
        row = {M.TRAIN_LOSS: self._sum / max(1, self._n), M.TRAIN_LR: lr, M.TRAIN_GRAD_NORM: self._grad_norm,
               M.TRAIN_TOKENS: float(tokens), M.TRAIN_TOKENS_PER_S: tps,
               **(self.sampler.sample() if self.sampler is not None else {})}
        self.emit(step, row)
        if self.progress:
            say(f"step {step:>6}/{self.total}  loss {row[M.TRAIN_LOSS]:.4f}  lr {lr:.2e}  "
                f"grad_norm {self._grad_norm:.3f}  {tps:,.0f} tok/s")
        self._sum, self._n, self._t0 = 0.0, 0, time.perf_counter()

    @property
    def last_loss(self) -> float:
        return self.losses[max(self.losses)] if self.losses else float("nan")

    def tokens_per_s(self) -> float:
        """Training tokens/s of this session, its first (warm-up) step excluded."""
        if self._session_t0 is None or not self._session_steps:
            return 0.0
        elapsed = time.perf_counter() - self._session_t0
        return self._session_steps * self.batch_tokens / elapsed if elapsed > 0 else 0.0
