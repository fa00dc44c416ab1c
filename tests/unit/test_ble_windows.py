"""The timing rules of windowed notification reading (gatewayd/sources/ble_windows.py)."""

from __future__ import annotations

import itertools
import math

import pytest

from gatewayd.sources.ble_windows import MARGIN_S, RateMeter, next_window, window_delay, windowed

T = 1_800_000_000.0  # a whole second of the wall clock


@pytest.mark.parametrize("period", [0.05, 0.1, 0.125, 0.25, 0.5])
def test_a_window_ends_just_before_every_second(period: float) -> None:
    ends = []
    wall = T - 3.0
    while wall < T + 2.0:
        wall += window_delay(wall, period) + 1e-9
        ends.append(wall)
    for second in (T - 2, T - 1, T, T + 1):
        before = [e for e in ends if e < second]
        assert second - max(before) == pytest.approx(MARGIN_S, abs=1e-6)
    gaps = [b - a for a, b in itertools.pairwise(ends)]
    assert all(g == pytest.approx(period, abs=1e-6) for g in gaps)


def test_the_delay_is_never_negative_nor_longer_than_a_period() -> None:
    for k in range(2000):
        wall = T + k * 0.000731
        delay = window_delay(wall, 0.1)
        assert 0.0 <= delay <= 0.1 + 1e-9
        # read in the second it arrived in, unless it arrived in the margin before the next
        assert math.floor(wall + delay) == math.floor(wall) or math.ceil(wall) - wall <= MARGIN_S


def test_windows_pay_off_above_one_and_a_half_notifications_per_window() -> None:
    assert not windowed(10.0, 0.1, batching=False)
    assert windowed(15.0, 0.1, batching=False)
    # once windowed, only a rate below half a notification per window goes back
    assert windowed(6.0, 0.1, batching=True)
    assert not windowed(4.0, 0.1, batching=True)


def test_a_read_along_the_pipeline_puts_off_the_window_of_our_own() -> None:
    # read by the pipeline at .1: the next window is `period` later, not at a fixed grid
    assert next_window(T + 0.1, T + 0.1, 0.3) == pytest.approx(0.3)
    # ... but never past the end of the second
    assert next_window(T + 0.5, T + 0.5, 0.6) == pytest.approx(0.5 - MARGIN_S)
    # inside the margin, the second's window is done: the next second's end bounds it
    assert next_window(T + 1 - MARGIN_S / 2, T + 1 - MARGIN_S / 2, 0.6) == pytest.approx(0.6)
    # overdue: at once
    assert next_window(T + 0.9, T + 0.1, 0.6) == 0.0


def _reads(
    period: float, pipeline_wakes: tuple[float, ...], seconds: int = 5
) -> list[tuple[float, bool]]:
    """Simulate the batcher: the pipeline reads at `pipeline_wakes` into every second (and
    postpones our timer), our own windows read when next_window says. Returns (time, own)."""
    reads: list[tuple[float, bool]] = []
    wall = T
    timer = wall + next_window(wall, wall, period)
    wakes = [T + s + w for s in range(seconds) for w in pipeline_wakes]
    while wall < T + seconds:
        if wakes and wakes[0] <= timer:
            wall = wakes.pop(0)
            own = False
        else:
            wall = timer
            own = True
        reads.append((wall, own))
        timer = wall + next_window(wall, wall, period)
    return reads


def test_with_the_pipeline_waking_twice_a_second_one_window_of_our_own_per_second() -> None:
    reads = _reads(0.6, (0.1, 0.6 + 0.001))  # the pipeline's wakes: a second's close + grace, +0.5
    own = [wall for wall, mine in reads if mine and wall < T + 5]
    assert len(own) == 5
    assert all(w - math.floor(w) == pytest.approx(1 - MARGIN_S) for w in own)
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(reads)]
    assert max(gaps) <= 0.6


@pytest.mark.parametrize("period", [0.1, 0.25, 0.6, 1.0])
def test_every_arrival_is_read_in_its_own_second_and_waits_at_most_a_period(
    period: float,
) -> None:
    reads = [wall for wall, _ in _reads(period, (0.1, 0.6))]
    for k in range(1, 4000):
        arrival = T + k * 0.001137
        read = next(r for r in reads if r >= arrival)
        assert read - arrival <= period + 1e-9
        in_margin = math.ceil(arrival) - arrival <= MARGIN_S
        assert math.floor(read) == math.floor(arrival) or in_margin


def test_the_rate_is_the_last_whole_second_or_this_one_once_larger() -> None:
    meter = RateMeter()
    meter.add(T + 0.5, 30)
    assert meter.rate(T + 0.9) == 30
    meter.add(T + 1.2, 5)
    assert meter.rate(T + 1.3) == 30  # the last whole second's
    meter.add(T + 1.4, 40)
    assert meter.rate(T + 1.5) == 45
    # a silent second in between: nothing carried over
    assert meter.rate(T + 3.1) == 0
