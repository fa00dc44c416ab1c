"""paho's client with gatewayd's bulk paths (gatewayd/sinks/mqtt_client.py).

The bulk paths lean on paho internals. These tests hold them against paho itself: the bytes
its own publish() writes, its own PUBLISH decoder on the receiving side (a second paho client
reading what ours wrote, as a subscriber's client would), its own PUBACK reader, and its own
resend after a reconnect. A paho release that changes what they rely on fails here, not
quietly in the daemon.
"""

from __future__ import annotations

import inspect
import random
import socket
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt import _packet
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes

from gatewayd.sinks.mqtt_client import Client, Held
from gatewayd.sinks.mqtt_wire import PUBACK_ACCEPTED, WRITE_HIGH, BatchedSocket, plain_pubacks
from tests.unit.test_mqtt_wire import pair

__all__ = ["pair"]  # a fixture, imported for pytest

V5 = MQTTProtocolVersion.MQTTv5
V311 = MQTTProtocolVersion.MQTTv311
CONNECTED = paho._ConnectionState.MQTT_CS_CONNECTED


def puback(mid: int, *rest: int) -> bytes:
    body = bytes([mid >> 8, mid & 0xFF, *rest])
    return bytes([0x40, len(body)]) + body


def test_plain_pubacks_decode_as_pahos_own_decoder_does() -> None:
    packets = [puback(1), puback(2, 0x10), puback(0xFFFF, 0x00), puback(0x0100)]
    mids, used = plain_pubacks(b"".join(packets), v5=True)
    assert used == sum(map(len, packets))
    assert len(mids) == len(packets)
    for mid, packet in zip(mids, packets, strict=True):
        reference = _packet.decode_puback(packet[0], packet[2:], V5)
        assert mid == reference.mid
        assert not reference.reason.is_failure
        assert reference.properties.pack() == b"\x00"
    # MQTT 3.1.1 has only the two-byte form
    assert plain_pubacks(puback(7), v5=False) == ([7], 4)


@pytest.mark.parametrize(
    ("tail", "v5"),
    [
        (puback(5, 0x87), True),  # Not authorized: a refusal, paho reports it
        (puback(5, 0x00, 0x00), True),  # with a property length: paho decodes it
        (puback(5, 0x10), False),  # a reason code is malformed in 3.1.1: paho says so
        (b"\x30\x05\x00\x01tab", True),  # PUBLISH
        (b"\xd0\x00", True),  # PINGRESP
    ],
)
def test_plain_pubacks_stop_at_anything_else(tail: bytes, v5: bool) -> None:
    head = puback(1) + puback(2)
    assert plain_pubacks(head + tail + puback(3), v5) == ([1, 2], len(head))
    assert plain_pubacks(tail, v5) == ([], 0)


@pytest.mark.parametrize("cut", [puback(5)[:1], puback(5)[:3], puback(5, 0x10)[:4]])
def test_plain_pubacks_leave_a_packet_cut_short_for_later(cut: bytes) -> None:
    head = puback(1) + puback(2)
    assert plain_pubacks(head + cut, v5=True) == ([1, 2], len(head))


@pytest.mark.parametrize("seed", range(40))
def test_plain_pubacks_of_any_mix_and_cut_are_those_pahos_decoder_accepts(seed: int) -> None:
    """Runs of one form (unpacked all at once) and mixes (one by one) give the same answer:
    the ids of the leading packets that are PUBACKs paho decodes as accepted, with no
    properties, and that are complete."""
    rng = random.Random(seed)
    v5 = seed % 4 != 0  # 0: MQTT 3.1.1; 1: two-byte acks only; 2: coded only; 3: mixed
    forms: list[Callable[[int], bytes]] = [] if seed % 4 == 2 else [puback]
    if seed % 4 >= 2:
        forms.append(lambda mid: puback(mid, rng.choice(PUBACK_ACCEPTED)))
    if seed % 5 == 0:  # something that is not a plain PUBACK, now and then
        forms.append(lambda mid: rng.choice([puback(mid, 0x87), b"\xd0\x00", puback(mid, 0, 0)]))
    packets = [rng.choice(forms)(rng.randrange(1, 65536)) for _ in range(rng.randrange(1, 60))]
    stream = b"".join(packets)
    stream = stream[: rng.randrange(len(stream) - 3, len(stream) + 1)]  # maybe cut short
    expected: list[int] = []
    at = 0
    for packet in packets:
        if at + len(packet) > len(stream) or packet[0] != 0x40 or not 2 <= packet[1] <= 3:
            break
        if packet[1] == 3 and not v5:
            break
        decoded = _packet.decode_puback(packet[0], packet[2:], V5 if v5 else V311)
        if decoded.reason.is_failure:
            break
        expected.append(decoded.mid)
        at += len(packet)
    assert plain_pubacks(stream, v5) == (expected, at)
    assert plain_pubacks(bytearray(stream), v5) == (expected, at)


