"""The checkpoint component: what a training state is, and where it is kept.

A checkpoint is one dict of tensors and plain Python values (model, optimizer, scheduler, every rank's
loader position and RNG state, step, tokens, the run config), so it loads with
``torch.load(weights_only=True)``. ``LocalCheckpointer`` keeps them as files in a run folder; the Ray
job supplies its own checkpointer (Ray Train checkpoints) with the same two methods.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from rattention.errors import TrainingError

FORMAT = 1
STATE_FILE = "state.pt"  # the file inside a checkpoint folder (Ray Train checkpoints)
_NAME = re.compile(r"^step_(\d{8})\.pt$")


class Checkpointer(Protocol):
    """Where training states go. ``save`` is called on every rank (``state`` is None off rank 0)."""

    def load_latest(self) -> dict[str, Any] | None: ...

    def save(self, step: int, state: dict[str, Any] | None, metrics: dict[str, float]) -> None: ...


def capture_rng() -> dict[str, Any]:
    """This process's RNG states (torch, CUDA, numpy, random) as weights_only-safe values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of ``capture_rng``."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint file with ``weights_only=True`` (TrainingError naming the file if unreadable)."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise TrainingError(f"{path}: checkpoint not found") from None
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a corrupt file to the user
        raise TrainingError(f"{path}: not a readable checkpoint ({type(err).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise TrainingError(f"{path}: not a rattention checkpoint (format {FORMAT} expected)")
    return state


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write atomically (temporary file, then rename), so a crash never leaves half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


@dataclass(frozen=True)
class CheckpointPolicy:
    """When the loop saves: every ``every`` steps (0: never in between), at the last step, and when a
    session stops early (a preemption), so a resumed run loses nothing."""

    every: int
    total: int

    def due(self, step: int, stopping: bool = False) -> bool:
        return step == self.total or stopping or bool(self.every and step % self.every == 0)


class LocalCheckpointer:
    """Checkpoints as ``step_00000100.pt`` files in a folder, keeping the newest ``keep``."""

    def __init__(self, folder: str | Path, keep: int = 2):
        self.folder, self.keep = Path(folder), keep

    def paths(self) -> list[Path]:
        """Checkpoint files, oldest first."""
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if _NAME.match(p.name))

    def load_latest(self) -> dict[str, Any] | None:
        paths = self.paths()
        return load_checkpoint(paths[-1]) if paths else None

    def save(self, step: int, state: dict[str, Any] | None, metrics: dict[str, float]) -> None:
        if state is None:
            return
        save_checkpoint(state, self.folder / f"step_{step:08d}.pt")
        for old in self.paths()[: -self.keep]:
            old.unlink(missing_ok=True)
