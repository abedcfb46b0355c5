"""Canonical metric, param and tag names. Every producer (training, evaluation, sweeps) and every
view (dashboards) uses these constants, never string literals of its own."""

from __future__ import annotations

import re
from typing import Any

# ----- training (logged every N steps) ----------------------------------------------------------
TRAIN_LOSS = "train/loss"  # nats per token
TRAIN_LR = "train/lr"
TRAIN_GRAD_NORM = "train/grad_norm"
TRAIN_TOKENS = "train/tokens"  # tokens seen so far
TRAIN_TOKENS_PER_S = "train/tokens_per_s"
TRAIN_RESUMED_AT = "train/resumed_at_step"  # logged once per (re)start from a checkpoint

# ----- system (logged with the training metrics, by rank 0) --------------------------------------
SYS_CPU_PERCENT = "system/cpu_percent"  # this process's CPU time / wall time since the last log, in %
SYS_RSS_BYTES = "system/rss_bytes"  # this process's peak resident memory
SYS_GPU_MEMORY_BYTES = "system/gpu_memory_bytes"  # CUDA memory allocated (GPU runs only)

# ----- evaluation: quality ----------------------------------------------------------------------
VAL_LOSS = "eval/val_loss"  # nats per token on the validation split


def val_loss_bucket(lo: int, hi: int | None) -> str:
    """Validation loss over target positions [lo, hi) of the context; hi=None means the end."""
    return f"eval/val_loss_pos_{lo}_{'end' if hi is None else hi}"


def copy_loss(distance: int) -> str:
    """Loss on the second copy of a span repeated ``distance`` tokens after the first."""
    return f"eval/copy_loss_d{distance}"


def task_accuracy(task: str, length: int) -> str:
    """Answer accuracy on a synthetic long-context task at a given sequence length."""
    return f"eval/{task}_acc_len{length}"


def task_loss(task: str, length: int) -> str:
    """Mean loss in nats on the answer tokens of a synthetic task at a given sequence length: the
    continuous counterpart of ``task_accuracy`` (it moves before the accuracy does)."""
    return f"eval/{task}_loss_len{length}"


# ----- evaluation: efficiency -------------------------------------------------------------------
PARAMS = "eff/params"
PARAMS_NON_EMBEDDING = "eff/params_non_embedding"
TRAIN_THROUGHPUT = "eff/train_tokens_per_s"
DECODE_THROUGHPUT = "eff/decode_tokens_per_s"
PEAK_MEMORY = "eff/peak_memory_bytes"
MFU = "eff/mfu"


def cache_bytes_at(context: int) -> str:
    """Decoding-cache bytes at a context length, from the real cache accounting."""
    return f"eff/cache_bytes_ctx{context}"


# ----- tags ---------------------------------------------------------------------------------------
TAG_KIND = "rattention.kind"
TAG_WINDOW = "rattention.window"
TAG_GIT_COMMIT = "rattention.git_commit"
TAG_CODE = "rattention.code_version"  # hash of the model and kernel sources: part of the run's identity
TAG_DATASET = "rattention.dataset_fingerprint"
TAG_STUDY = "rattention.optuna_study"
TAG_TRIAL = "rattention.optuna_trial"
TAG_PARENT = "mlflow.parentRunId"
TAG_RUN_ID = "rattention.run_id"  # the run folder's id: import-run of the same folder is a no-op
TAG_RUN_DIR = "rattention.run_dir"
TAG_SOURCE = "rattention.source"  # "ray" (Ray Train), "local" (train --no-ray), "sweep" or "import"

# ----- artifacts ----------------------------------------------------------------------------------
ARTIFACT_CONFIG = "config.yaml"
ARTIFACT_RESULTS = "results.json"
ARTIFACT_METRICS = "metrics.jsonl"

# The one number a window search optimises (lower is better).
OBJECTIVE = VAL_LOSS


# ----- reading names back: what a name means, which way is better, and who measures it -----------

