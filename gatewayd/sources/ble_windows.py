"""When busy AcquireNotify sockets are read: the rules of notification windows, on given times.

Pure: every function takes the wall-clock time it decides for; gatewayd/sources/ble_batch.py
holds the sockets and the timer. docs/ble.md "Notification windows" explains the trade.
"""

from __future__ import annotations

import math

MARGIN_S = 0.002  # the sockets are read this long before a second of the wall clock begins


def window_delay(wall: float, period: float, margin: float = MARGIN_S) -> float:
    """Seconds from `wall` to the next instant `margin` before a multiple of `period`.

    With `period` 1.0: to just before the end of the second `wall` is in (or of the next one,
    once `wall` is inside the margin).
    """
    steps = math.floor((wall + margin) / period) + 1
    return max(0.0, steps * period - margin - wall)


def next_window(wall: float, last_read: float, period: float, margin: float = MARGIN_S) -> float:
    """Seconds from `wall` until the sockets must be read by a window of the batcher's own.

    `last_read` is when they were last read, by a window or along the pipeline's own wake-up
    (which happens at least twice a second anyway). A window is due `period` after that read, so
    a notification waits at most `period`, and in any case just before the second ends, so every
    notification is read in the second it arrived in.
    """
    return max(0.0, min(window_delay(wall, 1.0, margin), last_read + period - wall))


def windowed(rate: float, period: float, batching: bool) -> bool:
    """Should notifications arriving at `rate` per second be read in windows of `period`?

    Windows cost at most 1/period wake-ups a second (fewer while the pipeline's wake-ups read
    the sockets), direct reads one per notification; the gap between the two thresholds keeps a
    rate near the boundary from flapping between the modes.
    """
    if batching:
        return rate * period >= 0.5
    return rate * period >= 1.5


class RateMeter:
    """Notifications per second of the wall clock, for choosing the mode."""

    __slots__ = ("_second", "_count", "_last")

    def __init__(self) -> None:
        self._second = -1  # the wall second being counted
        self._count = 0  # notifications in it
        self._last = 0.0  # notifications in the second before, if it was the one just before

    def add(self, wall: float, count: int) -> None:
        second = int(wall)
        if second != self._second:
            self._last = self._count if second == self._second + 1 else 0.0
            self._second = second
            self._count = 0
        self._count += count

    def rate(self, wall: float) -> float:
        """The last whole second's count, or this second's once it is larger."""
        self.add(wall, 0)
        return max(self._last, float(self._count))
