"""What a benchmark consumer counts as receiving a DISPATCH, and when.

bench/daemon.py's consumers read their sockets with recvmsg() and note two times for every read:
when the kernel queued the read's last bytes on the socket (SO_TIMESTAMPING, software receive
time) and when recvmsg() returned them to the consumer. A DISPATCH is received by the read that
holds its last byte, so both times are upper bounds for every frame in the read. Frames are
picked out of the bytes afterwards with one regular expression per read (C speed), so even ten
consumers in two processes cost the host little, and parsing never delays a timestamp.

A second closes at ts + 1 s for per-second samples (their ts is the start of the second). A
per-beat RR_INTERVAL sample carries its beat's own time instead and leaves with the second in
which the hub heard it, after the strap reported it; its figure (from the beat) is kept apart.
"""

from __future__ import annotations

import re
import socket
import struct
from collections import Counter
from datetime import UTC, datetime

# SO_TIMESTAMPING (linux/net_tstamp.h): software receive timestamps, reported in recvmsg().
SO_TIMESTAMPING = getattr(socket, "SO_TIMESTAMPING", 37)
TIMESTAMPING_FLAGS = (1 << 3) | (1 << 4)  # SOF_TIMESTAMPING_RX_SOFTWARE | _SOFTWARE
ANCILLARY = socket.CMSG_SPACE(48)  # struct scm_timestamping: three struct timespec

MARK = b'{"op":5,'  # every DISPATCH frame's payload starts so
END = b'"}'  # ... and ends so (`"t":"TYPE"}`); nothing inside a DISPATCH ends a string at a brace
_DISPATCH = re.compile(
    rb'\{"op":5,"d":\{"ts":"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.(\d{3})Z"[^}]*\},'
    rb'"uid":"[^"]*","seq":(\d+),"t":"([A-Z_]+)"\}'
)
PER_BEAT = b"RR_INTERVAL"


def kernel_time(ancillary: list[tuple[int, int, bytes]]) -> float | None:
    """The software receive time from recvmsg()'s ancillary data, if the kernel gave one."""
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPING and len(data) >= 16:
            seconds, nanoseconds = struct.unpack_from("qq", data)
            if seconds:
                return seconds + nanoseconds / 1e9
    return None


class Receipts:
    """One consumer's stream: counts, seqs and latencies, fed one socket read at a time.

    Latencies are kept as (kernel, read, count) rows: one row per second of samples per read."""

    def __init__(self) -> None:
        self._keep = b""
        self.count = 0
        self.first_seq = 0
        self.last_seq = 0
        self.unparsed = 0  # DISPATCHes the expression did not recognise (should stay 0)
        self.per_second: list[tuple[float, float, int]] = []
        self.per_beat: list[tuple[float, float, int]] = []
        self._closes: dict[bytes, float] = {}

    def feed(self, data: bytes, kernel: float, read: float, measuring: bool) -> None:
        data = self._keep + data
        cut = data.rfind(END) + 2
        if cut < 2:
            self._keep = data
            return
        complete, self._keep = data[:cut], data[cut:]
        rows = _DISPATCH.findall(complete)
        self.unparsed += complete.count(MARK) - len(rows)
        if not rows:
            return
        self.count += len(rows)
        if not self.first_seq:
            self.first_seq = int(rows[0][2])
        self.last_seq = int(rows[-1][2])
        if not measuring:
            return
        groups = Counter((second, ms if kind == PER_BEAT else b"") for second, ms, _, kind in rows)
        for (second, ms), n in groups.items():
            close = self.close_of(second)
            if ms:
                beat = close - 1.0 + int(ms) / 1000
                self.per_beat.append((kernel - beat, read - beat, n))
            else:
                self.per_second.append((kernel - close, read - close, n))

    def close_of(self, second: bytes) -> float:
        close = self._closes.get(second)
        if close is None:
            start = datetime.fromisoformat(second.decode()).replace(tzinfo=UTC)
            close = self._closes[second] = start.timestamp() + 1.0
            if len(self._closes) > 10_000:
                self._closes.clear()
        return close

    @property
    def gaps(self) -> int:
        if not self.count:
            return 0
        return max(0, self.last_seq - self.first_seq + 1 - self.count)


def percentile(rows: list[tuple[float, int]], q: float) -> float:
    """The q-quantile (0..1) of values given as (value, count) rows; NaN when empty."""
    total = sum(n for _, n in rows)
    if not total:
        return float("nan")
    rank = min(total - 1, int(q * total))
    seen = 0
    for value, n in sorted(rows):
        seen += n
        if seen > rank:
            return value
    return rows[-1][0]
