"""Rollover-safe deltas and the Deriver: wraps at every width, stale repeats, skipped events."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gatewayd.decode.counters import Derived, Deriver, delta
from gatewayd.model import DataType, Measure, Reading

U8, U16, U32 = 1 << 8, 1 << 16, 1 << 32


@pytest.mark.parametrize(
    ("cur", "prev", "modulus", "want"),
    [
        (5, 250, U8, 11),
        (0, 255, U8, 1),
        (255, 0, U8, 255),
        (728, 65223, U16, 1041),
        (0, 65535, U16, 1),
        (3, U32 - 2, U32, 5),
        (7, 7, U32, 0),
    ],
)
def test_delta_wraps(cur: int, prev: int, modulus: int, want: int) -> None:
    assert delta(cur, prev, modulus) == want


@given(st.sampled_from([U8, U16, U32]), st.integers(min_value=0), st.integers(min_value=0))
@settings(max_examples=2_000, deadline=None)
def test_delta_inverts_modular_addition(modulus: int, start: int, step: int) -> None:
    prev, step = start % modulus, step % modulus
    assert delta((prev + step) % modulus, prev, modulus) == step


def _crank(count: int, time: int) -> Reading:
    return Reading(
        Measure.CRANK_REVS, count=count, count_mod=U16, time=time, time_mod=U16, tick_hz=1024.0
    )


def _wheel(count: int, time: int, tick_hz: float = 1024.0) -> Reading:
    return Reading(
        Measure.WHEEL_REVS, count=count, count_mod=U32, time=time, time_mod=U16, tick_hz=tick_hz
    )


def _beats(count: int, time: int) -> Reading:
    return Reading(
        Measure.HEART_BEATS, count=count, count_mod=U8, time=time, time_mod=U16, tick_hz=1024.0
    )


def _power(events: int, accum: int) -> Reading:
    return Reading(Measure.POWER_EVENTS, count=events, count_mod=U8, accum=accum, accum_mod=U16)


def _vals(derived: list[Derived], t: DataType) -> list[float | None]:
    return [d.val for d in derived if d.t is t]


def test_crank_wraps_count_and_time_u16() -> None:
    deriver = Deriver()
    assert deriver.derive(_crank(65535, 65000), 0.0) == []
    got = deriver.derive(_crank(1, (65000 + 1024) % U16), 1.0)
    assert got == [Derived(DataType.BIKE_CADENCE, val=120.0)]


def test_wheel_wraps_count_u32() -> None:
    deriver = Deriver(circumference_m=2.0)
    deriver.derive(_wheel(U32 - 1, 100), 0.0)
    assert deriver.derive(_wheel(2, 100 + 1024), 1.0) == [Derived(DataType.SPEED, val=6.0)]


def test_wheel_counter_reset_gives_nothing_then_resumes() -> None:
    deriver = Deriver(circumference_m=2.0)
    deriver.derive(_wheel(500_000, 100), 0.0)
    assert deriver.derive(_wheel(3, 1124), 1.0) == []  # went backwards: a reset, not 4e9 turns
    assert deriver.derive(_wheel(4, 2148), 2.0) == [Derived(DataType.SPEED, val=2.0)]


def test_beats_wrap_u8() -> None:
    deriver = Deriver()
    deriver.derive(_beats(255, 65000), 0.0)
    got = deriver.derive(_beats(0, (65000 + 1024) % U16), 1.0)
    assert got == [Derived(DataType.RR_INTERVAL, d=(1000.0,))]


def test_stale_repeats_give_nothing_then_one_zero_then_resume() -> None:
    deriver = Deriver(stop_after=3.0)
    deriver.derive(_crank(10, 1000), 0.0)
    assert _vals(deriver.derive(_crank(11, 2024), 1.0), DataType.BIKE_CADENCE) == [60.0]
    repeats = [deriver.derive(_crank(11, 2024), 1.0 + 0.25 * i) for i in range(1, 20)]
    zeros = [d for out in repeats for d in out]
    assert zeros == [Derived(DataType.BIKE_CADENCE, val=0.0)]
    assert repeats[11] == zeros  # the first repeat 3 s after the last event
    # Pedalling again: the next event gives a rate again from the held baseline.
    assert _vals(deriver.derive(_crank(12, 2024 + 2048), 6.0), DataType.BIKE_CADENCE) == [30.0]


def test_zero_after_stop_for_every_rate_stream() -> None:
    torque = Reading(Measure.TORQUE_EVENTS, count=1, count_mod=U8, time=0, time_mod=U16,
                     tick_hz=2048.0, accum=0, accum_mod=U16)  # fmt: skip
    wheel_torque = Reading(Measure.WHEEL_TORQUE_EVENTS, count=1, count_mod=U8, time=0,
                           time_mod=U16, tick_hz=2048.0, accum=0, accum_mod=U16)  # fmt: skip
    cases = [
        (_crank(1, 1), {DataType.BIKE_CADENCE}),
        (_wheel(1, 1), {DataType.SPEED}),
        (_power(1, 1), {DataType.POWER}),
        (torque, {DataType.POWER, DataType.BIKE_CADENCE}),
        (wheel_torque, {DataType.POWER, DataType.SPEED}),
    ]
    for reading, types in cases:
        deriver = Deriver(stop_after=2.0)
        assert deriver.derive(reading, 0.0) == []
        assert deriver.derive(reading, 1.0) == []
        zeros = deriver.derive(reading, 2.0)
        assert {d.t for d in zeros} == types and all(d.val == 0.0 for d in zeros)
        assert deriver.derive(reading, 3.0) == []


def test_heart_beats_never_zero_and_repeat_nothing() -> None:
    deriver = Deriver(stop_after=1.0)
    deriver.derive(_beats(3, 100), 0.0)
    assert [deriver.derive(_beats(3, 100), t / 4) for t in range(1, 40)] == [[]] * 39


def test_power_skipped_events_average_and_u16_accumulator_wrap() -> None:
    deriver = Deriver()
    deriver.derive(_power(250, 65400), 0.0)
    # 9 events (250 -> 3 across the u8 wrap), 1800 W*events (across the u16 wrap): 200 W.
    assert deriver.derive(_power(3, (65400 + 1800) % U16), 2.0) == [
        Derived(DataType.POWER, val=200.0)
    ]


def test_torque_period_zero_is_no_value() -> None:
    deriver = Deriver()
    first = Reading(Measure.TORQUE_EVENTS, count=1, count_mod=U8, time=5, time_mod=U16,
                    tick_hz=2048.0, accum=0, accum_mod=U16)  # fmt: skip
    second = Reading(Measure.TORQUE_EVENTS, count=2, count_mod=U8, time=5, time_mod=U16,
                     tick_hz=2048.0, accum=10, accum_mod=U16)  # fmt: skip
    deriver.derive(first, 0.0)
    assert deriver.derive(second, 1.0) == []


def test_crank_time_unchanged_with_new_revs_is_contradictory_and_ignored() -> None:
    deriver = Deriver()
    deriver.derive(_crank(1, 500), 0.0)
    assert deriver.derive(_crank(2, 500), 1.0) == []
    assert deriver.derive(_crank(3, 1524), 2.0) == [Derived(DataType.BIKE_CADENCE, val=60.0)]


def test_baseline_older_than_max_gap_is_discarded() -> None:
    deriver = Deriver(max_gap=60.0)
    deriver.derive(_crank(1, 0), 0.0)
    # 70 s later the u16 1/1024 s time has wrapped once: the delta would claim 6 s.
    assert deriver.derive(_crank(2, (70 * 1024) % U16), 70.0) == []
    assert deriver.derive(_crank(3, (71 * 1024) % U16), 71.0) == [
        Derived(DataType.BIKE_CADENCE, val=60.0)
    ]


def test_stale_repeats_do_not_keep_an_old_baseline_alive() -> None:
    deriver = Deriver(max_gap=60.0)
    deriver.derive(_crank(1, 0), 0.0)
    for t in range(1, 70):
        deriver.derive(_crank(1, 0), float(t))
    assert deriver.derive(_crank(2, (70 * 1024) % U16), 70.0) == []


def test_same_counter_in_two_wire_formats_is_two_streams() -> None:
    # A power meter notifying CPS (wheel time 1/2048 s) and CSC (1/1024 s) side by side.
    deriver = Deriver(circumference_m=2.0)
    deriver.derive(_wheel(10, 0, tick_hz=2048.0), 0.0)
    deriver.derive(_wheel(10, 0, tick_hz=1024.0), 0.0)
    assert deriver.derive(_wheel(11, 2048, tick_hz=2048.0), 1.0) == [
        Derived(DataType.SPEED, val=2.0)
    ]
    assert deriver.derive(_wheel(11, 1024, tick_hz=1024.0), 1.0) == [
        Derived(DataType.SPEED, val=2.0)
    ]


def test_wrapped_distance_and_strides_hold_without_new_data() -> None:
    deriver = Deriver()
    dist = Reading(Measure.WRAPPED_DISTANCE, value=255.5, count_mod=U8)
    strides = Reading(Measure.WRAPPED_STRIDES, count=255, count_mod=U8)
    assert deriver.derive(dist, 0.0) == [] and deriver.derive(strides, 0.0) == []
    moved = deriver.derive(Reading(Measure.WRAPPED_DISTANCE, value=1.5, count_mod=U8), 1.0)
    assert moved == [Derived(DataType.DISTANCE, val=2.0, event=True)]
    held = deriver.derive(Reading(Measure.WRAPPED_DISTANCE, value=1.5, count_mod=U8), 2.0)
    assert held == [Derived(DataType.DISTANCE, val=2.0, event=False)]
    stepped = deriver.derive(Reading(Measure.WRAPPED_STRIDES, count=1, count_mod=U8), 1.0)
    assert stepped == [Derived(DataType.STEPS, val=4.0, event=True)]


def test_direct_measures_and_units() -> None:
    deriver = Deriver()
    assert deriver.derive(Reading(Measure.STEPS_CADENCE, value=180.0), 0.0) == [
        Derived(DataType.STEPS_CADENCE, val=3.0)
    ]
    assert deriver.derive(Reading(Measure.RR_INTERVALS, values=()), 0.0) == []
    for measure in (Measure.CONTACT, Measure.BODY_LOCATION, Measure.EQUIPMENT, Measure.BALANCE,
                    Measure.STRIDE_LENGTH, Measure.STROKE_RATE, Measure.STROKES):  # fmt: skip
        assert deriver.derive(Reading(measure, value=1.0), 0.0) == []


def test_paged_readings_wait_for_a_toggle_change() -> None:
    deriver = Deriver()
    battery = Reading(Measure.BATTERY, value=50.0, paged=True)
    assert deriver.derive(battery, 0.0) == []
    deriver.derive(Reading(Measure.PAGE_TOGGLE, value=0.0), 0.0)
    deriver.derive(Reading(Measure.PAGE_TOGGLE, value=0.0), 0.0)
    assert deriver.derive(battery, 0.0) == []
    deriver.derive(Reading(Measure.PAGE_TOGGLE, value=1.0), 0.0)
    assert deriver.derive(battery, 0.0) == [Derived(DataType.BATTERY, val=50.0)]
    assert deriver.derive(Reading(Measure.BATTERY, value=40.0), 0.0) == [
        Derived(DataType.BATTERY, val=40.0)
    ]


_COUNTER_MEASURES = [Measure.CRANK_REVS, Measure.WHEEL_REVS, Measure.HEART_BEATS,
                     Measure.POWER_EVENTS, Measure.TORQUE_EVENTS, Measure.WHEEL_TORQUE_EVENTS,
                     Measure.WRAPPED_DISTANCE, Measure.WRAPPED_STRIDES]  # fmt: skip


@st.composite
def _counter_readings(draw: st.DrawFn) -> Reading:
    count_mod = draw(st.sampled_from([U8, U16, U32]))
    time_mod = draw(st.sampled_from([U16]))
    return Reading(
        draw(st.sampled_from(_COUNTER_MEASURES)),
        value=draw(st.floats(min_value=0, max_value=255, allow_nan=False)),
        count=draw(st.integers(0, count_mod - 1)),
        count_mod=count_mod,
        time=draw(st.integers(0, time_mod - 1)),
        time_mod=time_mod,
        tick_hz=draw(st.sampled_from([1024.0, 2048.0])),
        accum=draw(st.integers(0, U16 - 1)),
        accum_mod=U16,
    )


@given(st.lists(st.tuples(_counter_readings(), st.floats(0, 5, allow_nan=False)), max_size=12))
@settings(max_examples=2_000, deadline=None)
def test_any_counter_sequence_derives_finite_non_negative_values(
    steps: list[tuple[Reading, float]],
) -> None:
    deriver = Deriver()
    mono = 0.0
    for reading, gap in steps:
        mono += gap
        for derived in deriver.derive(reading, mono):
            values = derived.d if derived.d is not None else (derived.val,)
            for value in values:
                assert value is not None and 0.0 <= value < float("inf")


# The lead's original spine tests, kept as they were.


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
