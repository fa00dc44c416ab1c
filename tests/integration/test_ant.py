"""The ANT+ source end to end: fake USB stick -> pyusb -> openant -> AntSource -> pipeline -> hub.

openant's real message code and pyusb's real core run against tests/fakes/fake_ant_stick.py;
time is virtual (the Player steps it broadcast by broadcast and waits for each to be taken), so
every assertion is on per-second samples as a consumer of the hub sees them.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import re
import subprocess
import sys
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import usb.backend.libusb1
from openant.base.ant import Ant

from gatewayd import cli
from gatewayd import config as config_module
from gatewayd.clock import ManualClock
from gatewayd.config import AntConfig, PipelineConfig
from gatewayd.decode import DECODERS
from gatewayd.errors import ConfigError
from gatewayd.hub import Hub
from gatewayd.model import DataType, DeviceState, DeviceStatus, Sample
from gatewayd.pipeline import GATHER_FRAMES, Pipeline
from gatewayd.roster import Roster
from gatewayd.sources.ant import AntSource
from tests.daemon import daemon_env
from tests.fakes.fake_ant_stick import (
    BROADCAST,
    CHANNEL_STATUS,
    EVENT_BUFFER,
    EXT_MESSAGES,
    REQUEST,
    RESET,
    SCAN,
    CadenceSensor,
    CountingFrameQueue,
    FakeAntStick,
    FakeUsbBackend,
    HeartRateStrap,
    Player,
    PowerMeter,
    Room,
    SimDevice,
    SpeedCadenceSensor,
    SpeedSensor,
    StrideSensor,
    Trainer,
)

START_WALL = 1_800_000_000.0
WAIT = 20.0  # generous guard for waits on events; never slept
_THREADS = ("openant.", "gatewayd-ant")


@pytest.fixture(autouse=True)
def _no_reset_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    # openant pauses 1 s after resetting a stick (a real one needs ~0.5 s); the fake is ready.
    monkeypatch.setattr(Ant, "_RESET_WAIT", 0)


class LogWatch(logging.Handler):
    """Collects gatewayd.sources.ant's records; lets a test wait for one (from any thread)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._seen = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self._seen:
            self.records.append(record)
            self._seen.notify_all()

    def matching(self, pattern: str, level: int = logging.INFO) -> list[str]:
        return [
            r.getMessage()
            for r in list(self.records)
            if r.levelno >= level and re.search(pattern, r.getMessage())
        ]

    async def wait_for(self, pattern: str, level: int = logging.INFO) -> str:
        def seen() -> list[str]:
            return self.matching(pattern, level)

        def block() -> bool:
            with self._seen:
                return self._seen.wait_for(lambda: bool(seen()), WAIT)

        assert await asyncio.to_thread(block), f"no log record matching {pattern!r}"
        return seen()[0]

    async def wait_for_count(self, pattern: str, count: int) -> None:
        def block() -> bool:
            with self._seen:
                return self._seen.wait_for(lambda: len(self.matching(pattern)) >= count, WAIT)

        assert await asyncio.to_thread(block), f"fewer than {count} log records match {pattern!r}"


