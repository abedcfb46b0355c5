"""Views over MLflow of a finished sweep: the paper's figure, Pareto fronts, loss by position, accuracy against
length, a comparison table, and one standalone ``report.html``. Reads MLflow through ``MlflowClient`` and
``rattention.metrics`` names only."""

from dashboards.read import Sweep, find_sweep, load_sweep
from dashboards.report import build_report

__all__ = ["Sweep", "build_report", "find_sweep", "load_sweep"]
