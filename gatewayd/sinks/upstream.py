"""Forwards the spool upstream as a producer of Terra's streaming protocol (PROTOCOL.md).

Two modes: `terra` opens one connection per athlete with that athlete's token (static, or minted
over Terra's REST API for every connection, since Terra's tokens are single-use); `gatewayd` opens
one connection to another gatewayd and its SUBMITs carry `uid`. Each connection is a *lane*.

Delivery is at least once, in order per athlete. One reader walks the spool by seq and hands each
row to its athlete's lane. SUBMIT has no acknowledgement, so a lane counts a row as delivered only
once a HEARTBEAT sent after it has been ACKed (the socket is ordered); the durable cursors in the
spool advance only that far. A lane that is down makes the reader skip its rows and remember the
first one; when the lane is back the reader rewinds there and sends them again, skipping what
other lanes already sent. So a backlog drains at full speed, live rows follow behind it, and the
other lanes never wait for a dead one. A receiving gatewayd drops what arrives twice by
(uid, t, ts).

Cursors: `<name>` is the lowest point every lane has delivered (spool retention waits for it);
in terra mode `<name>/<athlete>` is each lane's own, so a restart does not resend to Terra what one
athlete's connection had already delivered.

The spool is shared with the local broker, which appends every Sample. When the local broker is
off, this sink appends them itself (`append=True`): exactly one component writes the spool.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import logging
import os
import random
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.protocol import State

from gatewayd import __version__
from gatewayd import protocol as p
from gatewayd.clock import Clock
from gatewayd.config import UpstreamConfig
from gatewayd.errors import ConfigError, SinkBroken, SpoolError
from gatewayd.hub import Subscription, only_samples
from gatewayd.model import DataType, DeviceStatus, Sample
from gatewayd.sinks.ws_frames import masked_text_frames
from gatewayd.spool import Spool

log = logging.getLogger(__name__)

ALL = "*"  # the one lane of gatewayd mode
READ_CHUNK = 2000
SEND_BATCH = 500
# While a lane is connecting, the reader runs at most this far past the first row it had to skip
# for it: a connection that comes up a moment later then costs a short re-read, not a rescan.
CONNECT_WINDOW = 20_000
END = 1 << 62
SAVE_EVERY_S = 1.0
FLUSH_EVERY_S = 1.0
GATEWAYD_ACK_INTERVAL_S = 2.0
CLOSE_DRAIN_S = 1.0
CLOSE_ACK_WAIT_S = 1.5
MINT_TIMEOUT_S = 15.0
MAX_MINT_ANSWER = 64 * 1024
# Close codes that a plain retry will not fix (PROTOCOL.md: "not retry blindly").
FATAL_CLOSES = frozenset({1003, 1007, 4000, 4003, 4004})
# gatewayd extensions that Terra's broker does not know.
TERRA_SKIPPED = frozenset({DataType.BATTERY})


class TokenError(SinkBroken):
    """No token for a connection. `fatal`: the credentials are refused, retrying soon is futile."""

    def __init__(self, message: str, *, fatal: bool) -> None:
        super().__init__(message)
        self.fatal = fatal


def safe_url(url: str) -> str:
    """The URL without user info or query: safe to log."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def tls_context(config: UpstreamConfig) -> ssl.SSLContext | None:
    """For wss: the system CA store (or `tls_ca_file`), and the client certificate if any."""
    if not config.url.startswith("wss://"):
        return None
    try:
        context = ssl.create_default_context(
            cafile=None if config.tls_ca_file is None else str(config.tls_ca_file)
        )
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            "outputs.upstream.tls_ca_file", f"cannot load {config.tls_ca_file}: {exc}"
        ) from None
    if config.tls_client_cert is not None:
        try:
            context.load_cert_chain(
                str(config.tls_client_cert),
                None if config.tls_client_key is None else str(config.tls_client_key),
            )
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                "outputs.upstream.tls_client_cert",
                f"cannot load the client certificate {config.tls_client_cert}"
                f" (key {config.tls_client_key}): {exc}",
            ) from None
    return context


