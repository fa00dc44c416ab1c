"""The hub's own broker: Terra's streaming protocol on `ws://<host>:<port>/connect`, plus
`GET /healthz` (JSON) and `GET /metrics` (Prometheus) on the same port.

A thin shell around gatewayd.protocol: this module does the I/O, the timers and the fan-out.

Fan-out: each Sample gets its seq from the spool and is encoded into a WebSocket frame once;
every consumer then gets the bytes of its share of a batch in one transport write. A consumer
whose socket is full gets a bounded send queue: past `send_queue` frames the oldest go (counted,
logged once per episode) and it can REPLAY them; it never slows the pipeline or other consumers.
One that stays behind for `limits.slow_consumer_close_s` is closed with 1013 (gatewayd.sendqueue).
Frames are written straight to the transport because a per-message `send()` per consumer costs
several times the CPU; this is sound because compression is off (frames are byte-identical for
every consumer) and the broker never fragments. Closing still goes through websockets.

Device status reaches consumers that asked for it in IDENTIFY (`d.gatewayd.device_status`), as a
DISPATCH with `t = "DEVICE_STATUS"` and no seq; plain Terra consumers never see it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import operator
import ssl
from collections.abc import Callable, Mapping
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from gatewayd import __version__
from gatewayd import protocol as p
from gatewayd.clock import Clock
from gatewayd.config import LocalBrokerConfig
from gatewayd.errors import ConfigError, SpoolError
from gatewayd.hub import Event, Subscription, only_samples
from gatewayd.lockout import GuessBrake
from gatewayd.metrics import CONTENT_TYPE, Metrics
from gatewayd.model import DataType, DeviceState, DeviceStatus, Sample
from gatewayd.ratelimit import ReplayPacer, SubmitLimiter, Verdict, replay_admissible
from gatewayd.sendqueue import SendQueue
from gatewayd.sinks.request_body import body_connection
from gatewayd.sinks.ws_frames import ws_text_frame, ws_text_frames
from gatewayd.spool import Spool
from gatewayd.tokens import CONSUMER, PRODUCER, Grant, TokenStore
from gatewayd.web import Page, board_url
from gatewayd.web.admin import Admin, bearer
from gatewayd.web.admin import Request as AdminRequest
from gatewayd.web.auth import PATHS as AUTH_PATHS
from gatewayd.web.auth import TokenEndpoints, load_developers

log = logging.getLogger(__name__)

# websockets logs every connection at INFO; the broker logs what matters itself.
_WS_LOG = logging.getLogger(f"{__name__}.websockets")
_WS_LOG.setLevel(logging.WARNING)

_TS = operator.itemgetter(2)  # Sample.ts
REPLAY_CHUNK = 500
FLUSH_EVERY_S = 1.0
BATCH_LIMIT = 5000
CLOSE_BUDGET_S = 3.0  # the closing handshake, then the socket is cut (websockets' timeout is 2 s)


class _Session:
    """One connection: its protocol state, its grant, and (for a consumer) its send queue."""

    def __init__(self, ws: ServerConnection, conn: p.ServerConnection, queue: SendQueue) -> None:
        self.ws = ws
        self.conn = conn
        self.grant: Grant | None = None
        self.filter = p.EVERYTHING
        self.pending = queue
        self.drainer: asyncio.Task[None] | None = None
        self.replays: asyncio.Queue[p.ReplayRequested] | None = None
        self.replayer: asyncio.Task[None] | None = None
        self.replaying = False
        self.limiter: SubmitLimiter | None = None  # a producer's SUBMIT budget
        self.limited = False  # logged that its SUBMITs are being dropped
        self.closing = False
        self.peer = _peer(ws)
        self.host = self.peer.rpartition(":")[0]

    @property
    def open(self) -> bool:
        return not self.closing and self.ws.protocol.state is State.OPEN

    @property
    def held_bytes(self) -> int:
        """What the hub holds for this client: its send queue and its transport's buffer."""
        return self.pending.nbytes + self.ws.transport.get_write_buffer_size()

    def write(self, data: bytes) -> None:
        if self.open:
            self.ws.transport.write(data)

    def write_text(self, text: str) -> None:
        self.write(ws_text_frame(text.encode("utf-8")))

    def offer(
        self, frames: list[bytes], joined: bytes | None, metrics: Metrics, now: float
    ) -> None:
        """Live DISPATCHes: write now, or queue (dropping the oldest) while the socket is full."""
        if not self.open:
            return
        pending = self.pending
        if not self.ws.paused and not pending:
            self.ws.transport.write(joined if joined is not None else b"".join(frames))
            return
        overflow = pending.push(frames, now)
        if overflow is not None:
            metrics.dropped.inc(overflow.dropped)
            if overflow.started:
                log.warning(
                    "consumer %s is not keeping up: dropping its oldest DISPATCHes "
                    "(send queue of %d full); it can REPLAY them",
                    self.peer,
                    pending.limit,
                )
        if self.drainer is None:
            self.drainer = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        try:
            while self.pending and self.open:
                await self.ws.drain()
                if not self.open:
                    break
                self.ws.transport.write(self.pending.take())
            if self.pending.caught_up():
                log.info(
                    "consumer %s caught up; %d DISPATCHes dropped so far",
                    self.peer,
                    self.pending.dropped,
                )
        except ConnectionClosed:
            pass
        finally:
            self.drainer = None

    async def send_reliably(self, frames: list[bytes]) -> None:
        """REPLAY output: never dropped, paced by the socket instead."""
        if not self.open:
            raise ConnectionError("closed")
        self.ws.transport.write(b"".join(frames))
        await self.ws.drain()


