"""The report of a finished sweep: each figure as PNG and interactive HTML, the comparison table as
markdown and HTML, and one standalone ``report.html`` that opens with no server and no network (plotly's
JavaScript inlined once). Everything is logged on the sweep's parent run under ``report/``.

The files are deterministic: the same sweep gives the same bytes (rows and traces in a fixed order,
explicit plotly div ids, PNGs without software or date metadata, no tracking URI or time in the text).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import plotly.io as pio
from plotly.offline import get_plotlyjs

from dashboards.figures import Figure, Missing, build_figures
from dashboards.read import BASELINE, Point, Sweep, load_sweep
from rattention import metrics as M

REPORT = "report.html"
TABLE_MD = "table.md"
TABLE_HTML = "table.html"
PLOTLY_JS = "plotly.min.js"  # beside the per-figure HTML files, which load it by relative path
ARTIFACT_DIR = "report"  # the folder of the parent run's artifacts that holds the report
VIEWS = ("paper", "pareto", "position", "length")
PLOTLY_CONFIG = {"displaylogo": False, "responsive": True}


def default_out(s: Sweep) -> Path:
    return Path(".rattention") / "reports" / f"{s.name}-{s.run_id[:8]}"


def build_report(client_or_uri: Any, run_id: str, out_dir: str | Path | None = None, log: bool = True) -> Path:
    """Build the report of the finished sweep whose parent run is ``run_id`` into ``out_dir`` (default
    ``.rattention/reports/<sweep>-<run id[:8]>``), log its files on that run (``log``), and return the path of
    ``report.html``. ``client_or_uri`` is an ``MlflowClient`` or a tracking URI."""
    client = _client(client_or_uri)
    s = load_sweep(client, run_id)
    out = Path(out_dir) if out_dir is not None else default_out(s)
    out.mkdir(parents=True, exist_ok=True)
    views = build_figures(s)
    files: list[Path] = []
    for v in views:
        if isinstance(v, Figure):
            files += write_figure(v, out)
    for name in VIEWS:  # a figure this sweep has no numbers for leaves no stale file from another build
        if not any(isinstance(v, Figure) and v.name == name for v in views):
            for ext in ("png", "html"):
                (out / f"{name}.{ext}").unlink(missing_ok=True)
    (out / PLOTLY_JS).write_text(get_plotlyjs(), encoding="utf-8")
    rows = table_rows(s)
    (out / TABLE_MD).write_text(table_markdown(s, rows), encoding="utf-8")
    (out / TABLE_HTML).write_text(_page(f"{s.name}: comparison", table_html(s, rows)), encoding="utf-8")
    (out / REPORT).write_text(report_html(s, views, rows), encoding="utf-8")
    files += [out / PLOTLY_JS, out / TABLE_MD, out / TABLE_HTML, out / REPORT]
    if log:
        for f in files:
            client.log_artifact(run_id, str(f), artifact_path=ARTIFACT_DIR)
    return out / REPORT


def _client(client_or_uri: Any) -> Any:
    if isinstance(client_or_uri, str):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=client_or_uri)
    return client_or_uri


def write_figure(fig: Figure, out: Path) -> list[Path]:
    """``<name>.png`` (no metadata that varies) and ``<name>.html`` (plotly.min.js loaded from beside it)."""
    png, page = out / f"{fig.name}.png", out / f"{fig.name}.html"
    fig.png.savefig(png, format="png", metadata={"Software": None})
    pio.write_html(fig.html, page, include_plotlyjs=PLOTLY_JS, full_html=True, div_id=f"fig-{fig.name}",
                   config=PLOTLY_CONFIG, auto_open=False)
    return [png, page]


# ----- the comparison table ---------------------------------------------------------------------------------

def _points(s: Sweep) -> list[Point]:
    return [p for k in s.all_kinds() for p in s.points(k)]


def _verdict(s: Sweep, p: Point) -> str:
    """How the point stands against the bar (minimal-window mode); '-' for the baseline or without a bar."""
    if p.kind == BASELINE or s.bar is None:
        return "-"
    mean = p.mean(s.metric)
    failed = any(t.kind == p.kind and t.window == p.window for t in s.failed)
    if mean is None or failed:
        verdict = "fails (a seed did not finish)"
    else:
        thr = float(s.bar["threshold"])
        verdict = "passes" if (mean <= thr if s.direction == "minimize" else mean >= thr) else "fails"
    return verdict + (", minimal" if s.minimal.get(p.kind) == p.window else "")


def table_rows(s: Sweep) -> list[list[str]]:
    """One row per kind and window (the baseline first), in a fixed order; the header first."""
    m, ctx = s.metric, M.cache_bytes_at(s.context)
    full = s.baseline()
    full_cache = full.mean(ctx) if full is not None else None
    header = ["kind", "window", "seeds", f"{m} (mean ± spread)", "against the bar",
              f"cache @ {s.context:,} tokens", "train tokens/s", "params"]
    rows = [header]
    for p in _points(s):
        mean, sd = p.mean(m), p.spread(m)
        cache = p.mean(ctx)
        cache_s = "-" if cache is None else f"{cache / 2**20:.2f} MiB" + (
            f" ({cache / full_cache:.3f}x full)" if full_cache else "")
        tput, params = p.mean(M.TRAIN_THROUGHPUT), p.mean(M.PARAMS)
        rows.append([p.kind, "-" if p.window is None else str(p.window), str(len(p.trials)),
                     "-" if mean is None else f"{mean:.4f} ± {sd:.4f}", _verdict(s, p), cache_s,
                     "-" if tput is None else f"{tput:,.0f}", "-" if params is None else f"{int(params):,}"])
    return rows


def _failed_lines(s: Sweep) -> list[str]:
    return [f"{t.kind}{'' if t.window is None else f' w={t.window}'} seed {t.seed}: trial run {t.run_id} is "
            f"{t.status}" for t in s.failed]


def table_markdown(s: Sweep, rows: list[list[str]]) -> str:
    lines = [f"# {s.name}: comparison", ""]
    if s.rule:
        lines += [f"Rule: {s.rule}.", ""]
    lines += ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    fails = _failed_lines(s)
    if fails:
        lines += ["", "Trials that never finished (counted as not passing):", *[f"- {f}" for f in fails]]
    return "\n".join(lines) + "\n"


def table_html(s: Sweep, rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>\n" for r in rows[1:])
    out = f'<table class="comparison">\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>\n'
    fails = _failed_lines(s)
    if fails:
        out += ("<p>Trials that never finished (counted as not passing):</p>\n<ul>"
                + "".join(f"<li>{html.escape(f)}</li>" for f in fails) + "</ul>\n")
    return out


# ----- report.html ----------------------------------------------------------------------------------------

_STYLE = """
body { font-family: system-ui, -apple-system, 'DejaVu Sans', sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }
th { background: #f3f3f3; }
dl.summary { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }
dl.summary dt { font-weight: 600; } dl.summary dd { margin: 0; }
p.caption { color: #444; font-size: 0.9em; } p.missing { color: #8a4b00; }
ul.notes { color: #666; font-size: 0.85em; }
"""


def _page(title: str, body: str, head: str = "") -> str:
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            f"<style>{_STYLE}</style>\n{head}</head>\n<body>\n{body}</body>\n</html>\n")


def report_html(s: Sweep, views: list[Figure | Missing], rows: list[list[str]]) -> str:
    """One page with the summary, the table and every figure; plotly's JavaScript inlined once."""
    e = html.escape
    summary = [("sweep", f"{s.name} ({s.mode})"), ("experiment", s.experiment), ("parent run", s.run_id),
               ("objective", f"{s.metric} ({s.direction})")]
    if s.rule:
        summary.append(("rule", s.rule))
    summary += [("answer", s.answer_line or "-"),
                ("trials", f"{len(s.trials)} finished" + (f", {len(s.failed)} never finished" if s.failed else "")),
                ("git commit", s.git_commit or "-"), ("dataset", s.dataset or "-")]
    parts = [f"<h1>Sweep {e(s.name)}</h1>\n<dl class=\"summary\">\n"
             + "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>\n" for k, v in summary) + "</dl>\n",
             f'<h2 id="comparison">Comparison</h2>\n{table_html(s, rows)}'
             f'<p class="caption">Also as <a href="{TABLE_MD}">markdown</a>.</p>\n']
    for v in views:
        parts.append(f'<h2 id="{v.name}">{e(v.title)}</h2>\n')
        if isinstance(v, Missing):
            parts.append(f'<p class="missing">Not drawn: {e(v.reason)}.</p>\n')
            continue
        div = pio.to_html(v.html, include_plotlyjs=False, full_html=False, div_id=f"fig-{v.name}",
                          config=PLOTLY_CONFIG)
        parts.append(f'<div class="figure" data-view="{v.name}" data-traces="{v.traces()}">\n{div}\n</div>\n'
                     f'<p class="caption">{e(v.caption)} Static: <a href="{v.name}.png">{v.name}.png</a>; '
                     f'interactive alone: <a href="{v.name}.html">{v.name}.html</a>.</p>\n')
        if v.notes:
            parts.append('<ul class="notes">' + "".join(f"<li>{e(n)}</li>" for n in v.notes) + "</ul>\n")
    head = f'<script type="text/javascript">{get_plotlyjs()}</script>\n'
    return _page(f"Sweep {s.name}: report", "".join(parts), head)