class Rig:
    """Sticks on a fake USB bus, the ANT source, the real pipeline and a hub subscriber."""

    def __init__(
        self,
        devices: list[SimDevice],
        sticks: list[FakeAntStick] | None = None,
        *,
        plugged: bool = True,
        **ant: object,
    ) -> None:
        self.clock = ManualClock(wall=START_WALL)
        self.frames = CountingFrameQueue()
        self.hub = Hub()
        self.subscription = self.hub.subscribe("test", 1_000_000)
        self.pipeline = Pipeline(
            self.frames, self.hub, Roster([], {}), PipelineConfig(), self.clock
        )
        self.backend = FakeUsbBackend()
        self.sticks = sticks if sticks is not None else [FakeAntStick()]
        if plugged:
            for stick in self.sticks:
                self.backend.plug(stick)
        settings: dict[str, object] = {
            "enabled": True,
            "rescan_s": 0.02,
            "retry_initial_s": 0.02,
            "retry_max_s": 0.1,
        }
        settings.update(ant)
        self.source = AntSource(AntConfig(**settings), self.clock, backend=self.backend)
        self.room = Room(devices)
        self.player = Player(
            self.room, self.sticks, self.clock, self.frames, self.pipeline.run_once
        )
        self.log = LogWatch()
        self._opened: dict[int, int] = {}  # by stick serial: times configured() saw it open
        self._events: list[object] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Rig:
        logger = logging.getLogger("gatewayd.sources.ant")
        logger.addHandler(self.log)
        logger.setLevel(logging.DEBUG)
        self.frames.bind(asyncio.get_running_loop())
        self.pipeline.tick()
        self._task = asyncio.create_task(self.source.run(self.frames))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        assert not self._task.done(), "the source must run until cancelled"
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        logging.getLogger("gatewayd.sources.ant").removeHandler(self.log)
        for stick in self.sticks:
            assert stick.errors == []
        left = [t.name for t in threading.enumerate() if t.name.startswith(_THREADS)]
        assert left == [], "stopping the source stops openant's threads and ours"

    async def configured(self, stick: FakeAntStick | None = None) -> None:
        """Wait until `stick` is set up (again) and the source lists it as listening."""
        stick = stick or self.sticks[0]
        assert await asyncio.to_thread(stick.configured.wait, WAIT), "the stick was never set up"
        opened = self._opened[stick.serial] = self._opened.get(stick.serial, 0) + 1
        await self.log.wait_for_count(rf"ANT stick serial {stick.serial} .* listening", opened)
        self.player.sync()

    def events(self) -> list[object]:
        self._events.extend(self.subscription.get_nowait())
        return self._events

    def per_second(self, t: DataType, device: SimDevice) -> dict[int, object]:
        """Second (from the start) -> val (or d) of `device`'s samples of type `t`."""
        uid = f"ant:{device.device_id}"
        out: dict[int, object] = {}
        for event in self.events():
            if isinstance(event, Sample) and event.t is t and event.uid == uid:
                second = round(event.ts - START_WALL)
                assert second not in out, f"{uid} {t}: second {second} twice"
                out[second] = event.d if event.d is not None else event.val
        return out

    def statuses(self, device: SimDevice) -> list[DeviceStatus]:
        return [
            e
            for e in self.events()
            if isinstance(e, DeviceStatus) and e.device_id == device.device_id
        ]


def assert_every_second(
    rig: Rig, t: DataType, device: SimDevice, seconds: range, expected: float, rel: float = 0.0
) -> None:
    got = rig.per_second(t, device)
    missing = [s for s in seconds if s not in got]
    assert not missing, f"{device.device_id} {t}: no sample in seconds {missing}"
    for second in seconds:
        assert got[second] == pytest.approx(expected, rel=rel, abs=1e-9), (
            f"{device.device_id} {t} second {second}: {got[second]} != {expected}"
        )


def assert_rr(rig: Rig, strap: HeartRateStrap, seconds: range) -> None:
    """One RR per beat, each 60000/bpm ms (to the strap's 1/1024 s resolution)."""
    # RR_INTERVAL comes one sample per beat (`val`), stamped with the beat's own time.
    uid = f"ant:{strap.device_id}"
    values = [
        e.val
        for e in rig.events()
        if isinstance(e, Sample)
        and e.t is DataType.RR_INTERVAL
        and e.uid == uid
        and math.floor(e.ts - START_WALL) in seconds
    ]
    beats = len(seconds) * strap.bpm / 60
    assert abs(len(values) - beats) <= 1.5, f"{len(values)} RR intervals for ~{beats:.1f} beats"
    assert values == pytest.approx([60000 / strap.bpm] * len(values), abs=1.0)


def distinct(device: SimDevice) -> int:
    """How many of a lone device's broadcasts openant passes on (it drops exact repeats)."""
    return len(device.pages) - sum(a == b for a, b in itertools.pairwise(device.pages))


# -- scenarios --------------------------------------------------------------------------------


def forty_devices() -> list[SimDevice]:
    devices: list[SimDevice] = []
    phase = iter((i * 0.0061) % 0.25 for i in range(40))
    for i in range(8):
        # two of them with 20-bit numbers: the top nibble travels in the transmission type
        number = 0x1_0000 + i if i < 2 else 1000 + i
        devices.append(HeartRateStrap(number, phase=next(phase), bpm=60 + 5 * i, rssi=-40 - i))
    for i in range(8):
        devices.append(PowerMeter(2000 + i, phase=next(phase), watts=150 + 10 * i))
    for i in range(4):
        devices.append(SpeedCadenceSensor(3000 + i, phase=next(phase), rpm=80 + 4 * i))
    devices.append(CadenceSensor(3100, phase=next(phase), rpm=92))
    devices.append(CadenceSensor(3101, phase=next(phase), rpm=70))
    devices.append(SpeedSensor(3200, phase=next(phase), speed=6.5))
    devices.append(SpeedSensor(3201, phase=next(phase), speed=9.0))
    for i in range(8):
        devices.append(StrideSensor(4000 + i, phase=next(phase), speed=2.5 + 0.25 * i))
    for i in range(8):
        devices.append(Trainer(5000 + i, phase=next(phase), watts=120 + 15 * i))
    return devices


