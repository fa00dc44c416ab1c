"""MQTT publish throughput: samples/s from the hub through the MQTT sink into a real mosquitto.

    .venv/bin/python bench/mqtt.py [--samples 100000]

For each QoS (0 and 1) and protocol (5, 3.1.1): a fresh mosquitto on 127.0.0.1 (the test
fixture's), the sink connected, then `--samples` samples (100 athletes x data types) pushed
into the hub at once; timed until the broker has them all (QoS 0: written to the socket;
QoS 1: PUBACKed). CPU is this process's (all threads), per sample, also divided by
the machine-speed reference (`sum(range(1000))`, bench/machine.py) measured in the same run.
Also: memory per message held in the offline queue while the broker is down.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import reference_us

from gatewayd.config import MqttConfig
from gatewayd.hub import Hub
from gatewayd.model import DataType, Sample
from gatewayd.sinks.mqtt import MqttSink
from tests.integration.mosquitto import Mosquitto, free_port

TYPES = [DataType.HEART_RATE, DataType.POWER, DataType.BIKE_CADENCE, DataType.SPEED]


def samples(count: int) -> list[Sample]:
    out = []
    for i in range(count):
        athlete, rest = divmod(i, len(TYPES))
        uid = f"athlete-{athlete % 100:03d}"
        out.append(
            Sample(
                uid,
                TYPES[rest],
                1_800_000_000.0 + i // 400,
                val=float(60 + i % 120),
                device_id=f"C0:FF:EE:00:{athlete % 100:02X}:01",
                source="ble",
            )
        )
    return out


async def throughput(
    port: int, qos: int, protocol: str, batch: list[Sample]
) -> tuple[float, float]:
    """Samples/s (wall) and CPU µs per sample (this process, all threads)."""
    hub = Hub()
    cfg = MqttConfig(
        enabled=True, port=port, qos=qos, protocol=protocol, offline_queue=len(batch) + 10
    )
    sink = MqttSink(hub.subscribe("mqtt", len(batch) + 10), cfg, hub_id="bench")
    task = asyncio.create_task(sink.run())
    await asyncio.wait_for(sink.wait_connected(), 10)
    await asyncio.wait_for(sink.wait_idle(), 10)
    before = sink.published
    start = time.perf_counter()
    cpu = time.process_time()
    for sample in batch:
        hub.publish(sample)
    await asyncio.sleep(0)  # let the sink take its first batch, so wait_idle means "all sent"
    while len(sink.subscription) or sink.stats()["queued"]:
        await asyncio.wait_for(sink.wait_idle(), 120)
        await asyncio.sleep(0)
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu
    sent = sink.published - before
    assert sent == len(batch), (sent, len(batch), sink.stats())
    await sink.close()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return len(batch) / elapsed, cpu / len(batch) * 1e6


async def offline_bytes_per_message(count: int) -> float:
    hub = Hub()
    cfg = MqttConfig(enabled=True, port=free_port(), offline_queue=count)
    sink = MqttSink(hub.subscribe("mqtt", count), cfg, hub_id="bench")
    batch = samples(count)
    gc.collect()
    tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    sink._handle_batch(list(batch))
    used, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert sink.stats()["queued"] == count
    return (used - base) / count


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=100_000)
    args = parser.parse_args()
    logging.disable(logging.INFO)
    batch = samples(args.samples)
    reference = reference_us()
    print(f"{args.samples} samples per run, mosquitto on 127.0.0.1")
    print(f"machine reference sum(range(1000)): {reference:.2f} us CPU")
    for protocol in ("5", "3.1.1"):
        for qos in (0, 1):
            with tempfile.TemporaryDirectory() as directory:
                # no per-packet log: its reader thread would count as this process's CPU
                broker = Mosquitto(Path(directory), log_types="error warning notice information")
                broker.start()
                try:
                    rate, cpu_us = await throughput(broker.port, qos, protocol, batch)
                finally:
                    broker.stop()
            print(
                f"  MQTT {protocol:5} QoS {qos}: {rate:10,.0f} samples/s, "
                f"{cpu_us:5.1f} us CPU per sample = {cpu_us / reference:4.2f}x reference"
            )
    per = await offline_bytes_per_message(20_000)
    print(
        f"offline queue: {per:,.0f} bytes per waiting sample (default bound 50,000 -> "
        f"{per * 50_000 / 2**20:.0f} MiB)"
    )


if __name__ == "__main__":
    asyncio.run(main())