_SECTIONS = ("train/", "system/", "eval/", "eff/")
_PATTERNS = (
    ("val_loss_bucket", re.compile(r"^eval/val_loss_pos_(\d+)_(\d+|end)$")),
    ("copy_loss", re.compile(r"^eval/copy_loss_d(\d+)$")),
    ("task_accuracy", re.compile(r"^eval/([a-z][a-z0-9]*)_acc_len(\d+)$")),
    ("task_loss", re.compile(r"^eval/([a-z][a-z0-9]*)_loss_len(\d+)$")),
    ("cache_bytes", re.compile(r"^eff/cache_bytes_ctx(\d+)$")),
)
_PATTERN_DOC = ("eval/val_loss_pos_{lo}_{hi}", "eval/val_loss_pos_{lo}_end", "eval/copy_loss_d{d}",
                "eval/{task}_acc_len{L}", "eval/{task}_loss_len{L}", "eff/cache_bytes_ctx{L}")


def _fixed() -> dict[str, str]:
    """Every constant metric name of this module -> its family (the constant's name, lower case)."""
    out: dict[str, str] = {}
    for key, value in globals().items():
        if key.isupper() and isinstance(value, str) and value.startswith(_SECTIONS):
            out.setdefault(value, key.lower())
    return out


def _tasks() -> tuple[str, ...]:
    from rattention.tasks import TASKS

    return tuple(TASKS)


def parse_metric(name: str) -> dict | None:
    """What a canonical name means, e.g. ``{"family": "copy_loss", "distance": 64}``; None when unknown.

    Constant names give ``{"family": <constant name in lower case>}`` (``eval/val_loss`` -> ``val_loss``).
    """
    fixed = _fixed()
    if name in fixed:
        return {"family": fixed[name], "name": name}
    for family, pattern in _PATTERNS:
        m = pattern.match(name)
        if m is None:
            continue
        if family == "val_loss_bucket":
            lo, hi = int(m.group(1)), None if m.group(2) == "end" else int(m.group(2))
            if (hi is not None and hi <= lo) or val_loss_bucket(lo, hi) != name:
                return None
            return {"family": family, "name": name, "lo": lo, "hi": hi}
        if family == "copy_loss":
            d = int(m.group(1))
            return {"family": family, "name": name, "distance": d} if d > 0 and copy_loss(d) == name else None
        if family in ("task_accuracy", "task_loss"):
            task, length = m.group(1), int(m.group(2))
            make = task_accuracy if family == "task_accuracy" else task_loss
            ok = task in _tasks() and length > 0 and make(task, length) == name
            return {"family": family, "name": name, "task": task, "length": length} if ok else None
        ctx = int(m.group(1))
        return {"family": family, "name": name, "context": ctx} if ctx > 0 and cache_bytes_at(ctx) == name else None
    return None


def is_canonical(name: str) -> bool:
    """Whether ``name`` is one of this module's metric names (constant or patterned)."""
    return parse_metric(name) is not None


def default_direction(name: str) -> str:
    """``maximize`` for accuracies and throughput (``*tokens_per_s``, ``eff/mfu``), else ``minimize``."""
    info = parse_metric(name)
    if info is not None and info["family"] == "task_accuracy":
        return "maximize"
    if name.endswith("tokens_per_s") or name == MFU:
        return "maximize"
    return "minimize"


def suggest(name: str) -> str | None:
    """The canonical name closest to a mistyped one (numbers kept), or None when nothing is close."""
    import difflib

    nums = [int(n) for n in re.findall(r"\d+", name)] or [0]
    pool = list(_fixed())
    for n in nums:
        if n > 0:
            pool += [copy_loss(n), val_loss_bucket(n, None), cache_bytes_at(n)]
            pool += [f(t, n) for t in _tasks() for f in (task_accuracy, task_loss)]
    pool += [val_loss_bucket(a, b) for a in nums for b in nums if b > a]
    close = difflib.get_close_matches(name, pool, n=1, cutoff=0.75)
    return close[0] if close else None


def unknown_metric_message(name: str) -> str:
    """One line for a name that is not canonical: the patterns, and the closest name when there is one."""
    fixed = [VAL_LOSS, PARAMS, TRAIN_THROUGHPUT, DECODE_THROUGHPUT, PEAK_MEMORY, MFU]
    close = suggest(name)
    hint = f" (did you mean {close!r}?)" if close else ""
    return (f"unknown metric {name!r}{hint}; canonical names are {', '.join(fixed[:1] + list(_PATTERN_DOC))}, "
            f"{', '.join(fixed[1:])}, ...")


