"""The outputs alone: CPU per sample of the local broker, the upstream and MQTT, in one process.

    .venv/bin/python bench/outputs.py [--sensors 1000] [--seconds 20] [--consumers 10]

The samples are made first, by the simulator and the real pipeline on a manual clock (the mix
bench/daemon.py runs: N sensors, every athlete with a heart-rate strap, half ANT+ and half BLE,
a power meter and a speed/cadence sensor, so per-beat RR samples too), one batch per second as
the aggregator publishes them. Then, in this process, the hub hands them to the daemon's three
outputs wired as gatewayd/app.py wires them: the local broker (spool, DISPATCH to K consumers in
other processes), MQTT QoS 1 on per-type topics to a mosquitto, and the upstream in gatewayd
mode to a second gatewayd. A batch is published every `--interval` s of real time. CPU is this
process's (every thread) from the first batch until every output has sent the last one, per
sample, and divided by the machine reference measured in the same run. Only the outputs and the
hub run here: pipeline, simulator and the peers are elsewhere or done before.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from daemon import CONSUMER_TOKEN, PRODUCER_TOKEN, RECEIVER_CONFIG, consumer_process
from fanout import split, start_mosquitto
from machine import reference_us

from gatewayd.app import settle_collector
from gatewayd.clock import ManualClock, SystemClock
from gatewayd.config import (
    LocalBrokerConfig,
    MqttConfig,
    PipelineConfig,
    SimulatorConfig,
    UpstreamConfig,
)
from gatewayd.hub import Hub
from gatewayd.model import Sample
from gatewayd.pipeline import FrameQueue, Pipeline
from gatewayd.roster import Roster
from gatewayd.sinks.local_broker import LocalBroker
from gatewayd.sinks.mqtt import MqttSink
from gatewayd.sinks.upstream import UpstreamSink
from gatewayd.sources.simulator import SimulatorSource
from gatewayd.spool import Spool
from gatewayd.tokens import TokenStore
from tests.daemon import start_daemon


def second_batches(sensors: int, seconds: int, wall: float) -> list[list[Sample]]:
    """What the pipeline publishes, batch by batch, for `seconds` simulated seconds."""
    clock = ManualClock(wall=wall)
    sim = SimulatorSource(
        SimulatorConfig(
            enabled=True, athletes=max(1, sensors // 3), bike_fraction=1.0, hr_straps="mixed"
        ),
        clock,
    )
    athletes, devices = [], {}
    for info, owned in sim.roster_entries():
        athletes.append(info)
        devices.update({ident: info.uid for ident in owned})
    hub = Hub(10**8)
    taken = hub.subscribe("bench", 10**8)
    queue = FrameQueue(maxsize=10**8)
    pipeline = Pipeline(FrameQueue(), hub, Roster(athletes, devices), PipelineConfig(), clock)
    pipeline.tick()
    out: list[list[Sample]] = []
    step, elapsed = 0.05, 0.0
    while elapsed < seconds + 3:
        elapsed += step
        clock.advance(step)
        sim.emit_due(elapsed, queue)
        pipeline.process_all(queue.take_all())
        pipeline.tick()
        batch = [e for e in taken.get_nowait() if isinstance(e, Sample)]
        if batch:
            out.append(batch)
    return out[2 : 2 + seconds]  # past the first seconds, when devices are still being heard


async def until(check: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)  # bench only: polling this process's own state


async def run(args: argparse.Namespace) -> dict[str, float]:
    logging.disable(logging.WARNING)
    batches = second_batches(args.sensors, args.seconds, math.floor(time.time()) - args.seconds)
    total = sum(len(b) for b in batches)
    tmp = Path(tempfile.mkdtemp(prefix="bench-outputs-"))
    mosquitto = None
    receiver = None
    procs = []
    try:
        mosquitto, mqtt_port = start_mosquitto(tmp)
        (tmp / "receiver").mkdir()
        receiver = await start_daemon(tmp / "receiver", RECEIVER_CONFIG)
        clock = SystemClock()
        hub = Hub(1_000_000)
        spool = Spool(tmp / "spool.db", clock=clock)
        broker = LocalBroker(
            hub.subscribe("local_broker", 1_000_000),
            LocalBrokerConfig(
                host="127.0.0.1",
                port=0,
                consumer_tokens=[CONSUMER_TOKEN],
                max_consumers=args.consumers + 10,
            ),
            spool=spool,
            tokens=TokenStore(None, consumer_tokens=[CONSUMER_TOKEN], clock=clock),
            publish=hub.publish,
            clock=clock,
        )
        mqtt = None
        if not args.no_mqtt:
            mqtt = MqttSink(
                hub.subscribe("mqtt", 1_000_000),
                MqttConfig(enabled=True, port=mqtt_port, qos=1),
                hub_id="bench",
            )
        upstream = None
        if not args.no_upstream:
            upstream = UpstreamSink(
                hub.subscribe("upstream", 1_000_000),
                UpstreamConfig(
                    enabled=True,
                    mode="gatewayd",
                    url=f"ws://127.0.0.1:{receiver.broker_port}/connect",
                    token=PRODUCER_TOKEN,
                ),
                spool=spool,
                clock=clock,
            )
        sinks = [s for s in (broker, mqtt, upstream) if s is not None]
        tasks = [asyncio.create_task(s.run()) for s in sinks]
        if mqtt is not None:
            await asyncio.wait_for(mqtt.wait_connected(), 30)
        await until(lambda: bool(broker.port), "the broker to listen")
        ctx = mp.get_context("fork")
        pipes = []
        for n in split(args.consumers, 2):
            end, pipe = ctx.Pipe()
            proc = ctx.Process(target=consumer_process, args=(end, broker.port, n))
            proc.start()
            procs.append(proc)
            pipes.append(pipe)
        for pipe in pipes:
            assert await asyncio.to_thread(pipe.recv) == "ready"
        await until(
            lambda: (
                len(broker._consumers) == args.consumers
                and (upstream is None or upstream.state()["state"] == "connected")
            ),
            "the consumers and the upstream to connect",
        )
        reference = reference_us()
        settle_collector()  # as the daemon does once running (the batches made here included)
        cpu0 = time.process_time()
        loop = asyncio.get_running_loop()
        start = loop.time()
        for index, batch in enumerate(batches):
            await asyncio.sleep(max(0.0, start + index * args.interval - loop.time()))
            hub.publish_many(batch)
        await until(
            lambda: (
                not any(len(s) for s in hub.subscriptions())
                and (mqtt is None or mqtt.published >= total)
                and (upstream is None or upstream.forwarded >= total)
            ),
            "every output to send every sample",
        )
        cpu = time.process_time() - cpu0
        await broker.close()
        for pipe in pipes:
            pipe.send("end")
        received = 0
        for pipe in pipes:
            report = await asyncio.to_thread(pipe.recv)
            received += sum(report["counts"])
        for sink in (mqtt, upstream):
            if sink is not None:
                await sink.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        spool.close()
        return {
            "samples": total,
            "per_second": total / len(batches),
            "cpu_us": cpu / total * 1e6,
            "reference": reference,
            "consumers_missing": total * args.consumers - received,
        }
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        if receiver is not None:
            with contextlib.suppress(Exception):
                await receiver.stop()
        if mosquitto is not None:
            mosquitto.terminate()
            mosquitto.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sensors", type=int, default=1000)
    parser.add_argument("--seconds", type=int, default=30, help="simulated seconds sent")
    parser.add_argument("--consumers", type=int, default=10)
    parser.add_argument("--interval", type=float, default=0.25, help="real s between batches")
    parser.add_argument("--no-mqtt", action="store_true")
    parser.add_argument("--no-upstream", action="store_true")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    print(
        f"{result['samples']:,} samples ({result['per_second']:,.0f} a second), "
        f"{args.consumers} consumers"
        + ("" if args.no_mqtt else ", MQTT QoS 1")
        + ("" if args.no_upstream else ", upstream to a gatewayd")
    )
    print(
        f"outputs CPU per sample {result['cpu_us']:.2f} us = "
        f"{result['cpu_us'] / result['reference']:.3f}x the reference "
        f"({result['reference']:.2f} us); consumers missing {result['consumers_missing']}"
    )


if __name__ == "__main__":
    main()
