#!/usr/bin/env python3
"""Fan-out benchmark: the hub's broker vs mosquitto delivering the same JSON to many subscribers.

    python bench/fanout.py [--consumers 100] [--athletes 200] [--types 3] [--seconds 10]

Phase 1 runs the real LocalBroker (hub -> spool -> WebSocket) in a process of its own and feeds it
one burst of samples per second (every athlete's samples of one second, as the aggregator emits
them); consumers are real websockets clients in other processes. Phase 2 starts mosquitto on
loopback and publishes the same DISPATCH JSON payloads to the same number of paho subscribers.
CPU is what the broker process (resp. the mosquitto process) spent during the window; latency is
from the burst's publish to each message's arrival at a consumer (same host, same clock).
Goal (issue 5): broker CPU per delivered message within 2x of mosquitto's, p99 under 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import multiprocessing as mp
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gatewayd import protocol as p
from gatewayd.clock import SystemClock
from gatewayd.config import LocalBrokerConfig
from gatewayd.hub import Hub
from gatewayd.model import DataType, Sample

TOKEN = "bench-consumer-token"
MARK = b'{"op":5,'
TYPES = [DataType.HEART_RATE, DataType.POWER, DataType.BIKE_CADENCE, DataType.SPEED]
T0 = 1_800_000_000.0


def bursts(athletes: int, types: int, seconds: int, spread: int = 1) -> list[list[Sample]]:
    """Each second's samples, cut into `spread` slices sent evenly over that second."""
    out = []
    for sec in range(seconds):
        second = [
            Sample(f"athlete-{a:03d}", t, T0 + sec, val=60 + (a + sec) % 120, device_id="bench")
            for a in range(athletes)
            for t in TYPES[:types]
        ]
        size = slice_size(len(second), spread)
        out.extend(second[i : i + size] for i in range(0, len(second), size))
    return out


