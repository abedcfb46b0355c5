"""Canonical metric, param and tag names. Every producer (training, evaluation, sweeps) and every
view (dashboards) uses these constants, never string literals of its own."""

from __future__ import annotations

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
TAG_DATASET = "rattention.dataset_fingerprint"
TAG_STUDY = "rattention.optuna_study"
TAG_TRIAL = "rattention.optuna_trial"
TAG_PARENT = "mlflow.parentRunId"
TAG_RUN_ID = "rattention.run_id"  # the run folder's id: import-run of the same folder is a no-op
TAG_RUN_DIR = "rattention.run_dir"
TAG_SOURCE = "rattention.source"  # "ray" (logged live) or "import" (logged from a run folder)

# ----- artifacts ----------------------------------------------------------------------------------
ARTIFACT_CONFIG = "config.yaml"
ARTIFACT_RESULTS = "results.json"
ARTIFACT_METRICS = "metrics.jsonl"

# The one number a window search optimises (lower is better).
OBJECTIVE = VAL_LOSS