async def test_forty_devices_in_scan_mode_through_one_stick() -> None:
    devices = forty_devices()
    async with Rig(devices) as rig:
        await rig.configured()
        await rig.player.play(12.0)
        stick = rig.sticks[0]
        assert stick.scanning and len(stick.channels) == 1, "one channel in continuous scan"
        assert (SCAN, bytes([0, 1])) in stick.commands
        frames = rig.frames.log
        by_device = defaultdict(list)
        for frame in frames:
            by_device[frame.device_id].append(frame)
        assert sorted(by_device) == sorted(d.device_id for d in devices)
        for device in devices:
            got = by_device[device.device_id]
            assert [f.payload for f in got] == device.pages, device.device_id
            assert {(f.source, f.adapter, f.kind, f.rssi) for f in got} == {
                ("ant", "ant0", f"ant:{device.device_type}", device.rssi)
            }
            # every frame carries the time its broadcast went out, ~4 a second
            assert got[0].wall == pytest.approx(START_WALL + device.phase)
            gaps = [b.wall - a.wall for a, b in itertools.pairwise(got)]
            assert gaps == pytest.approx([device.period_s] * len(gaps), abs=1e-5)
        assert {"120:65536", "120:65537"} <= set(by_device)

        seconds = range(1, 11)
        for device in devices:
            if isinstance(device, HeartRateStrap):
                assert_every_second(rig, DataType.HEART_RATE, device, range(0, 11), device.bpm)
                assert_rr(rig, device, seconds)
        assert_profiles(rig, devices, seconds)
        decodable = [d for d in devices if f"ant:{d.device_type}" in DECODERS]
        assert rig.pipeline.aggregator.live_devices() == len(decodable)


def assert_profiles(rig: Rig, devices: list[SimDevice], seconds: range) -> None:
    """Per-second values for every profile whose decoder is in gatewayd.decode."""
    for device in devices:
        kind = f"ant:{device.device_type}"
        if kind not in DECODERS:
            # Until its decoder lands the profile's frames are counted as undecodable, not lost.
            key = (f"ant/{device.device_id}", kind)
            assert rig.pipeline.decode_errors[key] == len(device.pages), key
            continue
        if isinstance(device, PowerMeter):
            assert_every_second(rig, DataType.POWER, device, seconds, device.watts)
        elif isinstance(device, Trainer):
            assert_every_second(rig, DataType.POWER, device, seconds, device.watts)
            assert_every_second(rig, DataType.SPEED, device, seconds, device.speed, rel=0.01)
        elif isinstance(device, SpeedCadenceSensor):
            assert_every_second(rig, DataType.BIKE_CADENCE, device, seconds, device.rpm, rel=0.02)
            assert_every_second(rig, DataType.SPEED, device, seconds, device.speed, rel=0.02)
        elif isinstance(device, CadenceSensor):
            assert_every_second(rig, DataType.BIKE_CADENCE, device, seconds, device.rpm, rel=0.02)
        elif isinstance(device, SpeedSensor):
            assert_every_second(rig, DataType.SPEED, device, seconds, device.speed, rel=0.02)
        elif isinstance(device, StrideSensor):
            assert_every_second(rig, DataType.SPEED, device, seconds, device.speed, rel=0.01)


