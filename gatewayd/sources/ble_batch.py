"""Read AcquireNotify sockets in windows, not with an event-loop wake-up per notification.

bleak reads each acquired socket from a reader it registers on the event loop, so every
notification wakes the process once; a wake-up costs far more CPU than the notification
(docs/ble.md). While notifications come fast enough (gatewayd/sources/ble_windows.py decides),
the sockets leave the event loop, and bleak's own reader is called for each socket that `poll()`
finds readable: whenever the pipeline is about to take frames (it wakes at least twice a second
anyway, FrameQueue.add_drain), and by a timer of our own only when the pipeline has not read them
for `period`, or just before the second of the wall clock ends. The pipeline bins frames by
their reception time, so every notification is still counted in the second it arrived in; within
that second its time is late by at most `period`. When the notifications slow down, bleak's
readers go back on the event loop and each notification is read the moment it arrives.

Only bleak's reader is moved, never replaced: bleak still reads the datagram, detects the end of
the socket, closes it and calls our callback. Finding that reader needs two private attributes of
asyncio's selector event loop; where they are missing, the batcher leaves everything alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import socket
from collections.abc import Callable
from typing import Any

from gatewayd.sources.ble_windows import RateMeter, next_window, windowed

log = logging.getLogger(__name__)

MAX_ROUNDS = 16  # poll() rounds per read: bounds what a flooding peer can hold the loop for


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
        self._meter = RateMeter()
        self._last_read = 0.0  # wall time the sockets were last read while batching
        self.windows = 0  # windows of our own (a timer's wake-up), for the benchmark
        self.flushes = 0  # reads along the pipeline's wake-ups, for the benchmark
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
        before = self._notes()
        self._read(fd, select.POLLIN)
        self._meter.add(self._wall(), self._notes() - before)
        self._decide()

    def _read_ready(self) -> None:
        """Read every socket that holds a notification now (batching)."""
        before = self._notes()
        self._last_read = self._wall()
        ready = self._poll.poll(0)
        rounds = 1
        # several datagrams may wait on one socket and bleak reads one per call; the bound on
        # the rounds keeps a flooding peer from holding the loop (the rest waits for the next)
        while ready:
            for fd, events in ready:
                self._read(fd, events)
            rounds += 1
            ready = self._poll.poll(0) if self._sockets and rounds <= MAX_ROUNDS else []
        self._meter.add(self._last_read, self._notes() - before)

    def flush(self) -> None:
        """Read the sockets now: the pipeline is about to take frames (FrameQueue.add_drain).

        This wake-up is the pipeline's, so it costs none of our own; the timer of our own
        moves to `period` after it.
        """
        if not self._batching:
            return
        self.flushes += 1
        self._read_ready()
        self._decide()

    def _window(self) -> None:
        self._timer = None
        self.windows += 1
        self._read_ready()
        self._decide()

    # ------------------------------------------------------------------ mode

    def _decide(self) -> None:
        wall = self._wall()
        rate = self._meter.rate(wall)
        want = bool(self._sockets) and windowed(rate, self.period, self._batching)
        if want != self._batching:
            self._set_batching(want)
        if self._batching and self._loop is not None:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_later(
                next_window(wall, self._last_read, self.period), self._window
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
        self._last_read = self._wall()
        self.switched.set()
        log.debug(
            "BLE: %s notification sockets read %s",
            len(self._sockets),
            f"in windows of at most {self.period:g} s" if on else "as they arrive",
        )
        if not on and self._timer is not None:
            self._timer.cancel()
            self._timer = None
