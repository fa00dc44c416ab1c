"""The bytes under paho: batched socket I/O and the PUBLISH packet's fixed parts.

paho-mqtt writes every packet with its own send() and reads every incoming packet with three or
more recv() calls (command byte, length bytes, body). At a thousand messages a second those
calls were most of the MQTT sink's CPU. `BatchedSocket` keeps paho's protocol logic (sessions,
QoS, resends, TLS) and only changes how bytes cross the kernel boundary:

- What is sent is gathered in `out` and written in one send() per turn (`flush`); `sent`
  counts the bytes the kernel has taken, so a caller that appended a packet at offset N knows it
  left once `sent` passes N. Reads take 64 KiB at a time and serve paho's small reads from that
  buffer; `pending()` tells paho's loop that buffered bytes are waiting, as an SSL socket does,
  so buffered input is never left unread. `take_pubacks` hands the client
  (gatewayd/sinks/mqtt_client.py) the run of plain PUBACKs at the head of that buffer, so a
  burst of acknowledgements is handled in one go instead of packet by packet.
- `publish_header` and `topic_field` are the parts of a PUBLISH packet (MQTT 5.0 §3.3, 3.1.1
  §3.3) that the client's bulk publish puts around each payload.
"""

from __future__ import annotations

import functools
import socket
import ssl
import struct
from typing import Any

READ_SIZE = 1 << 16
WRITE_HIGH = 1 << 18  # buffered output past this makes paho wait for the socket (backpressure)
_AGAIN = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
# PUBACK reason codes that say the message was accepted (MQTT 5.0 §3.4.2.1): Success, and
# No matching subscribers (what mosquitto answers while nobody subscribes to the topic).
PUBACK_ACCEPTED = (0x00, 0x10)
PUBLISH = 0x30
MAX_TOPIC = 65535  # a UTF-8 string's two-byte length (MQTT 5.0 §1.5.4)


_SHORT_ACK = struct.Struct(">2xH")  # 40 02 <id>
_CODED_ACK = struct.Struct(">2xHx")  # 40 03 <id> <code>
_ACCEPTED = bytes(PUBACK_ACCEPTED)


def plain_pubacks(data: bytes | bytearray, v5: bool) -> tuple[list[int], int]:
    """Packet ids of the complete plain PUBACKs at the head of `data`, and the bytes they take.
    Plain: `40 02 <id>` (no reason code: Success), or in MQTT 5 `40 03 <id> <code>` with an
    accepting code. Stops at anything else, a PUBACK cut short included."""
    # A buffer of only one of the two forms (what a broker sends while it accepts everything)
    # is checked and unpacked at C speed: if every 4th byte from the first is 40 and every
    # 4th from the second is 02, each 4 bytes are one PUBACK, by induction from the start.
    n = len(data) // 4
    if n and data[: 4 * n : 4] == b"\x40" * n and data[1 : 4 * n : 4] == b"\x02" * n:
        return [mid for (mid,) in _SHORT_ACK.iter_unpack(data[: 4 * n])], 4 * n
    n = len(data) // 5
    if (
        v5
        and n
        and data[: 5 * n : 5] == b"\x40" * n
        and data[1 : 5 * n : 5] == b"\x03" * n
        and not data[4 : 5 * n : 5].translate(None, _ACCEPTED)
    ):
        return [mid for (mid,) in _CODED_ACK.iter_unpack(data[: 5 * n])], 5 * n
    return _pubacks_one_by_one(data, v5)


def _pubacks_one_by_one(data: bytes | bytearray, v5: bool) -> tuple[list[int], int]:
    mids: list[int] = []
    at = 0
    end = len(data)
    while at + 4 <= end and data[at] == 0x40:
        size = data[at + 1]
        if size == 2:
            mids.append(data[at + 2] << 8 | data[at + 3])
            at += 4
        elif size == 3 and v5 and at + 5 <= end and data[at + 4] in PUBACK_ACCEPTED:
            mids.append(data[at + 2] << 8 | data[at + 3])
            at += 5
        else:
            break
    return mids, at


def remaining_length(size: int) -> bytes:
    """MQTT's variable byte integer (MQTT 5.0 §1.5.5): 7 bits a byte, low first."""
    out = bytearray()
    while True:
        size, digit = size >> 7, size & 0x7F
        if size:
            out.append(digit | 0x80)
        else:
            out.append(digit)
            return bytes(out)


def publish_header(command: int, size: int) -> bytes:
    """The fixed header of a PUBLISH with `size` bytes after it."""
    return bytes((command,)) + remaining_length(size)


@functools.lru_cache(maxsize=16)
def headers(command: int) -> dict[int, bytes]:
    """publish_header(command, size) by size, filled as sizes come (a gym's messages take a
    few hundred sizes; past MAX_HEADERS the rest are made each time)."""
    return {}


MAX_HEADERS = 4096


def topic_field(topic: str) -> bytes:
    """A topic name as it appears in a PUBLISH: length-prefixed UTF-8 without wildcards
    (MQTT 5.0 §3.3.2.1). ValueError for what paho's publish() refuses too."""
    encoded = topic.encode()
    if not encoded or b"+" in encoded or b"#" in encoded or len(encoded) > MAX_TOPIC:
        raise ValueError(f"invalid topic for a PUBLISH: {topic!r}")
    return len(encoded).to_bytes(2, "big") + encoded


class BatchedSocket:
    """A socket (plain or SSL) whose sends are gathered and whose reads are buffered."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.out = bytearray()  # appended to by send() and by the client's bulk publish
        self.sent = 0  # bytes the kernel has taken, since this socket was made
        self._in = bytearray()
        self.broken: OSError | None = None

    # paho reaches fileno(), setblocking() and the like through here
    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)

    def send(self, data: bytes | bytearray | memoryview) -> int:
        if self.broken is not None:
            raise self.broken
        if len(self.out) >= WRITE_HIGH:
            self.flush()
            if len(self.out) >= WRITE_HIGH:
                raise BlockingIOError  # paho keeps the packet and waits for writability
        self.out += data
        return len(data)

    def has_output(self) -> bool:
        return bool(self.out)

    def full(self) -> bool:
        return len(self.out) >= WRITE_HIGH

    def flush(self) -> None:
        """Write what is gathered, as far as the socket takes it now.

        A broken socket is remembered and raised by the next recv(), where paho's read path
        turns it into a lost connection (and the reconnect logic takes over)."""
        out = self.out
        while out and self.broken is None:
            try:
                sent = self.sock.send(out)
            except _AGAIN:
                return
            except OSError as exc:
                self.broken = exc
                out.clear()
                return
            del out[:sent]
            self.sent += sent

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

    def take_pubacks(self, v5: bool) -> list[int] | None:
        """The packet ids of the plain PUBACKs at the head of the input (`plain_pubacks`),
        consumed; [] when something else is next (paho reads it); None when nothing is readable
        now. Reads the socket once if nothing is buffered."""
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
        mids, used = plain_pubacks(self._in, v5)
        if used:
            del self._in[:used]
        return mids

    def pending(self) -> int:
        inner = self.sock.pending() if isinstance(self.sock, ssl.SSLSocket) else 0
        return len(self._in) + inner + (1 if self.broken is not None else 0)

    def close(self) -> None:
        """Closes the socket after a last write of what is gathered (paho closes right after
        queueing a DISCONNECT), as far as the socket takes it without waiting."""
        self.flush()
        self.out.clear()
        self._in.clear()
        self.sock.close()
