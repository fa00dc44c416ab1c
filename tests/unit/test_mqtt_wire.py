"""The byte batching under paho (gatewayd/sinks/mqtt_wire.py), on real socket pairs."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from gatewayd.sinks.mqtt_wire import (
    READ_SIZE,
    WRITE_HIGH,
    BatchedSocket,
    publish_header,
    remaining_length,
    topic_field,
)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


def test_sends_are_gathered_until_flush_then_written_at_once(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    sock = BatchedSocket(a)
    assert sock.send(b"\x30\x03abc") == 5
    assert sock.send(b"\x30\x02de") == 4
    with pytest.raises(BlockingIOError):
        b.recv(100)  # nothing reached the peer yet
    assert sock.has_output()
    sock.flush()
    assert not sock.has_output()
    assert b.recv(100) == b"\x30\x03abc\x30\x02de"


def test_reads_are_served_from_one_buffer_and_pending_says_so(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    sock = BatchedSocket(a)
    b.sendall(b"\x40\x02\x00\x01" * 3)  # three PUBACKs
    assert sock.recv(1) == b"\x40"
    # what paho has not read yet is pending, so its loop reads again without waiting
    assert sock.pending() == 11
    assert sock.recv(1) == b"\x02"
    assert sock.recv(2) == b"\x00\x01"
    assert sock.recv(100) == b"\x40\x02\x00\x01" * 2
    assert sock.pending() == 0
    with pytest.raises(BlockingIOError):
        sock.recv(1)
    b.close()
    assert sock.recv(1) == b""  # end of stream reaches paho as it is


def test_a_full_buffer_pushes_back_and_a_broken_socket_fails_the_next_read(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    sock = BatchedSocket(a)
    chunk = b"x" * READ_SIZE
    with pytest.raises(BlockingIOError):
        for _ in range(1000):  # the peer never reads: the kernel buffer and then ours fill up
            sock.send(chunk)
    assert sock.has_output()
    b.close()
    sock.flush()
    assert sock.broken is not None and not sock.has_output()
    assert sock.pending() > 0  # paho's loop reads, and the read reports the broken link
    with pytest.raises(OSError):
        sock.recv(1)
    with pytest.raises(OSError):
        sock.send(b"y")
    assert WRITE_HIGH > READ_SIZE


def test_sent_counts_what_the_kernel_took_and_close_writes_the_rest(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    sock = BatchedSocket(a)
    sock.send(b"\x30\x03abc")
    sock.out += b"\xe0\x00"  # the bulk publish appends here directly
    assert sock.sent == 0
    sock.flush()
    assert sock.sent == 7 and b.recv(100) == b"\x30\x03abc\xe0\x00"
    sock.send(b"\xe0\x00")  # a DISCONNECT, which paho follows with close() at once
    sock.close()
    assert b.recv(100) == b"\xe0\x00"
    assert b.recv(100) == b""


@pytest.mark.parametrize(
    "size", [0, 1, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152, 268_435_455]
)
def test_remaining_length_is_what_paho_packs(size: int) -> None:
    client = paho.Client(CallbackAPIVersion.VERSION2)
    assert remaining_length(size) == bytes(client._pack_remaining_length(bytearray(), size))
    assert publish_header(0x32, size) == bytes([0x32]) + remaining_length(size)


def test_topic_fields_are_length_prefixed_utf8() -> None:
    assert topic_field("a/b\u00f6") == b"\x00\x05a/b\xc3\xb6"
    for bad in ("", "a/+", "#", "x" * 65_536):
        with pytest.raises(ValueError):
            topic_field(bad)