def _produced(eval_cfg: Any, seq_len: int) -> set[str]:
    """Names a run with this eval section reports whatever its window (mirrors ``rattention.evaluate``)."""
    out = {TRAIN_THROUGHPUT}
    if not eval_cfg.enabled:
        return out
    out |= {VAL_LOSS, PARAMS, PARAMS_NON_EMBEDDING, PEAK_MEMORY, MFU}
    edges = [b for b in eval_cfg.buckets if b < seq_len]
    out |= {val_loss_bucket(lo, edges[i + 1] if i + 1 < len(edges) else None) for i, lo in enumerate(edges)}
    out |= {copy_loss(d) for d in eval_cfg.copy_distances or []}
    out |= {f(t, m * seq_len) for t in eval_cfg.tasks for m in eval_cfg.task_lengths
            for f in (task_accuracy, task_loss)}
    out |= {cache_bytes_at(c) for c in (seq_len, 4 * seq_len, 32768)}
    if eval_cfg.decode_tokens > 0:
        out.add(DECODE_THROUGHPUT)
    return out


def produced_by(name: str, eval_cfg: Any, seq_len: int) -> tuple[bool, str]:
    """Whether every run with this eval section (``RunConfig.eval``) and training length measures ``name``.

    Returns ``(True, "")``, or ``(False, hint)`` where the hint names the eval field to set. Copy distances
    left unset follow each run's window, so no fixed ``eval/copy_loss_d{d}`` is measured by every run.
    ``eff/mfu`` is reported on CUDA devices only.
    """
    if name in _produced(eval_cfg, seq_len):
        return True, ""
    info = parse_metric(name)
    if info is None:
        return False, unknown_metric_message(name)
    family = info["family"]
    if name.startswith(("train/", "system/")):
        return False, f"{name} is logged during training, not reported in a run's results; pick an eval/ or eff/ metric"
    if not eval_cfg.enabled:
        return False, "evaluation is off; set eval.enabled=true"
    if family == "val_loss_bucket":
        lo, hi = info["lo"], info["hi"]
        if lo >= seq_len or (hi is not None and hi >= seq_len):
            return False, f"position {max(lo, hi or 0)} is not below the training length model.seq_len={seq_len}"
        want = f"{lo} followed by {hi}" if hi is not None else f"{lo} as its last start below {seq_len}"
        return False, f"eval.buckets (now {list(eval_cfg.buckets)}) needs {want}"
    if family == "copy_loss":
        if eval_cfg.copy_distances is None:
            return False, (f"eval.copy_distances is unset, so distances follow each run's window; "
                           f"set eval.copy_distances=[{info['distance']}]")
        return False, f"add {info['distance']} to eval.copy_distances (now {list(eval_cfg.copy_distances)})"
    if family in ("task_accuracy", "task_loss"):
        task, length = info["task"], info["length"]
        if task not in eval_cfg.tasks:
            return False, f"add {task} to eval.tasks (now {list(eval_cfg.tasks)})"
        if length % seq_len:
            return False, f"length {length} is not a multiple of model.seq_len={seq_len}"
        return False, (f"add {length // seq_len} to eval.task_lengths (now {list(eval_cfg.task_lengths)}; "
                       f"lengths are multiples of model.seq_len={seq_len})")
    if family == "cache_bytes":
        return False, f"cache bytes are reported at {seq_len}, {4 * seq_len} and 32768 (T, 4T, 32768)"
    if name == DECODE_THROUGHPUT:
        return False, "decoding is not timed; set eval.decode_tokens > 0"
    return False, f"{name} is not reported by evaluation"


# ----- sweeps (logged on a sweep's parent run) -----------------------------------------------------
SWEEP_TRIALS = "sweep/trials"  # trials evaluated (finished or failed)
SWEEP_WALL_S = "sweep/wall_s"
TAG_SWEEP_MODE = "rattention.sweep_mode"  # minimal-window or pareto
TAG_SWEEP_ANSWER = "rattention.sweep_answer"  # the answer in one line, e.g. "swa: 64; rattention: 32"


def sweep_minimal_window(kind: str) -> str:
    """The minimal window a sweep found for a local kind (absent when none on the grid passed)."""
    return f"sweep/minimal_window_{kind}"

