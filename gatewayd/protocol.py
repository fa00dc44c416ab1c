"""PURE. Terra's streaming protocol (PROTOCOL.md): frames, and both ends' connection state machines.

Sans-I/O: nothing here reads a socket or a clock. Callers feed received text and the current
monotonic time in, and get back what to send, when to close, and what happened. The same core
serves the hub's broker (ServerConnection) and any client of a broker (ClientConnection: the
upstream forwarder as a producer, `gatewayd tail` as a consumer).

gatewayd extensions (a Terra client never sends or sees them):

- IDENTIFY `d.gatewayd = {"athletes": [...], "types": [...], "device_status": true}` narrows a
  consumer's stream to some athletes and/or data types, and opts in to device status events.
- A consumer that opted in receives device status as DISPATCH with `t = "DEVICE_STATUS"` and
  `d = {"ts", "device_id", "source", "state": "connected"|"lost", "reason", "battery", "rssi"}`.
  These carry no `seq`: they are live-only and never replayed, so sample seqs stay dense.
- IDENTIFY `d.gatewayd.rr_array = true`: RR_INTERVAL as one DISPATCH per athlete and second with
  `d = {"ts": <start of the second>, "d": [ms, ...]}` (seq of its last beat) instead of Terra's one
  DISPATCH per beat with `val` (rr_arrays()).
- SUBMIT and STATUS may carry `uid` (hub-to-hub mode).
"""

from __future__ import annotations

import enum
import json
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gatewayd.errors import GatewayError
from gatewayd.model import (
    FLOAT_TEXT,
    STRING_JSON,
    TYPE_JSON,
    DataType,
    DeviceState,
    DeviceStatus,
    Sample,
    format_ts,
    json_string,
    parse_ts,
    plain_value,
)

HEARTBEAT_INTERVAL_MS = 40_000
IDENTIFY_TIMEOUT_S = 15.0
MAX_FRAME_BYTES = 64 * 1024
# A client heartbeats once per interval; the server allows this much of an interval on top
# before it gives up (network jitter, a busy phone).
HEARTBEAT_GRACE = 0.25
DEVICE_STATUS_TYPE = "DEVICE_STATUS"
EXTENSION_KEY = "gatewayd"


class Op(enum.IntEnum):
    HEARTBEAT = 0
    HEARTBEAT_ACK = 1
    HELLO = 2
    IDENTIFY = 3
    READY = 4
    DISPATCH = 5
    SUBMIT = 6
    REPLAY = 7
    STATUS = 8


class Role(enum.IntEnum):
    PRODUCER = 0
    CONSUMER = 1