async def test_a_stick_without_scan_mode_falls_back_to_a_wildcard_channel_per_profile() -> None:
    first_strap = HeartRateStrap(11, phase=0.01, bpm=70)
    second_strap = HeartRateStrap(12, phase=0.02, bpm=90)
    meter = PowerMeter(21, phase=0.03, watts=250)
    trainer = Trainer(31, phase=0.04, watts=140)
    stick = FakeAntStick(scan_mode=False)
    async with Rig([first_strap, second_strap, meter, trainer], [stick]) as rig:
        await rig.configured()
        await rig.log.wait_for("listening in 7 wildcard channels mode")
        warning = await rig.log.wait_for("falling back to 7 wildcard channels", logging.WARNING)
        assert "capabilities lack continuous scan mode" in warning
        assert not any(msg_id == SCAN for msg_id, _ in stick.commands)
        periods = sorted(c.period for c in stick.channels.values())
        assert periods == [8070, 8086, 8102, 8118, 8134, 8182, 8192]
        assert all(c.is_open for c in stick.channels.values())
        await rig.player.play(8.0)
        heard = {f.device_id for f in rig.frames.log}
        # one device per profile: the heart-rate channel locked onto the first strap it heard
        assert heard == {first_strap.device_id, meter.device_id, trainer.device_id}
        assert_every_second(rig, DataType.HEART_RATE, first_strap, range(0, 7), 70)
        assert_rr(rig, first_strap, range(1, 7))
        assert rig.per_second(DataType.HEART_RATE, second_strap) == {}
        assert_profiles(rig, [meter, trainer], range(1, 7))


async def test_scan_mode_off_in_the_config_uses_wildcard_channels_too() -> None:
    strap = HeartRateStrap(11, phase=0.01, bpm=66)
    async with Rig([strap], scan_mode=False) as rig:
        await rig.configured()
        await rig.log.wait_for("scan_mode is off in the configuration", logging.WARNING)
        await rig.player.play(4.0)
        assert_every_second(rig, DataType.HEART_RATE, strap, range(0, 3), 66)


async def test_the_stick_removed_and_returned() -> None:
    strap = HeartRateStrap(7, phase=0.01, bpm=75)
    meter = PowerMeter(8, phase=0.13, watts=210)
    async with Rig([strap, meter]) as rig:
        stick = rig.sticks[0]
        await rig.configured()
        await rig.player.play(5.0)
        assert_every_second(rig, DataType.HEART_RATE, strap, range(0, 4), 75)

        rig.backend.unplug(stick)
        await rig.log.wait_for("lost the ANT stick", logging.WARNING)
        await rig.player.play(7.0)  # 7 s without the stick: the pipeline reports the strap lost
        lost = [s for s in rig.statuses(strap) if s.state is DeviceState.LOST]
        assert len(lost) == 1

        rig.backend.plug(stick)
        await rig.configured()
        await rig.player.play(6.0)
        got = rig.per_second(DataType.HEART_RATE, strap)
        assert all(got.get(s) == 75 for s in range(0, 4))
        assert all(got.get(s) == 75 for s in range(13, 17)), got
        # held while the pipeline still thought it live, then nothing until it was back
        assert not any(s in got for s in range(10, 12)), "no samples invented while it was gone"
        states = [s.state for s in rig.statuses(strap)]
        assert states == [DeviceState.CONNECTED, DeviceState.LOST, DeviceState.CONNECTED]
        assert_rr(rig, strap, range(13, 17))
        # logged once; the same stick keeps its name; reopened from a reset
        assert len(rig.log.matching("lost the ANT stick", logging.WARNING)) == 1
        assert {f.adapter for f in rig.frames.log} == {"ant0"}
        assert stick.resets == 2
        assert len(rig.log.matching("listening in continuous scan mode")) == 2


async def test_identical_repeated_broadcasts() -> None:
    # A strap whose pages change only every other broadcast, alone on the air: openant drops a
    # broadcast identical to the previous message, and the samples are unaffected.
    strap = HeartRateStrap(5, phase=0.01, bpm=60, repeat=2)
    async with Rig([strap]) as rig:
        await rig.configured()
        await rig.player.play(8.0)
        assert rig.frames.handed_in == distinct(strap) < len(strap.pages)
        assert_every_second(rig, DataType.HEART_RATE, strap, range(0, 7), 60)
        assert_rr(rig, strap, range(1, 7))


async def test_identical_broadcasts_that_reach_the_pipeline_count_once() -> None:
    # With two devices on the air the repeats interleave, so they pass openant and reach the
    # pipeline: still one RR per beat, and power from events, not from repeated pages.
    strap = HeartRateStrap(5, phase=0.01, bpm=60, repeat=4)
    meter = PowerMeter(6, phase=0.12, watts=300, repeat=4)
    async with Rig([strap, meter]) as rig:
        await rig.configured()
        await rig.player.play(10.0)
        assert rig.frames.handed_in == len(strap.pages) + len(meter.pages)
        assert_every_second(rig, DataType.HEART_RATE, strap, range(0, 9), 60)
        assert_rr(rig, strap, range(1, 9))
        assert_profiles(rig, [meter], range(1, 9))


