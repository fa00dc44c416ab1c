"""A room of synthetic athletes whose devices emit real wire bytes at their real rates.

The frames go through the same decoders as a radio's, so the simulator exercises the whole data
path. Physiology is simple but believable (HR lags effort, power and cadence follow intervals)
and everything is seeded: the same seed and the same clock give the same bytes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import struct
from dataclasses import dataclass

from gatewayd.clock import Clock
from gatewayd.config import SimulatorConfig
from gatewayd.model import Frame
from gatewayd.pipeline import FrameQueue
from gatewayd.roster import DEFAULT_CIRCUMFERENCE_M, AthleteInfo

log = logging.getLogger(__name__)
_new = tuple.__new__
_sin = math.sin

ANT_HR_PERIOD = 8070 / 32768
ANT_POWER_PERIOD = 8182 / 32768
ANT_SC_PERIOD = 8086 / 32768
BLE_HR_PERIOD = 1.0
STEP_S = 0.25
_TRIANGLE_SCALE = math.sqrt(6.0)  # the sum of two U(0, 1) has a standard deviation of 1/sqrt(6)
# The simulator's shortest sleep: frames due meanwhile go out together, like a radio's USB
# transfer. At 1,000 sensors that is ~180 frames a wake; waking every 10 ms cost the daemon about
# a quarter more CPU per frame (more wake-ups of the simulator and the pipeline, colder caches).
WAKE_S = 0.05

_NAMES = (
    "Ada", "Ben", "Chloe", "Dev", "Elena", "Finn", "Grace", "Hugo", "Iris", "Jonas", "Kira",
    "Leo", "Maya", "Nico", "Olga", "Pavel", "Quinn", "Rosa", "Sam", "Tara", "Uma", "Victor",
    "Wen", "Xavi", "Yara", "Zoe",
)  # fmt: skip


class AthleteModel:
    """Effort follows a seeded interval plan; HR follows effort with a lag of about 30 s.

    The model moves in steps of STEP_S; each step also sets what the athlete's bike sensors
    report until the next one (power and cadence with a little noise, speed), so a frame only
    reads them."""

    __slots__ = (
        "_plan_phase",
        "_random",
        "_span",
        "ftp",
        "next_step",
        "hr",
        "rest_hr",
        "rng",
        "rpm",
        "speed_ms",
        "t",
        "threshold_hr",
        "watts",
    )

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.rest_hr = rng.uniform(52, 68)
        self.threshold_hr = rng.uniform(155, 182)
        self.ftp = rng.uniform(160, 320)
        self.hr = self.rest_hr + rng.uniform(10, 40)
        self._span = self.threshold_hr - self.rest_hr
        self._random = rng.random
        self.t = 0.0
        self.next_step = STEP_S  # t + STEP_S: emit_due advances the athlete from then on
        self._plan_phase = rng.uniform(0, 600)
        self._pedal(self.effort(0.0))

    def effort(self, t: float) -> float:
        # 4 min work / 2 min easy, with a slow warm-up swell, never quite flat.
        phase = (t + self._plan_phase) % 360
        base = 0.85 if phase < 240 else 0.35
        return min(1.0, base + 0.08 * math.sin(t / 23.0))

    def advance_to(self, t: float) -> None:
        # effort(), noise() and _pedal() written out, the same arithmetic in the same order (the
        # same seed gives the same bytes): this runs four times a second for every athlete.
        # Rewritten without a changed bit: min()/max() as comparisons (they return the same
        # float), `* STEP_S / 30.0` as `/ 120.0` (times 0.25 is exact, so both round x/120 once)
        # and the threshold - rest span kept from __init__. Constants are floats where they meet
        # floats: the result is the same (an int converts exactly), but CPython adds, multiplies
        # and compares two floats without the generic path.
        next_step = self.next_step
        if next_step > t:
            return
        random = self._random
        rest_hr, span, plan_phase, hr = self.rest_hr, self._span, self._plan_phase, self.hr
        step_t = effort = 0.0
        while next_step <= t:
            step_t = next_step
            next_step = step_t + STEP_S
            effort = (0.85 if (step_t + plan_phase) % 360.0 < 240.0 else 0.35) + 0.08 * _sin(
                step_t / 23.0
            )
            effort = effort if effort < 1.0 else 1.0
            hr += (rest_hr + span * effort - hr) / 120.0 + (
                random() + random() - 1.0
            ) * _TRIANGLE_SCALE * 0.15
        self.t, self.next_step, self.hr = step_t, next_step, hr
        watts = (
            self.ftp * (0.35 + 0.75 * effort) + (random() + random() - 1.0) * _TRIANGLE_SCALE * 8.0
        )
        self.watts = watts if watts > 0.0 else 0.0
        self.rpm = 72.0 + 20.0 * effort + (random() + random() - 1.0) * _TRIANGLE_SCALE * 1.5
        self.speed_ms = 4.0 + 7.0 * effort

    def _pedal(self, effort: float) -> None:
        self.watts = max(0.0, self.ftp * (0.35 + 0.75 * effort) + self.noise(8.0))
        self.rpm = 72 + 20 * effort + self.noise(1.5)
        self.speed_ms = 4.0 + 7.0 * effort

    def noise(self, sd: float) -> float:
        """Zero-mean noise with standard deviation `sd`: the sum of two uniform draws (a
        triangular distribution), as random.gauss is Python code and cost more than a frame."""
        random = self.rng.random
        return (random() + random() - 1.0) * _TRIANGLE_SCALE * sd


class SimDevice:
    """One simulated sensor. `payload(t)` advances its state to simulation time t and returns
    the bytes it sends then. Each kind keeps its counters in attributes and packs its page with
    a precompiled Struct: the daemon decodes a frame in a few µs, and making one must not cost
    more. emit_due has moved the athlete to t already."""

    __slots__ = ("athlete", "device_id", "silent_from")
    source = ""
    kind = ""
    period = 1.0

    def __init__(self, athlete: AthleteModel, device_id: str) -> None:
        self.athlete = athlete
        self.device_id = device_id
        self.silent_from = math.inf  # drop_after_s: no messages from then on

    def payload(self, t: float) -> bytes:
        raise NotImplementedError


class _Heart(SimDevice):
    """A strap: beats at the athlete's current heart rate, counted and timed as straps do."""

    __slots__ = ("beats", "interval", "last_beat", "next_beat", "prev_beat")

    def __init__(self, athlete: AthleteModel, device_id: str) -> None:
        super().__init__(athlete, device_id)
        self.next_beat: float | None = None
        self.last_beat = 0.0
        self.prev_beat = 0.0
        self.interval = 1.0
        self.beats = 0

    def _advance(self, t: float) -> int:
        """The beats up to t (the first at t, if none yet): how many, each `self.interval` s
        after the one before. The athlete's HR does not change within one call, so neither does
        the interval: it is computed once and the beats are counted without a list."""
        next_beat = t if self.next_beat is None else self.next_beat
        if next_beat > t:
            return 0
        hr = self.athlete.hr
        interval = 60.0 / (hr if hr > 30.0 else 30.0)  # max(30.0, hr)
        last = next_beat
        count = 0
        while next_beat <= t:
            last = next_beat
            next_beat += interval
            count += 1
        self.next_beat, self.last_beat, self.prev_beat = next_beat, last, last - interval
        self.interval = interval
        self.beats = (self.beats + count) % 256
        return count


