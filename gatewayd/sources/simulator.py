"""A room of synthetic athletes whose devices emit real wire bytes at their real rates.

The frames go through the same decoders as a radio's, so the simulator exercises the whole data
path. Physiology is simple but believable (HR lags effort, power and cadence follow intervals)
and everything is seeded: the same seed and the same clock give the same bytes.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from gatewayd.clock import Clock
from gatewayd.config import SimulatorConfig
from gatewayd.model import Frame
from gatewayd.pipeline import FrameQueue
from gatewayd.roster import DEFAULT_CIRCUMFERENCE_M, AthleteInfo

log = logging.getLogger(__name__)

ANT_HR_PERIOD = 8070 / 32768
ANT_POWER_PERIOD = 8182 / 32768
ANT_SC_PERIOD = 8086 / 32768
BLE_HR_PERIOD = 1.0
STEP_S = 0.25
WAKE_S = 0.01  # the simulator's shortest sleep: frames due meanwhile go out together

_NAMES = (
    "Ada", "Ben", "Chloe", "Dev", "Elena", "Finn", "Grace", "Hugo", "Iris", "Jonas", "Kira",
    "Leo", "Maya", "Nico", "Olga", "Pavel", "Quinn", "Rosa", "Sam", "Tara", "Uma", "Victor",
    "Wen", "Xavi", "Yara", "Zoe",
)  # fmt: skip


class AthleteModel:
    """Effort follows a seeded interval plan; HR follows effort with a lag of about 30 s."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.rest_hr = rng.uniform(52, 68)
        self.threshold_hr = rng.uniform(155, 182)
        self.ftp = rng.uniform(160, 320)
        self.hr = self.rest_hr + rng.uniform(10, 40)
        self.t = 0.0
        self._plan_phase = rng.uniform(0, 600)

    def effort(self, t: float) -> float:
        # 4 min work / 2 min easy, with a slow warm-up swell, never quite flat.
        phase = (t + self._plan_phase) % 360
        base = 0.85 if phase < 240 else 0.35
        return min(1.0, base + 0.08 * math.sin(t / 23.0))

    def advance_to(self, t: float) -> None:
        while self.t + STEP_S <= t:
            self.t += STEP_S
            target = self.rest_hr + (self.threshold_hr - self.rest_hr) * self.effort(self.t)
            self.hr += (target - self.hr) * STEP_S / 30.0 + self.rng.gauss(0, 0.15)

    def power(self) -> float:
        return max(0.0, self.ftp * (0.35 + 0.75 * self.effort(self.t)) + self.rng.gauss(0, 8))

    def cadence(self) -> float:
        return 72 + 20 * self.effort(self.t) + self.rng.gauss(0, 1.5)

    def speed(self) -> float:  # m/s
        return 4.0 + 7.0 * self.effort(self.t)


@dataclass
class SimDevice:
    """One simulated sensor: `emit(t)` returns the next payload and the delay to the next one."""

    athlete: AthleteModel
    source: str
    device_id: str
    kind: str
    period: float
    encode: Callable[[SimDevice, float], bytes]
    state: dict[str, float] = field(default_factory=dict)
    messages: int = 0


def _u16(value: float) -> tuple[int, int]:
    number = int(value) & 0xFFFF
    return number & 0xFF, number >> 8


def _advance_beats(device: SimDevice, t: float) -> list[float]:
    """Beats that happened up to t; returns their intervals in seconds."""
    state = device.state
    intervals = []
    next_beat = state.setdefault("next_beat", t)
    while next_beat <= t:
        interval = 60.0 / max(30.0, device.athlete.hr)
        state["last_beat"] = next_beat
        state["prev_beat"] = next_beat - interval
        state["beats"] = (state.get("beats", 0) + 1) % 256
        intervals.append(interval)
        next_beat += interval
    state["next_beat"] = next_beat
    return intervals


