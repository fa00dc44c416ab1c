#!/usr/bin/env python3
"""The whole daemon as a process: what a hub pays per frame with every output on.

    .venv/bin/python bench/daemon.py [--sensors 1000] [--consumers 10] [--seconds 60]

Starts, all on loopback: mosquitto on a free port; a receiving gatewayd (gatewayd mode, a
producer token, no sources); the gatewayd under test, with the simulator (N sensors of every
kind it has: ANT+ and BLE heart-rate straps, ANT+ power meters, ANT+ speed/cadence sensors), its
local broker with K consumers in other processes, MQTT to that mosquitto, and its upstream to the
receiver. After a warm-up, it measures a window of `--seconds` from the daemon's own CPU
accounting (/proc/<pid>/stat, all threads) and prints:

- frames/s and daemon CPU µs per frame;
- CPU µs per MQTT message: the same run again without MQTT (`--no-baseline` skips it), the CPU
  difference divided by the messages a subscriber counted;
- peak and current RSS; latency p50/p99/max from the close of a second (ts + 1 s) to a
  consumer receiving that second's samples, over every per-second sample every consumer got in
  the window: as the kernel queued the bytes on the consumer's socket, and as the consumer's
  recvmsg() returned them (bench/receipt.py says exactly what counts as received). Per-beat RR
  samples carry the beat's time and leave when the hub heard the beat, so they are shown apart;
- drop counters: frames dropped, late values (a frame that missed its second's grace), output
  queue drops, consumer sequence gaps, MQTT messages missing from the subscriber, samples the
  upstream receiver lacks at the end;
- the machine-speed reference `python -m timeit "sum(range(1000))"` (µs) measured in the same
  run, and every cost divided by it, so figures compare across machines.

Costs are process CPU time, not wall time, so other work on the machine matters less; quote the
median of several runs (`--repeat`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import multiprocessing as mp
import os
import re
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fanout import (
    _masked,
    _mqtt_packets,
    cpu_of,
    split,
    start_mosquitto,
)
from machine import reference_us
from receipt import (
    ANCILLARY,
    SO_TIMESTAMPING,
    TIMESTAMPING_FLAGS,
    Receipts,
    kernel_time,
    percentile,
)

from gatewayd import protocol as p
from tests.daemon import Daemon, start_daemon

CONSUMER_TOKEN = "bench-consumer-" + secrets.token_hex(8)
PRODUCER_TOKEN = "bench-producer-" + secrets.token_hex(8)


# ---------------------------------------------------------------- helpers


def rss_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def loop_thread_cpu(pid: int) -> float:
    """CPU seconds of the daemon's main thread (the event loop); the rest is paho's and others'."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def health(port: int) -> dict[str, Any]:
    # A generous timeout: on a loaded machine the daemon may take a while to answer.
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=60) as response:
        result: dict[str, Any] = json.loads(response.read())
        return result


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as response:
        text = response.read().decode()
    match = re.search(rf"^{name}(?:_total)? ([\d.e+]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


# ---------------------------------------------------------------- consumers (other processes)


def consumer_process(pipe: Connection, port: int, n: int) -> None:
    asyncio.run(_consumers(pipe, port, n))


def _connect(port: int) -> tuple[socket.socket, bytes]:
    """A consumer's socket, upgraded and identified; the bytes that came after the upgrade."""
    sock = socket.create_connection(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET /connect HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    sock.sendall(request.encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, "the daemon closed during the upgrade"
        head += chunk
    head, _, rest = head.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPING, TIMESTAMPING_FLAGS)
    sock.sendall(_masked(p.identify(CONSUMER_TOKEN, p.Role.CONSUMER)))
    sock.setblocking(False)
    return sock, rest


async def _consumers(pipe: Connection, port: int, n: int) -> None:
    """n consumers on one event loop, each timing every read (see bench/receipt.py)."""
    loop = asyncio.get_running_loop()
    socks: list[socket.socket] = []
    receipts = [Receipts() for _ in range(n)]
    for receipt in receipts:
        sock, rest = await asyncio.to_thread(_connect, port)
        socks.append(sock)
        receipt.feed(rest, 0.0, 0.0, False)
    measuring = [False]
    ended = [loop.create_future() for _ in range(n)]
    no_kernel_time = [0]

    reads: list[tuple[int, bytes, float, float, bool]] = []

    def readable(i: int) -> None:
        # Only read and timestamp here; frames are parsed once every socket that was ready
        # together has been read, so one consumer's parsing never delays another's timestamp.
        sock = socks[i]
        while True:
            try:
                data, ancillary, _, _ = sock.recvmsg(1 << 18, ANCILLARY)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            read = time.time()
            if not data:
                loop.remove_reader(sock.fileno())
                loop.call_soon(ended[i].set_result, None)  # after the parse scheduled below
                break
            kernel = kernel_time(ancillary)
            if kernel is None:
                no_kernel_time[0] += 1
                kernel = read
            if not reads:
                loop.call_soon(parse)
            reads.append((i, data, kernel, read, measuring[0]))

    def parse() -> None:
        for i, data, kernel, read, timing in reads:
            receipts[i].feed(data, kernel, read, timing)
        reads.clear()

    for i, sock in enumerate(socks):
        loop.add_reader(sock.fileno(), readable, i)

    async def heartbeat() -> None:
        beat = _masked(p.heartbeat())
        while True:
            await asyncio.sleep(20)
            for sock in socks:
                with contextlib.suppress(OSError):
                    sock.send(beat)

    beating = asyncio.create_task(heartbeat())
    pipe.send("ready")
    while True:
        command = await loop.run_in_executor(None, pipe.recv)
        if command == "measure":
            measuring[0] = True
            pipe.send(sum(r.count for r in receipts))
        elif command == "snap":
            measuring[0] = False
            pipe.send(sum(r.count for r in receipts))
        else:  # "end": the daemon has stopped and closed every consumer
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*ended), 30)
            pipe.send(
                {
                    "counts": [r.count for r in receipts],
                    "gaps": sum(r.gaps for r in receipts),
                    "unparsed": sum(r.unparsed for r in receipts),
                    "no_kernel_time": no_kernel_time[0],
                    "per_second": [row for r in receipts for row in r.per_second],
                    "per_beat": [row for r in receipts for row in r.per_beat],
                }
            )
            break
    beating.cancel()
    for sock in socks:
        with contextlib.suppress(ValueError, OSError):
            loop.remove_reader(sock.fileno())
        sock.close()


