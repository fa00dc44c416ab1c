"""Our JSON Schemas of Terra's streaming messages, written from the facts of Terra's AsyncAPI
description (tryterra/openapi `dist/core/rt.asyncapi.yaml`, info.version 2026.07.07) and of its
companion OpenAPI for the token endpoints (`dist/core/rt-bundled.yaml`, same version).

Each schema names the AsyncAPI section it follows. They are ours (the project's words and
layout); only the facts (required fields, types, constants) carry over. Tests validate what the
hub sends against SERVER_FRAMES and check that the hub accepts everything CLIENT_FRAMES allows.
"""

from __future__ import annotations

from typing import Any

from jsonschema import Draft202012Validator

VERSION = "2026.07.07"

_INT = {"type": "integer"}
_STR = {"type": "string"}
# components.schemas.RealtimePayload: an object, anything inside (opaque to the gateway).
_PAYLOAD: dict[str, Any] = {"type": "object"}


def _frame(op: int, *, required: list[str], **props: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["op", *required],
        "properties": {"op": {"const": op}, **props},
    }


# components.schemas.* per message (components.messages -> payload).
HEARTBEAT = _frame(0, required=[])  # HeartbeatFrame
HEARTBEAT_ACK = _frame(1, required=[])  # HeartbeatAckFrame
HELLO = _frame(  # HelloFrame: d.heartbeat_interval, integer ms
    2,
    required=["d"],
    d={
        "type": "object",
        "required": ["heartbeat_interval"],
        "properties": {"heartbeat_interval": _INT},
    },
)
IDENTIFY = _frame(  # IdentifyFrame: d.type 0 producer / 1 consumer, d.token a string
    3,
    required=["d"],
    d={
        "type": "object",
        "required": ["type", "token"],
        "properties": {"type": {"type": "integer", "enum": [0, 1]}, "token": _STR},
    },
)
READY = _frame(4, required=[])  # ReadyFrame
DISPATCH = _frame(  # DispatchFrame: required op, d, uid, seq, t; optional synthetic
    5,
    required=["d", "uid", "seq", "t"],
    uid=_STR,
    seq=_INT,
    t=_STR,
    d=_PAYLOAD,
    synthetic={"type": "boolean"},
)
SUBMIT = _frame(6, required=["d", "t"], t=_STR, d=_PAYLOAD)  # SubmitFrame
REPLAY = _frame(  # ReplayFrame: after/before int64; `before` listed as required ...
    7,
    required=["d"],
    d={"type": "object", "properties": {"after": _INT, "before": _INT}},
)
# ... but its own description says a REPLAY without `before` "matches nothing" and `after`
# "defaults to 0", so the gateway must take both omissions: the schema above models that rule.
STATUS = _frame(  # StatusFrame: only `connected` required; the rest optional strings
    8,
    required=["d"],
    d={
        "type": "object",
        "required": ["connected"],
        "properties": {
            "connected": {"type": "boolean"},
            "device_id": _STR,
            "source": _STR,
            "reason": _STR,
        },
    },
)

# operations.*: action `send` is gateway -> client, `receive` is client -> gateway.
SERVER_FRAMES = {1: HEARTBEAT_ACK, 2: HELLO, 4: READY, 5: DISPATCH}
CLIENT_FRAMES = {0: HEARTBEAT, 3: IDENTIFY, 6: SUBMIT, 7: REPLAY, 8: STATUS}

# info.description, "Close codes".
CLOSE_CODES = {1000, 1003, 1011, 4000, 4001, 4002, 4003, 4004, 4005}

# rt-bundled.yaml, paths./auth/developer and /auth/user, 200: {"token": string} required.
TOKEN_ANSWER = {"type": "object", "required": ["token"], "properties": {"token": _STR}}

# Sample payloads as Terra's clients read them (terra-examples consumer.ts: `d.ts`, `d.val` for a
# scalar, `d.d` for a vector); our narrowing of the opaque RealtimePayload for what the hub sends.
HUB_PAYLOAD = {
    "type": "object",
    "required": ["ts"],
    "properties": {
        "ts": {"type": "string", "pattern": r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$"},
        "val": {"type": "number"},
        "d": {"type": "array", "items": {"type": "number"}},
    },
    "oneOf": [{"required": ["val"]}, {"required": ["d"]}],
}


def _validator(schema: dict[str, Any]) -> Draft202012Validator:
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def errors(frame: object, *, server: bool) -> list[str]:
    """Why `frame` is not a valid frame of its op in that direction (empty: it is valid)."""
    if not isinstance(frame, dict) or not isinstance(frame.get("op"), int):
        return ["not an object with an integer op"]
    table = SERVER_FRAMES if server else CLIENT_FRAMES
    schema = table.get(frame["op"])
    if schema is None:
        return [f"op {frame['op']} is not sent by the {'server' if server else 'client'}"]
    return [e.message for e in _validator(schema).iter_errors(frame)]


def payload_errors(d: object) -> list[str]:
    return [e.message for e in _validator(HUB_PAYLOAD).iter_errors(d)]


def token_answer_errors(body: object) -> list[str]:
    return [e.message for e in _validator(TOKEN_ANSWER).iter_errors(body)]
