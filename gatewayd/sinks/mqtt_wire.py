"""Fewer system calls under paho: batched socket writes and reads, one wake-up per batch.

paho-mqtt writes every packet with its own send(), reads every incoming packet with three or
more recv() calls (command byte, length bytes, body), and pokes its network thread through a
socket pair on every publish(). At a thousand messages a second those calls were most of the
MQTT sink's CPU. These wrappers keep paho's protocol logic (sessions, QoS, resends, TLS) and
only change how bytes cross the kernel boundary:

- `BatchedSocket` collects what paho sends and writes it in one send() when paho has nothing
  more to write (`flush`, called from the client's loop_write); it reads 64 KiB at a time and
  serves paho's small reads from that buffer. `pending()` tells paho's loop that buffered bytes
  are waiting, as an SSL socket does, so buffered input is never left unread. `take_pubacks`
  hands the client (gatewayd/sinks/mqtt_client.py) the run of plain PUBACKs at the head of that
  buffer, so a burst of acknowledgements is handled in one go instead of packet by packet.
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
# PUBACK reason codes that say the message was accepted (MQTT 5.0 §3.4.2.1): Success, and
# No matching subscribers (what mosquitto answers while nobody subscribes to the topic).
PUBACK_ACCEPTED = (0x00, 0x10)


def plain_pubacks(data: bytes | bytearray, v5: bool) -> tuple[list[tuple[int, int]], int]:
    """(packet id, reason code) of the complete plain PUBACKs at the head of `data`, and the
    bytes they take. Plain: `40 02 <id>` (no reason code: Success), or in MQTT 5 `40 03 <id>
    <code>` with an accepting code. Stops at anything else, a PUBACK cut short included."""
    acks: list[tuple[int, int]] = []
    at = 0
    end = len(data)
    while at + 4 <= end and data[at] == 0x40:
        size = data[at + 1]
        if size == 2:
            acks.append((data[at + 2] << 8 | data[at + 3], 0))
            at += 4
        elif size == 3 and v5 and at + 5 <= end and data[at + 4] in PUBACK_ACCEPTED:
            acks.append((data[at + 2] << 8 | data[at + 3], data[at + 4]))
            at += 5
        else:
            break
    return acks, at


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

    def take_pubacks(self, v5: bool) -> list[tuple[int, int]] | None:
        """The plain PUBACKs at the head of the input (`plain_pubacks`), consumed; [] when something
        else is next (paho reads it); None when nothing is readable now. Reads the socket once
        if nothing is buffered."""
        if not self._in:
            if self.broken is not None:
                return []  # paho's next read raises it
            try:
                data = self.sock.recv(READ_SIZE)
            except _AGAIN:
                return None
            except OSError as exc:
                self.broken = exc
                return []
            if not data:
                return []  # end of stream: paho's own read sees it again
            self._in += data
        acks, used = plain_pubacks(self._in, v5)
        if used:
            del self._in[:used]
        return acks

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
