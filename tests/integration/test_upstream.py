"""The upstream forwarder against a real gatewayd broker on 127.0.0.1 port 0.

The gateway side runs the simulator through the real pipeline on a hand-driven clock
(tests/helpers.SimulatedRoom); the sink under test reads the gateway's spool and forwards over a
real socket. Every wait is on an event (a spool listener), with a generous timeout as a guard.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import subprocess
import threading
import urllib.parse
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from gatewayd.config import LocalBrokerConfig, ProducerToken, UpstreamConfig
from gatewayd.hub import Hub, Subscription
from gatewayd.model import DataType, DeviceState, DeviceStatus, Sample
from gatewayd.sinks.local_broker import LocalBroker
from gatewayd.sinks.upstream import UpstreamSink
from gatewayd.spool import Spool
from gatewayd.tokens import TokenStore
from tests.helpers import SimulatedRoom, SteadyClock

HUB_TOKEN = "hub-to-hub-secret"
WAIT = 30.0  # a guard on waits for events, never a sleep
# Both ends run on the simulated room's calendar, whatever today's date is.
CLOCK = SteadyClock()
Key = tuple[str, str, float, object]


def key(sample: Sample) -> Key:
    return (sample.uid, str(sample.t), sample.ts, sample.val if sample.d is None else sample.d)


class Watch:
    """Wakes a waiter on every append to a spool."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.event = asyncio.Event()
        spool.add_listener(lambda first, last: self.event.set())

    async def until(self, condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
        async def wait() -> None:
            while not condition():
                self.event.clear()
                await self.event.wait()

        try:
            await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"timed out waiting for {what}") from None


class Upstream:
    """A real gatewayd broker with its own spool: the cloud hub. Can stop and start on one port."""

    def __init__(self, tmp: Path, heartbeat_interval_s: float = 1.0, **overrides: Any) -> None:
        self.tmp = tmp
        self.port = 0
        self.heartbeat_interval_s = heartbeat_interval_s
        self.overrides = overrides
        self.tokens = TokenStore(
            tmp / "up-state",
            producer_tokens=[(HUB_TOKEN, []), *overrides.pop("producers", [])],
            clock=CLOCK,
        )
        self.broker: LocalBroker | None = None
        self.spool: Spool | None = None
        self.task: asyncio.Task[None] | None = None
        self.watch: Watch | None = None
        self.events: Subscription | None = None
        self.duplicates = 0
        self.starts = 0

    async def start(self) -> None:
        hub = Hub()
        self.events = hub.subscribe("observer", 10**6)  # what producers report, e.g. STATUS
        self.spool = Spool(self.tmp / "up.db", clock=CLOCK)
        self.watch = Watch(self.spool)
        settings = LocalBrokerConfig(
            host="127.0.0.1",
            port=self.port,
            producer_tokens=[ProducerToken(token=HUB_TOKEN, athletes=[])],
            heartbeat_interval_s=self.heartbeat_interval_s,
            **self.overrides,
        )
        self.broker = LocalBroker(
            hub.subscribe("local_broker"),
            settings,
            spool=self.spool,
            tokens=self.tokens,
            publish=hub.publish,
            clock=CLOCK,
        )
        await self.broker.start()
        self.port = self.broker.port
        self.task = asyncio.create_task(self.broker.run())
        self.starts += 1

    async def stop(self) -> None:
        assert self.broker is not None and self.task is not None and self.spool is not None
        await self.broker.close()
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        self.duplicates += self._duplicates()
        self.spool.close()
        self.broker = None

    def _duplicates(self) -> int:
        assert self.broker is not None
        text = self.broker.metrics.render().decode()
        for line in text.splitlines():
            if line.startswith('gatewayd_broker_submit_ignored_total{reason="duplicate"}'):
                return int(float(line.split()[-1]))
        return 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/connect"

    def received(self) -> list[Sample]:
        assert self.spool is not None
        return [s for _, s in self.spool.read(0, 1 << 62, limit=10**7)]

    def keys(self) -> list[Key]:
        return [key(s) for s in self.received()]


@pytest.fixture
async def upstream(tmp_path: Path) -> AsyncIterator[Upstream]:
    up = Upstream(tmp_path)
    await up.start()
    yield up
    if up.broker is not None:
        await up.stop()