_HR_PAGE = struct.Struct("<BBHHBB")  # page | toggle, byte 1, bytes 2-3, beat time, count, HR
_POWER_PAGE = struct.Struct("<BBBBHH")  # 0x10, events, balance, cadence, accumulated, power
_SC_PAGE = struct.Struct("<HHHH")  # crank time, crank revs, wheel time, wheel revs
# 0x2A37 with RR intervals: flags, u8 HR and 0 to 4 u16 intervals.
_BLE_RR_PAGES = tuple(struct.Struct(f"<BB{n}H") for n in range(5))
_pack_hr, _pack_power, _pack_sc = _HR_PAGE.pack, _POWER_PAGE.pack, _SC_PAGE.pack
# round() and int() of a float without the builtins' argument handling: 18 and 12 ns instead of
# 53 and 40, and a frame takes two or three of them.
_round, _trunc = float.__round__, float.__trunc__


class AntHeartRate(_Heart):
    """ANT+ type 120: page 4 (with the previous beat's time), a battery page 7 four times
    after every 64 main pages, and the toggle bit flipping every four messages."""

    __slots__ = ("messages",)
    source = "ant"
    kind = "ant:120"
    period = ANT_HR_PERIOD

    def __init__(self, athlete: AthleteModel, device_id: str) -> None:
        super().__init__(athlete, device_id)
        self.messages = 0

    def payload(self, t: float) -> bytes:
        next_beat = self.next_beat
        if next_beat is None or next_beat <= t:  # else no beat since the last message
            self._advance(t)
        n = self.messages
        self.messages = n + 1
        toggle = (n & 4) << 5  # 0x80 on messages 4-7 of every 8
        beat_ticks = _trunc(self.last_beat * 1024.0) & 0xFFFF
        hr = _round(self.athlete.hr)
        if n % 68 >= 64:  # battery page: 87 %, then the operating time bytes
            return _pack_hr(7 | toggle, 87, 0x3380, beat_ticks, self.beats, hr)
        previous = _trunc(self.prev_beat * 1024.0) & 0xFFFF
        return _pack_hr(4 | toggle, 0xFF, previous, beat_ticks, self.beats, hr)


