"""``rattention eval RUN_OR_CHECKPOINT``: evaluate a run folder or checkpoint, record and log the results.

The numbers come from ``rattention.evaluate`` (no Ray needed). Results go to ``eval-step{N}.json`` in
the run folder (or beside the checkpoint), and into the run's MLflow run when the folder knows it and
a tracking URI is given or recorded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rattention.evaluate import evaluate_path
from rattention.rundir import RunDir


def run_eval(path: str | Path, overrides: list[str] | None = None, device: str = "auto",
             uri: str | None = None, log_mlflow: bool = True) -> tuple[dict[str, float], Path]:
    """Evaluate; write the JSON; log to MLflow where the run is known. Returns (results, JSON path)."""
    p = Path(path)
    cfg, results, state = evaluate_path(p, overrides, device)
    step = int(state["step"])
    folder = p if p.is_dir() and RunDir(p).exists() else (p.parent.parent if p.parent.name == "checkpoints"
                                                          else p.parent)
    out = folder / f"eval-step{step}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    meta: dict[str, Any] = RunDir(folder).meta() if (folder / "meta.json").is_file() else {}
    run_id = meta.get("mlflow_run_id")
    uri = uri or meta.get("tracking_uri")
    if log_mlflow and run_id and uri:
        from pipelines import tracking

        if tracking.server_alive(uri):
            c = tracking.client(uri)
            tracking.log_metrics(c, run_id, step, results)
            tracking.log_artifact(c, run_id, out)
    return results, out
