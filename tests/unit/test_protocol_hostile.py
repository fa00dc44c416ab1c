"""Hostile bytes against the sans-I/O core: whatever a peer sends, the answer is an event list,
and a close carries one of the documented codes (PROTOCOL.md, Close codes), never 1011."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gatewayd import protocol as p
from gatewayd.model import DataType

TS = "2026-11-24T14:30:05.000Z"

# What a server may close with because of what a client sent (1009 and 1007 come from the
# WebSocket layer for real sockets, and from parse() for text handed to it directly).
CLIENT_FAULT_CODES = {1003, 1007, 1009, 4003, 4004}


def close_code(events: list[p.Event]) -> int:
    assert len(events) == 1 and isinstance(events[0], p.Close), events
    return events[0].code


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("[" * 30_000, "30,000 deep: RecursionError inside json"),
        ('{"op": 0, "d": ' + "[" * 5000 + "]" * 5000 + "}", "deep but well-formed"),
        ('{"op": 0, "d": ' + '{"a":' * 5000 + "1" + "}" * 5000 + "}", "deep objects"),
        ('{"op": NaN}', "NaN is not JSON"),
        ('{"op": 0, "d": Infinity}', "Infinity is not JSON"),
        ('{"op": 0, "d": -Infinity}', "-Infinity is not JSON"),
        ('{"op": 0, "seq": ' + "9" * 5000 + "}", "beyond Python's int digit limit"),
        ('{"op": 0, "seq": 9223372036854775808}', "one past int64"),
        ('{"op": 0, "d": "\\ud800"}', "a lone surrogate can never be UTF-8"),
        ('{"op": 0, "\\udfff": 1}', "a lone surrogate in a key"),
        ("\ufeff{}", "a byte order mark"),
        ("", "empty frame"),
        ("\x00", "a NUL"),
    ],
)
def test_hostile_json_is_1003_before_and_after_identify(text: str, why: str) -> None:
    with pytest.raises(p.ProtocolError) as info:
        p.parse(text)
    assert info.value.code == 1003, why
    fresh = p.ServerConnection(0.0)
    assert close_code(fresh.receive(text, 1.0)) == 1003, why
    ready = p.ServerConnection(0.0)
    ready.receive(p.identify("tok", p.Role.PRODUCER), 0.0)
    ready.accept(p.Role.PRODUCER)
    assert close_code(ready.receive(text, 1.0)) == 1003, why


def test_well_formed_surrogate_pairs_and_big_but_bounded_numbers_pass() -> None:
    message = p.parse('{"op": 0, "d": "\\ud83d\\ude00", "seq": 9223372036854775807}')
    assert message.d == "\U0001f600"
    assert message.seq == (1 << 63) - 1
    assert p.parse('{"op": 0, "d": 1e308}').d == 1e308


def test_text_that_is_not_utf8_is_1007() -> None:
    # A str can hold what UTF-8 cannot (a decoder with surrogateescape makes such strings).
    with pytest.raises(p.ProtocolError) as info:
        p.parse('{"op": 0, "d": "\udcff"}')
    assert info.value.code == 1007


def test_oversize_text_is_1009_without_parsing() -> None:
    with pytest.raises(p.ProtocolError) as info:
        p.parse("[" * (p.MAX_FRAME_BYTES + 1))
    assert info.value.code == 1009


@pytest.mark.parametrize(
    "val", ["1e400", "-1e400", "123456789012345678901234567890", "NaN", "Infinity"]
)
def test_submit_values_beyond_a_double_are_refused(val: str) -> None:
    frame = '{"op": 6, "t": "POWER", "d": {"ts": "' + TS + '", "val": ' + val + "}}"
    with pytest.raises(p.ProtocolError) as info:
        p.sample_from_frame(p.parse(frame), "u")
    assert info.value.code == 1003


def test_replay_bounds_fit_the_spool() -> None:
    conn = p.ServerConnection(0.0)
    conn.receive(p.identify("tok", p.Role.CONSUMER), 0.0)
    conn.accept(p.Role.CONSUMER)
    [event] = conn.receive('{"op": 7, "d": {"after": 0, "before": 9223372036854775807}}', 1.0)
    assert event == p.ReplayRequested(0, (1 << 63) - 1)


# ------------------------------------------------------------------ fuzz: frame sequences

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)

good_frames = st.sampled_from(
    [
        p.heartbeat(),
        p.identify("tok", p.Role.CONSUMER),
        p.identify("tok", p.Role.PRODUCER),
        p.replay(0, 10),
        '{"op": 6, "t": "HEART_RATE", "d": {"ts": "' + TS + '", "val": 71}}',
        '{"op": 8, "d": {"connected": true, "device_id": "x"}}',
    ]
)


@st.composite
def frames(draw: st.DrawFn) -> str | bytes:
    kind = draw(st.integers(0, 6))
    if kind == 0:
        return draw(good_frames)
    if kind == 1:  # a protocol-shaped object with random fields
        op = draw(st.integers(-1, 10) | json_values)
        d = draw(json_values)
        extra = draw(st.dictionaries(st.sampled_from(["uid", "seq", "t"]), json_values))
        return json.dumps({"op": op, "d": d, **extra})
    if kind == 2:  # any JSON value
        return json.dumps(draw(json_values))
    if kind == 3:  # any text
        return draw(st.text(max_size=100))
    if kind == 4:  # a good frame, cut or with a character replaced
        good = draw(good_frames)
        i = draw(st.integers(0, len(good)))
        return good[:i] + draw(st.text(max_size=3)) + good[i + 1 :]
    if kind == 5:  # deep nesting, huge numbers, odd constants, lone surrogate escapes
        depth = draw(st.integers(1, 3000))
        return draw(
            st.sampled_from(
                [
                    "[" * depth,
                    '{"op": 0, "d": ' + "[" * depth + "]" * depth + "}",
                    '{"op": 7, "d": {"after": 0, "before": 1' + "0" * (depth % 40) + "}}",
                    '{"op": 0, "d": NaN}',
                    '{"op": 6, "t": "POWER", "d": {"ts": "' + TS + '", "val": 1e999}}',
                    '{"op": 3, "d": {"token": "\\udc00", "type": 1}}',
                ]
            )
        )
    return draw(st.binary(max_size=40))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(frames(), st.booleans()), min_size=1, max_size=12))
def test_server_survives_any_frame_sequence(sequence: list[tuple[str | bytes, bool]]) -> None:
    conn = p.ServerConnection(0.0)
    now = 0.0
    closed = False
    for text, accept in sequence:
        now += 0.5
        events = conn.receive(text, now)
        assert isinstance(events, list)
        if closed:
            assert events == []
            continue
        for event in events:
            if isinstance(event, p.Close):
                assert event.code in CLIENT_FAULT_CODES, (text, event)
                closed = True
            elif isinstance(event, p.Identified):
                answer = conn.accept(event.role) if accept else conn.reject()
                if not accept:
                    assert close_code(answer) == 4001
                    closed = True
            elif isinstance(event, p.Submitted):
                try:
                    p.sample_from_frame(event.message, "u")
                except p.ProtocolError as exc:
                    assert exc.code == 1003
            elif isinstance(event, p.ReplayRequested):
                assert 0 <= event.after < event.before <= p.INT64_MAX
            elif isinstance(event, p.Send):
                json.loads(event.text)
        assert conn.state is (p.ServerState.CLOSED if closed else conn.state)
        conn.tick(now)


@settings(max_examples=200, deadline=None)
@given(st.lists(frames(), min_size=1, max_size=10))
def test_client_survives_any_frame_sequence(sequence: list[str | bytes]) -> None:
    conn = p.ClientConnection("tok", p.Role.CONSUMER)
    conn.start(0.0)
    conn.receive(p.hello(), 0.0)
    now = 0.0
    for text in sequence:
        now += 0.5
        for event in conn.receive(text, now):
            if isinstance(event, p.Close):
                assert event.code in CLIENT_FAULT_CODES | {1000}
        conn.tick(now)


def test_every_data_type_round_trips_the_hostile_parser() -> None:
    for t in DataType:
        frame = '{"op": 6, "t": "' + str(t) + '", "d": {"ts": "' + TS + '", "val": 1}}'
        assert p.parse(frame).t == str(t)
