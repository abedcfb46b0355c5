"""The minimal-window search: the pass bar set by the baseline's seeds, and k-ary bisection on a window grid.

Pure logic (stdlib and numpy). The sweep driver evaluates the windows ``next_windows`` proposes, judges
each with ``Bar.passes`` over its seeds, and calls ``answer`` once ``next_windows`` returns [].

Passing is assumed monotone in the window (a bigger window is at least as good). On a grid of n windows
there are n + 1 outcomes (any index is the minimum, or none passes), so plain bisection needs at most
ceil(log2(n + 1)) points; ``point_bound`` allows one or two more, and rounds with several slots spend
that slack on evaluating several points at once (fewer rounds). A violation seen in the observations
(a smaller window passed, a larger one failed) is reported, the grid points between are evaluated, and
the minimum becomes the smallest passing window with no failing window observed above it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Literal

import numpy as np

Direction = Literal["minimize", "maximize"]
ToleranceKind = Literal["absolute", "relative", "spread"]
_DIRECTIONS = ("minimize", "maximize")
_TOLERANCE_KINDS = ("absolute", "relative", "spread")


def _num(x: float) -> str:
    """A metric value for humans: 3 decimals in the usual range, else 4 significant digits."""
    return f"{x:.3f}" if x == 0 or 1e-2 <= abs(x) < 1e5 else f"{x:.4g}"


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


@dataclass(frozen=True)
class Bar:
    """The pass/fail rule a window is judged by, set by the baseline's seeds."""

    baseline_mean: float
    baseline_spread: float  # sample std over seeds (ddof=1), 0.0 for one seed
    threshold: float  # a window passes when its mean is <= threshold (minimize) or >= threshold (maximize)
    direction: Direction
    tolerance: float
    tolerance_kind: ToleranceKind
    seeds: int = 1  # how many baseline seeds set the bar (for rule())

    @classmethod
    def from_baseline(
        cls, values: Sequence[float], tolerance: float, tolerance_kind: ToleranceKind, direction: Direction
    ) -> Bar:
        """The bar from the baseline's per-seed objective values: mean, plus (minimize) or minus (maximize)
        the tolerance as an absolute amount, a fraction of |mean|, or a multiple of the seed spread."""
        if direction not in _DIRECTIONS:
            raise ValueError(f"direction must be 'minimize' or 'maximize', got {direction!r}")
        if tolerance_kind not in _TOLERANCE_KINDS:
            raise ValueError(f"tolerance_kind must be 'absolute', 'relative' or 'spread', got {tolerance_kind!r}")
        tol = float(tolerance)
        if not math.isfinite(tol) or tol < 0:
            raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
        xs = [float(v) for v in values]
        if not xs:
            raise ValueError("baseline values are empty: give the baseline's objective for at least one seed")
        for i, x in enumerate(xs):
            if not math.isfinite(x):
                raise ValueError(f"baseline value {i} is {x}: every seed's objective must be finite")
        mean = _mean(xs)
        spread = float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0
        margin = {"absolute": tol, "relative": tol * abs(mean), "spread": tol * spread}[tolerance_kind]
        threshold = mean + margin if direction == "minimize" else mean - margin
        return cls(mean, spread, threshold, direction, tol, tolerance_kind, len(xs))

    def passes(self, values: Sequence[float]) -> bool:
        """Whether a window's mean objective over its seeds meets the bar; no values or a non-finite
        value (a diverged or crashed seed) fails."""
        xs = [float(v) for v in values]
        if not xs or not all(math.isfinite(x) for x in xs):
            return False
        mean = _mean(xs)
        return mean <= self.threshold if self.direction == "minimize" else mean >= self.threshold

    def rule(self, metric: str = "objective") -> str:
        """The rule in one human line, for logs and the sweep's report."""
        cmp, sign = ("<=", "+") if self.direction == "minimize" else (">=", "-")
        seeds = f"{self.seeds} seed" + ("" if self.seeds == 1 else "s")
        tol = {"absolute": "absolute", "relative": "x |mean| relative", "spread": "x spread"}[self.tolerance_kind]
        return (f"pass when mean {metric} over seeds {cmp} {_num(self.threshold)} (baseline "
                f"{_num(self.baseline_mean)} ± {_num(self.baseline_spread)} over {seeds} {sign} "
                f"{self.tolerance:g} {tol})")


