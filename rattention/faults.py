"""Fault injection, for the tests of the failure paths: a NaN loss at a step, or a process that dies once.

The loop asks ``faults.poison(step)`` and ``faults.maybe_crash(step, rank)`` and knows nothing else of
them; a run without faults passes ``Faults()``, which does nothing.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass
class Faults:
    """``crash_marker`` makes the crash happen once: the process creates the file, then exits; a
    restarted process sees the file and carries on."""

    nan_at_step: int | None = None
    crash_at_step: int | None = None
    crash_marker: str | None = None
    crash_rank: int = 0
    crash_delay_s: float = 0.0  # wait before dying, e.g. for a supervisor to collect the last report

    def poison(self, step: int) -> bool:
        """Whether step ``step``'s loss is to be multiplied by NaN."""
        return self.nan_at_step == step

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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