def _peer(ws: ServerConnection) -> str:
    try:
        host, port = ws.remote_address[:2]
    except (TypeError, ValueError):
        return "?"
    return f"{host}:{port}"


class LocalBroker:
    name = "local_broker"

    def __init__(
        self,
        subscription: Subscription,
        config: LocalBrokerConfig,
        *,
        spool: Spool,
        tokens: TokenStore,
        publish: Callable[[Event], None] | None = None,
        health: Callable[[], Mapping[str, Any]] | None = None,
        metrics: Metrics | None = None,
        clock: Clock,
        timer_interval_s: float = 0.5,
        board: Callable[[str], Page | None] | None = None,
        admin: Admin | None = None,
        board_key: str | None = None,
    ) -> None:
        self.subscription = subscription
        self.admin = admin  # /admin and /api (gatewayd/web/admin.py); None serves neither
        self.board = board  # extra GET pages (the gym board), by request target; None: none
        self.board_key = board_key  # logged as part of the board's URL
        self.config = config
        self.spool = spool
        self.tokens = tokens
        self.publish = publish if publish is not None else self._publish_locally
        self.health = health
        self.metrics = metrics or Metrics()
        self.metrics.watch_health(self.health_snapshot)
        self.mono = clock.mono
        self.wall = clock.wall
        self.timer_interval_s = timer_interval_s
        self.retention_s = config.replay_retention_h * 3600.0
        self.port = 0
        self._server: Server | None = None
        self._sessions: set[_Session] = set()
        self._consumers: list[_Session] = []
        self._producers = 0
        self._last_flush = clock.mono()
        self._last_submitted: dict[tuple[str, str], float] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._status_wanted = 0  # consumers that opted in to DEVICE_STATUS
        self._rr_arrays_wanted = 0  # consumers that asked for RR_INTERVAL as per-second arrays
        limits = config.limits
        self.brake = GuessBrake(
            attempts=limits.guess_attempts,
            window_s=limits.guess_window_s,
            lock_s=limits.guess_lock_s,
            max_lock_s=limits.guess_max_lock_s,
        )
        self.pacer = ReplayPacer(share=limits.replay_share)
        # Terra's token endpoints on this port (POST /auth/developer, /auth/user?id=).
        self.auth = TokenEndpoints(
            load_developers(config.developers, "outputs.local_broker.developers"), self._mint
        )
        self.tls = tls_context(config)  # here, so a bad certificate stops `run` at once (78)

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Listen; afterwards `port` holds the bound port (useful with port 0)."""
        if self._server is not None:
            return
        tls = self.tls
        self._server = await serve(
            self._handle,
            self.config.host,
            self.config.port,
            process_request=self._http,
            compression=None,
            max_size=p.MAX_FRAME_BYTES,
            ping_interval=None,  # the protocol's own heartbeats do this job
            close_timeout=2.0,
            write_limit=64 * 1024,
            server_header=f"gatewayd/{__version__}",
            logger=_WS_LOG,
            # Only the admin API takes request bodies; without it, websockets' own connection.
            create_connection=None if self.admin is None else body_connection(self._may_send_body),
            ssl=tls,
        )
        self.port = int(next(iter(self._server.sockets)).getsockname()[1])
        scheme = "wss" if tls is not None else "ws"
        log.info(
            "local broker listening on %s://%s:%d/connect", scheme, self.config.host, self.port
        )
        if self.board is not None:
            url = board_url(self.config.host, self.port, self.board_key, tls=tls is not None)
            log.info("board: %s", url)

    async def run(self) -> None:
        await self.start()
        timer = asyncio.create_task(self._timer_loop(), name="local_broker:timers")
        try:
            while True:
                batch = await self.subscription.get_batch(BATCH_LIMIT)
                self.dispatch(batch)
        finally:
            timer.cancel()

    async def close(self) -> None:
        """Dispatch what is queued, close every client with 1001, stop listening, flush."""
        with contextlib.suppress(Exception):
            self.dispatch(self.subscription.get_nowait())
        sessions = list(self._sessions)
        for session in sessions:
            session.conn.shutdown()
        await asyncio.gather(
            *(self._close(s, p.CloseCode.GOING_AWAY, "server shutting down") for s in sessions),
            return_exceptions=True,
        )
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 3.0)
            self._server = None
        for task in list(self._background):
            task.cancel()
        self._flush()

    # ------------------------------------------------------------ fan-out

    def dispatch(self, batch: list[Event]) -> None:
        """Sequence, spool and send a batch of hub events. Synchronous: never waits on a client."""
        if only_samples(batch):
            samples: list[Sample] = batch  # type: ignore[assignment]
        else:
            samples = [e for e in batch if isinstance(e, Sample)]
        if not samples and not self._status_wanted:
            return
        first = self.spool.append(samples) if samples else 0
        now = self.wall()
        observe = self.metrics.dispatch_delay.observe
        # Once per second of samples: they go out together, with the same delay. A per-beat
        # RR_INTERVAL sample's ts is its beat's time, within its second.
        for second in {math.floor(ts) for ts in set(map(_TS, samples))}:
            observe(max(now - second - 1.0, 0.0))
        # Consumers without a filter (nearly all) get the samples' frames, device status never.
        plain = ws_text_frames(p.dispatches(first, samples))
        if not self._consumers:
            return
        joined: bytes | None = None
        filtered: tuple[list[bytes], list[tuple[str, str, bool]]] | None = None
        arrays: tuple[list[bytes], list[tuple[str, str, bool]]] | None = None
        delivered = 0
        mono = self.mono()
        for session in self._consumers:
            wanted = session.filter
            if wanted is p.EVERYTHING:
                if plain:
                    if joined is None:
                        joined = b"".join(plain)
                    session.offer(plain, joined, self.metrics, mono)
                    delivered += len(plain)
                continue
            if filtered is None:
                filtered = self._with_statuses(batch, plain)
            if wanted.rr_array:
                if arrays is None:
                    arrays = self._rr_array_frames(batch, first, *filtered)
                mine = _select(*arrays, wanted)
            else:
                mine = _select(*filtered, wanted)
            if mine:
                session.offer(mine, None, self.metrics, mono)
                delivered += len(mine)
        self.metrics.dispatched.inc(delivered)

    def _with_statuses(
        self, batch: list[Event], sample_frames: list[bytes]
    ) -> tuple[list[bytes], list[tuple[str, str, bool]]]:
        """The batch's frames in its order, device status included when some consumer wants it,
        and what each frame is (uid, type, is a status) for the consumers' filters."""
        frames: list[bytes] = []
        keys: list[tuple[str, str, bool]] = []
        taken = iter(sample_frames)
        for event in batch:
            if isinstance(event, Sample):
                frames.append(next(taken))
                keys.append((event.uid, event.t, False))
            elif self._status_wanted:
                frames.append(ws_text_frame(p.dispatch_status(event).encode("utf-8")))
                keys.append((event.uid, p.DEVICE_STATUS_TYPE, True))
        return frames, keys

    def _rr_array_frames(
        self,
        batch: list[Event],
        first: int,
        frames: list[bytes],
        keys: list[tuple[str, str, bool]],
    ) -> tuple[list[bytes], list[tuple[str, str, bool]]]:
        """The batch's frames for consumers of the `rr_array` extension (built once per batch)."""
        rows: list[tuple[int, Sample]] = []
        seq = first
        for event in batch:
            if isinstance(event, Sample):
                rows.append((seq, event))
                seq += 1
        if not any(s.t is DataType.RR_INTERVAL for _, s in rows):
            return frames, keys  # no RR in this batch: the same frames
        merged = p.rr_arrays(rows)
        out = [ws_text_frame(p.dispatch(n, s).encode("utf-8")) for n, s in merged]
        out_keys = [(s.uid, str(s.t), False) for _, s in merged]
        for frame, key in zip(frames, keys, strict=True):
            if key[2]:  # device status frames follow the samples
                out.append(frame)
                out_keys.append(key)
        return out, out_keys

    def _publish_locally(self, event: Event) -> None:
        self.dispatch([event])

    # ------------------------------------------------------------ connections

    async def _handle(self, ws: ServerConnection) -> None:
        conn = p.ServerConnection(
            self.mono(),
            heartbeat_interval_s=self.config.heartbeat_interval_s,
            identify_timeout_s=self.config.identify_timeout_s,
        )
        queue = SendQueue(
            limit=self.config.send_queue, stall_s=self.config.limits.slow_consumer_close_s
        )
        session = _Session(ws, conn, queue)
        self._sessions.add(session)
        session.write_text(conn.hello())
        try:
            async for message in ws:
                for event in conn.receive(message, self.mono()):
                    await self._act(session, event)
                if conn.state is p.ServerState.CLOSED:
                    break
        except ConnectionClosed:
            pass
        finally:
            self._forget(session)
            if ws.close_code is not None and ws.close_code >= 1002 and not session.closing:
                log.debug("client %s closed with %s", session.peer, ws.close_code)

    async def _act(self, session: _Session, event: p.Event) -> None:
        if isinstance(event, p.Send):
            session.write_text(event.text)
        elif isinstance(event, p.Close):
            await self._close(session, event.code, event.reason)
        elif isinstance(event, p.Identified):
            await self._identify(session, event)
        elif isinstance(event, p.Submitted):
            await self._submit(session, event.message)
        elif isinstance(event, p.StatusReported):
            await self._status(session, event)
        elif isinstance(event, p.ReplayRequested):
            await self._queue_replay(session, event)
        elif isinstance(event, p.Dropped):
            self.metrics.status_ignored.labels(event.label).inc()
            log.debug(
                "client %s: dropped a frame (op %d): %s", session.peer, event.op, event.reason
            )

    async def _identify(self, session: _Session, event: p.Identified) -> None:
        consumer = event.role is p.Role.CONSUMER
        now = self.mono()
        if self.brake.locked(session.host, now):
            self.metrics.identify_refused.labels("locked").inc()
            for close in session.conn.reject():
                await self._act(session, close)
            return
        grant = self.tokens.check(event.token, CONSUMER if consumer else PRODUCER)
        if grant is None:
            self.metrics.identify_refused.labels("token").inc()
            if not self._guessed(session.host, now):
                log.debug(
                    "client %s: %s token refused",
                    session.peer,
                    "consumer" if consumer else "producer",
                )
            for close in session.conn.reject():
                await self._act(session, close)
            return
        if consumer and len(self._consumers) >= self.config.max_consumers:
            log.warning(
                "client %s refused: the limit of %d consumers is reached",
                session.peer,
                self.config.max_consumers,
            )
            for close in session.conn.reject(p.CloseCode.CONSUMER_LIMIT, "consumer limit reached"):
                await self._act(session, close)
            return
        session.grant = grant
        session.filter = event.filter
        for reply in session.conn.accept(event.role):
            await self._act(session, reply)
        if consumer:
            self._consumers.append(session)
            self.metrics.consumers.set(len(self._consumers))
            if event.filter.device_status:
                self._status_wanted += 1
            self._rr_arrays_wanted += event.filter.rr_array
        else:
            self._producers += 1
            self.metrics.producers.set(self._producers)
            limits = self.config.limits
            session.limiter = SubmitLimiter(
                per_second=limits.submit_per_s,
                future_s=limits.submit_future_s,
                abuse_drops=limits.submit_abuse_drops,
                abuse_window_s=limits.submit_abuse_window_s,
            )
        log.info(
            "%s %s connected with %s",
            "consumer" if consumer else "producer",
            session.peer,
            grant.label,
        )

    def _guessed(self, host: str, now: float) -> bool:
        """A wrong credential from `host` (IDENTIFY, /auth or /api); True if that locked it."""
        locked = self.brake.refused(host, now)
        if locked is None:
            return False
        # Once per episode: the address's further attempts are refused unchecked.
        log.warning(
            "%s: %d credentials refused within %g s; refusing its IDENTIFYs, /auth and /api "
            "requests unchecked for %g s (gatewayd_broker_identify_refused and "
            "gatewayd_broker_http_refused count them)",
            locked.address,
            locked.refusals,
            self.config.limits.guess_window_s,
            locked.lock_s,
        )
        return True

    def _may_send_body(self, authorization: str, host: str) -> int:
        """The admin API's body gate: 0 for an admin token from an address that is not locked,
        else the status to refuse with (429 keeps a locked-out tablet from signing itself out)."""
        assert self.admin is not None
        now = self.mono()
        if self.brake.locked(host, now):
            self.metrics.http_refused.labels("locked").inc()
            return 429
        if self.admin.authorized(authorization):
            return 0
        if bearer(authorization):
            self.metrics.http_refused.labels("credentials").inc()
            self._guessed(host, now)
        return 401

    def _submitter_uid(self, session: _Session, uid: str | None) -> str:
        grant = session.grant
        assert grant is not None
        if uid is None:
            if len(grant.athletes) != 1:
                raise p.ProtocolError(
                    p.CloseCode.MALFORMED,
                    "SUBMIT needs `uid`: this token is not for exactly one athlete",
                )
            return next(iter(grant.athletes))
        if not grant.may_submit_for(uid):
            raise p.ProtocolError(p.CloseCode.MALFORMED, f"this token may not submit for {uid!r}")
        return uid

    async def _submit(self, session: _Session, message: p.Message) -> None:
        try:
            uid = self._submitter_uid(session, message.uid)
            sample = p.sample_from_frame(message, uid, self.wall())
        except p.Unusable as exc:
            self.metrics.submit_ignored.labels(exc.label).inc()
            assert session.limiter is not None
            if session.limiter.unusable(self.mono()) is Verdict.ABUSE:
                await self._over_budget(session, Verdict.ABUSE)
            return
        except p.ProtocolError as exc:
            session.conn.reject(exc.code, exc.reason)
            await self._close(session, exc.code, exc.reason)
            return
        key = (sample.uid, str(sample.t))
        last = self._last_submitted.get(key)
        if last is None:
            last = self.spool.last_ts(*key)
        if last is not None and sample.ts <= last:
            # At-least-once forwarders re-send after a reconnect; (uid, t, ts) identifies a sample.
            self.metrics.submit_ignored.labels("duplicate").inc()
            return
        assert session.limiter is not None
        verdict = session.limiter.admit(key, sample.ts, wall=self.wall(), mono=self.mono())
        if verdict is not Verdict.ACCEPT:
            await self._over_budget(session, verdict)
            return
        self._last_submitted[key] = sample.ts
        self.metrics.submitted.inc()
        self.publish(sample._replace(source=sample.source or "submit"))

    async def _over_budget(self, session: _Session, verdict: Verdict) -> None:
        limits = self.config.limits
        if verdict is Verdict.ABUSE:
            reason = f"{limits.submit_abuse_drops} SUBMITs over the limit within "
            reason += f"{limits.submit_abuse_window_s:g} s"
            session.conn.reject(p.CloseCode.POLICY, reason)
            await self._close(session, p.CloseCode.POLICY, reason)
            return
        self.metrics.submit_ignored.labels(verdict.value).inc()
        if not session.limited:
            session.limited = True  # once per connection; the metric counts every one
            log.warning(
                "producer %s: dropping SUBMITs over %d per athlete and type per second, or "
                "stamped over %g s ahead (gatewayd_broker_submit_ignored counts them)",
                session.peer,
                limits.submit_per_s,
                limits.submit_future_s,
            )

    async def _status(self, session: _Session, event: p.StatusReported) -> None:
        grant = session.grant
        assert grant is not None
        uid = event.uid
        if uid is None:
            uid = next(iter(grant.athletes)) if len(grant.athletes) == 1 else grant.label
        elif not grant.may_submit_for(uid):
            # STATUS never closes a socket (AsyncAPI receiveStatus): drop it, and count.
            self.metrics.status_ignored.labels("not_allowed").inc()
            return
        self.publish(
            DeviceStatus(
                uid=uid,
                # device_id is optional in Terra's STATUS; the producer's link is then the device.
                device_id=event.device_id or "producer",
                source=event.source or "submit",
                state=DeviceState.CONNECTED if event.connected else DeviceState.LOST,
                wall=self.wall(),
                reason=event.reason,
                battery=event.battery,
                rssi=event.rssi,
            )
        )

    async def _queue_replay(self, session: _Session, event: p.ReplayRequested) -> None:
        if session.replays is None:
            session.replays = asyncio.Queue()
            session.replayer = self._spawn(self._replayer(session))
        limit = self.config.limits.replay_waiting
        if not replay_admissible(session.replaying, session.replays.qsize(), limit):
            reason = f"more than {limit} REPLAYs waiting behind the running one"
            session.conn.reject(p.CloseCode.POLICY, reason)
            await self._close(session, p.CloseCode.POLICY, reason)
            return
        session.replays.put_nowait(event)

    async def _replayer(self, session: _Session) -> None:
        assert session.replays is not None
        try:
            while True:
                request = await session.replays.get()
                session.replaying = True
                await self._replay(session, request.after, request.before)
                session.replaying = False
        except (ConnectionError, ConnectionClosed):
            pass

    async def _replay(self, session: _Session, after: int, before: int) -> None:
        oldest_ts = self.wall() - self.retention_s
        assert session.grant is not None
        if session.grant.replay_window_s is not None:  # the board's token: its last minutes
            oldest_ts = max(oldest_ts, self.wall() - session.grant.replay_window_s)
        cursor = after
        pacer = self.pacer
        while session.open:
            # All REPLAYs share one time budget, so live DISPATCH keeps the rest of the loop.
            wait = pacer.delay(self.mono())
            if wait > 0:
                await asyncio.sleep(wait)  # a wake-up on the loop's timer; then look again
                continue
            started = self.mono()
            rows = self.spool.read(cursor, before, REPLAY_CHUNK)
            if not rows:
                return
            cursor = rows[-1][0]
            wanted = [
                (seq, s)
                for seq, s in rows
                if s.ts >= oldest_ts and session.filter.wants(s.uid, s.t)
            ]
            if session.filter.rr_array:
                wanted = p.rr_arrays(wanted)
            frames = [ws_text_frame(p.dispatch(seq, s).encode("utf-8")) for seq, s in wanted]
            pacer.spent(started, self.mono())
            if frames:
                self.metrics.replayed.inc(len(frames))
                await session.send_reliably(frames)
            if len(rows) < REPLAY_CHUNK:
                return

    async def _close(self, session: _Session, code: int, reason: str) -> None:
        if session.closing:
            return
        self._forget(session)
        session.closing = True
        self.metrics.closed.labels(str(code)).inc()
        # Before IDENTIFY succeeds a client costs at most a counter (`closed` by code) and a
        # debug line, so a stream of junk connections cannot fill the log.
        level = logging.INFO if session.grant is not None else logging.DEBUG
        if code not in (p.CloseCode.NORMAL, p.CloseCode.GOING_AWAY):
            log.log(level, "closing %s with %d: %s", session.peer, code, reason)
        try:
            # A client that reads nothing never takes the close frame, and websockets waits for
            # the socket to drain before its own close timeout starts: bound the whole handshake,
            # or the socket and its buffers would stay open for good.
            await asyncio.wait_for(session.ws.close(code, reason[:120]), CLOSE_BUDGET_S)
        except ConnectionClosed:
            pass
        except TimeoutError:
            session.ws.transport.abort()
            log.log(
                level,
                "%s took no close frame in %g s: connection cut",
                session.peer,
                CLOSE_BUDGET_S,
            )

    def _forget(self, session: _Session) -> None:
        if session not in self._sessions:
            return
        self._sessions.discard(session)
        if session in self._consumers:
            self._consumers.remove(session)
            self.metrics.consumers.set(len(self._consumers))
            if session.filter.device_status:
                self._status_wanted -= 1
            self._rr_arrays_wanted -= session.filter.rr_array
        elif session.grant is not None:
            self._producers -= 1
            self.metrics.producers.set(self._producers)
        if session.replayer is not None:
            session.replayer.cancel()
        session.pending.clear()

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # ------------------------------------------------------------ timers

    async def _timer_loop(self) -> None:
        while True:
            await asyncio.sleep(self.timer_interval_s)
            self.check_timers()

    def check_timers(self) -> None:
        """Identify and heartbeat deadlines, and the once-a-second spool commit."""
        now = self.mono()
        for session in list(self._sessions):
            for event in session.conn.tick(now):
                if isinstance(event, p.Close):
                    self._spawn(self._close(session, event.code, event.reason))
            if session.pending.stalled(now) and not session.closing:
                reason = (
                    f"too slow: DISPATCHes dropped for {session.pending.stall_s:g} s "
                    "without catching up; reconnect and REPLAY the gap"
                )
                session.conn.reject(p.CloseCode.TRY_AGAIN_LATER, reason)
                self._spawn(self._close(session, p.CloseCode.TRY_AGAIN_LATER, reason))
        if now - self._last_flush >= FLUSH_EVERY_S:
            self._last_flush = now
            self._flush()

    def _flush(self) -> None:
        try:
            self.spool.flush()
        except SpoolError:
            self.metrics.spool_write_errors.inc()

    # ------------------------------------------------------------ HTTP

    def health_snapshot(self) -> dict[str, Any]:
        snapshot: dict[str, Any] = dict(self.health()) if self.health is not None else {}
        snapshot.setdefault("version", __version__)
        snapshot.setdefault("upstream", None)
        snapshot["consumers"] = len(self._consumers)
        snapshot["producers"] = self._producers
        snapshot["send_queue_bytes"] = sum(c.held_bytes for c in self._consumers)
        snapshot["spool_depth"] = self.spool.depth()
        snapshot["last_seq"] = self.spool.last_seq
        return snapshot

    def _mint(self, role: str, athlete: str | None) -> str:
        """A single-use token for the HTTP token endpoints; only its hash is stored."""
        token = self.tokens.create(
            role,
            athletes=() if athlete is None else (athlete,),
            single_use=True,
            ttl_s=self.config.minted_token_ttl_s,
            forget_dead=True,
        )
        log.info(
            "minted a single-use %s token over HTTP%s", role, f" for {athlete}" if athlete else ""
        )
        return token

    def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == "/connect":
            return None
        if path == "/healthz":
            try:
                body = json.dumps(self.health_snapshot(), default=str)
            except Exception:
                log.exception("/healthz failed")
                return _response(
                    connection, 500, '{"error": "health check failed"}', "application/json"
                )
            return _response(connection, 200, body, "application/json")
        if path == "/metrics":
            return _response(connection, 200, self.metrics.render().decode("utf-8"), CONTENT_TYPE)
        host = _peer(connection).rpartition(":")[0]
        now = self.mono()
        guarded = path in AUTH_PATHS or (self.admin is not None and path.startswith("/api/"))
        if guarded and self.brake.locked(host, now):
            # Refused unchecked, like a locked address's IDENTIFY; 429 tells staff to wait.
            self.metrics.http_refused.labels("locked").inc()
            wait = math.ceil(self.brake.retry_after(host, now))
            response = _response(
                connection,
                429,
                '{"error": "too many refused credentials from this address: try again later"}',
                "application/json",
            )
            response.headers["Retry-After"] = str(wait)
            return response
        page = self.auth.respond(request.method, request.path, request.headers)
        if page is None and self.board is not None:
            page = self.board(request.path)
        if page is None and self.admin is not None and self.admin.handles(path):
            page = self.admin.respond(
                AdminRequest(
                    request.method,
                    path,
                    request.headers.get("Authorization", ""),
                    getattr(connection, "request_body", b""),
                )
            )
        if page is not None and page.refused:
            self.metrics.http_refused.labels("credentials").inc()
            self._guessed(host, now)
        if page is not None:
            response = _response(connection, page.status, page.text, page.content_type)
            for name, value in page.headers:
                response.headers[name] = value
            return response
        return _response(connection, 404, "not found: try /connect, /healthz or /metrics\n", None)