class Credentials:
    """Where each lane's token comes from. Secrets stay in here and never reach a log."""

    def __init__(self, config: UpstreamConfig, env: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.base_url = config.api_base_url.rstrip("/")
        self._static: dict[str, str] = {}
        self._user_ids = dict(config.terra_user_ids) if config.mode == "terra" else {}
        self._api_key = ""
        self.minted = 0
        if config.mode == "gatewayd":
            self._static[ALL] = self._gatewayd_token()
        else:
            self._static = {uid: t.get_secret_value() for uid, t in config.tokens.items()}
            if self._user_ids:
                self._api_key = self._read_api_key(os.environ if env is None else env)
        self._https = (
            ssl.create_default_context(
                cafile=None if config.tls_ca_file is None else str(config.tls_ca_file)
            )
            if self._user_ids and self.base_url.startswith("https://")
            else None
        )

    def lanes(self) -> list[str]:
        if self.config.mode == "gatewayd":
            return [ALL]
        return sorted(set(self._static) | set(self._user_ids))

    def mints(self, lane: str) -> bool:
        return lane in self._user_ids

    def _gatewayd_token(self) -> str:
        if self.config.token is not None:
            return self.config.token.get_secret_value()
        path = self.config.token_file
        if path is None:
            raise ConfigError("outputs.upstream.token", "mode gatewayd needs a producer token")
        try:
            token = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                "outputs.upstream.token_file", f"cannot read {path}: {exc.strerror}"
            ) from None
        if not token:
            raise ConfigError("outputs.upstream.token_file", f"{path} is empty")
        return token

    def _read_api_key(self, env: Mapping[str, str]) -> str:
        path = self.config.api_key_file
        if path is not None:
            try:
                key = Path(path).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(
                    "outputs.upstream.api_key_file", f"cannot read {path}: {exc.strerror}"
                ) from None
            if not key:
                raise ConfigError("outputs.upstream.api_key_file", f"{path} is empty")
            return key
        key = env.get(self.config.api_key_env, "").strip()
        if not key:
            raise ConfigError(
                "outputs.upstream.api_key_file",
                "terra_user_ids needs Terra's API key: put it in the file named by api_key_file,"
                f" or in the environment variable ${self.config.api_key_env}",
            )
        return key

    async def token(self, lane: str) -> str:
        user_id = self._user_ids.get(lane)
        if user_id is not None:
            return await asyncio.to_thread(self._mint, user_id)
        token = self._static.get(lane)
        if token is None:
            raise TokenError(f"no token for {lane!r}", fatal=True)
        return token

    def _mint(self, user_id: str) -> str:
        """POST /auth/user?id=<user>: a single-use producer token (Terra's REST API)."""
        query = urllib.parse.urlencode({"id": user_id})
        request = urllib.request.Request(
            f"{self.base_url}/auth/user?{query}",
            data=b"",
            method="POST",
            headers={
                "dev-id": self.config.dev_id or "",
                "x-api-key": self._api_key,
                "Accept": "application/json",
                "User-Agent": f"gatewayd/{__version__}",
            },
        )
        where = f"{safe_url(self.base_url)}/auth/user for Terra user {user_id}"
        try:
            with urllib.request.urlopen(
                request, timeout=MINT_TIMEOUT_S, context=self._https
            ) as answer:
                body = answer.read(MAX_MINT_ANSWER)
        except urllib.error.HTTPError as exc:
            # 401/403: dev id or API key refused; 404: unknown user. Neither heals by retrying.
            raise TokenError(
                f"{where}: HTTP {exc.code} {exc.reason}", fatal=exc.code in (400, 401, 403, 404)
            ) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TokenError(f"{where}: {reason}", fatal=False) from None
        try:
            token = json.loads(body)["token"]
        except (ValueError, KeyError, TypeError):
            token = None
        if not isinstance(token, str) or not token:
            raise TokenError(f"{where}: the answer holds no token", fatal=False)
        self.minted += 1
        return token


