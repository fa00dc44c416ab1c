"""The gateway's CPU per BLE notification: 20 fake straps notifying at 4 Hz through a fake BlueZ.

    .venv/bin/python bench/ble.py [--devices 20] [--hz 4] [--seconds 20] [--no-pipeline]
                                  [--start-notify]

A private dbus-daemon and the fake BlueZ (tests/fakes/fake_bluez.py, in its own process so its
CPU is not counted) serve org.bluez; this process runs the real BLE source (bleak's BlueZ
backend) and, unless --no-pipeline, the real pipeline behind it. Once every device is connected
and notifying, CPU time of this process is measured over --seconds of wall time.
Prints notifications/s, CPU microseconds per notification, CPU % of one core and peak RSS.
Notifications come over AcquireNotify (a socket per characteristic) unless --start-notify asks
for D-Bus PropertiesChanged signals (StartNotify), to compare the two.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import reference_us
from gatewayd.clock import SystemClock
from gatewayd.config import BleConfig, PipelineConfig
from gatewayd.hub import Hub
from gatewayd.pipeline import FrameQueue, Pipeline
from gatewayd.roster import Roster
from gatewayd.sources.ble import BleSource, BleTiming
from tests.fakes.fake_bluez import private_system_bus

REPO = Path(__file__).resolve().parents[1]


async def drain(queue: FrameQueue) -> None:
    while True:
        await queue.wait(1.0)
        queue.take_all()


def daemon_of(address: str) -> int | None:
    """The pid of the dbus-daemon serving `address` (unix:path=<dir>/dbus-...)."""
    folder = str(Path(address.split("=", 1)[1].split(",", maxsplit=1)[0]).parent)
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if f"unix:dir={folder}".encode() in cmdline.read_bytes():
                return int(cmdline.parent.name)
    return None


def cpu_of(pid: int | None) -> float:
    """User + system CPU seconds of a process (Linux /proc); 0 when unknown."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def bench(args: argparse.Namespace) -> None:
    async with private_system_bus() as address:
        os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = address
        dbus_daemon = daemon_of(address)
        adapters = max(1, (args.devices + 9) // 10)
        fake = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.fakes.fake_bluez",
            "--adapters",
            str(adapters),
            "--limit",
            "10",
            "--straps",
            str(args.devices),
            "--hz",
            str(args.hz),
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert fake.stdout is not None
        await asyncio.wait_for(fake.stdout.readline(), 30)  # "ready"

        queue = FrameQueue(maxsize=100_000)
        source = BleSource(
            BleConfig(enabled=True, slots_per_adapter=10, acquire_notify=not args.start_notify),
            timing=BleTiming(settle_s=0.2, tick_s=1.0),
        )
        tasks = [asyncio.create_task(source.run(queue))]
        if args.no_pipeline:
            tasks.append(asyncio.create_task(drain(queue)))
        else:
            hub = Hub()
            hub.subscribe("bench", 1_000_000)
            pipeline = Pipeline(queue, hub, Roster([], {}), PipelineConfig(), SystemClock())
            tasks.append(asyncio.create_task(pipeline.run()))

        async with asyncio.timeout(60):
            while len(source.connected()) < args.devices:
                source.changed.clear()
                await source.changed.wait()
        # one more second so every device has subscribed and is notifying
        await asyncio.sleep(1.0)

        n0 = source.stats.notifications
        s0 = 0 if args.no_pipeline else pipeline.samples
        cpu0 = time.process_time()
        daemon0 = cpu_of(dbus_daemon)
        wall0 = time.perf_counter()
        await asyncio.sleep(args.seconds)
        cpu = time.process_time() - cpu0
        daemon_cpu = cpu_of(dbus_daemon) - daemon0
        wall = time.perf_counter() - wall0
        notes = source.stats.notifications - n0
        samples = 0 if args.no_pipeline else pipeline.samples - s0

        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        fake.terminate()
        await fake.wait()

    what = "BLE source only" if args.no_pipeline else "BLE source + pipeline"
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"{what}: {args.devices} devices at {args.hz:g} Hz over {adapters} adapters, {wall:.1f} s"
    )
    print(
        f"  notifications      {notes} ({notes / wall:.1f}/s, "
        f"expected {args.devices * args.hz:g}/s)"
    )
    if not args.no_pipeline:
        print(f"  samples published  {samples} ({samples / wall:.1f}/s)")
    per_note = cpu / max(notes, 1) * 1e6
    ref = reference_us()
    print(f"  CPU per notification {per_note:.0f} us")
    print(f"  machine reference  {ref:.1f} us (timeit -p sum(range(1000)); quiet: 7.8)")
    print(f"  per notification / ref {per_note / ref:.1f}x (goal 40 us quiet = 5.1x)")
    print(f"  over AcquireNotify {source.stats.acquired} of {args.devices} subscriptions")
    print(f"  dbus-daemon CPU    {daemon_cpu / max(notes, 1) * 1e6:.0f} us per notification")
    print(f"  CPU                {cpu / wall * 100:.1f} % of one core")
    print(f"  peak RSS           {rss_mb:.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--hz", type=float, default=4.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--no-pipeline", action="store_true")
    parser.add_argument("--start-notify", action="store_true", help="D-Bus signals, not a socket")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
