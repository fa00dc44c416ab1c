"""Terra's reconnect recipe against the real daemon, across a clean stop and a `kill -9`.

The consumer does what Terra's documents tell one to do (AsyncAPI 2026.07.07, sendDispatch: `seq`
is "usable as the `after` bound of a later REPLAY"; ReplayFrame.before: "the `seq` of the first live
DISPATCH seen after reconnecting"): mint a fresh single-use token with `POST /auth/developer`
before every connection, remember the last seq processed, and after reconnecting REPLAY from it
to the first live seq. Every frame is checked against our schemas of the AsyncAPI's messages.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from gatewayd.model import parse_ts
from tests import terra_asyncapi as spec
from tests.daemon import Daemon, start_daemon

DEV_ID = "gym"
API_KEY = "reconnect-test-api-key-0123"
CONFIG = f"""
sources: {{simulator: {{enabled: true, athletes: 3, seed: 7}}}}
outputs:
  local_broker:
    developers: [{{dev_id: {DEV_ID}, api_key: "{API_KEY}"}}]
"""
WAIT = 60.0  # a guard on waits, never a sleep


def mint(daemon: Daemon) -> str:
    request = urllib.request.Request(
        f"{daemon.http_url}/auth/developer",
        data=b"",
        method="POST",
        headers={"dev-id": DEV_ID, "x-api-key": API_KEY},
    )
    with urllib.request.urlopen(request, timeout=WAIT) as answer:
        body = json.loads(answer.read())
    assert spec.token_answer_errors(body) == []
    token = body["token"]
    assert isinstance(token, str)
    return token


async def recv(ws: ClientConnection) -> dict[str, Any]:
    frame = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
    assert spec.errors(frame, server=True) == [], frame
    return frame  # type: ignore[no-any-return]


async def session(daemon: Daemon) -> ClientConnection:
    token = await asyncio.to_thread(mint, daemon)
    ws = await connect(daemon.broker_url)
    assert (await recv(ws))["op"] == 2
    await ws.send(json.dumps({"op": 3, "d": {"token": token, "type": 1}}))
    assert (await recv(ws))["op"] == 4
    return ws


def second(frame: dict[str, Any]) -> int:
    return int(parse_ts(frame["d"]["ts"]))


@pytest.mark.parametrize("how", ["clean stop", "kill -9"])
async def test_reconnect_and_replay_per_terras_recipe(tmp_path: Path, how: str) -> None:
    daemon = await start_daemon(tmp_path, CONFIG)
    try:
        ws = await session(daemon)
        live: dict[int, dict[str, Any]] = {}
        while True:
            frame = await recv(ws)
            if frame["op"] == 5:
                live[frame["seq"]] = frame
                seconds = sorted({second(f) for f in live.values()})
                if len(seconds) >= 5:
                    break
        # The consumer processed the first two seconds; the rest arrived but was not processed.
        processed = max(s for s, f in live.items() if second(f) <= seconds[1])
        # Rows at least two seconds old are surely committed (the spool commits once a second).
        settled = {s: f for s, f in live.items() if s > processed and second(f) <= seconds[-3]}
        assert settled
        if how == "clean stop":
            await daemon.stop()
        else:
            await daemon.kill()
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await recv(ws)
        if how == "clean stop":
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001

        daemon = await start_daemon(tmp_path, CONFIG)
        ws = await session(daemon)
        first_live = await recv(ws)
        while first_live["op"] != 5:
            first_live = await recv(ws)
        before = first_live["seq"]
        assert before > max(live)  # a seq is never reused for another sample
        await ws.send(json.dumps({"op": 7, "d": {"after": processed, "before": before}}))
        # REPLAYs are served in order: a second copy of `before` marks the end of the first.
        await ws.send(json.dumps({"op": 7, "d": {"after": before - 1, "before": before + 1}}))
        replayed: list[dict[str, Any]] = []
        while True:
            frame = await recv(ws)
            if frame["op"] != 5:
                continue
            if frame["seq"] == before:
                break
            if frame["seq"] < before:
                replayed.append(frame)
        seqs = [f["seq"] for f in replayed]
        assert seqs == sorted(set(seqs)) and all(processed < s < before for s in seqs)
        by_seq = {f["seq"]: f for f in replayed}
        for seq, frame in settled.items():
            assert by_seq.get(seq) == frame, f"seq {seq} replayed differently or not at all"
        if how == "clean stop":
            # Nothing is lost on a clean stop, and seqs stay dense across it.
            assert seqs == list(range(processed + 1, before))
            for seq, frame in live.items():
                if seq > processed:
                    assert by_seq[seq] == frame
        await ws.close()
    finally:
        await daemon.stop()