class CloseCode(enum.IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001
    MALFORMED = 1003  # also invalid JSON (Terra's AsyncAPI), however deep or odd
    INVALID_UTF8 = 1007  # the WebSocket rule for a text frame that is not UTF-8
    POLICY = 1008  # sustained flooding (SUBMIT over its rate, REPLAYs past the queue)
    TOO_BIG = 1009
    INTERNAL = 1011
    TRY_AGAIN_LATER = 1013  # a consumer stuck behind its full send queue (RFC 6455 registry)
    NO_IDENTIFY = 4000
    BAD_TOKEN = 4001
    CONSUMER_LIMIT = 4002
    SECOND_IDENTIFY = 4003
    BAD_OPCODE = 4004
    HEARTBEAT_MISSED = 4005


# What a client should do after each close code (PROTOCOL.md, Close codes).
RETRY = frozenset(
    {
        CloseCode.GOING_AWAY,
        CloseCode.INTERNAL,
        CloseCode.TRY_AGAIN_LATER,
        CloseCode.HEARTBEAT_MISSED,
        1006,
    }
)
BACK_OFF = frozenset({CloseCode.CONSUMER_LIMIT})
NEW_TOKEN = frozenset({CloseCode.BAD_TOKEN})


class ProtocolError(GatewayError):
    """A frame the peer must not send; `code` is the close code that answers it."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


# ---------------------------------------------------------------- frames


@dataclass(frozen=True, slots=True)
class Message:
    """One parsed frame; `d` is validated per op by the state machines."""

    op: int
    d: Any = None
    uid: str | None = None
    seq: int | None = None
    t: str | None = None


def parse(text: str | bytes) -> Message:
    """Parse one received frame; raise ProtocolError(1003, 1007, 1009 or 4004) for a bad one.

    Nothing else escapes: any nesting depth, number or string a peer can write ends here as a
    ProtocolError. Numbers are bounded to what fits in 64 bits (`NaN`, `Infinity` and integers of
    more than MAX_INT_DIGITS digits are invalid JSON), and no string may hold a lone surrogate
    (it could never be written back out as UTF-8).
    """
    if isinstance(text, bytes | bytearray | memoryview):
        raise ProtocolError(CloseCode.MALFORMED, "binary frames are not part of the protocol")
    if len(text) > MAX_FRAME_BYTES:
        raise ProtocolError(CloseCode.TOO_BIG, f"frame over {MAX_FRAME_BYTES} bytes")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ProtocolError(CloseCode.INVALID_UTF8, "frame is not valid UTF-8") from None
    try:
        obj = _DECODER.decode(text)
        if "\\u" in text:
            # Only \uXXXX escapes can produce a lone surrogate: check just those frames.
            _ENCODER.encode(obj).encode("utf-8")
    except RecursionError:
        raise ProtocolError(CloseCode.MALFORMED, "frame is nested too deep") from None
    except UnicodeEncodeError:
        raise ProtocolError(CloseCode.MALFORMED, "frame holds a lone UTF-16 surrogate") from None
    except ValueError:
        raise ProtocolError(CloseCode.MALFORMED, "frame is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError(CloseCode.MALFORMED, "frame must be a JSON object")
    op = obj.get("op")
    if not _is_int(op):
        raise ProtocolError(CloseCode.MALFORMED, "frame needs an integer `op`")
    if op not in _OPS:
        raise ProtocolError(CloseCode.BAD_OPCODE, f"unknown opcode {op}")
    uid = obj.get("uid")
    if uid is not None and not isinstance(uid, str):
        raise ProtocolError(CloseCode.MALFORMED, "`uid` must be a string")
    seq = obj.get("seq")
    if seq is not None and not _is_int(seq):
        raise ProtocolError(CloseCode.MALFORMED, "`seq` must be an integer")
    t = obj.get("t")
    if t is not None and not isinstance(t, str):
        raise ProtocolError(CloseCode.MALFORMED, "`t` must be a string")
    return Message(op, obj.get("d"), uid, seq, t)


# An int64 has at most 19 digits; a sign makes 20 characters.
MAX_INT_DIGITS = 19
INT64_MAX = (1 << 63) - 1


def _bounded_int(text: str) -> int:
    if len(text) > MAX_INT_DIGITS + 1:
        raise ValueError("integer out of range")
    value = int(text)
    if not -INT64_MAX <= value <= INT64_MAX:
        raise ValueError("integer out of range")
    return value


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_int=_bounded_int, parse_constant=_no_constant)
_ENCODER = json.JSONEncoder(ensure_ascii=False, check_circular=False)


_OPS = frozenset(int(op) for op in Op)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -INT64_MAX <= value <= INT64_MAX
    return isinstance(value, float) and math.isfinite(value)


def _dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def heartbeat() -> str:
    return '{"op":0}'


def heartbeat_ack() -> str:
    return '{"op":1}'


def hello(interval_ms: int = HEARTBEAT_INTERVAL_MS) -> str:
    return _dumps({"op": Op.HELLO, "d": {"heartbeat_interval": interval_ms}})


def ready() -> str:
    return '{"op":4}'


@dataclass(frozen=True, slots=True)
class Filter:
    """A consumer's gatewayd extension: which athletes and types it wants, and device status."""

    athletes: frozenset[str] | None = None
    types: frozenset[str] | None = None
    device_status: bool = False
    rr_array: bool = False  # RR_INTERVAL as per-second arrays (rr_arrays) instead of per beat

    def wants(self, uid: str, t: str) -> bool:
        return (self.athletes is None or uid in self.athletes) and (
            self.types is None or t in self.types
        )

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {}
        if self.athletes is not None:
            out["athletes"] = sorted(self.athletes)
        if self.types is not None:
            out["types"] = sorted(self.types)
        if self.device_status:
            out["device_status"] = True
        if self.rr_array:
            out["rr_array"] = True
        return out


EVERYTHING = Filter()


def identify(token: str, role: Role, filter_: Filter | None = None) -> str:
    d: dict[str, object] = {"token": token, "type": int(role)}
    if filter_ is not None and filter_ != EVERYTHING:
        d[EXTENSION_KEY] = filter_.to_json()
    return _dumps({"op": Op.IDENTIFY, "d": d})


def dispatch(seq: int, sample: Sample) -> str:
    """`{"op":5,"d":..,"uid":..,"seq":..,"t":..}`: what _dumps would write, built by hand, as it
    runs for every sample and consumer."""
    return (
        '{"op":5,"d":'
        + sample.payload_json()
        + ',"uid":'
        + json_string(sample.uid)
        + ',"seq":'
        + str(seq)
        + ',"t":'
        + json_string(sample.t)
        + "}"
    )


def dispatches(first_seq: int, samples: Sequence[Sample]) -> list[str]:
    """dispatch() of each sample, numbered from `first_seq`: the broker's batch of a second.

    A sample with a plain number (nearly all) is one f-string of cached parts: its second's
    timestamp text formatted once for the run of samples that share it, its value's and uid's
    texts from the caches every output shares; any other goes through dispatch()."""
    out: list[str] = []
    append = out.append
    types, strings, texts = TYPE_JSON, STRING_JSON, FLOAT_TEXT
    seq = first_seq - 1
    last_ts: float | None = None
    ts_text = ""
    for sample in samples:
        seq += 1
        uid, t, ts, val, d, _, _ = sample
        # A float's lookup finds only finite values; an int must not meet a float's text.
        value = texts.get(val) if type(val) is float and d is None else None
        if value is None:
            value = plain_value(val, d)
            if value is None:
                append(dispatch(seq, sample))
                continue
        if ts != last_ts:
            last_ts, ts_text = ts, format_ts(ts)
        uid_json = strings.get(uid) or json_string(uid)
        t_json = types.get(t) or json_string(t)
        append(
            f'{{"op":5,"d":{{"ts":"{ts_text}","val":{value}}},"uid":{uid_json},"seq":{seq},'
            f'"t":{t_json}}}'
        )
    return out


def rr_arrays(rows: Sequence[tuple[int, Sample]]) -> list[tuple[int, Sample]]:
    """The `rr_array` extension: the per-beat RR_INTERVAL rows of one athlete and second become
    one row `d = [ms, ...]` stamped with the start of that second, placed at (and carrying the seq
    of) its last beat, so seqs still only grow. Other rows pass through. Beats of one second that
    arrive in two calls (two batches, two REPLAY chunks) give two arrays for that second."""
    last: dict[tuple[str, int], int] = {}
    for i, (_, sample) in enumerate(rows):
        if sample.t is DataType.RR_INTERVAL and sample.val is not None:
            last[(sample.uid, math.floor(sample.ts))] = i
    if not last:
        return list(rows)
    beats: dict[tuple[str, int], list[float]] = {}
    out: list[tuple[int, Sample]] = []
    for i, (seq, sample) in enumerate(rows):
        if sample.t is not DataType.RR_INTERVAL or sample.val is None:
            out.append((seq, sample))
            continue
        key = (sample.uid, math.floor(sample.ts))
        beats.setdefault(key, []).append(sample.val)
        if last[key] == i:
            whole = tuple(beats.pop(key))
            out.append((seq, sample._replace(ts=float(key[1]), val=None, d=whole)))
    return out


def dispatch_status(status: DeviceStatus) -> str:
    return _dumps(
        {"op": Op.DISPATCH, "d": status_payload(status), "uid": status.uid, "t": DEVICE_STATUS_TYPE}
    )


def status_payload(status: DeviceStatus) -> dict[str, object]:
    return {
        "ts": format_ts(status.wall),
        "device_id": status.device_id,
        "source": status.source,
        "state": str(status.state),
        "reason": status.reason,
        "battery": status.battery,
        "rssi": status.rssi,
    }


def submit(sample: Sample, *, with_uid: bool = False) -> str:
    """`{"op":6,"d":..,"t":..[,"uid":..]}`, built by hand like dispatch()."""
    text = '{"op":6,"d":' + sample.payload_json() + ',"t":' + json_string(sample.t)
    if with_uid:
        return text + ',"uid":' + json_string(sample.uid) + "}"
    return text + "}"


def submits(rows: Sequence[tuple[int, Sample]], *, with_uid: bool = False) -> list[str]:
    """submit() of each (seq, sample) row, in order, the common sample built like dispatches()
    builds it: the upstream sends every sample."""
    out: list[str] = []
    append = out.append
    types, strings, texts = TYPE_JSON, STRING_JSON, FLOAT_TEXT
    last_ts: float | None = None
    ts_text = ""
    for _, sample in rows:
        uid, t, ts, val, d, _, _ = sample
        value = texts.get(val) if type(val) is float and d is None else None
        if value is None:
            value = plain_value(val, d)
            if value is None:
                append(submit(sample, with_uid=with_uid))
                continue
        if ts != last_ts:
            last_ts, ts_text = ts, format_ts(ts)
        t_json = types.get(t) or json_string(t)
        if with_uid:
            uid_json = strings.get(uid) or json_string(uid)
            append(
                f'{{"op":6,"d":{{"ts":"{ts_text}","val":{value}}},"t":{t_json},"uid":{uid_json}}}'
            )
        else:
            append(f'{{"op":6,"d":{{"ts":"{ts_text}","val":{value}}},"t":{t_json}}}')
    return out


def status(event: DeviceStatus, *, with_uid: bool = False) -> str:
    d: dict[str, object] = {
        "connected": event.state is DeviceState.CONNECTED,
        "device_id": event.device_id,
        "source": event.source,
        "reason": event.reason,
    }
    if event.battery is not None:
        d["battery"] = event.battery
    if event.rssi is not None:
        d["rssi"] = event.rssi
    frame: dict[str, object] = {"op": Op.STATUS, "d": d}
    if with_uid:
        frame["uid"] = event.uid
    return _dumps(frame)


def replay(after: int, before: int) -> str:
    return _dumps({"op": Op.REPLAY, "d": {"after": after, "before": before}})


def sample_from_frame(message: Message, uid: str, now: float | None = None) -> Sample:
    """The Sample a SUBMIT (or DISPATCH) carries.

    To Terra the payload is opaque (AsyncAPI, components.schemas.RealtimePayload): a SUBMIT whose
    `d` gatewayd cannot turn into a Sample is not a malformed frame, so this raises Unusable (the
    broker counts and drops it) rather than a closing ProtocolError. `t` may be spelled in any case
    (`heart_rate`); a payload without `ts` is stamped `now` (the arrival time) when one is given.
    """
    d = message.d
    if not isinstance(d, dict):
        raise Unusable("bad_payload", "`d` must be an object with `ts` and `val` or `d`")
    if message.t is None:
        raise Unusable("bad_payload", "missing `t` (the data type)")
    try:
        t = DataType(message.t.upper())
    except ValueError:
        raise UnknownType(message.t) from None
    ts_text = d.get("ts")
    if ts_text is None and now is not None:
        ts = now
    elif not isinstance(ts_text, str):
        raise Unusable("bad_payload", "`d.ts` must be an RFC 3339 timestamp string")
    else:
        try:
            ts = parse_ts(ts_text)
        except ValueError:
            raise Unusable("bad_payload", f"`d.ts` {ts_text[:40]!r} is not RFC 3339") from None
    val = d.get("val")
    arr = d.get("d")
    if (val is None) == (arr is None):
        raise Unusable("bad_payload", "`d` needs exactly one of `val` and `d`")
    if val is not None:
        if not _is_number(val):
            raise Unusable("bad_payload", "`d.val` must be a finite number")
        return Sample(uid, t, ts, val=val)
    if not isinstance(arr, list) or not all(_is_number(x) for x in arr):
        raise Unusable("bad_payload", "`d.d` must be an array of finite numbers")
    return Sample(uid, t, ts, d=tuple(arr))


class Unusable(ProtocolError):
    """A well-formed frame whose content gatewayd cannot use: counted (by `label`) and dropped,
    never closed on."""

    def __init__(self, label: str, reason: str) -> None:
        super().__init__(CloseCode.MALFORMED, reason)
        self.label = label


class UnknownType(Unusable):
    def __init__(self, t: str) -> None:
        super().__init__("unknown_type", f"data type {t[:40]!r} is not one gatewayd carries")
        self.t = t


# ---------------------------------------------------------------- events

# Every state machine call returns a list of these; the I/O layer acts on them in order.


@dataclass(frozen=True, slots=True)
class Send:
    text: str


@dataclass(frozen=True, slots=True)
class Close:
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class Identified:
    """Server: the client sent IDENTIFY; the I/O layer checks the token, then accept()/reject()."""

    token: str
    role: Role
    filter: Filter


@dataclass(frozen=True, slots=True)
class Submitted:
    """Server: a valid SUBMIT. `uid` is the frame's (hub-to-hub) or None: the token decides."""

    message: Message


@dataclass(frozen=True, slots=True)
class StatusReported:
    uid: str | None
    device_id: str
    source: str
    connected: bool
    reason: str
    battery: float | None
    rssi: int | None


@dataclass(frozen=True, slots=True)
class Dropped:
    """Server: a frame the AsyncAPI says to drop without closing (a malformed STATUS)."""

    op: int
    label: str
    reason: str


@dataclass(frozen=True, slots=True)
class ReplayRequested:
    after: int
    before: int


@dataclass(frozen=True, slots=True)
class Hello:
    """Client: the server's HELLO; IDENTIFY has been queued (a Send follows)."""

    interval_s: float


@dataclass(frozen=True, slots=True)
class Ready:
    pass


@dataclass(frozen=True, slots=True)
class Dispatched:
    """Client (consumer): one DISPATCH. `seq` is None for DEVICE_STATUS (an extension)."""

    message: Message


@dataclass(frozen=True, slots=True)
class Acked:
    """Client: a HEARTBEAT_ACK came back; every SUBMIT sent before its HEARTBEAT up to `marker`
    has reached the server (the socket is ordered). None when nothing was marked yet."""

    marker: int | None


Event = (
    Send
    | Close
    | Identified
    | Submitted
    | StatusReported
    | Dropped
    | ReplayRequested
    | Hello
    | Ready
    | Dispatched
    | Acked
)


# ---------------------------------------------------------------- server side


class ServerState(enum.Enum):
    AWAIT_IDENTIFY = "await_identify"
    AUTHENTICATING = "authenticating"
    READY = "ready"
    CLOSED = "closed"


class ServerConnection:
    """One client connection, seen from the broker.

    Usage: send `hello()` on connect; feed every received text to receive(now); call tick(now)
    by `next_deadline()`; on Identified check the token and call accept(now) or reject(code).
    """

    def __init__(
        self,
        now: float,
        *,
        heartbeat_interval_s: float = HEARTBEAT_INTERVAL_MS / 1000,
        identify_timeout_s: float = IDENTIFY_TIMEOUT_S,
    ) -> None:
        self.interval_s = heartbeat_interval_s
        self.window_s = heartbeat_interval_s * (1 + HEARTBEAT_GRACE)
        self.state = ServerState.AWAIT_IDENTIFY
        self.role: Role | None = None
        self.filter = EVERYTHING
        self.identify_deadline = now + identify_timeout_s
        self.last_heartbeat = now
        self.close_code: int | None = None

    def hello(self) -> str:
        return hello(round(self.interval_s * 1000))

    def next_deadline(self) -> float | None:
        if self.state is ServerState.CLOSED:
            return None
        beat = self.last_heartbeat + self.window_s
        if self.state in (ServerState.AWAIT_IDENTIFY, ServerState.AUTHENTICATING):
            return min(beat, self.identify_deadline)
        return beat

    def tick(self, now: float) -> list[Event]:
        if self.state is ServerState.CLOSED:
            return []
        if self.state is ServerState.AWAIT_IDENTIFY and now >= self.identify_deadline:
            return [self._close(CloseCode.NO_IDENTIFY, "no IDENTIFY within the time allowed")]
        if now >= self.last_heartbeat + self.window_s:
            return [self._close(CloseCode.HEARTBEAT_MISSED, "no HEARTBEAT within the window")]
        return []

    def receive(self, text: str | bytes, now: float) -> list[Event]:
        if self.state is ServerState.CLOSED:
            return []
        try:
            message = parse(text)
            return self._handle(message, now)
        except ProtocolError as exc:
            return [self._close(exc.code, exc.reason)]
        except Exception:  # a peer's bytes must never become a traceback or 1011
            return [self._close(CloseCode.MALFORMED, "malformed frame")]

    def accept(self, role: Role) -> list[Event]:
        if self.state is not ServerState.AUTHENTICATING:
            return []
        self.state = ServerState.READY
        self.role = role
        return [Send(ready())]

    def reject(
        self, code: int = CloseCode.BAD_TOKEN, reason: str = "token invalid, expired or used"
    ) -> list[Event]:
        return [self._close(code, reason)]

    def shutdown(self) -> list[Event]:
        return [self._close(CloseCode.GOING_AWAY, "server shutting down")]

    def _close(self, code: int, reason: str) -> Close:
        self.state = ServerState.CLOSED
        self.close_code = code
        return Close(code, reason)

    def _handle(self, message: Message, now: float) -> list[Event]:
        op = message.op
        if op == Op.HEARTBEAT:
            self.last_heartbeat = now
            return [Send(heartbeat_ack())]
        if op == Op.IDENTIFY:
            if self.state is not ServerState.AWAIT_IDENTIFY:
                raise ProtocolError(CloseCode.SECOND_IDENTIFY, "IDENTIFY was already sent")
            event = _parse_identify(message.d)
            self.state = ServerState.AUTHENTICATING
            self.filter = event.filter
            return [event]
        if op in (Op.HEARTBEAT_ACK, Op.HELLO, Op.READY, Op.DISPATCH):
            raise ProtocolError(CloseCode.BAD_OPCODE, f"opcode {op} is sent by servers only")
        if self.state is not ServerState.READY:
            raise ProtocolError(CloseCode.BAD_OPCODE, f"opcode {op} before READY")
        if op == Op.REPLAY:
            if self.role is not Role.CONSUMER:
                raise ProtocolError(CloseCode.BAD_OPCODE, "REPLAY is for consumers")
            replay = _parse_replay(message.d)
            return [] if replay is None else [replay]
        if op == Op.SUBMIT:
            if self.role is not Role.PRODUCER:
                raise ProtocolError(CloseCode.BAD_OPCODE, "SUBMIT is for producers")
            # AsyncAPI SubmitFrame: `t` (a string, checked by parse) and `d` (an object) are
            # required; what is inside `d` is the producer's business (sample_from_frame).
            if message.t is None or not isinstance(message.d, dict):
                raise ProtocolError(CloseCode.MALFORMED, "SUBMIT needs `t` and an object `d`")
            return [Submitted(message)]
        # op == Op.STATUS (parse() refused anything else)
        if self.role is not Role.PRODUCER:
            raise ProtocolError(CloseCode.BAD_OPCODE, "STATUS is for producers")
        try:
            return [_parse_status(message)]
        except ProtocolError as exc:
            # AsyncAPI receiveStatus: "a malformed STATUS is dropped without closing the socket".
            return [Dropped(Op.STATUS, "malformed", exc.reason)]


def _parse_identify(d: object) -> Identified:
    if not isinstance(d, dict):
        raise ProtocolError(CloseCode.MALFORMED, "IDENTIFY needs `d` with `token` and `type`")
    token = d.get("token")
    role = d.get("type")
    if not isinstance(token, str):
        # An empty string is a well-formed token that matches nothing: 4001, not 1003.
        raise ProtocolError(CloseCode.MALFORMED, "IDENTIFY `d.token` must be a string")
    if not _is_int(role) or role not in (0, 1):
        raise ProtocolError(
            CloseCode.MALFORMED, "IDENTIFY `d.type` must be 0 (producer) or 1 (consumer)"
        )
    return Identified(token, Role(role), _parse_filter(d.get(EXTENSION_KEY)))


def _parse_filter(ext: object) -> Filter:
    if ext is None:
        return EVERYTHING
    if not isinstance(ext, dict):
        raise ProtocolError(CloseCode.MALFORMED, f"IDENTIFY `d.{EXTENSION_KEY}` must be an object")

    def names(key: str) -> frozenset[str] | None:
        value = ext.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ProtocolError(
                CloseCode.MALFORMED, f"`d.{EXTENSION_KEY}.{key}` must be a list of strings"
            )
        return frozenset(value)

    flags = []
    for key in ("device_status", "rr_array"):
        flag = ext.get(key, False)
        if not isinstance(flag, bool):
            raise ProtocolError(CloseCode.MALFORMED, f"`d.{EXTENSION_KEY}.{key}` must be a boolean")
        flags.append(flag)
    return Filter(names("athletes"), names("types"), *flags)


def _parse_replay(d: object) -> ReplayRequested | None:
    """AsyncAPI ReplayFrame: `after` defaults to 0 and a missing `before` is an upper bound of
    0, so an omitted `before` or an empty range is valid and matches nothing (None). Only a
    payload that is not an object of integers is invalid (1003)."""
    if not isinstance(d, dict):
        raise ProtocolError(CloseCode.MALFORMED, "REPLAY needs `d` with `after` and `before`")
    after = d.get("after", 0)
    before = d.get("before", 0)
    if not _is_int(after) or not _is_int(before):
        raise ProtocolError(CloseCode.MALFORMED, "REPLAY `after` and `before` must be integers")
    assert isinstance(after, int) and isinstance(before, int)
    after = max(after, 0)  # seqs start at 1: a negative lower bound means "from the earliest"
    if before <= after + 1:
        return None
    # parse() bounds integers to int64, which is what the spool's seq column holds.
    return ReplayRequested(after, before)


def _parse_status(message: Message) -> StatusReported:
    """AsyncAPI StatusFrame: only `connected` is required; `device_id`, `source` and `reason`
    are optional strings (`battery` and `rssi` are gatewayd extensions)."""
    d = message.d
    if not isinstance(d, dict):
        raise ProtocolError(CloseCode.MALFORMED, "STATUS needs `d` with `connected`")
    connected = d.get("connected")
    device_id = d.get("device_id", "")
    source = d.get("source", "")
    reason = d.get("reason", "")
    battery = d.get("battery")
    rssi = d.get("rssi")
    if not isinstance(connected, bool):
        raise ProtocolError(CloseCode.MALFORMED, "STATUS `d.connected` must be a boolean")
    if not all(isinstance(v, str) for v in (device_id, source, reason)):
        raise ProtocolError(
            CloseCode.MALFORMED, "STATUS `d.device_id`, `d.source`, `d.reason` must be strings"
        )
    if battery is not None and not _is_number(battery):
        raise ProtocolError(CloseCode.MALFORMED, "STATUS `d.battery` must be a number")
    if rssi is not None and not _is_int(rssi):
        raise ProtocolError(CloseCode.MALFORMED, "STATUS `d.rssi` must be an integer")
    return StatusReported(message.uid, device_id, source, connected, reason, battery, rssi)


# ---------------------------------------------------------------- client side


class ClientState(enum.Enum):
    AWAIT_HELLO = "await_hello"
    AWAIT_READY = "await_ready"
    READY = "ready"
    CLOSED = "closed"


class ClientConnection:
    """One connection to a broker, seen from a producer or a consumer.

    `jitter` in [0, 1) places the first heartbeat (PROTOCOL.md: interval * random(0..1)); the
    caller draws it so this stays deterministic. A producer passes a `marker` (its spool seq) with
    each submit(); Acked(marker) reports the highest marker known to have reached the server.
    """

    def __init__(
        self,
        token: str,
        role: Role,
        *,
        filter_: Filter | None = None,
        jitter: float = 0.5,
        hello_timeout_s: float = IDENTIFY_TIMEOUT_S,
    ) -> None:
        self.token = token
        self.role = role
        self.filter = filter_
        self.jitter = min(max(jitter, 0.0), 1.0)
        self.hello_timeout_s = hello_timeout_s
        self.state = ClientState.AWAIT_HELLO
        self.interval_s = HEARTBEAT_INTERVAL_MS / 1000
        self.next_heartbeat: float | None = None
        self.started: float | None = None
        self.last_marker: int | None = None
        self.last_seq: int | None = None  # highest DISPATCH seq seen (consumer)
        # (sent at, marker at send time) per HEARTBEAT still waiting for its ACK, oldest first
        self._unacked: deque[tuple[float, int | None]] = deque()

    def start(self, now: float) -> None:
        self.started = now

    def next_deadline(self) -> float | None:
        if self.state is ClientState.CLOSED:
            return None
        if self.state is ClientState.AWAIT_HELLO:
            return None if self.started is None else self.started + self.hello_timeout_s
        deadlines = [self.next_heartbeat] if self.next_heartbeat is not None else []
        if self._unacked:
            deadlines.append(self._unacked[0][0] + self.interval_s)
        return min(deadlines) if deadlines else None

    def tick(self, now: float) -> list[Event]:
        if self.state is ClientState.CLOSED:
            return []
        if self.state is ClientState.AWAIT_HELLO:
            if self.started is not None and now >= self.started + self.hello_timeout_s:
                return [self._close(CloseCode.NORMAL, "no HELLO from the server")]
            return []
        if self._unacked and now >= self._unacked[0][0] + self.interval_s:
            return [self._close(CloseCode.NORMAL, "server missed a HEARTBEAT_ACK")]
        if self.next_heartbeat is not None and now >= self.next_heartbeat:
            return [self.heartbeat_now(now)]
        return []

    def heartbeat_now(self, now: float) -> Send:
        """Send a HEARTBEAT now (also to learn sooner that recent SUBMITs arrived)."""
        self._unacked.append((now, self.last_marker))
        self.next_heartbeat = now + self.interval_s
        return Send(heartbeat())

    def receive(self, text: str | bytes, now: float) -> list[Event]:
        if self.state is ClientState.CLOSED:
            return []
        try:
            message = parse(text)
        except ProtocolError as exc:
            return [self._close(exc.code, f"server sent a bad frame: {exc.reason}")]
        except Exception:  # as on the server side: a bad frame, never a crash
            return [self._close(CloseCode.MALFORMED, "server sent a malformed frame")]
        op = message.op
        if op == Op.HELLO:
            if self.state is not ClientState.AWAIT_HELLO:
                return [self._close(CloseCode.MALFORMED, "second HELLO")]
            d = message.d
            interval = d.get("heartbeat_interval") if isinstance(d, dict) else None
            if not isinstance(interval, int | float) or not _is_number(interval) or interval <= 0:
                return [self._close(CloseCode.MALFORMED, "HELLO without a heartbeat_interval")]
            self.interval_s = interval / 1000
            self.state = ClientState.AWAIT_READY
            self.next_heartbeat = now + self.interval_s * self.jitter
            return [Hello(self.interval_s), Send(identify(self.token, self.role, self.filter))]
        if op == Op.READY:
            if self.state is not ClientState.AWAIT_READY:
                return [self._close(CloseCode.MALFORMED, "unexpected READY")]
            self.state = ClientState.READY
            return [Ready()]
        if op == Op.HEARTBEAT_ACK:
            if not self._unacked:
                return []  # an ACK for nothing: harmless
            _, marker = self._unacked.popleft()
            return [Acked(marker)]
        if op == Op.DISPATCH and self.role is Role.CONSUMER and self.state is ClientState.READY:
            if message.seq is not None and (self.last_seq is None or message.seq > self.last_seq):
                self.last_seq = message.seq
            return [Dispatched(message)]
        return [self._close(CloseCode.BAD_OPCODE, f"unexpected opcode {op} from the server")]

    def submit(self, sample: Sample, *, marker: int | None = None, with_uid: bool = False) -> str:
        if marker is not None:
            self.last_marker = marker
        return submit(sample, with_uid=with_uid)

    def submit_many(
        self, rows: Sequence[tuple[int, Sample]], *, with_uid: bool = False
    ) -> list[str]:
        """submit() for each (marker, sample) row, in order."""
        if rows:
            self.last_marker = rows[-1][0]
        return submits(rows, with_uid=with_uid)

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> Close:
        return self._close(code, reason)

    def _close(self, code: int, reason: str) -> Close:
        self.state = ClientState.CLOSED
        return Close(code, reason)


def backoff_delay(attempt: int, fraction: float, *, base: float = 1.0, cap: float = 30.0) -> float:
    """Reconnect delay for the n-th consecutive failure (0-based): exponential with full jitter
    over the upper half, so clients spread out yet never retry instantly."""
    ceiling = min(cap, base * float(2 ** min(attempt, 16)))
    return ceiling * (0.5 + 0.5 * min(max(fraction, 0.0), 1.0))
