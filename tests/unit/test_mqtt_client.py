"""paho's client with gatewayd's fast paths (gatewayd/sinks/mqtt_client.py).

The fast paths lean on paho internals. These tests hold them against paho itself: its own
PUBACK decoder and its own reader on the same bytes, and its own MQTTMessageInfo. A paho
release that changes what they rely on fails here, not quietly in the daemon.
"""

from __future__ import annotations

import inspect
import socket
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt import _packet
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes

from gatewayd.sinks.mqtt_client import (
    ACK_PROPERTIES,
    ACK_REASONS,
    Client,
    LeanInfo,
    install_lean_info,
)
from gatewayd.sinks.mqtt_wire import PUBACK_ACCEPTED, BatchedSocket, plain_pubacks
from tests.unit.test_mqtt_wire import pair

__all__ = ["pair"]  # a fixture, imported for pytest

V5 = MQTTProtocolVersion.MQTTv5
V311 = MQTTProtocolVersion.MQTTv311
WAIT_S = 10.0  # a guard against hanging: every wait here ends early on its event


def puback(mid: int, *rest: int) -> bytes:
    body = bytes([mid >> 8, mid & 0xFF, *rest])
    return bytes([0x40, len(body)]) + body


def test_plain_pubacks_decode_as_pahos_own_decoder_does() -> None:
    packets = [puback(1), puback(2, 0x10), puback(0xFFFF, 0x00), puback(0x0100)]
    acks, used = plain_pubacks(b"".join(packets), v5=True)
    assert used == sum(map(len, packets))
    assert len(acks) == len(packets)
    for (mid, code), packet in zip(acks, packets, strict=True):
        reference = _packet.decode_puback(packet[0], packet[2:], V5)
        assert mid == reference.mid
        assert ACK_REASONS[code].value == reference.reason.value
        assert ACK_REASONS[code].packetType == reference.reason.packetType == PacketTypes.PUBACK
        assert not reference.reason.is_failure
        assert ACK_PROPERTIES.pack() == reference.properties.pack() == b"\x00"
    # MQTT 3.1.1 has only the two-byte form
    assert plain_pubacks(puback(7), v5=False) == ([(7, 0)], 4)


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
    assert plain_pubacks(head + tail + puback(3), v5) == ([(1, 0), (2, 0)], len(head))
    assert plain_pubacks(tail, v5) == ([], 0)


@pytest.mark.parametrize("cut", [puback(5)[:1], puback(5)[:3], puback(5, 0x10)[:4]])
def test_plain_pubacks_leave_a_packet_cut_short_for_later(cut: bytes) -> None:
    head = puback(1) + puback(2)
    assert plain_pubacks(head + cut, v5=True) == ([(1, 0), (2, 0)], len(head))


def test_accepting_codes_are_the_ones_paho_counts_as_success() -> None:
    for code in PUBACK_ACCEPTED:
        assert not ACK_REASONS[code].is_failure
        assert ACK_REASONS[code].getName() in ("Success", "No matching subscribers")


# -- the fast path against paho's own reader, on the same bytes ------------------------------


