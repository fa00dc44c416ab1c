"""The hub's broker, for real: websockets clients against the real server on 127.0.0.1 port 0."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from gatewayd import protocol as p
from gatewayd.clock import ManualClock
from gatewayd.config import LocalBrokerConfig, ProducerToken
from gatewayd.hub import Hub
from gatewayd.model import DataType, DeviceState, DeviceStatus, Sample, parse_ts
from gatewayd.sinks.local_broker import LocalBroker
from gatewayd.spool import Spool
from gatewayd.tokens import CONSUMER, TokenStore

CONSUMER_TOKEN = "consumer-secret-1"
PRODUCER_TOKEN = "producer-secret-1"
HUB_TOKEN = "hub-to-hub-secret"
T0 = parse_ts("2026-11-24T14:30:00.000Z")
WAIT = 10.0  # guard for waits on events, never a sleep


class Harness:
    def __init__(self, tmp: Path, **overrides: Any) -> None:
        self.tmp = tmp
        # A minute after the samples' day and time, whatever today is: nothing has expired.
        self.clock = ManualClock(wall=T0 + 60.0)
        self.hub = Hub()
        settings: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": 0,
            "consumer_tokens": [CONSUMER_TOKEN],
            "producer_tokens": [
                ProducerToken(token=PRODUCER_TOKEN, athletes=["p1"]),
                ProducerToken(token=HUB_TOKEN, athletes=[]),
            ],
            "heartbeat_interval_s": 40.0,
        }
        settings.update(overrides)
        self.config = LocalBrokerConfig(**settings)
        self.tokens = TokenStore(
            tmp / "state",
            consumer_tokens=self.config.consumer_tokens,
            producer_tokens=[(t.token, t.athletes) for t in self.config.producer_tokens],
            clock=self.clock,
        )
        self.spool: Spool | None = None
        self.broker: LocalBroker | None = None
        self.task: asyncio.Task[None] | None = None

    async def start(self, before_listening: list[Sample] | None = None) -> LocalBroker:
        self.spool = Spool(self.tmp / "spool.db", clock=self.clock)
        sub = self.hub.subscribe("local_broker")
        self.broker = LocalBroker(
            sub,
            self.config,
            spool=self.spool,
            tokens=self.tokens,
            publish=self.hub.publish,
            health=lambda: {"sources": ["test"], "devices_live": 3},
            clock=self.clock,
            timer_interval_s=3600.0,  # timers fire when a test calls check_timers()
        )
        if before_listening:
            self.broker.dispatch(list(before_listening))
        await self.broker.start()
        self.task = asyncio.create_task(self.broker.run())
        return self.broker

    async def stop(self) -> None:
        assert self.broker is not None and self.task is not None and self.spool is not None
        await self.broker.close()
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task
        self.hub.unsubscribe(self.broker.subscription)
        self.spool.close()

    @property
    def url(self) -> str:
        assert self.broker is not None
        return f"ws://127.0.0.1:{self.broker.port}/connect"


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    h = Harness(tmp_path)
    await h.start()
    yield h
    await h.stop()


def hr(i: int, uid: str = "a1", t: DataType = DataType.HEART_RATE) -> Sample:
    return Sample(uid, t, T0 + i, val=60 + i, device_id="C0:FF:EE:00:00:01", source="ble")


async def recv_json(ws: ClientConnection) -> dict[str, Any]:
    text = await asyncio.wait_for(ws.recv(), WAIT)
    assert isinstance(text, str)
    data = json.loads(text)
    assert isinstance(data, dict)
    return data


async def closed_with(ws: ClientConnection) -> int:
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await asyncio.wait_for(ws.recv(), WAIT)
    assert info.value.rcvd is not None, "the server must send a close frame"
    return info.value.rcvd.code


@asynccontextmanager
async def client(
    h: Harness,
    token: str | None = CONSUMER_TOKEN,
    role: p.Role = p.Role.CONSUMER,
    filter_: p.Filter | None = None,
    **kw: Any,
) -> AsyncIterator[ClientConnection]:
    async with connect(h.url, max_size=None, **kw) as ws:
        hello = await recv_json(ws)
        assert hello == {"op": 2, "d": {"heartbeat_interval": 40000}}
        if token is not None:
            await ws.send(p.identify(token, role, filter_))
            assert await recv_json(ws) == {"op": 4}
        yield ws


async def wait_consumers(h: Harness, n: int) -> None:
    """A consumer is registered before its READY is written, so once READY arrived it counts."""
    assert h.broker is not None
    assert h.broker.health_snapshot()["consumers"] == n


# ---------------------------------------------------------------- lifecycle and opcodes


async def test_consumer_gets_hello_ready_and_dispatches(harness: Harness) -> None:
    async with client(harness) as ws:
        harness.hub.publish(hr(0))
        harness.hub.publish(Sample("a1", DataType.RR_INTERVAL, T0 + 0.25, val=812.5))
        first = await recv_json(ws)
        assert first == {
            "op": 5,
            "d": {"ts": "2026-11-24T14:30:00.000Z", "val": 60},
            "uid": "a1",
            "seq": 1,
            "t": "HEART_RATE",
        }
        second = await recv_json(ws)
        # One DISPATCH per beat, `val` in ms, `ts` the beat's time (what Terra's clients read).
        assert second["seq"] == 2
        assert second["d"] == {"ts": "2026-11-24T14:30:00.250Z", "val": 812.5}


async def test_rr_array_extension_groups_beats_per_second_live_and_in_replay(
    harness: Harness,
) -> None:
    beats = [
        Sample("a1", DataType.RR_INTERVAL, T0 + 0.1, val=800.0),
        Sample("a1", DataType.HEART_RATE, T0, val=75),
        Sample("a1", DataType.RR_INTERVAL, T0 + 0.9, val=810.0),
        Sample("a1", DataType.RR_INTERVAL, T0 + 1.7, val=790.0),
    ]
    wants_arrays = p.Filter(rr_array=True)
    async with client(harness, filter_=wants_arrays) as arrays, client(harness) as plain:
        await wait_consumers(harness, 2)
        assert harness.broker is not None
        harness.broker.dispatch(list(beats))  # one batch, as the pipeline hands a second over
        got = [await recv_json(arrays) for _ in range(3)]
        assert [(f["seq"], f["t"], f["d"]) for f in got] == [
            (2, "HEART_RATE", {"ts": "2026-11-24T14:30:00.000Z", "val": 75}),
            (3, "RR_INTERVAL", {"ts": "2026-11-24T14:30:00.000Z", "d": [800.0, 810.0]}),
            (4, "RR_INTERVAL", {"ts": "2026-11-24T14:30:01.000Z", "d": [790.0]}),
        ]
        per_beat = [await recv_json(plain) for _ in range(4)]
        assert [f["d"].get("val") for f in per_beat] == [800.0, 75, 810.0, 790.0]
        await arrays.send(p.replay(0, 5))
        assert [await recv_json(arrays) for _ in range(3)] == got


async def test_heartbeat_is_acked(harness: Harness) -> None:
    async with client(harness) as ws:
        await ws.send(p.heartbeat())
        assert await recv_json(ws) == {"op": 1}


async def test_no_identify_in_15_s_is_4000(harness: Harness) -> None:
    assert harness.broker is not None
    async with client(harness, token=None) as ws:
        harness.clock.advance(14.9)
        harness.broker.check_timers()
        await ws.send(p.heartbeat())  # still open: it is answered
        assert await recv_json(ws) == {"op": 1}
        harness.clock.advance(0.2)
        harness.broker.check_timers()
        assert await closed_with(ws) == 4000


async def test_heartbeat_window_with_an_injected_clock(harness: Harness) -> None:
    assert harness.broker is not None
    window = 40.0 * (1 + p.HEARTBEAT_GRACE)
    async with client(harness) as ws:
        harness.clock.advance(window - 1)
        await ws.send(p.heartbeat())
        assert await recv_json(ws) == {"op": 1}
        harness.clock.advance(window - 1)  # measured from the heartbeat: still inside
        harness.broker.check_timers()
        await ws.send(p.heartbeat())
        assert await recv_json(ws) == {"op": 1}
        harness.clock.advance(window + 0.1)
        harness.broker.check_timers()
        assert await closed_with(ws) == 4005


@pytest.mark.parametrize(
    ("token", "role"),
    [
        ("wrong-token", p.Role.CONSUMER),
        (PRODUCER_TOKEN, p.Role.CONSUMER),  # a producer token is not a consumer token
        (CONSUMER_TOKEN, p.Role.PRODUCER),
    ],
)
async def test_bad_tokens_are_4001(harness: Harness, token: str, role: p.Role) -> None:
    async with client(harness, token=None) as ws:
        await ws.send(p.identify(token, role))
        assert await closed_with(ws) == 4001


async def test_minted_single_use_token_works_once(harness: Harness) -> None:
    minted = TokenStore(harness.tmp / "state", clock=harness.clock).create(
        CONSUMER, single_use=True, ttl_s=60
    )
    async with client(harness, token=minted):
        pass
    async with client(harness, token=None) as ws:
        await ws.send(p.identify(minted, p.Role.CONSUMER))
        assert await closed_with(ws) == 4001


async def test_consumer_limit_is_4002(tmp_path: Path) -> None:
    h = Harness(tmp_path, max_consumers=2)
    await h.start()
    try:
        async with client(h), client(h):
            async with client(h, token=None) as third:
                await third.send(p.identify(CONSUMER_TOKEN, p.Role.CONSUMER))
                assert await closed_with(third) == 4002
            # producers do not count against the consumer limit
            async with client(h, token=HUB_TOKEN, role=p.Role.PRODUCER):
                pass
    finally:
        await h.stop()


async def test_second_identify_is_4003(harness: Harness) -> None:
    async with client(harness) as ws:
        await ws.send(p.identify(CONSUMER_TOKEN, p.Role.CONSUMER))
        assert await closed_with(ws) == 4003


@pytest.mark.parametrize(
    ("frame", "code", "role"),
    [
        ('{"op": 42}', 4004, p.Role.CONSUMER),
        ('{"op": 5, "d": {}}', 4004, p.Role.CONSUMER),
        (
            '{"op": 6, "t": "HEART_RATE", "d": {"ts": "2026-11-24T14:30:00Z", "val": 1}}',
            4004,
            p.Role.CONSUMER,
        ),
        ('{"op": 7, "d": {"after": 1, "before": 9}}', 4004, p.Role.PRODUCER),
        # AsyncAPI "Close codes": 1003 is unparseable JSON or an invalid REPLAY payload.
        ("this is not json", 1003, p.Role.CONSUMER),
        ('{"op": 7, "d": {"after": "1", "before": 9}}', 1003, p.Role.CONSUMER),
        ('["op", 0]', 1003, p.Role.CONSUMER),
        ('{"op": 6, "d": {"val": 1}}', 1003, p.Role.PRODUCER),  # SubmitFrame requires `t`
    ],
)
async def test_bad_frames_get_their_close_code(
    harness: Harness, frame: str, code: int, role: p.Role
) -> None:
    token = CONSUMER_TOKEN if role is p.Role.CONSUMER else PRODUCER_TOKEN
    async with client(harness, token=token, role=role) as ws:
        await ws.send(frame)
        assert await closed_with(ws) == code


async def test_invalid_utf8_is_1007(harness: Harness) -> None:
    # The WebSocket rule (RFC 6455, 8.1), the one place 1007 remains (AsyncAPI uses 1003 for JSON).
    async with client(harness) as ws:
        await ws.send(b'{"op": 0, "x": "\xff\xfe"}', text=True)
        assert await closed_with(ws) == 1007


@pytest.mark.parametrize(
    ("frame", "role"),
    [
        # AsyncAPI ReplayFrame: a missing `before` matches nothing; `after` defaults to 0.
        ('{"op": 7, "d": {"after": 1}}', p.Role.CONSUMER),
        ('{"op": 7, "d": {"after": 9, "before": 2}}', p.Role.CONSUMER),
        ('{"op": 7, "d": {"before": 1}}', p.Role.CONSUMER),
        # AsyncAPI StatusFrame / receiveStatus: only `connected`; a malformed one is dropped.
        ('{"op": 8, "d": {"connected": true}}', p.Role.PRODUCER),
        ('{"op": 8, "d": {"connected": "yes"}}', p.Role.PRODUCER),
        ('{"op": 8}', p.Role.PRODUCER),
        # RealtimePayload is opaque: no `ts` is stamped on arrival, an unusable one dropped.
        ('{"op": 6, "t": "heart_rate", "d": {"val": 61}}', p.Role.PRODUCER),
        ('{"op": 6, "t": "HEART_RATE", "d": {"bpm": 61}}', p.Role.PRODUCER),
    ],
)
async def test_frames_the_asyncapi_allows_keep_the_socket_open(
    harness: Harness, frame: str, role: p.Role
) -> None:
    token = CONSUMER_TOKEN if role is p.Role.CONSUMER else PRODUCER_TOKEN
    async with client(harness, token=token, role=role) as ws:
        await ws.send(frame)
        await ws.send(p.heartbeat())
        assert await recv_json(ws) == {"op": 1}  # nothing replayed, nothing closed


async def test_binary_garbage_is_1003(harness: Harness) -> None:
    async with client(harness) as ws:
        await ws.send(b"\x00\xff\x13garbage")
        assert await closed_with(ws) == 1003


async def test_frames_over_64_kib_are_refused(harness: Harness) -> None:
    async with client(harness) as ws:
        await ws.send(json.dumps({"op": 0, "pad": "x" * (64 * 1024)}))
        assert await closed_with(ws) == 1009
    async with client(harness) as ws:  # and the broker carries on
        await ws.send(p.heartbeat())
        assert await recv_json(ws) == {"op": 1}


async def test_shutdown_is_1001(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    await h.start()
    async with client(h) as ws:
        stopping = asyncio.create_task(h.stop())
        assert await closed_with(ws) == 1001
        await stopping


async def test_http_healthz_metrics_and_404(harness: Harness) -> None:
    assert harness.broker is not None
    base = f"http://127.0.0.1:{harness.broker.port}"

    def get(path: str) -> tuple[int, str, str]:
        try:
            with urllib.request.urlopen(base + path, timeout=WAIT) as response:
                return response.status, response.headers["Content-Type"], response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers["Content-Type"], exc.read().decode()

    async with client(harness) as ws:
        harness.hub.publish(hr(0))
        await recv_json(ws)
        status, ctype, body = await asyncio.to_thread(get, "/healthz")
        assert status == 200 and ctype == "application/json"
        health = json.loads(body)
        assert health["consumers"] == 1
        assert health["spool_depth"] == 1
        assert health["sources"] == ["test"] and health["devices_live"] == 3
        assert "version" in health
        status, ctype, body = await asyncio.to_thread(get, "/metrics")
        assert status == 200 and ctype.startswith("text/plain")
        assert "gatewayd_broker_consumers 1.0" in body
        assert "gatewayd_broker_dispatched_total 1.0" in body
        assert "gatewayd_devices_live 3.0" in body
        assert "gatewayd_dispatch_delay_seconds_bucket" in body
    status, _, _ = await asyncio.to_thread(get, "/nope")
    assert status == 404


async def test_the_dispatch_delay_is_observed_once_per_second_of_samples(
    harness: Harness,
) -> None:
    # docs/broker.md: once per second of samples dispatched together. Per-beat RR samples carry
    # their beat's time within the second and interleave with the others in a batch.
    assert harness.broker is not None
    beat = [
        Sample("a1", DataType.RR_INTERVAL, T0 + s + f, val=800.0, device_id="d", source="ble")
        for s, f in ((5, 0.1), (5, 0.7), (6, 0.3))
    ]
    harness.broker.dispatch([hr(5), beat[0], hr(5, "a2"), beat[1], hr(6), beat[2], hr(6, "a2")])
    observed = {
        sample.name: sample.value
        for sample in harness.broker.metrics.dispatch_delay.collect()[0].samples
    }
    assert observed["gatewayd_dispatch_delay_seconds_count"] == 2
    # the wall clock is at T0 + 60: seconds 5 and 6 ended 54 and 53 s before
    assert observed["gatewayd_dispatch_delay_seconds_sum"] == 54.0 + 53.0


# ---------------------------------------------------------------- REPLAY


async def test_replay_uses_exclusive_bounds(harness: Harness) -> None:
    async with client(harness) as ws:
        for i in range(10):
            harness.hub.publish(hr(i))
        live = [await recv_json(ws) for _ in range(10)]
        assert [m["seq"] for m in live] == list(range(1, 11))
        await ws.send(p.replay(2, 7))
        replayed = [await recv_json(ws) for _ in range(4)]
        assert replayed == live[2:6]
        await ws.send(p.heartbeat())  # nothing more was replayed: the ACK comes next
        assert await recv_json(ws) == {"op": 1}


async def test_replay_across_a_restart(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    await h.start()
    async with client(h) as ws:
        for i in range(5):
            h.hub.publish(hr(i))
        before = [await recv_json(ws) for _ in range(5)]
    await h.stop()

    again = Harness(tmp_path)  # a new daemon: new hub, new broker, same state directory
    await again.start()
    try:
        async with client(again) as ws:
            again.hub.publish(hr(5))
            live = await recv_json(ws)
            assert live["seq"] == 6  # dense across a clean restart
            await ws.send(p.replay(0, 6))
            replayed = [await recv_json(ws) for _ in range(5)]
            assert replayed == before
    finally:
        await again.stop()


# ---------------------------------------------------------------- fan-out and backpressure


async def test_100_concurrent_consumers_each_get_everything(harness: Harness) -> None:
    n_clients, n_samples = 100, 50
    clients = [client(harness) for _ in range(n_clients)]
    sockets = [await c.__aenter__() for c in clients]
    try:
        await wait_consumers(harness, n_clients)
        for i in range(n_samples):
            harness.hub.publish(hr(i, uid=f"a{i % 7}"))

        async def drain(ws: ClientConnection) -> list[int]:
            return [(await recv_json(ws))["seq"] for _ in range(n_samples)]

        results = await asyncio.gather(*(drain(ws) for ws in sockets))
        assert all(seqs == list(range(1, n_samples + 1)) for seqs in results)
    finally:
        for c in reversed(clients):
            await c.__aexit__(None, None, None)


async def test_a_consumer_that_stops_reading_loses_oldest_not_others(tmp_path: Path) -> None:
    h = Harness(tmp_path, send_queue=50)
    broker = await h.start()
    tiny = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tiny.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    tiny.connect(("127.0.0.1", broker.port))
    try:
        async with client(h, sock=tiny, max_queue=1) as stalled, client(h) as healthy:
            await wait_consumers(h, 2)
            # Small kernel buffers on both ends so "stops reading" shows within a few 100 kB.
            server_side = broker._consumers[0].ws.transport.get_extra_info("socket")
            server_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            n = 20_000
            seqs: list[int] = []
            for chunk in range(0, n, 500):  # paced by the healthy reader, as a live hub would be
                for i in range(chunk, chunk + 500):
                    h.hub.publish(hr(i, uid=f"athlete-{i % 200}"))
                seqs.extend([(await recv_json(healthy))["seq"] for _ in range(500)])
            assert seqs == list(range(1, n + 1))  # the healthy one missed nothing
            assert broker.metrics.dropped._value.get() > 0  # the stalled one lost its oldest
            stalled_session = next(s for s in broker._consumers if s.pending.dropped)
            assert len(stalled_session.pending) <= 50
            # once it reads again it sees a gap it can fill with REPLAY
            got = []
            while not got or got[-1] != n:
                got.append((await recv_json(stalled))["seq"])
            missing_from = next(i + 1 for i, s in enumerate(got, start=1) if s != i)
            await stalled.send(p.replay(missing_from - 1, got[-1] + 1))
            refill = [(await recv_json(stalled))["seq"] for _ in range(n - missing_from + 1)]
            assert refill == list(range(missing_from, n + 1))
    finally:
        await h.stop()


async def test_filters_and_device_status_extension(harness: Harness) -> None:
    only_a2 = p.Filter(athletes=frozenset({"a2"}), types=frozenset({"POWER"}), device_status=True)
    async with client(harness) as plain, client(harness, filter_=only_a2) as narrow:
        await wait_consumers(harness, 2)
        harness.hub.publish(hr(0, uid="a1"))
        harness.hub.publish(
            DeviceStatus("a2", "120:1", "ant", DeviceState.LOST, T0, reason="quiet")
        )
        harness.hub.publish(hr(1, uid="a2"))
        harness.hub.publish(hr(2, uid="a2", t=DataType.POWER))
        status = await recv_json(narrow)
        assert status["t"] == "DEVICE_STATUS" and "seq" not in status
        assert status["d"]["state"] == "lost" and status["uid"] == "a2"
        power = await recv_json(narrow)
        assert (power["uid"], power["t"], power["seq"]) == ("a2", "POWER", 3)
        plain_seen = [await recv_json(plain) for _ in range(3)]
        assert [m["t"] for m in plain_seen] == ["HEART_RATE", "HEART_RATE", "POWER"]
        await plain.send(p.heartbeat())
        assert await recv_json(plain) == {"op": 1}  # no DEVICE_STATUS for a plain consumer


# ---------------------------------------------------------------- producers


async def test_producer_submits_are_sequenced_and_dispatched(harness: Harness) -> None:
    async with (
        client(harness) as consumer,
        client(harness, token=PRODUCER_TOKEN, role=p.Role.PRODUCER) as producer,
    ):
        await wait_consumers(harness, 1)
        sample = Sample("p1", DataType.POWER, T0, val=250)
        await producer.send(p.submit(sample))  # no uid: the token names one athlete
        got = await recv_json(consumer)
        assert (got["uid"], got["t"], got["d"]["val"], got["seq"]) == ("p1", "POWER", 250, 1)
        await producer.send(p.submit(sample))  # a re-sent duplicate is dropped
        await producer.send(
            '{"op": 6, "t": "GYROSCOPE", "d": {"ts": "2026-11-24T14:30:00.000Z", "d": [1, 2, 3]}}'
        )  # a Terra type gatewayd does not carry: dropped, not closed
        await producer.send(p.submit(Sample("p1", DataType.POWER, T0 + 1, val=260)))
        nxt = await recv_json(consumer)
        assert (nxt["seq"], nxt["d"]["val"]) == (2, 260)
        # Terra's spelling (AsyncAPI SubmitFrame.t "e.g. `heart_rate`") and no `ts`: stamped
        # with the arrival time from the injected clock.
        await producer.send('{"op": 6, "t": "heart_rate", "d": {"val": 93}}')
        stamped = await recv_json(consumer)
        assert (stamped["t"], stamped["d"]) == (
            "HEART_RATE",
            {"ts": "2026-11-24T14:31:00.000Z", "val": 93},
        )
        await producer.send(p.heartbeat())
        assert await recv_json(producer) == {"op": 1}
        # A STATUS for an athlete the token does not cover is dropped (STATUS never closes) ...
        stranger = DeviceStatus("other", "120:7", "ant", DeviceState.LOST, T0)
        await producer.send(p.status(stranger, with_uid=True))
        await producer.send(p.heartbeat())
        assert await recv_json(producer) == {"op": 1}
        assert harness.broker is not None
        metrics = harness.broker.metrics.render().decode()
        assert 'gatewayd_broker_status_ignored_total{reason="not_allowed"} 1.0' in metrics
        # ... while a SUBMIT for one (a gatewayd extension: `uid`) is a refused frame.
        await producer.send(p.submit(Sample("other", DataType.POWER, T0, val=1), with_uid=True))
        assert await closed_with(producer) == 1003


async def test_hub_to_hub_producer_submits_for_many_and_reports_status(harness: Harness) -> None:
    watcher = p.Filter(device_status=True)
    async with (
        client(harness, filter_=watcher) as consumer,
        client(harness, token=HUB_TOKEN, role=p.Role.PRODUCER) as producer,
    ):
        await wait_consumers(harness, 1)
        for uid in ("x1", "x2"):
            await producer.send(p.submit(hr(0, uid=uid), with_uid=True))
        got = [await recv_json(consumer) for _ in range(2)]
        assert [(m["uid"], m["seq"]) for m in got] == [("x1", 1), ("x2", 2)]
        status = DeviceStatus("x1", "C0:FF:EE:00:00:09", "ble", DeviceState.CONNECTED, T0)
        await producer.send(p.status(status, with_uid=True))
        seen = await recv_json(consumer)
        assert seen["t"] == "DEVICE_STATUS" and seen["d"]["state"] == "connected"
        await producer.send(p.submit(hr(0, uid="x1"), with_uid=True))  # no uid -> many athletes
        await producer.send(p.submit(hr(5, uid="x1")))
        assert await closed_with(producer) == 1003


async def test_a_client_can_use_the_protocol_core(harness: Harness) -> None:
    """The client state machine drives a real session (what the forwarder and tail build on)."""
    conn = p.ClientConnection(PRODUCER_TOKEN, p.Role.PRODUCER, jitter=0.0)
    async with client(harness) as consumer, connect(harness.url) as ws:
        acked: list[int | None] = []

        async def pump(until: Callable[[], bool]) -> None:
            while not until():
                for event in conn.receive(await asyncio.wait_for(ws.recv(), WAIT), 0.0):
                    if isinstance(event, p.Send):
                        await ws.send(event.text)
                    elif isinstance(event, p.Acked):
                        acked.append(event.marker)

        await pump(lambda: conn.state is p.ClientState.READY)
        await ws.send(conn.submit(hr(0, uid="p1"), marker=41))
        await ws.send(conn.heartbeat_now(0.0).text)
        await pump(lambda: bool(acked))
        assert acked == [41]
        assert (await recv_json(consumer))["uid"] == "p1"


async def test_tokens_never_reach_the_log(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with client(harness) as ws:
        await ws.send(p.heartbeat())
        await recv_json(ws)
    async with client(harness, token=None) as ws:
        await ws.send(p.identify("a-wrong-secret-token", p.Role.CONSUMER))
        assert await closed_with(ws) == 4001
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("gatewayd"))
    assert "consumer" in ours  # the broker did log these sessions...
    assert CONSUMER_TOKEN not in ours and "a-wrong-secret-token" not in ours  # ...not the tokens
