"""The minimal-window search: the bar, and the search driven to the end on curves, noise, non-monotone data."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sweeps.search import Answer, Bar, answer, next_windows, point_bound

SEEDS = (0, 1, 2)


# ---- the bar ------------------------------------------------------------------------------------------


def test_bar_absolute_minimize_three_seeds():
    bar = Bar.from_baseline([4.07, 4.10, 4.13], 0.05, "absolute", "minimize")
    assert bar.baseline_mean == pytest.approx(4.10)
    assert bar.baseline_spread == pytest.approx(0.03)
    assert bar.threshold == pytest.approx(4.15)
    assert bar.seeds == 3
    assert bar.rule("eval/val_loss") == (
        "pass when mean eval/val_loss over seeds <= 4.150 (baseline 4.100 ± 0.030 over 3 seeds + 0.05 absolute)")


def test_bar_absolute_maximize():
    bar = Bar.from_baseline([0.80, 0.90], 0.05, "absolute", "maximize")
    assert bar.threshold == pytest.approx(0.80)
    assert bar.baseline_spread == pytest.approx(math.sqrt(0.005))
    assert bar.rule() == (
        "pass when mean objective over seeds >= 0.800 (baseline 0.850 ± 0.071 over 2 seeds - 0.05 absolute)")


def test_bar_relative_both_directions_and_negative_mean():
    assert Bar.from_baseline([2.0], 0.1, "relative", "minimize").threshold == pytest.approx(2.2)
    assert Bar.from_baseline([2.0], 0.1, "relative", "maximize").threshold == pytest.approx(1.8)
    # a negative mean (e.g. a log-likelihood): the margin is a fraction of |mean|, so the bar still loosens
    assert Bar.from_baseline([-2.0], 0.1, "relative", "minimize").threshold == pytest.approx(-1.8)
    assert Bar.from_baseline([-2.0], 0.1, "relative", "maximize").threshold == pytest.approx(-2.2)


def test_bar_spread_three_seeds_and_one_seed():
    bar = Bar.from_baseline([1.0, 2.0, 3.0], 2.0, "spread", "minimize")
    assert (bar.baseline_mean, bar.baseline_spread, bar.threshold) == pytest.approx((2.0, 1.0, 4.0))
    assert Bar.from_baseline([1.0, 2.0, 3.0], 2.0, "spread", "maximize").threshold == pytest.approx(0.0)
    one = Bar.from_baseline([3.5], 2.0, "spread", "minimize")  # one seed: no spread, the bar is the mean
    assert (one.baseline_spread, one.threshold, one.seeds) == (0.0, 3.5, 1)
    assert "over 1 seed + 2 x spread" in one.rule()


@pytest.mark.parametrize("values, match", [
    ([], "empty"),
    ([1.0, float("nan")], "baseline value 1 is nan"),
    ([float("inf"), 1.0], "baseline value 0 is inf"),
    ([1.0, float("-inf")], "baseline value 1 is -inf"),
])
def test_bar_rejects_empty_and_non_finite_baselines(values, match):
    with pytest.raises(ValueError, match=match):
        Bar.from_baseline(values, 0.05, "absolute", "minimize")


@pytest.mark.parametrize("kwargs, match", [
    ({"tolerance": -0.1}, "tolerance must be a finite number >= 0"),
    ({"tolerance": float("nan")}, "tolerance must be a finite number >= 0"),
    ({"tolerance_kind": "percent"}, "tolerance_kind must be"),
    ({"direction": "lower"}, "direction must be"),
])
def test_bar_rejects_bad_settings(kwargs, match):
    args = {"values": [1.0], "tolerance": 0.05, "tolerance_kind": "absolute", "direction": "minimize"} | kwargs
    with pytest.raises(ValueError, match=match):
        Bar.from_baseline(**args)


def test_bar_passes_on_the_mean_over_seeds():
    low = Bar.from_baseline([4.0], 0.25, "absolute", "minimize")  # threshold 4.25 (exact in binary)
    assert low.passes([4.0, 4.5])  # mean 4.25: on the bar passes, though one seed alone is far above
    assert not low.passes([4.0, 4.51])
    assert low.passes(np.array([4.25]))
    assert not low.passes([])
    assert not low.passes([4.0, float("nan")])  # a diverged seed fails the window
    assert not low.passes([float("-inf")])
    high = Bar.from_baseline([0.9], 0.1, "absolute", "maximize")  # threshold 0.8
    assert high.passes([0.7, 0.9]) and not high.passes([0.7, 0.89]) and not high.passes([])


# ---- bound and validation -----------------------------------------------------------------------------


def test_point_bound_values():
    assert [point_bound(n) for n in (1, 2, 3, 4, 5, 8, 9, 16, 17, 64, 65)] == [2, 3, 4, 4, 5, 5, 6, 6, 7, 8, 9]
    with pytest.raises(ValueError, match="grid_size must be an int >= 1"):
        point_bound(0)


@pytest.mark.parametrize("grid, match", [
    ([], "grid is empty"),
    ([32, 16], r"grid\[1\] = 16 follows 32"),
    ([16, 16], r"grid\[1\] = 16 follows 16"),
    ([0, 16], r"grid\[0\] = 0 is not positive"),
    ([16, 32.0], r"grid\[1\] = 32.0 is not an int"),
])
def test_bad_grids_are_named(grid, match):
    with pytest.raises(ValueError, match=match):
        next_windows(grid, {}, 1)


def test_bad_observed_and_slots_are_named():
    with pytest.raises(ValueError, match="observed window 48 is not on the grid"):
        next_windows([16, 32, 64], {48: True}, 1)
    with pytest.raises(ValueError, match=r"observed\[32\] = 1.0 must be a bool"):
        next_windows([16, 32, 64], {32: 1.0}, 1)
    with pytest.raises(ValueError, match="slots must be an int >= 1"):
        next_windows([16, 32, 64], {}, 0)


def test_answer_on_an_unsettled_search_raises():
    grid = [16, 32, 64, 128]
    with pytest.raises(ValueError, match=r"search not settled: windows \[16, 32, 64, 128\]"):
        answer(grid, {})
    with pytest.raises(ValueError, match=r"search not settled: windows \[16\]"):
        answer(grid, {32: True, 128: True})


# ---- the driver, simulated ----------------------------------------------------------------------------


def drive(grid: Sequence[int], passed: Callable[[int], bool], slots: int,
          observed: dict[int, bool] | None = None) -> tuple[Answer, int, dict[int, bool]]:
    """What the sweep driver does: evaluate each proposed round, observe, repeat until [], then answer.
    Returns (answer, rounds, observed); checks every round's size and that nothing is proposed twice."""
    observed = dict(observed or {})
    rounds = 0
    while windows := next_windows(grid, observed, slots):
        assert 1 <= len(windows) <= slots
        assert not set(windows) & set(observed), "a window was proposed again"
        assert set(windows) <= set(grid)
        rounds += 1
        for w in windows:
            observed[w] = passed(w)
        assert rounds <= len(grid), "the search did not converge"
    return answer(grid, observed), rounds, observed