def attached(client: paho.Client, sock: Any) -> list[tuple[int, int, int, bytes]]:
    """`client` talking over `sock` with paho's state as after a CONNACK; its on_publish calls."""
    calls: list[tuple[int, int, int, bytes]] = []

    def on_publish(c: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        calls.append((mid, reason.value, reason.packetType, properties.pack()))

    client.on_publish = on_publish
    client._sock = sock
    return calls


def read_all(client: paho.Client) -> None:
    for _ in range(1000):
        if client._packet_read() != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return
    raise AssertionError("the reader never ran dry")


def ours(
    protocol: MQTTProtocolVersion, written: Callable[[list[int]], None] | None = None
) -> Client:
    return Client(
        CallbackAPIVersion.VERSION2,
        protocol=protocol,
        credentials=lambda: (None, None),
        attempt_failed=lambda exc: None,
        written=written,
    )


@pytest.mark.parametrize("protocol", [V5, V311])
def test_the_fast_path_tells_on_publish_what_pahos_reader_tells_it(
    pair: tuple[socket.socket, socket.socket], protocol: MQTTProtocolVersion
) -> None:
    a, b = pair
    if protocol == V5:
        answers = [puback(1), puback(2, 0x10), puback(3, 0x87), puback(4, 0x00, 0x00), puback(5)]
    else:
        answers = [puback(1), puback(2), puback(3), puback(4), puback(5)]
    answers.append(puback(99))  # an ack for a message the client does not hold: ignored
    results = []
    for client in (paho.Client(CallbackAPIVersion.VERSION2, protocol=protocol), ours(protocol)):
        sock = BatchedSocket(a) if isinstance(client, Client) else a
        calls = attached(client, sock)
        infos = [client.publish(f"t/{i}", b"x", qos=1) for i in range(6)]
        assert [info.mid for info in infos] == [1, 2, 3, 4, 5, 6]
        b.recv(1 << 16)  # the PUBLISH packets
        b.sendall(b"".join(answers))
        read_all(client)
        if isinstance(client, Client):  # 3 (a refusal) and 4 (properties) went to paho's reader
            assert client.fast_acks == (4 if protocol == V5 else 6)
        results.append(
            (calls, [info.is_published() for info in infos], sorted(client._out_messages))
        )
    reference, fast = results
    assert fast == reference
    assert reference[0][0] == (1, 0, PacketTypes.PUBACK, b"\x00")
    assert reference[1] == [True] * 5 + [False]  # 6 was never acknowledged
    assert reference[2] == [6]


def test_a_puback_split_across_reads_is_finished_by_pahos_reader(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    client = ours(V5)
    calls = attached(client, BatchedSocket(a))
    for i in range(4):
        client.publish(f"t/{i}", b"x", qos=1)
    b.recv(1 << 16)
    stream = puback(1) + puback(2) + puback(3) + puback(4)
    b.sendall(stream[:6])  # the second PUBACK stops after its length byte
    read_all(client)
    assert [c[0] for c in calls] == [1]
    assert client._in_packet["command"] == 0x40  # paho holds the part it has
    b.sendall(stream[6:])
    read_all(client)
    assert [c[0] for c in calls] == [1, 2, 3, 4]
    assert client.fast_acks == 3  # 1, then 3 and 4 in one go; 2 by paho's reader
    assert client._out_messages == {}


def test_the_paho_internals_the_fast_path_uses_are_there() -> None:
    client = paho.Client(CallbackAPIVersion.VERSION2)
    assert client._in_packet["command"] == 0  # no packet half read
    assert client._out_messages == {}
    for lock in (client._out_message_mutex, client._msgtime_mutex):
        assert hasattr(lock, "acquire") and hasattr(lock, "release")
    assert isinstance(client._last_bytes_received, float)
    assert isinstance(paho.time_func(), float)
    assert list(inspect.signature(paho.Client._do_on_publish).parameters) == [
        "self",
        "mid",
        "reason_code",
        "properties",
    ]
    assert list(inspect.signature(paho.Client._packet_read).parameters) == ["self"]


# -- the message info without a Condition of its own -----------------------------------------


def test_paho_builds_lean_infos_that_hold_what_its_own_hold() -> None:
    ours(V5)
    assert paho.MQTTMessageInfo is LeanInfo
    message = paho.MQTTMessage(7, b"t")
    assert type(message.info) is LeanInfo
    original = paho.MQTTMessageInfo.__mro__[1](7)  # paho's own class
    assert type(original) is not LeanInfo
    for slot in set(original.__slots__) - {"_condition"}:
        assert getattr(message.info, slot) == getattr(original, slot), slot
    assert tuple(message.info) == tuple(original) == (MQTTErrorCode.MQTT_ERR_SUCCESS, 7)
    assert not message.info.is_published()


def test_wait_for_publish_wakes_each_waiter_for_its_own_message() -> None:
    install_lean_info()
    first, second = paho.MQTTMessage(1).info, paho.MQTTMessage(2).info
    done: list[int] = []

    def wait(info: paho.MQTTMessageInfo) -> None:
        info.wait_for_publish(WAIT_S)
        done.append(info.mid)

    threads = [threading.Thread(target=wait, args=(info,)) for info in (first, second)]
    for thread in threads:
        thread.start()
    second._set_as_published()
    threads[1].join(WAIT_S)
    assert done == [2]
    assert threads[0].is_alive()  # its message is not published: it still waits
    first._set_as_published()
    threads[0].join(WAIT_S)
    assert done == [2, 1]


def test_an_unknown_message_info_class_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    class Changed:
        __slots__ = ("mid",)

    monkeypatch.setattr(paho, "MQTTMessageInfo", Changed)
    assert install_lean_info() is False
    assert paho.MQTTMessageInfo is Changed


# -- QoS 0 messages written, reported in bulk ------------------------------------------------


@pytest.mark.parametrize("protocol", [V5, V311])
def test_qos0_writes_reach_written_and_the_rest_still_reaches_on_publish(
    pair: tuple[socket.socket, socket.socket], protocol: MQTTProtocolVersion
) -> None:
    a, b = pair
    results = []
    written: list[list[int]] = []
    # both alive to the end: a paho client closes its socket when collected
    clients = (
        paho.Client(CallbackAPIVersion.VERSION2, protocol=protocol),
        ours(protocol, written.append),
    )
    for client in clients:
        calls = attached(client, BatchedSocket(a) if isinstance(client, Client) else a)
        infos = [client.publish(f"t/{i}", b"x", qos=0) for i in range(3)]
        infos.append(client.publish("t/q1", b"y", qos=1))
        client.loop_write()
        wire = b.recv(1 << 16)
        b.sendall(puback(4))
        read_all(client)
        done = sorted([c[0] for c in calls] + [mid for batch in written for mid in batch])
        results.append((wire, done, [info.is_published() for info in infos]))
        if isinstance(client, Client):
            assert [c[0] for c in calls] == [4]  # on_publish only for the QoS 1 ack
            assert sorted(mid for batch in written for mid in batch) == [1, 2, 3]
    reference, bulk = results
    assert bulk == reference
    assert reference[1] == [1, 2, 3, 4] and reference[2] == [True] * 4


def test_without_lean_infos_qos0_writes_go_to_on_publish(
    pair: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    class Changed(paho.MQTTMessageInfo.__mro__[-2]):  # type: ignore[misc,name-defined]
        __slots__ = ()

    monkeypatch.setattr(paho, "MQTTMessageInfo", Changed)
    a, _ = pair
    written: list[list[int]] = []
    client = ours(V5, written.append)
    calls = attached(client, BatchedSocket(a))
    client.publish("t/0", b"x", qos=0)
    client.loop_write()
    assert written == []
    assert [c[0] for c in calls] == [1]