def settings(url: str, **kw: Any) -> UpstreamConfig:
    base: dict[str, Any] = {
        "enabled": True,
        "mode": "gatewayd",
        "url": url,
        "token": HUB_TOKEN,
        "backoff_min_s": 0.05,
        "backoff_max_s": 0.2,
        "ack_interval_s": 0.1,
    }
    base.update(kw)
    return UpstreamConfig(**base)


class Gateway:
    """The hub under test: simulator -> pipeline -> hub -> spool -> UpstreamSink."""

    def __init__(
        self,
        tmp: Path,
        config: UpstreamConfig,
        athletes: int = 4,
        spool: dict[str, Any] | None = None,
        **sim: Any,
    ) -> None:
        self.room = SimulatedRoom(athletes=athletes, **sim)
        self.spool = Spool(tmp / "gw.db", **(spool or {}), clock=CLOCK)
        self.watch = Watch(self.spool)
        self.sink = UpstreamSink(
            self.room.hub.subscribe("upstream"), config, spool=self.spool, append=True, clock=CLOCK
        )
        self.produced: list[Sample] = []
        self.statuses: list[DeviceStatus] = []
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Gateway:
        self.task = asyncio.create_task(self.sink.run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.sink.close()
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        self.spool.close()

    async def run_for(self, seconds: float) -> None:
        """Simulate `seconds`, one second at a time, letting the sink spool each second."""
        for _ in range(int(seconds)):
            self.room.run_for(1.0)
            for event in self.room.events.get_nowait():
                if isinstance(event, Sample):
                    self.produced.append(event)
                else:
                    self.statuses.append(event)
            want = len(self.produced)
            await self.watch.until(lambda want=want: self.spool.last_seq >= want, "spooling")
            self.spool.flush()  # the once-a-second commit, on the simulated clock

    def per_athlete(self) -> dict[str, list[Key]]:
        return by_athlete(self.produced)


def by_athlete(samples: list[Sample]) -> dict[str, list[Key]]:
    out: dict[str, list[Key]] = defaultdict(list)
    for s in samples:
        out[s.uid].append(key(s))
    return dict(out)


async def test_an_outage_loses_nothing_and_delivers_once_in_order(
    tmp_path: Path, upstream: Upstream
) -> None:
    async with Gateway(tmp_path, settings(upstream.url)) as gw:
        await gw.run_for(5)
        assert upstream.watch is not None
        await upstream.watch.until(lambda: len(upstream.keys()) >= len(gw.produced), "live")
        await upstream.stop()
        await gw.run_for(20)  # the outage: samples wait in the spool
        assert gw.sink.state()["backlog"] > 0
        await upstream.start()
        await gw.run_for(5)  # live samples keep coming while the backlog drains
        await upstream.watch.until(lambda: len(upstream.keys()) >= len(gw.produced), "drain")
        got = upstream.received()
        assert sorted(map(key, got)) == sorted(map(key, gw.produced)), "lost or doubled"
        assert by_athlete(got) == gw.per_athlete(), "out of order for an athlete"
        assert len({s.uid for s in got}) == 4
        state = gw.sink.state()
        assert state["state"] == "connected"
        assert state["forwarded"] >= len(gw.produced)


async def test_rows_sent_but_not_acknowledged_go_again_after_a_crash(tmp_path: Path) -> None:
    # A 40 s HELLO interval and no extra heartbeats: nothing is vouched for when the sink dies.
    up = Upstream(tmp_path, heartbeat_interval_s=40.0)
    await up.start()
    assert up.watch is not None
    gw = Gateway(tmp_path, settings(up.url, ack_interval_s=3600.0))
    task = asyncio.create_task(gw.sink.run())
    await gw.run_for(3)
    await up.watch.until(lambda: len(up.keys()) >= len(gw.produced), "live")
    gw.sink.save_cursors()
    assert gw.spool.cursor("upstream") == 0
    sockets = [lane.ws for lane in gw.sink.lanes.values() if lane.ws is not None]
    task.cancel()  # a crash: no last ACK, no goodbye
    with contextlib.suppress(asyncio.CancelledError):
        await task
    for ws in sockets:
        ws.transport.abort()
    gw.spool.close()

    again = Gateway(tmp_path, settings(up.url))
    async with again:
        assert again.sink.cursor == 0
        await until_updates(again.sink, lambda: again.sink.cursor >= gw.spool.last_seq)
    assert up._duplicates() == len(gw.produced), "every unacknowledged row goes again"
    got = up.keys()
    assert sorted(got) == sorted(map(key, gw.produced))
    await up.stop()


async def until_updates(sink: UpstreamSink, condition: Callable[[], bool]) -> None:
    async def wait() -> None:
        while True:
            sink.updates.clear()
            sink.save_cursors()
            if condition():
                return
            await sink.updates.wait()

    await asyncio.wait_for(wait(), WAIT)


# ---------------------------------------------------------------- terra mode and token minting

DEV_ID = "gym-dev-7"
API_KEY = "terra-api-key-do-not-log"


class MintServer:
    """Terra's `POST /auth/user?id=<user>` on 127.0.0.1 port 0, minting real single-use tokens
    of the upstream broker. It refuses wrong headers with 403 and, if told to, answers the first
    request for a user with a token the broker does not know (the broker then closes with 4001)."""

    def __init__(self, up: Upstream, athletes: dict[str, str], stale_first: set[str]) -> None:
        self.up = up
        self.athletes = athletes  # Terra user id -> athlete
        self.stale_first = set(stale_first)
        # Its own view of the broker's token file, as a separate minting process would have.
        self.store = TokenStore(up.tmp / "up-state", clock=CLOCK)
        self.requests: list[dict[str, str]] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                user = urllib.parse.parse_qs(url.query).get("id", [""])[0]
                with server.lock:
                    server.requests.append(
                        {
                            "path": url.path,
                            "id": user,
                            "dev-id": self.headers.get("dev-id", ""),
                            "x-api-key": self.headers.get("x-api-key", ""),
                        }
                    )
                    stale = user in server.stale_first
                    server.stale_first.discard(user)
                good = (
                    url.path == "/auth/user"
                    and self.headers.get("dev-id") == DEV_ID
                    and self.headers.get("x-api-key") == API_KEY
                    and user in server.athletes
                )
                if not good:
                    self.send_response(403)
                    self.end_headers()
                    self.wfile.write(b"Forbidden")
                    return
                token = (
                    "already-used-token"
                    if stale
                    else server.store.create(
                        "producer", athletes=[server.athletes[user]], single_use=True
                    )
                )
                body = json.dumps({"status": "success", "token": token}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> MintServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def count(self, user: str) -> int:
        with self.lock:
            return sum(1 for r in self.requests if r["id"] == user)


async def test_terra_mode_mints_a_token_per_connection_and_again_after_4001(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    up = Upstream(tmp_path, producers=[("static-token-sim-03", ["sim-03"])])
    await up.start()
    assert up.watch is not None
    key_file = tmp_path / "terra.key"
    key_file.write_text(API_KEY + "\n")
    with MintServer(up, {"tu-1": "sim-01", "tu-2": "sim-02"}, stale_first={"tu-1"}) as mint:
        config = settings(
            up.url,
            mode="terra",
            token=None,
            terra_user_ids={"sim-01": "tu-1", "sim-02": "tu-2"},
            tokens={"sim-03": "static-token-sim-03"},
            dev_id=DEV_ID,
            api_key_file=key_file,
            api_base_url=mint.url,
            ack_interval_s=None,
        )
        async with Gateway(tmp_path, config, athletes=4) as gw:
            await gw.run_for(6)
            routed = [s for s in gw.produced if s.uid != "sim-04" and s.t != DataType.BATTERY]
            await up.watch.until(lambda: len(up.keys()) >= len(routed), "every athlete's samples")
            state = gw.sink.state()
            assert by_athlete(up.received()) == by_athlete(routed)
            assert mint.count("tu-1") == 2, "the token refused with 4001 is replaced by a new one"
            assert mint.count("tu-2") == 1
            assert all(r["dev-id"] == DEV_ID and r["x-api-key"] == API_KEY for r in mint.requests)
            assert state["tokens_minted"] == 3
            assert state["unroutable"] == sum(1 for s in gw.produced if s.uid == "sim-04")
            assert state["athletes"]["sim-01"]["state"] == "ready"
            assert set(state["athletes"]) == {"sim-01", "sim-02", "sim-03"}
    await up.stop()
    assert API_KEY not in caplog.text
    assert "4001" in caplog.text and "minting a new one" in caplog.text
    assert "sim-04 has no token" in caplog.text


async def test_refused_credentials_are_loud_and_back_off_long(
    tmp_path: Path, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    config = settings(upstream.url, token="not-the-hub-token", fatal_backoff_s=600.0)
    async with Gateway(tmp_path, config) as gw:
        await gw.run_for(1)
        await until_updates(gw.sink, lambda: gw.sink.state()["state"] == "down")
        state = gw.sink.state()
        assert "4001" in state["last_error"] and "outputs.upstream.token" in state["last_error"]
        assert state["retry_in_s"] > 500
        assert state["backlog"] == len(gw.produced)
    assert any(
        r.levelname == "ERROR" and "fix outputs.upstream.token" in r.getMessage()
        for r in caplog.records
    )
    assert "not-the-hub-token" not in caplog.text


async def test_a_wrong_api_key_is_refused_loudly_and_not_logged(
    tmp_path: Path, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    with MintServer(upstream, {"tu-1": "sim-01"}, stale_first=set()) as mint:
        config = settings(
            upstream.url,
            mode="terra",
            token=None,
            terra_user_ids={"sim-01": "tu-1"},
            dev_id=DEV_ID,
            api_key_env="GW_TEST_TERRA_KEY",
            api_base_url=mint.url,
        )
        sink = UpstreamSink(
            Hub().subscribe("x"),
            config,
            spool=Spool(tmp_path / "s.db", clock=CLOCK),
            env={"GW_TEST_TERRA_KEY": "wrong-key-123"},
            clock=CLOCK,
        )
        sink.spool.append([Sample("sim-01", DataType.HEART_RATE, 1000.0, val=70)])
        task = asyncio.create_task(sink.run())
        try:
            await until_updates(sink, lambda: sink.state()["state"] == "down")
        finally:
            await sink.close()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert mint.requests[0]["x-api-key"] == "wrong-key-123"
        assert "HTTP 403" in sink.state()["athletes"]["sim-01"]["last_error"]
    assert "wrong-key-123" not in caplog.text
    assert any(r.levelname == "ERROR" and "HTTP 403" in r.getMessage() for r in caplog.records)


async def test_the_size_cap_evicts_the_oldest_counts_them_and_the_rest_arrives(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    up = Upstream(tmp_path)
    await up.start()
    await up.stop()  # down from the start: everything waits in the spool
    # Blocks take a few bytes a sample: 32 athletes for a minute pass a cap of 48 kB.
    async with Gateway(tmp_path, settings(up.url), athletes=32, spool={"max_bytes": 48_000}) as gw:
        await gw.run_for(60)
        held = [key(s) for _, s in gw.spool.read(0, 1 << 62, limit=10**6)]
        assert gw.spool.evicted > 0
        assert gw.spool.evicted + len(held) == len(gw.produced)
        assert held == [key(s) for s in gw.produced[-len(held) :]], "the oldest go first"
        state = gw.sink.state()
        assert state["spool_evicted"] == gw.spool.evicted
        assert state["backlog"] == len(held)
        assert state["backlog_age_s"] is not None
        await up.start()
        assert up.watch is not None
        await up.watch.until(lambda: len(up.keys()) >= len(held), "the rest")
        assert up.keys() == held
    await up.stop()
    assert any(
        r.levelname == "WARNING"
        and "evicted" in r.getMessage()
        and "not been forwarded" in r.getMessage()
        for r in caplog.records
    )


# ---------------------------------------------------------------- TLS


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_pki(tmp: Path) -> dict[str, Path]:
    """A private CA, a server certificate for 127.0.0.1 and a client certificate."""
    pki = {
        name: tmp / f"{name}.pem" for name in ("ca", "ca-key", "srv", "srv-key", "cli", "cli-key")
    }
    curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    openssl(
        "req",
        "-x509",
        *curve,
        "-keyout",
        str(pki["ca-key"]),
        "-out",
        str(pki["ca"]),
        "-days",
        "1",
        "-subj",
        "/CN=test CA",
    )
    for name, cn, ext in (
        ("srv", "127.0.0.1", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
        ("cli", "gym-hub", "extendedKeyUsage=clientAuth"),
    ):
        csr, extfile = tmp / f"{name}.csr", tmp / f"{name}.ext"
        extfile.write_text(ext + "\n")
        openssl(
            "req",
            "-new",
            *curve,
            "-keyout",
            str(pki[f"{name}-key"]),
            "-out",
            str(csr),
            "-subj",
            f"/CN={cn}",
        )
        openssl(
            "x509",
            "-req",
            "-in",
            str(csr),
            "-CA",
            str(pki["ca"]),
            "-CAkey",
            str(pki["ca-key"]),
            "-CAcreateserial",
            "-out",
            str(pki[name]),
            "-days",
            "1",
            "-extfile",
            str(extfile),
        )
    return pki


class TlsFront:
    """TLS in front of the real broker (as a cloud load balancer would be), requiring a client
    certificate from the private CA; bytes are piped through unchanged."""

    def __init__(self, pki: dict[str, Path], backend_port: int) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki["ca"]))
        self.context.load_cert_chain(str(pki["srv"]), str(pki["srv-key"]))
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.backend_port = backend_port
        self.server: asyncio.Server | None = None
        self.pipes: set[asyncio.Task[None]] = set()
        self.handshakes = 0

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0, ssl=self.context)
        return int(self.server.sockets[0].getsockname()[1])

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handshakes += 1
        back_reader, back_writer = await asyncio.open_connection("127.0.0.1", self.backend_port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(Exception):
                dst.close()

        for task in (
            asyncio.create_task(pipe(reader, back_writer)),
            asyncio.create_task(pipe(back_reader, writer)),
        ):
            self.pipes.add(task)
            task.add_done_callback(self.pipes.discard)

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self.pipes):
            task.cancel()
        await asyncio.gather(*self.pipes, return_exceptions=True)


async def test_wss_with_a_private_ca_and_a_client_certificate(
    tmp_path: Path, upstream: Upstream
) -> None:
    pki = make_pki(tmp_path)
    front = TlsFront(pki, upstream.port)
    port = await front.start()
    url = f"wss://127.0.0.1:{port}/connect"
    try:
        config = settings(
            url, tls_ca_file=pki["ca"], tls_client_cert=pki["cli"], tls_client_key=pki["cli-key"]
        )
        async with Gateway(tmp_path, config) as gw:
            await gw.run_for(3)
            assert upstream.watch is not None
            await upstream.watch.until(lambda: len(upstream.keys()) >= len(gw.produced), "data")
            assert upstream.keys() == [key(s) for s in gw.produced]
        # Without the client certificate the front refuses the handshake: a loud, clear error.
        bare = UpstreamSink(
            Hub().subscribe("x"),
            settings(url, tls_ca_file=pki["ca"]),
            spool=Spool(tmp_path / "b.db", clock=CLOCK),
            clock=CLOCK,
        )
        task = asyncio.create_task(bare.run())
        try:
            await until_updates(bare, lambda: bare.state()["state"] == "down")
            assert "cannot connect" in bare.state()["last_error"]
        finally:
            await bare.close()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    finally:
        await front.stop()


async def test_device_connects_and_losses_go_upstream_as_status(
    tmp_path: Path, upstream: Upstream
) -> None:
    gw = Gateway(tmp_path, settings(upstream.url), athletes=3, drop_after_s={"sim-02": 3})
    async with gw:
        await gw.run_for(12)
        lost = [s for s in gw.statuses if s.state is DeviceState.LOST]
        assert lost and {s.uid for s in lost} == {"sim-02"}
        wanted = {(s.uid, s.device_id, s.source, s.state) for s in gw.statuses}
        seen: set[tuple[str, str, str, DeviceState]] = set()
        assert upstream.events is not None

        async def collect() -> None:
            while not wanted <= seen:
                assert upstream.events is not None
                for event in await upstream.events.get_batch():
                    if isinstance(event, DeviceStatus):
                        seen.add((event.uid, event.device_id, event.source, event.state))

        await asyncio.wait_for(collect(), WAIT)