def tls_context(config: LocalBrokerConfig) -> ssl.SSLContext | None:
    """The server's TLS context from `tls.cert_file`/`key_file`, or None for plain ws/http.

    Raises ConfigError naming the key when a file cannot be read or does not hold a matching
    certificate and key, so `run` and `check-config` refuse the same configs.
    """
    tls = config.tls
    if tls.cert_file is None or tls.key_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    except FileNotFoundError as exc:
        key = "cert_file" if exc.filename == str(tls.cert_file) else "key_file"
        raise ConfigError(
            f"outputs.local_broker.tls.{key}", f"{exc.filename} does not exist"
        ) from None
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            "outputs.local_broker.tls.cert_file",
            f"cannot load {tls.cert_file} with {tls.key_file}: {exc} "
            "(both PEM, the key matching the certificate, readable by gatewayd)",
        ) from None
    return context


def _select(
    frames: list[bytes], keys: list[tuple[str, str, bool]], wanted: p.Filter
) -> list[bytes]:
    athletes = wanted.athletes
    out: list[bytes] = []
    for frame, (uid, t, is_status) in zip(frames, keys, strict=True):
        if is_status:
            if wanted.device_status and (athletes is None or uid in athletes):
                out.append(frame)
        elif wanted.wants(uid, t):
            out.append(frame)
    return out


def _response(
    connection: ServerConnection, status: int, body: str, content_type: str | None
) -> Response:
    response = connection.respond(status, body)
    if content_type is not None:
        headers: Headers = response.headers
        del headers["Content-Type"]
        headers["Content-Type"] = content_type
    headers = response.headers
    headers["Cache-Control"] = "no-store"
    return response
