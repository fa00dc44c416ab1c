"""The byte batching under paho (gatewayd/sinks/mqtt_wire.py), on real socket pairs."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from gatewayd.sinks.mqtt_wire import READ_SIZE, WRITE_HIGH, BatchedSocket, QuietWake


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


def test_quiet_wake_wakes_once_per_batch(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    wake = QuietWake(a)
    wake.hold()
    for _ in range(500):
        wake.send(b"x")
    wake.release()
    assert b.recv(10_000) == b"\0"
    wake.hold()
    wake.release()  # nothing was sent while holding: no wake-up
    with pytest.raises(BlockingIOError):
        b.recv(10)
    wake.send(b"x")  # not holding: straight through, as paho expects
    assert b.recv(10) == b"x"
