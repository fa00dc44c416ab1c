"""The timing rules of windowed notification reading (gatewayd/sources/ble_batch.py)."""

from __future__ import annotations

import itertools
import math

import pytest

from gatewayd.sources.ble_batch import MARGIN_S, window_delay, windowed

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
