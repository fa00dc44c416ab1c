"""Rollover-safe deltas, and the one place where rates are derived from consecutive readings.

Every cumulative quantity on the wire wraps (u8 event counts, u16 1/1024 s event times that wrap
every 64 s, u32 wheel revolutions). A delta is always `(cur - prev) mod modulus`; a rate is
computed only when the event time or count actually changed (a repeated broadcast carries no new
event), and a baseline older than `max_gap` seconds is discarded, because after more than one
wrap period the modular delta is meaningless.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gatewayd.model import DataType, Measure, Reading


def delta(cur: int, prev: int, modulus: int) -> int:
    """Unsigned modular difference `cur - prev` for a counter that wraps at `modulus`."""
    return (cur - prev) % modulus


@dataclass(frozen=True, slots=True)
class Derived:
    """A value ready for per-second aggregation: either `val` or `d` is set."""

    t: DataType
    val: float | None = None
    d: tuple[float, ...] | None = None
    event: bool = True  # False for values that say nothing new happened (held, not refreshed)


_DIRECT: dict[Measure, DataType] = {
    Measure.HEART_RATE: DataType.HEART_RATE,
    Measure.POWER: DataType.POWER,
    Measure.CADENCE: DataType.BIKE_CADENCE,
    Measure.SPEED: DataType.SPEED,
    Measure.DISTANCE: DataType.DISTANCE,
    Measure.STEPS: DataType.STEPS,
    Measure.ENERGY: DataType.CALORIES,
    Measure.BATTERY: DataType.BATTERY,
}


@dataclass(slots=True)
class _Baseline:
    reading: Reading
    mono: float


class Deriver:
    """Per-device state turning Readings into Derived values (pure: time is passed in)."""

    __slots__ = ("circumference_m", "max_gap", "_last", "_distance_total", "_strides_total")

    def __init__(self, circumference_m: float = 2.105, max_gap: float = 60.0) -> None:
        self.circumference_m = circumference_m
        self.max_gap = max_gap
        self._last: dict[Measure, _Baseline] = {}
        self._distance_total = 0.0
        self._strides_total = 0

    def derive(self, reading: Reading, mono: float) -> list[Derived]:
        measure = reading.measure
        direct = _DIRECT.get(measure)
        if direct is not None:
            return [Derived(direct, val=reading.value)]
        if measure is Measure.RR_INTERVALS:
            return [Derived(DataType.RR_INTERVAL, d=reading.values)] if reading.values else []
        if measure is Measure.STEPS_CADENCE:
            # Terra's STEPS_CADENCE is steps per second; devices report per minute.
            return [Derived(DataType.STEPS_CADENCE, val=reading.value / 60.0)]
        if measure in _COUNTERS:
            previous = self._last.get(measure)
            self._last[measure] = _Baseline(reading, mono)
            if previous is None or mono - previous.mono > self.max_gap:
                return []
            return _COUNTERS[measure](self, previous.reading, reading)
        return []

    def _crank(self, prev: Reading, cur: Reading) -> list[Derived]:
        dt = delta(cur.time, prev.time, cur.time_mod)
        if dt == 0:
            return []
        revs = delta(cur.count, prev.count, cur.count_mod)
        return [Derived(DataType.BIKE_CADENCE, val=60.0 * revs * cur.tick_hz / dt)]

    def _wheel(self, prev: Reading, cur: Reading) -> list[Derived]:
        dt = delta(cur.time, prev.time, cur.time_mod)
        if dt == 0:
            return []
        revs = delta(cur.count, prev.count, cur.count_mod)
        return [Derived(DataType.SPEED, val=self.circumference_m * revs * cur.tick_hz / dt)]

    def _beats(self, prev: Reading, cur: Reading) -> list[Derived]:
        beats = delta(cur.count, prev.count, cur.count_mod)
        dt = delta(cur.time, prev.time, cur.time_mod)
        # Only one beat between two readings makes the time delta one RR interval; after a
        # missed beat the interval would be two RRs summed, so it is dropped, not guessed.
        if beats != 1 or dt == 0:
            return []
        return [Derived(DataType.RR_INTERVAL, d=(dt * 1000.0 / cur.tick_hz,))]

    def _power_events(self, prev: Reading, cur: Reading) -> list[Derived]:
        events = delta(cur.count, prev.count, cur.count_mod)
        if events == 0:
            return []
        # Skipped events (events > 1) still give the exact average over the events missed.
        energy = delta(cur.accum, prev.accum, cur.accum_mod)
        return [Derived(DataType.POWER, val=energy / events)]

    def _torque_events(self, prev: Reading, cur: Reading) -> list[Derived]:
        events = delta(cur.count, prev.count, cur.count_mod)
        period = delta(cur.time, prev.time, cur.time_mod)
        if events == 0 or period == 0:
            return []
        torque = delta(cur.accum, prev.accum, cur.accum_mod)
        power = 128.0 * math.pi * torque / period
        cadence = 60.0 * events * cur.tick_hz / period
        return [Derived(DataType.POWER, val=power), Derived(DataType.BIKE_CADENCE, val=cadence)]

    def _wrapped_distance(self, prev: Reading, cur: Reading) -> list[Derived]:
        step = (cur.value - prev.value) % cur.count_mod
        self._distance_total += step
        return [Derived(DataType.DISTANCE, val=self._distance_total, event=step > 0)]

    def _wrapped_strides(self, prev: Reading, cur: Reading) -> list[Derived]:
        step = delta(cur.count, prev.count, cur.count_mod)
        self._strides_total += step
        return [Derived(DataType.STEPS, val=float(self._strides_total), event=step > 0)]


_COUNTERS = {
    Measure.CRANK_REVS: Deriver._crank,
    Measure.WHEEL_REVS: Deriver._wheel,
    Measure.HEART_BEATS: Deriver._beats,
    Measure.POWER_EVENTS: Deriver._power_events,
    Measure.TORQUE_EVENTS: Deriver._torque_events,
    Measure.WRAPPED_DISTANCE: Deriver._wrapped_distance,
    Measure.WRAPPED_STRIDES: Deriver._wrapped_strides,
}
