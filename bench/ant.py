"""ANT+ through the fake stick, pyusb's core, openant and AntSource into the pipeline.

    .venv/bin/python bench/ant.py [--devices 100] [--seconds 10] [--stick antusb-m|antusb2]
                                  [--flood] [--no-pipeline] [--idle 5]

100 devices (HR, power, FE, speed/cadence, SDM, cadence, speed) broadcast at their real ~4 Hz
periods into one fake stick in continuous scan mode. The radio (the devices and the stick's
sending side) runs in a child process and writes the stick's USB transfers into the fake's IN
endpoint, an OS pipe, the way a USB controller hands libusb its transfers: the process measured
holds only the gateway (pyusb, openant, AntSource, the pipeline's real run loop) and the fake
backend's poll() and read(), which stand in for libusb's.

It prints the gateway process's CPU (every thread, kernel time included) per frame, split into
the fixed cost per second (measured first, with the stick configured and silent: timers, the
pipeline's loss checks, openant's polling) and the marginal cost per frame; CPU per thread; the
pipeline's own share (run_once: decode, aggregate, publish); the fake backend's own share; the
latency from a broadcast leaving the radio to the pipeline taking
its Frame; and frames dropped. `--stick antusb-m` (default) is a stick with event buffering
(ANT message 0x74), which gatewayd turns on; `--stick antusb2` has none, so every broadcast is a
USB transfer of its own. With --flood, all the broadcasts of --seconds are sent at once, to find
the most frames/s one stick's path can take.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import logging
import os
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from openant.base.ant import Ant  # noqa: E402

from bench.machine import reference_us  # noqa: E402
from gatewayd.clock import SystemClock  # noqa: E402
from gatewayd.config import AntConfig, PipelineConfig  # noqa: E402
from gatewayd.hub import Hub  # noqa: E402
from gatewayd.model import DeviceStatus, Frame, Sample  # noqa: E402
from gatewayd.pipeline import FrameQueue, Pipeline  # noqa: E402
from gatewayd.roster import Roster  # noqa: E402
from gatewayd.sources.ant import AntSource  # noqa: E402
from tests.fakes.fake_ant_stick import (  # noqa: E402
    CadenceSensor,
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
STICKS = {
    "antusb-m": {"product": 0x1009, "event_buffering": True},
    "antusb2": {"product": 0x1008},
}
_ROLES = {
    "MainThread": "event loop (source hand-off + pipeline)",
    "openant.base": "openant USB reader (ours parses in it)",
    "openant.easy": "openant response dispatcher",
    "asyncio": "asyncio to_thread workers",
    "fake": "fake stick firmware timer (idle here)",
}


def build_room(count: int) -> list[SimDevice]:
    devices: list[SimDevice] = []
    for share, kind in MIX:
        for _ in range(round(share * count)):
            index = len(devices)
            devices.append(kind(10_000 + index, phase=(index * 0.00247) % 0.25))
    while len(devices) < count:
        devices.append(HeartRateStrap(10_000 + len(devices), phase=0.1))
    return devices[:count]


# -- the radio (child process) ---------------------------------------------------------------


def radio(args: argparse.Namespace) -> None:
    """Play the room into the stick's IN endpoint; report what was sent, and when, as JSON."""
    stick = FakeAntStick.on_wire(args.wire, json.loads(args.state))
    room = Room(build_room(args.devices))
    sent: dict[str, list[float]] = defaultdict(list)
    messages = 0
    print("ready", flush=True)
    sys.stdin.readline()
    started_cpu = time.process_time()
    start = time.monotonic()
    for t, device in room.due_until(args.seconds):
        if not args.flood:
            delay = start + t - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        page = device.next_page(t)
        before = stick.surfaced
        now = time.monotonic()
        stick.hear(device, page)
        if stick.surfaced != before:  # openant would drop an exact repeat
            sent[device.device_id].append(now)
        messages += 1
    cpu = time.process_time() - started_cpu
    stick.close()
    result = {"messages": messages, "surfaced": stick.surfaced, "cpu": cpu, "sent": sent}
    print(json.dumps(result), flush=True)


