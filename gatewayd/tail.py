"""`gatewayd tail`: a consumer of a broker (the hub's own, or Terra's) that prints live samples.

It reconnects with backoff (1 s to 30 s, jittered) and, after a reconnect, asks the broker to
REPLAY what it missed between the last seq it printed and the first live seq of the new session.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from gatewayd import protocol as p

log = logging.getLogger(__name__)
# websockets logs every frame at DEBUG, IDENTIFY (and so the token) included: keep it quiet.
_WS_LOG = logging.getLogger(f"{__name__}.websockets")
_WS_LOG.setLevel(logging.WARNING)

# Close codes after which retrying with the same token cannot help.
FATAL = {
    p.CloseCode.MALFORMED: "the broker refused a frame as malformed",
    p.CloseCode.INVALID_UTF8: "the broker refused a frame as invalid UTF-8",
    p.CloseCode.POLICY: "the broker closed this client for flooding it (REPLAYs or SUBMITs)",
    p.CloseCode.NO_IDENTIFY: "IDENTIFY was not sent in time",
    p.CloseCode.BAD_TOKEN: "token refused (invalid, expired or already used): get a new one",
    p.CloseCode.SECOND_IDENTIFY: "IDENTIFY was sent twice",
    p.CloseCode.BAD_OPCODE: "the broker refused an opcode",
}


@dataclass
class TailState:
    """What survives reconnects: the highest seq printed and the gaps being replayed."""

    last_seq: int | None = None
    replaying: list[list[int]] = field(default_factory=list)  # [after (moves), before]
    printed: int = 0

    def accept(self, seq: int) -> bool:
        """Print this DISPATCH? Live ones beyond the last, and replayed ones inside a gap, once."""
        for gap in self.replaying:
            if gap[0] < seq < gap[1]:
                gap[0] = seq
                if seq + 1 >= gap[1]:
                    self.replaying.remove(gap)
                return True
        if self.last_seq is None or seq > self.last_seq:
            self.last_seq = seq
            return True
        return False


def format_line(message: p.Message, *, as_json: bool) -> str:
    d = message.d if isinstance(message.d, dict) else {}
    if as_json:
        record: dict[str, Any] = {"seq": message.seq, "uid": message.uid, "t": message.t}
        record.update(d)
        return json.dumps(record, separators=(",", ":"))
    ts = str(d.get("ts", ""))
    clock = ts[11:23] if len(ts) >= 23 else ts
    if message.t == p.DEVICE_STATUS_TYPE:
        value = f"{d.get('state')} {d.get('device_id')} {d.get('reason') or ''}".rstrip()
    elif "d" in d:
        value = " ".join(_num(x) for x in d["d"]) if isinstance(d["d"], list) else str(d["d"])
    else:
        value = _num(d.get("val"))
    seq = "" if message.seq is None else str(message.seq)
    return f"{clock:<12} {seq:>8}  {message.uid or '':<20} {message.t or '':<14} {value}"


def header() -> str:
    return f"{'time (UTC)':<12} {'seq':>8}  {'athlete':<20} {'type':<14} value"


def _num(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


class Tail:
    def __init__(
        self,
        url: str,
        token: str,
        *,
        filter_: p.Filter | None = None,
        as_json: bool = False,
        out: TextIO | None = None,
        rng: random.Random | None = None,
        mono: Callable[[], float] | None = None,
        max_attempts: int | None = None,
        backoff_base_s: float = 1.0,
    ) -> None:
        self.url = url
        self.token = token
        self.filter = filter_
        self.as_json = as_json
        self.out = out or sys.stdout
        self.rng = rng or random.Random()
        self._mono = mono
        self.max_attempts = max_attempts
        self.backoff_base_s = backoff_base_s
        self.state = TailState()
        self.sessions = 0
        self.reconnected = asyncio.Event()  # set each time a session is READY (tests, callers)

    def mono(self) -> float:
        return self._mono() if self._mono is not None else asyncio.get_running_loop().time()

    async def run(self) -> int:
        """Print until cancelled; return an exit status when the broker refuses us for good."""
        if not self.as_json:
            self._print(header())
        failures = 0
        while True:
            code, reason, was_ready = await self._session()
            if code in FATAL:
                log.error("tail: closed with %d: %s (%s)", code, FATAL[p.CloseCode(code)], reason)
                return 1
            failures = 0 if was_ready else failures + 1
            if self.max_attempts is not None and failures >= self.max_attempts:
                log.error("tail: giving up after %d failed attempts", failures)
                return 1
            delay = p.backoff_delay(failures, self.rng.random(), base=self.backoff_base_s)
            if code == p.CloseCode.CONSUMER_LIMIT:
                delay = max(delay, 15.0)
            log.warning("tail: disconnected (%s %s); reconnecting in %.1f s", code, reason, delay)
            await asyncio.sleep(delay)

    async def _session(self) -> tuple[int, str, bool]:
        conn = p.ClientConnection(
            self.token, p.Role.CONSUMER, filter_=self.filter, jitter=self.rng.random()
        )
        conn.start(self.mono())
        first_live: int | None = None
        try:
            async with connect(
                self.url, max_size=p.MAX_FRAME_BYTES, ping_interval=None, logger=_WS_LOG
            ) as ws:
                while True:
                    deadline = conn.next_deadline()
                    timeout = None if deadline is None else max(deadline - self.mono(), 0.0)
                    try:
                        text = await asyncio.wait_for(ws.recv(), timeout)
                        events = conn.receive(text, self.mono())
                    except TimeoutError:
                        events = conn.tick(self.mono())
                    for event in events:
                        if isinstance(event, p.Send):
                            await ws.send(event.text)
                        elif isinstance(event, p.Ready):
                            self.sessions += 1
                            self.reconnected.set()
                        elif isinstance(event, p.Dispatched):
                            first_live = await self._dispatched(ws, event.message, first_live)
                        elif isinstance(event, p.Close):
                            await ws.close(event.code, event.reason)
                            return event.code, event.reason, conn.state is p.ClientState.READY
        except ConnectionClosed as exc:
            rcvd = exc.rcvd
            code = rcvd.code if rcvd is not None else 1006
            return (
                code,
                rcvd.reason if rcvd is not None else "connection lost",
                first_live is not None,
            )
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            return 1006, str(exc) or type(exc).__name__, False
        except InvalidURI as exc:
            log.error("tail: %s", exc)
            return p.CloseCode.MALFORMED, "bad URL", False

    async def _dispatched(
        self, ws: ClientConnection, message: p.Message, first_live: int | None
    ) -> int | None:
        seq = message.seq
        if seq is None:  # DEVICE_STATUS (extension): live only
            self._print(format_line(message, as_json=self.as_json))
            return first_live
        if first_live is None:
            first_live = seq
            last = self.state.last_seq
            if last is not None and seq > last + 1:
                log.info("tail: replaying seqs %d..%d missed while disconnected", last + 1, seq - 1)
                self.state.replaying.append([last, seq])
                await ws.send(p.replay(last, seq))
        if self.state.accept(seq):
            self.state.printed += 1
            self._print(format_line(message, as_json=self.as_json))
        return first_live

    def _print(self, line: str) -> None:
        try:
            self.out.write(line + "\n")
            self.out.flush()
        except BrokenPipeError:
            raise SystemExit(0) from None


def parse_filter(
    athletes: list[str] | None, types: list[str] | None, status: bool
) -> p.Filter | None:
    """The IDENTIFY extension from CLI flags (comma-separated lists allowed)."""

    def split(values: list[str] | None) -> frozenset[str] | None:
        if not values:
            return None
        return frozenset(v.strip() for value in values for v in value.split(",") if v.strip())

    wanted = p.Filter(split(athletes), split(types), status)
    return None if wanted == p.EVERYTHING else wanted
