"""The real daemon's broker: a consumer of `gatewayd run`, and REPLAY across a daemon restart."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
from pathlib import Path

from websockets.asyncio.client import connect

from gatewayd import protocol as p

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "daemon-test-consumer"
WAIT = 30.0


async def start_daemon(tmp_path: Path) -> tuple[asyncio.subprocess.Process, int]:
    config = tmp_path / "gatewayd.yaml"
    config.write_text(
        "sources: {simulator: {enabled: true, athletes: 2}}\n"
        f"hub: {{state_dir: {tmp_path / 'state'}}}\n"
        "outputs:\n"
        "  local_broker: {enabled: true, host: 127.0.0.1, port: 0, "
        f"consumer_tokens: [{TOKEN}]}}\n"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gatewayd",
        "run",
        "--config",
        str(config),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(tmp_path)},
    )
    assert process.stderr is not None
    seen = []
    while True:
        line = (await asyncio.wait_for(process.stderr.readline(), WAIT)).decode()
        assert line, f"daemon exited before listening: {''.join(seen)}"
        seen.append(line)
        match = re.search(r"local broker listening on ws://127\.0\.0\.1:(\d+)/connect", line)
        if match:
            return process, int(match.group(1))


async def stop_daemon(process: asyncio.subprocess.Process) -> None:
    process.send_signal(signal.SIGTERM)
    assert process.stderr is not None
    rest = await asyncio.wait_for(process.stderr.read(), WAIT)
    assert await process.wait() == 0, rest.decode()
    assert TOKEN not in rest.decode()  # a token never reaches a log


async def collect(
    port: int, n: int, *, replay_to_first: bool = False
) -> tuple[list[dict], list[dict]]:  # type: ignore[type-arg]
    live: list[dict] = []  # type: ignore[type-arg]
    replayed: list[dict] = []  # type: ignore[type-arg]
    async with connect(f"ws://127.0.0.1:{port}/connect") as ws:
        assert json.loads(await ws.recv())["op"] == 2
        await ws.send(p.identify(TOKEN, p.Role.CONSUMER))
        assert json.loads(await ws.recv()) == {"op": 4}
        while len(live) < n:
            frame = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
            live.append(frame)
            if replay_to_first and len(live) == 1:
                await ws.send(p.replay(0, frame["seq"]))
                while len(replayed) < frame["seq"] - 1:
                    got = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
                    (replayed if got["seq"] < frame["seq"] else live).append(got)
    return live, replayed


async def test_replay_across_a_daemon_restart(tmp_path: Path) -> None:
    first, port = await start_daemon(tmp_path)
    try:
        before, _ = await collect(port, 6)
    finally:
        await stop_daemon(first)
    seqs = [m["seq"] for m in before]
    assert seqs == list(range(seqs[0], seqs[0] + 6))
    assert {m["uid"] for m in before} <= {"sim-01", "sim-02"}

    second, port = await start_daemon(tmp_path)
    try:
        live, replayed = await collect(port, 1, replay_to_first=True)
    finally:
        await stop_daemon(second)
    assert live[0]["seq"] > seqs[-1]
    by_seq = {m["seq"]: m for m in replayed}
    assert sorted(by_seq) == list(range(1, live[0]["seq"]))  # dense, nothing missing
    for message in before:
        assert by_seq[message["seq"]] == message  # byte-for-byte the same DISPATCH
