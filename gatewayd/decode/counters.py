"""Rollover-safe deltas, and the one place where rates are derived from consecutive readings.

Every cumulative quantity on the wire wraps (u8 event counts, u16 1/1024 s event times that wrap
every 64 s, u32 wheel revolutions). A delta is always `(cur - prev) mod modulus`; a rate is
computed only when the event time or count actually changed (a repeated broadcast carries no new
event), and a baseline older than `max_gap` seconds is discarded, because after more than one
wrap period the modular delta is meaningless.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

from gatewayd.model import DataType, Measure, Reading


def delta(cur: int, prev: int, modulus: int) -> int:
    """Unsigned modular difference `cur - prev` for a counter that wraps at `modulus`."""
    return (cur - prev) % modulus


class Derived(NamedTuple):
    """A value ready for per-second aggregation: either `val` or `d` is set.

    A NamedTuple rather than a frozen dataclass: just as immutable, three times cheaper to build,
    and several are built per frame on the hot path.
    """

    t: DataType
    val: float | None = None
    d: tuple[float, ...] | None = None
    event: bool = True  # False for values that say nothing new happened (held, not refreshed)


# Derived's fields as a plain tuple: what derive_all() gives the aggregator for every frame. A
# plain tuple is built in one step, a NamedTuple's (even through tuple.__new__) in three; the
# aggregator only unpacks them, and derive() gives Derived for everyone else.
Value = tuple[DataType, float | None, tuple[float, ...] | None, bool]


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


_U16 = 1 << 16
_new = tuple.__new__
_BIKE_CADENCE = DataType.BIKE_CADENCE
_SPEED = DataType.SPEED
_POWER = DataType.POWER
_RR_INTERVAL = DataType.RR_INTERVAL
_CRANK_REVS = Measure.CRANK_REVS


@dataclass(slots=True)
class _Stream:
    """The last reading of one counter stream, and when its count last moved."""

    reading: Reading
    event_mono: float  # when the counter last changed: the baseline's age for wrap safety
    zeroed: bool = False  # the stop (a zero) was already reported since the last event


# A rate handler gets the baseline (None when there is none yet, or it is too old), the new
# reading and the frame's values so far. It appends what the reading gives (a baseline or an
# unusable delta gives nothing) and returns False only when nothing happened (a repeat of the
# same event). Appending in place rather than returning a list: most readings give one value.
_Handler = Callable[["Deriver", Reading | None, Reading, list[Value]], bool]


class Deriver:
    """Per-device state turning Readings into Derived values (pure: time is passed in).

    Rates come only from a counter that moved: a repeated broadcast of the same event gives
    nothing, and after `stop_after` seconds of repeats the rate is reported as 0 once (pedalling
    stopped). A baseline whose last event is older than `max_gap` seconds is discarded, because
    event times wrap (1/1024 s u16: every 64 s) and the modular delta would lie.

    Streams are keyed by measure AND wire format, so one device that sends the same counter in
    two formats (CPS wheel time in 1/2048 s beside CSC's 1/1024 s) never mixes them.
    """

    __slots__ = (
        "_hr_counter",
        "_pages_trusted",
        "_previous_beat",
        "_streams",
        "_strides_total",
        "_toggle",
        "_totals",
        "circumference_m",
        "max_gap",
        "stop_after",
    )

    def __init__(
        self, circumference_m: float = 2.105, max_gap: float = 60.0, stop_after: float = 3.0
    ) -> None:
        self.circumference_m = circumference_m
        self.max_gap = max_gap
        self.stop_after = stop_after
        self._streams: dict[tuple[Measure, int, int, float], _Stream] = {}
        self._totals: dict[DataType, float] = {}  # wrapped accumulators unwrapped, by type
        self._strides_total = 0
        self._toggle: int | None = None
        self._pages_trusted = False
        self._previous_beat: Reading | None = None
        self._hr_counter: int | None = None

    def derive(self, reading: Reading, mono: float) -> list[Derived]:
        return [_new(Derived, value) for value in self.derive_all((reading,), mono)]

    def derive_all(self, readings: Iterable[Reading], mono: float) -> list[Value]:
        """The values of one frame's Readings, in order (a page toggle or a previous beat steers
        the Readings after it). One call per frame: this is the pipeline's hot path, so the
        common routes (counters, plain values) are taken here without a call of their own."""
        out: list[Value] = []
        for reading in readings:
            if reading.paged and not self._pages_trusted:
                continue
            measure = reading.measure
            handler = _COUNTERS.get(measure)
            if handler is not None:
                key = (measure, reading.count_mod, reading.time_mod, reading.tick_hz)
                stream = self._streams.get(key)
                if stream is None or mono - stream.event_mono > self.max_gap:
                    if stream is not None and _same_event(stream.reading, reading):
                        continue  # still repeating an event too old to be a baseline
                    self._streams[key] = _Stream(reading, mono)
                    handler(self, None, reading, out)
                elif handler(self, stream.reading, reading, out):
                    stream.reading = reading
                    stream.event_mono = mono
                    stream.zeroed = False
                elif not stream.zeroed and mono - stream.event_mono >= self.stop_after:
                    stream.zeroed = True
                    out += [(t, 0.0, None, True) for t in _STOPPED.get(measure, ())]
                continue
            t = _DIRECT.get(measure)
            if t is not None:
                if reading.count_mod:  # a frame counter says whether this value is new
                    fresh = reading.count != self._hr_counter
                    self._hr_counter = reading.count
                    out.append((t, reading.value, None, fresh))
                else:
                    out.append((t, reading.value, None, True))
                continue
            route = _ROUTES.get(measure)
            if route is not None:
                route(self, reading, out)
        return out

    def _rr_intervals(self, reading: Reading, out: list[Value]) -> None:
        if reading.values:
            out.append((_RR_INTERVAL, None, reading.values, True))

    def _steps_cadence(self, reading: Reading, out: list[Value]) -> None:
        # Terra's STEPS_CADENCE is steps per second; devices report per minute.
        out.append((DataType.STEPS_CADENCE, reading.value / 60.0, None, True))

    def _page_toggle(self, reading: Reading, out: list[Value]) -> None:
        # Legacy straps never flip bit 7, and their bytes 1-3 are not page data: trust pages only
        # once the bit has been seen to change on this device.
        bit = int(reading.value)
        if self._toggle is None:
            self._toggle = bit
        elif bit != self._toggle:
            self._pages_trusted = True

    def _remember_previous_beat(self, reading: Reading, out: list[Value]) -> None:
        self._previous_beat = reading

    def _rotations(self, prev: Reading | None, cur: Reading, out: list[Value]) -> bool:
        """Crank revolutions -> BIKE_CADENCE (rpm), wheel revolutions -> SPEED (m/s); nothing
        without a baseline or when the delta is unusable; False if nothing turned."""
        if prev is None:
            return True
        revs = (cur.count - prev.count) % cur.count_mod  # delta(), inlined: several per frame
        if revs == 0:
            return False
        dt = (cur.time - prev.time) % cur.time_mod
        # A wide counter jumping by more than half its range went backwards: a sensor reset.
        if dt == 0 or (cur.count_mod >= _U16 and revs > cur.count_mod // 2):
            return True
        if cur.measure is _CRANK_REVS:
            out.append((_BIKE_CADENCE, 60.0 * revs * cur.tick_hz / dt, None, True))
        else:
            speed = self.circumference_m * revs * cur.tick_hz / dt
            out.append((_SPEED, speed, None, True))
        return True

    def _beats(self, prev: Reading | None, cur: Reading, out: list[Value]) -> bool:
        # ANT+ repeats each beat ~4 times: exactly one RR per new beat count, preferring page 4's
        # previous beat time (exact even after missed messages) over the consecutive-beat delta.
        previous_beat, self._previous_beat = self._previous_beat, None
        beats = None
        if prev is not None:
            beats = (cur.count - prev.count) % cur.count_mod  # delta(), inlined
            if beats == 0:
                return False
        if previous_beat is not None and previous_beat.count == cur.count:
            rr = (cur.time - previous_beat.time) % cur.time_mod
        elif beats == 1 and prev is not None:
            # After a missed beat the time delta would be two RRs summed: dropped, not guessed.
            rr = (cur.time - prev.time) % cur.time_mod
        else:
            return True
        if rr:
            out.append((_RR_INTERVAL, None, (rr * 1000.0 / cur.tick_hz,), True))
        return True

    def _power_events(self, prev: Reading | None, cur: Reading, out: list[Value]) -> bool:
        if prev is None:
            return True
        events = (cur.count - prev.count) % cur.count_mod  # delta(), inlined
        if events == 0:
            return False
        # Skipped events (events > 1) still give the exact average over the events missed.
        energy = (cur.accum - prev.accum) % cur.accum_mod
        out.append((_POWER, energy / events, None, True))
        return True

    def _torque(self, prev: Reading | None, cur: Reading) -> tuple[float, int, int] | None:
        """(power W, events, period ticks); None if no event; period 0 if unusable."""
        if prev is None:
            return 0.0, 0, 0
        events = delta(cur.count, prev.count, cur.count_mod)
        if events == 0:
            return None
        period = delta(cur.time, prev.time, cur.time_mod)
        if period == 0:
            return 0.0, events, 0
        torque = delta(cur.accum, prev.accum, cur.accum_mod)  # 1/32 N*m
        # P = torque * angular velocity = (dTq/32) * 2*pi*events / (period/2048), with the
        # events cancelling between the torque per event and the revolutions: 128*pi*dTq/dPer.
        return 128.0 * math.pi * torque / period, events, period

    def _crank_torque(self, prev: Reading | None, cur: Reading, out: list[Value]) -> bool:
        got = self._torque(prev, cur)
        if got is None:
            return False
        power, events, period = got
        if period:
            cadence = 60.0 * events * cur.tick_hz / period
            out += [(_POWER, power, None, True), (_BIKE_CADENCE, cadence, None, True)]
        return True

    def _wheel_torque(self, prev: Reading | None, cur: Reading, out: list[Value]) -> bool:
        got = self._torque(prev, cur)
        if got is None:
            return False
        power, events, period = got
        if period:
            speed = self.circumference_m * events * cur.tick_hz / period
            out += [(_POWER, power, None, True), (_SPEED, speed, None, True)]
        return True

    def _wrapped_total(self, prev: Reading | None, cur: Reading, out: list[Value]) -> bool:
        if prev is None:
            return True
        step = (cur.value - prev.value) % cur.count_mod
        t = _WRAPPED_TOTALS[cur.measure]
        total = self._totals.get(t, 0.0) + step
        self._totals[t] = total
        out.append((t, total, None, step > 0))
        return True

    def _wrapped_strides(self, prev: Reading | None, cur: Reading, out: list[Value]) -> bool:
        if prev is None:
            return True
        step = delta(cur.count, prev.count, cur.count_mod)
        self._strides_total += step
        # An ANT+ SDM stride is two footfalls; Terra's STEPS counts footfalls.
        out.append((DataType.STEPS, 2.0 * self._strides_total, None, step > 0))
        return True


# Accumulators that wrap at a small modulus (ANT+ u8 metres, kcal): the total since first seen.
_WRAPPED_TOTALS = {
    Measure.WRAPPED_DISTANCE: DataType.DISTANCE,
    Measure.WRAPPED_ENERGY: DataType.CALORIES,
}


def _same_event(a: Reading, b: Reading) -> bool:
    return (a.count, a.time, a.accum, a.value) == (b.count, b.time, b.accum, b.value)


_COUNTERS: dict[Measure, _Handler] = {
    Measure.CRANK_REVS: Deriver._rotations,
    Measure.WHEEL_REVS: Deriver._rotations,
    Measure.HEART_BEATS: Deriver._beats,
    Measure.POWER_EVENTS: Deriver._power_events,
    Measure.TORQUE_EVENTS: Deriver._crank_torque,
    Measure.WHEEL_TORQUE_EVENTS: Deriver._wheel_torque,
    Measure.WRAPPED_DISTANCE: Deriver._wrapped_total,
    Measure.WRAPPED_ENERGY: Deriver._wrapped_total,
    Measure.WRAPPED_STRIDES: Deriver._wrapped_strides,
}

# What a stream reports, as 0, once its counter has stood still for `stop_after` seconds.
_STOPPED: dict[Measure, tuple[DataType, ...]] = {
    Measure.CRANK_REVS: (DataType.BIKE_CADENCE,),
    Measure.WHEEL_REVS: (DataType.SPEED,),
    Measure.POWER_EVENTS: (DataType.POWER,),
    Measure.TORQUE_EVENTS: (DataType.POWER, DataType.BIKE_CADENCE),
    Measure.WHEEL_TORQUE_EVENTS: (DataType.POWER, DataType.SPEED),
}


_Route = Callable[[Deriver, Reading, list[Value]], None]

# Measures that are neither a counter (_COUNTERS) nor a plain value (_DIRECT).
_ROUTES: dict[Measure, _Route] = {
    Measure.RR_INTERVALS: Deriver._rr_intervals,
    Measure.STEPS_CADENCE: Deriver._steps_cadence,
    Measure.PAGE_TOGGLE: Deriver._page_toggle,
    Measure.PREVIOUS_BEAT: Deriver._remember_previous_beat,
}
