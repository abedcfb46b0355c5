"""Where a run executes: the device, the process group, autocast, memory and progress lines.

Kept apart from the training loop so evaluation, benchmarks and the lifecycle use the same set-up
without importing the loop.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys

import torch
import torch.distributed as dist

from rattention.errors import ConfigError


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


def broadcast(value: object) -> object:
    """Rank 0's ``value`` on every rank (the value itself without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; nothing on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def peak_memory_bytes(device: torch.device) -> int:
    """Peak CUDA memory allocated on GPU; this process's peak resident set on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def cpu_seconds() -> float:
    """User plus system CPU time of this process."""
    t = os.times()
    return t.user + t.system


def say(line: str) -> None:
    """A progress line on stdout, written directly: in a Ray Train worker ``print`` is patched to go to
    both stdout and Train's logger, and every line reached the driver twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