def encode_ant_hr(device: SimDevice, t: float) -> bytes:
    _advance_beats(device, t)
    state = device.state
    n = device.messages
    toggle = 0x80 if (n // 4) % 2 else 0x00
    beat_ticks = state.get("last_beat", 0.0) * 1024
    prev_ticks = state.get("prev_beat", 0.0) * 1024
    if n % 68 >= 64:  # a background page (battery) four times after every 64 main pages
        b1, b2, b3 = 87, 0x80, 0x33
        page = 7
    else:
        page = 4
        b1 = 0xFF
        b2, b3 = _u16(prev_ticks)
    lo, hi = _u16(beat_ticks)
    return bytes(
        [page | toggle, b1, b2, b3, lo, hi, int(state.get("beats", 0)), round(device.athlete.hr)]
    )


def encode_ble_hr(device: SimDevice, t: float) -> bytes:
    intervals = _advance_beats(device, t)
    rr = b"".join(bytes(_u16(round(i * 1024))) for i in intervals[-4:])
    flags = 0x06 | (0x10 if rr else 0)  # sensor contact detected, RR when a beat ended
    return bytes([flags, round(device.athlete.hr)]) + rr


def encode_ant_power(device: SimDevice, t: float) -> bytes:
    state = device.state
    power = device.athlete.power()
    events = (int(state.get("events", 0)) + 1) % 256
    accumulated = (state.get("accumulated", 0.0) + power) % 65536
    state["events"], state["accumulated"] = events, accumulated
    cadence = round(device.athlete.cadence())
    acc_lo, acc_hi = _u16(accumulated)
    p_lo, p_hi = _u16(round(power))
    return bytes([0x10, events, 0xFF, cadence, acc_lo, acc_hi, p_lo, p_hi])


def encode_ant_sc(device: SimDevice, t: float) -> bytes:
    state = device.state
    athlete = device.athlete
    for name, rate_hz in (
        ("crank", athlete.cadence() / 60.0),
        ("wheel", athlete.speed() / DEFAULT_CIRCUMFERENCE_M),
    ):
        next_event = state.setdefault(f"{name}_next", t)
        while next_event <= t:
            state[f"{name}_time"] = next_event
            state[f"{name}_revs"] = (state.get(f"{name}_revs", 0) + 1) % 65536
            next_event += 1.0 / rate_hz
        state[f"{name}_next"] = next_event
    crank_time = _u16(state.get("crank_time", 0.0) * 1024)
    crank_revs = _u16(state.get("crank_revs", 0))
    wheel_time = _u16(state.get("wheel_time", 0.0) * 1024)
    wheel_revs = _u16(state.get("wheel_revs", 0))
    return bytes([*crank_time, *crank_revs, *wheel_time, *wheel_revs])


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
        devices = []
        if use_ble:
            address = (
                f"F0:5E:ED:{index >> 16 & 0xFF:02X}:{index >> 8 & 0xFF:02X}:{index & 0xFF:02X}"
            )
            devices.append(SimDevice(model, "ble", address, "2a37", BLE_HR_PERIOD, encode_ble_hr))
        else:
            devices.append(_ant(model, rng, 120, ANT_HR_PERIOD, encode_ant_hr))
        if index < round(config.athletes * config.bike_fraction):
            devices.append(_ant(model, rng, 11, ANT_POWER_PERIOD, encode_ant_power))
            devices.append(_ant(model, rng, 121, ANT_SC_PERIOD, encode_ant_sc))
        room.append(SimAthlete(info, devices, config.drop_after_s.get(uid)))
    return room


def _ant(
    model: AthleteModel,
    rng: random.Random,
    device_type: int,
    period: float,
    encode: Callable[[SimDevice, float], bytes],
) -> SimDevice:
    number = rng.randrange(1, 1 << 20)
    return SimDevice(model, "ant", f"{device_type}:{number}", f"ant:{device_type}", period, encode)


class SimulatorSource:
    name = "simulator"

    def __init__(self, config: SimulatorConfig, clock: Clock) -> None:
        self.config = config
        self.clock = clock
        self.room = build_room(config)
        self.frames_sent = 0
        self._queue = self._schedule()

    def roster_entries(self) -> list[tuple[AthleteInfo, list[tuple[str, str]]]]:
        return [
            (athlete.info, [(device.source, device.device_id) for device in athlete.devices])
            for athlete in self.room
        ]

    def device_count(self) -> int:
        return sum(len(athlete.devices) for athlete in self.room)

    def _schedule(self) -> list[tuple[float, int, SimDevice, float | None]]:
        # Devices start spread over their first period, as real ones do.
        spread = random.Random(self.config.seed + 1)
        queue: list[tuple[float, int, SimDevice, float | None]] = []
        for athlete in self.room:
            for device in athlete.devices:
                first = spread.uniform(0, device.period)
                queue.append((first, len(queue), device, athlete.drop_after_s))
        heapq.heapify(queue)
        return queue

    def emit_due(self, elapsed: float, frames: FrameQueue) -> float | None:
        """Emit every frame due by `elapsed` seconds of simulation; returns the next due time."""
        queue = self._queue
        # Frames emitted together are received together: one reading of the clock for all.
        mono, wall = self.clock.mono(), self.clock.wall()
        while queue and queue[0][0] <= elapsed:
            due, order, device, drop_after = heapq.heappop(queue)
            if drop_after is not None and due >= drop_after:
                continue  # this athlete's devices went silent
            self._emit(device, due, frames, mono, wall)
            heapq.heappush(queue, (due + device.period, order, device, drop_after))
        return queue[0][0] if queue else None

    async def run(self, frames: FrameQueue) -> None:
        start = self.clock.mono()
        log.info(
            "simulator: %d athletes, %d devices (seed %d)",
            len(self.room),
            len(self._queue),
            self.config.seed,
        )
        while True:
            next_due = self.emit_due(self.clock.mono() - start, frames)
            if next_due is None:
                return
            # Radios deliver in bursts too (BLE connection events, USB transfers): waking every
            # few ms instead of for each of thousands of frames a second costs a fraction.
            await asyncio.sleep(max(WAKE_S, next_due - (self.clock.mono() - start)))

    def _emit(
        self, device: SimDevice, t: float, frames: FrameQueue, mono: float, wall: float
    ) -> None:
        device.athlete.advance_to(t)
        payload = device.encode(device, t)
        device.messages += 1
        self.frames_sent += 1
        frames.put(
            Frame(device.source, "sim", device.device_id, device.kind, payload, mono, wall, -60)
        )
