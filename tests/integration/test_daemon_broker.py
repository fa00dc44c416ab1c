"""The real daemon's broker: a consumer of `gatewayd run`, and REPLAY across a daemon restart."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from websockets.asyncio.client import connect

from gatewayd import protocol as p
from tests.daemon import daemon_process

TOKEN = "daemon-test-consumer"
WAIT = 30.0
CONFIG = (
    "sources: {simulator: {enabled: true, athletes: 2}}\n"
    f"outputs: {{local_broker: {{enabled: true, host: 127.0.0.1, consumer_tokens: [{TOKEN}]}}}}\n"
)


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
    async with daemon_process(tmp_path, CONFIG) as first:
        before, _ = await collect(first.broker_port or 0, 6)
    assert TOKEN not in first.log  # a token never reaches a log
    seqs = [m["seq"] for m in before]
    assert seqs == list(range(seqs[0], seqs[0] + 6))
    assert {m["uid"] for m in before} <= {"sim-01", "sim-02"}

    async with daemon_process(tmp_path, CONFIG) as second:
        live, replayed = await collect(second.broker_port or 0, 1, replay_to_first=True)
    assert live[0]["seq"] > seqs[-1]
    by_seq = {m["seq"]: m for m in replayed}
    assert sorted(by_seq) == list(range(1, live[0]["seq"]))  # dense, nothing missing
    for message in before:
        assert by_seq[message["seq"]] == message  # byte-for-byte the same DISPATCH
