"""Window-search figures: grid points and rounds the search spends, by curve shape, grid size and slots.

Run: ``.venv/bin/python benchmarks/bench_search.py`` (under a second, no training: each window's loss comes
from a deterministic curve). For every curve shape below, block-aligned grids of 4..64 windows and 1, 2, 4
slots, it drives ``sweeps.search`` as the sweep driver does (evaluate each proposed round, observe, repeat)
and records points used, rounds, the point bound and whether the minimum is the true one. It also runs all
n + 1 monotone pass patterns of each grid for the worst case. Writes ``benchmarks/results/search.json``
and its section of ``benchmarks/sweep.md``, and prints the table.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repo root, as the other benchmark scripts do

from rattention.provenance import provenance, write_section  # noqa: E402
from sweeps.search import Bar, answer, next_windows, point_bound  # noqa: E402

GRID_SIZES = (4, 8, 16, 32, 64)
SLOTS = (1, 2, 4)
BLOCK = 64  # grid windows are multiples of the kernel block
FULL = 2.0  # the full-attention baseline's loss
SEEDS = 3
BAR = Bar.from_baseline([FULL] * SEEDS, 0.05, "absolute", "minimize")

# loss(window, grid) for each shape, scaled to the grid's range (the same shapes as the tests, defined here)
SHAPES: dict[str, Callable[[int, Sequence[int]], float]] = {
    "step": lambda w, g: FULL + (1.0 if w < g[len(g) // 2] else 0.0),
    "linear": lambda w, g: FULL + 0.2 * (g[-1] - w) / (g[-1] - g[0] + 1),
    "exp_decay": lambda w, g: FULL + 2.0 * math.exp(-8.0 * w / g[-1]),
    "plateau_then_drop": lambda w, g: FULL + (0.5 if w < 0.6 * g[-1] else 2.5 * max(0.0, 0.8 - w / g[-1])),
    "all_pass": lambda w, g: FULL,
    "none_pass": lambda w, g: FULL + 0.5,
    "only_largest": lambda w, g: FULL if w == g[-1] else FULL + 0.2,
}


def drive(grid: list[int], passed: Callable[[int], bool], slots: int) -> tuple[int | None, int, int]:
    """The driver's loop: (minimal window, points used, rounds)."""
    observed: dict[int, bool] = {}
    rounds = 0
    while windows := next_windows(grid, observed, slots):
        rounds += 1
        observed.update({w: passed(w) for w in windows})
    got = answer(grid, observed)
    return got.minimal, got.points_used, rounds


def main() -> None:
    rows, worst = [], []
    for n in GRID_SIZES:
        grid = [BLOCK * (i + 1) for i in range(n)]
        for slots in SLOTS:
            for shape, loss in SHAPES.items():
                passed = lambda w, loss=loss, grid=grid: BAR.passes([loss(w, grid)] * SEEDS)
                truth = next((w for w in grid if passed(w)), None)
                minimal, points, rounds = drive(grid, passed, slots)
                rows.append({"shape": shape, "grid_size": n, "slots": slots, "minimal": minimal, "truth": truth,
                             "correct": minimal == truth, "points": points, "rounds": rounds,
                             "bound": point_bound(n)})
            runs = [drive(grid, lambda w, t=t, grid=grid: grid.index(w) >= t, slots) for t in range(n + 1)]
            worst.append({"grid_size": n, "slots": slots, "patterns": n + 1,
                          "correct": all(m == (grid[t] if t < n else None) for t, (m, _, _) in enumerate(runs)),
                          "max_points": max(p for _, p, _ in runs), "mean_points": sum(p for _, p, _ in runs) / (n + 1),
                          "max_rounds": max(r for _, _, r in runs), "mean_rounds": sum(r for _, _, r in runs) / (n + 1),
                          "bound": point_bound(n)})

    header = ("| grid | slots | bound | " + " | ".join(SHAPES) + " | all n+1 patterns: max pts / max rounds "
              "(mean) | all right |")
    lines = [header, "|" + "---|" * (len(SHAPES) + 5)]
    for w in worst:
        n, slots = w["grid_size"], w["slots"]
        cells = [f"{r['points']}/{r['rounds']}" for r in rows if r["grid_size"] == n and r["slots"] == slots]
        right = w["correct"] and all(r["correct"] for r in rows if r["grid_size"] == n and r["slots"] == slots)
        lines.append(f"| {n} | {slots} | {w['bound']} | " + " | ".join(cells)
                     + f" | {w['max_points']} / {w['max_rounds']} ({w['mean_points']:.2f} / {w['mean_rounds']:.2f})"
                     + f" | {'yes' if right else 'NO'} |")
    table = "\n".join(lines)
    print(table)

    prov = provenance()
    result = {"provenance": prov, "bar": BAR.rule("loss"), "grid": f"{BLOCK} * (1..n)", "rows": rows,
              "worst_case": worst}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "search.json").write_text(json.dumps(result, indent=2) + "\n")
    over = [w for w in worst if w["max_points"] > w["bound"]]
    wrong = [r for r in rows if not r["correct"]] + [w for w in worst if not w["correct"]]
    write_section(HERE / "sweep.md", "bench_search", "## The window search: points used against the grid\n\n"
        "Command: `python benchmarks/bench_search.py` (JSON: `benchmarks/results/search.json`).\n\n"
        f"Recorded {prov['date']} at commit {prov['commit']}, Python {prov['python']}.\n\n"
        f"Each cell is grid points evaluated / rounds for one curve shape; grids are {BLOCK} x (1..n), "
        f"{BAR.rule('loss')}.\n\n" + table + "\n\n"
        "- The search is k-ary bisection: each round evaluates up to `slots` windows, sized so the worst case "
        "never exceeds the bound ceil(log2 n) + 2, with the fewest rounds at worst. Plain bisection needs "
        "ceil(log2(n + 1)) points, so the bound leaves only one or two spare points. That spare buys fewer "
        "rounds with 2 or 4 slots. Beyond about 4 slots it buys nothing more.\n"
        f"- {'Every minimum matched the true one' if not wrong else f'{len(wrong)} minima were WRONG'}; "
        f"{len(over) or 'no'} (grid, slots) went over the bound. The worst-case column runs all n + 1 monotone "
        "pass patterns of the grid.\n"
    )


if __name__ == "__main__":
    main()
