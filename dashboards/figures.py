"""The sweep's figures, each drawn twice from the same numbers: a static matplotlib figure (PNG) and an
interactive plotly figure (HTML).

- ``paper``: the objective against the window, one line per kind, the full baseline as a band, the pass
  bar, every point's seeds, the minimal windows starred (the paper's figure 1).
- ``pareto``: the objective against decoding-cache bytes at a context, and against training tokens/s,
  with the Pareto front drawn through the points no other point beats on both axes.
- ``position``: validation loss by position bucket, per kind and window, against the full baseline.
- ``length``: task accuracy against sequence length (RULER style), at the lengths the trials measured.

A figure the sweep has no numbers for is a ``Missing`` with a one-line reason instead of an empty plot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import matplotlib.colors as mcolors
import plotly.graph_objects as go
from matplotlib.figure import Figure as MplFigure
from matplotlib.ticker import NullLocator
from plotly.subplots import make_subplots

from dashboards.read import BASELINE, Sweep
from rattention import metrics as M

KIND_COLORS = {BASELINE: "#3a3a3a", "swa": "#1f77b4", "rattention": "#d62728"}
KIND_MAPS = {BASELINE: "Greys", "swa": "Blues", "rattention": "Reds"}
BAR_COLOR = "#2ca02c"
PNG_DPI = 110


@dataclass
class Figure:
    """One view: its file stem, title and caption, and the two drawings of it."""

    name: str
    title: str
    caption: str
    png: MplFigure
    html: go.Figure
    notes: list[str] = field(default_factory=list)  # one line each: what this view leaves out and why

    def traces(self) -> int:
        return len(self.html.data)


@dataclass
class Missing:
    """A view the sweep has no numbers for, and the one line that says why."""

    name: str
    title: str
    reason: str


def build_figures(s: Sweep) -> list[Figure | Missing]:
    """The four views of a sweep, in the report's order."""
    return [paper(s), pareto(s), position(s), length(s)]


# ----- colours --------------------------------------------------------------------------------------------

def kind_color(kind: str) -> str:
    return KIND_COLORS.get(kind, "#9467bd")


def shade(kind: str, i: int, n: int) -> str:
    """The i-th of n shades of a kind's colour (light for small windows, dark for large)."""
    import matplotlib

    cmap = matplotlib.colormaps[KIND_MAPS.get(kind, "Purples")]
    return mcolors.to_hex(cmap(0.45 + 0.5 * (i / (n - 1) if n > 1 else 1.0)))


def _rgba(hex_color: str, alpha: float) -> str:
    r, g, b = (round(255 * c) for c in mcolors.to_rgb(hex_color))
    return f"rgba({r},{g},{b},{alpha})"


def _num(x: float) -> str:
    return f"{x:.4f}" if x == 0 or 1e-3 <= abs(x) < 1e5 else f"{x:.4g}"


def _mpl(width: float, height: float, cols: int = 1, sharey: bool = False) -> tuple[MplFigure, list[Any]]:
    fig = MplFigure(figsize=(width, height), dpi=PNG_DPI, layout="constrained")
    axes = fig.subplots(1, cols, sharey=sharey, squeeze=False)[0]
    return fig, list(axes)


def _layout(fig: go.Figure, title: str, height: int = 480) -> None:
    fig.update_layout(title={"text": title, "x": 0.01}, template="plotly_white", height=height,
                      margin={"l": 70, "r": 20, "t": 70, "b": 60}, legend={"font": {"size": 11}},
                      hovermode="closest")


def _log2_ticks(ax: Any, xs: list[int], labels: list[str] | None = None) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, labels=labels or [str(x) for x in xs])
    ax.xaxis.set_minor_locator(NullLocator())


def _jitter(x: float, i: int, n: int) -> float:
    """Seeds of one point side by side on a log axis (a fixed offset per seed, not random)."""
    return x * 2 ** (0.06 * (i - (n - 1) / 2)) if n > 1 else x


# ----- the paper's figure ---------------------------------------------------------------------------------