def test_accepting_codes_are_the_ones_paho_counts_as_success() -> None:
    for code in PUBACK_ACCEPTED:
        reason = _packet.decode_puback(0x40, puback(1, code)[2:], V5).reason
        assert not reason.is_failure
        assert reason.getName() in ("Success", "No matching subscribers")


# -- helpers: a client "after its CONNACK" on one end of a socket pair -----------------------


def ours(protocol: MQTTProtocolVersion = V5) -> Client:
    """Our client as the sink sets it up: no in-flight limit of paho's own."""
    client = Client(
        CallbackAPIVersion.VERSION2, protocol=protocol, credentials=lambda: (None, None)
    )
    client.max_inflight_messages_set(0)
    return client


def connected(client: paho.Client, sock: Any) -> list[tuple[int, int]]:
    """`client` talking over `sock` with paho's state as after a CONNACK; its on_publish calls
    as (mid, reason code)."""
    calls: list[tuple[int, int]] = []

    def on_publish(c: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        calls.append((mid, reason.value))

    client.on_publish = on_publish
    client._sock = BatchedSocket(sock) if isinstance(client, Client) else sock
    client._state = CONNECTED
    return calls


def read_all(client: paho.Client) -> None:
    for _ in range(1000):
        if client._packet_read() != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return
    raise AssertionError("the reader never ran dry")


def drain(sock: socket.socket) -> bytes:
    data = bytearray()
    while True:
        try:
            chunk = sock.recv(1 << 16)
        except BlockingIOError:
            return bytes(data)
        if not chunk:
            return bytes(data)
        data += chunk


class Receiver:
    """A second paho client reading, as from its broker, what ours writes: paho's own PUBLISH
    decoder. It answers QoS 1 with PUBACK and QoS 2 with PUBREC, as a broker would."""

    def __init__(self, sock: socket.socket, protocol: MQTTProtocolVersion) -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2, protocol=protocol)
        self.messages: list[tuple[str, bytes, int, bool, int, bool]] = []
        self.client.on_message = self._on_message
        self.client._sock = sock
        self.client._state = CONNECTED

    def _on_message(self, client: Any, userdata: Any, message: paho.MQTTMessage) -> None:
        self.messages.append(
            (message.topic, message.payload, message.qos, message.retain, message.mid, message.dup)
        )

    def read(self) -> None:
        read_all(self.client)


def talking(
    a: socket.socket, b: socket.socket, protocol: MQTTProtocolVersion
) -> tuple[Client, list[tuple[int, int]], Receiver]:
    """Our client on `a`, its on_publish calls, and a paho receiver on `b`."""
    client = ours(protocol)
    return client, connected(client, a), Receiver(b, protocol)


# Topics and payloads whose remaining lengths take one, two and three bytes.
BATCH = [
    ("gatewayd/gym/athletes/anna/HEART_RATE", b'{"ts":"x","val":71.0}'),
    ("gatewayd/gym/athletes/b\u00f6b/POWER", b"p" * 200),
    ("t", b""),
    ("gatewayd/gym/devices/ble/C0:FF:EE", b"d" * 20_000),
]


