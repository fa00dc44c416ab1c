"""PURE. A consumer's live DISPATCHes while its socket is full, and when to give up on it.

Sans-I/O like gatewayd.protocol: the broker passes encoded frames and the monotonic time in, and
writes out what `take()` hands back once the socket drains.

The queue holds at most `limit` frames; past that the oldest go (counted), so a consumer that
falls behind costs the hub a bounded amount of memory and sees a seq gap it can REPLAY. Dropping
starts an episode that ends only when the queue empties (the consumer caught up). A consumer
whose episode has lasted `stall_s` is not merely slow but stuck (it reads nothing, or less than
the stream): the broker closes it, which frees its queue and its socket's buffers for good.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

DEFAULT_LIMIT = 10_000
DEFAULT_STALL_S = 60.0


@dataclass(frozen=True, slots=True)
class Overflow:
    """Frames dropped by one push; `started` is True for the first drop of an episode."""

    dropped: int
    started: bool


class SendQueue:
    def __init__(self, *, limit: int = DEFAULT_LIMIT, stall_s: float = DEFAULT_STALL_S) -> None:
        if limit < 1 or not stall_s > 0:
            raise ValueError("need limit >= 1 and stall_s > 0")
        self.limit = limit
        self.stall_s = stall_s
        self.dropped = 0  # over the connection's life
        self.nbytes = 0  # what the held frames weigh
        self._frames: deque[bytes] = deque()
        self._since: float | None = None  # when the current dropping episode began

    def __len__(self) -> int:
        return len(self._frames)

    @property
    def dropping(self) -> bool:
        return self._since is not None

    def push(self, frames: list[bytes], now: float) -> Overflow | None:
        """Hold `frames` behind the others; the oldest beyond `limit` go."""
        held = self._frames
        held.extend(frames)
        self.nbytes += sum(map(len, frames))
        excess = len(held) - self.limit
        if excess <= 0:
            return None
        for _ in range(excess):
            self.nbytes -= len(held.popleft())
        self.dropped += excess
        started = self._since is None
        if started:
            self._since = now
        return Overflow(excess, started)

    def take(self) -> bytes:
        """Everything held, in order, as one write; the queue is then empty."""
        data = b"".join(self._frames)
        self._frames.clear()
        self.nbytes = 0
        return data

    def caught_up(self) -> bool:
        """The socket took everything held: ends a dropping episode (True if one ended)."""
        ended = self._since is not None and not self._frames
        if ended:
            self._since = None
        return ended

    def stalled(self, now: float) -> bool:
        """Dropping for `stall_s` without once catching up: close this consumer."""
        return self._since is not None and now - self._since >= self.stall_s

    def clear(self) -> None:
        self._frames.clear()
        self.nbytes = 0
