from __future__ import annotations

import math

import pytest

from gatewayd.decode.counters import Deriver, delta
from gatewayd.model import DataType, Measure, Reading


@pytest.mark.parametrize(
    ("cur", "prev", "modulus", "expected"),
    [
        (5, 250, 256, 11),
        (0, 255, 256, 1),
        (728, 65223, 65536, 1041),
        (3, 0xFFFFFFFF, 1 << 32, 4),
        (7, 7, 65536, 0),
    ],
)
def test_delta_wraps_at_every_width(cur, prev, modulus, expected):
    assert delta(cur, prev, modulus) == expected


def crank(count: int, time: int) -> Reading:
    return Reading(
        Measure.CRANK_REVS, count=count, count_mod=65536, time=time, time_mod=65536, tick_hz=1024.0
    )


def test_cadence_only_when_the_event_time_changes_and_across_rollover():
    deriver = Deriver()
    assert deriver.derive(crank(65535, 65000), 0.0) == []
    (cadence,) = deriver.derive(crank(1, 65000 + 1024 - 65536), 1.0)  # 2 revs in 1 s, both wrap
    assert cadence.t is DataType.BIKE_CADENCE and cadence.val == pytest.approx(120.0)
    assert deriver.derive(crank(1, 65000 + 1024 - 65536), 1.25) == []  # stale repeat


def test_a_gap_over_max_gap_discards_the_delta():
    deriver = Deriver(max_gap=60.0)
    deriver.derive(crank(10, 0), 0.0)
    assert deriver.derive(crank(20, 1024), 61.0) == []
    (cadence,) = deriver.derive(crank(21, 2048), 62.0)
    assert cadence.val == pytest.approx(60.0)


def test_power_events_average_over_skipped_events():
    deriver = Deriver()
    first = Reading(Measure.POWER_EVENTS, count=239, count_mod=256, accum=31029, accum_mod=65536)
    skipped = Reading(Measure.POWER_EVENTS, count=243, count_mod=256, accum=31329, accum_mod=65536)
    deriver.derive(first, 0.0)
    (power,) = deriver.derive(skipped, 1.0)
    assert power.val == pytest.approx(75.0)


def test_torque_events_give_power_and_cadence():
    deriver = Deriver()
    base = dict(count_mod=256, time_mod=65536, accum_mod=65536, tick_hz=2048.0)
    deriver.derive(Reading(Measure.TORQUE_EVENTS, count=1, time=0, accum=0, **base), 0.0)
    power, cadence = deriver.derive(
        Reading(Measure.TORQUE_EVENTS, count=2, time=2048, accum=32 * 20, **base), 1.0
    )
    assert power.val == pytest.approx(128 * math.pi * 640 / 2048)
    assert cadence.val == pytest.approx(60.0)


def test_wheel_speed_uses_the_circumference():
    deriver = Deriver(circumference_m=2.0)
    wheel = dict(count_mod=1 << 32, time_mod=65536, tick_hz=1024.0)
    deriver.derive(Reading(Measure.WHEEL_REVS, count=0xFFFFFFFF, time=0, **wheel), 0.0)
    (speed,) = deriver.derive(Reading(Measure.WHEEL_REVS, count=4, time=1024, **wheel), 1.0)
    assert speed.val == pytest.approx(10.0)


def test_rr_from_consecutive_beats_only_when_exactly_one_beat_passed():
    deriver = Deriver()
    beats = dict(count_mod=256, time_mod=65536, tick_hz=1024.0)
    deriver.derive(Reading(Measure.HEART_BEATS, count=255, time=65223, **beats), 0.0)
    (rr,) = deriver.derive(Reading(Measure.HEART_BEATS, count=0, time=728, **beats), 1.0)
    assert rr.d == pytest.approx((1016.6015625,))
    assert deriver.derive(Reading(Measure.HEART_BEATS, count=0, time=728, **beats), 1.25) == []
    assert deriver.derive(Reading(Measure.HEART_BEATS, count=2, time=2800, **beats), 2.0) == []
