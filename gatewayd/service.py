"""systemd's notify protocol: READY=1, WATCHDOG=1, STATUS= and STOPPING=1 over $NOTIFY_SOCKET.

Spoken with the stdlib socket module (one datagram per message), so the daemon needs no libsystemd
binding. Outside systemd ($NOTIFY_SOCKET unset) every call is a cheap no-op.

The watchdog ping is sent by an asyncio task on the daemon's own event loop, not by a thread: a
loop that is stuck (a blocking call, a busy coroutine) stops pinging, and systemd restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

# STATUS= is refreshed this often (only when it changed); a shorter watchdog period wins.
STATUS_EVERY_S = 5.0


class Notifier:
    """Sends sd_notify messages; never raises, never blocks the event loop."""

    def __init__(self, address: str | None) -> None:
        self.address = _socket_address(address) if address else None
        self.sent = 0
        self.failed = 0
        self._sock: socket.socket | None = None
        self._warned = False
        if address and self.address is None:
            log.warning("NOTIFY_SOCKET=%s is not a unix socket; not notifying systemd", address)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Notifier:
        return cls((os.environ if env is None else env).get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send one datagram of newline-separated `KEY=value` fields; False if it did not go."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # A full socket buffer on systemd's side must cost a lost ping, not a stuck loop.
                sock.setblocking(False)
                self._sock = sock
            self._sock.sendto("\n".join(fields).encode("utf-8", "replace"), self.address)
        except OSError as exc:
            self.failed += 1
            if not self._warned:
                self._warned = True
                log.warning("cannot notify systemd at %s: %s", self.address, exc)
            return False
        self.sent += 1
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *_status_field(status))

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", *_status_field(status))

    def status(self, text: str) -> bool:
        return self.send(*_status_field(text))

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between pings (half of WatchdogSec=), or None when systemd asked for none."""
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    # WATCHDOG_PID names the process systemd watches; a child that inherited the variable is not it.
    owner = env.get("WATCHDOG_PID", "")
    if owner and owner != str(os.getpid() if pid is None else pid):
        return None
    return int(usec) / 2_000_000


class Service:
    """The daemon's side of systemd: readiness, the event-loop watchdog and the STATUS= line."""

    def __init__(
        self,
        notifier: Notifier,
        status: Callable[[], str] | None = None,
        *,
        watchdog_s: float | None = None,
        status_every_s: float = STATUS_EVERY_S,
    ) -> None:
        self.notifier = notifier
        self.watchdog_s = watchdog_s
        self.status_every_s = status_every_s
        self._status = status
        self._last_status: str | None = None

    @classmethod
    def from_env(
        cls, status: Callable[[], str] | None = None, env: Mapping[str, str] | None = None
    ) -> Service:
        return cls(Notifier.from_env(env), status, watchdog_s=watchdog_interval(env))

    @property
    def enabled(self) -> bool:
        return self.notifier.enabled

    def summary(self) -> str | None:
        if self._status is None:
            return None
        try:
            return " ".join(self._status().split())
        except Exception:  # a broken summary must never take the watchdog down with it
            log.exception("STATUS summary failed")
            return None

    def ready(self) -> None:
        """Call once every source and output is up: systemd then reports the unit started."""
        status = self.summary()
        self._last_status = status
        self.notifier.ready(status)

    def stopping(self) -> None:
        self.notifier.stopping("stopping: draining outputs")

    def refresh_status(self) -> None:
        status = self.summary()
        if status is not None and status != self._last_status:
            self._last_status = status
            self.notifier.status(status)

    async def run(self) -> None:
        """Ping the watchdog, refresh STATUS= until cancelled; return at once outside systemd."""
        if not self.notifier.enabled:
            return
        period = self.status_every_s
        if self.watchdog_s is not None:
            period = min(period, self.watchdog_s)
        while True:
            if self.watchdog_s is not None:
                self.notifier.watchdog()
            self.refresh_status()
            await asyncio.sleep(period)

    def close(self) -> None:
        self.notifier.close()


def _status_field(status: str | None) -> tuple[str, ...]:
    if not status:
        return ()
    return ("STATUS=" + " ".join(status.split()),)


def _socket_address(address: str) -> str | None:
    if address.startswith("@"):
        # Abstract namespace: systemd writes a leading '@' for the NUL byte.
        return "\0" + address[1:]
    if address.startswith("/"):
        return address
    return None