def paper(s: Sweep) -> Figure | Missing:
    m = s.metric
    title = "The objective against the window"
    pts = {k: [p for p in s.points(k) if p.values(m)] for k in s.kinds}
    windows = sorted({p.window for ps in pts.values() for p in ps if p.window is not None})
    if not windows:
        return Missing("paper", title, f"no trial of a local kind ({', '.join(s.kinds)}) reports {m}")
    lo, hi = windows[0] / 1.25, windows[-1] * 1.25
    base = s.baseline()
    bvals = base.values(m) if base is not None else []
    notes = []
    png, (ax,) = _mpl(8.0, 5.0)
    html = go.Figure()
    if bvals:
        mean, sd = base.mean(m), base.spread(m)
        label = f"full baseline: {_num(mean)} ± {_num(sd)} over {len(bvals)} seed{'s' * (len(bvals) > 1)}"
        ax.axhspan(mean - sd, mean + sd, color=kind_color(BASELINE), alpha=0.15, lw=0, label=label)
        ax.axhline(mean, color=kind_color(BASELINE), ls="--", lw=1.2)
        html.add_trace(go.Scatter(x=[lo, hi, hi, lo, lo], y=[mean - sd, mean - sd, mean + sd, mean + sd, mean - sd],
                                  fill="toself", mode="lines", line={"width": 0}, hoverinfo="skip", name=label,
                                  fillcolor=_rgba(kind_color(BASELINE), 0.15)))
        html.add_trace(go.Scatter(x=[lo, hi], y=[mean, mean], mode="lines", name="full baseline mean",
                                  line={"color": kind_color(BASELINE), "dash": "dash", "width": 1.5}))
    else:
        notes.append("no full-baseline trials in this sweep, so no baseline band")
    if s.bar is not None:
        thr = float(s.bar["threshold"])
        cmp = "≤" if s.direction == "minimize" else "≥"
        label = f"pass bar: mean {cmp} {_num(thr)}"
        ax.axhline(thr, color=BAR_COLOR, ls=":", lw=1.8, label=label)
        html.add_trace(go.Scatter(x=[lo, hi], y=[thr, thr], mode="lines", name=label,
                                  line={"color": BAR_COLOR, "dash": "dot", "width": 2}))
    else:
        notes.append(f"a {s.mode} sweep has no tolerance bar")
    for kind in s.kinds:
        ps = pts[kind]
        lost = sorted({t.window for t in s.failed if t.kind == kind} - {p.window for p in ps})
        if lost:
            notes.append(f"{kind}: no seed of window {', '.join(map(str, lost))} finished, so it is not drawn "
                         "(the sweep counts it as not passing; the table lists those trials)")
        if not ps:
            notes.append(f"{kind}: no trial reports {m}")
            continue
        c = kind_color(kind)
        ws = [p.window for p in ps]
        means = [p.mean(m) for p in ps]
        sds = [p.spread(m) for p in ps]
        ax.errorbar(ws, means, yerr=sds, color=c, marker="o", ms=5, capsize=3, lw=1.6,
                    label=f"{kind}: mean ± spread over seeds")
        sx = [_jitter(p.window, i, len(p.values(m))) for p in ps for i in range(len(p.values(m)))]
        sy = [v for p in ps for v in p.values(m)]
        st = [f"{kind} w={p.window} seed {t.seed}" for p in ps for t in p.trials if m in t.metrics]
        ax.scatter(sx, sy, color=c, s=14, alpha=0.45, lw=0)
        html.add_trace(go.Scatter(x=ws, y=means, mode="lines+markers", name=f"{kind}: mean ± spread over seeds",
                                  line={"color": c, "width": 2}, marker={"size": 7, "color": c},
                                  error_y={"type": "data", "array": sds, "visible": True, "color": c},
                                  hovertemplate="w=%{x}<br>mean %{y:.4f} ± %{error_y.array:.4f}<extra>" + kind
                                  + "</extra>"))
        html.add_trace(go.Scatter(x=sx, y=sy, mode="markers", name=f"{kind}: each seed", text=st,
                                  marker={"size": 6, "color": c, "opacity": 0.45},
                                  hovertemplate="%{text}: %{y:.4f}<extra></extra>"))
        w = s.minimal.get(kind)
        if w is not None:
            p = next((p for p in ps if p.window == w), None)
            y = p.mean(m) if p is not None else float(s.bar["threshold"]) if s.bar else math.nan
            label = f"{kind}: minimal window {w}"
            ax.scatter([w], [y], marker="*", s=260, color=c, edgecolors="black", lw=0.8, zorder=5, label=label)
            html.add_trace(go.Scatter(x=[w], y=[y], mode="markers+text", name=label, text=[f"minimal {w}"],
                                      textposition="top center",
                                      marker={"symbol": "star", "size": 18, "color": c,
                                              "line": {"color": "black", "width": 1}}))
        elif s.mode == "minimal-window":
            notes.append(f"{kind}: no window on the grid passed the bar")
    _log2_ticks(ax, windows)
    ax.set_xlim(lo, hi)
    ax.set_xlabel("window (tokens, log scale)")
    ax.set_ylabel(f"{m} ({s.direction})")
    ax.set_title(f"{s.name}: {m} against the window", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    _layout(html, f"{s.name}: {m} against the window")
    html.update_xaxes(type="log", tickvals=windows, ticktext=[str(w) for w in windows],
                      title="window (tokens, log scale)")
    html.update_yaxes(title=f"{m} ({s.direction})")
    caption = (f"{m} ({s.direction}) of every evaluated window, mean ± spread (sample std) over seeds, each seed "
               f"a faint dot. " + (f"{s.rule}. " if s.rule else "")
               + (f"Minimal windows (stars): {s.answer_line}." if s.mode == "minimal-window" else ""))
    return Figure("paper", title, caption.strip(), png, html, notes)


# ----- the Pareto figure ----------------------------------------------------------------------------------

def front(points: list[tuple[float, float]], x_dir: str, y_dir: str) -> list[int]:
    """Indices of the points no other point matches or beats on both axes and beats on one, by x."""
    sx = 1.0 if x_dir == "minimize" else -1.0
    sy = 1.0 if y_dir == "minimize" else -1.0
    keys = [(sx * x, sy * y) for x, y in points]
    out = [i for i, (a, b) in enumerate(keys)
           if not any(c <= a and d <= b and (c < a or d < b) for j, (c, d) in enumerate(keys) if j != i)]
    return sorted(out, key=lambda i: (points[i][0], points[i][1]))


def pareto(s: Sweep) -> Figure | Missing:
    m = s.metric
    title = "The objective against efficiency (Pareto)"
    pts = [p for k in s.all_kinds() for p in s.points(k) if p.values(m)]
    axes_all = [(M.cache_bytes_at(s.context), f"decoding cache at context {s.context:,} (MiB)", "minimize", 2**20),
                (M.TRAIN_THROUGHPUT, "training tokens/s", "maximize", 1)]
    axes = [a for a in axes_all if any(p.values(a[0]) for p in pts)]
    if not pts or not axes:
        return Missing("pareto", title, f"no trial reports {m} together with {axes_all[0][0]} or "
                       f"{axes_all[1][0]}")
    notes = [f"no trial reports {a[0]}, so that panel is left out" for a in axes_all if a not in axes]
    png, mpl_axes = _mpl(6.0 * len(axes), 5.0, cols=len(axes), sharey=True)
    html = make_subplots(rows=1, cols=len(axes), shared_yaxes=True, horizontal_spacing=0.06,
                         subplot_titles=[f"against the {a[1].split(' (')[0]}" for a in axes])
    for col, ((metric, label, x_dir, unit), ax) in enumerate(zip(axes, mpl_axes, strict=True), start=1):
        have = [p for p in pts if p.values(metric)]
        xy = [(p.mean(metric) / unit, p.mean(m)) for p in have]
        xs = [x for x, _ in xy]
        scale = "log" if min(xs) > 0 and max(xs) / min(xs) > 16 else "linear"  # log when it spans decades
        for kind in s.all_kinds():
            mine = [(p, x, y) for p, (x, y) in zip(have, xy, strict=True) if p.kind == kind]
            if not mine:
                continue
            c = kind_color(kind)
            text = [("full" if p.window is None else f"w={p.window}") for p, _, _ in mine]
            ax.scatter([x for _, x, _ in mine], [y for _, _, y in mine], color=c, s=36, zorder=3, label=kind)
            for (_, x, y), t in zip(mine, text, strict=True):
                ax.annotate(t, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8, color=c)
            html.add_trace(go.Scatter(x=[x for _, x, _ in mine], y=[y for _, _, y in mine], mode="markers+text",
                                      text=text, textposition="top right", name=kind, legendgroup=kind,
                                      showlegend=col == 1, marker={"size": 9, "color": c},
                                      hovertemplate=f"{kind} %{{text}}<br>{label} %{{x:,.4g}}<br>{m} "
                                      "%{y:.4f}<extra></extra>"), row=1, col=col)
        idx = front(xy, x_dir, s.direction)
        fx, fy = [xy[i][0] for i in idx], [xy[i][1] for i in idx]
        ax.plot(fx, fy, color="black", lw=1.2, zorder=2, drawstyle="steps-post" if len(idx) > 1 else "default")
        ax.scatter(fx, fy, s=150, facecolors="none", edgecolors="black", lw=1.3, zorder=4,
                   label="Pareto front" if col == 1 else None)
        html.add_trace(go.Scatter(x=fx, y=fy, mode="lines+markers", name="Pareto front", legendgroup="front",
                                  showlegend=col == 1, line={"color": "black", "width": 1.5, "shape": "hv"},
                                  marker={"size": 16, "color": "rgba(0,0,0,0)", "line": {"color": "black",
                                                                                         "width": 1.5}},
                                  text=[have[i].label for i in idx],
                                  hovertemplate="front: %{text}<extra></extra>"), row=1, col=col)
        ax.set_xscale(scale)
        ax.set_xlabel(label + (" (log scale)" if scale == "log" else ""))
        ax.grid(alpha=0.3)
        html.update_xaxes(type=scale, title=label, row=1, col=col)
    mpl_axes[0].set_ylabel(f"{m} ({s.direction})")
    mpl_axes[0].legend(fontsize=8, loc="best")
    png.suptitle(f"{s.name}: {m} against efficiency", fontsize=11)
    _layout(html, f"{s.name}: {m} against efficiency")
    html.update_yaxes(title=f"{m} ({s.direction})", row=1, col=1)
    caption = (f"Each point is one kind and window (mean over its seeds). The line joins the Pareto front: the "
               f"points that no other point matches or beats on both {m} ({s.direction}) and the efficiency "
               f"axis. Cache bytes are the decoding cache at a {s.context:,}-token context; tokens/s were "
               "measured during each trial's training, on whatever device and load it ran.")
    return Figure("pareto", title, caption, png, html, notes)


# ----- loss by position ----------------------------------------------------------------------------------

def _buckets(s: Sweep) -> list[tuple[str, int, int | None]]:
    out = {}
    for name in s.metric_names():
        info = M.parse_metric(name)
        if info is not None and info["family"] == "val_loss_bucket":
            out[name] = (name, info["lo"], info["hi"])
    return sorted(out.values(), key=lambda b: b[1])


def position(s: Sweep) -> Figure | Missing:
    title = "Loss by position"
    buckets = _buckets(s)
    if len(buckets) < 2:
        return Missing("position", title, f"the trials report {len(buckets)} position bucket(s) "
                       f"(eval/val_loss_pos_{{lo}}_{{hi}}); set eval.buckets to two or more starts, e.g. [0,64,256]")
    end = str(s.seq_len) if s.seq_len else "end"
    labels = [f"{lo}-{end if hi is None else hi}" for _, lo, hi in buckets]
    xs = list(range(len(buckets)))
    kinds = [k for k in s.kinds if any(p.values(buckets[0][0]) for p in s.points(k))]
    if not kinds:
        return Missing("position", title, "no trial of a local kind reports loss by position")
    base = s.baseline()
    png, axes = _mpl(5.0 * len(kinds), 4.6, cols=len(kinds), sharey=True)
    html = make_subplots(rows=1, cols=len(kinds), shared_yaxes=True, horizontal_spacing=0.05,
                         subplot_titles=kinds)
    for col, (kind, ax) in enumerate(zip(kinds, axes, strict=True), start=1):
        if base is not None and base.values(buckets[0][0]):
            ys = [base.mean(b[0]) for b in buckets]
            ax.plot(xs, ys, color=kind_color(BASELINE), ls="--", marker="s", ms=4, lw=1.6, label="full")
            html.add_trace(go.Scatter(x=labels, y=ys, mode="lines+markers", name="full", legendgroup="full",
                                      showlegend=col == 1, line={"color": kind_color(BASELINE), "dash": "dash"},
                                      hovertemplate="full, positions %{x}: %{y:.4f}<extra></extra>"), row=1, col=col)
        ps = [p for p in s.points(kind) if p.values(buckets[0][0])]
        for i, p in enumerate(ps):
            c = shade(kind, i, len(ps))
            ys = [p.mean(b[0]) for b in buckets]
            ax.plot(xs, ys, color=c, marker="o", ms=4, lw=1.6, label=f"w={p.window}")
            html.add_trace(go.Scatter(x=labels, y=ys, mode="lines+markers", name=p.label, line={"color": c},
                                      hovertemplate=f"{p.label}, positions %{{x}}: %{{y:.4f}}<extra></extra>"),
                           row=1, col=col)
        ax.set_xticks(xs, labels=labels)
        ax.set_title(kind, fontsize=10)
        ax.set_xlabel("target positions in the context")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        html.update_xaxes(title="target positions in the context", type="category", row=1, col=col)
    axes[0].set_ylabel("validation loss (nats/token, mean over seeds)")
    png.suptitle(f"{s.name}: validation loss by position", fontsize=11)
    _layout(html, f"{s.name}: validation loss by position", height=440)
    html.update_yaxes(title="validation loss (nats/token)", row=1, col=1)
    caption = ("Validation loss over bands of target positions, for each local kind and window (mean over seeds; "
               "darker: larger window), against the full baseline (dashed). A small window loses in the late "
               "positions, which need tokens it cannot see; RAttention's linear branch is what may recover them.")
    return Figure("position", title, caption, png, html)


# ----- accuracy against length ---------------------------------------------------------------------------

def _tasks(s: Sweep) -> dict[str, list[int]]:
    out: dict[str, set[int]] = {}
    for name in s.metric_names():
        info = M.parse_metric(name)
        if info is not None and info["family"] == "task_accuracy":
            out.setdefault(info["task"], set()).add(info["length"])
    return {t: sorted(ls) for t, ls in sorted(out.items())}


def length(s: Sweep) -> Figure | Missing:
    title = "Accuracy against length"
    tasks = _tasks(s)
    if not tasks:
        return Missing("length", title, "the trials report no task accuracy (eval/{task}_acc_len{L}); set "
                       "eval.tasks (e.g. [mqar]) and eval.task_lengths=[1,2,4] in the sweep's base config")
    png, axes = _mpl(5.5 * len(tasks), 4.6, cols=len(tasks), sharey=True)
    html = make_subplots(rows=1, cols=len(tasks), shared_yaxes=True, horizontal_spacing=0.05,
                         subplot_titles=list(tasks))
    T = s.seq_len
    for col, ((task, lengths), ax) in enumerate(zip(tasks.items(), axes, strict=True), start=1):
        names = [M.task_accuracy(task, L) for L in lengths]
        ticks = [f"{L // T}x ({L})" if T and L % T == 0 else str(L) for L in lengths]
        for kind in s.all_kinds():
            ps = [p for p in s.points(kind) if any(p.values(n) for n in names)]
            for i, p in enumerate(ps):
                c = kind_color(BASELINE) if kind == BASELINE else shade(kind, i, len(ps))
                ys = [p.mean(n) if p.values(n) else math.nan for n in names]
                ax.plot(lengths, ys, color=c, marker="o", ms=4, lw=1.6, ls="--" if kind == BASELINE else "-",
                        label=p.label)
                html.add_trace(go.Scatter(x=lengths, y=ys, mode="lines+markers", name=f"{task}: {p.label}",
                                          line={"color": c, "dash": "dash" if kind == BASELINE else "solid"},
                                          hovertemplate=f"{p.label}, length %{{x}}: %{{y:.3f}}<extra></extra>"),
                               row=1, col=col)
        _log2_ticks(ax, lengths, ticks)
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("sequence length (x training length)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        html.update_xaxes(type="log", tickvals=lengths, ticktext=ticks, title="sequence length", row=1, col=col)
    axes[0].set_ylabel("answer accuracy (mean over seeds)")
    png.suptitle(f"{s.name}: task accuracy against length", fontsize=11)
    _layout(html, f"{s.name}: task accuracy against length", height=440)
    html.update_yaxes(title="answer accuracy", range=[-0.03, 1.03], row=1, col=1)
    caption = ("Accuracy on the synthetic long-context tasks at 1x, 2x and 4x the training length where measured "
               f"(training length {T if T else 'varies'}), per kind and window (mean over seeds; full dashed). "
               "Beyond 1x the models extrapolate.")
    return Figure("length", title, caption, png, html)