# -- the gateway (this process) --------------------------------------------------------------


def _thread_cpu() -> dict[int, tuple[str, float]]:
    """CPU seconds so far of every live thread, by id (kernel time included)."""
    cpu: dict[int, tuple[str, float]] = {}
    for thread in threading.enumerate():
        if thread.ident is None:
            continue
        with contextlib.suppress(OSError, ProcessLookupError):
            clock = time.pthread_getcpuclockid(thread.ident)
            cpu[thread.ident] = (thread.name, time.clock_gettime(clock))
    return cpu


def _thread_switches() -> dict[str, tuple[int, float, float]]:
    """Per thread name: context switches, user and system CPU seconds so far (Linux /proc)."""
    out: dict[str, tuple[int, float, float]] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for thread in threading.enumerate():
        task = Path(f"/proc/self/task/{thread.native_id}")
        with contextlib.suppress(OSError):
            status = (task / "status").read_text()
            switches = sum(
                int(line.split()[1]) for line in status.splitlines() if "ctxt_switches" in line
            )
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            out[thread.name] = (switches, int(fields[11]) / tick, int(fields[12]) / tick)
    return out


def _thread_delta(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]
) -> dict[str, float]:
    """CPU per thread role between two snapshots (threads named alike are added up)."""
    delta: dict[str, float] = defaultdict(float)
    for ident, (name, cpu) in after.items():
        role = _ROLES.get(name.split("_")[0].split("-")[0], name)
        if name.startswith("gatewayd-ant"):
            role = "gatewayd data loop (idle)"
        delta[role] += cpu - before.get(ident, (name, 0.0))[1]
    return delta


