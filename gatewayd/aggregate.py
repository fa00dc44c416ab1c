"""PURE. Per-device values -> exactly one Sample per (athlete, data type, second).

Time comes in as arguments: `mono` (monotonic seconds) for liveness and holds, because a hub
without a real-time clock sees its wall clock jump at boot; `wall` (unix seconds) only to say
which second a value belongs to and to stamp samples.

Rules per data type (issue 3, and formats.md part D):
- HEART_RATE, DISTANCE, STEPS, CALORIES: the latest value in the second, held while the device
  is live.
- POWER: the mean of the second's values; BIKE_CADENCE, SPEED, STEPS_CADENCE: the latest. All
  four are held while events keep coming and fall to 0 `hold` seconds after the last event.
- RR_INTERVAL: one Sample per beat, not per second (the way Terra's clients read it): `val` is the
  interval in ms and `ts` when that beat happened, to the millisecond. A reading's last interval
  ends when the reading arrived, each earlier one where the next began; times only grow per stream.
- BATTERY: only in seconds when the device reported it.
A device silent for `lost_after` seconds is lost: a status event, and no invented samples.
When two live devices of one athlete give the same data type, the first one keeps it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from gatewayd.model import DataType, DeviceState, DeviceStatus, Sample

_MEAN = frozenset({DataType.POWER})
_PER_BEAT = frozenset({DataType.RR_INTERVAL})
_FALLS_TO_ZERO = frozenset(
    {DataType.POWER, DataType.BIKE_CADENCE, DataType.SPEED, DataType.STEPS_CADENCE}
)
_ONLY_WHEN_REPORTED = frozenset({DataType.RR_INTERVAL, DataType.BATTERY})
_BATTERY = DataType.BATTERY
_new = tuple.__new__

# A wall-clock jump bigger than this (NTP at boot, a manual date change) restarts the timeline
# instead of emitting (or waiting for) every second in between.
MAX_CATCH_UP_S = 30
LOST_CHECK_INTERVAL_S = 0.25


@dataclass(frozen=True, slots=True)
class HeardDevice:
    source: str
    device_id: str
    uid: str
    live: bool
    last_wall: float
    rssi: int | None
    battery: float | None
    types: tuple[str, ...]  # the data types it currently gives


@dataclass(slots=True)
class _Device:
    uid: str
    source: str
    device_id: str
    last_mono: float
    last_wall: float
    live: bool = True
    battery: float | None = None
    rssi: int | None = None
    # The streams this device owns, by type: the per-value path skips the ownership rules while
    # it holds. Every stream removal (loss, reassignment, another device taking it) clears this.
    own: dict[DataType, _Stream] = field(default_factory=dict)
    # The types another live device of the athlete owns (a power meter's cadence beside a
    # cadence sensor's): dropped without asking the ownership rules again. Cleared whenever a
    # stream goes (a loss, a reassignment), so the device may claim it then.
    shadowed: set[DataType] = field(default_factory=set)


@dataclass(slots=True)
class _Stream:
    owner: str  # device key
    t: DataType
    device_id: str  # the owner's, for its samples
    source: str
    last_val: float = 0.0
    last_event_mono: float = 0.0
    first_second: int | None = None
    pending: dict[int, list[float]] = field(default_factory=dict)
    # Per-beat types: when each interval in `pending` ended (unix s, whole ms), and the last one.
    beats: dict[int, list[float]] = field(default_factory=dict)
    last_beat: float = 0.0
    # The second the last value went to, and its bucket in `pending`: nearly every value goes to
    # the same second as the one before it, and this finds it without a dict lookup. A second
    # that is emitted or cleared from `pending` is forgotten here too.
    second: int = -1
    bucket: list[float] = field(default_factory=list)


class Aggregator:
    def __init__(self, *, grace: float = 0.1, lost_after: float = 5.0, hold: float = 3.0) -> None:
        self.grace = grace
        self.lost_after = lost_after
        self.hold = hold
        self._devices: dict[str, _Device] = {}
        self._streams: dict[tuple[str, DataType], _Stream] = {}
        self._next_second: int | None = None  # the oldest second not yet emitted
        self._lost_checked = -math.inf
        self.late_values = 0
        self.shadowed_values = 0  # values dropped because another device owns the stream
        self.timeline_resets = 0

    # -- input --------------------------------------------------------------------------------

    def frame(
        self,
        key: str,
        uid: str,
        source: str,
        device_id: str,
        mono: float,
        wall: float,
        rssi: int | None = None,
    ) -> DeviceStatus | None:
        """Note that a device was heard; returns a CONNECTED status when it (re)appears."""
        statuses = self.add_frame(key, uid, source, device_id, mono, wall, rssi, ())
        return statuses[0] if statuses else None

    def value(
        self,
        key: str,
        t: DataType,
        val: float | None,
        d: tuple[float, ...] | None,
        mono: float,
        wall: float,
        event: bool = True,
    ) -> DeviceStatus | None:
        """Add one derived value from device `key`. Returns a status when the battery changes."""
        return self.values(key, ((t, val, d, event),), mono, wall)

    def values(
        self,
        key: str,
        derived: Iterable[tuple[DataType, float | None, tuple[float, ...] | None, bool]],
        mono: float,
        wall: float,
    ) -> DeviceStatus | None:
        """Add the values derived from one reading of device `key`, heard at (mono, wall).

        Returns a status when the battery changes."""
        return self._add(self._devices[key], key, derived, mono, wall)

    def add_frame(
        self,
        key: str,
        uid: str,
        source: str,
        device_id: str,
        mono: float,
        wall: float,
        rssi: int | None,
        derived: Iterable[tuple[DataType, float | None, tuple[float, ...] | None, bool]],
    ) -> list[DeviceStatus] | None:
        """frame() and values() in one call, the pipeline's path for each frame: the statuses
        they return (None, nearly always)."""
        device = self._devices.get(key)
        statuses = None
        if device is not None and device.live:
            device.last_mono = mono
            device.last_wall = wall
            if rssi is not None:
                device.rssi = rssi
        else:
            reason = "heard again"
            if device is None:
                device = self._devices[key] = _Device(uid, source, device_id, mono, wall, rssi=rssi)
                reason = "first heard"
            else:
                device.uid, device.last_mono, device.last_wall, device.live = uid, mono, wall, True
                device.rssi = rssi if rssi is not None else device.rssi
            statuses = [self._status(device, DeviceState.CONNECTED, reason, wall)]
        if derived:
            status = self._add(device, key, derived, mono, wall)
            if status is not None:
                statuses = [*(statuses or ()), status]
        return statuses

    def _add(
        self,
        device: _Device,
        key: str,
        derived: Iterable[tuple[DataType, float | None, tuple[float, ...] | None, bool]],
        mono: float,
        wall: float,
    ) -> DeviceStatus | None:
        own = device.own
        second = int(wall)  # floor: wall clock seconds are positive
        next_second = self._next_second
        if next_second is not None and second < next_second:
            late = True
            second = next_second
        else:
            late = False
        status = None
        for t, val, d, event in derived:
            stream = own.get(t)
            if stream is None:
                if t in device.shadowed:
                    self.shadowed_values += 1
                    continue
                stream = self._claim(device, key, t)
                if stream is None:
                    device.shadowed.add(t)
                    self.shadowed_values += 1
                    continue
            if late:
                self.late_values += 1
            if stream.second == second:
                bucket = stream.bucket
            else:
                pending = stream.pending
                if second in pending:
                    bucket = pending[second]
                else:
                    if stream.first_second is None:
                        stream.first_second = second
                    bucket = pending[second] = []
                stream.second = second
                stream.bucket = bucket
            if d is not None:
                bucket.extend(d)
                if t in _PER_BEAT:
                    stream.beats.setdefault(second, []).extend(_beat_times(stream, d, wall))
            elif val is not None:
                bucket.append(val)
                stream.last_val = val
                if event:
                    stream.last_event_mono = mono
            if t is _BATTERY and val is not None and val != device.battery:
                device.battery = val
                status = self._status(device, DeviceState.CONNECTED, "battery", wall)
        return status

    def _claim(self, device: _Device, key: str, t: DataType) -> _Stream | None:
        """The stream of type `t` of the device's athlete, if this device may feed it: a new one,
        one whose owner is no longer live, or its own. None: another live device owns it."""
        streams = self._streams
        stream = streams.get((device.uid, t))
        if stream is not None and stream.owner != key:
            owner = self._devices.get(stream.owner)
            if owner is not None and owner.live:
                return None
            if owner is not None:
                owner.own.pop(t, None)
            stream = None
        if stream is None:
            stream = streams[(device.uid, t)] = _Stream(key, t, device.device_id, device.source)
        device.own[t] = stream
        return stream

    # -- output -------------------------------------------------------------------------------

    def tick(self, mono: float, wall: float) -> tuple[list[Sample], list[DeviceStatus]]:
        """Close every second whose grace has passed; detect lost devices."""
        statuses: list[DeviceStatus] = []
        # The pipeline ticks on every wake-up; scanning every device each time would cost
        # O(devices) per frame batch, and loss is only ever judged to a few seconds anyway.
        if mono - self._lost_checked >= LOST_CHECK_INTERVAL_S:
            self._lost_checked = mono
            statuses = self._detect_lost(mono, wall)
        closable = math.floor(wall - 1.0 - self.grace)
        if self._next_second is None:
            self._next_second = closable + 1
            return [], statuses
        if closable - self._next_second > MAX_CATCH_UP_S or closable < self._next_second - 2:
            self.timeline_resets += 1
            for stream in self._streams.values():
                stream.pending.clear()
                stream.beats.clear()
                stream.first_second = None
                stream.second = -1
            self._next_second = closable + 1
            return [], statuses
        samples: list[Sample] = []
        while self._next_second <= closable:
            self._emit_second(self._next_second, mono, samples)
            self._next_second += 1
        return samples, statuses

    def flush(self, mono: float, wall: float) -> list[Sample]:
        """Emit every second up to and including the current one (shutdown)."""
        samples, _ = self.tick(mono, wall + 1.0 + self.grace)
        return samples

    def live_devices(self) -> int:
        return sum(1 for device in self._devices.values() if device.live)

    def devices(self) -> list[DeviceStatus]:
        return [
            self._status(
                device,
                DeviceState.CONNECTED if device.live else DeviceState.LOST,
                "",
                device.last_wall,
            )
            for device in self._devices.values()
        ]

    def heard(self) -> list[HeardDevice]:
        """Every device heard since start (for the admin page), with the data types it owns."""
        types: dict[str, list[str]] = {}
        for (_, t), stream in self._streams.items():
            types.setdefault(stream.owner, []).append(str(t))
        return [
            HeardDevice(
                d.source,
                d.device_id,
                d.uid,
                d.live,
                d.last_wall,
                d.rssi,
                d.battery,
                tuple(types.get(key, ())),
            )
            for key, d in self._devices.items()
        ]

    def reassign(self, key: str, uid: str, wall: float) -> list[DeviceStatus]:
        """The roster gave device `key` to another athlete: its streams restart under `uid`.

        Returns LOST for the old athlete and CONNECTED for the new one, so consumers (the board,
        MQTT) move the device at once instead of waiting for the old athlete to time out.
        """
        device = self._devices.get(key)
        if device is None or device.uid == uid:
            return []
        for stream_key in [k for k, s in self._streams.items() if s.owner == key]:
            del self._streams[stream_key]
        device.own.clear()
        self._unshadow()
        statuses: list[DeviceStatus] = []
        if device.live:
            statuses.append(self._status(device, DeviceState.LOST, f"given to {uid}", wall))
        device.uid = uid
        if device.live:
            statuses.append(self._status(device, DeviceState.CONNECTED, "enrolled", wall))
        return statuses

    # -- internals ----------------------------------------------------------------------------

    def _detect_lost(self, mono: float, wall: float) -> list[DeviceStatus]:
        statuses = []
        lost = set()
        lost_after = self.lost_after  # every device, four times a second: keep the loop lean
        for key, device in self._devices.items():
            if device.live and mono - device.last_mono > lost_after:
                device.live = False
                silent = mono - device.last_mono
                reason = f"silent for {silent:.1f} s"
                statuses.append(self._status(device, DeviceState.LOST, reason, wall))
                device.own.clear()
                lost.add(key)
        if lost:
            # One pass for all of them: a whole room going quiet at once (or a stalled host)
            # must not cost devices x streams.
            streams = self._streams
            for stream_key in [k for k, s in streams.items() if s.owner in lost]:
                del streams[stream_key]
            self._unshadow()
        return statuses

    def _unshadow(self) -> None:
        """Streams went: every device may try its shadowed types again (on their next value)."""
        for device in self._devices.values():
            device.shadowed.clear()

    def _emit_second(self, second: int, mono: float, out: list[Sample]) -> None:
        ts = float(second)
        hold = self.hold
        append = out.append
        for (uid, t), stream in self._streams.items():
            first = stream.first_second
            if first is None or second < first:
                continue  # a stream starts with the second of its first value
            bucket = stream.pending.pop(second, None)
            if stream.second == second:
                stream.second = -1
            if t in _PER_BEAT:
                times = stream.beats.pop(second, [])
                for interval, at in zip(bucket or (), times, strict=True):
                    append(
                        _new(Sample, (uid, t, at, interval, None, stream.device_id, stream.source))
                    )
                continue
            if bucket:
                val = sum(bucket) / len(bucket) if t in _MEAN else bucket[-1]
            elif t in _ONLY_WHEN_REPORTED:
                continue
            elif t in _FALLS_TO_ZERO and mono - stream.last_event_mono > hold:
                val = 0.0
            else:
                val = stream.last_val
            # tuple.__new__ with every field: this runs for every stream every second.
            append(_new(Sample, (uid, t, ts, val, None, stream.device_id, stream.source)))

    def _status(
        self, device: _Device, state: DeviceState, reason: str, wall: float
    ) -> DeviceStatus:
        return DeviceStatus(
            uid=device.uid,
            device_id=device.device_id,
            source=device.source,
            state=state,
            wall=wall,
            reason=reason,
            battery=device.battery,
            rssi=device.rssi,
        )


def _beat_times(stream: _Stream, intervals_ms: tuple[float, ...], wall: float) -> list[float]:
    """When each interval ended: the last when the reading arrived (`wall`), each earlier one
    where the next began; whole ms, and strictly after the stream's previous beat (arrival jitter
    must not reorder beats, or a receiver that drops re-sent samples by time would drop one)."""
    if len(intervals_ms) == 1:  # ANT+ straps: one beat per reading, ending when it arrived
        return [_next_beat(stream, wall)]
    ends = []
    end = wall
    for interval in reversed(intervals_ms):
        ends.append(end)
        end -= interval / 1000.0
    return [_next_beat(stream, estimate) for estimate in reversed(ends)]


def _next_beat(stream: _Stream, estimate: float) -> float:
    """A beat's time from its estimate: whole ms, strictly after the stream's previous beat."""
    at = math.floor(estimate * 1000.0) / 1000.0
    if at <= stream.last_beat:
        at = round(stream.last_beat + 0.001, 3)
    stream.last_beat = at
    return at