class BleHeartRate(_Heart):
    """0x2A37 once a second: sensor contact detected, u8 HR, the RR intervals of the last (at
    most four) beats."""

    __slots__ = ()
    source = "ble"
    kind = "2a37"
    period = BLE_HR_PERIOD

    def payload(self, t: float) -> bytes:
        beats = self._advance(t)
        hr = _round(self.athlete.hr)
        if not beats:
            return bytes((0x06, hr))
        beats = min(beats, 4)
        rr = _round(self.interval * 1024.0) & 0xFFFF
        return _BLE_RR_PAGES[beats].pack(0x16, hr, *(rr,) * beats)  # flag 0x10: RR present


class AntPower(SimDevice):
    """ANT+ type 11 page 0x10: event count, cadence, accumulated and instantaneous power."""

    __slots__ = ("accumulated", "events")
    source = "ant"
    kind = "ant:11"
    period = ANT_POWER_PERIOD

    def __init__(self, athlete: AthleteModel, device_id: str) -> None:
        super().__init__(athlete, device_id)
        self.events = 0
        self.accumulated = 0.0

    def payload(self, t: float) -> bytes:
        athlete = self.athlete
        power = athlete.watts
        self.events = events = (self.events + 1) % 256
        self.accumulated = accumulated = (self.accumulated + power) % 65536.0
        return _pack_power(
            0x10,
            events,
            0xFF,
            _round(athlete.rpm),
            _trunc(accumulated) & 0xFFFF,
            _round(power) & 0xFFFF,
        )


def _turn(t: float, step: float, due: float | None, revs: int) -> tuple[float, int, int]:
    """Revolutions every `step` s up to t, the first at `due` (None: now), at least one due:
    (the next one's time, the last one's time in u16 1/1024 s, the u16 revolution count)."""
    due = t if due is None else due
    last = due
    while due <= t:
        last = due
        revs = (revs + 1) % 65536
        due += step
    return due, _trunc(last * 1024.0) & 0xFFFF, revs


