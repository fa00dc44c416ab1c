"""Read AcquireNotify sockets in windows, not with an event-loop wake-up per notification.

bleak reads each acquired socket from a reader it registers on the event loop, so every
notification wakes the process once; on a busy machine a wake-up costs far more CPU than the
notification (docs/ble.md). While notifications come faster than `rate_per_window / period`,
the sockets leave the event loop and bleak's own reader is called for each socket that
`poll()` finds readable, once per window; when they slow down, bleak's readers go back on the
event loop and each notification is read the moment it arrives.

Windows end just before each second of the wall clock (and every `period` before that), so a
notification is always read within the second it arrived in and the pipeline, which bins frames
by their reception time, still counts it in that second. Within the second its time is late by
at most `period`, about what a BLE connection interval already blurs.

Only bleak's reader is moved, never replaced: bleak still reads the datagram, detects the end of
the socket, closes it and calls our callback. Finding that reader needs two private attributes of
asyncio's selector event loop; where they are missing, the batcher leaves everything alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import select
import socket
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

MAX_ROUNDS = 16  # poll() rounds per window
MARGIN_S = 0.002  # a window ends this long before a second of the wall clock begins
_GONE = select.POLLHUP | select.POLLERR | select.POLLNVAL


def window_delay(wall: float, period: float, margin: float = MARGIN_S) -> float:
    """Seconds from `wall` to the next window: `margin` before a multiple of `period`.

    `period` divides a second (0.1, 0.125, 0.25 ...), so one window ends just before every
    second of the wall clock.
    """
    steps = math.floor((wall + margin) / period) + 1
    return max(0.0, steps * period - margin - wall)


def windowed(rate: float, period: float, batching: bool) -> bool:
    """Should notifications arriving at `rate` per second be read in windows of `period`?

    Windows cost 1/period wake-ups a second, direct reads one per notification; the gap between
    the two thresholds keeps a rate near the boundary from flapping between the modes.
    """
    if batching:
        return rate * period >= 0.5
    return rate * period >= 1.5


class _Socket:
    __slots__ = ("callback", "args", "identity")

    def __init__(self, callback: Callable[..., Any], args: tuple[Any, ...], identity: Any) -> None:
        self.callback = callback
        self.args = args
        self.identity = identity


def _identity(fd: int) -> tuple[int, int] | None:
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _is_seqpacket(fd: int) -> bool:
    """Is `fd` a notification socket (BlueZ hands out SOCK_SEQPACKET pairs), not a D-Bus link?"""
    try:
        copy = os.dup(fd)
    except OSError:
        return False
    try:
        sock = socket.socket(fileno=copy)  # reads the family and type from the fd
    except OSError:
        os.close(copy)
        return False
    with sock:
        return sock.family == socket.AF_UNIX and sock.type == socket.SOCK_SEQPACKET


class NotifyBatcher:
    """Moves bleak's AcquireNotify readers between the event loop and windowed polling."""

    def __init__(
        self,
        period: float,
        wall: Callable[[], float],
        notes: Callable[[], int],
    ) -> None:
        self.period = period
        self._wall = wall
        self._notes = notes  # notifications delivered so far: bleak delivered one, or not
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sockets: dict[int, _Socket] = {}
        self._poll = select.poll()
        self._batching = False
        self._timer: asyncio.TimerHandle | None = None
        self._second = -1  # the wall second being counted
        self._count = 0  # notifications in it
        self._last_rate = 0.0
        self.windows = 0  # windows read, for the benchmark
        self.enabled = period > 0
        self.switched = asyncio.Event()  # set at every change of mode; tests wait on it

    @property
    def batching(self) -> bool:
        return self._batching

    @property
    def sockets(self) -> int:
        """Notification sockets taken over and still open."""
        return len(self._sockets)

    # ------------------------------------------------------------------ adopting sockets

    def readers(self) -> set[int]:
        """The fds with a reader on the running loop now (to diff around a subscription)."""
        selector = self._selector()
        if selector is None:
            return set()
        return {fd for fd, key in selector.get_map().items() if key.data[0] is not None}

    def adopt(self, fds: set[int]) -> int:
        """Take over bleak's reader of each acquired notification socket among `fds`."""
        selector = self._selector()
        if selector is None:
            return 0
        loop = asyncio.get_running_loop()
        self._loop = loop
        taken = 0
        for fd in fds:
            if fd in self._sockets:
                continue
            try:
                handle = selector.get_key(fd).data[0]
            except (KeyError, ValueError):
                continue
            if handle is None or not _is_seqpacket(fd):
                continue
            identity = _identity(fd)
            if identity is None:
                continue
            self._sockets[fd] = _Socket(handle._callback, handle._args, identity)
            loop.remove_reader(fd)  # cancels bleak's handle; its callback is kept above
            if self._batching:
                self._poll.register(fd, select.POLLIN)
            else:
                loop.add_reader(fd, self._readable, fd)
            taken += 1
        return taken

    def _selector(self) -> Any:
        if not self.enabled:
            return None
        selector = getattr(asyncio.get_running_loop(), "_selector", None)
        if selector is None or not hasattr(selector, "get_map"):
            return None
        return selector

    def close(self) -> None:
        """Give every socket back to bleak's own reader on the loop (the source stops)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        loop = self._loop
        for fd, entry in list(self._sockets.items()):
            self._forget(fd)
            if loop is not None and _identity(fd) == entry.identity:
                loop.add_reader(fd, entry.callback, *entry.args)
        self._batching = False

    # ------------------------------------------------------------------ reading

    def _read(self, fd: int, events: int) -> None:
        """Run bleak's reader for `fd`; forget the socket if bleak closed it."""
        entry = self._sockets.get(fd)
        if entry is None:
            return
        if events & select.POLLNVAL or _identity(fd) != entry.identity:
            self._forget(fd)  # closed behind our back: the number may be someone else's now
            return
        before = self._notes()
        entry.callback(*entry.args)
        self._count_note(self._notes() - before)
        if self._notes() == before and _identity(fd) != entry.identity:
            # bleak read the end of the socket (or an error) and closed it
            self._forget(fd)

    def _forget(self, fd: int) -> None:
        # Never touches the loop: a socket is only forgotten once closed, and its number may
        # already carry someone else's reader there (bleak removed its own before closing).
        self._sockets.pop(fd, None)
        if self._batching:
            with contextlib.suppress(KeyError):
                self._poll.unregister(fd)

    def _readable(self, fd: int) -> None:
        """A socket woke the loop (direct mode)."""
        self._read(fd, select.POLLIN)
        self._decide()

    def _window(self) -> None:
        self._timer = None
        self.windows += 1
        ready = self._poll.poll(0)
        rounds = 1
        # several datagrams may wait on one socket and bleak reads one per call; a bound on
        # the rounds keeps a flooding peer from holding the loop (the rest waits a window)
        while ready:
            for fd, events in ready:
                self._read(fd, events)
            rounds += 1
            ready = self._poll.poll(0) if self._sockets and rounds <= MAX_ROUNDS else []
        self._decide()

    # ------------------------------------------------------------------ mode

    def _count_note(self, delivered: int) -> None:
        second = int(self._wall())
        if second != self._second:
            self._last_rate = self._count if second == self._second + 1 else 0.0
            self._second = second
            self._count = 0
        self._count += delivered

    def _decide(self) -> None:
        self._count_note(0)
        rate = max(self._last_rate, float(self._count))
        want = bool(self._sockets) and windowed(rate, self.period, self._batching)
        if want != self._batching:
            self._set_batching(want)
        if self._batching and self._timer is None and self._loop is not None:
            self._timer = self._loop.call_later(
                window_delay(self._wall(), self.period), self._window
            )

    def _set_batching(self, on: bool) -> None:
        loop = self._loop
        if loop is None or on == self._batching:
            return
        for fd in list(self._sockets):
            if _identity(fd) != self._sockets[fd].identity:
                self._forget(fd)
                continue
            if on:
                loop.remove_reader(fd)
                self._poll.register(fd, select.POLLIN)
            else:
                self._poll.unregister(fd)
                loop.add_reader(fd, self._readable, fd)
        self._batching = on
        self.switched.set()
        log.debug(
            "BLE: %s notification sockets read %s",
            len(self._sockets),
            f"in {self.period:g} s windows" if on else "as they arrive",
        )
        if not on and self._timer is not None:
            self._timer.cancel()
            self._timer = None