def mqtt_process(pipe: Connection, port: int, topic: str) -> None:
    asyncio.run(_mqtt_counter(pipe, port, topic))


async def _mqtt_counter(pipe: Connection, port: int, topic: str) -> None:
    """A lean QoS 0 subscriber on the sample topics: counts messages and the data types seen."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    cid = f"bench-counter-{os.getpid()}".encode()
    # Keep alive 0: this counter never pings, and with a keep alive mosquitto drops it after
    # 1.5 of them (a 600 s window counted only its first ~180 s with 120 here).
    variable = b"\x00\x04MQTT\x04\x02\x00\x00" + len(cid).to_bytes(2, "big") + cid
    writer.write(bytes((0x10, len(variable))) + variable)
    connack = await reader.readexactly(4)
    assert connack[0] == 0x20 and connack[3] == 0, connack
    wanted = topic.encode()
    body = b"\x00\x01" + len(wanted).to_bytes(2, "big") + wanted + b"\x00"
    writer.write(bytes((0x82, len(body))) + body)
    await reader.readexactly(5)
    count = [0]
    types: set[bytes] = set()

    async def read() -> None:
        buf = bytearray()
        topics: list[bytes] = []
        while chunk := await reader.read(1 << 18):
            buf += chunk
            payloads, used = _mqtt_packets(buf, topics)
            del buf[:used]
            count[0] += len(payloads)
            types.update(topic.rsplit(b"/", 1)[1] for topic in topics)
            topics.clear()

    task = asyncio.create_task(read())
    loop = asyncio.get_running_loop()
    pipe.send("ready")
    while await loop.run_in_executor(None, pipe.recv) != "end":
        pipe.send(count[0])
    task.cancel()
    writer.close()
    pipe.send({"count": count[0], "types": sorted(t.decode() for t in types)})


# ---------------------------------------------------------------- the run


def sender_config(args: argparse.Namespace, *, mqtt_port: int | None, upstream_port: int) -> str:
    athletes = max(1, args.sensors // 3)  # every athlete: an HR strap, a power meter, a S&C sensor
    lines = [
        "hub: {id: bench}",
        "sources:",
        f"  simulator: {{enabled: true, athletes: {athletes}, bike_fraction: 1.0,"
        " hr_straps: mixed}",
        "  ble: {enabled: false}",
        "  ant: {enabled: false}",
        "outputs:",
        "  local_broker:",
        f"    consumer_tokens: [{CONSUMER_TOKEN}]",
        f"    max_consumers: {args.consumers + 10}",
        "  upstream:",
        "    enabled: true",
        "    mode: gatewayd",
        f"    url: ws://127.0.0.1:{upstream_port}/connect",
        f"    token: {PRODUCER_TOKEN}",
    ]
    if mqtt_port is not None:
        lines += [
            "  mqtt:",
            "    enabled: true",
            f"    port: {mqtt_port}",
            f"    qos: {args.qos}",
        ]
        if args.mqtt_per_athlete:
            lines.append("    per_athlete: true")
    if args.grace is not None:
        lines += ["pipeline:", f"  grace_s: {args.grace}"]
    return "\n".join(lines) + "\n"


RECEIVER_CONFIG = f"""\
hub: {{id: receiver}}
sources:
  ble: {{enabled: false}}
  ant: {{enabled: false}}