class AntSpeedCadence(SimDevice):
    """ANT+ type 121: crank and wheel event times (1/1024 s) and revolution counts."""

    __slots__ = (
        "crank_next",
        "crank_revs",
        "crank_ticks",
        "wheel_next",
        "wheel_revs",
        "wheel_ticks",
    )
    source = "ant"
    kind = "ant:121"
    period = ANT_SC_PERIOD

    def __init__(self, athlete: AthleteModel, device_id: str) -> None:
        super().__init__(athlete, device_id)
        self.crank_next: float | None = None
        self.wheel_next: float | None = None
        self.crank_ticks = self.wheel_ticks = 0
        self.crank_revs = self.wheel_revs = 0

    def payload(self, t: float) -> bytes:
        # A frame comes every 0.25 s and the crank turns every 0.6-0.8 s: most frames have no
        # new crank revolution, and then its counters stay as they are without a call.
        athlete = self.athlete
        due = self.crank_next
        if due is None or due <= t:
            self.crank_next, self.crank_ticks, self.crank_revs = _turn(
                t, 60.0 / athlete.rpm, due, self.crank_revs
            )
        due = self.wheel_next
        if due is None or due <= t:
            self.wheel_next, self.wheel_ticks, self.wheel_revs = _turn(
                t, DEFAULT_CIRCUMFERENCE_M / athlete.speed_ms, due, self.wheel_revs
            )
        return _pack_sc(self.crank_ticks, self.crank_revs, self.wheel_ticks, self.wheel_revs)


@dataclass
class SimAthlete:
    info: AthleteInfo
    devices: list[SimDevice]
    drop_after_s: float | None = None


def build_room(config: SimulatorConfig) -> list[SimAthlete]:
    rng = random.Random(config.seed)
    room = []
    for index in range(config.athletes):
        uid = f"sim-{index + 1:02d}"
        name = f"{_NAMES[index % len(_NAMES)]} {index // len(_NAMES) + 1}".removesuffix(" 1")
        model = AthleteModel(random.Random(rng.getrandbits(32)))
        # A plausible profile from the index alone (drawing it would shift every random stream),
        # so simulated tiles show kcal from heart rate too.
        info = AthleteInfo(
            uid,
            name,
            round(model.threshold_hr / 0.9),
            DEFAULT_CIRCUMFERENCE_M,
            age=22 + index * 7 % 41,
            weight_kg=float(55 + index * 11 % 40),
            sex=("female", "male")[index % 2],
        )
        use_ble = config.hr_straps == "ble" or (config.hr_straps == "mixed" and index % 2 == 0)
        devices: list[SimDevice] = []
        if use_ble:
            address = (
                f"F0:5E:ED:{index >> 16 & 0xFF:02X}:{index >> 8 & 0xFF:02X}:{index & 0xFF:02X}"
            )
            devices.append(BleHeartRate(model, address))
        else:
            devices.append(AntHeartRate(model, _ant_id(rng, 120)))
        if index < round(config.athletes * config.bike_fraction):
            devices.append(AntPower(model, _ant_id(rng, 11)))
            devices.append(AntSpeedCadence(model, _ant_id(rng, 121)))
        room.append(SimAthlete(info, devices, config.drop_after_s.get(uid)))
    return room


def _ant_id(rng: random.Random, device_type: int) -> str:
    return f"{device_type}:{rng.randrange(1, 1 << 20)}"


class _Lane:
    """The devices of one kind in the order they are due, `next` the first due. A device goes
    to the end once it has sent (see SimulatorSource._schedule), so the order never changes and
    the lane is a ring walked by an index; a silent device leaves it.

    What emit_due reads of every device (its due time, athlete, id) is kept in lists beside
    the devices: the four kinds are four classes, and an attribute read at one place in the code
    from objects of changing classes is a slow, unspecialized lookup in CPython."""

    __slots__ = (
        "athletes",
        "devices",
        "dues",
        "ids",
        "kind",
        "next",
        "payload",
        "period",
        "quiet",
        "source",
    )

    def __init__(self, kind: type[SimDevice], devices: list[tuple[float, SimDevice]]) -> None:
        self.dues = [due for due, _ in devices]
        self.devices = [device for _, device in devices]
        self.athletes = [device.athlete for device in self.devices]
        self.ids = [device.device_id for device in self.devices]
        self.next = 0
        self.period, self.source, self.kind = kind.period, kind.source, kind.kind
        self.payload = kind.payload
        # The first time from which a device of this lane may be silent (drop_after_s).
        self.quiet = min((device.silent_from for device in self.devices), default=math.inf)

    def remove(self, i: int) -> None:
        for column in (self.dues, self.devices, self.athletes, self.ids):
            del column[i]


