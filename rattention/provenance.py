"""Where a number came from: git commit, versions, device and date, for benchmarks and run tags."""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parent.parent


def git_commit(short: bool = False) -> str:
    """``GIT_COMMIT`` when set (a copy without .git, e.g. on a GPU box; kernels.bench reads the same
    variable), else the checkout's HEAD (with '+dirty' when the tree has changes), else 'unknown'."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        args = ["git", "-C", str(_ROOT), "rev-parse", "--short" if short else "--verify", "HEAD"]
        sha = subprocess.run(args, capture_output=True, text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def provenance() -> dict[str, str]:
    """The record every benchmark JSON carries."""
    info = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "device": device_name(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": str(os.cpu_count()),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "absent"
    return info


def write_section(path: str | Path, name: str, text: str, title: str = "# Benchmarks") -> None:
    """Put ``text`` in ``path`` between ``<!-- name:start -->`` and ``<!-- name:end -->``, keeping the rest,
    so several benchmark scripts can record into one markdown file."""
    path = Path(path)
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{text.strip()}\n{end}"
    old = path.read_text() if path.is_file() else f"{title}\n\n"
    if start in old and end in old:
        head, rest = old.split(start, 1)
        new = head + block + rest.split(end, 1)[1]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(new)