def slice_size(per_second: int, spread: int) -> int:
    return max(1, -(-per_second // max(1, spread)))


def slices_per_second(per_second: int, spread: int) -> int:
    return -(-per_second // slice_size(per_second, spread))


def cpu_self() -> float:
    t = os.times()
    return t.user + t.system


def cpu_of(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------- phase 1: the hub's broker


def broker_process(pipe: Connection, args: argparse.Namespace) -> None:
    asyncio.run(_broker_main(pipe, args))


async def _broker_main(pipe: Connection, args: argparse.Namespace) -> None:
    from gatewayd.sinks.local_broker import LocalBroker
    from gatewayd.spool import Spool
    from gatewayd.tokens import TokenStore

    tmp = Path(tempfile.mkdtemp(prefix="fanout-"))
    hub = Hub(1_000_000)
    spool = Spool(tmp / "spool.db", clock=SystemClock())
    config = LocalBrokerConfig(
        host="127.0.0.1",
        port=0,
        consumer_tokens=[TOKEN],
        max_consumers=args.consumers + 10,
        send_queue=1_000_000,
    )
    broker = LocalBroker(
        hub.subscribe("local_broker", 1_000_000),
        config,
        spool=spool,
        tokens=TokenStore(None, consumer_tokens=[TOKEN], clock=SystemClock()),
        publish=hub.publish,
        clock=SystemClock(),
    )
    await broker.start()
    # Broker-side latency: from a slice's publish to the last consumer's socket write, which
    # the consumers' own scheduling on a small machine cannot blur.
    published: list[float] = []
    written: list[float] = []
    dispatch = broker.dispatch

    def timed_dispatch(batch: list[Any]) -> None:
        dispatch(batch)
        if published:
            written.append(time.time() - published[-1])

    broker.dispatch = timed_dispatch  # type: ignore[method-assign]
    runner = asyncio.create_task(broker.run())
    work = bursts(args.athletes, args.types, args.seconds, args.spread)
    step = 1.0 / slices_per_second(args.athletes * args.types, args.spread)
    pipe.send(broker.port)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, pipe.recv)  # "go": every consumer is READY
    cpu0 = cpu_self()
    start = loop.time() + 0.05
    for index, burst in enumerate(work):
        await asyncio.sleep(max(0.0, start + index * step - loop.time()))
        published.append(time.time())
        for sample in burst:
            hub.publish(sample)
    await loop.run_in_executor(None, pipe.recv)  # "done": consumers have everything (or gave up)
    cpu = cpu_self() - cpu0
    dropped = broker.metrics.dropped._value.get()
    written.sort()
    pipe.send(
        {
            "cpu": cpu,
            "published": published,
            "dropped": dropped,
            "written_p50_ms": written[len(written) // 2] * 1000 if written else 0.0,
            "written_p99_ms": written[int(len(written) * 0.99)] * 1000 if written else 0.0,
        }
    )
    await broker.close()
    runner.cancel()
    spool.close()
    shutil.rmtree(tmp, ignore_errors=True)


def ws_consumer_process(pipe: Connection, url: str, n: int, expected: int, timeout: float) -> None:
    asyncio.run(_lean_consumers(pipe, "ws", url, n, expected, timeout))


# Lean clients: they read whole socket buffers and walk frame headers, so that on a small machine
# the consumers' own Python does not dominate the latency being measured. Both brokers get the
# same kind of client. The integration tests use real websockets / paho clients.


async def _ws_handshake(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(host, port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET /connect HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


def _masked(text: str) -> bytes:
    payload = text.encode()
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert len(payload) < 126
    return bytes((0x81, 0x80 | len(payload))) + mask + body


def _ws_frames(buf: bytearray) -> tuple[list[bytes], int]:
    """Complete server frames (payloads) at the start of buf, and how many bytes they used."""
    out = []
    pos = 0
    end = len(buf)
    while end - pos >= 2:
        n = buf[pos + 1] & 0x7F
        head = 2
        if n == 126:
            if end - pos < 4:
                break
            n = (buf[pos + 2] << 8) | buf[pos + 3]
            head = 4
        elif n == 127:
            if end - pos < 10:
                break
            n = int.from_bytes(buf[pos + 2 : pos + 10], "big")
            head = 10
        if end - pos < head + n:
            break
        out.append(bytes(buf[pos + head : pos + head + n]))
        pos += head + n
    return out, pos


def _mqtt_packets(buf: bytearray, topics: list[bytes] | None = None) -> tuple[list[bytes], int]:
    """Complete PUBLISH payloads (QoS 0) at the start of buf, and how many bytes they used;
    with `topics`, each payload's topic is appended to it."""
    out = []
    pos = 0
    end = len(buf)
    while end - pos >= 2:
        kind = buf[pos] >> 4
        length = 0
        shift = 0
        i = pos + 1
        while True:
            if i >= end:
                return out, pos
            byte = buf[i]
            length |= (byte & 0x7F) << shift
            i += 1
            if not byte & 0x80:
                break
            shift += 7
        if end - i < length:
            break
        if kind == 3:
            topic_len = (buf[i] << 8) | buf[i + 1]
            out.append(bytes(buf[i + 2 + topic_len : i + length]))
            if topics is not None:
                topics.append(bytes(buf[i + 2 : i + 2 + topic_len]))
        pos = i + length
    return out, pos


async def _mqtt_subscribe(
    host: str, port: int, client_id: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(host, port)
    cid = client_id.encode()
    variable = b"\x00\x04MQTT\x04\x02\x00\x78" + len(cid).to_bytes(2, "big") + cid
    writer.write(bytes((0x10, len(variable))) + variable)
    connack = await reader.readexactly(4)
    assert connack[0] == 0x20 and connack[3] == 0, connack
    topic = b"bench/#"
    body = b"\x00\x01" + len(topic).to_bytes(2, "big") + topic + b"\x00"
    writer.write(bytes((0x82, len(body))) + body)
    suback = await reader.readexactly(5)
    assert suback[0] == 0x90, suback
    return reader, writer


async def _lean_consumers(
    pipe: Connection, kind: str, url: str, n: int, expected: int, timeout: float
) -> None:
    host, port = url.split("//")[1].split("/", maxsplit=1)[0].split(":")
    streams = []
    for i in range(n):
        if kind == "ws":
            reader, writer = await _ws_handshake(host, int(port))
            writer.write(_masked(p.identify(TOKEN, p.Role.CONSUMER)))
            buf = bytearray()
            greeting: list[bytes] = []
            while len(greeting) < 2:  # HELLO, READY
                buf += await reader.read(4096)
                frames, used = _ws_frames(buf)
                greeting += frames
                del buf[:used]
            assert json.loads(greeting[1]) == {"op": 4}, greeting
        else:
            reader, writer = await _mqtt_subscribe(host, int(port), f"sub-{os.getpid()}-{i}")
        streams.append((reader, writer))
    parse = _ws_frames if kind == "ws" else _mqtt_packets
    seqs = array("l")
    arrivals = array("d")
    counts = [0] * n

    async def read(i: int) -> None:
        reader = streams[i][0]
        sampled = i % 10 == 0  # latency from a tenth of the consumers
        buf = bytearray()
        while counts[i] < expected:
            chunk = await reader.read(1 << 18)
            if not chunk:
                return
            now = time.time()
            buf += chunk
            if not sampled:
                # Every DISPATCH (and so every MQTT payload) holds this once: count it in C.
                counts[i] += buf.count(MARK)
                del buf[: max(0, len(buf) - len(MARK) + 1)]
                continue
            frames, used = parse(buf)
            del buf[:used]
            counts[i] += len(frames)
            for frame in frames:
                at = frame.index(b'"seq":') + 6
                seqs.append(int(frame[at : frame.index(b",", at)]))
                arrivals.append(now)

    pipe.send("ready")
    await asyncio.get_running_loop().run_in_executor(None, pipe.recv)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(read(i) for i in range(n))), timeout)
    pipe.send({"counts": counts, "seqs": seqs.tobytes(), "arrivals": arrivals.tobytes()})
    for _, writer in streams:
        writer.close()


def run_broker(args: argparse.Namespace) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    per_burst = args.athletes * args.types
    expected = per_burst * args.seconds
    broker_end, broker_pipe = ctx.Pipe()
    broker = ctx.Process(target=broker_process, args=(broker_end, args))
    broker.start()
    port = broker_pipe.recv()
    url = f"ws://127.0.0.1:{port}/connect"
    groups = split(args.consumers, args.client_procs)
    clients = []
    for n in groups:
        end, pipe = ctx.Pipe()
        proc = ctx.Process(
            target=ws_consumer_process, args=(end, url, n, expected, args.seconds + 30)
        )
        proc.start()
        clients.append((proc, pipe))
    for _, pipe in clients:
        assert pipe.recv() == "ready"
    broker_pipe.send("go")
    for _, pipe in clients:
        pipe.send("go")
    results = [pipe.recv() for _, pipe in clients]
    broker_pipe.send("done")
    stats = broker_pipe.recv()
    for proc, _ in clients:
        proc.join(10)
    broker.join(10)
    published = stats["published"]
    window = args.seconds
    return summarise(
        "gatewayd broker",
        results,
        expected,
        per_burst,
        published,
        stats["cpu"],
        window,
        extra={
            "dropped": stats["dropped"],
            "spread": args.spread,
            "broker_side_ms_p50": stats["written_p50_ms"],
            "broker_side_ms_p99": stats["written_p99_ms"],
        },
    )


# ---------------------------------------------------------------- phase 2: mosquitto


def mqtt_sub_process(pipe: Connection, port: int, n: int, expected: int, timeout: float) -> None:
    asyncio.run(_lean_consumers(pipe, "mqtt", f"mqtt://127.0.0.1:{port}/", n, expected, timeout))


def start_mosquitto(tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    """mosquitto on a free loopback port, configured in `tmp`; returns once it listens."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    conf = tmp / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "max_queued_messages 0\nlog_type error\n"
    )
    broker = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), 0.1).close()
            break
        except OSError:
            time.sleep(0.05)  # bench only: waiting for a process we started to listen
    return broker, port


def run_mosquitto(args: argparse.Namespace) -> dict[str, Any] | None:
    import paho.mqtt.client as mqtt

    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(binary).exists():
        print("mosquitto not found (apt-get install mosquitto): skipping the comparison")
        return None
    tmp = Path(tempfile.mkdtemp(prefix="fanout-mqtt-"))
    broker, port = start_mosquitto(tmp)
    try:
        ctx = mp.get_context("fork")
        per_burst = args.athletes * args.types
        expected = per_burst * args.seconds
        subs = []
        for n in split(args.consumers, args.client_procs):
            end, pipe = ctx.Pipe()
            proc = ctx.Process(
                target=mqtt_sub_process, args=(end, port, n, expected, args.seconds + 30)
            )
            proc.start()
            subs.append((proc, pipe))
        for _, pipe in subs:
            assert pipe.recv() == "ready"
        for _, pipe in subs:
            pipe.send("go")
        publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-pub")
        publisher.connect("127.0.0.1", port)
        publisher.loop_start()
        payloads = []
        seq = 0
        step = 1.0 / slices_per_second(per_burst, args.spread)
        for burst in bursts(args.athletes, args.types, args.seconds, args.spread):
            frames = []
            for sample in burst:
                seq += 1
                frames.append((f"bench/{sample.uid}/{sample.t}", p.dispatch(seq, sample)))
            payloads.append(frames)
        cpu0 = cpu_of(broker.pid)
        start = time.monotonic() + 0.05
        published: list[float] = []
        for index, frames in enumerate(payloads):
            time.sleep(max(0.0, start + index * step - time.monotonic()))
            published.append(time.time())
            for topic, payload in frames:
                publisher.publish(topic, payload, qos=0)
        results = [pipe.recv() for _, pipe in subs]
        cpu = cpu_of(broker.pid) - cpu0
        publisher.loop_stop()
        publisher.disconnect()
        for proc, _ in subs:
            proc.join(10)
        window = args.seconds
        return summarise(
            "mosquitto",
            results,
            expected,
            per_burst,
            published,
            cpu,
            window,
            extra={"spread": args.spread},
        )
    finally:
        broker.terminate()
        broker.wait(5)
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- reporting


def split(total: int, parts: int) -> list[int]:
    parts = max(1, min(parts, total))
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def summarise(
    name: str,
    results: list[dict[str, Any]],
    expected: int,
    per_burst: int,
    published: list[float],
    cpu: float,
    window: float,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    delivered = sum(sum(r["counts"]) for r in results)
    consumers = sum(len(r["counts"]) for r in results)
    latencies = []
    spread = int((extra or {}).pop("spread", 1))
    size = slice_size(per_burst, spread)
    per_second_slices = slices_per_second(per_burst, spread)
    for r in results:
        seqs = array("l")
        seqs.frombytes(r["seqs"])
        arrivals = array("d")
        arrivals.frombytes(r["arrivals"])
        for seq, arrival in zip(seqs, arrivals, strict=True):
            burst = ((seq - 1) // per_burst) * per_second_slices + ((seq - 1) % per_burst) // size
            latencies.append(arrival - published[burst])
    latencies.sort()

    def pct(q: float) -> float:
        return (
            latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else 0
        )

    out = {
        "name": name,
        "consumers": consumers,
        "expected": expected * consumers,
        "delivered": delivered,
        "delivered_per_s": delivered / window,
        "cpu_s": cpu,
        "cpu_us_per_msg": cpu / delivered * 1e6 if delivered else float("nan"),
        "latency_ms_p50": pct(0.50),
        "latency_ms_p99": pct(0.99),
        "latency_ms_mean": statistics.fmean(latencies) * 1000 if latencies else 0,
    }
    out.update(extra or {})
    return out


def show(result: dict[str, Any]) -> None:
    print(f"{result['name']}:")
    print(
        f"  delivered {result['delivered']} of {result['expected']} messages "
        f"({result['delivered_per_s']:.0f} msgs/s)"
        + (f", dropped {result['dropped']:.0f}" if "dropped" in result else "")
    )
    print(
        f"  CPU {result['cpu_s']:.2f} s = {result['cpu_us_per_msg']:.2f} us per delivered message"
    )
    print(
        f"  latency publish -> consumer: p50 {result['latency_ms_p50']:.1f} ms, "
        f"p99 {result['latency_ms_p99']:.1f} ms"
    )
    if "broker_side_ms_p99" in result:
        print(
            f"  broker side (publish -> last consumer's socket write): "
            f"p50 {result['broker_side_ms_p50']:.1f} ms, p99 {result['broker_side_ms_p99']:.1f} ms"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--consumers", type=int, default=100)
    parser.add_argument("--athletes", type=int, default=200)
    parser.add_argument(
        "--types", type=int, default=3, help=f"data types per athlete (<= {len(TYPES)})"
    )
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument(
        "--spread",
        type=int,
        default=1,
        help="send each second's samples in this many slices (1 = one burst, as the aggregator)",
    )
    parser.add_argument("--client-procs", type=int, default=2, help="processes for the consumers")
    parser.add_argument("--no-mqtt", action="store_true")
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
    args = parser.parse_args()
    args.types = max(1, min(args.types, len(TYPES)))
    print(
        f"{args.consumers} consumers, {args.athletes} athletes x {args.types} types "
        f"= {args.athletes * args.types} samples/s for {args.seconds} s, "
        f"{slices_per_second(args.athletes * args.types, args.spread)} publishes per second"
    )
    ours = run_broker(args)
    show(ours)
    theirs = None if args.no_mqtt else run_mosquitto(args)
    report: dict[str, Any] = {"broker": ours}
    if theirs is not None:
        show(theirs)
        ratio = ours["cpu_us_per_msg"] / theirs["cpu_us_per_msg"]
        report["mosquitto"] = theirs
        report["cpu_ratio"] = ratio
        print(f"CPU per delivered message, broker / mosquitto: {ratio:.2f}x (goal <= 2x)")
    print(
        f"p99 latency {ours['latency_ms_p99']:.1f} ms end to end, "
        f"{ours['broker_side_ms_p99']:.1f} ms broker side (goal < 50 ms); "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