outputs:
  local_broker:
    producer_tokens: [{{token: {PRODUCER_TOKEN}, athletes: []}}]
board: {{enabled: false}}
"""


async def _wait_until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(check):
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)  # bench only: polling a process we started


async def run_once(args: argparse.Namespace, *, mqtt: bool) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-daemon-"))
    mosquitto = None
    daemons: list[Daemon] = []
    helpers: list[tuple[Any, Connection]] = []
    helpers_to_stop: list[Any] = []
    try:
        mqtt_port = None
        if mqtt:
            mosquitto, mqtt_port = start_mosquitto(tmp)
        (tmp / "receiver").mkdir()
        receiver = await start_daemon(tmp / "receiver", RECEIVER_CONFIG)
        daemons.append(receiver)
        assert receiver.broker_port is not None
        (tmp / "sender").mkdir()
        config = sender_config(args, mqtt_port=mqtt_port, upstream_port=receiver.broker_port)
        sender = await start_daemon(tmp / "sender", config)
        daemons.append(sender)
        port = sender.broker_port
        assert port is not None
        pid = sender.process.pid
        ctx = mp.get_context("fork")
        for n in split(args.consumers, args.consumer_procs):
            end, pipe = ctx.Pipe()
            proc = ctx.Process(target=consumer_process, args=(end, port, n))
            proc.start()
            helpers.append((proc, pipe))
        counter = None
        if mqtt:
            end, pipe = ctx.Pipe()
            proc = ctx.Process(
                target=mqtt_process, args=(end, mqtt_port, "gatewayd/bench/athletes/#")
            )
            proc.start()
            counter = (proc, pipe)
            helpers_to_stop.append(proc)
        for _, pipe in [*helpers, *([counter] if counter else [])]:
            assert await asyncio.to_thread(pipe.recv) == "ready"
        await _wait_until(
            lambda: health(port)["consumers"] == args.consumers, 120, "consumers to connect"
        )
        await _wait_until(
            lambda: (health(port)["upstream"] or {}).get("state") == "connected",
            120,
            "the upstream to connect",
        )
        await asyncio.sleep(args.warmup)  # bench: let every device be heard, caches fill
        h0 = health(port)
        cpu0 = cpu_of(pid)
        loop_cpu0 = loop_thread_cpu(pid)
        t0 = time.monotonic()
        for _, pipe in helpers:
            pipe.send("measure")
        consumed0 = sum([await asyncio.to_thread(pipe.recv) for _, pipe in helpers])
        mqtt0 = 0
        if counter:
            counter[1].send("snap")
            mqtt0 = await asyncio.to_thread(counter[1].recv)
        rss_start = rss_kib(pid)["VmRSS"]
        spy = None
        if args.profile and (mqtt or args.no_mqtt):  # the run the figures are of
            spy = subprocess.Popen(  # noqa: ASYNC220 (started once, waited on in a thread)
                [
                    *(str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid)),
                    *("--duration", str(int(args.seconds)), "--rate", "200", "--nonblocking"),
                    *("--function", "--threads", "--format", "raw", "--output", str(args.profile)),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        await asyncio.sleep(args.seconds)
        if spy is not None:
            await asyncio.to_thread(spy.wait, 30)
        cpu1 = cpu_of(pid)
        loop_cpu1 = loop_thread_cpu(pid)
        t1 = time.monotonic()
        mqtt1 = 0
        if counter:
            counter[1].send("snap")
            mqtt1 = await asyncio.to_thread(counter[1].recv)
        for _, pipe in helpers:
            pipe.send("snap")
        consumed1 = sum([await asyncio.to_thread(pipe.recv) for _, pipe in helpers])
        h1 = health(port)
        memory = rss_kib(pid)
        broker_dropped = metric(port, "gatewayd_broker_dropped")
        # Stop the sender: it finishes the current second, flushes every output, closes the
        # consumers (they then report), and the receiver must end up with every spooled sample.
        await sender.stop()
        last_seq = h1["last_seq"]
        with contextlib.suppress(RuntimeError):
            await _wait_until(
                lambda: health(receiver.broker_port or 0)["last_seq"] >= last_seq,
                30,
                "the receiver to catch up",
            )
        received_upstream = health(receiver.broker_port)["last_seq"]
        results = []
        for _, pipe in helpers:
            pipe.send("end")
            results.append(await asyncio.to_thread(pipe.recv))
        mqtt_result: dict[str, Any] = {}
        if counter:
            counter[1].send("end")
            mqtt_result = await asyncio.to_thread(counter[1].recv)
    except BaseException:
        for daemon in daemons:
            print(daemon.log[:3000], "\n...\n", daemon.log[-3000:], file=sys.stderr)
        raise
    finally:
        for daemon in reversed(daemons):
            with contextlib.suppress(Exception):
                await daemon.stop()
        for proc in [proc for proc, _ in helpers] + helpers_to_stop:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        if mosquitto is not None:
            mosquitto.terminate()
            mosquitto.wait(5)
        shutil.rmtree(tmp, ignore_errors=True)
    window = t1 - t0
    frames = h1["frames"] - h0["frames"]
    samples = h1["samples"] - h0["samples"]
    cpu = cpu1 - cpu0
    per_second = [row for r in results for row in r["per_second"]]
    per_beat = [row for r in results for row in r["per_beat"]]

    def pct(rows: list[tuple[float, float, int]], q: float, kernel: bool = False) -> float:
        return percentile([(row[0 if kernel else 1], row[2]) for row in rows], q) * 1000

    output_drops = {name: o["dropped"] for name, o in h1["outputs"].items()}
    return {
        "mqtt": mqtt,
        "window_s": window,
        "frames": frames,
        "frames_per_s": frames / window,
        "samples_per_s": samples / window,
        "cpu_s": cpu,
        "cpu_pct": cpu / window * 100,
        "cpu_us_per_frame": cpu / frames * 1e6 if frames else float("nan"),
        "loop_cpu_pct": (loop_cpu1 - loop_cpu0) / window * 100,
        "mqtt_msgs": mqtt1 - mqtt0,
        "mqtt_types": mqtt_result.get("types", []),
        "consumed_per_s": (consumed1 - consumed0) / window,
        "rss_start_mib": rss_start / 1024,
        "rss_end_mib": memory["VmRSS"] / 1024,
        "peak_rss_mib": memory["VmHWM"] / 1024,
        "latency_p50_ms": pct(per_second, 0.50),
        "latency_p99_ms": pct(per_second, 0.99),
        "latency_max_ms": pct(per_second, 1.0),
        "kernel_p50_ms": pct(per_second, 0.50, kernel=True),
        "kernel_p99_ms": pct(per_second, 0.99, kernel=True),
        "kernel_max_ms": pct(per_second, 1.0, kernel=True),
        "beat_p50_ms": pct(per_beat, 0.50),
        "beat_p99_ms": pct(per_beat, 0.99),
        "latency_samples": sum(row[2] for row in per_second),
        "beat_samples": sum(row[2] for row in per_beat),
        "unparsed": sum(r["unparsed"] for r in results),
        "no_kernel_time": sum(r["no_kernel_time"] for r in results),
        "frames_dropped": h1["frames_dropped"],
        "late_values": h1.get("late_values", 0),
        "decode_errors": h1["decode_errors"],
        "output_drops": output_drops,
        "consumer_gaps": sum(r["gaps"] for r in results),
        "consumer_drops": broker_dropped,
        "upstream_missing": max(0, last_seq - received_upstream),
        "sent_to_mqtt": mqtt,
    }


IDLE = ("select (selectors.py", "_worker (concurrent/futures/thread.py", "wait (threading.py")


def top_of_profile(path: Path, n: int = 20) -> list[str]:
    """py-spy's raw (collapsed) stacks -> the functions with the most self and total samples.

    Stacks that end waiting (the event loop's select, paho's select, idle worker threads) are
    left out: the percentages are of the daemon's busy samples."""
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    busy = idle = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = [
            re.sub(r" \((?:[^)]*/site-packages/|[^)]*/lib/python3[.\d]*/)?", " (", f)
            for f in stack.split(";")
        ]
        if any(frames[-1].startswith(name) or name in frames[-1] for name in IDLE):
            idle += count
            continue
        busy += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            total[frame] = total.get(frame, 0) + count
    busy = max(busy, 1)
    lines = [f"profile: {busy} busy samples ({idle} idle left out); self %, total %:"]
    for frame, count in sorted(own.items(), key=lambda kv: -kv[1])[:n]:
        lines.append(f"  {100 * count / busy:5.1f} {100 * total[frame] / busy:5.1f}  {frame}")
    lines.append(f"top {n} by total:")
    for frame, count in sorted(total.items(), key=lambda kv: -kv[1])[:n]:
        lines.append(f"  {100 * own.get(frame, 0) / busy:5.1f} {100 * count / busy:5.1f}  {frame}")
    return lines