class SimulatorSource:
    name = "simulator"

    def __init__(self, config: SimulatorConfig, clock: Clock) -> None:
        self.config = config
        self.clock = clock
        self.room = build_room(config)
        self.frames_sent = 0
        self._lanes = self._schedule()

    def roster_entries(self) -> list[tuple[AthleteInfo, list[tuple[str, str]]]]:
        return [
            (athlete.info, [(device.source, device.device_id) for device in athlete.devices])
            for athlete in self.room
        ]

    def device_count(self) -> int:
        return sum(len(athlete.devices) for athlete in self.room)

    def _schedule(self) -> list[_Lane]:
        """Devices by kind, each lane in the order they are due. Devices start spread over
        their first period, as real ones do, so a lane's dues all lie within one period: the
        device that just sent is due last, after all the others (no heap, no sorting)."""
        spread = random.Random(self.config.seed + 1)
        lanes: dict[type[SimDevice], list[tuple[float, SimDevice]]] = {}
        for athlete in self.room:
            for device in athlete.devices:
                if athlete.drop_after_s is not None:
                    device.silent_from = athlete.drop_after_s
                lanes.setdefault(type(device), []).append(
                    (spread.uniform(0, device.period), device)
                )
        return [_Lane(kind, sorted(lane, key=lambda pair: pair[0])) for kind, lane in lanes.items()]

    def emit_due(self, elapsed: float, frames: FrameQueue) -> float | None:
        """Emit every frame due by `elapsed` seconds of simulation; returns the next due time."""
        # Frames emitted together are received together: one reading of the clock for all.
        mono, wall = self.clock.mono(), self.clock.wall()
        batch: list[Frame] = []
        append = batch.append
        for lane in self._lanes:
            dues, i = lane.dues, lane.next
            n = len(dues)
            if not n:
                continue
            devices, athletes, ids, payload = lane.devices, lane.athletes, lane.ids, lane.payload
            period, source, kind, quiet = lane.period, lane.source, lane.kind, lane.quiet
            while True:
                due = dues[i]
                if due > elapsed:
                    break
                if due >= quiet and due >= devices[i].silent_from:  # the athlete went silent
                    lane.remove(i)
                    n -= 1
                    if not n:
                        break
                    if i == n:
                        i = 0
                    continue
                athlete = athletes[i]
                if athlete.next_step <= due:
                    athlete.advance_to(due)
                # tuple.__new__ with every field: NamedTuple's __new__ is a Python call.
                frame = (source, "sim", ids[i], kind, payload(devices[i], due), mono, wall, -60)
                append(_new(Frame, frame))
                dues[i] = due + period
                i += 1
                if i == n:
                    i = 0
            lane.next = i
        if batch:
            self.frames_sent += len(batch)
            frames.put_batch(batch)  # gathered already: the pipeline need not wait for more
        return min((lane.dues[lane.next] for lane in self._lanes if lane.dues), default=None)

    async def run(self, frames: FrameQueue) -> None:
        start = self.clock.mono()
        log.info(
            "simulator: %d athletes, %d devices (seed %d)",
            len(self.room),
            self.device_count(),
            self.config.seed,
        )
        while True:
            next_due = self.emit_due(self.clock.mono() - start, frames)
            if next_due is None:
                return
            # Radios deliver in bursts too (BLE connection events, USB transfers): waking every
            # few ms instead of for each of thousands of frames a second costs a fraction.
            await asyncio.sleep(max(WAKE_S, next_due - (self.clock.mono() - start)))