async def test_a_legacy_hr_strap_that_never_toggles() -> None:
    # Its bytes 0-3 look like page 4 but never toggle, so bytes 2-3 are not a previous beat time
    # (they hold 0x3412 here); RR must come from consecutive beats instead.
    strap = HeartRateStrap(9, phase=0.01, bpm=72, legacy=True)
    async with Rig([strap]) as rig:
        await rig.configured()
        await rig.player.play(10.0)
        assert {p[0] for p in strap.pages} == {0x84}
        assert_every_second(rig, DataType.HEART_RATE, strap, range(0, 9), 72)
        assert_rr(rig, strap, range(1, 9))


class LoopWakeups:
    """Counts the times a reader thread wakes the event loop to take frames."""

    def __init__(self) -> None:
        self.count = 0
        self._loop = asyncio.get_running_loop()

    def __enter__(self) -> LoopWakeups:
        original = self._loop.call_soon_threadsafe

        def counting(callback: Any, *args: Any, **kwargs: Any) -> Any:
            if getattr(callback, "__name__", "") == "_wake":
                self.count += 1
            return original(callback, *args, **kwargs)

        self._loop.call_soon_threadsafe = counting  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        del self._loop.call_soon_threadsafe


async def test_frames_wait_for_the_pipeline_without_waking_the_loop() -> None:
    """A stick without event buffering sends a USB transfer per broadcast; the reader thread
    queues each one's frame without waking the event loop, and the pipeline takes them all, in
    order, at its own next wake-up. Only a backlog of GATHER_FRAMES wakes it."""
    devices: list[SimDevice] = [HeartRateStrap(100 + i, phase=0.0) for i in range(20)]
    async with Rig(devices) as rig:
        await rig.configured()
        stick = rig.sticks[0]
        target = rig.frames.handed_in + len(devices)
        processed = rig.pipeline.processed + rig.pipeline.ignored_frames
        with LoopWakeups() as wakeups:
            for device in devices:
                stick.hear(device, device.next_page(0.0))
            assert await asyncio.to_thread(rig.frames.wait_handed_in, target, WAIT)
            assert wakeups.count == 0
            assert rig.pipeline.processed + rig.pipeline.ignored_frames == processed
            rig.pipeline.run_once()
            assert rig.pipeline.processed + rig.pipeline.ignored_frames == processed + 20
            assert [f.device_id for f in rig.frames.log[-len(devices) :]] == [
                d.device_id for d in devices
            ]

            backlog = GATHER_FRAMES // len(devices) + 1
            target += backlog * len(devices)
            for _ in range(backlog):
                for device in devices:
                    stick.hear(device, device.next_page(0.0))
            assert await asyncio.to_thread(rig.frames.wait_handed_in, target, WAIT)
            assert wakeups.count == 1, "a backlog wakes the pipeline"
        rig.pipeline.run_once()
        assert rig.pipeline.processed + rig.pipeline.ignored_frames == processed + 20 * (
            backlog + 1
        )


async def test_a_stick_with_event_buffering_sends_broadcasts_in_batches() -> None:
    """An ANTUSB-m can hold broadcasts back and send them in one USB transfer (0x74): one
    wake-up of the reader thread for many broadcasts, and none of the event loop."""
    straps = [HeartRateStrap(100 + i, phase=0.01 * i, bpm=60 + 6 * i) for i in range(3)]
    meters: list[SimDevice] = [PowerMeter(200 + i, phase=0.05 + 0.01 * i) for i in range(3)]
    stick = FakeAntStick(product=0x1009, event_buffering=True)
    async with Rig([*straps, *meters], [stick]) as rig:
        await rig.configured()
        # every event, 256 bytes or 20 ms (2 x 10 ms), whichever comes first
        assert (EVENT_BUFFER, bytes([0, 1, 0x00, 0x01, 2, 0])) in stick.commands
        assert await rig.log.wait_for("broadcasts batched every 20 ms by the stick")
        assert stick.buffer_size == 256 and stick.buffer_time_s == 0.02

        with LoopWakeups() as wakeups:
            # a burst: four pages of each device within a millisecond (24 broadcasts)
            transfers = stick.transfers
            burst = [(d, d.next_page(0.0)) for _ in range(4) for d in [*straps, *meters]]
            target = rig.frames.handed_in + len(burst)
            for device, page in burst:
                stick.hear(device, page)
            assert await asyncio.to_thread(rig.frames.wait_handed_in, target, WAIT)
        got = rig.frames.log[-len(burst) :]
        assert [(f.device_id, f.payload) for f in got] == [(d.device_id, page) for d, page in burst]
        # 504 bytes: past 256 once, then the rest at 20 ms (and the first may have gone alone)
        assert stick.transfers - transfers <= 3
        assert wakeups.count == 0, "the pipeline takes the frames at its own wake-up"

        rig.player.sync()
        await rig.player.play(5.0)
        for strap in straps:
            assert_every_second(rig, DataType.HEART_RATE, strap, range(1, 4), strap.bpm)
        assert_profiles(rig, meters, range(1, 4))
    stick.close()


