"""The hub's broker against Terra's AsyncAPI (2026.07.07): our schemas of its messages
(tests/terra_asyncapi.py) judge every frame the hub sends, and every client frame the AsyncAPI
allows must be taken without a close."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection

from gatewayd import protocol as p
from gatewayd.model import DataType, Sample
from tests import terra_asyncapi as spec
from tests.integration.test_broker import (
    CONSUMER_TOKEN,
    PRODUCER_TOKEN,
    T0,
    Harness,
    client,
    closed_with,
    recv_json,
    wait_consumers,
)

TS = "2026-11-24T14:30:00.000Z"


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    h = Harness(tmp_path)
    await h.start()
    yield h
    await h.stop()


async def recv_checked(ws: ClientConnection) -> dict[str, Any]:
    frame = await recv_json(ws)
    assert spec.errors(frame, server=True) == [], frame
    if frame["op"] == p.Op.DISPATCH:
        assert spec.payload_errors(frame["d"]) == [], frame
    return frame


def every_type() -> list[Sample]:
    out = []
    for i, t in enumerate(DataType):
        if t is DataType.RR_INTERVAL:
            out.append(Sample("a1", t, T0 + i + 0.123, val=812.0))
        else:
            out.append(Sample("a1", t, T0 + i, val=float(i)))
    return out


async def test_every_server_frame_matches_the_asyncapi(harness: Harness) -> None:
    # operations.sendHello, receiveIdentify.reply (READY), receiveHeartbeat.reply, sendDispatch.
    samples = every_type()
    async with client(harness) as ws:
        harness.hub.publish(Sample("a1", DataType.HEART_RATE, T0 - 1, val=60.0))
        first = await recv_checked(ws)
        await ws.send(p.heartbeat())
        assert await recv_checked(ws) == {"op": 1}
        for sample in samples:
            harness.hub.publish(sample)
        live = [await recv_checked(ws) for _ in samples]
        assert [f["t"] for f in live] == [str(t) for t in DataType]
        # sendDispatch: `seq` is a monotonic cursor usable as a later REPLAY `after`.
        seqs = [first["seq"], *(f["seq"] for f in live)]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        await ws.send(p.replay(first["seq"], live[-1]["seq"] + 1))
        replayed = [await recv_checked(ws) for _ in live]
        assert replayed == live
    # HELLO and READY themselves were read by client(): check them on a fresh socket.
    async with client(harness, token=None) as ws:
        await ws.send(p.identify(CONSUMER_TOKEN, p.Role.CONSUMER))
        assert await recv_checked(ws) == {"op": 4}
    assert spec.errors(json.loads(p.hello(40_000)), server=True) == []


# Client frames the AsyncAPI allows (components.schemas.*Frame), sent after READY.
CONSUMER_FRAMES = [
    {"op": 0},
    {"op": 0, "d": None},
    {"op": 7, "d": {"after": 0, "before": 1}},
    {"op": 7, "d": {"before": 3}},  # ReplayFrame.after: "Defaults to 0"
    {"op": 7, "d": {"after": 2}},  # ReplayFrame.before: omitted "matches nothing"
    {"op": 7, "d": {}},
    {"op": 7, "d": {"after": 5, "before": 5}},
]
PRODUCER_FRAMES = [
    {"op": 0},
    {"op": 6, "t": "HEART_RATE", "d": {"ts": TS, "val": 70}},
    {"op": 6, "t": "heart_rate", "d": {"ts": "2026-11-24T14:30:01.000Z", "val": 71}},
    {"op": 6, "t": "POWER", "d": {"val": 200}},  # no ts: stamped on arrival
    {"op": 6, "t": "GYROSCOPE", "d": {"ts": TS, "d": [0.1, 0.2, 9.8]}},
    {"op": 6, "t": "HEART_RATE", "d": {}},  # RealtimePayload is opaque
    {"op": 6, "t": "HEART_RATE", "d": {"bpm": 70, "extra": {"x": [1]}}},
    {"op": 8, "d": {"connected": True}},
    {"op": 8, "d": {"connected": False, "device_id": "H10", "source": "sdk", "reason": "off"}},
]


@pytest.mark.parametrize("frame", CONSUMER_FRAMES + PRODUCER_FRAMES, ids=json.dumps)
async def test_every_client_frame_the_asyncapi_allows_is_taken(
    harness: Harness, frame: dict[str, Any]
) -> None:
    assert spec.errors(frame, server=False) == []  # the test data itself is valid
    producer = frame in PRODUCER_FRAMES
    token, role = (
        (PRODUCER_TOKEN, p.Role.PRODUCER) if producer else (CONSUMER_TOKEN, p.Role.CONSUMER)
    )
    async with client(harness, token=token, role=role) as ws:
        await ws.send(json.dumps(frame))
        await ws.send(p.heartbeat())
        reply = await recv_checked(ws)
        assert reply == {"op": 1}, "the frame was taken without a reply or a close"


async def test_identify_with_just_type_and_token_and_heartbeat_first(harness: Harness) -> None:
    # IdentifyFrame requires only type and token; a HEARTBEAT may come first (EDGE does that).
    async with client(harness, token=None) as ws:
        await ws.send(json.dumps({"op": 0}))
        assert await recv_checked(ws) == {"op": 1}
        await ws.send(json.dumps({"op": 3, "d": {"type": 1, "token": CONSUMER_TOKEN}}))
        assert await recv_checked(ws) == {"op": 4}


@pytest.mark.parametrize(
    ("frame", "role", "code"),
    [
        ("{not json", p.Role.CONSUMER, 1003),  # "Malformed frame — unparseable JSON"
        ('{"op": 7, "d": {"after": "x", "before": 4}}', p.Role.CONSUMER, 1003),  # invalid REPLAY
        ('{"op": 3, "d": {"type": 1, "token": "t"}}', p.Role.CONSUMER, 4003),  # second IDENTIFY
        ('{"op": 9}', p.Role.CONSUMER, 4004),  # unknown opcode
        ('{"op": 6, "t": "HEART_RATE", "d": {"val": 1}}', p.Role.CONSUMER, 4004),  # wrong role
        ('{"op": 7, "d": {"after": 0, "before": 9}}', p.Role.PRODUCER, 4004),
        ('{"op": 8, "d": {"connected": true}}', p.Role.CONSUMER, 4004),
    ],
)
async def test_close_codes_are_the_asyncapi_ones(
    harness: Harness, frame: str, role: p.Role, code: int
) -> None:
    assert code in spec.CLOSE_CODES
    token = PRODUCER_TOKEN if role is p.Role.PRODUCER else CONSUMER_TOKEN
    async with client(harness, token=token, role=role) as ws:
        await ws.send(frame)
        assert await closed_with(ws) == code


async def test_submitted_samples_reach_consumers_as_valid_dispatches(harness: Harness) -> None:
    async with (
        client(harness) as consumer,
        client(harness, token=PRODUCER_TOKEN, role=p.Role.PRODUCER) as producer,
    ):
        await wait_consumers(harness, 1)
        for frame in PRODUCER_FRAMES:
            await producer.send(json.dumps(frame))
        got = [await recv_checked(consumer) for _ in range(3)]
        assert [(f["t"], f["d"].get("val")) for f in got] == [
            ("HEART_RATE", 70),
            ("HEART_RATE", 71),
            ("POWER", 200),
        ]


async def test_the_schemas_refuse_what_they_should(tmp_path: Path) -> None:
    # The schemas could fail: a DISPATCH without seq, a STATUS without connected, an array val.
    assert spec.errors({"op": 5, "d": {}, "uid": "a", "t": "X"}, server=True)
    assert spec.errors({"op": 8, "d": {"device_id": "x"}}, server=False)
    assert spec.payload_errors({"ts": TS, "val": [1, 2]})
    assert spec.token_answer_errors({"tok": "x"})