class TimedPipeline(Pipeline):
    """The real pipeline; it also notes when each device's frames reach it (bench bookkeeping)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.taken_at: dict[str, list[float]] = defaultdict(list)
        self.taken = 0
        self.target = 10**12
        self.done = asyncio.Event()
        self.work_cpu = 0.0  # CPU in run_once: decode, derive, aggregate, publish, tick
        self.closes: list[float] = []  # a second's close to its samples' publication, s

    def _publish(self, samples: list[Sample], statuses: list[DeviceStatus]) -> None:
        if samples:
            self.closes.append(self.clock.wall() - (samples[0].ts + 1))
        super()._publish(samples, statuses)

    def run_once(self) -> None:
        started = time.thread_time()
        super().run_once()
        self.work_cpu += time.thread_time() - started

    def took(self, frame: Frame) -> None:
        self.taken_at[frame.device_id].append(time.monotonic())
        self.taken += 1
        if self.taken >= self.target:
            self.done.set()

    async def expect(self, count: int, timeout: float) -> None:
        """Return once `count` frames have been taken in all, or after `timeout` s."""
        self.target = count
        if self.taken < count:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.done.wait(), timeout)

    def process_all(self, frames: list[Frame]) -> None:
        for frame in frames:
            self.took(frame)
        super().process_all(frames)


async def _drain(frames: FrameQueue, consumer: TimedPipeline) -> None:
    """--no-pipeline: take frames off the queue as the pipeline would, and nothing more."""
    while True:
        await frames.wait(0.5)
        for frame in frames.take_all():
            consumer.took(frame)


async def bench(args: argparse.Namespace) -> None:
    Ant._RESET_WAIT = 0  # the 1 s pause after reset is before the timing anyway
    backend = FakeUsbBackend()
    stick = FakeAntStick(**STICKS[args.stick])  # type: ignore[arg-type]
    backend.plug(stick)
    clock = SystemClock()
    frames = FrameQueue(maxsize=10**7)
    hub = Hub()
    sink = hub.subscribe("bench", 10**8)
    pipeline = TimedPipeline(frames, hub, Roster([], {}), PipelineConfig(), clock)
    # (main's code before event buffering has no such key: the bench runs it too, for A/B)
    buffering = {"event_buffer_s": args.event_buffer} if args.event_buffer is not None else {}
    config = AntConfig(enabled=True, **buffering)
    source = AntSource(config, clock, backend=backend)
    frames.bind(asyncio.get_running_loop())
    task = asyncio.create_task(source.run(frames))
    if not await asyncio.to_thread(stick.configured.wait, 30):
        raise SystemExit("the fake stick was never configured")
    consumer = asyncio.create_task(pipeline.run() if args.pipeline else _drain(frames, pipeline))
    await asyncio.sleep(0.5)  # setup's stragglers (the configuration's last answers)
    child = subprocess.Popen(  # noqa: ASYNC220 (started once, before the timing)
        [
            sys.executable,
            __file__,
            "--radio",
            f"--wire={stick.wire()}",
            f"--state={json.dumps(stick.radio_state())}",
            f"--devices={args.devices}",
            f"--seconds={args.seconds}",
            *(["--flood"] if args.flood else []),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        pass_fds=(stick.wire(),),
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    ready = await asyncio.to_thread(child.stdout.readline)
    if ready.strip() != "ready":
        raise SystemExit(f"the radio process did not start: {ready!r}")

    # Fixed costs first: the stick configured and silent, every timer running.
    threads_idle = _thread_cpu()
    idle_cpu, idle_wall = time.process_time(), time.monotonic()
    await asyncio.sleep(args.idle)
    idle_s = time.monotonic() - idle_wall
    idle_per_s = (time.process_time() - idle_cpu) / idle_s
    idle_threads = _thread_delta(threads_idle, _thread_cpu())

    profile = cProfile.Profile() if args.profile else None
    if profile is not None:
        profile.enable()  # the event loop's thread only
    backend.account_reads(True)
    transfers_before = stick.transfers
    threads_before = _thread_cpu()
    switches_before = _thread_switches()
    started_wall = time.monotonic()
    started_cpu = time.process_time()
    base = pipeline.taken
    late_before = pipeline.aggregator.late_values
    closes_before = len(pipeline.closes)
    work_before = pipeline.work_cpu
    child.stdin.write("go\n")
    child.stdin.flush()
    report = json.loads(await asyncio.to_thread(child.stdout.readline))
    await asyncio.to_thread(child.wait)
    await pipeline.expect(base + report["surfaced"], 5.0)
    wall = time.monotonic() - started_wall
    cpu = time.process_time() - started_cpu
    per_thread = _thread_delta(threads_before, _thread_cpu())
    switches_after = _thread_switches()
    if profile is not None:
        profile.disable()
        profile.dump_stats(args.profile)
    fake_cpu = backend.account_reads(False)
    transfers = stick.transfers - transfers_before
    consumer.cancel()
    task.cancel()
    await asyncio.gather(consumer, task, return_exceptions=True)
    stick.close()

    taken = pipeline.taken - base
    latencies: list[float] = []
    for device_id, sends in report["sent"].items():
        takes = pipeline.taken_at[device_id]
        late = takes[len(takes) - len(sends) :]
        latencies.extend(t - s for s, t in zip(sends, late, strict=True))
    ref = reference_us()
    per = 1e6 / max(taken, 1)
    mode = "flood" if args.flood else "real time"
    print(f"mode                 {mode}, {'source + pipeline' if args.pipeline else 'source only'}")
    print(f"stick                {args.stick}")
    print(f"devices              {args.devices}")
    print(f"broadcasts           {report['messages']} in {args.seconds:g} simulated s")
    print(f"frames taken         {taken} (dropped {report['surfaced'] - taken + frames.dropped})")
    print(f"USB transfers        {transfers} ({taken / max(transfers, 1):.1f} frames each)")
    print(f"wall                 {wall:.2f} s")
    print(f"frames/s handled     {taken / wall:,.0f}")
    print(f"gateway CPU          {cpu:.2f} s ({100 * cpu / wall:.1f} % of one core)")
    print(f"gateway CPU/frame    {cpu * per:.1f} us = {cpu * per / ref:.2f}x ref")
    fixed = idle_per_s * wall
    print(
        f"  fixed              {idle_per_s * 1e3:.2f} ms/s idle = {fixed * per:.1f} us/frame at "
        f"this rate (stick silent for {idle_s:.0f} s)"
    )
    marginal = (cpu - fixed) * per
    print(f"  marginal           {marginal:.1f} us/frame = {marginal / ref:.2f}x ref")
    print(
        f"  fake USB backend   {fake_cpu * per:.1f} us/frame inside bulk_read (poll + read "
        "standing in for libusb; included above)"
    )
    if args.pipeline:
        work = (pipeline.work_cpu - work_before) * per
        print(
            f"  pipeline's own     {work:.1f} us/frame in run_once (decode, aggregate, publish: "
            f"not the source's); the rest: {cpu * per - work:.1f} us/frame"
        )
    print(f"radio process        {report['cpu']:.2f} s CPU (not counted)")
    print(f"machine reference    {ref:.1f} us (timeit -p sum(range(1000)); quiet: 7.8)")
    print(f"CPU/frame / ref      {cpu * per / ref:.2f}x (goal 40 us on a quiet machine = 5.1x)")
    print("per thread                                     load us/frame | idle ms/s")
    for role in sorted(set(per_thread) | set(idle_threads)):
        load = per_thread.get(role, 0.0) * per
        idle = idle_threads.get(role, 0.0) / idle_s * 1e3
        print(f"  {role:<44} {load:7.1f} | {idle:6.2f}")
    if args.switches:
        print("context switches / user s / sys s per thread during the load")
        for name, (n, user, system) in sorted(switches_after.items()):
            n0, user0, system0 = switches_before.get(name, (0, 0.0, 0.0))
            print(f"  {name:<44} {n - n0:7d} {user - user0:6.2f} {system - system0:6.2f}")
    if latencies:
        latencies.sort()
        p99 = latencies[int(len(latencies) * 0.99)]
        where = "pipeline" if args.pipeline else "loop"
        print(
            f"latency to the {where:<8} p50 {statistics.median(latencies) * 1e3:.2f} ms, "
            f"p99 {p99 * 1e3:.2f} ms, max {latencies[-1] * 1e3:.2f} ms"
        )
    if args.pipeline:
        closes = sorted(pipeline.closes[closes_before:])
        if closes:
            print(
                f"second's close to its samples' publish: p50 "
                f"{statistics.median(closes) * 1e3:.0f} ms, max {closes[-1] * 1e3:.0f} ms "
                "(the grace, then the pipeline's turn)"
            )
        late = pipeline.aggregator.late_values - late_before
        print(f"late values          {late} (taken after their second was emitted)")
        print(f"hub events           {len(sink)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=10.0, help="simulated seconds")
    parser.add_argument("--stick", choices=sorted(STICKS), default="antusb-m")
    parser.add_argument("--flood", action="store_true", help="hand over everything at once")
    parser.add_argument(
        "--event-buffer",
        type=float,
        help="sources.ant.event_buffer_s (antusb-m only; default: the config's default)",
    )
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of silence measured")
    parser.add_argument(
        "--no-pipeline", dest="pipeline", action="store_false", help="stop at the FrameQueue"
    )
    parser.add_argument("--profile", help="cProfile the event loop's thread into this file")
    parser.add_argument("--switches", action="store_true", help="context switches per thread")
    parser.add_argument("--radio", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--wire", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--state", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.radio:
        radio(args)
        return
    logging.disable(logging.WARNING)
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