@pytest.mark.parametrize("protocol", [V5, V311])
@pytest.mark.parametrize(("qos", "retain"), [(0, False), (1, False), (1, True), (2, False)])
def test_bulk_publish_writes_what_pahos_publish_writes(
    pair: tuple[socket.socket, socket.socket],
    protocol: MQTTProtocolVersion,
    qos: int,
    retain: bool,
) -> None:
    a, b = pair
    reference = paho.Client(CallbackAPIVersion.VERSION2, protocol=protocol)
    connected(reference, a)
    for topic, payload in BATCH:
        reference.publish(topic, payload, qos, retain)
    expected = drain(b)
    client = ours(protocol)
    connected(client, a)
    assert client.publish_many(BATCH, qos, retain) == len(BATCH)
    assert drain(b) == expected
    if qos:  # held as paho's publish() holds them: what its resend and ack handling read
        for mid, theirs in reference._out_messages.items():
            mine = client._out_messages[mid]
            assert type(mine) is Held
            for slot in ("mid", "topic", "payload", "qos", "retain", "dup", "state", "properties"):
                assert getattr(mine, slot) == getattr(theirs, slot), slot
        assert client._inflight_messages == reference._inflight_messages == len(BATCH)
        assert client._last_mid == reference._last_mid
    else:
        assert client._out_messages == {}
    reference._sock = None  # a paho client closes its socket when collected


@pytest.mark.parametrize("protocol", [V5, V311])
def test_pahos_decoder_reads_the_bulk_packets_and_its_acks_settle_them(
    pair: tuple[socket.socket, socket.socket], protocol: MQTTProtocolVersion
) -> None:
    a, b = pair
    client, calls, receiver = talking(a, b, protocol)
    assert client.publish_many(BATCH, 1, False) == len(BATCH)
    assert client.publish_many(BATCH[:2], 0, True) == 2
    receiver.read()
    assert receiver.messages == [
        *[(t, p, 1, False, mid, False) for mid, (t, p) in enumerate(BATCH, 1)],
        *[(t, p, 0, True, 0, False) for t, p in BATCH[:2]],
    ]
    assert client.in_flight() == len(BATCH)  # QoS 0 settled when written, QoS 1 when acked
    assert client.settled == 2
    read_all(client)  # the receiver's PUBACKs
    assert client.settled == 2 + len(BATCH) and client.fast_acks == len(BATCH)
    assert client.in_flight() == 0 and client._inflight_messages == 0
    assert calls == []  # plain acks are counted in bulk, not told one by one


@pytest.mark.parametrize("protocol", [V5, V311])
def test_refusals_and_qos2_still_go_through_paho_to_on_publish(
    pair: tuple[socket.socket, socket.socket], protocol: MQTTProtocolVersion
) -> None:
    a, b = pair
    client, calls, receiver = talking(a, b, protocol)
    client.publish_many([("t/2", b"two")], 2, False)  # mid 1: PUBREC, PUBREL, PUBCOMP
    client.publish_many([("t/1", b"one"), ("t/x", b"x"), ("t/y", b"y")], 1, False)  # 2, 3, 4
    receiver.read()
    assert [m[4] for m in receiver.messages] == [2, 3, 4]
    assert list(receiver.client._in_messages) == [1]  # QoS 2: delivered at PUBREL
    drain(a)  # the receiver's answers: the test answers in its place, with refusals in MQTT 5
    if protocol == V5:
        answers = puback(2) + puback(3, 0x87) + puback(4, 0x00, 0x00)
    else:
        answers = puback(2) + puback(3) + puback(4)
    b.sendall(answers + b"\x50\x02\x00\x01")  # and PUBREC 1
    receiver.client._sock = None
    read_all(client)  # PUBREC 1 -> paho sends PUBREL 1
    assert drain(b) == b"\x62\x02\x00\x01"
    b.sendall(b"\x70\x02\x00\x01")  # PUBCOMP 1
    read_all(client)
    if protocol == V5:
        assert calls == [(3, 0x87), (4, 0), (1, 0)]  # the refusal and the rest via paho
        assert client.settled == 1
    else:
        assert calls == [(1, 0)]
        assert client.settled == 3
    assert client.in_flight() == 0 and client._inflight_messages == 0


