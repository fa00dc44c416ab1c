"""Fewer system calls under paho: batched socket writes and reads, one wake-up per batch.

paho-mqtt writes every packet with its own send(), reads every incoming packet with three or
more recv() calls (command byte, length bytes, body), and pokes its network thread through a
socket pair on every publish(). At a thousand messages a second those calls were most of the
MQTT sink's CPU. These wrappers keep paho's protocol logic (sessions, QoS, resends, TLS) and
only change how bytes cross the kernel boundary:

- `BatchedSocket` collects what paho sends and writes it in one send() when paho has nothing
  more to write (`flush`, called from the client's loop_write); it reads 64 KiB at a time and
  serves paho's small reads from that buffer. `pending()` tells paho's loop that buffered bytes
  are waiting, as an SSL socket does, so buffered input is never left unread.
- `QuietWake` stands in for paho's wake-up socket while the sink hands over a batch, so the
  network thread is woken once per batch instead of once per message.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from typing import Any

READ_SIZE = 1 << 16
WRITE_HIGH = 1 << 18  # buffered output past this makes paho wait for the socket (backpressure)
_AGAIN = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class BatchedSocket:
    """A socket (plain or SSL) whose sends are gathered and whose reads are buffered."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._out = bytearray()
        self._in = bytearray()
        self._lock = threading.Lock()  # close() may come from the loop's thread
        self.broken: OSError | None = None

    # paho reaches fileno(), setblocking(), close() and the like through here
    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)

    def send(self, data: bytes | bytearray | memoryview) -> int:
        if self.broken is not None:
            raise self.broken
        if len(self._out) >= WRITE_HIGH:
            self.flush()
            if len(self._out) >= WRITE_HIGH:
                raise BlockingIOError  # paho keeps the packet and waits for writability
        self._out += data
        return len(data)

    def has_output(self) -> bool:
        return bool(self._out)

    def flush(self) -> None:
        """Write what is gathered, as far as the socket takes it now.

        A broken socket is remembered and raised by the next recv(), where paho's read path
        turns it into a lost connection (and its reconnect logic takes over)."""
        with self._lock:
            while self._out and self.broken is None:
                try:
                    sent = self.sock.send(self._out)
                except _AGAIN:
                    return
                except OSError as exc:
                    self.broken = exc
                    self._out.clear()
                    return
                del self._out[:sent]

    def recv(self, size: int) -> bytes:
        if not self._in:
            if self.broken is not None:
                raise self.broken
            data = self.sock.recv(READ_SIZE)
            if len(data) <= size:
                return data
            self._in += data
        chunk = bytes(self._in[:size])
        del self._in[:size]
        return chunk

    def pending(self) -> int:
        inner = self.sock.pending() if isinstance(self.sock, ssl.SSLSocket) else 0
        return len(self._in) + inner + (1 if self.broken is not None else 0)

    def close(self) -> None:
        with self._lock:
            self._out.clear()
        self._in.clear()
        self.sock.close()


class QuietWake:
    """paho's wake-up socket, silenced while `hold` is on; `release` wakes it once if needed."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.holding = False
        self.owed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)

    def send(self, data: bytes) -> int:
        if self.holding:
            self.owed = True
            return len(data)
        return self.sock.send(data)

    def hold(self) -> None:
        self.holding = True

    def release(self) -> None:
        self.holding = False
        if self.owed:
            self.owed = False
            # full: the thread has wake-ups waiting already; closed: it is being replaced
            with contextlib.suppress(OSError):
                self.sock.send(b"\0")