def median(runs: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in runs if r[key] == r[key]]  # no NaN
    return statistics.median(values) if values else float("nan")


def report(
    args: argparse.Namespace,
    full: list[dict[str, Any]],
    base: list[dict[str, Any]],
    refs: list[float],
) -> dict[str, Any]:
    ref = min(refs)
    per_frame = median(full, "cpu_us_per_frame")
    out: dict[str, Any] = {
        "reference_us": ref,
        "frames_per_s": median(full, "frames_per_s"),
        "cpu_us_per_frame": per_frame,
        "cpu_per_frame_x_ref": per_frame / ref,
        "cpu_pct_of_core": median(full, "cpu_pct"),
        "loop_cpu_pct_of_core": median(full, "loop_cpu_pct"),
        "samples_per_s": median(full, "samples_per_s"),
        "consumed_per_s": median(full, "consumed_per_s"),
        "peak_rss_mib": max(r["peak_rss_mib"] for r in full),
        "rss_start_mib": median(full, "rss_start_mib"),
        "rss_end_mib": median(full, "rss_end_mib"),
        "latency_p50_ms": median(full, "latency_p50_ms"),
        "latency_p99_ms": median(full, "latency_p99_ms"),
        "latency_max_ms": max(r["latency_max_ms"] for r in full),
        "kernel_p50_ms": median(full, "kernel_p50_ms"),
        "kernel_p99_ms": median(full, "kernel_p99_ms"),
        "kernel_max_ms": max(r["kernel_max_ms"] for r in full),
        "beat_p50_ms": median(full, "beat_p50_ms"),
        "beat_p99_ms": median(full, "beat_p99_ms"),
        "latency_samples": median(full, "latency_samples"),
        "unparsed": sum(r["unparsed"] for r in full),
        "no_kernel_time": sum(r["no_kernel_time"] for r in full),
        "drops": {
            "frames_dropped": sum(r["frames_dropped"] for r in full + base),
            "late_values": sum(r["late_values"] for r in full + base),
            "decode_errors": sum(r["decode_errors"] for r in full + base),
            "output_queue_drops": sum(sum(r["output_drops"].values()) for r in full + base),
            "consumer_drops": sum(r["consumer_drops"] for r in full + base),
            "consumer_seq_gaps": sum(r["consumer_gaps"] for r in full + base),
            "upstream_missing": sum(r["upstream_missing"] for r in full + base),
        },
        "runs": len(full),
    }
    if full[0]["mqtt"]:
        out["mqtt_msgs_per_s"] = statistics.median(r["mqtt_msgs"] / r["window_s"] for r in full)
        out["mqtt_types"] = full[0]["mqtt_types"]
    if base:
        without = median(base, "cpu_us_per_frame")
        frames = statistics.median(r["frames"] for r in full)
        msgs = statistics.median(r["mqtt_msgs"] for r in full)
        out["cpu_us_per_frame_without_mqtt"] = without
        out["mqtt_cpu_us_per_msg"] = (per_frame - without) * frames / msgs if msgs else 0.0
        out["mqtt_x_ref"] = out["mqtt_cpu_us_per_msg"] / ref
    return out


