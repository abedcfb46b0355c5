"""The checkpoint component: what a training state is, and where it is kept.

A checkpoint is one dict of tensors and plain Python values (model, optimizer, scheduler, every rank's
loader position and RNG state, step, tokens, the run config), so it loads with
``torch.load(weights_only=True)``: a file holding any other Python object is refused, never unpickled.
``LocalCheckpointer`` keeps them as files in a run folder; the Ray job supplies its own checkpointer
(Ray Train checkpoints) with the same two methods.

A save is atomic: the state goes to a temporary name, is fsynced, and only then renamed to its
``step_*.pt`` name (and the folder fsynced), so a process killed during a save leaves at most a
``*.tmp`` file, which is never loaded and is removed by the next save. A checkpoint file whose zip
directory is missing (cut short by a copy that did not finish) is passed over on resume, which takes
the newest complete one.
"""

from __future__ import annotations

import os
import random
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from rattention.errors import DataError, TrainingError

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


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")  # how torch names the object it refused


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint file with ``weights_only=True``: tensors and plain values only. TrainingError
    naming the file when it is missing, unreadable, or holds other Python objects (refused unread)."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise TrainingError(f"{path}: checkpoint not found") from None
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a corrupt file to the user
        text = str(err)
        found = _GLOBAL.search(text) if ("Weights only load failed" in text or "weights_only" in text) else None
        if found:  # a pickled object it would have had to build (torch words any unpickling failure alike)
            what = found.group(1)
            raise TrainingError(f"{path}: refused, it holds Python objects beyond tensors and plain values"
                                f"{f' ({what})' if what else ''}; checkpoints load with weights_only=True "
                                f"and nothing in it was run") from None
        raise TrainingError(f"{path}: not a readable checkpoint ({type(err).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise TrainingError(f"{path}: not a rattention checkpoint (format {FORMAT} expected)")
    return state


class _Writer:
    """The file torch.save writes into, keeping the OSError (a full disk) that torch reports only as a
    RuntimeError of its own."""

    def __init__(self, f: Any):
        self.f, self.error = f, None

    def write(self, block: bytes) -> int:
        try:
            return self.f.write(block)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.f.flush()


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write atomically: a temporary name, fsync, rename, fsync of the folder. A crash at any point leaves
    the previous checkpoints as they were and no file of this one under its final name; a write the
    disk refuses (full, read-only) removes the temporary file and raises DataError naming the path."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = None
        with open(tmp, "wb") as f:
            writer = _Writer(f)
            torch.save(state, writer)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except (OSError, RuntimeError) as err:
        tmp.unlink(missing_ok=True)
        cause = (writer.error if writer is not None and writer.error is not None else err)
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause).splitlines()[0]
        raise DataError(f"{path}: cannot write the checkpoint ({reason})") from None


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened, as on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_complete(path: str | Path) -> bool:
    """Whether a checkpoint file is whole: torch.save writes a zip whose directory comes last, so a file
    cut short has none. (Cheap: it reads the file's tail, not the tensors.)"""
    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False


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

    def named(self) -> list[Path]:
        """Files under a checkpoint's final name, oldest first (a save's ``*.tmp`` file is not one)."""
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if _NAME.match(p.name))

    def paths(self) -> list[Path]:
        """The complete checkpoint files (``is_complete``), oldest first."""
        return [p for p in self.named() if is_complete(p)]

    def load_latest(self) -> dict[str, Any] | None:
        """The newest complete checkpoint; newer incomplete files are passed over with a warning line."""
        complete = self.paths()
        for p in self.named():
            if p not in complete and (not complete or p > complete[-1]):
                print(f"warning: {p}: incomplete checkpoint (no zip directory), passed over", file=sys.stderr)
        return load_checkpoint(complete[-1]) if complete else None

    def save(self, step: int, state: dict[str, Any] | None, metrics: dict[str, float]) -> None:
        if state is None:
            return
        for stale in self.folder.glob("step_*.pt.tmp"):  # left by a save that was killed
            stale.unlink(missing_ok=True)
        save_checkpoint(state, self.folder / f"step_{step:08d}.pt")
        kept = self.paths()[-self.keep :]
        for old in self.named():  # older complete ones beyond ``keep``, and any incomplete file
            if old not in kept:
                old.unlink(missing_ok=True)