class Lane:
    """One upstream connection (terra: one athlete; gatewayd: all of them), reconnecting forever.

    Its connection task owns the socket; the sink's reader owns the delivery bookkeeping
    (`sent`, `resend_from`, `done`, activation), so no row is ever decided on by two tasks.
    """

    def __init__(self, sink: UpstreamSink, key: str) -> None:
        self.sink = sink
        self.key = key
        self.label = "upstream" if key == ALL else f"upstream for {key}"
        # delivery, owned by the reader (acked is raised by ACKs of the active connection)
        self.done = 0  # every row of this lane up to here is delivered (its durable cursor)
        self.sent = 0  # the last seq written on the active connection (or delivered)
        self.acked = 0  # the last seq a HEARTBEAT_ACK vouched for
        self.resend_from: int | None = None  # the first row skipped while down
        self.active_generation = 0
        # connection, owned by run()
        self.generation = 0  # +1 per connection that reached READY
        self.link_ready = False  # from READY until the connection ends
        self.ws: ClientConnection | None = None
        self.conn: p.ClientConnection | None = None
        self.state = "idle"  # idle | connecting | ready | backoff
        self.attempt = 0
        self.failures = 0  # since the last READY
        self.last_error = ""
        self.retry_at: float | None = None
        self.ready_since: float | None = None
        self.connects = 0
        self.submitted = 0
        self.statuses: dict[str, DeviceStatus] = {}
        self.wanted = asyncio.Event()
        self.last_probe = 0.0
        self.probed_marker: int | None = None
        self._kick = asyncio.Event()
        self._ack_waiters: list[asyncio.Future[None]] = []
        self._own_close: p.Close | None = None

    # ------------------------------------------------------------ reader side

    @property
    def active(self) -> bool:
        return self.active_generation != 0

    def usable(self) -> bool:
        conn = self.conn
        return (
            self.link_ready
            and self.active_generation == self.generation
            and (conn is None or conn.state is p.ClientState.READY)
        )

    def connectable(self) -> bool:
        """A READY connection the reader has not taken into use yet."""
        return not self.active and self.link_ready

    def activate(self) -> int | None:
        """Take the new connection into use; return where the reader must rewind to, if anywhere."""
        self.active_generation = self.generation
        rewind = None
        if self.resend_from is not None:
            # This lane's rows before resend_from were all delivered (or belong to others).
            self.sent = rewind = self.resend_from - 1
            self.resend_from = None
        self.acked = self.sent
        return rewind

    def deactivate(self) -> None:
        """The connection is gone: whatever it had not vouched for is sent again later."""
        self.active_generation = 0
        if self.sent > self.acked:
            start = self.acked + 1
            self.resend_from = start if self.resend_from is None else min(self.resend_from, start)
            self.sent = self.acked

    def on_ack(self, marker: int | None) -> None:
        """A HEARTBEAT_ACK: the rows up to `marker` on the active connection have arrived."""
        if marker is not None and self.active_generation == self.generation:
            self.acked = max(self.acked, marker)
            self.sink.updates.set()

    def skip(self, seq: int) -> None:
        if self.resend_from is None:
            self.resend_from = seq
        self.want()

    def through(self, pos: int) -> int:
        """Advance and return `done` given that the reader has handled every row up to `pos`."""
        if self.resend_from is not None:
            reach = self.resend_from - 1
        elif self.sent > self.acked:
            reach = self.acked
        else:
            reach = max(pos, self.sent)
        self.done = max(self.done, reach)
        return self.done

    def want(self) -> None:
        if not self.wanted.is_set():
            self.wanted.set()
            if self.state == "idle":
                self.state = "connecting"

    async def submit(self, rows: list[tuple[int, Sample]]) -> bool:
        ws, conn = self.ws, self.conn
        if ws is None or conn is None or not self.usable():
            return False
        with_uid = self.sink.with_uid
        protocol = ws.protocol
        try:
            for start in range(0, len(rows), SEND_BATCH):
                if protocol.state is not State.OPEN:
                    return False
                # The frames of a batch go out in one write: a send() per frame costs several
                # times the CPU. submit_many() marks the last seq, and nothing can slip in
                # between marking and writing, so a later HEARTBEAT's ACK vouches exactly for
                # them. Anything websockets has queued goes first, to keep the order.
                texts = conn.submit_many(rows[start : start + SEND_BATCH], with_uid=with_uid)
                frames = masked_text_frames(texts)
                ws.transport.write(b"".join([*protocol.data_to_send(), frames]))
                await ws.drain()  # the socket's flow control paces a backlog
            self.submitted += len(rows)
        except (ConnectionClosed, ConnectionError):
            return False
        self._kick.set()  # the timers decide when a HEARTBEAT asks for the ACK
        return True

    async def send_status(self, event: DeviceStatus) -> None:
        ws = self.ws
        if ws is None or self.conn is None or self.conn.state is not p.ClientState.READY:
            return
        with contextlib.suppress(ConnectionClosed):
            await ws.send(p.status(event, with_uid=self.sink.with_uid))

    async def settle(self, timeout: float) -> None:
        """At shutdown: ask for one more ACK so the cursor covers what was sent."""
        ws, conn = self.ws, self.conn
        if ws is None or conn is None or not self.usable() or self.sent <= self.acked:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._ack_waiters.append(waiter)
        with contextlib.suppress(ConnectionClosed, asyncio.TimeoutError):
            await ws.send(conn.heartbeat_now(self.sink.mono()).text)
            await asyncio.wait_for(waiter, timeout)

    # ------------------------------------------------------------ connection side

    async def run(self) -> None:
        while True:
            await self.wanted.wait()
            self.state = "connecting"
            self.retry_at = None
            self.sink.changed()
            try:
                delay = await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug must not end forwarding: log it and reconnect
                log.exception("%s: unexpected error", self.label)
                self.last_error = f"internal error: {exc!r}"
                delay = self._backoff()
            finally:
                self._gone()
            if self.sink.stopping:
                return  # close() ended this connection: no reconnect
            self.state = "backoff"
            self.retry_at = self.sink.mono() + delay
            self.sink.changed()
            await asyncio.sleep(delay)

    def _backoff(self) -> float:
        config = self.sink.config
        delay = p.backoff_delay(
            self.attempt,
            self.sink.rng.random(),
            base=config.backoff_min_s,
            cap=config.backoff_max_s,
        )
        self.attempt += 1
        return delay

    def _fail(self, message: str, *, loud: bool = False) -> None:
        self.last_error = message
        if loud:
            log.error("%s: %s", self.label, message)
        elif self.failures % 10 == 0:
            # The first failure of an outage, then every tenth: visible, but no flood.
            log.warning("%s: %s (retrying with backoff)", self.label, message)
        else:
            log.debug("%s: %s", self.label, message)
        self.failures += 1

    async def _session(self) -> float:
        """One connection, from the token to the close; returns the delay before the next."""
        sink = self.sink
        config = sink.config
        try:
            token = await sink.credentials.token(self.key)
        except TokenError as exc:
            self._fail(f"no token: {exc}", loud=exc.fatal)
            return config.fatal_backoff_s if exc.fatal else self._backoff()
        try:
            ws = await connect(
                config.url,
                ssl=sink.tls,
                compression=None,
                open_timeout=config.connect_timeout_s,
                ping_interval=None,  # the protocol's HEARTBEATs do this job
                close_timeout=2.0,
                max_size=p.MAX_FRAME_BYTES,
                user_agent_header=f"gatewayd/{__version__}",
            )
        except InvalidURI as exc:
            self._fail(f"bad url {safe_url(config.url)}: {exc}", loud=True)
            return config.fatal_backoff_s
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            # A certificate the CA store rejects will not heal by itself: say so loudly.
            self._fail(
                f"cannot connect to {safe_url(config.url)}: {exc or type(exc).__name__}",
                loud=isinstance(exc, ssl.SSLError),
            )
            return self._backoff()
        conn = p.ClientConnection(
            token,
            p.Role.PRODUCER,
            # Terra asks for the first HEARTBEAT after interval * jitter, jitter in 0.1..1.
            jitter=sink.rng.uniform(0.1, 1.0),
            hello_timeout_s=config.connect_timeout_s,
        )
        conn.start(sink.mono())
        self.ws, self.conn = ws, conn
        self.connects += 1
        self._own_close = None
        self.probed_marker = None
        timers = asyncio.create_task(self._timers(ws, conn), name=f"{self.label}: timers")
        try:
            async for message in ws:
                for event in conn.receive(message, sink.mono()):
                    await self._act(ws, event)
                if conn.state is p.ClientState.CLOSED:
                    break
        except ConnectionClosed:
            pass
        finally:
            timers.cancel()
            try:
                await timers
            except asyncio.CancelledError:
                # The timers' own cancel ends here; a cancel of this lane (close()) must not,
                # or the lane would reconnect after the close frame went out.
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
            except ConnectionClosed:
                pass
        with contextlib.suppress(ConnectionClosed):
            await ws.close()
        return self._after_close(ws, self._own_close)

    def _probe_at(self, conn: p.ClientConnection) -> float | None:
        """When to send an extra HEARTBEAT so the ACK vouches for the rows sent since the last.

        At most one per `ack_interval_s`, and only for rows no HEARTBEAT has followed yet."""
        interval = self.sink.ack_interval_s
        if (
            interval is None
            or conn.state is not p.ClientState.READY
            or conn.last_marker is None
            or conn.last_marker == self.probed_marker
        ):
            return None
        return self.last_probe + interval

    async def _timers(self, ws: ClientConnection, conn: p.ClientConnection) -> None:
        mono = self.sink.mono
        while True:
            deadline = conn.next_deadline()
            if deadline is None:
                return
            probe = self._probe_at(conn)
            if probe is not None:
                deadline = min(deadline, probe)
            self._kick.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), max(0.0, deadline - mono()))
            now = mono()
            probe = self._probe_at(conn)
            if probe is not None and now >= probe:
                self.last_probe = now
                await self._act(ws, conn.heartbeat_now(now))
            for event in conn.tick(now):
                await self._act(ws, event)

    async def _act(self, ws: ClientConnection, event: p.Event) -> None:
        if isinstance(event, p.Send):
            if event.text == p.heartbeat() and self.conn is not None:
                # Every HEARTBEAT, regular or extra, asks for the rows sent so far.
                self.probed_marker = self.conn.last_marker
            await ws.send(event.text)
        elif isinstance(event, p.Acked):
            self.on_ack(event.marker)
            for waiter in self._ack_waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._ack_waiters.clear()
        elif isinstance(event, p.Ready):
            self.generation += 1
            self.link_ready = True
            self.state = "ready"
            self.attempt = 0
            self.failures = 0
            self.last_error = ""
            self.ready_since = self.sink.mono()
            log.info("%s: connected to %s", self.label, safe_url(self.sink.config.url))
            for status in list(self.statuses.values()):
                await ws.send(p.status(status, with_uid=self.sink.with_uid))
            self.sink.changed()
        elif isinstance(event, p.Close):
            self._own_close = event
            await ws.close(event.code, event.reason[:120])

    def _after_close(self, ws: ClientConnection, own: p.Close | None) -> float:
        was_ready = self.state == "ready"
        received = ws.protocol.close_rcvd
        if own is not None:
            code, reason, by = own.code, own.reason, "we closed"
        elif received is not None:
            code, reason, by = received.code, received.reason, "the server closed"
        else:
            code, reason, by = 1006, "connection lost", "the link dropped"
        what = f"{by} with {code}" + (f" ({reason})" if reason else "")
        return self.close_delay(code, what, was_ready=was_ready)

    def close_delay(self, code: int, what: str, *, was_ready: bool) -> float:
        """What a close code means for the next attempt (PROTOCOL.md, Close codes)."""
        config = self.sink.config
        if code == p.CloseCode.BAD_TOKEN:
            if self.sink.credentials.mints(self.key):
                self._fail(f"{what}: token refused, minting a new one")
                if self.attempt == 0:
                    self.attempt = 1  # at once the first time; a refusal loop backs off
                    return 0.0
                return self._backoff()
            self._fail(
                f"{what}: the configured token is refused; fix outputs.upstream."
                + ("token" if self.key == ALL else f"tokens.{self.key}"),
                loud=True,
            )
            return config.fatal_backoff_s
        if code in FATAL_CLOSES:
            self._fail(
                f"{what}: the server refuses what we send; retrying in"
                f" {config.fatal_backoff_s:.0f} s",
                loud=True,
            )
            return config.fatal_backoff_s
        if was_ready and code in (p.CloseCode.NORMAL, p.CloseCode.GOING_AWAY):
            log.info("%s: %s; reconnecting", self.label, what)
            self.last_error = what
            return self._backoff()
        self._fail(what)
        return self._backoff()

    def _gone(self) -> None:
        self.link_ready = False
        if self.ws is not None:
            self.ws = None
            self.conn = None
            self.ready_since = None
            self.sink.changed()
        for waiter in self._ack_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._ack_waiters.clear()

    def describe(self, now: float) -> dict[str, Any]:
        out: dict[str, Any] = {"state": self.state, "cursor": self.done, "sent": self.submitted}
        if self.last_error:
            out["last_error"] = self.last_error
        if self.retry_at is not None and self.state == "backoff":
            out["retry_in_s"] = round(max(0.0, self.retry_at - now), 1)
        return out