async def test_no_event_buffering_without_the_capability_or_when_turned_off() -> None:
    strap = HeartRateStrap(3, phase=0.01, bpm=64)
    plain = FakeAntStick(serial=111, port=1)  # an ANTUSB2: no advanced options 3
    capable = FakeAntStick(serial=222, port=2, product=0x1009, event_buffering=True)
    async with Rig([strap], [plain]) as rig:
        await rig.configured()
        await rig.player.play(2.0)
        assert_every_second(rig, DataType.HEART_RATE, strap, range(0, 1), 64)
    async with Rig([strap], [capable], event_buffer_s=0.0) as rig:
        await rig.configured()
    for stick in (plain, capable):
        assert stick.sent(EVENT_BUFFER) == 0
        assert stick.buffer_size == 0
    capable.close()


async def test_each_frame_carries_the_rssi_it_was_heard_at() -> None:
    # gatewayd remembers who sent a message by its extended tail, RSSI included
    strap = HeartRateStrap(3, phase=0.01, bpm=64)
    async with Rig([strap]) as rig:
        await rig.configured()
        segments = []
        for rssi in (-50, -71, -50, -38):
            strap.rssi = rssi
            start = len(rig.frames.log)
            await rig.player.play(2.0)
            segments.append({f.rssi for f in rig.frames.log[start:]})
        assert segments == [{-50}, {-71}, {-50}, {-38}]


# -- failures ---------------------------------------------------------------------------------


async def test_no_stick_is_a_warning_then_a_background_retry() -> None:
    strap = HeartRateStrap(3, phase=0.01, bpm=64)
    async with Rig([strap], plugged=False) as rig:
        warning = await rig.log.wait_for("no ANT stick found", logging.WARNING)
        assert "0fcf:1008" in warning and "0fcf:1009" in warning
        assert await asyncio.to_thread(rig.backend.wait_calls, "enumerate_devices", 5)
        assert len(rig.log.matching("no ANT stick found")) == 1, "warned once, not per retry"
        rig.backend.plug(rig.sticks[0])
        await rig.configured()
        await rig.player.play(3.0)
        assert_every_second(rig, DataType.HEART_RATE, strap, range(0, 2), 64)


async def test_a_stick_without_permission_names_the_udev_rule() -> None:
    strap = HeartRateStrap(3, phase=0.01, bpm=64)
    stick = FakeAntStick()
    stick.deny_access = True
    async with Rig([strap], [stick]) as rig:
        error = await rig.log.wait_for("no permission", logging.ERROR)
        assert "udev rule 99-gatewayd-ant.rules" in error and "plugdev" in error
        assert "udevadm" in error and "/dev/bus/usb/001/" in error
        rule = (Path(__file__).parents[2] / "udev" / "99-gatewayd-ant.rules").read_text()
        assert 'ATTR{idProduct}=="1008"' in rule and 'ATTR{idProduct}=="1009"' in rule
        assert 'GROUP="plugdev"' in rule
        assert await asyncio.to_thread(rig.backend.wait_calls, "open_device", 4)
        assert len(rig.log.matching("no permission", logging.ERROR)) == 1, "logged once"
        stick.deny_access = False  # the rule is installed
        await rig.configured()
        await rig.player.play(3.0)
        assert_every_second(rig, DataType.HEART_RATE, strap, range(0, 2), 64)


