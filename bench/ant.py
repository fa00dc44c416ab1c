"""ANT+ through the fake stick, pyusb's core, openant and AntSource into the pipeline.

    .venv/bin/python bench/ant.py [--devices 100] [--seconds 10] [--flood] [--no-pipeline]

100 devices (HR, power, FE, speed/cadence, SDM, cadence, speed) broadcast at their real ~4 Hz
periods into one fake stick in continuous scan mode. By default the broadcasts go out in real
time and the script prints the gateway's CPU per frame and as a share of one core, plus the
latency from a broadcast leaving the stick to its Frame being taken on the event loop. With
--flood, all the broadcasts of --seconds are handed over at once, to find the most frames/s one
stick's path can take. Gateway CPU = the whole process's CPU minus the feeding thread's (which
plays the radio and the USB hardware).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import threading
import time
from collections import defaultdict, deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from openant.base.ant import Ant  # noqa: E402

from bench.machine import reference_us  # noqa: E402
from gatewayd.clock import SystemClock  # noqa: E402
from gatewayd.config import AntConfig, PipelineConfig  # noqa: E402
from gatewayd.hub import Hub  # noqa: E402
from gatewayd.pipeline import Pipeline  # noqa: E402
from gatewayd.roster import Roster  # noqa: E402
from gatewayd.sources.ant import AntSource  # noqa: E402
from tests.fakes.fake_ant_stick import (  # noqa: E402
    CadenceSensor,
    CountingFrameQueue,
    FakeAntStick,
    FakeUsbBackend,
    HeartRateStrap,
    PowerMeter,
    Room,
    SimDevice,
    SpeedCadenceSensor,
    SpeedSensor,
    StrideSensor,
    Trainer,
)

MIX = (
    (0.20, HeartRateStrap),
    (0.20, PowerMeter),
    (0.20, Trainer),
    (0.20, SpeedCadenceSensor),
    (0.10, StrideSensor),
    (0.05, CadenceSensor),
    (0.05, SpeedSensor),
)


def build_room(count: int) -> list[SimDevice]:
    devices: list[SimDevice] = []
    for share, kind in MIX:
        for _ in range(round(share * count)):
            index = len(devices)
            devices.append(kind(10_000 + index, phase=(index * 0.00247) % 0.25))
    while len(devices) < count:
        devices.append(HeartRateStrap(10_000 + len(devices), phase=0.1))
    return devices[:count]


class Feeder(threading.Thread):
    """Plays the room into the stick: the radio and the USB hardware, not the gateway."""

    def __init__(self, room: Room, stick: FakeAntStick, seconds: float, flood: bool) -> None:
        super().__init__(name="bench-feeder", daemon=True)
        self.room, self.stick, self.seconds, self.flood = room, stick, seconds, flood
        self.sent: dict[str, deque[float]] = defaultdict(deque)
        self.cpu = 0.0
        self.messages = 0

    def run(self) -> None:
        started_cpu = time.thread_time()
        start = time.monotonic()
        for t, device in self.room.due_until(self.seconds):
            if not self.flood:
                delay = start + t - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            page = device.next_page(t)
            self.sent[device.device_id].append(time.monotonic())
            self.stick.hear(device, page)
            self.messages += 1
        self.cpu = time.thread_time() - started_cpu


async def bench(args: argparse.Namespace) -> None:
    Ant._RESET_WAIT = 0  # the 1 s pause after reset is before the timing anyway
    backend = FakeUsbBackend()
    stick = FakeAntStick()
    backend.plug(stick)
    clock = SystemClock()
    frames = CountingFrameQueue(maxsize=10**7)
    frames.log = _Discard()  # type: ignore[assignment]
    hub = Hub()
    sink = hub.subscribe("bench", 10**8)
    pipeline = Pipeline(frames, hub, Roster([], {}), PipelineConfig(), clock)
    source = AntSource(AntConfig(enabled=True), clock, backend=backend)
    frames.bind(asyncio.get_running_loop())
    task = asyncio.create_task(source.run(frames))
    if not await asyncio.to_thread(stick.configured.wait, 30):
        raise SystemExit("the fake stick was never configured")

    devices = build_room(args.devices)
    feeder = Feeder(Room(devices), stick, args.seconds, args.flood)
    latencies: list[float] = []
    taken = 0
    started_wall = time.monotonic()
    started_cpu = time.process_time()
    base = stick.surfaced
    feeder.start()
    last_tick = time.monotonic()
    while feeder.is_alive() or taken < stick.surfaced - base:
        await frames.wait(0.05)
        batch = frames.take_all()
        now = time.monotonic()
        for frame in batch:
            sent = feeder.sent[frame.device_id]
            if sent:
                latencies.append(now - sent.popleft())
            if args.pipeline:
                pipeline.process(frame)
        taken += len(batch)
        if args.pipeline and now - last_tick >= 0.1:
            pipeline.tick()
            last_tick = now
    wall = time.monotonic() - started_wall
    cpu = time.process_time() - started_cpu - feeder.cpu
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)

    mode = "flood" if args.flood else "real time"
    print(f"mode                 {mode}, {'source + pipeline' if args.pipeline else 'source only'}")
    print(f"devices              {len(devices)}")
    print(f"broadcasts           {feeder.messages} in {args.seconds:g} simulated s")
    print(f"frames taken         {taken}")
    print(f"wall                 {wall:.2f} s")
    print(f"frames/s handled     {taken / wall:,.0f}")
    print(f"gateway CPU          {cpu:.2f} s ({100 * cpu / wall:.1f} % of one core)")
    per_frame = cpu / max(taken, 1) * 1e6
    ref = reference_us()
    print(f"gateway CPU/frame    {per_frame:.0f} us")
    print(f"machine reference    {ref:.1f} us (timeit -p sum(range(1000)); quiet: 7.8)")
    print(f"CPU/frame / ref      {per_frame / ref:.1f}x (goal 40 us on a quiet machine = 5.1x)")
    if latencies:
        latencies.sort()
        p99 = latencies[int(len(latencies) * 0.99)]
        print(
            f"latency to the loop  p50 {statistics.median(latencies) * 1e3:.2f} ms, "
            f"p99 {p99 * 1e3:.2f} ms, max {latencies[-1] * 1e3:.2f} ms"
        )
    if args.pipeline:
        print(f"samples              {len(sink)}")


class _Discard(list):  # type: ignore[type-arg]
    """The fake's frame log would only grow; the bench does not need it."""

    def append(self, item: object) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=10.0, help="simulated seconds")
    parser.add_argument("--flood", action="store_true", help="hand over everything at once")
    parser.add_argument(
        "--no-pipeline", dest="pipeline", action="store_false", help="stop at the FrameQueue"
    )
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
