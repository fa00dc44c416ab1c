"""The gateway's CPU per BLE notification: 20 fake straps notifying at 4 Hz through a fake BlueZ.

    .venv/bin/python bench/ble.py [--devices 20] [--hz 4] [--seconds 20] [--idle-seconds 10]
                                  [--notify-window 0.6] [--no-pipeline] [--start-notify]

A private dbus-daemon and the fake BlueZ (tests/fakes/fake_bluez.py, in its own process so its
CPU is not counted) serve org.bluez; this process runs the real BLE source (bleak's BlueZ
backend) and, unless --no-pipeline, the real pipeline behind it. Once every device is connected
and notifying, CPU time of this process (user + system, every thread) is measured over --seconds
of wall time; then the fake pauses its notifications (devices stay connected) and the same is
measured over --idle-seconds, which splits the cost into a fixed part per second (timers,
housekeeping) and a marginal part per notification.
Prints notifications/s, CPU microseconds per notification, both parts, event-loop iterations per
second, notifications lost (sent by the fake, never heard), dbus-daemon's CPU, CPU % of one
core and peak RSS. Notifications come over AcquireNotify (a socket per characteristic) unless
--start-notify asks for D-Bus PropertiesChanged signals (StartNotify), to compare the two.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import resource
import selectors
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

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
DBUS_DAEMON: list[int | None] = [None]  # pid of the private bus's dbus-daemon


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


class Window(NamedTuple):
    wall: float
    cpu: float  # this process, user + system
    daemon: float  # dbus-daemon
    notes: int
    samples: int
    wakes: int  # event loop iterations
    windows: int  # notification windows of the batcher's own (NotifyBatcher)
    flushes: int  # reads of the sockets along the pipeline's wake-ups


class CountingSelector:
    """The loop's selector, counting its select() calls: one per event loop iteration."""

    def __init__(self, inner: selectors.BaseSelector) -> None:
        self.inner = inner
        self.calls = 0

    def select(self, timeout: float | None = None) -> list[Any]:
        self.calls += 1
        return self.inner.select(timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def count_wakes() -> CountingSelector:
    loop = asyncio.get_running_loop()
    counting = CountingSelector(loop._selector)  # type: ignore[attr-defined]
    loop._selector = counting  # type: ignore[attr-defined]
    return counting


async def measure(source: BleSource, pipeline: Pipeline | None, seconds: float) -> Window:
    selector = asyncio.get_running_loop()._selector  # type: ignore[attr-defined]
    n0 = source.stats.notifications
    s0 = 0 if pipeline is None else pipeline.samples
    w0 = selector.calls
    b0 = source.batcher.windows
    f0 = source.batcher.flushes
    cpu0 = time.process_time()
    daemon0 = cpu_of(DBUS_DAEMON[0])
    wall0 = time.perf_counter()
    await asyncio.sleep(seconds)
    cpu = time.process_time() - cpu0
    return Window(
        time.perf_counter() - wall0,
        cpu,
        cpu_of(DBUS_DAEMON[0]) - daemon0,
        source.stats.notifications - n0,
        0 if pipeline is None else pipeline.samples - s0,
        selector.calls - w0,
        source.batcher.windows - b0,
        source.batcher.flushes - f0,
    )


async def control(address: str, member: str, signature: str = "", body: Any = ()) -> Any:
    """Call the fake's org.gatewayd.FakeControl (outside the measured windows)."""
    bus = await MessageBus(bus_address=address).connect()
    try:
        reply = await bus.call(
            Message(
                destination="org.bluez",
                path="/org/gatewayd/fake",
                interface="org.gatewayd.FakeControl",
                member=member,
                signature=signature,
                body=list(body),
            )
        )
        assert reply is not None and reply.message_type is MessageType.METHOD_RETURN, reply
        return reply.body[0] if reply.body else None
    finally:
        bus.disconnect()


async def pause(address: str, paused: bool) -> None:
    await control(address, "Pause", "b", [paused])


async def bench(args: argparse.Namespace) -> None:
    count_wakes()
    async with private_system_bus() as address:
        os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = address
        DBUS_DAEMON[0] = daemon_of(address)
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
        tasks: list[asyncio.Task[None]] = []
        try:
            assert fake.stdout is not None
            await asyncio.wait_for(fake.stdout.readline(), 30)  # "ready"

            queue = FrameQueue(maxsize=100_000)
            source = BleSource(
                BleConfig(
                    enabled=True,
                    slots_per_adapter=10,
                    acquire_notify=not args.start_notify,
                    notify_window_s=args.notify_window,
                ),
                timing=BleTiming(settle_s=0.2),  # the default ticks: what a gym runs
            )
            tasks.append(asyncio.create_task(source.run(queue)))
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

            busy = await measure(source, None if args.no_pipeline else pipeline, args.seconds)
            # the same process with every device connected but silent: what it costs per second
            # when nothing is heard (timers, housekeeping), which busy figures divide among frames
            await pause(address, True)
            await asyncio.sleep(PipelineConfig().lost_after_s + 1.0)  # past the "lost" statuses
            idle = await measure(source, None, args.idle_seconds)
            # paused, so nothing is in flight: everything the fake sent should have been heard
            sent = await control(address, "Notifications")
            heard = source.stats.notifications
        finally:
            # also when something above fails: the fake must not outlive the benchmark
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if fake.returncode is None:
                fake.terminate()
            await fake.wait()

    what = "BLE source only" if args.no_pipeline else "BLE source + pipeline"
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ref = reference_us()
    wall, notes = busy.wall, busy.notes
    per_note = busy.cpu / max(notes, 1) * 1e6
    idle_ms = idle.cpu / idle.wall * 1e3
    marginal = (busy.cpu - idle.cpu / idle.wall * wall) / max(notes, 1) * 1e6
    print(
        f"{what}: {args.devices} devices at {args.hz:g} Hz over {adapters} adapters, {wall:.1f} s"
    )
    print(
        f"  notifications      {notes} ({notes / wall:.1f}/s, "
        f"expected {args.devices * args.hz:g}/s)"
    )
    print(f"  lost               {sent - heard} of {sent} the fake sent in the whole run")
    if not args.no_pipeline:
        print(f"  samples published  {busy.samples} ({busy.samples / wall:.1f}/s)")
    print(f"  CPU per notification {per_note:.0f} us")
    print(f"  machine reference  {ref:.1f} us (timeit -p sum(range(1000)); quiet: 7.8)")
    print(f"  per notification / ref {per_note / ref:.1f}x (goal 40 us quiet = 5.1x)")
    print(
        f"  idle, connected    {idle_ms:.2f} ms CPU per s, {idle.wakes / idle.wall:.1f} loop "
        f"wake-ups/s ({idle.notes} notifications in {idle.wall:.0f} s)"
    )
    print(
        f"  busy               {busy.cpu / wall * 1e3:.2f} ms CPU per s, "
        f"{busy.wakes / wall:.1f} loop wake-ups/s, {busy.windows / wall:.1f} notification "
        f"windows/s of its own + {busy.flushes / wall:.1f}/s read along the pipeline's wake-ups "
        f"(idle: {idle.windows / idle.wall:.1f})"
    )
    print(
        f"  marginal per notification {marginal:.0f} us = {marginal / ref:.1f}x ref "
        f"(busy minus idle; the idle cost adds {idle_ms * 1e3 / max(notes / wall, 1e-9):.0f} us "
        f"at {notes / wall:.0f}/s)"
    )
    print(f"  over AcquireNotify {source.stats.acquired} of {args.devices} subscriptions")
    print(f"  dbus-daemon CPU    {busy.daemon / max(notes, 1) * 1e6:.0f} us per notification")
    print(f"  CPU                {busy.cpu / wall * 100:.1f} % of one core")
    print(f"  peak RSS           {rss_mb:.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--hz", type=float, default=4.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument(
        "--notify-window",
        type=float,
        default=BleConfig().notify_window_s,
        help="sources.ble.notify_window_s (0: off)",
    )
    parser.add_argument("--no-pipeline", action="store_true")
    parser.add_argument("--start-notify", action="store_true", help="D-Bus signals, not a socket")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