async def test_a_stick_held_by_another_process_says_so() -> None:
    strap = HeartRateStrap(3, phase=0.01, bpm=64)
    stick = FakeAntStick()
    stick.held_elsewhere = True
    async with Rig([strap], [stick]) as rig:
        error = await rig.log.wait_for("held by another process", logging.ERROR)
        assert "stop that program" in error
        assert await asyncio.to_thread(rig.backend.wait_calls, "open_device", 3)
        stick.held_elsewhere = False
        await rig.configured()
        await rig.player.play(3.0)
        assert_every_second(rig, DataType.HEART_RATE, strap, range(0, 2), 64)


async def test_a_stick_pulled_out_during_setup_is_set_up_again_when_it_is_back() -> None:
    strap = HeartRateStrap(3, phase=0.01, bpm=64)
    async with Rig([strap]) as rig:
        stick = rig.sticks[0]
        rig.backend.pull_on(stick, RESET)  # gone as openant resets it, its reader already up
        await rig.log.wait_for("went away during setup", logging.ERROR)
        rig.backend.plug(stick)
        await rig.configured()
        await rig.player.play(3.0)
        assert_every_second(rig, DataType.HEART_RATE, strap, range(0, 2), 64)
        # (Rig's exit checks that the half-started openant reader thread ended too)


async def test_a_stick_that_stops_answering_is_reset_and_reopened() -> None:
    strap = HeartRateStrap(3, phase=0.01, bpm=64)
    async with Rig([strap], health_check_s=0.05) as rig:
        stick = rig.sticks[0]
        await rig.configured()
        await rig.player.play(2.0)
        status_request = bytes([0, CHANNEL_STATUS])
        # a second check is only sent after the first was answered
        assert await asyncio.to_thread(
            stick.wait_until, lambda: stick.sent(REQUEST, status_request) >= 2
        )
        assert rig.source.sticks["ant0"].answers >= 1
        stick.configured.clear()
        stick.wedged = True  # still on the bus, silent: only a reset brings it back
        warning = await rig.log.wait_for("stopped answering", logging.WARNING)
        assert "lost the ANT stick serial 305419896" in warning
        await rig.configured()
        await rig.player.play(3.0)
        assert stick.resets == 2
        assert_every_second(rig, DataType.HEART_RATE, strap, range(0, 4), 64)


async def test_a_channel_the_stick_closes_by_itself_reopens_the_stick() -> None:
    strap = HeartRateStrap(3, phase=0.01, bpm=64)
    async with Rig([strap]) as rig:
        stick = rig.sticks[0]
        await rig.configured()
        await rig.player.play(2.0)
        stick.close_channel_unasked(0)
        await rig.log.wait_for("closed channel 0", logging.WARNING)
        await rig.configured()
        await rig.player.play(3.0)
        assert stick.resets == 2
        assert_every_second(rig, DataType.HEART_RATE, strap, range(0, 4), 64)


async def test_two_sticks_are_both_used() -> None:
    strap = HeartRateStrap(3, phase=0.01, bpm=64)
    near, far = FakeAntStick(serial=111, port=1), FakeAntStick(serial=222, port=2, product=0x1009)
    async with Rig([strap], [near, far]) as rig:
        await rig.configured(near)
        await rig.configured(far)
        await rig.player.play(4.0)
        adapters: defaultdict[str, int] = defaultdict(int)
        for frame in rig.frames.log:
            adapters[frame.adapter] += 1
        assert sorted(adapters) == ["ant0", "ant1"]
        assert set(adapters.values()) == {distinct(strap)}
        # each broadcast reaches the pipeline twice, and still counts once
        assert_every_second(rig, DataType.HEART_RATE, strap, range(0, 3), 64)
        assert_rr(rig, strap, range(0, 3))


async def test_a_malformed_message_is_counted_and_dropped() -> None:
    strap = HeartRateStrap(3, phase=0.01, bpm=64)
    async with Rig([strap]) as rig:
        stick = rig.sticks[0]
        await rig.configured()
        # flag 0x80 promises a 4-byte channel id; two bytes follow
        stick.inject(BROADCAST, bytes([0, 4, 0, 0, 0, 0, 0, 0, 60, 0x80, 1, 2]))
        await rig.player.play(3.0)
        assert rig.source.sticks["ant0"].malformed == 1
        assert_every_second(rig, DataType.HEART_RATE, strap, range(0, 2), 64)


