"""The run folder: everything needed to reproduce and import one run, without a tracking server.

::

    RUN/config.yaml        the resolved run config
    RUN/meta.json          run id (content hash), tags, training starts, MLflow run id if any
    RUN/metrics.jsonl      one line per logged step: {"step": 10, "time": 1.7e9, "train/loss": 4.2, ...}
    RUN/results.json       the final evaluation
    RUN/status.json        RUNNING / FINISHED / FAILED / KILLED, with the error line and the last step
    RUN/checkpoints/       step_00000100.pt, loadable with torch.load(weights_only=True)

``rattention import-run RUN`` logs such a folder into MLflow.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from rattention import metrics as M
from rattention.checkpoint import STATE_FILE, LocalCheckpointer, is_complete
from rattention.errors import DataError
from rattention.run_config import RunConfig, dump_run_config, load_run_config

STATUSES = ("RUNNING", "FINISHED", "FAILED", "KILLED")


class RunDir:
    """One run's folder. Only rank 0 writes to it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    # ----- paths -----------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / M.ARTIFACT_CONFIG

    @property
    def metrics_path(self) -> Path:
        return self.path / M.ARTIFACT_METRICS

    @property
    def results_path(self) -> Path:
        return self.path / M.ARTIFACT_RESULTS

    @property
    def checkpoints(self) -> Path:
        """Checkpoint files of runs without Ray (and of Ray Train's local mode)."""
        return self.path / "checkpoints"

    @property
    def ray_storage(self) -> Path:
        """Ray Train's storage for this run: ``<name>/checkpoint_<time>/state.pt`` folders."""
        return self.path / "ray"

    def latest_checkpoint(self) -> Path | None:
        """The newest checkpoint file, wherever the run kept it: ``checkpoints/`` or Ray Train's storage."""
        local = LocalCheckpointer(self.checkpoints).paths()
        if local:
            return local[-1]
        # Ray names checkpoint folders by time, so the name order is the save order.
        ray = sorted(self.ray_storage.glob(f"*/checkpoint_*/{STATE_FILE}"), key=lambda p: p.parent.name)
        complete = [p for p in ray if is_complete(p)]  # a save cut short is passed over
        return complete[-1] if complete else None

    # ----- writing ---------------------------------------------------------------------------------
    def create(self, cfg: RunConfig, tags: dict[str, str], run_id: str) -> None:
        """Write config and meta; an existing folder of the same run keeps its history (a resume)."""
        if self.path.exists() and not self.path.is_dir():
            raise DataError(f"{self.path}: run folder path is a file; choose another folder")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            dump_run_config(cfg, self.config_path)
        except OSError as err:
            raise DataError(f"{self.path}: cannot write the run folder ({err.strerror or err})") from None
        meta = self.meta()
        meta.update(run_id=run_id)
        meta.setdefault("created", time.time())
        meta["tags"] = {**meta.get("tags", {}), **tags}
        self.write_meta(meta)

    def record_start(self) -> int:
        """Count a training session starting in this folder (a resume counts too); return the count."""
        meta = self.meta()
        meta["starts"] = int(meta.get("starts", 0)) + 1
        self.write_meta(meta)
        return meta["starts"]

    def finished(self, run_id: str) -> bool:
        """Whether this folder holds run ``run_id``, FINISHED with its results written."""
        return (self.meta().get("run_id") == run_id and self.status().get("status") == "FINISHED"
                and self.results_path.is_file())

    def write_meta(self, meta: dict[str, Any]) -> None:
        _write_json(self.path / "meta.json", meta)

    def update_meta(self, **fields: Any) -> None:
        self.write_meta({**self.meta(), **fields})

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Append one JSON line (a metrics sink for the training loop)."""
        row = {"step": step, "time": time.time(), **{k: _finite_or_str(v) for k, v in metrics.items()}}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def write_results(self, results: dict[str, Any]) -> None:
        _write_json(self.results_path, results)

    def set_status(self, status: str, step: int | None = None, error: str | None = None) -> None:
        """Record the run's status; without ``step``, the last logged step (where an interrupted run got to)."""
        assert status in STATUSES, status
        step = step if step is not None else self.last_step()
        _write_json(self.path / "status.json", {"status": status, "step": step, "error": error, "time": time.time()})

    # ----- reading ---------------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.config_path.is_file()

    def config(self) -> RunConfig:
        if not self.config_path.is_file():
            raise DataError(f"{self.path}: not a run folder (no config.yaml)")
        return load_run_config(self.config_path)

    def meta(self) -> dict[str, Any]:
        return _read_json(self.path / "meta.json", {})

    def status(self) -> dict[str, Any]:
        return _read_json(self.path / "status.json", {"status": "RUNNING", "step": None, "error": None})

    def results(self) -> dict[str, Any]:
        return _read_json(self.results_path, {})

    def metrics(self) -> list[dict[str, Any]]:
        """Logged rows by step, merged; where a resumed run logged a step twice, the later values win."""
        rows: dict[int, dict[str, Any]] = {}
        if self.metrics_path.is_file():
            lines = self.metrics_path.read_text().splitlines()
            for i, line in enumerate(lines):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    if i == len(lines) - 1:  # the last line, torn by a kill or a full disk mid-append
                        continue
                    raise DataError(f"{self.metrics_path}: line {i + 1} is not valid JSON") from None
                rows.setdefault(int(row["step"]), {}).update(row)
        return [rows[s] for s in sorted(rows)]

    def last_step(self) -> int | None:
        """The last step with a logged row, or None: where an interrupted run had got to."""
        rows = self.metrics()
        return int(rows[-1]["step"]) if rows else None

    def steady_tokens_per_s(self) -> float:
        """Training tokens/s over every logged interval but the first, which holds the warm-up (allocator
        growth, kernel compilation, and, under Ray Train, its control actors still starting); NaN when
        fewer than two intervals were logged. ``results()`` keeps the whole-run figure beside it."""
        rows = [r for r in self.metrics() if M.TRAIN_TOKENS_PER_S in r and M.TRAIN_TOKENS in r]
        spans = [(b[M.TRAIN_TOKENS] - a[M.TRAIN_TOKENS], b[M.TRAIN_TOKENS_PER_S])
                 for a, b in zip(rows, rows[1:], strict=False)]
        spans = [(n, tps) for n, tps in spans if n > 0 and tps > 0]
        return sum(n for n, _ in spans) / sum(n / tps for n, tps in spans) if spans else float("nan")


def _finite_or_str(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN; keep it readable
    return v


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def _read_json(path: Path, default: Any) -> Any:
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise DataError(f"{path}: not valid JSON") from None


def ensure_folder(path: str | Path, field: str) -> Path:
    """``path`` as a folder, made (with its parents) when missing; one ConfigError line naming ``field``
    when it is a file, lies under one, or cannot be made."""
    from rattention.errors import ConfigError

    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"{field}: {p} is a file, not a folder; choose another") from None
    except NotADirectoryError:
        raise ConfigError(f"{field}: {p} lies under a file, not a folder; choose another") from None
    except OSError as err:
        raise ConfigError(f"{field}: cannot create {p} ({err.strerror or err})") from None
    return p


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """``rows`` (dicts with the same keys) as a CSV file with a header; empty rows, an empty file."""
    import csv
    import io

    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    path.write_text(buf.getvalue())
