"""Drives a paho client (gatewayd/sinks/mqtt_client.py) from the asyncio event loop.

paho's own network thread (loop_start) costs a select() loop, a wake-up socket per hand-over,
a call_soon_threadsafe per callback and lock contention on every message. paho supports
external loops (loop_read / loop_write / loop_misc and the on_socket_* callbacks); this runs it
on the loop the sink lives on:

- the socket is watched with add_reader (loop_read) and, while paho or the batched socket has
  output, add_writer (loop_write); `after_io` is called after each, so the owner can take the
  client's bulk counters and refill it;
- loop_misc every second (keepalive pings, and closing a connection whose ping went
  unanswered), as paho's own loop does;
- connecting and reconnecting, which paho's loop_forever did: each attempt opens the socket in
  a worker thread (Client.prepare: credentials, DNS, TCP, TLS handshake block) and hands it to
  paho on the loop; after a failure or a lost connection it waits paho's backoff (from
  reconnect_min_s doubling to reconnect_max_s; paho resets it on a successful CONNACK). An
  attempt that fails before paho has a socket is reported to `attempt_failed`; refusals and
  losses reach paho's on_connect / on_disconnect as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from gatewayd.sinks.mqtt_client import Client, Prepared

log = logging.getLogger(__name__)

MISC_INTERVAL_S = 1.0  # paho's own loop runs loop_misc about once a second


class LoopDriver:
    def __init__(
        self,
        client: Client,
        *,
        attempt_failed: Callable[[OSError], None],
        after_io: Callable[[], None],
    ) -> None:
        self.client = client
        self._attempt_failed = attempt_failed
        self._after_io = after_io
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd: int | None = None
        self._writing = False
        self._closed = asyncio.Event()  # the current socket is gone
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._misc: asyncio.TimerHandle | None = None
        self._reread: asyncio.Handle | None = None
        client.on_socket_open = self._opened
        client.on_socket_close = self._socket_closed
        client.on_socket_register_write = self._want_write
        client.on_socket_unregister_write = self._no_write

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._connecting(), name="mqtt-connect")
        self._misc = self._loop.call_later(MISC_INTERVAL_S, self._tick)

    async def stop(self) -> None:
        """Stops reconnecting and watching; the owner disconnects the client first."""
        self._stopping.set()
        if self._misc is not None:
            self._misc.cancel()
        if self._reread is not None:
            self._reread.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.client._sock_close()  # closes a socket still open (and unwatches it)

    # -- paho's socket callbacks ---------------------------------------------------------------

    def _opened(self, client: Any, userdata: Any, sock: Any) -> None:
        assert self._loop is not None
        self._fd = sock.fileno()
        self._writing = False
        self._closed.clear()
        self._loop.add_reader(self._fd, self._readable)

    def _socket_closed(self, client: Any, userdata: Any, sock: Any) -> None:
        if self._loop is not None and self._fd is not None:
            self._loop.remove_reader(self._fd)
            self._loop.remove_writer(self._fd)
        self._fd = None
        self._writing = False
        self._closed.set()

    def _want_write(self, client: Any, userdata: Any, sock: Any) -> None:
        if self._loop is not None and self._fd is not None and not self._writing:
            self._writing = True
            self._loop.add_writer(self._fd, self._writable)

    def _no_write(self, client: Any, userdata: Any, sock: Any) -> None:
        if self._loop is not None and self._fd is not None and self._writing:
            self._writing = False
            self._loop.remove_writer(self._fd)

    # -- I/O ---------------------------------------------------------------------------------

    def _readable(self) -> None:
        client = self.client
        client.loop_read()
        sock: Any = client._sock
        # TLS may hold decrypted bytes the socket no longer signals: read them on the next turn
        if sock is not None and sock.pending() and self._loop is not None:
            self._reread = self._loop.call_soon(self._readable)
        self._after_io()

    def _writable(self) -> None:
        self.client.loop_write()
        self._after_io()

    def _tick(self) -> None:
        assert self._loop is not None
        self._misc = self._loop.call_later(MISC_INTERVAL_S, self._tick)
        sock: Any = self.client._sock
        if sock is not None:
            if sock.pending():  # e.g. a write found the socket broken: the read reports it
                self.client.loop_read()
            self.client.loop_misc()
            self._after_io()

    # -- connecting ----------------------------------------------------------------------------

    async def _connecting(self) -> None:
        first = True
        while not self._stopping.is_set():
            if not first:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self._next_delay())
                if self._stopping.is_set():
                    return
            first = False
            try:
                prepared = await self._prepare()
                self.client.connect_prepared(prepared)
            except OSError as exc:
                self._attempt_failed(exc)
                continue
            except Exception:  # a bug here must not end reconnecting for good
                log.exception("MQTT: connection attempt failed unexpectedly")
                continue
            await self._closed.wait()
            while self.client._sock is not None:  # paho opened another itself: wait on that
                await self._closed.wait()

    def _next_delay(self) -> float:
        """paho's backoff (Client._reconnect_wait), which its CONNACK handler resets."""
        client = self.client
        delay: float | None = client._reconnect_delay
        low: float = client._reconnect_min_delay
        high: float = client._reconnect_max_delay
        delay = low if delay is None else min(delay * 2, high)
        client._reconnect_delay = delay  # type: ignore[assignment]
        return delay

    async def _prepare(self) -> Prepared:
        assert self._loop is not None
        future = self._loop.run_in_executor(None, self.client.prepare)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(_close_prepared)  # stopped meanwhile: nobody takes it
            raise


def _close_prepared(future: asyncio.Future[Prepared]) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result()[0].close()
