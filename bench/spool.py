"""Spool append rate and upstream drain rate (samples/s).

    .venv/bin/python bench/spool.py [--athletes 100] [--minutes 60]

The backlog is an outage of `--minutes` for `--athletes` athletes, each with heart rate, power,
cadence and speed (4 samples a second). Prints:

- size: bytes per sample on disk, the database file and its WAL together;
- append: Spool.append + one commit per simulated second (the hub's pace, compressed), in
  samples per second and CPU µs per sample (it runs on every sample in the daemon);
- read+encode: the forwarder's reader walking the spool and building SUBMIT frames (one core);
- drain: the backlog forwarded by UpstreamSink to a real gatewayd (`gatewayd run`, another
  process on 127.0.0.1) until its HEARTBEAT_ACK covers the last row: at-least-once delivery,
  receiver's parsing, dedupe and spooling included. Goal: >= 20,000 samples/s.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gatewayd import protocol as p
from gatewayd.clock import SystemClock
from gatewayd.config import UpstreamConfig
from gatewayd.hub import Hub
from gatewayd.model import DataType, Sample
from gatewayd.sinks.upstream import READ_CHUNK, UpstreamSink
from gatewayd.spool import Spool

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "bench-hub-to-hub-token"
T0 = 1_800_000_000.0
DRAINERS: set[asyncio.Task[bytes]] = set()


def second(athletes: int, ts: float) -> list[Sample]:
    out = []
    for a in range(athletes):
        uid = f"athlete-{a:03d}"
        k = int(ts) + a
        out += [
            Sample(uid, DataType.HEART_RATE, ts, val=60 + k % 120, device_id="C0:FF", source="ble"),
            Sample(uid, DataType.POWER, ts, val=100 + k % 300, device_id="11:12", source="ant"),
            Sample(uid, DataType.BIKE_CADENCE, ts, val=80 + k % 20, device_id="9", source="ant"),
            Sample(uid, DataType.SPEED, ts, val=8.25 + k % 7 / 4, device_id="121:1", source="ant"),
        ]
    return out


def bench_append(path: Path, athletes: int, seconds: int) -> tuple[Spool, float, float]:
    """The spool, wall seconds and CPU seconds of appending and committing every second."""
    spool = Spool(path, clock=SystemClock())
    batches = [second(athletes, T0 + s) for s in range(seconds)]
    started = time.perf_counter()
    cpu = time.process_time()
    for batch in batches:
        spool.append(batch)
        spool.flush()
    return spool, time.perf_counter() - started, time.process_time() - cpu


def on_disk(path: Path) -> int:
    """The spool's bytes on disk: the database file and its WAL."""
    wal = Path(f"{path}-wal")
    return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


def bench_read(spool: Spool) -> float:
    started = time.perf_counter()
    pos, encoded = 0, 0
    while rows := spool.read(pos, 1 << 62, READ_CHUNK):
        for _, sample in rows:
            encoded += len(p.submit(sample, with_uid=True))
        pos = rows[-1][0]
    return time.perf_counter() - started


async def start_receiver(tmp: Path) -> tuple[asyncio.subprocess.Process, int]:
    config = tmp / "receiver.yaml"
    config.write_text(
        f"hub: {{id: cloud, state_dir: {tmp / 'receiver'}}}\n"
        "outputs:\n"
        "  local_broker:\n"
        "    port: 0\n"
        f"    producer_tokens: [{{token: {TOKEN}, athletes: []}}]\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gatewayd",
        "run",
        "--config",
        str(config),
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    assert process.stderr is not None
    while line := await process.stderr.readline():
        if match := re.search(rb"listening on ws://127\.0\.0\.1:(\d+)/", line):
            DRAINERS.add(asyncio.create_task(process.stderr.read()))  # keep the pipe drained
            return process, int(match[1])
    raise SystemExit("the receiving gatewayd did not start")


def cpu_of(pid: int) -> float:
    """User + system CPU seconds of a running process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def bench_drain(spool: Spool, tmp: Path) -> tuple[float, float, float]:
    """Wall seconds, the sender's CPU seconds and the receiver's CPU seconds."""
    process, port = await start_receiver(tmp)
    receiver_cpu = cpu_of(process.pid)
    config = UpstreamConfig(
        enabled=True, mode="gatewayd", url=f"ws://127.0.0.1:{port}/connect", token=TOKEN
    )
    sink = UpstreamSink(Hub().subscribe("bench"), config, spool=spool, clock=SystemClock())
    last = spool.last_seq
    task = asyncio.create_task(sink.run())
    started = time.perf_counter()
    sender_cpu = time.process_time()
    while True:
        sink.updates.clear()
        sink.save_cursors()
        if sink.cursor >= last:
            break
        await sink.updates.wait()
    elapsed = time.perf_counter() - started
    sender_cpu = time.process_time() - sender_cpu
    receiver_cpu = cpu_of(process.pid) - receiver_cpu
    await sink.close()
    task.cancel()
    process.terminate()
    await process.wait()
    return elapsed, sender_cpu, receiver_cpu


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--athletes", type=int, default=100)
    parser.add_argument("--minutes", type=float, default=60.0)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    seconds = int(args.minutes * 60)
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        spool, append_s, append_cpu = bench_append(tmp / "spool.db", args.athletes, seconds)
        rows = spool.last_seq
        size = on_disk(tmp / "spool.db")
        read_cpu = time.process_time()
        read_s = bench_read(spool)
        read_cpu = time.process_time() - read_cpu
        drain_s, sender_cpu, receiver_cpu = await bench_drain(spool, tmp)
        spool.close()
    print(f"backlog            {rows:,} samples ({args.athletes} athletes x {args.minutes:g} min)")
    print(f"spool size         {size / 2**20:.1f} MiB, {size / rows:.1f} B/sample (WAL included)")
    print(
        f"append             {rows / append_s:,.0f} samples/s (one commit per second's batch),"
        f" {append_cpu / rows * 1e6:.2f} µs CPU/sample"
    )
    print(f"read+encode        {rows / read_s:,.0f} samples/s ({rows / read_cpu:,.0f} per CPU s)")
    print(f"drain (acked)      {rows / drain_s:,.0f} samples/s to a gatewayd on 127.0.0.1")
    print(f"outage cleared in  {drain_s:.1f} s")
    # On a shared or busy machine wall time lies; CPU per side shows what each core can do.
    print(f"  sender CPU       {sender_cpu:.1f} s ({rows / sender_cpu:,.0f} samples per CPU s)")
    print(f"  receiver CPU     {receiver_cpu:.1f} s ({rows / receiver_cpu:,.0f} samples per CPU s)")
    print(f"  load average     {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    asyncio.run(main())