def objective_judge(objective: Callable[[int, int], float], bar: Bar) -> Callable[[int], bool]:
    """A window passes when its objective over SEEDS, averaged, meets the bar (as the driver judges it)."""
    return lambda w: bar.passes([objective(w, s) for s in SEEDS])


def true_minimum(grid: Sequence[int], passed: Callable[[int], bool]) -> int | None:
    return next((w for w in grid if passed(w)), None)


FULL = 2.0  # the full-attention baseline's loss (every seed)
BAR = Bar.from_baseline([FULL] * 3, 0.05, "absolute", "minimize")  # pass when mean loss <= 2.05

# loss(window, grid): deterministic curves of many shapes, scaled to the grid's range
CURVES: dict[str, Callable[[int, Sequence[int]], float]] = {
    "step": lambda w, g: FULL + (1.0 if w < g[len(g) // 2] else 0.0),
    "linear": lambda w, g: FULL + 0.2 * (g[-1] - w) / (g[-1] - g[0] + 1),
    "exp_decay": lambda w, g: FULL + 2.0 * math.exp(-8.0 * w / g[-1]),
    "plateau_then_drop": lambda w, g: FULL + (0.5 if w < 0.6 * g[-1] else 2.5 * max(0.0, 0.8 - w / g[-1])),
    "all_pass": lambda w, g: FULL,
    "none_pass": lambda w, g: FULL + 0.5,
    "only_largest": lambda w, g: FULL if w == g[-1] else FULL + 0.2,
}

GRIDS = (
    [[64 * (i + 1) for i in range(n)] for n in range(1, 21)]  # block-aligned, sizes 1..20
    + [[16 << i for i in range(n)] for n in (6, 10, 16)]  # powers of two
    + [[24, 40, 72, 136, 200, 264, 520], [100, 300, 700], [7], [3, 5, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43]]
)


@pytest.mark.parametrize("slots", [1, 2, 4])
@pytest.mark.parametrize("shape", list(CURVES))
def test_finds_the_true_minimum_on_every_curve_and_grid(shape, slots):
    curve = CURVES[shape]
    for grid in GRIDS:
        passed = objective_judge(lambda w, s, g=grid: curve(w, g), BAR)
        got, rounds, observed = drive(grid, passed, slots)
        truth = true_minimum(grid, passed)
        assert got.minimal == truth, (shape, grid)
        assert got.points_used == len(observed) <= got.bound == point_bound(len(grid)), (shape, grid)
        assert got.non_monotone == [] and "NOT MONOTONE" not in got.note
        if truth is None:
            assert got.note.startswith(f"none on the grid: the largest window {grid[-1]} fails")
        else:
            assert got.note == (f"minimal window {truth} ({got.points_used} of {len(grid)} grid points evaluated, "
                                f"bound {got.bound})")


def test_curve_shapes_cover_the_extremes():
    grid = [64 * (i + 1) for i in range(8)]
    mins = {s: true_minimum(grid, objective_judge(lambda w, s_, c=c: c(w, grid), BAR)) for s, c in CURVES.items()}
    assert mins == {"step": 320, "linear": 448, "exp_decay": 256, "plateau_then_drop": 448, "all_pass": 64,
                    "none_pass": None, "only_largest": 512}


def noise(window: int, seed: int) -> float:
    """Seeded noise, std 0.03, fixed per (seed, window); window 0 is the full-attention baseline."""
    return 0.03 * float(np.random.default_rng([seed, window]).standard_normal())


def noisy_loss(window: int, seed: int) -> float:
    """Loss decaying in the window toward the full-attention loss, plus seeded noise."""
    return FULL + 1.5 * math.exp(-window / 128) + noise(window, seed)


@pytest.mark.parametrize("slots", [1, 2, 4])
def test_noisy_seeds_the_mean_crosses_the_bar_at_512(slots):
    bar = Bar.from_baseline([FULL + noise(0, s) for s in SEEDS], 0.05, "absolute", "minimize")
    assert bar.threshold == pytest.approx(2.057, abs=5e-4)
    grid = [16, 32, 64, 128, 256, 384, 512, 768, 1024, 2048]
    passed = objective_judge(noisy_loss, bar)
    # the setting is noisy: at 384 two of the three seeds pass alone, but their mean does not
    assert [bar.passes([noisy_loss(384, s)]) for s in SEEDS] == [True, True, False]
    assert [passed(w) for w in grid] == [False] * 6 + [True] * 4  # the mean's pass pattern is monotone
    got, _, _ = drive(grid, passed, slots)
    assert got.minimal == 512 and got.points_used <= point_bound(len(grid))
    one_seed, _, _ = drive(grid, lambda w: bar.passes([noisy_loss(w, 0)]), slots)
    assert one_seed.minimal == 384  # judging by one seed would have picked a window that fails on average


# ---- non-monotone -------------------------------------------------------------------------------------

GRID16 = [64 * (i + 1) for i in range(16)]


def dip(bad: set[int]) -> Callable[[int], bool]:
    """Passes from grid index 2 up, except at the indices in `bad` (a non-monotone dip)."""
    return lambda w: GRID16.index(w) >= 2 and GRID16.index(w) not in bad


def test_non_monotone_dip_is_flagged_filled_and_never_answered_below_a_failure():
    got, _, observed = drive(GRID16, dip({9, 10}), slots=4)
    # round 1 (256, 512, 704, 896) sees 256 pass and 704 fail: every window between is then evaluated
    assert all(w in observed for w in GRID16[3:10])
    assert (256, 704) in got.non_monotone and (256, 640) in got.non_monotone
    assert all(a < b and observed[a] and not observed[b] for a, b in got.non_monotone)
    assert len(got.non_monotone) == 12
    failing = [w for w, p in observed.items() if not p]
    assert got.minimal == 768 and got.minimal > max(failing)  # never a window with a failing one above it
    assert all(observed[w] for w in observed if w >= got.minimal)
    assert got.points_used == 11 > got.bound == 6
    assert got.note.startswith("minimal window 768 (11 of 16 grid points evaluated, over the bound 6); NOT MONOTONE: "
                               "12 pair(s) where a smaller window passed and a larger one failed, widest 256 passed "
                               "but 704 failed")


def test_non_monotone_fill_respects_slots_and_prior_observations():
    grid = [16, 32, 64, 128, 256, 512]
    # a resumed sweep brings a violation from earlier trials: 32 passed, 256 failed
    assert next_windows(grid, {32: True, 256: False}, 1) == [64]
    assert next_windows(grid, {32: True, 256: False}, 4) == [64, 128]
    passed = {16: False, 32: True, 64: True, 128: False, 256: False, 512: True}.__getitem__
    got, rounds, observed = drive(grid, passed, 1, observed={32: True, 256: False})
    assert rounds == 3 and observed == {32: True, 64: True, 128: False, 256: False, 512: True}  # 64, 128, 512
    assert got.minimal == 512
    assert got.non_monotone == [(32, 128), (32, 256), (64, 128), (64, 256)]


def test_non_monotone_with_nothing_passing_at_the_top_is_none_on_the_grid():
    grid = [16, 32, 64, 128]
    got, _, observed = drive(grid, {16: False, 32: True, 64: True, 128: False}.__getitem__, 1,
                             observed={32: True, 128: False})
    assert got.minimal is None and observed[64] is True
    assert got.note.startswith("none on the grid: the largest window 128 fails")
    assert "NOT MONOTONE" in got.note


# ---- rounds, the bound, exhaustively ------------------------------------------------------------------


def threshold_judge(grid: Sequence[int], t: int) -> Callable[[int], bool]:
    """The monotone pattern whose minimum is grid index t (t == len(grid): none passes)."""
    return lambda w: grid.index(w) >= t


def test_rounds_shrink_with_slots_on_a_16_point_grid():
    rounds = {}
    for slots in (1, 2, 4):
        rounds[slots] = []
        for t in range(17):
            got, r, _ = drive(GRID16, threshold_judge(GRID16, t), slots)
            assert got.minimal == (GRID16[t] if t < 16 else None) and got.points_used <= 6
            rounds[slots].append(r)
    assert max(rounds[1]) == 5 and max(rounds[2]) == 3 and max(rounds[4]) == 3
    assert sum(rounds[4]) < sum(rounds[2]) < sum(rounds[1])
    assert all(a >= b for a, b in zip(rounds[1], rounds[4], strict=True))


def test_bound_holds_exhaustively_for_every_monotone_pattern():
    """All n + 1 monotone patterns, n in 1..40 (and 64), slots 1..6: minimum right, points within the bound,
    and worst-case rounds never grow with more slots."""
    for n in [*range(1, 41), 64]:
        grid = list(range(1, n + 1))
        worst_rounds = []
        for slots in range(1, 7):
            worst = 0
            for t in range(n + 1):
                got, r, _ = drive(grid, threshold_judge(grid, t), slots)
                assert got.minimal == (grid[t] if t < n else None), (n, t, slots)
                assert got.points_used <= point_bound(n), (n, t, slots, got.points_used)
                worst = max(worst, r)
            worst_rounds.append(worst)
        assert worst_rounds == sorted(worst_rounds, reverse=True), (n, worst_rounds)


@st.composite
def grids_and_thresholds(draw: st.DrawFn) -> tuple[list[int], int]:
    grid = sorted(draw(st.sets(st.integers(1, 1 << 20), min_size=1, max_size=80)))
    return grid, draw(st.integers(0, len(grid)))


@settings(max_examples=200, deadline=None)
@given(grids_and_thresholds(), st.integers(1, 6))
def test_property_random_grids_minimum_and_bound(grid_t, slots):
    grid, t = grid_t
    got, _, _ = drive(grid, threshold_judge(grid, t), slots)
    assert got.minimal == (grid[t] if t < len(grid) else None)
    assert got.points_used <= point_bound(len(grid)) == got.bound
    assert got.grid_size == len(grid) and got.non_monotone == []