def test_an_ack_for_a_message_not_held_is_ignored(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    client = ours()
    connected(client, a)
    client.publish_many([("t", b"x")], 1, False)
    b.sendall(puback(99) + puback(1) + puback(1))
    read_all(client)
    assert client.settled == 1 and client._inflight_messages == 0


def test_a_puback_split_across_reads_is_finished_by_pahos_reader(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    client = ours(V5)
    calls = connected(client, a)
    client.publish_many([(f"t/{i}", b"x") for i in range(4)], 1, False)
    stream = puback(1) + puback(2) + puback(3) + puback(4)
    b.sendall(stream[:6])  # the second PUBACK stops after its length byte
    read_all(client)
    assert client.settled == 1
    assert client._in_packet["command"] == 0x40  # paho holds the part it has
    b.sendall(stream[6:])
    read_all(client)
    assert calls == [(2, 0)]  # finished by paho's reader
    assert client.settled == 3 and client.fast_acks == 3
    assert client._out_messages == {}


def test_a_bulk_ack_of_a_message_of_pahos_own_publish_tells_its_info(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """Acks taken in bulk settle paho's own publish() messages too, as its reader would: their
    MQTTMessageInfo says published, and an ack for an unknown id is ignored."""
    a, b = pair
    client = ours()
    connected(client, a)
    client.publish_many([("t/1", b"one")], 1, False)
    info = client.publish("t/2", b"two", 1)
    client.publish_many([("t/3", b"three")], 1, False)
    drain(b)
    assert sorted(client._out_messages) == [1, 2, 3] and not info.is_published()
    b.sendall(b"".join(b"\x40\x02" + mid.to_bytes(2, "big") for mid in (1, 2, 9, 3)))
    read_all(client)
    assert info.is_published()
    assert client._out_messages == {}
    assert client.settled == 3 and client.fast_acks == 4 and client._inflight_messages == 0


@pytest.mark.parametrize("protocol", [V5, V311])
def test_after_a_reconnect_paho_resends_bulk_messages_as_its_own(
    pair: tuple[socket.socket, socket.socket], protocol: MQTTProtocolVersion
) -> None:
    """paho's reconnect() resets what it holds and its CONNACK handler resends it: the bulk
    messages come out exactly as paho's own publish() messages do (DUP set, same ids)."""
    streams = []
    for kind in ("paho", "bulk"):
        a, b = socket.socketpair()
        for end in (a, b):
            end.setblocking(False)
        client = (
            paho.Client(CallbackAPIVersion.VERSION2, protocol=protocol)
            if kind == "paho"
            else ours(protocol)
        )
        client.connect_async("127.0.0.1", 1)  # reconnect() needs a host
        connected(client, a)
        messages = [("t/1", b"one"), ("t/2", b"two" * 100)]
        if isinstance(client, Client):
            client.publish_many(messages, 1, False)
        else:
            for topic, payload in messages:
                client.publish(topic, payload, 1)
        drain(b)
        c, d = socket.socketpair()
        d.setblocking(False)
        fresh = BatchedSocket(c) if isinstance(client, Client) else c
        client._create_socket = lambda fresh=fresh: fresh  # type: ignore[method-assign]
        client.reconnect()
        client.loop_write()
        assert drain(d)[0] == 0x10  # CONNECT
        d.sendall(b"\x20\x03\x01\x00\x00" if protocol == V5 else b"\x20\x02\x01\x00")  # CONNACK
        read_all(client)
        client.loop_write()
        receiver = Receiver(d, protocol)
        receiver.read()
        streams.append(receiver.messages)
        client._sock = None
        receiver.client._sock = None
        for end in (a, b, c, d):
            end.close()
    reference, bulk = streams
    assert bulk == reference
    assert reference == [
        ("t/1", b"one", 1, False, 1, True),
        ("t/2", b"two" * 100, 1, False, 2, True),
    ]


def test_a_full_output_refuses_the_batch_until_written(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    client = ours()
    connected(client, a)
    big = [("t", b"x" * 60_000)] * 20
    taken = 0
    while client.publish_many(big, 0, False):  # the peer does not read: everything fills up
        taken += len(big)
    assert client._sock.full()
    assert client.want_write()
    while client._sock.full():
        drain(b)
        client.loop_write()
    assert client.publish_many(big[:1], 0, False) == 1
    assert taken * 60_000 > WRITE_HIGH


def test_max_queued_messages_bounds_the_held_messages(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, _ = pair
    client = ours()
    client.max_queued_messages_set(3)
    connected(client, a)
    assert client.publish_many([("t", b"x")] * 5, 1, False) == 3
    assert client.publish_many([("t", b"x")], 1, False) == 0
    assert client.publish_many([("t", b"x")] * 2, 0, False) == 2  # QoS 0 is not held
    windowed = ours()
    windowed.max_inflight_messages_set(4)  # paho's in-flight window, were it set
    connected(windowed, a)
    assert windowed.publish_many([("t", b"x")] * 5, 1, False) == 4
    windowed._sock = None


def test_packet_ids_skip_those_still_unacknowledged(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, _ = pair
    client = ours()
    connected(client, a)
    client.publish_many([("t", b"x")] * 2, 1, False)  # 1, 2
    client._last_mid = 65534
    client.publish_many([("t", b"x")] * 4, 1, False)  # 65535, (1 and 2 held) 3, 4, 5
    assert sorted(client._out_messages) == [1, 2, 3, 4, 5, 65535]


@pytest.mark.parametrize("topic", ["a/+/b", "a/#", ""])
def test_a_topic_paho_refuses_is_refused_before_anything_is_sent(
    pair: tuple[socket.socket, socket.socket], topic: str
) -> None:
    a, _ = pair
    client = ours()
    connected(client, a)
    with pytest.raises(ValueError):
        paho.Client(CallbackAPIVersion.VERSION2).publish(topic, b"x")
    with pytest.raises(ValueError):
        client.publish_many([("ok", b"x"), (topic, b"y")], 1, False)
    assert client._out_messages == {} and not client._sock.has_output()


def test_qos0_bytes_still_buffered_when_the_connection_closes_are_lost(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, _ = pair
    client = ours()
    connected(client, a)
    batch = [("t", b"x" * 1000)] * 100
    total = 0
    while client.publish_many(batch, 0, False):
        total += len(batch)
    assert client.qos0_unsent > 0
    client._sock_close()
    assert client.lost + client.settled == total
    assert client.lost > 0 and client.qos0_unsent == 0 and client.in_flight() == 0


def test_not_connected_takes_nothing() -> None:
    client = ours()
    assert client.publish_many([("t", b"x")], 1, False) == 0


# -- the paho internals the bulk paths rely on ----------------------------------------------


def test_the_paho_internals_the_bulk_paths_use_are_there() -> None:
    client = paho.Client(CallbackAPIVersion.VERSION2)
    assert client._in_packet["command"] == 0  # no packet half read
    assert client._out_messages == {} and client._inflight_messages == 0
    assert client._last_mid == 0 and client._max_inflight_messages == 20
    assert client._max_queued_messages == 0
    assert client._reconnect_delay is None
    for lock in (client._out_message_mutex, client._msgtime_mutex):
        assert hasattr(lock, "acquire") and hasattr(lock, "release")
    assert isinstance(client._last_bytes_received, float)
    assert isinstance(client._last_msg_out, float)
    assert isinstance(paho.time_func(), float)
    assert len(client._out_packet) == 0
    assert set(paho.MQTTMessage.__slots__) == {
        "_topic",
        "dup",
        "info",
        "mid",
        "payload",
        "properties",
        "qos",
        "retain",
        "state",
        "timestamp",
    }
    assert list(inspect.signature(paho.Client._packet_read).parameters) == ["self"]
    assert list(inspect.signature(paho.Client._packet_write).parameters) == ["self"]
    assert list(inspect.signature(paho.Client._sock_close).parameters) == ["self"]
    assert list(inspect.signature(paho.Client._create_socket).parameters) == ["self"]
    assert "_reconnect_delay = None" in inspect.getsource(paho.Client._handle_connack)
    assert PacketTypes.PUBLISH == 3