def _seq(row: tuple[int, Sample]) -> int:
    return row[0]


def forget_cursors(spool: Spool, name: str) -> None:
    """The upstream is off: its cursors must not hold spool retention back any longer."""
    for cursor in spool.cursors():
        if cursor == name or cursor.startswith(f"{name}/"):
            spool.drop_cursor(cursor)
            log.info("upstream off: forgot spool cursor %s", cursor)


class UpstreamSink:
    name = "upstream"

    def __init__(
        self,
        subscription: Subscription,
        config: UpstreamConfig,
        *,
        spool: Spool,
        append: bool = False,
        env: Mapping[str, str] | None = None,
        clock: Clock,
        rng: random.Random | None = None,
    ) -> None:
        self.subscription = subscription
        self.config = config
        self.spool = spool
        self.append = append
        self.mono = clock.mono
        self.wall = clock.wall
        self.rng = rng or random.Random()
        self.credentials = Credentials(config, env)
        self.tls = tls_context(config)
        self.terra = config.mode == "terra"
        self.with_uid = not self.terra
        self.ack_interval_s = config.ack_interval_s
        if self.ack_interval_s is None and not self.terra:
            self.ack_interval_s = GATEWAYD_ACK_INTERVAL_S
        self.lanes = {key: Lane(self, key) for key in self.credentials.lanes()}
        self.pos = 0  # the reader has handled every row up to here
        self.cursor = 0  # the lowest `done` of all lanes, saved as cursor `name`
        self.forwarded = 0
        self.unroutable = 0
        self.skipped_types = 0
        self.spool_error: str | None = None
        self._unroutable_uids: set[str] = set()
        self._rewind: int | None = None
        self._read_high = 0
        self._wake = asyncio.Event()
        self._advanced = asyncio.Event()
        # Set when a connection changes state or an ACK vouches for more rows (health, tests).
        self.updates = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._saved: dict[str, int] = {}
        self._closing = False
        self.stopping = False  # set by close(): lanes do not reconnect any more
        self._load_cursors()
        spool.add_listener(self._on_append)
        log.info(
            "upstream (%s mode) to %s: %d connection%s, resuming after seq %d",
            config.mode,
            safe_url(config.url),
            len(self.lanes),
            "" if len(self.lanes) == 1 else "s",
            self.cursor,
        )

    # ------------------------------------------------------------ cursors

    def _lane_cursor(self, key: str) -> str:
        return f"{self.config.name}/{key}"

    def _load_cursors(self) -> None:
        name = self.config.name
        known = self.spool.cursors()
        base = known.get(name, 0)
        for key, lane in self.lanes.items():
            start = max(base, known.get(self._lane_cursor(key), 0)) if self.terra else base
            lane.done = lane.sent = lane.acked = start
        prefix = f"{name}/"
        for other in known:
            # An athlete no longer configured must not hold back retention.
            stale = not self.terra or other[len(prefix) :] not in self.lanes
            if other.startswith(prefix) and stale:
                self.spool.drop_cursor(other)
        self.pos = self.cursor = self._read_high = base
        if name not in known:
            # From now on retention keeps every row until this upstream has it.
            try:
                self.spool.set_cursor(name, base)
            except SpoolError as exc:
                self._spool_failed(str(exc))
        self._saved = {name: base}

    def save_cursors(self) -> None:
        pos = self.pos
        cursors = {key: lane.through(pos) for key, lane in self.lanes.items()}
        self.cursor = max(self.cursor, min(cursors.values(), default=pos))
        wanted = {self.config.name: self.cursor}
        if self.terra:
            wanted.update({self._lane_cursor(key): seq for key, seq in cursors.items()})
        try:
            for name, seq in wanted.items():
                if self._saved.get(name) != seq:
                    self.spool.set_cursor(name, seq)
                    self._saved[name] = seq
        except SpoolError as exc:
            self._spool_failed(str(exc))

    def _spool_failed(self, message: str) -> None:
        if self.spool_error is None:
            log.error("upstream: %s; forwarding goes on, a restart may resend more", message)
        self.spool_error = message

    # ------------------------------------------------------------ running

    def _on_append(self, first: int, last: int) -> None:
        self._wake.set()

    def changed(self) -> None:
        self._wake.set()
        self.updates.set()

    async def run(self) -> None:
        self._tasks = [
            asyncio.create_task(self._reader(), name="upstream: reader"),
            asyncio.create_task(self._events(), name="upstream: events"),
            asyncio.create_task(self._saver(), name="upstream: cursors"),
        ]
        self._tasks += [
            asyncio.create_task(lane.run(), name=lane.label) for lane in self.lanes.values()
        ]
        if not self.terra:
            self.lanes[ALL].want()  # the hub-to-hub link stays up; Terra lanes open on demand
        try:
            # Not gather(): close() cancels the reader first, and a cancelled child would make
            # gather() cancel the lanes too, dropping their sockets before the last ACK and the
            # close frame. Only a part that fails ends (and restarts) the whole sink.
            done, _ = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                failure = None if task.cancelled() else task.exception()
                if failure is not None:
                    raise failure
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close(self) -> None:
        """Get one last ACK for what was sent, save the cursors, close every connection."""
        if self._closing:
            return
        self._closing = True
        self.stopping = True
        reader = next((t for t in self._tasks if t.get_name() == "upstream: reader"), None)
        if reader is not None:
            if self.append:
                with contextlib.suppress(Exception):
                    self._append(self.subscription.get_nowait())
            # Send what the last second added (SIGTERM: drain), within the shutdown budget.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._caught_up(), CLOSE_DRAIN_S)
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        await asyncio.gather(*(lane.settle(CLOSE_ACK_WAIT_S) for lane in self.lanes.values()))
        self.save_cursors()
        # Each socket ends with a close frame (1000), after its last HEARTBEAT was ACKed above.
        await asyncio.gather(
            *(
                lane.ws.close(p.CloseCode.NORMAL, "gatewayd stopping")
                for lane in self.lanes.values()
                if lane.ws is not None
            ),
            return_exceptions=True,
        )
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.append:
            self._flush()

    async def _caught_up(self) -> None:
        while self.pos < self.spool.last_seq:
            self._advanced.clear()
            await self._advanced.wait()

    def _sync_lanes(self) -> None:
        for lane in self.lanes.values():
            if lane.active and not lane.usable():
                lane.deactivate()
            if lane.connectable():
                rewind = lane.activate()
                if rewind is not None and rewind < self.pos:
                    self._rewind = rewind if self._rewind is None else min(self._rewind, rewind)

    def _window_full(self, pos: int) -> bool:
        return any(
            lane.state == "connecting"
            and lane.resend_from is not None
            and pos - lane.resend_from >= CONNECT_WINDOW
            for lane in self.lanes.values()
        )

    def _route(self, sample: Sample, fresh: bool) -> Lane | None:
        """Terra mode: the lane for a row; `fresh` when the reader sees it for the first time (not
        a rewind)."""
        if sample.t in TERRA_SKIPPED:
            self.skipped_types += fresh
            return None
        lane = self.lanes.get(sample.uid)
        if lane is None:
            self.unroutable += fresh
            if sample.uid not in self._unroutable_uids:
                self._unroutable_uids.add(sample.uid)
                log.warning(
                    "upstream (terra): athlete %s has no token and no Terra user id; its samples"
                    " stay on this hub (add outputs.upstream.tokens.%s or terra_user_ids.%s)",
                    sample.uid,
                    sample.uid,
                    sample.uid,
                )
        return lane

    def deal(self, rows: list[tuple[int, Sample]]) -> dict[str, list[tuple[int, Sample]]]:
        """Hand rows (in seq order, after `pos`) to their lanes: what each active lane must send
        now; a lane that is down remembers the first row it missed."""
        batches: dict[str, list[tuple[int, Sample]]] = {}
        if not rows:
            return batches
        if self.terra:
            self._deal_by_athlete(rows, batches)
        else:
            # One lane takes every row, so what it has not sent yet is a tail of `rows`: dealt
            # in one step rather than row by row.
            lane = self.lanes[ALL]
            start = bisect.bisect_right(rows, lane.sent, key=_seq)
            if start < len(rows):
                if lane.active:
                    lane.sent = rows[-1][0]
                    batches[ALL] = rows[start:]
                else:
                    lane.skip(rows[start][0])
        self.pos = rows[-1][0]
        self._read_high = max(self._read_high, self.pos)
        return batches

    def _deal_by_athlete(
        self, rows: list[tuple[int, Sample]], batches: dict[str, list[tuple[int, Sample]]]
    ) -> None:
        high = self._read_high
        for seq, sample in rows:
            lane = self._route(sample, seq > high)
            if lane is None or seq <= lane.sent:
                continue  # not forwarded, or this lane already sent it
            if lane.active:
                lane.sent = seq
                batches.setdefault(lane.key, []).append((seq, sample))
            else:
                lane.skip(seq)

    def rewind(self) -> None:
        """Take READY connections into use and move `pos` back to what they must resend."""
        self._sync_lanes()
        if self._rewind is not None:
            self.pos = min(self.pos, self._rewind)
            self._rewind = None

    async def _reader(self) -> None:
        while True:
            self._wake.clear()
            self.rewind()
            pos = self.pos
            if self._window_full(pos):
                await self._wake.wait()
                continue
            rows = self.spool.read(pos, END, READ_CHUNK)
            if not rows:
                self._advanced.set()
                await self._wake.wait()
                continue
            batches = self.deal(rows)
            for key, batch in batches.items():
                if await self.lanes[key].submit(batch):
                    self.forwarded += len(batch)
            self._advanced.set()
            if len(rows) < READ_CHUNK:
                # Caught up: let the appender and the sockets breathe before the next read.
                await asyncio.sleep(0)

    async def _events(self) -> None:
        """Device status goes out live (never spooled); Samples are spooled here if asked to."""
        flusher = asyncio.create_task(self._flusher()) if self.append else None
        try:
            while True:
                batch = await self.subscription.get_batch(5000)
                if self.append:
                    self._append(batch)
                if only_samples(batch):
                    continue  # the usual batch: samples, which reach the upstream by the spool
                for event in batch:
                    if isinstance(event, DeviceStatus):
                        await self._status(event)
        finally:
            if flusher is not None:
                flusher.cancel()

    def _append(self, batch: list[Sample | DeviceStatus]) -> None:
        samples = [event for event in batch if isinstance(event, Sample)]
        if samples:
            self.spool.append(samples)

    async def _status(self, event: DeviceStatus) -> None:
        key = ALL if not self.terra else event.uid
        lane = self.lanes.get(key)
        if lane is None:
            return
        # Kept per device so a connection that comes back tells the upstream the current state.
        lane.statuses[f"{event.uid}\0{event.device_id}"] = event
        await lane.send_status(event)

    async def _flusher(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_EVERY_S)
            self._flush()

    def _flush(self) -> None:
        try:
            self.spool.flush()
        except SpoolError as exc:
            self._spool_failed(str(exc))
        else:
            self.spool_error = None

    async def _saver(self) -> None:
        while True:
            await asyncio.sleep(SAVE_EVERY_S)
            self.save_cursors()

    # ------------------------------------------------------------ health

    def backlog(self) -> int:
        """Rows spooled after the cursor: not yet known to have reached the upstream."""
        start = max(self.cursor, self.spool.first_seq() - 1)
        return max(0, self.spool.last_seq - start)

    def state(self) -> dict[str, Any]:
        now = self.mono()
        lanes = list(self.lanes.values())
        ready = sum(1 for lane in lanes if lane.state == "ready")
        wanted = [lane for lane in lanes if lane.wanted.is_set()]
        if wanted and all(lane.state == "ready" for lane in wanted):
            overall = "connected"
        elif any(lane.state == "ready" for lane in wanted):
            overall = "partly connected"
        elif any(lane.state == "connecting" for lane in wanted):
            overall = "connecting"
        elif wanted:
            overall = "down"
        else:
            overall = "idle"
        backlog = self.backlog()
        age = None
        if backlog:
            oldest = self.spool.read(max(self.cursor, self.spool.first_seq() - 1), END, 1)
            if oldest:
                age = round(max(0.0, self.wall() - oldest[0][1].ts), 1)
        out: dict[str, Any] = {
            "mode": self.config.mode,
            "url": safe_url(self.config.url),
            "state": overall,
            "connections": {"ready": ready, "total": len(lanes)},
            "backlog": backlog,
            "backlog_age_s": age,
            "cursor": self.cursor,
            "forwarded": self.forwarded,
            "spool_evicted": self.spool.evicted,
            "spool_write_errors": self.spool.write_errors,
            "spool_error": self.spool_error,
        }
        if self.terra:
            out["unroutable"] = self.unroutable
            out["tokens_minted"] = self.credentials.minted
            out["athletes"] = {lane.key: lane.describe(now) for lane in lanes}
        else:
            out.update(self.lanes[ALL].describe(now))
            out["state"] = overall
        return out