def point_bound(grid_size: int) -> int:
    """The most grid points a monotone search evaluates: ceil(log2(grid_size)) + 2 (2 for one point)."""
    if isinstance(grid_size, bool) or not isinstance(grid_size, (int, np.integer)) or grid_size < 1:
        raise ValueError(f"grid_size must be an int >= 1, got {grid_size!r}")
    return (int(grid_size) - 1).bit_length() + 2


def _check_grid(grid: Sequence[int]) -> list[int]:
    out: list[int] = []
    for i, w in enumerate(grid):
        if isinstance(w, (bool, np.bool_)) or not isinstance(w, (int, np.integer)):
            raise ValueError(f"grid[{i}] = {w!r} is not an int: the grid holds window sizes")
        if w < 1:
            raise ValueError(f"grid[{i}] = {w} is not positive: windows are >= 1 token")
        if out and w <= out[-1]:
            raise ValueError(f"grid must be sorted ascending with distinct windows: grid[{i}] = {w} follows {out[-1]}")
        out.append(int(w))
    if not out:
        raise ValueError("grid is empty: give at least one window size")
    return out


def _check_observed(grid: list[int], observed: Mapping[int, bool]) -> dict[int, bool]:
    """Observed outcomes by grid index."""
    index = {w: i for i, w in enumerate(grid)}
    out: dict[int, bool] = {}
    for w, passed in observed.items():
        if int(w) not in index:
            raise ValueError(f"observed window {w} is not on the grid {grid}")
        if not isinstance(passed, (bool, np.bool_)):
            raise ValueError(f"observed[{w}] = {passed!r} must be a bool (whether the window passed)")
        out[index[int(w)]] = bool(passed)
    return out


def _state(n: int, obs: dict[int, bool]) -> tuple[list[int], int, int]:
    """(indices still to fill between violating pairs, lo, hi): the minimum is one of lo..hi, hi == n
    meaning none. lo is one past the largest failing index, hi the smallest passing index above it;
    with monotone observations lo is one past the largest failing index below the smallest passing one,
    and every index in lo..hi-1 is unobserved."""
    passing = [i for i, p in obs.items() if p]
    failing = [i for i, p in obs.items() if not p]
    max_fail = max(failing, default=-1)
    min_pass = min(passing, default=n)
    fill = [i for i in range(min_pass + 1, max_fail) if i not in obs]  # empty unless min_pass < max_fail
    lo = max_fail + 1
    hi = min((i for i in passing if i > max_fail), default=n)
    return fill, lo, hi


def _worst_points(candidates: int) -> int:
    """Points plain bisection needs at worst for this many candidates (candidates + 1 outcomes):
    ceil(log2(candidates + 1))."""
    return candidates.bit_length()


