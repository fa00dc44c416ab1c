"""The BLE source with bleak's real BlueZ backend against a fake BlueZ on a private dbus-daemon."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from bleak.backends.bluezdbus import manager as bleak_manager

from gatewayd.clock import SystemClock
from gatewayd.config import BleConfig, PipelineConfig, load
from gatewayd.hub import Hub
from gatewayd.model import DataType, Frame, Sample
from gatewayd.pipeline import FrameQueue, Pipeline
from gatewayd.roster import Roster
from gatewayd.sources.ble import BleSource, BleTiming, format_scan
from tests.fakes.fake_bluez import FAILED, IN_PROGRESS, FakeBlueZ, private_system_bus
from tests.helpers import until

REPO = Path(__file__).resolve().parents[2]
FAST = BleTiming(
    device_timeout_s=3.0,
    settle_s=0.2,
    absent_s=0.5,
    connect_timeout_s=10.0,
    backoff_min_s=0.05,
    backoff_max_s=0.5,
    stale_adapter_s=2.0,
    adapter_fail_limit=5,
    battery_interval_s=60.0,
    bluez_retry_s=0.2,
    tick_s=0.1,
    power_off_s=0.05,
)


def addr(i: int, prefix: str = "C0:FF:EE:00:00") -> str:
    return f"{prefix}:{i:02X}"


@pytest.fixture
async def bus(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    async with private_system_bus() as address:
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", address)
        try:
            yield address
        finally:
            await release_bleak_manager()


async def release_bleak_manager() -> None:
    """Close bleak's per-loop BlueZ manager while this test's loop still runs.

    bleak keeps one manager per event loop and finalizes the bus of a closed loop's manager when
    a later loop asks for one; by then that socket's fd number may belong to a new connection
    (each test has its own loop), which it would close. A daemon has one loop for its life.
    """
    managers = getattr(bleak_manager, "_global_instances", {})
    manager = managers.pop(asyncio.get_running_loop(), None)
    bus = getattr(manager, "_bus", None)
    if bus is not None:
        bus.disconnect()
        with contextlib.suppress(Exception):
            await bus.wait_for_disconnect()


@pytest.fixture
async def fake(bus: str) -> AsyncIterator[FakeBlueZ]:
    bluez = FakeBlueZ(bus)
    await bluez.start()
    try:
        yield bluez
    finally:
        await bluez.close()


class Consumer:
    """The consumer end: every Frame the source queued (on its way to a real Pipeline) and every
    per-second Sample the Pipeline published to the Hub."""

    def __init__(self, queue: FrameQueue) -> None:
        self.queue = queue
        self.frames: list[Frame] = []
        self.samples: list[Sample] = []
        self.event = asyncio.Event()
        self.hub = Hub()
        self.subscription = self.hub.subscribe("test")
        self.pipeline_queue = FrameQueue()
        self.pipeline = Pipeline(
            self.pipeline_queue, self.hub, Roster([], {}), PipelineConfig(), SystemClock()
        )

    async def tee(self) -> None:
        while True:
            await self.queue.wait(1.0)
            batch = self.queue.take_all()
            if batch:
                self.frames.extend(batch)
                for frame in batch:
                    self.pipeline_queue.put(frame)
                self.event.set()

    async def collect(self) -> None:
        while True:
            for event in await self.subscription.get_batch():
                if isinstance(event, Sample):
                    self.samples.append(event)
            self.event.set()

    def kinds_by_device(self) -> dict[str, set[str]]:
        seen: dict[str, set[str]] = {}
        for frame in self.frames:
            seen.setdefault(frame.device_id, set()).add(frame.kind)
        return seen

    def seconds(self, address: str, t: DataType) -> dict[float, Sample]:
        """The per-second samples of one device and data type, by second."""
        uid = f"ble:{address}"
        return {s.ts: s for s in self.samples if s.uid == uid and s.t == t}


@contextlib.asynccontextmanager
async def running(source: BleSource) -> AsyncIterator[Consumer]:
    queue = FrameQueue()
    consumer = Consumer(queue)
    tasks = [
        asyncio.create_task(source.run(queue)),
        asyncio.create_task(consumer.tee()),
        asyncio.create_task(consumer.pipeline.run()),
        asyncio.create_task(consumer.collect()),
    ]
    try:
        yield consumer
        assert not tasks[0].done(), "the BLE source must never stop on its own"
    finally:
        await cancel_all(tasks)


async def cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    # cancel again if needed: on Python 3.11 asyncio.wait_for (FrameQueue.wait uses it) swallows
    # a cancellation that arrives just as its future completes
    for _ in range(10):
        pending = [task for task in tasks if not task.done()]
        if not pending:
            return
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=2)
    raise AssertionError(f"tasks would not stop: {pending}")


def source_for(**config: object) -> BleSource:
    return BleSource(BleConfig(enabled=True, **config), timing=FAST)  # type: ignore[arg-type]


async def test_room_of_straps_over_two_adapters_respects_slots(fake: FakeBlueZ) -> None:
    fake.add_adapter("hci0", limit=7)
    fake.add_adapter("hci1", limit=7)
    straps = [addr(i) for i in range(12)]
    meters = [addr(i, "C0:FF:EE:00:01") for i in range(3)]
    polars = [addr(i, "A0:9E:1A:00:00") for i in range(4)]
    for i, a in enumerate(straps):
        # half the room is heard by both adapters, with different strengths
        hear = {"hci0": -50 - i, "hci1": -70 + i} if i % 2 else {f"hci{i // 2 % 2}": -60}
        fake.add_strap(a, hear, hr=60 + i)
    for a in meters:
        fake.add_power_meter(a, {"hci0": -65, "hci1": -55})
    for i, a in enumerate(polars):
        fake.add_strap(a, {"hci0": -60, "hci1": -62}, polar=True, hr=100 + i)
    source = source_for(slots_per_adapter=5)
    wanted = set(straps) | set(meters)

    async with running(source) as out:
        seen = out.kinds_by_device

        def served(devices: set[str]) -> bool:
            kinds = seen()
            return all({"2a37", "2a63"} & kinds.get(a, set()) for a in devices)

        # ten slots, fifteen connectable devices: exactly ten connected, five waiting
        await until(lambda: len(source.connected()) == 10, source.changed)
        first = set(source.connected())
        await until(lambda: served(first), out.event)
        await until(lambda: all("mfr:006b" in seen().get(a, set()) for a in polars), out.event)
        assert len(fake.connected_on("hci0")) == len(fake.connected_on("hci1")) == 5
        # the rest are served as slots free up: athletes leave, the waiting ones get connected
        leaving = sorted(first)[:5]
        for a in leaving:
            fake.disappear(a)
        staying = wanted - set(leaving)
        await until(lambda: set(source.connected()) == staying, source.changed)
        await until(lambda: served(wanted), out.event)
        kinds = seen()
        assert all({"2a38", "2a19"} <= kinds[a] for a in straps)
        assert all("2a19" in kinds[a] for a in meters)

        # per-second samples at the consumer end, two seconds of each device still in the room
        def sampled(devices: set[str], t: DataType) -> bool:
            return all(len(out.seconds(a, t)) >= 2 for a in devices)

        in_room = staying & set(straps)
        await until(lambda: sampled(in_room, DataType.HEART_RATE), out.event)
        for a in in_room:
            per_second = out.seconds(a, DataType.HEART_RATE)
            assert {s.val for s in per_second.values()} == {60 + straps.index(a)}
            assert all(ts == int(ts) for ts in per_second)
        meters_in_room = staying & set(meters)
        await until(lambda: sampled(meters_in_room, DataType.POWER), out.event)
        watts = {s.val for a in meters_in_room for s in out.seconds(a, DataType.POWER).values()}
        assert watts == {150}
        # the advertising straps too, with no connection at all
        await until(lambda: sampled(set(polars), DataType.HEART_RATE), out.event)
        for i, a in enumerate(polars):
            assert {s.val for s in out.seconds(a, DataType.HEART_RATE).values()} == {100 + i}

    assert fake.stats.max_connected["hci0"] <= 5
    assert fake.stats.max_connected["hci1"] <= 5
    assert source.stats.connects >= 15
    # advertising straps never took a slot
    assert not fake.stats.ever_connected & set(polars)
    # connects were serialized per adapter: BlueZ never had to answer InProgress
    assert fake.stats.in_progress_answers == 0
    assert fake.stats.over_limit == 0
    hr = [f for f in out.frames if f.kind == "2a37"]
    assert {f.adapter for f in hr} == {"hci0", "hci1"}
    assert all(f.source == "ble" and f.device_id == f.device_id.upper() for f in out.frames)
    assert all(f.payload[1] == 60 + straps.index(f.device_id) for f in hr)
    advert = next(f for f in out.frames if f.kind == "mfr:006b")
    assert advert.payload[2] in range(100, 104)
    assert advert.rssi is not None and advert.rssi < 0


async def test_connection_goes_to_the_adapter_that_hears_best(fake: FakeBlueZ) -> None:
    fake.add_adapter("hci0")
    fake.add_adapter("hci1")
    fake.add_strap(addr(1), {"hci0": -80, "hci1": -45})
    fake.add_strap(addr(2), {"hci0": -40, "hci1": -75})
    source = source_for()
    async with running(source):
        await until(lambda: len(source.connected()) == 2, source.changed)
        assert source.connected() == {addr(1): "hci1", addr(2): "hci0"}


async def test_roster_mode_takes_only_listed_devices_and_connect_flag(fake: FakeBlueZ) -> None:
    fake.add_adapter("hci0")
    fake.add_strap(addr(1), {"hci0": -50})
    fake.add_strap(addr(2), {"hci0": -50})
    fake.add_strap(addr(3), {"hci0": -50}, polar=True)
    roster = {addr(1).lower(): False, addr(3): True}  # the Polar strap is connected anyway (RR)
    source = BleSource(BleConfig(enabled=True, auto=False), roster, timing=FAST)
    async with running(source):
        await until(lambda: len(source.connected()) == 2, source.changed)
    assert fake.stats.ever_connected == {addr(1), addr(3)}


async def test_strap_that_leaves_and_returns_is_reconnected_within_5_s(fake: FakeBlueZ) -> None:
    fake.add_adapter("hci0")
    fake.add_strap(addr(1), {"hci0": -50})
    fake.add_strap(addr(2), {"hci0": -55})
    source = source_for()
    async with running(source) as out:
        await until(lambda: len(source.connected()) == 2, source.changed)
        fake.disappear(addr(1))
        await until(lambda: addr(1) not in source.connected(), source.changed)
        assert addr(2) in source.connected()
        returned = time.monotonic()
        fake.reappear(addr(1))
        await until(lambda: addr(1) in source.connected(), source.changed)
        assert time.monotonic() - returned < 5.0
        back = math.ceil(time.time())  # a second that starts after the return
        await until(
            lambda: any(ts >= back for ts in out.seconds(addr(1), DataType.HEART_RATE)),
            out.event,
        )
        assert source.slots_in_use() == {"hci0": 2}
    assert source.stats.drops >= 1


async def test_notification_bytes_reach_the_frame_unchanged(fake: FakeBlueZ) -> None:
    fake.add_adapter("hci3")
    fake.add_strap(addr(1), {"hci3": -61}, hz=0.01)  # quiet: only the injected value arrives
    source = source_for()
    async with running(source) as out:
        await until(lambda: addr(1) in source.connected(), source.changed)
        await until(lambda: "2a19" in out.kinds_by_device().get(addr(1), set()), out.event)
        value = bytes.fromhex("10480004")  # HR 72 with one RR interval of 1024/1024 s
        before = time.time()
        fake.notify(addr(1), "2a37", value)
        await until(lambda: any(f.payload == value for f in out.frames), out.event)
        status = source.status()
    frame = next(f for f in out.frames if f.payload == value)
    assert (frame.source, frame.adapter, frame.device_id, frame.kind) == (
        "ble",
        "hci3",
        addr(1),
        "2a37",
    )
    assert -62 <= (frame.rssi or 0) <= -60
    assert before <= frame.wall <= time.time()
    assert frame.mono <= time.monotonic()
    assert status["adapters"]["hci3"]["in_use"] == 1 and status["connected"] == 1
    # it came over the AcquireNotify socket, not as a D-Bus signal
    assert fake.stats.acquired == 1 and fake.stats.fd_notifications >= 1
    assert source.stats.acquired == 1


async def test_start_notify_when_acquire_notify_is_refused_or_switched_off(
    fake: FakeBlueZ, caplog: pytest.LogCaptureFixture
) -> None:
    """AcquireNotify fails on some peripherals: such a device gets D-Bus notifications, and so
    does every device with sources.ble.acquire_notify false."""
    caplog.set_level(logging.INFO, logger="gatewayd.sources.ble")
    fake.add_adapter("hci0")
    fake.add_strap(addr(1), {"hci0": -50}, hr=71)
    fake.add_strap(addr(2), {"hci0": -50}, hr=72)
    fake.refuse_acquire.add(addr(1))
    source = source_for()
    async with running(source) as out:
        await until(lambda: len(source.connected()) == 2, source.changed)
        await until(
            lambda: (
                {"2a37"} <= out.kinds_by_device().get(addr(1), set())
                and {"2a37"} <= out.kinds_by_device().get(addr(2), set())
            ),
            out.event,
        )
    assert fake.stats.acquired == 1, "only the device that accepts it"
    assert fake.stats.fd_notifications > 0
    assert any(
        addr(1) in r.getMessage() and "AcquireNotify refused" in r.getMessage()
        for r in caplog.records
    )
    off = source_for(acquire_notify=False)
    fake.refuse_acquire.clear()
    before = fake.stats.acquired
    async with running(off) as out:
        await until(lambda: len(off.connected()) == 2, off.changed)
        await until(lambda: {"2a37"} <= out.kinds_by_device().get(addr(2), set()), out.event)
    assert fake.stats.acquired == before and off.stats.acquired == 0


async def test_dropped_link_reconnects_and_frees_its_slot(fake: FakeBlueZ) -> None:
    fake.add_adapter("hci0")
    fake.add_strap(addr(1), {"hci0": -50})
    source = source_for(slots_per_adapter=1)
    async with running(source):
        await until(lambda: addr(1) in source.connected(), source.changed)
        before = fake.stats.connects_ok
        fake.drop(addr(1))
        await until(
            lambda: fake.stats.connects_ok > before and fake.is_connected(addr(1)), fake.changed
        )
        assert source.slots_in_use() == {"hci0": 1}


async def test_deaf_adapter_is_power_cycled_and_its_devices_come_back(
    fake: FakeBlueZ, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "gatewayd.sources.ble")
    fake.add_adapter("hci0")
    fake.add_adapter("hci1")
    on0 = [addr(i) for i in range(3)]
    on1 = [addr(i, "C0:FF:EE:00:01") for i in range(2)]
    for a in on0:
        fake.add_strap(a, {"hci0": -50})
    for a in on1:
        fake.add_strap(a, {"hci1": -50})
    source = source_for()
    async with running(source) as out:
        await until(lambda: len(source.connected()) == 5, source.changed)
        connects_on1 = fake.stats.connects_ok
        fake.stick("hci0")
        await until(lambda: source.stats.recoveries_by_adapter.get("hci0", 0) >= 1, source.changed)
        await until(lambda: all(fake.is_connected(a) for a in on0), fake.changed)
        await until(lambda: all(source.connected().get(a) == "hci0" for a in on0), source.changed)
        back = math.ceil(time.time())  # a second that starts after the return
        await until(
            lambda: all(any(ts >= back for ts in out.seconds(a, DataType.HEART_RATE)) for a in on0),
            out.event,
        )
    assert fake.stats.power_offs["hci0"] >= 1
    assert fake.stats.power_offs["hci1"] == 0
    # hci1's links were never touched: only the three hci0 straps connected again
    assert fake.stats.connects_ok - connects_on1 == len(on0)
    assert "power-cycling" in caplog.text and "hci0" in caplog.text


async def test_connects_failing_are_retried_without_leaking_slots(fake: FakeBlueZ) -> None:
    fake.add_adapter("hci0")
    fake.add_strap(addr(1), {"hci0": -50})
    fake.add_strap(addr(2), {"hci0": -50})
    fake.add_strap(addr(3), {"hci0": -50})
    fake.fail_connects(addr(1), 3, IN_PROGRESS)
    fake.fail_connects(addr(2), 4, FAILED)
    # seven failures over two devices, interleaved with successes; the streak that makes an
    # adapter suspect must be longer than any run of them however the retries interleave
    source = BleSource(
        BleConfig(enabled=True, slots_per_adapter=3), timing=replace(FAST, adapter_fail_limit=8)
    )
    async with running(source) as out:
        await until(lambda: len(source.connected()) == 3, source.changed)
        await until(
            lambda: (
                {f.device_id for f in out.frames if f.kind == "2a37"} == {addr(1), addr(2), addr(3)}
            ),
            out.event,
        )
        assert source.slots_in_use() == {"hci0": 3}
    assert source.stats.connect_failures == 7
    assert fake.stats.max_connected["hci0"] == 3
    assert source.stats.recoveries == 0  # a few failures are not a wedged adapter


class JumpClock:
    """Real time plus a jump the test makes: 90 s of silence without waiting 90 s."""

    def __init__(self) -> None:
        self.offset = 0.0

    def mono(self) -> float:
        return time.monotonic() + self.offset

    def wall(self) -> float:
        return time.time() + self.offset


async def watchdog_passes(source: BleSource, n: int = 2) -> None:
    for _ in range(n):
        source.watched.clear()
        async with asyncio.timeout(10):
            await source.watched.wait()


async def test_silence_is_suspect_only_while_devices_are_expected(fake: FakeBlueZ) -> None:
    fake.add_adapter("hci0")
    fake.add_strap(addr(1), {"hci0": -50})
    fake.add_strap(addr(2), {"hci0": -50})
    clock = JumpClock()
    source = BleSource(
        BleConfig(enabled=True), timing=replace(FAST, stale_adapter_s=90.0), clock=clock
    )
    async with running(source):
        await until(lambda: len(source.connected()) == 2, source.changed)
        # every strap is connected, so they do not advertise: silence is normal, not a fault
        clock.offset += 120
        await watchdog_passes(source)
        assert source.stats.recoveries == 0 and fake.stats.power_offs["hci0"] == 0
        # a strap drops and is not heard again: a working adapter would hear it (or, in a real
        # gym, the phones around it), and it has heard nothing for 120 s: suspect
        fake.disappear(addr(2))
        await until(lambda: fake.stats.power_offs["hci0"] == 1, fake.changed)
        assert source.stats.recoveries == 1
        await until(lambda: addr(1) in source.connected(), source.changed)
        # the last strap leaves too; one recovery, after which nothing at all is heard ...
        fake.disappear(addr(1))
        await until(lambda: addr(1) not in source.connected(), source.changed)
        clock.offset += 120
        await until(lambda: fake.stats.power_offs["hci0"] == 2, fake.changed)
        await until(lambda: source.status()["adapters"]["hci0"]["scanning"], source.changed)
        # ... doubles the wait: not again after 120 s of silence, but after 180
        clock.offset += 120
        await watchdog_passes(source)
        assert source.stats.recoveries == 2
        clock.offset += 120
        await until(lambda: fake.stats.power_offs["hci0"] == 3, fake.changed)


async def test_adapter_that_keeps_failing_connects_is_power_cycled(fake: FakeBlueZ) -> None:
    fake.add_adapter("hci0")
    fake.add_strap(addr(1), {"hci0": -50})
    fake.fail_connects(addr(1), 6, FAILED)
    source = source_for()
    async with running(source):
        await until(lambda: source.stats.recoveries >= 1, source.changed)
        await until(lambda: addr(1) in source.connected(), source.changed)
    assert fake.stats.power_offs["hci0"] == 1


async def test_adapters_plugged_in_and_removed_at_run_time(fake: FakeBlueZ) -> None:
    fake.add_adapter("hci0")
    fake.add_strap(addr(1), {"hci0": -50, "hci1": -60})
    fake.add_strap(addr(2), {"hci0": -50, "hci1": -60})
    source = source_for(slots_per_adapter=1)
    async with running(source):
        await until(lambda: len(source.connected()) == 1, source.changed)
        fake.add_adapter("hci1")
        await until(lambda: len(source.connected()) == 2, source.changed)
        assert sorted(source.connected().values()) == ["hci0", "hci1"]
        on1 = next(a for a, hci in source.connected().items() if hci == "hci1")
        fake.remove_adapter("hci1")
        await until(
            lambda: on1 not in source.connected() and "hci1" not in source.slots_in_use(),
            source.changed,
        )
        assert len(source.connected()) == 1


async def test_no_bluez_warns_and_keeps_retrying_until_it_appears(
    bus: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "gatewayd.sources.ble")
    source = source_for()
    async with running(source) as out:
        await until(lambda: source.unavailable is not None, source.changed)
        assert not any(source.slots_in_use().values())
        late = FakeBlueZ(bus)
        await late.start()
        try:
            late.add_adapter("hci0")
            late.add_strap(addr(1), {"hci0": -50})
            await until(lambda: any(f.kind == "2a37" for f in out.frames), out.event)
        finally:
            await late.close()
    assert "BLE unavailable" in caplog.text


async def test_scan_lists_fitness_devices_and_prints_a_roster_that_loads(
    fake: FakeBlueZ, tmp_path: Path
) -> None:
    fake.add_adapter("hci0")
    fake.add_adapter("hci1")
    fake.add_strap(addr(1), {"hci0": -70, "hci1": -48})
    fake.add_power_meter(addr(2), {"hci0": -60})
    fake.add_strap(addr(3), {"hci1": -66}, polar=True)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gatewayd",
        "scan",
        "--no-ant",
        "--seconds",
        "0.5",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO), "GATEWAYD_CONFIG": str(empty_config(tmp_path))},
    )
    async with asyncio.timeout(60):
        stdout, stderr = await proc.communicate()
    assert proc.returncode == 0, stderr.decode()
    text = stdout.decode()
    rows = {line.split()[1]: line for line in text.splitlines() if line.startswith("# C0:")}
    assert set(rows) == {addr(1), addr(2), addr(3)}
    assert rows[addr(1)].split()[2] == "ble"
    assert -49 <= int(rows[addr(1)].split()[3]) <= -47  # the stronger of its two adapters
    assert "87%" in rows[addr(1)] and "hci1" in rows[addr(1)]
    assert "64%" in rows[addr(2)] and "cycling-power" in rows[addr(2)]
    assert "heart-rate-advert" in rows[addr(3)]
    # the printed roster is a valid config as it stands
    path = tmp_path / "gatewayd.yaml"
    path.write_text(text)
    config = load(path)
    assert {d.id for a in config.athletes for d in a.devices} == {addr(1), addr(2), addr(3)}
    assert fake.stats.in_progress_answers == 0  # battery reads are one at a time per adapter


async def test_scan_without_bluez_says_so(bus: str, tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gatewayd",
        "scan",
        "--seconds",
        "0.1",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO), "GATEWAYD_CONFIG": str(empty_config(tmp_path))},
    )
    async with asyncio.timeout(60):
        _, stderr = await proc.communicate()
    assert proc.returncode == 69
    assert "BlueZ is not running" in stderr.decode()


def empty_config(tmp_path: Path) -> Path:
    path = tmp_path / "empty.yaml"
    path.write_text("{}\n")
    return path


async def gatewayd_run(tmp_path: Path, config: str, seconds: float) -> tuple[int, str, str]:
    (tmp_path / "gatewayd.yaml").write_text(config)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HOME": str(tmp_path),
        "GATEWAYD_CONFIG": str(tmp_path / "gatewayd.yaml"),
        "GATEWAYD_HUB__STATE_DIR": str(tmp_path / "state"),
        "GATEWAYD_OUTPUTS__LOCAL_BROKER__PORT": "0",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gatewayd",
        "run",
        "--stdout",
        "--seconds",
        str(seconds),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_daemon_serves_ble_straps_as_per_second_samples(
    fake: FakeBlueZ, tmp_path: Path
) -> None:
    fake.add_adapter("hci0")
    fake.add_strap(addr(1), {"hci0": -50}, hr=77)
    fake.add_strap(addr(2), {"hci0": -50}, hr=88)
    config = (
        "sources: {ble: {enabled: true}}\n"
        "athletes:\n"
        "  - {id: ana, devices: [{source: ble, id: 'c0:ff:ee:00:00:01'}]}\n"
    )
    code, out, err = await gatewayd_run(tmp_path, config, 5)
    assert code == 0, err
    heart: dict[str, list[float]] = {}
    for line in out.splitlines():
        record = json.loads(line)
        if record.get("t") == "HEART_RATE":
            heart.setdefault(record["uid"], []).append(record["val"])
    assert set(heart) == {"ana", f"ble:{addr(2)}"}
    assert set(heart["ana"]) == {77} and set(heart[f"ble:{addr(2)}"]) == {88}
    assert len(heart["ana"]) >= 2


async def test_daemon_without_bluez_warns_and_runs_the_rest(bus: str, tmp_path: Path) -> None:
    config = "sources: {ble: {enabled: true}, simulator: {enabled: true, athletes: 2}}\n"
    code, out, err = await gatewayd_run(tmp_path, config, 3)
    assert code == 0, err
    assert "BLE unavailable" in err and "BlueZ is not running" in err
    assert any(json.loads(line).get("t") == "HEART_RATE" for line in out.splitlines())


async def test_scan_hears_ble_and_ant_together(
    fake: FakeBlueZ, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import threading

    import usb.backend.libusb1
    from openant.easy.node import Ant  # type: ignore[import-untyped]

    from gatewayd.cli import scan_everything
    from tests.fakes.fake_ant_stick import FakeAntStick, FakeUsbBackend, HeartRateStrap

    fake.add_adapter("hci0")
    fake.add_strap(addr(1), {"hci0": -52})
    backend = FakeUsbBackend()
    stick = FakeAntStick()
    backend.plug(stick)
    # pyusb's own seam, as in the ANT tests: the backend it would load is the fake one
    monkeypatch.setattr(usb.backend.libusb1, "get_backend", lambda *a, **k: backend)
    monkeypatch.setattr(Ant, "_RESET_WAIT", 0)
    strap = HeartRateStrap(77, rssi=-58)

    def radio() -> None:
        if stick.configured.wait(20):
            for n in range(12):
                stick.hear(strap, strap.next_page(n * 0.25))

    path = tmp_path / "gatewayd.yaml"
    path.write_text("sources: {ant: {rescan_s: 0.05}}\n")
    thread = threading.Thread(target=radio)
    thread.start()
    try:
        entries, problems = await scan_everything(load(path), 1.5, read_battery=False)
    finally:
        thread.join()
    assert problems == []
    assert [(e.source, e.address) for e in entries] == [("ble", addr(1)), ("ant", "120:77")]
    config_text = format_scan(entries, 1.5)
    (tmp_path / "roster.yaml").write_text(config_text)
    roster = load(tmp_path / "roster.yaml")
    assert [(d.source, d.id) for a in roster.athletes for d in a.devices] == [
        ("ble", addr(1)),
        ("ant", "120:77"),
    ]


async def test_busy_sockets_are_read_in_windows_and_nothing_is_lost(fake: FakeBlueZ) -> None:
    """Busy, the acquired sockets leave the event loop and are read when frames are taken and by
    windows of the batcher's own (bleak's reader still reads them); quiet again, they go back; a
    link that drops while batched leaves no stale socket behind; every notification the fake sent
    is heard."""
    fake.add_adapter("hci0", limit=10)
    for i in range(1, 7):
        fake.add_strap(addr(i), {"hci0": -50 - i}, hz=8.0)  # 48 notifications/s in all
    source = source_for(slots_per_adapter=6)
    batcher = source.batcher
    async with running(source) as out:
        await until(lambda: len(source.connected()) == 6, source.changed)
        await until(lambda: batcher.batching, batcher.switched)
        await until(lambda: batcher.sockets == 6, out.event)  # one HR socket per strap
        reads = batcher.windows + batcher.flushes
        # read along the consumer's takes (FrameQueue.add_drain) and by windows of its own
        await until(lambda: batcher.windows + batcher.flushes >= reads + 6, out.event)
        assert batcher.flushes > 0 and batcher.windows > 0

        fake.drop(addr(1))  # its socket ends while it is read in windows
        await until(lambda: addr(1) not in source.connected(), source.changed)
        await until(lambda: addr(1) in source.connected(), source.changed)
        await until(lambda: batcher.sockets == 6, out.event)

        fake.paused = True
        await until(lambda: not batcher.batching, batcher.switched)
        await until(
            lambda: source.stats.notifications == fake.stats.notifications,
            out.event,
            batcher.switched,
        )
        # quiet, a notification is read as it arrives (bleak's reader back on the loop)
        value = bytes.fromhex("004d")
        fake.paused = False
        fake.notify(addr(2), "2a37", value)
        fake.paused = True
        await until(lambda: any(f.payload == value for f in out.frames), out.event)
    assert source.stats.notifications == fake.stats.notifications
    assert fake.stats.fd_notifications == fake.stats.notifications
    heard = {f.device_id for f in out.frames if f.kind == "2a37"}
    assert heard == {addr(i) for i in range(1, 7)}
