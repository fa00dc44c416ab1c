"""The sans-I/O protocol core: frames in, events out, time as an input."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gatewayd import model
from gatewayd import protocol as p
from gatewayd.model import DataType, DeviceState, DeviceStatus, Sample, parse_ts

TS = "2026-11-24T14:30:05.000Z"


def identified_server(role: p.Role, now: float = 0.0, **kw: float) -> p.ServerConnection:
    conn = p.ServerConnection(now, **kw)
    events = conn.receive(p.identify("tok", role), now)
    assert isinstance(events[0], p.Identified)
    assert conn.accept(role) == [p.Send('{"op":4}')]
    return conn


def close_code(events: list[p.Event]) -> int:
    assert len(events) == 1 and isinstance(events[0], p.Close), events
    return events[0].code


# ------------------------------------------------------------------ frames


def test_hello_carries_the_interval_in_ms() -> None:
    conn = p.ServerConnection(0.0, heartbeat_interval_s=40.0)
    assert json.loads(conn.hello()) == {"op": 2, "d": {"heartbeat_interval": 40000}}


def test_dispatch_has_terra_shape() -> None:
    sample = Sample("ath1", DataType.HEART_RATE, parse_ts(TS), val=71)
    assert json.loads(p.dispatch(73, sample)) == {
        "op": 5,
        "d": {"ts": TS, "val": 71},
        "uid": "ath1",
        "seq": 73,
        "t": "HEART_RATE",
    }
    rr = Sample("ath1", DataType.RR_INTERVAL, parse_ts(TS) + 0.42, val=812.0)
    assert json.loads(p.dispatch(1, rr))["d"] == {"ts": "2026-11-24T14:30:05.420Z", "val": 812.0}


_NUMBERS = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.none(),
)


@given(
    uid=st.text(max_size=12),
    t=st.sampled_from(list(DataType)),
    ts=st.floats(min_value=0, max_value=4e9),
    val=_NUMBERS,
    d=st.one_of(st.none(), st.lists(st.floats(allow_nan=False), max_size=4).map(tuple)),
    seq=st.integers(min_value=0, max_value=2**62),
)
def test_dispatch_and_submit_are_what_json_dumps_writes(uid, t, ts, val, d, seq) -> None:
    # The frames are built by hand for speed; the standard library's encoder is the reference,
    # down to the byte (key order, separators, non-ASCII kept, float repr, NaN).
    sample = Sample(uid, t, ts, val=val, d=d)
    payload = sample.payload()

    def dumps(obj: dict[str, object]) -> str:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)

    assert p.dispatch(seq, sample) == dumps(
        {"op": 5, "d": payload, "uid": uid, "seq": seq, "t": str(t)}
    )
    assert p.submit(sample) == dumps({"op": 6, "d": payload, "t": str(t)})
    assert p.submit(sample, with_uid=True) == dumps(
        {"op": 6, "d": payload, "t": str(t), "uid": uid}
    )


_SAMPLES = st.lists(
    st.builds(
        Sample,
        uid=st.sampled_from(["ath1", "ath2", "Zoë", 'q"uote']),
        t=st.sampled_from(list(DataType)),
        # runs of samples share a second's ts, per-beat ones have their own
        ts=st.sampled_from([1_795_000_000.0, 1_795_000_001.0]) | st.floats(0, 4e9),
        val=_NUMBERS | st.booleans(),
        d=st.one_of(st.none(), st.lists(st.floats(allow_nan=False), max_size=3).map(tuple)),
    ),
    max_size=12,
)


@given(samples=_SAMPLES, first=st.integers(min_value=0, max_value=2**62))
def test_a_batch_of_dispatches_and_submits_is_each_one_built_alone(samples, first) -> None:
    # dispatches()/submits() take a second's samples at once, with their own fast path; the
    # one-sample builders (checked against json.dumps above) are the reference.
    assert p.dispatches(first, samples) == [
        p.dispatch(first + i, sample) for i, sample in enumerate(samples)
    ]
    rows = [(first + i, sample) for i, sample in enumerate(samples)]
    for with_uid in (False, True):
        assert p.submits(rows, with_uid=with_uid) == [
            p.submit(sample, with_uid=with_uid) for sample in samples
        ]


# Values that compare equal but are written differently (71 and 71.0, 0.0 and -0.0, True and
# 1), and ones that must never be taken from a cache (NaN, infinities, None).
CLASHING_VALUES = [71, 71.0, 1, 1.0, True, False, 0, 0.0, -0.0, 2.5, 1e16, -3.25]
ODD_VALUES = [float("nan"), float("inf"), -float("inf"), None]


@given(
    st.lists(
        st.builds(
            Sample,
            uid=st.sampled_from(["ath1", "Zoë", 'q"uote', "HEART_RATE"]),
            t=st.sampled_from(list(DataType)),
            ts=st.sampled_from([1_795_000_000.0, 1_795_000_000.25]),
            val=st.sampled_from(CLASHING_VALUES + ODD_VALUES),
            d=st.none() | st.just((1.0, 2.0)),
        ),
        max_size=20,
    ),
    st.integers(min_value=1, max_value=3),
)
def test_the_shared_text_caches_never_change_a_byte(samples: list[Sample], size: int) -> None:
    # Every output takes a value's and a uid's text from caches shared by all of them
    # (model.FLOAT_TEXT, STRING_JSON); json.dumps is the reference, with caches that are cleared
    # every few entries and filled by the same values in other types first.
    def dumps(obj: dict[str, object]) -> str:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model, "TEXT_CACHE_MAX", size)
        model.FLOAT_TEXT.clear()
        model.STRING_JSON.clear()
        for _ in range(2):  # the second round finds what the first one left in the caches
            rows = list(enumerate(samples, 1))
            assert p.dispatches(1, samples) == [
                dumps({"op": 5, "d": s.payload(), "uid": s.uid, "seq": n, "t": str(s.t)})
                for n, s in rows
            ]
            assert p.submits(rows, with_uid=True) == [
                dumps({"op": 6, "d": s.payload(), "t": str(s.t), "uid": s.uid}) for s in samples
            ]
            assert len(model.FLOAT_TEXT) <= size and len(model.STRING_JSON) <= size


def test_rr_arrays_group_beats_per_athlete_and_second_at_the_last_beat() -> None:
    t0 = parse_ts(TS)
    rows = [
        (1, Sample("a", DataType.RR_INTERVAL, t0 + 0.1, val=800.0)),
        (2, Sample("b", DataType.RR_INTERVAL, t0 + 0.2, val=700.0)),
        (3, Sample("a", DataType.HEART_RATE, t0, val=75)),
        (4, Sample("a", DataType.RR_INTERVAL, t0 + 0.9, val=810.0)),
        (5, Sample("a", DataType.RR_INTERVAL, t0 + 1.7, val=790.0)),
    ]
    assert p.rr_arrays(rows) == [
        (2, Sample("b", DataType.RR_INTERVAL, t0, d=(700.0,))),
        (3, Sample("a", DataType.HEART_RATE, t0, val=75)),
        (4, Sample("a", DataType.RR_INTERVAL, t0, d=(800.0, 810.0))),
        (5, Sample("a", DataType.RR_INTERVAL, t0 + 1, d=(790.0,))),
    ]
    assert p.rr_arrays(rows[2:3]) == rows[2:3]


def test_rr_array_is_asked_for_in_identify() -> None:
    conn = p.ServerConnection(0.0)
    [event] = conn.receive(p.identify("t", p.Role.CONSUMER, p.Filter(rr_array=True)), 0.0)
    assert isinstance(event, p.Identified) and event.filter.rr_array
    bad = '{"op": 3, "d": {"token": "t", "type": 1, "gatewayd": {"rr_array": "yes"}}}'
    assert close_code(p.ServerConnection(0.0).receive(bad, 0.0)) == 1003


def test_submit_round_trips_through_the_server_parser() -> None:
    sample = Sample("ath1", DataType.POWER, parse_ts(TS), val=250)
    message = p.parse(p.submit(sample, with_uid=True))
    assert message.uid == "ath1"
    assert p.sample_from_frame(message, "ath1") == Sample(
        "ath1", DataType.POWER, parse_ts(TS), val=250
    )
    assert p.parse(p.submit(sample)).uid is None


@pytest.mark.parametrize(
    ("text", "code"),
    [
        # AsyncAPI "Close codes": 1003 is "unparseable JSON" too; 1007 is only the WebSocket
        # layer's answer to a text frame that is not UTF-8 (it never reaches parse()).
        ("not json", 1003),
        ("{", 1003),
        ("[1, 2]", 1003),
        ('"op"', 1003),
        ("{}", 1003),
        ('{"op": "0"}', 1003),
        ('{"op": true}', 1003),
        ('{"op": 99}', 4004),
        ('{"op": 5, "uid": 7}', 1003),
        ('{"op": 5, "seq": "x"}', 1003),
    ],
)
def test_parse_refuses_bad_frames_with_the_documented_code(text: str, code: int) -> None:
    with pytest.raises(p.ProtocolError) as info:
        p.parse(text)
    assert info.value.code == code


def test_binary_frames_are_malformed() -> None:
    with pytest.raises(p.ProtocolError) as info:
        p.parse(b'{"op": 0}')
    assert info.value.code == 1003


@given(st.text(max_size=200))
def test_any_text_parses_or_raises_protocol_error(text: str) -> None:
    try:
        p.parse(text)
    except p.ProtocolError as exc:
        assert exc.code in (1003, 4004)


@pytest.mark.parametrize(
    "d",
    [
        {"val": 1, "ts": 5},
        {"ts": "yesterday", "val": 1},
        {"ts": TS},
        {"ts": TS, "val": 1, "d": [1]},
        {"ts": TS, "val": "71"},
        {"ts": TS, "val": True},
        {"ts": TS, "d": [1, "x"]},
        {"ts": TS, "d": 3},
    ],
)
def test_unusable_submit_payloads_are_dropped_not_closed_on(d: object) -> None:
    # AsyncAPI components.schemas.RealtimePayload: the payload is opaque to the gateway, so a
    # payload gatewayd cannot turn into a Sample is counted and dropped, never a 1003.
    message = p.Message(p.Op.SUBMIT, d, t="HEART_RATE")
    with pytest.raises(p.Unusable) as info:
        p.sample_from_frame(message, "u", now=1000.0)
    assert info.value.label == "bad_payload"


def test_submit_type_in_any_case_and_ts_stamped_on_arrival() -> None:
    # AsyncAPI SubmitFrame.t "e.g. `heart_rate`"; `ts` is not part of the frame's schema.
    message = p.parse('{"op": 6, "t": "heart_rate", "d": {"val": 71}}')
    assert p.sample_from_frame(message, "u", now=1234.5) == Sample(
        "u", DataType.HEART_RATE, 1234.5, val=71
    )
    with pytest.raises(p.Unusable):
        p.sample_from_frame(message, "u")  # no arrival time to stamp: cannot be used


def test_submit_without_t_or_object_d_is_a_malformed_frame() -> None:
    # AsyncAPI SubmitFrame: required [op, d, t]; d is an object.
    for frame in ('{"op": 6, "d": {"val": 1}}', '{"op": 6, "t": "POWER", "d": [1]}'):
        assert close_code(identified_server(p.Role.PRODUCER).receive(frame, 1.0)) == 1003


def test_unknown_data_type_is_its_own_error() -> None:
    message = p.Message(p.Op.SUBMIT, {"ts": TS, "d": [0.1, 0.2, 9.8]}, t="GYROSCOPE")
    with pytest.raises(p.UnknownType):
        p.sample_from_frame(message, "u")


def test_nan_is_refused() -> None:
    # NaN is not JSON (RFC 8259, section 6), so the frame is refused before its payload is read.
    with pytest.raises(p.ProtocolError) as info:
        p.parse('{"op": 6, "t": "POWER", "d": {"ts": "' + TS + '", "val": NaN}}')
    assert info.value.code == 1003
    with pytest.raises(p.ProtocolError):
        p.sample_from_frame(p.Message(p.Op.SUBMIT, {"ts": TS, "val": float("nan")}, t="POWER"), "u")


# ------------------------------------------------------------------ server lifecycle


def test_identify_then_ready_for_a_consumer_with_a_filter() -> None:
    conn = p.ServerConnection(0.0)
    wanted = p.Filter(frozenset({"a"}), frozenset({"HEART_RATE"}), device_status=True)
    [event] = conn.receive(p.identify("secret", p.Role.CONSUMER, wanted), 1.0)
    assert event == p.Identified("secret", p.Role.CONSUMER, wanted)
    assert conn.state is p.ServerState.AUTHENTICATING
    assert conn.accept(p.Role.CONSUMER) == [p.Send(p.ready())]
    assert conn.filter.wants("a", "HEART_RATE")
    assert not conn.filter.wants("b", "HEART_RATE")
    assert not conn.filter.wants("a", "POWER")


def test_identify_timeout_closes_4000_only_after_15_s() -> None:
    conn = p.ServerConnection(100.0)
    assert conn.next_deadline() == 115.0
    assert conn.tick(114.99) == []
    assert close_code(conn.tick(115.0)) == 4000
    assert conn.tick(200.0) == []  # closed once


def test_identify_while_authenticating_does_not_time_out() -> None:
    conn = p.ServerConnection(0.0)
    conn.receive(p.identify("t", p.Role.CONSUMER), 14.0)
    assert conn.tick(16.0) == []


def test_reject_is_4001() -> None:
    conn = p.ServerConnection(0.0)
    conn.receive(p.identify("t", p.Role.CONSUMER), 0.0)
    assert close_code(conn.reject()) == 4001
    assert conn.receive(p.heartbeat(), 1.0) == []


def test_second_identify_is_4003() -> None:
    conn = identified_server(p.Role.CONSUMER)
    assert close_code(conn.receive(p.identify("t", p.Role.CONSUMER), 1.0)) == 4003


@pytest.mark.parametrize(
    "d",
    [
        None,
        {"type": 1},
        {"token": 5, "type": 1},
        {"token": "t", "type": 2},
        {"token": "t", "type": "1"},
        {"token": "t", "type": 1, "gatewayd": []},
        {"token": "t", "type": 1, "gatewayd": {"athletes": "a"}},
        {"token": "t", "type": 1, "gatewayd": {"device_status": 1}},
    ],
)
def test_bad_identify_is_1003(d: object) -> None:
    conn = p.ServerConnection(0.0)
    assert close_code(conn.receive(json.dumps({"op": 3, "d": d}), 0.0)) == 1003


def test_an_empty_token_is_a_refused_token_not_a_malformed_frame() -> None:
    # AsyncAPI IdentifyFrame: `token` is a string; a token that matches nothing is 4001.
    conn = p.ServerConnection(0.0)
    [event] = conn.receive('{"op": 3, "d": {"token": "", "type": 1}}', 0.0)
    assert event == p.Identified("", p.Role.CONSUMER, p.EVERYTHING)


def test_heartbeat_before_identify_is_acked() -> None:
    # A Terra consumer (hulsemohit/EDGE) heartbeats on HELLO, before its IDENTIFY.
    conn = p.ServerConnection(0.0)
    assert conn.receive(p.heartbeat(), 0.1) == [p.Send('{"op":1}')]
    assert isinstance(conn.receive(p.identify("t", p.Role.CONSUMER), 0.2)[0], p.Identified)


def test_heartbeat_is_acked_and_moves_the_window() -> None:
    conn = identified_server(p.Role.CONSUMER, heartbeat_interval_s=40.0)
    window = 40.0 * (1 + p.HEARTBEAT_GRACE)
    assert conn.receive(p.heartbeat(), 30.0) == [p.Send('{"op":1}')]
    assert conn.next_deadline() == 30.0 + window
    assert conn.tick(30.0 + window - 0.01) == []
    assert close_code(conn.tick(30.0 + window)) == 4005


def test_no_heartbeat_at_all_is_4005() -> None:
    conn = identified_server(p.Role.PRODUCER, heartbeat_interval_s=1.0)
    assert close_code(conn.tick(1.25)) == 4005


@pytest.mark.parametrize("op", [1, 2, 4, 5])
def test_server_only_opcodes_from_a_client_are_4004(op: int) -> None:
    conn = identified_server(p.Role.CONSUMER)
    assert close_code(conn.receive(json.dumps({"op": op}), 1.0)) == 4004


def test_opcodes_wrong_for_the_role_are_4004() -> None:
    submit = p.submit(Sample("a", DataType.HEART_RATE, 0.0, val=60))
    assert close_code(identified_server(p.Role.CONSUMER).receive(submit, 1.0)) == 4004
    assert close_code(identified_server(p.Role.PRODUCER).receive(p.replay(1, 5), 1.0)) == 4004
    status = '{"op": 8, "d": {"connected": true, "device_id": "x"}}'
    assert close_code(identified_server(p.Role.CONSUMER).receive(status, 1.0)) == 4004


def test_data_opcodes_before_ready_are_4004() -> None:
    conn = p.ServerConnection(0.0)
    assert close_code(conn.receive(p.replay(1, 5), 1.0)) == 4004


def test_replay_request_and_its_leniency() -> None:
    conn = identified_server(p.Role.CONSUMER)
    assert conn.receive(p.replay(28, 43), 1.0) == [p.ReplayRequested(28, 43)]
    # AsyncAPI ReplayFrame: `after` defaults to 0 ...
    assert conn.receive('{"op": 7, "d": {"before": 5}}', 1.0) == [p.ReplayRequested(0, 5)]
    # ... and a REPLAY without `before`, or with an empty range, matches nothing and stays open.
    for d in [{"after": 1}, {}, {"after": 5, "before": 5}, {"after": 5, "before": 6}]:
        assert conn.receive(json.dumps({"op": 7, "d": d}), 1.0) == [], d
        assert conn.state is p.ServerState.READY
    assert conn.receive('{"op": 7, "d": {"after": 9, "before": 3}}', 1.0) == []
    assert conn.receive('{"op": 7, "d": {"after": -4, "before": 3}}', 1.0) == [
        p.ReplayRequested(0, 3)
    ]


@pytest.mark.parametrize(
    "d", [None, [], {"after": 1.5, "before": 3}, {"after": "1", "before": 3}, {"before": True}]
)
def test_an_invalid_replay_payload_is_1003(d: object) -> None:
    # AsyncAPI "Close codes": 1003 "... or an invalid REPLAY payload".
    conn = identified_server(p.Role.CONSUMER)
    assert close_code(conn.receive(json.dumps({"op": 7, "d": d}), 1.0)) == 1003


def test_submit_and_status_from_a_producer() -> None:
    conn = identified_server(p.Role.PRODUCER)
    sample = Sample("a", DataType.HEART_RATE, parse_ts(TS), val=60)
    [event] = conn.receive(p.submit(sample, with_uid=True), 1.0)
    assert isinstance(event, p.Submitted)
    assert p.sample_from_frame(event.message, event.message.uid or "") == sample
    status = DeviceStatus("a", "120:1", "ant", DeviceState.LOST, 0.0, reason="silent", battery=40)
    [reported] = conn.receive(p.status(status, with_uid=True), 2.0)
    assert reported == p.StatusReported("a", "120:1", "ant", False, "silent", 40, None)


def test_status_needs_only_connected() -> None:
    # AsyncAPI StatusFrame: required [connected]; device_id, source, reason are optional.
    conn = identified_server(p.Role.PRODUCER)
    [reported] = conn.receive('{"op": 8, "d": {"connected": true}}', 1.0)
    assert reported == p.StatusReported(None, "", "", True, "", None, None)


@pytest.mark.parametrize(
    "d",
    [
        None,
        {},
        {"connected": "yes"},
        {"connected": True, "device_id": 7},
        {"connected": False, "reason": None},
        {"connected": True, "battery": "full"},
    ],
)
def test_a_malformed_status_is_dropped_without_closing(d: object) -> None:
    # AsyncAPI receiveStatus: "a malformed STATUS is dropped without closing the socket".
    conn = identified_server(p.Role.PRODUCER)
    [event] = conn.receive(json.dumps({"op": 8, "d": d}), 1.0)
    assert isinstance(event, p.Dropped) and event.op == 8
    assert conn.state is p.ServerState.READY


def test_shutdown_is_1001() -> None:
    assert close_code(identified_server(p.Role.CONSUMER).shutdown()) == 1001


# ------------------------------------------------------------------ client side


def test_client_identifies_on_hello_and_heartbeats_on_schedule() -> None:
    conn = p.ClientConnection("tok", p.Role.PRODUCER, jitter=0.5)
    conn.start(0.0)
    events = conn.receive(p.hello(10_000), 0.0)
    assert events[0] == p.Hello(10.0)
    assert events[1] == p.Send(p.identify("tok", p.Role.PRODUCER))
    assert conn.receive(p.ready(), 0.1) == [p.Ready()]
    assert conn.next_deadline() == 5.0
    assert conn.tick(4.9) == []
    assert conn.tick(5.0) == [p.Send(p.heartbeat())]
    assert conn.receive(p.heartbeat_ack(), 5.1) == [p.Acked(None)]
    assert conn.next_deadline() == 15.0


def test_client_ack_reports_the_last_submit_before_the_heartbeat() -> None:
    conn = p.ClientConnection("tok", p.Role.PRODUCER, jitter=0.0)
    conn.receive(p.hello(1000), 0.0)
    conn.receive(p.ready(), 0.0)
    sample = Sample("a", DataType.HEART_RATE, 0.0, val=60)
    conn.submit(sample, marker=10)
    conn.heartbeat_now(0.1)
    conn.submit(sample, marker=11)  # sent after the heartbeat: not covered by its ACK
    conn.heartbeat_now(0.2)
    assert conn.receive(p.heartbeat_ack(), 0.3) == [p.Acked(10)]
    assert conn.receive(p.heartbeat_ack(), 0.4) == [p.Acked(11)]


def test_client_closes_when_an_ack_is_missed() -> None:
    conn = p.ClientConnection("tok", p.Role.CONSUMER, jitter=0.0)
    conn.receive(p.hello(1000), 0.0)
    conn.receive(p.ready(), 0.0)
    assert conn.tick(0.0) == [p.Send(p.heartbeat())]
    assert conn.next_deadline() == 1.0
    [event] = conn.tick(1.0)
    assert isinstance(event, p.Close)
    assert conn.state is p.ClientState.CLOSED


def test_client_gives_up_without_hello() -> None:
    conn = p.ClientConnection("tok", p.Role.CONSUMER)
    conn.start(0.0)
    assert conn.tick(14.0) == []
    assert isinstance(conn.tick(15.0)[0], p.Close)


def test_consumer_sees_dispatches_and_tracks_the_last_seq() -> None:
    conn = p.ClientConnection("tok", p.Role.CONSUMER, filter_=p.Filter(frozenset({"a"})))
    events = conn.receive(p.hello(), 0.0)
    assert json.loads(events[1].text)["d"]["gatewayd"] == {"athletes": ["a"]}  # type: ignore[union-attr]
    conn.receive(p.ready(), 0.0)
    sample = Sample("a", DataType.HEART_RATE, 0.0, val=60)
    [event] = conn.receive(p.dispatch(7, sample), 1.0)
    assert isinstance(event, p.Dispatched) and event.message.seq == 7
    conn.receive(p.dispatch(5, sample), 1.0)
    assert conn.last_seq == 7


def test_device_status_dispatch_has_no_seq() -> None:
    status = DeviceStatus("a", "C0:FF:EE:00:00:01", "ble", DeviceState.CONNECTED, 0.0, rssi=-60)
    frame = json.loads(p.dispatch_status(status))
    assert frame["t"] == "DEVICE_STATUS" and "seq" not in frame
    assert frame["d"]["state"] == "connected" and frame["d"]["rssi"] == -60


def test_backoff_grows_to_the_cap_with_jitter() -> None:
    assert p.backoff_delay(0, 0.0) == 0.5
    assert p.backoff_delay(0, 1.0) == 1.0
    assert p.backoff_delay(3, 1.0) == 8.0
    assert p.backoff_delay(40, 1.0) == 30.0
    assert 15.0 <= p.backoff_delay(40, 0.3) <= 30.0