@cache
def _plan(candidates: int, budget: int, slots: int) -> tuple[int, int]:
    """(worst-case rounds, k) for the next round: over the k <= slots whose round (k points spread evenly)
    can still finish within the budget of points at worst, the k with the fewest rounds at worst, the
    largest such k on ties. Picking the largest k that fits each round instead is not round-optimal
    (a 64-point grid took 5 rounds at worst with 4 slots against 4 with 2); this exact recursion over
    the (candidates, budget) states the search passes through is. Plain bisection (k = 1) when no k fits."""
    if candidates == 0:
        return 0, 0
    best: tuple[int, int] | None = None
    for k in range(1, min(slots, candidates) + 1):
        q, r = divmod(candidates - k, k + 1)  # gaps of q, and r gaps of q + 1
        if k + _worst_points(candidates // (k + 1)) > budget:  # the largest gap, q + (r > 0)
            continue
        rounds = 1 + max(_plan(q + int(r > 0), budget - k, slots)[0], _plan(q, budget - k, slots)[0])
        if best is None or rounds <= best[0]:
            best = (rounds, k)
    return best if best is not None else (_worst_points(candidates), 1)


def _spread(lo: int, candidates: int, k: int) -> list[int]:
    """k indices in lo..lo+candidates-1 splitting the rest into k + 1 gaps as even as possible."""
    q, r = divmod(candidates - k, k + 1)
    out, at = [], lo
    for j in range(k):
        at += q + (1 if j < r else 0)
        out.append(at)
        at += 1
    return out


def next_windows(grid: Sequence[int], observed: Mapping[int, bool], slots: int) -> list[int]:
    """The grid windows to evaluate next (at most `slots`, none already observed), [] when the answer is settled.

    Each round is sized so that, with monotone passing, the whole search evaluates at most
    ``point_bound(len(grid))`` windows (counted from ``len(observed)``) in the fewest rounds at worst; that
    bound leaves bisection one or two spare points, so slots beyond about 4 stay idle. It knows nothing of
    windows in flight: call again once every window of the previous round is observed (a crashed trial as
    False), or it proposes them again.
    """
    if isinstance(slots, bool) or not isinstance(slots, (int, np.integer)) or slots < 1:
        raise ValueError(f"slots must be an int >= 1, got {slots!r}")
    g = _check_grid(grid)
    obs = _check_observed(g, observed)
    fill, lo, hi = _state(len(g), obs)
    if fill:
        return [g[i] for i in fill[:slots]]
    candidates = hi - lo
    if candidates == 0:
        return []
    k = _plan(candidates, point_bound(len(g)) - len(obs), min(int(slots), candidates))[1]
    return [g[i] for i in _spread(lo, candidates, k)]


@dataclass(frozen=True)
class Answer:
    """The settled search: the minimal passing window (None: none on the grid) and how it was reached."""

    minimal: int | None  # None = "none on the grid"
    points_used: int  # number of observed grid windows
    grid_size: int
    bound: int  # point_bound(grid_size)
    non_monotone: list[tuple[int, int]]  # (smaller window that passed, larger window that failed) pairs
    note: str  # one line for humans


def answer(grid: Sequence[int], observed: Mapping[int, bool]) -> Answer:
    """The result of a settled search; ValueError when `next_windows` would still propose windows."""
    g = _check_grid(grid)
    obs = _check_observed(g, observed)
    n = len(g)
    fill, lo, hi = _state(n, obs)
    if fill or hi > lo:
        open_ = [g[i] for i in (fill or range(lo, hi))]
        raise ValueError(f"search not settled: windows {open_} are still open; call next_windows until it returns []")
    bound = point_bound(n)
    used = len(obs)
    pairs = sorted((g[i], g[j]) for i, p in obs.items() if p for j, q in obs.items() if not q and i < j)
    counts = f"{used} of {n} grid points evaluated, {'over the ' if used > bound else ''}bound {bound}"
    if hi < n:
        note = f"minimal window {g[hi]} ({counts})"
    else:
        note = f"none on the grid: the largest window {g[-1]} fails ({counts})"
    if pairs:
        widest = (g[min(i for i, p in obs.items() if p)], g[max(i for i, p in obs.items() if not p)])
        note += (f"; NOT MONOTONE: {len(pairs)} pair(s) where a smaller window passed and a larger one failed, "
                 f"widest {widest[0]} passed but {widest[1]} failed; the windows between were evaluated and the "
                 f"minimum is the smallest passing window with no failing window above it")
    return Answer(g[hi] if hi < n else None, used, n, bound, pairs, note)