def show(args: argparse.Namespace, r: dict[str, Any]) -> None:
    ref = r["reference_us"]
    if args.no_mqtt:
        mqtt = "no MQTT"
    else:
        per_athlete = " (one message per athlete per second)" if args.mqtt_per_athlete else ""
        mqtt = f"MQTT qos {args.qos}{per_athlete}"
    print(
        f"{args.sensors} sensors, {args.consumers} consumers, {mqtt}, upstream "
        f"to a receiving gatewayd; {args.seconds:g} s windows, median of {r['runs']} run(s)"
    )
    print(f"reference (timeit sum(range(1000)))  {ref:.2f} us")
    print(f"frames/s                       {r['frames_per_s']:,.0f}")
    print(f"samples/s                      {r['samples_per_s']:,.0f}")
    print(f"DISPATCHes received/s          {r['consumed_per_s']:,.0f}")
    print(
        f"daemon CPU per frame           {r['cpu_us_per_frame']:.1f} us = "
        f"{r['cpu_per_frame_x_ref']:.2f}x reference ({r['cpu_pct_of_core']:.1f} % of one core, "
        f"{r['loop_cpu_pct_of_core']:.1f} % in the event loop's thread)"
    )
    if "cpu_us_per_frame_without_mqtt" in r:
        print(f"  without MQTT                 {r['cpu_us_per_frame_without_mqtt']:.1f} us")
    if "mqtt_msgs_per_s" in r:
        print(
            f"MQTT messages/s                {r['mqtt_msgs_per_s']:,.0f}  types {r['mqtt_types']}"
        )
    if "mqtt_cpu_us_per_msg" in r:
        print(
            f"CPU per MQTT message           {r['mqtt_cpu_us_per_msg']:.1f} us = "
            f"{r['mqtt_x_ref']:.2f}x reference"
        )
    print(
        f"RSS                            start {r['rss_start_mib']:.1f} MiB, end "
        f"{r['rss_end_mib']:.1f} MiB, peak {r['peak_rss_mib']:.1f} MiB"
    )
    print(
        f"latency second close->consumer p50 {r['latency_p50_ms']:.0f} ms, "
        f"p99 {r['latency_p99_ms']:.0f} ms, max {r['latency_max_ms']:.0f} ms "
        f"(read by the consumer; {r['latency_samples']:,.0f} per-second samples)"
    )
    print(
        f"  on the consumer's socket     p50 {r['kernel_p50_ms']:.0f} ms, "
        f"p99 {r['kernel_p99_ms']:.0f} ms, max {r['kernel_max_ms']:.0f} ms "
        "(kernel receive time of the bytes)"
    )
    print(
        f"  per-beat RR, beat->consumer  p50 {r['beat_p50_ms']:.0f} ms, "
        f"p99 {r['beat_p99_ms']:.0f} ms (includes the strap reporting the beat)"
    )
    if r["unparsed"] or r["no_kernel_time"]:
        print(
            f"  WARNING: {r['unparsed']} DISPATCHes not parsed, "
            f"{r['no_kernel_time']} reads without a kernel time"
        )
    print(
        "drops                          " + ", ".join(f"{k} {v:g}" for k, v in r["drops"].items())
    )
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sensors", type=int, default=1000)
    parser.add_argument("--consumers", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=60.0, help="measured window")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--repeat", type=int, default=1, help="runs; medians are printed")
    parser.add_argument("--qos", type=int, default=1, choices=(0, 1, 2))
    parser.add_argument("--grace", type=float, default=None, help="pipeline.grace_s override")
    parser.add_argument(
        "--mqtt-per-athlete", action="store_true", help="outputs.mqtt.per_athlete: true"
    )
    parser.add_argument("--no-mqtt", action="store_true", help="no MQTT at all")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run without MQTT")
    parser.add_argument("--consumer-procs", type=int, default=2)
    parser.add_argument(
        "--profile", type=Path, default=None, help="py-spy the daemon in the window (raw stacks)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
    args = parser.parse_args()
    refs = [reference_us()]
    full: list[dict[str, Any]] = []
    base: list[dict[str, Any]] = []
    for _ in range(args.repeat):
        full.append(asyncio.run(run_once(args, mqtt=not args.no_mqtt)))
        if not args.no_mqtt and not args.no_baseline:
            base.append(asyncio.run(run_once(args, mqtt=False)))
        refs.append(reference_us())
    result = report(args, full, base, refs)
    show(args, result)
    if args.profile:
        print("\n".join(top_of_profile(args.profile)))
    if args.json:
        print(json.dumps({"result": result, "runs": full, "baseline": base}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