async def test_noise_and_a_bad_checksum_are_skipped_and_the_stream_goes_on() -> None:
    """openant's own reader stops its thread at the first byte out of place (an assert); ours
    resyncs on the next sync byte and drops a message whose checksum does not add up."""
    strap = HeartRateStrap(3, phase=0.01, bpm=64)
    async with Rig([strap]) as rig:
        stick = rig.sticks[0]
        await rig.configured()
        head = bytes([0xA4, 1, 0x6F, 0x20])  # a startup message: sync, length, id, content
        damaged = head + bytes([0xA4 ^ 1 ^ 0x6F ^ 0x20 ^ 0xFF])  # its checksum, damaged
        empty = bytes([0xA4, 0, 0x6F, 0xA4 ^ 0x6F])  # no content, checksum right
        stick.inject_bytes(b"\x00\x13\x37" + damaged + empty)
        await rig.player.play(3.0)
        ant0 = rig.source.sticks["ant0"]
        assert ant0.bad_bytes >= 3 + 1 + 1
        assert_every_second(rig, DataType.HEART_RATE, strap, range(0, 2), 64)


async def test_a_stick_without_libconfig_still_names_devices() -> None:
    strap = HeartRateStrap(3, phase=0.01, bpm=64, rssi=-50)
    stick = FakeAntStick(lib_config=False)
    async with Rig([strap], [stick]) as rig:
        await rig.configured()
        await rig.player.play(2.0)
        assert {(f.device_id, f.rssi) for f in rig.frames.log} == {("120:3", None)}
        assert (EXT_MESSAGES, bytes([0, 1])) in stick.commands


# -- the daemon -------------------------------------------------------------------------------


def test_the_daemon_runs_on_without_a_stick(tmp_path: Path) -> None:
    """ANT+ enabled on a machine with no stick (or no libusb): one message, everything else runs."""
    config = tmp_path / "gatewayd.yaml"
    config.write_text(
        "sources:\n"
        "  simulator: {enabled: true, athletes: 2}\n"
        "  ant: {enabled: true, rescan_s: 0.1}\n"
        "outputs: {stdout: {enabled: true}, local_broker: {port: 0}}\n"
        f"hub: {{state_dir: {tmp_path / 'state'}}}\n"
    )
    env = daemon_env(tmp_path)
    process = subprocess.run(
        [sys.executable, "-m", "gatewayd", "run", "--config", str(config), "--seconds", "3"],
        capture_output=True,
        check=False,
        text=True,
        env=env,
        timeout=60,
    )
    assert process.returncode == 0, process.stderr
    assert "sources [simulator, ant]" in process.stderr
    about_ant = [
        line
        for line in process.stderr.splitlines()
        if "no ANT stick found" in line or "libusb" in line
    ]
    assert len(about_ant) == 1, process.stderr  # said once, not at every rescan
    samples = [json.loads(line) for line in process.stdout.splitlines()]
    assert any(s.get("t") == "HEART_RATE" for s in samples), "the rest of gatewayd ran"


def test_ant_scan_lists_what_the_sticks_hear_with_roster_ids(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    backend = FakeUsbBackend()
    stick = FakeAntStick()
    backend.plug(stick)
    # pyusb's own seam: the backend it would load from libusb is the fake one
    monkeypatch.setattr(usb.backend.libusb1, "get_backend", lambda *a, **k: backend)
    strap, meter = HeartRateStrap(77, rssi=-55), PowerMeter(0x1_0042, rssi=-71)

    def radio() -> None:
        if stick.configured.wait(WAIT):
            for n in range(20):
                for device in (strap, meter):
                    stick.hear(device, device.next_page(n * 0.25))

    config = tmp_path / "gatewayd.yaml"
    config.write_text("sources: {ant: {rescan_s: 0.05}}\n")
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    thread = threading.Thread(target=radio)
    thread.start()
    try:
        status = cli.main(["ant-scan", "--config", str(config), "--seconds", "1.5"])
    finally:
        thread.join()
        root.handlers[:], root.level = handlers, level
    out = capsys.readouterr().out.splitlines()
    assert status == 0
    assert out[1].split() == ["11:65602", "bike", "power", "ant0", "20", "-71", "dBm"]
    assert out[2].split() == ["120:77", "heart", "rate", "ant0", "20", "-55", "dBm"]
    assert stick.errors == []


def test_a_bad_ant_setting_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "gatewayd.yaml"
    path.write_text("sources: {ant: {enabled: true, network_key: B9A521FBBD72C3}}\n")
    with pytest.raises(ConfigError) as caught:
        config_module.load(path)
    assert caught.value.key == "sources.ant.network_key"
    assert "B9A521FBBD72C3" in str(caught.value)
